# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The run's summary as a user reads it: intervals without width, validation ties, the headline metrics for MLflow."""

from __future__ import annotations

import csv
import json

import pytest

from monai_icmil.metrics import positive_rank
from monai_icmil.workflows.summary import coupling_metrics, write_summary


def _round(val_auc: float, test_auc: float, teacher: float, ci: tuple[float, float], loss: float = 0.1) -> dict:
    return {
        "bag_phase": {"val": {"auc": val_auc, "auc_ci_low": ci[0], "auc_ci_high": ci[1], "loss": loss}},
        "test": {
            "metrics": {"auc": test_auc, "auc_ci_low": ci[0], "auc_ci_high": ci[1]},
            "slides": 6,  # as many as _predictions writes
        },
        "teacher": {"patch_auc": teacher, "patches": 100, "normal_called_tumour": 0.1},
    }


def _predictions(out, r: int, scores: list[float]) -> None:
    path = out / f"round_{r}" / "test" / "predictions.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", "prob_normal", "prob_tumour", "pred", "pred_class"])
        for i, (label, p) in enumerate(zip([0, 0, 1, 1, 0, 1], scores)):
            w.writerow([f"s{i}", label, 1 - p, p, int(p > 0.5), ""])


def test_a_summary_says_no_ci_for_separated_classes_and_why_a_tied_round_is_final(tmp_path):
    rounds = {
        0: _round(1.0, 0.9, 0.92, (0.7, 1.0)),
        1: _round(1.0, 1.0, 0.90, (1.0, 1.0), loss=0.05),
        2: _round(0.95, 1.0, 0.91, (0.8, 1.0)),
    }
    _predictions(tmp_path, 0, [0.1, 0.6, 0.7, 0.9, 0.2, 0.55])
    _predictions(tmp_path, 1, [0.1, 0.2, 0.7, 0.9, 0.3, 0.8])
    summary = write_summary(
        tmp_path, rounds, 1, "test", showcase={"slide": "s3", "probability": 1.0, "tied": 3, "picture": "s3.jpg"}
    )
    md = summary["markdown"]
    assert (
        "| 1 (final) | 1.000 (no CI) | 1.000 (no CI) |" in md and "| 0 | 1.000 (0.70-1.00) | 0.900 (0.70-1.00) |" in md
    )
    assert "No CI: DeLong's interval has no width, as for an AUC of 1.000" in md
    assert "Validation AUC ties at 1.000 in rounds 0, 1: round 1 is final by the lower validation loss" in md
    assert "(tumour probability 1.000; 3 test slides at 1.000 to 3 decimals)" in md
    assert "against the ground-truth tumour masks of the test slides" in md
    assert "Test accuracy and F1 are at probability 0.5" not in md  # no threshold measured
    assert (tmp_path / "rounds.png").stat().st_size > 0
    metrics = coupling_metrics(summary["rows"], 1, tmp_path)
    assert metrics["final_test_auc"] == 1.0 and metrics["final_test_auc_vs_prev"] == pytest.approx(0.1)
    assert metrics["coupling_test_auc_delta"] == pytest.approx(0.1)  # round 1 minus round 0, not the previous round
    assert metrics["coupling_teacher_patch_auc_delta"] == pytest.approx(-0.02)
    assert metrics["coupling_test_auc_delta_ci_low"] < 0.1 < metrics["coupling_test_auc_delta_ci_high"]
    assert "final_test_auc_delta" not in metrics and "final_round" not in metrics
    assert json.loads(json.dumps(metrics)) == metrics  # plain numbers for MLflow
    _predictions(tmp_path, 2, [0.1, 0.2, 0.7, 0.9, 0.3, 0.8])
    for r in (0, 2):  # two rounds that both separate the test classes
        _predictions(tmp_path / "both", r, [0.1, 0.2, 0.7, 0.9, 0.3, 0.8 - r / 10])
    both = write_summary(tmp_path / "both", {0: rounds[1], 2: rounds[1]}, 2, "test")["markdown"].replace("\n", " ")
    assert "has a paired interval of no width: both rounds order every tumour/normal pair alike" in both
    assert "round 2 is final by validation loss, then the earlier round" in both  # equal losses, and 2 is not earlier
    same = write_summary(tmp_path / "both", {0: rounds[1], 2: rounds[1]}, 0, "test")["markdown"]
    assert "round 0 is final as the earliest of them (their validation losses are equal too)" in same
    assert coupling_metrics({0: {"round": 0, "test_auc": 0.9}}, 0) == {"final_test_auc": 0.9}  # round 0 kept
    later = coupling_metrics(write_summary(tmp_path, rounds, 2, "test")["rows"], 2)
    assert later["final_teacher_patch_auc_vs_prev"] == pytest.approx(0.01)
    assert later["coupling_teacher_patch_auc_delta"] == pytest.approx(-0.01)  # the sign a reader of MLflow needs
    rounds[1]["test"]["metrics"].update(acc=0.75, val_threshold=0.98, val_threshold_acc=0.958, val_threshold_f1=0.96)
    calibrated = write_summary(tmp_path, rounds, 1, "test")["markdown"].replace("\n", " ")
    assert (
        "At the threshold the validation slides pick (p = 0.980), round 1's test accuracy is 0.958 (F1 0.960; "
        in calibrated
    )
    rounds[1]["test"]["metrics"].update(acc=0.95)  # within 0.02 of it: nothing to say
    assert "cannot be told from chance" not in calibrated and "interval is wide" not in calibrated
    rounds[2] = _round(0.906, 0.297, 0.49, (0.0, 0.59))
    rounds[2]["bag_phase"]["val"].update(auc_ci_low=0.6, auc_ci_high=1.0)
    chance = write_summary(tmp_path, rounds, 2, "test")["markdown"].replace("\n", " ")
    assert "**Round 2's test AUC (0.297, 0.00-0.59) cannot be told from chance on these test slides.**" in chance
    assert "Round 2's validation AUC interval is wide (0.60-1.00): few validation slides picked the final" in chance
    rounds[2]["test"]["metrics"].update(auc=0.2, auc_ci_low=0.05, auc_ci_high=0.45)
    below = write_summary(tmp_path, rounds, 2, "test")["markdown"].replace("\n", " ")
    assert "**Round 2's test AUC (0.200, 0.05-0.45) is below chance**" in below and "told from chance" not in below
    assert "At the threshold the validation" not in write_summary(tmp_path, rounds, 1, "test")["markdown"]


def test_slides_tied_at_a_probability_of_one_rank_by_the_other_classes():
    rows = [[7.4e-9, 1.0], [5.7e-11, 1.0], [1.7e-9, 1.0], [0.3, 0.7]]
    assert sorted(range(4), key=lambda i: positive_rank(rows[i]), reverse=True) == [1, 2, 0, 3]
