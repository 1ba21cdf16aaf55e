"""Tiny Qwen-architecture checkpoints built from a config, for tests and benchmarks.

`mast toy` builds trained ones; this module makes untrained ones in a second: a BPE
tokenizer trained on a few strings, with Qwen's ChatML chat template, and a Qwen2/Qwen3
model from `transformers`' config classes, saved with `save_pretrained` like a Hub checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# Qwen2's pre-tokenizer regex (transformers' Qwen2Tokenizer): digits split one by one.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer.

    Normalizer and pre-tokenizer are exactly Qwen2's (NFC; Qwen2 regex split, which puts every
    digit in its own token; ByteLevel without its own regex). transformers 5 loads a `qwen2`
    checkpoint's tokenizer as `Qwen2Tokenizer`, which rebuilds this pipeline from
    vocab + merges, so the tokenizer returned here encodes exactly like the one loaded back
    with `AutoTokenizer.from_pretrained` (any other pre-tokenizer would be silently replaced).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_config(vocab_size: int, arch: str = "qwen2", hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 128, max_positions: int = 512, eos_id: int = 2, pad_id: int = 0):
    """A small Qwen2 or Qwen3 config with real q/k/v/o projections (GQA: k/v narrower than q/o)."""
    from transformers import Qwen2Config, Qwen3Config

    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    return cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        head_dim=hidden // heads,
    )


def build_tiny(out: str | Path, texts: Iterable[str], seed: int = 0, arch: str = "qwen2", **config_kw) -> Path:
    """Save an untrained tiny model + tokenizer to `out`; returns `out`."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer(texts, vocab_size=config_kw.pop("vocab_size", 512))
    cfg = tiny_config(
        len(tok), arch=arch, eos_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_id=tok.convert_tokens_to_ids("<|endoftext|>"), **config_kw,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
