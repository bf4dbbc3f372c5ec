# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Damaged JPEG tiles: every reader finds them when a slide is tiled, and no patch on them is ever read again."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import tifffile
import torch

from monai_icmil.data.integrity import TileErrorPolicy
from monai_icmil.data.prepare import prepare_coords
from monai_icmil.data.report import RunReport
from monai_icmil.data.store import CoordsStore, FeatureStore
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines import Embed
from monai_icmil.networks import create_embedder


def _damage(src, dst, page: int, tiles: list[int]) -> None:
    """A copy of ``src`` with a quarter of the bytes of some JPEG tiles of one page zeroed, mid-stream: libjpeg
    decodes them to wrong pixels and only prints "Corrupt JPEG data" (cuCIM, imagecodecs) or raises (OpenSlide)."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as t:
        offsets, counts = t.pages[page].dataoffsets, t.pages[page].databytecounts
    with open(dst, "r+b") as f:
        for i in tiles:
            f.seek(offsets[i] + counts[i] // 3)
            f.write(b"\0" * (counts[i] // 4))


@pytest.fixture(scope="module")
def slides(synthetic_entries, tmp_path_factory):
    """An intact generated slide and a copy with its level-1 tile 1 (of 3 x 2) damaged; patches of 64 px at 1 um/px
    are read from level 1 (256 x 256 tiles)."""
    root = tmp_path_factory.mktemp("damaged")
    intact = synthetic_entries[0]["image"]
    _damage(intact, root / "damaged.tiff", page=1, tiles=[1])
    return intact, str(root / "damaged.tiff")


def _expected_drop(coords: np.ndarray, read_size: int = 64, tile: tuple[int, int] = (1, 0)) -> np.ndarray:
    """The patches (level-0 coords, read at level 1 = downsample 2) that overlap level-1 tile ``tile``."""
    lx, ly = coords[:, 0] // 2, coords[:, 1] // 2
    tx, ty = tile
    return (lx < (tx + 1) * 256) & (lx + read_size > tx * 256) & (ly < (ty + 1) * 256) & (ly + read_size > ty * 256)


@pytest.mark.parametrize("backend", ["cucim", "openslide", "tifffile"])
def test_patches_on_damaged_tiles_are_dropped_and_the_rest_embed_as_the_intact_slide(slides, backend, tmp_path):
    intact, damaged = slides
    tiling = TilingConfig(patch_size=64, mpp=1.0, backend=backend)
    items = [{"slide_id": "intact", "image": intact}, {"slide_id": "damaged", "image": damaged}]
    report = RunReport(tmp_path / "report.json")
    with pytest.warns(UserWarning, match="slide 'damaged'.* patches lie on damaged JPEG tiles and were dropped"):
        tiles = prepare_coords(
            items, tiling, CoordsStore(tmp_path / "coords"), report=report, backend=backend, progress=False,
            qc_dir=tmp_path / "qc", tile_policy=TileErrorPolicy("drop", max_damaged_fraction=0.5),
        )  # fmt: skip
    full, kept = tiles["intact"]["coords"], tiles["damaged"]["coords"]
    drop = _expected_drop(full)
    assert 0 < drop.sum() < len(full) and np.array_equal(kept, full[~drop])  # exactly the patches on the tile
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["damaged"]["damaged"]["patches"] == int(drop.sum()) and saved["damaged"]["damaged"]["of"] == len(full)
    assert sorted(map(tuple, saved["damaged"]["damaged"]["positions"])) == sorted(map(tuple, full[drop].tolist()))
    assert "intact" not in saved["damaged"] and not saved["failed"]
    rows = {r["slide"]: r for r in csv.DictReader(open(tmp_path / "qc" / "tiling.csv"))}
    assert rows["damaged"]["damaged_patches"] == str(int(drop.sum())) and rows["intact"]["damaged_patches"] == "0"
    # the kept patches embed exactly as the same patches of the intact slide
    torch.manual_seed(0)
    embedder = create_embedder("resnet18_trunc", input_size=64)
    store = FeatureStore(tmp_path / "features")
    Embed(batch_size=32, num_workers=0, dtype="float32", progress=False)(
        tiles, embedder, store, {"t": 1}, backend=backend
    )
    a, b = store.load("intact"), store.load("damaged")
    torch.testing.assert_close(b["features"], a["features"][torch.as_tensor(~drop)])


def test_a_damaged_slide_fails_under_the_fail_policy_or_above_the_threshold(slides, tmp_path):
    intact, damaged = slides
    items = [{"slide_id": "damaged", "image": damaged}]
    for name, policy in (("fail", TileErrorPolicy("fail", 0.5)), ("threshold", TileErrorPolicy("drop"))):
        report = RunReport(tmp_path / f"{name}.json")
        with pytest.warns(UserWarning, match="skipped: DamagedSlideError"):
            tiles = prepare_coords(
                items, TilingConfig(patch_size=64, mpp=1.0), CoordsStore(tmp_path / name), report=report,
                progress=False, tile_policy=policy,
            )  # fmt: skip
        assert tiles == {}
        reason = report.failed["damaged"]["reason"]
        assert "lie on damaged JPEG tiles" in reason and "Re-scan or re-export" in reason
        assert ("on_tile_error 'fail'" if name == "fail" else "above max_damaged_fraction 5%") in reason
    # a slide kept under "drop" fails when the policy is "fail" on a later run, without being tiled again
    store = CoordsStore(tmp_path / "drop")
    with pytest.warns(UserWarning):
        prepare_coords(items, TilingConfig(64, 1.0), store, progress=False, tile_policy=TileErrorPolicy("drop", 0.5))
    report = RunReport()
    with pytest.warns(UserWarning, match="skipped: DamagedSlideError"):
        assert prepare_coords(items, TilingConfig(64, 1.0), store, report=report, progress=False,
                              tile_policy=TileErrorPolicy("fail", 0.5)) == {}  # fmt: skip
    with pytest.raises(ValueError, match="on_tile_error must be 'drop' or 'fail'"):
        TileErrorPolicy("ignore")


@pytest.mark.parametrize("backend", ["cucim", "openslide", "tifffile"])
def test_damaged_tiles_are_found_after_a_read_of_one_has_failed(slides, backend):
    """OpenSlide's handle answers every later call with a damaged tile's error: the check must not depend on it."""
    from monai_icmil.data.slide import SlideError, open_slide

    slide = open_slide(slides[1], backend=backend)
    try:
        slide.read_patches([[2 * 256 + 8, 8]], 64, 1)  # inside level-1 tile (1, 0): OpenSlide raises here
    except SlideError:
        pass
    assert slide.damaged_tiles(1, [(0, 0), (1, 0), (2, 0), (0, 1)]) == {(1, 0)}


def test_the_damaged_tile_check_uses_the_machines_cores_and_finds_the_same_tiles_with_any_number(slides, monkeypatch):
    """It decodes every tile under the patches once, at tiling: with 2 threads on a 16-core GPU machine it cost as
    much as the embedding (benchmarks/gpu_results run7/run8, tile_check_share 1.09 / 1.21)."""
    from monai_icmil.data import integrity
    from monai_icmil.data.slide import open_slide

    slide = open_slide(slides[1])
    coords = np.array([[x, y] for y in range(0, 1024, 128) for x in range(0, 1536, 128)], np.int64)
    used = []
    probe = type(slide).damaged_tiles
    monkeypatch.setattr(
        type(slide),
        "damaged_tiles",
        lambda *a, num_workers: used.append(num_workers) or probe(*a, num_workers=num_workers),
    )
    found = {n: integrity.damaged_patches(slide, coords, 64, 1, num_workers=n).tolist() for n in (1, 8)}
    monkeypatch.setattr(integrity.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    found[None] = integrity.damaged_patches(slide, coords, 64, 1).tolist()
    assert used == [1, 8, integrity.MAX_CHECK_THREADS]  # the default: the cores, at most 16
    assert found[1] == found[8] == found[None] == np.flatnonzero(_expected_drop(coords)).tolist() != []
    monkeypatch.setattr(integrity.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert integrity.check_threads() == 2


def test_jpeg_decoder_complaints_about_damaged_headers_count_as_damage():
    from monai_icmil.data.integrity import JPEG_PROBLEM

    for line in (
        "ERROR in line 183 while reading JPEG header:",
        "Unsupported marker type 0xc9",
        "Corrupt JPEG data: 448 extraneous bytes before marker 0xd9",
        "Premature end of JPEG file",
    ):
        assert JPEG_PROBLEM.search(line), line
    assert not JPEG_PROBLEM.search("Failed to load nvjpeg")  # nvImageCodec's harmless start-up lines
