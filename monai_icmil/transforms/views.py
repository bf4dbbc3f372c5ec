# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Random augmented views of a whole batch of patches, made in one pass on the batch's device.

The embedder phase and the pre-training need a fresh random view of every patch of every batch. Made patch by patch
with array transforms on the CPU, that costs ~11 ms per 256 px patch (flip + random resized crop + HED jitter): a
DataLoader worker then makes fewer than 100 views a second, far below what one GPU trains on. Here the random
parameters are drawn per patch from a seed (cheap, in the DataLoader worker, so every rank and every worker count
draws the same), and the views are made from the ``uint8`` batch on the training device: flips, a 90-degree rotation
and the crop-and-resize are one ``grid_sample``; the stain perturbation and the blur are batched tensor ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_icmil.transforms.stain import hed_to_rgb, rgb_to_hed
from monai_icmil.utils import as_bool

__all__ = ["BatchRandomViews"]

# columns of the parameter table: flip x, flip y, quarter turns, crop width / height / left / top (fractions of the
# patch side), HED scale (3), HED shift (3), blur sigma x / y (pixels; 0 = no blur)
_FLIP, _ROT, _CROP, _SCALE, _SHIFT, _BLUR = slice(0, 2), 2, slice(3, 7), slice(7, 10), slice(10, 13), slice(13, 15)
N_PARAMS = 15


