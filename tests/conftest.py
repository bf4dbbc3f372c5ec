# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Shared fixtures: the real Aperio test slide and small synthetic slides made here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

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


VIT_ARGS = {
    "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "init_values": 1e-5,
    "dynamic_img_size": True, "reg_tokens": 4, "no_embed_class": True, "num_classes": 0,
}  # fmt: skip


@pytest.fixture(scope="session")
def vit_folder(tmp_path_factory) -> Path:
    """A tiny UNI-style ViT as the hub lays one out: ``config.json`` (timm: architecture, model_args with layer scale,
    register tokens and dynamic image size, pretrained_cfg with its normalisation and input size) and
    ``model.safetensors``; made here, since nothing can be downloaded."""
    import timm
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("vit_uni_style")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **VIT_ARGS)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [3, 32, 32]}
    config = {"architecture": "vit_small_patch16_224", "model_args": VIT_ARGS, "pretrained_cfg": cfg}
    (folder / "config.json").write_text(json.dumps(config))
    return folder
