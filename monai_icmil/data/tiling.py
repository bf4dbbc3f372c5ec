# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Tissue detection and grid tiling of whole-slide images.

The tissue mask is computed by one algorithm written against an array module (``numpy`` + ``scipy.ndimage`` on
CPU, ``cupy`` + ``cupyx.scipy.ndimage`` on a GPU): Otsu on HSV saturation, median blur, hole filling and removal of
small specks. Because both devices run the same code, they agree up to the libraries' own filter implementations.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch

from monai_icmil.data.slide import SlideReader
from monai_icmil.utils import as_bool

__all__ = [
    "TissueMaskResult",
    "TilingResult",
    "array_backend",
    "otsu_threshold",
    "saturation",
    "tissue_mask_from_rgb",
    "tissue_saturation",
    "background_color",
    "compute_tissue_mask",
    "grid_coordinates",
    "mask_level",
    "TilingConfig",
    "TissueMaskWarning",
    "EmptySlideWarning",
]


@dataclass
class TissueMaskResult:
    """A boolean tissue mask and its scale.

    Attributes:
        mask: ``[h, w]`` boolean array (numpy), ``True`` on tissue.
        downsample: level-0 pixels per mask pixel.
        threshold: the saturation threshold used.
    """

    mask: np.ndarray
    downsample: float
    threshold: float


@dataclass
class TilingResult:
    """Patch coordinates of one slide.

    Attributes:
        coords: ``[N, 2]`` int64 level-0 ``(x, y)`` of each patch's top-left corner, row-major order.
        level: the pyramid level patches are read from.
        read_size: patch side read at ``level`` (before resizing to ``patch_size``).
        patch_size: patch side after resizing.
        mpp: effective microns per pixel of the patches (``None`` when the slide has no mpp).
        tissue_fraction: ``[N]`` tissue fraction of each patch.
        params: the tiling parameters (part of the feature store's key).
    """

    coords: np.ndarray
    level: int
    read_size: int
    patch_size: int
    mpp: float | None
    tissue_fraction: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def footprint(self) -> float:
        """Patch side in level-0 pixels."""
        return float(self.params["footprint"])


def array_backend(device: str | torch.device | None = "auto") -> tuple[ModuleType, ModuleType, str]:
    """``(xp, ndimage, device)`` for the tissue mask: CuPy on a CUDA device when usable, else NumPy/SciPy.

    Args:
        device: ``"auto"`` (GPU when CUDA and CuPy work), ``"cpu"``, or ``"cuda"``/``"cuda:N"``.
    """
    dev = "auto" if device is None else str(device)
    if dev == "cpu":
        import scipy.ndimage as ndi

        return np, ndi, "cpu"
    want_gpu = dev.startswith("cuda") or (dev == "auto" and torch.cuda.is_available())
    if want_gpu:
        try:
            import cupy as cp
            import cupyx.scipy.ndimage as cndi

            cp.zeros(1).sum()  # fails here, not later, when no GPU is usable
            return cp, cndi, "cuda"
        except Exception as e:
            if dev.startswith("cuda"):
                raise RuntimeError(
                    f"tissue detection on '{dev}' needs CuPy with a working GPU ({type(e).__name__}: {e}). "
                    "Install cupy-cuda13x or pass device='cpu'."
                ) from e
    import scipy.ndimage as ndi

    return np, ndi, "cpu"


def saturation(rgb: Any, xp: ModuleType = np) -> Any:
    """HSV saturation in ``[0, 1]`` of a ``uint8`` RGB image ``[h, w, 3]``."""
    rgb = rgb.astype(xp.float32)
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    return xp.where(mx > 0, (mx - mn) / xp.maximum(mx, 1.0), 0.0).astype(xp.float32)


#: below this brightest-channel value a pixel is pen ink, a fold's shadow or the black outside the scan, not stain
INK_MAX_CHANNEL = 70
#: saturated pixels this much greener than red (and not bluer than green) are marker ink: H&E, hematoxylin and DAB
#: all pass more red than green
INK_GREEN_OVER_RED = 8
INK_MIN_SATURATION = 0.25
#: saturated pixels this much greener and bluer than red are blue marker ink: hematoxylin passes more red than
#: green, and a bluish one that does not (its green up to 10 over its red) is kept
INK_BLUE_GREEN_OVER_RED = 15
INK_BLUE_OVER_RED = 80


#: near-black pixels this close to grey (max - min channel) are ink; a dark purple fold is more coloured
INK_MAX_SPREAD = 25


def ink(rgb: Any, sat: Any, xp: ModuleType = np) -> Any:
    """Pixels of a ``uint8`` RGB image ``[h, w, 3]`` (``sat``: its :func:`saturation`) that are black pen, green or
    blue marker or the black outside the scan: near-black greys have a high HSV saturation and marker is saturated,
    so both would pass a saturation threshold as tissue (and a pen circle would have the glass inside it filled in).
    Blue marker is told from bluish hematoxylin (B > G > R too at a few um/px) by its margins: green at least
    :data:`INK_BLUE_GREEN_OVER_RED` and blue at least :data:`INK_BLUE_OVER_RED` over red; paler blue and teal inks
    stay."""
    r, g, b = (rgb[..., k].astype(xp.int16) for k in range(3))
    mx, mn = rgb.max(axis=-1).astype(xp.int16), rgb.min(axis=-1).astype(xp.int16)
    dark = (mx < INK_MAX_CHANNEL) & (mx - mn < INK_MAX_SPREAD)
    green = (g >= r + INK_GREEN_OVER_RED) & (g >= b)
    blue = (g >= r + INK_BLUE_GREEN_OVER_RED) & (b >= r + INK_BLUE_OVER_RED)
    return dark | ((green | blue) & (sat > INK_MIN_SATURATION))


