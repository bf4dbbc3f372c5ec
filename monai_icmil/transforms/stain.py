# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""H&E stain augmentation and normalisation, batched in torch (CPU or GPU).

- :class:`RandHEDJitter` / :class:`RandHEDJitterd`: colour deconvolution into haematoxylin, eosin and DAB optical
  densities (Ruifrok & Johnston's stain vectors), a random scale and shift per channel, and back to RGB: the
  slide-to-slide stain variation that views of the same tissue should not be told apart by.
- :class:`HEStainNormalizer`: Macenko normalisation fitted once per slide. The slide's stain matrix comes from
  MONAI's :class:`~monai.apps.pathology.transforms.ExtractHEStains` on a thumbnail (a single patch often holds too
  little tissue for a stable estimate), together with its 99th-percentile stain concentrations; every patch of the
  slide is then re-rendered with MONAI's reference stain matrix and concentrations. :func:`slide_stain_normalizer`
  caches one per slide and process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

__all__ = [
    "RGB_FROM_HED",
    "rgb_to_hed",
    "hed_to_rgb",
    "RandHEDJitter",
    "RandHEDJitterd",
    "RandHEDJitterD",
    "RandHEDJitterDict",
    "HEStainNormalizer",
    "slide_stain_normalizer",
]

# Ruifrok & Johnston (2001): optical density of haematoxylin, eosin and DAB (rows) in R, G, B (columns)
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
RGB_FROM_HED = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_EPS = 1e-6


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """Float RGB in [0, 1], channels first (``[..., 3, H, W]``) -> H, E, D optical densities."""
    od = -torch.log(rgb.clamp(min=_EPS))
    return torch.einsum("...chw,cd->...dhw", od, HED_FROM_RGB.to(od))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed` (clipped to [0, 1])."""
    od = torch.einsum("...dhw,dc->...chw", hed, RGB_FROM_HED.to(hed))
    return torch.exp(-od).clamp(0.0, 1.0)


def _check_rgb_range(x: torch.Tensor) -> None:
    """Refuse what would be silently ruined: integers other than ``uint8``, floats outside [0, 1] (MONAI's
    ``LoadImage`` gives float 0-255 unless scaled)."""
    if x.dtype == torch.uint8:
        return
    if not x.is_floating_point():
        raise TypeError(f"RandHEDJitter expects uint8 (0-255) or float (0-1) RGB, got {x.dtype}: convert it to uint8.")
    if x.numel() and float(x.max()) > 1.0 + 1e-3:
        raise ValueError(
            f"RandHEDJitter: a float image must lie in [0, 1], got values up to {float(x.max()):g} (0-255?): scale it "
            "first (monai.transforms.ScaleIntensityRange(0, 255, 0, 1)) or pass uint8."
        )


class RandHEDJitter(RandomizableTransform):
    """Random stain perturbation in HED space: ``hed' = hed * a + b`` per stain channel.

    Args:
        sigma: ``a`` is drawn from ``U(1 - sigma, 1 + sigma)`` per channel.
        bias: ``b`` is drawn from ``U(-bias, bias)`` per channel (optical-density units).
        prob: probability of applying it.

    Input: a channels-first RGB image or batch (``[3, H, W]`` or ``[B, 3, H, W]``), float in [0, 1] or ``uint8``;
    the output has the input's type and range. A batch gets one draw per image.
    """

    backend = ["torch", "numpy"]

    def __init__(self, sigma: float = 0.05, bias: float = 0.02, prob: float = 1.0):
        RandomizableTransform.__init__(self, prob)
        if sigma < 0 or bias < 0:
            raise ValueError(f"sigma and bias must be >= 0, got sigma={sigma}, bias={bias}")
        self.sigma, self.bias = float(sigma), float(bias)
        self._scale = self._shift = None

    def randomize(self, n: int = 1) -> None:
        super().randomize(None)
        self._scale = self.R.uniform(1 - self.sigma, 1 + self.sigma, (n, 3))
        self._shift = self.R.uniform(-self.bias, self.bias, (n, 3))

    def __call__(self, img: Any, randomize: bool = True) -> Any:
        x = torch.as_tensor(img)
        batched = x.ndim == 4
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(f"RandHEDJitter expects [3, H, W] or [B, 3, H, W] RGB, got shape {tuple(x.shape)}")
        if randomize:
            self.randomize(x.shape[0] if batched else 1)
        if not self._do_transform:
            return img
        _check_rgb_range(x)
        xb = x if batched else x[None]
        as_uint8 = xb.dtype == torch.uint8
        rgb = xb.float() / 255.0 if as_uint8 else xb.float()
        scale = torch.as_tensor(self._scale, dtype=torch.float32, device=rgb.device)[:, :, None, None]
        shift = torch.as_tensor(self._shift, dtype=torch.float32, device=rgb.device)[:, :, None, None]
        out = hed_to_rgb(rgb_to_hed(rgb) * scale + shift)
        out = (out * 255.0).round().to(torch.uint8) if as_uint8 else out.to(xb.dtype)
        out = out if batched else out[0]
        return out.numpy() if isinstance(img, np.ndarray) else out


class RandHEDJitterd(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandHEDJitter` (the same draw for every key)."""

    backend = RandHEDJitter.backend

    def __init__(
        self, keys: KeysCollection, sigma: float = 0.05, bias: float = 0.02, prob: float = 1.0, allow_missing_keys=False
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.jitter = RandHEDJitter(sigma, bias, prob=1.0)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandHEDJitterd:
        super().set_random_state(seed, state)
        self.jitter.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        first = True
        for key in self.key_iterator(d):
            d[key] = self.jitter(d[key], randomize=first)
            first = False
        return d


RandHEDJitterD = RandHEDJitterDict = RandHEDJitterd


class HEStainNormalizer:
    """Macenko H&E normalisation with the stain matrix and concentrations fitted on one slide.

    Args:
        target_he: reference stain matrix (RGB rows, H and E columns); MONAI's default.
        max_cref: reference 99th-percentile concentrations of H and E; MONAI's default.
        tli: transmitted light intensity.
        beta: optical density below which a pixel counts as background.

    Call :meth:`fit` with a ``uint8`` ``[H, W, 3]`` thumbnail of the slide, then the object with ``uint8``
    ``[B, 3, h, w]`` patches or one ``[3, h, w]`` patch of that slide (a torch tensor, CPU or GPU, or a NumPy array);
    the result has the input's shape and kind.
    """

    def __init__(
        self,
        target_he: Sequence[Sequence[float]] = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581)),
        max_cref: Sequence[float] = (1.9705, 1.0308),
        tli: float = 240.0,
        beta: float = 0.15,
    ):
        self.target_he = torch.as_tensor(target_he, dtype=torch.float32)
        self.max_cref = torch.as_tensor(max_cref, dtype=torch.float32)
        self.tli, self.beta = float(tli), float(beta)
        self.he: torch.Tensor | None = None
        self.max_conc: torch.Tensor | None = None

    def fit(self, thumbnail: np.ndarray, name: str = "slide") -> HEStainNormalizer:
        """Estimate the slide's stain matrix and maximum concentrations.

        Raises:
            ValueError: naming ``name``, when the thumbnail has too little stained tissue to estimate the stains.
        """
        from monai.apps.pathology.transforms import ExtractHEStains

        thumbnail = np.asarray(thumbnail)
        if thumbnail.ndim != 3 or thumbnail.shape[-1] not in (3, 4):
            raise ValueError(f"'{name}': the thumbnail must be RGB(A) [H, W, 3], got shape {thumbnail.shape}")
        img = np.ascontiguousarray(thumbnail[..., :3]).astype(np.uint8)
        try:
            he = ExtractHEStains(tli=self.tli, beta=self.beta)(img)
        except Exception as e:  # MONAI raises when every pixel is transparent
            raise ValueError(
                f"cannot estimate the H&E stains of '{name}' ({e}): it shows too little stained tissue. Turn "
                "`stain_normalize` off or leave the slide out."
            ) from e
        he = np.asarray(he, np.float32)
        if he[0, 0] < he[0, 1]:  # haematoxylin absorbs more red than eosin: keep the H column first
            he = he[:, ::-1].copy()
        self.he = torch.as_tensor(he)
        od = self._od(torch.as_tensor(img).permute(2, 0, 1)[None]).reshape(3, -1)
        tissue = (od > self.beta).all(0)
        conc = torch.linalg.pinv(self.he) @ od[:, tissue]
        if conc.shape[1] < 10:
            raise ValueError(
                f"cannot estimate the H&E stains of '{name}': fewer than 10 tissue pixels in the thumbnail"
            )
        self.max_conc = torch.quantile(conc[:, :: max(1, conc.shape[1] // 200_000)], 0.99, dim=1).clamp(min=1e-3)
        return self

    def _od(self, patches: torch.Tensor) -> torch.Tensor:
        """``[B, 3, h, w]`` uint8 -> optical density ``[3, B, h, w]``."""
        x = patches.float() + 1.0
        return (-torch.log(x.clamp(max=self.tli) / self.tli)).transpose(0, 1)

    def __call__(self, patches: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        if self.he is None:
            raise RuntimeError("HEStainNormalizer.fit must be called first (with a thumbnail of the slide)")
        as_numpy, x = isinstance(patches, np.ndarray), torch.as_tensor(patches)
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(f"HEStainNormalizer expects [3, h, w] or [B, 3, h, w] RGB, got shape {tuple(x.shape)}")
        out = self._normalize(x if x.ndim == 4 else x[None])
        out = out if x.ndim == 4 else out[0]
        return out.cpu().numpy() if as_numpy else out

    def _normalize(self, patches: torch.Tensor) -> torch.Tensor:
        dev = patches.device
        b, _, h, w = patches.shape
        od = self._od(patches).reshape(3, -1)
        conc = torch.linalg.pinv(self.he.to(dev)) @ od
        conc = conc * (self.max_cref.to(dev) / self.max_conc.to(dev))[:, None]
        rgb = self.tli * torch.exp(-(self.target_he.to(dev) @ conc))
        rgb = rgb.clamp(0, 254).reshape(3, b, h, w).transpose(0, 1)
        return rgb.round().to(torch.uint8).contiguous()


_NORMALIZERS: dict[tuple, HEStainNormalizer] = {}
_FIT_LOCK = threading.Lock()  # reader threads reaching a new slide together fit it once


def slide_stain_normalizer(image: str, reader: Any, max_size: int = 1024) -> HEStainNormalizer:
    """The :class:`HEStainNormalizer` of slide ``image`` (fitted on its thumbnail once per process, and again when
    the file is rewritten: the cache key holds its size and modification time)."""
    try:
        st = os.stat(image)
        key = (str(image), st.st_size, st.st_mtime_ns)
    except OSError:
        key = (str(image), None, None)
    with _FIT_LOCK:
        if key not in _NORMALIZERS:
            thumb, _ = reader.thumbnail(max_size)
            _NORMALIZERS[key] = HEStainNormalizer().fit(thumb, name=str(image))
        return _NORMALIZERS[key]
