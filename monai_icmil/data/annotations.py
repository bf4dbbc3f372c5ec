# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Ground-truth tumour regions of slides, to measure the instance teacher against them (patch AUC).

A datalist entry may carry ``"tumour_mask"``: a mask image (PNG or TIFF, tumour > 127, or 1 in a mask stored as
0/1, at any scale: its downsample is the slide's width over the mask's, and its aspect must be the slide's; as the
synthetic slides' ``masks/*_tumour.png``), polygon annotations in the ASAP XML format of Camelyon16
(``lesion_annotations/tumor_001.xml``; every group is tumour except :data:`EXCLUSION_GROUPS`, such as ``_2``, which
mark non-tumour areas inside them), or GeoJSON as QuPath exports it (``*.geojson`` / ``*.json``,
:func:`read_geojson_polygons`: outlines classified with a tumour word are tumour, ``Ignore*`` ones cut out, other
classes left out), rasterised here at 1/16 of level 0: the tumour outlines' union (holes cut out of each) less the
exclusions'. Outlines mostly outside their slide are warned about.
"""

from __future__ import annotations

import json
import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GroundTruth", "patch_tumour_fraction", "read_geojson_polygons", "read_mask_image", "read_xml_polygons"]

#: annotation groups / classes that mark non-tumour areas inside tumour ones (Camelyon16 uses ``_2``, QuPath
#: ``Ignore*``), compared in lower case, in ASAP XML and GeoJSON alike
EXCLUSION_GROUPS = ("_2", "exclusion", "exclude", "none", "ignore", "ignore*")

#: Camelyon16's tumour groups, as classes of its annotations converted to GeoJSON
CAMELYON_TUMOUR_GROUPS = ("_0", "_1")

#: QuPath object types that are not outlines drawn by a person (``objectType`` or ``object_type``; in QuPath 0.2's
#: export the ``id``), compared in lower case: skipped. Any other type is an outline (DSA writes ``"polyline"``)
NOT_OUTLINE_TYPES = (
    "detection", "cell", "tile", "tmacore", "tma_core", "root",
    "pathdetectionobject", "pathcellobject", "pathtileobject", "tmacoreobject", "pathrootobject",
)  # fmt: skip

#: GeoJSON class names that mean no class (a converter's ``str(None)``, QuPath's "Unclassified")
NO_CLASS = ("none", "null", "unclassified")

#: a coordinate beyond this (level-0 pixels) is no slide's: the file is refused
MAX_COORDINATE = 1e8

#: polygons of one outline: its exterior ring, then its holes (``[K, 2]`` level-0 x, y each)
Rings = list[np.ndarray]


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
    """The features of a GeoJSON document (a FeatureCollection, a list of features as QuPath 0.2 exports them, one
    feature, or geometries), each a dict with a ``geometry``."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        items = data.get("features") if isinstance(data.get("features"), list) else None
    else:
        items = data if isinstance(data, list) else [data] if isinstance(data, dict) else None
    features = [
        item if item.get("type") == "Feature" else {"geometry": item}
        for item in items or []
        if isinstance(item, dict) and (item.get("type") == "Feature" or "coordinates" in item or "geometries" in item)
    ]
    if items is None or (items and not features):
        raise ValueError(
            f"annotation '{path}' is JSON but not GeoJSON (a FeatureCollection, a list of features, a Feature or a "
            "geometry): export QuPath's annotations as GeoJSON, convert other tools' (DSA/Girder, Cytomine) to GeoJSON "
            "in level-0 pixels, or give an ASAP XML file or a mask image"
        )
    return features


def _geometry_rings(geometry: object, where: str) -> tuple[list[Rings], int]:
    """``([[exterior, *holes]], how many parts without area)`` of a GeoJSON geometry: its polygons, and its points,
    lines and polygons whose exterior has under 3 points counted (a hole of under 3 points is dropped).

    Raises:
        ValueError: coordinates that are not ``[x, y]`` pairs of level-0 pixels (names ``where``).
    """
    if not isinstance(geometry, dict):
        return [], 1
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        parts = [_geometry_rings(g, where) for g in geometry.get("geometries") or []]
        return [rings for found, _ in parts for rings in found], sum(n for _, n in parts)
    coordinates = geometry.get("coordinates")
    polygons = {"Polygon": [coordinates], "MultiPolygon": coordinates}.get(kind)
    if polygons is None:
        return [], 1
    out, flat = [], 0
    for polygon in polygons if isinstance(polygons, list) else [polygons]:
        try:
            rings = [np.asarray(ring, dtype=np.float64) for ring in polygon or []]
            if not all(r.ndim == 2 and r.shape[1] >= 2 for r in rings):
                raise ValueError
            rings = [r[:, :2] for r in rings]
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: a {kind}'s coordinates are not rings of [x, y] pairs of numbers; re-export the annotations "
                "as GeoJSON"
            ) from None
        if not all(np.isfinite(r).all() and np.abs(r).max(initial=0) <= MAX_COORDINATE for r in rings):
            raise ValueError(
                f"{where}: a {kind} coordinate is not a number of level-0 pixels (not finite, or beyond "
                f"{MAX_COORDINATE:.0e}); re-export the annotations in level-0 pixel coordinates"
            )
        if rings and len(rings[0]) >= 3:
            out.append([rings[0]] + [r for r in rings[1:] if len(r) >= 3])
        else:
            flat += 1
    return out, flat


