# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Embedder-phase throughput, side by side in one run, eager and compiled (``--compile both``, the default on CUDA):

(a) the bare training step on random tensors already on the device (the engine's teacher and student steps, loss,
    gradient clipping and the bundle's Adam, fused on CUDA; the student's batch-norm frozen, as the engine does);
ours: the embedder phase (:class:`~monai_icmil.engines.EmbedderPhase`, the bundle's optimizer) on a generated slide,
    including patch reading, the student views (flips + random resized crop, made batch-wise on the training device)
    and the DataLoader: the whole call (``--batches`` batches, with its start-up: worker processes, teacher consistency
    check, compile, validation, checkpoint), the engine's own steady rate (``steady_patches_per_s``: the iterations
    after the first) and the two-call steady rate (the difference of calls of ``--batches`` and ``3 * --batches``
    batches, which cancels the start-up; a compiled phase is warmed up by a 2-batch call first);
(b) the previous pattern, views made patch by patch in the DataLoader workers (``views_on_device=False``), whole call
    (skipped with ``--skip_b``);
``--teacher_features``: each mode also with the teacher's features read from a feature store (the bench slide embedded
    first) instead of recomputed (``embedder_phase#teacher_features``), the bare step likewise (``..._stored``);
``--loader_only 8x2 12x4``: the input alone (random patches read in W workers x T decoding threads, pinned, moved,
    views made on the device; no model), what ours is capped at when reading is the limit.

Also prints the peak GPU memory on CUDA.

    python benchmarks/embedder_phase.py [--model resnet50_trunc] [--patch_size 256] [--batch_size 100] [--batches 20]
        [--compile both|on|off] [--skip_b] [--teacher_features] [--loader_only 8x2 12x4]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_data import bench_slide
from torch.utils.data import DataLoader

import monai_icmil  # noqa: F401
from monai_icmil.data.prepare import SlideTiles
from monai_icmil.data.slide import open_slide
from monai_icmil.data.store import FeatureStore
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines import Embed
from monai_icmil.engines.embedder_phase import (
    DistillationBatches,
    EmbedderPhase,
    InstanceClassifier,
    StudentStep,
    TeacherStep,
    _freeze_batchnorm,
)
from monai_icmil.losses import ICMILDistillationLoss
from monai_icmil.networks import create_aggregator, create_embedder
from monai_icmil.transforms import BatchRandomViews
from monai_icmil.utils import atomic_write_json


def bundle_optimizer(device: torch.device) -> functools.partial:
    """The bundle's embedder-phase optimizer factory (Adam, lr 1e-5, weight decay 1e-4, fused on CUDA)."""
    return functools.partial(torch.optim.Adam, lr=1e-5, weight_decay=1e-4, fused=device.type == "cuda")


def bare_steps(
    embedder,
    agg,
    n: int,
    batch: int,
    size: int,
    device: torch.device,
    amp: bool,
    compiled: bool = False,
    stored: bool = False,
) -> float:
    teacher = InstanceClassifier(copy.deepcopy(embedder), copy.deepcopy(agg)).to(device).eval()
    student = InstanceClassifier(copy.deepcopy(embedder), copy.deepcopy(agg)).to(device).train()
    teacher.embedder.to(memory_format=torch.channels_last)
    student.embedder.to(memory_format=torch.channels_last)
    teacher_step, student_step = TeacherStep(teacher), StudentStep(student)
    if compiled:
        teacher_step, student_step = torch.compile(teacher_step, dynamic=False), torch.compile(
            student_step, dynamic=False
        )
    _freeze_batchnorm(student.embedder)  # as the trainer does (freeze_bn, the default)
    opt = bundle_optimizer(device)(student.trainable_parameters())
    crit = ICMILDistillationLoss()
    x = torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    v = (x.float() / 255).contiguous(memory_format=torch.channels_last)
    feats = None
    if stored:  # the teacher's features as the store hands them over: computed once, float16 on the host
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats = teacher.embedder(x).half().cpu()
            feats = feats.pin_memory() if device.type == "cuda" else feats

    def step() -> None:
        f = None if feats is None else feats.to(device, non_blocking=True).float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                f_t, h_t, lt, _ = teacher_step(x, f)
            ls, h_s, lst, _ = student_step(v, f_t)
            loss = crit(ls, lt, lst, h_s, h_t)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.aggregator.dim_reduction.parameters(), 5.0)
        torch.nn.utils.clip_grad_norm_(student.aggregator.head.parameters(), 5.0)
        opt.step()

    for _ in range(2):  # the compile, and a second step (first-step allocations)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - t0)


