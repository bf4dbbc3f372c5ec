# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
from __future__ import annotations

import os
import struct
import threading

import numpy as np
import pytest
import tifffile
import torch

from monai_icmil.data import BACKENDS, SlideError, get_slide, open_slide
from monai_icmil.data.slide import CuCIMSlide, TiffSlide, resize_patches
from monai_icmil.data.synthetic import write_slide
from monai_icmil.data.tiling import compute_tissue_mask, grid_coordinates


@pytest.mark.parametrize("backend", BACKENDS)
def test_aperio_metadata_is_read_by_every_backend(cmu_slide, backend):
    with open_slide(cmu_slide, backend) as s:
        assert s.backend == backend
        assert s.level_count == 1
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499, abs=1e-3)  # not cuCIM's spacing() of 1.0
        assert s.objective_power == 20


def test_auto_backend_prefers_cucim(cmu_slide):
    assert open_slide(cmu_slide).backend == "cucim"


def test_same_coordinates_give_same_pixels_on_every_backend(cmu_slide):
    reader = open_slide(cmu_slide, "tifffile")
    mask = compute_tissue_mask(reader)
    tiles = grid_coordinates(reader, 224, mpp=0.5, mask=mask.mask, mask_downsample=mask.downsample)
    assert len(tiles) > 10
    batches = {}
    for backend in BACKENDS:
        with open_slide(cmu_slide, backend) as s:
            batches[backend] = s.read_patches(tiles.coords, tiles.read_size, tiles.level, num_workers=2).astype(int)
    assert batches["cucim"].shape == (len(tiles), 224, 224, 3)
    assert np.abs(batches["cucim"] - batches["openslide"]).mean() < 3
    assert np.abs(batches["cucim"] - batches["tifffile"]).mean() < 3
    # the patches are tissue, not background
    assert batches["cucim"].mean() < 220


@pytest.mark.parametrize("backend", BACKENDS)
def test_synthetic_slide_metadata_round_trips(synthetic_entries, backend):
    with open_slide(synthetic_entries[0]["image"], backend) as s:
        assert s.dimensions == (1536, 1024)
        assert s.level_count == 3  # 1536x1024, 768x512, 384x256
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert s.mpp == pytest.approx(0.5)
        assert s.level_mpp(2) == pytest.approx(2.0)


def test_level_choice_for_target_mpp(synthetic_entries):
    s = open_slide(synthetic_entries[0]["image"], "tifffile")
    assert s.level_for_mpp(0.5) == (0, 1.0)
    assert s.level_for_mpp(1.0) == (1, 1.0)
    level, scale = s.level_for_mpp(1.5)  # nearest level at or finer than 1.5 um/px is 1.0, then resize
    assert level == 1 and scale == pytest.approx(1.0 / 1.5)
    assert s.level_for_mpp(16.0)[0] == 2
    with pytest.raises(SlideError, match=r"finer than the slide's finest level.*synthetic|training"):
        s.level_for_mpp(0.25)


def test_read_patches_batch_shapes_and_tensor_layout(synthetic_entries):
    s = open_slide(synthetic_entries[0]["image"])
    coords = np.array([[0, 0], [512, 256], [1000, 700]])
    arr = s.read_patches(coords, 64, level=1)
    assert arr.shape == (3, 64, 64, 3) and arr.dtype == np.uint8
    t = s.read_patches(coords, 64, level=1, out_size=32, as_tensor=True, device="cpu")
    assert isinstance(t, torch.Tensor) and t.shape == (3, 3, 32, 32) and t.dtype == torch.uint8
    # level 1 at (512, 256) is level-0 pixels (512..640, 256..384) downsampled by 2
    full = s.read_patches([[512, 256]], 128, level=0)[0]
    down = resize_patches(full[None], 64)[0].astype(int)
    assert np.abs(down - arr[1].astype(int)).mean() < 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_patches_writes_into_a_given_buffer(synthetic_entries, backend):
    """``out=`` (how reader threads fill pinned memory): the same pixels, in the caller's memory, for dense grids,
    scattered patches and resized reads."""
    s = open_slide(synthetic_entries[0]["image"], backend)
    xs, ys = np.meshgrid(np.arange(0, 1400, 48), np.arange(0, 900, 48))
    grid = np.stack([xs.ravel(), ys.ravel()], 1)[:40]
    scattered = np.random.default_rng(0).integers(0, 900, (7, 2))
    for coords, out_size in ((grid, None), (scattered, None), (grid, 48)):
        expected = s.read_patches(coords, 96, 0, out_size=out_size, num_workers=2)
        buf = torch.full((len(coords), *expected.shape[1:]), 7, dtype=torch.uint8)
        t = s.read_patches(coords, 96, 0, out_size=out_size, num_workers=2, as_tensor=True, out=buf)
        np.testing.assert_array_equal(buf.numpy(), expected)
        assert t.data_ptr() == buf.data_ptr() and t.shape == (len(coords), 3, *expected.shape[1:3])
        assert t.is_contiguous(memory_format=torch.channels_last)  # goes to the GPU as the engine runs it
    arr = np.zeros((len(grid), 96, 96, 3), np.uint8)
    assert s.read_patches(grid, 96, 0, out=arr) is arr
    with pytest.raises(ValueError, match=r"out must be .* shape \[40, 48, 48, 3\].*got uint8 \[40, 96, 96, 3\]"):
        s.read_patches(grid, 96, 0, out_size=48, out=arr)
    with pytest.raises(ValueError, match="not contiguous"):
        s.read_patches(grid[:4], 48, 0, out=np.zeros((4, 48, 96, 3), np.uint8)[:, :, :48])


