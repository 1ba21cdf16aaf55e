"""Typed specs, validated when loaded, with the paper's defaults.

A sweep spec (``sweeps/*.yaml``) and an evaluation suite (``eval/*.yaml``) are pydantic
models. :func:`load_yaml` turns any validation problem into one :class:`InputError` line
that names the file and the field, e.g. ``sweeps/x.yaml: unlearning.steps: must be > 0``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from mast.files import InputError, read_text
from mast.registry import (
    OBJECTIVE_NAMES,
    RETAIN_SCALES,
    RETAIN_TERMS,
    RULE_NAMES,
    TEMPLATE_NAMES,
    default_beta,
)
from mast.sampling_seeds import MAX_SAMPLES, SECOND_TARGET, trial_stream

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


RuleName = Literal[RULE_NAMES]  # type: ignore[valid-type]
ObjectiveName = Literal[OBJECTIVE_NAMES]  # type: ignore[valid-type]
TemplateName = Literal[TEMPLATE_NAMES]  # type: ignore[valid-type]


class Spec(BaseModel):
    """Base for every spec: unknown fields are errors (a typo must not be silently ignored), and
    every float (also inside lists and dicts) is finite: NaN passes no bound check, inf passes `gt`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- evaluation


class RepetitionSpec(Spec):
    """vLLM's n-gram repetition detection (``SamplingParams.repetition_detection``, vLLM >= 0.32):
    a sample whose last tokens repeat an n-gram of ``min_pattern_size``..``max_pattern_size``
    tokens ``min_count`` times ends early, finish_reason "repetition", recorded as truncated."""

    max_pattern_size: int = Field(gt=0)
    min_pattern_size: int = Field(0, ge=0, description="0: 1")
    min_count: int = Field(ge=2)

    @model_validator(mode="after")
    def _min_le_max(self) -> RepetitionSpec:
        if self.min_pattern_size > self.max_pattern_size:
            raise ValueError(f"min_pattern_size {self.min_pattern_size} > max_pattern_size {self.max_pattern_size}")
        return self


class DecodingSpec(Spec):
    """Decoding settings shared by the vLLM and transformers backends. Default: greedy.

    ``repetition_detection`` is vLLM-only (the hf backend refuses it); set it in a sweep's
    ``evaluation.decoding`` so every suite of every run decodes alike.

    ``stream`` names the run that samples (:mod:`mast.sampling_seeds`: with ``seed`` and a problem's
    id it gives the problem's sampling seed); the sweep sets it (:meth:`SuiteSpec.independent_run`),
    unset is the target's own run.
    """

    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(1024, gt=0)
    n: int = Field(1, gt=0, le=MAX_SAMPLES)
    seed: int = 0
    stop: list[str] = Field(default_factory=list)
    repetition_detection: RepetitionSpec | None = None
    stream: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_fields(self, handler):
        # without them the dump (the eval cache key, every spec hash) is the same as before the fields
        # existed; a stream changes nothing under greedy decoding, so greedy dumps never carry one
        d = handler(self)
        if isinstance(d, dict):
            if d.get("repetition_detection", 0) is None:
                d.pop("repetition_detection")
            if "stream" in d and (d["stream"] is None or self.greedy):
                d.pop("stream")
        return d

    @property
    def greedy(self) -> bool:
        """The one greedy rule of both backends: temperature <= 0 is greedy decoding (one answer
        per prompt, repeated for each of the n samples; top_p ignored), otherwise seeded sampling."""
        return self.temperature <= 0

    @model_validator(mode="after")
    def _greedy_is_one_sample(self) -> DecodingSpec:
        # greedy decoding has one answer per prompt; vLLM refuses n > 1 with temperature 0
        if self.greedy and self.n > 1:
            raise ValueError(f"n = {self.n} needs sampling (temperature > 0): greedy decoding "
                             "gives one answer per problem; set n: 1 or a temperature")
        return self


