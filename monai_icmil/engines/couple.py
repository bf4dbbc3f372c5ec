# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The embedder phase: ICMIL's teacher-student fine-tuning of the patch embedder.

The bag classifier trained in the bag phase, applied to single patches through its ``reduce`` and ``head``, is an
instance-level teacher. Teacher = frozen copies of the embedder, ``reduce`` and ``head`` (eval mode, no gradient);
student = trainable copies of the same three, initialised from the teacher. For random tissue patches of the
training slides (no slide labels are used), the teacher sees the plain patch and the student an augmented view
(random flips + a random resized crop of 50-100 % of the area, back to the patch size; optionally a HED stain
perturbation), made for the whole batch at once on the training device
(:class:`~monai_icmil.transforms.views.BatchRandomViews`); the student learns to match the teacher
(:class:`~monai_icmil.losses.ICMILDistillationLoss`).

Every ``val_interval`` iterations and at each epoch end, student and teacher are compared on held-out patches of the
validation slides (mean absolute probability difference, argmax agreement); the best student embedder is kept in
the format :func:`~monai_icmil.networks.create_embedder` loads, with a new fingerprint, so the next round's
embedding recomputes every feature.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from torch.utils.data import DataLoader, Dataset, Sampler

from monai_icmil.data.slide import get_slide
from monai_icmil.engines.embedding import _dist_info
from monai_icmil.handlers.checkpoint import PhaseProgress, ResumeCheckpoint
from monai_icmil.losses import ICMILDistillationLoss, kl_terms
from monai_icmil.networks.aggregators import MILAggregator
from monai_icmil.networks.embedders import PatchEmbedder
from monai_icmil.transforms.stain import slide_stain_normalizer
from monai_icmil.transforms.views import BatchRandomViews
from monai_icmil.utils import atomic_path, atomic_write_json, stable_hash

logger = logging.getLogger("monai_icmil.couple")

#: below this teacher agreement between plain patches and student views, the embedder phase warns
VIEW_AGREEMENT_WARN = 0.9

__all__ = [
    "EmbedderPhaseError",
    "InstanceClassifier",
    "DistillationBatches",
    "ResumableSequentialSampler",
    "StudentStep",
    "student_views",
    "couple_step",
    "agreement",
    "view_consistency",
    "finetune_embedder",
]


class EmbedderPhaseError(RuntimeError):
    """The embedder phase cannot start or go on; the message says why and what to do."""


class InstanceClassifier(nn.Module):
    """A bag classifier applied to single patches: ``embedder -> reduce -> head`` (+ the aggregator's attention)."""

    def __init__(self, embedder: PatchEmbedder, aggregator: MILAggregator):
        super().__init__()
        self.embedder, self.aggregator = embedder, aggregator

    def head_on_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reduce(feats), head(reduce(feats)))``."""
        h = self.aggregator.reduce(feats)
        return h, self.aggregator.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_on_features(self.embedder(x))[1]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What ICMIL fine-tunes: the embedder, ``reduce`` and ``head`` (not the attention or DTFD's tier 1)."""
        return [
            *self.embedder.parameters(),
            *self.aggregator.dim_reduction.parameters(),
            *self.aggregator.head.parameters(),
        ]


