"""The name tables in mast.registry are the one home of each name: every stage's registry agrees."""

from __future__ import annotations

import typing

from mast import config, objectives, prompts, registry, selection


def test_stage_registries_carry_exactly_the_registered_names():
    assert tuple(selection.RULES) == registry.RULE_NAMES
    assert tuple(objectives.OBJECTIVES) == registry.OBJECTIVE_NAMES
    assert tuple(prompts.TEMPLATES) == registry.TEMPLATE_NAMES


def test_spec_literals_derive_from_the_registry():
    assert typing.get_args(config.RuleName) == registry.RULE_NAMES
    assert typing.get_args(config.ObjectiveName) == registry.OBJECTIVE_NAMES
    assert typing.get_args(config.TemplateName) == registry.TEMPLATE_NAMES


def test_rule_facts():
    assert registry.NULL_RULES == ("null",) and registry.NULL_RULE in registry.NULL_RULES
    assert set(registry.RHO_RULES) == {"mast", "off_principal", "off_principal_raw"}
    assert [n for n, r in registry.RULE_FACTS.items() if r.all_parameters] == ["full"]
    assert [n for n in registry.RULE_NAMES if not registry.uses_k(n)] == ["attention", "full", "null"]
    assert registry.uses_k("mast") and registry.uses_k("random")
    # a config without a (known) rule keeps its k, as the tables always did
    assert registry.uses_k(None) and registry.uses_k("?")


def test_default_betas_are_the_papers():
    assert config.UnlearnSpec(objective="npo").effective_beta == 0.1
    assert config.UnlearnSpec(objective="simnpo").effective_beta == 2.5
    assert config.UnlearnSpec(objective="ga").effective_beta == 0.0
    assert objectives.NPO_BETA == 0.1 and objectives.SIMNPO_BETA == 2.5
