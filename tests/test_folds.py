# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""k-fold cross-validation grouped by patient: the assignment, a 3-fold run, and a fold that resumes."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from monai_icmil.data.synthetic import make_dataset
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines import BagPhase, Embed, EmbedderPhase
from monai_icmil.networks import ABMIL
from monai_icmil.utils import strict_json
from monai_icmil.workflows import ICMILWorkflow
from monai_icmil.workflows.folds import assign_folds, fold_splits, slide_groups


def _patients(seed: int, n: int = 40, key: str = "patient") -> list[dict]:
    """Slides of ``n`` patients owning 1-3 slides each; a third of the patients are positive (all their slides)."""
    rng = np.random.default_rng(seed)
    entries = []
    for p in range(n):
        label = int(p % 3 == 0)
        for s in range(int(rng.integers(1, 4))):
            entries.append({"slide_id": f"p{p}_s{s}", "image": f"/d/p{p}_s{s}.tiff", "label": label, key: f"P{p}"})
    return entries


def _patients_of(entries: list[dict]) -> set[str]:
    return set(slide_groups(entries))


@pytest.mark.parametrize("key", ["patient", "case_id", "patient_id", "subject"])
def test_folds_keep_each_patient_in_one_split_and_balance_labels(key):
    pool = _patients(0, key=key)
    test = _patients(1, n=6, key=key)
    for e in test:
        e["slide_id"], e[key] = "t_" + e["slide_id"], "T" + e[key]
    for items, fixed in (
        ({"training": pool[:60], "validation": pool[60:], "test": test}, True),
        ({"training": pool}, False),
    ):
        splits, folds = fold_splits(items, 3, seed=5)
        assert len(splits) == 3 and len(folds) == len(pool)
        held = "validation" if fixed else "test"
        for k, split in enumerate(splits):
            parts = [_patients_of(split[s]) for s in ("training", "validation", "test")]
            assert not (
                parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]
            ), f"fold {k}: a patient in two"
            assert {e["slide_id"] for e in split[held]} == {e["slide_id"] for e, f in zip(pool, folds) if f == k}
            if fixed:
                assert split["test"] == test  # the datalist's test split stays fixed
            else:
                assert split["validation"] and len(split["training"]) > len(split["validation"])
            n = len(split["training"]) + len(split["validation"]) + (0 if fixed else len(split["test"]))
            assert n == len(pool)  # every pool slide in exactly one split of the fold
        # every slide held out exactly once; each fold's positive share close to the cohort's (1/3 of the patients)
        counts = np.bincount(folds, minlength=3)
        positives = np.bincount(folds, weights=[e["label"] for e in pool], minlength=3)
        share = positives.sum() / len(pool)
        assert counts.min() >= 0.8 * len(pool) / 3, counts
        assert np.abs(positives / counts - share).max() < 0.05, (positives, counts)
    assert assign_folds(pool, 3, seed=5) == assign_folds(pool, 3, seed=5)  # reproducible


def test_too_few_patients_for_the_folds_is_a_clear_error():
    entries = [{"slide_id": f"s{i}", "label": i % 2, "patient": "P0" if i < 5 else "P1"} for i in range(8)]
    with pytest.raises(ValueError, match="3 folds need at least 3 patients .* has 2"):
        assign_folds(entries, 3)
    with pytest.raises(ValueError, match="folds must be >= 2"):
        assign_folds(entries, 1)


def test_a_patient_is_one_group_whichever_field_names_it_and_rows_without_one_are_refused():
    rows = [
        {"slide_id": "a", "label": 0, "patient": "P01"},
        {"slide_id": "b", "label": 1, "patient_id": "P01"},
        {"slide_id": "c", "label": 0, "patient": " P01 "},
        {"slide_id": "d", "label": 1, "patient": 7},
        {"slide_id": "e", "label": 0, "patient": "7"},
    ]
    assert slide_groups(rows) == ["patient:P01"] * 3 + ["patient:7"] * 2
    assert slide_groups([{"slide_id": "x", "label": 0}]) == ["slide:x"]
    with pytest.raises(ValueError, match=r"1 slide\(s\) have no patient .* while the others do: f\. Give every row"):
        slide_groups([*rows, {"slide_id": "f", "label": 1, "patient": ""}])