def _class_of(feature: dict, props: dict) -> str:
    """A feature's class: QuPath's classification (``{"name"}``; a derived class as ``{"names": [...]}`` (0.4+) or
    ``{"name", "parentClass"}`` (0.2-0.3), joined ``"Tumor: Positive"``), else its ``name``, DSA's ``label.value`` or
    ``group`` where that names tumour, an exclusion or a tissue that is not tumour; else ``""``."""
    from monai_icmil.data.datalist import is_not_tumour_class  # (datalist imports torch)

    cls = props.get("classification")
    parts: list = []
    if isinstance(cls, dict) and isinstance(cls.get("names"), list):
        parts = list(cls["names"])
    else:
        while isinstance(cls, (dict, str)) and len(parts) < 16:  # a class, then its parents (a string names the last)
            parts.insert(0, cls if isinstance(cls, str) else cls.get("name"))
            cls = cls.get("parentClass") if isinstance(cls, dict) else None
    named = ": ".join(n.strip() for n in parts if isinstance(n, str) and n.strip())
    if named:
        return "" if named.lower() in NO_CLASS else named
    label = props.get("label")
    for name in (props.get("name"), label.get("value") if isinstance(label, dict) else None, props.get("group")):
        if isinstance(name, str) and name.strip() and name.strip().lower() not in NO_CLASS:
            if _category(name) != "other" or is_not_tumour_class(name):
                return name.strip()
    return ""


def _category(name: str) -> str:
    """``"exclusion"``, ``"tumour"``, ``"unclassified"`` (no class) or ``"other"`` for an outline's class."""
    from monai_icmil.data.datalist import is_tumour_class

    if not name:
        return "unclassified"
    if name.lower() in EXCLUSION_GROUPS:
        return "exclusion"
    return "tumour" if name in CAMELYON_TUMOUR_GROUPS or is_tumour_class(name) else "other"


def _describe(i: int, feature: dict, props: dict) -> str:
    """How a user finds a feature: its place, id, name and class."""
    bits = [f"feature {i}"]
    bits += [f"id {feature['id']}"] if isinstance(feature.get("id"), (str, int)) else []
    bits += [f"name {props['name']!r}"] if isinstance(props.get("name"), str) else []
    return " ".join(bits)


