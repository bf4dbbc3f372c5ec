# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The ICMIL bundle, run the way users run it: ``python -m monai.bundle run ...``."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_erosion

from monai_icmil.data.slide import open_slide
from monai_icmil.engines.bag_phase import load_bag_classifier, save_bag_classifier
from monai_icmil.engines.embedder_phase import EmbedderPhase
from monai_icmil.handlers.tracking import using_store
from monai_icmil.metrics import positive_rank, youden_threshold
from monai_icmil.visualize import VS_TRUTH_BAR
from monai_icmil.workflows import ICMILWorkflow, check_config

import forked_python

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "icmil"
CONFIGS = BUNDLE / "configs"

# test-sized on top of demo.json: 10 tiny slides, 32-px patches, few epochs
TINY = {
    "synthetic": {
        "num_training": 6,
        "num_validation": 4,
        "num_test": 4,
        "seed": 3,
        "config": {"width": 1024, "height": 768, "tumour_fraction": [0.2, 0.4]},
        "num_workers": 1,
    },
    "tiling#patch_size": 32,
    "embedder#name": "resnet18_trunc",
    "embedder#input_size": 32,
    "aggregator#hidden_dim": 32,
    "bag_phase#epochs": 3,
    # train.json's search, with a tenth of its pre-training steps and a sixth of its selection rounds (on these slides
    # the selection does not settle: each round of the search is ~5 s at 30 rounds a fraction, ~1 s at 5)
    "bag_phase#witness_search": {"pretrain_steps": 50, "iterations": 5},
    "embedder_phase#epochs": 1,
    "embedder_phase#batches_per_epoch": 3,
    "embedder_phase#batch_size": 16,
    "embedder_phase#val_interval": 2,
    "embedder_phase#val_patches": 32,
    "embedder_phase#num_workers": 0,
    "progress": False,
    "mlflow#registered_model_name": None,  # logging the model costs a few seconds a run: only `trained` does
    "mlflow#enabled": False,  # a new tracking store costs ~8 s (its schema migrations): tests of tracking turn it on
}


def _bundle(
    tmp: Path, run_id: str, *configs: str, extra: dict | None = None, data: Path | None = None, **overrides
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` in ``tmp`` (train.json + demo.json + ``configs`` + TINY + ``extra``); ``data``: a
    copy of this dataset (``tiny_data``) is the run's, instead of the run generating it."""
    if data is not None and not (tmp / "data").exists():
        shutil.copytree(data, tmp / "data")
    tiny = tmp / "tiny.json"
    tiny.write_text(json.dumps({**TINY, **(extra or {})}))
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "demo.json"), *configs, str(tiny)]
    cmd = [
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        json.dumps(files),
        "--bundle_root",
        str(BUNDLE),
        "--dataset_dir",
        str(tmp / "data"),
        "--output_dir",
        str(tmp / "out"),
    ]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    env = {k: v for k, v in os.environ.items() if k != "CUFILE_LOGFILE_PATH"}  # as a user's shell has it
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), OMP_NUM_THREADS="2")
    return forked_python.run(cmd, env=env, cwd=tmp, timeout=900)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """TINY's synthetic dataset, generated once (byte for byte what a run without one generates; the bundle's own
    generation is tested by tests/test_demo.py)."""
    from monai_icmil.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("tiny_data") / "data"
    make_dataset(root, progress=False, **TINY["synthetic"])
    return root


def test_every_parameter_the_bundle_docs_list_is_in_the_configs_they_name():
    """The docs' parameter table is what users override: each id in it must exist in train.json (or the config named
    in its row), so that the table cannot drift from the configs."""
    from monai.bundle import ConfigParser

    table = (BUNDLE / "docs" / "README.md").read_text().split("## Parameters that matter")[1].split("\n\n")[1]
    rows = [line.split("|")[1] for line in table.splitlines()[2:]]
    assert len(rows) > 15
    for cell in rows:
        named = re.findall(r"\(([a-z_]+\.json)\)", cell)
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.json"), *(str(CONFIGS / n) for n in named)])
        for key in re.findall(r"`([^`]+)`", cell):
            assert key in parser, f"{key} (bundle docs) is in none of train.json {named}"


def test_network_def_is_the_untrained_bag_classifier_built_from_the_configs(tmp_path):
    """The model zoo's ``network_def``: the bag classifier the configs declare (aggregator, the starting embedder's
    feature dimension, the classes), built before any run and without touching data or outputs."""
    from monai.bundle import ConfigParser

    from monai_icmil.networks import ABMIL

    nets = {}
    for name, files in (("train", ["train.json"]), ("demo", ["train.json", "demo.json"])):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        parser.update(
            {"bundle_root": str(BUNDLE), "dataset_dir": str(tmp_path / "d"), "output_dir": str(tmp_path / "o")}
        )
        nets[name] = parser.get_parsed_content("network_def")
    assert isinstance(nets["train"], ABMIL) and (nets["train"].in_dim, nets["train"].hidden_dim) == (1024, 512)
    assert (nets["demo"].in_dim, nets["demo"].hidden_dim, nets["demo"].num_classes) == (256, 128, 2)
    assert nets["demo"](torch.randn(7, 256))["logits"].shape == (1, 2)
    # the tiling: mpp by default; a level given (camelyon16.json, or --tiling#level alone) replaces it
    for overrides, want in (({}, (0.5, None)), ({"tiling#level": 1}, (None, 1))):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.json")])
        parser.update({"bundle_root": str(BUNDLE), **overrides})
        grid = parser.get_parsed_content("prepare#transforms").transforms[-1].transform
        assert (grid.mpp, grid.level) == want, overrides
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()


def test_the_coupling_recipe_reaches_the_phases_it_sets_and_nothing_else_changes(tmp_path):
    """``coupling_recipe.json`` (the embedder-phase recipe of benchmarks D10-D13) after ``train.json``: the built
    embedder and bag phases carry its values, and every other setting of the two phases is train.json's."""
    from monai.bundle import ConfigParser

    phases = {}
    for name, files in (("train", ["train.json"]), ("recipe", ["train.json", "coupling_recipe.json"])):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        parser.update({"bundle_root": str(BUNDLE), "output_dir": str(tmp_path / "o"), "device": "cpu"})
        phases[name] = (parser.get_parsed_content("embedder_phase#phase"), parser.get_parsed_content("bag_phase#phase"))

    def settings(embedder_phase, bag_phase):
        return {
            "normal_slide_targets": embedder_phase.normal_slide_targets,
            "lr": embedder_phase.optimizer.keywords["lr"],
            "weight_decay": embedder_phase.optimizer.keywords["weight_decay"],
            "batches": (embedder_phase.epochs, embedder_phase.batches_per_epoch, embedder_phase.batch_size),
            "views": (embedder_phase.views.min_area, embedder_phase.views.hed_jitter),
            "select": embedder_phase.select,
            "confidence": embedder_phase.loss_function.confidence,
            "warm_start": bag_phase.warm_start,
            "bag": (bag_phase.epochs, bag_phase.restarts, bag_phase.optimizer.keywords["lr"]),
        }

    train, recipe = settings(*phases["train"]), settings(*phases["recipe"])
    changed = {
        "normal_slide_targets": True,
        "lr": 1e-4,
        "batches": (1, 1000, 100),
        "views": (1.0, 0.05),
        "warm_start": "both",
    }
    assert recipe == {**train, **changed} and all(train[k] != v for k, v in changed.items())
    files = json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / "coupling_recipe.json")])
    assert check_config(["run", "--config_file", files]) == []


def test_folds_from_the_command_line_make_fold_workflows_of_the_same_components(tmp_path):
    """``--folds 3`` reaches the workflow; each fold is the configured workflow (the same phase components and
    settings) with its own datalist and folder, the coordinates and round-0 features shared."""
    from monai.bundle import ConfigParser

    from monai_icmil.workflows.folds import CrossValidation

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")])
    out = tmp_path / "o"
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(tmp_path / "d"), "output_dir": str(out)})
    parser.update({"folds": 3, "mlflow#enabled": False})
    wf = parser.get_parsed_content("workflow")
    assert wf.folds == 3
    (tmp_path / "d").mkdir()  # (a run generates the demo data before the folds are made)
    (tmp_path / "fold.json").write_text(json.dumps({"training": [], "validation": []}))
    child = CrossValidation(wf, 3).fold(1, tmp_path / "fold.json")
    assert child.folds == 0 and child.output_dir == out / "fold_1" and child.splits.path == tmp_path / "fold.json"
    assert child.phases == wf.phases and child.tiling is wf.tiling and child.seed == wf.seed
    assert child.coords_dir == out / "coords" and child.features_dir(0) == out / "round_0" / "features"
    assert child.features_dir(1) == out / "fold_1" / "round_1" / "features" and child.splits.synthetic is None


def test_a_config_file_swaps_in_an_aggregator_class_an_optimizer_and_a_handler(tmp_path, tiny_data):
    """No edit to the package: a config file brings an aggregator class and a handler from a module of the user's
    (tests/custom_components.py) and SGD for the bag phase; one coupled round runs and each of them was used."""
    custom = tmp_path / "custom.json"
    custom.write_text(
        json.dumps(
            {
                "aggregator": {"_target_": "custom_components.MeanMaxMIL", "_mode_": "callable", "hidden_dim": 32},
                "bag_phase#optimizer": {
                    "_target_": "torch.optim.SGD",
                    "_mode_": "callable",
                    "lr": 0.01,
                    "momentum": 0.9,
                },
                "bag_phase#handlers": [
                    {"_target_": "custom_components.IterationCounter", "path": "$@output_dir + '/iterations.json'"}
                ],
            }
        )
    )
    extra = {"bag_phase#restarts": 2, "mlflow#enabled": True}
    proc = _bundle(tmp_path, "run", str(custom), num_rounds=1, extra=extra, data=tiny_data)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    for r in (0, 1):  # the bag classifiers are the user's class, and load again by its import path
        assert torch.load(out / f"round_{r}" / "bag_phase" / "bag_classifier.pt")["aggregator"] == (
            "custom_components.MeanMaxMIL"
        )
        assert type(load_bag_classifier(out / f"round_{r}" / "bag_phase" / "bag_classifier.pt")).__name__ == (
            "MeanMaxMIL"
        )
    records = json.loads((out / "iterations.json").read_text())
    assert len(records) == 4  # 2 rounds x 2 restarts: one handler object, attached to every bag-phase trainer
    assert {(r["optimizer"], r["network"]) for r in records} == {("SGD", "MeanMaxMIL")}
    assert records[-1]["total"] == sum(r["iterations"] for r in records) > 0
    state = json.loads((out / "state.json").read_text())["rounds"]
    assert state["1"]["embedder_phase"]["world_size"] == 1  # the user's aggregator taught the embedder phase
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("icmil").experiment_id])
    bag = next(r for r in runs if r.info.run_name == "round_0/bag_phase")
    assert bag.data.params["optimizer"] == "SGD" and bag.data.params["optimizer.momentum"] == "0.9"
    assert bag.data.params["aggregator"] == "custom_components.MeanMaxMIL"


