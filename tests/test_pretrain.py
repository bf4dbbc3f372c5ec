# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Self-supervised pre-training (SimCLR) of the round-0 embedder: loss, views, and the bundle's pretrain.json."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monai_icmil.data import load_datalist
from monai_icmil.data.prepare import prepare_coords
from monai_icmil.data.store import CoordsStore
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines.pretrain import PretrainTrainer, SimCLRModel, TwoViewBatches, contrastive_views, nt_xent_loss
from monai_icmil.metrics import linear_probe_auc
from monai_icmil.networks import create_embedder


def _step(model: SimCLRModel, optimizer: torch.optim.Optimizer, views, batch: dict) -> float:
    """One pre-training iteration of the phase's engine on ``batch`` (CPU, fp32)."""
    trainer = PretrainTrainer(torch.device("cpu"), 1, 1, [batch], model, optimizer, views, 0.2, channels_last=False)
    return trainer._iteration(trainer, batch)["loss"]


def test_nt_xent_prefers_matching_views():
    torch.manual_seed(0)
    z = torch.randn(16, 8)
    matched = nt_xent_loss(z, z + 0.01 * torch.randn_like(z))
    shuffled = nt_xent_loss(z, z[torch.randperm(16)])
    assert matched < 0.5 < shuffled
    assert math.isclose(float(nt_xent_loss(z, z, temperature=0.2)), float(matched), rel_tol=0.2)


def test_two_views_are_reproducible_and_differ(synthetic_dataset, tmp_path):
    dl = load_datalist(synthetic_dataset)
    slides = prepare_coords(dl["training"], TilingConfig(patch_size=32, mpp=1.0), CoordsStore(tmp_path), progress=False)
    a = TwoViewBatches(list(slides.values()), contrastive_views(32, hed_jitter=0.2), 8, 2, 3)
    b = TwoViewBatches(list(slides.values()), contrastive_views(32, hed_jitter=0.2), 8, 2, 3)
    x, y = a[1], b[1]
    torch.testing.assert_close(x["view1"], y["view1"])
    assert x["view1"].shape == (8, 3, 32, 32) and not torch.allclose(x["view1"], x["view2"])


def test_the_pretraining_step_makes_the_same_views_from_their_parameters(synthetic_dataset, tmp_path):
    """With ``views_in_worker=False`` the step makes both views on its device; the loss is the one of the worker's
    views."""
    dl = load_datalist(synthetic_dataset)
    slides = prepare_coords(dl["training"], TilingConfig(patch_size=32, mpp=1.0), CoordsStore(tmp_path), progress=False)
    views = contrastive_views(32, hed_jitter=0.2, blur=1.0)
    in_worker = TwoViewBatches(list(slides.values()), views, 16, 1, 0)
    on_device = TwoViewBatches(list(slides.values()), views, 16, 1, 0, views_in_worker=False)
    a, b = in_worker[0], on_device[0]
    assert set(b) == {"plain", "params1", "params2"}
    losses = []
    for batch in (a, b):
        torch.manual_seed(0)
        model = SimCLRModel(create_embedder("resnet18_trunc", input_size=32))
        losses.append(_step(model, torch.optim.AdamW(model.parameters(), lr=0.0), on_device.views, batch))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_linear_probe_auc_finds_a_linear_signal_and_not_noise():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(100), np.zeros(100)]
    x = rng.normal(size=(200, 10))
    assert linear_probe_auc(x, y) < 0.7
    x[:, 3] += 2.0 * y
    assert linear_probe_auc(x, y) > 0.85
    with pytest.raises(ValueError, match="binary labels"):
        linear_probe_auc(x, np.zeros(200))
    by_half = np.arange(200) % 2 == 0
    assert linear_probe_auc(x, y, train_mask=by_half) > 0.85


def test_simclr_steps_learn_the_contrastive_task_on_a_fixed_batch(synthetic_dataset, tmp_path):
    """Repeated steps on one batch of two views lower the NT-Xent loss: gradients reach embedder and projector."""
    dl = load_datalist(synthetic_dataset)
    slides = prepare_coords(dl["training"], TilingConfig(patch_size=32, mpp=1.0), CoordsStore(tmp_path), progress=False)
    views = contrastive_views(32, hed_jitter=0.2)
    batch = TwoViewBatches(list(slides.values()), views, 32, 1, 0)[0]
    torch.manual_seed(0)
    model = SimCLRModel(create_embedder("resnet18_trunc", input_size=32))
    before = {k: v.clone() for k, v in model.embedder.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = [_step(model, optimizer, views, batch) for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert any(not torch.equal(before[k], v) for k, v in model.embedder.state_dict().items())
