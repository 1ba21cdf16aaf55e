"""The sweep folder's layout: the one place that knows where each file of a sweep lives.

Every reader and writer of a sweep folder (the sweep driver, prepare, a trial, the report,
the statistics, MLflow tracking) asks a :class:`SweepDir` (and a trial's :class:`TrialDir`)
for its paths instead of spelling them out::

    <sweep>/sweep.json               the sweep's manifest (spec hash, ids, counts, MLflow ids)
    <sweep>/spec.yaml                the spec as run
    <sweep>/mlflow.db, mlartifacts/  the default MLflow store
    <sweep>/prepared/                once-per-sweep work (prepared.json written last)
        forget.jsonl retain.jsonl forget_generated.jsonl   unlearning texts
        suites/<suite>.jsonl          each suite's problems
        baseline/<suite>.jsonl        the target's per-problem results (+ <suite>.probe.json)
        reference/<suite>.jsonl       the reference (SFT) model's per-problem results (the SFT floor)
        cache/ selection_cache/ toy/  evaluation cache, selection statistics, a default toy build
    <sweep>/trials/<id>/             one trial: config, selection, losses, results/, result.json
    <sweep>/trials.jsonl, seed_table.json, report/, tune/

Pure path logic (no I/O but small existence checks), torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# the repository (or installed package) root: the shipped ``eval/`` suites, ``git describe``
REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "sweep.json"
SPEC = "spec.yaml"
TRIALS = "trials.jsonl"
SEED_TABLE = "seed_table.json"
MLFLOW_DB = "mlflow.db"
# what the MLflow parent run carries as artifacts, and what a report can be rebuilt from
PARENT_ARTIFACTS = (SPEC, MANIFEST, TRIALS, SEED_TABLE)


@dataclass(frozen=True)
class TrialDir:
    """One trial's folder: ``<sweep>/trials/<trial id>``."""

    root: Path

    @property
    def trial_id(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def selection(self) -> Path:
        return self.root / "selection.json"

    @property
    def losses(self) -> Path:
        return self.root / "losses.jsonl"

    @property
    def result(self) -> Path:
        """The trial's completion marker (status ok) or its recorded failure."""
        return self.root / "result.json"

    @property
    def error(self) -> Path:
        return self.root / "error.json"

    @property
    def probe(self) -> Path:
        return self.root / "probe.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    def results(self, suite: str) -> Path:
        """Per-problem results of the unlearned model on `suite`."""
        return self.root / "results" / f"{suite}.jsonl"

    # the files a finished trial leaves as MLflow artifacts, in this order
    def artifacts(self) -> list[Path]:
        return [p for p in (self.config, self.selection, self.losses, self.result, self.probe) if p.is_file()]


@dataclass(frozen=True)
class SweepDir:
    """A sweep folder (always absolute: Ray workers have other working directories)."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root).resolve())

    # ------------------------------------------------------------------ top level
    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def spec(self) -> Path:
        return self.root / SPEC

    @property
    def trials_jsonl(self) -> Path:
        return self.root / TRIALS

    @property
    def seed_table(self) -> Path:
        return self.root / SEED_TABLE

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def tune(self) -> Path:
        """Default Ray Tune storage."""
        return self.root / "tune"

    @property
    def mlflow_db(self) -> Path:
        return self.root / MLFLOW_DB

    @property
    def mlartifacts(self) -> Path:
        return self.root / "mlartifacts"

    # ------------------------------------------------------------------ prepared/
    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def prepared_manifest(self) -> Path:
        """Written last: its presence means prepared/ is complete."""
        return self.prepared / "prepared.json"

    @property
    def forget_texts(self) -> Path:
        return self.prepared / "forget.jsonl"

    @property
    def retain_texts(self) -> Path:
        return self.prepared / "retain.jsonl"

    @property
    def forget_generated(self) -> Path:
        return self.prepared / "forget_generated.jsonl"

    @property
    def suites(self) -> Path:
        return self.prepared / "suites"

    def suite_problems(self, suite: str) -> Path:
        return self.suites / f"{suite}.jsonl"

    @property
    def baseline(self) -> Path:
        return self.prepared / "baseline"

    def baseline_results(self, suite: str) -> Path:
        """The target's per-problem results on `suite` (every trial is paired with these)."""
        return self.baseline / f"{suite}.jsonl"

    def baseline_probe(self, suite: str) -> Path:
        return self.baseline / f"{suite}.probe.json"

    def baseline_selection_run(self, suite: str) -> Path:
        """require_target_correct: the target's FIRST run on the candidates, which chose the forget set
        (trials are tested against the second, independent run in baseline_results)."""
        return self.baseline / f"{suite}.selection_run.jsonl"

    @property
    def reference_dir(self) -> Path:
        return self.prepared / "reference"

    def reference_results(self, suite: str) -> Path:
        """The reference (SFT) model's per-problem results on `suite`: the SFT floor."""
        return self.reference_dir / f"{suite}.jsonl"

    @property
    def eval_cache(self) -> Path:
        return self.prepared / "cache"

    @property
    def selection_cache(self) -> Path:
        return self.prepared / "selection_cache"

    @property
    def default_toy(self) -> Path:
        return self.prepared / "toy"

    # ------------------------------------------------------------------ trials/
    @property
    def trials(self) -> Path:
        return self.root / "trials"

    def trial(self, trial_id: str) -> TrialDir:
        return TrialDir(self.trials / str(trial_id))

    def exists(self) -> bool:
        """A sweep has started here (its manifest or its trials folder exists)."""
        return self.manifest.is_file() or self.trials.is_dir()
