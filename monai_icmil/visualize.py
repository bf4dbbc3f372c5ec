# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Pictures people would rather look at than read: tiling QC pictures, patch montages, ROC curves, heatmaps."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from monai_icmil.utils import atomic_path

__all__ = [
    "tiling_qc_image",
    "save_tiling_qc",
    "save_patch_montage",
    "save_roc_curve",
    "score_grid",
    "save_heatmaps",
]


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def tiling_qc_image(
    thumbnail: np.ndarray,
    thumb_downsample: float,
    coords: np.ndarray,
    footprint: float,
    color: tuple[int, int, int] = (0, 90, 255),
    alpha: float = 0.35,
    mask: np.ndarray | None = None,
    mask_downsample: float | None = None,
) -> np.ndarray:
    """The thumbnail with the area the patches cover tinted and outlined, and each patch's edges where patches are
    at least 6 px across: tissue left untinted was missed. With ``mask``, the tissue mask's outline in green.

    Drawn with NumPy alone (no Matplotlib), so it costs milliseconds per slide and can be made for every slide.

    Args:
        thumbnail: ``[h, w, 3]`` uint8 thumbnail of the slide.
        thumb_downsample: level-0 pixels per thumbnail pixel.
        coords: ``[N, 2]`` level-0 ``(x, y)`` of each patch's top-left corner.
        footprint: patch side in level-0 pixels.
        color: tint and outline colour.
        alpha: tint strength.
        mask: boolean tissue mask to outline (e.g. ``TissueMaskd``'s ``tissue_mask``).
        mask_downsample: level-0 pixels per mask pixel (required with ``mask``).

    Returns:
        ``[h, w, 3]`` uint8.
    """
    h, w = thumbnail.shape[:2]
    img = np.array(thumbnail[..., :3], dtype=np.float32)
    covered = np.zeros((h, w), bool)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if len(coords):
        x0 = np.clip(np.floor(coords[:, 0] / thumb_downsample).astype(int), 0, w)
        y0 = np.clip(np.floor(coords[:, 1] / thumb_downsample).astype(int), 0, h)
        x1 = np.clip(np.ceil((coords[:, 0] + footprint) / thumb_downsample).astype(int), 0, w)
        y1 = np.clip(np.ceil((coords[:, 1] + footprint) / thumb_downsample).astype(int), 0, h)
        corners = np.zeros((h + 1, w + 1), np.int64)  # each box as +1/-1 at its corners, then a 2-D running sum
        np.add.at(corners, (y0, x0), 1)
        np.add.at(corners, (y0, x1), -1)
        np.add.at(corners, (y1, x0), -1)
        np.add.at(corners, (y1, x1), 1)
        covered = corners.cumsum(0).cumsum(1)[:h, :w] > 0
    tint = np.asarray(color, np.float32)
    img[covered] = (1 - alpha) * img[covered] + alpha * tint
    if len(coords) and footprint / thumb_downsample >= 6:  # each patch's edges, where patches are large enough
        rows, cols = np.zeros((h, w + 1), np.int64), np.zeros((h + 1, w), np.int64)
        for y in (y0, np.maximum(y1 - 1, y0)):  # top and bottom edges: runs along rows
            keep = y < h
            np.add.at(rows, (y[keep], x0[keep]), 1)
            np.add.at(rows, (y[keep], x1[keep]), -1)
        for x in (x0, np.maximum(x1 - 1, x0)):  # left and right edges: runs along columns
            keep = x < w
            np.add.at(cols, (y0[keep], x[keep]), 1)
            np.add.at(cols, (y1[keep], x[keep]), -1)
        edges = (rows.cumsum(1)[:, :w] > 0) | (cols.cumsum(0)[:h] > 0)
        img[edges] = 0.5 * img[edges] + 0.5 * tint
    img[_boundary(covered)] = tint
    if mask is not None:
        if mask_downsample is None:
            raise ValueError("`mask_downsample` is required with `mask`.")
        mask = np.asarray(mask, bool)
        rows_at = np.clip(((np.arange(h) + 0.5) * thumb_downsample / mask_downsample).astype(int), 0, mask.shape[0] - 1)
        cols_at = np.clip(((np.arange(w) + 0.5) * thumb_downsample / mask_downsample).astype(int), 0, mask.shape[1] - 1)
        img[_boundary(mask[rows_at][:, cols_at])] = (0, 220, 0)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _boundary(region: np.ndarray) -> np.ndarray:
    """The pixels of ``region`` with a 4-neighbour inside the image and outside ``region``."""
    inner = region.copy()
    inner[1:] &= region[:-1]
    inner[:-1] &= region[1:]
    inner[:, 1:] &= region[:, :-1]
    inner[:, :-1] &= region[:, 1:]
    return region & ~inner


