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

from mast.files import InputError, read_json

DEFAULT_PATTERNS = ("q_proj", "k_proj", "v_proj", "o_proj")
INDEX_FILE = "model.safetensors.index.json"


def check_checkpoint_dir(path: str | os.PathLike, field: str) -> Path:
    """`path` as an absolute Path when it is a folder with config.json; InputError naming `field` otherwise.

    The one model-folder check: folder, config.json, then :func:`check_checkpoint` (configs are JSON
    objects, every safetensors file complete; headers only). :func:`mast.hub.resolve_model` runs it on
    local folders; :func:`check_model_dir` adds the safetensors requirement of the tensor readers.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputError(f"{field}: {path}: folder not found")
    if not (p / "config.json").is_file():
        raise InputError(f"{field}: {path}: not a checkpoint folder (no config.json)")
    check_checkpoint(p)
    return p.resolve()


def check_model_dir(model_dir: str | os.PathLike, what: str = "model") -> Path:
    """The folder as a Path, or InputError naming it (missing, no config / safetensors, broken weights).

    :func:`check_checkpoint_dir` plus at least one safetensors file; the commands resolve Hub ids
    with :func:`mast.hub.resolve_model` before this.
    """
    check_checkpoint_dir(model_dir, what)
    d = Path(model_dir)
    if not (d / INDEX_FILE).is_file() and not any(d.glob("*.safetensors")):
        raise InputError(f"{d}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return d


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards its index lists, else every *.safetensors."""
    d = Path(model_dir)
    index = d / INDEX_FILE
    if not index.is_file():
        return sorted(d.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{index}: invalid index (expected a 'weight_map' object)") from None
    for name in names:
        if not isinstance(name, str) or not (d / name).is_file():
            raise InputError(f"{index}: lists {name}, which is missing")
    return [d / name for name in names]


def check_checkpoint(model_dir: str | os.PathLike) -> None:
    """The folder's configs (when present) are JSON objects and every safetensors file is complete.

    InputError naming the first bad file (:func:`check_safetensors`). Reads only the configs
    and the headers, so it is cheap enough to run before any work; a folder without
    safetensors files (e.g. `*.bin` weights a loader may still accept) passes.
    """
    for name in ("config.json", "generation_config.json"):
        if (Path(model_dir) / name).is_file():
            read_json(Path(model_dir) / name, expect=dict)
    for path in weight_files(model_dir):
        check_safetensors(path)


# bytes per element of the safetensors dtypes
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(path: str | os.PathLike) -> dict:
    """The header {key: {"dtype", "shape", "data_offsets"}} of a complete safetensors file, else InputError.

    Layout: an 8-byte little-endian header length N, N bytes of JSON header, then the data;
    each tensor's `data_offsets` [begin, end) are relative to the data, hold shape-product x
    dtype-size bytes, and the tensors tile the data exactly (what `safe_open` requires). Only
    the header is read, and N is checked against the file size first (a garbage N must not
    become a huge read: "MemoryError").
    """
    path = Path(path)

    def bad(why: str) -> InputError:
        return InputError(f"{path}: not a valid safetensors file ({why})")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise bad(f"a {n}-byte header does not fit in the {size}-byte file: truncated, or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("the header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(x) for x in info["shape"]], info["data_offsets"]
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {key!r} has no valid dtype/shape/data_offsets") from None
        numel = 1
        for x in shape:
            numel *= x
        if dtype in _DTYPE_BYTES and end - begin != numel * _DTYPE_BYTES[dtype]:
            raise bad(f"tensor {key!r}: {end - begin} bytes for {dtype} {shape}")
        spans.append((begin, end, key))
    data = size - 8 - n
    pos = 0
    for begin, end, key in sorted(spans):
        if begin != pos:
            raise bad(f"tensor {key!r} starts at byte {begin}, expected {pos}")
        pos = end
    if pos != data:
        why = "truncated" if pos > data else "trailing bytes"
        raise bad(f"{why}: the tensors need {pos} bytes of data, the file has {data}")
    return header


class TensorStore:
    """Named tensors of one checkpoint folder, read one at a time.

    `get(key)` opens the file holding `key` with `safe_open`, copies that tensor out and
    closes the file again, so the memory map (and the resident set) never spans the model.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = check_model_dir(model_dir)
        self.files: dict[str, Path] = {}
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        for path in weight_files(self.dir):
            for key, info in check_safetensors(path).items():
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
