# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, Lambdad
from PIL import Image

from monai_icmil.data import open_slide
from monai_icmil.transforms import (
    GridPatchCoords,
    GridPatchCoordsd,
    ReadPatches,
    ReadPatchesd,
    TissueMask,
    TissueMaskd,
)


def test_dictionary_transforms_compose_into_a_patching_pipeline(synthetic_entries):
    entry = synthetic_entries[0]
    pipeline = Compose(
        [
            TissueMaskd("image"),
            GridPatchCoordsd("image", patch_size=64, mpp=1.0),
            ReadPatchesd("image", num_workers=2),
            Lambdad("label", lambda x: torch.as_tensor(x)),
        ]
    )
    out = pipeline({"image": entry["image"], "label": entry["label"]})
    n = len(out["coords"])
    assert n > 20
    assert out["tissue_mask"].dtype == bool and out["tissue_mask_downsample"] > 1
    assert out["tiling"]["level"] == 1 and out["tiling"]["patch_size"] == 64 and out["tiling"]["read_size"] == 64
    assert out["tissue_fraction"].shape == (n,) and (out["tissue_fraction"] >= 0.5).all()
    assert out["patches"].shape == (n, 3, 64, 64) and out["patches"].dtype == torch.uint8
    assert out["image"] == entry["image"]  # input keys are kept


def test_array_and_dictionary_versions_agree(synthetic_entries):
    path = synthetic_entries[1]["image"]
    mask = TissueMask()(path)
    tiles = GridPatchCoords(patch_size=48, mpp=1.5)(path, mask)
    patches = ReadPatches(as_tensor=False)(path, tiles)
    d = Compose([TissueMaskd(), GridPatchCoordsd(patch_size=48, mpp=1.5), ReadPatchesd(as_tensor=False)])(
        {"image": path}
    )
    np.testing.assert_array_equal(mask.mask, d["tissue_mask"])
    np.testing.assert_array_equal(tiles.coords, d["coords"])
    np.testing.assert_array_equal(patches, d["patches"])
    assert patches.shape[1:] == (48, 48, 3)
    assert tiles.read_size == 48 * 1.5 / 1.0  # read at level 1 (1 um/px), 72 px, resized to 48


def test_read_patches_takes_explicit_coordinates(synthetic_entries):
    path = synthetic_entries[0]["image"]
    out = ReadPatches()(path, np.array([[0, 0], [256, 256]]), level=0, read_size=128, patch_size=64)
    assert out.shape == (2, 3, 64, 64)


def test_custom_output_keys(synthetic_entries):
    d = Compose(
        [
            TissueMaskd("wsi", mask_key="m", downsample_key="m_ds"),
            GridPatchCoordsd(
                "wsi", mask_key="m", downsample_key="m_ds", coords_key="xy", tiling_key="t", patch_size=64
            ),
            ReadPatchesd("wsi", coords_key="xy", tiling_key="t", patches_key="px"),
        ]
    )({"wsi": synthetic_entries[0]["image"]})
    assert {"m", "m_ds", "xy", "t", "px"} <= set(d)
    assert d["px"].shape[0] == len(d["xy"])


def test_patching_demo_command_writes_its_pictures_and_summary(tmp_path):
    """``python -m monai_icmil.demo`` (the README's patching demo): two generated slides through the Compose."""
    from monai_icmil.demo import main

    main(["--output_dir", str(tmp_path), "--patch_size", "128", "--mpp", "1.0", "--num_workers", "1"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [Path(s["slide"]).stem for s in summary["slides"]] == ["training_000", "training_001"]
    for s in summary["slides"]:
        name, n = Path(s["slide"]).stem, s["patches"]
        assert n > 20 and s["read_level"] == 1 and 0.2 < s["tissue_fraction_of_image"] < 0.9  # 128 px at 1 um/px
        tiling = Image.open(tmp_path / f"{name}_tiling.png")
        thumb, _ = open_slide(s["slide"]).thumbnail(768)
        assert tiling.size == (thumb.shape[1], thumb.shape[0] + 18)  # the QC picture under its caption
        montage = Image.open(tmp_path / f"{name}_patches.png")
        assert montage.size == (8 * 130, -(-min(n, 64) // 8) * 130)  # every patch read, up to 64, 128 px + 2
