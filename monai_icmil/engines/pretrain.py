# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Self-supervised pre-training of the starting embedder (SimCLR) on the training slides' own tissue patches.

ICMIL starts from an embedder whose frozen features already let the bag phase find the signal (ImageNet weights in
the paper). Users without such weights, or without a download, can pre-train one here: two random views of each
patch (flips, 90-degree rotations, a random resized crop, HED stain jitter, blur) go through the embedder and a
projection MLP, and the NT-Xent loss pulls the two views of a patch together against every other patch of the batch
(Chen et al., 2020). Only the embedder is kept, in the format :func:`~monai_icmil.networks.create_embedder` loads,
so it becomes round 0's embedder. No slide label is used.

The phase runs on MONAI's :class:`~monai.engines.SupervisedTrainer`; a :class:`~monai_icmil.handlers.checkpoint
.ResumeCheckpoint` at every epoch end makes an interrupted run continue where it stopped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch.utils.data import DataLoader

from monai_icmil.engines.couple import DistillationBatches, EmbedderPhaseError
from monai_icmil.handlers.checkpoint import PhaseProgress, ResumeCheckpoint
from monai_icmil.networks.embedders import PatchEmbedder
from monai_icmil.transforms.views import BatchRandomViews
from monai_icmil.utils import atomic_write_json, stable_hash

__all__ = ["nt_xent_loss", "contrastive_views", "TwoViewBatches", "SimCLRModel", "pretrain_embedder"]


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
    draws follow :class:`~monai_icmil.engines.couple.DistillationBatches` (seeded by ``(seed, epoch, index)``)."""

    def __init__(
        self,
        slides: Sequence[Mapping[str, Any]],
        *args: Any,
        hed_jitter: float = 0.3,
        blur: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(slides, *args, **kwargs)
        self.views = contrastive_views(self.patch_size, kwargs.get("min_area", 0.8), hed_jitter, blur)

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


def pretrain_step(engine: Engine, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """One SimCLR iteration: both views through embedder + projector, NT-Xent, an AdamW step."""
    cfg = engine.pretrain_cfg
    model: SimCLRModel = engine.network
    model.train()
    if "view1" in batch:
        v1 = batch["view1"].to(cfg["device"], non_blocking=True)
        v2 = batch["view2"].to(cfg["device"], non_blocking=True)
    else:  # made here, on the training device, from the worker's random parameters
        plain = batch["plain"].to(cfg["device"], non_blocking=True)
        v1, v2 = (cfg["views"](plain, batch[k]) for k in ("params1", "params2"))
    if cfg["channels_last"]:
        v1, v2 = v1.contiguous(memory_format=torch.channels_last), v2.contiguous(memory_format=torch.channels_last)
    with torch.autocast(cfg["device"].type, dtype=torch.bfloat16, enabled=cfg["amp"]):
        z = model(torch.cat([v1, v2]))
    loss = nt_xent_loss(*z.float().chunk(2), temperature=cfg["temperature"])
    if not torch.isfinite(loss):
        raise EmbedderPhaseError(f"non-finite pre-training loss at iteration {engine.state.iteration}; lower `lr`.")
    engine.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    engine.optimizer.step()
    return {"loss": float(loss.detach())}


def pretrain_embedder(
    embedder: PatchEmbedder,
    train_slides: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    epochs: int = 20,
    batches_per_epoch: int = 100,
    batch_size: int = 128,
    lr: float = 3e-4,
    weight_decay: float = 1e-6,
    embedder_lr_scale: float = 1.0,
    temperature: float = 0.2,
    proj_dim: int = 128,
    min_crop_area: float = 0.8,
    hed_jitter: float = 0.3,
    blur: float = 0.0,
    num_workers: int = 2,
    read_threads: int = 2,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    seed: int = 0,
    mlflow_run: Any = None,
    progress: bool = True,
    backend: str = "auto",
    stain_normalize: bool = False,
    views_on_device: bool | None = None,
) -> dict[str, Any]:
    """SimCLR pre-training of ``embedder`` on tissue patches of ``train_slides``; writes ``embedder.safetensors``.

    Args:
        embedder: the starting embedder (random init or loaded weights); it is not modified.
        train_slides: prepared slides (coordinates); labels are not used.
        output_dir: ``embedder.safetensors``, ``history.json`` and (while unfinished) ``resume/`` go here.
        epochs, batches_per_epoch, batch_size: how many patches (each seen in two views).
        lr, weight_decay: AdamW with a cosine schedule over all iterations.
        embedder_lr_scale: the embedder's learning rate relative to the projection head's (e.g. 0.1 to move a
            useful starting embedder gently while the head catches up).
        temperature: NT-Xent temperature.
        proj_dim: projection head output size.
        min_crop_area, hed_jitter, blur: view augmentation (smallest crop area, HED stain perturbation strength,
            largest blur sigma in pixels; 0 = no blur).
        num_workers, read_threads: reading and augmentation overlap training.
        device, amp, channels_last: default CUDA with bf16 autocast; fp32 on CPU.
        seed: seeds patch sampling, views and the projection head.
        mlflow_run: log params, the loss per iteration and the checkpoint here.
        progress: show a progress bar.
        backend: slide backend.
        stain_normalize: Macenko-normalise patches with their slide's stains before the views.
        views_on_device: make the views batch-wise in the training step on ``device`` (default: on CUDA) rather
            than in the DataLoader workers (default on the CPU, where the workers overlap them with training).

    Returns:
        ``{"checkpoint", "fingerprint", "history", "embedder"}``.
    """
    import copy

    from monai.engines import SupervisedTrainer
    from monai.utils import set_determinism

    from monai_icmil.handlers.stats import stats_handler
    from monai_icmil.networks.embedders import create_embedder

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = device.type == "cuda" if amp is None else amp
    channels_last = True if channels_last is None else channels_last
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_determinism(seed)
    data = TwoViewBatches(
        train_slides,
        batch_size,
        batches_per_epoch,
        seed,
        min_area=min_crop_area,
        read_threads=read_threads,
        backend=backend,
        stain_normalize=stain_normalize,
        hed_jitter=hed_jitter,
        blur=blur,
        views_in_worker=not (device.type == "cuda" if views_on_device is None else views_on_device),
    )
    model = SimCLRModel(copy.deepcopy(embedder), proj_dim).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    if channels_last:
        model.embedder.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        [
            {"params": model.embedder.parameters(), "lr": lr * embedder_lr_scale},
            {"params": model.projector.parameters(), "lr": lr},
        ],
        weight_decay=weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * batches_per_epoch))
    loader = DataLoader(
        data,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=loader,
        network=model,
        optimizer=optimizer,
        loss_function=nt_xent_loss,
        iteration_update=pretrain_step,
        decollate=False,
        epoch_length=batches_per_epoch,
    )
    trainer.pretrain_cfg = {
        "device": device,
        "amp": amp,
        "channels_last": channels_last,
        "temperature": temperature,
        "views": data.views,
    }
    progress_state = PhaseProgress()
    history = progress_state.history
    ckpt = out_dir / "embedder.safetensors"
    resume = ResumeCheckpoint(
        out_dir / "resume",
        {
            "trainer": trainer,
            "network": model,
            "optimizer": optimizer,
            "scheduler": scheduler,
            "progress": progress_state,
        },
        stable_hash(
            {
                "embedder": embedder.fingerprint(),
                "train": [(s["slide_id"], len(s["coords"])) for s in data.slides],
                "settings": [epochs, batches_per_epoch, batch_size, lr, weight_decay, temperature, proj_dim],
                "lr_scale": embedder_lr_scale,
                "more": [min_crop_area, hed_jitter, blur, seed, stain_normalize],
            }
        ),
    )

    epoch_losses: list[float] = []

    @trainer.on(Events.EPOCH_STARTED)
    def _epoch(engine: Engine) -> None:
        data.set_epoch(engine.state.epoch)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _step(engine: Engine) -> None:
        scheduler.step()
        epoch_losses.append(engine.state.output["loss"])

    @trainer.on(Events.EPOCH_COMPLETED)
    def _end_epoch(engine: Engine) -> None:
        row = {"epoch": engine.state.epoch, "loss": float(np.mean(epoch_losses))}
        epoch_losses.clear()
        history.append(row)
        if mlflow_run is not None:
            mlflow_run.log_metrics({"pretrain_loss": row["loss"]}, step=engine.state.epoch)
        resume(engine)

    stats_handler(
        "monai_icmil.pretrain", output_transform=lambda o: o["loss"], iteration_log=False, tag_name="nt_xent"
    ).attach(trainer)
    if mlflow_run is not None:
        mlflow_run.log_params(
            {
                "method": "SimCLR",
                "embedder": embedder.name,
                "start_fingerprint": embedder.fingerprint(),
                "epochs": epochs,
                "batches_per_epoch": batches_per_epoch,
                "batch_size": batch_size,
                "lr": lr,
                "weight_decay": weight_decay,
                "embedder_lr_scale": embedder_lr_scale,
                "temperature": temperature,
                "min_crop_area": min_crop_area,
                "hed_jitter": hed_jitter,
                "seed": seed,
            }
        )
    if progress:
        from ignite.contrib.handlers import ProgressBar

        ProgressBar(desc="pre-training", persist=False).attach(trainer, output_transform=lambda o: {"loss": o["loss"]})
    resume.run(trainer)
    model.embedder.save(ckpt, extra={"pretrained_from": embedder.fingerprint(), "method": "SimCLR"})
    atomic_write_json(out_dir / "history.json", history)
    resume.clear()
    tuned = create_embedder(None, weights=ckpt)
    if mlflow_run is not None:
        mlflow_run.log_artifacts([ckpt, out_dir / "history.json"], artifact_path="pretrain")
    return {"checkpoint": str(ckpt), "fingerprint": tuned.fingerprint(), "history": history, "embedder": tuned}