class ProbeSpec(Spec):
    """Prefix-recovery probe: condition on the first p% of the reference solution."""

    kind: Literal["prefix_recovery"] = "prefix_recovery"
    fractions: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75])

    @field_validator("fractions")
    @classmethod
    def _fractions_in_unit_interval(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= p < 1.0 for p in v):
            raise ValueError("each fraction must be in [0, 1)")
        return v


class SuiteSpec(Spec):
    """One evaluation suite: which problems, which prompt, which decoding.

    `benchmark` names a loader (`math`, `math500`, `gsm8k`) or `jsonl` for a problem file
    (`path`, relative to the suite file). `grader` picks answer extraction / equivalence.
    `split_role` (`forget` | `retain`) marks a suite that scores a sweep's own split: the sweep
    passes those problems (`evaluate(problems=...)`), so `path` is only needed standalone.
    """

    name: str
    benchmark: Literal["math", "math500", "gsm8k", "jsonl"]
    split: str = "test"
    path: str | None = None
    grader: Literal["math", "gsm8k"] | None = None
    template: TemplateName = "qwen_boxed"
    decoding: DecodingSpec = Field(default_factory=DecodingSpec)
    limit: int | None = Field(None, gt=0)
    probe: Literal["prefix_recovery"] | ProbeSpec | None = None
    split_role: Literal["forget", "retain"] | None = None

    @model_validator(mode="after")
    def _check(self) -> SuiteSpec:
        if self.split_role and self.benchmark != "jsonl":
            raise ValueError("split_role needs benchmark 'jsonl' (the sweep supplies the split's problems)")
        if self.benchmark == "jsonl" and not self.path and not self.split_role:
            raise ValueError("benchmark 'jsonl' needs a 'path' to a problem file")
        if self.grader is None:
            self.grader = "gsm8k" if self.benchmark == "gsm8k" else "math"
        if self.probe == "prefix_recovery":
            self.probe = ProbeSpec()
        return self

    def independent_run(self, stream: str = SECOND_TARGET) -> SuiteSpec:
        """The suite as run `stream` samples it (decoding.stream; :mod:`mast.sampling_seeds`): no problem
        gets a sample seed another stream uses, so its sampling noise is independent of every other
        run's (identical under greedy decoding). Default: require_target_correct's second target run."""
        decoding = self.decoding.model_copy(update={"stream": stream})
        return self.model_copy(update={"decoding": decoding})

    def trial_run(self, trial_id: str, part: str | None = None) -> SuiteSpec:
        """How trial `trial_id` evaluates this suite (its own stream ``trial/<trial_id>``; a `part` such
        as ``stop``, its in-loop check, has ``trial/<trial_id>/<part>``): independent of the baselines,
        of the reference's run and of every other trial, null trials included."""
        return self.independent_run(trial_stream(trial_id, part))


# --------------------------------------------------------------------------- method




class SelectionSpec(Spec):
    """Which tensors to update. `candidates` are module-name suffixes of the inventory."""

    rule: RuleName = "mast"
    k: int = Field(8, gt=0)
    rho: float = Field(0.05, gt=0.0, le=1.0)
    seed: int = 0
    weights: dict[str, float] = Field(
        default_factory=lambda: {"update_magnitude": 1.0, "off_principal_energy": 1.0, "coupling": 1.0}
    )
    candidates: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    coupling_batch_size: int = Field(8, gt=0)
    max_length: int = Field(1024, gt=0)

    @field_validator("weights")
    @classmethod
    def _known_signals(cls, v: dict[str, float]) -> dict[str, float]:
        known = {"update_magnitude", "off_principal_energy", "coupling"}
        bad = set(v) - known
        if bad:
            raise ValueError(f"unknown signal(s) {sorted(bad)}; known: {sorted(known)}")
        if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("weights must be >= 0 and not all zero")
        return v


STOP_METRICS = ("forget_val_accuracy", "forget_nll_rise")


