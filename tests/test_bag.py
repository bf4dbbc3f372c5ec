# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
from __future__ import annotations

import csv
import functools
import json
import os

import numpy as np
import pytest
import torch
from ignite.engine import Events
from torch.utils.data import Dataset

from monai_icmil.engines.bag_phase import (
    BagPhase,
    BagPhaseTrainer,
    BagTrainingError,
    feature_stats,
    load_bag_classifier,
    predict_bags,
    save_bag_classifier,
    write_predictions_csv,
)
from monai_icmil.handlers.tracking import sqlite_tracking_uri, start_run
from monai_icmil.metrics import binary_auc, slide_metrics
from monai_icmil.networks import AGGREGATORS, aggregator_class, create_aggregator

FAST = {"hidden_dim": 64}


def train_bag_classifier(
    train, val, aggregator, output_dir, aggregator_kwargs=None, lr=2e-4, seed=0, mlflow_run=None, class_names=None, **kw
):
    """The bag phase as train.json configures it (Adam, cosine schedule), with these tests' settings."""
    epochs = kw.setdefault("epochs", 50)
    phase = BagPhase(
        optimizer=functools.partial(torch.optim.Adam, lr=lr, weight_decay=1e-4),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=max(1, epochs)),
        **kw,
    )
    factory = functools.partial(aggregator_class(aggregator), **(aggregator_kwargs or {}))
    return phase(train, val, factory, output_dir, seed=seed, class_names=class_names, mlflow_run=mlflow_run)


class ShiftedBags(Dataset):
    """Feature bags; positive bags hold 1-5 % instances shifted along a few dimensions."""

    def __init__(self, n: int, seed: int, dim: int = 32, labels: list[int] | None = None, shift: float = 6.0):
        rng = np.random.default_rng(seed)
        self.items, self.bags = [], []
        for i in range(n):
            label = labels[i] if labels is not None else i % 2
            size = int(rng.integers(60, 140))
            f = rng.normal(0, 1, (size, dim)).astype(np.float32)
            if label:
                k = max(1, int(round(size * rng.uniform(0.01, 0.05))))
                f[rng.choice(size, k, replace=False), :8] += shift
            self.bags.append(torch.from_numpy(f))
            self.items.append({"label": label, "slide_id": f"bag{seed}_{i:03d}"})

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> dict:
        return {
            "features": self.bags[i],
            "label": torch.tensor(self.items[i]["label"]),
            "slide_id": self.items[i]["slide_id"],
        }


