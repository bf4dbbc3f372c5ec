# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Shared fixtures: the real Aperio test slide and small synthetic slides made here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import monai_icmil  # noqa: F401  (quiet cuCIM import before MONAI imports it)
from monai_icmil.data.synthetic import SyntheticSlideConfig, make_dataset, render_slide, write_slide

ROOT = Path(__file__).resolve().parents[1]
CMU_SLIDE = Path(os.environ.get("ICMIL_CMU_SLIDE", ROOT.parent / "shared" / "data" / "CMU-1-Small-Region.svs"))

# small slides: fast to render and tile on 2 cores, still a 3-level pyramid of 256-px tiles
SMALL = SyntheticSlideConfig(width=1536, height=1024, min_level_size=256)


@pytest.fixture(scope="session")
def cmu_slide() -> str:
    if not CMU_SLIDE.is_file():
        raise FileNotFoundError(
            f"the real Aperio test slide is missing at {CMU_SLIDE}; it is shared test data (set ICMIL_CMU_SLIDE)."
        )
    return str(CMU_SLIDE)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset: 4 training, 2 validation, 2 test slides; returns the datalist path."""
    root = tmp_path_factory.mktemp("synthetic")
    return make_dataset(root, num_training=4, num_validation=2, num_test=2, seed=7, config=SMALL, progress=False)


@pytest.fixture(scope="session")
def synthetic_entries(synthetic_dataset: Path) -> list[dict]:
    data = json.loads(synthetic_dataset.read_text())
    root = synthetic_dataset.parent
    return [
        {**e, "image": str(root / e["image"]), "tumour_mask": str(root / e["tumour_mask"]), "split": split}
        for split in ("training", "validation", "test")
        for e in data[split]
    ]


@pytest.fixture(scope="session")
def positive_slide(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One rendered positive slide (pixels, masks) and its TIFF path."""
    cfg = SyntheticSlideConfig(width=2048, height=1536, tumour_fraction=(0.08, 0.10))
    rendered = render_slide((3, 1), True, cfg)
    path = tmp_path_factory.mktemp("positive") / "positive.tiff"
    write_slide(path, rendered["image"], cfg.mpp)
    return {**rendered, "path": str(path), "cfg": cfg}


@pytest.fixture(scope="session")
def blank_slide(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A white slide with a little scanner noise and no tissue."""
    rng = np.random.default_rng(0)
    img = np.clip(245 + rng.normal(0, 2, (768, 1024, 3)), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("blank") / "blank.tiff"
    write_slide(path, img, mpp=0.5)
    return str(path)
