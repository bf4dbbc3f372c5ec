# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Bad slides never sink a run; an interrupted write leaves nothing behind."""

from __future__ import annotations

import errno
import functools
import json
import shutil

import numpy as np
import pytest
import torch

from monai_icmil.data.store import FeatureStore
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines import BagPhase, Embed
from monai_icmil.networks import ABMIL
from monai_icmil.workflows import ICMILWorkflow

TINY = dict(
    tiling=TilingConfig(patch_size=32, mpp=1.0),
    embedder={"name": "resnet18_trunc", "input_size": 32},
    aggregator=functools.partial(ABMIL, hidden_dim=32),
    embed=Embed(batch_size=64, num_workers=0, progress=False),
    bag_phase=BagPhase(epochs=2, device="cpu", progress=False),
    num_rounds=0,
    progress=False,
    mlflow={"enabled": False},
    device="cpu",
)


def test_four_bad_slides_are_reported_and_the_run_finishes(synthetic_dataset, blank_slide, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset.parent, root)
    data = json.loads((root / "datalist.json").read_text())
    good = data["training"][0]["image"]
    (root / "slides" / "truncated.tiff").write_bytes((root / good).read_bytes()[:5000])
    (root / "slides" / "notes.svs").write_text("not a slide")
    shutil.copy(blank_slide, root / "slides" / "blank.tiff")
    data["training"] += [
        {"image": "slides/truncated.tiff", "label": 1},
        {"image": "slides/notes.svs", "label": 0},
        {"image": "slides/blank.tiff", "label": 0},
        {"image": "slides/missing.tiff", "label": 1},
    ]
    (root / "datalist.json").write_text(json.dumps(data))
    wf = ICMILWorkflow(dataset_dir=str(root), output_dir=str(tmp_path / "out"), **TINY)
    with pytest.warns(UserWarning):
        summary = wf.run()
    assert summary["final_round"] == 0 and (tmp_path / "out" / "summary.md").is_file()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    listed = set(report["failed"]) | set(report["empty"])
    assert listed == {"truncated", "notes", "blank", "missing"}
    assert set(report["empty"]) == {"blank"}
    assert "no tissue found (saturation never exceeds" in report["empty"]["blank"]["reason"]  # the detector's words
    assert "does not exist" in report["failed"]["missing"]["reason"]
    assert "cannot be opened" in report["failed"]["notes"]["reason"]
    assert all(entry["reason"] for entry in report["failed"].values())
    assert "4 slide(s) left out" in (tmp_path / "out" / "summary.md").read_text()


def test_too_few_usable_slides_stop_with_a_clear_error(synthetic_dataset, tmp_path):
    wf = ICMILWorkflow(
        dataset_dir=str(synthetic_dataset.parent), output_dir=str(tmp_path / "out"), min_slides=10, **TINY
    )
    with pytest.raises(RuntimeError, match=r"only 4 usable training slide\(s\) remain \(min_slides=10\)"):
        wf.prepare()


def test_a_training_split_of_one_class_is_refused_before_any_tiling(synthetic_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset.parent, root)
    data = json.loads((root / "datalist.json").read_text())
    data["training"] = [dict(e, label="tumour") for e in data["training"]]
    data["validation"] = [dict(e, label=["normal", "tumour"][e["label"]]) for e in data["validation"]]
    data["test"] = [dict(e, label=["normal", "tumour"][e["label"]]) for e in data["test"]]
    (root / "datalist.json").write_text(json.dumps(data))
    wf = ICMILWorkflow(dataset_dir=str(root), output_dir=str(tmp_path / "out"), **TINY)
    with pytest.raises(ValueError, match=r"every training slide of datalist '.*datalist\.json' has the label 'tumour'"):
        wf.prepare()
    assert not (tmp_path / "out" / "coords").exists()  # nothing tiled


def test_disk_full_during_a_feature_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch as st

    store = FeatureStore(tmp_path / "features")
    real_save = st.save_file

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.save("slide_a", {"features": torch.zeros(3, 4), "coords": np.zeros((3, 2), np.int64)}, {"k": 1})
    assert list((tmp_path / "features").iterdir()) == []  # neither the file nor its temporary
    monkeypatch.setattr(st, "save_file", real_save)
    store.save("slide_a", {"features": torch.ones(3, 4), "coords": np.zeros((3, 2), np.int64)}, {"k": 1})
    assert store.is_current("slide_a", {"k": 1}) and store.load("slide_a")["features"].sum() == 12


