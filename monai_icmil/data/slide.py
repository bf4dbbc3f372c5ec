# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Whole-slide image access: one reader abstraction over cuCIM, OpenSlide and a tile-level tifffile reader.

``open_slide(path)`` picks the fastest available backend (cuCIM, then OpenSlide, then our own tifffile reader)
and returns a :class:`SlideReader`. Every backend exposes the same pyramid description (levels, dimensions,
downsamples, mpp, objective power) and the same batched read: ``read_patches(locations, level, size)`` takes
level-0 ``(x, y)`` coordinates and returns ``uint8`` patches ``[N, H, W, 3]`` (or a ``[N, 3, H, W]`` tensor).

Only the tiles a patch overlaps are decoded; nothing reads a whole level to cut one patch.
"""

from __future__ import annotations

import functools
import html
import math
import os
import re
import threading
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_icmil.utils import as_positive, quiet_native_output

__all__ = [
    "SlideError",
    "SlideReader",
    "CuCIMSlide",
    "OpenSlideSlide",
    "TiffSlide",
    "ImageSlide",
    "open_slide",
    "get_slide",
    "available_backends",
    "resize_patches",
    "BACKENDS",
]

BACKENDS = ("cucim", "openslide", "tifffile")
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".qptiff", ".ome.tif", ".ome.tiff")


class Level0Misread(RuntimeError):
    """A backend took another image for a slide's level 0 (``open_slide`` passes it over)."""


class SlideError(RuntimeError):
    """A slide cannot be opened or read. The message names the slide and, where one exists, the fix."""

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        super().__init__(f"slide '{self.path}': {message}")


@functools.cache
def _import_backend(name: str) -> Any:
    """Import a backend module once; returns the module or raises ImportError."""
    if name == "cucim":
        with quiet_native_output():  # nvImageCodec prints harmless 'Failed to load nvjpeg...' lines on CPU machines
            import cucim
            from cucim import CuImage  # noqa: F401

        return cucim
    if name == "openslide":
        import openslide

        return openslide
    if name == "tifffile":
        import tifffile

        return tifffile
    if name == "image":
        from PIL import Image

        return Image
    raise ValueError(f"unknown slide backend '{name}'; choose one of {BACKENDS}, 'image' or 'auto'")


def available_backends() -> list[str]:
    """Whole-slide backends importable in this environment, in order of preference (the plain-image reader,
    ``"image"``, needs only Pillow, a dependency)."""
    out = []
    for name in BACKENDS:
        try:
            _import_backend(name)
            out.append(name)
        except Exception:  # ImportError, or a native library failing to load
            continue
    return out