def test_warm_start_starts_round_1s_bag_phase_from_the_student_classifier(tmp_path, tiny_data):
    """``bag_phase#warm_start``: at a learning rate of 0, round 1's classifier started warm is the student's
    classifier, i.e. what the embedder phase saved as ``student_head.pt``, statistics included; round 0 starts afresh
    (its statistics are its training features'); the round's record and MLflow say so. ``"both"`` (run here): two
    fresh restarts and two from the student's classifier (these equal to it), the one validation prefers kept, and the
    record says which (``true``, the warm restarts alone: tests/test_bag.py). Without the student's state the error
    names the file and the fix."""
    from monai.bundle import ConfigParser

    mode = "both"
    extra = {"bag_phase#warm_start": mode, "bag_phase#lr": 0.0, "bag_phase#restarts": 2, "mlflow#enabled": True}
    proc = _bundle(tmp_path, "run", extra=extra, num_rounds=1, data=tiny_data)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    student = torch.load(out / "round_1" / "embedder_phase" / "student_head.pt", weights_only=True)
    teacher = load_bag_classifier(out / "round_0" / "bag_phase" / "bag_classifier.pt").state_dict()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)  # the embedder phase trained its head
    restarts = json.loads((out / "round_1" / "bag_phase" / "restarts.json").read_text())
    starts = [r["start"] for r in restarts["restarts"]]
    assert starts == ["fresh"] * 2 + ["warm"] * 2
    for k, start in enumerate(starts):
        kept = load_bag_classifier(out / "round_1" / "bag_phase" / f"restart_{k}" / "bag_classifier.pt").state_dict()
        assert kept.keys() == student.keys()
        assert all(torch.equal(kept[n], student[n]) for n in kept) == (start == "warm"), k
    kept = load_bag_classifier(out / "round_1" / "bag_phase" / "bag_classifier.pt").state_dict()
    assert all(torch.equal(kept[n], student[n]) for n in kept) == (starts[restarts["chosen"]] == "warm")
    state = json.loads((out / "state.json").read_text())["rounds"]
    warm = "both"
    assert state["1"]["bag_phase"]["warm_start"] == warm and "warm_start" not in state["0"]["bag_phase"]
    assert state["1"]["bag_phase"]["kept_start"] == starts[restarts["chosen"]]
    assert state["1"]["bag_phase"]["restarts_val"] == [r["best_metric"] for r in restarts["restarts"]]
    assert state["1"]["bag_phase"]["val"]["auc"] == max(state["1"]["bag_phase"]["restarts_val"])  # best of all kept
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [row.get("bag_phase_start") for row in rows] == [None, starts[restarts["chosen"]]]
    said = {"warm": "the student's classifier", "fresh": "a fresh initialisation"}[starts[restarts["chosen"]]]
    assert (
        f"Start of the kept bag classifier (`bag_phase#warm_start`): round 1, {said}."
        in (out / "summary.md").read_text()
    )
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("icmil").experiment_id])
    params = {r.info.run_name: r.data.params for r in runs}
    assert params["round_1/bag_phase"]["warm_start"] == warm and "warm_start" not in params["round_0/bag_phase"]
    assert params["round_1/bag_phase"]["kept_start"] == starts[restarts["chosen"]]

    def workflow(output_dir):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json"), str(tmp_path / "tiny.json")])
        parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(tmp_path / "data")})
        parser.update({"output_dir": str(output_dir), "mlflow#enabled": False, "bag_phase#warm_start": mode})
        return parser.get_parsed_content("workflow")

    in_dim = int(student["input_mean"].numel())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the student was copied from round 0's classifier on disk: no warning
        again = workflow(out).student_classifier_state(1, in_dim)
    assert again.keys() == student.keys() and all(torch.equal(again[k], student[k]) for k in student)
    other = load_bag_classifier(out / "round_0" / "bag_phase" / "bag_classifier.pt")
    with torch.no_grad():
        other.gated.w.weight.add_(1.0)  # AB-MIL's attention
    save_bag_classifier(out / "round_0" / "bag_phase" / "bag_classifier.pt", other)  # round 0 trained again
    with pytest.warns(UserWarning, match=r"student_head\.pt' was not copied from .*round_0.*gated\.w\.weight"):
        workflow(out).student_classifier_state(1, in_dim)
    with pytest.raises(FileNotFoundError, match=r"round 1's embedder phase left no student.*student_head\.pt.*false"):
        workflow(tmp_path / "o").student_classifier_state(1, in_dim)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data) -> Path:
    """train.json + demo.json + a test-sized override, one coupled round, end to end (on a copy of ``tiny_data``: the
    bundle's generation of the demo data is tests/test_demo.py's; a second coupled round, which starts from round 1's
    embedder and features, is test_rerun_after_round_one_bag_phase_does_not_redo_finished_phases's)."""
    tmp = tmp_path_factory.mktemp("bundle")
    extra = {"mlflow#enabled": True, "mlflow#registered_model_name": "icmil"}
    proc = _bundle(tmp, "run", extra=extra, num_rounds=1, data=tiny_data)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (tmp / "left_in_cwd.json").write_text(json.dumps(sorted(p.name for p in tmp.iterdir())))
    (tmp / "stdout.txt").write_text(proc.stdout)
    (tmp / "stderr.txt").write_text(proc.stderr)
    return tmp