def learn_shifted_bags(name: str, output_dir, **kw) -> dict:
    """10 epochs of the bag phase on 40 training and 20 validation :class:`ShiftedBags`."""
    return train_bag_classifier(
        ShiftedBags(40, 0), ShiftedBags(20, 1), name, output_dir, aggregator_kwargs=FAST, epochs=10, lr=5e-4,
        progress=False, device="cpu", early_stop_patience=None, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_each_aggregator_learns_a_bag_task_with_a_few_shifted_instances(name, tmp_path):
    result = learn_shifted_bags(name, tmp_path)
    assert result["best_metric"] >= 0.95
    assert (tmp_path / "bag_classifier.pt").is_file()


def test_maxpool_bag_logit_is_the_max_instance_logit():
    net = create_aggregator("maxpool", 16, 2, hidden_dim=32, pooling="instance").eval()
    feats = torch.randn(25, 16)
    with torch.no_grad():
        inst = net.instance_logits(feats)
        bag = net(feats)["logits"][0]
    margin = inst[:, 1] - inst[:, 0]
    torch.testing.assert_close(bag, inst[margin.argmax()])  # the most positive instance's logits
    assert (bag[1] - bag[0]) == pytest.approx(margin.max().item())


def test_feature_maxpool_bag_feature_is_the_elementwise_max():
    net = create_aggregator("maxpool", 16, 2, hidden_dim=32).eval()
    feats = torch.randn(25, 16)
    torch.testing.assert_close(net(feats)["logits"], net.head(net.reduce(feats).max(dim=0, keepdim=True).values))
    one = feats[:1]
    torch.testing.assert_close(net(one)["logits"], net.instance_logits(one))


@pytest.mark.parametrize("name", ["abmil", "dtfd", "mean", "maxpool", "transformer"])
def test_one_instance_bag_logits_equal_that_instance_logits(name):
    torch.manual_seed(0)
    net = create_aggregator(name, 16, 2, hidden_dim=32).eval()
    x = torch.randn(1, 16)
    if name == "transformer":  # the transformer contextualises even a single instance: compare via its output
        h = net.reduce(x)
        ctx = net.mil.transformer(h[:, None, :])[:, 0, :]
        torch.testing.assert_close(net(x)["logits"], net.head(ctx))
    else:
        torch.testing.assert_close(net(x)["logits"], net.instance_logits(x))


def test_attention_is_exposed_where_the_aggregator_has_one():
    h = torch.randn(7, 32)
    for name in ("abmil", "dtfd", "transformer"):
        net = create_aggregator(name, 16, 2, hidden_dim=32)
        assert net.has_attention and net.attention(h).shape == (7,)
    assert not create_aggregator("maxpool", 16, 2).has_attention
    out = create_aggregator("abmil", 16, 2, hidden_dim=32)(torch.randn(9, 16))
    assert out["attention"].shape == (9,) and torch.isclose(out["attention"].sum(), torch.tensor(1.0))


def test_dtfd_distillation_modes_and_deterministic_eval():
    for distill in ("AFS", "MaxS", "MaxMinS"):
        net = create_aggregator("dtfd", 16, 3, hidden_dim=32, num_groups=4, distill=distill).eval()
        x = torch.randn(30, 16)
        a, b = net(x), net(x)
        assert a["logits"].shape == (1, 3) and a["tier1_logits"].shape == (4, 3)
        torch.testing.assert_close(a["logits"], b["logits"])
    with pytest.raises(ValueError, match="distill"):
        create_aggregator("dtfd", 16, 2, distill="nope")


def test_unknown_aggregator_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown aggregator 'clam'.*abmil.*dtfd.*maxpool"):
        create_aggregator("clam", 16)


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    torch.manual_seed(0)
    net = create_aggregator("dtfd", 32, 2, hidden_dim=48, num_groups=3)
    path = save_bag_classifier(tmp_path / "c.pt", net)
    again = load_bag_classifier(path)
    ds = ShiftedBags(6, 2)
    assert [r["probs"] for r in predict_bags(net, ds)] == [r["probs"] for r in predict_bags(again, ds)]
    with pytest.raises(ValueError, match="expects 32-d features but the embedder gives 64-d"):
        load_bag_classifier(path, expect_in_dim=64)
    with pytest.raises(ValueError, match="holds a 'dtfd' bag classifier, but 'abmil' was configured"):
        load_bag_classifier(path, expect_aggregator="abmil")


def test_metrics_match_scikit_learn_on_fixed_predictions():
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p1 = np.clip(0.3 * y + rng.uniform(0, 0.7, 50), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = slide_metrics(probs, y)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["acc"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert m["f1"] == pytest.approx(f1_score(y, probs.argmax(1)))
    fpr, tpr, thr = roc_curve(y, p1)
    t = thr[np.argmax(tpr - fpr)]
    assert m["youden_acc"] == pytest.approx(accuracy_score(y, p1 >= t))
    assert m["youden_f1"] == pytest.approx(f1_score(y, p1 >= t))
    y3 = rng.integers(0, 3, 60)
    p3 = rng.dirichlet([1, 1, 1], 60) + np.eye(3)[y3] * 0.3
    p3 /= p3.sum(1, keepdims=True)
    m3 = slide_metrics(p3, y3)
    assert m3["auc"] == pytest.approx(roc_auc_score(y3, p3, multi_class="ovr", average="macro"))
    assert m3["f1"] == pytest.approx(f1_score(y3, p3.argmax(1), average="macro"))


def test_instance_auc_reports_the_labels_the_scores_give_beside_their_ranking():
    from monai_icmil.metrics import instance_auc

    scores = [np.array([0.9, 0.8, 0.7, 0.2]), np.array([0.6, 0.1, 0.95])]
    fractions = [np.array([1.0, 0.0, 0.3, 0.0]), np.array([0.0, 0.0, 0.6])]  # 0.3: a border patch, left out
    out = instance_auc(scores, fractions)
    # kept: tumour 0.9, 0.95; tumour-free 0.8, 0.2, 0.6, 0.1: every tumour patch above every tumour-free one
    assert out["patch_auc"] == 1.0 and out["patches"] == 6 and out["tumour_patches"] == 2
    assert out["normal_called_tumour"] == pytest.approx(2 / 4)  # 0.8 and 0.6
    assert out["precision"] == pytest.approx(2 / 4)  # 0.9, 0.95 of 0.9, 0.8, 0.6, 0.95
    strict = instance_auc(scores, fractions, threshold=0.85)
    assert strict["normal_called_tumour"] == 0.0 and strict["precision"] == 1.0 and strict["patch_auc"] == 1.0
    assert np.isnan(instance_auc(scores, fractions, threshold=0.99)["precision"])


def test_auc_confidence_interval_is_delongs():
    """By hand on five slides (placements [1, 1, 0.5] and [2/3, 1]: variance 0.0278 + 0.0278); on 300 slides with ties
    its width matches a stratified bootstrap's; it is a point at AUC 1 and nan with one class."""
    from monai_icmil.metrics import auc_confidence_interval

    lo, hi = auc_confidence_interval([0.9, 0.8, 0.4, 0.7, 0.3], [1, 1, 1, 0, 0])
    assert lo == pytest.approx(2.5 / 3 - 1.959964 * np.sqrt(1 / 18), abs=1e-6) and hi == 1.0
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300).astype(bool)
    s = np.round(0.6 * y + rng.normal(0, 1, 300), 1)  # rounded: ties across the classes
    lo, hi = auc_confidence_interval(s, y)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    boot = []
    for _ in range(2000):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        boot.append(binary_auc(s[idx], y[idx]))
    assert lo < binary_auc(s, y) < hi
    assert (hi - lo) / 2 == pytest.approx(1.959964 * np.std(boot), rel=0.1)
    assert auc_confidence_interval([1, 2, 3, 4], [0, 0, 1, 1]) == (1.0, 1.0)
    assert all(np.isnan(auc_confidence_interval([1, 2], [1, 1])))
    assert all(np.isnan(auc_confidence_interval([0.9, 0.1, 0.2, 0.3], [1, 0, 0, 0])))  # one positive: no variance
    p1 = 1 / (1 + np.exp(-s))
    m = slide_metrics(np.stack([1 - p1, p1], 1), y)
    assert (m["auc_ci_low"], m["auc_ci_high"]) == pytest.approx((lo, hi))


def test_paired_auc_difference_is_delongs_paired_test():
    """Two correlated scorers of the same 300 slides: the difference is that of the two AUCs, its standard error
    matches a paired stratified bootstrap's sd and is far below the unpaired one (sqrt of the two variances); the
    same scores differ by exactly 0; one class gives nan; mismatched lengths are refused."""
    from monai_icmil.metrics import paired_auc_difference

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300).astype(bool)
    a = np.round(0.5 * y + rng.normal(0, 1, 300), 1)
    b = a + 0.3 * y + rng.normal(0, 0.4, 300)
    d = paired_auc_difference(a, b, y)
    assert d["diff"] == pytest.approx(binary_auc(b, y) - binary_auc(a, y))
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    boot, unpaired = [], []
    for _ in range(2000):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        boot.append(binary_auc(b[idx], y[idx]) - binary_auc(a[idx], y[idx]))
        other = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        unpaired.append(binary_auc(b[idx], y[idx]) - binary_auc(a[other], y[other]))
    assert d["se"] == pytest.approx(np.std(boot), rel=0.1) and d["se"] < 0.6 * np.std(unpaired)
    assert d["low"] == pytest.approx(d["diff"] - 1.959964 * d["se"]) and d["high"] > d["diff"]
    assert paired_auc_difference(a, a, y) == {"diff": 0.0, "se": 0.0, "low": 0.0, "high": 0.0}
    assert all(np.isnan(v) for v in paired_auc_difference([1, 2], [2, 1], [1, 1]).values())
    assert all(np.isnan(v) for v in paired_auc_difference([1, 2, 3], [3, 1, 2], [1, 0, 0]).values())  # 1 positive
    assert all(np.isnan(v) for v in paired_auc_difference([1, np.nan, 3, 4], [1, 2, 3, 4], [1, 0, 1, 0]).values())
    with pytest.raises(ValueError, match="one per slide"):
        paired_auc_difference([1, 2, 3], [1, 2], [0, 1, 1])


def test_one_class_split_reports_undefined_auc_with_a_warning(tmp_path):
    val = ShiftedBags(6, 1, labels=[1] * 6)
    with pytest.warns(UserWarning, match="AUC is undefined"):
        result = train_bag_classifier(
            ShiftedBags(10, 0), val, "abmil", tmp_path, aggregator_kwargs=FAST, epochs=2, progress=False, device="cpu"
        )
    assert np.isnan(result["val"]["val_auc"]) and (tmp_path / "bag_classifier.pt").is_file()


def test_bags_of_the_wrong_dimension_name_the_slide(tmp_path):
    val = ShiftedBags(4, 1, dim=48)
    with pytest.raises(ValueError, match=r"slide 'bag1_000' has 48-d features but the bag classifier expects 32-d"):
        train_bag_classifier(ShiftedBags(6, 0), val, "abmil", tmp_path, epochs=1, progress=False, device="cpu")


def test_empty_bag_is_skipped_with_a_warning(tmp_path):
    train = ShiftedBags(8, 0)
    train.bags[3] = torch.zeros(0, 32)
    with pytest.warns(UserWarning, match="empty bag for slide 'bag0_003' skipped"):
        train_bag_classifier(
            train,
            ShiftedBags(4, 1),
            "maxpool",
            tmp_path,
            aggregator_kwargs=FAST,
            epochs=1,
            progress=False,
            device="cpu",
        )


class NaNLater(ShiftedBags):
    """Clean in epoch 1; from the second pass on, one bag turns into NaNs."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = 0

    def __getitem__(self, i):
        self.calls += 1
        bag = super().__getitem__(i)
        if self.calls > 3 * len(self) and i == 2:  # passes: feature statistics, dim check, epoch 1
            bag["features"] = torch.full_like(bag["features"], float("nan"))
        return bag


def test_nan_loss_stops_naming_epoch_and_slide_and_keeps_the_best_checkpoint(tmp_path):
    with pytest.raises(BagTrainingError, match=r"non-finite loss .* at epoch 2, slide 'bag0_002'"):
        train_bag_classifier(
            NaNLater(8, 0),
            ShiftedBags(4, 1),
            "abmil",
            tmp_path,
            aggregator_kwargs=FAST,
            epochs=3,
            progress=False,
            device="cpu",
        )
    kept = load_bag_classifier(tmp_path / "bag_classifier.pt")
    assert all(torch.isfinite(p).all() for p in kept.parameters())


def test_predictions_csv_and_mlflow_tracking(tmp_path):
    import mlflow

    run = start_run(sqlite_tracking_uri(tmp_path), "bag-test", "bag_phase")
    result = train_bag_classifier(
        ShiftedBags(10, 0),
        ShiftedBags(6, 1),
        "abmil",
        tmp_path / "bag",
        aggregator_kwargs=FAST,
        epochs=3,
        progress=False,
        device="cpu",
        mlflow_run=run,
        class_names=["normal", "tumour"],
    )
    rows = list(csv.DictReader(open(tmp_path / "bag" / "predictions_val.csv")))
    assert len(rows) == 6 and set(rows[0]) == {
        "slide", "label", "prob_normal", "prob_tumour", "pred", "pred_class", "label_class"
    }  # fmt: skip
    assert all(r["label_class"] == ["normal", "tumour"][int(r["label"])] for r in rows)
    from monai_icmil.engines.bag_phase import _named

    assert [_named(x, ["normal", "tumour"]) for x in (1, 0.0, 1.5, "tumour", "x", None, "", 2, -1)] == [
        "tumour", "normal", "", "tumour", "", "", "", "", ""
    ]  # fmt: skip
    assert abs(float(rows[0]["prob_normal"]) + float(rows[0]["prob_tumour"]) - 1) < 1e-5
    assert all(r["pred_class"] == ["normal", "tumour"][int(r["pred"])] for r in rows)
    client = mlflow.MlflowClient(tracking_uri=sqlite_tracking_uri(tmp_path))
    data = client.get_run(run.run_id).data
    assert data.params["aggregator"] == "abmil" and data.params["optimizer"] == "Adam"
    assert data.params["optimizer.lr"] == "0.0002" and data.params["loss"] == "CrossEntropyLoss"
    history = client.get_metric_history(run.run_id, "val_auc")
    assert [m.step for m in history] == [1, 2, 3]
    assert data.metrics["best_val_auc"] == pytest.approx(result["best_metric"])
    artifacts = {a.path for a in client.list_artifacts(run.run_id, "bag_phase")}
    assert {"bag_phase/bag_classifier.pt", "bag_phase/predictions_val.csv"} <= artifacts


def test_a_user_mlflow_tracking_uri_neither_takes_the_logging_nor_outlives_the_model_logging(tmp_path, monkeypatch):
    """MONAI's handler prefers $MLFLOW_TRACKING_URI (which ``mlflow.set_tracking_uri`` exports) to its argument;
    our runs are in our store, so the handler must log there; and ``using_store`` leaves the variables as found."""
    import mlflow

    from monai_icmil.handlers.tracking import using_store

    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    ours = sqlite_tracking_uri(tmp_path / "ours")
    with using_store(ours):
        assert mlflow.get_tracking_uri() == ours and os.environ["MLFLOW_REGISTRY_URI"] == ours
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere and "MLFLOW_REGISTRY_URI" not in os.environ
    run = start_run(ours, "bag-test", "bag_phase")
    train_bag_classifier(
        ShiftedBags(6, 0), ShiftedBags(4, 1), "abmil", tmp_path / "bag", aggregator_kwargs=FAST, epochs=2,
        progress=False, device="cpu", mlflow_run=run,
    )  # fmt: skip
    history = mlflow.MlflowClient(tracking_uri=ours).get_metric_history(run.run_id, "val_auc")
    assert [m.step for m in history] == [1, 2]
    assert not (tmp_path / "elsewhere.db").exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with using_store(ours):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_standardisation_lets_the_bag_phase_learn_features_of_a_small_scale(tmp_path):
    """Features at 1/100 of unit scale (as a random-init embedder gives): raw, Adam at 2e-4 does not find the
    shifted instances in 10 epochs; standardised with training statistics, the same run does."""
    train, val = ShiftedBags(40, 0), ShiftedBags(20, 1)
    for ds in (train, val):
        ds.bags = [0.01 * b + 0.05 for b in ds.bags]
    kw = dict(aggregator_kwargs=FAST, epochs=10, progress=False, device="cpu", early_stop_patience=None)
    raw = train_bag_classifier(train, val, "abmil", tmp_path / "raw", standardize=False, **kw)
    std = train_bag_classifier(train, val, "abmil", tmp_path / "std", standardize=True, **kw)
    assert std["best_metric"] >= 0.95 and raw["best_metric"] < 0.8, (raw["best_metric"], std["best_metric"])

    every = torch.cat(train.bags).double()
    mean, sd = feature_stats(train)
    torch.testing.assert_close(mean, every.mean(0).float())
    torch.testing.assert_close(sd, every.std(0, unbiased=False).float())
    net = load_bag_classifier(tmp_path / "std" / "bag_classifier.pt")  # the statistics travel with the checkpoint
    torch.testing.assert_close(net.input_mean, mean)
    plain = create_aggregator("abmil", 32, 2, **FAST)
    plain.load_state_dict({**net.state_dict(), "input_mean": torch.zeros(32), "input_std": torch.ones(32)})
    x = val.bags[1]
    with torch.no_grad():  # the instance teacher applies them: same as standardising by hand
        torch.testing.assert_close(net.instance_logits(x), plain.instance_logits((x - mean) / net.input_std))
    assert torch.equal(load_bag_classifier(tmp_path / "raw" / "bag_classifier.pt").input_std, torch.ones(32))


def test_checkpoint_without_input_statistics_loads_as_identity(tmp_path):
    net = create_aggregator("abmil", 32, 2, **FAST)
    save_bag_classifier(tmp_path / "old.pt", net)
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    del ckpt["state_dict"]["input_mean"], ckpt["state_dict"]["input_std"]  # as saved before standardisation
    torch.save(ckpt, tmp_path / "old.pt")
    old = load_bag_classifier(tmp_path / "old.pt")
    assert torch.equal(old.input_mean, torch.zeros(32)) and torch.equal(old.input_std, torch.ones(32))


def test_restarts_keep_the_best_validation_run_and_a_rerun_skips_finished_ones(tmp_path, monkeypatch):
    train, val = ShiftedBags(12, 0), ShiftedBags(8, 1, shift=1.5)
    kw = dict(aggregator_kwargs=FAST, epochs=2, progress=False, device="cpu")
    result = train_bag_classifier(train, val, "abmil", tmp_path / "r", restarts=3, **kw)
    summary = json.loads((tmp_path / "r" / "restarts.json").read_text())
    metrics = [r["best_metric"] for r in summary["restarts"]]
    assert [r["seed"] for r in summary["restarts"]] == [0, 1, 2]
    assert summary["chosen"] == result["restart"] == int(np.argmax(metrics))  # the first of equal bests
    assert result["best_metric"] == max(metrics)
    chosen = tmp_path / "r" / f"restart_{result['restart']}"
    for name in ("bag_classifier.pt", "history.json", "predictions_val.csv"):
        assert (tmp_path / "r" / name).read_bytes() == (chosen / name).read_bytes()
    nets = [load_bag_classifier(tmp_path / "r" / f"restart_{k}" / "bag_classifier.pt") for k in range(3)]
    assert not torch.equal(nets[0].head.weight, nets[1].head.weight)  # different initialisations
    single = train_bag_classifier(train, val, "abmil", tmp_path / "single", **kw)  # restart 0 = the one-run default
    assert torch.equal(load_bag_classifier(single["checkpoint"]).head.weight, nets[0].head.weight)

    def must_not_train(*a, **k):
        raise AssertionError("a finished restart was trained again")

    monkeypatch.setattr(BagPhase, "train_once", must_not_train)
    again = train_bag_classifier(train, val, "abmil", tmp_path / "r", restarts=3, **kw)
    assert again["restart"] == result["restart"] and again["best_metric"] == result["best_metric"]
    with pytest.raises(AssertionError, match="trained again"):  # other settings: the records are not reused
        train_bag_classifier(train, val, "abmil", tmp_path / "r", restarts=3, **{**kw, "epochs": 3})
    with pytest.raises(ValueError, match="restarts must be >= 1"):
        train_bag_classifier(train, val, "abmil", tmp_path / "r", restarts=0, **kw)


def test_a_warm_start_trains_every_restart_from_the_given_state_and_keeps_its_statistics(tmp_path, monkeypatch):
    """``init_state`` (``bag_phase#warm_start``): with a learning rate of 0 the kept classifier is the state itself,
    input statistics included (not the new bags'), in every restart; a fresh start is not; a learnt state starts at
    its own validation AUC; records of one state are not reused for another; a state of another shape is refused."""
    train, val = ShiftedBags(40, 0), ShiftedBags(20, 1)
    kw = dict(progress=False, device="cpu", early_stop_patience=None)
    source = train_bag_classifier(train, val, "abmil", tmp_path / "source", aggregator_kwargs=FAST, epochs=10, **kw)
    assert source["best_metric"] >= 0.95
    state = load_bag_classifier(source["checkpoint"]).state_dict()
    moved = ShiftedBags(40, 0)  # the same bags moved: their own statistics differ from the state's
    moved.bags = [b + 0.5 for b in moved.bags]

    def run(out, init, restarts=2, epochs=2, lr=0.0):
        phase = BagPhase(
            optimizer=functools.partial(torch.optim.Adam, lr=lr),
            epochs=epochs,
            restarts=restarts,
            warm_start=True,
            **kw,
        )
        factory = functools.partial(aggregator_class("abmil"), **FAST)
        return phase(moved, val, factory, tmp_path / out, seed=3, init_state=init)

    warm = run("warm", state)
    for k in range(2):
        kept = load_bag_classifier(tmp_path / "warm" / f"restart_{k}" / "bag_classifier.pt").state_dict()
        assert kept.keys() == state.keys() and all(torch.equal(kept[n], state[n]) for n in state), k
    assert warm["best_metric"] == source["best_metric"]  # it starts where the state was
    fresh = run("fresh", None)
    kept = load_bag_classifier(fresh["checkpoint"])
    assert not torch.equal(kept.head.weight, state["head.weight"]) and fresh["best_metric"] < 0.9
    torch.testing.assert_close(kept.input_mean, feature_stats(moved)[0])  # fresh: the new bags' statistics

    def must_not_train(*a, **k):
        raise AssertionError("a finished restart was trained again")

    with monkeypatch.context() as m:
        m.setattr(BagPhase, "train_once", must_not_train)
        assert run("warm", state)["best_metric"] == warm["best_metric"]  # same state: the records are reused
        other = {n: t.clone() for n, t in state.items()}
        other["head.bias"] += 1.0
        with pytest.raises(AssertionError, match="trained again"):
            run("warm", other)
    small = create_aggregator("abmil", 32, 2, hidden_dim=16).state_dict()
    with pytest.raises(ValueError, match="warm_start.*does not fit"):
        run("small", small, restarts=1)
    with pytest.raises(ValueError, match="init_state.*warm_start is false"):
        BagPhase(**kw)(
            moved, val, functools.partial(aggregator_class("abmil"), **FAST), tmp_path / "x", init_state=state
        )


def test_warm_start_both_pools_the_fresh_and_the_warm_restarts_and_keeps_the_best_by_validation(tmp_path, monkeypatch):
    """``warm_start="both"``: restarts ``0..n-1`` are the fresh run's (their records reused, nothing trained again),
    ``n..2n-1`` start from the state with the fresh ones' seeds (the warm run's); validation decides which is kept, so
    a good state is kept and a bad one is not (the fresh run's kept classifier instead)."""
    train, val = ShiftedBags(40, 0), ShiftedBags(20, 1)
    kw = dict(progress=False, device="cpu", early_stop_patience=None)
    source = train_bag_classifier(train, val, "abmil", tmp_path / "source", aggregator_kwargs=FAST, epochs=10, **kw)
    good = load_bag_classifier(source["checkpoint"]).state_dict()
    bad = {n: -t if n.startswith("head.") else t for n, t in good.items()}  # the same classifier, its ranking flipped
    trained = []

    def run(out, mode, init, restarts=2, lr=0.0):
        adam = functools.partial(torch.optim.Adam, lr=lr)
        phase = BagPhase(optimizer=adam, epochs=2, restarts=restarts, warm_start=mode, **kw)
        factory = functools.partial(aggregator_class("abmil"), **FAST)
        return phase(train, val, factory, tmp_path / out, seed=3, init_state=init)

    fresh = run("pool", False, None)
    assert fresh["best_metric"] < 0.9 and "start" not in fresh  # lr 0: a fresh classifier stays untrained
    original = BagPhase.train_once

    def counting(self, *a, init_state=None, **k):
        trained.append(init_state is not None)
        return original(self, *a, init_state=init_state, **k)

    with monkeypatch.context() as m:
        m.setattr(BagPhase, "train_once", counting)
        both = run("pool", "both", good)
    assert trained == [True, True]  # only the warm restarts trained; the fresh ones' records were reused
    record = json.loads((tmp_path / "pool" / "restarts.json").read_text())
    assert [(r["restart"], r["seed"], r["start"]) for r in record["restarts"]] == [
        (0, 3, "fresh"), (1, 4, "fresh"), (2, 3, "warm"), (3, 4, "warm")
    ]  # fmt: skip
    assert both["start"] == "warm" and both["restart"] in (2, 3) and both["best_metric"] == source["best_metric"]
    kept = load_bag_classifier(tmp_path / "pool" / "bag_classifier.pt").state_dict()
    assert all(torch.equal(kept[n], good[n]) for n in good)
    flipped = run("flipped", "both", bad)
    assert flipped["start"] == "fresh" and flipped["restart"] == fresh["restart"]
    kept_bytes = (tmp_path / "flipped" / "bag_classifier.pt").read_bytes()
    assert kept_bytes == (tmp_path / "flipped" / f"restart_{fresh['restart']}" / "bag_classifier.pt").read_bytes()
    fresh_kept = load_bag_classifier(tmp_path / "flipped" / "bag_classifier.pt").state_dict()
    assert all(torch.equal(t, fresh["network"].state_dict()[n].cpu()) for n, t in fresh_kept.items())
    one = run("one", "both", good, restarts=1)  # one restart: one fresh and one warm training
    assert [r["start"] for r in one["restarts"]] == ["fresh", "warm"] and one["start"] == "warm"
    none = run("none", "both", None, restarts=1)  # no state (round 0): fresh only, as warm_start false
    assert none["restarts"] == fresh["restarts"][:1] and "start" not in none
    run("learn_warm", True, good, lr=1e-3)  # training: the warm restarts of "both" are those of warm_start true
    run("learn_both", "both", good, lr=1e-3)
    for k in range(2):
        a, b = (load_bag_classifier(tmp_path / d / f"restart_{j}" / "bag_classifier.pt").state_dict()
                for d, j in (("learn_warm", k), ("learn_both", k + 2)))  # fmt: skip
        assert all(torch.equal(a[n], b[n]) for n in a) and not torch.equal(a["head.weight"], good["head.weight"]), k
    with pytest.raises(ValueError, match="warm_start must be true, false or 'both', got 'sometimes'"):
        BagPhase(warm_start="sometimes")


class StopAfterFirstEpoch:
    """A bag-phase handler that interrupts the run after epoch 1 (after its resume checkpoint is written)."""

    def attach(self, engine):
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), self.stop)

    @staticmethod
    def stop(engine):
        raise KeyboardInterrupt("stopped after epoch 1")


def test_an_interrupted_warm_start_resumes_only_with_the_same_state(tmp_path):
    """The resume checkpoint's key holds the starting state: the same state resumes, another one starts again; and
    the keys of fresh trainings are those made before warm starts existed (a restart record of 8e45ac3)."""
    train, val = ShiftedBags(12, 0), ShiftedBags(8, 1)
    factory = functools.partial(aggregator_class("abmil"), **FAST)
    kw = dict(progress=False, device="cpu", early_stop_patience=None, epochs=2, warm_start=True)
    frozen = functools.partial(torch.optim.Adam, lr=0.0)  # the kept classifier is the state the run started from
    first = create_aggregator("abmil", 32, 2, **FAST).state_dict()
    torch.manual_seed(1)
    second = create_aggregator("abmil", 32, 2, **FAST).state_dict()
    with pytest.raises(KeyboardInterrupt):
        BagPhase(optimizer=frozen, handlers=[StopAfterFirstEpoch()], **kw)(
            train, val, factory, tmp_path / "w", init_state=first
        )
    assert (tmp_path / "w" / "resume").exists()
    result = BagPhase(optimizer=frozen, **kw)(train, val, factory, tmp_path / "w", init_state=second)
    kept = load_bag_classifier(result["checkpoint"]).state_dict()
    assert all(torch.equal(kept[k], second[k]) for k in second)  # started again from the new state
    with pytest.raises(KeyboardInterrupt):
        BagPhase(optimizer=frozen, handlers=[StopAfterFirstEpoch()], **kw)(
            train, val, factory, tmp_path / "v", init_state=first
        )
    resumed = BagPhase(optimizer=frozen, **kw)(train, val, factory, tmp_path / "v", init_state=first)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]  # epoch 1 from the checkpoint, then epoch 2

    fresh = BagPhase(optimizer=functools.partial(torch.optim.Adam, lr=2e-4), epochs=1, restarts=2, progress=False)
    fresh(ShiftedBags(6, 0), ShiftedBags(4, 1), factory, tmp_path / "fresh", seed=0)
    record = json.loads((tmp_path / "fresh" / "restart_0" / "restart.json").read_text())
    assert record["signature"] == "b172039dc0f08532"  # as at 8e45ac3: records of earlier runs stay valid