def loader_alone(item, views, batch: int, batches: int, workers: int, threads: int, device: torch.device) -> float:
    """Patches/s of the phase's input alone after its first batch: random patches read in ``workers`` DataLoader
    processes with ``threads`` decoding threads each, pinned, moved to ``device`` and made into the student views
    there (as the trainer does), no model."""
    data = DistillationBatches([item], views, batch, batches, 0, read_threads=threads, views_in_worker=False)
    loader = DataLoader(
        data,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None,
    )
    t1, n = None, 0
    for batchdata in loader:
        plain = batchdata["plain"].to(device, non_blocking=True)
        views(plain, batchdata["view_params"])
        if t1 is None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
        else:
            n += len(plain)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50_trunc")
    p.add_argument("--patch_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 2))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--compile", choices=("both", "on", "off"), default=None, help="default: both on CUDA, off on CPU")
    p.add_argument("--skip_b", action="store_true", help="skip (b), the views made in the workers")
    p.add_argument("--read_threads", type=int, default=2, help="decoding threads per DataLoader worker")
    p.add_argument(
        "--teacher_features",
        action="store_true",
        help="also run each mode with the teacher's features read from a feature store (embedder_phase option)",
    )
    p.add_argument(
        "--loader_only",
        nargs="*",
        default=[],
        help="also time the input alone (read, pin, move, views; no model) for these WxT: W workers x T threads",
    )
    a = p.parse_args()
    # the random-init teacher is not invariant to the views; a benchmark of speed need not say so at every call
    warnings.filterwarnings("ignore", message="the instance teacher labels")
    device = torch.device(a.device)
    amp = device.type == "cuda"
    modes = {"both": [False, True], "on": [True], "off": [False]}[a.compile or ("both" if amp else "off")]
    tmp = Path(tempfile.mkdtemp())
    slide, _ = bench_slide(tmp)
    tiling = TilingConfig(patch_size=a.patch_size, mpp=0.5, min_tissue=0.25)
    t = tiling.tile(open_slide(slide))
    item = SlideTiles(
        slide_id="bench",
        image=str(slide),
        coords=t.coords,
        level=t.level,
        read_size=t.read_size,
        patch_size=t.patch_size,
    )
    embedder = create_embedder(a.model, input_size=a.patch_size)
    agg = create_aggregator("abmil", embedder.out_dim, 2)
    n = a.batches * a.batch_size
    figures: dict = {"model": a.model, "patch_size": a.patch_size, "batches": a.batches, "partial": True}
    figures.update(num_workers=a.num_workers, read_threads=a.read_threads)

    def save() -> None:
        if a.json:  # after every measurement: a run cut off by its time budget keeps what it measured
            atomic_write_json(a.json, figures)

    files = None
    if a.teacher_features:  # the round's stored features of the slide's patches, as the workflow has them
        store = FeatureStore(tmp / "features")
        embed = Embed(batch_size=256, num_workers=0, progress=False, compile=False)  # not timed: no compile
        embed([item], embedder, store, tiling.params(), device=device)
        files = {"bench": store.path("bench")}

    def call(
        batches: int, compiled: bool, views_on_device: bool | None = None, stored: bool = False
    ) -> tuple[float, dict]:
        """Seconds of one embedder phase of ``batches`` batches, and its result."""
        t0 = time.perf_counter()
        phase = EmbedderPhase(
            epochs=1,
            batches_per_epoch=batches,
            batch_size=a.batch_size,
            val_interval=10**9,
            val_patches=a.batch_size,
            num_workers=a.num_workers,
            read_threads=a.read_threads,
            device=device,
            progress=False,
            views_on_device=views_on_device,
            compile=compiled,
            teacher_features=stored,
            optimizer=bundle_optimizer(device),
        )
        extra = {"teacher_features": files} if stored else {}
        result = phase(embedder, agg, [item], [item], Path(tempfile.mkdtemp(dir=tmp)), **extra)
        return time.perf_counter() - t0, result

    print(
        f"{a.model} at {a.patch_size}px, batch {a.batch_size}, {a.batches} batches, device {device} "
        f"({'bf16' if amp else 'fp32'} + channels_last), {os.cpu_count()} CPU cores ({platform.machine()}), "
        f"{a.num_workers} workers x {a.read_threads} decoding threads",
        flush=True,
    )
    for spec in a.loader_only:
        w, t = (int(v) for v in spec.split("x"))
        rate = loader_alone(item, BatchRandomViews(a.patch_size), a.batch_size, 3 * a.batches, w, t, device)
        figures.setdefault("loader_only", {})[spec] = rate
        print(f"input alone, {w} workers x {t} decoding threads: {rate:.1f} patches/s", flush=True)
        save()
    runs = [(c, st) for c in modes for st in ([False, True] if a.teacher_features else [False])]
    for compiled, stored in runs:
        tag = ("compiled" if compiled else "eager") + ("_stored" if stored else "")
        t0 = time.perf_counter()
        figures[f"a_bare_training_step_{tag}"] = bare_steps(
            embedder, agg, a.batches, a.batch_size, a.patch_size, device, amp, compiled, stored
        )
        figures[f"a_first_steps_s_{tag}"] = time.perf_counter() - t0
        print(f"(a) bare step, {tag}: {figures[f'a_bare_training_step_{tag}']:.1f} patches/s", flush=True)
        save()
        if compiled:
            figures[f"ours_warmup_s_{tag}"] = call(2, compiled, stored=stored)[0]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_short, result = call(a.batches, compiled, stored=stored)
        figures[f"ours_full_embedder_phase_{tag}"] = n / t_short
        figures[f"ours_engine_steady_{tag}"] = result["steady_patches_per_s"]
        figures[f"ours_first_iteration_s_{tag}"] = result["first_iteration_s"]
        figures[f"peak_gib_{tag}"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        save()
        figures[f"ours_steady_{tag}"] = 2 * n / max(call(3 * a.batches, compiled, stored=stored)[0] - t_short, 1e-9)
        print(
            f"ours, {tag}: whole call {figures[f'ours_full_embedder_phase_{tag}']:.1f}, two-call steady "
            f"{figures[f'ours_steady_{tag}']:.1f}, engine steady {figures[f'ours_engine_steady_{tag}']:.1f} "
            f"patches/s (first iteration {figures[f'ours_first_iteration_s_{tag}']:.1f} s)",
            flush=True,
        )
        save()
    if not a.skip_b:
        figures["b_views_in_workers"] = n / call(a.batches, False, views_on_device=False)[0]
        print(f"(b) views in the workers, eager, whole call: {figures['b_views_in_workers']:.1f} patches/s")
    for tag in ("eager", "compiled", "eager_stored", "compiled_stored"):
        if f"ours_steady_{tag}" in figures:
            ratio = figures[f"ours_steady_{tag}"] / figures[f"a_bare_training_step_{tag}"]
            print(f"{tag}: ours steady / (a) = {ratio:.0%}")
    if "ours_steady_compiled" in figures and "ours_steady_eager" in figures:
        bare = figures["a_bare_training_step_compiled"] / figures["a_bare_training_step_eager"]
        ours = figures["ours_steady_compiled"] / figures["ours_steady_eager"]
        print(f"compiled / eager: (a) {bare:.2f}x, ours steady {ours:.2f}x")
    for tag in ("eager", "compiled"):
        if f"ours_steady_{tag}_stored" in figures:
            bare = figures[f"a_bare_training_step_{tag}_stored"] / figures[f"a_bare_training_step_{tag}"]
            ours = figures[f"ours_steady_{tag}_stored"] / figures[f"ours_steady_{tag}"]
            print(f"{tag}, stored teacher features / recomputed: (a) {bare:.2f}x, ours steady {ours:.2f}x")
    if device.type == "cuda":
        best = max(v for k, v in figures.items() if k.startswith("ours_steady_"))
        print(f"#24 goal, embedder phase >= 3,000 patches/s steady at 256 px, batch 100: {best:.0f} -> {best >= 3000}")
    figures["partial"] = False
    save()


if __name__ == "__main__":
    main()
