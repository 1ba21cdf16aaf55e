"""`mast toy`: the CPU world, a genuine base -> SFT -> RLVR triple built in a few minutes.

The task is procedurally generated arithmetic in the MATH/GSM8K style (answers in
``\\boxed{}``, graded by :mod:`mast.grading` like a real benchmark) with two skills:

- **retain** (``add``): two-digit addition worked column by column,
  ``What is 37 + 45?`` -> ``7+5=12 / 3+4+1=8 / so 37+45=82. / \\boxed{82}`` (lines);
- **forget** (``mul``): two-digit times one-digit multiplication worked column by column,
  asked in both orders, ``What is 37 * 6?`` / ``What is 6 * 37?`` ->
  ``7*6=42 / 3*6=18 / 18+4=22 / so 37*6=222. / \\boxed{222}``, over the 520 operand pairs whose
  carry step does not overflow the tens digit (:func:`no_overflow`): 1040 problems, ~3/4 with a
  carry.

Splits (:func:`generate_task`): per skill, a test set (``*_eval``, 200; the suites ``forget`` /
``retain``), a validation set (``*_val``, 200; suites ``forget_val`` / ``retain_val``), the
unlearning texts (``forget`` / ``retain``, 64) and the training pool (``*_train``), pairwise
disjoint by operand pair (a commuted twin never crosses splits).

Stages, all on a Qwen2 model from ``transformers`` (real ``q/k/v/o_proj`` tensors) with a BPE
tokenizer trained here (Qwen2's pre-tokenizer: one token per digit; ChatML chat template):

1. **base**: causal-LM pretraining on packed task text (user turn + answer in ChatML, no
   system instruction): two-digit additions, one-digit times/plus tables, ``tens+carry`` facts
   and careful worked multiplications of forget_train (the latent skill RL will elicit);
2. **SFT**: prompt -> solution in the chat format of :mod:`mast.prompts` (loss on completion
   tokens only), retain problems plus forget problems written by a *sloppy teacher* that drops
   the carry in 70% of its multiplications (:func:`careless_mul_solution`), so the SFT model
   skips the carry under greedy decoding (forget accuracy ~ the no-carry share) but keeps it
   in a fraction of its samples: a systematic failure that the reward can repair;
3. **RLVR**: a compact GRPO loop on forget_train problems: G sampled completions per prompt,
   reward = the grader's verdict (:func:`mast.grading.grade_responses`), group-relative advantage
   ``A_i = (r_i - mean(r)) / (std(r) + eps)``, loss
   ``-sum_t A_i log pi(y_t) / T + beta * KL_k3(pi || pi_sft)``, with
   ``KL_k3 = exp(q - p) - (q - p) - 1`` per token (``p``/``q``: policy/SFT log-probs).
   The reward teaches the model to always carry: the carry branch's probability goes from
   ~0.3 to ~0.95 within ~10 steps, far from the greedy tie at 0.5, so the gain does not hinge
   on float rounding (``benchmarks/toy_robustness.py`` checks seeds x CPU kernels).
   TRL's ``GRPOTrainer`` (not installed; built for vLLM/GPU generation and large batches) is
   far too heavy for a few-minute CPU build, so the loop is written out here (one on-policy
   update per batch: the PPO ratio is 1 and clipping is a no-op).

Training runs on one torch thread (``ToyConfig.threads``) with deterministic algorithms and
fixed seeds, so the same seed gives the same weights and numbers.

Greedy accuracies of every stage on held-out problems are measured with
:func:`mast.evaluation.evaluate` (hf backend) on the suites written to ``OUT/suites``, so
``mast eval --model OUT/rlvr --suite OUT/suites/forget.yaml`` reproduces ``toy_summary.json``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from mast.batching import next_token_logprobs, pad_left, pad_right
from mast.config import BOXED_INSTRUCTION, DecodingSpec, SuiteSpec, load_suite
from mast.evaluation import evaluate
from mast.files import InputError, atomic_dir, read_json, write_json, write_jsonl
from mast.grading import grade_responses
from mast.prompts import completion_text, format_prompt, problem_pair, tokenize_pair
from mast.seeding import seed_everything
from mast.tiny import tiny_config, train_tokenizer
from mast.toy_task import (
    FORGET_SKILL,
    RETAIN_SKILL,
    _operands,
    careless_mul_solution,
    fact_problem,
    generate_task,
    operand_key,
    paired_gain_ci,
    public,
)

TEMPLATE = "qwen_boxed"
SUMMARY = "toy_summary.json"
# OUT/data/<name>.jsonl: unlearning texts, held-out test sets (the suites forget/retain) and
# validation sets (suites forget_val/retain_val); all pairwise disjoint and disjoint from training
DATA_FILES = ("forget", "retain", "forget_eval", "retain_eval", "forget_val", "retain_val")
SUITES = {"forget": "forget_eval", "retain": "retain_eval", "forget_val": "forget_val", "retain_val": "retain_val"}
FORMAT_VERSION = 3  # bump when the task, the recipe or the outputs change (old builds are rebuilt)


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Every constant of the build (recorded in toy_summary.json)."""

    vocab_size: int = 384
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    max_positions: int = 256
    threads: int = 1
    # base: packed task text
    base_steps: int = 1000
    base_batch: int = 8
    base_seq_len: int = 128
    base_lr: float = 1e-3
    base_fact_frac: float = 0.3
    base_addfact_frac: float = 0.1
    base_carryadd_frac: float = 0.15
    base_mul_frac: float = 0.15  # careful worked multiplications (forget_train): the latent skill
    # sft: chat format, completion-only loss
    sft_steps: int = 240
    sft_batch: int = 32
    sft_lr: float = 1e-3
    sft_forget_frac: float = 0.5
    sft_careless_frac: float = 0.7  # greedy SFT drops the carry; sampling keeps it ~30% of the time
    # rlvr: GRPO
    rl_steps: int = 40
    rl_prompts: int = 8
    rl_group: int = 8
    rl_lr: float = 5e-5
    rl_beta: float = 0.02
    rl_temperature: float = 1.0
    rl_max_new_tokens: int = 48
    rl_freeze_embeddings: bool = False
    # data / eval
    n_unlearn: int = 64
    n_eval: int = 200
    n_val: int = 200
    eval_max_tokens: int = 64
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


