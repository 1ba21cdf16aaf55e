"""`mast diagnose` on a tiny base -> reference -> target triple: summaries, figures, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mast.cli import main
from mast.diagnostics import delta_summary
from mast.files import write_jsonl


def test_delta_summary_is_exact():
    d = np.array([-0.5, -0.05, 0.0, 0.02, 0.3, 1.0])
    s = delta_summary(d, threshold=0.1)
    assert s["n_tokens"] == 6
    assert s["mean"] == pytest.approx(d.mean())
    assert s["mean_abs"] == pytest.approx(np.abs(d).mean())
    assert s["share_moved"] == pytest.approx(3 / 6)
    assert s["share_up"] == pytest.approx(2 / 6) and s["share_down"] == pytest.approx(1 / 6)
    assert s["quantiles"]["q50"] == pytest.approx(np.median(d))
    assert delta_summary([], 0.1) == {"n_tokens": 0}


def test_cli_diagnose_writes_summary_and_figures(triple, problems, tmp_path, capsys):
    base, ref, target = triple
    forget = tmp_path / "forget.jsonl"
    write_jsonl(forget, problems)
    out = tmp_path / "diag"
    rc = main(["diagnose", "--base", str(base), "--reference", str(ref), "--target", str(target), "--forget",
               str(forget), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--threshold", "0.01"])
    assert rc == 0
    res = json.loads((out / "diagnostics.json").read_text())
    for png in res["figures"]:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    sft, rl = res["logprob_delta"]["sft"], res["logprob_delta"]["rlvr"]
    assert sft["n_tokens"] == rl["n_tokens"] > 0 and sft["threshold"] == 0.01
    assert set(sft["quantiles"]) == {"q01", "q05", "q25", "q50", "q75", "q95", "q99"}
    # per-token deltas add up: mean(target - base) = mean(target - ref) + mean(ref - base)
    mlp = res["mean_logprob"]
    assert sft["mean"] == pytest.approx(mlp["reference"] - mlp["base"], abs=1e-9)
    assert rl["mean"] == pytest.approx(mlp["target"] - mlp["reference"], abs=1e-9)
    tokens = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert [t["id"] for t in tokens] == [p["id"] for p in problems]
    assert sum(len(t["sft"]) for t in tokens) == sft["n_tokens"]
    # the weight view sees exactly the planted tensors move in each step
    moved = {step: {c["name"] for c in res["weights"][step]["candidates"] if c["moved"]} for step in ("sft", "rlvr")}
    assert moved["sft"] == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                            "model.layers.1.self_attn.o_proj.weight"}
    assert moved["rlvr"] == {"model.layers.0.self_attn.o_proj.weight"}
    curves = res["energy_curves"]["reference"]
    assert len(curves) == 8 and all(c[-1] == pytest.approx(1.0, abs=1e-5) for c in curves.values())
    assert "RLVR increment" in capsys.readouterr().out


def test_cli_diagnose_bad_inputs(triple, problems, tmp_path, capsys):
    base, ref, target = triple
    forget = tmp_path / "forget.jsonl"
    write_jsonl(forget, problems)
    out = tmp_path / "diag"
    common = ["--reference", str(ref), "--target", str(target), "--forget", str(forget), "--out", str(out)]
    for argv, needle in [(["--base", str(tmp_path / "nope"), *common], "nope"),
                         (["--base", str(base), *common, "--rho", "0"], "rho")]:
        capsys.readouterr()
        assert main(["diagnose", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err
    assert not out.exists()


def test_projection_ranks_show_a_shape_biased_signal():
    """A signal that puts every k/v above every q/o gives k/v the whole top quarter and the top percentiles."""
    from mast.diagnostics import projection_ranks

    rows = []
    for layer in range(4):
        for proj, value in (("q_proj", 0.1), ("k_proj", 0.9), ("v_proj", 0.8), ("o_proj", 0.2)):
            rows.append({"name": f"model.layers.{layer}.self_attn.{proj}.weight", "moved": True,
                         "sig": value + 0.01 * layer})
    rows.append({"name": "model.layers.9.self_attn.q_proj.weight", "moved": False, "sig": 99.0})  # never counted
    r = projection_ranks(rows, ["sig"])["sig"]
    assert set(r["top_quarter"]) == {"k_proj"} and r["top_quarter"]["k_proj"] == pytest.approx(1.0)
    assert r["mean_percentile"]["k_proj"] > r["mean_percentile"]["v_proj"] > r["mean_percentile"]["o_proj"] \
        > r["mean_percentile"]["q_proj"]
