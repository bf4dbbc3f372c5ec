# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_icmil.data import open_slide
from monai_icmil.data.synthetic import mean_nucleus_area, write_slide
from monai_icmil.data.tiling import (
    EmptySlideWarning,
    array_backend,
    compute_tissue_mask,
    grid_coordinates,
    otsu_threshold,
    tissue_mask_from_rgb,
)


def test_tissue_mask_covers_the_tissue_of_the_real_slide(cmu_slide):
    reader = open_slide(cmu_slide)
    result = compute_tissue_mask(reader)
    frac = result.mask.mean()
    assert 0.30 <= frac <= 0.70
    # the mask lands at 4-8 um/px (mask_level: at most mask_mpp; 16 px blocks of 0.499 um here)
    assert 4.0 <= reader.mpp * result.downsample <= 8.0
    assert result.downsample == 16.0
    # the white corners are background
    h, w = result.mask.shape
    for corner in (result.mask[: h // 10, : w // 10], result.mask[: h // 10, -w // 10 :]):
        assert corner.mean() < 0.05


@pytest.mark.parametrize("mpp", [0.5, 1.0])
def test_grid_counts_are_consistent_with_the_mask_area(cmu_slide, mpp):
    reader = open_slide(cmu_slide)
    m = compute_tissue_mask(reader)
    tissue_area = m.mask.sum() * m.downsample**2  # level-0 px^2
    tiles = grid_coordinates(reader, 224, mpp=mpp, mask=m.mask, mask_downsample=m.downsample, min_tissue=0.5)
    assert tiles.read_size == round(224 * mpp / reader.mpp)
    expected = tissue_area / tiles.footprint**2
    assert 0.6 * expected <= len(tiles) <= 1.3 * expected
    # every grid cell's tissue, summed, is the mask area the grid covers (up to cell rounding)
    every = grid_coordinates(reader, 224, mpp=mpp, mask=m.mask, mask_downsample=m.downsample, min_tissue=0.0)
    x_end, y_end = (every.coords.max(axis=0) + every.footprint) / m.downsample
    covered = m.mask[: int(round(y_end)), : int(round(x_end))].sum() * m.downsample**2
    assert every.tissue_fraction.sum() * every.footprint**2 == pytest.approx(covered, rel=0.1)
    assert (tiles.tissue_fraction >= 0.5).all()


def test_grid_is_row_major_deterministic_and_inside(synthetic_entries):
    reader = open_slide(synthetic_entries[0]["image"])
    m = compute_tissue_mask(reader)
    a = grid_coordinates(reader, 64, mpp=1.0, mask=m.mask, mask_downsample=m.downsample)
    b = grid_coordinates(reader, 64, mpp=1.0, mask=m.mask, mask_downsample=m.downsample)
    np.testing.assert_array_equal(a.coords, b.coords)
    order = np.lexsort((a.coords[:, 0], a.coords[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(a)))
    w, h = reader.dimensions
    assert (a.coords[:, 0] + a.footprint <= w).all() and (a.coords[:, 1] + a.footprint <= h).all()
    assert a.level == 1 and a.read_size == 64 and a.footprint == 128


def test_overlapping_stride_gives_about_four_times_the_patches(synthetic_entries):
    reader = open_slide(synthetic_entries[0]["image"])
    m = compute_tissue_mask(reader)
    base = grid_coordinates(reader, 64, level=0, mask=m.mask, mask_downsample=m.downsample)
    half = grid_coordinates(reader, 64, level=0, stride=32, mask=m.mask, mask_downsample=m.downsample)
    assert 3.0 < len(half) / len(base) < 5.0


def test_blank_slide_gives_zero_patches_with_a_warning(blank_slide):
    reader = open_slide(blank_slide)
    with pytest.warns(EmptySlideWarning, match=r"blank\.tiff.*no tissue") as said:
        m = compute_tissue_mask(reader)
    assert not m.mask.any()
    reason = [w.message.reason for w in said if isinstance(w.message, EmptySlideWarning)][0]
    assert reason.startswith("no tissue found") and "blank.tiff" not in reason  # report.json's words, no path
    with pytest.warns(EmptySlideWarning, match=r"blank\.tiff.*zero patches"):
        tiles = grid_coordinates(reader, 64, mpp=1.0, mask=m.mask, mask_downsample=m.downsample)
    assert len(tiles) == 0 and tiles.coords.shape == (0, 2)
    with pytest.warns(EmptySlideWarning, match=r"does not fit") as said:
        grid_coordinates(reader, 100_000, level=0)
    assert [w.message.reason for w in said if isinstance(w.message, EmptySlideWarning)][0].startswith("a 100000-px")


def test_a_slide_whose_tissue_is_all_smaller_than_min_area_says_so(tmp_path):
    img = np.full((400, 400, 3), 245, np.uint8)
    img[100:300, 100:300] = (200, 110, 190)  # 100 x 100 um of tissue at 0.5 um/px: below 20,000 um^2
    write_slide(tmp_path / "core.tif", img, mpp=0.5)
    reader = open_slide(tmp_path / "core.tif")
    with pytest.warns(UserWarning, match=r"core\.tif': no tissue kept: .* um\^2 .* smaller than min_area_um2=20000"):
        assert not compute_tissue_mask(reader).mask.any()
    assert compute_tissue_mask(reader, min_area_um2=1000).mask.any()


def test_mask_algorithm_removes_specks_and_fills_holes():
    img = np.full((120, 120, 3), 245, np.uint8)
    img[20:100, 20:100] = (200, 110, 190)  # tissue
    img[50:60, 50:60] = 245  # a hole inside the tissue
    img[5:8, 110:113] = (200, 110, 190)  # a 9-px speck
    mask, thr = tissue_mask_from_rgb(img, median_size=3, min_area_px=30, device="cpu")
    assert mask[55, 55]  # hole filled
    assert not mask[6, 111]  # speck removed
    assert mask[20:100, 20:100].mean() > 0.97 and mask.sum() < 82 * 82
    assert 0.05 <= thr < 0.4


def test_otsu_matches_scikit_image_on_bimodal_data():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.03, 5000), rng.normal(0.5, 0.05, 3000)]).clip(0, 1)
    assert otsu_threshold(values) == pytest.approx(threshold_otsu(values), abs=2 / 256)