def read_geojson_polygons(path: str | os.PathLike, expect_tumour: bool = True) -> list[tuple[str, Rings]]:
    """``[(group, [exterior, *holes])]`` of the tumour and exclusion outlines of a GeoJSON annotation file (level-0
    pixel coordinates, as QuPath exports them); group is the outline's class, ``"tumour"`` for an unclassified one.

    Outlines classified as tumour (:func:`~monai_icmil.data.datalist.is_tumour_class`, or Camelyon16's ``_0`` and
    ``_1``) are tumour, those of :data:`EXCLUSION_GROUPS` are cut out, other classes are left out; unclassified
    outlines are tumour where no outline of the file is classified as tumour. Objects that are not outlines
    (:data:`NOT_OUTLINE_TYPES`: QuPath's detections, cells, tiles, TMA cores) and points and lines are skipped.
    Warned about, naming the file: no tumour outline where ``expect_tumour`` (the slide reads as tumour-free);
    unclassified outlines taken as tumour that enclose outlines of other classes (tissue outlines, likely), or left
    out beside tumour ones while no larger than them (tumour outlines left unclassified, likely).

    Args:
        path: the GeoJSON file.
        expect_tumour: whether its slide should have tumour (``False`` for a slide of class 0: no warning then).

    Raises:
        ValueError: the file is not JSON or not GeoJSON, or a coordinate is not a number of level-0 pixels (names the
            file, the feature and the fix).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"annotation '{path}' is not readable JSON ({e}): export it from QuPath as GeoJSON") from e
    outlines, skipped = [], {"not outlines": 0, "without area": 0}
    for i, feature in enumerate(_geojson_features(data, path)):
        props = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
        kind = props.get("objectType") or props.get("object_type") or props.get("type")
        if not kind and isinstance(feature.get("id"), str) and feature["id"].lower().endswith("object"):
            kind = feature["id"]  # QuPath 0.2: "PathAnnotationObject", "PathDetectionObject", ...
        if str(kind or "annotation").lower() in NOT_OUTLINE_TYPES:
            skipped["not outlines"] += 1
            continue
        found, flat = _geometry_rings(feature.get("geometry"), f"annotation '{path}', {_describe(i, feature, props)}")
        skipped["without area"] += flat
        outlines += [(_class_of(feature, props), rings) for rings in found]
    categories = [_category(name) for name, _ in outlines]
    classified_tumour = "tumour" in categories
    kept = [
        (name or "tumour", rings)
        for (name, rings), c in zip(outlines, categories)
        if c in ("tumour", "exclusion") or (c == "unclassified" and not classified_tumour)
    ]
    _warn_outlines(path, outlines, categories, skipped, expect_tumour)
    return kept


def _box(rings: np.ndarray | Rings) -> np.ndarray:
    """An outline's bounding box ``[x0, y0, x1, y1]`` (its exterior ring's)."""
    ring = rings if isinstance(rings, np.ndarray) else rings[0]
    return np.concatenate([ring.min(0), ring.max(0)])


def _box_area(box: np.ndarray) -> float:
    """A bounding box's area (at least 1 x 1)."""
    return float(np.prod(np.maximum(box[2:] - box[:2], 1.0)))


def _warn_outlines(
    path: str | os.PathLike, outlines: list, categories: list[str], skipped: dict[str, int], expect_tumour: bool
) -> None:
    """Warn where a GeoJSON file's outlines may not mean what :func:`read_geojson_polygons` takes them for."""
    others = sorted({name for (name, _), c in zip(outlines, categories) if c == "other"})
    boxes = {c: [_box(r) for (_, r), k in zip(outlines, categories) if k == c] for c in ("tumour", "unclassified")}
    other_boxes = [_box(r) for (_, r), k in zip(outlines, categories) if k == "other"]
    area = [_box_area(b) for b in boxes["tumour"]]
    skips = ", ".join(f"{n} {what}" for what, n in skipped.items() if n)
    if "tumour" not in categories and "unclassified" not in categories:
        if not expect_tumour:
            return
        warnings.warn(
            f"annotation '{path}': none of its {len(outlines)} outlines is tumour (classes: {', '.join(others) or '-'}"
            f"{'; skipped: ' + skips if skips else ''}), so its slide reads as tumour-free; classify the tumour "
            "outlines with a tumour word (e.g. 'Tumor') or leave them unclassified",
            stacklevel=3,
        )
    elif area:  # unclassified outlines no larger than the largest tumour one: tumour left unclassified, likely
        small = sum(_box_area(b) <= max(area) for b in boxes["unclassified"])
        if small:
            warnings.warn(
                f"annotation '{path}': {small} unclassified outline(s), no larger than its tumour outlines, left out "
                "beside outlines classified as tumour; classify them if they are tumour",
                stacklevel=3,
            )
    else:  # unclassified outlines taken as tumour that enclose outlines of other classes: tissue outlines, likely
        enclosing = sum(
            any((u[:2] <= o[:2]).all() and (o[2:] <= u[2:]).all() for o in other_boxes) for u in boxes["unclassified"]
        )
        if enclosing:
            warnings.warn(
                f"annotation '{path}': {enclosing} unclassified outline(s) taken as tumour enclose outlines of other "
                f"classes ({', '.join(others)}); if they outline tissue rather than tumour, classify the tumour ones "
                "(e.g. 'Tumor')",
                stacklevel=3,
            )