def test_train_bundle_runs_a_coupled_round_end_to_end(trained):
    out = trained / "out"
    # run from its own folder, the run wrote nothing there but output_dir (the data were copied in; no cufile.log)
    assert json.loads((trained / "left_in_cwd.json").read_text()) == ["data", "out", "tiny.json"]
    for r in (0, 1):
        assert (out / f"round_{r}" / "bag_phase" / "bag_classifier.pt").is_file()
        assert (out / f"round_{r}" / "bag_phase" / "predictions_val.csv").is_file()
        assert (out / f"round_{r}" / "test" / "predictions.csv").is_file()
        assert (out / f"round_{r}" / "test" / "roc.png").is_file()
        assert len(list((out / f"round_{r}" / "features").glob("*.safetensors"))) == 14
    for r in (1,):
        assert (out / f"round_{r}" / "embedder_phase" / "embedder.safetensors").is_file()
    qc = sorted(p.stem for p in (out / "coords" / "qc").glob("*.jpg"))  # one tiling QC image per slide
    assert qc == sorted(p.stem for p in (out / "coords").glob("*.safetensors")) and len(qc) >= 14
    tiling_rows = (out / "coords" / "qc" / "tiling.csv").read_text().strip().splitlines()
    assert len(tiling_rows) == 1 + len(qc) and tiling_rows[0].startswith("slide,image,status,patches")
    overview = Image.open(out / "coords" / "qc" / "overview" / "page_001.jpg")  # every slide on one contact sheet
    assert overview.size == (8 * 200, 18 + -(-len(qc) // 8) * 228)
    summary = (out / "summary.md").read_text()
    assert (
        "| round | val AUC (95 % CI) | test AUC (95 % CI) | change in test AUC (paired 95 % CI) | teacher patch AUC |"
        in summary
    )
    assert summary.count("\n| ") == 4  # header, separator, 2 rounds
    assert len(re.findall(r"\| \d\.\d{3} \((\d\.\d{2}-\d\.\d{2}|no CI)\)(?= \|)", summary)) == 4  # val, test AUC (CI)
    assert "95 % DeLong confidence intervals; the test split has 4 slides" in summary
    assert "](rounds.png)" in summary and Image.open(out / "rounds.png").size[0] > 300  # the rounds in one picture
    strict = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    final = strict["final_round"]
    for target in re.findall(r"\]\(([^)]+)\)", summary):  # its pictures: the final round's ROC, the QC sheet
        assert (out / target).is_file(), target
    assert f"](round_{final}/test/roc.png)" in summary and "[page_001](coords/qc/overview/page_001.jpg)" in summary
    assert "| round | val AUC" in (trained / "stdout.txt").read_text()  # printed too
    # the demo starts from a random-init embedder without pre-training: the summary says so, and the log warns once
    assert summary.startswith("# ICMIL summary (abmil, resnet18_trunc, random init)\n")
    log = (trained / "stdout.txt").read_text() + (trained / "stderr.txt").read_text()
    assert log.count("round 0 starts from a random-init resnet18_trunc with no pre-training") == 1
    assert log.count("consider `--stain_normalize true`, so that the features do not follow") == 1  # the cheap lever
    state = json.loads((out / "state.json").read_text())
    assert set(state["rounds"]) == {"0", "1"}
    # round r+1's features come from a different embedder than round r's
    fps = {state["rounds"][str(r)]["embed"]["fingerprint"] for r in (0, 1)}
    assert len(fps) == 2
    # train.json's bag phase: 3 restarts on standardised features, the best by validation AUC is the round's
    for r in ("0", "1"):
        bag = state["rounds"][r]["bag_phase"]
        restarts = json.loads((out / f"round_{r}" / "bag_phase" / "restarts.json").read_text())
        assert len(bag["restarts_val"]) == 3 and restarts["chosen"] == bag["restart"]
        assert bag["val"]["auc"] == pytest.approx(max(bag["restarts_val"]))
    net = load_bag_classifier(out / "round_0" / "bag_phase" / "bag_classifier.pt")
    assert not torch.equal(net.input_std, torch.ones_like(net.input_std))


def test_the_teacher_patch_auc_in_the_summary_is_the_teachers_auc_against_the_masks(trained):
    """Every round's instance teacher against the generated ground truth: the summary's value equals a computation
    by hand from the stored features, the bag classifier and the tumour masks (pixels counted under each patch)."""
    from sklearn.metrics import roc_auc_score

    from monai_icmil.data.store import CoordsStore, FeatureStore
    from monai_icmil.workflows.summary import paired_test_change

    out, data = trained / "out", json.loads((trained / "data" / "datalist.json").read_text())
    rows = json.loads((out / "summary.json").read_text())["rows"]
    for row in rows:
        r = row["round"]
        net = load_bag_classifier(out / f"round_{r}" / "bag_phase" / "bag_classifier.pt").eval()
        scores, labels = [], []
        for entry in data["test"]:  # one slide at a time
            sid = Path(entry["image"]).stem
            arrays = FeatureStore(out / f"round_{r}" / "features").load(sid)
            mask = np.asarray(Image.open(trained / "data" / entry["tumour_mask"]).convert("L")) > 127
            ds, foot = 1024 / mask.shape[1], CoordsStore(out / "coords").metadata(sid)["footprint"]
            with torch.no_grad():
                probs = torch.softmax(net.instance_logits(arrays["features"].float()), -1)[:, 1].numpy()
            for (x, y), p in zip(arrays["coords"].numpy(), probs):
                fraction = mask[
                    int(y // ds) : int(math.ceil((y + foot) / ds)), int(x // ds) : int(math.ceil((x + foot) / ds))
                ]
                if fraction.mean() >= 0.5 or not fraction.any():
                    scores.append(p)
                    labels.append(fraction.mean() >= 0.5)
        assert 0 < sum(labels) < len(labels)
        assert row["teacher_patch_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9), r
        assert row["teacher_patches"] == len(labels)
        normal_scores = np.array([p for p, tumour in zip(scores, labels) if not tumour])
        assert row["teacher_normal_called_tumour"] == pytest.approx(float((normal_scores > 0.5).mean()), abs=1e-12)
    for r in (1,):
        assert rows[r]["teacher_patch_auc_delta"] == pytest.approx(
            rows[r]["teacher_patch_auc"] - rows[r - 1]["teacher_patch_auc"]
        )
    # the change in test AUC from the previous round, with its paired interval from both rounds' predictions
    for r in (1,):
        paired = paired_test_change(out, r - 1, r)
        assert rows[r]["test_auc_delta"] == pytest.approx(rows[r]["test_auc"] - rows[r - 1]["test_auc"])
        assert rows[r]["test_auc_delta_ci"] == [paired["low"], paired["high"]] and paired["slides"] == 4
        assert paired["diff"] == pytest.approx(rows[r]["test_auc_delta"], abs=1e-3)  # the CSVs' 6 decimals
        assert paired["low"] <= paired["diff"] <= paired["high"]
    assert rows[0]["test_auc_delta_ci"] == [None, None]
    summary = (out / "summary.md").read_text()
    assert f"| {rows[0]['teacher_patch_auc']:.3f} |" in summary and "Teacher patch AUC: each round's" in summary
    assert f"| {100 * rows[0]['teacher_normal_called_tumour']:.1f} % |" in summary and "Tumour-free called" in summary


def test_the_run_shows_the_highest_scoring_test_slide_beside_its_ground_truth(trained):
    """demo.json's test inference: the final round scores the test split, and summary.md shows the top slide's
    predicted patch probabilities beside its tumour mask."""
    out = trained / "out"
    rows = list(csv.DictReader(open(out / "test_inference" / "probabilities.csv")))
    probs = {r["slide"]: float(r["prob_tumour"]) for r in rows}
    top = max(rows, key=lambda r: positive_rank([float(r["prob_normal"]), float(r["prob_tumour"])]))["slide"]
    showcase = json.loads((out / "summary.json").read_text())["showcase"]
    assert showcase["slide"] == top and showcase["probability"] == pytest.approx(probs[top])
    assert f"]({showcase['picture']})" in (out / "summary.md").read_text()
    picture = Image.open(out / f"test_inference/{top}_vs_truth.jpg")
    thumb = 1024  # the slide's thumbnail (at most 1024 px): prediction, its colour bar, an 8 px gap, the ground truth
    assert picture.size == (2 * thumb + VS_TRUTH_BAR + 8, 768 + 18)  # under an 18 px caption band
    right = np.asarray(picture.convert("RGB"))[18:, thumb + VS_TRUTH_BAR + 8 :].astype(float)
    bar = np.asarray(picture.convert("RGB"))[18:, thumb + 8 : thumb + 22].astype(int)  # jet: dark red at 1, blue at 0
    assert bar[5, :, 0].mean() > 80 > bar[5, :, 2].mean() and bar[-5, :, 2].mean() > 80 > bar[-5, :, 0].mean()
    # the right panel is the slide's thumbnail, tinted red (0.55 thumbnail + 0.45 red) inside the tumour mask and
    # unchanged outside it (4 px from the outline, for the outline and JPEG), whatever the slide's stain
    slide = next((trained / "data" / "slides").glob(f"{top}.*"))
    plain = open_slide(str(slide)).thumbnail(thumb)[0][..., :3].astype(float)
    assert plain.shape == right.shape
    mask = np.asarray(Image.open(trained / "data" / "masks" / f"{top}_tumour.png").convert("L").resize((1024, 768)))
    inside, outside = binary_erosion(mask > 127, iterations=4), binary_erosion(mask <= 127, iterations=4)
    assert outside.any() and np.abs(right - plain)[outside].mean() < 3
    if inside.any():
        tinted = 0.55 * plain + 0.45 * np.array([230.0, 30.0, 30.0])
        assert np.abs(right - tinted)[inside].mean() < 3 < 20 < np.abs(right - plain)[inside].mean()


def test_mlflow_holds_the_parent_and_nested_runs_with_metrics(trained):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained / 'out' / 'mlruns.db'}")
    exp = client.get_experiment_by_name("icmil")
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["icmil"]
    assert parent.data.params["aggregator"] == "abmil" and "final_round" in parent.data.metrics
    final = int(parent.data.metrics["final_round"])  # the pictures summary.md links, at the same paths
    assert [a.path for a in client.list_artifacts(parent.info.run_id, f"round_{final}/test")] == [
        f"round_{final}/test/roc.png"
    ]
    assert ("coupling_test_auc_delta" in parent.data.metrics) == (final > 0)  # only when a coupled round is final
    assert "final_test_auc_delta" not in parent.data.metrics
    assert ("final_test_auc_vs_prev" in parent.data.metrics) == (final > 0)  # round 0 has no previous round
    qc = "coords/qc"  # where summary.md links the QC sheets: the logged summary's links resolve in MLflow
    assert {a.path for a in client.list_artifacts(parent.info.run_id, qc)} == {f"{qc}/tiling.csv", f"{qc}/overview"}
    assert [a.path for a in client.list_artifacts(parent.info.run_id, f"{qc}/overview")] == [
        f"{qc}/overview/page_001.jpg"
    ]
    for r in (0, 1):
        rr = by_name[f"round_{r}"]
        assert rr.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "test_auc" in rr.data.metrics and "val_auc_after" in rr.data.metrics
        assert "teacher_patch_auc" in rr.data.metrics
        bag = by_name[f"round_{r}/bag_phase"]
        assert bag.data.tags["mlflow.parentRunId"] == rr.info.run_id
        assert len(client.get_metric_history(bag.info.run_id, "val_auc")) >= 1
        assert by_name[f"round_{r}/embed"].data.metrics["patches"] > 0
        assert by_name[f"round_{r}/embed"].data.metrics["steady_patches_per_s"] > 0
    assert "val_auc_before" in by_name["round_1"].data.metrics
    couple = by_name["round_1/embedder_phase"]
    assert "val_mae" in couple.data.metrics and "loss_loss" in couple.data.metrics
    assert {a.path for a in client.list_artifacts(couple.info.run_id, "embedder_phase")} >= {
        "embedder_phase/embedder.safetensors"
    }


def test_rerun_after_round_one_bag_phase_does_not_redo_finished_phases(tmp_path, tiny_data):
    """A single-phase command then ``run``: finished phases are kept, a round's missing test record is made again;
    a test slide without a label (inference only) is left out of the test metrics, by name."""
    shutil.copytree(tiny_data, tmp_path / "data")
    datalist_path = next((tmp_path / "data").rglob("datalist.json"))
    datalist = json.loads(datalist_path.read_text())
    labels = [e["label"] for e in datalist["test"]]
    i = next(k for k, label in enumerate(labels) if labels.count(label) > 1)  # both classes stay scored
    unlabelled = datalist["test"][i].get("slide_id", Path(datalist["test"][i]["image"]).stem)
    del datalist["test"][i]["label"]
    datalist_path.write_text(json.dumps(datalist))
    # the workflow finds the class-0 slides (else it fails), and hands the phase round r-1's stored features
    targets = {"embedder_phase#normal_slide_targets": True, "embedder_phase#teacher_features": True}
    # stops after round 1's bags
    first = _bundle(tmp_path, "bag_phase#run", extra=targets, num_rounds=2, round=1)
    assert first.returncode == 0, first.stderr[-4000:]
    assert f"round 1, test: 1 slide(s) without a label ({unlabelled}) are not scored" in first.stderr
    out = tmp_path / "out"
    state = json.loads((out / "state.json").read_text())
    assert set(state["rounds"]) == {"0", "1"} and "bag_phase" in state["rounds"]["1"]
    # as if the run had stopped between round 1's bag-phase record and its test record
    stopped = json.loads((out / "state.json").read_text())
    del stopped["rounds"]["1"]["test"]
    (out / "state.json").write_text(json.dumps(stopped))
    before = {p: p.stat().st_mtime_ns for p in out.glob("round_*/**/*") if p.is_file()}
    second = _bundle(tmp_path, "run", extra=targets, num_rounds=2)
    assert second.returncode == 0, second.stderr[-4000:]
    after = json.loads((out / "state.json").read_text())
    for r in ("0", "1", "2"):
        test = after["rounds"][r]["test"]
        assert test["unlabelled"] == [unlabelled] and test["slides"] == len(datalist["test"]) - 1, (r, test)
        with open(out / f"round_{r}" / "test" / "predictions.csv") as f:
            assert unlabelled not in {row["slide"] for row in csv.DictReader(f)}
    datalist = json.loads(next((tmp_path / "data").rglob("datalist.json")).read_text())
    normal = sum(e["label"] == 0 for e in datalist["training"])
    assert 0 < normal < len(datalist["training"])
    assert [after["rounds"][r]["embedder_phase"]["normal_slides"] for r in ("1", "2")] == [normal, normal]
    trained_on = len(datalist["training"])  # every training slide's teacher features read from the previous round
    assert [after["rounds"][r]["embedder_phase"]["teacher_features"] for r in ("1", "2")] == [trained_on] * 2
    assert after["rounds"]["0"] == state["rounds"]["0"] and after["rounds"]["1"] == state["rounds"]["1"]
    assert "bag_phase" in after["rounds"]["2"]
    # round 2 embeds with its own embedder phase's output, round 1's embedder taught by round 1's classifier
    assert (out / "round_2" / "embedder_phase" / "embedder.safetensors").is_file()
    fps = [after["rounds"][r]["embed"]["fingerprint"] for r in ("0", "1", "2")]
    assert len(set(fps)) == 3 and fps[2] == after["rounds"]["2"]["embedder_phase"]["fingerprint"]
    # the summary's changes are from the previous round, round 1 (the teacher patch AUC, over a few hundred patches,
    # tells round 0 from round 1; the paired test interval needs two scored test slides of each class, not here)
    rows = json.loads((out / "summary.json").read_text())["rows"]
    teacher = [row["teacher_patch_auc"] for row in rows]
    assert teacher[0] != pytest.approx(teacher[1])  # else the check cannot fail
    assert rows[2]["teacher_patch_auc_delta"] == pytest.approx(teacher[2] - teacher[1])
    assert rows[2]["test_auc_delta"] == pytest.approx(rows[2]["test_auc"] - rows[1]["test_auc"])
    assert rows[2]["val_auc_delta"] == pytest.approx(rows[2]["val_auc"] - rows[1]["val_auc"])
    rewritten = sorted(str(p.relative_to(out)) for p, t in before.items() if p.stat().st_mtime_ns != t)
    # of rounds 0-1 only round 1's test files were written again (the same record)
    assert rewritten == sorted(str(p.relative_to(out)) for p in before if p.parent == out / "round_1" / "test")
    assert {"round_1/test/metrics.json", "round_1/test/predictions.csv"} <= set(rewritten)


def test_inference_writes_heatmaps_on_the_patch_grid_and_geojson(trained, tmp_path):
    data = json.loads((trained / "data" / "datalist.json").read_text())
    slide = trained / "data" / data["test"][0]["image"]
    proc = _bundle(
        trained,
        "run",
        str(CONFIGS / "inference.json"),
        input_slides=str(slide.parent),
        inference_dir=str(trained / "inference"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    inf = trained / "inference"
    rows = (inf / "probabilities.csv").read_text().strip().splitlines()
    n_slides = len(list(slide.parent.glob("*.tiff")))
    assert rows[0].startswith("slide,label,prob_normal,prob_tumour") and len(rows) == 1 + n_slides
    sid = slide.stem
    from monai_icmil.data.store import CoordsStore

    coords = CoordsStore(inf / "coords").load(sid)["coords"].numpy()
    geo = json.loads((inf / f"{sid}.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(coords)
    first = geo["features"][0]
    assert first["geometry"]["type"] == "Polygon" and {"attention", "instance_probability"} <= set(
        first["properties"]["measurements"]
    )
    x, y = coords[0]
    assert first["geometry"]["coordinates"][0][0] == [float(x), float(y)]
    # the heatmap grid cells are exactly the patch grid: one cell per patch, at its coordinate
    from monai_icmil.visualize import save_heatmaps, score_grid

    footprint = 64.0  # 32 px at 1 um/px on a 0.5 um/px slide, read at level 1 (footprint in level-0 px)
    grid = score_grid(coords, np.arange(len(coords), dtype=float), footprint, (1024, 768))
    assert np.isfinite(grid).sum() == len(coords)
    assert grid[int(y // footprint), int(x // footprint)] == 0
    from monai_icmil.data import open_slide
    from monai_icmil.visualize import score_overlay

    # the slide's heatmap is drawn from its patches' scores (as the GeoJSON holds them) on that grid: redrawn from
    # them it matches; redrawn from the same scores on shuffled patches it does not
    probs = {r["slide"]: float(r["prob_tumour"]) for r in csv.DictReader(open(inf / "probabilities.csv"))}
    meas = {
        k: np.array([f["properties"]["measurements"][k] for f in geo["features"]])
        for k in first["properties"]["measurements"]
    }
    thumb, ds = open_slide(slide).thumbnail(1024)
    title = f"{sid}: predicted {'tumour' if probs[sid] > 0.5 else 'normal'} (p={max(probs[sid], 1 - probs[sid]):.3f})"
    written = np.asarray(Image.open(inf / f"{sid}_heatmap.jpg").convert("RGB")).astype(int)

    def redrawn(order):
        att = meas["attention"][order]
        maps = {
            "attention (min-max)": score_grid(
                coords, (att - att.min()) / max(att.max() - att.min(), 1e-12), footprint, (1024, 768)
            ),
            "instance probability": score_grid(coords, meas["instance_probability"][order], footprint, (1024, 768)),
        }
        save_heatmaps(tmp_path / "redrawn.jpg", thumb, ds, maps, footprint, title)
        again = np.asarray(Image.open(tmp_path / "redrawn.jpg").convert("RGB")).astype(int)
        assert again.shape == written.shape
        return np.abs(again - written).mean()

    same, shuffled = redrawn(np.arange(len(coords))), redrawn(np.random.default_rng(0).permutation(len(coords)))
    assert same < 1.5 and shuffled > 3 * same + 0.5, (same, shuffled)
    # the triage sheet: every slide's instance-probability overlay, the highest tumour probability first
    page = np.asarray(Image.open(inf / "overview" / "page_001.jpg").convert("RGB")).astype(int)
    assert page.shape[:2] == (18 + -(-n_slides // 8) * 228, max(min(8, n_slides) * 200, 640))
    reds = [page[18 + (i // 8) * 228 + 4 + 192 :][:34, (i % 8) * 200 + 4 :][:, :192] for i in range(n_slides)]
    reds = [bool(((c[..., 0] - c[..., 1] > 60) & (c[..., 0] - c[..., 2] > 60)).any()) for c in reds]
    assert reds == sorted(reds, reverse=True) and sum(reds) == sum(p > 0.5 for p in probs.values())  # predicted: red

    def overlay(sid):  # as drawn from the GeoJSON's scores, shrunk as on the sheet (1024 x 768 -> 192 x 144)
        feats = json.loads((inf / f"{sid}.geojson").read_text())["features"]
        xy = np.array([f["geometry"]["coordinates"][0][0] for f in feats])
        prob = np.array([f["properties"]["measurements"]["instance_probability"] for f in feats])
        thumb, ds = open_slide(slide.parent / f"{sid}.tiff").thumbnail(1024)
        drawn = score_overlay(thumb, ds, score_grid(xy, prob, footprint, (1024, 768)), footprint)
        return np.asarray(Image.fromarray(drawn).resize((192, 144), Image.BILINEAR)).astype(int)

    first_cell = page[18 + 4 + 24 :][:144, 4:196]  # centred in its 192 px cell
    ranked = sorted(probs, key=probs.get, reverse=True)
    error = {sid: np.abs(first_cell - overlay(sid)).mean() for sid in (ranked[0], ranked[-1])}
    assert error[ranked[0]] < 15 and error[ranked[-1]] > 2 * error[ranked[0]], error  # two JPEGs, two resizes


def test_boolean_overrides_are_read_as_booleans_in_any_case(trained, tmp_path):
    """``--heatmaps FALSE --progress 0`` as the command line gives them (strings): probabilities only, no bars;
    ``--heatmaps maybe`` is refused by check_config, naming the id (the bundle's first step, before any work:
    test_override_of_a_non_existent_id_is_refused)."""
    data = json.loads((trained / "data" / "datalist.json").read_text())
    slides = str((trained / "data" / data["test"][0]["image"]).parent)
    out = tmp_path / "inference"
    proc = _bundle(
        trained, "run", str(CONFIGS / "inference.json"), input_slides=slides, inference_dir=str(out),
        heatmaps="FALSE", progress="0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        (out / "probabilities.csv").is_file()
        and not list(out.glob("*_heatmap.jpg"))
        and not list(out.glob("*.geojson"))
    )
    assert "predict" not in proc.stderr and "embed slides" not in proc.stderr  # no progress bars
    # the same command with heatmaps on draws them from the stored coordinates and features: no re-tiling, no
    # re-embedding (every stored file is left as it was)
    stored = {p: p.stat().st_mtime_ns for p in [*out.glob("coords/*.safetensors"), *out.glob("features/*.safetensors")]}
    assert stored
    again = _bundle(
        trained, "run", str(CONFIGS / "inference.json"), input_slides=slides, inference_dir=str(out), heatmaps="true"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(list(out.glob("*_heatmap.jpg"))) == len(list(out.glob("features/*.safetensors")))
    assert all(p.stat().st_mtime_ns == t for p, t in stored.items())
    files = json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / "inference.json")])
    # refused by the bundle's first step (check_config, as test_override_of_a_non_existent_id_is_refused runs it)
    with pytest.raises(ValueError, match=r"'heatmaps' must be a boolean \(true or false, in any case"):
        check_config(["run", "--config_file", files, "--heatmaps", "maybe"])
    for value in ("false", "FALSE", "False", "0", "no", "TRUE", "1"):
        assert check_config(["run", "--config_file", files, "--heatmaps", value]) == ["heatmaps"]
    with pytest.raises(ValueError, match="'num_rounds' must be a number"):
        check_config(["run", "--config_file", files, "--num_rounds", "two"])
    for value in ("both", "Both", "true", "0"):  # a boolean that also takes a word
        assert check_config(["run", "--config_file", files, "--bag_phase#warm_start", value]) == [
            "bag_phase#warm_start"
        ]
    with pytest.raises(ValueError, match="'bag_phase#warm_start' must be true, false or 'both', got 'sometimes'"):
        check_config(["run", "--config_file", files, "--bag_phase#warm_start", "sometimes"])


def test_inference_on_a_real_aperio_slide(trained, cmu_slide):
    """New slides in the wild are Aperio SVS (JPEG tiles with shared tables, one level here, 0.5 um/px): the
    bundle trained on generated TIFFs tiles it at its 1 um/px (64 px read, resized to 32), scores it and draws it."""
    folder = trained / "aperio_in"
    folder.mkdir()
    (folder / "CMU-1-Small-Region.svs").symlink_to(cmu_slide)
    out = trained / "aperio_out"
    proc = _bundle(
        trained, "run", str(CONFIGS / "inference.json"), input_slides=str(folder), inference_dir=str(out), progress=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for bar in ("prepare (tissue + grid)", "embed slides", "predict (scores + pictures)"):  # every long step shows
        assert re.search(re.escape(bar) + r": 100%.* 1/1 ", proc.stderr), bar
    header, row = (out / "probabilities.csv").read_text().strip().splitlines()
    cells = dict(zip(header.split(","), row.split(",")))
    assert cells["slide"] == "CMU-1-Small-Region" and cells["label"] == ""  # a new slide: no label
    p_normal, p_tumour = float(cells["prob_normal"]), float(cells["prob_tumour"])
    assert p_normal + p_tumour == pytest.approx(1.0, abs=1e-3)
    assert cells["pred_class"] == ("tumour" if p_tumour > p_normal else "normal")
    from monai_icmil.data.store import CoordsStore

    coords = CoordsStore(out / "coords").load("CMU-1-Small-Region")["coords"].numpy()
    assert 50 < len(coords) < 2220 * 2967 / 64**2  # tissue only, on the 64 px level-0 grid
    assert not np.any(coords % 64)
    geo = json.loads((out / "CMU-1-Small-Region.geojson").read_text())
    assert len(geo["features"]) == len(coords)
    assert Image.open(out / "CMU-1-Small-Region_heatmap.jpg").size[0] > 100
    assert (out / "coords" / "qc" / "CMU-1-Small-Region.jpg").is_file()  # the tiling QC of new slides too
    assert Image.open(out / "overview" / "page_001.jpg").size == (640, 18 + 228)  # one slide on the triage sheet
    # the top patches: row 1 by tumour probability, row 2 by attention, as the model saw them (32 px)
    montage = np.asarray(Image.open(out / "CMU-1-Small-Region_top_patches.jpg").convert("RGB")).astype(float)
    assert montage.shape == (18 + 2 * 34, 8 * 34, 3)
    measured = {k: np.array([f["properties"]["measurements"][k] for f in geo["features"]]) for k in ("attention",)}
    measured["instance_probability"] = np.array(
        [f["properties"]["measurements"]["instance_probability"] for f in geo["features"]]
    )
    from monai_icmil.data import open_slide

    reader = open_slide(cmu_slide)
    for row, key in enumerate(("instance_probability", "attention")):
        best = int(np.argmax(measured[key]))
        direct = reader.read_patches(coords[best : best + 1], 64, 0, out_size=32)[0].astype(float)
        first = montage[18 + row * 34 : 18 + row * 34 + 32, :32]
        assert np.abs(first - direct).mean() < 20, key  # JPEG: ~7; any other patch of the slide: > 50
    tiling_row = (out / "coords" / "qc" / "tiling.csv").read_text().splitlines()[1].split(",")
    assert tiling_row[0] == "CMU-1-Small-Region" and tiling_row[2] == "ok" and int(tiling_row[3]) == len(coords)


def test_evaluate_config_writes_test_metrics(trained):
    """evaluate.json scores the final round's test split again (the training run's files are removed first, so the
    checks read what evaluate wrote) and prints the record it wrote; the same models on the same slides give the
    training run's test AUC. A round that has not finished is refused, naming the finished ones."""
    out = trained / "out"
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final_round"]
    trained_auc = next(row["test_auc"] for row in summary["rows"] if row["round"] == final)
    test_dir = out / f"round_{final}" / "test"
    for name in ("metrics.json", "predictions.csv"):
        (test_dir / name).unlink()
    proc = _bundle(trained, "run", str(CONFIGS / "evaluate.json"), extra={"mlflow#enabled": True})  # into its runs
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((test_dir / "metrics.json").read_text())
    assert {"auc", "acc", "f1", "youden_acc", "youden_f1"} <= set(metrics)
    assert metrics["auc_ci_low"] <= metrics["auc"] <= metrics["auc_ci_high"]
    assert metrics["auc"] == pytest.approx(trained_auc)
    assert len((test_dir / "predictions.csv").read_text().splitlines()) > 1
    # accuracy at the validation split's threshold, by hand
    val = list(csv.DictReader(open(out / f"round_{final}" / "bag_phase" / "predictions_val.csv")))
    threshold = youden_threshold(
        np.array([float(v["prob_tumour"]) for v in val]), np.array([int(v["label"]) for v in val])
    )
    rows = list(csv.DictReader(open(test_dir / "predictions.csv")))
    hits = [(float(t["prob_tumour"]) >= threshold) == bool(int(t["label"])) for t in rows]
    assert metrics["val_threshold"] == pytest.approx(threshold) and metrics["val_threshold_acc"] == np.mean(hits)
    printed, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index('{\n  "round"') :])
    assert (printed["round"], printed["split"], printed["metrics"]) == (final, "test", pytest.approx(metrics))
    unfinished = _bundle(trained, "run", str(CONFIGS / "evaluate.json"), eval_round=7)
    assert unfinished.returncode != 0
    assert re.search(r"eval_round '?7'? is not a finished round .*\(finished rounds: 0, 1\)", unfinished.stderr)


def test_verify_metadata_and_ckpt_export_of_the_final_bag_classifier(trained, tmp_path):
    from monai.bundle import verify_metadata

    # metadata.json against its schema (the schema file ships with the bundle: nothing to download); raises if not
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(CONFIGS / "schema.json"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    final = json.loads((trained / "out" / "summary.json").read_text())["final_round"]
    ckpt = trained / "out" / f"round_{final}" / "bag_phase" / "bag_classifier.pt"
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(TINY))
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "demo.json"), str(tiny)]
    ts = tmp_path / "bag_classifier.ts"
    export = forked_python.run(
        [
            "-m",
            "monai.bundle",
            "ckpt_export",
            "network_def",
            "--filepath",
            str(ts),
            "--ckpt_file",
            str(ckpt),
            "--key_in_ckpt",
            "state_dict",
            "--config_file",
            json.dumps(files),
            "--meta_file",
            str(CONFIGS / "metadata.json"),
            "--bundle_root",
            str(BUNDLE),
            "--dataset_dir",
            str(trained / "data"),
            "--output_dir",
            str(trained / "out"),
            "--use_trace",
            "True",
            "--input_shape",
            "[20, 256]",
            "--converter_kwargs",
            "{'strict': False}",
        ],
        env=env,
        timeout=600,
    )
    assert export.returncode == 0, export.stderr[-4000:]
    import torch

    from monai_icmil.engines.bag_phase import load_bag_classifier

    scripted = torch.jit.load(str(ts))
    feats = torch.randn(20, 256)
    net = load_bag_classifier(ckpt).eval()
    with torch.no_grad():
        torch.testing.assert_close(scripted(feats)["logits"], net(feats)["logits"])


# ------------------------------------------------------------------------------------------------- bad input


def test_unknown_aggregator_is_refused_before_any_work(tmp_path):
    """Building the workflow (the bundle's first step after check_config) refuses it: nothing generated or embedded."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")])
    parser.update(
        {"bundle_root": str(BUNDLE), "dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "o")}
    )
    parser.update({"aggregator": "clam"})
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("workflow")
    chain, e = [], raised.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("unknown aggregator 'clam'" in m for m in chain), chain
    assert not (tmp_path / "data").exists() and not (tmp_path / "o").exists()


def test_override_of_a_non_existent_id_is_refused(tmp_path):
    """``python -m monai.bundle run`` checks its command line first (train.json's ``initialize``: check_config), so
    the tests of other refusals call check_config directly."""
    proc = _bundle(tmp_path, "run", num_round=3)
    assert proc.returncode != 0 and "unknown id(s): --num_round" in proc.stderr
    # MONAI's "Failed to evaluate ConfigExpression" wrapper is not what a user reads last: the error is repeated
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("monai-icmil stopped: ValueError: ") and "unknown id(s): --num_round" in last, last
    assert not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match="unknown id"):
        check_config(["run", "--config_file", str(CONFIGS / "train.json"), "--agregator", "abmil"])
    assert check_config(["run", "--config_file", str(CONFIGS / "train.json"), "--tiling#mpp", "1.0"]) == ["tiling#mpp"]
    # the datalist refusal's fix (test_datalist) is a setting of the bundle, read as a boolean
    outside = ["run", "--config_file", str(CONFIGS / "train.json"), "--allow_outside_root"]
    assert check_config([*outside, "TRUE"]) == ["allow_outside_root"]
    with pytest.raises(ValueError, match="allow_outside_root"):
        check_config([*outside, "maybe"])


def test_a_failed_bundle_command_ends_with_the_error_its_config_runner_wrapped(monkeypatch, capsys):
    """MONAI wraps a constructor's error ("Failed to instantiate component") and an expression's ("Failed to evaluate
    ConfigExpression", around the first when the workflow is built in one); the hook prints the traceback as before,
    then the error itself as the last line; other errors are left as they are, and it is installed once."""
    from monai_icmil.workflows.cli import repeat_the_error_last

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append(value))
    repeat_the_error_last()
    repeat_the_error_last()
    for wrappers in (["Failed to instantiate component 'workflow' with keywords: x"], ["Failed to evaluate "
                     "ConfigExpression: $@workflow.run()", "Failed to instantiate component 'workflow'"]):  # fmt: skip
        error: BaseException = ValueError("dataset_dir '/x' does not exist")
        for text in reversed(wrappers):
            try:
                raise RuntimeError(text) from error
            except RuntimeError as wrapped:
                error = wrapped
        sys.excepthook(type(error), error, error.__traceback__)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last == "monai-icmil stopped: ValueError: dataset_dir '/x' does not exist"
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert capsys.readouterr().err == "" and len(seen) == 3


def test_settings_that_no_component_uses_are_refused(tmp_path):
    """A setting in a config file that no component references (a typo, or an id of monai-icmil 0.1) would change
    nothing: it is refused by name before any work; the shipped configs pass."""
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"bag_phase#class_weights": "balanced", "aggregator_kwargs": {"hidden_dim": 8}}))
    with pytest.raises(ValueError, match=r"0\.1: 'aggregator_kwargs'.*no component uses: bag_phase#class_weights"):
        check_config(["run", "--config_file", json.dumps([str(CONFIGS / "train.json"), str(old)])])
    for extra in (
        "demo.json",
        "camelyon16.json",
        "pretrain.json",
        "inference.json",
        "evaluate.json",
        "coupling_recipe.json",
    ):
        files = json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / extra)])
        assert check_config(["run", "--config_file", files, "--bag_phase#epochs", "3"]) == ["bag_phase#epochs"]
    # a value for a component that a later file replaced: warned about, by name
    swapped = tmp_path / "swapped.json"
    sgd = {"_target_": "torch.optim.SGD", "_mode_": "callable", "lr": 0.1}
    swapped.write_text(json.dumps({"bag_phase#lr": 0.01, "bag_phase#optimizer": sgd}))
    with pytest.warns(UserWarning, match="bag_phase#lr are set by a config file but used by no component"):
        check_config(["run", "--config_file", json.dumps([str(CONFIGS / "train.json"), str(swapped)])])


def test_missing_dataset_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset_dir '.*nowhere' does not exist"):
        ICMILWorkflow(dataset_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "out"))


def test_a_misspelt_setting_is_refused_by_name(tmp_path):
    """A setting outside a phase's list is an error, not ignored: on the command line (before any work), and in Python
    (the phase component's own arguments)."""
    from monai_icmil.engines import Embed

    files = json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")])
    with pytest.raises(ValueError, match=r"unknown id\(s\): --embed#prefetch_thread"):
        check_config(["run", "--config_file", files, "--embed#prefetch_thread", "4"])
    with pytest.raises(TypeError, match="prefetch_thread"):
        Embed(prefetch_thread=4)
    assert Embed(prefetch_threads=4).prefetch_threads == 4


def test_datalist_without_validation_gets_a_recorded_reproducible_split(synthetic_dataset, tmp_path):
    data = json.loads(synthetic_dataset.read_text())
    no_val = {"training": data["training"] + data["validation"], "test": data["test"]}
    path = synthetic_dataset.parent / "no_validation.json"
    path.write_text(json.dumps(no_val))
    splits = []
    for _ in range(2):
        wf = ICMILWorkflow(
            dataset_dir=str(synthetic_dataset.parent),
            output_dir=str(tmp_path / "out"),
            datalist=path.name,
            progress=False,
            mlflow={"enabled": False},
        )
        with pytest.warns(UserWarning, match="no validation split.*held out.*validation_split.json"):
            items = wf.splits.items()
        splits.append(sorted(e["slide_id"] for e in items["validation"]))
    assert splits[0] == splits[1] and len(splits[0]) == 2
    assert {
        e["label"]
        for e in ICMILWorkflow(
            dataset_dir=str(synthetic_dataset.parent), output_dir=str(tmp_path / "out"), datalist=path.name
        ).splits.items()["validation"]
    } == {0, 1}
    assert json.loads((tmp_path / "out" / "validation_split.json").read_text())["validation"] == splits[0]


def test_string_labels_name_the_classes_and_a_datalist_that_reorders_them_is_refused(synthetic_dataset, tmp_path):
    """metastasis/normal: normal is class 0 (sorted order alone would make it 1), the names are recorded with the run
    and name its outputs; a later datalist whose labels give other class indices is refused, not silently used."""
    data = json.loads(synthetic_dataset.read_text())
    names = {0: "normal", 1: "metastasis"}
    renamed = {k: [{**e, "label": names[e["label"]]} for e in v] for k, v in data.items() if isinstance(v, list)}
    (synthetic_dataset.parent / "named.json").write_text(json.dumps(renamed))

    def workflow(datalist: str) -> ICMILWorkflow:
        return ICMILWorkflow(
            dataset_dir=str(synthetic_dataset.parent),
            output_dir=str(tmp_path / "out"),
            datalist=datalist,
            progress=False,
            mlflow={"enabled": False},
        )

    wf = workflow("named.json")
    original = {Path(e["image"]).stem: e["label"] for v in data.values() if isinstance(v, list) for e in v}
    assert all(e["label"] == original[e["slide_id"]] for e in wf.splits.all_items())
    assert wf.class_names is None  # the configured names (none in Python by default), until the run is prepared
    wf._record_classes()
    assert wf.class_names == ["normal", "metastasis"]
    assert workflow("named.json").class_names == ["normal", "metastasis"]  # read back from state.json
    spelt = {
        k: [{**e, "label": {"metastasis": "tumour"}.get(e["label"], e["label"])} for e in v] for k, v in renamed.items()
    }
    (synthetic_dataset.parent / "spelt.json").write_text(json.dumps(spelt))
    relabelled = workflow("spelt.json")  # before any round is trained, the datalist may still change its names
    relabelled._record_classes()
    assert relabelled.class_names == ["normal", "tumour"]
    relabelled.ledger.mark(0, "bag_phase", {"val": {"auc": 0.5}})  # once a round is trained on them, it may not
    only_tumours = {k: [e for e in v if e["label"] == "tumour"] for k, v in spelt.items()}
    (synthetic_dataset.parent / "tumours.json").write_text(json.dumps(only_tumours))
    with pytest.raises(
        RuntimeError, match=r"give the classes \['tumour'\].*round\(s\) \[0\].*trained with \['normal', 'tumour'\]"
    ):
        workflow("tumours.json")._record_classes()


def test_settings_that_do_not_fit_the_datalist_are_refused_before_any_work(synthetic_dataset, tmp_path):
    """A label beyond num_classes (integer or string), class_names of another length and a missing tumour mask are
    refused when the run is prepared, naming the slides and the setting, before any tiling; so is an evaluation of a
    split that does not exist."""
    data = json.loads(synthetic_dataset.read_text())

    def workflow(datalist: dict, **kwargs) -> ICMILWorkflow:
        (tmp_path / "datalist.json").write_text(json.dumps(datalist))
        kwargs = {"dataset_dir": str(synthetic_dataset.parent), "output_dir": str(tmp_path / "out"), **kwargs}
        return ICMILWorkflow(datalist=str(tmp_path / "datalist.json"), progress=False, **kwargs)

    third = {**data, "test": [{**data["test"][0], "label": 2}, *data["test"][1:]]}
    sid = Path(data["test"][0]["image"]).stem
    with pytest.raises(
        ValueError,
        match=rf"indices \[0, 1, 2\] but num_classes is 2 \(class indices 0-1\); .* '2': 1\. The rarest, '2', is on "
        rf"{sid} \(test\)",
    ):
        workflow(third).prepare()
    names = {0: "normal", 1: "tumour"}
    named = {k: [{**e, "label": names[e["label"]]} for e in v] for k, v in data.items() if isinstance(v, list)}
    named["training"][0]["label"] = "necrosis"
    tumours = [Path(e["image"]).stem for v in named.values() for e in v if e["label"] == "tumour"]
    typo = Path(named["training"][0]["image"]).stem
    per_class = rf"'normal': \d+, 'necrosis': 1, 'tumour': {len(tumours)}"
    with pytest.raises(
        ValueError, match=rf"per class: {per_class}\. The rarest, 'necrosis', is on {typo} \(training\)"
    ):
        workflow(named).prepare()  # normal, necrosis, tumour: tumour is index 2, and the one odd label is named
    shifted = {k: [{**e, "label": e["label"] + 1} for e in v] for k, v in data.items() if isinstance(v, list)}
    with pytest.raises(ValueError, match=r"class indices \[1, 2\] .*\. Number the classes 0-1 in the datalist[^,]*$"):
        workflow(shifted).prepare()  # 1 and 2: two classes, numbered from 1
    shifted["test"][0]["label"] = 3  # 1, 2, 3: numbered from 1, and one class more than num_classes
    with pytest.raises(ValueError, match=r"Number the classes 0-2 in the datalist .*, and set num_classes \(--num_cl"):
        workflow(shifted).prepare()
    tied = {k: [dict(e) for e in v] for k, v in data.items() if isinstance(v, list)}
    for split, labels in (("training", [0, 0, 1, 1]), ("validation", [2, 2]), ("test", [0, 0])):
        for e, label in zip(tied[split], labels):
            e["label"] = label  # classes 1 and 2 have 2 slides each: neither is "the rarest"
    with pytest.raises(ValueError, match=r"'0': 4, '1': 2, '2': 2\. Set num_classes \(--num_classes 3\)") as refused:
        workflow(tied).prepare()
    assert "rarest" not in str(refused.value)
    with pytest.raises(ValueError, match=r"class_names \['normal', 'tumour'\] has 2 name\(s\) but num_classes is 3"):
        workflow(third, num_classes=3, class_names=["normal", "tumour"]).prepare()
    lost = {**data, "validation": [{**data["validation"][0], "tumour_mask": "masks/lost.png"}, *data["validation"][1:]]}
    with pytest.raises(FileNotFoundError, match=r"1 tumour mask\(s\) .* do not exist: validation_000: '.*lost.png'"):
        workflow(lost).prepare()
    with pytest.raises(ValueError, match=r"split 'val' is not one of training, validation, test"):
        workflow(data).evaluate("val")
    with pytest.raises(
        ValueError, match=r"eval_round 0 is not a finished round .*\(finished rounds: none yet: run the"
    ):
        workflow(data).evaluate("test", 0)
    assert not (tmp_path / "out" / "coords").exists()


def test_a_round_from_the_command_line_must_be_a_finished_round(tmp_path):
    """eval_round / infer_round as fire passes them (int, float, string) name a finished round; anything else is
    refused naming the finished rounds; none picks the best by validation AUC."""
    wf = ICMILWorkflow(str(tmp_path), str(tmp_path / "out"), mlflow={"enabled": False}, progress=False)
    for r, auc in ((0, 0.8), (1, 0.9)):
        wf.ledger.mark(r, "bag_phase", {"val": {"auc": auc, "loss": 0.5}})
    wf.ledger.mark(2, "embed", {})  # round 2 started, its bag phase not run
    assert [wf.trained_round(r, "infer_round") for r in (0, 1, "1", " 0 ", 1.0, None)] == [0, 1, 1, 0, 1, 1]
    for bad in (2, "2", 1.5, "one", True, -1):
        with pytest.raises(ValueError, match=r"infer_round .* is not a finished round .*\(finished rounds: 0, 1\)"):
            wf.trained_round(bad, "infer_round")


def test_a_finished_phase_made_with_other_settings_is_refused_not_mixed_into_the_run(tmp_path):
    """state.json records each finished phase's settings hash; a rerun in the same output_dir with other settings for
    that phase is refused (its results would be summarised beside the new settings'), the same settings reuse it, and
    records from before the hash existed are reused as they were."""
    wf = ICMILWorkflow(str(tmp_path), str(tmp_path / "out"), mlflow={"enabled": False}, progress=False)
    wf._mark(1, "embedder_phase", {"seconds": 1.0})
    record = wf.ledger.get(1, "embedder_phase")
    assert record["settings"] == wf._settings("embedder_phase") and wf.embedder_phase(1) == record
    other = ICMILWorkflow(
        str(tmp_path), str(tmp_path / "out"), mlflow={"enabled": False}, progress=False,
        embedder_phase=EmbedderPhase(epochs=3, device="cpu", progress=False),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"round 1's embedder_phase in '.*out' was trained with other embedder_phase "):
        other.embedder_phase(1)
    wf.ledger.mark(2, "embedder_phase", {"seconds": 2.0})  # an older record, without the hash
    assert other.embedder_phase(2) == {"seconds": 2.0}
    on_gpu, on_cpu = (
        ICMILWorkflow(
            str(tmp_path), str(tmp_path / "out"), mlflow={"enabled": False}, progress=False,
            embedder_phase=EmbedderPhase(optimizer=functools.partial(torch.optim.Adam, lr=1e-5, fused=fused)),
        )
        for fused in (True, False)
    )  # fmt: skip
    assert on_gpu._settings("embedder_phase") == on_cpu._settings("embedder_phase")  # a run continued on a CPU


def test_the_summary_names_where_round_0s_embedder_comes_from(synthetic_dataset, tmp_path):
    from monai_icmil.engines import Pretrain
    from monai_icmil.networks import create_embedder

    def origin(**kwargs) -> str | None:
        root = str(synthetic_dataset.parent)
        return ICMILWorkflow(dataset_dir=root, output_dir=str(tmp_path), **kwargs).starting_embedder_origin()

    assert origin() == "random init"  # the Python API's default, resnet50_trunc without weights
    assert (
        origin(embedder={"name": "resnet18_trunc", "weights": "/models/uni/w.safetensors"}) == "weights w.safetensors"
    )
    assert origin(embedder=lambda: create_embedder("resnet18_trunc")) is None  # a user's factory says nothing
    assert origin(pretrain=Pretrain()) == "SimCLR pre-trained"


def test_two_cpu_ranks_under_torchrun_match_one_process(trained, tmp_path):
    """multi_gpu_train.json with 2 gloo ranks: same features and the same metrics as the single-process run."""
    import socket

    import torch

    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(TINY))
    files = [str(CONFIGS / n) for n in ("train.json", "demo.json", "multi_gpu_train.json")] + [str(tiny)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps(files),
        "--bundle_root",
        str(BUNDLE),
        "--dataset_dir",
        str(trained / "data"),
        "--output_dir",
        str(tmp_path / "out"),
        "--num_rounds",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from monai_icmil.data.store import FeatureStore

    for r in (0, 1):
        one = FeatureStore(trained / "out" / f"round_{r}" / "features")
        two = FeatureStore(tmp_path / "out" / f"round_{r}" / "features")
        assert one.slide_ids() == two.slide_ids()
        for sid in one.slide_ids():
            torch.testing.assert_close(
                one.load(sid)["features"].float(), two.load(sid)["features"].float(), atol=2e-3, rtol=1e-2
            )
    single = json.loads((trained / "out" / "state.json").read_text())["rounds"]
    multi = json.loads((tmp_path / "out" / "state.json").read_text())["rounds"]
    assert multi["1"]["embedder_phase"]["world_size"] == 2  # the embedder phase trained with DDP on both ranks
    assert single["1"]["embedder_phase"]["world_size"] == 1
    for r in ("0", "1"):
        assert multi[r]["bag_phase"]["val"]["auc"] == pytest.approx(single[r]["bag_phase"]["val"]["auc"])
        assert multi[r]["test"]["metrics"]["auc"] == pytest.approx(single[r]["test"]["metrics"]["auc"])


def _pure_patches(seed: int, size: int, per_class: int = 300) -> tuple[torch.Tensor, np.ndarray]:
    """Ground-truth patches of a generated positive slide (30-40 % tumour): all-tumour ones (> 90 % of the patch in the
    tumour mask) and tumour-free tissue ones, ``size`` px at 1 um/px (level 0 is 0.5 um/px), at most ``per_class``
    each."""
    from monai_icmil.data.synthetic import SyntheticSlideConfig, patch_tumour_fraction, render_slide

    r = render_slide(seed, True, SyntheticSlideConfig(width=2048, height=1536, tumour_fraction=(0.3, 0.4)))
    foot = 2 * size
    height, width = r["image"].shape[:2]
    ys, xs = np.meshgrid(np.arange(0, height - foot, foot // 2), np.arange(0, width - foot, foot // 2), indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    tumour, tissue = (patch_tumour_fraction(coords, foot, r[k], 1) for k in ("tumour", "tissue"))
    pos = np.flatnonzero(tumour > 0.9)[:per_class]
    neg = np.flatnonzero((tumour == 0) & (tissue > 0.9))
    neg = np.random.default_rng(0).choice(neg, min(len(neg), per_class), replace=False)
    patches = [r["image"][y : y + foot : 2, x : x + foot : 2] for x, y in coords[np.r_[pos, neg]]]
    return torch.as_tensor(np.stack(patches)).permute(0, 3, 1, 2), np.r_[np.ones(len(pos)), np.zeros(len(neg))]


def test_pretrain_json_makes_the_round_0_embedder(tmp_path, tiny_data):
    """configs/pretrain.json: SimCLR on the training slides' patches; its output is what round 0 embeds with, and its
    features separate tumour from normal patches better than the random-init embedder it started from.

    The probe (logistic regression on frozen features, ground truth from the tumour masks) pools six generated
    slides, each with its own stain, and is fitted on some slides and measured on the others: SimCLR's HED jitter
    teaches stain invariance, which is what a bag of many slides needs. On single slides 100 iterations win on only
    about half (benchmarks/RESULTS.md); pooled across stains they won on every split measured.
    """
    from monai_icmil.metrics import linear_probe_auc
    from monai_icmil.networks import create_embedder

    extra = {
        "pretrain#epochs": 10,
        "pretrain#batches_per_epoch": 10,
        "pretrain#batch_size": 64,
        "pretrain#num_workers": 0,
        "pretrain#read_threads": 1,
    }
    # round 0's embed phase: with pretrain.json it pre-trains first (tracked in MLflow), then embeds with the output
    # (``pretrain#run`` runs the pre-training alone: train.json's "$@workflow.pretrain()")
    proc = _bundle(
        tmp_path, "embed#run", str(CONFIGS / "pretrain.json"), extra={**extra, "mlflow#enabled": True}, data=tiny_data
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    pretrained = create_embedder(None, weights=out / "pretrain" / "embedder.safetensors")  # the embedder factory
    state = json.loads((out / "state.json").read_text())
    assert state["pretrain"]["fingerprint"] == pretrained.fingerprint()
    history = json.loads((out / "pretrain" / "history.json").read_text())
    assert len(history) == 10 and all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert not (out / "pretrain" / "resume").exists()

    torch.manual_seed(0)  # the bundle's random-init starting embedder (seed 0), which pre-training started from
    random_init = create_embedder(TINY["embedder#name"], input_size=TINY["embedder#input_size"])
    assert random_init.fingerprint() != pretrained.fingerprint()
    slides = [_pure_patches(seed, TINY["embedder#input_size"]) for seed in (101, 102, 103, 104, 105, 106)]
    y = np.concatenate([labels for _, labels in slides])
    group = np.concatenate([np.full(len(labels), k) for k, (_, labels) in enumerate(slides)])
    aucs = {}
    for name, net in (("random", random_init.eval()), ("pretrained", pretrained.eval())):
        with torch.inference_mode():
            feats = torch.cat([net(x[i : i + 128]) for x, _ in slides for i in range(0, len(x), 128)]).numpy()
        aucs[name] = [linear_probe_auc(feats, y, train_mask=np.isin(group, fit)) for fit in ((0, 2, 4), (1, 3, 5))]
    assert all(p > r + 0.01 for p, r in zip(aucs["pretrained"], aucs["random"])), aucs

    assert state["rounds"]["0"]["embed"]["fingerprint"] == pretrained.fingerprint()  # round 0 uses it, not random
    assert "random-init" not in proc.stdout + proc.stderr  # no warning about a random start when pre-trained
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("icmil").experiment_id])
    assert "pretrain" in {r.info.run_name for r in runs}
    assert pretrained.describe()["name"] == random_init.describe()["name"]


def test_the_feature_weight_setting_reaches_the_embedder_phase_loss():
    from monai.bundle import ConfigParser

    weights = {}
    for value in (None, 0.25):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "train.json"))
        parser.update({"bundle_root": str(BUNDLE), **({"embedder_phase#feature_weight": value} if value else {})})
        weights[value] = parser.get_parsed_content("embedder_phase#loss").feature_weight
    assert weights == {None: 0.0, 0.25: 0.25}  # off by default: ICMIL's loss


def test_the_embedder_phase_adam_is_fused_on_cuda_only():
    from monai.bundle import ConfigParser

    fused = {}
    for device in ("cpu", "cuda", "cuda:1"):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "train.json"))
        parser.update({"device": device, "bundle_root": str(BUNDLE)})
        fused[device] = parser.get_parsed_content("embedder_phase#optimizer").keywords["fused"]
    assert fused == {"cpu": False, "cuda": True, "cuda:1": True}  # the CPU keeps the plain Adam's exact numbers


def test_network_def_takes_its_input_size_from_a_vit_model_folder(vit_folder):
    """``--embedder#weights /models/uni --embedder#name None``: the definition's input size is the ViT's."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"bundle_root": str(BUNDLE), "embedder#weights": str(vit_folder), "embedder#name": None})
    assert parser.get_parsed_content("feature_dim") == 64 and parser.get_parsed_content("network_def").in_dim == 64
    parser.update({"embedder#weights": None, "embedder#name": "resnet18_trunc"})
    parser.parse()
    assert parser.get_parsed_content("feature_dim") == 256


def test_the_final_model_is_registered_in_mlflow_and_predicts_what_inference_writes(trained):
    """``models:/icmil/1`` (the run's SQLite registry) scores slide paths as the bundle's inference does (the run's
    own inference on its test split: demo.json's ``test_inference``, the final round's classifier, as
    ``inference.json`` writes it)."""
    import mlflow
    import pandas as pd

    out = trained / "out"
    uri = f"sqlite:///{out / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    summary = json.loads((out / "summary.json").read_text())
    version = client.get_model_version("icmil", "1")
    assert version.tags["round"] == str(summary["final_round"]) and float(version.tags["val_auc"]) >= 0
    data = json.loads((trained / "data" / "datalist.json").read_text())
    folder = trained / "served"
    folder.mkdir()
    for e in data["test"]:
        (folder / Path(e["image"]).name).symlink_to(trained / "data" / e["image"])
    with using_store(uri):
        model = mlflow.pyfunc.load_model("models:/icmil/1")
        got = model.predict(pd.DataFrame({"image": sorted(str(p) for p in folder.iterdir())}))
    want = list(csv.DictReader(open(out / "test_inference" / "probabilities.csv")))
    assert list(got["slide"]) == [r["slide"] for r in want] and len(want) == len(data["test"])
    for column in ("prob_normal", "prob_tumour"):
        np.testing.assert_allclose(got[column], [float(r[column]) for r in want], atol=1e-5)


def test_heatmap_stride_draws_maps_from_overlapping_patches_and_keeps_the_slide_probabilities(trained, tmp_path):
    data = json.loads((trained / "data" / "datalist.json").read_text())
    folder = tmp_path / "slides"
    folder.mkdir()
    for e in data["test"][:2]:
        (folder / Path(e["image"]).name).symlink_to(trained / "data" / e["image"])
    dense_dir = tmp_path / "dense"
    proc = _bundle(
        trained, "run", str(CONFIGS / "inference.json"), input_slides=str(folder), inference_dir=str(dense_dir),
        heatmap_stride=16,  # the patches are 32 px
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the slide probabilities are the grid's: those of the run's own inference on its test split (no label here)
    plain = {r["slide"]: r for r in csv.DictReader(open(trained / "out" / "test_inference" / "probabilities.csv"))}
    dense = list(csv.DictReader(open(dense_dir / "probabilities.csv")))
    assert [r["slide"] for r in dense] == [Path(e["image"]).stem for e in data["test"][:2]]
    for row in dense:
        labelled = {"label": plain[row["slide"]]["label"], "label_class": plain[row["slide"]]["label_class"]}
        assert {**row, **labelled} == plain[row["slide"]]
    from monai_icmil.data.store import CoordsStore

    for e in data["test"][:2]:
        sid = Path(e["image"]).stem
        grid = len(CoordsStore(dense_dir / "coords").load(sid)["coords"])
        overlapping = len(CoordsStore(dense_dir / "heatmap" / "coords").load(sid)["coords"])
        assert overlapping > 2.5 * grid  # about four patches where the grid has one
    # the pictures are drawn from the overlapping patches: the same slides without the stride (same thumbnail, title
    # and layout) give other maps; a writer that fell back to the grid would draw the same picture
    plain_dir = tmp_path / "plain"
    proc = _bundle(
        trained, "run", str(CONFIGS / "inference.json"), input_slides=str(folder), inference_dir=str(plain_dir)
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for e in data["test"][:2]:
        sid = Path(e["image"]).stem
        pictures = [
            np.asarray(Image.open(d / f"{sid}_heatmap.jpg").convert("RGB")).astype(int) for d in (dense_dir, plain_dir)
        ]
        assert pictures[0].shape == pictures[1].shape
        assert np.abs(pictures[0] - pictures[1]).mean() > 1.0


def test_the_command_line_is_read_as_fire_reads_it_before_any_work(tmp_path):
    """check_config sees what the bundle will get: parsed values (None, mappings), flags without a value, ``--noX``,
    ``-`` for ``_``, config files as a comma list, YAML or an args_file, ``+id`` merges; it refuses what would fail
    only after embedding (NaN, text for a number whose default is None, None where a number is needed)."""
    train, demo = str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")
    run = ["run", "--config_file", f"{train},{demo}"]
    assert check_config([*run, "--bag_phase#witness_search", "{'max_instances': 4096}"]) == ["bag_phase#witness_search"]
    for key in (
        "bag_phase#early_stop_patience",
        "bag_phase#grad_clip",
        "tiling#mpp",
        "bag_phase#lr_scheduler",
        "tiling#max_hole_um2",
    ):  # the bundle runner drops a None typed on the command line: the setting would keep its default
        with pytest.raises(ValueError, match=rf"drops an override whose value is None, so '{key}' would keep"):
            check_config([*run, f"--{key}", "None"])
        assert check_config([*run, f"--{key}", "$None"]) == [key]
    for key in ("embed#compile", "tiling#level", "assume_mpp"):  # already null: the dropped None changes nothing
        assert check_config([*run, f"--{key}", "None"]) == [key]
    for given in ("--embed#phase#amp false", "--embedder_phase#phase#freeze_bn off", "--pretrain#phase#amp no"):
        assert check_config([*run, *given.split()]) == [given.split()[0][2:]]  # our components read the words
    assert check_config([*run, "--progress", "--num_rounds", "2", "--tiling#level", "1"]) == [
        "progress", "num_rounds", "tiling#level"
    ]  # fmt: skip
    assert check_config([*run, "--noprogress", "--bag_phase#epochs", "$2 * 3"]) == ["progress", "bag_phase#epochs"]
    refusals = {
        "--num_round": r"unknown id\(s\): --num_round",  # a comma list of files is checked too
        "--bag_phase#epochs None": "'bag_phase#epochs' cannot be None",
        "--bag_phase#lr nan": "'bag_phase#lr' must be a finite number, got 'nan'",
        "--bag_phase#max_instances ten": "'bag_phase#max_instances' must be a number",
        "--assume_mpp abc": "'assume_mpp' must be a number",
        "--embedder_phase#early_stop_patience 2.5": "must be a whole number",
        "--device --num_round 2": r"unknown id\(s\): --num_round",  # the flag does not swallow the next one
        "--embedding#batch_size 8": r"'embedding#batch_size' is now embed#<setting>",
        # a boolean word where nothing converts it (an expression's or an absent argument's place): read as true
        "--embedder_phase#optimizer#fused false": r"'false' would reach its component as text.*write True or False",
        "--bag_phase#optimizer#foreach off": r"'off' would reach its component as text",  # a torch argument
        "--embedder#dynamic_img_size off": r"'off' would reach its component as text",  # handed on to timm
        "--datalist None": r"drops an override whose value is None, so 'datalist' would keep its configured value",
    }
    for given, message in refusals.items():
        with pytest.raises(ValueError, match=message):
            check_config([*run, *given.split()])
    with pytest.raises(ValueError, match=r"unknown id\(s\): --num_round"):  # fire reads --config-file as config_file
        check_config(["run", "--config-file", train, "--num_round", "2"])
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": [train, demo], "tiling#max_hole_um2": None}))  # null: kept
    assert check_config(["run", "--args_file", str(args_file)]) == ["tiling#max_hole_um2"]
    args_file.write_text(json.dumps({"config_file": [train, demo], "num_round": 2}))
    with pytest.raises(ValueError, match=r"unknown id\(s\): --num_round"):
        check_config(["run", "--args_file", str(args_file)])
    lab = tmp_path / "lab.yaml"
    lab.write_text("+bag_phase:\n  epochz: 3\n")  # a typo in a merged dict, in a YAML file
    with pytest.raises(ValueError, match="no component uses: bag_phase#epochz"):
        check_config(["run", "--config_file", f"{train},{lab}"])
    lab.write_text("bag_phase: [unclosed\n")
    with pytest.raises(ValueError, match=r"config file '.*lab\.yaml' cannot be read"):
        check_config(["run", "--config_file", f"{train},{lab}"])


def test_one_fold_is_refused(synthetic_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"folds must be 0 \(off\) or the number of cross-validation folds \(>= 2\)"):
        ICMILWorkflow(dataset_dir=str(synthetic_dataset.parent), output_dir=str(tmp_path / "out"), folds=1)
