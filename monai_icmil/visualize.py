# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Pictures people would rather look at than read: tiling overlays, patch montages."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from monai_icmil.utils import atomic_path

__all__ = ["save_tiling_overlay", "save_patch_montage"]


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_tiling_overlay(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    thumb_downsample: float,
    coords: np.ndarray,
    footprint: float,
    mask: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Save the thumbnail with the tissue-mask outline and one box per patch (PNG, atomic)."""
    plt = _figure()
    h, w = thumbnail.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8 * h / max(w, 1)), dpi=100)
    ax.imshow(thumbnail)
    if mask is not None and mask.any():
        ax.contour(
            np.linspace(0, w, mask.shape[1]),
            np.linspace(0, h, mask.shape[0]),
            mask.astype(float),
            levels=[0.5],
            colors="lime",
            linewidths=1.0,
        )
    from matplotlib.patches import Rectangle

    side = footprint / thumb_downsample
    for x, y in coords:
        ax.add_patch(
            Rectangle((x / thumb_downsample, y / thumb_downsample), side, side, fill=False, lw=0.4, edgecolor="blue")
        )
    ax.set_title(title or f"{len(coords)} patches")
    ax.axis("off")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def save_patch_montage(path: str | os.PathLike, patches: np.ndarray, ncols: int = 8, max_patches: int = 64) -> Path:
    """Save up to ``max_patches`` patches ``[N, H, W, 3]`` as one grid image (PNG, atomic)."""
    from PIL import Image

    patches = np.asarray(patches)[:max_patches]
    n = len(patches)
    if n == 0:
        raise ValueError("no patches to draw")
    ph, pw = patches.shape[1:3]
    rows = -(-n // ncols)
    canvas = np.full((rows * (ph + 2), min(n, ncols) * (pw + 2), 3), 255, np.uint8)
    for i, p in enumerate(patches):
        r, c = divmod(i, ncols)
        canvas[r * (ph + 2) : r * (ph + 2) + ph, c * (pw + 2) : c * (pw + 2) + pw] = p
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path