def test_a_held_out_validation_split_keeps_patients_whole_and_shared_patients_are_warned(tmp_path):
    from monai_icmil.workflows.splits import DatasetSplits

    train = _patients(2, n=24)
    for e in train:
        e["image"] = f"{e['slide_id']}.tiff"
    (tmp_path / "datalist.json").write_text(json.dumps({"training": train}))
    splits = DatasetSplits(tmp_path, "datalist.json", tmp_path / "out", seed=3)
    with pytest.warns(UserWarning, match=r"held out \(stratified, whole patients, seed 3\)"):
        items = splits.items()
    val, fit = _patients_of(items["validation"]), _patients_of(items["training"])
    assert val and fit and not val & fit and {e["label"] for e in items["validation"]} == {0, 1}
    assert json.loads((tmp_path / "out" / "validation_split.json").read_text())["grouped_by"] == "patient"
    with pytest.raises(ValueError, match=r"validation_split\.json holds the validation split made with seed 3"):
        DatasetSplits(tmp_path, "datalist.json", tmp_path / "out", seed=4).items()
    shared = {
        "training": train[:-1],
        "validation": train[-1:],
        "test": [{**train[0], "slide_id": "again", "image": "again.tiff"}],
    }
    (tmp_path / "shared.json").write_text(json.dumps(shared))
    with pytest.warns(UserWarning, match=r"patient\(s\) have slides in more than one split of the datalist \(P0"):
        DatasetSplits(tmp_path, "shared.json", tmp_path / "out2").items()


def test_the_mean_over_folds_says_how_many_folds_it_averages_and_writes_strict_json(tmp_path):
    from monai_icmil.workflows.folds import cv_summary

    row = {"val_auc": 0.9, "test_auc": float("nan"), "teacher_patch_auc": None, "test_acc": 0.5, "test_f1": 0.5}
    summaries = [
        {"final_round": 0, "rows": {0: {**row, "round": 0}}},
        {"final_round": 0, "rows": {0: {**row, "test_auc": 0.8, "round": 0}}},
    ]
    summary = cv_summary(tmp_path, summaries, "2 folds")
    assert "| 0 | 2 | 0.900 +/- 0.000 | 0.800 (n=1) | - | 0.500 +/- 0.000 |" in summary["markdown"]
    final = summary["rounds"][-1]
    assert final["test_auc"] == 0.8 and final["test_auc_sd"] is None and final["test_auc_n"] == 1
    assert "test_auc_ci" not in final and final["val_auc_ci"] == [0.9, 0.9]
    json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary"))
    assert strict_json({"a": [float("nan"), 1.0, float("inf")], "b": (2, "x")}) == {
        "a": [None, 1.0, None],
        "b": [2, "x"],
    }
    summaries[1]["rows"][1] = {**row, "val_auc": 0.95, "test_auc": 0.9, "round": 1}  # fold 1 reached round 1
    text = cv_summary(tmp_path, summaries, "2 folds")["markdown"]
    assert "| 1 | 1 | 0.050 | 0.100 |" in text  # round 1's change: fold 1 alone, against its own round 0
    assert json.loads((tmp_path / "summary.json").read_text())["changes"] == [
        {
            "round": 1,
            "folds": 1,
            "val_auc_change": [pytest.approx(0.05), None, 1],
            "test_auc_change": [pytest.approx(0.1), None, 1],
        }
    ]


def test_a_negative_fold_count_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="folds must be 0 .off. or the number of cross-validation folds .* got -1"):
        ICMILWorkflow(str(tmp_path), str(tmp_path / "out"), folds=-1, mlflow={"enabled": False})
    assert not (tmp_path / "out").exists()


