# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Ground-truth tumour regions of slides, to measure the instance teacher against them (patch AUC).

A datalist entry may carry ``"tumour_mask"``: a mask image (PNG or TIFF, tumour > 127, or 1 in a mask stored as
0/1, at any scale: its downsample is the slide's width over the mask's, and its aspect must be the slide's; as the
synthetic slides' ``masks/*_tumour.png``) or polygon annotations in the ASAP XML format of Camelyon16
(``lesion_annotations/tumor_001.xml``; groups ``_0`` and ``_1`` are tumour, ``_2`` marks non-tumour areas inside
them) or in GeoJSON as QuPath exports it (``*.geojson`` / ``*.json``: the annotation objects' polygons, holes
included; classified as a tumour word such as ``Tumor`` or ``Metastasis``: tumour, as ``Ignore*``: cut out; other
classes left out; unclassified outlines are tumour where no outline of the file is classified as tumour; QuPath's
detections and cells are not outlines and are skipped), rasterised here at 1/16 of level 0.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

__all__ = [
    "GroundTruth",
    "is_tumour_class",
    "patch_tumour_fraction",
    "read_geojson_polygons",
    "read_mask_image",
    "read_xml_polygons",
]

#: annotation groups / classes that mark non-tumour areas inside tumour ones (Camelyon16 uses ``_2``, QuPath
#: ``Ignore*``), compared in lower case
EXCLUSION_GROUPS = ("_2", "exclusion", "exclude", "none", "ignore", "ignore*")

#: a tumour word in a class name (``Tumor``, ``Metastasis``, ``Adenocarcinoma``, ``Malignant``, ...)
_TUMOUR_CLASS = re.compile(r"tumou?r|cancer|malignan|metasta|carcinoma|neoplas|lesion")

#: QuPath objects that are not outlines drawn by a person (``objectType``, or ``id`` in QuPath 0.2's export)
_NOT_OUTLINES = ("detection", "cell", "tile", "pathdetectionobject", "pathcellobject", "pathtileobject")

#: polygons of one outline: its exterior ring, then its holes (``[K, 2]`` level-0 x, y each)
Rings = list[np.ndarray]


def is_tumour_class(name: str) -> bool:
    """Whether an annotation class names tumour: a tumour word (``Tumor``, ``Metastases``, ``Adenocarcinoma``,
    ``Malignant``, ``Lesion``) that is not negated (``Non-tumour`` and ``Tumour-free`` are not)."""
    from monai_icmil.data.datalist import is_negative_label

    return bool(_TUMOUR_CLASS.search(name.strip().lower())) and not is_negative_label(name)


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


def _geojson_features(data: object, path: str | os.PathLike) -> list[dict]:
    """The features of a GeoJSON document: a FeatureCollection, a list of features (QuPath's older export), one
    feature or one bare geometry."""
    if isinstance(data, list):
        return [f for f in data if isinstance(f, dict)]
    if isinstance(data, dict):
        if data.get("type") == "FeatureCollection" and isinstance(data.get("features"), list):
            return [f for f in data["features"] if isinstance(f, dict)]
        if data.get("type") == "Feature":
            return [data]
        if "coordinates" in data or data.get("type") == "GeometryCollection":
            return [{"geometry": data}]
    raise ValueError(
        f"annotation '{path}' is JSON but not GeoJSON (a FeatureCollection, a list of features, a Feature or a "
        "geometry): export the annotations from QuPath as GeoJSON, or give an ASAP XML file or a mask image"
    )


def _geometry_rings(geometry: object, where: str) -> list[Rings]:
    """``[[exterior, *holes]]`` of a GeoJSON geometry's polygons (points and lines have no area: none)."""
    if not isinstance(geometry, dict):
        return []
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        return [rings for g in geometry.get("geometries") or [] for rings in _geometry_rings(g, where)]
    polygons = {"Polygon": [geometry.get("coordinates")], "MultiPolygon": geometry.get("coordinates")}.get(kind)
    out = []
    for polygon in polygons or []:
        try:
            rings = [np.asarray(ring, dtype=np.float64)[:, :2] for ring in polygon]
        except (TypeError, ValueError, IndexError):
            raise ValueError(
                f"{where}: a {kind} coordinate is not an [x, y] pair of numbers; re-export the annotations as GeoJSON"
            ) from None
        if rings and not all(np.isfinite(r).all() for r in rings):
            raise ValueError(f"{where}: a {kind} coordinate is not a finite number; re-export the annotations")
        rings = [r for r in rings if len(r) >= 3]
        if rings:
            out.append(rings)
    return out


def _class_name(feature: dict) -> str:
    """A QuPath feature's classification name (``{"name": ...}``, or a plain string), else ``""``."""
    cls = (feature.get("properties") or {}).get("classification")
    name = cls.get("name") if isinstance(cls, dict) else cls
    return name.strip() if isinstance(name, str) else ""


def read_geojson_polygons(path: str | os.PathLike) -> list[tuple[str, Rings]]:
    """``[(group, [exterior, *holes])]`` of the tumour and exclusion outlines of a GeoJSON annotation file (level-0
    pixel coordinates, as QuPath exports them); group is the outline's class, ``"tumour"`` for an unclassified one.

    Outlines classified as tumour (:func:`is_tumour_class`) are tumour, those in :data:`EXCLUSION_GROUPS` are cut
    out, other classes are left out; unclassified outlines are tumour where no outline of the file is classified as
    tumour. Objects that are not outlines (QuPath's detections, cells, tiles) are skipped. A file with outlines but
    none of them tumour is warned about (its slide then reads as tumour-free).

    Raises:
        ValueError: the file is not JSON or not GeoJSON, or a coordinate is not a number (names the file, the feature
            and the fix).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"annotation '{path}' is not readable JSON ({e}): export it from QuPath as GeoJSON") from e
    outlines = []
    for i, feature in enumerate(_geojson_features(data, path)):
        props = feature.get("properties") or {}
        kind = str(props.get("objectType") or feature.get("id") or "annotation").lower()
        if kind in _NOT_OUTLINES:
            continue
        name = _class_name(feature)
        outlines += [(name, rings) for rings in _geometry_rings(feature.get("geometry"), f"annotation '{path}' [{i}]")]
    classes = sorted({name for name, _ in outlines if name})
    classified_tumour = any(is_tumour_class(name) for name in classes)
    kept = []
    for name, rings in outlines:
        if name.lower() in EXCLUSION_GROUPS:
            kept.append((name, rings))
        elif is_tumour_class(name) or (not name and not classified_tumour):
            kept.append((name or "tumour", rings))
    if outlines and not any(name.lower() not in EXCLUSION_GROUPS for name, _ in kept):
        warnings.warn(
            f"annotation '{path}': none of its {len(outlines)} outlines is tumour (classes: {', '.join(classes)}), "
            "so its slide reads as tumour-free; classify the tumour outlines with a tumour word (e.g. 'Tumor') or "
            "leave them unclassified",
            stacklevel=2,
        )
    return kept


class GroundTruth:
    """A slide's ground-truth tumour mask at low resolution.

    Args:
        path: a mask image, an ASAP XML annotation file or a GeoJSON one (:func:`read_geojson_polygons`; ``None``:
            a slide without tumour).
        dimensions: the slide's level-0 ``(width, height)``.
        xml_downsample: the scale XML and GeoJSON polygons are rasterised at.

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
        elif Path(path).suffix.lower() in (".xml", ".geojson", ".json"):
            read = read_xml_polygons if Path(path).suffix.lower() == ".xml" else read_geojson_polygons
            self.downsample = float(xml_downsample)
            self.mask = _rasterise(read(path), width, height, self.downsample)
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
            "mask of the whole slide (e.g. 1/16 or 1/32 of level 0, PNG or TIFF), an ASAP XML or a GeoJSON annotation"
        ) from e
    return values > 127 if values.max(initial=0) > 127 else values > 0


def _rasterise(
    polygons: list[tuple[str, np.ndarray | Rings]], width: int, height: int, downsample: float
) -> np.ndarray:
    """Tumour polygons filled (each polygon's holes, its rings after the first, cut out of it as it is drawn),
    exclusion polygons cut out after all of them, at ``1 / downsample`` of level 0."""
    from PIL import Image, ImageDraw

    size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    ordered = sorted(polygons, key=lambda gp: gp[0].lower() in EXCLUSION_GROUPS)  # tumour first, then holes
    for group, rings in ordered:
        fill = 0 if group.lower() in EXCLUSION_GROUPS else 255
        for k, pts in enumerate([rings] if isinstance(rings, np.ndarray) else rings):
            draw.polygon([tuple(p) for p in (pts / downsample).tolist()], fill=fill if k == 0 else 0)
    return np.asarray(canvas) > 127
