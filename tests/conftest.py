"""Shared fixtures: the benchmark data directory and tiny Qwen-architecture checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = (ROOT / ".." / "shared" / "data").resolve()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert (DATA_DIR / "math" / "test.jsonl").is_file(), f"benchmark data missing at {DATA_DIR}"
    return DATA_DIR


def arithmetic_texts(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append(f"What is {a} + {b}? {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.")
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained 2-layer Qwen2 checkpoint with a ChatML tokenizer (save_pretrained folder)."""
    from mast.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", arithmetic_texts(), seed=0)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """(reference, target): the tiny model and a copy whose attention weights got a planted increment."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path_factory.mktemp("tiny_target") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")) and ".0." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
            elif name.endswith("o_proj.weight") and ".1." in name:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(target)
    return tiny_model, target


@pytest.fixture(scope="session")
def problems() -> list[dict]:
    """A handful of problem records in the shared shape."""
    rng = random.Random(3)
    rows = []
    for i in range(12):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        rows.append({"id": f"p{i}", "prompt": f"What is {a} + {b}?",
                     "solution": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.", "answer": str(a + b)})
    return rows


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    """The toy base -> SFT -> RLVR triple, built once per test session (minutes on a CPU).

    Set MAST_TOY to a finished `mast toy` build to reuse it instead, or MAST_TOY_DIR to a
    cache folder: the toy is built there once and reused by later sessions.
    """
    import os

    from mast.toy import build_toy, is_finished

    env = os.environ.get("MAST_TOY")
    if env and is_finished(env, seed=0):
        return Path(env)
    if os.environ.get("MAST_TOY_DIR"):
        out = Path(os.environ["MAST_TOY_DIR"])
        build_toy(out, seed=0)  # reuses a finished build of seed 0
        return out
    out = tmp_path_factory.mktemp("toy") / "toy"
    build_toy(out, seed=0)
    return out


@pytest.fixture(scope="session")
def triple(tmp_path_factory, tiny_pair) -> tuple[Path, Path, Path]:
    """(base, reference, target): the tiny model, its planted-increment copy, and a further RLVR-like step
    on layer 0's o_proj."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, ref = tiny_pair
    target = tmp_path_factory.mktemp("triple") / "target"
    model = AutoModelForCausalLM.from_pretrained(ref)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("self_attn.o_proj.weight") and ".0." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(ref).save_pretrained(target)
    return base, ref, target
