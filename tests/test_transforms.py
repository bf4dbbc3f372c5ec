# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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
    same = ReadPatches()(path, torch.tensor([[0.0, 0.0], [256.0, 256.0]]), level=0, read_size=128, patch_size=64)
    assert torch.equal(same, out)  # whole-number floats and tensors are taken
    with pytest.raises(ValueError, match=r"must be whole numbers, got fractional ones such as \[10.9, 0.0\]"):
        ReadPatches()(path, np.array([[0, 0], [10.9, 0]]), level=0, read_size=128, patch_size=64)


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


def test_dictionary_transforms_take_one_slide_key_and_the_data_mpp_in_any_form(synthetic_entries):
    """Outputs go to fixed keys, so a second slide key is refused (it would overwrite the first slide's and tile with
    its mask); the data's mpp may be a numpy or tensor scalar or a CSV string, and NaN or empty means the file's."""
    for transform in (TissueMaskd, GridPatchCoordsd, ReadPatchesd):
        with pytest.raises(ValueError, match=rf"{transform.__name__}: one slide key per transform, got \['a', 'b'\]"):
            transform(["a", "b"])
    path = synthetic_entries[0]["image"]  # level 0 at 0.5 um/px, levels 1 and 2 at 1 and 2
    grid = Compose([TissueMaskd(), GridPatchCoordsd(patch_size=64, mpp=1.5)])
    own = grid({"image": path})
    assert own["tiling"]["level"] == 1
    for missing in (None, "", " ", float("nan"), np.float64("nan")):
        np.testing.assert_array_equal(grid({"image": path, "mpp": missing})["coords"], own["coords"])
    for given in (np.float32(0.25), "0.25", torch.tensor(0.25), 0.25):
        assert grid({"image": path, "mpp": given})["tiling"]["level"] == 2, repr(given)  # levels at 0.25, 0.5, 1
    with pytest.raises(ValueError, match=r"data\['mpp'\] \(the slide's level-0 microns per pixel\)' must be a posit"):
        GridPatchCoordsd(patch_size=64, mpp=1.5)({"image": path, "mpp": "fast"})  # (Compose wraps it in a RuntimeError)
    with pytest.raises(ValueError, match=r"data\['mpp'\].* 250 is outside 0.01-20 microns per pixel"):
        TissueMaskd()({"image": path, "mpp": 250})


def test_array_transforms_refuse_each_others_results_and_bad_settings_at_construction(synthetic_entries):
    path = synthetic_entries[0]["image"]
    with pytest.raises(TypeError, match=r"expected a slide path or SlideReader, got TissueMaskResult.*TissueMaskd"):
        GridPatchCoords(patch_size=64, mpp=1.0)(TissueMask()(path))  # as Compose([TissueMask(), GridPatchCoords()])
    for kwargs, error in (
        ({"patch_size": 0}, "patch_size must be positive"),
        ({"mpp": -1}, "'mpp' must be a positive number"),
        ({"mpp": 1000}, "'mpp' 1000 is outside"),
        ({"level": -1}, "level must be >= 0"),
        ({"min_tissue": 2}, "min_tissue must be within"),
    ):
        with pytest.raises(ValueError, match=rf"GridPatchCoords: {error}"):
            GridPatchCoords(**kwargs)
    assert type(GridPatchCoords(mpp=1).mpp) is int  # checked, kept as given: it is part of the stores' keys
    mask = TissueMask()(path)
    grid = GridPatchCoords(patch_size=64, mpp=1.0)
    want = grid(path, mask).coords
    for monai_style in (mask.mask[None], torch.as_tensor(mask.mask)[None]):  # channel-first, as MONAI keeps masks
        np.testing.assert_array_equal(grid(path, monai_style, mask.downsample).coords, want)
    with pytest.raises(ValueError, match=r"tissue mask must be \[h, w\] \(or \[1, h, w\]\), got shape \(2, "):
        grid(path, np.stack([mask.mask, mask.mask]), mask.downsample)
    with pytest.raises(ValueError, match=r"slide '.*' a tissue mask needs `mask_downsample`|needs `mask_downsample`"):
        grid(path, mask.mask)


def test_effective_mpp_is_the_patches_own_when_a_level_is_read_as_it_is(synthetic_entries):
    path = synthetic_entries[0]["image"]  # level 1 at 1.0 um/px: within 10 % of 1.05, read without resizing
    tiling = Compose([TissueMaskd(), GridPatchCoordsd(patch_size=64, mpp=1.05)])({"image": path})["tiling"]
    assert (tiling["level"], tiling["read_size"]) == (1, 64)
    assert tiling["mpp"] == 1.05 and tiling["effective_mpp"] == pytest.approx(1.0)
    resized = Compose([TissueMaskd(), GridPatchCoordsd(patch_size=64, mpp=1.5)])({"image": path})["tiling"]
    assert resized["read_size"] == 96 and resized["effective_mpp"] == pytest.approx(1.5)


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
