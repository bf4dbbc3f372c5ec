# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Ground-truth tumour regions of slides, to measure the instance teacher against them (patch AUC).

A datalist entry may carry ``"tumour_mask"``: a mask image (PNG or TIFF, tumour > 127, or 1 in a mask stored as
0/1, at any scale: its downsample is the slide's width over the mask's, and its aspect must be the slide's; as the
synthetic slides' ``masks/*_tumour.png``) or polygon annotations in the ASAP XML format of Camelyon16
(``lesion_annotations/tumor_001.xml``; groups ``_0`` and ``_1`` are tumour, ``_2`` marks non-tumour areas inside
them), rasterised here at 1/16 of level 0.
"""

from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

__all__ = ["GroundTruth", "patch_tumour_fraction", "read_mask_image", "read_xml_polygons"]

#: ASAP annotation groups that mark non-tumour areas (Camelyon16 uses ``_2``)
EXCLUSION_GROUPS = ("_2", "exclusion", "none")


def patch_tumour_fraction(
    coords: np.ndarray, footprint: float, mask: str | os.PathLike | np.ndarray, downsample: float
) -> np.ndarray:
    """Fraction of each patch (level-0 top-left ``coords``, side ``footprint``) covered by a tumour mask that is
    ``downsample`` times smaller than level 0 (a boolean array, or an image file: :func:`read_mask_image`)."""
    if not isinstance(mask, np.ndarray):
        mask = read_mask_image(mask)
    integral = np.pad(mask.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x0 = np.clip(np.floor(coords[:, 0] / downsample).astype(int), 0, mask.shape[1])
    y0 = np.clip(np.floor(coords[:, 1] / downsample).astype(int), 0, mask.shape[0])
    x1 = np.clip(np.ceil((coords[:, 0] + footprint) / downsample).astype(int), 0, mask.shape[1])
    y1 = np.clip(np.ceil((coords[:, 1] + footprint) / downsample).astype(int), 0, mask.shape[0])
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area


def read_xml_polygons(path: str | os.PathLike) -> list[tuple[str, np.ndarray]]:
    """``[(group, [K, 2] level-0 x, y)]`` of every polygon of an ASAP XML annotation file.

    Raises:
        ValueError: the file is not ASAP XML, or a coordinate is not a number (names it).
    """
    try:
        root = ET.parse(str(path)).getroot()
    except ET.ParseError as e:
        raise ValueError(f"annotation '{path}' is not readable XML ({e})") from e

    def number(value: str, ann: ET.Element) -> float:  # a decimal comma (ASAP in some locales) reads as a point
        try:
            return float(value.replace(",", "."))
        except ValueError:
            raise ValueError(
                f"annotation '{path}': a coordinate of annotation '{ann.get('Name', '?')}' is not a number "
                f"({value!r}); X, Y and Order must be numbers"
            ) from None

    polygons = []
    for ann in root.iter("Annotation"):
        group = (ann.get("PartOfGroup") or ann.get("Name") or "").strip()
        points = [
            tuple(number(c.get(k, default), ann) for k, default in (("X", "nan"), ("Y", "nan"), ("Order", "0")))
            for c in ann.iter("Coordinate")
        ]
        if len(points) >= 3:
            pts = np.array(sorted(points, key=lambda p: p[2]))[:, :2]
            polygons.append((group, pts))
    if root.tag != "ASAP_Annotations" and not polygons:
        raise ValueError(f"annotation '{path}' holds no ASAP polygons (<Annotation><Coordinates><Coordinate X Y>)")
    return polygons


class GroundTruth:
    """A slide's ground-truth tumour mask at low resolution.

    Args:
        path: a mask image or an ASAP XML annotation file (``None``: a slide without tumour).
        dimensions: the slide's level-0 ``(width, height)``.
        xml_downsample: the scale XML polygons are rasterised at.

    Attributes:
        mask: boolean ``[h, w]``; ``downsample``: level-0 pixels per mask pixel.
    """

    def __init__(self, path: str | os.PathLike | None, dimensions: tuple[int, int], xml_downsample: float = 16.0):
        width, height = int(dimensions[0]), int(dimensions[1])
        if path is None:
            self.downsample = float(xml_downsample)
            self.mask = np.zeros(
                (max(1, round(height / self.downsample)), max(1, round(width / self.downsample))), bool
            )
        elif Path(path).suffix.lower() == ".xml":
            self.downsample = float(xml_downsample)
            self.mask = _rasterise(read_xml_polygons(path), width, height, self.downsample)
        else:
            self.mask = read_mask_image(path)
            self.downsample = width / self.mask.shape[1]
            mask_height = self.mask.shape[0] * self.downsample
            if abs(mask_height - height) > max(0.02 * height, 2 * self.downsample):
                warnings.warn(
                    f"tumour mask '{path}' ({self.mask.shape[1]} x {self.mask.shape[0]}) does not have its slide's "
                    f"aspect ({width} x {height}): it is scaled by the width, so rows land {mask_height:.0f} px "
                    "tall instead; make the mask from the whole slide at one scale.",
                    stacklevel=2,
                )

    def patch_fraction(self, coords: np.ndarray, footprint: float) -> np.ndarray:
        """The tumour fraction of each patch."""
        return patch_tumour_fraction(coords, footprint, self.mask, self.downsample)


def read_mask_image(path: str | os.PathLike) -> np.ndarray:
    """A mask image as tumour (``True``) / not, read as grey (palette and colour masks by their colours): above 127
    where the mask reaches that (0/255 masks), else above 0 (label maps stored as 0/1, dark palettes).

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
        ValueError: the file is not an image PIL can read, or too large for one (names it and the fix).
    """
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"tumour mask '{path}' does not exist: fix the datalist's tumour_mask or remove it")
    try:
        with Image.open(path) as im:  # 16/32-bit integer masks as they are; any other mode (palette, colour) as grey
            values = np.asarray(im if im.mode.startswith("I") else im.convert("L"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(
            f"tumour mask '{path}' cannot be read as a mask image ({type(e).__name__}: {e}): give a low-resolution "
            "mask of the whole slide (e.g. 1/16 or 1/32 of level 0, PNG or TIFF) or an ASAP XML annotation"
        ) from e
    return values > 127 if values.max(initial=0) > 127 else values > 0


def _rasterise(polygons: list[tuple[str, np.ndarray]], width: int, height: int, downsample: float) -> np.ndarray:
    """Tumour polygons filled, exclusion polygons cut out, at ``1 / downsample`` of level 0."""
    from PIL import Image, ImageDraw

    size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    ordered = sorted(polygons, key=lambda gp: gp[0].lower() in EXCLUSION_GROUPS)  # tumour first, then holes
    for group, pts in ordered:
        fill = 0 if group.lower() in EXCLUSION_GROUPS else 255
        draw.polygon([tuple(p) for p in (pts / downsample).tolist()], fill=fill)
    return np.asarray(canvas) > 127
