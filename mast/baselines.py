"""What every trial is read against, evaluated once per sweep: the TARGET's results on every suite
(the McNemar "before" side), the REFERENCE (SFT) model's (the SFT floor, :mod:`mast.floor`), the
target on the validation suites, the target's own forget texts (``texts: generated``) and the
trial-independent selection statistics.

``data.require_target_correct`` (MATH): the forget set is chosen on one run of the target
(the candidates it solved) and trials are tested against a SECOND, independent run of the
target on the chosen problems (stream ``target/2``, :meth:`~mast.config.SuiteSpec.independent_run`). Testing against
the choosing run would make wrong->right flips impossible by construction, so evaluation noise
alone would look like forgetting. With greedy decoding on the CPU the two runs are identical
(nothing to correct); with sampling or vLLM batching they differ.
"""

from __future__ import annotations

import dataclasses

from mast.backends import make_backend
from mast.config import SuiteSpec, SweepSpec
from mast.evaluation import VALIDATION_PREFIX, evaluate, evaluate_many
from mast.files import InputError, log, write_jsonl
from mast.grid import grid_rhos
from mast.layout import SweepDir
from mast.sampling_seeds import REFERENCE, SECOND_TARGET
from mast.selection import coupling_stats, spectral_stats_multi
from mast.sources import Sources
from mast.suites import Suite


@dataclasses.dataclass
class Baselines:
    """A model's results per suite: per-problem records, probe results, evaluations run, and
    (require_target_correct) the first run that chose the forget set, per suite."""

    records: dict[str, list[dict]]
    probes: dict[str, dict]
    evaluations: dict[str, int]
    selection_runs: dict[str, list[dict]] = dataclasses.field(default_factory=dict)


def evaluate_baselines(spec: SweepSpec, src: Sources, suites: dict[str, Suite], validation: dict[str, Suite],
                       sd: SweepDir, backend) -> tuple[Baselines, dict[str, float]]:
    """Evaluate the target once per suite (every trial is paired with these results) and on every
    validation suite (records in baseline/<name>.jsonl: where the validation curves start).

    All of it is ONE :func:`evaluate_many` call (vLLM: one engine start), after
    ``data.require_target_correct``'s two runs (MATH): the forget split becomes the first
    forget_size candidates the target solves in a first run (the capability to remove; `suites`
    and `src` are updated), and the forget baseline is a second, independent run on them: the
    McNemar "before" side of every trial. Returns (the baselines, validation accuracy by name).
    """
    out = Baselines({}, {}, {})
    if spec.data.require_target_correct and src.kind == "math" and "forget" in suites:
        _choose_target_correct_forget(spec, src, suites["forget"], sd, backend, out)
    todo = {n: s for n, s in suites.items() if n not in out.records}
    specs = [s.spec for s in todo.values()] + [
        s.spec.model_copy(update={"name": VALIDATION_PREFIX + n}) for n, s in validation.items()]
    problems = {**{n: s.problems for n, s in todo.items()},
                **{VALIDATION_PREFIX + n: s.problems for n, s in validation.items()}}
    log(f"baseline: evaluating the target on {', '.join(f'{n} ({len(p)})' for n, p in problems.items())}")
    results = evaluate_many(src.target, specs, backend=backend, problems=problems, cache_dir=sd.eval_cache,
                            progress=True) if specs else {}
    for name in todo:
        res = results[name]
        out.evaluations[name] = out.evaluations.get(name, 0) + 1
        out.records[name] = res.records
        if res.probe is not None:
            out.probes[name] = res.probe
        log(f"baseline {name}: {res.n_correct}/{res.n} = {res.accuracy:.3f}"
            f"{' (cache hit)' if res.cache_hit else ''} in {res.seconds:.0f}s")
    val_acc = {}
    for name in validation:
        res = results[VALIDATION_PREFIX + name]
        write_jsonl(sd.baseline_results(name), res.records)
        val_acc[name] = res.accuracy
        log(f"baseline {name} (validation): {res.n_correct}/{res.n} = {res.accuracy:.3f}")
    return out, val_acc


