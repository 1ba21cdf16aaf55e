"""Per-prompt sampling seeds: no two runs of a sweep draw the same sample of a problem.

Both backends seed sample j of a prompt with seed s by ``s + j`` (vLLM's parallel sampling,
``vllm/v1/engine/parallel_sampling.py``; the hf backend does the same). Runs whose seeds differ by
small offsets therefore share samples: measured on vLLM (toy, 200 prompts, n = 4), sample j + 1 of
a seed-0 run equals sample j of the seed-1 run in 600 of 600 cases.

So a prompt's seed is ``STRIDE * h``, h = a stable 54-bit hash of (decoding.seed, the run's
``stream``, the problem id): its n <= ``MAX_SAMPLES`` = STRIDE samples use the block
``STRIDE*h .. STRIDE*h + n - 1``, which no other (stream, problem) reaches unless two hashes
collide (about runs^2 / 2^55 per problem). A run's stream names it within the sweep (``target``,
``target/2``, ``reference``, ``trial/<trial_id>``, ``trial/<trial_id>/stop``), so a run stays
reproducible from its spec, and a prompt's seed depends on neither its batch nor the other
prompts of the call. Seeds stay below 2^62 (an int64 in every engine, with room for + j).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

MAX_SAMPLES = 256  # the largest decoding.n
STRIDE = MAX_SAMPLES  # a prompt's n seeds never reach the next block
HASH_BITS = 54  # STRIDE * 2**54 = 2**62

TARGET = "target"  # the default stream (unset): the target's baselines, `mast eval`
SECOND_TARGET = "target/2"  # require_target_correct's second, independent run of the target
REFERENCE = "reference"  # the reference (SFT) model's run: the SFT floor


def trial_stream(trial_id: str, part: str | None = None) -> str:
    """A trial's stream (its test and validation suites), or one of its parts' (``stop``: its in-loop check)."""
    return f"trial/{trial_id}" + (f"/{part}" if part else "")


def prompt_seed(seed: int, stream: str | None, problem_id, *extra) -> int:
    """The sampling seed of one prompt: ``STRIDE * (hash(seed, stream, problem id, *extra) mod 2^HASH_BITS)``.

    ``extra`` tells apart other prompts of the same problem in one run (the probe's prefixes)."""
    key = json.dumps([int(seed), stream or TARGET, str(problem_id), *extra], separators=(",", ":"))
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % (1 << HASH_BITS)
    return STRIDE * h


def prompt_seeds(seed: int, stream: str | None, problem_ids: Iterable) -> list[int]:
    """:func:`prompt_seed` of each problem id, in order."""
    return [prompt_seed(seed, stream, pid) for pid in problem_ids]


def sample_seeds(seed: int, n: int) -> range:
    """The seeds of a prompt's n samples, as both backends use them: seed + j for j < n."""
    if not 0 < n <= MAX_SAMPLES:
        raise ValueError(f"n = {n}: must be in 1..{MAX_SAMPLES}")
    return range(seed, seed + n)