@pytest.mark.parametrize("level", [0, 1])
def test_cucim_reads_a_dense_grid_as_regions_with_the_same_pixels(synthetic_entries, level):
    """A grid with overlap is read as a few regions cut into patches: identical to one read per patch."""
    s = CuCIMSlide(synthetic_entries[0]["image"])
    ds = int(s.level_downsamples[level])
    xs, ys = np.meshgrid(np.arange(0, 1536 - 96 * ds, 48 * ds), np.arange(0, 1024 - 96 * ds, 48 * ds))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    plan = s.block_plan(coords, level, (96, 96))
    assert plan is not None and len(plan["origins0"]) < len(coords) / 4
    per_patch = s._read_regions(coords, level, (96, 96), 2)
    np.testing.assert_array_equal(s.read_patches(coords, 96, level, num_workers=2), per_patch)
    # scattered patches (as the embedder phase samples them) are read one by one; so is everything with blocks off
    rng = np.random.default_rng(0)
    assert s.block_plan(rng.integers(0, 1000, (6, 2)) * 1, 0, (96, 96)) is None
    s.max_block_pixels = 96 * 96  # regions too large together for memory: patch by patch
    assert s.block_plan(coords, level, (96, 96)) is None
    s.max_block_pixels, s.block_tiles = CuCIMSlide.max_block_pixels, 0
    assert s.block_plan(coords, level, (96, 96)) is None


def test_tile_reader_decodes_only_needed_tiles(synthetic_entries):
    s = TiffSlide(synthetic_entries[0]["image"])
    s.read_patches([[10, 10]], 64, level=0)
    assert len(s._cache) == 1  # a 64-px patch inside one 256-px tile decodes one tile
    s.read_patches([[240, 240]], 64, level=0)
    assert len(s._cache) == 4  # a patch across a tile corner decodes its four tiles (one was cached)


def test_tile_reader_reads_the_same_pixels_whatever_other_handles_do_to_the_file_position(synthetic_entries):
    # healthy slides failed mid-run with "Not a JPEG file: starts with 0x4a 0x46" (or "0x00 0x01"): tifffile's first
    # decode of a page seeks its handle to the first tile + 6 and reads 4 bytes (is_jfif), and did so between another
    # reader thread's seek and read. Tiles are now read with pread on a descriptor of the reader's own.
    path = synthetic_entries[0]["image"]
    coords = np.random.default_rng(0).integers(0, 960, (400, 2))
    reference = TiffSlide(path, cache_tiles=0).read_patches(coords, 64)
    s = TiffSlide(path, cache_tiles=0)
    fh = s._tif.filehandle
    s.read_patches(coords[:1], 64)  # builds the page's decoder (which reads through tifffile's handle)
    fh.seek(123)
    s.read_patches(coords[:4], 64)
    assert fh.tell() == 123  # tile reads leave tifffile's handle where it was

    stop = threading.Event()

    def move() -> None:  # as a delay-loaded tag, or a forked process sharing the descriptor, would
        rng = np.random.default_rng(1)
        while not stop.is_set():
            fh.seek(int(rng.integers(0, 4096)))
            fh.read(int(rng.integers(1, 16)))

    mover = threading.Thread(target=move)
    mover.start()
    try:
        patches = s.read_patches(coords, 64, num_workers=2)
    finally:
        stop.set()
        mover.join()
    np.testing.assert_array_equal(patches, reference)