def test_a_feature_file_cut_short_is_stale_and_a_failure_is_forgotten_only_by_its_own_phase(tmp_path):
    from monai_icmil.data.report import RunReport

    store = FeatureStore(tmp_path / "features")
    path = store.save("s", {"features": torch.ones(50, 8), "coords": np.zeros((50, 2), np.int64)}, {"k": 1})
    assert store.is_current("s", {"k": 1})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy that stopped half-way
    assert not store.is_current("s", {"k": 1}) and store.load("s", {"k": 1}) is None  # made again, not a crash
    report = RunReport(tmp_path / "report.json")
    report.fail("s", "s.svs", "embed", "OSError: read error")
    report.succeed("s", "prepare")  # a later run tiles it again: its embedding failure still stands
    assert RunReport(tmp_path / "report.json").excluded() == {"s"}
    report.succeed("s", "embed")
    assert RunReport(tmp_path / "report.json").excluded() == set()


def test_a_temporary_file_left_by_a_killed_write_is_swept_when_it_is_an_hour_old(tmp_path):
    import os
    import time

    store = FeatureStore(tmp_path / "features")
    store.save("s", {"features": torch.ones(2, 3)}, {"k": 1})
    orphan = tmp_path / "features" / ".s.safetensors.abc123.safetensors.tmp"  # atomic_path's name, kill -9 mid-write
    young = tmp_path / "features" / ".t.safetensors.def456.safetensors.tmp"  # another process writing now
    orphan.write_bytes(b"\0" * 100)
    young.write_bytes(b"\0" * 100)
    two_hours_ago = time.time() - 7200
    os.utime(orphan, (two_hours_ago, two_hours_ago))
    store = FeatureStore(tmp_path / "features")
    assert not orphan.exists() and young.exists() and store.is_current("s", {"k": 1})


def test_atomic_writes_leave_the_permissions_of_a_plain_write(tmp_path):
    """Temporary files are created 0o600; the outputs must not stay that way (a lab's group could not read them):
    a new file gets 0o666 less the umask, a replaced file keeps its mode."""
    import os

    from monai_icmil.utils import atomic_write_json, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "new.json", {"a": 1})
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        atomic_write_text(tmp_path / "atomic.txt", "x")
        assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
        os.chmod(tmp_path / "new.json", 0o664)
        atomic_write_json(tmp_path / "new.json", {"a": 2})
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o664
        store = FeatureStore(tmp_path / "features")
        path = store.save("s", {"features": torch.zeros(2, 3)}, {"k": 1})
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_two_runs_with_the_same_seed_give_identical_metrics(synthetic_dataset, tmp_path):
    results = []
    for name in ("a", "b"):
        wf = ICMILWorkflow(dataset_dir=str(synthetic_dataset.parent), output_dir=str(tmp_path / name), seed=11, **TINY)
        wf.run()
        state = json.loads((tmp_path / name / "state.json").read_text())["rounds"]["0"]
        results.append((state["bag_phase"]["val"], state["test"]["metrics"], state["embed"]["fingerprint"]))
    assert results[0] == results[1]