def test_epoch_summaries_and_restart_choice_reach_the_configured_logging(tmp_path, caplog):
    """MONAI's StatsHandler turns propagation off on its logger; ours must still reach the application's handlers."""
    import logging

    with caplog.at_level(logging.INFO):
        train_bag_classifier(
            ShiftedBags(8, 0),
            ShiftedBags(4, 1),
            "abmil",
            tmp_path,
            restarts=2,
            aggregator_kwargs=FAST,
            epochs=2,
            progress=False,
            device="cpu",
        )
    bag = [r.getMessage() for r in caplog.records if r.name == "monai_icmil.bag_phase"]
    assert any("restart 2 of 2" in m for m in bag) and any("kept" in m for m in bag), bag
    assert sum("train_loss" in m for m in bag) >= 4, bag  # per epoch, both restarts
    assert logging.getLogger("monai_icmil.bag_phase").propagate


def test_restarts_log_every_curve_and_the_kept_one_under_the_plain_names(tmp_path):
    import mlflow

    run = start_run(sqlite_tracking_uri(tmp_path), "bag-restarts", "bag_phase")
    result = train_bag_classifier(
        ShiftedBags(8, 0),
        ShiftedBags(6, 1, shift=1.5),
        "abmil",
        tmp_path / "bag",
        restarts=2,
        aggregator_kwargs=FAST,
        epochs=2,
        progress=False,
        device="cpu",
        mlflow_run=run,
    )
    client = mlflow.MlflowClient(tracking_uri=sqlite_tracking_uri(tmp_path))
    kept = [m.value for m in client.get_metric_history(run.run_id, "val_auc")]
    for k in range(2):
        assert [m.step for m in client.get_metric_history(run.run_id, f"restart_{k}.val_auc")] == [1, 2]
    chosen = [m.value for m in client.get_metric_history(run.run_id, f"restart_{result['restart']}.val_auc")]
    assert kept == chosen
    assert client.get_run(run.run_id).data.params["chosen_restart"] == str(result["restart"])


