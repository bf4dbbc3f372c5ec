# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Batch-wise random views (student views, pre-training views) and the background reader thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai_icmil.data.prefetch import Prefetcher
from monai_icmil.transforms.views import N_PARAMS, BatchRandomViews

P = 40


def _patches(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, P, P), dtype=torch.uint8, generator=g)


def test_params_are_reproducible_per_seed_and_crops_keep_the_minimum_area():
    v = BatchRandomViews(P, min_area=0.5, hed_jitter=0.1)
    a, b = v.draw(np.arange(200)), v.draw(np.arange(200))
    torch.testing.assert_close(a, b)
    assert a.shape == (200, N_PARAMS)
    torch.testing.assert_close(v.draw([7]), a[7:8])  # a patch's view does not depend on its batch
    w, h, x0, y0 = a[:, 3:7].unbind(1)
    assert bool(((w * h) >= 0.5 - 1e-6).all()) and bool((x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all())
    assert 0.3 < float(a[:, 0].mean()) < 0.7 and float(a[:, 2].abs().max()) == 0  # flips half the time; no turns
    assert bool(((a[:, 7:10] - 1).abs() <= 0.1 + 1e-6).all()) and bool((a[:, 10:13].abs() <= 0.05 + 1e-6).all())


def test_the_crop_is_a_bilinear_resize_of_the_cropped_region():
    v = BatchRandomViews(P, min_area=0.4)
    x = _patches()
    params = v.draw(np.arange(len(x)))
    params[:, :3] = 0  # no flip, no turn
    out = v(x, params)
    for i in range(len(x)):
        w, h, x0, y0 = (params[i, 3:7] * P).round().int().tolist()
        ref = F.interpolate(x[i : i + 1, :, y0 : y0 + h, x0 : x0 + w].float() / 255, (P, P), mode="bilinear")[0]
        # identical away from the border (there, resizing clamps inside the crop, the view samples the patch)
        torch.testing.assert_close(out[i][:, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-5, rtol=0)


def test_flips_and_quarter_turns_are_exact_without_a_crop():
    v = BatchRandomViews(P, rotate90=True)
    x = _patches(3)
    params = v.draw([0, 1, 2])
    params[:, 3:7] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # the whole patch
    params[:, :3] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = v(x, params)
    f = x.float() / 255
    torch.testing.assert_close(out[0], f[0].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], f[1].flip(-2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2], torch.rot90(f[2], 1, (1, 2)), atol=1e-5, rtol=0)


def test_stain_jitter_is_the_identity_at_scale_one_and_changes_colour_otherwise():
    v = BatchRandomViews(P, min_area=1.0, hed_jitter=0.2)
    x = _patches(4)
    params = v.draw(np.arange(4))
    params[:, :3] = 0
    jittered = v(x, params)
    params[:, 7:10], params[:, 10:13] = 1.0, 0.0
    torch.testing.assert_close(v(x, params), x.float() / 255, atol=2e-3, rtol=0)
    assert float((jittered - x.float() / 255).abs().mean()) > 0.01


def test_blur_smooths_only_the_views_drawn_with_it():
    v = BatchRandomViews(P, min_area=1.0, blur=2.0, blur_prob=1.0)
    x = _patches(2)
    params = v.draw([0, 1])
    params[:, :3] = 0
    params[1, 13:15] = 0  # the second view unblurred
    out = v(x, params)
    torch.testing.assert_close(out[1], x[1].float() / 255, atol=1e-5, rtol=0)
    assert float(out[0].std()) < 0.6 * float((x[0].float() / 255).std())


def test_bad_shapes_are_refused():
    v = BatchRandomViews(P)
    with pytest.raises(ValueError, match="params of shape"):
        v(_patches(2), v.draw([0]))
    with pytest.raises(ValueError, match="min_area"):
        BatchRandomViews(P, min_area=0)
    with pytest.raises(ValueError, match=r"blur .*0 \(off\) or >= 0.1, got 0.05"):
        BatchRandomViews(P, blur=0.05)
    small = BatchRandomViews(8, min_area=1.0, blur=6.0, blur_prob=1.0)  # a radius of 18 px on 8 px patches
    out = small(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), small.draw([0, 1]))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_the_prefetcher_keeps_order_across_threads_and_raises_the_readers_error_in_place():
    import random
    import threading
    import time

    seen = set()

    def slow_square(i):
        seen.add(threading.current_thread().name)
        time.sleep(random.random() * 0.01)  # later items often finish first
        return i * i

    assert list(Prefetcher(slow_square, range(60), threads=4, depth=6)) == [i * i for i in range(60)]
    assert len(seen) > 1  # the work was spread over threads
    assert list(Prefetcher(slow_square, range(5))) == [0, 1, 4, 9, 16]

    def failing(i):
        if i == 7:
            raise OSError("tile 7 of slide 'x.tiff' is truncated")
        return i

    got = []
    with pytest.raises(RuntimeError, match="tile 7 of slide 'x.tiff'"):
        for v in Prefetcher(failing, range(20), threads=3):
            got.append(v)
    assert got == list(range(7))  # everything before the failing item, in order

    started = []

    def record(i):
        started.append(i)
        return i

    it = iter(Prefetcher(record, range(10**6), threads=2, depth=3))
    assert next(it) == 0
    it.close()  # stopping early cancels what has not started and ends the threads
    assert len(started) <= 4
    with pytest.raises(ValueError, match="threads"):
        Prefetcher(record, range(3), threads=0)
