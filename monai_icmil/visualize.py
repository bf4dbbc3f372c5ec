# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Pictures people would rather look at than read: tiling QC pictures, patch montages, ROC curves, heatmaps."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_icmil.utils import atomic_path

__all__ = [
    "tiling_qc_image",
    "save_tiling_qc",
    "save_qc_overview",
    "save_contact_sheets",
    "score_overlay",
    "encode_jpeg",
    "save_patch_montage",
    "save_roc_curve",
    "score_grid",
    "save_heatmaps",
    "heatmap_panels",
    "overlap_grid",
    "save_rounds_plot",
    "prediction_vs_truth",
    "save_prediction_vs_truth",
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
    damaged: np.ndarray | None = None,
) -> np.ndarray:
    """The thumbnail with the area the patches cover tinted and outlined, and each patch's edges where patches are
    at least 6 px across: tissue left untinted was missed. With ``mask``, the tissue mask's outline in green; with
    ``damaged``, the patches dropped for lying on damaged JPEG tiles, filled in red.

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
        damaged: ``[K, 2]`` level-0 ``(x, y)`` of dropped patches.

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
    if damaged is not None and len(damaged):
        for x, y in np.asarray(damaged, np.float64).reshape(-1, 2):
            xa, ya = int(x / thumb_downsample), int(y / thumb_downsample)
            xb, yb = int(np.ceil((x + footprint) / thumb_downsample)), int(np.ceil((y + footprint) / thumb_downsample))
            img[max(ya, 0) : min(yb, h), max(xa, 0) : min(xb, w)] = (220, 0, 0)
    if mask is not None:
        if mask_downsample is None:
            raise ValueError("`mask_downsample` is required with `mask`.")
        img[_boundary(_on_thumbnail(np.asarray(mask, bool), (h, w), thumb_downsample, mask_downsample))] = (0, 220, 0)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _on_thumbnail(grid: np.ndarray, shape: tuple[int, int], thumb_downsample: float, cell: float) -> np.ndarray:
    """``grid`` (one value per ``cell`` level-0 px, e.g. a tissue mask or patch scores) at each thumbnail pixel of
    a thumbnail of ``shape`` (nearest cell, clipped at the grid's edge)."""
    rows = np.clip(((np.arange(shape[0]) + 0.5) * thumb_downsample / cell).astype(int), 0, grid.shape[0] - 1)
    cols = np.clip(((np.arange(shape[1]) + 0.5) * thumb_downsample / cell).astype(int), 0, grid.shape[1] - 1)
    return grid[rows][:, cols]


def _boundary(region: np.ndarray) -> np.ndarray:
    """The pixels of ``region`` with a 4-neighbour inside the image and outside ``region``."""
    inner = region.copy()
    inner[1:] &= region[:-1]
    inner[:-1] &= region[1:]
    inner[:, 1:] &= region[:, :-1]
    inner[:, :-1] &= region[:, 1:]
    return region & ~inner


_CAPTION_BAND = 18  # px of caption line above a picture written by _save_picture


def _save_picture(path: str | os.PathLike, picture: np.ndarray, caption: str = "", quality: int = 85) -> Path:
    """``picture`` (``[h, w, 3]`` uint8) with ``caption`` on a line above it, atomically: JPEG when ``path`` ends in
    ``.jpg``/``.jpeg`` (a sixth of a PNG's size for photo-like pictures, which matters at one per slide), else PNG."""
    from PIL import Image, ImageDraw

    band = _CAPTION_BAND if caption else 0
    canvas = Image.new("RGB", (picture.shape[1], picture.shape[0] + band), "white")
    canvas.paste(Image.fromarray(picture), (0, band))
    if caption:
        ImageDraw.Draw(canvas).text((4, 2), caption, fill="black", font=_font(13))  # readable at full size
    path = Path(path)
    with atomic_path(path) as tmp:  # the caption's height goes along, so a contact sheet can cut it off
        if path.suffix.lower() in (".jpg", ".jpeg"):
            canvas.save(tmp, format="JPEG", quality=quality, comment=f"caption_band={band}")
        else:
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            info.add_text("caption_band", str(band))
            canvas.save(tmp, format="PNG", pnginfo=info)
    return path


def _caption_band(info: Mapping[str, Any]) -> int:
    """The caption line's height recorded by :func:`_save_picture` in a picture's metadata (0 if none)."""
    value = info.get("caption_band")
    comment = info.get("comment", b"")
    comment = comment.decode("ascii", "replace") if isinstance(comment, bytes) else str(comment)
    if value is None and comment.startswith("caption_band="):
        value = comment.split("=", 1)[1]
    try:
        return max(int(value), 0) if value is not None else 0
    except ValueError:
        return 0


def save_tiling_qc(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    thumb_downsample: float,
    coords: np.ndarray,
    footprint: float,
    caption: str = "",
    mask: np.ndarray | None = None,
    mask_downsample: float | None = None,
    damaged: np.ndarray | None = None,
) -> Path:
    """:func:`tiling_qc_image` with a caption line above it, written atomically: JPEG for a ``.jpg`` path (quality 85,
    ~150 KB at 1024 px), else PNG."""
    picture = tiling_qc_image(
        thumbnail, thumb_downsample, coords, footprint, mask=mask, mask_downsample=mask_downsample, damaged=damaged
    )
    return _save_picture(path, picture, caption)


def _sheet_tile(source: Any, tile: int):
    """The picture in ``source`` (a path, encoded bytes or an array) shrunk to fit ``tile`` px, without the caption
    line :func:`_save_picture` puts above it (its height is in the picture's metadata); ``None`` if there is none or
    it cannot be read."""
    import io

    from PIL import Image

    if source is None:
        return None
    if isinstance(source, np.ndarray):  # no caption line to cut, nothing to decode
        pic = Image.fromarray(np.ascontiguousarray(source[..., :3]))
        pic.thumbnail((tile, tile))
        return pic
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            full_height, band = im.size[1], _caption_band(im.info)
            im.draft("RGB", (tile, tile))  # a JPEG decodes at 1/2-1/8 scale: a few ms a slide
            pic = im.convert("RGB")
    except (OSError, ValueError):
        return None
    if band:
        pic = pic.crop((0, int(np.ceil(band * pic.height / full_height)), pic.width, pic.height))
    pic.thumbnail((tile, tile))
    return pic


def encode_jpeg(picture: np.ndarray, max_side: int | None = None, quality: int = 85) -> bytes:
    """``picture`` (``[h, w, 3]`` uint8) as JPEG bytes, first shrunk to ``max_side`` px where given."""
    import io

    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(picture[..., :3]))
    if max_side:
        im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _fit_text(draw: Any, text: str, width: float) -> str:
    """``text`` cut to ``width`` px with a trailing ``...`` where it is longer."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def save_contact_sheets(
    out_dir: str | os.PathLike,
    cells: Sequence[Mapping[str, Any]],
    title: str,
    per_page: int = 48,
    ncols: int = 8,
    tile: int = 192,
) -> list[Path]:
    """Pictures of many slides in grids, ``<out_dir>/page_<k>.jpg``: a cohort checked by flicking through a few
    pages instead of opening a picture per slide. Pages left over from a larger cohort are removed.

    Args:
        out_dir: the pages' folder.
        cells: one mapping per slide, in page order: ``picture`` (a path, encoded bytes (:func:`encode_jpeg`: a
            cohort's pictures kept in memory at a few KB each) or a ``[h, w, 3]`` uint8 array, shrunk to ``tile``
            px; ``None`` or unreadable for a grey cell), ``lines`` (two caption lines under it), ``color`` (the
            captions' RGB) and, for a grey cell, ``note`` (written on it).
        title: each page's title; ``page k of n: slides i-j of N`` is added.
        per_page: slides per page.
        ncols: slides per row.
        tile: largest side of each slide's picture, px.

    Returns:
        The pages written.
    """
    import textwrap

    from PIL import Image, ImageDraw

    if per_page < 1 or ncols < 1 or tile < 32:
        raise ValueError(f"per_page and ncols must be >= 1 and tile >= 32, got {per_page}, {ncols}, {tile}")
    out_dir, cells = Path(out_dir), list(cells)
    cell_w, cell_h = tile + 8, tile + 36  # a 4 px margin, two caption lines below the picture
    n_pages = -(-len(cells) // per_page)
    pages = []
    for k in range(n_pages):
        chunk = cells[k * per_page : (k + 1) * per_page]
        width = max(min(ncols, len(chunk)) * cell_w, 640)  # room for the title
        canvas = Image.new("RGB", (width, -(-len(chunk) // ncols) * cell_h), "white")
        draw = ImageDraw.Draw(canvas)
        char_w = draw.textlength("x" * 20) / 20
        for i, cell in enumerate(chunk):
            x, y = (i % ncols) * cell_w + 4, (i // ncols) * cell_h + 4
            pic = _sheet_tile(cell.get("picture"), tile)
            if pic is None:
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=(205, 205, 205))
                for j, line in enumerate(textwrap.wrap(cell.get("note", ""), max(8, int((tile - 8) / char_w)))):
                    if j < tile // 14:
                        draw.text((x + 4, y + 4 + 14 * j), line, fill=(190, 0, 0))
            else:
                draw.rectangle((x - 1, y - 1, x + tile, y + tile), outline=(225, 225, 225))  # the slide's cell
                canvas.paste(pic, (x + (tile - pic.width) // 2, y + (tile - pic.height) // 2))
            for j, line in enumerate(cell.get("lines", ())[:2]):
                draw.text((x, y + tile + 3 + 15 * j), _fit_text(draw, str(line), tile), fill=cell.get("color", 0))
        first = k * per_page + 1
        heading = f"{title}, page {k + 1} of {n_pages}: slides {first}-{first + len(chunk) - 1} of {len(cells)}"
        pages.append(_save_picture(out_dir / f"page_{k + 1:03d}.jpg", np.asarray(canvas), heading))
    for stale in out_dir.glob("page_*.jpg"):
        if stale not in pages:
            stale.unlink()
    return pages


def save_qc_overview(
    qc_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    per_page: int = 48,
    ncols: int = 8,
    tile: int = 192,
) -> list[Path]:
    """Contact sheets of a cohort's tiling QC pictures, ``<qc_dir>/overview/page_<k>.jpg``
    (:func:`save_contact_sheets`).

    Each slide's QC picture (``<qc_dir>/<slide>.jpg``, from :func:`save_tiling_qc`) in ``rows``' order, above its
    name and patch count. A failed slide is a grey cell carrying the reason, its caption in red; an empty one (no
    tissue patches) has an orange caption. Each page's title counts both.

    Args:
        qc_dir: the folder of the QC pictures.
        rows: one mapping per slide with ``slide``, ``status`` (``ok``, ``empty ...`` or ``failed: <reason>``) and
            ``patches`` (``tiling.csv``'s rows).
        per_page: slides per page.
        ncols: slides per row.
        tile: largest side of each slide's picture, px.

    Returns:
        The pages written.
    """
    qc_dir = Path(qc_dir)
    cells, failed, empty = [], 0, 0
    for row in rows:
        status = str(row.get("status", ""))
        if status.startswith("failed"):
            failed += 1
            cell = {"picture": None, "note": status, "lines": (row["slide"], "failed"), "color": (190, 0, 0)}
        else:
            cell = {"picture": qc_dir / f"{row['slide']}.jpg", "note": "no QC picture"}
            if status.startswith("empty"):
                empty += 1
                cell.update(lines=(row["slide"], "empty: no tissue patches"), color=(230, 120, 0))
            else:
                cell.update(lines=(row["slide"], f"{row.get('patches', '')} patches"), color=(0, 0, 0))
        cells.append(cell)
    title = "tiling QC" + (f" ({failed} failed: red, {empty} empty: orange)" if failed or empty else "")
    return save_contact_sheets(qc_dir / "overview", cells, title, per_page, ncols, tile)


def score_overlay(
    thumbnail: np.ndarray,
    thumb_downsample: float,
    grid: np.ndarray,
    footprint: float,
    alpha: float = 0.5,
    cmap: str = "jet",
    vmax: float = 1.0,
) -> np.ndarray:
    """The thumbnail with a score grid (:func:`score_grid`, NaN where no patch) blended over it in ``cmap``'s colours
    (0 to ``vmax``), drawn with NumPy at the thumbnail's size: a heatmap without a Matplotlib figure.

    Returns:
        ``[h, w, 3]`` uint8.
    """
    h, w = thumbnail.shape[:2]
    scored = np.isfinite(grid)
    index = np.clip(np.nan_to_num(grid) / vmax * 255 + 0.5, 0, 255).astype(np.intp)
    # colour and weight per grid cell, then spread to the thumbnail's pixels: whole-array work, no per-pixel gathers
    cell = np.concatenate([alpha * _colour_lut(cmap)[index], np.where(scored, 1 - alpha, 1.0)[..., None]], axis=-1)
    cell[~scored, :3] = 0
    pixel = _on_thumbnail(cell.astype(np.float32), (h, w), thumb_downsample, footprint)
    blended = thumbnail[..., :3] * pixel[..., 3:] + pixel[..., :3]
    return (blended + 0.5).clip(0, 255).astype(np.uint8)


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
            label = f"AUC {auc:.3f} ({ci_text(lo, hi)})"
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


def _cells(coords: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """The grid column and row of each patch: the nearest multiple of ``cell`` (the grid puts patch ``k`` at
    ``round(k * step)``, so a fractional step, e.g. a level downsample of 4.000121, leaves it up to half a pixel off
    the exact multiple, on either side)."""
    coords = np.asarray(coords, np.float64)
    return np.rint(coords[:, 0] / cell).astype(int), np.rint(coords[:, 1] / cell).astype(int)


def score_grid(coords: np.ndarray, scores: np.ndarray, footprint: float, dimensions: tuple[int, int]) -> np.ndarray:
    """A grid image of patch scores (NaN where no patch): cell ``(row, col)`` = patch at ``(col, row) * footprint``."""
    w0, h0 = dimensions
    nx, ny = int(np.ceil(w0 / footprint)), int(np.ceil(h0 / footprint))
    grid = np.full((ny, nx), np.nan, np.float32)
    cols, rows = _cells(coords, footprint)
    grid[rows, cols] = scores
    return grid


def _colour_lut(cmap: str = "jet") -> np.ndarray:
    """``cmap``'s 256 colours, ``[256, 3]`` float32 in 0-255 (cached per name)."""
    if cmap not in _LUTS:
        import matplotlib

        _LUTS[cmap] = (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)
    return _LUTS[cmap]


_LUTS: dict[str, np.ndarray] = {}
_FONTS: dict[int, Any] = {}


def _font(size: int) -> Any:
    """Pillow's default font at ``size`` px (its bitmap font where Pillow has no FreeType), cached."""
    if size not in _FONTS:
        from PIL import ImageFont

        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except (TypeError, ImportError, OSError):
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def overlap_grid(
    coords: np.ndarray, scores: np.ndarray, footprint: float, cell: float, dimensions: tuple[int, int]
) -> np.ndarray:
    """Scores of overlapping patches averaged per ``cell`` (level-0 px, the patches' step): each cell holds the mean
    score of the patches that cover it, NaN where none does. With ``cell == footprint`` it is :func:`score_grid`.

    Args:
        coords: ``[N, 2]`` level-0 top-left ``(x, y)`` of the patches.
        scores: ``[N]`` a score per patch.
        footprint: a patch's side in level-0 pixels.
        cell: the grid's cell side (the stride's step), dividing ``footprint``.
        dimensions: level-0 ``(width, height)``.
    """
    span = max(1, int(round(footprint / cell)))
    ny, nx = int(np.ceil(dimensions[1] / cell)), int(np.ceil(dimensions[0] / cell))
    total, count = np.zeros((ny + span, nx + span)), np.zeros((ny + span, nx + span))
    cols, rows = _cells(coords, cell)
    values = np.asarray(scores, np.float64)
    for dy in range(span):  # span^2 scatter-adds, each over all patches
        for dx in range(span):
            np.add.at(total, (rows + dy, cols + dx), values)
            np.add.at(count, (rows + dy, cols + dx), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean[:ny, :nx].astype(np.float32)


def heatmap_panels(
    thumbnail: np.ndarray,
    thumb_downsample: float,
    maps: Mapping[str, np.ndarray],
    footprint: float,
    title: str = "",
    cmap: str = "jet",
) -> np.ndarray:
    """The slide's thumbnail, then each score map (0-1, :func:`score_grid`) blended over it, each under its name and
    beside a colour bar, under ``title``: drawn with NumPy and Pillow (tens of milliseconds, where a Matplotlib figure
    of the same panels costs about a second).

    Args:
        thumbnail: RGB thumbnail of the whole slide.
        thumb_downsample: its downsample from level 0.
        maps: ``{name: grid}``, scores from 0 to 1 (probabilities, min-max normalised attention).
        footprint: a grid cell's side in level-0 pixels.
        title: a line above the panels.
        cmap: Matplotlib colour map of the overlays and bars.

    Returns:
        ``[H, W, 3]`` uint8.
    """
    from PIL import Image, ImageDraw

    h, w = thumbnail.shape[:2]
    pad, bar, label, name_band = 10, 14, 34, 22
    title_band = 26 if title else 0
    font, small = _font(16), _font(12)
    panels = [("slide", np.ascontiguousarray(thumbnail[..., :3]), False)]
    panels += [
        (name, score_overlay(thumbnail, thumb_downsample, grid, footprint, cmap=cmap), True)
        for name, grid in maps.items()
    ]
    widths = [w + (pad // 2 + bar + label if scored else 0) for _, _, scored in panels]
    canvas = Image.new("RGB", (sum(widths) + pad * (len(panels) + 1), title_band + name_band + h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill="black", font=font)
    x, top = pad, title_band + name_band
    for (name, picture, scored), width in zip(panels, widths):
        draw.text((x, title_band + 3), name, fill="black", font=font)
        canvas.paste(Image.fromarray(picture), (x, top))
        if scored:
            _draw_colour_bar(canvas, (x + w + pad // 2, top), h, cmap, bar, small)
        x += width + pad
    return np.asarray(canvas)


def _draw_colour_bar(canvas: Any, origin: tuple[int, int], height: int, cmap: str, bar: int, font: Any) -> None:
    """A vertical colour bar of ``cmap`` (top: 1, bottom: 0), ``bar`` px wide and outlined, labelled 1 / 0.5 / 0 on
    its right, drawn onto the Pillow image ``canvas`` at ``origin``."""
    from PIL import Image, ImageDraw

    colours = _colour_lut(cmap)[np.linspace(255, 0, height).round().astype(int)]  # top: 1, bottom: 0
    strip = np.repeat(np.clip(colours + 0.5, 0, 255).astype(np.uint8)[:, None], bar, axis=1)
    bx, top = origin
    canvas.paste(Image.fromarray(strip), (bx, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((bx, top, bx + bar - 1, top + height - 1), outline="black")
    for value, y in ((1.0, top), (0.5, top + height // 2 - 6), (0.0, top + height - 13)):
        draw.text((bx + bar + 3, y), f"{value:g}", fill="black", font=font)


def save_heatmaps(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    thumb_downsample: float,
    maps: Mapping[str, np.ndarray],
    footprint: float,
    title: str = "",
) -> Path:
    """:func:`heatmap_panels` as a JPEG (quality 90, full colour resolution: 30 ms against ~280 ms for a PNG of
    the same panels) for a ``.jpg``/``.jpeg`` path, else a PNG; atomically.

    Args:
        path: output picture.
        thumbnail: RGB thumbnail of the whole slide.
        thumb_downsample: its downsample from level 0.
        maps: ``{name: grid}`` from :func:`score_grid`, scores from 0 to 1.
        footprint: a grid cell's side in level-0 pixels.
        title: a line above the panels.
    """
    from PIL import Image

    picture = heatmap_panels(thumbnail, thumb_downsample, maps, footprint, title)
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in (".jpg", ".jpeg"):
            Image.fromarray(picture).save(tmp, format="JPEG", quality=90, subsampling=0)
        else:
            Image.fromarray(picture).save(tmp, format="PNG", compress_level=1)
    return path


def ci_text(low: float, high: float, level: str = "95 %") -> str:
    """``95 % CI 0.91-0.99``; an interval without width (DeLong's when the classes do not overlap in the sample, AUC
    1 or 0, or every score is tied) is said to be none rather than printed as certainty."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "no CI"
    if low == high:
        return "no CI: the classes do not overlap" if low in (0.0, 1.0) else "no CI: zero-width interval"
    return f"{level} CI {low:.2f}-{high:.2f}"


def save_rounds_plot(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], title: str = "", final_round: int | None = None
) -> Path:
    """One picture of an ICMIL run: validation and test AUC (with their 95 % intervals) and the instance teacher's
    patch AUC against the ground truth, per round, the final round marked (PNG, atomic). ``rows`` are the summary's
    rows. The series differ in line style and marker as well as colour, so that one hidden under another (validation
    and test both at 1.0) still shows."""
    plt = _figure()
    rounds = [int(r["round"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100, layout="constrained")
    series = (("val_auc", "val_auc_ci", "validation AUC (slides)", "tab:blue", "s--", 9),
              ("test_auc", "test_auc_ci", "test AUC (slides)", "tab:orange", "o-", 6),
              ("teacher_patch_auc", None, "instance teacher patch AUC (test patches vs ground truth)", "tab:green",
               "^:", 6))  # fmt: skip
    for key, ci_key, label, colour, style, size in series:
        values = [r.get(key) for r in rows]
        if all(v is None for v in values):
            continue
        y = np.array([np.nan if v is None else v for v in values], float)
        ax.plot(
            rounds, y, style, color=colour, label=label, markersize=size, markerfacecolor="none" if size > 6 else colour
        )
        bounds = np.array([r.get(ci_key) or [None, None] for r in rows], float) if ci_key else None
        if bounds is not None and np.isfinite(bounds).any():
            ax.fill_between(rounds, bounds[:, 0], bounds[:, 1], color=colour, alpha=0.15, linewidth=0)
    ax.set_xticks(rounds)
    ax.set_xlabel("round (0: frozen starting embedder; r: after r embedder phases)", fontsize=9)
    ax.set_ylabel("AUC")
    ax.set_ylim(min(0.4, ax.get_ylim()[0]), 1.01)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.text(rounds[0], 0.505, "chance", color="grey", fontsize=7, va="bottom")
    if final_round is not None and final_round in rounds:
        ax.axvline(final_round, color="black", lw=0.8, ls=":")
        ax.text(final_round, 1.005, " final", fontsize=7, va="bottom", ha="center")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "ICMIL rounds", fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def prediction_vs_truth(
    thumbnail: np.ndarray,
    thumb_downsample: float,
    grid: np.ndarray,
    footprint: float,
    truth: np.ndarray,
    truth_downsample: float,
) -> np.ndarray:
    """Side by side over the slide's thumbnail: the instance-probability overlay (:func:`score_overlay`, with the
    ground truth's outline in white), its colour bar (probability 0-1), and the ground-truth tumour region (tinted
    red, outlined), so agreement shows at a glance."""
    from PIL import Image

    h, w = thumbnail.shape[:2]
    region = _on_thumbnail(np.asarray(truth, bool), (h, w), thumb_downsample, truth_downsample)
    predicted = score_overlay(thumbnail, thumb_downsample, grid, footprint)
    truth_img = np.array(thumbnail[..., :3], dtype=np.float32)
    truth_img[region] = 0.55 * truth_img[region] + 0.45 * np.array([230.0, 30.0, 30.0])
    edge = _boundary(region)
    predicted[edge] = (255, 255, 255)
    truth_img[edge] = (120, 0, 0)
    gap = np.full((h, 8, 3), 255, np.uint8)
    key = Image.new("RGB", (VS_TRUTH_BAR, h), "white")
    _draw_colour_bar(key, (8, 0), h, "jet", 14, _font(12))
    truth_panel = np.clip(truth_img + 0.5, 0, 255).astype(np.uint8)
    return np.concatenate([predicted, np.asarray(key), gap, truth_panel], axis=1)


#: px between the prediction and the ground-truth panels of :func:`prediction_vs_truth` (besides an 8 px gap) for
#: the probability's colour bar
VS_TRUTH_BAR = 8 + 14 + 34


def save_prediction_vs_truth(path: str | os.PathLike, picture: np.ndarray, caption: str = "") -> Path:
    """:func:`prediction_vs_truth`'s picture under a caption, atomically (JPEG for ``.jpg``, else PNG)."""
    return _save_picture(path, picture, caption, quality=90)
