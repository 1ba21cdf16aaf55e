"""One seeding helper for the unlearning loop and the toy build."""

from __future__ import annotations

import random

import numpy as np
import torch

from mast.seeding import seed_everything


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seed_everything_repeats_python_numpy_and_torch_draws():
    seed_everything(7)
    first = _draws()
    seed_everything(7)
    assert _draws() == first
    seed_everything(8)
    assert _draws() != first


def test_seed_everything_takes_seeds_beyond_numpys_range():
    seed_everything(2**40 + 5)  # NumPy gets the seed mod 2**32
    a = float(np.random.rand())
    np.random.seed(5)
    assert float(np.random.rand()) == a
