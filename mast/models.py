"""Checkpoint access without loading whole models: the candidate-tensor inventory and streaming reads.

A checkpoint is a `save_pretrained` folder: `config.json` plus `model.safetensors` or shards
listed in `model.safetensors.index.json`. :class:`TensorStore` reads the safetensors headers
(names, dtypes, shapes) and loads one tensor at a time with `safetensors.safe_open`, so
comparing two checkpoints never holds more than a couple of matrices in memory.

The inventory finds candidates by module structure, not by one model's names: the model is
instantiated from its config on the `meta` device (no memory, no weights) and every
`nn.Linear` whose module name ends with one of the patterns (default the attention
projections `q_proj`, `k_proj`, `v_proj`, `o_proj`; add e.g. `gate_proj` for MLP ablations)
is a candidate; its weight (2-D; biases are not candidates) is named as in
`model.named_parameters()`, e.g. `model.layers.0.self_attn.q_proj.weight`. Tied weights
(e.g. `lm_head.weight` = `model.embed_tokens.weight`) appear once, under the canonical
parameter name, and are read from whichever alias the file stores. An architecture that
transformers cannot build falls back to the safetensors headers (2-D tensors whose key ends
with `.<pattern>.weight`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mast.files import InputError

DEFAULT_PATTERNS = ("q_proj", "k_proj", "v_proj", "o_proj")
INDEX_FILE = "model.safetensors.index.json"


def check_model_dir(model_dir: str | os.PathLike, what: str = "model") -> Path:
    """The folder as a Path, or InputError naming it (missing, or no config / safetensors).

    The folder / config.json part is :func:`mast.hub.check_checkpoint_dir` (the one model-folder
    check); the commands resolve Hub ids with :func:`mast.hub.resolve_model` before this.
    """
    from mast.hub import check_checkpoint_dir

    check_checkpoint_dir(model_dir, what)
    d = Path(model_dir)
    if not (d / INDEX_FILE).is_file() and not any(d.glob("*.safetensors")):
        raise InputError(f"{d}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return d


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {key: {"dtype", "shape", "data_offsets"}} (no tensor data read)."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header


class TensorStore:
    """Named tensors of one checkpoint folder, read one at a time.

    `get(key)` opens the file holding `key` with `safe_open`, copies that tensor out and
    closes the file again, so the memory map (and the resident set) never spans the model.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = check_model_dir(model_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{index}: invalid index (expected a 'weight_map' object)") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        self.files: dict[str, Path] = {}
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        for fname in files:
            path = self.dir / fname
            if not path.is_file():
                raise InputError(f"{index}: lists {fname}, which is missing")
            for key, info in _read_header(path).items():
                self.files[key] = path
                self.meta[key] = (info["dtype"], tuple(info["shape"]))

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.meta[key][1]

    def dtype(self, key: str) -> str:
        """The stored dtype as safetensors names it: "BF16", "F16", "F32", ..."""
        return self.meta[key][0]

    def get(self, key: str, dtype=None, device=None):
        """One tensor as a torch tensor (optionally cast and moved)."""
        from safetensors import safe_open

        if key not in self.files:
            raise InputError(f"{self.dir}: no tensor {key!r} in the checkpoint")
        with safe_open(str(self.files[key]), framework="pt", device="cpu") as f:
            t = f.get_tensor(key)
        if dtype is not None or device is not None:
            t = t.to(device=device or t.device, dtype=dtype or t.dtype)
        return t


@dataclass
class Candidate:
    """One candidate tensor: parameter name, shape, and the names it may be stored under (tied aliases)."""

    name: str
    shape: tuple[int, ...]
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def key_in(self, store: TensorStore) -> str:
        for key in (self.name, *self.aliases):
            if key in store:
                return key
        raise InputError(f"{store.dir}: no tensor {self.name!r} in the checkpoint")


def _matches(module_name: str, patterns: Sequence[str]) -> bool:
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def _meta_model(model_dir: Path):
    """The model built from its config on the meta device (no weights, no memory), or None."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except Exception:  # unknown architecture / remote code: fall back to the headers
        return None


def _check_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    patterns = tuple(patterns)
    if not patterns or any(not isinstance(p, str) or not p.strip() for p in patterns):
        raise InputError(f"candidate patterns must be non-empty module-name suffixes, got {list(patterns)}")
    return patterns


def inventory(model_dir: str | os.PathLike, patterns: Iterable[str] = DEFAULT_PATTERNS) -> list[Candidate]:
    """Candidates in model order: weights of the `nn.Linear` modules whose name ends with a pattern."""
    import torch

    patterns = _check_patterns(patterns)
    store = TensorStore(model_dir)
    model = _meta_model(store.dir)
    out: list[Candidate] = []
    if model is not None:
        aliases: dict[int, list[str]] = {}
        for pname, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(pname)
        seen: set[int] = set()
        for mname, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or not _matches(mname, patterns):
                continue
            w = module.weight
            if id(w) in seen:
                continue
            seen.add(id(w))
            names = aliases[id(w)]
            cand = Candidate(names[0], tuple(w.shape), tuple(names[1:]))
            if not any(k in store for k in names):
                out = []  # the file's keys are not the module names: use the headers instead
                break
            out.append(cand)
    if not out:
        for key in store.keys():
            shape = store.shape(key)
            if len(shape) == 2 and key.endswith(".weight") and _matches(key[: -len(".weight")], patterns):
                out.append(Candidate(key, shape))
    if not out:
        raise InputError(f"{store.dir}: no candidate tensors match {list(patterns)}")
    return out


def candidate_tensors(
    model_dir: str | os.PathLike, patterns: Iterable[str] = DEFAULT_PATTERNS
) -> list[tuple[str, tuple[int, ...]]]:
    """[(parameter name, shape)] of the candidate tensors, in model order."""
    return [(c.name, c.shape) for c in inventory(model_dir, patterns)]


def matched_inventory(
    reference: str | os.PathLike, target: str | os.PathLike, patterns: Iterable[str] = DEFAULT_PATTERNS
) -> tuple[list[Candidate], TensorStore, TensorStore]:
    """Candidates of `target`, checked to exist with the same shapes in `reference`; both stores."""
    ref_store, tgt_store = TensorStore(reference), TensorStore(target)
    cands = inventory(target, patterns)
    for c in cands:
        key = c.key_in(ref_store)
        if ref_store.shape(key) != c.shape:
            raise InputError(
                f"{reference}: {c.name} has shape {list(ref_store.shape(key))} but {list(c.shape)} in {target}"
            )
        if tgt_store.shape(c.key_in(tgt_store)) != c.shape:
            raise InputError(f"{target}: {c.name} shape disagrees with the model config")
    return cands, ref_store, tgt_store