class BatchRandomViews:
    """Random views of a ``[B, 3, P, P]`` patch batch: one draw per patch, applied to the batch at once.

    A view is: a random flip along each axis (probability 0.5 each); optionally a random number of quarter turns; a
    random crop whose side along each axis is uniform in ``[sqrt(min_area), 1]`` of the patch (so its area is at
    least ``min_area`` and its aspect varies) at a random position, resized back to ``P`` bilinearly (as MONAI's
    ``RandScaleCrop(random_size=True)`` + ``Resize``); optionally a stain perturbation in HED space, ``hed * a + b``
    with ``a ~ U(1 - hed_jitter, 1 + hed_jitter)`` and ``b ~ U(-hed_jitter / 2, hed_jitter / 2)`` per stain (as
    :class:`~monai_icmil.transforms.stain.RandHEDJitter`); optionally, with probability ``blur_prob``, a Gaussian
    blur with ``sigma`` per axis uniform in ``(0.1, blur)`` pixels.

    Args:
        patch_size: ``P``.
        min_area: smallest crop area, as a fraction of the patch (1: no crop).
        hed_jitter: strength of the HED stain perturbation (0: none).
        rotate90: also rotate by a random multiple of 90 degrees.
        blur: largest blur sigma in pixels (0: no blur).
        blur_prob: probability of blurring a view.

    Use :meth:`draw` for the parameters (``[B, 15]``, from one integer seed per patch; CPU, cheap) and call the
    object with the ``uint8`` (or ``[0, 1]`` float) patches and those parameters on any device; it returns float
    views in ``[0, 1]``.
    """

    def __init__(
        self,
        patch_size: int,
        min_area: float = 0.5,
        hed_jitter: float = 0.0,
        rotate90: bool = False,
        blur: float = 0.0,
        blur_prob: float = 0.3,
    ):
        if not 0 < min_area <= 1:
            raise ValueError(f"min_area must be in (0, 1], got {min_area}")
        if hed_jitter < 0 or blur < 0:
            raise ValueError(f"hed_jitter and blur must be >= 0, got {hed_jitter} and {blur}")
        if 0 < blur < 0.1:
            raise ValueError(
                f"blur is the largest sigma of a blur drawn from (0.1, blur): 0 (off) or >= 0.1, got {blur}"
            )
        self.patch_size, self.min_area, self.hed_jitter = int(patch_size), float(min_area), float(hed_jitter)
        self.rotate90, self.blur, self.blur_prob = as_bool(rotate90, "rotate90"), float(blur), float(blur_prob)

    def draw(self, seeds: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The random parameters of one view per seed: a float32 ``[len(seeds), 15]`` table."""
        p = self.patch_size
        lo = math.ceil(math.sqrt(self.min_area) * p)
        out = np.zeros((len(seeds), N_PARAMS), np.float64)
        for row, seed in zip(out, np.asarray(seeds).reshape(-1)):
            rng = np.random.default_rng(int(seed))
            row[_FLIP] = rng.random(2) < 0.5
            row[_ROT] = rng.integers(4) if self.rotate90 else 0
            w, h = rng.integers(lo, p + 1, size=2)  # integer crop sides, as MONAI's random ROI sizes
            x0, y0 = rng.integers(0, p - w + 1), rng.integers(0, p - h + 1)
            row[_CROP] = (w / p, h / p, x0 / p, y0 / p)
            row[_SCALE] = rng.uniform(1 - self.hed_jitter, 1 + self.hed_jitter, 3)
            row[_SHIFT] = rng.uniform(-self.hed_jitter / 2, self.hed_jitter / 2, 3)
            if self.blur > 0 and rng.random() < self.blur_prob:
                row[_BLUR] = rng.uniform(0.1, self.blur, 2)
        return torch.from_numpy(out).float()

    def __call__(self, patches: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Views of ``patches`` (``uint8`` or float in [0, 1], ``[B, 3, P, P]``) with ``params`` (from :meth:`draw`)."""
        if patches.ndim != 4 or patches.shape[1] != 3:
            raise ValueError(f"expected RGB patches [B, 3, H, W], got shape {tuple(patches.shape)}")
        if params.shape != (patches.shape[0], N_PARAMS):
            raise ValueError(f"expected params of shape {(patches.shape[0], N_PARAMS)}, got {tuple(params.shape)}")
        x = patches.float() / 255.0 if patches.dtype == torch.uint8 else patches.float()
        params = params.to(device=x.device, dtype=torch.float32)
        out = F.grid_sample(x, self.grid(params, x.shape), mode="bilinear", padding_mode="border", align_corners=False)
        if self.hed_jitter > 0:
            scale, shift = params[:, _SCALE, None, None], params[:, _SHIFT, None, None]
            out = hed_to_rgb(rgb_to_hed(out.clamp(0, 1)) * scale + shift)
        if self.blur > 0 and bool((params[:, _BLUR] > 0).any()):
            out = _gaussian_blur(out, params[:, _BLUR])
        return out.clamp_(0, 1)

    def grid(self, params: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The sampling grid of flips, quarter turns and crop-and-resize (``align_corners=False`` coordinates).

        Output coordinates ``(u, v)`` in ``[-1, 1]`` are flipped, turned, then mapped into the crop: ``x = a u' + b``
        with ``a = w`` and ``b = 2 x0 + w - 1`` (crop width ``w`` and left ``x0`` as fractions of the patch), which
        samples exactly where bilinear resizing of the crop would.
        """
        flips = 1.0 - 2.0 * params[:, _FLIP]  # -1 where flipped
        k = params[:, _ROT]
        cos, sin = torch.cos(k * math.pi / 2).round(), torch.sin(k * math.pi / 2).round()
        w, h, x0, y0 = params[:, _CROP].unbind(1)
        # A = diag(w, h) @ R(k) @ diag(flips)
        theta = torch.zeros(len(params), 2, 3, device=params.device)
        theta[:, 0, 0], theta[:, 0, 1] = w * cos * flips[:, 0], -w * sin * flips[:, 1]
        theta[:, 1, 0], theta[:, 1, 1] = h * sin * flips[:, 0], h * cos * flips[:, 1]
        theta[:, 0, 2], theta[:, 1, 2] = 2 * x0 + w - 1, 2 * y0 + h - 1
        return F.affine_grid(theta, list(shape), align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image ``(sigma_x, sigma_y)`` (0 leaves that image unblurred)."""
    b, c, h, w = x.shape
    radius = min(max(1, math.ceil(3 * float(sigmas.max()))), min(h, w) - 1)  # reflect padding needs < the side
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    out = x.reshape(1, b * c, h, w)
    for axis in (0, 1):  # x then y
        s = sigmas[:, axis].to(x.dtype).clamp(min=1e-6)
        kernel = torch.exp(-0.5 * (t[None] / s[:, None]) ** 2)
        kernel = torch.where((sigmas[:, axis] > 0)[:, None], kernel, (t == 0).to(x.dtype)[None])
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
        if axis == 0:
            out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
        else:
            out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return out.reshape(b, c, h, w)
