"""Matched forgetting: stop unlearning when a forget criterion reaches its target (``unlearning.stop``).

Rules that move more weights forget faster at the same lr and steps, so comparing their retain
scores at a fixed step count compares different forgetting levels. With a :class:`StopSpec`
every trial instead runs until the forget criterion reaches the same target:

- the criterion's value is measured before the first step (the baseline, step 0), then every
  ``stop.every`` optimiser steps and at ``stop.max_steps`` (the cap);
- ``forget_val_accuracy`` (greedy accuracy on forget-validation problems, lower = more
  forgotten) is met when ``value <= threshold``, threshold = ``target`` or, when
  ``relative``, ``target * baseline``;
- ``forget_nll_rise`` (mean forget NLL per completion token) is met when
  ``value >= threshold``, threshold = ``baseline + target`` or, when ``relative``,
  ``baseline * (1 + target)``;
- training ends at the first check (after step 0) where the criterion is met; a trial that
  reaches the cap without meeting it ends there with ``reached = False`` (report it, don't hide it).

The decision functions are pure (history in, decision out). The check builders return the
``stop_check(step, model) -> float`` callables that :func:`mast.unlearn.unlearn` calls with the
live, in-training model (eval mode, inference mode, autocast when training uses it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mast.backends import HFBackend
from mast.batching import completion_logprobs, encode_problems, in_order, to_device
from mast.config import StopSpec, SuiteSpec
from mast.evaluation import evaluate

StopCheck = Callable[[int, Any], float]


# --------------------------------------------------------------------------- pure decisions


def threshold(stop: StopSpec, baseline: float) -> float:
    """The value at which the criterion is met, from the step-0 baseline (rules in the module docstring)."""
    if not math.isfinite(baseline):
        raise ValueError(f"baseline must be finite, got {baseline}")
    if stop.metric == "forget_val_accuracy":
        return stop.target * baseline if stop.relative else stop.target
    return baseline * (1.0 + stop.target) if stop.relative else baseline + stop.target


def criterion_met(stop: StopSpec, value: float, baseline: float) -> bool:
    """Accuracy at or below the threshold, or NLL at or above it."""
    t = threshold(stop, baseline)
    return value <= t if stop.metric == "forget_val_accuracy" else value >= t


def is_check_step(stop: StopSpec, step: int) -> bool:
    """Checks run at step 0 (baseline), every `every` steps, and at the cap."""
    return step == 0 or step % stop.every == 0 or step == stop.max_steps


def check_steps(stop: StopSpec) -> list[int]:
    """All steps at which the criterion is measured when it is never met."""
    return [s for s in range(stop.max_steps + 1) if is_check_step(stop, s)]


@dataclass(frozen=True)
class StopDecision:
    stop: bool  # end training now
    reached: bool  # the criterion is met at the last check
    step: int  # the last checked step
    threshold: float


def decide(stop: StopSpec, history: Sequence[dict]) -> StopDecision:
    """Stop or go on, given the checks so far ``[{"step": 0, "value": baseline}, {"step", "value"}, ...]``.

    Stops at the first check after step 0 that meets the criterion, or at the cap.
    """
    if not history or history[0]["step"] != 0:
        raise ValueError("the check history must start with the step-0 baseline")
    baseline = float(history[0]["value"])
    last = history[-1]
    t = threshold(stop, baseline)
    reached = last["step"] > 0 and criterion_met(stop, float(last["value"]), baseline)
    return StopDecision(reached or last["step"] >= stop.max_steps, reached, int(last["step"]), t)


def stop_summary(stop: StopSpec, history: Sequence[dict]) -> dict:
    """What the manifest records: spec, baseline, threshold, whether and when the target was reached."""
    d = decide(stop, history)
    return {**stop.model_dump(), "baseline": float(history[0]["value"]), "threshold": d.threshold,
            "reached": d.reached, "step_reached": d.step if d.reached else None,
            "history": [dict(h) for h in history]}


# --------------------------------------------------------------------------- in-loop checks


def _device_of(model):
    return next(model.parameters()).device


def accuracy_check(model_dir, problems: list[dict], suite: SuiteSpec, batch_size: int = 32) -> StopCheck:
    """``stop_check`` for ``forget_val_accuracy``: the live model's accuracy on `problems` under `suite`.

    Generation and grading are :func:`mast.evaluation.evaluate` with the transformers backend,
    whose weights are the in-training model (tokenizer and eos ids from `model_dir`, the
    target); the evaluation cache is bypassed (the weights change between checks).
    """
    class LiveBackend(HFBackend):
        """The hf backend on a model already in memory."""

        live = None

        @property
        def model(self):
            return self.live

    if not problems:
        raise ValueError("accuracy_check needs forget-validation problems")
    backend = None

    def check(step: int, model) -> float:
        nonlocal backend
        if backend is None:
            backend = LiveBackend(model_dir, batch_size=batch_size, device=str(_device_of(model)), progress=False)
        backend.live = model
        try:
            return evaluate(model_dir, suite, backend=backend, problems=problems, use_cache=False,
                            progress=False).accuracy
        finally:
            backend.live = None

    return check


def mean_completion_nll(model, encoded: list, pad_id: int, batch_size: int) -> float:
    """Mean NLL per completion token over `encoded` problems: -sum_i s_i / sum_i |y_i| (float64 sums)."""
    import torch

    device = _device_of(model)
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for batch in in_order(encoded, batch_size, pad_id):
            s, lengths, _ = completion_logprobs(model, to_device(batch, device))
            total += float(s.double().sum())
            tokens += int(lengths.sum())
    if tokens == 0:
        raise ValueError("no completion tokens to score")
    return -total / tokens


def nll_check(model_dir, problems: list[dict], template: str = "qwen_boxed", max_length: int = 1024,
              batch_size: int = 8) -> StopCheck:
    """``stop_check`` for ``forget_nll_rise``: the live model's mean NLL per token on the `problems`'
    solutions (prompt + solution texts of :func:`mast.prompts.problem_pair`, prompt tokens masked)."""
    from transformers import AutoTokenizer

    if not problems:
        raise ValueError("nll_check needs forget problems")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = encode_problems(tokenizer, problems, template, max_length)

    def check(step: int, model) -> float:
        return mean_completion_nll(model, encoded, pad_id, batch_size)

    return check


def make_check(stop: StopSpec, model_dir, problems: list[dict], suite: SuiteSpec | None = None,
               template: str = "qwen_boxed", max_length: int = 1024, batch_size: int = 8) -> StopCheck:
    """The check `stop.metric` needs (`suite` is required for the accuracy metric)."""
    if stop.metric == "forget_val_accuracy":
        if suite is None:
            raise ValueError("forget_val_accuracy needs the suite (template, decoding, grader) to score with")
        return accuracy_check(model_dir, problems, suite, batch_size)
    return nll_check(model_dir, problems, template, max_length, batch_size)
