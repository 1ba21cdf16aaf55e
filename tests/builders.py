"""Shared builders of the sweep tests: a validated sweep spec and a spec file."""

from __future__ import annotations

from pathlib import Path

import yaml

from mast.config import SweepSpec, validate


def sweep_spec(**over) -> SweepSpec:
    """A minimal valid toy sweep spec (one `mast` rule), with top-level fields replaced by `over`."""
    d = {"name": "t", "models": {"toy": {"seed": 0}}, "grid": {"rule": ["mast"]}}
    d.update(over)
    return validate(SweepSpec, d, "spec.yaml")


def write_yaml(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    """`data` written as the YAML file `tmp_path / name`."""
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p
