"""Per-prompt sampling seeds (mast.sampling_seeds): no two runs of a sweep share a (problem, sample
seed) pair, a run reproduces from its spec, and the hf backend samples each row with its own seed."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mast.backends import GenerationRequest, HFBackend, encode_prompts
from mast.config import DecodingSpec, SuiteSpec, SweepSpec, load_yaml
from mast.evaluation import eval_cache_key, evaluate
from mast.grid import expand_grid, ordered_suites, suite_name
from mast.prompts import format_prompt
from mast.sampling_seeds import (
    MAX_SAMPLES,
    REFERENCE,
    SECOND_TARGET,
    STRIDE,
    prompt_seed,
    prompt_seeds,
    sample_seeds,
)

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ["demo", "paper", "qwen3"]
PROBLEMS_PER_SUITE = 150


# --------------------------------------------------------------------------- the scheme (pure)


def test_prompt_seeds_are_blocks_of_stride_below_2_62_and_reproducible():
    seeds = prompt_seeds(0, "trial/x", [f"p{i}" for i in range(1000)])
    assert seeds == prompt_seeds(0, "trial/x", [f"p{i}" for i in range(1000)])  # same stream: same seeds
    assert all(s % STRIDE == 0 and 0 <= s and s + MAX_SAMPLES < 2 ** 62 for s in seeds)
    assert len(set(seeds)) == 1000
    # a prompt's seed is its own: not its position, nor the other problems of the call
    assert prompt_seeds(0, "trial/x", ["p7", "p3"]) == [seeds[7], seeds[3]]
    # unset stream = the target's ("target"); another stream, decoding seed or problem: another block
    assert prompt_seed(0, None, "p1") == prompt_seed(0, "target", "p1")
    assert len({prompt_seed(0, "target", "p1"), prompt_seed(0, SECOND_TARGET, "p1"), prompt_seed(1, "target", "p1"),
                prompt_seed(0, "target", "p2"), prompt_seed(0, "target", "p1", "prefix", 0.5)}) == 5
    assert list(sample_seeds(seeds[0], 4)) == [seeds[0] + j for j in range(4)]
    with pytest.raises(ValueError):
        sample_seeds(0, MAX_SAMPLES + 1)


def test_decoding_bounds_n_and_keeps_its_stream_out_of_greedy_dumps():
    with pytest.raises(ValidationError):
        DecodingSpec(temperature=1.0, n=MAX_SAMPLES + 1)
    greedy = SuiteSpec(name="s", benchmark="jsonl", path="x.jsonl")
    assert greedy.trial_run("t").decoding.stream == "trial/t"
    # greedy: the stream changes nothing, so neither the dump nor the eval cache key carries it
    assert greedy.trial_run("t").decoding.model_dump() == greedy.decoding.model_dump()
    assert "stream" not in greedy.decoding.model_dump(mode="json")
    sampled = greedy.model_copy(update={"decoding": DecodingSpec(temperature=0.6, n=4)})
    assert "stream" not in sampled.decoding.model_dump()  # unset: as before the field existed
    runs = [sampled, sampled.independent_run(), sampled.independent_run(REFERENCE), sampled.trial_run("a"),
            sampled.trial_run("a", "stop"), sampled.trial_run("b")]
    assert [r.decoding.model_dump().get("stream") for r in runs] == [
        None, SECOND_TARGET, REFERENCE, "trial/a", "trial/a/stop", "trial/b"]
    assert DecodingSpec.model_validate(runs[3].decoding.model_dump()) == runs[3].decoding


def _sweep_runs(spec: SweepSpec) -> list[tuple[str | None, list[str]]]:
    """Every sampling run of the sweep as (stream, problem ids): the target's baselines (reported and
    validation suites), its second run (require_target_correct), the reference's run, and per trial (null
    trials included) its suites, its validation suites and its stop check. Synthetic ids per suite; the
    stop check scores forget_val's problems (toy) or forget's (MATH), as mast.suites.stop_suite does."""
    decoding = spec.evaluation.decoding or DecodingSpec()
    suite = SuiteSpec(name="s", benchmark="jsonl", path="x.jsonl", decoding=decoding)
    ids = {name: [f"{name}/{i}" for i in range(spec.evaluation.limits.get(name, PROBLEMS_PER_SUITE))]
           for name in [suite_name(e) for e in ordered_suites(spec)] + list(spec.evaluation.validation)}
    reported = [i for name in map(suite_name, ordered_suites(spec)) for i in ids[name]]
    validation = [i for name in spec.evaluation.validation for i in ids[name]]
    stop = (ids.get("forget_val") or ids["forget"]) if spec.unlearning.stop is not None else []
    runs = [(suite.decoding.stream, reported + validation),
            (suite.independent_run(SECOND_TARGET).decoding.stream, ids["forget"]),
            (suite.independent_run(REFERENCE).decoding.stream, reported)]
    for trial in expand_grid(spec).trials:
        runs.append((suite.trial_run(trial.trial_id).decoding.stream, reported + validation))
        if stop:
            runs.append((suite.trial_run(trial.trial_id, "stop").decoding.stream, stop))
    return runs


@pytest.mark.parametrize("name", SWEEPS)
def test_no_two_runs_of_a_sweep_draw_the_same_sample_of_a_problem(name):
    """Over the whole grid (null trials included), every (problem, seed + j), j < n, is drawn by one run only
    (n: the sweep's, 4 for a greedy sweep), and even the blocks of MAX_SAMPLES seeds never meet."""
    spec = load_yaml(ROOT / "sweeps" / f"{name}.yaml", SweepSpec)
    decoding = spec.evaluation.decoding or DecodingSpec()
    n = decoding.n if not decoding.greedy else 4
    runs = _sweep_runs(spec)
    streams = [s for s, _ in runs]
    assert len(set(streams)) == len(streams) and len(runs) >= len(expand_grid(spec).trials) + 3
    pairs = [(pid, x) for stream, ids in runs for pid, s in zip(ids, prompt_seeds(decoding.seed, stream, ids))
             for x in sample_seeds(s, n)]
    assert len(set(pairs)) == len(pairs)
    blocks = [(pid, s // STRIDE) for stream, ids in runs for pid, s in zip(ids, prompt_seeds(decoding.seed, stream, ids))]
    assert len(set(blocks)) == len(blocks)
    # reproducible from the spec: the same runs, the same seeds
    assert [prompt_seeds(decoding.seed, s, ids) for s, ids in runs] == [
        prompt_seeds(decoding.seed, s, ids) for s, ids in _sweep_runs(spec)]


# --------------------------------------------------------------------------- the hf backend


@pytest.fixture(scope="module")
def prompt_ids(tiny_model, problems):
    be = HFBackend(tiny_model, progress=False)
    prompts = [format_prompt(be.tokenizer, p["prompt"], "qwen_boxed") for p in problems[:8]]
    prompts[1] = prompts[1].replace("What is", "Please tell me quickly what is")  # unequal lengths: padding
    return encode_prompts(be.tokenizer, prompts)


def _samples(model, ids, decoding, seeds, batch_size):
    [rows] = HFBackend(model, batch_size=batch_size, progress=False).generate(
        [GenerationRequest(ids, decoding, seeds)])
    return [[s["text"] for s in row] for row in rows]


def test_hf_rows_sample_with_their_own_seeds_whatever_the_batch(tiny_model, problems, prompt_ids):
    """Sample j of a prompt with seed s draws with s + j (vLLM's rule), the same in a batch of 8 or alone,
    and reproducibly; another stream's seeds give other samples."""
    dec = DecodingSpec(temperature=1.0, top_p=0.9, n=3, max_tokens=6)
    seeds = prompt_seeds(0, "target", [p["id"] for p in problems[:8]])
    batched = _samples(tiny_model, prompt_ids, dec, seeds, 8)
    assert [len(r) for r in batched] == [3] * 8 and sum(len(set(r)) > 1 for r in batched) >= 6
    assert _samples(tiny_model, prompt_ids, dec, seeds, 8) == batched
    assert _samples(tiny_model, prompt_ids, dec, seeds, 1) == batched
    assert _samples(tiny_model, prompt_ids[2:5], dec, seeds[2:5], 3) == batched[2:5]
    one = dec.model_copy(update={"n": 1})
    assert [r[0] for r in _samples(tiny_model, prompt_ids[:4], one, [s + 2 for s in seeds[:4]], 4)] == [
        r[2] for r in batched[:4]]
    other = _samples(tiny_model, prompt_ids, dec, prompt_seeds(0, "trial/x", [p["id"] for p in problems[:8]]), 8)
    assert sum(a != b for ra, rb in zip(batched, other) for a, b in zip(ra, rb)) >= 12


def test_evaluate_samples_each_problem_by_its_stream_and_id(tiny_model, problems, tmp_path):
    """evaluate() sends each problem's seed: a problem's samples are the same whatever other problems
    are evaluated with it; a trial's stream samples otherwise; the stream keys the cache."""
    suite = SuiteSpec(name="s", benchmark="jsonl", path="<test>", template="plain",
                      decoding={"temperature": 1.0, "n": 2, "max_tokens": 6, "seed": 5})

    def samples(sv, probs):
        return {r["id"]: [s["response"] for s in r["samples"]] for r in evaluate(
            tiny_model, sv, problems=probs, use_cache=False, progress=False).records}

    full = samples(suite, problems[:6])
    part = samples(suite, problems[3:6] + problems[:1])
    assert all(part[k] == full[k] for k in part)
    trial = samples(suite.trial_run("null-s0"), problems[:6])
    assert trial != full and samples(suite.trial_run("null-s0"), problems[:6]) == trial
    keys = {eval_cache_key(tiny_model, sv, problems[:6], "hf") for sv in (suite, suite.trial_run("a"),
                                                                           suite.independent_run())}
    assert len(keys) == 3
