# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Self-supervised pre-training of the starting embedder (SimCLR) on the training slides' own tissue patches.

ICMIL starts from an embedder whose frozen features already let the bag phase find the signal (ImageNet weights in
the paper). Users without such weights, or without a download, can pre-train one here: two random views of each
patch (flips, 90-degree rotations, a random resized crop, HED stain jitter, blur) go through the embedder and a
projection MLP, and the NT-Xent loss pulls the two views of a patch together against every other patch of the batch
(Chen et al., 2020). Only the embedder is kept, in the format :func:`~monai_icmil.networks.create_embedder` loads,
so it becomes round 0's embedder. No slide label is used.

:class:`Pretrain` is the phase as the bundle declares it (``pretrain`` in ``configs/train.json``, wired into the loop
by ``configs/pretrain.json``): optimizer, learning-rate schedule, views and handlers are components. Its engine is
:class:`PretrainTrainer`, MONAI's trainer with the SimCLR step as its iteration; a :class:`~monai_icmil.handlers
.checkpoint.ResumeCheckpoint` at every epoch end makes an interrupted run continue where it stopped.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from torch.utils.data import DataLoader

from monai_icmil.engines.embedder_phase import DistillationBatches, EmbedderPhaseError
from monai_icmil.handlers.checkpoint import PhaseProgress, ResumeCheckpoint
from monai_icmil.handlers.common import EpochLoss, attach_handlers, attach_progress_bar, describe_components
from monai_icmil.networks.embedders import PatchEmbedder
from monai_icmil.transforms.views import BatchRandomViews
from monai_icmil.utils import as_bool, atomic_write_json, component_signature, default_device, stable_hash

__all__ = ["nt_xent_loss", "contrastive_views", "TwoViewBatches", "SimCLRModel", "PretrainTrainer", "Pretrain"]

logger = logging.getLogger("monai_icmil.pretrain")


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent: each of the ``2B`` projections must pick its partner view among the other ``2B - 1``."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    n = z1.shape[0]
    sim.fill_diagonal_(-math.inf)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def contrastive_views(
    patch_size: int, min_area: float = 0.8, hed_jitter: float = 0.3, blur: float = 0.0
) -> BatchRandomViews:
    """One random view: flips, 90-degree rotations, a random resized crop back to ``patch_size``, HED jitter and
    optionally a light blur.

    The crop is mild on purpose (``min_area`` 0.8 by default, where SimCLR on photos uses 0.08): cell and nucleus
    size carry diagnostic signal at a fixed magnification, and strong rescaling teaches the embedder to ignore it.
    """
    return BatchRandomViews(patch_size, min_area, hed_jitter, rotate90=True, blur=blur, blur_prob=0.3)


class TwoViewBatches(DistillationBatches):
    """Batches of random tissue patches with two independent random views each: ``{"view1", "view2"}`` (float
    ``[B, 3, P, P]`` in [0, 1]), or with ``views_in_worker=False`` the patches and the views' random parameters
    (``{"plain", "params1", "params2"}``) for the training step to make them on its device. Sampling and the view
    draws follow :class:`~monai_icmil.engines.embedder_phase.DistillationBatches` (seeded by ``(seed, epoch, index)``;
    ``views`` default to :func:`contrastive_views`)."""

    def __init__(self, slides: Sequence[Mapping[str, Any]], views: BatchRandomViews | None = None, *args, **kwargs):
        patch_size = next((int(s["patch_size"]) for s in slides if len(s["coords"])), None)
        if views is None and patch_size is not None:
            views = contrastive_views(patch_size)
        super().__init__(slides, views, *args, **kwargs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        plain, seeds = self.draw(i, views_per_patch=2)
        params = {f"params{k + 1}": self.views.draw(seeds[:, k]) for k in (0, 1)}
        if not self.views_in_worker:
            return {"plain": plain, **params}
        return {f"view{k + 1}": self.views(plain, params[f"params{k + 1}"]) for k in (0, 1)}


class SimCLRModel(nn.Module):
    """The embedder and a 2-layer projection head (dropped after pre-training)."""

    def __init__(self, embedder: PatchEmbedder, proj_dim: int = 128):
        super().__init__()
        self.embedder = embedder
        d = embedder.out_dim
        self.projector = nn.Sequential(
            nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, proj_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.embedder(x))


class PretrainTrainer(SupervisedTrainer):
    """MONAI's trainer with the SimCLR step as its iteration: both views of each patch through embedder and
    projector, the NT-Xent loss (``loss_function``, with ``temperature``), an optimizer step.

    Args:
        device, max_epochs, epoch_length, train_data_loader, network, optimizer: as MONAI's trainer (``network`` is
            the :class:`SimCLRModel`).
        views: the batch views (for batches that carry only their parameters).
        temperature: NT-Xent temperature.
        amp, channels_last: bf16 autocast, channels-last inputs.
    """

    def __init__(
        self,
        device: torch.device,
        max_epochs: int,
        epoch_length: int,
        train_data_loader: DataLoader,
        network: SimCLRModel,
        optimizer: torch.optim.Optimizer,
        views: BatchRandomViews,
        temperature: float = 0.2,
        amp: bool = False,
        channels_last: bool = True,
    ):
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=functools.partial(nt_xent_loss, temperature=temperature),
            iteration_update=None,
            decollate=False,
            epoch_length=epoch_length,
        )
        self.views, self.amp, self.channels_last = views, amp, channels_last

    def _iteration(self, engine: Engine, batchdata: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.network.train()
        if "view1" in batchdata:
            v1 = batchdata["view1"].to(self.state.device, non_blocking=True)
            v2 = batchdata["view2"].to(self.state.device, non_blocking=True)
        else:  # made here, on the training device, from the worker's random parameters
            plain = batchdata["plain"].to(self.state.device, non_blocking=True)
            v1, v2 = (self.views(plain, batchdata[k]) for k in ("params1", "params2"))
        if self.channels_last:
            v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.state.device.type, dtype=torch.bfloat16, enabled=self.amp):
            z = self.network(torch.cat([v1, v2]))
        loss = self.loss_function(*z.float().chunk(2))
        if not torch.isfinite(loss):
            raise EmbedderPhaseError(f"non-finite pre-training loss at iteration {self.state.iteration}; lower `lr`.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}


class Pretrain:
    """SimCLR pre-training of the starting embedder on the training slides' tissue patches, as configured.

    Args:
        optimizer: a factory called with two parameter groups, the embedder's and the projection head's (default:
            AdamW, lr 3e-4, weight decay 1e-6); the embedder's learning rate is scaled by ``embedder_lr_scale``.
        lr_scheduler: a factory called with the optimizer, stepped every iteration (``None``: constant; the bundle
            declares a cosine schedule over all iterations).
        views: the two random views' maker (default: :func:`contrastive_views` at the slides' patch size).
        handlers: more handlers for the trainer.
        epochs, batches_per_epoch, batch_size: how many patches (each seen in two views).
        embedder_lr_scale: the embedder's learning rate relative to the projection head's (e.g. 0.1 to move a useful
            starting embedder gently while the head catches up).
        temperature: NT-Xent temperature.
        proj_dim: projection head output size.
        num_workers, read_threads: reading and augmentation overlap training.
        device, amp, channels_last: default CUDA with bf16 autocast; fp32 on CPU.
        views_on_device: make the views batch-wise in the training step on ``device`` (default: on CUDA) rather than
            in the DataLoader workers.
        progress: show a progress bar.
    """

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        views: BatchRandomViews | None = None,
        handlers: Sequence[Any] = (),
        epochs: int = 20,
        batches_per_epoch: int = 100,
        batch_size: int = 128,
        embedder_lr_scale: float = 1.0,
        temperature: float = 0.2,
        proj_dim: int = 128,
        num_workers: int = 2,
        read_threads: int = 2,
        device: str | torch.device | None = None,
        amp: bool | None = None,
        channels_last: bool | None = None,
        views_on_device: bool | None = None,
        progress: bool = True,
    ):
        self.optimizer = optimizer or functools.partial(torch.optim.AdamW, lr=3e-4, weight_decay=1e-6)
        self.lr_scheduler, self.views, self.handlers = lr_scheduler, views, list(handlers or [])
        self.epochs, self.batches_per_epoch, self.batch_size = int(epochs), int(batches_per_epoch), int(batch_size)
        self.embedder_lr_scale, self.temperature, self.proj_dim = embedder_lr_scale, temperature, proj_dim
        self.num_workers, self.read_threads, self.progress = num_workers, read_threads, as_bool(progress, "progress")
        self.device = default_device(device)
        self.amp = as_bool(amp, "amp", self.device.type == "cuda")
        self.channels_last = as_bool(channels_last, "channels_last", True)
        self.views_on_device = as_bool(views_on_device, "views_on_device", self.device.type == "cuda")

    def signature(self) -> dict[str, Any]:
        """What the pre-trained embedder depends on (its resume checkpoints carry the hash)."""
        return component_signature(
            {
                "optimizer": self.optimizer,
                "lr_scheduler": self.lr_scheduler,
                "views": self.views,
                "settings": [self.epochs, self.batches_per_epoch, self.batch_size, self.temperature, self.proj_dim],
                "lr_scale": self.embedder_lr_scale,
            }
        )

    def __call__(
        self,
        embedder: PatchEmbedder,
        train_slides: Sequence[Mapping[str, Any]],
        output_dir: str | os.PathLike,
        seed: int = 0,
        mlflow_run: Any = None,
        backend: str = "auto",
        stain_normalize: bool = False,
    ) -> dict[str, Any]:
        """Pre-train a copy of ``embedder`` on ``train_slides``' tissue patches; write ``embedder.safetensors``.

        Args:
            embedder: the starting embedder (random init or loaded weights); it is not modified.
            train_slides: prepared slides (coordinates); labels are not used.
            output_dir: ``embedder.safetensors``, ``history.json`` and (while unfinished) ``resume/`` go here.
            seed: seeds patch sampling, views and the projection head.
            mlflow_run: log params, the loss per epoch and the checkpoint here.
            backend: slide backend.
            stain_normalize: Macenko-normalise patches with their slide's stains before the views.

        Returns:
            ``{"checkpoint", "fingerprint", "history", "embedder"}``.
        """
        from monai.utils import set_determinism

        from monai_icmil.networks.embedders import create_embedder

        out_dir = Path(output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        set_determinism(seed)
        data = TwoViewBatches(
            train_slides, self.views, self.batch_size, self.batches_per_epoch, seed, self.read_threads, backend,
            stain_normalize=stain_normalize, views_in_worker=not self.views_on_device,
        )  # fmt: skip
        model = SimCLRModel(copy.deepcopy(embedder), self.proj_dim).to(self.device)
        for p in model.parameters():
            p.requires_grad_(True)
        if self.channels_last:
            model.embedder.to(memory_format=torch.channels_last)
        trainer, progress, resume = self._trainer(model, data, embedder, out_dir, seed, mlflow_run)
        if mlflow_run is not None:
            mlflow_run.log_params(self._params(embedder, data.views, seed))
        resume.run(trainer)
        ckpt = out_dir / "embedder.safetensors"
        model.embedder.save(ckpt, extra={"pretrained_from": embedder.fingerprint(), "method": "SimCLR"})
        atomic_write_json(out_dir / "history.json", progress.history)
        tuned = create_embedder(None, weights=ckpt)
        if mlflow_run is not None:
            mlflow_run.log_artifacts([ckpt, out_dir / "history.json"], artifact_path="pretrain")
        resume.clear()  # last: a kill before it resumes a finished pre-training (no epoch again), not a fresh one
        return {
            "checkpoint": str(ckpt),
            "fingerprint": tuned.fingerprint(),
            "history": progress.history,
            "embedder": tuned,
        }

    def _trainer(
        self, model: SimCLRModel, data: TwoViewBatches, embedder: PatchEmbedder, out_dir: Path, seed: int, run: Any
    ) -> tuple[PretrainTrainer, PhaseProgress, ResumeCheckpoint]:
        """The trainer with its schedule, epoch history, resume checkpoint, statistics and progress bar."""
        from monai.handlers import LrScheduleHandler

        from monai_icmil.handlers.stats import stats_handler

        optimizer = self.optimizer([{"params": model.embedder.parameters()}, {"params": model.projector.parameters()}])
        optimizer.param_groups[0]["lr"] *= self.embedder_lr_scale
        scheduler = self.lr_scheduler(optimizer) if self.lr_scheduler is not None else None
        loader = DataLoader(
            data,
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if self.num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),
        )
        trainer = PretrainTrainer(
            self.device, self.epochs, self.batches_per_epoch, loader, model, optimizer, data.views, self.temperature,
            self.amp, self.channels_last,
        )  # fmt: skip
        progress = PhaseProgress()
        state = {"trainer": trainer, "network": model, "optimizer": optimizer, "progress": progress}
        if scheduler is not None:
            state["scheduler"] = scheduler
            LrScheduleHandler(scheduler, print_lr=False, epoch_level=False).attach(trainer)
        signature = {
            "embedder": embedder.fingerprint(),
            "train": [(s["slide_id"], len(s["coords"])) for s in data.slides],
            "phase": self.signature(),
            "more": [seed, data.stain_normalize],
        }
        resume = ResumeCheckpoint(out_dir / "resume", state, stable_hash(signature))
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: data.set_epoch(e.state.epoch))
        EpochLoss(name="pretrain_loss").attach(trainer)

        @trainer.on(Events.EPOCH_COMPLETED)
        def _record(engine: Engine) -> None:
            row = {"epoch": engine.state.epoch, "loss": engine.state.metrics["pretrain_loss"]}
            progress.history.append(row)
            if run is not None:
                run.log_metrics({"pretrain_loss": row["loss"]}, step=engine.state.epoch)
            resume(engine)

        stats_handler(
            "monai_icmil.pretrain", output_transform=lambda o: o["loss"], iteration_log=False, tag_name="nt_xent"
        ).attach(trainer)
        if self.progress:
            attach_progress_bar(trainer, "pretrain")
        attach_handlers(trainer, self.handlers)  # the bundle's own, last: they see the epoch's loss
        return trainer, progress, resume

    def _params(self, embedder: PatchEmbedder, views: BatchRandomViews, seed: int) -> dict[str, Any]:
        views = {f"views.{k}": v for k, v in vars(views).items() if isinstance(v, (int, float, bool))}
        return {
            "method": "SimCLR",
            "embedder": embedder.name,
            "start_fingerprint": embedder.fingerprint(),
            **describe_components(optimizer=self.optimizer, lr_scheduler=self.lr_scheduler),
            **views,
            "epochs": self.epochs,
            "batches_per_epoch": self.batches_per_epoch,
            "batch_size": self.batch_size,
            "embedder_lr_scale": self.embedder_lr_scale,
            "temperature": self.temperature,
            "seed": seed,
        }
