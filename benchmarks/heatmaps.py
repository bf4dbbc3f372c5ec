# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Heatmap drawing per slide, side by side in one run (issue #23):

ours: :func:`monai_icmil.visualize.save_heatmaps` (NumPy overlays and colour bars composed with Pillow, JPEG);
baseline: the same panels as a Matplotlib figure (``imshow`` of the thumbnail and of each masked score grid, a
    colour bar per map, ``savefig``), the pattern our writer used before and other WSI tools use.

Both draw the thumbnail, attention and instance probability of a generated slide's patch grid (1024 x 768 thumbnail).

    python benchmarks/heatmaps.py [--slides 20] [--footprint 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from monai_icmil.utils import atomic_write_json
from monai_icmil.visualize import save_heatmaps, score_grid


def matplotlib_heatmaps(path: Path, thumbnail: np.ndarray, ds: float, maps: dict, footprint: float, title: str) -> None:
    """The baseline: one Matplotlib panel per map over the thumbnail, each with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = thumbnail.shape[:2]
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(4.5 * (len(maps) + 1), 4.5 * h / w + 0.8), dpi=100)
    axes[0].imshow(thumbnail)
    axes[0].set_title("slide")
    for ax, (name, grid) in zip(axes[1:], maps.items()):
        ax.imshow(thumbnail)
        extent = (0, grid.shape[1] * footprint / ds, grid.shape[0] * footprint / ds, 0)
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="jet", alpha=0.5, extent=extent, vmin=0, vmax=1)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(name)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=20)
    p.add_argument("--footprint", type=float, default=64.0, help="patch side in level-0 px (slide 4096 x 3072)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    dims, ds = (4096, 3072), 4.0
    thumb = rng.integers(150, 255, (dims[1] // 4, dims[0] // 4, 3), dtype=np.uint8)
    ny, nx = int(dims[1] // a.footprint), int(dims[0] // a.footprint)
    cells = np.array([(x, y) for y in range(ny) for x in range(nx) if rng.random() < 0.5], float) * a.footprint
    maps = {
        "attention (min-max)": score_grid(cells, rng.random(len(cells)), a.footprint, dims),
        "instance probability": score_grid(cells, rng.random(len(cells)), a.footprint, dims),
    }
    tmp = Path(tempfile.mkdtemp())
    times: dict[str, list[float]] = {"ours": [], "matplotlib": []}
    for k in range(a.slides + 1):  # the first slide of each warms imports and caches, and is not counted
        for way, fn in (("ours", save_heatmaps), ("matplotlib", matplotlib_heatmaps)):
            t0 = time.perf_counter()
            fn(
                tmp / f"{way}_{k}.{'jpg' if way == 'ours' else 'png'}",
                thumb,
                ds,
                maps,
                a.footprint,
                f"slide {k}: predicted 1 (p=0.9)",
            )
            if k:
                times[way].append(time.perf_counter() - t0)
    med = {way: float(np.median(v)) for way, v in times.items()}
    print(f"heatmaps of a {dims[0]}x{dims[1]} slide ({len(cells)} patches, 1024x768 thumbnail), {a.slides} slides,")
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} CPU core(s): ours {med['ours']:.3f} s/slide, Matplotlib {med['matplotlib']:.3f} s/slide,")
    print(f"Matplotlib / ours = {med['matplotlib'] / med['ours']:.1f}x")
    if a.json:
        atomic_write_json(a.json, {"median_s": med, "patches": len(cells), "slides": a.slides})


if __name__ == "__main__":
    main()