def _choose_target_correct_forget(spec: SweepSpec, src: Sources, s: Suite, sd: SweepDir, backend,
                                  out: Baselines) -> None:
    """require_target_correct: the forget set = the first forget_size candidates run 1 solves (`s` and
    `src` updated); its baseline = run 2 (its own sampling stream) on them, into `out`."""
    res = evaluate(src.target, s.spec, backend=backend, problems=s.problems, cache_dir=sd.eval_cache, progress=True)
    ok = [(p, r) for p, r in zip(s.problems, res.records) if r["correct"]][: spec.data.forget_size]
    if len(ok) < spec.data.forget_size:
        raise InputError(f"data.require_target_correct: the target solves only {len(ok)} of "
                         f"{len(s.problems)} candidates; need forget_size={spec.data.forget_size}")
    s.problems = [p for p, _ in ok]
    src.forget_texts = s.problems
    out.selection_runs["forget"] = [r for _, r in ok]
    second = evaluate(src.target, s.spec.independent_run(SECOND_TARGET), backend=backend, problems=s.problems,
                      cache_dir=sd.eval_cache, progress=True)
    out.evaluations["forget"] = 2
    out.records["forget"] = second.records
    log(f"baseline forget: chosen on run 1 ({len(ok)} solved); run 2 (independent) solves "
        f"{second.n_correct}/{second.n}")


def evaluate_reference(spec: SweepSpec, src: Sources, suites: dict[str, Suite], sd: SweepDir) -> Baselines:
    """Evaluate the reference (SFT) model once per suite, on the same problems as the target's
    baseline (cached like it; sampled in a stream of its own): the SFT floor every trial is read against."""
    out = Baselines({}, {}, {})
    backend = make_backend(spec.evaluation.backend, src.reference, batch_size=spec.evaluation.batch_size,
                           **spec.evaluation.backend_options())
    # the floor needs accuracy, not the probe; one evaluate_many call: one engine start with vLLM
    specs = [s.spec.model_copy(update={"probe": None}).independent_run(REFERENCE) for s in suites.values()]
    try:
        results = evaluate_many(src.reference, specs, backend=backend,
                                problems={n: s.problems for n, s in suites.items()}, cache_dir=sd.eval_cache,
                                progress=True)
        for name, res in results.items():
            out.records[name] = res.records
            out.evaluations[name] = 0 if res.cache_hit else 1
            log(f"reference {name}: {res.n_correct}/{res.n} = {res.accuracy:.3f}"
                f"{' (cache hit)' if res.cache_hit else ''} in {res.seconds:.0f}s")
    finally:
        backend.close()
    return out


def selection_statistics(spec: SweepSpec, src: Sources, generated: list[dict] | None, template: str,
                         sd: SweepDir) -> None:
    """Selection statistics that do not depend on the trial: spectra (every rho of the grid) and
    the forget-gradient coupling (per forget-text variant), cached where select() looks."""
    sel = spec.selection
    rhos = grid_rhos(spec)
    log(f"spectral statistics (rho {rhos}) and forget-gradient coupling")
    spectral_stats_multi(src.reference, src.target, rhos, sd.selection_cache, sel.candidates)
    for texts in [src.forget_texts] + ([generated] if generated is not None else []):
        coupling_stats(src.reference, src.target, texts, sd.selection_cache, sel.candidates, template,
                       sel.max_length, sel.coupling_batch_size)


def first_correct_response(record: dict) -> str | None:
    """The target's first correct answer to a problem: sample 0 when right, else the first right one
    of its other samples (n > 1); None when it solved it in no sample."""
    if record.get("correct"):
        return record["response"]
    for sample in record.get("samples") or []:
        if sample.get("correct"):
            return sample["response"]
    return None


def generated_texts(src: Sources, suites: dict[str, Suite], baseline: dict[str, list[dict]], backend,
                    template: str, sd: SweepDir) -> list[dict]:
    """Forget texts = the target's own correct greedy generation (reference solution otherwise)."""
    ids = [p["id"] for p in src.forget_texts]
    if "forget" in suites and [p["id"] for p in suites["forget"].problems] == ids:
        records = baseline["forget"]
    else:  # the toy: forget suite (held out) != unlearning texts; generate on the texts themselves
        d = (suites["forget"].spec if "forget" in suites
             else SuiteSpec(name="forget_texts", benchmark="jsonl", path="<sweep>", template=template))
        suite = d.model_copy(update={"name": "forget_texts", "limit": None, "probe": None})
        records = evaluate(src.target, suite, backend=backend, problems=src.forget_texts,
                           cache_dir=sd.eval_cache).records
    out = []
    for p, r in zip(src.forget_texts, records):
        response = first_correct_response(r)
        out.append({**p, "solution": response, "text_source": "target"} if response is not None
                   else {**p, "text_source": "reference"})
    log(f"generated forget texts: {sum(o['text_source'] == 'target' for o in out)}/{len(out)} from the target")
    return out
