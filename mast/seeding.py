"""Seeding Python, NumPy and torch at once: one helper for the unlearning loop and the toy build.

(:mod:`mast.seeds` is something else: the seed-level results table.)
"""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed `random`, NumPy's global generator (seed mod 2**32) and torch's default generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