def _save_picture(path: str | os.PathLike, picture: np.ndarray, caption: str = "", quality: int = 85) -> Path:
    """``picture`` (``[h, w, 3]`` uint8) with ``caption`` on a line above it, atomically: JPEG when ``path`` ends in
    ``.jpg``/``.jpeg`` (a sixth of a PNG's size for photo-like pictures, which matters at one per slide), else PNG."""
    from PIL import Image, ImageDraw

    band = 18 if caption else 0
    canvas = Image.new("RGB", (picture.shape[1], picture.shape[0] + band), "white")
    canvas.paste(Image.fromarray(picture), (0, band))
    if caption:
        ImageDraw.Draw(canvas).text((4, 3), caption, fill="black")
    path = Path(path)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="JPEG", quality=quality) if jpeg else canvas.save(tmp, format="PNG")
    return path


def save_tiling_qc(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    thumb_downsample: float,
    coords: np.ndarray,
    footprint: float,
    caption: str = "",
    mask: np.ndarray | None = None,
    mask_downsample: float | None = None,
) -> Path:
    """:func:`tiling_qc_image` with a caption line above it, written atomically: JPEG for a ``.jpg`` path (quality 85,
    ~150 KB at 1024 px), else PNG."""
    return _save_picture(
        path,
        tiling_qc_image(thumbnail, thumb_downsample, coords, footprint, mask=mask, mask_downsample=mask_downsample),
        caption,
    )


def save_patch_montage(
    path: str | os.PathLike, patches: np.ndarray, ncols: int = 8, max_patches: int = 64, caption: str = ""
) -> Path:
    """Save up to ``max_patches`` patches ``[N, H, W, 3]`` as one grid image, atomically: JPEG when ``path`` ends in
    ``.jpg``/``.jpeg``, else PNG; ``caption`` goes on a line above the grid."""
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
    return _save_picture(path, canvas, caption, quality=90)


def save_roc_curve(path: str | os.PathLike, probs: np.ndarray, labels: np.ndarray, title: str = "") -> Path:
    """ROC curve of the positive-class probability (binary) or one curve per class (one-vs-rest), PNG (atomic)."""
    from monai_icmil.metrics import auc_confidence_interval, binary_auc, roc_curve

    plt = _figure()
    probs, labels = np.asarray(probs), np.asarray(labels).astype(int)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    classes = [1] if probs.shape[1] == 2 else list(range(probs.shape[1]))
    for c in classes:
        fpr, tpr, _ = roc_curve(probs[:, c], labels == c)
        auc = binary_auc(probs[:, c], labels == c)
        if len(classes) > 1:
            label = f"class {c}: AUC {auc:.3f}"
        else:
            lo, hi = auc_confidence_interval(probs[:, c], labels == c)
            label = f"AUC {auc:.3f} (95 % CI {lo:.2f}-{hi:.2f})"
        ax.plot(fpr, tpr, lw=2, label=label)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or f"ROC ({len(labels)} slides)")
    ax.legend(loc="lower right")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def score_grid(coords: np.ndarray, scores: np.ndarray, footprint: float, dimensions: tuple[int, int]) -> np.ndarray:
    """A grid image of patch scores (NaN where no patch): cell ``(row, col)`` = patch at ``(col, row) * footprint``."""
    w0, h0 = dimensions
    nx, ny = int(np.ceil(w0 / footprint)), int(np.ceil(h0 / footprint))
    grid = np.full((ny, nx), np.nan, np.float32)
    cols = np.floor(coords[:, 0] / footprint + 1e-6).astype(int)
    rows = np.floor(coords[:, 1] / footprint + 1e-6).astype(int)
    grid[rows, cols] = scores
    return grid


def save_heatmaps(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    grid_extent: tuple[float, float],
    maps: dict[str, np.ndarray],
    title: str = "",
) -> Path:
    """One panel per score map (e.g. attention, instance probability) over the slide thumbnail (PNG, atomic).

    Args:
        path: output PNG.
        thumbnail: RGB thumbnail of the whole slide.
        grid_extent: ``(width, height)`` of the score grid in thumbnail pixels.
        maps: ``{name: grid}`` from :func:`score_grid`.
        title: figure title.
    """
    plt = _figure()
    n = len(maps)
    h, w = thumbnail.shape[:2]
    fig, axes = plt.subplots(
        1, n + 1, figsize=(4.5 * (n + 1), 4.5 * h / max(w, 1) + 0.8), dpi=100, squeeze=False, layout="constrained"
    )
    axes[0, 0].imshow(thumbnail)
    axes[0, 0].set_title("slide")
    for ax, (name, grid) in zip(axes[0, 1:], maps.items()):
        ax.imshow(thumbnail)
        im = ax.imshow(
            np.ma.masked_invalid(grid),
            cmap="jet",
            alpha=0.5,
            extent=(0, grid_extent[0], grid_extent[1], 0),
            interpolation="nearest",
            vmin=0.0,
            vmax=1.0 if "prob" in name else None,
        )
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(name)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes[0]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