def test_the_bag_phase_loss_comes_from_the_config(tmp_path):
    """train.json's ``bag_phase#loss`` is the loss the phase trains with: a class-weighted one (an override) changes
    the trained weights, while the same config twice gives the same weights. (One bag per step: a weighted *mean*
    divides the weight out again, so class weights need ``reduction: "sum"``, as the bundle docs say.)"""
    from pathlib import Path

    from monai.bundle import ConfigParser

    from monai_icmil.networks import ABMIL

    train_json = Path(__file__).resolve().parents[1] / "bundles" / "icmil" / "configs" / "train.json"
    heads, phases = [], []
    for k, weight in enumerate((None, None, "$torch.tensor([1.0, 10.0])")):
        parser = ConfigParser()
        parser.read_config(str(train_json))
        parser.update({"bag_phase#epochs": 3, "bag_phase#restarts": 1, "progress": False, "device": "cpu"})
        if weight is not None:
            parser["bag_phase#loss#weight"] = weight
            parser["bag_phase#loss#reduction"] = "sum"
        phase = parser.get_parsed_content("bag_phase#phase")
        factory = functools.partial(ABMIL, hidden_dim=16)
        result = phase(ShiftedBags(10, 0), ShiftedBags(6, 1), factory, tmp_path / str(k))
        heads.append(result["network"].head.weight.detach().clone())
        phases.append(phase)
    assert isinstance(phases[2].loss_function, torch.nn.CrossEntropyLoss)
    assert torch.equal(phases[2].loss_function.weight, torch.tensor([1.0, 10.0]))
    assert torch.equal(heads[0], heads[1]) and not torch.allclose(heads[0], heads[2])


