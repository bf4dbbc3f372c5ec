# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""A datalist for the official Camelyon16 folder layout.

Expected under the data root (the layout of the challenge's release)::

    training/tumor/tumor_001.tif ...    label 1
    training/normal/normal_001.tif ...  label 0
    testing/images/test_001.tif ...     labels from testing/reference.csv ("test_001,Tumor,..." / "test_002,Normal")

Slides found elsewhere under the root are placed by their name (``tumor_*``, ``normal_*``, ``test_*``). A stratified,
seeded part of the training slides becomes the validation split (the challenge has none). A slide's lesion annotation
(``training/lesion_annotations/tumor_001.xml``, ``testing/lesion_annotations/test_001.xml``, or ``<name>.xml``
anywhere under the root; else ``<name>.geojson``, as converted or redrawn in QuPath) becomes its ``tumour_mask``, so
the workflow measures each round's instance teacher against the pathologists' outlines
(:mod:`monai_icmil.data.annotations`).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from monai_icmil.utils import atomic_write_json

__all__ = ["build_camelyon16_datalist"]

_NAME = re.compile(r"^(tumor|normal|test)_(\d+)$", re.IGNORECASE)


def _reference_labels(root: Path) -> dict[str, int]:
    candidates = [root / "testing" / "reference.csv", root / "reference.csv", *root.rglob("reference.csv")]
    ref = next((p for p in candidates if p.is_file()), None)
    if ref is None:
        return {}
    labels = {}
    with open(ref, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) < 2 or not row[0].strip():
                continue
            name, cls = Path(row[0].strip()).stem.lower(), row[1].strip().lower()
            if cls in ("tumor", "tumour"):
                labels[name] = 1
            elif cls == "normal":
                labels[name] = 0
    return labels


def build_camelyon16_datalist(
    root: str | os.PathLike,
    output: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    suffixes: tuple[str, ...] = (".tif", ".tiff"),
) -> Path:
    """Write ``datalist.json`` (paths relative to ``root``) for a Camelyon16 tree.

    Args:
        root: the Camelyon16 data root.
        output: the datalist file (default ``root/datalist.json``).
        val_fraction: fraction of each training class held out as validation.
        seed: seed of that split.
        suffixes: slide file suffixes.

    Raises:
        FileNotFoundError: no Camelyon16 slide under ``root``.
        ValueError: test slides missing from ``reference.csv`` (listed).
    """
    root = Path(root)
    found: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in suffixes and _NAME.match(p.stem):
            found.setdefault(p.stem.lower(), p)
    if not found:
        raise FileNotFoundError(f"no Camelyon16 slides (tumor_*, normal_*, test_* {suffixes}) under '{root}'")
    refs = _reference_labels(root)
    xmls = {  # the XML where both an XML and a GeoJSON outline a slide
        p.stem.lower(): p
        for suffix in ("*.geojson", "*.xml")
        for p in sorted(root.rglob(suffix))
        if _NAME.match(p.stem)
    }
    training: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    unlabelled = []
    for name, path in sorted(found.items()):
        kind = _NAME.match(name).group(1).lower()
        entry = {"image": path.relative_to(root).as_posix(), "slide_id": name}
        if name in xmls:
            entry["tumour_mask"] = xmls[name].relative_to(root).as_posix()
        if kind == "test":
            if name not in refs:
                unlabelled.append(name)
                continue
            test.append({**entry, "label": refs[name]})
        else:
            training.append({**entry, "label": int(kind == "tumor")})
    if unlabelled and refs:
        raise ValueError(f"test slides without a label in reference.csv: {', '.join(unlabelled)}")
    if unlabelled:  # no reference.csv at all: keep the test slides, unlabelled (inference only)
        test += [{"image": found[n].relative_to(root).as_posix(), "slide_id": n, "label": None} for n in unlabelled]
    rng = np.random.default_rng(seed)
    val_ids: set[str] = set()
    for label in (0, 1):
        ids = [e["slide_id"] for e in training if e["label"] == label]
        k = int(round(len(ids) * val_fraction)) if len(ids) > 1 else 0
        val_ids.update(rng.choice(ids, k, replace=False).tolist() if k else [])
    datalist = {
        "training": [e for e in training if e["slide_id"] not in val_ids],
        "validation": [e for e in training if e["slide_id"] in val_ids],
        "test": test,
        "camelyon16": {"val_fraction": val_fraction, "seed": seed},
    }
    out = Path(output) if output is not None else root / "datalist.json"
    atomic_write_json(out, datalist)
    return out
