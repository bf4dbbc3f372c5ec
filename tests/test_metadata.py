# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Slides that lie about or lack their metadata: no mpp, disagreeing mpp, odd pyramids, no pyramid, no thumbnail."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import tifffile

from monai_icmil.data.datalist import DatalistError, load_datalist
from monai_icmil.data.prepare import prepare_coords
from monai_icmil.data.report import RunReport
from monai_icmil.data.slide import SlideError, block_mean, open_slide
from monai_icmil.data.store import CoordsStore
from monai_icmil.data.synthetic import SyntheticSlideConfig, render_slide
from monai_icmil.data.tiling import TilingConfig, compute_tissue_mask

BACKENDS = ["cucim", "openslide", "tifffile"]
APERIO = "Aperio Image Library v12.0.0\n1728x1152 [0,0 1728x1152] (256x256) JPEG/RGB Q=90|AppMag = 20|MPP = 0.5"
TILING = TilingConfig(patch_size=64, mpp=1.5, backend="tifffile")


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """A rendered 1728 x 1152 slide (divisible by 9: levels at downsample 3 and 9 are exact)."""
    return render_slide((11, 0), True, SyntheticSlideConfig(width=1728, height=1152))["image"]


def write_tiff(path, img, downsamples=(1, 3, 9), mpp=0.5, description=None, thumbnail=False, tags=True) -> str:
    """A JPEG-tiled TIFF with levels at ``downsamples`` (block means), optionally an Aperio description, a stripped
    thumbnail page after level 0 (as Aperio writes), and resolution tags saying ``mpp``."""
    with tifffile.TiffWriter(path) as tif:
        for k, ds in enumerate(downsamples):
            res = {"resolution": (1e4 / (mpp * ds),) * 2, "resolutionunit": "CENTIMETER"} if tags else {}
            level = block_mean(img, ds)
            tif.write(
                level, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None,
                description=description if k == 0 else None, subfiletype=0 if k == 0 else 1, **res,
            )  # fmt: skip
            if k == 0 and thumbnail:
                tif.write(block_mean(img, 8), photometric="rgb", compression="jpeg", metadata=None, rowsperstrip=16)
    return str(path)