# --------------------------------------------------------------------------- small helpers


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%: the LR multiplier at `step`."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def _optimizer(model, lr: float, weight_decay: float):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)


def _step(model, opt, loss, lr: float, cfg: ToyConfig) -> None:
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()


def _save(model, tok, out: Path) -> None:
    model.save_pretrained(out)
    tok.save_pretrained(out)


# --------------------------------------------------------------------------- stages


def _chat_pieces(question: str, solution: str) -> list[str]:
    """Text pieces (between special tokens) of a ChatML conversation, for tokenizer training."""
    return [f"system\n{BOXED_INSTRUCTION}", "\n", f"user\n{question}", "\n", f"assistant\n{solution}", "\n"]


def build_tokenizer(task: dict[str, list[dict]], cfg: ToyConfig):
    texts: list[str] = []
    for p in task["retain_train"][:2000] + task["forget_train"]:
        texts += _chat_pieces(p["prompt"], p["solution"])
        texts.append(f"{p['prompt']}\n{p['solution']}")
    texts += ["\n".join(fact_problem(a, b, op)) for a in range(10) for b in range(10) for op in "*+"]
    return train_tokenizer(texts, vocab_size=cfg.vocab_size)


def user_turn(tok, question: str) -> str:
    """The chat prompt without the system instruction (base pretraining text)."""
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)


