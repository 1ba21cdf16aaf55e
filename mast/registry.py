"""The names the platform knows and the facts that go with them.

Torch-free on purpose: :mod:`mast.config` derives its ``Literal`` types from these tables,
and the grid, the statistics and the report ask them which rules use ``k`` or ``rho``
instead of keeping their own lists. The functions behind the names live in their stage's
module (``selection.RULES``, ``objectives.OBJECTIVES``, ``prompts.TEMPLATES``), each keyed
by the same names, and a test checks that the keys agree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """A selection rule. `uses_k`: picks k tensors; `uses_rho`: depends on the off-principal rank;
    `ranked`: ranks moved tensors by the signals; `all_parameters`: trains every parameter;
    `changes_weights`: False for `null`, the noise floor (nothing selected, no unlearning: the
    target is evaluated again exactly like a trial's checkpoint, once per seed)."""

    uses_k: bool
    uses_rho: bool = False
    ranked: bool = False
    all_parameters: bool = False
    changes_weights: bool = True


RULE_FACTS: dict[str, Rule] = {
    "mast": Rule(uses_k=True, uses_rho=True, ranked=True),
    "off_principal": Rule(uses_k=True, uses_rho=True, ranked=True),
    "off_principal_raw": Rule(uses_k=True, uses_rho=True, ranked=True),
    "magnitude": Rule(uses_k=True, ranked=True),
    "coupling": Rule(uses_k=True, ranked=True),
    "coupling_signed": Rule(uses_k=True, ranked=True),
    "random": Rule(uses_k=True),
    "attention": Rule(uses_k=False),
    "full": Rule(uses_k=False, all_parameters=True),
    "null": Rule(uses_k=False, changes_weights=False),
}

RULE_NAMES = tuple(RULE_FACTS)
RHO_RULES = tuple(n for n, r in RULE_FACTS.items() if r.uses_rho)
RANKED_RULES = tuple(n for n, r in RULE_FACTS.items() if r.ranked)
NULL_RULES = tuple(n for n, r in RULE_FACTS.items() if not r.changes_weights)
NULL_RULE = "null"


def uses_k(rule) -> bool:
    """Does `rule` pick k tensors (so k is part of its condition, its id and its label)?

    From :data:`RULE_FACTS`; a name that is not a rule (e.g. a config without one) counts as using k,
    as the grid, the tables and the plots have always treated it.
    """
    facts = RULE_FACTS.get(rule) if isinstance(rule, str) else None
    return facts is None or facts.uses_k


@dataclass(frozen=True)
class Objective:
    """An unlearning objective. `needs_reference`: compares against the frozen target's log-probs."""

    needs_reference: bool
    default_beta: float | None = None


OBJECTIVE_FACTS: dict[str, Objective] = {
    "ga": Objective(needs_reference=False),
    "npo": Objective(needs_reference=True, default_beta=0.1),
    "simnpo": Objective(needs_reference=False, default_beta=2.5),
}

OBJECTIVE_NAMES = tuple(OBJECTIVE_FACTS)
NEEDS_REFERENCE = frozenset(n for n, o in OBJECTIVE_FACTS.items() if o.needs_reference)


def default_beta(objective: str) -> float:
    """β when the spec leaves it unset: NPO 0.1, SimNPO 2.5 (GA has none: 0.0)."""
    beta = OBJECTIVE_FACTS[objective].default_beta
    return 0.0 if beta is None else beta


TEMPLATE_NAMES = ("qwen_boxed", "boxed_user", "plain")
RETAIN_TERMS = ("nll", "kl", "none")
RETAIN_SCALES = ("token", "sequence", "match")