def test_auto_backend_is_numpy_without_a_usable_gpu_and_cuda_is_refused_with_the_fix():
    import torch

    xp, _, device = array_backend("auto")
    if torch.cuda.is_available():  # on a GPU machine "auto" must pick CuPy
        assert device == "cuda"
    else:
        assert xp is np and device == "cpu"
        with pytest.raises(RuntimeError, match="needs CuPy with a working GPU.*device='cpu'"):
            array_backend("cuda")


def test_synthetic_tumour_differs_from_normal_in_texture_not_colour(positive_slide):
    img, tumour, tissue = positive_slide["image"], positive_slide["tumour"], positive_slide["tissue"]
    rng = np.random.default_rng(0)
    size = 96

    def sample(region: np.ndarray, n: int = 25) -> list[np.ndarray]:
        out = []
        for _ in range(20000):
            y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
            if region[y : y + size, x : x + size].mean() > 0.95:
                out.append(img[y : y + size, x : x + size])
            if len(out) == n:
                break
        return out

    tum, nor = sample(tumour), sample(tissue & ~tumour)
    assert len(tum) >= 10 and len(nor) >= 10
    area_t = np.median([mean_nucleus_area(p, 0.5) for p in tum])
    area_n = np.median([mean_nucleus_area(p, 0.5) for p in nor])
    assert area_t > 1.5 * area_n  # the intended texture statistic: nucleus size
    colour_t = np.mean([p.reshape(-1, 3).mean(0) for p in tum], 0)
    colour_n = np.mean([p.reshape(-1, 3).mean(0) for p in nor], 0)
    assert np.abs(colour_t - colour_n).max() < 8  # mean colour nearly the same: not separable by colour alone


def test_ground_truth_mask_matches_the_slide(synthetic_entries):
    pos = [e for e in synthetic_entries if e["label"] == 1]
    neg = [e for e in synthetic_entries if e["label"] == 0]
    assert pos and neg
    for e in pos:
        mask = np.asarray(Image.open(e["tumour_mask"])) > 0
        assert 0.005 < mask.mean() < 0.2
        assert 0.01 <= e["tumour_fraction"] <= 0.11
    for e in neg:
        assert not (np.asarray(Image.open(e["tumour_mask"])) > 0).any()


def test_tiling_qc_image_tints_and_outlines_exactly_the_patches_area():
    from monai_icmil.visualize import tiling_qc_image

    thumb = np.full((40, 60, 3), 200, np.uint8)
    # two touching 10x10-thumbnail-px patches (footprint 40 level-0 px at downsample 4) and one past the edge
    coords = np.array([[40, 40], [80, 40], [220, 140]])
    qc = tiling_qc_image(thumb, 4.0, coords, 40.0, color=(0, 0, 255), alpha=0.5)
    changed = np.any(qc != 200, axis=-1)
    expected = np.zeros((40, 60), bool)
    expected[10:20, 10:30] = True
    expected[35:40, 55:60] = True  # clipped at the border, drawn without error
    np.testing.assert_array_equal(changed, expected)
    assert qc[10, 15].tolist() == [0, 0, 255] and qc[19, 29].tolist() == [0, 0, 255]  # the outline
    assert qc[15, 15].tolist() == [100, 100, 228]  # inside: tinted
    assert qc[15, 19].tolist() == qc[15, 20].tolist() == [50, 50, 241]  # the seam: both patches' edges, fainter
    small = tiling_qc_image(thumb, 8.0, coords, 40.0, color=(0, 0, 255), alpha=0.5)  # 5 px patches: no edges
    assert small[7, 9].tolist() == small[7, 10].tolist() == [100, 100, 228]  # the seam, tinted only
    np.testing.assert_array_equal(tiling_qc_image(thumb, 4.0, np.zeros((0, 2)), 40.0), thumb)
    mask = np.zeros((4, 6), bool)
    mask[1, 1] = True  # one mask pixel = 40 level-0 px = thumbnail rows and columns 10-19
    outlined = tiling_qc_image(thumb, 4.0, np.zeros((0, 2)), 40.0, mask=mask, mask_downsample=40.0)
    assert outlined[10, 15].tolist() == outlined[19, 10].tolist() == [0, 220, 0]  # the tissue mask's outline
    assert outlined[15, 15].tolist() == outlined[9, 15].tolist() == [200, 200, 200]
    with pytest.raises(ValueError, match="mask_downsample"):
        tiling_qc_image(thumb, 4.0, coords, 40.0, mask=mask)


def test_score_overlay_colours_exactly_each_scored_patch():
    import matplotlib

    from monai_icmil.visualize import score_overlay

    thumb = np.full((20, 30, 3), 100, np.uint8)
    grid = np.full((4, 6), np.nan, np.float32)  # patches of 10 level-0 px = 5 thumbnail px at downsample 2
    grid[1, 2], grid[3, 5] = 1.0, 0.0
    drawn = score_overlay(thumb, 2.0, grid, 10.0)
    jet = matplotlib.colormaps["jet"]
    expected = np.full((20, 30, 3), 100.0)
    expected[5:10, 10:15] = 50 + 0.5 * np.asarray(jet(1.0)[:3]) * 255
    expected[15:20, 25:30] = 50 + 0.5 * np.asarray(jet(0.0)[:3]) * 255
    np.testing.assert_allclose(drawn, expected, atol=1)
    half = score_overlay(thumb, 2.0, grid, 10.0, vmax=2.0)  # 1.0 is mid-scale now
    np.testing.assert_allclose(half[7, 12], 50 + 0.5 * np.asarray(jet(0.5)[:3]) * 255, atol=2)