#: the glass is looked for among the pixels at or above this brightness percentile
BACKGROUND_PERCENTILE = 90.0
#: a "glass" darker than this in any channel, or more saturated than BACKGROUND_MAX_SATURATION, is not glass
BACKGROUND_MIN_LEVEL = 150.0
BACKGROUND_MAX_SATURATION = 0.2
#: glass less saturated than this is neutral (white or grey): left unbalanced, as the stain's own saturation is then
#: the better measure (dividing by a near-white cast only shifts faint stain by about as much)
BACKGROUND_NEUTRAL_SATURATION = 0.02
#: pixels with every channel at least this are white (the readers' fill, JPEG-compressed; bubbles; white glass); on a
#: slide whose candidate glass colour covers at least MOSTLY_GLASS of it they are not counted as brighter than it (on
#: a slide mostly covered with tissue, white glass brighter than pale stain is what refuses the stain as glass)
NEAR_WHITE = 250
MOSTLY_GLASS = 0.5
#: grey levels within which a pixel has the glass's colour, and by which a pixel is brighter than it
GLASS_TOLERANCE = 8.0
#: the glass is the brightest thing on a slide: a candidate with more pixels brighter than it than this is stain
#: (a slide nearly covered with tissue, whose brightest tenth is pale stain)
MAX_BRIGHTER_THAN_GLASS = 0.015
#: and a common colour: at least this share of the pixels within GLASS_TOLERANCE of it
MIN_GLASS_SHARE = 0.01


