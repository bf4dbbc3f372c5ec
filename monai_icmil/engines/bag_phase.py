# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The bag phase: a MIL aggregator trained on frozen feature bags with slide labels.

:class:`BagPhase` is the phase as the bundle declares it (``bag_phase`` in ``configs/train.json``): its loss,
optimizer and learning-rate schedule (components), its handlers and settings. Called with the training and
validation bags and an aggregator factory, it trains ``restarts`` bag classifiers from different initialisations and
keeps the best by validation. Each training is an engine pair with steps of their own, :class:`BagPhaseTrainer` (one
bag per iteration: instance shuffling, forward, loss, clipped optimizer step; DTFD-MIL's tier-1 loss included) and
:class:`BagPhaseEvaluator`, and handlers attached by events: validation every epoch, :class:`BagSelection` (history
and the best checkpoint by a key metric), early stopping, the learning-rate schedule, a resume checkpoint every
epoch, statistics, a progress bar, MLflow and the bundle's own handlers.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from monai_icmil.data.store import BagDataset
from monai_icmil.engines.witness_search import SingleClassError, WitnessSearchResult, as_witness_search
from monai_icmil.handlers.checkpoint import PhaseProgress, ResumeCheckpoint
from monai_icmil.handlers.common import EpochLoss, attach_handlers, attach_progress_bar, describe_components
from monai_icmil.handlers.early_stop import WarmEarlyStopHandler
from monai_icmil.metrics import METRIC_NAMES, SLIDE_METRICS, SlideMetric, slide_metrics
from monai_icmil.networks.aggregators import MILAggregator, aggregator_class, aggregator_factory, aggregator_name
from monai_icmil.utils import (
    as_bool,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    component_signature,
    default_device,
    stable_hash,
    update_state_digest,
)

__all__ = [
    "BagTrainingError",
    "BagPhase",
    "BagPhaseTrainer",
    "BagPhaseEvaluator",
    "BagSelection",
    "feature_stats",
    "predict_bags",
    "write_predictions_csv",
    "save_bag_classifier",
    "load_bag_classifier",
    "check_bag_dims",
    "evaluate_bags",
    "restart_rank",
]

logger = logging.getLogger("monai_icmil.bag_phase")
CHECKPOINT_FORMAT = "monai-icmil-bag-classifier/2"
_OLD_FORMAT = "monai-icmil-bag-classifier/1"
_OUTPUTS = ("bag_classifier.pt", "predictions_train.csv", "predictions_val.csv", "history.json")

AggregatorFactory = Callable[..., MILAggregator]


class BagTrainingError(RuntimeError):
    """The bag phase cannot go on (e.g. a non-finite loss); the message names the epoch and the slide."""


def _first(batch: list[Any]) -> Any:
    return batch[0]


def _finite(x: float | None) -> float:
    return -1e9 if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# ---------------------------------------------------------------------------------------------------- engines


class BagPhaseTrainer(SupervisedTrainer):
    """MONAI's trainer with the bag phase's step: one bag per iteration.

    The step shuffles the bag's instances (and keeps the first ``max_instances``), runs the aggregator, applies
    ``loss_function`` to the slide logits (and, weighted by ``tier1_weight``, to DTFD-MIL's pseudo-bag logits, each
    carrying the slide's label), adds the instance loss where ``instance_weight`` > 0, refuses a non-finite loss, and
    takes a clipped optimizer step.

    Args:
        device, max_epochs, train_data_loader, network, optimizer, loss_function: as MONAI's
            :class:`~monai.engines.SupervisedTrainer` (one bag per batch: ``{"features" [N, D], "label",
            "slide_id"}``).
        grad_clip: gradient-norm clip of the whole network (0/``None``: none).
        shuffle_instances: shuffle the instances of each bag.
        max_instances: keep at most this many (shuffled) instances per bag.
        tier1_weight: weight of DTFD-MIL's tier-1 loss.
        instance_weight: weight of a top-k instance loss on the instance head (the ICMIL teacher,
            :meth:`MILAggregator.instance_logits`): the ``instance_top_k`` instances of the bag that look least like
            class 0 (highest ``-log p(class 0)``) carry the bag's label. On a class-0 bag every instance is known to be
            class 0, and its most positive-looking ones are pushed down; on a positive bag the top ones are pushed up
            (top-k MIL, as CLAM's instance loss). 0: off. On tumour in 0.5-3 % of the tissue it found the tumour
            patches on one seed of four and memorised other patches of the positive training slides on three (their
            teachers' patch AUC below chance on two; ``benchmarks/RESULTS.md``, session 48): hence off by default.
        instance_top_k: instances per bag in the instance loss (at most the bag's size).
    """

    def __init__(
        self,
        device: torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: MILAggregator,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable[..., torch.Tensor],
        grad_clip: float | None = 5.0,
        shuffle_instances: bool = True,
        max_instances: int | None = None,
        tier1_weight: float = 1.0,
        instance_weight: float = 0.0,
        instance_top_k: int = 4,
    ):
        if isinstance(loss_function, torch.nn.Module):
            loss_function = loss_function.to(device)  # e.g. class weights
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            decollate=False,
        )
        self.grad_clip, self.shuffle_instances, self.max_instances = grad_clip, shuffle_instances, max_instances
        self.tier1_weight, self.instance_weight, self.instance_top_k = tier1_weight, instance_weight, instance_top_k

    def instance_loss(self, feats: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The top-k instance loss of one bag (``feats [N, D]``, ``label [1]``): see ``instance_weight``."""
        inst = self.network.instance_logits(feats)
        k = min(int(self.instance_top_k), len(inst))
        top = torch.topk(-torch.log_softmax(inst, dim=-1)[:, 0], k).indices
        return self.loss_function(inst[top], label.expand(k))

    def _iteration(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        feats = batchdata["features"].to(self.state.device).float()
        if len(feats) == 0:
            warnings.warn(f"empty bag for slide '{batchdata['slide_id']}' skipped", stacklevel=2)
            return {"loss": float("nan"), "skipped": True}
        if self.shuffle_instances:
            feats = feats[torch.randperm(len(feats), device=feats.device)]
        if self.max_instances and len(feats) > self.max_instances:
            feats = feats[: self.max_instances]
        label = batchdata["label"].reshape(1).to(feats.device)
        self.network.train()
        out = self.network(feats)
        loss = self.loss_function(out["logits"], label)
        if "tier1_logits" in out:  # DTFD: each pseudo-bag carries the slide's label
            t1 = out["tier1_logits"]
            loss = loss + self.tier1_weight * self.loss_function(t1, label.expand(len(t1)))
        if self.instance_weight:
            loss = loss + self.instance_weight * self.instance_loss(feats, label)
        if not torch.isfinite(loss):
            raise BagTrainingError(
                f"non-finite loss ({loss.item()}) at epoch {self.state.epoch}, slide '{batchdata['slide_id']}'. "
                "Training stopped; the best checkpoint so far is kept. Lower the learning rate or check that slide's "
                "features."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        self.optimizer.step()
        return {"loss": loss.item(), "pred": torch.softmax(out["logits"].detach(), -1).cpu(), "label": label.cpu()}


class BagPhaseEvaluator(SupervisedEvaluator):
    """MONAI's evaluator with the bag phase's step: one bag through the network in eval mode (slide probabilities,
    label and id), for the slide metrics (:class:`~monai_icmil.metrics.SlideMetric`)."""

    def _iteration(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        self.network.eval()
        feats = batchdata["features"].to(self.state.device).float()
        with torch.no_grad():
            probs = torch.softmax(self.network(feats)["logits"], -1).cpu()
        return {"pred": probs, "label": batchdata["label"].reshape(1).cpu(), "slide_id": batchdata["slide_id"]}


class BagSelection:
    """After each validation: a history row (epoch, training loss, validation metrics) and, when the key metric
    improved (or stayed equal with a lower validation loss: a small validation set reaches an AUC of 1.0 early, and
    the epochs after it are then told apart by how sure they are), the bag classifier saved as the best checkpoint
    (the first epoch's is kept if the metric is undefined).

    Args:
        trainer: the bag phase's trainer (epoch and ``train_loss``).
        progress: where the history and the best record live (part of the resume checkpoint).
        key_metric: the selecting metric (``"auc"``, ...).
        checkpoint: the best bag classifier's path.
    """

    def __init__(self, trainer: Engine, progress: PhaseProgress, key_metric: str, checkpoint: str | os.PathLike):
        self.trainer, self.progress, self.key = trainer, progress, f"val_{key_metric}"
        self.checkpoint = Path(checkpoint)

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, evaluator: Engine) -> None:
        epoch, best = self.trainer.state.epoch, self.progress.best
        row = {"epoch": epoch, "train_loss": self.trainer.state.metrics.get("train_loss", float("nan"))}
        row.update({k: float(v) for k, v in evaluator.state.metrics.items()})
        self.progress.history.append(row)
        score, loss = row[self.key], row.get("val_loss", math.inf)
        better = score > best["metric"] or (score == best["metric"] and loss < best.get("loss", math.inf))
        if (not math.isnan(score) and better) or (best["epoch"] == 0 and math.isnan(score)):
            best.update(metric=score, epoch=epoch, val=row, loss=loss)
            save_bag_classifier(self.checkpoint, self.trainer.network, {"epoch": epoch, self.key: score})


# ---------------------------------------------------------------------------------------------------- the phase


class BagPhase:
    """ICMIL's bag phase as configured: trains a bag classifier on frozen bags, ``restarts`` times, keeps the best.

    On weak features and low witness rates a bag classifier may latch onto a wrong signal from one initialisation and
    find the tumour from another; the restart with the highest best validation ``key_metric`` (ties: the earliest) is
    kept. Each restart trains in ``output_dir/restart_<k>/`` with seed ``seed + k`` and records its outcome there, so
    an interrupted phase skips the finished restarts and resumes the unfinished one from its last epoch (the whole
    state: network, optimizer, scheduler, early-stopping counters, best score, random generators; on CPU it ends
    exactly as an uninterrupted run). With ``restarts=1`` everything is written into ``output_dir`` directly.

    Args:
        loss_function: slide-level loss on ``(logits [B, C], labels [B])`` (default: cross-entropy).
        optimizer: a factory called with the network's parameters (default: Adam, lr 2e-4, weight decay 1e-4).
        lr_scheduler: a factory called with the optimizer, stepped every epoch (``None``: constant learning rate).
        handlers: more handlers for the trainer (objects with ``attach``, or classes/partials building them),
            attached after the phase's own, so at an epoch's end they see its loss, validation metrics and the best
            checkpoint.
        epochs: most epochs per restart.
        restarts: initialisations to try (>= 1).
        key_metric: the validation metric that selects the epoch and the restart (one of auc, acc, f1, youden_acc,
            youden_f1).
        early_stop_patience: epochs without improvement of ``key_metric`` before stopping (``None``: never).
        early_stop_min_epochs: epochs before the patience starts counting. On slides with a low witness rate an
            attention-based aggregator can sit on a loss plateau for 18-41 epochs before it finds the tumour patches
            (AB-MIL on 240 slides with tumour in 0.5-3 % of the tissue: ``benchmarks/RESULTS.md``, "Large slides");
            a patience counted from epoch 1 stops it there, at a validation peak that is noise.
        grad_clip: gradient-norm clip.
        standardize: standardise every feature dimension with the mean and standard deviation over the training
            instances; the statistics are part of the network (:meth:`MILAggregator.set_input_stats`), so the
            instance teacher and inference apply them too. Features of a random-init or self-supervised embedder can
            have a scale at which the default learning rate does not move the loss at all.
        shuffle_instances, max_instances, tier1_weight, instance_weight, instance_top_k: see
            :class:`BagPhaseTrainer`.
        warm_start: start from a given state instead of a fresh initialisation (``init_state`` of :meth:`__call__`).
            The ICMIL workflow reads it and, for rounds >= 1, passes the student's classifier as the embedder phase
            saved it (``student_head.pt``: the previous round's classifier it copied, with the dimension reduction and
            instance head it trained together with this round's embedder). The state's input statistics are kept,
            not recomputed (the student's head learnt on features standardised with them). Every restart starts from
            the same state and differs by its seed (instance and slide order, DTFD's pseudo-bags, dropout). The kept
            epoch is the best trained one: the starting state itself is not a candidate. ``"both"``: the
            ``restarts`` fresh trainings (restarts ``0..n-1``, exactly those of ``warm_start=False``, whose records are
            reused where ``restarts`` >= 2) and as many from the state (restarts ``n..2n-1``, seeded as the fresh
            ones: exactly those of ``warm_start=True``) compete, and the best by validation is kept: the state is
            used only where validation prefers it (it helped on sparse tumours and hurt on the demo,
            ``benchmarks/RESULTS.md``); choosing from twice the candidates is a little more optimistic.
        witness_search: before a fresh restart trains, find the witnesses with a linear instance scorer and train
            the classifier's instance head on them (:class:`~monai_icmil.engines.witness_search.WitnessSearch`:
            ``true`` for its defaults, a mapping of its arguments, or ``false``/``None``: off). For sparse tumours
            (a few % of a slide's patches), where a bag phase from a random initialisation can stay on its loss
            plateau (``benchmarks/RESULTS.md``, "Witness search"). The search runs once per phase (restarts started
            from a given state, or resumed from a checkpoint, skip it) and is recorded in
            ``output_dir/witness_search.json`` and MLflow; training bags of one class leave nothing to search for (a
            warning, and the restarts train without it). Off here by default; the bundle's train.json turns it on.
        device: default CUDA when available.
        progress: progress bars.
    """

    def __init__(
        self,
        loss_function: Callable[..., torch.Tensor] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        handlers: Sequence[Any] = (),
        epochs: int = 50,
        restarts: int = 1,
        key_metric: str = "auc",
        early_stop_patience: int | None = 10,
        early_stop_min_epochs: int = 0,
        grad_clip: float | None = 5.0,
        standardize: bool = True,
        shuffle_instances: bool = True,
        max_instances: int | None = None,
        tier1_weight: float = 1.0,
        instance_weight: float = 0.0,
        instance_top_k: int = 4,
        warm_start: bool | str = False,
        witness_search: Any = None,
        device: str | torch.device | None = None,
        progress: bool = True,
    ):
        if key_metric not in METRIC_NAMES:
            raise ValueError(f"bag_phase: key_metric must be one of {METRIC_NAMES}, got {key_metric!r}")
        if int(restarts) < 1:
            raise ValueError(f"bag_phase: restarts must be >= 1, got {restarts}")
        self.loss_function = loss_function if loss_function is not None else torch.nn.CrossEntropyLoss()
        self.optimizer = optimizer or functools.partial(torch.optim.Adam, lr=2e-4, weight_decay=1e-4)
        self.lr_scheduler, self.handlers = lr_scheduler, list(handlers or [])
        self.epochs, self.restarts, self.key_metric = int(epochs), int(restarts), key_metric
        self.early_stop_patience, self.grad_clip = early_stop_patience, grad_clip
        self.early_stop_min_epochs = int(early_stop_min_epochs)
        if self.early_stop_min_epochs < 0:
            raise ValueError(f"bag_phase: early_stop_min_epochs must be >= 0, got {early_stop_min_epochs}")
        self.standardize = as_bool(standardize, "standardize")
        self.shuffle_instances = as_bool(shuffle_instances, "shuffle_instances")
        self.max_instances, self.tier1_weight = max_instances, tier1_weight
        self.instance_weight, self.instance_top_k = float(instance_weight), int(instance_top_k)
        if self.instance_weight < 0 or self.instance_top_k < 1:
            raise ValueError(
                f"bag_phase: instance_weight must be >= 0 and instance_top_k >= 1, got {instance_weight} and "
                f"{instance_top_k}"
            )
        self.warm_start = _warm_start_mode(warm_start)
        self.witness_search = as_witness_search(witness_search)
        self.device, self.progress = default_device(device), as_bool(progress, "progress")

    def signature(self) -> dict[str, Any]:
        """What the phase's results depend on (restart records and resume checkpoints carry its hash)."""
        parts = {
            "loss": self.loss_function,
            "optimizer": self.optimizer,
            "lr_scheduler": self.lr_scheduler,
            "settings": [self.epochs, self.key_metric, self.early_stop_patience, self.grad_clip, self.standardize]
            # (only where it acts, so that records made before it existed stay valid)
            + ([self.early_stop_min_epochs] if self.early_stop_min_epochs and self.early_stop_patience else []),
            "bags": [self.shuffle_instances, self.max_instances, self.tier1_weight]
            + ([self.instance_weight, self.instance_top_k] if self.instance_weight else []),
        }
        if self.witness_search is not None:
            parts["witness_search"] = self.witness_search.signature()
        return component_signature(parts)

    def __call__(
        self,
        train_ds: BagDataset,
        val_ds: BagDataset,
        aggregator: AggregatorFactory | str,
        output_dir: str | os.PathLike,
        num_classes: int = 2,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        mlflow_run: Any = None,
        init_state: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Train the bag classifier (all restarts) and keep the best.

        Args:
            train_ds, val_ds: training and validation bags (:class:`~monai_icmil.data.store.BagDataset`).
            aggregator: a factory called with ``in_dim`` and ``num_classes`` (a class, or a partial of one: the
                bundle's ``aggregator``), or a registered name.
            output_dir: ``bag_classifier.pt`` (the best), ``predictions_{train,val}.csv``, ``history.json`` (and with
                restarts ``restarts.json``, ``restart_<k>/``) go here.
            num_classes: number of slide classes.
            seed: restart ``k`` is seeded with ``seed + k`` (initialisation, instance shuffling, DTFD pseudo-bags;
                with ``warm_start="both"``, restart ``n + k`` too).
            class_names: names in the predictions CSV header.
            mlflow_run: a :class:`~monai_icmil.handlers.tracking.MLflowRun` for params, curves and artifacts.
            init_state: with ``warm_start``, a state dict of the aggregator (input statistics included) that every
                restart starts from instead of a fresh initialisation (``"both"``: the second half of them);
                ``None``: fresh. Part of the restarts' and the resume checkpoints' keys.

        Returns:
            ``{"best_metric", "best_epoch", "checkpoint", "val": metrics at the best epoch, "history", "network",
            "restart": the kept one, "restarts": [{"restart", "seed", "best_metric", "best_epoch"}]}``; with
            ``init_state``, also ``"start"`` (``"warm"`` or ``"fresh"``: the kept restart's) and each restart's; with
            ``witness_search``, also ``"witness_search"`` (its record: kept fraction, validation AUC, candidates).

        Raises:
            BagTrainingError: non-finite loss (names epoch and slide); the best checkpoint so far stays on disk.
            ValueError: no training bags, or bags whose feature dim differs from the model's (names the slide).
        """
        if init_state is not None and not self.warm_start:
            raise ValueError("bag_phase: a starting state (init_state) was given but warm_start is false")
        factory = _aggregator_factory(aggregator, num_classes)
        search = _LazySearch(self, train_ds, val_ds, Path(output_dir), mlflow_run)
        # every restart's starting state: all fresh, all warm, or (warm_start "both") n fresh then n warm
        starts = [init_state] * self.restarts
        if init_state is not None and self.warm_start == "both":
            starts = [None] * self.restarts + starts
        if len(starts) == 1:
            started = {} if init_state is None else {"start": "warm"}
            result = self.train_once(
                train_ds, val_ds, factory, output_dir, seed, class_names, mlflow_run, init_state, search
            )
            summary = {k: result[k] for k in ("best_metric", "best_epoch")}
            restarts = [{"restart": 0, "seed": seed, **summary, **started}]
            return {**result, "restart": 0, "restarts": restarts, **started, **search.record()}
        out_dir = Path(output_dir)
        bags = _bags_signature(train_ds, val_ds)
        signature = {"bags": bags, "phase": self.signature(), "net": component_signature(factory)}
        runs = [
            self._restart(
                k,
                len(starts),
                seed + k % self.restarts,
                train_ds,
                val_ds,
                factory,
                out_dir,
                class_names,
                stable_hash({**signature, **_init_signature(start)}),
                start,
                search,
            )
            for k, start in enumerate(starts)
        ]
        result = self._keep_best(out_dir, runs, starts if init_state is not None else None, mlflow_run, factory, seed)
        return {**result, **search.record()}

    def _keep_best(
        self,
        out_dir: Path,
        runs: list[dict[str, Any]],
        starts: list[Any] | None,
        mlflow_run: Any,
        factory: AggregatorFactory,
        seed: int,
    ) -> dict[str, Any]:
        """The best restart by :func:`restart_rank`, its outputs copied into ``out_dir``, ``restarts.json`` (with
        ``starts``, each restart's start: ``"fresh"`` or ``"warm"``), MLflow; returns :meth:`__call__`'s result."""
        best = max(range(len(runs)), key=lambda k: restart_rank(runs[k], k))
        for name in _OUTPUTS:
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(out_dir / f"restart_{best}" / name, tmp)
        summaries = [{k: r[k] for k in ("restart", "seed", "best_metric", "best_epoch")} for r in runs]
        if starts is not None:
            summaries = [{**r, "start": "fresh" if start is None else "warm"} for r, start in zip(summaries, starts)]
        atomic_write_json(out_dir / "restarts.json", {"chosen": best, "restarts": summaries})
        scores = ", ".join(f"{_finite(r['best_metric']):.3f}" for r in runs)
        logger.info("bag_phase: restart %d kept (best validation %s %s)", best, self.key_metric, scores)
        if mlflow_run is not None:
            self._log_restarts(mlflow_run, out_dir, runs, best, factory, seed)
        return {
            **({"start": summaries[best]["start"]} if starts is not None else {}),
            "best_metric": runs[best]["best_metric"],
            "best_epoch": runs[best]["best_epoch"],
            "checkpoint": str(out_dir / "bag_classifier.pt"),
            "val": runs[best]["val"],
            "history": json.loads((out_dir / "history.json").read_text()),
            "network": load_bag_classifier(out_dir / "bag_classifier.pt", self.device),
            "restart": best,
            "restarts": summaries,
        }

    def _restart(
        self,
        k: int,
        total: int,
        seed: int,
        train_ds: BagDataset,
        val_ds: BagDataset,
        factory: AggregatorFactory,
        out_dir: Path,
        class_names: Sequence[str] | None,
        signature: str,
        init_state: Mapping[str, torch.Tensor] | None = None,
        search: _LazySearch | None = None,
    ) -> dict[str, Any]:
        """Restart ``k``'s record (of ``total``; seeded ``seed``), training it first unless a record with this
        signature is on disk."""
        record = out_dir / f"restart_{k}" / "restart.json"
        done = json.loads(record.read_text()) if record.is_file() else None
        if done is None or done.get("signature") != signature:
            start = "" if init_state is None else ", from the given state"
            logger.info("bag_phase: restart %d of %d (seed %d%s)", k + 1, total, seed, start)
            res = self.train_once(
                train_ds,
                val_ds,
                factory,
                out_dir / f"restart_{k}",
                seed,
                class_names,
                init_state=init_state,
                search=search,
            )
            done = {k_: res[k_] for k_ in ("best_metric", "best_epoch", "val")}
            done = {"restart": k, "seed": seed, **done, "signature": signature}
            atomic_write_json(record, done)
        return done

    def _log_restarts(
        self, run: Any, out_dir: Path, runs: list[dict[str, Any]], best: int, factory: AggregatorFactory, seed: int
    ) -> None:
        """Every restart's curves under its own prefix (the kept one's also unprefixed), its best metrics, artifacts."""
        run.log_params({"restarts": self.restarts, "chosen_restart": best, "aggregator": aggregator_name(factory)})
        if len(runs) > self.restarts:  # warm_start "both": restarts 0..n-1 fresh, n..2n-1 from the given state
            run.log_params({"restarts_trained": len(runs)})
        run.log_params({"seed": seed, **describe_components(optimizer=self.optimizer, lr_scheduler=self.lr_scheduler)})
        for k in range(len(runs)):
            for row in json.loads((out_dir / f"restart_{k}" / "history.json").read_text()):
                values = {m: v for m, v in row.items() if m != "epoch" and math.isfinite(v)}
                prefixed = {f"restart_{k}.{m}": v for m, v in values.items()}
                run.log_metrics({**prefixed, **(values if k == best else {})}, step=row["epoch"])
        run.log_metrics({f"best_{m}": v for m, v in runs[best]["val"].items() if m.startswith("val_")})
        run.log_artifacts([out_dir / n for n in _OUTPUTS] + [out_dir / "restarts.json"], artifact_path="bag_phase")

    def train_once(
        self,
        train_ds: BagDataset,
        val_ds: BagDataset,
        aggregator: AggregatorFactory,
        output_dir: str | os.PathLike,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
        mlflow_run: Any = None,
        init_state: Mapping[str, torch.Tensor] | None = None,
        search: Callable[[], WitnessSearchResult | None] | None = None,
    ) -> dict[str, Any]:
        """One training of a bag classifier (``aggregator(in_dim=...)``, fresh or from ``init_state``), the best
        epoch's checkpoint and the predictions; resumable (see the class). ``search``: gives the witness search's
        result (or ``None``) that a fresh network's instance head is pre-trained on first (``witness_search``).
        Returns as :meth:`__call__` without the restart fields."""
        from monai.utils import set_determinism

        if len(train_ds) == 0:
            raise ValueError("the bag phase has no training bags (all slides failed or were empty).")
        if len(val_ds) == 0:
            raise ValueError(
                "the bag phase has no validation bags, so no epoch can be chosen: the validation split is empty or "
                "every slide in it failed or had no tissue (report.json says which). Give the datalist a "
                "'validation' split with slides of each class, or enough labelled slides for one to be held out."
            )
        out_dir = Path(output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        set_determinism(seed)
        net = self._network(train_ds, val_ds, aggregator, init_state)
        trainer, evaluator, progress, state = self._engines(net, train_ds, val_ds, seed, out_dir / "bag_classifier.pt")
        signature = {"net": component_signature(aggregator), "in_dim": net.in_dim, "seed": seed}
        signature.update(_init_signature(init_state))
        resume = self._resume(trainer, evaluator, state, out_dir, {**signature, **_bags_signature(train_ds, val_ds)})
        # a fresh network's instance head is pre-trained on the witness search first, unless an interrupted run of it
        # is resumed (its checkpoint replaces the weights; building the engines draws no random numbers)
        if self.witness_search is not None and search is not None and init_state is None and not resume.pending():
            self._pretrain(net, train_ds, search(), seed)
        if mlflow_run is not None:
            self._track(mlflow_run, trainer, evaluator, net, aggregator, seed)
        try:
            resume.run(trainer)  # continues an interrupted run (logs where from)
        except BagTrainingError:
            if mlflow_run is not None:
                mlflow_run.set_tag("bag_phase_error", "non-finite loss")
            raise
        best_net = load_bag_classifier(out_dir / "bag_classifier.pt", self.device)
        for split, ds in (("train", train_ds), ("val", val_ds)):
            rows = predict_bags(best_net, ds, self.device)
            write_predictions_csv(out_dir / f"predictions_{split}.csv", rows, class_names)
        atomic_write_json(out_dir / "history.json", progress.history)
        if mlflow_run is not None:
            mlflow_run.log_metrics({f"best_{k}": v for k, v in progress.best["val"].items() if k.startswith("val_")})
            mlflow_run.log_artifacts([out_dir / n for n in _OUTPUTS], artifact_path="bag_phase")
        resume.clear()  # last: a kill before it resumes a finished training (no epoch again), not a fresh one
        best = progress.best
        return {
            "best_metric": best["metric"],
            "best_epoch": best["epoch"],
            "checkpoint": str(out_dir / "bag_classifier.pt"),
            "val": best["val"],
            "history": progress.history,
            "network": best_net,
        }

    def _pretrain(self, net: MILAggregator, train_ds: BagDataset, found: WitnessSearchResult | None, seed: int) -> None:
        """Pre-train ``net``'s instance head on the witness search's result (nothing when the search is off or had
        nothing to search for), with the phase's optimizer and a plain cross-entropy: the batches are class-balanced
        already, so class weights or a summed reduction of the bag loss would only count twice or scale the steps."""
        if found is None:
            return
        losses = self.witness_search.pretrain(
            net, train_ds, found, self.optimizer(net.parameters()), torch.nn.CrossEntropyLoss(), seed, self.device
        )
        if losses:
            logger.info(
                "bag_phase: instance head pre-trained on the witness search, %d steps (loss %.4f -> %.4f)",
                len(losses), np.mean(losses[:10]), np.mean(losses[-10:]),
            )  # fmt: skip

    def _network(
        self,
        train_ds: BagDataset,
        val_ds: BagDataset,
        aggregator: AggregatorFactory,
        init_state: Mapping[str, torch.Tensor] | None = None,
    ) -> MILAggregator:
        """A bag classifier for the bags' feature dimension: fresh and standardised on the training instances, or
        ``init_state`` (its own input statistics)."""
        in_dim = int(train_ds[0]["features"].shape[-1])
        net = aggregator(in_dim=in_dim)
        if not isinstance(net, MILAggregator):
            raise TypeError(f"the aggregator factory returned {type(net).__name__}, not a MILAggregator")
        if init_state is not None:
            try:
                net.load_state_dict(init_state)
            except RuntimeError as e:
                raise ValueError(
                    f"bag_phase#warm_start: the starting state does not fit the configured {type(net).__name__} on "
                    f"{in_dim}-d features ({e}); set bag_phase#warm_start to false or use the aggregator settings of "
                    "the round that made it"
                ) from e
        elif self.standardize:
            net.set_input_stats(*feature_stats(train_ds, progress=self.progress))
        net = net.to(self.device)
        check_bag_dims(train_ds, net.in_dim)
        check_bag_dims(val_ds, net.in_dim)
        return net

    def _engines(
        self, net: MILAggregator, train_ds: BagDataset, val_ds: BagDataset, seed: int, checkpoint: Path
    ) -> tuple[BagPhaseTrainer, BagPhaseEvaluator, PhaseProgress, dict[str, Any]]:
        """Trainer and evaluator with the phase's handlers, in the order they must run at an epoch's end (learning
        rate, epoch loss, validation: history, best checkpoint, early stopping), and the objects whose state a resume
        checkpoint must hold."""
        from monai.handlers import LrScheduleHandler, ValidationHandler

        optimizer = self.optimizer(net.parameters())
        # the slide order of epoch e depends on (seed, e) only (MONAI's trainer calls set_epoch), and the loaders have
        # their own generators: a resumed run sees the same order and leaves the global generators alone
        sampler = DistributedSampler(train_ds, num_replicas=1, rank=0, shuffle=True, seed=seed)
        train_loader = DataLoader(
            train_ds, batch_size=1, sampler=sampler, collate_fn=_first, generator=torch.Generator().manual_seed(seed)
        )
        val_loader = DataLoader(
            val_ds, batch_size=1, shuffle=False, collate_fn=_first, generator=torch.Generator().manual_seed(seed)
        )
        metrics = {f"val_{m}": SlideMetric(m) for m in SLIDE_METRICS}
        key = {f"val_{self.key_metric}": metrics.pop(f"val_{self.key_metric}")}
        evaluator = BagPhaseEvaluator(
            self.device, val_loader, net, key_val_metric=key, additional_metrics=metrics, decollate=False
        )
        evaluator.logger.setLevel(logging.WARNING)  # one validation per epoch: the stats handler reports it
        trainer = BagPhaseTrainer(
            self.device, self.epochs, train_loader, net, optimizer, self.loss_function, self.grad_clip,
            self.shuffle_instances, self.max_instances, self.tier1_weight, self.instance_weight, self.instance_top_k,
        )  # fmt: skip
        progress = PhaseProgress({"metric": -math.inf, "epoch": 0, "val": {}})
        state = {"trainer": trainer, "network": net, "optimizer": optimizer, "progress": progress}
        if self.lr_scheduler is not None:
            state["scheduler"] = self.lr_scheduler(optimizer)
            LrScheduleHandler(state["scheduler"], print_lr=False).attach(trainer)
        EpochLoss().attach(trainer)
        BagSelection(trainer, progress, self.key_metric, checkpoint).attach(evaluator)
        ValidationHandler(validator=evaluator, interval=1, epoch_level=True).attach(trainer)
        if self.early_stop_patience:
            key_name = f"val_{self.key_metric}"
            early_stop = WarmEarlyStopHandler(
                patience=self.early_stop_patience,  # ties of the key metric are told apart by the validation loss
                score_function=lambda ev: _stop_score(ev.state.metrics, key_name),
                trainer=trainer,
                min_epochs=self.early_stop_min_epochs,
                epoch_level=True,
            )
            early_stop.attach(evaluator)
            state["early_stop"] = early_stop._handler
        return trainer, evaluator, progress, state

    def _resume(
        self,
        trainer: BagPhaseTrainer,
        evaluator: BagPhaseEvaluator,
        state: dict[str, Any],
        out_dir: Path,
        signature: Mapping[str, Any],
    ) -> ResumeCheckpoint:
        """The resume checkpoint, saved at every epoch's end after validation (the epoch's best and counters), then
        statistics and the progress bar."""
        from monai_icmil.handlers.stats import stats_handler

        resume = ResumeCheckpoint(out_dir / "resume", state, stable_hash({**signature, "phase": self.signature()}))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, resume)
        stats_handler(
            "monai_icmil.bag_phase", tag_name="train_loss", output_transform=lambda o: o["loss"], iteration_log=False
        ).attach(trainer)
        stats_handler("monai_icmil.bag_phase", output_transform=lambda o: None, iteration_log=False).attach(evaluator)
        if self.progress:
            attach_progress_bar(trainer, "bag_phase")
        attach_handlers(trainer, self.handlers)  # the bundle's own, last: they see the epoch's metrics
        return resume

    def _track(
        self,
        run: Any,
        trainer: BagPhaseTrainer,
        evaluator: BagPhaseEvaluator,
        net: MILAggregator,
        aggregator: AggregatorFactory,
        seed: int,
    ) -> None:
        """MONAI's MLFlowHandler logs per-epoch metrics of both engines into ``run``; the params go there too."""
        from monai_icmil.handlers.tracking import mlflow_handler

        mlflow_handler(run, iteration_log=False, epoch_log=True).attach(trainer)
        mlflow_handler(run, iteration_log=False, epoch_log=True).attach(evaluator)
        components = describe_components(
            loss=self.loss_function, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler
        )
        run.log_params(
            {
                "aggregator": aggregator_name(aggregator),
                **{f"aggregator.{k}": v for k, v in net.init_args.items()},
                **components,
                "epochs": self.epochs,
                "grad_clip": self.grad_clip,
                "max_instances": self.max_instances,
                "instance_weight": self.instance_weight,
                "instance_top_k": self.instance_top_k,
                "key_metric": self.key_metric,
                "standardize": self.standardize,
                "seed": seed,
            }
        )


class _LazySearch:
    """The bag phase's witness search, run the first time a fresh restart needs it (never when every restart is
    already on disk or starts from a given state), then kept; writes ``witness_search.json`` and logs to MLflow.
    Training bags of a single class leave nothing to search for: a warning, and the restarts train without it."""

    def __init__(self, phase: BagPhase, train_ds: Dataset, val_ds: Dataset, out_dir: Path, mlflow_run: Any = None):
        self.phase, self.out_dir, self.mlflow_run = phase, out_dir, mlflow_run
        self.train_ds, self.val_ds = train_ds, val_ds
        self.result: WitnessSearchResult | None = None
        self.skipped = False

    def __call__(self) -> WitnessSearchResult | None:
        search = self.phase.witness_search
        if search is None or self.skipped:
            return None
        if self.result is None:
            stats = (
                feature_stats(self.train_ds, progress=self.phase.progress) if self.phase.standardize else (None, None)
            )
            try:
                self.result = search.search(self.train_ds, self.val_ds, *stats)
            except SingleClassError as e:
                logger.warning("%s; the bag phase trains without it", e)
                self.skipped = True
                (self.out_dir / "witness_search.json").unlink(missing_ok=True)  # an earlier run's, on other bags
                return None
            record = {**self.result.to_dict(), "settings": search.signature()}
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out_dir / "witness_search.json", record)
            logger.info(
                "bag_phase: witness search kept fraction %.3g (validation AUC %.3f)",
                self.result.fraction,
                self.result.val_auc,
            )
            if self.mlflow_run is not None:
                self.mlflow_run.log_params({"witness_search.fraction": self.result.fraction})
                if np.isfinite(self.result.val_auc):
                    self.mlflow_run.log_metrics({"witness_search.val_auc": self.result.val_auc})
        return self.result

    def record(self) -> dict[str, Any]:
        """``{"witness_search": its record}`` where the phase searched (now, or in an earlier run whose record
        matches the settings), else ``{}``."""
        search, path = self.phase.witness_search, self.out_dir / "witness_search.json"
        if search is None or not path.is_file():
            return {}
        record = json.loads(path.read_text())
        if record.get("settings") != search.signature():
            return {}
        return {"witness_search": {k: record[k] for k in ("fraction", "val_auc", "candidates")}}


def _init_signature(init_state: Mapping[str, torch.Tensor] | None) -> dict[str, str]:
    """``{"init": digest of the state's tensors}`` for a warm start, ``{}`` for a fresh one (the keys of fresh
    trainings stay as they were before warm starts existed)."""
    return {} if init_state is None else {"init": update_state_digest(hashlib.sha256(), init_state).hexdigest()[:16]}


def _stop_score(metrics: Mapping[str, float], key: str) -> float:
    """The early-stopping score: the key metric, less a millionth of the validation loss (it only breaks ties)."""
    loss = metrics.get("val_loss", math.nan)
    return _finite(metrics[key]) - (1e-6 * loss if math.isfinite(loss) else 0.0)


def _warm_start_mode(value: Any) -> bool | str:
    """``bag_phase#warm_start`` as given: a boolean (see :func:`~monai_icmil.utils.as_bool`) or ``"both"``."""
    if isinstance(value, str) and value.strip().lower() == "both":
        return "both"
    try:
        return as_bool(value, "warm_start")
    except ValueError:
        raise ValueError(f"bag_phase: warm_start must be true, false or 'both', got {value!r}") from None


def restart_rank(run: Mapping[str, Any], k: int) -> tuple[float, float, int]:
    """The bag phase's order of restarts (the highest is kept): by their best key metric, then by its validation
    loss, then the earliest wins.

    Args:
        run: restart ``k``'s record (``restart_<k>/restart.json``: ``best_metric``, ``val``).
        k: its index.
    """
    loss = run.get("val", {}).get("val_loss")
    return _finite(run["best_metric"]), -(loss if loss is not None and math.isfinite(loss) else math.inf), -k


def _aggregator_factory(aggregator: AggregatorFactory | str, num_classes: int) -> AggregatorFactory:
    """``aggregator`` as a factory of ``in_dim`` alone, with the number of classes bound."""
    return functools.partial(aggregator_factory(aggregator), num_classes=num_classes)


def _bags_signature(train_ds: Dataset, val_ds: Dataset) -> dict[str, Any]:
    return {
        "train": [(i["slide_id"], int(i["label"]), i.get("key")) for i in train_ds.items],
        "val": [(i["slide_id"], int(i["label"]), i.get("key")) for i in val_ds.items],
    }


# ---------------------------------------------------------------------------------------------------- bag classifiers


def check_bag_dims(dataset: Dataset, in_dim: int) -> None:
    """Raise a clear error naming the first slide whose feature dimension differs from the model's (from the store
    files' headers for a :class:`BagDataset`, without loading its bags)."""
    if isinstance(dataset, BagDataset):
        dims = dataset.feature_dims().items()
    else:
        dims = ((bag["slide_id"], bag["features"].shape[-1]) for bag in (dataset[i] for i in range(len(dataset))))
    for slide_id, dim in dims:
        if dim != in_dim:
            raise ValueError(
                f"slide '{slide_id}' has {dim}-d features but the bag classifier expects {in_dim}-d: were its "
                "features made by another embedder? Re-run the embedding phase."
            )


def save_bag_classifier(path: str | os.PathLike, net: MILAggregator, extra: Mapping[str, Any] | None = None) -> Path:
    """Save weights, the aggregator's registered name (or import path) and its constructor arguments (loadable with
    ``weights_only=True``), atomically."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "aggregator": aggregator_name(net),
        "init_args": net.init_args,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "extra": dict(extra or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def _expected_class(expect: Any) -> type[MILAggregator]:
    while isinstance(expect, functools.partial):
        expect = expect.func
    return aggregator_class(expect) if isinstance(expect, str) else expect


def load_bag_classifier(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    expect_in_dim: int | None = None,
    expect_aggregator: Any = None,
) -> MILAggregator:
    """Rebuild a bag classifier saved by :func:`save_bag_classifier` (``weights_only=True``).

    Args:
        path: the checkpoint.
        map_location: where to load it.
        expect_in_dim: refuse a classifier of another feature dimension.
        expect_aggregator: refuse a classifier of another class (a name, a class or a factory of one).

    Raises:
        ValueError: the checkpoint is not a bag classifier, or does not match the expected aggregator / feature dim.
    """
    try:
        ckpt = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read bag classifier '{path}' ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (CHECKPOINT_FORMAT, _OLD_FORMAT):
        raise ValueError(f"'{path}' is not a monai-icmil bag classifier checkpoint")
    cls = aggregator_class(ckpt["aggregator"])
    if expect_aggregator is not None and _expected_class(expect_aggregator) is not cls:
        raise ValueError(
            f"'{path}' holds a '{ckpt['aggregator']}' bag classifier, but "
            f"'{aggregator_name(_expected_class(expect_aggregator))}' was configured."
        )
    if ckpt["format"] == CHECKPOINT_FORMAT:
        args = dict(ckpt["init_args"])
    else:  # format 1: config + build kwargs
        args = {**ckpt["config"], **ckpt.get("kwargs", {})}
    if expect_in_dim is not None and args["in_dim"] != expect_in_dim:
        raise ValueError(
            f"'{path}' expects {args['in_dim']}-d features but the embedder gives {expect_in_dim}-d: it belongs to "
            "another embedder."
        )
    net = cls(**args)
    state = dict(ckpt["state_dict"])
    for name in ("input_mean", "input_std"):  # checkpoints from before input standardisation: identity
        state.setdefault(name, net.state_dict()[name])
    net.load_state_dict(state)
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


def _named(label: Any, names: Sequence[str]) -> str:
    """A label's class name: the name at a whole-number index, a class name as it is, else empty."""
    if isinstance(label, str) and label in names:
        return label
    try:
        index = int(label)
    except (TypeError, ValueError):
        return ""
    return names[index] if index == label and 0 <= index < len(names) else ""


def write_predictions_csv(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], class_names: Sequence[str] | None = None
) -> Path:
    """``slide,label,prob_<class>...,pred,pred_class,label_class`` (atomic): ``label`` and ``pred`` are class indices
    (``label`` empty for unlabelled slides), ``pred_class`` and ``label_class`` the classes' names. Probabilities
    carry 9 significant digits (exact for float32), so that a confident classifier's small probabilities keep their
    order: an AUC computed from the file equals the workflow's (6 decimals tied 9 of 40 test slides of one such run
    and moved its AUC by 0.003)."""
    n = len(rows[0]["probs"]) if rows else len(class_names or [0, 1])
    names = list(class_names) if class_names else [str(c) for c in range(n)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slide", "label", *[f"prob_{c}" for c in names], "pred", "pred_class", "label_class"])
    for r in rows:
        label = "" if r.get("label") is None else r["label"]
        pred = int(np.argmax(r["probs"]))
        w.writerow([r["slide_id"], label, *[f"{p:.9g}" for p in r["probs"]], pred, names[pred], _named(label, names)])
    return atomic_write_text(path, buf.getvalue())


def feature_stats(dataset: Dataset, chunk: int = 16384, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of every instance of every bag (float64 running sums, ``chunk``
    instances at a time, so a bag of 100k 1024-d instances needs 128 MB of float64, not 1.6 GB); ``progress`` shows a
    bar over the bags (every bag is read)."""
    total, total_sq, n = None, None, 0
    indices: Any = range(len(dataset))
    if progress:
        from monai_icmil.utils import progress_bar

        indices = progress_bar(indices, desc="feature statistics", unit="slide", leave=False)
    for i in indices:
        for part in dataset[i]["features"].split(chunk):
            feats = part.double()
            s, sq = feats.sum(0), (feats * feats).sum(0)
            total, total_sq = (s, sq) if total is None else (total + s, total_sq + sq)
            n += len(feats)
    if not n:
        raise ValueError("no instances to compute feature statistics from (every bag is empty).")
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()


def evaluate_bags(net: MILAggregator, dataset: Dataset, device: str | torch.device = "cpu") -> tuple[dict, list]:
    """Metrics and per-slide rows of ``net`` on ``dataset``."""
    rows = predict_bags(net, dataset, device)
    if not rows:
        return {m: float("nan") for m in SLIDE_METRICS}, rows
    probs = np.array([r["probs"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    return slide_metrics(probs, labels), rows