class StudentStep(nn.Module):
    """The student's two forward passes of one iteration as one module call (so DDP sees every trainable parameter
    in a single forward): ``(student(view), *student.head_on_features(teacher_features))``."""

    def __init__(self, student: InstanceClassifier):
        super().__init__()
        self.student = student

    def forward(self, view: torch.Tensor, teacher_feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.student(view)
        h_on_t, logits_on_t = self.student.head_on_features(teacher_feats)
        return logits, h_on_t, logits_on_t


def student_views(patch_size: int, min_area: float = 0.5, hed_jitter: float = 0.0) -> BatchRandomViews:
    """ICMIL's student view: random flips + a random resized crop (``min_area``-1 of the area, aspect varying) back to
    ``patch_size``, plus an optional HED stain perturbation of strength ``hed_jitter``; made batch-wise."""
    return BatchRandomViews(patch_size, min_area, hed_jitter)


class DistillationBatches(Dataset):
    """Batches of random tissue patches of the training slides, with their student views.

    Item ``i`` of epoch ``e`` is drawn from a generator seeded with ``(seed, e, i)``, so batches are the same
    whatever the number of DataLoader workers. Patches are read with one batched call per slide. Under DDP (the
    distributed patch sampler), rank ``k`` of ``n`` takes patches ``k, k + n, ...`` of each drawn batch, with the
    same student views they would have in one process: together the ranks see exactly the single-process batch.

    Args:
        slides: prepared slides (``image``, ``coords``, ``level``, ``read_size``, ``patch_size``).
        batch_size: patches per batch.
        num_batches: batches per epoch.
        seed: base seed.
        min_area: smallest crop area of the student view.
        read_threads: decoding threads per read.
        backend: slide backend.
        rank, world_size: this process's share of each batch (DDP).
        stain_normalize: Macenko-normalise patches with their slide's stains (as the embedding did).
        hed_jitter: strength of the random HED stain perturbation of the student view (0: none).
        with_views: make the student views (``False``: plain patches only, e.g. held-out validation patches).
        views_in_worker: make the views here, in the DataLoader worker (right for CPU training). ``False``: return
            only their random parameters (``"view_params"``), and the training step makes them on its device
            (:attr:`views`), which on a GPU is ~100x cheaper than in the worker.

    Returns per item: ``{"plain": uint8 [B, 3, P, P], "view": float [B, 3, P, P] in [0, 1]}`` or, without
    ``views_in_worker``, ``{"plain", "view_params": float [B, 15]}`` (``B`` is ``batch_size / world_size`` under DDP).
    """

    def __init__(
        self,
        slides: Sequence[Mapping[str, Any]],
        batch_size: int = 100,
        num_batches: int = 100,
        seed: int = 0,
        min_area: float = 0.5,
        read_threads: int = 2,
        backend: str = "auto",
        rank: int = 0,
        world_size: int = 1,
        stain_normalize: bool = False,
        hed_jitter: float = 0.0,
        with_views: bool = True,
        views_in_worker: bool = True,
    ):
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of the number of ranks ({world_size})")
        self.rank, self.world_size = int(rank), int(world_size)
        self.slides = [s for s in slides if len(s["coords"])]
        if not self.slides:
            raise EmbedderPhaseError(
                "the embedder phase has no tissue patches to sample: every training slide has zero patches. "
                "Check the tissue detection (min_tissue, min_saturation) or the slides."
            )
        self.sizes = np.array([len(s["coords"]) for s in self.slides])
        self.offsets = np.r_[0, np.cumsum(self.sizes)]
        self.batch_size, self.num_batches, self.seed = batch_size, num_batches, seed
        self.patch_size = int(self.slides[0]["patch_size"])
        self.views = student_views(self.patch_size, min_area, hed_jitter)
        self.stain_normalize, self.with_views, self.views_in_worker = stain_normalize, with_views, views_in_worker
        self.read_threads, self.backend = read_threads, backend
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def read(self, flat: np.ndarray) -> torch.Tensor:
        """Patches ``[B, 3, P, P]`` (uint8) for flat patch indices, read with one call per slide."""
        slide_idx = np.searchsorted(self.offsets, flat, side="right") - 1
        out = torch.empty((len(flat), 3, self.patch_size, self.patch_size), dtype=torch.uint8)
        for si in np.unique(slide_idx):
            rows = np.flatnonzero(slide_idx == si)
            s = self.slides[si]
            coords = np.asarray(s["coords"])[flat[rows] - self.offsets[si]]
            reader = get_slide(s["image"], self.backend)
            patches = reader.read_patches(
                coords,
                s["read_size"],
                s["level"],
                out_size=s["patch_size"] if s["patch_size"] != s["read_size"] else None,
                num_workers=self.read_threads,
                as_tensor=True,
            )
            if self.stain_normalize:
                patches = slide_stain_normalizer(s["image"], reader)(patches)
            out[torch.as_tensor(rows)] = patches
        return out

    def draw(self, i: int, views_per_patch: int = 1) -> tuple[torch.Tensor, np.ndarray]:
        """This rank's patches of item ``i`` (uint8) and ``views_per_patch`` view seeds for each of them."""
        rng = np.random.default_rng((self.seed, self.epoch, int(i)))
        flat = rng.integers(0, int(self.offsets[-1]), self.batch_size)
        view_seeds = rng.integers(2**31, size=(self.batch_size, views_per_patch))
        mine = slice(self.rank, None, self.world_size)
        return self.read(flat[mine]), view_seeds[mine]

    def make_views(self, plain: torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        """One student view of each ``uint8`` patch, drawn with its seed (float ``[B, 3, P, P]`` in [0, 1])."""
        return self.views(plain, self.views.draw(np.asarray(seeds)[:, 0]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        plain, seeds = self.draw(i)
        if not self.with_views:
            return {"plain": plain}
        params = self.views.draw(seeds[:, 0])
        if self.views_in_worker:
            return {"plain": plain, "view": self.views(plain, params)}
        return {"plain": plain, "view_params": params}


class ResumableSequentialSampler(Sampler[int]):
    """``start, start + 1, ..., n - 1``: batch indices of one epoch, from where an interrupted epoch stopped.

    The embedder phase sets ``start`` when an epoch starts (``iteration % epoch_length``: 0 unless resuming).
    """

    def __init__(self, n: int):
        self.n, self.start = int(n), 0

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.n))

    def __len__(self) -> int:
        return self.n - self.start


def _first(batch: list[Any]) -> Any:
    return batch[0]


def couple_step(engine: Engine, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """One teacher-student iteration (reads ``engine.teacher``, ``engine.network`` (student), ``engine.student_step``
    (the student's forward, DDP-wrapped under torchrun), ``engine.optimizer``, ``engine.loss_function`` and
    ``engine.couple_cfg``)."""
    cfg = engine.couple_cfg
    device = cfg["device"]
    teacher: InstanceClassifier = engine.teacher
    student: InstanceClassifier = engine.network
    plain = batch["plain"].to(device, non_blocking=True)
    if "view" in batch:
        view = batch["view"].to(device, non_blocking=True)
    else:  # the views are made here, on the training device, from the worker's random parameters
        view = engine.views(plain, batch["view_params"])
    if cfg["channels_last"]:
        plain, view = plain.contiguous(memory_format=torch.channels_last), view.contiguous(
            memory_format=torch.channels_last
        )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg["amp"])
    with torch.no_grad(), autocast:
        f_t = teacher.embedder(plain)
        h_t, logits_t = teacher.head_on_features(f_t)
        att = teacher.aggregator.attention(h_t) if cfg["confidence"] else None
    student.train()
    if cfg["freeze_bn"]:
        _freeze_batchnorm(student.embedder)
    with autocast:
        logits_s, h_s_on_t, logits_s_on_t = engine.student_step(view, f_t.detach())
        terms = engine.loss_function(logits_s, logits_t, logits_s_on_t, h_s_on_t, h_t, att)
    loss = terms["loss"]
    if not torch.isfinite(loss):
        raise EmbedderPhaseError(
            f"non-finite loss ({loss.item()}) at iteration {engine.state.iteration}; training stopped, the best "
            "student embedder so far is kept. Lower the learning rate."
        )
    engine.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg["grad_clip"]:
        # as ICMIL's reference: clip the reduction and the classifier (optionally the embedder too)
        torch.nn.utils.clip_grad_norm_(student.aggregator.dim_reduction.parameters(), cfg["grad_clip"])
        torch.nn.utils.clip_grad_norm_(student.aggregator.head.parameters(), cfg["grad_clip"])
        if cfg["clip_embedder"]:
            torch.nn.utils.clip_grad_norm_(student.embedder.parameters(), cfg["grad_clip"])
    engine.optimizer.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def _freeze_batchnorm(module: nn.Module) -> None:
    """Keep batch-norm layers on their running statistics (their affine parameters still train)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def agreement(
    student: InstanceClassifier,
    teacher: InstanceClassifier,
    patches: torch.Tensor,
    device: torch.device,
    batch_size: int = 128,
) -> dict[str, float]:
    """Student vs teacher on the same plain patches: mean absolute probability difference and argmax agreement."""
    student.eval()
    ps, pt = [], []
    for i in range(0, len(patches), batch_size):
        x = patches[i : i + batch_size].to(device)
        ps.append(torch.softmax(student(x).float(), -1).cpu())
        pt.append(torch.softmax(teacher(x).float(), -1).cpu())
    s, t = torch.cat(ps), torch.cat(pt)
    return {"mae": float((s - t).abs().mean()), "agreement": float((s.argmax(1) == t.argmax(1)).float().mean())}


@torch.no_grad()
def view_consistency(
    teacher: InstanceClassifier,
    patches: torch.Tensor,
    views: torch.Tensor,
    device: torch.device,
    batch_size: int = 128,
) -> dict[str, float]:
    """How far the instance teacher's own labels move between plain patches and the student's views of them.

    The embedder phase asks the student to give each view the label the teacher gives the plain patch. Where the
    teacher itself labels a view differently (features not invariant to flips, crops or stain), the student first
    has to learn that invariance, which moves it away from the teacher on plain patches too; a low agreement here
    warns that coupling will mostly teach invariance, not the teacher's category knowledge.

    Returns:
        ``view_mae`` (mean absolute probability difference), ``view_agreement`` (same argmax) and ``view_kl`` (the
        loss's view term with the teacher in the student's place, i.e. the view term at iteration 0).
    """
    teacher.eval()
    pv, pp, kl = [], [], []
    for i in range(0, len(patches), batch_size):
        lp = teacher(patches[i : i + batch_size].to(device)).float()
        lv = teacher(views[i : i + batch_size].to(device)).float()
        pp.append(torch.softmax(lp, -1).cpu())
        pv.append(torch.softmax(lv, -1).cpu())
        kl.append(kl_terms(lv, lp).mean(-1).cpu())
    v, t = torch.cat(pv), torch.cat(pp)
    return {
        "view_mae": float((v - t).abs().mean()),
        "view_agreement": float((v.argmax(1) == t.argmax(1)).float().mean()),
        "view_kl": float(torch.cat(kl).mean()),
    }


def finetune_embedder(
    embedder: PatchEmbedder,
    aggregator: MILAggregator,
    train_slides: Sequence[Mapping[str, Any]],
    val_slides: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    epochs: int = 1,
    batches_per_epoch: int = 100,
    batch_size: int = 100,
    lr: float = 1e-5,
    weight_decay: float = 1e-4,
    grad_clip: float = 5.0,
    clip_embedder: bool = False,
    confidence: bool = False,
    beta: float | None = None,
    loss_weights: Sequence[float] = (1.0, 0.5, 0.5),
    min_crop_area: float = 0.5,
    val_interval: int = 50,
    val_patches: int = 256,
    select: str = "mae",
    early_stop_patience: int | None = None,
    num_workers: int = 2,
    read_threads: int = 2,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    grad_checkpointing: bool = False,
    freeze_bn: bool = True,
    seed: int = 0,
    mlflow_run: Any = None,
    progress: bool = True,
    backend: str = "auto",
    stain_normalize: bool = False,
    hed_jitter: float = 0.0,
    views_on_device: bool | None = None,
) -> dict[str, Any]:
    """Fine-tune the patch embedder with the bag classifier as instance teacher.

    Under ``torchrun`` (a default process group is set up), every rank trains the student wrapped in DDP on its share
    of each batch (:class:`DistillationBatches` with ``rank``/``world_size``), so the ranks together take the same
    optimiser steps on the same patches as one process; rank 0 writes the files. The whole state (student, Adam,
    iteration, best score, random generators) is checkpointed at every validation into ``output_dir/resume/``: the
    same call after an interruption continues from there and ends as an uninterrupted run would.

    Args:
        embedder: the embedder that made the bag phase's features (the teacher's; the student starts from it).
        aggregator: the trained bag classifier (its ``reduce``, ``head`` and, for the confidence variant,
            ``attention`` are used).
        train_slides: prepared training slides (patches are sampled from their coordinates; labels are not used).
        val_slides: prepared validation slides (held-out patches for student-vs-teacher agreement).
        output_dir: ``embedder.safetensors`` (the best student), ``student_head.pt`` and ``history.json`` go here.
        epochs, batches_per_epoch, batch_size: how many patches (paper: batch 100).
        lr, weight_decay: Adam (paper: 1e-5, 1e-4).
        grad_clip: clip norm of ``reduce`` and ``head`` (and the embedder with ``clip_embedder``).
        confidence: the confidence-based variant (needs an aggregator with attention).
        beta: its exponent (default 6 for AB-MIL, 2 for DTFD, else 6).
        loss_weights: weights of the view, head and reduce terms.
        min_crop_area: smallest crop area of the student view.
        val_interval: validate every this many iterations (and at each epoch end).
        val_patches: held-out validation patches.
        select: keep the student with the lowest ``"mae"`` or the highest ``"agreement"`` (ICMIL selects by the
            agreement with the teacher), or the ``"last"`` one.
        early_stop_patience: validations without improvement before stopping (``None``: never).
        num_workers, read_threads: reading and augmentation overlap training.
        device, amp, channels_last: default CUDA with bf16 autocast and channels-last; fp32 on CPU.
        grad_checkpointing: trade compute for memory in the student embedder (larger backbones / batches).
        freeze_bn: keep the student's batch-norm layers on their running statistics, as the teacher's are (eval
            mode). Updating them from batches of augmented views made the student drift from the teacher in eval
            mode in our CPU tests (distillation loss 0.0004 -> 0.019), hence on by default.
        seed: seeds patch sampling and augmentation.
        mlflow_run: log params, loss terms, agreement metrics and the checkpoint here.
        progress: show a progress bar.
        backend: slide backend.
        stain_normalize: Macenko-normalise patches with their slide's stains (use the embedding's setting).
        hed_jitter: random HED stain perturbation of the student view (e.g. 0.05; 0 = ICMIL's views).
        views_on_device: make the views batch-wise in the training step on ``device`` (default: on CUDA) rather
            than in the DataLoader workers (default on the CPU, where the workers overlap them with training).

    Returns:
        ``{"checkpoint", "fingerprint", "best": {...}, "best_iteration", "history", "embedder", "world_size",
        "teacher_consistency": :func:`view_consistency` of the teacher on the held-out patches}``.

    Raises:
        EmbedderPhaseError: no tissue patches, an aggregator without attention for the confidence variant, or a
            non-finite loss (names the iteration; the best embedder so far is kept).
        ValueError: the bag classifier's feature dimension differs from the embedder's output.
    """
    from monai.engines import SupervisedTrainer
    from monai.utils import set_determinism

    from monai_icmil.handlers.stats import stats_handler

    if select not in ("mae", "agreement", "last"):
        raise ValueError(f"select must be 'mae', 'agreement' or 'last', got {select!r}")
    if aggregator.in_dim != embedder.out_dim:
        raise ValueError(
            f"the bag classifier expects {aggregator.in_dim}-d features but the embedder '{embedder.name}' gives "
            f"{embedder.out_dim}-d: the checkpoint belongs to another embedder or feature dimension."
        )
    if confidence and not aggregator.has_attention:
        raise EmbedderPhaseError(f"the confidence-based variant needs attention; {type(aggregator).__name__} has none")
    if beta is None:
        beta = 2.0 if type(aggregator).__name__ == "DTFDMIL" else 6.0
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = device.type == "cuda" if amp is None else amp
    channels_last = True if channels_last is None else channels_last
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_determinism(seed)
    rank, world_size = _dist_context()

    train_data = DistillationBatches(
        train_slides,
        batch_size,
        batches_per_epoch,
        seed,
        min_crop_area,
        read_threads,
        backend,
        rank,
        world_size,
        stain_normalize,
        hed_jitter,
        views_in_worker=not (device.type == "cuda" if views_on_device is None else views_on_device),
    )
    val_data = DistillationBatches(
        val_slides or train_slides,
        val_patches,
        1,
        seed + 1,
        min_crop_area,
        read_threads,
        backend,
        stain_normalize=stain_normalize,
        with_views=False,
    )
    # fixed held-out patches, read once (every rank: same patches, same decisions), and one student view of each
    held_out, held_out_seeds = val_data.draw(0)
    held_out_views = val_data.make_views(held_out, held_out_seeds)

    teacher = InstanceClassifier(copy.deepcopy(embedder), copy.deepcopy(aggregator)).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    consistency = view_consistency(teacher, held_out, held_out_views, device)
    logger.info(
        "instance teacher on plain patches vs the student's views of them: agreement %.3f, mean |dp| %.3f, "
        "view KL %.4f",
        consistency["view_agreement"],
        consistency["view_mae"],
        consistency["view_kl"],
    )
    if consistency["view_agreement"] < VIEW_AGREEMENT_WARN:
        warnings.warn(
            f"the instance teacher labels {1 - consistency['view_agreement']:.0%} of held-out patches differently "
            "once flipped/cropped/stain-jittered as the student sees them (agreement "
            f"{consistency['view_agreement']:.3f} < {VIEW_AGREEMENT_WARN}): the embedder phase will mostly teach the "
            "student that invariance rather than the teacher's classes. Usual causes: a random-init or untuned "
            "starting embedder; milder views (min_crop_area closer to 1, lower hed_jitter) or pretrained weights "
            "help.",
            stacklevel=2,
        )
    student = InstanceClassifier(copy.deepcopy(embedder), copy.deepcopy(aggregator)).to(device)
    for p in student.parameters():
        p.requires_grad_(False)
    for p in student.trainable_parameters():
        p.requires_grad_(True)
    if channels_last:
        teacher.embedder.to(memory_format=torch.channels_last)
        student.embedder.to(memory_format=torch.channels_last)
    if grad_checkpointing:
        student.embedder.set_grad_checkpointing(True)
    student_step: nn.Module = StudentStep(student)
    if world_size > 1:  # gradients are averaged over the ranks, whose batches together are the single-process one
        from torch.nn.parallel import DistributedDataParallel

        student_step = DistributedDataParallel(
            student_step, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.Adam(student.trainable_parameters(), lr=lr, weight_decay=weight_decay)
    criterion = ICMILDistillationLoss(*loss_weights, confidence=confidence, beta=beta)

    sampler = ResumableSequentialSampler(batches_per_epoch)
    loader = DataLoader(
        train_data,
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=None,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),  # leaves the global generators alone (exact resumes)
    )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=loader,
        network=student,
        optimizer=optimizer,
        loss_function=criterion,
        iteration_update=couple_step,
        decollate=False,
        epoch_length=batches_per_epoch,
    )
    trainer.teacher = teacher
    trainer.student_step = student_step
    trainer.views = train_data.views
    trainer.couple_cfg = {
        "device": device,
        "amp": amp,
        "channels_last": channels_last,
        "confidence": confidence,
        "grad_clip": grad_clip,
        "clip_embedder": clip_embedder,
        "freeze_bn": freeze_bn,
    }
    ckpt = out_dir / "embedder.safetensors"
    progress_state = PhaseProgress({"score": -math.inf, "iteration": 0, "metrics": {}})
    history, best = progress_state.history, progress_state.best
    progress_state.extra["stale"] = 0
    resume = ResumeCheckpoint(
        out_dir / "resume",
        {"trainer": trainer, "network": student, "optimizer": optimizer, "progress": progress_state},
        stable_hash(
            {
                "embedder": embedder.fingerprint(),
                "aggregator": {k: v.float().sum().item() for k, v in aggregator.state_dict().items()},
                "train": [(s["slide_id"], len(s["coords"])) for s in train_data.slides],
                "settings": [epochs, batches_per_epoch, batch_size, lr, weight_decay, grad_clip, clip_embedder],
                "more": [confidence, beta, list(loss_weights), min_crop_area, val_interval, val_patches, select],
                "rest": [early_stop_patience, freeze_bn, seed, world_size, stain_normalize, hed_jitter],
            }
        ),
    )

    @trainer.on(Events.EPOCH_STARTED)
    def _epoch(engine: Engine) -> None:
        train_data.set_epoch(engine.state.epoch)
        sampler.start = engine.state.iteration % batches_per_epoch  # not 0 only when resuming inside an epoch

    def _validate(engine: Engine) -> None:
        if history and history[-1]["iteration"] == engine.state.iteration:
            return
        m = agreement(student, teacher, held_out, device)
        row = {
            "iteration": engine.state.iteration,
            "epoch": engine.state.epoch,
            **m,
            **{f"loss_{k}": v for k, v in (engine.state.output or {}).items()},
        }
        history.append(row)
        score = {"mae": -m["mae"], "agreement": m["agreement"], "last": float(engine.state.iteration)}[select]
        if score > best["score"]:
            best.update(score=score, iteration=engine.state.iteration, metrics=m)
            if rank == 0:
                student.embedder.save(
                    ckpt, extra={"round_source": embedder.fingerprint(), "iteration": str(engine.state.iteration)}
                )
                with atomic_path(out_dir / "student_head.pt") as tmp:
                    torch.save({k: v.detach().cpu() for k, v in student.aggregator.state_dict().items()}, tmp)
            progress_state.extra["stale"] = 0
        else:
            progress_state.extra["stale"] += 1
        if mlflow_run is not None:
            mlflow_run.log_metrics({f"val_{k}": v for k, v in m.items()}, step=engine.state.iteration)
        if early_stop_patience and progress_state.extra["stale"] >= early_stop_patience:
            engine.terminate()
        resume(engine)  # rank 0 writes; a kill from here on loses at most `val_interval` iterations

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=max(1, val_interval)), _validate)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, _validate)
    stats_handler(
        "monai_icmil.couple",
        output_transform=lambda o: o["loss"],
        iteration_log=False,
        tag_name="distillation_loss",
    ).attach(trainer)
    if mlflow_run is not None:
        from monai_icmil.handlers.tracking import mlflow_handler

        mlflow_handler(
            mlflow_run,
            iteration_log=True,
            epoch_log=False,
            tag_name="loss",
            output_transform=lambda o: {f"loss_{k}": v for k, v in o.items()},
        ).attach(trainer)
        mlflow_run.log_params(
            {
                "embedder": embedder.name,
                "embedder_fingerprint": embedder.fingerprint(),
                "aggregator": type(aggregator).__name__,
                "optimizer": "Adam",
                "lr": lr,
                "weight_decay": weight_decay,
                "grad_clip": grad_clip,
                "batch_size": batch_size,
                "epochs": epochs,
                "batches_per_epoch": batches_per_epoch,
                "confidence": confidence,
                "beta": beta,
                "loss_weights": list(loss_weights),
                "min_crop_area": min_crop_area,
                "select": select,
                "seed": seed,
                "freeze_bn": freeze_bn,
                "world_size": world_size,
                "stain_normalize": stain_normalize,
                "hed_jitter": hed_jitter,
            }
        )
    if progress and rank == 0:
        from ignite.contrib.handlers import ProgressBar

        ProgressBar(desc="embedder phase", persist=False).attach(
            trainer, output_transform=lambda o: {"loss": o["loss"]}
        )
    resume.run(trainer)  # continues an interrupted run (logs where from)
    if world_size > 1:
        torch.distributed.barrier()
    if rank == 0:
        if not ckpt.is_file():  # no validation ran (e.g. terminated at once): keep the initial student
            student.embedder.save(ckpt)
        atomic_write_json(out_dir / "history.json", history)
        resume.clear()
    if world_size > 1:
        torch.distributed.barrier()  # every rank loads the same tuned embedder
    from monai_icmil.networks.embedders import create_embedder

    tuned = create_embedder(None, weights=ckpt)
    if mlflow_run is not None:
        mlflow_run.log_metrics({f"best_val_{k}": v for k, v in best["metrics"].items()})
        mlflow_run.log_metrics({f"teacher_{k}": v for k, v in consistency.items()})
        mlflow_run.log_artifacts([ckpt, out_dir / "history.json"], artifact_path="embedder_phase")
    return {
        "checkpoint": str(ckpt),
        "fingerprint": tuned.fingerprint(),
        "best": best["metrics"],
        "best_iteration": best["iteration"],
        "history": history,
        "embedder": tuned,
        "world_size": world_size,
        "teacher_consistency": consistency,
    }


def _dist_context() -> tuple[int, int]:
    """``(rank, world_size)``; under a process group also sets up ignite's context on every rank at once (ignite's
    first distributed call is collective, and the resume checkpoint's saver makes it)."""
    rank, world_size = _dist_info()
    if world_size > 1:
        import ignite.distributed as idist

        idist.get_rank()
    return rank, world_size