def test_heatmap_panels_show_the_slide_each_overlay_and_a_colour_bar_from_0_to_1(tmp_path):
    import matplotlib
    from PIL import Image

    from monai_icmil.visualize import heatmap_panels, save_heatmaps, score_overlay

    thumb = np.full((60, 90, 3), 120, np.uint8)
    grid = np.full((6, 9), np.nan, np.float32)
    grid[2, 3] = 1.0
    maps = {"attention": grid, "instance probability": np.where(np.isnan(grid), np.nan, 0.0)}
    picture = heatmap_panels(thumb, 2.0, maps, 20.0, title="slide 1")
    overlays = [score_overlay(thumb, 2.0, g, 20.0) for g in maps.values()]
    top, left = 26 + 22, 10  # title band, name band; the first panel at the padding
    np.testing.assert_array_equal(picture[top : top + 60, left : left + 90], thumb)  # the slide, untouched
    x = left + 90 + 10
    for overlay in overlays:  # each overlay in its panel, then its colour bar: red (1) on top, dark blue (0) below
        np.testing.assert_array_equal(picture[top : top + 60, x : x + 90], overlay)
        bar = picture[top : top + 60, x + 90 + 5 + 7]
        jet = matplotlib.colormaps["jet"]
        np.testing.assert_allclose(bar[2], np.asarray(jet(1.0 - 2 / 59)[:3]) * 255, atol=6)
        np.testing.assert_allclose(bar[-3], np.asarray(jet(2 / 59)[:3]) * 255, atol=6)
        x += 90 + 5 + 14 + 34 + 10
    assert picture.shape == (26 + 22 + 60 + 10, x, 3)
    assert (picture[:26] < 128).any()  # the title is written
    for name in ("h.jpg", "h.png"):
        saved = np.asarray(Image.open(save_heatmaps(tmp_path / name, thumb, 2.0, maps, 20.0, "slide 1")).convert("RGB"))
        assert saved.shape == picture.shape and np.abs(saved.astype(int) - picture).mean() < 3


def test_overlap_grid_averages_the_patches_covering_each_cell():
    from monai_icmil.visualize import overlap_grid, score_grid

    # patches of 20 level-0 px stepping by 10: each covers 2 x 2 cells of 10 px
    coords = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], float)
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    grid = overlap_grid(coords, scores, 20.0, 10.0, (40, 30))
    assert grid.shape == (3, 4)
    assert grid[0, 0] == 1.0 and grid[0, 1] == 1.5 and grid[0, 2] == 2.0  # cell (1, 0): patches 0 and 1
    assert grid[1, 1] == 2.5 and grid[2, 2] == 4.0 and grid[1, 0] == 2.0  # the centre: all four
    assert np.isnan(grid[:, 3]).all()
    plain = np.array([[0, 0], [20, 0]], float)  # no overlap: the patch grid itself
    np.testing.assert_array_equal(
        overlap_grid(plain, np.array([0.2, 0.7]), 20.0, 20.0, (40, 30)),
        score_grid(plain, np.array([0.2, 0.7]), 20.0, (40, 30)),
    )


def test_each_patch_has_its_own_cell_when_the_footprint_is_not_a_whole_number_of_pixels():
    """Level 1 of an SVS is often 4.000121 x level 0: the grid puts patch k at round(k * footprint), half a pixel
    either side of the exact multiple; every patch must still land in its own cell (none shifted, no holes)."""
    from monai_icmil.visualize import overlap_grid, score_grid

    footprint = 256 * 4.000121
    ks = np.arange(60)
    coords = np.stack(np.meshgrid(np.round(ks * footprint), np.round(ks[:10] * footprint)), -1).reshape(-1, 2)
    scores = np.arange(len(coords), dtype=np.float32)
    grid = score_grid(coords, scores, footprint, (int(61 * footprint), int(11 * footprint)))
    np.testing.assert_array_equal(grid[:10, :60].ravel(), scores)  # row-major: patch i in cell i
    step = 221.5  # a heatmap stride of half a 443 px read: patches every 221.5 level-0 px
    xs = np.round(np.arange(40) * step)
    dense = overlap_grid(np.stack([xs, np.zeros_like(xs)], 1), np.ones(40), 2 * step, step, (int(42 * step), 443))
    assert not np.isnan(dense[0, :41]).any()  # covered without holes


def test_maps_of_an_overlapping_training_grid_average_the_patches_and_uniform_attention_is_mid_scale():
    import json
    from types import SimpleNamespace

    from monai_icmil.handlers.writers import SlidePrediction, geojson_patches
    from monai_icmil.visualize import overlap_grid

    coords = np.array([[0, 0], [10, 0], [0, 10], [10, 10]])  # 20 px patches at a stride of 10
    scores = {"probs": np.array([0.4, 0.6]), "instance_prob": np.array([0.1, 0.2, 0.3, 0.4]), "attention": np.ones(4)}
    reader = SimpleNamespace(dimensions=(40, 30), level_downsamples=[1.0])
    tiles = {"level": 0, "read_size": 20, "patch_size": 20, "stride": 10}
    pred = SlidePrediction("s", "s.tif", reader, tiles, coords, scores, Path("."), ["normal", "tumour"], None)
    assert pred.cell == 10.0
    maps = pred.maps()
    np.testing.assert_array_equal(
        maps["instance probability"], overlap_grid(coords, scores["instance_prob"], 20.0, 10.0, (40, 30))
    )
    assert maps["instance probability"][1, 1] == pytest.approx(0.25)  # the centre cell: all four patches
    covered = maps["attention (min-max)"][~np.isnan(maps["attention (min-max)"])]
    assert covered.size == 9 and (covered == 0.5).all()  # equal attention: neither most nor least attended
    plain = SlidePrediction("s", "s.tif", reader, {**tiles, "stride": 20}, coords[:1], scores, Path("."), None, None)
    assert plain.cell == 20.0
    collection = geojson_patches(coords[:2], 20.0, {"instance_probability": np.array([0.5, np.nan])})
    text = json.dumps(collection, allow_nan=False)  # strict JSON: a NaN score is left out, not written as NaN
    assert [f["properties"]["measurements"] for f in json.loads(text)["features"]] == [
        {"instance_probability": 0.5},
        {},
    ]