class GroundTruth:
    """A slide's ground-truth tumour mask at low resolution.

    Args:
        path: a mask image, an ASAP XML annotation file or a GeoJSON one (:func:`read_geojson_polygons`; ``None``:
            a slide without tumour).
        dimensions: the slide's level-0 ``(width, height)``.
        xml_downsample: the scale XML and GeoJSON polygons are rasterised at.
        label: the slide's class, where known: a GeoJSON file without tumour outlines is warned about unless it is 0.

    Attributes:
        mask: boolean ``[h, w]``; ``downsample``: level-0 pixels per mask pixel.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        dimensions: tuple[int, int],
        xml_downsample: float = 16.0,
        label: Any = None,
    ):
        width, height = int(dimensions[0]), int(dimensions[1])
        if path is None:
            self.downsample = float(xml_downsample)
            self.mask = np.zeros(
                (max(1, round(height / self.downsample)), max(1, round(width / self.downsample))), bool
            )
        elif Path(path).suffix.lower() in (".xml", ".geojson", ".json"):
            self.downsample = float(xml_downsample)
            if Path(path).suffix.lower() == ".xml":
                polygons = read_xml_polygons(path)
            else:
                polygons = read_geojson_polygons(path, expect_tumour=label != 0)
            _warn_geometry(path, polygons, width, height, self.downsample)
            self.mask = _rasterise(polygons, width, height, self.downsample)
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


def _warn_geometry(
    path: str | os.PathLike, polygons: list[tuple[str, np.ndarray | Rings]], width: int, height: int, downsample: float
) -> None:
    """Warn where outlines lie mostly outside the slide (other coordinates than level-0 pixels: another level's,
    (y, x) order, y pointing up), or where most tumour outlines are under two mask pixels across (cell nuclei from a
    segmentation converted to GeoJSON, likely: not regions a mask can be drawn from)."""
    outside, tiny, tumour = 0, 0, 0
    for group, rings in polygons:
        box = _box(rings)
        x0, y0, x1, y1 = box
        inside = max(min(x1, width) - max(x0, 0), 0) * max(min(y1, height) - max(y0, 0), 0)
        outside += inside < 0.5 * _box_area(box)
        if group.lower() not in EXCLUSION_GROUPS:
            tumour += 1
            tiny += max(x1 - x0, y1 - y0) < 2 * downsample
    if outside:
        warnings.warn(
            f"annotation '{path}': {outside} of its {len(polygons)} outlines lie mostly outside the slide "
            f"({width} x {height}): the coordinates must be level-0 pixels, x then y, y pointing down",
            stacklevel=3,
        )
    if tiny >= 20 and tiny > tumour / 2:
        warnings.warn(
            f"annotation '{path}': {tiny} of its {tumour} tumour outlines are under {2 * downsample:.0f} level-0 "
            "pixels across (cell nuclei?): ground truth needs region outlines (QuPath annotations, not detections); "
            "a nucleus segmentation's classes are not a tumour mask",
            stacklevel=3,
        )


def _rasterise(
    polygons: list[tuple[str, np.ndarray | Rings]], width: int, height: int, downsample: float
) -> np.ndarray:
    """The union of the tumour polygons (each its exterior less its holes, its rings after the first) less the union
    of the exclusion polygons (likewise; an exclusion's holes are not tumour again), at ``1 / downsample`` of level
    0. Outlines without holes (every ASAP one) are drawn straight onto the canvas, those with holes each on a canvas
    of its own bounding box (so that its holes cut no other outline)."""
    from PIL import Image, ImageDraw

    size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    canvases = {True: Image.new("L", size, 0), False: Image.new("L", size, 0)}  # excluded, tumour
    draws = {k: ImageDraw.Draw(c) for k, c in canvases.items()}
    holed = []
    for group, rings in polygons:
        rings = [rings] if isinstance(rings, np.ndarray) else rings
        excluded = group.lower() in EXCLUSION_GROUPS
        if len(rings) == 1:
            draws[excluded].polygon([tuple(p) for p in (rings[0] / downsample).tolist()], fill=255)
        else:
            holed.append((excluded, [r / downsample for r in rings]))
    masks = {k: np.asarray(c) > 127 for k, c in canvases.items()}
    for excluded, rings in holed:
        _fill(masks[excluded], rings)
    return masks[False] & ~masks[True]


def _fill(canvas: np.ndarray, rings: Rings) -> None:
    """Set ``canvas`` (boolean, in place) inside the exterior ring and outside the holes, drawn on a canvas of the
    exterior's bounding box (so that one polygon's holes never cut another's area)."""
    from PIL import Image, ImageDraw

    x0, y0 = np.maximum(np.floor(rings[0].min(0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(rings[0].max(0)).astype(int) + 2, canvas.shape[::-1])
    if x1 <= x0 or y1 <= y0:
        return
    box = Image.new("L", (int(x1 - x0), int(y1 - y0)), 0)
    draw = ImageDraw.Draw(box)
    for k, ring in enumerate(rings):
        draw.polygon([tuple(p) for p in (ring - (x0, y0)).tolist()], fill=0 if k else 255)
    canvas[y0:y1, x0:x1] |= np.asarray(box) > 127