COUPLE = dict(epochs=1, batches_per_epoch=2, batch_size=16, val_interval=1, val_patches=16, num_workers=0)
COUPLE.update(device="cpu", progress=False)


def _workflow(data: Path, out: Path, mlflow: dict | None = None) -> ICMILWorkflow:
    return ICMILWorkflow(
        str(data),
        str(out),
        tiling=TilingConfig(patch_size=32, mpp=1.0),
        embedder={"name": "resnet18_trunc", "input_size": 32},
        aggregator=functools.partial(ABMIL, hidden_dim=16),
        embed=Embed(batch_size=64, num_workers=0, progress=False),
        bag_phase=BagPhase(epochs=2, device="cpu", progress=False),
        embedder_phase=EmbedderPhase(**COUPLE),
        num_rounds=1,
        round_patience=2,
        progress=False,
        device="cpu",
        folds=3,
        mlflow=mlflow or {"registered_model_name": None},
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """12 small slides of 7 patients (1-3 slides each), no test split: each fold's held-out part is its test."""
    root = tmp_path_factory.mktemp("cohort")
    config = {"width": 768, "height": 512, "tumour_fraction": [0.2, 0.4]}
    path = make_dataset(root, num_training=12, num_validation=0, num_test=0, seed=3, config=config, progress=False)
    data = json.loads(path.read_text())
    owner = [0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6]
    for e, p in zip(data["training"], owner):
        e["patient"] = f"P{p}"
    path.write_text(json.dumps(data))
    return root


def test_a_three_fold_run_writes_per_fold_rows_and_the_mean_and_an_interrupted_fold_resumes(cohort, tmp_path):
    out = tmp_path / "cv"
    calls = {"n": 0}
    real = BagPhase.__call__

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # fold 1, round 1's bag phase (fold 0: rounds 0 and 1; fold 1: round 0)
            raise KeyboardInterrupt("interrupted")
        return real(self, *args, **kwargs)

    BagPhase.__call__ = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            _workflow(cohort, out).run()
    finally:
        BagPhase.__call__ = real
    fold0 = {p: p.stat().st_mtime_ns for p in (out / "fold_0").rglob("*") if p.is_file()}
    fold1_round0 = json.loads((out / "fold_1" / "state.json").read_text())["rounds"]["0"]
    assert not (out / "fold_2").exists() and not (out / "summary.md").exists()

    summary = _workflow(cohort, out).run()

    assert [p for p, t in fold0.items() if p.stat().st_mtime_ns != t] == []  # fold 0 was finished: not touched
    assert json.loads((out / "fold_1" / "state.json").read_text())["rounds"]["0"] == fold1_round0  # resumed
    # every patient's slides in one split of each fold; each slide held out (tested) in exactly one fold
    assignment = json.loads((out / "folds" / "folds.json").read_text())
    tested = []
    for k in range(3):
        fold = json.loads((out / "folds" / f"fold_{k}.json").read_text())
        parts = [{e["patient"] for e in fold[s]} for s in ("training", "validation", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        tested += [e["slide_id"] for e in fold["test"]]
        assert {e["slide_id"] for e in fold["test"]} == {s for s, a in assignment["slides"].items() if a["fold"] == k}
    assert sorted(tested) == sorted(assignment["slides"]) and len(tested) == 12
    assert not list(out.rglob("validation_split.json"))  # no split held out besides the folds' own
    # round 0's features are shared (same frozen embedder): written once, by fold 0
    assert len(list((out / "round_0" / "features").glob("*.safetensors"))) == 12
    assert not (out / "fold_0" / "round_0" / "features").exists()
    written = [
        json.loads((out / f"fold_{k}" / "state.json").read_text())["rounds"]["0"]["embed"]["written"] for k in range(3)
    ]
    assert written == [12, 0, 0]
    # summary.md: 3 folds x 2 rounds, the mean +/- sd per round and over each fold's final round, round 1's change
    text = (out / "summary.md").read_text()
    assert sum(1 for line in text.splitlines() if line.startswith(("| 0 | ", "| 1 | ", "| 2 | "))) == 6 + 2 + 1
    rows = json.loads((out / "summary.json").read_text())
    for r in (0, 1):
        aucs = [row["test_auc"] for row in rows["folds"] if row["round"] == r]
        fold_aucs = [
            json.loads((out / f"fold_{k}" / "summary.json").read_text())["rows"][r]["test_auc"] for k in range(3)
        ]
        assert aucs == fold_aucs
        mean = next(row for row in rows["rounds"] if row["round"] == r)
        assert mean["test_auc"] == pytest.approx(np.mean(aucs)) and mean["test_auc_sd"] == pytest.approx(
            np.std(aucs, ddof=1)
        )
        assert f"| {r} | 3 | " in text and f"{np.mean(aucs):.3f} +/- {np.std(aucs, ddof=1):.3f}" in text
    change = [a - b for a, b in zip(*([row["test_auc"] for row in rows["folds"] if row["round"] == r] for r in (1, 0)))]
    assert rows["changes"][0]["test_auc_change"] == [
        pytest.approx(np.mean(change)),
        pytest.approx(np.std(change, ddof=1)),
        3,
    ]
    assert summary["final"]["cv_test_auc"] == rows["rounds"][-1]["test_auc"] and (out / "cv_rounds.png").is_file()
    # MLflow: one parent run, a run per fold nested under it, each fold's rounds nested under the fold
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.resolve()}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("icmil").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["icmil"]
    assert parent.data.metrics["cv_test_auc"] == pytest.approx(summary["final"]["cv_test_auc"])
    for k in range(3):
        fold = by_name[f"fold_{k}"]
        assert fold.data.tags["mlflow.parentRunId"] == parent.info.run_id
        nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == fold.info.run_id]
        assert {r.info.run_name for r in nested} >= {"round_0", "round_1"}


def test_a_changed_datalist_does_not_continue_another_cross_validation(cohort, tmp_path):
    out = tmp_path / "cv"
    (out / "folds").mkdir(parents=True)
    (out / "folds" / "folds.json").write_text(json.dumps({"num_folds": 3, "seed": 0, "slides": {"x": {"fold": 0}}}))
    with pytest.raises(ValueError, match="folds.json was written for another cross-validation .* new output_dir"):
        _workflow(cohort, out, mlflow={"enabled": False}).run()


def test_a_started_cross_validation_keeps_the_grouping_fields_it_was_planned_with(cohort, tmp_path):
    """A cross-validation planned by a version that read other patient fields continues with them, instead of
    refusing its own folds as another datalist's."""
    from monai_icmil.workflows.folds import CrossValidation

    wf = _workflow(cohort, tmp_path / "cv", mlflow={"enabled": False})
    CrossValidation(wf, 3, group_keys=("case_id",)).plan()  # the cohort's slides carry 'patient' only
    path = tmp_path / "cv" / "folds" / "folds.json"
    planned = json.loads(path.read_text())
    assert planned["group_keys"] == ["case_id"]
    assert all(s["group"].startswith("slide:") for s in planned["slides"].values())
    CrossValidation(wf, 3).plan()  # the default fields (with 'patient') would group the slides differently
    assert json.loads(path.read_text()) == planned
    wf.splits.val_fraction = 0.5  # another inner validation share: the folds' training splits would differ
    with pytest.raises(ValueError, match=r"its val_fraction differs.*new output_dir"):
        CrossValidation(wf, 3).plan()
    del planned["val_fraction"]  # a plan from before val_fraction was recorded continues
    path.write_text(json.dumps(planned))
    CrossValidation(wf, 3).plan()