def test_tile_reader_without_pread_reads_the_same_and_a_file_cut_while_open_fails_naming_it(
    synthetic_entries, tmp_path
):
    path = synthetic_entries[0]["image"]
    coords = np.random.default_rng(2).integers(0, 960, (40, 2))
    reference = TiffSlide(path, cache_tiles=0).read_patches(coords, 64)
    s = TiffSlide(path, cache_tiles=0)
    os.close(s._fd)
    s._fd = None  # as where os.pread is missing: tifffile's handle, one seek and read at a time
    np.testing.assert_array_equal(s.read_patches(coords, 64, num_workers=2), reference)
    cut = tmp_path / "cut.tiff"
    cut.write_bytes(open(path, "rb").read())
    s = TiffSlide(cut, cache_tiles=0)
    page = s._pages[0]
    last = int(np.argmax(page.dataoffsets))
    os.truncate(cut, int(page.dataoffsets[last]) + int(page.databytecounts[last]) // 2)  # after opening
    n_tx = -(-s.level_dimensions[0][0] // int(page.tilewidth))
    xy = [(last % n_tx) * int(page.tilewidth), (last // n_tx) * int(page.tilelength)]
    with pytest.raises(SlideError, match=r"cut\.tiff.*read \d+ of its \d+ bytes.*truncated"):
        s.read_patches([xy], 16)


def test_empty_coordinate_list_reads_nothing(synthetic_entries):
    s = open_slide(synthetic_entries[0]["image"])
    assert s.read_patches(np.zeros((0, 2), np.int64), 64).shape == (0, 64, 64, 3)


def test_get_slide_caches_open_readers(synthetic_entries):
    path = synthetic_entries[0]["image"]
    assert get_slide(path) is get_slide(path)


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_file_names_the_slide(tmp_path):
    missing = tmp_path / "nope.svs"
    with pytest.raises(FileNotFoundError, match="nope.svs"):
        open_slide(missing)


def test_non_slide_file_is_rejected_with_every_backend_reason(tmp_path):
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide")
    with pytest.raises(SlideError, match=r"notes\.svs.*cannot be opened.*cucim.*openslide.*tifffile.*vips tiffsave"):
        open_slide(bad)


def test_truncated_tiff_fails_with_a_clear_error(synthetic_entries, tmp_path):
    data = open(synthetic_entries[0]["image"], "rb").read()
    cut = tmp_path / "truncated.tiff"
    cut.write_bytes(data[: len(data) // 2])
    for backend in BACKENDS:
        with pytest.raises(SlideError, match=r"truncated\.tiff"):
            s = open_slide(cut, backend)
            s.read_patches([[1400, 900]], 128, level=0)  # the last tiles are past the cut
    # cut inside the tile data, with the directories intact: refused on opening, before cuCIM reads past the end
    # (which can corrupt its heap rather than raise)
    cut.write_bytes(data[: len(data) * 2 // 3])
    for backend in BACKENDS:
        with pytest.raises(SlideError, match=r"truncated\.tiff.*truncated: TIFF page \d+ stores .* Copy it again"):
            open_slide(cut, backend)


def test_untiled_tiff_is_read_whole_when_small_and_rejected_with_the_fix_when_large(tmp_path, monkeypatch):
    from monai_icmil.data.slide import ImageSlide

    path = tmp_path / "strips.tif"
    img = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(path, img, photometric="rgb")
    slide = open_slide(path, mpp=0.5)
    assert slide.backend == "image" and slide.dimensions == (400, 300)
    np.testing.assert_array_equal(slide.read_patches([[10, 20]], 64)[0], img[20:84, 10:74])
    with pytest.raises(SlideError, match=r"strips\.tif.*not tiled.*--tile --pyramid.*backend 'auto' or 'image'"):
        open_slide(path, backend="cucim")  # the whole-slide backends would decode the whole image per patch
    monkeypatch.setattr(ImageSlide, "max_pixels", 100_000)
    with pytest.raises(SlideError, match=r"strips\.tif.*400x300 image without tiles is too large.*--tile --pyramid"):
        open_slide(path)


def test_coordinates_outside_the_slide_are_listed(synthetic_entries):
    s = open_slide(synthetic_entries[0]["image"])
    with pytest.raises(ValueError, match=r"training_000.*2 coordinate\(s\) outside.*#1 \(5000, 0\).*#2 \(-1, 3\)"):
        s.read_patches([[0, 0], [5000, 0], [-1, 3]], 64)


def test_mpp_finer_than_the_finest_level_is_an_error(synthetic_entries):
    s = open_slide(synthetic_entries[0]["image"])
    with pytest.raises(SlideError, match="finer than the slide's finest level"):
        grid_coordinates(s, 64, mpp=0.1)


def test_slide_without_mpp_warns_and_can_still_be_tiled_by_level(tmp_path):
    path = tmp_path / "nompp.tiff"
    img = np.full((512, 512, 3), 230, np.uint8)
    img[100:400, 100:400] = (200, 120, 190)
    tifffile.imwrite(path, img, photometric="rgb", tile=(256, 256), compression="jpeg")
    with pytest.warns(UserWarning, match=r"nompp\.tiff.*no microns per pixel.*datalist.*assume_mpp"):
        s = open_slide(path, "tifffile")
    assert s.mpp is None
    with pytest.raises(SlideError, match=r"nompp\.tiff.*needs the slide's microns per pixel"):
        grid_coordinates(s, 64, mpp=1.0)
    tiles = grid_coordinates(s, 64, level=0)
    assert len(tiles) == 64 and tiles.mpp is None


def test_no_mpp_warning_says_when_the_tiff_metadata_could_not_be_parsed(tmp_path, monkeypatch):
    """Metadata tifffile cannot parse is not silently "no mpp": the warning carries the parser's error."""
    from monai_icmil.data import slide as slide_module

    path = tmp_path / "odd.tiff"
    tifffile.imwrite(path, np.full((256, 256, 3), 200, np.uint8), photometric="rgb", tile=(128, 128))
    import_backend = slide_module._import_backend
    real_tifffile = import_backend("tifffile")

    class Unparsable:  # the metadata pass alone fails; the reader opens the file as before
        def __getattr__(self, name):
            return getattr(real_tifffile, name)

        def TiffFile(self, *args, **kwargs):
            raise struct.error("unpack requires a buffer of 8 bytes")

    monkeypatch.setattr(
        slide_module, "_import_backend", lambda name: Unparsable() if name == "tifffile" else import_backend(name)
    )
    slide_module._read_tiff_properties.cache_clear()
    assert slide_module._tiff_properties(str(path))["tiff_error"] == "error: unpack requires a buffer of 8 bytes"
    with pytest.warns(
        UserWarning,
        match=r"odd\.tiff' has no microns per pixel in its metadata \(its TIFF metadata "
        r"could not be parsed: error: unpack requires a buffer of 8 bytes\)\. Give it an `mpp`",
    ):
        assert open_slide(path, "cucim").mpp is None
    monkeypatch.undo()
    slide_module._read_tiff_properties.cache_clear()
    assert "tiff_error" not in slide_module._tiff_properties(str(path))


def test_write_slide_is_atomic(tmp_path):
    path = tmp_path / "s.tiff"
    with pytest.raises(Exception):
        write_slide(path, np.zeros((10, 10), np.uint8), mpp=0.5)  # not RGB: tifffile refuses mid-write
    assert list(tmp_path.iterdir()) == []


def test_pyramid_levels_are_the_rounded_2x2_means_in_integers():
    """The synthetic slides' pyramid halves each level in integer bands; every level equals the float 2x2 mean
    rounded half to even (what it computed before, so generated datasets are unchanged), odd sizes included."""
    from monai_icmil.data.synthetic import _pyramid

    img = np.random.default_rng(0).integers(0, 256, (301, 263, 3), dtype=np.uint8)
    img[:40:2, :40] = 1  # 2x2 blocks whose sums leave remainder 2 (ties), rounded to the even neighbour
    img[1:40:2, :40] = 2
    levels, want = _pyramid(img, 16), [img]
    while min(want[-1].shape[:2]) // 2 >= 16:
        prev = want[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        want.append(np.round(prev[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))).astype(np.uint8))
    assert len(levels) == len(want) == 5
    for got, expected in zip(levels, want):
        np.testing.assert_array_equal(got, expected)
    assert levels[1][0, 0, 0] == 2  # (1 + 1 + 2 + 2) / 4 = 1.5 -> 2


def test_the_thumbnail_downsample_is_the_long_sides_so_overlays_do_not_drift_down_a_needle_core(tmp_path):
    write_slide(tmp_path / "core.tif", np.full((3000, 315, 3), 200, np.uint8), mpp=0.5)
    thumb, ds = open_slide(tmp_path / "core.tif").thumbnail(100)
    assert thumb.shape[0] == 100 and ds == 30.0  # 315 / 30 rounds to a whole width; the height is exact