def resize_patches(patches: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a ``uint8`` batch ``[N, h, w, 3]`` to ``[N, H, W, 3]`` with antialiased bilinear interpolation."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if patches.shape[1:3] == (out_h, out_w) or len(patches) == 0:
        return patches if len(patches) else np.zeros((0, out_h, out_w, 3), np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float()
    t = torch.nn.functional.interpolate(t, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    return t.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


# --------------------------------------------------------------------------------------------------- metadata


#: micrometres per pixel a slide scanner or microscope camera samples at; other values in a file's metadata are
#: placeholders (1 pixel per unit, 72 or 300 dpi written by image tools), not a sampling
PLAUSIBLE_MPP = (0.01, 20.0)


def _plausible_mpp(mpp: float | None) -> float | None:
    """``mpp`` if it lies in :data:`PLAUSIBLE_MPP`, else ``None``."""
    return mpp if mpp is not None and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def as_mpp(value: Any, name: str = "mpp", optional: bool = False) -> float | None:
    """A level-0 microns-per-pixel setting: a positive number in :data:`PLAUSIBLE_MPP` (``None`` passes when
    ``optional``).

    Raises:
        ValueError: anything else, naming the setting and the unit it expects.
    """
    mpp = as_positive(value, name, optional=optional)
    if mpp is not None and _plausible_mpp(mpp) is None:
        raise ValueError(
            f"'{name}' {mpp:g} is outside {PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} microns per pixel: give it in um "
            "per pixel (a slide's level 0 is about 0.25 at 40x, 0.5 at 20x), not nm or mm"
        )
    return mpp


def _mpp_from_resolution(value: Any, unit: Any) -> float | None:
    """Micrometres per pixel from a TIFF resolution tag value (pixels per unit) and its unit."""
    try:
        if isinstance(value, (tuple, list)):
            value = value[0] / value[1] if len(value) == 2 and value[1] else value[0]
        value = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    unit = str(getattr(unit, "name", unit)).upper()
    per_um = {"CENTIMETER": 1e4, "3": 1e4, "INCH": 25400.0, "2": 25400.0, "MILLIMETER": 1e3, "MICROMETER": 1.0}
    if value <= 0 or unit not in per_um:
        return None
    return _plausible_mpp(per_um[unit] / value)


#: micrometres per OME length unit (``PhysicalSizeXUnit``; the OME default is the micrometre)
OME_UNITS_UM = {"µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "\u212b": 1e-4, "mm": 1e3}
OME_UNITS_UM.update({"cm": 1e4, "m": 1e6, "in": 25400.0})  # (Å: the letter and the angstrom sign)


def _ome_mpp(xml: str | None, axis: str = "X", ifd: int = 0) -> float | None:
    """Level-0 micrometres per pixel from an OME-XML document: ``PhysicalSizeX`` (``axis="Y"``: ``PhysicalSizeY``),
    with its unit, of the image stored from the file's IFD ``ifd``, its level-0 page (``TiffData IFD="<ifd>"``,
    absent = 0), else of the first image."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml or "")
    except ET.ParseError:
        return None
    local = lambda el: el.tag.rsplit("}", 1)[-1]  # noqa: E731 - tag without its namespace
    chosen = None
    for pixels in (el for el in root.iter() if local(el) == "Pixels"):
        chosen = chosen if chosen is not None else pixels
        if any(local(d) == "TiffData" and d.get("IFD", "0") == str(ifd) for d in pixels):
            chosen = pixels
            break
    size, unit = f"PhysicalSize{axis}", f"PhysicalSize{axis}Unit"
    if chosen is None or chosen.get(size) is None:
        return None
    try:
        return _plausible_mpp(float(chosen.get(size)) * OME_UNITS_UM[chosen.get(unit, "µm")])
    except (ValueError, KeyError):
        return None


def _philips_mpp(description: str) -> tuple[float | None, float | None]:
    """Level-0 ``(x, y)`` micrometres per pixel from a Philips TIFF's XML description (``DPUfsImport``): its finest
    ``DICOM_PIXEL_SPACING``, which DICOM gives in millimetres, row (y) spacing first; ``(None, None)`` without one.
    (The label and macro images' spacings are coarser than the scan's.)"""
    pairs = []
    for m in re.finditer(r'Name="DICOM_PIXEL_SPACING"[^>]*>([^<]*)<', description or ""):
        values = re.findall(r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?", html.unescape(m.group(1)))
        if len(values) >= 2 and float(values[0]) > 0 and float(values[1]) > 0:
            pairs.append((float(values[1]) * 1e3, float(values[0]) * 1e3))
    if not pairs:
        return None, None
    x, y = min(pairs)
    return _plausible_mpp(x), _plausible_mpp(y)


def _sparse_tiles(tif: Any, level0: Any) -> dict[tuple[int, int], tuple[np.ndarray, tuple[int, int]]]:
    """The tiles a TIFF leaves unstored (offset and byte count 0: Philips outside its scanned regions, GDAL's
    SPARSE_OK), by page size ``(width, height)``: a ``[rows, columns]`` grid (``True``: not stored) and the tile size
    ``(width, height)``. Only the main chain's tiled pages with the samples per pixel of ``level0`` (its
    :func:`_level0_page`) count (the pages cuCIM reads as levels); a size two such pages share is left out (which of
    them cuCIM reads is not known), and so are pages with every tile stored."""
    grids: dict[tuple[int, int], list[tuple[np.ndarray, tuple[int, int]]]] = {}
    for p in tif.pages:
        if not p.is_tiled or int(p.planarconfig) == 2 or p.samplesperpixel != level0.samplesperpixel:
            continue
        offsets, counts = np.asarray(p.dataoffsets, np.int64), np.asarray(p.databytecounts, np.int64)
        tw, th = int(p.tilewidth), int(p.tilelength)
        rows, cols = -(-int(p.imagelength) // th), -(-int(p.imagewidth) // tw)
        empty = (offsets == 0) & (counts == 0)
        grids.setdefault((int(p.imagewidth), int(p.imagelength)), []).append(
            (empty.reshape(rows, cols) if empty.size == rows * cols else None, (tw, th))
        )
    return {
        size: pages[0]
        for size, pages in grids.items()
        if len(pages) == 1 and pages[0][0] is not None and pages[0][0].any()
    }


def _level0_page(tif: Any) -> Any:
    """The page of a TIFF's main IFD chain that holds level 0: its largest page (the first of equals). Most writers
    store level 0 first; Ventana's store a label image first, and some writers store the levels coarsest first."""
    return max(tif.pages, key=lambda p: int(p.imagewidth) * int(p.imagelength), default=tif.pages.first)


def _tiff_properties(path: str) -> dict[str, Any]:
    """:func:`_read_tiff_properties`, read once per file version (path, size, modification time)."""
    try:
        st = os.stat(path)
    except OSError:
        return dict(_read_tiff_properties(path, 0, 0))
    return dict(_read_tiff_properties(os.path.abspath(path), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _read_tiff_properties(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """mpp and objective power from a TIFF's level-0 page (:func:`_level0_page`). The mpp is the Aperio description's
    ``MPP``, else the OME metadata's ``PhysicalSizeX`` (OME-TIFF), else a Philips description's
    ``DICOM_PIXEL_SPACING``, else the resolution tags (with the TIFF default unit, the inch, where ``ResolutionUnit``
    is absent) (``mpp``, and ``mpp_y`` from the same source where it gives one); each source is also returned on its
    own (``aperio_mpp``, ``ome_mpp``, ``philips_mpp``, ``tiff_mpp``). ``subifd_levels`` counts the tiled
    reduced-resolution pages kept in the level-0 page's SubIFDs (OME-TIFF pyramids), which cuCIM and OpenSlide do
    not see. The structure: ``tiled`` (the level-0 page), ``data_end`` (the last byte of image data any page or
    SubIFD stores, and that page's index)."""
    props: dict[str, Any] = {"objective_power": None, "aperio_mpp": None, "ome_mpp": None, "tiff_mpp": None}
    props.update(philips_mpp=None, mpp_y=None, level0=None, sparse={})
    y_of: dict[str, float | None] = {}
    props.update(subifd_levels=0, tiled=True, data_end=(0, 0))  # (what tifffile cannot parse: the backends report)
    props.update(samples=None, cucim_unsafe=None, jfif_rgb=False, unmarked_levels=0)
    props.update(photometric=None, compression=None, sample_format=1, max_sample=None, orientation=1, range_note=None)
    try:
        tifffile = _import_backend("tifffile")
        with tifffile.TiffFile(path) as tif:
            page = _level0_page(tif)
            ends = []
            for i, main in enumerate(tif.pages):
                for p in (main, *(main.pages or ())):  # SubIFDs too
                    offsets, counts = np.asarray(p.dataoffsets, np.int64), np.asarray(p.databytecounts, np.int64)
                    if counts.size:
                        ends.append((int((offsets + counts)[counts > 0].max(initial=0)), i))
                    if int(p.predictor) > 1 and int(p.compression) != 5:  # LZW with a predictor is fine
                        props["cucim_unsafe"] = f"{p.compression.name} tiles with a predictor (cuCIM crashes on them)"
            props.update(tiled=bool(page.is_tiled), data_end=max(ends, default=(0, 0)))
            props["sparse"] = _sparse_tiles(tif, page)
            props["level0"] = (int(page.imagewidth), int(page.imagelength))
            props.update(samples=int(page.samplesperpixel), jfif_rgb=_jfif_tagged_rgb(page))
            props.update(photometric=int(page.photometric), compression=int(page.compression))
            props.update(sample_format=int(page.sampleformat), orientation=_tag_value(page, "Orientation", 1))
            top = 0
            if page.dtype == np.uint16:  # 12-bit data, say, in 16-bit samples: the declared range, else the used one
                top = _tag_value(page, "MaxSampleValue", 0)
                if not top:
                    top, props["range_note"] = _measured_bit_range(tif)
            props["max_sample"] = top if 0 < top < 65535 else None
            # reduced levels in the main chain not marked as such: cuCIM refuses the file, OpenSlide sees one level
            others = [p for p in tif.pages if p is not page and p.is_tiled and not int(p.subfiletype) & 1]
            dims = [(int(p.imagewidth), int(p.imagelength)) for p in [page] + others]
            dims = dims[:1] + sorted(dims[1:], key=lambda d: -d[0] * d[1])
            vendor = any(getattr(tif, f"is_{name}", False) for name in ("svs", "ndpi", "philips", "scn", "bif", "qpi"))
            props["unmarked_levels"] = 0 if vendor else len(pyramid_levels(dims)) - 1
            first = tif.pages.first
            desc = (page.description or "") if first is page else f"{page.description or ''}\n{first.description or ''}"
            m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", desc)
            if m:
                props["aperio_mpp"] = _plausible_mpp(float(m.group(1)))
            m = re.search(r"\|\s*AppMag\s*=\s*([0-9.]+)", desc)
            if m:
                props["objective_power"] = float(m.group(1))
            if tif.is_ome:  # the image stored from the level-0 page (not a label stored before it)
                xml, ifd = tif.ome_metadata, int(getattr(page, "index", 0))
                props["ome_mpp"], y_of["ome_mpp"] = _ome_mpp(xml, "X", ifd), _ome_mpp(xml, "Y", ifd)
            if "DICOM_PIXEL_SPACING" in desc:
                props["philips_mpp"], y_of["philips_mpp"] = _philips_mpp(desc)
            xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
            if xres is not None:  # page.resolutionunit: the tag's value, else the TIFF default (the inch)
                props["tiff_mpp"] = _mpp_from_resolution(xres.value, page.resolutionunit)
                y_of["tiff_mpp"] = _mpp_from_resolution(yres.value, page.resolutionunit) if yres is not None else None
            props["subifd_levels"] = sum(bool(p.is_tiled) for p in (page.pages or []))
    except Exception as e:  # not a TIFF, or metadata tifffile cannot parse: kept for the no-mpp warning
        props["tiff_error"] = f"{type(e).__name__}: {e}"
    source = next((k for k in ("aperio_mpp", "ome_mpp", "philips_mpp", "tiff_mpp") if props[k] is not None), None)
    props["mpp"], props["mpp_y"] = (props[source], y_of.get(source)) if source else (None, None)
    return props


#: the largest page (pixels) read whole to measure the range of 16-bit samples without a MaxSampleValue
RANGE_PAGE_PIXELS = 4096 * 4096


def _measured_bit_range(tif: Any) -> tuple[int, str | None]:
    """``(2**k - 1, why)`` for the narrowest of 10, 12 and 14 bits that holds every sample of a 16-bit file's smallest
    page (a whole-slide thumbnail: glass is its brightest part), for a file that declares no ``MaxSampleValue``;
    ``(0, None)`` where the samples use more than 14 bits, or no page is small enough to read whole, or it cannot be
    read (kept as 16-bit)."""
    first = tif.pages.first
    pages = [
        p for p in (first, *(first.pages or ()), *tif.pages[1:]) if p.dtype == first.dtype and p.ndim == first.ndim
    ]
    smallest = min(pages, key=lambda p: int(p.imagewidth) * int(p.imagelength))
    if int(smallest.imagewidth) * int(smallest.imagelength) > RANGE_PAGE_PIXELS:
        return 0, None
    try:
        brightest = int(smallest.asarray().max(initial=0))
    except Exception:  # a damaged page: the reading backends report it
        return 0, None
    bits = next((k for k in (10, 12, 14) if 0 < brightest < 2**k), None)
    if bits is None:
        return 0, None
    why = f"none of its samples is above {brightest} on its {smallest.imagewidth} x {smallest.imagelength} level"
    return 2**bits - 1, why


def _tag_value(page: Any, name: str, default: int | None) -> int | None:
    """A TIFF tag's integer value (the largest, for a per-sample tag), or ``default`` where the page lacks it or its
    value is not a number."""
    tag = page.tags.get(name)
    try:
        value = tag.value
        return int(max(value)) if isinstance(value, (tuple, list)) else int(value)
    except (AttributeError, TypeError, ValueError):
        return default


#: what a grayscale slide's refusal says
GRAYSCALE_FIX = (
    "tissue detection and the patch embedders expect RGB brightfield (H&E) slides. Export it as RGB, or leave it out "
    "of the datalist."
)
#: TIFF compressions that store samples as they are (none, LZW, deflate, PackBits, LZMA, zstd): YCbCr samples in one
#: of them are not converted to RGB by cuCIM or our reader
_RAW_COMPRESSIONS = frozenset({1, 5, 8, 32773, 32946, 34925, 50000})
#: TIFF photometric interpretations other than RGB and YCbCr (which the JPEG decoders convert)
_PHOTOMETRIC_NAMES = {0: "MINISWHITE", 1: "MINISBLACK", 3: "PALETTE", 4: "MASK", 5: "SEPARATED (CMYK)", 8: "CIELAB"}


def _colour_backends(path: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The backends among ``names`` that read a TIFF's samples as its RGB colours: all of them for RGB (and YCbCr
    JPEG) slides; only OpenSlide (libtiff converts them) for CMYK, palette and YCbCr outside JPEG tiles, which cuCIM
    and our reader would return as wrong colours without an error. Grayscale, CIE L*a*b*, mask, floating-point or
    signed samples, and a colour model no usable backend in ``names`` converts, are refused, each message naming the
    fix."""
    props = _tiff_properties(path)
    convert = "Convert it to RGB, e.g. `vips colourspace in.tif rgb.tif srgb`, then tile it again if needed"
    photometric, compression = props["photometric"], props["compression"]
    if props["samples"] in (1, 2) and photometric != 3 or photometric in (0, 1):
        stored = "one sample per pixel" if props["samples"] in (1, 2) else f"tagged {_PHOTOMETRIC_NAMES[photometric]}"
        raise SlideError(
            path,
            f"the slide is grayscale ({stored}): {GRAYSCALE_FIX}",
        )
    if props["sample_format"] != 1:
        kind = {2: "signed integer", 3: "floating-point"}.get(props["sample_format"], "non-integer")
        raise SlideError(
            path,
            f"its samples are {kind}, which none of the readers turns into colours. Convert it to 8-bit RGB, e.g. "
            "`vips cast in.tif out.tif uchar` after scaling it to 0-255.",
        )
    if photometric in (3, 5) or photometric == 6 and compression in _RAW_COMPRESSIONS:
        installed = "openslide" in available_backends()
        if "openslide" in names and installed:
            return ("openslide",)
        model = f"YCbCr without JPEG compression (TIFF compression {compression})"
        raise SlideError(
            path,
            f"its colours are stored as {_PHOTOMETRIC_NAMES.get(photometric, model)}: of the readers only OpenSlide "
            f"converts them to RGB (backend 'auto' or 'openslide'{'' if installed else ', not installed here'}); the "
            f"others would return wrong colours. {convert}.",
        )
    if photometric in _PHOTOMETRIC_NAMES:
        raise SlideError(
            path,
            f"its TIFF photometric interpretation is {_PHOTOMETRIC_NAMES[photometric]}, which none of the readers "
            f"turns into RGB colours. {convert}.",
        )
    return names


def _jfif_tagged_rgb(page: Any) -> bool:
    """Whether a page's JPEG tiles are JFIF (YCbCr) while its tags say RGB: cuCIM and OpenSlide then decode them
    without the colour conversion (wrong colours, no error); our tifffile reader follows the JPEG stream."""
    return int(page.compression) == 7 and int(page.photometric) == 2 and bool(getattr(page, "is_jfif", False))


#: relative difference above which the Aperio description's and the TIFF tags' mpp are reported as disagreeing
MPP_DISAGREEMENT = 0.05
#: relative difference between a slide's x and y pixel sizes above which its pixels are reported as not square
MPP_ANISOTROPY = 0.01


def _check_mpp_sources(path: str) -> None:
    """Warn when a TIFF's Aperio description and resolution tags give different mpp (the description is used), and
    when its pixels are not square (the x size is used)."""
    props = _tiff_properties(path)
    x, y = props["mpp"], props["mpp_y"]
    if x and y and abs(x - y) > MPP_ANISOTROPY * x:
        warnings.warn(
            f"slide '{path}': its pixels are not square ({x:g} um wide, {y:g} um high): every reader here uses the "
            f"width, so patches cover {y / x:.3g} times more tissue in height than in width. Resample the slide to "
            "square pixels if that matters for your model.",
            stacklevel=4,  # (the caller of open_slide)
        )
    aperio, tags = props["aperio_mpp"], props["tiff_mpp"]
    if aperio and tags and abs(aperio - tags) > MPP_DISAGREEMENT * aperio:
        warnings.warn(
            f"slide '{path}': its Aperio description says MPP = {aperio:g} um/px but its TIFF resolution tags say "
            f"{tags:g} um/px; using the Aperio value ({aperio:g}), as every reader here does. If the tags are right, "
            "give the slide an `mpp` in the datalist.",
            stacklevel=4,  # (the caller of open_slide)
        )


#: what to do about a slide without microns per pixel (the error and warning name it)
NO_MPP_FIX = (
    "Give it an `mpp` column (or key) in the datalist, set `assume_mpp` (the bundle's --assume_mpp, used for every "
    "slide without one), or tile by level (`level=` and no `mpp=`)."
)


def on_white(rgba: np.ndarray, associated: bool = False) -> np.ndarray:
    """``[..., 4]`` RGBA composited on a white background (transparent = outside the scanned area, as cuCIM
    returns it), as ``[..., 3]`` uint8; RGB passes through. ``associated``: the colour is premultiplied by the alpha
    (TIFF ``ExtraSamples`` 1)."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    if rgba.shape[-1] < 4 or alpha.min() == 255:
        return np.ascontiguousarray(rgb, dtype=np.uint8)
    a = alpha.astype(np.uint16)
    if associated:  # premultiplied: the colour already carries its alpha
        return np.minimum(rgb.astype(np.uint16) + (255 - a), 255).astype(np.uint8)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a)) // 255).astype(np.uint8)


#: smallest size ratio between successive pyramid levels (a page only a little smaller is another image)
MIN_LEVEL_RATIO = 1.5


def same_aspect(width: int, height: int, aspect: float) -> bool:
    """Whether a ``width x height`` image has the aspect ratio ``aspect`` (up to 2 % and the rounding of a level)."""
    return abs(width / height - aspect) <= 0.02 * aspect + 2.0 * aspect * (1.0 / height + 1.0 / width)


def pyramid_levels(dims: Sequence[tuple[int, int]]) -> list[int]:
    """The indices of ``dims`` (finest first) that form the pyramid: the first level, then each image of its aspect
    ratio at least :data:`MIN_LEVEL_RATIO` times smaller than the last one kept. A label, macro or thumbnail image
    that a writer stored as a further page (cuCIM and OpenSlide then list it as a level, sorted by size among the
    real ones) is left out."""
    aspect, keep = dims[0][0] / dims[0][1], [0]
    for i, (w, h) in enumerate(dims[1:], 1):
        if same_aspect(w, h, aspect) and w * MIN_LEVEL_RATIO <= dims[keep[-1]][0]:
            keep.append(i)
    return keep


def block_mean(img: np.ndarray, factor: int) -> np.ndarray:
    """``[h, w, 3]`` uint8 averaged over ``factor x factor`` blocks (the ragged right and bottom edges dropped)."""
    if factor <= 1:
        return img
    h, w = img.shape[0] // factor, img.shape[1] // factor
    if h == 0 or w == 0:
        return img
    t = torch.from_numpy(np.ascontiguousarray(img[: h * factor, : w * factor])).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.avg_pool2d(t, factor)
    return t[0].permute(1, 2, 0).round().to(torch.uint8).numpy()


# --------------------------------------------------------------------------------------------------- base class


class SlideReader(ABC):
    """A whole-slide image opened by one backend.

    Attributes:
        path: the slide's path.
        backend: the backend's name (``"cucim"``, ``"openslide"`` or ``"tifffile"``).
        level_dimensions: ``(width, height)`` of each level, finest first.
        level_downsamples: downsample of each level relative to level 0.
        mpp: micrometres per pixel at level 0, or ``None`` when the file does not say.
        objective_power: the scan's objective magnification, or ``None``.
    """

    backend: str = ""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()
        self.mpp: float | None = None
        self.objective_power: float | None = None
        self._backend_levels: tuple[int, ...] = ()

    # ------------------------------------------------------------------ description
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` at level 0."""
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> float | None:
        """Micrometres per pixel at ``level`` (``None`` if the slide has no mpp)."""
        self._check_level(level)
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def _check_level(self, level: int) -> None:
        if not 0 <= int(level) < self.level_count:
            raise ValueError(
                f"slide '{self.path}': level {level} does not exist: it has {self.level_count} level(s), "
                f"0-{self.level_count - 1} (0 is the full resolution)."
            )

    def _check_level0(self, dims: Sequence[tuple[int, int]]) -> None:
        """Refuse a backend's levels whose level 0 is not the file's: a larger image listed after it, or (a TIFF) one
        at least :data:`MIN_LEVEL_RATIO` times smaller than the file's largest page (it took a reduced level for
        level 0, as OpenSlide does where a label image is stored first; a page padded to whole tiles, as Philips
        writes them, is not that). Its coordinates would be another image's.

        Raises:
            Level0Misread: naming both sizes (``open_slide`` takes the next backend).
        """
        if any(w * h > dims[0][0] * dims[0][1] for w, h in dims[1:]):
            raise Level0Misread(f"lists a smaller image as level 0 ({dims})")
        level0 = _tiff_properties(self.path)["level0"] if self.path.lower().endswith(TIFF_SUFFIXES) else None
        if level0 is not None and all(d * MIN_LEVEL_RATIO <= f for d, f in zip(dims[0], level0)):
            raise Level0Misread(
                f"sees a {dims[0][0]}x{dims[0][1]} level 0, but the file's largest image is {level0[0]}x{level0[1]}"
            )

    def _describe_levels(self) -> None:
        dims = self.level_dimensions
        if not dims:
            raise SlideError(self.path, "no image levels found.")
        self._check_level0(dims)
        # downsamples from dimensions are exact for generic TIFFs; backends may override with their own values
        if not self.level_downsamples:
            w0, h0 = dims[0]
            self.level_downsamples = tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)
        keep = pyramid_levels(dims)  # a label or macro image the backend lists is not a level
        self.level_dimensions = tuple(dims[i] for i in keep)
        self.level_downsamples = tuple(self.level_downsamples[i] for i in keep)
        self._backend_levels = tuple(keep)  # our level k is the backend's level _backend_levels[k]

    def require_mpp(self, what: str = "tiling at a target mpp") -> float:
        if self.mpp is None:
            raise SlideError(
                self.path, f"{what} needs the slide's microns per pixel, but its metadata has none. {NO_MPP_FIX}"
            )
        return self.mpp

    def level_for_mpp(self, target_mpp: float, tolerance: float = 0.1) -> tuple[int, float]:
        """The level to read for a target resolution, and the scale to apply after reading.

        The chosen level is the coarsest one that is at least as fine as ``target_mpp`` (within ``tolerance``,
        relative), so that reading it and resizing down never upsamples.

        Returns:
            ``(level, scale)``: read at ``level`` then resize by ``scale = level_mpp / target_mpp`` (<= 1).

        Raises:
            SlideError: the slide has no mpp, or ``target_mpp`` is finer than its finest level.
        """
        mpp0 = self.require_mpp()
        if target_mpp <= 0:
            raise ValueError(f"target mpp must be positive, got {target_mpp}")
        if target_mpp < mpp0 * (1.0 - tolerance):
            raise SlideError(
                self.path,
                f"requested {target_mpp:g} um/px is finer than the slide's finest level ({mpp0:g} um/px). "
                f"Ask for {mpp0:g} um/px or coarser.",
            )
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= target_mpp * (1.0 + tolerance):
                best = level
        level_mpp = self.level_mpp(best)
        scale = min(1.0, level_mpp / target_mpp)
        if abs(scale - 1.0) <= tolerance:
            scale = 1.0
        return best, scale

    def level_for_downsample(self, downsample: float, tolerance: float = 0.01) -> int:
        """The coarsest level whose downsample does not exceed ``downsample``."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1.0 + tolerance):
                best = level
        return best

    # ------------------------------------------------------------------ reading
    @abstractmethod
    def _read_batch(
        self, locations: np.ndarray, level: int, size: tuple[int, int], num_workers: int, out: np.ndarray | None
    ) -> np.ndarray:
        """Read ``[N, h, w, 3]`` uint8 patches into ``out`` (a new array when ``None``) and return it; ``locations``
        are validated level-0 ``(x, y)`` int64."""

    def _validate_locations(self, locations: Any) -> np.ndarray:
        loc = np.asarray(locations, dtype=np.int64)
        if loc.ndim == 1 and loc.size == 2:
            loc = loc[None]
        if loc.ndim != 2 or loc.shape[1] != 2:
            raise ValueError(f"slide '{self.path}': locations must have shape [N, 2] (x, y), got {loc.shape}.")
        w0, h0 = self.dimensions
        bad = np.flatnonzero((loc[:, 0] < 0) | (loc[:, 1] < 0) | (loc[:, 0] >= w0) | (loc[:, 1] >= h0))
        if bad.size:
            shown = ", ".join(f"#{i} {tuple(int(v) for v in loc[i])}" for i in bad[:5])
            more = f" and {bad.size - 5} more" if bad.size > 5 else ""
            raise ValueError(
                f"slide '{self.path}': {bad.size} coordinate(s) outside the slide ({w0}x{h0} at level 0): "
                f"{shown}{more}. Coordinates are level-0 (x, y) of the patch's top-left corner."
            )
        return loc

    def read_patches(
        self,
        locations: Any,
        size: int | tuple[int, int],
        level: int = 0,
        out_size: int | tuple[int, int] | None = None,
        num_workers: int = 0,
        as_tensor: bool = False,
        device: str | torch.device | None = None,
        out: np.ndarray | torch.Tensor | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Read a batch of patches in one call.

        Args:
            locations: level-0 ``(x, y)`` of each patch's top-left corner, shape ``[N, 2]``.
            size: patch size read at ``level`` (int or ``(width, height)``).
            level: pyramid level to read from.
            out_size: resize each patch to this size after reading (int or ``(height, width)``); ``None`` keeps it.
            num_workers: decoding threads (cuCIM: its own threads; others: a thread pool). 0 reads serially.
            as_tensor: return a ``uint8`` tensor ``[N, 3, H, W]`` instead of an array ``[N, H, W, 3]``.
            device: with ``as_tensor``, move the batch to this device (e.g. ``"cuda"``).
            out: write the patches into this ``uint8`` C-contiguous ``[N, H, W, 3]`` array or tensor (e.g. pinned
                host memory, so the batch needs no further copy before going to the GPU); the result is a view of it.

        Raises:
            ValueError: coordinates outside the slide (the message lists them), or an ``out`` of the wrong shape.
            SlideError: a tile cannot be decoded (truncated or corrupt file).
        """
        self._check_level(level)
        w, h = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
        loc = self._validate_locations(locations)
        oh, ow = (h, w) if out_size is None else (out_size, out_size) if isinstance(out_size, int) else out_size
        dst = None if out is None else self._check_out(out, (len(loc), int(oh), int(ow), 3))
        if len(loc) == 0:
            patches = np.zeros((0, h, w, 3), np.uint8)
        else:
            try:
                into = dst if dst is not None and out_size is None else np.empty((len(loc), h, w, 3), np.uint8)
                patches = self._read_batch(loc, int(level), (w, h), int(num_workers), into)
            except (SlideError, ValueError):
                raise
            except Exception as e:  # backend-specific decode errors
                raise SlideError(
                    self.path,
                    f"reading {len(loc)} patch(es) at level {level} failed ({type(e).__name__}: {e}). "
                    "The file may be truncated or corrupt; re-export or re-copy it.",
                ) from e
        if out_size is not None:
            patches = resize_patches(patches, out_size)
        if dst is not None and patches is not dst:
            dst[...] = patches
            patches = dst
        if not as_tensor:
            return patches
        t = torch.from_numpy(patches).permute(0, 3, 1, 2)
        if device is not None:
            t = t.to(device, non_blocking=True)
        return t

    def _check_out(self, out: np.ndarray | torch.Tensor, shape: tuple[int, int, int, int]) -> np.ndarray:
        arr = out.numpy() if isinstance(out, torch.Tensor) else out  # a CPU tensor's numpy view shares its memory
        if arr.shape != shape or arr.dtype != np.uint8 or not arr.flags.c_contiguous:
            raise ValueError(
                f"slide '{self.path}': out must be a C-contiguous uint8 array of shape {list(shape)} [N, H, W, 3], "
                f"got {arr.dtype} {list(arr.shape)}{'' if arr.flags.c_contiguous else ' (not contiguous)'}."
            )
        return arr

    # ------------------------------------------------------------------ integrity
    def tile_size(self, level: int) -> tuple[int, int]:
        """``(width, height)`` of the tiles of ``level`` as stored in the file (256 x 256 when the backend does not
        say): what :meth:`damaged_tiles` checks one at a time."""
        return (256, 256)

    def _tile_origins(self, level: int, tiles: Sequence[tuple[int, int]]) -> np.ndarray:
        """Level-0 ``(x, y)`` of tiles given as ``(column, row)`` of ``level``."""
        tw, th = self.tile_size(level)
        ds = self.level_downsamples[level]
        return np.array([[int(round(tx * tw * ds)), int(round(ty * th * ds))] for tx, ty in tiles], np.int64)

    def _probe_tiles(self, level: int, tiles: Sequence[tuple[int, int]], num_workers: int) -> bool:
        """Whether decoding these tiles raises or makes the JPEG decoder complain (in the native output)."""
        from monai_icmil.data.integrity import JPEG_PROBLEM, native_output

        w0, h0 = self.dimensions
        origins = self._tile_origins(level, tiles)
        origins = origins[(origins[:, 0] < w0) & (origins[:, 1] < h0)]
        try:
            with native_output() as lines:
                self._read_batch(origins, level, self.tile_size(level), num_workers, None)
        except Exception:  # noqa: BLE001 - a backend that raises on a damaged tile
            return True
        return any(JPEG_PROBLEM.search(line) for line in lines)

    def damaged_tiles(self, level: int, tiles: Sequence[tuple[int, int]], num_workers: int = 2) -> set[tuple[int, int]]:
        """The tiles of ``level`` (``(column, row)``) whose data is damaged: decoding raises, or the decoder reports a
        corrupt stream. Checked in batches; a damaged batch is halved until the tiles are found
        (:func:`~monai_icmil.data.integrity.find_damaged`)."""
        from monai_icmil.data.integrity import find_damaged

        self._check_level(level)
        return find_damaged(list(tiles), lambda part: self._probe_tiles(level, part, num_workers))

    def read_region(self, location: tuple[int, int], size: int | tuple[int, int], level: int = 0) -> np.ndarray:
        """Read one region ``[h, w, 3]`` at ``level``; ``location`` is level-0 ``(x, y)``."""
        return self.read_patches([location], size, level)[0]

    def read_level(self, level: int, max_pixels: int = 400_000_000, block: int = 1) -> np.ndarray:
        """Read a whole level ``[H, W, 3]``, averaged over ``block x block`` pixel blocks (thumbnails, tissue masks).

        The level is read in chunks and each chunk averaged as it arrives, so a slide without a pyramid (one
        level) gives its low-resolution picture without holding level 0 in memory. ``max_pixels`` bounds the
        output.
        """
        self._check_level(level)
        block = max(1, int(block))
        w, h = self.level_dimensions[level]
        ow, oh = (w // block, h // block) if block > 1 and w >= block and h >= block else (w, h)
        if ow * oh > max_pixels:
            raise SlideError(self.path, f"level {level} is {w}x{h} px, too large to read whole; use a coarser level.")
        if (ow, oh) == (w, h):
            block = 1
        ds = self.level_downsamples[level]
        chunk = block * max(1, 2048 // block)  # chunks start on block boundaries: the same result as one read
        out = np.empty((oh, ow, 3), np.uint8)
        for y in range(0, oh * block, chunk):
            for x in range(0, ow * block, chunk):
                # the smallest level-0 point that falls in level pixel (x, y): a rounded one may fall in the pixel
                # before it where the downsample is not a whole number (10001 px over 5000, say)
                loc = (min(math.ceil(x * ds), self.dimensions[0] - 1), min(math.ceil(y * ds), self.dimensions[1] - 1))
                bw, bh = min(chunk, ow * block - x), min(chunk, oh * block - y)
                part = block_mean(self.read_patches([loc], (bw, bh), level)[0], block)
                out[y // block : y // block + part.shape[0], x // block : x // block + part.shape[1]] = part
        return out

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """A thumbnail no larger than ``max_size`` on its long side, and its downsample relative to level 0 (measured
        on the long side, where the thumbnail's rounding to whole pixels matters least)."""
        w0, h0 = self.dimensions
        target_ds = max(w0, h0) / max_size
        level = self.level_for_downsample(max(target_ds, 1.0))
        img = self.read_level(level, block=int(max(1.0, target_ds / self.level_downsamples[level]) // 2))
        lh, lw = img.shape[:2]
        scale = min(1.0, max_size / max(lw, lh))
        if scale < 1.0:
            img = resize_patches(img[None], (max(1, round(lh * scale)), max(1, round(lw * scale))))[0]
        return img, max(w0, h0) / max(img.shape[:2])  # the long side's: least rounding (a needle core's height)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:  # noqa: B027 - optional for backends
        pass

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}('{self.path}', levels={self.level_count}, dims={self.dimensions}, "
            f"mpp={self.mpp}, objective={self.objective_power})"
        )


# --------------------------------------------------------------------------------------------------- cuCIM


class CuCIMSlide(SlideReader):
    """cuCIM backend: ``CuImage.read_region`` with a list of locations decodes with ``num_workers`` threads.

    A dense batch (a tiling grid, whose neighbouring patches share tiles) is read as a few larger regions of up to
    ``block_tiles`` x ``block_tiles`` tiles and cut into patches, so each tile is decoded about once rather than once
    per patch that overlaps it (cuCIM's own tile cache is not used by its batched reads). The patches are identical
    to per-patch reads; a sparse batch (random patches) is read patch by patch.

    Note: cuCIM's ``spacing()`` reports 1.0 for Aperio files, so mpp comes from the Aperio description or the
    TIFF resolution tags instead.
    """

    backend = "cucim"
    #: side, in tiles, of the regions a dense batch is read as (0: always read patch by patch)
    block_tiles = 4
    #: largest total size of one batch's regions, in pixels (above it the batch is read patch by patch)
    max_block_pixels = 2**26

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        cucim = _import_backend("cucim")
        if self.path.lower().endswith(TIFF_SUFFIXES) and (unsafe := _tiff_properties(self.path)["cucim_unsafe"]):
            raise RuntimeError(f"not opened: {unsafe}")  # (a crash would take the whole process)
        with quiet_native_output():
            self._img = cucim.CuImage(self.path)
        res = self._img.resolutions
        self.level_dimensions = tuple((int(w), int(h)) for w, h in res["level_dimensions"])
        self.level_downsamples = tuple(float(d) for d in res["level_downsamples"])
        tiles = res.get("level_tile_sizes") or ()
        sizes = tuple((int(tw) or 256, int(th) or 256) for tw, th in tiles) or ((256, 256),)
        self._describe_levels()
        self._tile_sizes = tuple(sizes[min(i, len(sizes) - 1)] for i in self._backend_levels)
        meta = self._img.metadata
        aperio = meta.get("aperio", {}) if isinstance(meta, dict) else {}
        if "MPP" in aperio:
            self.mpp = _plausible_mpp(float(aperio["MPP"]))
        if "AppMag" in aperio:
            self.objective_power = float(aperio["AppMag"])
        if self.mpp is None or self.objective_power is None:
            props = _tiff_properties(self.path)  # OME metadata before the resolution tags, as the other backends
            self.mpp = self.mpp if self.mpp is not None else props["mpp"]
            self.objective_power = self.objective_power or props["objective_power"]
        if self.mpp is None:
            tiff = meta.get("tiff", {}) if isinstance(meta, dict) else {}
            self.mpp = _mpp_from_resolution(tiff.get("x_resolution"), tiff.get("resolution_unit", ""))
        # unstored tiles, which cuCIM reads black and the other readers (and OpenSlide) as glass: by our level
        sparse = _tiff_properties(self.path)["sparse"] if self.path.lower().endswith(TIFF_SUFFIXES) else {}
        self._sparse = {k: sparse[d] for k, d in enumerate(self.level_dimensions) if d in sparse}
        self._check_decodable()

    def _check_decodable(self) -> None:
        """Decode one pixel of every level, and a batch of two: cuCIM opens some files whose tiles it cannot decode
        (JPEG 2000, WebP, 4-sample deflate) or that it cannot read in batches (4-sample JPEG), and fails only when
        patches are read; failing here lets ``open_slide`` take the next backend."""
        for level in range(self.level_count):
            try:
                with quiet_native_output():
                    np.asarray(self._img.read_region((0, 0), (1, 1), self._backend_levels[level]))
            except Exception as e:
                raise RuntimeError(f"cuCIM cannot decode level {level} ({type(e).__name__}: {e})") from e
        try:  # a batch of locations (the fast path), which fails on some files one location reads (RGBA ones)
            with quiet_native_output():
                [np.asarray(r) for r in self._img.read_region([(0, 0), (1, 1)], (1, 1), 0, num_workers=1, batch_size=2)]
        except Exception as e:
            raise RuntimeError(f"cuCIM cannot read batches of patches of this file ({type(e).__name__}: {e})") from e

    def tile_size(self, level: int) -> tuple[int, int]:
        return self._tile_sizes[min(level, len(self._tile_sizes) - 1)]

    def _read_batch(
        self, locations: np.ndarray, level: int, size: tuple[int, int], num_workers: int, out: np.ndarray | None
    ) -> np.ndarray:
        out = np.empty((len(locations), size[1], size[0], 3), np.uint8) if out is None else out
        plan = self.block_plan(locations, level, size)
        if plan is None:
            return self._read_regions(locations, level, size, num_workers, out)
        w, h = size
        order = np.argsort(plan["block"], kind="stable")  # the patches of region b: members[b]
        members = np.split(order, np.cumsum(np.bincount(plan["block"]))[:-1])
        for (bw, bh), rows in plan["groups"].items():  # one batched read per region size
            regions = self._read_regions(plan["origins0"][rows], level, (bw, bh), num_workers)
            for region, b in zip(regions, rows):
                for i in members[b]:
                    dx, dy = plan["offsets"][i]
                    out[i] = region[dy : dy + h, dx : dx + w]
        return out

    def block_plan(self, locations: np.ndarray, level: int, size: tuple[int, int]) -> dict[str, Any] | None:
        """How a batch would be read as regions: ``None`` to read patch by patch.

        Regions are the bounding boxes of the patches whose top-left corner falls in each cell of a grid of
        ``block_tiles`` x ``block_tiles`` tiles. They are used when they decode at most 70 % of the tiles that
        per-patch reads would (counted exactly from the tile size), the level's downsample and the patches' level
        coordinates are whole numbers (so a region holds exactly the patches' pixels), and they hold at most
        ``max_block_pixels`` together (64 Mpx, 192 MB of RGB, by default).
        """
        if self.block_tiles <= 0 or len(locations) < 2:
            return None
        ds = self.level_downsamples[level]
        if abs(ds - round(ds)) > 1e-6 or np.any(locations % int(round(ds))):
            return None
        ds = int(round(ds))
        w, h = size
        tw, th = self._tile_sizes[min(level, len(self._tile_sizes) - 1)]
        lx, ly = locations[:, 0] // ds, locations[:, 1] // ds

        def tiles(x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> int:
            return int((((x1 - 1) // tw - x0 // tw + 1) * ((y1 - 1) // th - y0 // th + 1)).sum())

        cells = (lx // (self.block_tiles * tw)) * (1 << 32) + ly // (self.block_tiles * th)
        _, block = np.unique(cells, return_inverse=True)
        nb = int(block.max()) + 1
        x0, y0 = np.full(nb, np.iinfo(np.int64).max), np.full(nb, np.iinfo(np.int64).max)
        x1, y1 = np.zeros(nb, np.int64), np.zeros(nb, np.int64)
        np.minimum.at(x0, block, lx)
        np.minimum.at(y0, block, ly)
        np.maximum.at(x1, block, lx + w)
        np.maximum.at(y1, block, ly + h)
        if (
            tiles(x0, y0, x1, y1) > 0.7 * tiles(lx, ly, lx + w, ly + h)
            or int(((x1 - x0) * (y1 - y0)).sum()) > self.max_block_pixels
        ):
            return None
        groups: dict[tuple[int, int], np.ndarray] = {}
        for key in sorted(set(zip((x1 - x0).tolist(), (y1 - y0).tolist()))):
            groups[key] = np.flatnonzero(((x1 - x0) == key[0]) & ((y1 - y0) == key[1]))
        return {
            "block": block,
            "origins0": np.stack([x0 * ds, y0 * ds], 1),
            "offsets": np.stack([lx - x0[block], ly - y0[block]], 1),
            "groups": groups,
        }

    def _read_regions(
        self, locations: np.ndarray, level: int, size: tuple[int, int], num_workers: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """``CuImage.read_region`` of equal-sized regions, ``num_workers`` decoding threads (into ``out`` if given)."""
        w, h = size
        n = len(locations)
        out = np.empty((n, h, w, 3), np.uint8) if out is None else out
        batch = max(1, min(n, 64))
        regions = self._img.read_region(
            [tuple(int(v) for v in xy) for xy in locations],
            (w, h),
            self._backend_levels[level],
            num_workers=max(num_workers, 1),  # cuCIM refuses several locations with zero workers
            batch_size=batch,
        )
        i = 0
        for region in regions:
            arr = np.asarray(region)
            if arr.ndim == 3:
                arr = arr[None]
            k = arr.shape[0]
            out[i : i + k] = arr[..., :3]  # (4-sample files, which cuCIM cannot batch, are refused when opened)
            i += k
        if i != n:
            raise SlideError(self.path, f"cuCIM returned {i} of {n} patches.")
        return self._whiten_outside(out, locations, level, size)

    def _whiten_outside(self, out: np.ndarray, locations: np.ndarray, level: int, size: tuple[int, int]) -> np.ndarray:
        """White (glass) where a patch reaches outside the level or onto a tile the file leaves unstored, which cuCIM
        fills black, as the other readers and OpenSlide's own background do."""
        w, h = size
        lw, lh = self.level_dimensions[level]
        xy = np.floor(np.asarray(locations, np.float64) / self.level_downsamples[level]).astype(np.int64)
        for i in np.flatnonzero((xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] + w > lw) | (xy[:, 1] + h > lh)):
            x, y = xy[i]
            keep = np.zeros((h, w), bool)
            keep[max(0, -y) : max(0, min(h, lh - y)), max(0, -x) : max(0, min(w, lw - x))] = True
            out[i][~keep] = 255
        if level in self._sparse:
            empty, (tw, th) = self._sparse[level]
            rows, cols = empty.shape
            for i, (x, y) in enumerate(xy.tolist()):
                r0, r1 = max(0, y // th), min(rows, -(-(y + h) // th))
                c0, c1 = max(0, x // tw), min(cols, -(-(x + w) // tw))
                for r, c in np.argwhere(empty[r0:r1, c0:c1]) + (r0, c0):
                    ys, xs = slice(max(0, r * th - y), max(0, (r + 1) * th - y)), slice(
                        max(0, c * tw - x), max(0, (c + 1) * tw - x)
                    )
                    out[i][ys, xs] = 255
        return out

    def close(self) -> None:
        img, self._img = getattr(self, "_img", None), None
        if img is not None and hasattr(img, "close"):
            img.close()


class _PatchByPatchReader(SlideReader):
    """Backends that read one region at a time: a batch is a loop (or a thread pool) over ``_read_one``."""

    @abstractmethod
    def _read_one(self, xy: np.ndarray, level: int, size: tuple[int, int]) -> np.ndarray:
        """One ``[h, w, 3]`` uint8 region at ``level``; ``xy`` is level-0."""

    def _read_batch(
        self, locations: np.ndarray, level: int, size: tuple[int, int], num_workers: int, out: np.ndarray | None
    ) -> np.ndarray:
        out = np.empty((len(locations), size[1], size[0], 3), np.uint8) if out is None else out
        if num_workers > 1:
            with ThreadPoolExecutor(num_workers) as pool:
                for i, patch in enumerate(pool.map(lambda xy: self._read_one(xy, level, size), locations)):
                    out[i] = patch
        else:
            for i, xy in enumerate(locations):
                out[i] = self._read_one(xy, level, size)
        return out


# --------------------------------------------------------------------------------------------------- OpenSlide


class OpenSlideSlide(_PatchByPatchReader):
    """OpenSlide backend: one ``read_region`` per patch (OpenSlide decodes only the tiles it needs)."""

    backend = "openslide"

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        openslide = _import_backend("openslide")
        self._osr = openslide.OpenSlide(self.path)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self._describe_levels()
        props = self._osr.properties
        obj = props.get("openslide.objective-power")
        self.objective_power = float(obj) if obj else None
        # Aperio, then OME-XML (which OpenSlide does not read), then Philips XML, then OpenSlide's own (vendor
        # metadata), then the tags
        tiff = _tiff_properties(self.path) if self.path.lower().endswith(TIFF_SUFFIXES) else {}
        vendor = _plausible_mpp(float(props["openslide.mpp-x"])) if props.get("openslide.mpp-x") else None
        sources = (tiff.get("aperio_mpp"), tiff.get("ome_mpp"), tiff.get("philips_mpp"), vendor, tiff.get("tiff_mpp"))
        self.mpp = next((v for v in sources if v is not None), None)
        self._tile_sizes = self._read_tile_sizes()
        self._lock = threading.Lock()

    def _read_one(self, xy: np.ndarray, level: int, size: tuple[int, int]) -> np.ndarray:
        xy, level = (int(xy[0]), int(xy[1])), self._backend_levels[level]
        return on_white(np.asarray(self._osr.read_region(xy, level, size)))

    def tile_size(self, level: int) -> tuple[int, int]:
        return self._tile_sizes[level]

    def _read_tile_sizes(self) -> tuple[tuple[int, int], ...]:
        """Each level's tile size, read once: after a damaged tile the handle answers every call with that error."""
        props, sizes = self._osr.properties, []
        for level in self._backend_levels:
            w, h = props.get(f"openslide.level[{level}].tile-width"), props.get(f"openslide.level[{level}].tile-height")
            sizes.append((int(w), int(h)) if w and h else (256, 256))
        return tuple(sizes)

    def _probe_tiles(self, level: int, tiles: Sequence[tuple[int, int]], num_workers: int) -> bool:
        """OpenSlide raises on a damaged tile, and its handle stays in error afterwards: each check opens its own."""
        openslide = _import_backend("openslide")
        tw, th = self.tile_size(level)
        with openslide.OpenSlide(self.path) as osr:
            try:
                for xy in self._tile_origins(level, tiles):
                    osr.read_region((int(xy[0]), int(xy[1])), self._backend_levels[level], (tw, th))
            except openslide.OpenSlideError:
                return True
        return False

    def close(self) -> None:
        osr, self._osr = getattr(self, "_osr", None), None
        if osr is not None:
            osr.close()


# --------------------------------------------------------------------------------------------------- tifffile


class TiffSlide(_PatchByPatchReader):
    """Our tile-level TIFF reader: decodes only the tiles each patch overlaps, with a small LRU tile cache.

    Levels are level 0 (the file's largest page) and the tiled pages of its SubIFDs (an OME-TIFF's pyramid) or,
    without them, of the main IFD chain that share its aspect ratio, finest first; thumbnails, labels, macro images
    and, beside a SubIFD pyramid, the file's other scenes are ignored.
    """

    backend = "tifffile"

    def __init__(self, path: str | os.PathLike, cache_tiles: int = 512):
        super().__init__(path)
        tifffile = _import_backend("tifffile")
        self._tif = tifffile.TiffFile(self.path)
        self._pages = self._find_levels()
        self.level_dimensions = tuple((int(p.imagewidth), int(p.imagelength)) for p in self._pages)
        self._describe_levels()
        self._pages = [self._pages[i] for i in self._backend_levels]  # the pyramid's pages only
        props = _tiff_properties(self.path)
        self.mpp, self.objective_power = props["mpp"], props["objective_power"]
        self._max_sample = int(props["max_sample"] or 65535)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = cache_tiles
        self._io_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._file_size = os.path.getsize(self.path)
        # tile bytes are read with pread on a descriptor of our own, so no other use of a file position can shift them:
        # tifffile's first decode of a JPEG page seeks its handle to the first tile + 6 and reads 4 bytes (is_jfif),
        # which between another thread's seek and read once made a healthy slide fail ("Not a JPEG file: starts with
        # 0x4a 0x46")
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)) if hasattr(os, "pread") else None

    def _find_levels(self) -> list[Any]:
        first = _level0_page(self._tif)  # (a label stored before it, levels stored coarsest first)
        if not first.is_tiled:
            raise _not_tiled_error(self.path)
        if first.samplesperpixel < 3:
            raise SlideError(self.path, f"expected an RGB slide, found {first.samplesperpixel} sample(s) per pixel.")
        if first.dtype not in (np.uint8, np.uint16):
            raise SlideError(self.path, f"{first.dtype} samples are not read; convert the slide to 8-bit RGB.")
        # its SubIFDs (an OME-TIFF's pyramid; the main chain then holds other scenes, labels and macro images), else
        # the main chain's other pages, largest first (levels stored coarsest first)
        subifds = [p for p in (first.pages or ()) if p.is_tiled]
        chain = sorted(
            (p for p in self._tif.pages if p is not first), key=lambda p: -int(p.imagewidth) * int(p.imagelength)
        )
        # the pyramid among them (level 0's aspect, each level smaller enough) is chosen by _describe_levels
        candidates = [first, *(subifds or chain)]
        return [p for p in candidates if p.is_tiled and p.samplesperpixel == first.samplesperpixel]

    def _tile(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        with self._cache_lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        page = self._pages[level]
        if int(page.planarconfig) == 2:  # one plane per sample, each with its own tiles: R, G, B (and alpha)
            per_plane = len(page.dataoffsets) // page.samplesperpixel
            planes = [self._segment(level, index + k * per_plane) for k in range(min(page.samplesperpixel, 4))]
            tile = np.concatenate(planes, axis=-1)
        else:
            tile = self._segment(level, index)
        if tile.dtype == np.uint16:  # 16-bit: the declared range (MaxSampleValue, else 65535) onto 8 bits, rounded
            top = self._max_sample
            tile = ((np.minimum(tile, top).astype(np.uint32) * 255 + top // 2) // top).astype(np.uint8)
        alpha = int(page.extrasamples[0]) if len(page.extrasamples) else 0  # 1 associated (premultiplied), 2 not
        if tile.shape[-1] == 4 and alpha in (1, 2):  # (0: an unspecified extra sample, not an alpha channel)
            tile = on_white(tile, associated=alpha == 1)
        else:
            tile = np.ascontiguousarray(tile[..., :3])
        with self._cache_lock:
            self._cache[key] = tile
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return tile

    def _segment(self, level: int, index: int) -> np.ndarray:
        """Stored segment ``index`` of a level, decoded: ``[h, w, samples]``."""
        page = self._pages[level]
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        if count == 0 and offset == 0:  # a sparse tile (Philips outside its scanned regions, GDAL's SPARSE_OK): glass
            samples = 1 if int(page.planarconfig) == 2 else int(page.samplesperpixel)
            return np.full((int(page.tilelength), int(page.tilewidth), samples), np.iinfo(page.dtype).max, page.dtype)
        if count == 0 or offset + count > self._file_size:
            raise SlideError(
                self.path,
                f"tile {index} of level {level} lies beyond the end of the file ({offset}+{count} > "
                f"{self._file_size} bytes): the file is truncated. Re-copy or re-export it.",
            )
        with self._io_lock:  # tifffile builds a page's decoder once, reading through its handle (is_jfif)
            decode = page.decode
        data = self._read_at(offset, count)
        if len(data) < count:
            raise SlideError(
                self.path,
                f"tile {index} of level {level}: read {len(data)} of its {count} bytes: the file is truncated or "
                "being rewritten. Re-copy or re-export it.",
            )
        seg, _, _ = decode(data, index, jpegtables=page.jpegtables)
        return np.asarray(seg).reshape(seg.shape[-3:])

    def _read_at(self, offset: int, count: int) -> bytes:
        """``count`` bytes of the file from ``offset`` (fewer at its end), whatever its handles' positions."""
        fd = self._fd
        if fd is not None:
            data = os.pread(fd, count, offset)
            while 0 < len(data) < count:  # a short read before the end of the file: read on
                more = os.pread(fd, count - len(data), offset + len(data))
                if not more:
                    break
                data += more
            return data
        with self._io_lock:  # no pread (Windows): tifffile's handle, one seek and read at a time
            fh = self._tif.filehandle
            fh.seek(offset)
            return fh.read(count)

    def _read_one(self, xy: np.ndarray, level: int, size: tuple[int, int]) -> np.ndarray:
        page = self._pages[level]
        ds = self.level_downsamples[level]
        w, h = size
        x = int(math.floor(xy[0] / ds))
        y = int(math.floor(xy[1] / ds))
        tw, th = int(page.tilewidth), int(page.tilelength)
        lw, lh = self.level_dimensions[level]
        n_tx = -(-lw // tw)
        out = np.full((h, w, 3), 255, np.uint8)  # outside the image = white background
        for ty in range(max(y, 0) // th, min(y + h, lh) // th + 1):
            if ty * th >= lh:
                break
            for tx in range(max(x, 0) // tw, min(x + w, lw) // tw + 1):
                if tx * tw >= lw:
                    break
                tile = self._tile(level, ty * n_tx + tx)
                # intersection of the patch with this tile, in level coordinates, clipped to the image
                x0, x1 = max(x, tx * tw), min(x + w, (tx + 1) * tw, lw)
                y0, y1 = max(y, ty * th), min(y + h, (ty + 1) * th, lh)
                if x1 <= x0 or y1 <= y0:
                    continue
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - ty * th : y1 - ty * th, x0 - tx * tw : x1 - tx * tw]
        return out

    def tile_size(self, level: int) -> tuple[int, int]:
        page = self._pages[level]
        return int(page.tilewidth), int(page.tilelength)

    def _probe_tiles(self, level: int, tiles: Sequence[tuple[int, int]], num_workers: int) -> bool:
        """imagecodecs decodes a damaged JPEG tile without a word: the raw tiles are decoded again by libjpeg as
        torchvision links it, which reports a corrupt stream (only here, when a slide is tiled)."""
        page = self._pages[level]
        if page.compression != 7:  # not JPEG: the decoder raises on damage
            return super()._probe_tiles(level, tiles, num_workers)
        from monai_icmil.data.integrity import JPEG_PROBLEM, native_output

        streams = self.jpeg_streams(level, tiles)
        return streams is None or _jpeg_streams_complain(streams, JPEG_PROBLEM, native_output)

    def jpeg_streams(self, level: int, tiles: Sequence[tuple[int, int]]) -> list[bytes] | None:
        """The JPEG tiles ``(column, row)`` of ``level`` as whole streams, undecoded (a slide's shared ``JPEGTables``,
        as Aperio writes them, spliced into each), leaving out sparse tiles (not stored: read as glass); ``None`` when
        one is empty or lies beyond the end of the file."""
        page = self._pages[level]
        n_tx = -(-self.level_dimensions[level][0] // int(page.tilewidth))
        tables = page.jpegtables
        streams = []
        for tx, ty in tiles:
            index = ty * n_tx + tx
            offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
            if count == 0 and offset == 0:  # sparse (not stored): read as glass, nothing to check
                continue
            if count == 0 or offset + count > self._file_size:
                return None
            data = self._read_at(offset, count)
            streams.append(bytes(tables[:-2]) + data[2:] if tables else data)
        return streams

    def close(self) -> None:
        tif, self._tif = getattr(self, "_tif", None), None
        if tif is not None:
            tif.close()
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:  # a reader the slide cache let go of (or that failed to open) closes its file
        self.close()


def _jpeg_streams_complain(streams: list[bytes], problem: re.Pattern, capture: Any) -> bool:
    """Whether libjpeg (as torchvision links it) raises or reports a corrupt stream for any of these JPEG streams."""
    import torch
    from torchvision.io import decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notice that its image codecs are deprecated
        try:
            with capture() as lines:
                for data in streams:
                    decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError:
            return True
    return any(problem.search(line) for line in lines)


# --------------------------------------------------------------------------------------------------- plain images


_PIL_LIMIT_LOCK = threading.Lock()


class ImageSlide(_PatchByPatchReader):
    """Plain images (PNG, JPEG, BMP, untiled TIFF) of at most :attr:`max_pixels`, decoded whole into memory once, as
    one level (thumbnails and tissue masks block-average it in chunks, as for any single-level slide).

    ``open_slide``'s ``auto`` uses it for files no whole-slide backend reads (small slides written by other tools,
    e.g. ``tifffile.imwrite`` without tiles, or exported PNGs) and for untiled TIFFs. The mpp comes from the TIFF
    metadata or the image's dpi when it is a plausible sampling (:data:`PLAUSIBLE_MPP`), else from the datalist or
    ``assume_mpp``.
    """

    backend = "image"
    #: largest image read whole (2**26 px, 192 MiB of RGB, e.g. 8192 x 8192): every worker process keeps the slides
    #: it reads open (:func:`get_slide`); larger images must be converted to a tiled pyramid
    max_pixels = 2**26

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._img, self.mpp = self._load()
        self.level_dimensions = ((int(self._img.shape[1]), int(self._img.shape[0])),)
        self._describe_levels()

    def _load(self) -> tuple[np.ndarray, float | None]:
        """The image as ``[H, W, 3]`` uint8 (alpha composited on white) and its mpp, refusing images too large."""
        if self.path.lower().endswith(TIFF_SUFFIXES):
            tifffile = _import_backend("tifffile")
            with tifffile.TiffFile(self.path) as tif:
                page = tif.pages.first
                self._check_size(page.imagewidth, page.imagelength)
                img = page.asarray()
            mpp = _tiff_properties(self.path)["mpp"]
        else:
            Image = _import_backend("image")
            from PIL import ImageOps

            with _PIL_LIMIT_LOCK:  # PIL refuses images over 2 x MAX_IMAGE_PIXELS: ours (checked next) is the limit
                limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    im = Image.open(self.path)  # reads the header only
                finally:
                    Image.MAX_IMAGE_PIXELS = limit
            with im:
                self._check_size(*im.size)
                if im.mode.split(";")[0] in ("1", "L", "LA", "La", "I", "F"):
                    raise SlideError(
                        self.path,
                        f"the image is grayscale (mode {im.mode}): {GRAYSCALE_FIX}",
                    )
                dpi = im.info.get("dpi")
                mpp = _mpp_from_resolution(dpi[0], "INCH") if dpi else None
                turned = ImageOps.exif_transpose(im)  # a photo's EXIF orientation, as image viewers show it
                img = np.asarray(turned.convert("RGBA") if "A" in turned.getbands() else turned.convert("RGB"))
        if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
            raise SlideError(self.path, f"expected an 8-bit RGB image, found shape {img.shape} of {img.dtype}.")
        return on_white(img), mpp

    def _check_size(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise SlideError(
                self.path,
                f"a {width}x{height} image without tiles is too large to read whole (more than {self.max_pixels:,} "
                "px). Convert it to a tiled pyramid, e.g. `vips tiffsave in out.tif --tile --pyramid "
                "--compression jpeg`.",
            )

    def _read_one(self, xy: np.ndarray, level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = int(xy[0]), int(xy[1])
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)  # outside the image = white background
        part = self._img[max(y, 0) : max(y + h, 0), max(x, 0) : max(x + w, 0)]
        out[max(-y, 0) : max(-y, 0) + part.shape[0], max(-x, 0) : max(-x, 0) + part.shape[1]] = part
        return out


# --------------------------------------------------------------------------------------------------- opening

_READERS: dict[str, type[SlideReader]] = {
    "cucim": CuCIMSlide,
    "openslide": OpenSlideSlide,
    "tifffile": TiffSlide,
    "image": ImageSlide,
}


def _check_tiff_structure(path: str) -> bool:
    """Whether a TIFF is tiled (``True`` too for what tifffile cannot parse: the backends report on it); truncated
    files (tile data past the end of the file), which cuCIM may crash on rather than raise for, are rejected with
    the fix."""
    props, size = _tiff_properties(path), os.path.getsize(path)
    end, page = props["data_end"]
    if end > size:
        raise SlideError(
            path,
            f"the file is truncated: TIFF page {page} stores image data up to byte {end:,}, but the file has "
            f"{size:,} bytes. Copy it again (or re-export it) and check its size against the source.",
        )
    return props["tiled"]


def _not_tiled_error(path: str) -> SlideError:
    return SlideError(
        path,
        "the TIFF is not tiled (it stores strips), so patches cannot be read without decoding the whole image. "
        "Convert it to a tiled pyramid, e.g. `vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg`, "
        f"or, if it has at most {ImageSlide.max_pixels:,} px, open it with backend 'auto' or 'image' (read whole).",
    )


def open_slide(
    path: str | os.PathLike, backend: str = "auto", mpp: float | None = None, warn_no_mpp: bool = True
) -> SlideReader:
    """Open a whole-slide image.

    Args:
        path: the slide file (SVS, generic tiled TIFF, and whatever cuCIM/OpenSlide read).
        backend: ``"auto"`` tries cuCIM, then OpenSlide, then our tifffile reader, then :class:`ImageSlide` (plain
            images, read whole; not for tiled TIFFs), taking the first that is installed, opens the file and can
            decode its tiles (our tifffile reader first for a TIFF whose pyramid is kept in SubIFDs, as OME-TIFF's
            is: the others see only its full-resolution level; an untiled TIFF goes to :class:`ImageSlide` alone);
            or name one of ``"cucim"``, ``"openslide"``, ``"tifffile"``, ``"image"``.
        mpp: level-0 microns per pixel to use instead of the file's (a slide without resolution metadata, or one
            whose metadata is wrong); the other levels follow from their downsamples.
        warn_no_mpp: warn when the slide has no mpp (and none is given).

    A TIFF's mpp is its Aperio description's, else its OME metadata's (``PhysicalSizeX``), else its Philips
    description's (``DICOM_PIXEL_SPACING``), else (OpenSlide backend) OpenSlide's own, else its resolution tags' (in
    inches without a ``ResolutionUnit``). A
    TIFF whose Aperio description and resolution tags disagree on mpp by more than 5 % is warned about (the
    description's value is used), and so is one whose pixels are not square (the width is used). Level 0 is a TIFF's
    largest image; a backend that takes a smaller one for it (a label stored first) is passed over.

    Raises:
        FileNotFoundError: the file does not exist.
        SlideError: no backend can open it (the message lists each backend's reason).
        ValueError: ``mpp`` is not a number in :data:`PLAUSIBLE_MPP`.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"slide '{path}' does not exist. Check the datalist entry and the data root.")
    if backend not in ("auto", *_READERS):
        raise ValueError(f"unknown slide backend '{backend}'; choose 'auto' or one of {tuple(_READERS)}.")
    mpp = as_mpp(mpp, f"mpp of slide '{path}'", optional=True)
    names = _backends_for(path, backend, mpp)
    reasons, misread = [], False
    for name in names:
        try:
            _import_backend(name)
        except Exception as e:
            reasons.append(f"{name}: not installed ({type(e).__name__}: {e})")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reader = _READERS[name](path)
        except SlideError:
            raise
        except Exception as e:
            misread |= isinstance(e, Level0Misread)
            reasons.append(f"{name}: {e}" if isinstance(e, Level0Misread) else f"{name}: {type(e).__name__}: {e}")
            continue
        if mpp is not None:
            reader.mpp = float(mpp)
        elif reader.mpp is None and warn_no_mpp:
            unread = _tiff_properties(path).get("tiff_error") if path.lower().endswith(TIFF_SUFFIXES) else None
            why = f" (its TIFF metadata could not be parsed: {unread})" if unread else ""
            warnings.warn(f"slide '{path}' has no microns per pixel in its metadata{why}. {NO_MPP_FIX}", stacklevel=2)
        return reader
    hint = "Open it with backend 'auto' (or 'tifffile'), which finds its largest image. " if misread else ""
    raise SlideError(
        path,
        f"cannot be opened as a whole-slide image ({'; '.join(reasons)}). {hint if backend != 'auto' else ''}If it is "
        "a slide in a format none of these reads (e.g. CZI, iSyntax), convert it to a tiled pyramidal TIFF, e.g. `vips "
        "tiffsave in out.tif --tile --pyramid --compression jpeg` or `bfconvert -pyramid-resolutions 4 -tilex 256 "
        "-tiley 256 in out.ome.tif`.",
    )


def _backends_for(path: str, backend: str, mpp: float | None) -> tuple[str, ...]:
    """The backends :func:`open_slide` tries, in order; for a TIFF, its mpp sources and the way it is read are
    checked (and warned about) first.

    Raises:
        SlideError: a truncated TIFF, or an untiled one for a whole-slide backend named.
    """
    names = tuple(_READERS) if backend == "auto" else (backend,)
    if not path.lower().endswith(TIFF_SUFFIXES):
        return names
    if mpp is None:
        _check_mpp_sources(path)
    if not _check_tiff_structure(path):  # strips: only a small image can be served, read whole
        if backend not in ("auto", "image"):
            raise _not_tiled_error(path)
        names = ("image",)
    elif backend == "auto":  # tiled: the whole-slide backends, ours first where the others misread the file
        props = _tiff_properties(path)
        # a pyramid in SubIFDs or with its levels not marked reduced, JFIF tiles tagged RGB, 16-bit samples
        # of a narrower declared range: the others misread them
        narrow = props["max_sample"] is not None
        ours_first = props["subifd_levels"] or props["jfif_rgb"] or props["unmarked_levels"] or narrow
        names = ("tifffile", "cucim", "openslide") if ours_first else BACKENDS
        if props["orientation"] != 1:  # OpenSlide turns each non-JPEG tile on its own (a mosaic)
            names = tuple(n for n in names if n != "openslide") + ("openslide",)
    names = _colour_backends(path, names)
    _warn_as_read(path)
    return names


def _warn_as_read(path: str) -> None:
    """Warn that a TIFF's Orientation tag is not applied (its pixels, coordinates and heatmaps stay as stored), and
    that the range of its 16-bit samples was measured, not declared."""
    props = _tiff_properties(path)
    if props["range_note"]:
        top = props["max_sample"]
        warnings.warn(
            f"slide '{path}' has 16-bit samples without a MaxSampleValue tag and {props['range_note']}: it is read "
            f"as {top.bit_length()}-bit data (0-{top} onto 0-255). Write MaxSampleValue (tag 281) into the file if "
            "that is wrong.",
            stacklevel=4,  # (the caller of open_slide)
        )
    orientation = props["orientation"]
    if orientation != 1:
        warnings.warn(
            f"slide '{path}' has TIFF Orientation {orientation} (not 1): it is read as stored, not turned, so its "
            "patches, coordinates and heatmaps are in the stored orientation (classification is unaffected). Rotate "
            "it in the file (e.g. `vips autorot`) to see it the right way up.",
            stacklevel=4,  # (the caller of open_slide)
        )


_OPEN_LOCK = threading.Lock()  # reader threads reaching a new slide together open it once


@functools.lru_cache(maxsize=16)
def _cached_slide(path: str, backend: str, mtime_ns: int, size: int, pid: int, mpp: float | None) -> SlideReader:
    # the pipeline opens each slide in every worker process and reads it by level: a missing mpp matters only where
    # a target mpp is tiled, and that fails with the fixes (SlideReader.require_mpp)
    return open_slide(path, backend, mpp, warn_no_mpp=False)


def get_slide(slide: str | os.PathLike | SlideReader, backend: str = "auto", mpp: float | None = None) -> SlideReader:
    """A reader for ``slide``: passes readers through; opens paths once per process and caches them, without
    :func:`open_slide`'s warning about a slide without mpp (tiling at a target mpp fails on it with the fixes).

    The cache key includes the file's size and modification time, so a rewritten slide is reopened, and ``mpp``
    (the level-0 microns per pixel to use instead of the file's, see :func:`open_slide`).
    """
    if not isinstance(slide, (str, os.PathLike, SlideReader)):
        raise TypeError(
            f"expected a slide path or SlideReader, got {type(slide).__name__}: the array transforms each take the "
            "slide itself; to chain them in a Compose use the dictionary transforms (TissueMaskd, GridPatchCoordsd, "
            "ReadPatchesd), which keep the path under their key and add their outputs beside it."
        )
    mpp = as_mpp(mpp, f"mpp of slide '{getattr(slide, 'path', slide)}'", optional=True)
    if isinstance(slide, SlideReader):
        if mpp is not None and slide.mpp != mpp:
            raise ValueError(f"slide '{slide.path}' is open with mpp {slide.mpp}; open it with mpp={mpp} instead.")
        return slide
    path = str(slide)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"slide '{path}' does not exist. Check the datalist entry and the data root.")
    st = os.stat(path)
    with _OPEN_LOCK:
        return _cached_slide(os.path.abspath(path), backend, st.st_mtime_ns, st.st_size, os.getpid(), mpp)


def slide_identity(path: str | os.PathLike) -> dict[str, Any]:
    """The identity of a slide file: absolute path, size and modification time (ns)."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
