# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Patch reading throughput: the same 1,000 coordinates on the same generated slide, three ways, in one run.

(a) ours, cuCIM batched: ``CuCIMSlide.read_patches(coords, num_workers=N)`` (one ``read_region`` call with a list)
(b) baseline: a per-patch OpenSlide loop (``OpenSlide.read_region`` + RGBA->RGB, one patch at a time)
(c) ours, tifffile tile reader: ``TiffSlide.read_patches(coords, num_workers=N)``, tile bytes by ``os.pread``
(d) (c) with its fallback where there is no ``pread``: one locked seek + read of the shared handle per tile

    python benchmarks/read_patches.py [--patches 1000] [--patch_size 256] [--num_workers N] [--repeats 3]

``--num_workers`` defaults to the CPU count.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
from bench_data import bench_slide

import monai_icmil  # noqa: F401
from monai_icmil.data.slide import CuCIMSlide, TiffSlide
from monai_icmil.utils import atomic_write_json


def _openslide_loop(path: str, coords: np.ndarray, size: int) -> np.ndarray:
    import openslide

    osr = openslide.OpenSlide(path)
    out = np.empty((len(coords), size, size, 3), np.uint8)
    for i, (x, y) in enumerate(coords):
        out[i] = np.asarray(osr.read_region((int(x), int(y)), 0, (size, size)).convert("RGB"))
    osr.close()
    return out


def _tiffslide_locked(path: str, coords: np.ndarray, size: int, num_workers: int) -> np.ndarray:
    reader = TiffSlide(path)
    if reader._fd is not None:  # what a platform without os.pread gets: TiffSlide._read_at's locked seek + read
        os.close(reader._fd)
        reader._fd = None
    return reader.read_patches(coords, size, num_workers=num_workers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=int, default=1000)
    p.add_argument("--patch_size", type=int, default=256)
    p.add_argument("--num_workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slide", default=None, help="an existing slide; default: generate an 8192x6144 synthetic slide")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if a.slide is None:
        slide, tissue = bench_slide(tmp.name)
        path = str(slide)
    else:
        path = a.slide
        tissue = None
    reader = TiffSlide(path)
    w, h = reader.dimensions
    rng = np.random.default_rng(0)
    coords = []
    while len(coords) < a.patches:
        x, y = int(rng.integers(0, w - a.patch_size)), int(rng.integers(0, h - a.patch_size))
        if tissue is None or tissue[y + a.patch_size // 2, x + a.patch_size // 2]:
            coords.append((x, y))
    coords = np.array(coords)

    ways = {
        "a_cucim_batched": lambda: CuCIMSlide(path).read_patches(coords, a.patch_size, num_workers=a.num_workers),
        "b_openslide_loop": lambda: _openslide_loop(path, coords, a.patch_size),
        "c_tifffile_tiles": lambda: TiffSlide(path).read_patches(coords, a.patch_size, num_workers=a.num_workers),
        "d_tifffile_locked": lambda: _tiffslide_locked(path, coords, a.patch_size, a.num_workers),
    }
    results, outputs = {}, {}
    for name, fn in ways.items():
        fn()  # warm-up: page cache, imports
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            outputs[name] = fn()
            times.append(time.perf_counter() - t0)
        results[name] = a.patches / float(np.median(times))
    diff_b = float(np.abs(outputs["a_cucim_batched"].astype(int) - outputs["b_openslide_loop"]).mean())
    diff_c = float(np.abs(outputs["a_cucim_batched"].astype(int) - outputs["c_tifffile_tiles"]).mean())
    assert np.array_equal(outputs["c_tifffile_tiles"], outputs["d_tifffile_locked"]), "pread and locked reads differ"
    base = results["b_openslide_loop"]
    print(
        f"slide {w}x{h}, {a.patches} patches of {a.patch_size}px at level 0, num_workers={a.num_workers}, "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    )
    print(f"{'way':<20}{'patches/s':>12}{'vs (b)':>9}")
    for name, rate in results.items():
        print(f"{name:<20}{rate:>12.0f}{rate / base:>8.2f}x")
    print(f"mean |a-b| = {diff_b:.3f}, mean |a-c| = {diff_c:.3f} (grey levels)")
    if a.json:
        atomic_write_json(
            a.json,
            {
                "patches_per_s": results,
                "ratio_vs_openslide_loop": {k: v / base for k, v in results.items()},
                "num_workers": a.num_workers,
                "patch_size": a.patch_size,
            },
        )


if __name__ == "__main__":
    main()