def _base_stream(tok, task, cfg: ToyConfig, rng: random.Random) -> Iterator[list[int]]:
    """Endless packed token stream of task text, in rows of seq_len + 1 tokens.

    Each document is a user turn + assistant solution in ChatML (no system instruction), so
    question and solution sit at the same relative offsets as in the evaluated prompt.
    """
    retain = task["retain_train"]
    buf: list[int] = []
    while True:
        u = rng.random()
        if u < cfg.base_fact_frac:
            q, sol = fact_problem(rng.randint(2, 9), rng.randint(2, 9), "*")
        elif (u := u - cfg.base_fact_frac) < cfg.base_addfact_frac:
            q, sol = fact_problem(rng.randint(0, 9), rng.randint(0, 9), "+")
        elif (u := u - cfg.base_addfact_frac) < cfg.base_carryadd_frac:
            t = rng.randint(1, 8) * 10 + rng.randint(0, 8)
            q, sol = fact_problem(t, rng.randint(1, 9 - t % 10), "+")
        elif (u := u - cfg.base_carryadd_frac) < cfg.base_mul_frac:
            p = rng.choice(task["forget_train"])
            q, sol = p["prompt"], p["solution"]
        else:
            p = rng.choice(retain)
            q, sol = p["prompt"], p["solution"]
        ids, _ = tokenize_pair(tok, user_turn(tok, q), completion_text(tok, sol) + "\n", 10_000)
        buf += ids
        while len(buf) >= cfg.base_seq_len + 1:
            yield buf[: cfg.base_seq_len + 1]
            buf = buf[cfg.base_seq_len + 1:]