def test_warm_early_stop_counts_its_patience_only_after_min_epochs():
    """A validation score that never improves: MONAI's handler stops after ``patience`` epochs; the warm one first
    lets ``min_epochs`` pass, then counts its patience against the best score seen after them."""
    from ignite.engine import Engine, Events

    from monai_icmil.handlers import WarmEarlyStopHandler

    def epochs_run(min_epochs: int, scores: list[float]) -> int:
        trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
        WarmEarlyStopHandler(2, lambda _: scores[trainer.state.epoch - 1], trainer, min_epochs=min_epochs).attach(
            evaluator
        )
        trainer.run([0], max_epochs=len(scores))
        return trainer.state.epoch

    flat = [0.5] * 20
    assert epochs_run(0, flat) == 3  # best at 1, stale at 2 and 3
    assert epochs_run(5, flat) == 8  # epochs 1-5 ignored: best at 6, stale at 7 and 8
    # a noisy peak during the warm-up does not count against the learning that follows it
    plateau_then_learns = [0.9] + [0.5] * 9 + [0.6, 0.7, 0.8, 0.95, 0.97] + [0.97] * 5
    assert epochs_run(0, plateau_then_learns) == 3
    assert epochs_run(10, plateau_then_learns) == 17
    with pytest.raises(ValueError, match="min_epochs"):
        WarmEarlyStopHandler(2, lambda _: 0.0, Engine(lambda e, b: None), min_epochs=-1)