def test_a_slide_tiled_again_after_its_mpp_changed_is_embedded_again_on_rerun(synthetic_dataset, tmp_path):
    """The embed phase's record does not hide stale features: a rerun embeds the slides whose tiling changed."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset.parent, root)
    out = tmp_path / "out"
    wf = ICMILWorkflow(dataset_dir=str(root), output_dir=str(out), **TINY)
    wf.embed(0)
    store = FeatureStore(wf.features_dir(0))
    sids = sorted(wf.prepare())
    before = {sid: store.stored_key(sid) for sid in sids}
    data = json.loads((root / "datalist.json").read_text())
    changed = data["training"][0]
    changed["mpp"] = 0.8  # the lab measured the scanner again
    (root / "datalist.json").write_text(json.dumps(data))
    wf = ICMILWorkflow(dataset_dir=str(root), output_dir=str(out), **TINY)
    sid = wf.splits.items()["training"][0]["slide_id"]
    assert wf._stale_features(0) == [sid]  # tiled again at the new mpp, features still from the old grid
    wf.embed(0)
    assert all(len(wf.stored_features(0, split)) == len(wf._usable(split)) for split in wf.splits.items())
    after = {s: store.stored_key(s) for s in sids}
    assert [s for s in sids if after[s] != before[s]] == [sid]  # only that slide was embedded again


def test_metrics_json_is_strict_json_when_a_metric_is_undefined(synthetic_dataset, tmp_path):
    """A test split of one class has no AUC: metrics.json says null, which every JSON reader takes (not NaN)."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset.parent, root)
    data = json.loads((root / "datalist.json").read_text())
    data["test"] = [e for e in data["test"] if e["label"] == data["test"][0]["label"]]
    (root / "datalist.json").write_text(json.dumps(data))
    wf = ICMILWorkflow(dataset_dir=str(root), output_dir=str(tmp_path / "out"), **TINY)
    wf.run()

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    metrics = json.loads((tmp_path / "out" / "round_0" / "test" / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["auc"] is None and metrics["acc"] is not None


def test_under_torchrun_a_slide_failing_on_rank_1_is_left_out_by_rank_0(synthetic_dataset, tmp_path, monkeypatch):
    """Each rank embeds its share and records its share's failures in its own report file; rank 0 merges them, so
    its bag phase leaves the slide out instead of stopping on missing features (two ranks played in turn here)."""
    import monai_icmil.engines.embed as embed_module
    import monai_icmil.workflows.icmil as workflow_module

    world = {"rank": 0, "size": 2}
    monkeypatch.setattr(workflow_module, "dist_info", lambda: (world["rank"], world["size"]))
    monkeypatch.setattr(embed_module, "dist_info", lambda: (world["rank"], world["size"]))
    monkeypatch.setattr(workflow_module, "barrier", lambda: None)
    out = tmp_path / "out"
    rank0 = ICMILWorkflow(dataset_dir=str(synthetic_dataset.parent), output_dir=str(out), **TINY)
    slides = rank0.prepare()  # rank 0 tiles first
    world["rank"] = 1
    rank1 = ICMILWorkflow(dataset_dir=str(synthetic_dataset.parent), output_dir=str(out), **TINY)
    broken = list(rank1.prepare().values())[1]  # in rank 1's share (every second slide from the second)
    real_get_slide = embed_module.get_slide

    def unreadable(image, *args, **kwargs):
        if image == broken["image"]:
            raise OSError("read error")
        return real_get_slide(image, *args, **kwargs)

    monkeypatch.setattr(embed_module, "get_slide", unreadable)
    # what an earlier, killed attempt left: rank files from 2 and from 4 GPUs, and a failure since mended
    fine = list(slides)[3]  # in rank 1's share too; it embeds fine this time
    leftover = {"failed": {fine: {"path": "x", "phase": "embed", "reason": "read error"}}, "empty": {}, "damaged": {}}
    for k in (1, 3):
        (out / f"report.rank{k}.json").write_text(json.dumps(leftover))
    rank0.report.fail(fine, "x", "embed", "read error")
    rank1.embed(0)
    assert set(json.loads((out / "report.rank1.json").read_text())["failed"]) == {broken["slide_id"]}
    world["rank"] = 0
    rank0.embed(0)
    report = json.loads((out / "report.json").read_text())
    assert set(report["failed"]) == {broken["slide_id"]} and report["failed"][broken["slide_id"]]["phase"] == "embed"
    assert not list(out.glob("report.rank*.json"))
    assert json.loads((out / "state.json").read_text())["rounds"]["0"]["embed"]["failed"] == [broken["slide_id"]]
    world["size"] = 1
    rank0.bag_phase(0)  # trains on the other slides
    assert (
        len(rank0.bags(0, "training")) + len(rank0.bags(0, "validation")) + len(rank0.bags(0, "test"))
        == len(slides) - 1
    )


def test_an_empty_slide_keeps_the_tiling_reason_and_is_used_once_tiled_again_with_tissue(tmp_path):
    from monai_icmil.data.report import RunReport

    report = RunReport(tmp_path / "report.json")
    report.mark_empty("s", "s.svs", "prepare", "no tissue kept: 4,000 um^2 ... lower min_area_um2")
    report.mark_empty("s", "s.svs", "embed")  # the embed phase finds no patches either: the reason stays
    assert RunReport(tmp_path / "report.json").empty["s"]["reason"].endswith("lower min_area_um2")
    report.succeed("s", "prepare")  # tiled again (a lower min_area_um2): patches now
    assert RunReport(tmp_path / "report.json").excluded() == set()
