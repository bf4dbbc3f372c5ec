# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
from __future__ import annotations

import json

import numpy as np

from monai_icmil.data.synthetic import SyntheticSlideConfig, main, make_dataset, render_slide

TINY = SyntheticSlideConfig(width=768, height=512)


def test_same_seed_same_slide_other_seed_other_slide():
    a, b, c = render_slide(1, True, TINY), render_slide(1, True, TINY), render_slide(2, True, TINY)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])


def test_stain_varies_between_slides():
    stains = [render_slide(i, False, TINY)["stain"]["h"] for i in range(3)]
    assert not np.allclose(stains[0], stains[1]) and not np.allclose(stains[1], stains[2])


def test_tumour_covers_the_requested_fraction_of_tissue():
    cfg = SyntheticSlideConfig(width=1024, height=768, tumour_fraction=(0.05, 0.05))
    r = render_slide(5, True, cfg)
    assert abs(r["tumour_fraction"] - 0.05) < 0.01
    assert not (r["tumour"] & ~r["tissue"]).any()
    assert not render_slide(5, False, cfg)["tumour"].any()


def test_dataset_is_reused_when_parameters_match(tmp_path):
    path = make_dataset(tmp_path, 2, 1, 1, seed=3, config=TINY, progress=False)
    mtime = (tmp_path / "slides" / "training_000.tiff").stat().st_mtime_ns
    assert make_dataset(tmp_path, 2, 1, 1, seed=3, config=TINY, progress=False) == path
    assert (tmp_path / "slides" / "training_000.tiff").stat().st_mtime_ns == mtime
    data = json.loads(path.read_text())
    assert sorted(e["label"] for e in data["training"]) == [0, 1]
    assert data["synthetic"]["seed"] == 3


def test_command_line_writes_a_datalist(tmp_path, capsys):
    main(
        [
            "--output_dir",
            str(tmp_path),
            "--num_training",
            "2",
            "--num_validation",
            "0",
            "--num_test",
            "0",
            "--width",
            "512",
            "--height",
            "512",
        ]
    )
    assert "datalist" in capsys.readouterr().out
    data = json.loads((tmp_path / "datalist.json").read_text())
    assert len(data["training"]) == 2 and data["validation"] == []


def test_patch_tumour_fraction_reads_the_ground_truth_mask(tmp_path):
    from PIL import Image

    from monai_icmil.data.synthetic import patch_tumour_fraction

    mask = np.zeros((64, 64), bool)
    mask[16:32, 16:32] = True  # level-0 pixels 256-511 (downsample 16)
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "m.png")
    coords = np.array([[256, 256], [0, 0], [128, 256], [448, 448]])
    frac = patch_tumour_fraction(coords, 256, tmp_path / "m.png", 16)
    np.testing.assert_allclose(frac, [1.0, 0.0, 0.5, 0.0625])  # the last overlaps a 4x4 corner of 16x16
    np.testing.assert_allclose(patch_tumour_fraction(coords, 256, mask, 16), frac)


def test_the_demo_generates_only_into_a_new_empty_or_own_folder_never_beside_a_users_slides(tmp_path):
    """demo.json's `synthetic` with --dataset_dir pointing at a folder of one's own slides whose datalist has another
    name: refused with the fix, before any file is written; a new folder, or one an interrupted generation left
    (it carries the marker), is generated into."""
    import pytest

    from monai_icmil.data.synthetic import SYNTHETIC_MARKER
    from monai_icmil.workflows.splits import DatasetSplits

    synthetic = {"num_training": 2, "num_validation": 1, "num_test": 1, "config": {"width": 768, "height": 512}}
    own = tmp_path / "own"
    (own / "slides").mkdir(parents=True)
    (own / "slides" / "a.tif").write_bytes(b"mine")
    (own / "my_list.json").write_text("{}")
    splits = DatasetSplits(own, "datalist.json", tmp_path / "out", synthetic=synthetic, progress=False)
    with pytest.raises(
        FileExistsError,
        match=r"own' holds files \(my_list.json, slides\) but no datalist 'datalist.json'.*--datalist <file>\) "
        r"\(datalists here\? my_list\.json\)",
    ):
        splits.items()
    assert sorted(p.name for p in (own / "slides").iterdir()) == ["a.tif"] and not (own / SYNTHETIC_MARKER).exists()
    left = tmp_path / "interrupted"
    (left / "slides").mkdir(parents=True)
    (left / SYNTHETIC_MARKER).touch()
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".DS_Store").write_bytes(b"")  # a file browser's, not slides
    for root in (tmp_path / "new", left, hidden):
        items = DatasetSplits(root, "datalist.json", tmp_path / "out", synthetic=synthetic, progress=False).items()
        assert len(items["training"]) == 2 and (root / SYNTHETIC_MARKER).exists()