def test_the_bag_phase_honours_early_stop_min_epochs(tmp_path):
    """Bags without signal, patience 1: with ``early_stop_min_epochs=6`` the phase trains at least 8 epochs (the
    handler test above shows the stop itself); the setting enters the phase's signature only where it acts (older
    records stay valid)."""
    kw = dict(aggregator_kwargs=FAST, epochs=12, progress=False, device="cpu", early_stop_patience=1)
    labels = [0, 1] * 10
    noise = ShiftedBags(20, 0, labels=labels, shift=0.0), ShiftedBags(10, 1, labels=labels[:10], shift=0.0)
    warm = train_bag_classifier(*noise, "abmil", tmp_path / "warm", early_stop_min_epochs=6, **kw)
    assert len(warm["history"]) >= 8, warm["history"]
    assert BagPhase().signature() == BagPhase(early_stop_min_epochs=0).signature()
    assert BagPhase().signature() != BagPhase(early_stop_min_epochs=6).signature()
    no_stop = BagPhase(early_stop_patience=None)
    assert no_stop.signature() == BagPhase(early_stop_patience=None, early_stop_min_epochs=6).signature()
    with pytest.raises(ValueError, match="early_stop_min_epochs"):
        BagPhase(early_stop_min_epochs=-2)


def test_paired_test_change_reads_two_rounds_predictions(tmp_path):
    """The summary's paired change in test AUC: from the two rounds' predictions CSVs, on the slides both scored,
    equal to the metric on those slides; None without a file, for three classes, or with one class shared."""
    from monai_icmil.engines.bag_phase import write_predictions_csv
    from monai_icmil.metrics import paired_auc_difference
    from monai_icmil.workflows.summary import paired_test_change

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 30)
    p0, p1 = rng.random(30), np.clip(0.5 * labels + 0.6 * rng.random(30), 0, 1)
    for r, p in ((0, p0), (1, p1)):
        rows = [{"slide_id": f"s{i}", "label": int(y), "probs": [1 - q, q]} for i, (y, q) in enumerate(zip(labels, p))]
        if r == 1:
            rows = rows[:-1] + [{"slide_id": "other", "label": 1, "probs": [0.0, 1.0]}]  # one slide only round 1 has
        write_predictions_csv(tmp_path / f"round_{r}" / "test" / "predictions.csv", rows, ["normal", "tumour"])
    got = paired_test_change(tmp_path, 0, 1)
    want = paired_auc_difference(np.round(p0[:-1], 6), np.round(p1[:-1], 6), labels[:-1])
    assert got == pytest.approx({**want, "slides": 29})
    assert got["diff"] == pytest.approx(binary_auc(p1[:-1], labels[:-1]) - binary_auc(p0[:-1], labels[:-1]), abs=1e-5)
    assert paired_test_change(tmp_path, 0, 2) is None  # no round 2
    three = [{"slide_id": "a", "label": 0, "probs": [0.2, 0.3, 0.5]}, {"slide_id": "b", "label": 2, "probs": [0, 0, 1]}]
    write_predictions_csv(tmp_path / "round_3" / "test" / "predictions.csv", three)
    assert paired_test_change(tmp_path, 3, 3) is None
    one = [{"slide_id": "s0", "label": 1, "probs": [0.4, 0.6]}]
    write_predictions_csv(tmp_path / "round_4" / "test" / "predictions.csv", one)
    assert paired_test_change(tmp_path, 0, 4) is None
    (tmp_path / "round_5" / "test").mkdir(parents=True)
    (tmp_path / "round_5" / "test" / "predictions.csv").write_text("slide,label,prob_normal,prob_tumour\ns0,1\n")
    assert paired_test_change(tmp_path, 0, 5) is None  # a short row: unreadable, not an error