def test_with_stride_copies_the_tiling_with_an_overlapping_grid():
    from monai.transforms import Compose

    from monai_icmil.data.tiling import TilingConfig
    from monai_icmil.inference import with_stride
    from monai_icmil.transforms import GridPatchCoordsd, TissueMaskd

    tiling = Compose([TissueMaskd("image"), GridPatchCoordsd("image", patch_size=64, mpp=1.0)])
    dense = with_stride(tiling, 32)
    assert dense.transforms[1].transform.stride == 32 and tiling.transforms[1].transform.stride is None
    assert with_stride(TilingConfig(patch_size=64, mpp=1.0), 16).stride == 16
    with pytest.raises(ValueError, match="heatmap_stride must be a positive divisor of the patch size \\(64\\)"):
        with_stride(tiling, 24)


def test_qc_overview_pages_show_each_slide_in_its_cell_and_mark_failed_and_empty_ones(tmp_path):
    from monai_icmil.visualize import save_contact_sheets, save_qc_overview, save_tiling_qc

    for name, color, shape in (("wide", (200, 30, 30), (200, 300)), ("tall", (30, 30, 200), (400, 100))):
        thumb = np.empty((*shape, 3), np.uint8)
        thumb[:] = color
        save_tiling_qc(tmp_path / f"{name}.jpg", thumb, 1.0, np.zeros((0, 2)), 1.0, caption=f"{name}: a caption")
    save_tiling_qc(tmp_path / "blank.jpg", np.full((64, 64, 3), 240, np.uint8), 1.0, np.zeros((0, 2)), 1.0, "blank")
    top_green = np.full((128, 128, 3), (200, 200, 0), np.uint8)
    top_green[:32] = (0, 150, 0)
    save_tiling_qc(tmp_path / "plain.jpg", top_green, 1.0, np.zeros((0, 2)), 1.0)  # no caption: nothing to cut
    rows = [
        {"slide": "wide", "status": "ok", "patches": "10"},
        {"slide": "tall", "status": "ok", "patches": "5"},
        {"slide": "bad", "status": "failed: OSError: truncated file; copy the slide again", "patches": ""},
        {"slide": "blank", "status": "empty (no tissue patches)", "patches": "0"},
        {"slide": "lost", "status": "ok", "patches": "3"},  # its picture is missing
        {"slide": "plain", "status": "ok", "patches": "1"},
    ]
    pages = save_qc_overview(tmp_path, rows, per_page=3, ncols=2, tile=64)
    assert [p.name for p in pages] == ["page_001.jpg", "page_002.jpg"]
    first, second = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in pages)
    assert first.shape[0] == second.shape[0] == 18 + 2 * 100  # a title line, then rows of 64 + 36 px

    def picture(page, i):  # cell i's 64 x 64 picture area
        x, y = (i % 2) * 72 + 4, 18 + (i // 2) * 100 + 4
        return page[y : y + 64, x : x + 64]

    def caption(page, i):
        x, y = (i % 2) * 72 + 4, 18 + (i // 2) * 100 + 4 + 64
        return page[y : y + 34, x : x + 64]

    def near(area, color, tol=40):
        return (np.abs(area - np.asarray(color)).max(axis=-1) < tol).mean()

    for i, color, (h, w) in ((0, (200, 30, 30), (43, 64)), (1, (30, 30, 200), (64, 16))):
        filled = near(picture(first, i), color)
        assert filled == pytest.approx(h * w / 64**2, abs=0.04)  # the picture, its aspect kept, its caption cut off
        assert near(picture(first, i)[32 - h // 3 : 32 + h // 3, 32 - w // 3 : 32 + w // 3], color) == 1.0

    def red(area):  # text in red: red well above green and blue
        return ((area[..., 0] - area[..., 1] > 60) & (area[..., 0] - area[..., 2] > 60)).mean()

    def orange(area):  # text in orange: red above green above blue
        return ((area[..., 0] - area[..., 1] > 40) & (area[..., 1] - area[..., 2] > 30)).mean()

    assert near(picture(first, 2), (205, 205, 205), 20) > 0.6 and red(picture(first, 2)) > 0.01  # the reason
    assert red(caption(first, 2)) > 0.01 and red(caption(first, 0)) == red(caption(first, 1)) == 0
    assert orange(caption(second, 0)) > 0.01 and orange(caption(first, 0)) == 0
    assert near(picture(second, 0), (240, 240, 240), 12) > 0.9
    assert near(picture(second, 1), (205, 205, 205), 20) > 0.6  # no picture: a grey cell, not an error
    assert near(picture(second, 2)[1:15], (0, 150, 0)) > 0.95 and near(picture(second, 2)[18:], (200, 200, 0)) > 0.95
    assert save_qc_overview(tmp_path, rows[:3], per_page=3) == [tmp_path / "overview" / "page_001.jpg"]
    assert not (tmp_path / "overview" / "page_002.jpg").exists()  # a page left from the larger cohort
    with pytest.raises(ValueError, match="per_page"):
        save_qc_overview(tmp_path, rows, per_page=0)
    # the same for PNGs (the caption's height travels in a text chunk) and with a long, dark caption
    blue = np.full((64, 64, 3), (30, 30, 200), np.uint8)
    save_tiling_qc(tmp_path / "png.png", blue, 1.0, np.zeros((0, 2)), 1.0, caption="W" * 40)
    (page,) = save_contact_sheets(tmp_path / "png_sheet", [{"picture": tmp_path / "png.png"}], "t", tile=64)
    assert near(np.asarray(Image.open(page).convert("RGB")).astype(int)[18 + 4 :][:64, 4:68], (30, 30, 200)) > 0.97
    (page,) = save_contact_sheets(tmp_path / "array_sheet", [{"picture": blue}], "t", tile=64)  # an array as is
    assert near(np.asarray(Image.open(page).convert("RGB")).astype(int)[18 + 4 :][:64, 4:68], (30, 30, 200)) > 0.97


def test_prepare_draws_a_qc_image_per_slide_matching_its_grid(cmu_slide, tmp_path):
    from monai_icmil.data.prepare import prepare_coords
    from monai_icmil.data.store import CoordsStore
    from monai_icmil.data.tiling import TilingConfig
    from monai_icmil.visualize import tiling_qc_image

    items = [{"slide_id": "cmu", "image": cmu_slide}]
    tiling, store = TilingConfig(patch_size=64, mpp=1.0), CoordsStore(tmp_path / "c")
    tiles = prepare_coords(items, tiling, store, progress=False, qc_dir=tmp_path / "qc")
    jpg = tmp_path / "qc" / "cmu.jpg"
    img = np.asarray(Image.open(jpg).convert("RGB")).astype(float)
    thumb, ds = open_slide(cmu_slide).thumbnail(1024)
    assert img.shape == (thumb.shape[0] + 18, thumb.shape[1], 3)  # a caption band above the thumbnail
    coords, side = tiles["cmu"]["coords"], 128 / ds  # 64 px at 1 um/px = 128 level-0 px on this 0.5 um/px slide
    drawn = tiling_qc_image(thumb, ds, coords, 128.0)
    error = np.abs(img[18:] - drawn).mean()  # the JPEG is that picture, to JPEG's error
    assert error < 6 and np.abs(img[18:] - thumb).mean() > 3 * error
    tinted = np.any(drawn != thumb, axis=-1).mean()
    assert len(coords) > 50 and tinted == pytest.approx(
        len(coords) * side**2 / thumb.shape[0] / thumb.shape[1], rel=0.1
    )
    jpg.unlink()
    gone = {"slide_id": "gone", "image": str(tmp_path / "gone.svs")}
    with pytest.warns(UserWarning, match="'gone'"):
        prepare_coords([*items, gone], tiling, store, progress=False, qc_dir=tmp_path / "qc")
    assert jpg.is_file()  # a slide already tiled gets its missing image back
    assert [p.name for p in (tmp_path / "qc" / "overview").iterdir()] == ["page_001.jpg"]  # the cohort's overview
    import csv

    rows = {r["slide"]: r for r in csv.DictReader(open(tmp_path / "qc" / "tiling.csv"))}
    assert rows["cmu"]["status"] == "ok" and int(rows["cmu"]["patches"]) == len(coords)
    assert rows["cmu"]["level"] == "0" and rows["cmu"]["read_size"] == "128"
    assert float(rows["cmu"]["mpp"]) == pytest.approx(128 / 64 * 0.499, abs=1e-3)  # the patches' own, not the 1.0 asked
    assert float(rows["cmu"]["area_mm2"]) == pytest.approx(len(coords) * (0.064 * 0.998) ** 2, abs=1e-3)
    assert rows["gone"]["status"].startswith("failed: ") and rows["gone"]["patches"] == ""


def test_pen_and_marker_ink_are_not_tissue_and_a_pen_circle_does_not_fill_the_glass_inside_it():
    """Near-black pen has a high HSV saturation and green/blue marker is saturated: both would pass the saturation
    threshold, and a pen circle drawn round the tissue would have the glass inside it filled in as tissue."""
    from monai_icmil.data.tiling import tissue_mask_from_rgb

    rng = np.random.default_rng(0)
    h, w = 120, 160
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), 242, np.uint8)
    tissue = ((yy - 60) / 25.0) ** 2 + ((xx - 80) / 35.0) ** 2 < 1
    img[tissue] = np.clip(np.array([200, 120, 185]) + rng.normal(0, 8, (tissue.sum(), 3)), 0, 255)  # H&E pink-purple
    ring = np.abs(np.hypot((yy - 60) / 45.0, (xx - 80) / 60.0) - 1) < 0.04  # a pen circle round it, on the glass
    img[ring] = (28, 28, 36)
    stroke = (yy >= 4) & (yy < 8) & (xx >= 10) & (xx < 70)
    img[stroke] = (40, 160, 90)  # green marker
    dots = (np.hypot(yy - 110, xx - 20) < 4) | (np.hypot(yy - 12, xx - 145) < 4)
    img[dots] = (50, 75, 175)  # blue marker dots on the glass (a pathologist's marks)
    mask, _ = tissue_mask_from_rgb(img, min_area_px=4, device="cpu")
    assert not mask[ring].any() and not mask[stroke].any() and not mask[dots].any()
    assert (mask & tissue).sum() / tissue.sum() > 0.95 and (mask & ~tissue).sum() < 0.05 * tissue.sum()
    inked, _ = tissue_mask_from_rgb(img, min_area_px=4, device="cpu", exclude_ink=False)
    assert inked[ring].all() and inked[(~tissue) & (np.hypot((yy - 60) / 45.0, (xx - 80) / 60.0) < 0.9)].all()


def test_tinted_glass_is_not_tissue_and_tissue_on_it_is_found_as_on_white_glass():
    """Yellowish, bluish and pinkish glass (scanners, mountants) has an HSV saturation above the 0.05 floor: unbalanced,
    a blank slide of it was tiled whole or in part. Balanced by the glass's colour it is blank, and H&E on it is found
    as on white glass; on white (neutral) glass nothing changes."""
    from monai_icmil.data.tiling import background_color, tissue_mask_from_rgb

    rng = np.random.default_rng(0)
    h, w = 120, 160
    yy, xx = np.mgrid[:h, :w]
    tissue = ((yy - 60) / 40.0) ** 2 + ((xx - 80) / 55.0) ** 2 < 1
    for glass in ((228, 225, 242), (245, 240, 212), (244, 226, 238)):
        blank = np.clip(np.array(glass) + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)
        assert np.allclose(background_color(blank), glass, atol=3)
        unbalanced, _ = tissue_mask_from_rgb(blank, device="cpu", balance_background=False)
        assert unbalanced.mean() > 0.1, glass  # the glass taken as tissue before
        assert not tissue_mask_from_rgb(blank, device="cpu")[0].any(), glass
        blank[:, :40] = 255  # a quarter of white fill outside the scanned area: still white, still not the glass
        mask, thr = tissue_mask_from_rgb(blank, device="cpu")
        assert not mask.any() and thr == 0.05, glass  # noise under the floor does not lower it on a blank slide
        blank[:, :40] = np.clip(np.array(glass) + rng.normal(0, 2, (h, 40, 3)), 0, 255)
        blank[:4, :4] = np.clip(253 + rng.normal(0, 1, (4, 4, 3)), 0, 255)  # a bubble: white, not brighter glass
        assert background_color(blank) is not None and not tissue_mask_from_rgb(blank, device="cpu")[0].any(), glass
        slide = blank.copy()
        slide[tissue] = np.clip(
            np.array([200, 120, 185]) * np.array(glass) / 255 + rng.normal(0, 6, (tissue.sum(), 3)), 0, 255
        )
        mask, _ = tissue_mask_from_rgb(slide, min_area_px=4, device="cpu")
        assert (mask & tissue).sum() > 0.97 * tissue.sum() and (mask & ~tissue).sum() < 0.03 * tissue.sum(), glass
    grey_fill = np.clip(np.array((245, 240, 212)) + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)
    grey_fill[:, :50] = 200  # grey outside the scanned area (or a darker corner): balancing must not colour it
    assert not tissue_mask_from_rgb(grey_fill, device="cpu")[0].any()
    dense = np.clip(np.array((236, 214, 230)) + rng.normal(0, 3, (h, w, 1)), 0, 255).astype(np.uint8)  # pale stain
    dense[tissue] = (200, 120, 185)
    dense[:, :5] = (250, 246, 232)  # 3 % of tinted glass: the brightest tenth is mostly pale stain
    assert background_color(dense) is None  # pale stain is not taken for the glass: the slide is left unbalanced
    white = np.clip(242 + rng.normal(0, 2, (h, w, 1)), 0, 255).repeat(3, axis=2).astype(np.uint8)  # grey noise
    white[tissue] = np.clip(np.array([200, 120, 185]) + rng.normal(0, 8, (tissue.sum(), 3)), 0, 255)
    for a, b in zip(
        tissue_mask_from_rgb(white, device="cpu"), tissue_mask_from_rgb(white, device="cpu", balance_background=False)
    ):
        np.testing.assert_array_equal(a, b)  # neutral glass: the same mask and threshold


def test_a_crop_without_glass_is_all_tissue_not_split_by_otsu():
    """A region export or a TMA core cropped to its tissue shows no glass: Otsu's threshold fell inside the tissue and
    dropped its paler part (another generator's crop: recall 0.28). Without glass (under 0.5 % of glass-like pixels)
    the threshold is the floor, and the detector says the mask covers the whole slide; with glass beside the same
    tissue, Otsu's split is taken as before."""
    from monai_icmil.data.tiling import _doubtful_mask, tissue_mask_from_rgb

    rng = np.random.default_rng(1)
    h, w = 120, 160
    yy, xx = np.mgrid[:h, :w]
    dense = ((yy - 60) / 35.0) ** 2 + ((xx - 80) / 50.0) ** 2 < 1
    crop = np.clip(np.array([215, 150, 200]) + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)  # pale, smooth
    crop[dense] = np.clip(np.array([140, 50, 130]) + rng.normal(0, 6, (dense.sum(), 3)), 0, 255)
    mask, thr = tissue_mask_from_rgb(crop, min_area_px=4, device="cpu")
    assert thr == 0.05 and mask.all()
    assert "covers 100% of the slide" in _doubtful_mask(crop, mask, thr, 0.05)
    beside = crop.copy()
    beside[:, :24] = 242  # a strip of white glass (15 %)
    mask, thr = tissue_mask_from_rgb(beside, min_area_px=4, device="cpu")
    assert thr > 0.05 and not mask[:, :24].any()


def test_faded_tissue_is_kept_at_half_the_floor_with_a_warning_and_a_slide_without_glass_is_left_unbalanced():
    """Faded H&E just under the 0.05 floor (saturation 0.033) was mostly dropped; the floor is halved when faint colour
    outnumbers what the mask keeps, and the detector says so. A slide cropped to its tissue has no glass to balance by
    and is left as it was; normal H&E on white glass gets no warning."""
    import warnings

    from monai_icmil.data.tiling import _doubtful_mask, background_color, tissue_mask_from_rgb

    rng = np.random.default_rng(0)
    h, w = 120, 160
    yy, xx = np.mgrid[:h, :w]
    faded = np.full((h, w, 3), 244, np.uint8)
    tissue = ((yy - 60) / 40.0) ** 2 + ((xx - 80) / 55.0) ** 2 < 1
    texture = rng.normal(0, 3, (tissue.sum(), 1))  # nuclei and stroma: brightness varies from pixel to pixel
    faded[tissue] = np.clip(np.array([240, 232, 238]) + texture, 0, 255)  # saturation ~0.033: under the 0.05 floor
    faded[55:65, 75:85] = (230, 200, 225)  # a darker spot above it
    mask, thr = tissue_mask_from_rgb(faded, min_area_px=4, device="cpu")
    assert thr == pytest.approx(0.025) and (mask & tissue).sum() > 0.97 * tissue.sum() and not (mask & ~tissue).any()
    assert "lowered from min_saturation 0.050 to 0.025" in _doubtful_mask(faded, mask, thr, 0.05)
    kept, thr = tissue_mask_from_rgb(faded, min_area_px=4, device="cpu", adapt_floor=False)  # as before: the spot
    assert thr == 0.05 and 0 < kept.sum() < 0.2 * tissue.sum()
    assert "faded H&E or a pale counterstain is mostly dropped" in _doubtful_mask(faded, kept, thr, 0.05)
    smear = faded.copy()
    smear[tissue] = (240, 232, 238)  # the same faint colour, smooth: mountant or haze, not tissue
    mask, thr = tissue_mask_from_rgb(smear, min_area_px=4, device="cpu")
    assert thr == 0.05 and mask.sum() < 0.2 * tissue.sum()
    cropped = np.full((h, w, 3), (200, 120, 185), np.uint8)
    cropped[tissue] = (150, 60, 140)
    assert background_color(cropped) is None  # its brightest pixels are stain, not glass: left unbalanced
    for a, b in zip(
        tissue_mask_from_rgb(cropped, device="cpu"),
        tissue_mask_from_rgb(cropped, device="cpu", balance_background=False),
    ):
        np.testing.assert_array_equal(a, b)
    normal = faded.copy()
    normal[tissue] = (200, 120, 185)
    mask, thr = tissue_mask_from_rgb(normal, min_area_px=4, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _doubtful_mask(normal, mask, thr, 0.05) is None


def test_pale_tissue_beside_dense_tissue_is_kept_and_glass_of_another_tint_is_not():
    """Otsu's threshold splits dense, dark tissue from pale stroma when both are on a slide: the pale half was
    dropped. The pixels under it are split again and their textured part kept; a smooth band of bluer glass (a
    gradient, a coverslip's edge) between the two thresholds stays out, and so does glass enclosed by tissue beyond
    ``max_hole_px``."""
    rng = np.random.default_rng(0)
    h, w = 120, 200
    img = np.clip(244 + rng.normal(0, 1.5, (h, w, 1)), 0, 255).repeat(3, axis=2)
    dense, pale = np.zeros((h, w), bool), np.zeros((h, w), bool)
    dense[20:100, 20:80], pale[20:100, 95:155] = True, True
    img[dense] = np.array([150, 60, 140]) + rng.normal(0, 12, (dense.sum(), 1))  # saturation ~0.6
    img[pale] = np.array([235, 205, 222]) + rng.normal(0, 10, (pale.sum(), 1))  # ~0.13, textured
    img[:, 180:] = np.array([226, 234, 248]) + rng.normal(0, 1.0, (h, 20, 1))  # ~0.09, smooth: bluer glass
    img = np.clip(img, 0, 255).astype(np.uint8)
    before, otsu = tissue_mask_from_rgb(img, min_area_px=16, device="cpu", pale_tissue=False)
    mask, thr = tissue_mask_from_rgb(img, min_area_px=16, device="cpu")
    assert (before & pale).sum() < 0.5 * pale.sum() and (before & dense).sum() > 0.97 * dense.sum()  # as it was
    assert 0.05 <= thr < otsu
    assert (mask & pale).sum() > 0.97 * pale.sum() and (mask & dense).sum() > 0.97 * dense.sum()
    assert not mask[:, 185:].any() and not mask[:5].any()  # the bluer glass and the white glass
    # a slide of one stain: Otsu's threshold is already under the tissue and the step leaves it alone
    one = img.copy()
    one[pale] = np.clip(np.array([150, 60, 140]) + rng.normal(0, 12, (pale.sum(), 1)), 0, 255)
    for a, b in zip(
        tissue_mask_from_rgb(one, min_area_px=16, device="cpu"),
        tissue_mask_from_rgb(one, min_area_px=16, device="cpu", pale_tissue=False),
    ):
        np.testing.assert_array_equal(a, b)


def test_the_mask_warnings_count_enclosed_holes_and_leave_a_floor_reached_by_the_pale_split_alone():
    """A blank slide ringed by bubbles keeps its "covers" warning once the ring's inside is no longer filled; a
    threshold at the floor because the pale-tissue split went down to it (Otsu's above it) is not faded stain."""
    from monai_icmil.data.tiling import _doubtful_mask

    ring = np.ones((100, 100), bool)
    ring[10:90, 10:90] = False
    ring[12:88, 12:88] = True
    ring[20:80, 20:80] = False  # 36 % of the slide enclosed, 64 % in the mask
    glass = np.full((100, 100, 3), 240, np.uint8)
    assert "covers 100% of the slide (with the holes it encloses)" in _doubtful_mask(glass, ring, 0.1, 0.05)
    rng = np.random.default_rng(0)
    img = np.clip(244 + rng.normal(0, 1.5, (100, 100, 1)), 0, 255).repeat(3, axis=2)  # white glass
    img[30:70] = np.array([240, 234, 238]) + rng.normal(0, 2, (40, 100, 1))  # faint colour, ~0.03: 40 %
    img = np.clip(img, 0, 255).astype(np.uint8)
    a = rng.uniform(0.3, 1.0, (30, 100, 1))  # dense tissue, 30 %, saturation ~0.2-0.6: Otsu's threshold in it
    img[:30] = (244 * (1 - a) + np.array([150, 60, 140]) * a).astype(np.uint8)
    mask = np.zeros((100, 100), bool)
    mask[:30] = True
    assert otsu_threshold(tissue_saturation_of(img)) > 0.05
    assert _doubtful_mask(img, mask, 0.05, 0.05) is None
    img[:30] = img[30:60]  # only the faint colour: Otsu's threshold under the floor
    mask[:] = False
    mask[:5, :5] = True
    assert "faded H&E or a pale counterstain is mostly dropped" in _doubtful_mask(img, mask, 0.05, 0.05)


def tissue_saturation_of(img):
    from monai_icmil.data.tiling import tissue_saturation

    return tissue_saturation(img)


def test_holes_up_to_max_hole_are_filled_and_larger_glass_enclosed_by_tissue_is_not(tmp_path):
    img = np.full((120, 120, 3), 245, np.uint8)
    img[10:110, 10:110] = (200, 110, 190)  # tissue
    img[20:60, 20:60] = 245  # a lumen: 1,600 px
    img[80:85, 80:85] = 245  # a small hole: 25 px
    every, _ = tissue_mask_from_rgb(img, median_size=1, min_area_px=30, device="cpu")
    small, _ = tissue_mask_from_rgb(img, median_size=1, min_area_px=30, device="cpu", max_hole_px=100)
    assert every[20:60, 20:60].all() and every[80:85, 80:85].all()  # max_hole_px None: every hole filled
    assert not small[20:60, 20:60].any() and small[80:85, 80:85].all()
    # compute_tissue_mask: the area in um^2 (8 um mask pixels on this 0.5 um/px slide read in 16 x 16 blocks)
    big = np.kron(img, np.ones((16, 16, 1), np.uint8))
    write_slide(tmp_path / "ring.tif", big, mpp=0.5)
    reader = open_slide(tmp_path / "ring.tif")
    lumen = (slice(22, 58), slice(22, 58))  # 1,600 mask px = 102,400 um^2
    assert compute_tissue_mask(reader, mask_mpp=8.0).mask[lumen].mean() < 0.05  # the default: 50,000 um^2
    assert compute_tissue_mask(reader, mask_mpp=8.0, max_hole_um2=200_000).mask[lumen].all()
    assert compute_tissue_mask(reader, mask_mpp=8.0, max_hole_um2=None).mask[lumen].all()


def test_bluish_hematoxylin_and_a_dark_purple_fold_are_not_ink():
    from monai_icmil.data.tiling import ink, saturation

    px = np.array([[[50, 60, 120], [70, 80, 150], [57, 30, 67], [28, 28, 36], [40, 160, 90], [0, 0, 0]]], np.uint8)
    assert ink(px, saturation(px)).tolist() == [[False, False, False, True, True, True]]
    # blue marker (greener and much bluer than red: hematoxylin passes more red than green) is ink; teal-ish and pale
    # blue are not told from bluish hematoxylin, and stay
    px = np.array([[[50, 70, 170], [30, 60, 190], [90, 120, 200], [120, 140, 190], [60, 70, 145]]], np.uint8)
    assert ink(px, saturation(px)).tolist() == [[True, True, True, False, False]]


def test_background_balancing_stays_out_of_the_tiling_signature_unless_turned_off():
    """Coordinate and feature stores made before it stay current; turning it off is a new tiling."""
    from monai_icmil.data.tiling import TilingConfig
    from monai_icmil.transforms import TissueMask
    from monai_icmil.utils import component_signature

    for name, changed in (
        ("balance_background", False), ("adapt_floor", False), ("pale_tissue", False), ("max_hole_um2", None),
    ):  # fmt: skip
        assert name not in TissueMask().kwargs and name not in TilingConfig().params()
        assert component_signature(TissueMask()) != component_signature(TissueMask(**{name: changed}))
        off = TilingConfig(**{name: changed})
        assert (
            off.params()[name] is changed
            and off.transforms(device="cpu").transforms[0].transform.kwargs[name] is changed
        )
    assert TilingConfig(max_hole_um2=1e4).params()["max_hole_um2"] == 1e4
    assert "max_hole_um2" not in TissueMask(max_hole_um2=50_000).kwargs  # the default as a whole number
    # the words a command line passes: "false" is off, not a true string
    assert (
        TissueMask(pale_tissue="false").kwargs["pale_tissue"] is False
        and "pale_tissue" not in TissueMask(pale_tissue="True").kwargs
    )
    assert TilingConfig(balance_background="off").params()["balance_background"] is False
    assert component_signature(TissueMask(max_hole_um2=60_000)) == component_signature(TissueMask(max_hole_um2=6e4))
    for bad in (-1, "a lot", float("nan"), True):
        with pytest.raises(ValueError, match="max_hole_um2 must be an area in square micrometres"):
            TissueMask(max_hole_um2=bad)


def test_coordinates_tiled_by_an_earlier_detector_are_reused_and_said_to_be(synthetic_entries, tmp_path):
    import warnings

    from monai_icmil.data.prepare import prepare_coords
    from monai_icmil.data.store import CoordsStore
    from monai_icmil.data.tiling import DETECTOR_VERSION, TilingConfig

    items = [{"slide_id": "s0", "image": synthetic_entries[0]["image"]}]
    store, tiling = CoordsStore(tmp_path / "coords"), TilingConfig(patch_size=64, mpp=1.0)
    first = prepare_coords(items, tiling, store, progress=False)
    assert store.metadata("s0")["detector"] == DETECTOR_VERSION
    with warnings.catch_warnings(record=True) as said:  # the same version: reused without a word
        warnings.simplefilter("always")
        prepare_coords(items, tiling, store, progress=False)
    assert not [w for w in said if "earlier tissue detector" in str(w.message)]
    arrays, key = store.load("s0"), store.stored_key("s0")
    meta = {k: v for k, v in store.metadata("s0").items() if k != "detector"}  # as a store before the version
    store.save("s0", {k: v.numpy() for k, v in arrays.items()}, key, meta)
    with pytest.warns(UserWarning, match=r"1 slide\(s\) \(e\.g\. 's0'\) keep coordinates tiled by an earlier tissue"):
        again = prepare_coords(items, tiling, store, progress=False)
    np.testing.assert_array_equal(again["s0"]["coords"], first["s0"]["coords"])  # reused, not tiled again
    from monai_icmil.transforms import GridPatchCoordsd

    grid_only = GridPatchCoordsd("image", patch_size=64, mpp=1.0)  # no tissue detector: nothing to version
    store = CoordsStore(tmp_path / "grid")
    prepare_coords(items, grid_only, store, progress=False)
    assert "detector" not in store.metadata("s0")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        prepare_coords(items, grid_only, store, progress=False)
    assert not [w for w in said if "earlier tissue detector" in str(w.message)]