class StopSpec(Spec):
    """Matched forgetting: end unlearning at the first check where the forget criterion reaches `target`.

    Checked every `every` optimiser steps (and at `max_steps`, the cap that replaces
    `unlearning.steps`); the value before the first step is the baseline.

    - `forget_val_accuracy`: greedy accuracy on the forget-VALIDATION problems; stop when it is
      at or below `target` (absolute, in [0, 1]) or `target` x baseline (`relative`).
    - `forget_nll_rise`: mean forget NLL per completion token; stop when it has risen by
      `target` nats/token (absolute, > 0) or by `target` x baseline (`relative`), for models
      where in-loop generation is too costly.
    """

    metric: Literal[STOP_METRICS] = "forget_val_accuracy"  # type: ignore[valid-type]
    target: float = Field(allow_inf_nan=False)
    relative: bool = False
    every: int = Field(5, gt=0)
    max_steps: int = Field(100, gt=0)

    @model_validator(mode="after")
    def _ranges(self) -> StopSpec:
        if self.metric == "forget_val_accuracy" and not 0.0 <= self.target <= 1.0:
            what = "a fraction of the baseline accuracy" if self.relative else "an accuracy"
            raise ValueError(f"target must be in [0, 1] ({what}), got {self.target}")
        if self.metric == "forget_nll_rise" and self.target <= 0.0:
            what = "a fraction of the baseline NLL" if self.relative else "nats/token"
            raise ValueError(f"target must be > 0 ({what}), got {self.target}")
        if self.every > self.max_steps:
            raise ValueError(f"every ({self.every}) must be <= max_steps ({self.max_steps})")
        return self