def test_the_summarys_change_in_test_auc_is_paired_when_a_round_scored_fewer_slides(tmp_path):
    """A slide that failed to read in round 1 only: the summary's round-over-round change (and coupling's, for MLflow)
    is round 1 minus round 0 on the slides both scored, not the difference of two AUCs on different slides; with the
    same slides it stays the plain difference."""
    from monai_icmil.engines.bag_phase import write_predictions_csv
    from monai_icmil.workflows.summary import coupling_metrics, paired_test_change, summary_rows, write_summary

    rng = np.random.default_rng(1)
    labels = np.array([0, 1] * 10)
    p0, p1 = rng.random(20), np.clip(0.4 * labels + 0.7 * rng.random(20), 0, 1)
    p0[-2] = 0.99  # a normal slide round 0 called tumour, then not read in round 1
    scored = {0: 20, 1: 18}
    for r, p in ((0, p0), (1, p1)):
        rows = [{"slide_id": f"s{i}", "label": int(y), "probs": [1 - q, q]} for i, (y, q) in enumerate(zip(labels, p))]
        write_predictions_csv(tmp_path / f"round_{r}" / "test" / "predictions.csv", rows[: scored[r]], ["n", "t"])
    ledger = {r: {"test": {"metrics": {"auc": binary_auc(p[: scored[r]], labels[: scored[r]])}, "slides": scored[r]}}
              for r, p in ((0, p0), (1, p1))}  # fmt: skip
    rows = summary_rows(ledger, tmp_path)
    paired = paired_test_change(tmp_path, 0, 1)
    unpaired = ledger[1]["test"]["metrics"]["auc"] - ledger[0]["test"]["metrics"]["auc"]
    assert paired["slides"] == 18 and abs(paired["diff"] - unpaired) > 0.01
    assert rows[1]["test_auc_delta"] == paired["diff"] and rows[1]["test_auc_delta_slides"] == 18
    assert coupling_metrics({r["round"]: r for r in rows}, 1, tmp_path)["coupling_test_auc_delta"] == paired["diff"]
    write_summary(tmp_path, ledger, final_round=1, title="paired")
    assert f"{paired['diff']:+.3f}" in (tmp_path / "summary.md").read_text()
    md = (tmp_path / "summary.md").read_text()
    assert "on 18 shared slides" in md and "test AUC" in md and f"({unpaired:+.3f})" not in md
    assert "final_test_auc_delta_slides" not in coupling_metrics({r["round"]: r for r in rows}, 1, tmp_path)
    scored[1] = 20
    rows = [{"slide_id": f"s{i}", "label": int(y), "probs": [1 - q, q]} for i, (y, q) in enumerate(zip(labels, p1))]
    write_predictions_csv(tmp_path / "round_1" / "test" / "predictions.csv", rows, ["n", "t"])
    ledger[1]["test"] = {"metrics": {"auc": binary_auc(p1, labels)}, "slides": 20}
    same = summary_rows(ledger, tmp_path)[1]
    assert same["test_auc_delta"] == pytest.approx(binary_auc(p1, labels) - binary_auc(p0, labels))
    assert "test_auc_delta_slides" not in same