def background_color(rgb: Any, xp: ModuleType = np) -> Any | None:
    """The colour of a slide's glass (float32 ``[3]``) from a ``uint8`` RGB image ``[h, w, 3]``, when it is tinted;
    ``None`` for neutral glass and where no glass is found.

    The glass is the commonest colour (in 8-level bins, refined by the median of the colours near it) among the
    brightest tenth of the pixels, pure white left out (the readers' fill outside the scanned area). It is refused
    when more than :data:`MAX_BRIGHTER_THAN_GLASS` of the pixels are brighter (it is then pale stain; on a mostly
    blank slide, white pixels, :data:`NEAR_WHITE`, are fill and do not count), when fewer
    than :data:`MIN_GLASS_SHARE` have its colour, when it is darker than :data:`BACKGROUND_MIN_LEVEL` or more
    saturated than :data:`BACKGROUND_MAX_SATURATION`, and when it is neutral
    (:data:`BACKGROUND_NEUTRAL_SATURATION`)."""
    flat = rgb.reshape(-1, 3)
    flat = flat[flat.min(axis=1) < 255].astype(xp.float32)  # the readers' fill
    if flat.shape[0] == 0:
        return None
    bright = flat.mean(axis=1)
    top = flat[bright >= xp.percentile(bright, BACKGROUND_PERCENTILE)]
    bins = (top // GLASS_TOLERANCE).astype(xp.int64)
    mode = int(xp.argmax(xp.bincount(bins[:, 0] * 1024 + bins[:, 1] * 32 + bins[:, 2], minlength=32768)))
    centre = (xp.asarray([mode // 1024, (mode // 32) % 32, mode % 32], xp.float32) + 0.5) * GLASS_TOLERANCE
    bg = xp.median(top[xp.abs(top - centre).max(axis=1) <= GLASS_TOLERANCE], axis=0)
    share = float((xp.abs(flat - bg).max(axis=1) <= GLASS_TOLERANCE).mean())
    whiter = bright > float(bg.mean()) + GLASS_TOLERANCE
    if share >= MOSTLY_GLASS:  # a mostly blank slide: its white pixels are fill or bubbles, not brighter glass
        whiter &= flat.min(axis=1) < NEAR_WHITE
    brighter = float(whiter.mean())
    lo, hi = float(bg.min()), float(bg.max())
    cast = (hi - lo) / max(hi, 1.0)
    if brighter > MAX_BRIGHTER_THAN_GLASS or share < MIN_GLASS_SHARE or lo < BACKGROUND_MIN_LEVEL:
        return None
    return bg if BACKGROUND_NEUTRAL_SATURATION <= cast <= BACKGROUND_MAX_SATURATION else None


def tissue_saturation(rgb: Any, xp: ModuleType = np, balance_background: bool = True, exclude_ink: bool = True) -> Any:
    """The saturation the tissue threshold is taken on: the HSV saturation of a ``uint8`` RGB image ``[h, w, 3]``,
    on tinted glass (:func:`background_color`: yellowish, bluish or pinkish scanners and mountants) the lower of it
    and the saturation after dividing each channel by the glass's colour, so the glass reads as unsaturated and faint
    stain keeps its contrast, while areas lit or filled otherwise (grey fill, vignetted corners) gain no colour; pen
    and marker ink set to 0 (:func:`ink`). Neutral glass leaves the saturation as it is."""
    sat = saturation(rgb, xp)
    ink_pixels = ink(rgb, sat, xp) if exclude_ink else None
    bg = background_color(rgb, xp) if balance_background else None
    if bg is not None:  # capped at white: the readers' white fill outside the scanned area stays white
        sat = xp.minimum(sat, saturation(xp.minimum(rgb.astype(xp.float32) * (255.0 / bg), 255.0), xp))
    return sat if ink_pixels is None else xp.where(ink_pixels, xp.float32(0.0), sat)


def _textured(rgb: Any, glass: Any, xp: ModuleType, ndi: Any) -> Any:
    """The pixels whose 5x5 brightness s.d. is more than twice the ``glass`` pixels' (median): tissue, faded or
    pale, is; a smooth smear of mountant, haze, a colour cast in a corner or a gradient of the glass is not."""
    bright = rgb.astype(xp.float32).mean(axis=-1)
    mean, mean_sq = ndi.uniform_filter(bright, 5), ndi.uniform_filter(bright * bright, 5)
    sd = xp.sqrt(xp.maximum(mean_sq - mean * mean, 0.0))
    noise = float(xp.median(sd[glass])) if bool(glass.any()) else float(xp.median(sd))
    return sd > 2.0 * max(noise, 0.5)


def _mostly_textured(rgb: Any, faint: Any, glass: Any, xp: ModuleType, ndi: Any) -> bool:
    """Whether at least half of the ``faint`` pixels are :func:`_textured`."""
    return int((faint & _textured(rgb, glass, xp, ndi)).sum()) * 2 >= int(faint.sum())


def otsu_threshold(
    values: Any, xp: ModuleType = np, bins: int = 256, value_range: tuple[float, float] = (0.0, 1.0)
) -> float:
    """Otsu's threshold of ``values`` over a fixed histogram range (so CPU and GPU agree bin for bin)."""
    hist = xp.histogram(values.ravel(), bins=bins, range=value_range)[0].astype(xp.float64)
    edges = xp.linspace(value_range[0], value_range[1], bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = xp.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = xp.cumsum(hist * centers)
    mean0 = m0 / xp.maximum(w0, 1e-12)
    mean1 = (m0[-1] - m0) / xp.maximum(w1, 1e-12)
    between = w0 * w1 * (mean0 - mean1) ** 2
    idx = int(xp.argmax(between[:-1]))
    return float(edges[idx + 1])


#: a pixel this bright (channel mean) and at most ``min_saturation`` saturated looks like glass
GLASS_MIN_BRIGHTNESS = 200.0
#: a slide with fewer glass-like pixels than this share shows no glass: its threshold is the floor, not Otsu's
NO_GLASS_SHARE = 0.005


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    median_size: int = 5,
    min_area_px: int = 16,
    min_saturation: float = 0.05,
    fill_holes: bool = True,
    device: str | torch.device | None = "auto",
    exclude_ink: bool = True,
    balance_background: bool = True,
    adapt_floor: bool = True,
    pale_tissue: bool = True,
    max_hole_px: int | None = None,
) -> tuple[np.ndarray, float]:
    """Tissue mask of a low-resolution RGB image: HSV saturation, balanced by the glass's colour, above Otsu's
    threshold (at least ``min_saturation``), pen and marker ink left out (:func:`tissue_saturation`), cleaned. An
    image without glass (fewer than :data:`NO_GLASS_SHARE` of its pixels brighter than :data:`GLASS_MIN_BRIGHTNESS`
    and unsaturated: a crop of the tissue, a TMA core) is thresholded at ``min_saturation``: Otsu's split would fall
    inside the tissue.

    Args:
        rgb: ``uint8`` ``[h, w, 3]`` image (a low pyramid level or a thumbnail).
        median_size: side of the median filter applied to the thresholded mask (odd; 0/1 disables).
        min_area_px: connected components smaller than this many pixels are removed.
        min_saturation: lower bound of the threshold, so a blank slide's noise is not called tissue.
        fill_holes: fill holes enclosed by tissue.
        device: ``"auto"``, ``"cpu"`` or a CUDA device (see :func:`array_backend`).
        exclude_ink: leave out near-black pixels and green and blue marker (:func:`ink`).
        balance_background: on tinted glass, take the lower of the saturation and the saturation relative to the
            glass's colour (:func:`tissue_saturation`).
        adapt_floor: when the threshold sits at ``min_saturation``, more pixels lie just under it (down to half of
            it) than the mask keeps and most of them are textured like tissue, take the threshold down to half of
            ``min_saturation`` if that finds tissue (pieces of ``min_area_px`` or more): faded H&E or a pale
            counterstain, which the floor would mostly drop (a smooth smear of mountant is not textured). The caller
            warns (:func:`compute_tissue_mask`).
        pale_tissue: when Otsu's threshold lies above ``min_saturation`` and finds tissue, split the pixels under it
            again (Otsu's threshold of those alone, at least ``min_saturation`` and the 95th percentile of the smooth
            pixels' saturation: glass, of one tint or a gradient) and add the textured pixels between the two
            thresholds, when they are at least a tenth of the mask; the smooth ones stay out, so the threshold
            returned (the lower one) does not describe every pixel. Otsu's split separates glass from tissue when the
            tissue is one population; on unevenly stained tissue (pale stroma, loose or fatty tissue beside dense,
            dark areas) it falls inside the tissue and drops the pale part.
        max_hole_px: fill only holes of at most this many pixels (``None``: every hole), so that glass enclosed by
            tissue (a lumen, a tear, the gap inside a ring of tissue) is not tiled.

    Returns:
        ``(mask, threshold)``: a numpy boolean mask and the saturation threshold used.
    """
    xp, ndi, _ = array_backend(device)
    img = xp.asarray(rgb)
    sat = tissue_saturation(img, xp, balance_background, exclude_ink)
    otsu, floor = otsu_threshold(sat, xp), float(min_saturation)
    if _shows_no_glass(img, sat, floor, xp):  # a crop of the tissue, a TMA core: Otsu's split would fall inside it
        otsu = min(otsu, floor)
    thr = max(otsu, floor)
    clean = functools.partial(
        _clean_mask, median_size=median_size, min_area_px=min_area_px, fill_holes=fill_holes, xp=xp, ndi=ndi,
        max_hole_px=max_hole_px,
    )  # fmt: skip
    mask = clean(sat > thr)
    faint = (sat > 0.5 * floor) & (sat <= thr)
    if (
        adapt_floor
        and otsu < floor
        and int(faint.sum()) > int(mask.sum())
        and _mostly_textured(img, faint, (sat <= 0.5 * floor) & ~mask, xp, ndi)
    ):
        lowered = max(otsu, 0.5 * floor)
        kept = clean(sat > lowered)
        if bool(kept.any()):  # faint tissue, not noise: a blank slide keeps its floor (and its report says so)
            mask, thr = kept, lowered
    elif pale_tissue and otsu > floor and bool(mask.any()):
        mask, thr = _with_pale_tissue(img, sat, mask, otsu, floor, clean, xp, ndi) or (mask, thr)
    if xp is not np:
        mask = xp.asnumpy(mask)
    return np.asarray(mask, dtype=bool), thr


def _shows_no_glass(img: Any, sat: Any, floor: float, xp: ModuleType) -> bool:
    """Whether fewer than :data:`NO_GLASS_SHARE` of an image's pixels look like glass (brighter than
    :data:`GLASS_MIN_BRIGHTNESS`, saturated at most ``floor``)."""
    bright = img.astype(xp.float32).mean(axis=-1) > GLASS_MIN_BRIGHTNESS
    return float(((sat <= floor) & bright).mean()) < NO_GLASS_SHARE


def _with_pale_tissue(
    img: Any, sat: Any, mask: Any, otsu: float, floor: float, clean: Callable[[Any], Any], xp: ModuleType, ndi: Any
) -> tuple[Any, float] | None:
    """The mask with the pale tissue under Otsu's threshold added, and the lower threshold, or ``None`` where there
    is too little of it (``pale_tissue`` of :func:`tissue_mask_from_rgb`)."""
    lower = max(otsu_threshold(sat[sat <= otsu], xp, value_range=(0.0, otsu)), floor)
    textured = _textured(img, (sat <= lower) & ~mask, xp, ndi)
    smooth = (sat <= otsu) & ~textured & ~mask  # glass, of one tint or several (a gradient)
    if bool(smooth.any()):
        lower = max(lower, float(xp.percentile(sat[smooth], GLASS_PERCENTILE)))
    # pale pixels count where they are textured: glass of another tint (a gradient, a coverslip's edge) is not
    pale = (sat > lower) & (sat <= otsu) & textured
    if lower < otsu and int(pale.sum()) * 10 >= int(mask.sum()):
        return clean((sat > otsu) | pale), lower
    return None


def _clean_mask(
    mask: Any,
    median_size: int,
    min_area_px: int,
    fill_holes: bool,
    xp: ModuleType,
    ndi: Any,
    max_hole_px: int | None = None,
) -> Any:
    """A thresholded mask median-filtered, its holes (of at most ``max_hole_px`` pixels; ``None``: all) filled and
    its specks under ``min_area_px`` removed."""
    if median_size and median_size > 1:
        mask = ndi.median_filter(mask.astype(xp.uint8), size=int(median_size)) > 0
    if fill_holes:
        filled = ndi.binary_fill_holes(mask)
        if max_hole_px is not None and bool((filled & ~mask).any()):
            filled = mask | _sized(filled & ~mask, lambda size: size <= int(max_hole_px), xp, ndi)
        mask = filled
    if min_area_px and min_area_px > 1 and bool(mask.any()):
        mask = _sized(mask, lambda size: size >= int(min_area_px), xp, ndi)
    return mask


def _sized(mask: Any, keep: Any, xp: ModuleType, ndi: Any) -> Any:
    """The connected pieces of ``mask`` whose pixel counts ``keep(sizes)`` accepts."""
    labels, n = ndi.label(mask)
    kept = keep(xp.bincount(labels.ravel(), minlength=int(n) + 1))
    kept[0] = False
    return kept[labels]


#: the pale-tissue threshold stays above this percentile of the smooth (glass) pixels' saturation
GLASS_PERCENTILE = 95.0

#: holes in the tissue up to this area (um^2) are filled by default; glass enclosed by more (a lumen, a tear, a
#: ring of tissue), room for about three patches of the bundle's 128 um, is not tiled
MAX_HOLE_UM2 = 50_000.0


def mask_level(reader: SlideReader, mask_mpp: float = 8.0, fallback_downsample: float = 32.0) -> tuple[int, int]:
    """The level to read for the tissue mask and the integer block factor that brings it near ``mask_mpp``.

    The level is the coarsest one not coarser than ``mask_mpp`` (default 8 um/px, so masks land at 4-8 um/px: at
    most ``mask_mpp``); reading it and averaging ``factor x factor`` blocks gives the mask resolution. Without mpp
    metadata the target is ``fallback_downsample`` relative to level 0.
    """
    if reader.mpp is None:
        target_ds = fallback_downsample
    else:
        target_ds = mask_mpp / reader.mpp
    level = reader.level_for_downsample(max(target_ds, 1.0))
    factor = max(1, int(math.floor(target_ds / reader.level_downsamples[level] + 1e-6)))
    return level, factor


def compute_tissue_mask(
    reader: SlideReader,
    mask_mpp: float = 8.0,
    level: int | None = None,
    median_size: int = 5,
    min_area_um2: float = 20_000.0,
    min_saturation: float = 0.05,
    fill_holes: bool = True,
    device: str | torch.device | None = "auto",
    balance_background: bool = True,
    adapt_floor: bool = True,
    pale_tissue: bool = True,
    max_hole_um2: float | None = MAX_HOLE_UM2,
) -> TissueMaskResult:
    """Tissue mask of a slide at low resolution (:func:`tissue_mask_from_rgb`).

    Args:
        reader: an open slide.
        mask_mpp: target resolution of the mask in um/px (the default puts it at 4-8 um/px: at most ``mask_mpp``).
        level: read this level instead of choosing one from ``mask_mpp`` (no block averaging then).
        median_size: median-filter side in mask pixels.
        min_area_um2: specks smaller than this area (square micrometres) are removed; without mpp the area is
            taken as mask pixels at 8 um/px.
        min_saturation: lower bound of the Otsu threshold (blank slides give an empty mask); halved for a slide
            whose faint colour outnumbers what it keeps (faded stain), with a warning.
        fill_holes: fill holes inside tissue.
        device: ``"auto"``, ``"cpu"`` or a CUDA device.
        balance_background: take the saturation relative to the glass's colour (tinted glass is not tissue).
        adapt_floor: halve ``min_saturation`` where faint, textured colour outnumbers the mask
            (:func:`tissue_mask_from_rgb`).
        pale_tissue: keep pale tissue that Otsu's threshold splits off from dense, dark tissue
            (:func:`tissue_mask_from_rgb`).
        max_hole_um2: fill only holes in the tissue up to this area (square micrometres; ``None``: every hole), so
            glass enclosed by tissue (a lumen, a tear) is not tiled; without mpp the area is taken as mask pixels
            at 8 um/px.

    Returns:
        :class:`TissueMaskResult`; an empty mask is returned (with a warning naming the slide) when no tissue is
        found.
    """
    if level is None:
        level, factor = mask_level(reader, mask_mpp)
    else:
        reader._check_level(level)
        factor = 1
    img = reader.read_level(level, block=factor)
    # a mask pixel is a block of the level (read_level drops the ragged edge and leaves a level smaller than a block
    # whole): its size is the block's times the level's, not level 0's width over the mask's, which on a narrow slide
    # shifted the mask along its length
    lw, lh = reader.level_dimensions[level]
    block = 1 if img.shape[:2] == (lh, lw) else factor
    downsample = block * reader.level_downsamples[level]
    px_um = (reader.mpp * downsample) if reader.mpp is not None else 8.0
    min_area_px = max(1, int(round(min_area_um2 / (px_um * px_um))))
    max_hole_um2 = as_hole_area(max_hole_um2)
    max_hole_px = None if max_hole_um2 is None else int(max_hole_um2 / (px_um * px_um))
    mask, thr = tissue_mask_from_rgb(
        img,
        median_size=median_size,
        min_area_px=min_area_px,
        min_saturation=min_saturation,
        fill_holes=fill_holes,
        device=device,
        balance_background=balance_background,
        adapt_floor=adapt_floor,
        pale_tissue=pale_tissue,
        max_hole_px=max_hole_px,
    )
    if not mask.any():
        why = _why_no_tissue(img, thr, min_area_um2, px_um, median_size, balance_background)
        warnings.warn(EmptySlideWarning.of(reader.path, why), stacklevel=2)
    elif (doubt := _doubtful_mask(img, mask, thr, min_saturation, balance_background)) is not None:
        warnings.warn(f"slide '{reader.path}': {doubt}", TissueMaskWarning, stacklevel=2)
    return TissueMaskResult(mask=mask, downsample=float(downsample), threshold=thr)


class TissueMaskWarning(UserWarning):
    """A tissue mask that may be wrong (tinted glass taken as tissue, faint tissue dropped)."""


class EmptySlideWarning(UserWarning):
    """A slide that yields no patches: no tissue found, tissue only in specks, or no patch fits.

    Args:
        message: the warning's text, naming the slide.
        reason: the same without the slide's name (what to change), as ``report.json`` keeps it.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason

    @classmethod
    def of(cls, slide: Any, reason: str) -> EmptySlideWarning:
        """The warning for ``slide`` (its path): ``slide '<path>': <reason>``."""
        return cls(f"slide '{slide}': {reason}", reason)


#: a mask covering more of the slide than this is more likely tinted glass than tissue
MAX_PLAUSIBLE_COVER = 0.9


def _doubtful_mask(
    img: np.ndarray, mask: np.ndarray, thr: float, min_saturation: float, balance_background: bool = True
) -> str | None:
    """Why a non-empty mask may be wrong, or ``None``: it covers nearly the whole slide, the holes it encloses
    counted (tinted or stained glass taken as tissue), its threshold was lowered under ``min_saturation`` for faint
    colour (faded H&E or a pale counterstain: glass or debris may be in it), or Otsu's threshold and the mask's sit
    at the floor with more faint pixels just under it than tissue above it (faint tissue mostly dropped; a floor
    reached by the pale-tissue split, Otsu's being higher, is not that)."""
    from scipy import ndimage

    cover = float(ndimage.binary_fill_holes(mask).mean())  # the large holes left open count: a ring of bubbles
    check = "Check its tiling QC picture (coords/qc/)"
    if cover > MAX_PLAUSIBLE_COVER:
        return (
            f"the tissue mask covers {cover:.0%} of the slide (with the holes it encloses): tinted glass taken as "
            f"tissue, or a slide cropped to its tissue? {check}; raise the tiling's min_saturation if the glass is "
            "tiled."
        )
    if thr < min_saturation - 1e-6:
        return (
            f"faint colour only: the saturation threshold was lowered from min_saturation {min_saturation:.3f} to "
            f"{thr:.3f} (faded H&E or a pale counterstain?). {check}; raise the tiling's min_saturation if glass, "
            "mountant or debris is tiled."
        )
    if thr <= min_saturation + 1e-6:
        sat = tissue_saturation(np.asarray(img), np, balance_background)
        faint = int(((sat > 0.5 * min_saturation) & (sat <= thr)).sum())
        # (Otsu's threshold above the floor: the floor is the pale-tissue threshold, not a sign of faded stain)
        if faint > int(mask.sum()) and otsu_threshold(sat) <= min_saturation + 1e-6:
            return (
                f"{faint} pixels of faint colour (saturation {0.5 * min_saturation:.3f}-{thr:.3f}) lie just under "
                f"the threshold, more than the {int(mask.sum())} tissue pixels kept: faded H&E or a pale counterstain "
                f"is mostly dropped. {check}; lower the tiling's min_saturation (e.g. 0.02) if tissue is missing."
            )
    return None


def _why_no_tissue(
    img: np.ndarray, thr: float, min_area_um2: float, px_um: float, median_size: int, balance_background: bool = True
) -> str:
    """Why a mask came out empty: nothing above the threshold, or only pieces smaller than ``min_area_um2``."""
    specks, _ = tissue_mask_from_rgb(
        img,
        median_size=median_size,
        min_area_px=1,
        min_saturation=thr,
        device="cpu",
        balance_background=balance_background,
        adapt_floor=False,
    )
    if not specks.any():
        return f"no tissue found (saturation never exceeds {thr:.3f})."
    area = float(specks.sum()) * px_um * px_um
    return (
        f"no tissue kept: {area:,.0f} um^2 is above the saturation threshold ({thr:.3f}) but in pieces smaller than "
        f"min_area_um2={min_area_um2:g}; lower min_area_um2 (the tiling's min_area_um2) for small slides, "
        "biopsies or cores."
    )


def _check_grid_args(
    patch_size: int, mpp: float | None, level: int | None, stride: int | None, min_tissue: float
) -> int:
    """The stride (``patch_size`` when not given), refusing inconsistent grid arguments by name."""
    if mpp is not None and level is not None:
        raise ValueError("pass either `mpp` or `level`, not both.")
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    stride = patch_size if stride is None else int(stride)
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be within [0, 1], got {min_tissue}")
    return stride


def patch_grids(tiling: Any) -> list[Any]:
    """The patch grids (objects with ``stride`` and ``patch_size``: a :class:`GridPatchCoords` or
    :class:`TilingConfig`) in tiling transforms, looking through ``Compose`` (``transforms``) and dictionary
    transforms (``transform``)."""
    return _find(tiling, lambda obj: hasattr(obj, "stride") and hasattr(obj, "patch_size"))


def detects_tissue(tiling: Any) -> bool:
    """Whether tiling transforms hold this module's tissue detector (a ``TissueMask`` or a :class:`TilingConfig`)."""
    return bool(_find(tiling, lambda obj: getattr(obj, "tissue_detector", False) is True))


def _find(tiling: Any, wanted: Any) -> list[Any]:
    """The objects in tiling transforms for which ``wanted(obj)``, looking through ``Compose`` (``transforms``) and
    dictionary transforms (``transform``)."""
    found: list[Any] = []

    def visit(obj: Any, depth: int = 0) -> None:
        if obj is None or depth > 4:
            return
        if wanted(obj):
            found.append(obj)
            return
        for child in [*(getattr(obj, "transforms", None) or []), getattr(obj, "transform", None)]:
            visit(child, depth + 1)

    visit(tiling)
    return found


def _read_level(
    reader: SlideReader, patch_size: int, mpp: float | None, level: int | None
) -> tuple[int, int, float | None]:
    """``(level, read size, effective mpp)``: the coarsest level at least as fine as ``mpp`` (read larger, resized
    to ``patch_size``), or ``level`` read at ``patch_size``. The effective mpp is the patches' own: a level within
    the tolerance of ``mpp`` is read as it is, at its own mpp (e.g. 0.455 for 0.5)."""
    if mpp is not None:
        level, scale = reader.level_for_mpp(float(mpp))
        read_size = int(round(patch_size / scale))
        return level, read_size, reader.level_mpp(level) * read_size / patch_size
    level = 0 if level is None else int(level)
    reader._check_level(level)
    return level, int(patch_size), reader.level_mpp(level)


def grid_coordinates(
    reader: SlideReader,
    patch_size: int,
    mpp: float | None = None,
    level: int | None = None,
    stride: int | None = None,
    mask: np.ndarray | None = None,
    mask_downsample: float | None = None,
    min_tissue: float = 0.5,
) -> TilingResult:
    """A regular grid of patch coordinates over the tissue of a slide.

    Args:
        reader: an open slide.
        patch_size: output patch side in pixels.
        mpp: target microns per pixel; the read level is the coarsest one at least as fine, read at a larger
            size and resized to ``patch_size``. Exclusive with ``level``.
        level: read patches from this level at ``patch_size`` (no resizing). Default: level 0.
        stride: step between patches in output pixels (``< patch_size`` overlaps). Default: ``patch_size``.
        mask: boolean tissue mask; ``None`` keeps every grid cell.
        mask_downsample: level-0 pixels per mask pixel (required with ``mask``).
        min_tissue: minimum tissue fraction of a patch to keep it.

    Returns:
        :class:`TilingResult` with coordinates in row-major (y, then x) order; a slide without tissue gives zero
        coordinates and a warning naming it.
    """
    stride = _check_grid_args(patch_size, mpp, level, stride, min_tissue)
    level, read_size, eff_mpp = _read_level(reader, patch_size, mpp, level)
    ds = reader.level_downsamples[level]
    footprint = read_size * ds  # level-0 pixels per patch side
    step = footprint * stride / patch_size
    w0, h0 = reader.dimensions
    params = {
        "patch_size": int(patch_size),
        "mpp": None if mpp is None else float(mpp),
        "level": int(level),
        "read_size": int(read_size),
        "stride": int(stride),
        "min_tissue": float(min_tissue),
        "footprint": float(footprint),
    }
    if footprint > w0 or footprint > h0:
        why = f"a {footprint:.0f}-px patch does not fit in {w0}x{h0}."
        warnings.warn(EmptySlideWarning.of(reader.path, why), stacklevel=2)
        return TilingResult(
            np.zeros((0, 2), np.int64), level, read_size, patch_size, eff_mpp, np.zeros(0, np.float32), params
        )
    nx = int(math.floor((w0 - footprint) / step + 1e-9)) + 1
    ny = int(math.floor((h0 - footprint) / step + 1e-9)) + 1
    xs = np.round(np.arange(nx) * step).astype(np.int64)
    ys = np.round(np.arange(ny) * step).astype(np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    if mask is None:
        frac = np.ones(len(coords), np.float32)
    else:
        mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, bool)
        mask = mask[0] if mask.ndim == 3 and mask.shape[0] == 1 else mask  # MONAI's channel-first [1, h, w]
        if mask.ndim != 2:
            raise ValueError(
                f"slide '{reader.path}': the tissue mask must be [h, w] (or [1, h, w]), got shape {mask.shape}."
            )
        if mask_downsample is None:
            raise ValueError(
                f"slide '{reader.path}': a tissue mask needs `mask_downsample` (level-0 pixels per mask pixel, "
                "TissueMaskResult.downsample); pass the TissueMaskResult itself, or its downsample."
            )
        frac = _patch_tissue_fraction(mask, float(mask_downsample), coords, footprint)
    keep = frac >= min_tissue - 1e-6
    if mask is not None and not keep.any():
        why = f"no patch has >= {min_tissue:.0%} tissue; it yields zero patches."
        warnings.warn(EmptySlideWarning.of(reader.path, why), stacklevel=2)
    return TilingResult(coords[keep], level, read_size, patch_size, eff_mpp, frac[keep].astype(np.float32), params)


def _patch_tissue_fraction(mask: np.ndarray, mask_ds: float, coords: np.ndarray, footprint: float) -> np.ndarray:
    """Tissue fraction of each square patch via a summed-area table of the mask."""
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
    x0 = np.clip(np.floor(coords[:, 0] / mask_ds).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(coords[:, 1] / mask_ds).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.ceil((coords[:, 0] + footprint) / mask_ds).astype(np.int64), x0 + 1, w)
    y1 = np.clip(np.ceil((coords[:, 1] + footprint) / mask_ds).astype(np.int64), y0 + 1, h)
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (total / ((x1 - x0) * (y1 - y0))).astype(np.float32)


#: what each version of the tissue detector changed (version 1, before session 60, is recorded by no store)
DETECTOR_CHANGES = {
    2: "the pale-tissue split and the hole limit",
    3: "the mask's scale taken from its block and level (a mask pixel or more on narrow slides, a fraction of one "
    "on others), levels read at non-integer downsamples, blue marker ink left out, and a slide without glass "
    "thresholded at the floor",
}
#: the tissue detector's version, kept with the coordinates it tiled: reused older coordinates are warned about
#: (with what changed since), not tiled again
DETECTOR_VERSION = max(DETECTOR_CHANGES)

#: tissue-detector options and their defaults: they enter a tiling's signature (the stores' keys) only when changed,
#: so that stores made before they existed stay current
DETECTOR_DEFAULTS: dict[str, Any] = {
    "balance_background": True,
    "adapt_floor": True,
    "pale_tissue": True,
    "max_hole_um2": MAX_HOLE_UM2,
}


def changed_detector_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`DETECTOR_DEFAULTS` options of ``options`` whose values differ from their defaults (``max_hole_um2``
    as a float: 60000 and 60000.0 are one key)."""
    options = {k: as_bool(v, k) if isinstance(DETECTOR_DEFAULTS.get(k), bool) else v for k, v in options.items()}
    options["max_hole_um2"] = as_hole_area(options.get("max_hole_um2", MAX_HOLE_UM2))
    return {k: v for k, v in options.items() if k in DETECTOR_DEFAULTS and v != DETECTOR_DEFAULTS[k]}


def as_hole_area(value: Any) -> float | None:
    """``max_hole_um2`` as a float (``None``: every hole filled), refusing what is not a number >= 0."""
    if value is None:
        return None
    try:
        area = float(value)
    except (TypeError, ValueError):
        area = float("nan")
    if isinstance(value, bool) or not area >= 0 or math.isinf(area):
        raise ValueError(
            f"max_hole_um2 must be an area in square micrometres (>= 0) or None (fill every hole), got {value!r}"
        )
    return area


@dataclass
class TilingConfig:
    """How slides are cut into patches (the same for every slide of an experiment), as one dictionary transform.

    Calling it on ``{"image": path}`` is the same as the bundle's ``prepare#transforms``,
    ``Compose([TissueMaskd(...), GridPatchCoordsd(...)])`` with these values (:meth:`transforms`): it adds
    ``"tissue_mask"``, ``"coords"``, ``"tiling"`` and ``"tissue_fraction"``.

    Attributes:
        patch_size: output patch side in pixels.
        mpp: target microns per pixel (``None``: tile by ``level``).
        level: pyramid level to tile at when ``mpp`` is ``None`` (default 0).
        stride: step between patches in output pixels (default ``patch_size``).
        min_tissue: minimum tissue fraction of a patch.
        mask_mpp: resolution of the tissue mask (um/px).
        min_saturation: lower bound of the tissue threshold.
        min_area_um2: tissue specks smaller than this are dropped.
        backend: slide backend.
        balance_background: tissue saturation relative to the glass's colour (:func:`tissue_saturation`).
        adapt_floor: halve ``min_saturation`` for a slide whose faint, textured colour outnumbers its mask
            (:func:`tissue_mask_from_rgb`).
        pale_tissue: keep pale tissue that Otsu's threshold splits off from dense, dark tissue
            (:func:`tissue_mask_from_rgb`).
        max_hole_um2: fill only holes in the tissue up to this area (um^2; ``None``: every hole).

    The last four are in :meth:`params` (the stores' keys) only when changed from their defaults, so stores made
    before they existed stay current.
    """

    tissue_detector: ClassVar[bool] = True

    patch_size: int = 224
    mpp: float | None = 0.5
    level: int | None = None
    stride: int | None = None
    min_tissue: float = 0.5
    mask_mpp: float = 8.0
    min_saturation: float = 0.05
    min_area_um2: float = 20_000.0
    backend: str = "auto"
    balance_background: bool = True
    adapt_floor: bool = True
    pale_tissue: bool = True
    max_hole_um2: float | None = MAX_HOLE_UM2

    def params(self) -> dict[str, Any]:
        """The tiling parameters as a plain dict (the detector's options only when changed)."""
        fields = asdict(self)
        return {k: v for k, v in fields.items() if k not in DETECTOR_DEFAULTS} | changed_detector_options(fields)

    def _mask_args(self) -> dict[str, Any]:
        return {
            "mask_mpp": self.mask_mpp,
            "min_area_um2": self.min_area_um2,
            "min_saturation": self.min_saturation,
            "backend": self.backend,
            **changed_detector_options(asdict(self)),
        }

    def _grid_args(self) -> dict[str, Any]:
        return {
            "patch_size": self.patch_size,
            "mpp": self.mpp,
            "level": self.level if self.mpp is None else None,
            "stride": self.stride,
            "min_tissue": self.min_tissue,
            "backend": self.backend,
        }

    def transforms(self, device: str | torch.device | None = "auto") -> Any:
        """The MONAI ``Compose`` of :class:`~monai_icmil.transforms.TissueMaskd` and
        :class:`~monai_icmil.transforms.GridPatchCoordsd` these values describe."""
        from monai.transforms import Compose

        from monai_icmil.transforms.dictionary import GridPatchCoordsd, TissueMaskd

        return Compose(
            [TissueMaskd("image", device=device, **self._mask_args()), GridPatchCoordsd(**self._grid_args())]
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.transforms()(data)

    def tile(self, reader: SlideReader, device: str | torch.device | None = "auto") -> TilingResult:
        """Tissue mask + grid coordinates of one open slide (the array transforms)."""
        from monai_icmil.transforms.array import GridPatchCoords, TissueMask

        return GridPatchCoords(**self._grid_args())(reader, TissueMask(device=device, **self._mask_args())(reader))
