"""Unlearning objectives as pure functions of per-sequence log-probabilities.

Notation (one batch of N texts, prompt tokens masked out):

- ``s_i = Σ_t m_it · log π_θ(y_it | y_i,<t)``: the summed log-prob of the completion tokens of
  text i (``logp``), ``|y_i| = Σ_t m_it`` its completion length (``lengths``);
- ``s_i^ref``: the same under the frozen target model (``ref_logp``).

Forget objectives (minimised; each lowers the forget texts' likelihood):

- ``ga``     ``L = Σ_i s_i / Σ_i |y_i|``  (= −NLL, the mean token NLL over the batch, negated)
- ``npo``    ``L = −(2/β) · mean_i log σ(−β (s_i − s_i^ref))``            (β = 0.1)
- ``simnpo`` ``L = −(2/β) · mean_i log σ(−β s_i / |y_i| − γ)``            (β = 2.5, γ = 0)

Retain terms (minimised, weighted by α in the total ``L_f + α L_r``):

- ``nll``    ``L = −Σ_i s_i / Σ_i |y_i|``  (mean token NLL)
- ``kl``     ``L = mean_tokens KL(π_ref(·|ctx) ‖ π_θ(·|ctx))`` over the retain completion tokens.

Both can instead be summed per retain text and averaged over texts (``scale="sequence"``): NPO's
loss acts on summed log-probs, so next to a token mean its gradient outweighs the retain term
by about the completion length; ``UnlearnSpec.retain_scale = "match"`` picks that for npo.

The ``s_i`` come from :mod:`mast.batching` (one log-prob implementation for every stage).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mast.batching import at_least_f32, completion_nll
from mast.registry import OBJECTIVE_FACTS, default_beta

NPO_BETA = OBJECTIVE_FACTS["npo"].default_beta
SIMNPO_BETA = OBJECTIVE_FACTS["simnpo"].default_beta


# --------------------------------------------------------------------------- forget objectives


def ga(logp: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: ``L = Σ_i s_i / Σ_i |y_i|`` (minus the batch's mean token NLL).

    dL/ds_i = 1 / Σ_j |y_j|.
    """
    return -completion_nll(logp, lengths)


def npo(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = NPO_BETA) -> torch.Tensor:
    """Negative preference optimisation: ``L = −(2/β) · mean_i log σ(−β (s_i − s_i^ref))``.

    dL/ds_i = (2/N) · σ(β (s_i − s_i^ref)); at θ = ref it is GA on summed log-probs, weighted 1/N.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp.to(logp.dtype))).mean()


def simnpo(logp: torch.Tensor, lengths: torch.Tensor, beta: float = SIMNPO_BETA, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO: ``L = −(2/β) · mean_i log σ(−β s_i / |y_i| − γ)`` (length-normalised, no reference).

    dL/ds_i = (2/N) · σ(β s_i / |y_i| + γ) / |y_i|.
    """
    lengths = lengths.clamp_min(1).to(logp.dtype)
    return -(2.0 / beta) * F.logsigmoid(-beta * logp / lengths - gamma).mean()


# The registry forget_loss dispatches on: one uniform signature (logp, lengths, ref_logp, beta, gamma),
# each entry passing on the arguments its objective takes.
OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    "ga": lambda logp, lengths, ref_logp, beta, gamma: ga(logp, lengths),
    "npo": lambda logp, lengths, ref_logp, beta, gamma: npo(logp, ref_logp, beta),
    "simnpo": lambda logp, lengths, ref_logp, beta, gamma: simnpo(logp, lengths, beta, gamma),
}


def forget_loss(
    objective: str,
    logp: torch.Tensor,
    lengths: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    beta: float | None = None,
    gamma: float = 0.0,
) -> torch.Tensor:
    """``OBJECTIVES[objective]`` on one batch; β unset: the registry's default (NPO 0.1, SimNPO 2.5)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {sorted(OBJECTIVES)}")
    if OBJECTIVE_FACTS[objective].needs_reference and ref_logp is None:
        raise ValueError(f"{objective} needs the reference log-probs")
    beta = default_beta(objective) if beta is None else beta
    return OBJECTIVES[objective](logp, lengths, ref_logp, beta, gamma)


# --------------------------------------------------------------------------- retain terms


def nll(logp: torch.Tensor, lengths: torch.Tensor, scale: str = "token") -> torch.Tensor:
    """Retain NLL. ``token``: ``L = −Σ_i s_i / Σ_i |y_i|`` (mean token NLL; dL/ds_i = −1/Σ_j |y_j|).

    ``sequence``: ``L = −(1/N) Σ_i s_i`` (mean over texts of the summed NLL; dL/ds_i = −1/N), the
    scale of NPO's summed log-probs.
    """
    if scale == "sequence":
        return -logp.sum() / max(logp.numel(), 1)
    return completion_nll(logp, lengths)


def kl(logits: torch.Tensor, ref_logits: torch.Tensor, n_sequences: int | None = None) -> torch.Tensor:
    """Token-level ``KL(π_ref ‖ π_θ) = Σ_v p_ref,tv (log p_ref,tv − log p_θ,tv)``, averaged.

    `logits` and `ref_logits` are (n_tokens, V) rows at the retain completion positions (what
    `mast.batching.completion_logits` selects); float32 inside. Mean over tokens, or with
    `n_sequences` = N the sum over tokens / N (summed per text, mean over texts). Gradient wrt
    θ's logits: (p_θ − p_ref) / n_tokens (or / N).
    """
    logq = F.log_softmax(at_least_f32(logits), dim=-1)
    logp_ref = F.log_softmax(at_least_f32(ref_logits), dim=-1)
    per_token = (logp_ref.exp() * (logp_ref - logq)).sum(dim=-1)
    if not per_token.numel():
        return logits.sum() * 0.0
    return per_token.sum() / n_sequences if n_sequences else per_token.mean()


def retain_scale_for(objective: str, scale: str) -> str:
    """Resolve ``match``: ``sequence`` for npo (summed log-probs), ``token`` for ga / simnpo."""
    if scale == "match":
        return "sequence" if objective == "npo" else "token"
    return scale

