# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Embedder-phase throughput, side by side in one run:

(a) the bare training step on random tensors already on the device (teacher forward + student forward/backward +
    Adam);
ours: the configured embedder phase (:class:`~monai_icmil.engines.EmbedderPhase`) on a generated slide, including
    patch reading, the student views (flips + random resized crop, made batch-wise on the training device) and the
    DataLoader: the whole call (``--batches`` batches, with its
    start-up: worker processes, teacher consistency check, validation, checkpoint) and its steady rate (the
    difference of two calls of ``--batches`` and ``3 * --batches`` batches, which cancels the start-up);
(b) the previous pattern, views made patch by patch in the DataLoader workers (``views_on_device=False``), whole call.

Also prints the peak GPU memory on CUDA.

    python benchmarks/embedder_phase.py [--model resnet50_trunc] [--patch_size 256] [--batch_size 100] [--batches 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from bench_data import bench_slide

import monai_icmil  # noqa: F401
from monai_icmil.data.prepare import SlideTiles
from monai_icmil.data.slide import open_slide
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines.embedder_phase import EmbedderPhase, InstanceClassifier
from monai_icmil.losses import ICMILDistillationLoss
from monai_icmil.networks import create_aggregator, create_embedder


def bare_steps(embedder, agg, n: int, batch: int, size: int, device: torch.device, amp: bool) -> float:
    teacher = InstanceClassifier(copy.deepcopy(embedder), copy.deepcopy(agg)).to(device).eval()
    student = InstanceClassifier(copy.deepcopy(embedder), copy.deepcopy(agg)).to(device).train()
    teacher.embedder.to(memory_format=torch.channels_last)
    student.embedder.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(student.trainable_parameters(), lr=1e-5, weight_decay=1e-4)
    crit = ICMILDistillationLoss()
    x = torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    v = (x.float() / 255).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                f_t = teacher.embedder(x)
                h_t, lt = teacher.head_on_features(f_t)
            ls = student(v)
            h_s, lst = student.head_on_features(f_t)
            loss = crit(ls, lt, lst, h_s, h_t)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50_trunc")
    p.add_argument("--patch_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 2))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args()
    device = torch.device(a.device)
    amp = device.type == "cuda"
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

    rate_bare = bare_steps(embedder, agg, a.batches, a.batch_size, a.patch_size, device, amp)

    def call(batches: int, views_on_device: bool | None = None) -> float:
        """Seconds of one embedder phase of ``batches`` batches."""
        t0 = time.perf_counter()
        phase = EmbedderPhase(
            epochs=1,
            batches_per_epoch=batches,
            batch_size=a.batch_size,
            val_interval=10**9,
            val_patches=a.batch_size,
            num_workers=a.num_workers,
            device=device,
            progress=False,
            views_on_device=views_on_device,
        )
        phase(embedder, agg, [item], [item], Path(tempfile.mkdtemp(dir=tmp)))
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n = a.batches * a.batch_size
    t_short = call(a.batches)
    rate_ours = n / t_short
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    rate_steady = 2 * n / max(call(3 * a.batches) - t_short, 1e-9)
    rate_worker_views = n / call(a.batches, views_on_device=False)
    print(
        f"{a.model} at {a.patch_size}px, batch {a.batch_size}, {a.batches} batches, device {device} "
        f"({'bf16' if amp else 'fp32'} + channels_last), {os.cpu_count()} CPU cores ({platform.machine()})"
    )
    print(f"{'way':<26}{'patches/s':>12}")
    print(f"{'a_bare_training_step':<26}{rate_bare:>12.1f}")
    print(f"{'ours_full_embedder_phase':<26}{rate_ours:>12.1f}")
    print(f"{'ours_steady':<26}{rate_steady:>12.1f}")
    print(f"{'b_views_in_workers':<26}{rate_worker_views:>12.1f}")
    print(
        f"ours steady / (a) = {rate_steady / rate_bare:.0%}; whole call / (b) = {rate_ours / rate_worker_views:.2f}x; "
        f"peak GPU memory {peak:.2f} GiB (includes one validation pass)"
    )
    if a.json:
        figures = {
            "a_bare_training_step": rate_bare,
            "ours_full_embedder_phase": rate_ours,
            "ours_steady": rate_steady,
            "b_views_in_workers": rate_worker_views,
            "peak_gib": peak,
            "batches": a.batches,
        }
        Path(a.json).write_text(json.dumps({**figures, "model": a.model, "patch_size": a.patch_size}, indent=2))


if __name__ == "__main__":
    main()