def _prepare(tmp_path, entries, name, **kwargs):
    report = RunReport(tmp_path / f"{name}.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiles = prepare_coords(entries, TILING, CoordsStore(tmp_path / name), report, progress=False, **kwargs)
    return tiles, report


def test_a_slide_without_mpp_fails_with_the_fixes_and_tiles_with_a_datalist_mpp_or_assume_mpp(tissue, tmp_path):
    tagged = write_tiff(tmp_path / "tagged.tif", tissue)
    bare = write_tiff(tmp_path / "bare.tif", tissue, tags=False)
    item = {"slide_id": "bare", "image": bare}
    expected = _prepare(tmp_path, [{"slide_id": "bare", "image": tagged}], "ref")[0]["bare"]

    tiles, report = _prepare(tmp_path, [item], "none")
    assert "bare" not in tiles
    reason = report.failed["bare"]["reason"]
    assert "bare.tif" in reason and "`mpp` column" in reason and "assume_mpp" in reason

    for name, kwargs, entry in [("given", {}, {**item, "mpp": 0.5}), ("assumed", {"assume_mpp": 0.5}, item)]:
        got = _prepare(tmp_path, [entry], name, **kwargs)[0]["bare"]
        assert got["slide_mpp"] == 0.5 and got["level"] == expected["level"] == 1
        np.testing.assert_array_equal(got["coords"], expected["coords"])

    # a datalist mpp replaces even a file's own value; assume_mpp does not
    finer = _prepare(tmp_path, [{"slide_id": "t", "image": tagged, "mpp": 0.25}], "finer")[0]["t"]
    assert finer["level"] == 1 and finer["read_size"] == 128  # level 1 is 0.75 um/px by this mpp
    kept = _prepare(tmp_path, [{"slide_id": "t", "image": tagged}], "kept", assume_mpp=0.25)[0]["t"]
    assert "slide_mpp" not in kept and kept["level"] == 1

    # the given mpp is part of the slide's key: another value tiles it again, the same one reloads it
    store = CoordsStore(tmp_path / "assumed")
    first = store.metadata("bare")
    again = _prepare(tmp_path, [item], "assumed", assume_mpp=0.25)[0]["bare"]
    assert again["read_size"] == 128 and store.metadata("bare") != first


def test_a_bad_datalist_mpp_is_refused_naming_the_row(tissue, tmp_path):
    write_tiff(tmp_path / "a.tif", tissue)
    write_tiff(tmp_path / "b.tif", tissue)
    (tmp_path / "list.csv").write_text("slide,label,mpp\na.tif,0,0.25\nb.tif,1,fast\n")
    with pytest.raises(DatalistError, match=r"row 3 \(b\.tif\): mpp 'fast' must be a positive number"):
        load_datalist(tmp_path / "list.csv")
    (tmp_path / "list.csv").write_text("slide,label,mpp\na.tif,0,0.25\nb.tif,1,\n")
    items = load_datalist(tmp_path / "list.csv")["training"]
    assert items[0]["mpp"] == 0.25 and "mpp" not in items[1]


def test_tiling_csv_says_which_slides_had_their_mpp_given(tissue, tmp_path):
    bare = write_tiff(tmp_path / "bare.tif", tissue, tags=False)
    tagged = write_tiff(tmp_path / "tagged.tif", tissue)
    entries = [{"slide_id": "bare", "image": bare}, {"slide_id": "tagged", "image": tagged}]
    _prepare(tmp_path, entries, "qc", assume_mpp=0.5, qc_dir=tmp_path / "qc")
    rows = {r["slide"]: r for r in csv.DictReader(open(tmp_path / "qc" / "tiling.csv"))}
    assert rows["bare"]["slide_mpp"] == "0.5 (given)" and rows["tagged"]["slide_mpp"] == "0.5 (file)"
    assert rows["bare"]["patches"] == rows["tagged"]["patches"] != "0"
    # a datalist mpp that overrules the file's is used, warned about once with the file's, and shown beside it
    entries = [
        {"slide_id": "overruled", "image": tagged, "mpp": 0.25},
        {"slide_id": "same", "image": tagged, "mpp": 0.51},
    ]
    store, report = CoordsStore(tmp_path / "given"), RunReport(tmp_path / "given.json")
    with pytest.warns(UserWarning, match=r"^1 slide\(s\) are tiled at an mpp given .*: overruled \(0\.25, file 0\.5\)"):
        tiles = prepare_coords(entries, TILING, store, report, progress=False, qc_dir=tmp_path / "given_qc")
    rows = {r["slide"]: r for r in csv.DictReader(open(tmp_path / "given_qc" / "tiling.csv"))}
    assert rows["overruled"]["slide_mpp"] == "0.25 (given; file 0.5)" and rows["same"]["slide_mpp"] == "0.51 (given)"
    assert tiles["overruled"]["read_size"] == 2 * tiles["same"]["read_size"]  # (the given mpp is the one used)


def test_a_magnification_typed_as_a_datalist_mpp_is_warned_about(tmp_path):
    for name in ("a.tif", "b.tif"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.csv").write_text("slide,label,mpp\na.tif,0,20\nb.tif,1,0.5\n")
    with pytest.warns(UserWarning, match=r"gives 1 slide\(s\) a level-0 mpp of 4 um/px or coarser: a \(20\)\. "):
        items = load_datalist(tmp_path / "list.csv")["training"]
    assert [e["mpp"] for e in items] == [20.0, 0.5]  # (warned, not refused: a macro photograph may be that coarse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_disagreeing_aperio_and_tiff_mpp_are_warned_about_and_aperio_wins(tissue, tmp_path, backend):
    path = write_tiff(tmp_path / "lies.svs", tissue, mpp=0.25, description=APERIO)
    with pytest.warns(UserWarning, match=r"lies\.svs.*MPP = 0\.5.*tags say 0\.25.*using the Aperio value"):
        reader = open_slide(path, backend)
    assert reader.mpp == 0.5
    honest = write_tiff(tmp_path / "honest.svs", tissue, mpp=0.5, description=APERIO)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # agreeing sources: no warning
        assert open_slide(honest, backend).mpp == 0.5
        assert open_slide(path, backend, mpp=0.25).mpp == 0.25  # a given mpp settles it: no warning either


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_power_of_two_downsamples_choose_the_right_level_and_read_the_same_pixels(tissue, tmp_path, backend):
    path = write_tiff(tmp_path / "x3.tif", tissue)
    reader = open_slide(path, backend)
    assert reader.level_downsamples == pytest.approx((1.0, 3.0, 9.0))
    assert reader.level_for_mpp(1.5) == (1, 1.0)  # exactly level 1
    assert reader.level_for_mpp(1.0) == (0, 0.5)  # between levels: the finer one, read at twice the size
    assert reader.level_for_mpp(6.0) == (2, 0.75)
    tiles = TilingConfig(patch_size=64, mpp=1.5, backend=backend).tile(reader, device="cpu")
    assert tiles.level == 1 and tiles.read_size == 64 and len(tiles.coords) > 20
    assert (tiles.coords % 3 == 0).all()  # level-1 pixels land on whole level-0 pixels
    patches = reader.read_patches(tiles.coords[:8], 64, 1)
    expected = tifffile.imread(path, key=1)
    for (x, y), patch in zip(tiles.coords[:8] // 3, patches):
        np.testing.assert_array_equal(patch, expected[y : y + 64, x : x + 64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_single_level_slide_is_masked_and_thumbnailed_in_bounded_memory(tissue, tmp_path, backend):
    path = write_tiff(tmp_path / "flat.tif", tissue, downsamples=(1,))
    reader = open_slide(path, backend)
    assert reader.level_count == 1
    level0 = reader.read_level(0)
    np.testing.assert_array_equal(reader.read_level(0, block=16), block_mean(level0, 16))
    with pytest.raises(SlideError, match="too large to read whole"):
        reader.read_level(0, max_pixels=100_000)
    assert reader.read_level(0, max_pixels=100_000, block=8).shape == (144, 216, 3)  # read in chunks, averaged
    thumb, ds = reader.thumbnail(256)
    assert max(thumb.shape[:2]) == 256 and ds == pytest.approx(1728 / 256)
    mask = compute_tissue_mask(reader, device="cpu")
    pyramid = compute_tissue_mask(open_slide(write_tiff(tmp_path / "pyr.tif", tissue), backend), device="cpu")
    assert mask.downsample == pytest.approx(16.0) and pyramid.downsample == pytest.approx(9.0)
    assert abs(mask.mask.mean() - pyramid.mask.mean()) < 0.02  # the same tissue share as from a pyramid level


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_aperio_slide_without_its_thumbnail_page_reads_like_one_with_it(tissue, tmp_path, backend):
    full = open_slide(write_tiff(tmp_path / "thumb.svs", tissue, description=APERIO, thumbnail=True), backend)
    bare = open_slide(write_tiff(tmp_path / "nothumb.svs", tissue, description=APERIO), backend)
    assert full.level_dimensions == bare.level_dimensions == ((1728, 1152), (576, 384), (192, 128))
    assert full.mpp == bare.mpp == 0.5 and full.objective_power == bare.objective_power == 20
    np.testing.assert_array_equal(full.thumbnail(512)[0], bare.thumbnail(512)[0])
    a, b = (TilingConfig(patch_size=64, mpp=1.5, backend=backend).tile(r, device="cpu") for r in (full, bare))
    np.testing.assert_array_equal(a.coords, b.coords)


def test_datalist_mpp_reaches_the_bundle(tissue, tmp_path):
    """The workflow hands the datalist's ``mpp`` and ``assume_mpp`` to tiling (here, a slide with no metadata)."""
    from monai_icmil.workflows import ICMILWorkflow

    data = tmp_path / "data"
    data.mkdir()
    for k in range(4):
        write_tiff(data / f"s{k}.tif", tissue, tags=False)
    rows = [{"image": f"s{k}.tif", "label": k % 2, **({"mpp": 0.5} if k < 2 else {})} for k in range(4)]
    (data / "datalist.json").write_text(json.dumps({"training": rows}))
    wf = ICMILWorkflow(
        str(data), str(tmp_path / "out"), tiling=TILING, assume_mpp="0.5", mlflow={"enabled": False}, progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slides = wf.prepare()
    assert sorted(slides) == ["s0", "s1", "s2", "s3"] and all(s["slide_mpp"] == 0.5 for s in slides.values())
    with pytest.raises(ValueError, match="'assume_mpp' must be a positive number or null, got 'x'"):
        ICMILWorkflow(str(data), str(tmp_path / "out2"), assume_mpp="x", mlflow={"enabled": False})
    with pytest.raises(ValueError, match=r"'assume_mpp' 500 is outside 0.01-20 microns per pixel.*not nm or mm"):
        ICMILWorkflow(str(data), str(tmp_path / "out3"), assume_mpp=500, mlflow={"enabled": False})
