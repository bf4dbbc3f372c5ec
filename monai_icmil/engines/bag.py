# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The bag phase: train a MIL aggregator on frozen feature bags with slide labels.

MONAI's :class:`~monai.engines.SupervisedTrainer` and :class:`~monai.engines.SupervisedEvaluator` run one bag per
iteration through :func:`bag_train_step` / :func:`bag_eval_step`; handlers do the rest: validation every epoch,
AUC/accuracy/F1 (and at the Youden threshold), the best checkpoint by a key metric, early stopping, statistics,
a progress bar and MLflow. DTFD-MIL's two-tier loss lives inside the same training step.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from monai_icmil.data.store import BagDataset
from monai_icmil.handlers.checkpoint import PhaseProgress, ResumeCheckpoint
from monai_icmil.metrics import METRIC_NAMES, SlideMetric, slide_metrics
from monai_icmil.networks.aggregators import MILAggregator, create_aggregator
from monai_icmil.utils import atomic_path, atomic_write_json, atomic_write_text, stable_hash

__all__ = [
    "BagTrainingError",
    "bag_train_step",
    "bag_eval_step",
    "train_bag_classifier",
    "train_bag_classifier_once",
    "feature_stats",
    "predict_bags",
    "write_predictions_csv",
    "save_bag_classifier",
    "load_bag_classifier",
    "check_bag_dims",
    "evaluate_bags",
]

logger = logging.getLogger("monai_icmil.bag")
CHECKPOINT_FORMAT = "monai-icmil-bag-classifier/1"


class BagTrainingError(RuntimeError):
    """The bag phase cannot go on (e.g. a non-finite loss); the message names the epoch and the slide."""


def _first(batch: list[Any]) -> Any:
    return batch[0]


def check_bag_dims(dataset: Dataset, in_dim: int) -> None:
    """Raise a clear error naming the first slide whose feature dimension differs from the model's."""
    for i in range(len(dataset)):
        bag = dataset[i]
        if bag["features"].shape[-1] != in_dim:
            raise ValueError(
                f"slide '{bag['slide_id']}' has {bag['features'].shape[-1]}-d features but the bag classifier expects "
                f"{in_dim}-d: were its features made by another embedder? Re-run the embedding phase."
            )


def _class_weight_tensor(class_weights: Any, labels: Sequence[int], num_classes: int) -> torch.Tensor | None:
    if class_weights is None:
        return None
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be None, 'balanced' or a list, got {class_weights!r}")
        counts = np.bincount(np.asarray(labels, int), minlength=num_classes).astype(float)
        w = counts.sum() / (num_classes * np.maximum(counts, 1))
        return torch.tensor(w, dtype=torch.float32)
    w = torch.as_tensor(class_weights, dtype=torch.float32)
    if w.numel() != num_classes:
        raise ValueError(f"class_weights has {w.numel()} entries for {num_classes} classes")
    return w


def bag_train_step(engine: Engine, batch: Mapping[str, Any]) -> dict[str, Any]:
    """One bag: instance shuffling (and optional subsampling), forward, loss, clipped Adam step.

    Reads ``engine.network``, ``engine.optimizer``, and from ``engine.bag_cfg``: ``class_weights``,
    ``grad_clip``, ``shuffle_instances``, ``max_instances``, ``tier1_weight``.
    """
    net: MILAggregator = engine.network
    cfg = engine.bag_cfg
    feats = batch["features"].to(cfg["device"]).float()
    if len(feats) == 0:
        warnings.warn(f"empty bag for slide '{batch['slide_id']}' skipped", stacklevel=2)
        return {"loss": float("nan"), "skipped": True}
    if cfg["shuffle_instances"]:
        feats = feats[torch.randperm(len(feats), device=feats.device)]
    if cfg["max_instances"] and len(feats) > cfg["max_instances"]:
        feats = feats[: cfg["max_instances"]]
    label = batch["label"].reshape(1).to(feats.device)
    net.train()
    out = net(feats)
    weight = cfg["class_weights"].to(feats.device) if cfg["class_weights"] is not None else None
    loss = F.cross_entropy(out["logits"], label, weight=weight)
    if "tier1_logits" in out:  # DTFD: each pseudo-bag carries the slide's label
        t1 = out["tier1_logits"]
        loss = loss + cfg["tier1_weight"] * F.cross_entropy(t1, label.expand(len(t1)), weight=weight)
    if not torch.isfinite(loss):
        raise BagTrainingError(
            f"non-finite loss ({loss.item()}) at epoch {engine.state.epoch}, slide '{batch['slide_id']}'. Training "
            "stopped; the best checkpoint so far is kept. Lower the learning rate or check that slide's features."
        )
    engine.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
    engine.optimizer.step()
    return {"loss": loss.item(), "pred": torch.softmax(out["logits"].detach(), -1).cpu(), "label": label.cpu()}


