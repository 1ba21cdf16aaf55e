"""Statistics: exact McNemar, paired bootstrap, seed-level paired tests, Holm; `mast stats`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from builders import make_trials, records_from_counts  # tests/ is on sys.path under pytest
from scipy import stats as st
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

from mast import seeds, stats
from mast.cli import main
from mast.files import InputError, write_jsonl

# --------------------------------------------------------------------------- per trial: McNemar


def test_paper_case():
    """45/150 -> 37/150 with 8 right->wrong and none back: p = 2 * 0.5**8."""
    before, after = records_from_counts(37, 8, 0, 105)
    r = stats.mcnemar_test(before, after)
    assert set(stats.MCNEMAR_KEYS) <= set(r)
    assert (r["n"], r["both_correct"], r["right_to_wrong"], r["wrong_to_right"], r["both_wrong"]) == (150, 37, 8, 0, 105)
    assert r["p_value"] == pytest.approx(2 * 0.5**8, abs=1e-15) == pytest.approx(0.0078125)
    assert r["acc_before"] == pytest.approx(45 / 150) and r["acc_after"] == pytest.approx(37 / 150)
    assert r["delta"] == pytest.approx(-8 / 150)
    assert r["ci_low"] <= r["delta"] <= r["ci_high"] and r["ci_high"] < 0
    assert (r["n_bootstrap"], r["confidence"], r["seed"]) == (2000, 0.95, 0)
    assert "McNemar" in r["test"]


@pytest.mark.parametrize("table", [(40, 3, 7, 100), (10, 10, 2, 5), (0, 1, 0, 0), (50, 20, 25, 5), (5, 0, 6, 9),
                                   (30, 13, 13, 4)])
def test_exact_p_against_scipy_and_statsmodels(table):
    a, b, c, d = table
    before, after = records_from_counts(a, b, c, d, seed=sum(table))
    r = stats.mcnemar_test(before, after, n_bootstrap=200)
    assert r["p_value"] == pytest.approx(st.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    # statsmodels' table: rows = before (correct, wrong), columns = after (correct, wrong)
    sm = sm_mcnemar(np.array([[a, b], [c, d]]), exact=True)
    assert r["p_value"] == pytest.approx(sm.pvalue, rel=1e-12)
    assert r["delta"] == pytest.approx((c - b) / (a + b + c + d))


def test_no_discordant_pairs_gives_p_one_and_zero_interval():
    before, after = records_from_counts(20, 0, 0, 30)
    r = stats.mcnemar_test(before, after)
    assert r["p_value"] == 1.0 and r["delta"] == 0.0
    assert r["ci_low"] == 0.0 and r["ci_high"] == 0.0


def test_one_problem_and_all_correct():
    r = stats.mcnemar_test([{"id": 1, "correct": True}], [{"id": 1, "correct": False}])
    assert (r["n"], r["right_to_wrong"], r["p_value"], r["delta"]) == (1, 1, 1.0, -1.0)
    assert r["ci_low"] == r["ci_high"] == -1.0
    before, after = records_from_counts(25, 0, 0, 0)
    r = stats.mcnemar_test(before, after)
    assert (r["acc_before"], r["acc_after"], r["p_value"], r["ci_low"], r["ci_high"]) == (1.0, 1.0, 1.0, 0.0, 0.0)


def test_mismatched_ids_name_missing_ids_and_side():
    before, after = records_from_counts(5, 2, 1, 2)
    with pytest.raises(InputError, match=r"after is missing 1 id\(s\) present in before: q0003"):
        stats.mcnemar_test(before, [r for r in after if r["id"] != "q0003"])
    extra = after + [{"id": "zz9", "correct": True}]
    with pytest.raises(InputError, match=r"before is missing 1 id\(s\) present in after: zz9"):
        stats.mcnemar_test(before, extra)
    many = [{"id": f"x{i}", "correct": True} for i in range(30)]
    with pytest.raises(InputError, match=r"\+25 more"):
        stats.mcnemar_test(before, after + many)


def test_bad_records_are_input_errors():
    before, after = records_from_counts(5, 2, 1, 2)
    with pytest.raises(InputError, match="duplicate id"):
        stats.mcnemar_test(before + [before[0]], after)
    with pytest.raises(InputError, match="no 'id'"):
        stats.mcnemar_test(before + [{"correct": True}], after)
    with pytest.raises(InputError, match="'correct' must be true/false"):
        stats.mcnemar_test([{"id": 1, "correct": "yes"}], [{"id": 1, "correct": True}])
    with pytest.raises(InputError, match="no records"):
        stats.mcnemar_test([], [])
    with pytest.raises(InputError, match="confidence"):
        stats.mcnemar_test(before, after, confidence=1.5)


def test_bootstrap_contains_delta_shrinks_with_n_and_is_seeded():
    widths = []
    for scale in (1, 4, 16):
        before, after = records_from_counts(30 * scale, 12 * scale, 4 * scale, 54 * scale)
        r = stats.mcnemar_test(before, after, seed=3)
        assert r["ci_low"] <= r["delta"] <= r["ci_high"]
        widths.append(r["ci_high"] - r["ci_low"])
    assert widths[0] > widths[1] > widths[2] > 0
    # about 1/sqrt(n): quadrupling n halves the width
    assert widths[0] / widths[1] == pytest.approx(2.0, rel=0.2)
    before, after = records_from_counts(30, 12, 4, 54)
    assert stats.mcnemar_test(before, after, seed=7) == stats.mcnemar_test(before, after, seed=7)
    lo, hi = stats.bootstrap_delta_ci(100, 12, 4, n_bootstrap=2000, confidence=0.5, seed=0)
    lo95, hi95 = stats.bootstrap_delta_ci(100, 12, 4, n_bootstrap=2000, confidence=0.95, seed=0)
    assert lo95 < lo < hi < hi95


def test_bootstrap_matches_explicit_problem_resampling():
    """The multinomial shortcut has the law of resampling problem indices with replacement."""
    n, b, c = 150, 8, 2
    lo, hi = stats.bootstrap_delta_ci(n, b, c, n_bootstrap=20000, seed=0)
    d = np.array([-1] * b + [1] * c + [0] * (n - b - c), dtype=float)
    rng = np.random.default_rng(1)
    boots = d[rng.integers(0, n, size=(20000, n))].mean(axis=1)
    elo, ehi = np.quantile(boots, [0.025, 0.975])
    assert lo == pytest.approx(elo, abs=1.01 / n) and hi == pytest.approx(ehi, abs=1.01 / n)


def test_bootstrap_coverage_near_nominal():
    """Simulated paired data with known true delta: the 95% interval covers it about 95% of the time."""
    rng = np.random.default_rng(0)
    n, p_rw, p_wr, reps = 200, 0.10, 0.04, 300
    true = p_wr - p_rw
    hits = 0
    for i in range(reps):
        b, c, _ = rng.multinomial(n, [p_rw, p_wr, 1 - p_rw - p_wr])
        lo, hi = stats.bootstrap_delta_ci(n, b, c, n_bootstrap=1000, seed=i)
        hits += lo <= true <= hi
    assert 0.90 <= hits / reps <= 0.99


# --------------------------------------------------------------------------- Holm and paired tests


def test_holm_known_values_and_statsmodels():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, max(0.04*1, 0.06)=0.06
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(5)
    for m in (1, 2, 7, 30):
        pv = list(rng.random(m) ** 3)
        adj, rej = stats.holm_reject(pv, alpha=0.05)
        ref_rej, ref_adj, _, _ = multipletests(pv, alpha=0.05, method="holm")
        assert adj == pytest.approx(list(ref_adj)) and rej == list(ref_rej)
    # statsmodels' default (Holm-Sidak) gives different numbers: we must not be using it
    assert stats.holm(p) != pytest.approx(list(multipletests(p)[1]))
    assert stats.holm([]) == []
    with pytest.raises(ValueError):
        stats.holm([0.5, 1.2])


def test_paired_tests_against_scipy_and_floor():
    x = [-0.05, -0.08, -0.06, -0.09]
    y = [-0.01, -0.02, -0.03, 0.00]
    r = stats.paired_tests(x, y)
    ref = st.ttest_rel(x, y)
    assert r["ttest"]["p_value"] == pytest.approx(ref.pvalue) and r["ttest"]["statistic"] == pytest.approx(ref.statistic)
    d = np.round(np.subtract(x, y), 12)
    assert r["wilcoxon"]["p_value"] == pytest.approx(st.wilcoxon(d, method="exact").pvalue)
    # all four differences negative: exact tests sit on their floor 2/2^4
    assert r["wilcoxon"]["p_value"] == pytest.approx(0.125) == r["exact_p_floor"]
    assert r["sign"]["p_value"] == pytest.approx(0.125) and r["sign"]["n_negative"] == 4
    # equal fractions k/n must difference to exact zeros (dropped), not float noise
    z = stats.paired_tests([37 / 150 - 45 / 150, 0.1], [36 / 150 - 44 / 150, 0.0])
    assert z["n_nonzero"] == 1 and z["differences"][0] == 0.0
    assert stats.paired_tests([0.1, 0.1], [0.1, 0.1])["ttest"]["p_value"] == 1.0
    degenerate = stats.paired_tests([0.2, 0.3], [0.1, 0.2])
    assert degenerate["ttest"]["p_value"] is None and "zero variance" in degenerate["ttest"]["note"]
    assert stats.paired_tests([0.1], [0.0])["ttest"]["p_value"] is None
    assert [stats.exact_test_floor(n) for n in (3, 4, 5, 6)] == [0.25, 0.125, 0.0625, 0.03125]


def test_t_interval():
    v = [0.1, 0.2, 0.4]
    r = stats.t_interval(v, 0.95)
    ci = st.ttest_1samp(v, 0).confidence_interval(0.95)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert stats.t_interval([0.3])["ci_low"] is None


# --------------------------------------------------------------------------- seed-level table


def test_seed_level_table_on_simulated_sweep():
    trials, _, _ = make_trials()
    table = seeds.seed_level_table(trials, suite=None)
    assert table["suites"] == ["forget", "retain", "gsm8k"]
    ok = [t for t in trials if t["status"] == "ok"]
    assert [f["trial_id"] for f in table["failed"]] == ["mast_simnpo_k2_s0"]
    # every condition's numbers come from its trials
    for c in table["conditions"]:
        rows = [t for t in ok if seeds.condition_label(t["config"]) == c["condition"]]
        assert sorted(t["config"]["seed"] for t in rows) == c["seeds"]
        deltas = [next(t for t in rows if t["config"]["seed"] == s)["suites"][c["suite"]]["delta"] for s in c["seeds"]]
        assert c["deltas"] == deltas and c["mean_delta"] == pytest.approx(np.mean(deltas))
        ci = st.ttest_1samp(deltas, 0).confidence_interval(0.95)
        assert (c["ci_low"], c["ci_high"]) == pytest.approx((ci.low, ci.high))
    labels = {c["condition"] for c in table["conditions"] if c["suite"] == "forget"}
    assert labels == {"mast/npo/k=2", "mast/npo/k=4", "mast/ga/k=2", "mast/ga/k=4", "full/npo", "full/ga",
                      "random/npo/k=2", "random/npo/k=4", "random/ga/k=2", "random/ga/k=4"}
    comps = table["comparisons"]
    # mast x2 objectives x2 k vs full and vs random, random vs full: (4 + 4 + 4) per suite, 3 suites
    assert len(comps) == 36 and table["family"]["size"] == 36
    for c in comps:
        base = [t for t in ok if t["config"]["rule"] == c["baseline"] and t["config"]["objective"] == c["condition"].split("/")[1]]
        if c["baseline"] == "random":
            base = [t for t in base if f"k={t['config']['k']}" in c["condition"]]
        by_seed = {t["config"]["seed"]: t["suites"][c["suite"]]["delta"] for t in base}
        assert c["baseline_deltas"] == [by_seed[s] for s in c["seeds"]]
        assert c["p_raw"] == pytest.approx(st.ttest_rel(c["deltas"], c["baseline_deltas"]).pvalue)
        assert c["exact_p_floor"] == stats.exact_test_floor(sum(d != 0 for d in c["differences"])) >= 0.25
    # Holm over the whole family: all suites together
    ref_rej, ref_adj, _, _ = multipletests([c["p_raw"] for c in comps], alpha=0.05, method="holm")
    assert [c["p_holm"] for c in comps] == pytest.approx(list(ref_adj))
    assert [c["reject"] for c in comps] == list(ref_rej)
    assert any("cannot reach p < 0.05" in n for n in table["notes"])
    assert "primary" in table["primary_reason"] and table["primary_test"] == "ttest"
    # full collapses retention far more than mast in the simulation
    retain_vs_full = [c for c in comps if c["suite"] == "retain" and c["baseline"] == "full"
                      and c["condition"].startswith("mast")]
    assert all(c["mean_difference"] > 0.1 for c in retain_vs_full)
    json.dumps(table)  # JSON-serialisable as written to seed_table.json


def test_seed_table_one_suite_keeps_sweep_family():
    trials, _, _ = make_trials(with_failed=False)
    whole = seeds.seed_level_table(trials, suite=None)
    forget = seeds.seed_level_table(trials, suite="forget")
    assert {c["suite"] for c in forget["comparisons"]} == {"forget"}
    assert forget["family"]["size"] == whole["family"]["size"]
    want = {(c["condition"], c["baseline"]): c["p_holm"] for c in whole["comparisons"] if c["suite"] == "forget"}
    assert {(c["condition"], c["baseline"]): c["p_holm"] for c in forget["comparisons"]} == want
    table_only = seeds.seed_level_table(trials, suite="forget", family="table")
    assert table_only["family"]["size"] == len(table_only["comparisons"]) == 12
    ref = multipletests([c["p_raw"] for c in table_only["comparisons"]], method="holm")[1]
    assert [c["p_holm"] for c in table_only["comparisons"]] == pytest.approx(list(ref))


def test_seed_table_matching_and_errors():
    trials, _, _ = make_trials(n_seeds=3, ks=(2,), objectives=("npo",), suites=(("forget", 60, 0.5),),
                               with_failed=False)
    # drop full's seed 2: the comparison vs full uses the 2 matched seeds and records the unmatched one
    trials = [t for t in trials if not (t["config"]["rule"] == "full" and t["config"]["seed"] == 2)]
    table = seeds.seed_level_table(trials)
    c = next(c for c in table["comparisons"] if c["condition"] == "mast/npo/k=2" and c["baseline"] == "full")
    assert c["seeds"] == [0, 1] and c["unmatched_seeds"] == [2] and c["n"] == 2
    # the full baseline run at another k of the grid is the same condition: first one used, noted
    dup = dict(next(t for t in trials if t["config"]["rule"] == "full"), trial_id="full_again")
    dup["config"] = {**dup["config"], "k": 99}
    table = seeds.seed_level_table(trials + [dup])
    assert any("full_again repeats" in n for n in table["notes"])
    mast0 = next(t for t in trials if t["config"]["rule"] == "mast")
    with pytest.raises(InputError, match="same condition mast/npo/k=2 and seed 0"):
        seeds.seed_level_table(trials + [dict(mast0, trial_id="again")])
    with pytest.raises(InputError, match="no ok trial has suite 'gsm8k'"):
        seeds.seed_level_table(trials, suite="gsm8k")
    with pytest.raises(InputError, match="status must be"):
        seeds.seed_level_table(trials + [{"trial_id": "x", "status": "running", "config": {"rule": "mast", "seed": 0}}])
    with pytest.raises(InputError, match="primary test"):
        seeds.seed_level_table(trials, primary="z")


def test_seed_table_single_seed_is_not_tested():
    trials, _, _ = make_trials(n_seeds=1, ks=(2,), objectives=("npo",), suites=(("forget", 60, 0.5),),
                               with_failed=False)
    table = seeds.seed_level_table(trials)
    assert table["family"]["size"] == 0
    assert all(c["p_raw"] is None and c["reject"] is None for c in table["comparisons"])
    assert any("left out of the Holm family" in n for n in table["notes"])
    text = seeds.format_seed_table(table)
    assert "mast/npo/k=2 vs full" in text and "left out of the Holm family" in text


def test_text_table_formats_numbers_as_the_report_does():
    """`mast stats seeds` and the report print p-values and deltas with the same formatters (mast.doc)."""
    from mast.doc import fmt_ci, fmt_p, fmt_pp

    assert (fmt_p(1e-4), fmt_p(0.0078125), fmt_p(1.0), fmt_p(None)) == ("1.0e-04", "0.0078", "1", "–")
    trials, _, _ = make_trials(ks=(2,), objectives=("npo",))
    table = seeds.seed_level_table(trials)
    text = seeds.format_seed_table(table)
    for c in table["comparisons"]:
        line = next(x for x in text.splitlines() if x.startswith(f"{c['condition']} vs {c['baseline']} "))
        assert line.split()[-2:] == [fmt_p(c["p_holm"]), {None: "-", True: "yes", False: "no"}[c["reject"]]]
        assert fmt_p(c["ttest"]["p_value"]) in line and fmt_pp(c["mean_difference"]) in line
    for c in table["conditions"]:
        assert fmt_ci(c["ci_low"], c["ci_high"]) in text


# --------------------------------------------------------------------------- CLI


def test_cli_mcnemar(tmp_path, capsys):
    before, after = records_from_counts(37, 8, 0, 105)
    write_jsonl(tmp_path / "b.jsonl", before)
    write_jsonl(tmp_path / "a.jsonl", after)
    assert main(["stats", "mcnemar", str(tmp_path / "b.jsonl"), str(tmp_path / "a.jsonl")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["p_value"] == 0.0078125 and out["right_to_wrong"] == 8
    write_jsonl(tmp_path / "short.jsonl", after[:-3])
    assert main(["stats", "mcnemar", str(tmp_path / "b.jsonl"), str(tmp_path / "short.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "short.jsonl is missing 3 id(s)" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    assert main(["stats", "mcnemar", str(tmp_path / "bad.jsonl"), str(tmp_path / "a.jsonl")]) == 2
    assert "missing field(s) correct" in capsys.readouterr().err


def test_cli_seeds_folder_file_and_csv(tmp_path, capsys):
    trials, _, _ = make_trials(ks=(2,), objectives=("npo",))
    sweep = tmp_path / "sweep"
    write_jsonl(sweep / "trials.jsonl", trials)
    out = tmp_path / "seeds.json"
    assert main(["stats", "seeds", str(sweep), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mast/npo/k=2 vs full" in text and "failed trials (1" in text
    table = json.loads(out.read_text())
    assert table == json.loads(json.dumps(seeds.seed_level_table(trials) | {"source": str(sweep)}))
    assert main(["stats", "seeds", str(sweep / "trials.jsonl"), "--suite", "all"]) == 0
    assert "== suite gsm8k" in capsys.readouterr().out
    # a wide CSV (e.g. exported from MLflow) with params./metrics. columns
    lines = ["trial_id,status,params.rule,params.objective,params.k,params.seed,metrics.forget/delta,retain.delta"]
    for t in trials:
        if t["status"] == "ok":
            c = t["config"]
            lines.append(f"{t['trial_id']},ok,{c['rule']},{c['objective']},{c['k']},{c['seed']},"
                         f"{t['suites']['forget']['delta']!r},{t['suites']['retain']['delta']!r}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    assert main(["stats", "seeds", str(tmp_path / "t.csv"), "--out", str(tmp_path / "csv.json")]) == 0
    from_csv = json.loads((tmp_path / "csv.json").read_text())
    want = seeds.seed_level_table([t for t in trials if t["status"] == "ok"], suite="forget",
                                  family="sweep")
    # gsm8k is not in the CSV, so the sweep family is smaller; the raw tests agree
    assert [c["p_raw"] for c in from_csv["comparisons"]] == pytest.approx([c["p_raw"] for c in want["comparisons"]])
    capsys.readouterr()
    assert main(["stats", "seeds", str(tmp_path)]) == 2
    assert "no trials.jsonl" in capsys.readouterr().err
    assert main(["stats", "seeds", str(sweep), "--suite", "nope"]) == 2
    assert "no ok trial has suite 'nope'" in capsys.readouterr().err


def test_rho_grid_matches_baselines_that_ignore_rho():
    """With rho in the grid the sweep keeps one rho for rules that ignore it; they still pair with every rho."""
    trials, _, _ = make_trials(n_seeds=3, ks=(2,), objectives=("npo",), suites=(("forget", 60, 0.5),),
                               with_failed=False)
    rows = []
    for t in trials:
        rule = t["config"]["rule"]
        for rho in ((0.05, 0.1) if rule == "mast" else (0.05,)):
            rows.append({**t, "trial_id": f"{t['trial_id']}_rho{rho}", "config": {**t["config"], "rho": rho}})
    table = seeds.seed_level_table(rows)
    comps = {(c["condition"], c["baseline"]): c for c in table["comparisons"]}
    assert set(comps) == {("mast/npo/k=2/rho=0.05", "full"), ("mast/npo/k=2/rho=0.05", "random"),
                          ("mast/npo/k=2/rho=0.1", "full"), ("mast/npo/k=2/rho=0.1", "random"),
                          ("random/npo/k=2", "full")}
    assert all(c["n"] == 3 for c in comps.values())
