# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The embedder phase: ICMIL's teacher-student fine-tuning of the patch embedder.

The bag classifier trained in the bag phase, applied to single patches through its ``reduce`` and ``head``, is an
instance-level teacher. Teacher = frozen copies of the embedder, ``reduce`` and ``head`` (eval mode, no gradient);
student = trainable copies of the same three, initialised from the teacher. For random tissue patches of the
training slides (no slide labels are used), the teacher sees the plain patch and the student a random view of it
(the bundle's ``embedder_phase#views``: by default flips + a random resized crop of 50-100 % of the area, optionally
a HED stain perturbation), made for the whole batch at once (:class:`~monai_icmil.transforms.views
.BatchRandomViews`); the student learns to match the teacher (``embedder_phase#loss``:
:class:`~monai_icmil.losses.ICMILDistillationLoss`). With ``normal_slide_targets`` the slide labels are used once:
patches of class-0 slides are taught class 0 instead of the teacher's label (:func:`normal_slide_targets`).

:class:`EmbedderPhase` is the phase as the bundle declares it; :class:`EmbedderPhaseTrainer` is its engine, holding
both networks (as MONAI's ``AdversarialTrainer`` holds two) with the teacher-student step as its ``_iteration``;
:class:`StudentSelection` is the handler that, every ``val_interval`` iterations and at each epoch end, compares
student and teacher on held-out patches of the validation slides (mean absolute probability difference, argmax
agreement), keeps the best student in the format :func:`~monai_icmil.networks.create_embedder` loads (a new
fingerprint, so the next round's embedding recomputes every feature), stops early and checkpoints for resuming.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from torch.utils.data import DataLoader, Dataset, Sampler

from monai_icmil.data.slide import get_slide
from monai_icmil.data.store import StoredArray, stored_array, stored_file_key
from monai_icmil.handlers.checkpoint import PhaseProgress, ResumeCheckpoint
from monai_icmil.handlers.common import attach_handlers, attach_progress_bar, describe_components
from monai_icmil.losses import ICMILDistillationLoss, kl_terms
from monai_icmil.networks.aggregators import MILAggregator, aggregator_name
from monai_icmil.networks.embedders import PatchEmbedder
from monai_icmil.transforms.stain import slide_stain_normalizer
from monai_icmil.transforms.views import BatchRandomViews
from monai_icmil.utils import (
    as_bool,
    atomic_path,
    atomic_write_json,
    component_signature,
    default_device,
    dist_info,
    stable_hash,
)

logger = logging.getLogger("monai_icmil.embedder_phase")

#: below this teacher agreement between plain patches and student views, the embedder phase warns
VIEW_AGREEMENT_WARN = 0.9

__all__ = [
    "EmbedderPhase",
    "EmbedderPhaseError",
    "EmbedderPhaseTrainer",
    "StudentSelection",
    "InstanceClassifier",
    "DistillationBatches",
    "ResumableSequentialSampler",
    "StudentStep",
    "TeacherStep",
    "Throughput",
    "agreement",
    "normal_slide_targets",
    "view_consistency",
]


class EmbedderPhaseError(RuntimeError):
    """The embedder phase cannot start or go on; the message says why and what to do."""


class InstanceClassifier(nn.Module):
    """A bag classifier applied to single patches: ``embedder -> reduce -> instance head`` (+ the aggregator's
    attention).

    Args:
        embedder: the patch embedder.
        aggregator: the bag classifier.
        confidence: the confidence-based variant's teacher (its instance head may differ: DTFD-MIL mixes its two
            tiers, :meth:`~monai_icmil.networks.MILAggregator.instance_head`).
    """

    def __init__(self, embedder: PatchEmbedder, aggregator: MILAggregator, confidence: bool = False):
        super().__init__()
        self.embedder, self.aggregator, self.confidence = embedder, aggregator, bool(confidence)

    def head_on_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reduce(feats), instance_head(reduce(feats)))``."""
        h = self.aggregator.reduce(feats)
        return h, self.aggregator.instance_head(h, self.confidence)

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
    in a single forward): ``(logits(view), *student.head_on_features(teacher_features), reduce(view))``, where
    ``reduce(view), logits(view) = student.head_on_features(student.embedder(view))``."""

    def __init__(self, student: InstanceClassifier):
        super().__init__()
        self.student = student

    def forward(self, view: torch.Tensor, teacher_feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h_view, logits = self.student.head_on_features(self.student.embedder(view))
        h_on_t, logits_on_t = self.student.head_on_features(teacher_feats)
        return logits, h_on_t, logits_on_t, h_view


# ---------------------------------------------------------------------------------------------------- data


class TeacherStep(nn.Module):
    """The frozen teacher's pass of one iteration as one module call (so it compiles as one graph): the embedder
    features of the plain patches (or, given, their stored features), their reduction, the instance logits and, for
    the confidence-weighted loss, the attention confidence scores
    (:meth:`~monai_icmil.networks.MILAggregator.confidence_scores`; ``None`` otherwise).
    """

    def __init__(self, teacher: InstanceClassifier, confidence: bool = False):
        super().__init__()
        self.teacher, self.confidence = teacher, bool(confidence)

    def forward(
        self, plain: torch.Tensor, feats: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if feats is None:  # else: the teacher embedder's stored features of these patches
            feats = self.teacher.embedder(plain)
        h, logits = self.teacher.head_on_features(feats)
        scores = self.teacher.aggregator.confidence_scores(h) if self.confidence else None
        return feats, h, logits, scores


class DistillationBatches(Dataset):
    """Batches of random tissue patches of the training slides, with their student views.

    Item ``i`` of epoch ``e`` is drawn from a generator seeded with ``(seed, e, i)``, so batches are the same
    whatever the number of DataLoader workers. Patches are read with one batched call per slide. Under DDP (the
    distributed patch sampler), rank ``k`` of ``n`` takes patches ``k, k + n, ...`` of each drawn batch, with the
    same student views they would have in one process: together the ranks see exactly the single-process batch.

    Args:
        slides: prepared slides (``image``, ``coords``, ``level``, ``read_size``, ``patch_size``).
        views: the student views (default: ICMIL's, flips + a random resized crop of 50-100 % of the area).
        batch_size: patches per batch.
        num_batches: batches per epoch.
        seed: base seed.
        read_threads: decoding threads per read.
        backend: slide backend.
        rank, world_size: this process's share of each batch (DDP).
        stain_normalize: Macenko-normalise patches with their slide's stains (as the embedding did).
        with_views: make the student views (``False``: plain patches only, e.g. held-out validation patches).
        views_in_worker: make the views here, in the DataLoader worker (right for CPU training). ``False``: return
            only their random parameters (``"view_params"``), and the training step makes them on its device
            (:attr:`views`), which on a GPU is ~100x cheaper than in the worker.
        normal_ids: ``slide_id`` of the slides of class 0 (normal): items then carry ``"normal"``, bool ``[B]``,
            whether each patch comes from one (:func:`normal_slide_targets`).
        teacher_features: ``slide_id`` -> the store file of the teacher embedder's features of the slide's patches
            (one row per coordinate, :class:`~monai_icmil.data.store.FeatureStore`): items then carry
            ``"teacher_features"`` ``[B, D]`` (the stored dtype), read instead of recomputed by the training step.
        teacher_fingerprint: the teacher embedder's fingerprint, which the stored features' key must name.

    Returns per item: ``{"plain": uint8 [B, 3, P, P], "view": float [B, 3, P, P] in [0, 1]}`` or, without
    ``views_in_worker``, ``{"plain", "view_params": float [B, 15]}`` (``B`` is ``batch_size / world_size`` under DDP);
    with ``normal_ids`` also ``"normal"``.

    Raises:
        EmbedderPhaseError: no slide has a tissue patch.
        ValueError: the views' patch size differs from the slides', or a batch that the ranks cannot split.
    """

    def __init__(
        self,
        slides: Sequence[Mapping[str, Any]],
        views: BatchRandomViews | None = None,
        batch_size: int = 100,
        num_batches: int = 100,
        seed: int = 0,
        read_threads: int = 2,
        backend: str = "auto",
        rank: int = 0,
        world_size: int = 1,
        stain_normalize: bool = False,
        with_views: bool = True,
        views_in_worker: bool = True,
        normal_ids: Collection[str] = (),
        teacher_features: Mapping[str, str | os.PathLike] | None = None,
        teacher_fingerprint: str | None = None,
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
        self.views = views if views is not None else BatchRandomViews(self.patch_size)
        if self.views.patch_size != self.patch_size:
            raise ValueError(
                f"the views make {self.views.patch_size}-px patches but the slides are tiled at {self.patch_size} px: "
                "set the views' patch_size to the tiling's (embedder_phase#views#patch_size: @tiling#patch_size)."
            )
        self.stain_normalize, self.with_views, self.views_in_worker = stain_normalize, with_views, views_in_worker
        self.read_threads, self.backend = read_threads, backend
        ids = set(normal_ids or ())
        self.normal = np.array([s.get("slide_id") in ids for s in self.slides]) if ids else None
        self.feature_files = None
        if teacher_features is not None:
            self.feature_files = self._feature_files(teacher_features, teacher_fingerprint)
        self.epoch = 0

    def _feature_files(self, files: Mapping[str, str | os.PathLike], fingerprint: str | None) -> list[StoredArray]:
        """Each slide's stored features, checked: present, made by the teacher embedder (``fingerprint``) with this
        stain setting, one row per patch of the slide's coordinates in their order."""
        out = []
        for s in self.slides:
            sid, path = s.get("slide_id"), files.get(s.get("slide_id"))
            fix = "re-embed the slide with the teacher embedder, or set embedder_phase#teacher_features to false"
            if path is None or not Path(path).is_file():
                raise EmbedderPhaseError(f"no stored teacher features for training slide {sid!r}: {fix}")
            feats, coords, key = stored_array(path), stored_array(path, "coords"), stored_file_key(path) or {}
            if feats is None or coords is None:
                raise EmbedderPhaseError(f"{path}: no 'features' and 'coords' arrays for slide {sid!r}: {fix}")
            if fingerprint is not None and key.get("embedder") != fingerprint:
                raise EmbedderPhaseError(
                    f"{path}: the stored features of slide {sid!r} were made by another embedder "
                    f"({key.get('embedder')}, not the teacher's {fingerprint}): {fix}"
                )
            if ("stain_normalize" in key) != bool(self.stain_normalize):
                raise EmbedderPhaseError(
                    f"{path}: the stored features of slide {sid!r} were made with stain normalisation "
                    f"{'on' if 'stain_normalize' in key else 'off'}, the phase has it "
                    f"{'on' if self.stain_normalize else 'off'}: {fix}"
                )
            if not np.array_equal(coords.rows().numpy(), np.asarray(s["coords"])):
                raise EmbedderPhaseError(
                    f"{path}: the stored features of slide {sid!r} are of other patches ({coords.shape[0]} stored, "
                    f"{len(s['coords'])} now; another tiling): {fix}"
                )
            out.append(feats)
        return out

    def teacher_rows(self, flat: np.ndarray) -> torch.Tensor:
        """The stored teacher features ``[B, D]`` of flat patch indices (one memory-mapped read per slide)."""
        slide_idx, out = self.slide_of(flat), None
        for si in np.unique(slide_idx):
            rows = np.flatnonzero(slide_idx == si)
            values = self.feature_files[si].rows(flat[rows] - self.offsets[si])
            out = values.new_empty((len(flat), values.shape[1])) if out is None else out
            out[torch.as_tensor(rows)] = values
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def slide_of(self, flat: np.ndarray) -> np.ndarray:
        """The index in :attr:`slides` of each flat patch index."""
        return np.searchsorted(self.offsets, flat, side="right") - 1

    def read(self, flat: np.ndarray) -> torch.Tensor:
        """Patches ``[B, 3, P, P]`` (uint8) for flat patch indices, read with one call per slide."""
        slide_idx = self.slide_of(flat)
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

    def indices(self, i: int, views_per_patch: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """This rank's flat patch indices of item ``i`` and ``views_per_patch`` view seeds for each of them."""
        rng = np.random.default_rng((self.seed, self.epoch, int(i)))
        flat = rng.integers(0, int(self.offsets[-1]), self.batch_size)
        view_seeds = rng.integers(2**31, size=(self.batch_size, views_per_patch))
        mine = slice(self.rank, None, self.world_size)
        return flat[mine], view_seeds[mine]

    def draw(self, i: int, views_per_patch: int = 1) -> tuple[torch.Tensor, np.ndarray]:
        """This rank's patches of item ``i`` (uint8) and ``views_per_patch`` view seeds for each of them."""
        flat, view_seeds = self.indices(i, views_per_patch)
        return self.read(flat), view_seeds

    def is_normal(self, flat: np.ndarray) -> torch.Tensor | None:
        """Whether each flat patch index is of a class-0 slide (``None`` without ``normal_ids``)."""
        if self.normal is None:
            return None
        return torch.as_tensor(self.normal[self.slide_of(flat)])

    def make_views(self, plain: torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        """One student view of each ``uint8`` patch, drawn with its seed (float ``[B, 3, P, P]`` in [0, 1])."""
        return self.views(plain, self.views.draw(np.asarray(seeds)[:, 0]))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        flat, seeds = self.indices(i)
        item = {"plain": self.read(flat)}
        if self.feature_files is not None:
            item["teacher_features"] = self.teacher_rows(flat)
        if (normal := self.is_normal(flat)) is not None:
            item["normal"] = normal
        if not self.with_views:
            return item
        params = self.views.draw(seeds[:, 0])
        if self.views_in_worker:
            return {**item, "view": self.views(item["plain"], params)}
        return {**item, "view_params": params}


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


# ---------------------------------------------------------------------------------------------------- engine


class EmbedderPhaseTrainer(SupervisedTrainer):
    """MONAI's trainer holding the teacher and the student, with ICMIL's teacher-student step as its iteration.

    The step moves the batch to the device (making the student views there when the batch carries only their
    parameters), runs the frozen teacher on the plain patches (embedder features, reduced features, logits and, for
    a confidence-weighted loss, the teacher's confidence scores,
    :meth:`~monai_icmil.networks.MILAggregator.confidence_scores`), the student on the views and on the teacher's
    features (:class:`StudentStep`, DDP-wrapped under ``torchrun``), applies ``loss_function``, refuses a non-finite
    loss, clips the reduction's and classifier's gradients (as ICMIL's reference; the embedder's too with
    ``clip_embedder``) and steps the optimizer.

    Args:
        device, max_epochs, epoch_length, train_data_loader, optimizer, loss_function: as MONAI's trainer
            (``network`` is the student).
        teacher: the frozen instance classifier.
        student: the trainable one (its :meth:`InstanceClassifier.trainable_parameters` are optimised).
        views: the batch views (for batches that carry ``view_params``).
        student_step: the student's forward as one module, returning what :class:`StudentStep` returns
            (default: ``StudentStep(student)``).
        teacher_step: the teacher's forward as one module (default: ``TeacherStep(teacher)``, with the confidence
            scores when the loss is confidence-weighted).
        amp: bf16 autocast.
        channels_last: channels-last inputs.
        grad_clip: clip norm of ``reduce`` and ``head`` (and the embedder with ``clip_embedder``).
        freeze_bn: keep the student embedder's batch-norm layers on their running statistics.
    """

    def __init__(
        self,
        device: torch.device,
        max_epochs: int,
        epoch_length: int,
        train_data_loader: DataLoader,
        teacher: InstanceClassifier,
        student: InstanceClassifier,
        optimizer: torch.optim.Optimizer,
        loss_function: ICMILDistillationLoss,
        views: BatchRandomViews,
        student_step: nn.Module | None = None,
        amp: bool = False,
        channels_last: bool = True,
        grad_clip: float | None = 5.0,
        clip_embedder: bool = False,
        freeze_bn: bool = True,
        teacher_step: nn.Module | None = None,
    ):
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=student,
            optimizer=optimizer,
            loss_function=loss_function,
            decollate=False,
            epoch_length=epoch_length,
        )
        self.teacher, self.views = teacher, views
        self.student_step = student_step if student_step is not None else StudentStep(student)
        confidence = getattr(loss_function, "confidence", False)
        self.teacher_step = teacher_step if teacher_step is not None else TeacherStep(teacher, confidence)
        self.amp, self.channels_last, self.grad_clip, self.clip_embedder = amp, channels_last, grad_clip, clip_embedder
        self.freeze_bn = freeze_bn

    def _inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        plain = batch["plain"].to(self.state.device, non_blocking=True)
        if "view" in batch:
            view = batch["view"].to(self.state.device, non_blocking=True)
        else:  # the views are made here, on the training device, from the worker's random parameters
            view = self.views(plain, batch["view_params"])
        if self.channels_last:
            plain = plain.contiguous(memory_format=torch.channels_last)
            view = view.contiguous(memory_format=torch.channels_last)
        return plain, view

    def _iteration(self, engine: Engine, batchdata: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        plain, view = self._inputs(batchdata)
        autocast = torch.autocast(self.state.device.type, dtype=torch.bfloat16, enabled=self.amp)
        stored = batchdata.get("teacher_features")
        if stored is not None:
            stored = stored.to(self.state.device, non_blocking=True).float()
        with torch.no_grad(), autocast:
            f_t, h_t, logits_t, scores = self.teacher_step(plain, stored)
            logits_t = normal_slide_targets(logits_t, batchdata.get("normal"))
        student: InstanceClassifier = self.network
        student.train()
        if self.freeze_bn:
            _freeze_batchnorm(student.embedder)
        with autocast:
            logits_s, h_s_on_t, logits_s_on_t, h_s = self.student_step(view, f_t.detach())
            own = {"student_view_reduce": h_s} if getattr(self.loss_function, "feature_weight", 0) else {}
            terms = self.loss_function(logits_s, logits_t, logits_s_on_t, h_s_on_t, h_t, scores, **own)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise EmbedderPhaseError(
                f"non-finite loss ({loss.item()}) at iteration {self.state.iteration}; training stopped, the best "
                "student embedder so far is kept. Lower the learning rate."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            # as ICMIL's reference: clip the reduction and the classifier (optionally the embedder too)
            torch.nn.utils.clip_grad_norm_(student.aggregator.dim_reduction.parameters(), self.grad_clip)
            torch.nn.utils.clip_grad_norm_(student.aggregator.head.parameters(), self.grad_clip)
            if self.clip_embedder:
                torch.nn.utils.clip_grad_norm_(student.embedder.parameters(), self.grad_clip)
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in terms.items()}


class Throughput:
    """Times a trainer's run: its first iteration (start-up: worker processes, the first batch, a compile) apart
    from the iterations after it (with the validations between them), as ``steady_patches_per_s``. A resumed run is
    timed from where it resumed. For short runs the steady rate is unreliable (the workers prefetch batches during
    the first iteration).

    Args:
        patches_per_iteration: the patches one iteration trains on (all ranks together under ``torchrun``).
    """

    def __init__(self, patches_per_iteration: int):
        self.patches_per_iteration = int(patches_per_iteration)
        self.start = self.first = self.last = None
        self.iterations = 0

    def attach(self, engine: Engine) -> Throughput:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        return self

    def _started(self, engine: Engine) -> None:
        self.start, self.first, self.last, self.iterations = time.perf_counter(), None, None, 0

    def _iteration(self, engine: Engine) -> None:
        self.last = time.perf_counter()
        self.first = self.first or self.last
        self.iterations += 1

    def figures(self) -> dict[str, float | None]:
        """``{"first_iteration_s", "steady_patches_per_s"}`` (``None`` when there were fewer than 2 iterations)."""
        if self.start is None or self.first is None:
            return {"first_iteration_s": None, "steady_patches_per_s": None}
        steady = None
        if self.iterations > 1 and self.last > self.first:
            steady = (self.iterations - 1) * self.patches_per_iteration / (self.last - self.first)
        return {"first_iteration_s": self.first - self.start, "steady_patches_per_s": steady}


def _freeze_batchnorm(module: nn.Module) -> None:
    """Keep batch-norm layers on their running statistics (their affine parameters still train)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def normal_slide_targets(teacher_logits: torch.Tensor, normal: torch.Tensor | None) -> torch.Tensor:
    """The teacher's logits with the rows of patches from class-0 (normal) slides replaced by a certain class 0.

    Every patch of a normal slide is normal (the MIL assumption), whatever the teacher says. A bag classifier applied
    to single patches is not calibrated for them: on sparse tumours (``benchmarks/RESULTS.md``, session 30) the
    round-0 teacher called 24-47 % of tumour-free patches tumour (up to 24 % with probability > 0.99), and only
    1-4 % of the patches it called tumour were. With these targets the student is taught, on normal slides, to call
    normal what the teacher mistakes for tumour; patches of other slides keep the teacher's labels. ``normal``: bool
    ``[B]`` (``None``: the logits unchanged). Measured there, it did not make the coupled round better.
    """
    if normal is None:
        return teacher_logits
    certain = torch.full_like(teacher_logits[:1], -1e4)
    certain[:, 0] = 0.0
    return torch.where(normal.to(teacher_logits.device)[:, None], certain, teacher_logits)


@torch.no_grad()
def agreement(
    student: InstanceClassifier,
    teacher: InstanceClassifier,
    patches: torch.Tensor,
    device: torch.device,
    batch_size: int = 128,
    normal: torch.Tensor | None = None,
) -> dict[str, float]:
    """Student vs teacher on the same plain patches: mean absolute probability difference and argmax agreement
    (with ``normal``, bool per patch, against :func:`normal_slide_targets`)."""
    student.eval()
    ps, pt = [], []
    for i in range(0, len(patches), batch_size):
        x = patches[i : i + batch_size].to(device)
        ps.append(torch.softmax(student(x).float(), -1).cpu())
        target = normal_slide_targets(teacher(x).float(), None if normal is None else normal[i : i + batch_size])
        pt.append(torch.softmax(target, -1).cpu())
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


class StudentSelection:
    """Student vs teacher on fixed held-out patches every ``interval`` iterations and at each epoch end.

    Each validation appends a history row (iteration, epoch, :func:`agreement`, the last loss terms), keeps the
    student when its score is the best so far (``select``: lowest ``"mae"``, highest ``"agreement"``, or the
    ``"last"`` one) by saving its embedder (``embedder.safetensors``, with the teacher embedder's fingerprint as its
    source) and head (``student_head.pt``) on rank 0, stops the engine after ``early_stop_patience`` validations
    without improvement, logs to MLflow and finally calls ``on_validated`` (the resume checkpoint).

    Args:
        teacher, student: the two instance classifiers.
        held_out: uint8 held-out patches of the validation slides.
        device: where to run them.
        progress: history and best record (part of the resume checkpoint).
        output_dir: where the kept student goes.
        source_fingerprint: the teacher embedder's fingerprint.
        select, interval, early_stop_patience: see above.
        rank: the process's rank (rank 0 writes).
        mlflow_run: ``val_*`` metrics per validation.
        on_validated: called with the engine after each validation.
        held_out_normal: bool per held-out patch, of a class-0 slide (the student is then compared with
            :func:`normal_slide_targets`, what it is taught).
    """

    def __init__(
        self,
        teacher: InstanceClassifier,
        student: InstanceClassifier,
        held_out: torch.Tensor,
        device: torch.device,
        progress: PhaseProgress,
        output_dir: Path,
        source_fingerprint: str,
        select: str = "mae",
        interval: int = 50,
        early_stop_patience: int | None = None,
        rank: int = 0,
        mlflow_run: Any = None,
        on_validated: Callable[[Engine], None] | None = None,
        held_out_normal: torch.Tensor | None = None,
    ):
        self.teacher, self.student, self.held_out, self.device = teacher, student, held_out, device
        self.held_out_normal = held_out_normal
        self.progress, self.output_dir, self.source = progress, Path(output_dir), source_fingerprint
        self.select, self.interval, self.patience, self.rank = select, int(interval), early_stop_patience, rank
        self.mlflow_run, self.on_validated = mlflow_run, on_validated
        self.progress.extra.setdefault("stale", 0)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=max(1, self.interval)), self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        history, best, extra = self.progress.history, self.progress.best, self.progress.extra
        if history and history[-1]["iteration"] == engine.state.iteration:
            return
        m = agreement(self.student, self.teacher, self.held_out, self.device, normal=self.held_out_normal)
        losses = {f"loss_{k}": v for k, v in (engine.state.output or {}).items()}
        history.append({"iteration": engine.state.iteration, "epoch": engine.state.epoch, **m, **losses})
        score = {"mae": -m["mae"], "agreement": m["agreement"], "last": float(engine.state.iteration)}[self.select]
        if score > best["score"]:
            best.update(score=score, iteration=engine.state.iteration, metrics=m)
            if self.rank == 0:
                self.save(engine.state.iteration)
            extra["stale"] = 0
        else:
            extra["stale"] += 1
        if self.mlflow_run is not None:
            self.mlflow_run.log_metrics({f"val_{k}": v for k, v in m.items()}, step=engine.state.iteration)
        if self.patience and extra["stale"] >= self.patience:
            engine.terminate()
        if self.on_validated is not None:
            self.on_validated(engine)  # a kill from here on loses at most `interval` iterations

    def save(self, iteration: int) -> None:
        """The student's embedder and head, as the kept student."""
        extra = {"round_source": self.source, "iteration": str(iteration)}
        self.student.embedder.save(self.output_dir / "embedder.safetensors", extra=extra)
        save_student_head(self.student.aggregator, self.output_dir / "student_head.pt")


def save_student_head(aggregator: nn.Module, path: Path) -> None:
    """The student's copy of the bag classifier (its whole state; ICMIL trains its ``reduce`` and ``head``), on the
    CPU, written atomically: what ``bag_phase#warm_start`` starts the next bag phase from."""
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in aggregator.state_dict().items()}, tmp)


def load_student_classifier(
    classifier: str | os.PathLike,
    head: str | os.PathLike,
    expect_in_dim: int | None = None,
    expect_aggregator: Any = None,
) -> tuple[MILAggregator, list[str]]:
    """The student's classifier on the CPU: the bag classifier the embedder phase copied (``classifier``, e.g. round
    r-1's ``bag_classifier.pt``) with the state it saved (``head``, ``student_head.pt``) loaded strictly; and the names
    of the parameters and buffers the phase does not train (attention, DTFD's tier 1, input statistics) that differ
    between the two files (any: the student was copied from another classifier).

    Raises:
        ValueError: ``classifier`` is not a bag classifier of the expected kind (see :func:`load_bag_classifier`).
        RuntimeError, OSError: ``head`` cannot be read or does not fit ``classifier``.
    """
    from monai_icmil.engines.bag_phase import load_bag_classifier

    net = load_bag_classifier(classifier, "cpu", expect_in_dim=expect_in_dim, expect_aggregator=expect_aggregator)
    copied = {k: v.clone() for k, v in net.state_dict().items()}
    state = torch.load(head, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    trained = {id(p) for module in (net.dim_reduction, net.head) for p in module.parameters()}
    fixed = [n for n, p in net.named_parameters(remove_duplicate=False) if id(p) not in trained]
    fixed += [n for n, _ in net.named_buffers()]
    return net, [n for n in fixed if not torch.equal(copied[n], state[n])]


# ---------------------------------------------------------------------------------------------------- the phase


class EmbedderPhase:
    """ICMIL's embedder phase as configured: fine-tunes the patch embedder with the bag classifier as teacher.

    Under ``torchrun`` (a default process group is set up), every rank trains the student wrapped in DDP on its share
    of each batch (:class:`DistillationBatches` with ``rank``/``world_size``), so the ranks together take the same
    optimiser steps on the same patches as one process; rank 0 writes the files. The whole state (student, optimiser,
    iteration, best score, random generators) is checkpointed at every validation into ``output_dir/resume/``: the
    same call after an interruption continues from there and ends as an uninterrupted run would.

    Args:
        loss_function: the distillation loss (default: :class:`~monai_icmil.losses.ICMILDistillationLoss`; with
            ``confidence=True`` and ``beta=None``, beta is 2 for DTFD-MIL and 6 otherwise).
        optimizer: a factory called with the student's trainable parameters (default: Adam, lr 1e-5, weight decay
            1e-4, as the paper).
        views: the student views (default: flips + a random resized crop of 50-100 % of the area, at the slides'
            patch size).
        handlers: more handlers for the trainer (objects with ``attach``, or classes/partials building them).
        epochs, batches_per_epoch, batch_size: how many patches (paper: batch 100).
        grad_clip: clip norm of ``reduce`` and ``head`` (and the embedder with ``clip_embedder``).
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
        views_on_device: make the views batch-wise in the training step on ``device`` (default: on CUDA) rather
            than in the DataLoader workers (default on the CPU, where the workers overlap them with training).
        progress: show a progress bar.
        compile: ``torch.compile`` the teacher's and the student's steps (:class:`TeacherStep`, :class:`StudentStep`;
            forward and backward) for the phase's fixed batch shape. Off by default: on one H200 (ResNet50-trunc,
            256 px, batch 100, bf16) the compiled step ran 2,577 patches/s against 2,740 eager, and the phase 1,872
            against 2,218 (``benchmarks/RESULTS.md``, run 7). Compiled code is cached per process.
        teacher_features: take the teacher embedder's features of the plain patches from the previous round's feature
            store (the embedding already computed them: same embedder, same patches) instead of recomputing them,
            which saves the teacher's forward pass, about a quarter of a step's compute. The teacher then works from
            the stored dtype (``embed#dtype``, float16 by default), so results differ from recomputation within that
            precision. Needs ``teacher_features`` in the call (the workflow passes them).
        normal_slide_targets: teach the student class 0 on every patch of a class-0 slide instead of the teacher's
            label there (:func:`normal_slide_targets`; a use of the slide labels ICMIL's embedder phase does not
            make). Needs ``normal_ids`` in the call.
    """

    def __init__(
        self,
        loss_function: ICMILDistillationLoss | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        views: BatchRandomViews | None = None,
        handlers: Sequence[Any] = (),
        epochs: int = 1,
        batches_per_epoch: int = 100,
        batch_size: int = 100,
        grad_clip: float | None = 5.0,
        clip_embedder: bool = False,
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
        views_on_device: bool | None = None,
        progress: bool = True,
        normal_slide_targets: bool = False,
        compile: bool | None = None,
        teacher_features: bool = False,
    ):
        if select not in ("mae", "agreement", "last"):
            raise ValueError(f"embedder_phase: select must be 'mae', 'agreement' or 'last', got {select!r}")
        self.loss_function = loss_function if loss_function is not None else ICMILDistillationLoss()
        self.optimizer = optimizer or functools.partial(torch.optim.Adam, lr=1e-5, weight_decay=1e-4)
        self.views, self.handlers = views, list(handlers or [])
        self.epochs, self.batches_per_epoch, self.batch_size = int(epochs), int(batches_per_epoch), int(batch_size)
        self.grad_clip, self.clip_embedder = grad_clip, as_bool(clip_embedder, "clip_embedder")
        self.val_interval, self.val_patches, self.select = int(val_interval), int(val_patches), select
        self.early_stop_patience, self.num_workers, self.read_threads = early_stop_patience, num_workers, read_threads
        self.device = default_device(device)
        self.amp = as_bool(amp, "amp", self.device.type == "cuda")
        self.channels_last = as_bool(channels_last, "channels_last", True)
        self.grad_checkpointing = as_bool(grad_checkpointing, "grad_checkpointing")
        self.freeze_bn, self.progress = as_bool(freeze_bn, "freeze_bn"), as_bool(progress, "progress")
        self.views_on_device = as_bool(views_on_device, "views_on_device", self.device.type == "cuda")
        self.normal_slide_targets = as_bool(normal_slide_targets, "normal_slide_targets")
        self.compile = False if compile is None else as_bool(compile, "compile")
        self.teacher_features = as_bool(teacher_features, "teacher_features")

    def signature(self) -> dict[str, Any]:
        """What the phase's results depend on (its resume checkpoints carry the hash)."""
        signature = {
            "loss": self.loss_function,
            "optimizer": self.optimizer,
            "views": self.views,
            "settings": [self.epochs, self.batches_per_epoch, self.batch_size, self.grad_clip, self.clip_embedder],
            "validation": [self.val_interval, self.val_patches, self.select, self.early_stop_patience],
            "freeze_bn": self.freeze_bn,
        }
        if self.normal_slide_targets:  # only then: checkpoints of the plain phase stay valid
            signature["normal_slide_targets"] = True
        if self.teacher_features:  # likewise
            signature["teacher_features"] = "stored"
        if getattr(self.loss_function, "feature_weight", 0):  # likewise
            signature["feature_weight"] = float(self.loss_function.feature_weight)
        return component_signature(signature)

    def __call__(
        self,
        embedder: PatchEmbedder,
        aggregator: MILAggregator,
        train_slides: Sequence[Mapping[str, Any]],
        val_slides: Sequence[Mapping[str, Any]],
        output_dir: str | os.PathLike,
        seed: int = 0,
        mlflow_run: Any = None,
        backend: str = "auto",
        stain_normalize: bool = False,
        normal_ids: Collection[str] | None = None,
        teacher_features: Mapping[str, str | os.PathLike] | None = None,
    ) -> dict[str, Any]:
        """Fine-tune ``embedder`` with ``aggregator`` (a trained bag classifier) as the instance teacher.

        Args:
            embedder: the embedder that made the bag phase's features (the teacher's; the student starts from it).
            aggregator: the trained bag classifier (its ``reduce``, ``head`` and, for the confidence variant,
                ``attention`` are used).
            train_slides: prepared training slides (patches are sampled from their coordinates).
            val_slides: prepared validation slides (held-out patches for student-vs-teacher agreement).
            output_dir: ``embedder.safetensors`` (the kept student), ``student_head.pt`` and ``history.json`` go here.
            seed: seeds patch sampling and the views.
            mlflow_run: log params, loss terms, agreement metrics and the checkpoint here.
            backend: slide backend.
            stain_normalize: Macenko-normalise patches with their slide's stains (use the embedding's setting).
            normal_ids: ``slide_id`` of the class-0 training and validation slides (used with
                ``normal_slide_targets``).
            teacher_features: ``slide_id`` -> store file of ``embedder``'s features of each training slide (used
                with the ``teacher_features`` option, which fails without them).

        Returns:
            ``{"checkpoint", "fingerprint", "best": {...}, "best_iteration", "history", "embedder", "world_size",
            "teacher_consistency": :func:`view_consistency` of the teacher on the held-out patches, "normal_slides": how
            many training slides were taught class 0 (``None`` without ``normal_slide_targets``)}``.

        Raises:
            EmbedderPhaseError: no tissue patches, an aggregator without attention for the confidence variant,
                ``normal_slide_targets`` without a class-0 training slide, or a non-finite loss (names the iteration;
                the best embedder so far is kept).
            ValueError: the bag classifier's feature dimension differs from the embedder's output.
        """
        from monai.utils import set_determinism

        criterion = self._criterion(embedder, aggregator)
        out_dir = Path(output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        set_determinism(seed)
        rank, world_size = _dist_context()
        train_data, val_data = self._data(
            train_slides, val_slides, seed, rank, world_size, backend, stain_normalize, normal_ids, teacher_features,
            embedder.fingerprint(),
        )  # fmt: skip
        # fixed held-out patches, read once (every rank: same patches, same decisions), and one student view of each
        held_out_flat, held_out_seeds = val_data.indices(0)
        held_out, held_out_normal = val_data.read(held_out_flat), val_data.is_normal(held_out_flat)
        teacher, student, consistency = self._networks(embedder, aggregator, held_out, val_data, held_out_seeds)
        trainer, progress, resume = self._trainer(
            teacher, student, criterion, train_data, (held_out, held_out_normal), out_dir, embedder, aggregator, seed,
            mlflow_run,
        )  # fmt: skip
        if mlflow_run is not None:
            self._track(mlflow_run, trainer, embedder, aggregator, seed, world_size, stain_normalize)
        throughput = Throughput(self.batch_size).attach(trainer)
        resume.run(trainer)  # continues an interrupted run (logs where from)
        result = self._finish(student, out_dir, progress, resume, consistency, world_size, rank, mlflow_run)
        result.update(throughput.figures())
        if mlflow_run is not None and result["steady_patches_per_s"] is not None:
            mlflow_run.log_metrics({k: result[k] for k in ("first_iteration_s", "steady_patches_per_s")})
        result["normal_slides"] = None if train_data.normal is None else int(train_data.normal.sum())
        return result

    def _data(
        self,
        train_slides: Sequence[Mapping[str, Any]],
        val_slides: Sequence[Mapping[str, Any]],
        seed: int,
        rank: int,
        world_size: int,
        backend: str,
        stain_normalize: bool,
        normal_ids: Collection[str] | None,
        teacher_features: Mapping[str, str | os.PathLike] | None,
        fingerprint: str,
    ) -> tuple[DistillationBatches, DistillationBatches]:
        """The training batches (this rank's share; with the stored teacher features when the option is on) and the
        validation batches."""
        if self.teacher_features and teacher_features is None:
            raise EmbedderPhaseError(
                "embedder_phase#teacher_features is on but no stored teacher features were given: call the phase "
                "with teacher_features={slide_id: feature file} (the ICMIL workflow does), or turn the option off"
            )
        sizes = [int(s["patch_size"]) for s in train_slides if len(s["coords"])]
        views = self.views if self.views is not None or not sizes else BatchRandomViews(sizes[0])
        normal = self._normal_ids(train_slides, normal_ids)
        data_args = dict(
            read_threads=self.read_threads, backend=backend, stain_normalize=stain_normalize, normal_ids=normal
        )
        train_data = DistillationBatches(
            train_slides, views, self.batch_size, self.batches_per_epoch, seed, rank=rank, world_size=world_size,
            views_in_worker=not self.views_on_device,
            teacher_features=teacher_features if self.teacher_features else None, teacher_fingerprint=fingerprint,
            **data_args,
        )  # fmt: skip
        val_data = DistillationBatches(val_slides or train_slides, views, self.val_patches, 1, seed + 1, **data_args)
        return train_data, val_data

    def _normal_ids(
        self, train_slides: Sequence[Mapping[str, Any]], normal_ids: Collection[str] | None
    ) -> frozenset[str]:
        """With ``normal_slide_targets``: the class-0 slide ids (at least one training slide with tissue among them)."""
        if not self.normal_slide_targets:
            return frozenset()
        ids = frozenset(normal_ids or ())
        if not any(s.get("slide_id") in ids and len(s["coords"]) for s in train_slides):
            raise EmbedderPhaseError(
                "embedder_phase#normal_slide_targets needs class-0 (normal) training slides with tissue, and none of "
                f"the {len(train_slides)} training slides is one: add normal slides, or set normal_slide_targets to "
                "false."
            )
        return ids

    def _criterion(self, embedder: PatchEmbedder, aggregator: MILAggregator) -> ICMILDistillationLoss:
        """The loss for this teacher (checked against it), refusing a mismatched bag classifier before any work."""
        if aggregator.in_dim != embedder.out_dim:
            raise ValueError(
                f"the bag classifier expects {aggregator.in_dim}-d features but the embedder '{embedder.name}' gives "
                f"{embedder.out_dim}-d: the checkpoint belongs to another embedder or feature dimension."
            )
        confidence = getattr(self.loss_function, "confidence", False)
        if confidence and not aggregator.has_attention:
            raise EmbedderPhaseError(
                f"the confidence-based variant needs attention; {type(aggregator).__name__} has none"
            )
        if isinstance(self.loss_function, ICMILDistillationLoss):
            return self.loss_function.for_teacher(aggregator)
        return self.loss_function

    def _networks(
        self,
        embedder: PatchEmbedder,
        aggregator: MILAggregator,
        held_out: torch.Tensor,
        val_data: DistillationBatches,
        held_out_seeds: np.ndarray,
    ) -> tuple[InstanceClassifier, InstanceClassifier, dict[str, float]]:
        """The frozen teacher, its view consistency on the held-out patches (warned about when low), the student."""
        device, confidence = self.device, getattr(self.loss_function, "confidence", False)
        teacher = InstanceClassifier(copy.deepcopy(embedder), copy.deepcopy(aggregator), confidence)
        teacher = teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        consistency = view_consistency(teacher, held_out, val_data.make_views(held_out, held_out_seeds), device)
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
                f"{consistency['view_agreement']:.3f} < {VIEW_AGREEMENT_WARN}): the embedder phase will mostly teach "
                "the student that invariance rather than the teacher's classes. Usual causes: a random-init or "
                "untuned starting embedder (pretrained weights help), or views that change what the teacher looks at: "
                "crop-and-resize magnifies nuclei by up to 1/sqrt(min_area) per axis, so where nucleus size is a "
                "tumour cue raise embedder_phase#min_crop_area (the views' min_area; 1.0: no crop); lower "
                "embedder_phase#hed_jitter.",
                stacklevel=3,
            )
        student = InstanceClassifier(copy.deepcopy(embedder), copy.deepcopy(aggregator)).to(device)
        for p in student.parameters():
            p.requires_grad_(False)
        for p in student.trainable_parameters():
            p.requires_grad_(True)
        if self.channels_last:
            teacher.embedder.to(memory_format=torch.channels_last)
            student.embedder.to(memory_format=torch.channels_last)
        if self.grad_checkpointing:
            student.embedder.set_grad_checkpointing(True)
        return teacher, student, consistency

    def _trainer(
        self,
        teacher: InstanceClassifier,
        student: InstanceClassifier,
        criterion: ICMILDistillationLoss,
        train_data: DistillationBatches,
        held_out: tuple[torch.Tensor, torch.Tensor | None],
        out_dir: Path,
        embedder: PatchEmbedder,
        aggregator: MILAggregator,
        seed: int,
        mlflow_run: Any,
    ) -> tuple[EmbedderPhaseTrainer, PhaseProgress, ResumeCheckpoint]:
        """The trainer (DDP-wrapped student step under ``torchrun``) with its handlers and resume checkpoint."""
        student_step: nn.Module = StudentStep(student)
        if train_data.world_size > 1:  # gradients are averaged over the ranks, whose batches make the whole batch
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            student_step = DistributedDataParallel(student_step, device_ids=ids)
        teacher_step: nn.Module = TeacherStep(teacher, getattr(criterion, "confidence", False))
        if self.compile:  # one fixed batch shape: the sampler's batches are all ``batch_size`` patches
            student_step = torch.compile(student_step, dynamic=False)
            teacher_step = torch.compile(teacher_step, dynamic=False)
        optimizer = self.optimizer(student.trainable_parameters())
        sampler = ResumableSequentialSampler(self.batches_per_epoch)
        loader = DataLoader(
            train_data,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if self.num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),  # leaves the global generators alone (exact resumes)
        )
        trainer = EmbedderPhaseTrainer(
            self.device, self.epochs, self.batches_per_epoch, loader, teacher, student, optimizer, criterion,
            train_data.views, student_step, self.amp, self.channels_last, self.grad_clip, self.clip_embedder,
            self.freeze_bn, teacher_step,
        )  # fmt: skip
        progress = PhaseProgress({"score": -math.inf, "iteration": 0, "metrics": {}})
        signature = {
            "embedder": embedder.fingerprint(),
            "aggregator": {k: v.float().sum().item() for k, v in aggregator.state_dict().items()},
            "train": [(s["slide_id"], len(s["coords"])) for s in train_data.slides],
            # the validation slides, through the held-out patches the student is selected on (uint8: an exact sum)
            "held_out": [list(held_out[0].shape), int(held_out[0].sum(dtype=torch.int64))],
            "phase": self.signature(),
            "rest": [seed, train_data.world_size, train_data.stain_normalize],
        }
        if train_data.normal is not None:  # which slides are taught class 0 (not part of the plain phase's hash)
            signature["normal"] = train_data.normal.tolist()
        state = {"trainer": trainer, "network": student, "optimizer": optimizer, "progress": progress}
        resume = ResumeCheckpoint(out_dir / "resume", state, stable_hash(signature))

        @trainer.on(Events.EPOCH_STARTED)
        def _epoch(engine: Engine) -> None:
            train_data.set_epoch(engine.state.epoch)
            sampler.start = engine.state.iteration % self.batches_per_epoch  # not 0 only when resuming in an epoch

        StudentSelection(
            teacher, student, held_out[0], self.device, progress, out_dir, embedder.fingerprint(), self.select,
            self.val_interval, self.early_stop_patience, train_data.rank, mlflow_run, on_validated=resume,
            held_out_normal=held_out[1],
        ).attach(trainer)  # fmt: skip
        self._log(trainer, train_data.rank)
        attach_handlers(trainer, self.handlers)  # the bundle's own, last: they see each validation's record
        return trainer, progress, resume

    def _log(self, trainer: EmbedderPhaseTrainer, rank: int) -> None:
        from monai_icmil.handlers.stats import stats_handler

        stats_handler(
            "monai_icmil.embedder_phase",
            output_transform=lambda o: o["loss"],
            iteration_log=False,
            tag_name="distillation_loss",
        ).attach(trainer)
        if self.progress and rank == 0:
            attach_progress_bar(trainer, "embedder_phase")

    def _track(
        self,
        run: Any,
        trainer: EmbedderPhaseTrainer,
        embedder: PatchEmbedder,
        aggregator: MILAggregator,
        seed: int,
        world_size: int,
        stain_normalize: bool,
    ) -> None:
        from monai_icmil.handlers.tracking import mlflow_handler

        mlflow_handler(
            run,
            iteration_log=True,
            epoch_log=False,
            tag_name="loss",
            output_transform=lambda o: {f"loss_{k}": v for k, v in o.items()},
        ).attach(trainer)
        loss = self.loss_function
        run.log_params(
            {
                "embedder": embedder.name,
                "embedder_fingerprint": embedder.fingerprint(),
                "aggregator": aggregator_name(aggregator),
                **describe_components(loss=loss, optimizer=self.optimizer, views=self.views),
                "confidence": getattr(loss, "confidence", None),
                "beta": getattr(trainer.loss_function, "beta", None),
                **{
                    f"loss.{k}": getattr(loss, k)
                    for k in ("view_weight", "head_weight", "reduce_weight", "feature_weight")
                    if hasattr(loss, k)
                },
                **{f"views.{k}": v for k, v in vars(trainer.views).items() if isinstance(v, (int, float, bool))},
                "grad_clip": self.grad_clip,
                "batch_size": self.batch_size,
                "epochs": self.epochs,
                "batches_per_epoch": self.batches_per_epoch,
                "select": self.select,
                "seed": seed,
                "freeze_bn": self.freeze_bn,
                "normal_slide_targets": self.normal_slide_targets,
                "world_size": world_size,
                "stain_normalize": stain_normalize,
            }
        )

    def _finish(
        self,
        student: InstanceClassifier,
        out_dir: Path,
        progress: PhaseProgress,
        resume: ResumeCheckpoint,
        consistency: dict[str, float],
        world_size: int,
        rank: int,
        mlflow_run: Any,
    ) -> dict[str, Any]:
        """The kept student as the round's embedder (every rank loads the same file), its history and records."""
        from monai_icmil.networks.embedders import create_embedder

        ckpt = out_dir / "embedder.safetensors"
        if world_size > 1:
            torch.distributed.barrier()
        if rank == 0:
            if not ckpt.is_file():  # no validation ran (e.g. terminated at once): keep the initial student
                student.embedder.save(ckpt)
                save_student_head(student.aggregator, out_dir / "student_head.pt")
            atomic_write_json(out_dir / "history.json", progress.history)
        if world_size > 1:
            torch.distributed.barrier()  # every rank loads the same tuned embedder
        tuned = create_embedder(None, weights=ckpt)
        best = progress.best
        if mlflow_run is not None:
            mlflow_run.log_metrics({f"best_val_{k}": v for k, v in best["metrics"].items()})
            mlflow_run.log_metrics({f"teacher_{k}": v for k, v in consistency.items()})
            mlflow_run.log_artifacts([ckpt, out_dir / "history.json"], artifact_path="embedder_phase")
        if world_size > 1:
            torch.distributed.barrier()  # every rank has loaded the embedder before its checkpoints go
        if rank == 0:
            resume.clear()  # last: a kill before it resumes a finished phase (no iteration again), not a fresh one
        return {
            "checkpoint": str(ckpt),
            "fingerprint": tuned.fingerprint(),
            "best": best["metrics"],
            "best_iteration": best["iteration"],
            "history": progress.history,
            "embedder": tuned,
            "world_size": world_size,
            "teacher_consistency": consistency,
        }


def _dist_context() -> tuple[int, int]:
    """``(rank, world_size)``; under a process group also sets up ignite's context on every rank at once (ignite's
    first distributed call is collective, and the resume checkpoint's saver makes it)."""
    rank, world_size = dist_info()
    if world_size > 1:
        import ignite.distributed as idist

        idist.get_rank()
    return rank, world_size
