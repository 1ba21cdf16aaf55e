"""What a trial row carries beyond McNemar: truncation, the n > 1 test, and the texts it unlearns."""

from __future__ import annotations

from mast.baselines import first_correct_response
from mast.tracking import trial_metrics

MCN = {"n": 2, "both_correct": 1, "right_to_wrong": 1, "wrong_to_right": 0, "both_wrong": 0, "acc_before": 1.0,
       "acc_after": 0.5, "delta": -0.5, "ci_low": -1.0, "ci_high": 0.0, "p_value": 1.0}


def test_truncation_and_the_sampled_test_reach_the_trial_metrics():
    row = {"suites": {"forget": {**MCN, "truncated_rate": 0.25,
                                 "samples_test": {"p_value": 0.03, "acc_after": 0.4, "n_samples": 4}},
                      "retain": dict(MCN)}}
    m = trial_metrics(row)
    assert m["forget/truncated_rate"] == 0.25
    assert m["forget/samples_p"] == 0.03 and m["forget/accuracy_avg_n"] == 0.4
    assert "retain/truncated_rate" not in m and "retain/samples_p" not in m


def test_generated_texts_take_the_first_correct_sample():
    assert first_correct_response({"correct": True, "response": "a"}) == "a"
    sampled = {"correct": False, "response": "wrong", "samples": [
        {"correct": False, "response": "wrong"}, {"correct": True, "response": "right"},
        {"correct": True, "response": "also right"}]}
    assert first_correct_response(sampled) == "right"
    assert first_correct_response({"correct": False, "response": "x"}) is None
    assert first_correct_response({"correct": False, "response": "x", "samples": [{"correct": False,
                                                                                      "response": "x"}]}) is None