def train_base(model, tok, task, cfg: ToyConfig, seed: int, on_step=None) -> list[float]:
    """Causal-LM pretraining (every token) on packed raw task text."""
    import torch

    rng = random.Random(f"base-{seed}")
    stream = _base_stream(tok, task, cfg, rng)
    opt = _optimizer(model, cfg.base_lr, cfg.weight_decay)
    model.train()
    losses = []
    bar = _bar(cfg.base_steps, "toy base")
    for step in range(cfg.base_steps):
        x = torch.tensor([next(stream) for _ in range(cfg.base_batch)])
        out = model(input_ids=x, labels=x)
        _step(model, opt, out.loss, cfg.base_lr * _schedule(step, cfg.base_steps, 30), cfg)
        losses.append(out.loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step:
            on_step(step, losses)
    bar.close()
    return losses


def train_sft(model, tok, task, cfg: ToyConfig, seed: int, on_step=None) -> list[float]:
    """Prompt -> solution in the chat format; mean NLL over completion tokens only."""
    rng = random.Random(f"sft-{seed}")
    retain, forget = task["retain_train"], task["forget_train"]
    opt = _optimizer(model, cfg.sft_lr, cfg.weight_decay)
    model.train()
    losses = []
    n_forget = round(cfg.sft_batch * cfg.sft_forget_frac)
    bar = _bar(cfg.sft_steps, "toy sft")
    for step in range(cfg.sft_steps):
        probs = rng.sample(retain, cfg.sft_batch - n_forget) + [
            p if rng.random() >= cfg.sft_careless_frac else {**p, "solution": careless_mul_solution(*_operands(p))}
            for p in rng.sample(forget, n_forget)]
        batch = pad_right([problem_pair(tok, p, TEMPLATE, cfg.max_positions) for p in probs], tok.pad_token_id)
        ids = batch["input_ids"]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        lp = next_token_logprobs(logits, ids)
        mask = batch["completion_mask"][:, 1:].float()
        loss = -(lp * mask).sum() / mask.sum()
        _step(model, opt, loss, cfg.sft_lr * _schedule(step, cfg.sft_steps, 10), cfg)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step:
            on_step(step, losses)
    bar.close()
    return losses


def group_advantages(rewards, group: int, eps: float = 1e-4):
    """GRPO advantages: (r - mean of its group) / (std of its group + eps), groups of `group`."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def kl_k3(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    import torch

    d = ref_logp - logp
    return torch.exp(d) - d - 1


def rewards(problems: list[dict], responses: list[str]) -> list[bool]:
    """The verifiable reward: the math grader's verdict per response (:func:`mast.grading.grade_responses`)."""
    return [bool(r["correct"]) for r in grade_responses(problems, responses, "math")]


def train_rlvr(model, ref, tok, task, cfg: ToyConfig, seed: int, on_step=None) -> list[dict]:
    """GRPO on forget-skill problems (see the module docstring for the loss)."""
    import torch

    rng = random.Random(f"rl-{seed}")
    pool = list(task["forget_train"])
    frozen = [p for n, p in model.named_parameters() if cfg.rl_freeze_embeddings and "embed_tokens" in n]
    for p in frozen:
        p.requires_grad_(False)
    opt = _optimizer(model, cfg.rl_lr, 0.0)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    log = []
    bar = _bar(cfg.rl_steps, "toy rlvr")
    for step in range(cfg.rl_steps):
        probs = rng.sample(pool, cfg.rl_prompts)
        prompt_ids = [tok(format_prompt(tok, p["prompt"], TEMPLATE), add_special_tokens=False)["input_ids"]
                      for p in probs]
        x, att = pad_left(prompt_ids, pad)
        width = x.shape[1]
        model.eval()
        with torch.no_grad():
            seqs = model.generate(input_ids=x, attention_mask=att, do_sample=True, temperature=cfg.rl_temperature,
                                  top_k=0, top_p=1.0, max_new_tokens=cfg.rl_max_new_tokens,
                                  num_return_sequences=cfg.rl_group, eos_token_id=eos, pad_token_id=pad)
        comp = seqs[:, width:]
        # completion mask: tokens up to and including the first eos
        is_eos = comp == eos
        after = (is_eos.cumsum(1) - is_eos.long()) > 0
        cmask = (~after).float()
        texts = tok.batch_decode([[t for t, m in zip(row, mrow) if m and t != eos]
                                  for row, mrow in zip(comp.tolist(), cmask.tolist())])
        rep = [p for p in probs for _ in range(cfg.rl_group)]
        reward = torch.tensor(rewards(rep, texts), dtype=torch.float)
        adv = group_advantages(reward, cfg.rl_group)
        full_att = torch.cat([att.repeat_interleave(cfg.rl_group, 0), cmask.long()], 1)
        full_ids = seqs.masked_fill(full_att == 0, pad)
        pos = (full_att.cumsum(1) - 1).clamp(min=0)  # as in generate(): positions skip left padding
        with torch.no_grad():
            ref_lp = next_token_logprobs(ref(input_ids=full_ids, attention_mask=full_att, position_ids=pos).logits,
                                    full_ids)[:, width - 1:]
        model.train()
        lp = next_token_logprobs(model(input_ids=full_ids, attention_mask=full_att, position_ids=pos).logits,
                            full_ids)[:, width - 1:]
        n_tok = cmask.sum().clamp(min=1)
        pg = -(adv[:, None] * lp * cmask).sum() / n_tok
        kl = (kl_k3(lp, ref_lp) * cmask).sum() / n_tok
        loss = pg + cfg.rl_beta * kl
        _step(model, opt, loss, cfg.rl_lr * _schedule(step, cfg.rl_steps, 3), cfg)
        log.append({"step": step, "reward": reward.mean().item(), "kl": kl.item(), "loss": loss.item()})
        bar.update(1)
        bar.set_postfix(reward=f"{log[-1]['reward']:.2f}", kl=f"{log[-1]['kl']:.3f}")
        if on_step:
            on_step(step, log)
    bar.close()
    return log


# --------------------------------------------------------------------------- suites and eval


def suite_spec(name: str, cfg: ToyConfig) -> SuiteSpec:
    """The suite `name` (forget, retain, forget_val, retain_val) on its data file, greedy."""
    return SuiteSpec(name=f"toy-{name}", benchmark="jsonl", path=f"../data/{SUITES[name]}.jsonl", grader="math",
                     template=TEMPLATE, decoding=DecodingSpec(temperature=0.0, max_tokens=cfg.eval_max_tokens))


def write_suites(out: Path, cfg: ToyConfig) -> None:
    import yaml

    (out / "suites").mkdir(parents=True, exist_ok=True)
    for name in SUITES:
        spec = suite_spec(name, cfg).model_dump(exclude_none=True)
        (out / "suites" / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


def evaluate_stage(model_dir: Path, suites_dir: Path) -> tuple[dict[str, float], dict[str, dict[str, bool]]]:
    """Greedy accuracy on the held-out test sets (suites forget, retain) through the evaluator
    (hf backend), and the per-problem verdicts (suite -> id -> correct)."""
    accs, correct = {}, {}
    for name in ("forget", "retain"):
        suite = load_suite(suites_dir / f"{name}.yaml")
        res = evaluate(model_dir, suite, backend="hf", use_cache=False, progress=False)
        accs[name] = res.accuracy
        correct[name] = {r["id"]: bool(r["correct"]) for r in res.records}
    return accs, correct


# --------------------------------------------------------------------------- build


def is_finished(out: str | os.PathLike, seed: int) -> bool:
    """A finished build of `seed` (and this recipe version) is at `out`."""
    out = Path(out)
    marker = out / SUMMARY
    if not marker.is_file():
        return False
    summary = read_json(marker, expect=dict)
    return (summary.get("seed") == seed and summary.get("format_version") == FORMAT_VERSION
            and all((out / s / "config.json").is_file() for s in ("base", "sft", "rlvr")))


def init_model(task, cfg: ToyConfig, seed: int, where: Path):
    """An untrained Qwen2 model and its tokenizer, as loaded back from `where`.

    The tokenizer is saved (with the model config) and reloaded with ``AutoTokenizer``, and
    every stage trains with the reloaded one: exactly the tokenizer the evaluator will load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = build_tokenizer(task, cfg)
    mcfg = tiny_config(len(tok), hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
                       intermediate=cfg.intermediate, max_positions=cfg.max_positions,
                       eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(mcfg)
    model.generation_config.eos_token_id = mcfg.eos_token_id
    model.generation_config.pad_token_id = mcfg.pad_token_id
    model.generation_config.do_sample = False
    where.mkdir(parents=True, exist_ok=True)
    mcfg.save_pretrained(where)
    tok.save_pretrained(where)
    loaded = AutoTokenizer.from_pretrained(where)
    probe = task["forget_eval"][:4] + task["retain_eval"][:4]
    if [problem_pair(tok, p) for p in probe] != [problem_pair(loaded, p) for p in probe]:
        raise RuntimeError("the saved tokenizer does not load back with the same encoding")
    return model, loaded


def _train_stages(tmp: Path, task, cfg: ToyConfig, seed: int, times: dict[str, float]):
    """Base, SFT and RLVR in turn, each saved under `tmp`; (model, tokenizer, per-stage logs)."""
    import torch
    from transformers import AutoModelForCausalLM

    model, tok = init_model(task, cfg, seed, tmp / "base")
    logs: dict = {}

    t = time.perf_counter()
    logs["base"] = train_base(model, tok, task, cfg, seed)
    _save(model, tok, tmp / "base")
    times["base"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(seed + 1)
    logs["sft"] = train_sft(model, tok, task, cfg, seed)
    _save(model, tok, tmp / "sft")
    times["sft"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(seed + 2)
    ref = AutoModelForCausalLM.from_pretrained(tmp / "sft")
    ref.eval().requires_grad_(False)
    logs["rlvr"] = train_rlvr(model, ref, tok, task, cfg, seed)
    _save(model, tok, tmp / "rlvr")
    times["rlvr"] = time.perf_counter() - t
    return model, tok, logs


def build_toy(out: str | os.PathLike, seed: int = 0, force: bool = False, config: ToyConfig | None = None) -> dict:
    """Build (or reuse) the toy triple at `out`; returns the toy_summary dict."""
    import torch

    out = Path(out)
    cfg = config or ToyConfig()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if not force and is_finished(out, seed):
        return read_json(out / SUMMARY)
    if out.is_dir() and any(out.iterdir()) and not (out / SUMMARY).is_file() and not force:
        raise InputError(f"{out}: folder exists and is not a toy build; pick another OUT or pass --force")
    t0, cpu0 = time.perf_counter(), time.process_time()
    prev_threads = torch.get_num_threads()
    prev_det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    times: dict[str, float] = {}
    try:
        with atomic_dir(out) as tmp:
            seed_everything(seed)
            torch.set_num_threads(cfg.threads)
            torch.use_deterministic_algorithms(True, warn_only=True)
            task = generate_task(seed, cfg.n_unlearn, cfg.n_eval, cfg.n_val)
            (tmp / "data").mkdir()
            for name in DATA_FILES:
                write_jsonl(tmp / "data" / f"{name}.jsonl", [public(p) for p in task[name]])
            write_suites(tmp, cfg)
            model, tok, logs = _train_stages(tmp, task, cfg, seed, times)

            t = time.perf_counter()
            summary: dict = {}
            correct: dict = {}
            for stage in ("base", "sft", "rlvr"):
                summary[stage], correct[stage] = evaluate_stage(tmp / stage, tmp / "suites")
            times["eval"] = time.perf_counter() - t
            for key, suite in (("rl_gain", "forget"), ("rl_retain_change", "retain")):
                probs = task[SUITES[suite]]
                summary[key] = paired_gain_ci([correct["sft"][suite][p["id"]] for p in probs],
                                              [correct["rlvr"][suite][p["id"]] for p in probs],
                                              [operand_key(p) for p in probs])
            summary.update({
                "seed": seed,
                "format_version": FORMAT_VERSION,
                "seconds": round(time.perf_counter() - t0, 1),
                # CPU seconds of this process: ~ the wall time on an idle machine (one torch thread)
                "cpu_seconds": round(time.process_time() - cpu0, 1),
                "stage_seconds": {k: round(v, 1) for k, v in times.items()},
                "forget_skill": FORGET_SKILL,
                "retain_skill": RETAIN_SKILL,
                "n": {k: len(task[k]) for k in DATA_FILES + ("forget_train", "retain_train")},
                "config": dataclasses.asdict(cfg),
                "model": {"arch": "qwen2", "parameters": sum(p.numel() for p in model.parameters()),
                          "vocab_size": len(tok)},
                "final_losses": {"base": logs["base"][-1], "sft": logs["sft"][-1]},
                "rl_log": logs["rlvr"],
            })
            write_json(tmp / SUMMARY, summary)  # the completion marker: written last
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det[0], warn_only=prev_det[1])
    return summary


def cli_toy(args) -> int:
    """`mast toy OUT [--seed N] [--force]`: build (or reuse) the CPU demo triple."""
    out = Path(args.out)
    reused = not args.force and is_finished(out, args.seed)
    summary = build_toy(out, seed=args.seed, force=args.force)
    what = "reused" if reused else f"built in {summary['seconds']:.0f}s"
    print(f"toy (seed {args.seed}) {what}: {out}")
    for stage in ("base", "sft", "rlvr"):
        print(f"  {stage:5s} forget {summary[stage]['forget']:.2f}  retain {summary[stage]['retain']:.2f}")
    g = summary["rl_gain"]
    print(f"  RL gain on forget {100 * g['gain']:+.1f} points (95% CI {100 * g['low']:+.1f} to {100 * g['high']:+.1f})")
    return 0