def bag_eval_step(engine: Engine, batch: Mapping[str, Any]) -> dict[str, Any]:
    """One bag through the network in eval mode: slide probabilities, label and id."""
    net: MILAggregator = engine.network
    net.eval()
    feats = batch["features"].to(engine.bag_device).float()
    with torch.no_grad():
        probs = torch.softmax(net(feats)["logits"], -1).cpu()
    return {"pred": probs, "label": batch["label"].reshape(1).cpu(), "slide_id": batch["slide_id"]}


def save_bag_classifier(
    path: str | os.PathLike,
    net: MILAggregator,
    name: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save weights + architecture (loadable with ``weights_only=True``), atomically."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "aggregator": name,
        "config": net.config(),
        "kwargs": getattr(net, "build_kwargs", {}),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "extra": dict(extra or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def load_bag_classifier(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    expect_in_dim: int | None = None,
    expect_aggregator: str | None = None,
) -> MILAggregator:
    """Rebuild a bag classifier saved by :func:`save_bag_classifier` (``weights_only=True``).

    Raises:
        ValueError: the checkpoint is not a bag classifier, or does not match the expected aggregator / feature dim.
    """
    try:
        ckpt = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read bag classifier '{path}' ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"'{path}' is not a monai-icmil bag classifier checkpoint")
    cfg = ckpt["config"]
    if (
        expect_aggregator is not None
        and create_aggregator(expect_aggregator, 1).__class__ is not create_aggregator(ckpt["aggregator"], 1).__class__
    ):
        raise ValueError(
            f"'{path}' holds a '{ckpt['aggregator']}' bag classifier, but '{expect_aggregator}' was configured."
        )
    if expect_in_dim is not None and cfg["in_dim"] != expect_in_dim:
        raise ValueError(
            f"'{path}' expects {cfg['in_dim']}-d features but the embedder gives {expect_in_dim}-d: it belongs to "
            "another embedder."
        )
    kwargs = {k: v for k, v in cfg.items() if k not in ("in_dim", "num_classes")}
    kwargs.update(ckpt.get("kwargs", {}))
    net = create_aggregator(ckpt["aggregator"], cfg["in_dim"], cfg["num_classes"], **kwargs)
    state = dict(ckpt["state_dict"])
    for name in ("input_mean", "input_std"):  # checkpoints from before input standardisation: identity
        state.setdefault(name, net.state_dict()[name])
    net.load_state_dict(state)
    net.build_kwargs = ckpt.get("kwargs", {})
    return net


def predict_bags(net: MILAggregator, dataset: Dataset, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """``[{"slide_id", "label", "probs"}]`` for every bag of ``dataset`` (eval mode, no gradient)."""
    net = net.to(device).eval()
    rows = []
    with torch.no_grad():
        for i in range(len(dataset)):
            bag = dataset[i]
            if len(bag["features"]) == 0:
                warnings.warn(f"empty bag for slide '{bag['slide_id']}' skipped", stacklevel=2)
                continue
            probs = torch.softmax(net(bag["features"].to(device).float())["logits"], -1)[0].cpu()
            rows.append({"slide_id": bag["slide_id"], "label": int(bag["label"]), "probs": probs.tolist()})
    return rows


def write_predictions_csv(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], class_names: Sequence[str] | None = None
) -> Path:
    """``slide,label,prob_<class>...,pred,pred_class`` (atomic): ``label`` and ``pred`` are class indices (``label``
    empty for unlabelled slides), ``pred_class`` the predicted class's name."""
    n = len(rows[0]["probs"]) if rows else len(class_names or [0, 1])
    names = list(class_names) if class_names else [str(c) for c in range(n)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slide", "label", *[f"prob_{c}" for c in names], "pred", "pred_class"])
    for r in rows:
        label = "" if r.get("label") is None else r["label"]
        pred = int(np.argmax(r["probs"]))
        w.writerow([r["slide_id"], label, *[f"{p:.6f}" for p in r["probs"]], pred, names[pred]])
    return atomic_write_text(path, buf.getvalue())


def feature_stats(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of every instance of every bag (float64 running sums)."""
    total, total_sq, n = None, None, 0
    for i in range(len(dataset)):
        feats = dataset[i]["features"].double()
        if len(feats) == 0:
            continue
        s, sq = feats.sum(0), (feats * feats).sum(0)
        total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
        n += len(feats)
    if not n:
        raise ValueError("no instances to compute feature statistics from (every bag is empty).")
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()


def train_bag_classifier(
    train_ds: BagDataset,
    val_ds: BagDataset,
    aggregator: str = "abmil",
    output_dir: str | os.PathLike = "bag",
    restarts: int = 1,
    seed: int = 0,
    mlflow_run: Any = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train a bag classifier ``restarts`` times from different initialisations and keep the best by validation.

    On weak features and low witness rates a bag classifier may latch onto a wrong signal from one initialisation
    and find the tumour from another; the restart with the highest best validation ``key_metric`` (ties: the
    earliest) is kept. Each restart trains in ``output_dir/restart_<k>/`` with seed ``seed + k`` and records its
    outcome there, so an interrupted phase skips the finished restarts and resumes the unfinished one. The chosen
    restart's checkpoint, predictions and history are copied into ``output_dir`` and ``restarts.json`` lists
    them all. With ``restarts=1`` everything is written into ``output_dir`` directly.

    Args:
        train_ds, val_ds, aggregator, output_dir, seed, mlflow_run, progress, class_names: as
            :func:`train_bag_classifier_once`.
        restarts: number of initialisations to try (>= 1).
        kwargs: the other arguments of :func:`train_bag_classifier_once`.

    Returns:
        The chosen restart's result (as :func:`train_bag_classifier_once`), plus ``"restart"`` (its index) and
        ``"restarts"`` (``[{"restart", "seed", "best_metric", "best_epoch"}]``).
    """
    restarts = int(restarts)
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    common = dict(aggregator=aggregator, progress=progress, class_names=class_names, **kwargs)
    if restarts == 1:
        result = train_bag_classifier_once(
            train_ds, val_ds, output_dir=output_dir, seed=seed, mlflow_run=mlflow_run, **common
        )
        summary = {"restart": 0, "seed": seed, "best_metric": result["best_metric"], "best_epoch": result["best_epoch"]}
        return {**result, "restart": 0, "restarts": [summary]}
    out_dir = Path(output_dir)
    signature = stable_hash({"bags": _bags_signature(train_ds, val_ds), "settings": common})
    runs = []
    for k in range(restarts):
        sub = out_dir / f"restart_{k}"
        record = sub / "restart.json"
        done = json.loads(record.read_text()) if record.is_file() else None
        if done is None or done.get("signature") != signature:
            logger.info("bag phase: restart %d of %d (seed %d)", k + 1, restarts, seed + k)
            res = train_bag_classifier_once(train_ds, val_ds, output_dir=sub, seed=seed + k, **common)
            done = {
                "restart": k,
                "seed": seed + k,
                "best_metric": res["best_metric"],
                "best_epoch": res["best_epoch"],
                "val": res["val"],
                "signature": signature,
            }
            atomic_write_json(record, done)
        runs.append(done)
    best = max(range(restarts), key=lambda k: (_finite(runs[k]["best_metric"]), -k))
    chosen = out_dir / f"restart_{best}"
    for name in ("bag_classifier.pt", "predictions_train.csv", "predictions_val.csv", "history.json"):
        with atomic_path(out_dir / name) as tmp:
            shutil.copyfile(chosen / name, tmp)
    summaries = [{k: r[k] for k in ("restart", "seed", "best_metric", "best_epoch")} for r in runs]
    atomic_write_json(out_dir / "restarts.json", {"chosen": best, "restarts": summaries})
    logger.info(
        "bag phase: restart %d kept (best validation %s %s)",
        best,
        kwargs.get("key_metric", "auc"),
        ", ".join(f"{_finite(r['best_metric']):.3f}" for r in runs),
    )
    history = json.loads((chosen / "history.json").read_text())
    if mlflow_run is not None:
        mlflow_run.log_params({"restarts": restarts, "chosen_restart": best, "aggregator": aggregator, "seed": seed})
        for k in range(restarts):  # every restart's curves under its own prefix; the kept one's also unprefixed
            for row in json.loads((out_dir / f"restart_{k}" / "history.json").read_text()):
                values = {m: v for m, v in row.items() if m != "epoch" and math.isfinite(v)}
                prefixed = {f"restart_{k}.{m}": v for m, v in values.items()}
                mlflow_run.log_metrics({**prefixed, **(values if k == best else {})}, step=row["epoch"])
        mlflow_run.log_metrics({f"best_{m}": v for m, v in runs[best]["val"].items() if m.startswith("val_")})
        mlflow_run.log_artifacts(
            [out_dir / n for n in ("bag_classifier.pt", "predictions_val.csv", "predictions_train.csv", "history.json")]
            + [out_dir / "restarts.json"],
            artifact_path="bag_phase",
        )
    return {
        "best_metric": runs[best]["best_metric"],
        "best_epoch": runs[best]["best_epoch"],
        "checkpoint": str(out_dir / "bag_classifier.pt"),
        "val": runs[best]["val"],
        "history": history,
        "network": load_bag_classifier(out_dir / "bag_classifier.pt", _device(kwargs.get("device"))),
        "restart": best,
        "restarts": summaries,
    }


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _bags_signature(train_ds: Dataset, val_ds: Dataset) -> dict[str, Any]:
    return {
        "train": [(i["slide_id"], int(i["label"]), i.get("key")) for i in train_ds.items],
        "val": [(i["slide_id"], int(i["label"]), i.get("key")) for i in val_ds.items],
    }


def train_bag_classifier_once(
    train_ds: BagDataset,
    val_ds: BagDataset,
    aggregator: str = "abmil",
    output_dir: str | os.PathLike = "bag",
    num_classes: int = 2,
    aggregator_kwargs: Mapping[str, Any] | None = None,
    epochs: int = 50,
    lr: float = 2e-4,
    weight_decay: float = 1e-4,
    grad_clip: float = 5.0,
    lr_schedule: str | None = "cosine",
    class_weights: Any = None,
    shuffle_instances: bool = True,
    max_instances: int | None = None,
    tier1_weight: float = 1.0,
    key_metric: str = "auc",
    early_stop_patience: int | None = 10,
    standardize: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
    init: MILAggregator | None = None,
    mlflow_run: Any = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train a bag classifier once, keep the best by a validation metric, and write predictions.

    Every epoch the whole state (network, Adam, scheduler, early-stopping counters, epoch, best score, random
    generators) is checkpointed into ``output_dir/resume/``; the same call after an interruption continues from
    there and ends exactly as an uninterrupted run (on CPU). The checkpoints are removed when training ends.

    Args:
        train_ds, val_ds: bags (:class:`~monai_icmil.data.store.BagDataset`).
        aggregator: ``"maxpool"``, ``"abmil"``, ``"dtfd"``, ``"mean"`` or ``"transformer"``.
        output_dir: ``bag_classifier.pt`` (best), ``predictions_{train,val}.csv``, ``history.json`` go here.
        num_classes: number of classes.
        aggregator_kwargs: extra arguments of the aggregator (hidden_dim, dropout, num_groups, distill, ...).
        epochs, lr, weight_decay, grad_clip: Adam and its schedule (paper: 2e-4, 1e-4, clip 5).
        lr_schedule: ``"cosine"``, ``"step"`` (x0.2 at half) or ``None``.
        class_weights: ``None``, ``"balanced"`` or a list per class.
        shuffle_instances, max_instances: bag augmentation.
        tier1_weight: weight of DTFD's tier-1 loss.
        key_metric: validation metric that selects the best checkpoint (one of auc, acc, f1, youden_acc, youden_f1).
        early_stop_patience: epochs without improvement of ``key_metric`` before stopping (``None``: never).
        standardize: standardise every feature dimension with the mean and standard deviation over the training
            instances; the statistics are part of the network (:meth:`MILAggregator.set_input_stats`), so the
            instance teacher and inference apply them too. Features of a random-init or self-supervised embedder
            can have a scale at which the default learning rate does not move the loss at all. With ``init``, its
            own statistics are kept.
        seed: seeds the initialisation, instance shuffling and DTFD pseudo-bags.
        init: start from this network instead of a fresh one.
        mlflow_run: a :class:`~monai_icmil.handlers.tracking.MLflowRun` to log params, metrics and artifacts into.
        progress: show a progress bar.
        class_names: names in the predictions CSV header.

    Returns:
        ``{"best_metric", "best_epoch", "checkpoint", "val": metrics at the best epoch, "history": [...]}``.

    Raises:
        BagTrainingError: non-finite loss (names epoch and slide); the best checkpoint so far stays on disk.
        ValueError: bags whose feature dim differs from the model's (names the slide).
    """
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import EarlyStopHandler, ValidationHandler
    from monai.utils import set_determinism

    from monai_icmil.handlers.stats import stats_handler

    if key_metric not in METRIC_NAMES:
        raise ValueError(f"key_metric must be one of {METRIC_NAMES}, got {key_metric!r}")
    if len(train_ds) == 0:
        raise ValueError("the bag phase has no training bags (all slides failed or were empty).")
    device = _device(device)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_determinism(seed)
    in_dim = int(train_ds[0]["features"].shape[-1])
    kwargs = dict(aggregator_kwargs or {})
    net = init if init is not None else create_aggregator(aggregator, in_dim, num_classes, **kwargs)
    net.build_kwargs = {k: v for k, v in kwargs.items() if k not in net.config()}
    if standardize and init is None:
        net.set_input_stats(*feature_stats(train_ds))
    net = net.to(device)
    check_bag_dims(train_ds, net.in_dim)
    check_bag_dims(val_ds, net.in_dim)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    labels = [int(item["label"]) for item in train_ds.items]
    # the slide order of epoch e depends on (seed, e) only (MONAI's trainer calls set_epoch), and the loaders have
    # their own generators: a resumed run sees the same order and leaves the global generators alone
    sampler = DistributedSampler(train_ds, num_replicas=1, rank=0, shuffle=True, seed=seed)
    train_loader = DataLoader(
        train_ds, batch_size=1, sampler=sampler, collate_fn=_first, generator=torch.Generator().manual_seed(seed)
    )
    val_loader = DataLoader(
        val_ds, batch_size=1, shuffle=False, collate_fn=_first, generator=torch.Generator().manual_seed(seed)
    )
    metrics = {f"val_{m}": SlideMetric(m) for m in METRIC_NAMES}

    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=val_loader,
        network=net,
        iteration_update=bag_eval_step,
        key_val_metric={f"val_{key_metric}": metrics.pop(f"val_{key_metric}")},
        additional_metrics=metrics,
        decollate=False,
    )
    evaluator.bag_device = device
    evaluator.logger.setLevel(logging.WARNING)  # one validation per epoch: the stats handler reports it
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=train_loader,
        network=net,
        optimizer=optimizer,
        loss_function=F.cross_entropy,
        iteration_update=bag_train_step,
        decollate=False,
    )
    trainer.bag_cfg = {
        "device": device,
        "class_weights": _class_weight_tensor(class_weights, labels, num_classes),
        "grad_clip": grad_clip,
        "shuffle_instances": shuffle_instances,
        "max_instances": max_instances,
        "tier1_weight": tier1_weight,
    }
    if lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    elif lr_schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(epochs // 2, 1), gamma=0.2)
    elif lr_schedule in (None, "none"):
        scheduler = None
    else:
        raise ValueError(f"lr_schedule must be 'cosine', 'step' or None, got {lr_schedule!r}")
    if scheduler is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: scheduler.step())

    progress_state = PhaseProgress({"metric": -math.inf, "epoch": 0, "val": {}})
    history, best = progress_state.history, progress_state.best
    ckpt_path = out_dir / "bag_classifier.pt"

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _record(ev: Engine) -> None:
        epoch = trainer.state.epoch
        row = {"epoch": epoch, "train_loss": trainer.state.metrics.get("train_loss", float("nan"))}
        row.update({k: float(v) for k, v in ev.state.metrics.items()})
        history.append(row)
        score = row[f"val_{key_metric}"]
        if (not math.isnan(score) and score > best["metric"]) or (best["epoch"] == 0 and math.isnan(score)):
            best.update(metric=score, epoch=epoch, val=row)
            save_bag_classifier(ckpt_path, net, aggregator, {"epoch": epoch, f"val_{key_metric}": score})

    @trainer.on(Events.EPOCH_STARTED)
    def _reset_losses(tr: Engine) -> None:
        tr.state.epoch_losses = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _collect_loss(tr: Engine) -> None:
        tr.state.epoch_losses.append(tr.state.output["loss"])

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch_loss(tr: Engine) -> None:
        tr.state.metrics["train_loss"] = float(np.nanmean(tr.state.epoch_losses or [np.nan]))

    ValidationHandler(validator=evaluator, interval=1, epoch_level=True).attach(trainer)  # after the loss is known

    resumable = {"trainer": trainer, "network": net, "optimizer": optimizer, "progress": progress_state}
    if scheduler is not None:
        resumable["scheduler"] = scheduler
    if early_stop_patience:
        early_stop = EarlyStopHandler(
            patience=early_stop_patience,
            score_function=lambda ev: _finite(ev.state.metrics[f"val_{key_metric}"]),
            trainer=trainer,
            epoch_level=True,
        )
        early_stop.attach(evaluator)
        resumable["early_stop"] = early_stop._handler
    signature = stable_hash(
        {
            "aggregator": aggregator,
            "kwargs": kwargs,
            "in_dim": in_dim,
            "num_classes": num_classes,
            **_bags_signature(train_ds, val_ds),
            "settings": [epochs, lr, weight_decay, grad_clip, lr_schedule, class_weights, shuffle_instances],
            "more": [max_instances, tier1_weight, key_metric, early_stop_patience, seed, init is not None, standardize],
        }
    )
    resume = ResumeCheckpoint(out_dir / "resume", resumable, signature)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, resume)  # after validation: the epoch's best and counters

    stats_handler(
        "monai_icmil.bag", tag_name="train_loss", output_transform=lambda o: o["loss"], iteration_log=False
    ).attach(trainer)
    stats_handler("monai_icmil.bag", output_transform=lambda o: None, iteration_log=False).attach(evaluator)
    if progress:
        from ignite.contrib.handlers import ProgressBar

        ProgressBar(desc="bag phase", persist=False).attach(trainer, output_transform=lambda o: {"loss": o["loss"]})
    if mlflow_run is not None:  # MONAI's MLFlowHandler logs per-epoch metrics of both engines into our run
        from monai_icmil.handlers.tracking import mlflow_handler

        mlflow_handler(mlflow_run, iteration_log=False, epoch_log=True).attach(trainer)
        mlflow_handler(mlflow_run, iteration_log=False, epoch_log=True).attach(evaluator)
        mlflow_run.log_params(
            {
                "aggregator": aggregator,
                "in_dim": in_dim,
                "num_classes": num_classes,
                "hidden_dim": net.hidden_dim,
                "optimizer": "Adam",
                "lr": lr,
                "weight_decay": weight_decay,
                "grad_clip": grad_clip,
                "epochs": epochs,
                "lr_schedule": lr_schedule,
                "class_weights": class_weights,
                "max_instances": max_instances,
                "key_metric": key_metric,
                "seed": seed,
                **{f"aggregator.{k}": v for k, v in kwargs.items()},
            }
        )
    try:
        resume.run(trainer)  # continues an interrupted run (logs where from)
    except BagTrainingError:
        if mlflow_run is not None:
            mlflow_run.set_tag("bag_phase_error", "non-finite loss")
        raise
    best_net = load_bag_classifier(ckpt_path, device)
    preds = {}
    for split, ds in (("train", train_ds), ("val", val_ds)):
        preds[split] = predict_bags(best_net, ds, device)
        write_predictions_csv(out_dir / f"predictions_{split}.csv", preds[split], class_names)
    atomic_write_json(out_dir / "history.json", history)
    resume.clear()
    if mlflow_run is not None:
        mlflow_run.log_metrics({f"best_{k}": v for k, v in best["val"].items() if k.startswith("val_")})
        mlflow_run.log_artifacts(
            [ckpt_path, out_dir / "predictions_val.csv", out_dir / "predictions_train.csv", out_dir / "history.json"],
            artifact_path="bag_phase",
        )
    return {
        "best_metric": best["metric"],
        "best_epoch": best["epoch"],
        "checkpoint": str(ckpt_path),
        "val": best["val"],
        "history": history,
        "network": best_net,
    }


def _finite(x: float) -> float:
    return -1e9 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def evaluate_bags(net: MILAggregator, dataset: Dataset, device: str | torch.device = "cpu") -> tuple[dict, list]:
    """Metrics and per-slide rows of ``net`` on ``dataset``."""
    rows = predict_bags(net, dataset, device)
    if not rows:
        return {m: float("nan") for m in METRIC_NAMES}, rows
    probs = np.array([r["probs"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    return slide_metrics(probs, labels), rows