class UnlearnSpec(Spec):
    """The unlearning run. Defaults from the unlearning literature for ~1.5B models."""

    objective: ObjectiveName = "npo"
    beta: float | None = Field(None, gt=0.0, description="NPO 0.1, SimNPO 2.5 when unset")
    gamma: float = 0.0
    retain: Literal[RETAIN_TERMS] = "nll"  # type: ignore[valid-type]
    alpha: float = Field(1.0, ge=0.0)
    # How the retain term is averaged. `token`: mean over retain tokens (the literature's default).
    # `sequence`: summed per retain text, mean over texts: NPO's scale (its forget loss acts on summed
    # log-probs, so next to a token mean it outweighs the retain term by ~the completion length).
    # `match`: `sequence` for npo, `token` for ga / simnpo (one alpha that means the same for all).
    retain_scale: Literal[RETAIN_SCALES] = "token"  # type: ignore[valid-type]
    lr: float = Field(1e-5, gt=0.0)
    steps: int = Field(50, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_length: int = Field(1024, gt=0)
    seed: int = 0
    bf16: bool = True
    gradient_checkpointing: bool = True
    texts: Literal["reference", "generated"] = "reference"
    # matched forgetting: stop at a forget level instead of after `steps` (None: run `steps`)
    stop: StopSpec | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_stop(self, handler):
        # without a stopping rule the dump (and every hash of it) is the same as before the field existed
        d = handler(self)
        if isinstance(d, dict) and d.get("stop", 0) is None:
            d.pop("stop")
        return d

    @property
    def step_cap(self) -> int:
        """Optimiser steps at most: `stop.max_steps` with a stopping rule, else `steps`."""
        return self.stop.max_steps if self.stop is not None else self.steps

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else default_beta(self.objective)


# --------------------------------------------------------------------------- sweep


class ToyModels(Spec):
    seed: int = 0
    out: str | None = None


class ModelsSpec(Spec):
    """Hub ids or local folders; or `toy: {seed}` to build (or reuse) the CPU triple."""

    reference: str | None = None
    target: str | None = None
    base: str | None = None
    toy: ToyModels | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelsSpec:
        if self.toy is None and not (self.reference and self.target):
            raise ValueError("give 'reference' and 'target', or 'toy: {seed: N}'")
        if self.toy is not None and (self.reference or self.target):
            raise ValueError("give either 'toy' or 'reference'/'target', not both")
        return self


class DataSpec(Spec):
    """Forget / retain splits from the MATH pool (MATH minus MATH-500), or the toy's files."""

    forget_size: int = Field(150, gt=0)
    retain_size: int = Field(150, gt=0)
    split_seed: int = 0
    data_dir: str | None = None
    levels: list[int] | None = None
    subjects: list[str] | None = None
    require_target_correct: bool = False
    # MATH only: unlearning's retain texts are a third disjoint draw, so the `retain` suite is
    # scored on problems the retain loss never saw (0 = no retain texts: retain term off)
    retain_train_size: int = Field(150, ge=0)
    # MATH only: a retain-VALIDATION draw (suite `retain_val`) for choices (lr, steps, stop level),
    # disjoint by id and normalized text from forget, retain and the retain texts (0 = none)
    retain_val_size: int = Field(0, ge=0)


class EvaluationSpec(Spec):
    """Which suites every trial is scored on, with which backend."""

    suites: list[str] = Field(default_factory=lambda: ["forget", "retain", "gsm8k"])
    backend: Literal["hf", "vllm"] = "hf"
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, gt=0)
    batch_size: int = Field(32, gt=0)
    decoding: DecodingSpec | None = None
    n_bootstrap: int = Field(2000, gt=0)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    # prompt template for the sweep's own splits, selection's and unlearning's texts; when set it
    # also overrides every suite's template (a model family needs one prompt format throughout)
    template: TemplateName | None = None
    limits: dict[str, int] = Field(default_factory=dict, description="suite -> first N problems (quick runs)")
    max_model_len: int | None = Field(None, gt=0, description="vLLM context length (prompt + max_tokens)")
    # vLLM engine options (LLM(dtype=..., enforce_eager=...)); the hf backend ignores them
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    enforce_eager: bool = Field(False, description="vLLM: no CUDA graphs (slower decode, faster start)")
    # a hung vLLM worker (NCCL, a stuck engine) is killed after this long and the trial fails
    timeout_s: float | None = Field(10800.0, gt=0.0, description="vLLM worker: kill it after this many seconds")
    # the noise floor: a `null` trial (no weight change) per seed, evaluated exactly like a trial
    noise_floor: bool = True
    # validation suites (forget_val, retain_val): scored after unlearning for CHOICES only (the
    # matched-forgetting level along an lr/steps axis); never reported as results
    validation: list[Literal["forget_val", "retain_val"]] = Field(default_factory=list)
    # equivalence margin (absolute accuracy) of the TOST behind "preserved", fixed before the run
    equivalence_margin: float = Field(0.02, gt=0.0, lt=1.0)
    # matched forgetting along an lr/steps axis: the forget_val accuracy level to match (None: the
    # strongest forgetting that every rule's curve reaches on validation)
    matched_level: float | None = Field(None, ge=0.0, le=1.0)

    def backend_options(self) -> dict:
        """Keyword options of the evaluation backend: vLLM's engine settings (memory, parallelism,
        ``dtype``, ``enforce_eager``) and the worker's ``timeout_s``; none for the hf backend."""
        if self.backend != "vllm":
            return {}
        opts = {"tensor_parallel_size": self.tensor_parallel_size,
                "gpu_memory_utilization": self.gpu_memory_utilization, "dtype": self.dtype,
                "enforce_eager": self.enforce_eager, "timeout_s": self.timeout_s}
        if self.max_model_len:
            opts["max_model_len"] = self.max_model_len
        return opts

    def limited(self, problems: list[dict], name: str) -> list[dict]:
        """The first ``limits[name]`` problems of suite `name` (all without a limit)."""
        n = self.limits.get(name)
        return problems[:n] if n else problems

    @field_validator("limits")
    @classmethod
    def _positive_limits(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [k for k, n in v.items() if n <= 0]
        if bad:
            raise ValueError(f"limits must be > 0 (suite {bad[0]!r})")
        return v


class ResourcesSpec(Spec):
    cpu: float = Field(1.0, gt=0.0)
    gpu: float = Field(0.0, ge=0.0)
    max_concurrent: int = Field(1, gt=0)
    max_failures: int = Field(1, ge=0)


class TrackingSpec(Spec):
    uri: str | None = None
    experiment: str | None = None


class SchedulerSpec(Spec):
    """FIFO for confirmatory grids (early stopping would bias the tests); ASHA for exploration.

    With ASHA a trial reports after each suite (forget first), so a rung is "suites scored":
    trials whose `metric` is poor after the first suite are stopped before the costly ones.
    """

    kind: Literal["fifo", "asha"] = "fifo"
    metric: str = "forget/delta"
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, gt=0)
    reduction_factor: float = Field(2.0, gt=1.0)


