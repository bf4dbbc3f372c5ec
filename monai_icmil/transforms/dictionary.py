# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Dictionary versions of the whole-slide patching transforms.

They read the slide path from ``key`` (one key, default ``"image"``; the slide's level-0 microns per pixel from
``"mpp"`` when the data has it) and add their outputs under these keys:

========================  =====================================================================================
``TissueMaskd``           ``"tissue_mask"`` (bool ``[h, w]``), ``"tissue_mask_downsample"`` (float)
``GridPatchCoordsd``      ``"coords"`` (int64 ``[N, 2]`` level-0 x, y), ``"tiling"`` (dict: level, read_size,
                          patch_size, mpp (requested; ``None`` with ``level``), effective_mpp (the patches'),
                          stride, min_tissue, footprint), ``"tissue_fraction"`` (``[N]``)
``ReadPatchesd``          ``"patches"`` (uint8 ``[N, 3, H, W]`` tensor, or ``[N, H, W, 3]`` array)
========================  =====================================================================================

Example::

    from monai.transforms import Compose
    from monai_icmil.transforms import TissueMaskd, GridPatchCoordsd, ReadPatchesd

    grid = GridPatchCoordsd("image", patch_size=224, mpp=0.5)
    pipeline = Compose([TissueMaskd("image"), grid, ReadPatchesd("image")])
    out = pipeline({"image": "slide.svs", "label": 1})
    out["patches"].shape  # [N, 3, 224, 224]
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from monai_icmil.data.slide import as_mpp
from monai_icmil.data.tiling import TilingResult
from monai_icmil.transforms.array import GridPatchCoords, ReadPatches, TissueMask

__all__ = [
    "TissueMaskd",
    "TissueMaskD",
    "TissueMaskDict",
    "GridPatchCoordsd",
    "GridPatchCoordsD",
    "GridPatchCoordsDict",
    "ReadPatchesd",
    "ReadPatchesD",
    "ReadPatchesDict",
]


def _one_key(transform: MapTransform, outputs: str) -> None:
    """Refuse more than one slide key: the outputs go to fixed keys, so a second slide would overwrite the first's
    (and the grid would use the other slide's tissue mask)."""
    if len(transform.keys) != 1:
        raise ValueError(
            f"{type(transform).__name__}: one slide key per transform, got {list(transform.keys)}: its outputs go to "
            f"fixed keys ({outputs}). Use one transform per slide key, each with its own output keys."
        )


def _data_mpp(data: Mapping[Hashable, Any], key: str) -> float | None:
    """The slide's level-0 mpp under ``key`` (a number, a numpy or 0-d tensor scalar, or a string from a CSV);
    absent, empty or NaN (a pandas missing value): ``None``, the file's own."""
    value = data.get(key)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, (str, bool)) and np.ndim(value) == 0 and np.isnan(float(value)):
        return None
    return as_mpp(value, f"data['{key}'] (the slide's level-0 microns per pixel)")


class TissueMaskd(MapTransform):
    """Dictionary version of :class:`~monai_icmil.transforms.array.TissueMask`.

    Args:
        keys: the key of the slide path (one key).
        mask_key: output key of the boolean mask.
        downsample_key: output key of the mask's downsample relative to level 0.
        slide_mpp_key: key of the slide's level-0 microns per pixel, used instead of the file's when the data has
            it (the datalist's per-slide ``mpp`` column).
        allow_missing_keys: don't raise when a key is absent.
        kwargs: forwarded to :class:`TissueMask`.
    """

    backend = TissueMask.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "tissue_mask",
        downsample_key: str = "tissue_mask_downsample",
        slide_mpp_key: str = "mpp",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = TissueMask(**kwargs)
        self.mask_key, self.downsample_key, self.slide_mpp_key = mask_key, downsample_key, slide_mpp_key
        _one_key(self, f"{mask_key}, {downsample_key}")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            result = self.transform(d[key], _data_mpp(d, self.slide_mpp_key))
            d[self.mask_key] = result.mask
            d[self.downsample_key] = result.downsample
        return d


class GridPatchCoordsd(MapTransform):
    """Dictionary version of :class:`~monai_icmil.transforms.array.GridPatchCoords`.

    Uses the tissue mask under ``mask_key`` when present (else tiles the whole slide).

    Args:
        keys: the key of the slide path (one key).
        mask_key, downsample_key: where :class:`TissueMaskd` put the mask.
        coords_key: output key of the ``[N, 2]`` coordinates.
        tiling_key: output key of the tiling description (level, read_size, patch_size, mpp, ...).
        fraction_key: output key of each patch's tissue fraction.
        slide_mpp_key: key of the slide's level-0 microns per pixel, used instead of the file's when the data has
            it (the datalist's per-slide ``mpp`` column).
        allow_missing_keys: don't raise when a key is absent.
        kwargs: forwarded to :class:`GridPatchCoords`.
    """

    backend = GridPatchCoords.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "tissue_mask",
        downsample_key: str = "tissue_mask_downsample",
        coords_key: str = "coords",
        tiling_key: str = "tiling",
        fraction_key: str = "tissue_fraction",
        slide_mpp_key: str = "mpp",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = GridPatchCoords(**kwargs)
        self.mask_key, self.downsample_key, self.slide_mpp_key = mask_key, downsample_key, slide_mpp_key
        self.coords_key, self.tiling_key, self.fraction_key = coords_key, tiling_key, fraction_key
        _one_key(self, f"{coords_key}, {tiling_key}, {fraction_key}")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            result = self.transform(
                d[key], d.get(self.mask_key), d.get(self.downsample_key), slide_mpp=_data_mpp(d, self.slide_mpp_key)
            )
            d[self.coords_key] = result.coords
            d[self.tiling_key] = {
                **result.params,
                "level": result.level,
                "read_size": result.read_size,
                "patch_size": result.patch_size,
                "effective_mpp": result.mpp,
            }
            d[self.fraction_key] = result.tissue_fraction
        return d


class ReadPatchesd(MapTransform):
    """Dictionary version of :class:`~monai_icmil.transforms.array.ReadPatches`.

    Args:
        keys: the key of the slide path (one key).
        coords_key, tiling_key: where :class:`GridPatchCoordsd` put the coordinates and tiling.
        patches_key: output key of the patch batch.
        allow_missing_keys: don't raise when a key is absent.
        kwargs: forwarded to :class:`ReadPatches`.
    """

    backend = ReadPatches.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        coords_key: str = "coords",
        tiling_key: str = "tiling",
        patches_key: str = "patches",
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ReadPatches(**kwargs)
        self.coords_key, self.tiling_key, self.patches_key = coords_key, tiling_key, patches_key
        _one_key(self, patches_key)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            tiling = d[self.tiling_key]
            if isinstance(tiling, TilingResult):
                d[self.patches_key] = self.transform(d[key], tiling)
                continue
            coords = d[self.coords_key]
            d[self.patches_key] = self.transform(
                d[key],
                np.asarray(coords.cpu() if isinstance(coords, torch.Tensor) else coords),
                level=int(tiling["level"]),
                read_size=int(tiling["read_size"]),
                patch_size=int(tiling["patch_size"]),
            )
        return d


TissueMaskD = TissueMaskDict = TissueMaskd
GridPatchCoordsD = GridPatchCoordsDict = GridPatchCoordsd
ReadPatchesD = ReadPatchesDict = ReadPatchesd
