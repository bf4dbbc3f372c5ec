# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""HED stain augmentation and per-slide Macenko normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_icmil.data.slide import open_slide
from monai_icmil.data.store import feature_key
from monai_icmil.transforms.stain import HEStainNormalizer, RandHEDJitter, RandHEDJitterd, hed_to_rgb, rgb_to_hed


@pytest.fixture(scope="module")
def cmu(cmu_slide):
    reader = open_slide(cmu_slide)
    thumb, _ = reader.thumbnail(768)
    coords = np.array([[600, 900], [1000, 1400], [1400, 1800], [700, 2200]])
    patches = torch.as_tensor(reader.read_patches(coords, 128, 0, as_tensor=True))
    return thumb, patches


def test_hed_round_trip_is_exact_on_the_real_slide(cmu):
    _, patches = cmu
    x = patches.float() / 255
    torch.testing.assert_close(hed_to_rgb(rgb_to_hed(x)), x.clamp(min=1e-6), atol=1e-5, rtol=0)
    hed = rgb_to_hed(x)
    assert hed[:, 0].mean() > hed[:, 2].mean()  # an H&E slide: more haematoxylin than DAB


def test_hed_jitter_keeps_type_and_is_reproducible(cmu):
    _, patches = cmu
    x = patches.float() / 255
    a = RandHEDJitter(sigma=0.1, bias=0.05).set_random_state(3)
    b = RandHEDJitter(sigma=0.1, bias=0.05).set_random_state(3)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    assert ya.dtype == torch.float32 and ya.shape == x.shape and 0 <= ya.min() and ya.max() <= 1
    assert (ya - x).abs().mean() > 0.005
    assert a(patches).dtype == torch.uint8 and isinstance(a(patches[0].numpy()), np.ndarray)
    torch.testing.assert_close(RandHEDJitter(0.0, 0.0)(x), x.clamp(min=1e-6), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        RandHEDJitter()(torch.zeros(4, 8, 8))
    d = RandHEDJitterd(["plain", "copy"], sigma=0.1).set_random_state(0)({"plain": x[0], "copy": x[0]})
    torch.testing.assert_close(d["plain"], d["copy"])  # one draw for every key


def test_per_slide_normalisation_undoes_a_stain_shift(cmu):
    thumb, patches = cmu
    shift = RandHEDJitter(sigma=0.0, bias=0.0)
    shift._do_transform, shift._scale, shift._shift = True, np.array([[1.35, 0.7, 1.0]]), np.array([[0.0, 0.0, 0.0]])
    thumb_t = torch.as_tensor(thumb).permute(2, 0, 1)
    shifted_thumb = shift(thumb_t, randomize=False).permute(1, 2, 0).numpy()
    shifted = torch.stack([shift(p, randomize=False) for p in patches])
    before = (shifted.float() - patches.float()).abs().mean()
    a = HEStainNormalizer().fit(thumb, "original")(patches)
    b = HEStainNormalizer().fit(shifted_thumb, "shifted")(shifted)
    after = (a.float() - b.float()).abs().mean()
    assert a.dtype == torch.uint8 and a.shape == patches.shape
    assert after < 0.5 * before, (float(before), float(after))
    one = HEStainNormalizer().fit(thumb, "original")(patches[0].numpy())  # one patch, as a NumPy array
    assert isinstance(one, np.ndarray) and one.shape == tuple(patches.shape[1:])
    np.testing.assert_array_equal(one, a[0].numpy())
    with pytest.raises(ValueError, match=r"expects \[3, h, w\] or \[B, 3, h, w\] RGB, got shape \(8, 8, 3\)"):
        HEStainNormalizer().fit(thumb, "original")(np.zeros((8, 8, 3), np.uint8))


def test_a_slide_without_stained_tissue_cannot_be_normalised():
    blank = np.full((256, 256, 3), 243, np.uint8)
    with pytest.raises(ValueError, match="'blank.svs'.*too little stained tissue"):
        HEStainNormalizer().fit(blank, "blank.svs")
    with pytest.raises(RuntimeError, match="fit must be called first"):
        HEStainNormalizer()(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_stain_normalisation_is_part_of_the_feature_key(cmu_slide):
    plain = feature_key(cmu_slide, {"patch_size": 64}, "fp")
    assert feature_key(cmu_slide, {"patch_size": 64}, "fp", stain_normalize=False) == plain
    assert feature_key(cmu_slide, {"patch_size": 64}, "fp", stain_normalize=True) != plain


def test_a_run_with_stain_normalisation_and_hed_views(synthetic_dataset, tmp_path, caplog):
    import functools
    import json

    from monai_icmil.data.store import FeatureStore
    from monai_icmil.data.tiling import TilingConfig
    from monai_icmil.engines import BagPhase, Embed, EmbedderPhase
    from monai_icmil.networks import ABMIL
    from monai_icmil.transforms import BatchRandomViews
    from monai_icmil.workflows import ICMILWorkflow

    embedder_phase = EmbedderPhase(
        views=BatchRandomViews(32, hed_jitter=0.05),
        epochs=1,
        batches_per_epoch=2,
        batch_size=8,
        val_patches=16,
        num_workers=1,
        device="cpu",
        progress=False,
    )
    wf = ICMILWorkflow(
        dataset_dir=str(synthetic_dataset.parent),
        output_dir=str(tmp_path / "out"),
        tiling=TilingConfig(patch_size=32, mpp=1.0),
        embedder={"name": "resnet18_trunc", "input_size": 32},
        aggregator=functools.partial(ABMIL, hidden_dim=32),
        embed=Embed(batch_size=64, num_workers=1, progress=False),
        bag_phase=BagPhase(epochs=2, device="cpu", progress=False),
        embedder_phase=embedder_phase,
        num_rounds=1,
        round_patience=2,
        stain_normalize=True,
        progress=False,
        mlflow={"enabled": False},
        device="cpu",
    )
    with caplog.at_level("WARNING", logger="monai_icmil.workflow"):
        wf.run()
    # random init is warned about, without the hint to turn on what is on
    warned = [r.getMessage() for r in caplog.records if "starts from a random-init" in r.getMessage()]
    assert len(warned) == 1 and "--stain_normalize true" not in warned[0]
    state = json.loads((tmp_path / "out" / "state.json").read_text())["rounds"]
    assert state["1"]["embed"]["written"] == 8 and state["1"]["test"]["slides"] == 2
    store = FeatureStore(tmp_path / "out" / "round_0" / "features")
    sid = store.slide_ids()[0]
    assert store.stored_key(sid)["stain_normalize"] == "macenko"


def test_stain_transforms_import_from_the_transforms_package_as_the_readme_says():
    import monai_icmil.transforms as transforms
    from monai_icmil.transforms import stain

    for name in ("RandHEDJitter", "RandHEDJitterd", "HEStainNormalizer"):
        assert getattr(transforms, name) is getattr(stain, name)


def test_hed_jitter_refuses_float_0_255_and_other_integer_types_instead_of_ruining_them():
    image = torch.full((3, 8, 8), 200.0)  # what MONAI's LoadImage gives unscaled
    with pytest.raises(
        ValueError, match=r"float image must lie in \[0, 1\], got values up to 200.*ScaleIntensityRange"
    ):
        RandHEDJitter()(image)
    with pytest.raises(TypeError, match=r"expects uint8 \(0-255\) or float \(0-1\) RGB, got torch.int64"):
        RandHEDJitter()(image.long())
    assert RandHEDJitter()(image / 255).max() <= 1.0