class SweepSpec(Spec):
    """A whole experiment: models, data, the grid, and how to run and track it."""

    name: str
    output_dir: str | None = None
    models: ModelsSpec
    data: DataSpec = Field(default_factory=DataSpec)
    grid: dict[str, list[Any]]
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    unlearning: UnlearnSpec = Field(default_factory=UnlearnSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    keep_checkpoints: bool = Field(False, description="keep each trial's unlearned checkpoint (disk!)")
    storage_path: str | None = Field(None, description="Ray Tune storage (default <sweep>/tune; s3://... ok)")

    @field_validator("grid")
    @classmethod
    def _grid_fields(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        known = {"rule", "k", "rho", "seed"} | set(UnlearnSpec.model_fields)
        for key, values in v.items():
            if key not in known:
                raise ValueError(f"unknown grid field {key!r}; allowed: rule, k, rho, seed, or an unlearning field")
            if not isinstance(values, list) or not values:
                raise ValueError(f"grid field {key!r} must be a non-empty list")
        return v

    @model_validator(mode="after")
    def _vllm_needs_whole_gpus(self) -> SweepSpec:
        # each trial's vLLM engine reserves gpu_memory_utilization of the WHOLE device's memory,
        # so two trials sharing one GPU cannot both start; the hf backend shares GPUs fine
        gpu = self.resources.gpu
        if self.evaluation.backend == "vllm" and 0 < gpu < 1:
            raise ValueError(f"resources.gpu: {gpu:g} is a fractional GPU, which the vllm backend cannot share "
                             "(each engine reserves gpu_memory_utilization of the whole GPU); use gpu: 1 "
                             "or more, or evaluation.backend: hf")
        return self


# --------------------------------------------------------------------------- loading

S = TypeVar("S", bound=BaseModel)


def _format_error(path: os.PathLike | str, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
    msg = e["msg"].removeprefix("Value error, ")
    extra = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    # a whole-spec check (no location) names its own fields in the message
    return f"{path}: {loc}: {msg}{extra}" if loc else f"{path}: {msg}{extra}"


def validate(model: type[S], data: Any, source: str) -> S:
    """Validate `data` as `model`, raising InputError('source: field: message')."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise InputError(_format_error(source, err)) from None


def load_yaml(path: str | os.PathLike, model: type[S]) -> S:
    """Load a YAML file into `model`; every problem is one InputError line naming file and field."""
    path = Path(path)
    text = read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return validate(model, data, str(path))


def load_suite(path: str | os.PathLike) -> SuiteSpec:
    """An evaluation suite; a relative `path` inside it is resolved against the suite's folder."""
    suite = load_yaml(path, SuiteSpec)
    if suite.path and not Path(suite.path).is_absolute():
        suite.path = str((Path(path).parent / suite.path).resolve())
    return suite


def merge_spec(model: type[S], spec_path: str | os.PathLike | None, args: Any, fields: Sequence[str]) -> S:
    """A command's spec: the `--spec` file (or `model`'s defaults) with the flags in `fields` on top.

    Flags left unset (None) keep the file's values; the fields the file left unset keep their
    defaults (so a default that depends on another field, like NPO's β, follows the flags).
    Errors name the file (alone, or "FILE with the command-line flags") or "command line".
    """
    base = load_yaml(spec_path, model).model_dump(exclude_unset=True) if spec_path else {}
    flags = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    source = f"{spec_path} with the command-line flags" if spec_path and flags else str(spec_path or "command line")
    return validate(model, {**base, **flags}, source)