def test_instance_loss_is_a_top_k_cross_entropy_on_the_instance_head_added_to_the_bag_loss():
    torch.manual_seed(0)
    net = create_aggregator("abmil", 16, hidden_dim=8)
    ce = torch.nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader([0])
    trainer = BagPhaseTrainer(
        torch.device("cpu"), 1, loader, net, torch.optim.SGD(net.parameters(), lr=0.0), ce,
        shuffle_instances=False, instance_weight=0.5, instance_top_k=3,
    )  # fmt: skip
    feats = torch.randn(10, 16)
    for label in (0, 1):
        y = torch.tensor([label])
        with torch.no_grad():
            inst = net.head(net.dim_reduction((feats - net.input_mean) / net.input_std))
            p0 = torch.softmax(inst, -1)[:, 0]
            top = torch.argsort(p0)[:3]  # the three least like class 0
            by_hand = -torch.log_softmax(inst[top], -1)[:, label].mean()
            bag = ce(net(feats)["logits"], y)
            assert torch.allclose(trainer.instance_loss(feats, y), by_hand, atol=1e-6)
        out = trainer._iteration(trainer, {"features": feats, "label": y, "slide_id": "s"})
        assert out["loss"] == pytest.approx(float(bag + 0.5 * by_hand), abs=1e-5)
    trainer.instance_top_k = 50  # more than the bag holds: every instance
    with torch.no_grad():
        inst = net.instance_logits(feats)
        assert torch.allclose(trainer.instance_loss(feats, torch.tensor([0])), ce(inst, torch.zeros(10).long()))


def test_the_bag_phase_with_the_instance_loss_learns_and_keeps_older_records_valid(tmp_path):
    assert BagPhase().signature() == BagPhase(instance_top_k=8).signature()  # off: records made before it still count
    assert BagPhase(instance_weight=0.5).signature() != BagPhase().signature()
    with pytest.raises(ValueError, match="instance_weight"):
        BagPhase(instance_weight=-1.0)
    result = learn_shifted_bags("abmil", tmp_path, instance_weight=0.5, instance_top_k=2)
    assert result["best_metric"] >= 0.95


def test_predictions_csv_keeps_the_order_of_a_confident_classifiers_small_probabilities(tmp_path):
    probs = torch.tensor([[1 - 1e-7, 1e-7], [1 - 3e-7, 3e-7], [1 - 2e-6, 2e-6], [0.25, 0.75]], dtype=torch.float32)
    rows = [{"slide_id": f"s{i}", "label": i % 2, "probs": p.tolist()} for i, p in enumerate(probs)]
    path = write_predictions_csv(tmp_path / "predictions.csv", rows, ["normal", "tumour"])
    got = [float(r["prob_tumour"]) for r in csv.DictReader(open(path))]
    assert np.array_equal(np.float32(got), probs[:, 1].numpy())  # float32 round-trips: no ties, the same AUC
    assert binary_auc(np.array(got), np.array([0, 1, 0, 1])) == binary_auc(probs[:, 1].numpy(), np.array([0, 1, 0, 1]))


def test_a_bag_phase_without_validation_bags_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"no validation bags, so no epoch can be chosen.*'validation' split"):
        train_bag_classifier(ShiftedBags(10, 0), ShiftedBags(0, 1), "abmil", tmp_path / "bag", progress=False)
    assert not (tmp_path / "bag" / "resume").exists()
