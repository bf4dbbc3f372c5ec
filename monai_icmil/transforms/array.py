# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Array transforms for whole-slide patching: tissue detection, grid coordinates, batched patch reading.

Each transform takes a slide (a path or an open :class:`~monai_icmil.data.slide.SlideReader`) and returns its own
result (a mask, a tiling, patches), so they are called one after the other as below; to chain them in a MONAI
``Compose``, use their dictionary versions (:mod:`monai_icmil.transforms.dictionary`). Paths are opened once per process
through :func:`~monai_icmil.data.get_slide`.

Example::

    mask = TissueMask()(slide_path)                     # TissueMaskResult(mask, downsample, threshold)
    tiles = GridPatchCoords(patch_size=224, mpp=0.5)(slide_path, mask.mask, mask.downsample)
    patches = ReadPatches(num_workers=4)(slide_path, tiles)   # uint8 tensor [N, 3, 224, 224]
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from monai.transforms import Transform
from monai.utils import TransformBackends

from monai_icmil.data.slide import SlideReader, as_mpp, get_slide
from monai_icmil.data.tiling import (
    MAX_HOLE_UM2,
    TilingResult,
    TissueMaskResult,
    _check_grid_args,
    changed_detector_options,
    compute_tissue_mask,
    grid_coordinates,
)

__all__ = ["TissueMask", "GridPatchCoords", "ReadPatches"]

SlideLike = str | os.PathLike | SlideReader


class TissueMask(Transform):
    """Tissue mask of a slide at low resolution (Otsu on HSV saturation, median blur, hole filling, speck removal).

    Runs on the GPU (CuPy) when ``device`` is a CUDA device, or ``"auto"`` with CUDA available; on the CPU
    (NumPy/SciPy) otherwise. Both run the same algorithm.

    Args:
        mask_mpp: target mask resolution in um/px; the level read is the coarsest not coarser than this, block
            averaged to at most it (so masks land at 4-8 um/px by default).
        level: read this level instead (overrides ``mask_mpp``).
        median_size: median-filter side in mask pixels.
        min_area_um2: remove tissue specks smaller than this (um^2).
        min_saturation: lower bound of the Otsu threshold; blank slides give an empty mask. Halved, with a
            warning, for a slide whose faint colour outnumbers what it keeps (faded H&E, a pale counterstain).
        fill_holes: fill holes inside tissue.
        device: ``"auto"``, ``"cpu"`` or a CUDA device.
        balance_background: take the saturation relative to the glass's colour, so that tinted glass (yellowish,
            bluish or pinkish scanners) is not tissue (:func:`~monai_icmil.data.tiling.tissue_saturation`).
        adapt_floor: halve ``min_saturation`` for a slide whose faint colour outnumbers its mask and is textured
            like tissue, when that finds tissue (:func:`~monai_icmil.data.tiling.tissue_mask_from_rgb`).
        pale_tissue: keep pale tissue (stroma, loose or fatty tissue) that Otsu's threshold splits off from dense,
            dark tissue, where it is textured (:func:`~monai_icmil.data.tiling.tissue_mask_from_rgb`).
        max_hole_um2: fill only holes in the tissue up to this area (um^2; ``None``: every hole), so that glass
            enclosed by tissue (a lumen, a tear) is not tiled.
        backend: slide backend used when given a path (``"auto"``, ``"cucim"``, ``"openslide"``, ``"tifffile"``,
            ``"image"``).

    ``balance_background``, ``adapt_floor``, ``pale_tissue`` and ``max_hole_um2`` enter the transform's signature
    (the stores' keys) only when changed from their defaults, so coordinates tiled before they existed stay current;
    a run that reuses them says so; a new output folder (or deleting its ``coords/`` and ``round_<r>/features/``) tiles
    those slides again with them.

    Call it with ``slide_mpp`` to use that level-0 mpp instead of the file's (a slide without resolution metadata).

    Returns:
        :class:`~monai_icmil.data.tiling.TissueMaskResult` (``mask``: bool ``[h, w]``; ``downsample``: level-0
        pixels per mask pixel; ``threshold``).
    """

    backend = [TransformBackends.NUMPY]
    #: the tissue detector whose version coordinate stores keep
    tissue_detector = True

    def __init__(
        self,
        mask_mpp: float = 8.0,
        level: int | None = None,
        median_size: int = 5,
        min_area_um2: float = 20_000.0,
        min_saturation: float = 0.05,
        fill_holes: bool = True,
        device: str | torch.device | None = "auto",
        backend: str = "auto",
        balance_background: bool = True,
        adapt_floor: bool = True,
        pale_tissue: bool = True,
        max_hole_um2: float | None = MAX_HOLE_UM2,
    ) -> None:
        self.kwargs = {
            "mask_mpp": mask_mpp,
            "level": level,
            "median_size": median_size,
            "min_area_um2": min_area_um2,
            "min_saturation": min_saturation,
            "fill_holes": fill_holes,
            "device": device,
        }
        # the defaults stay out of the tiling signature: stores made before these options existed stay current
        self.kwargs |= changed_detector_options(
            {
                "balance_background": balance_background,
                "adapt_floor": adapt_floor,
                "pale_tissue": pale_tissue,
                "max_hole_um2": max_hole_um2,
            }
        )
        self.slide_backend = backend

    def __call__(self, slide: SlideLike, slide_mpp: float | None = None) -> TissueMaskResult:
        return compute_tissue_mask(get_slide(slide, self.slide_backend, slide_mpp), **self.kwargs)


class GridPatchCoords(Transform):
    """A regular grid of patch coordinates over a slide's tissue, at a target mpp or level.

    Args:
        patch_size: output patch side in pixels.
        mpp: target microns per pixel (exclusive with ``level``); read at the coarsest level at least as fine,
            then resized.
        level: read patches from this level (default 0 when neither is given).
        stride: step between patches in output pixels; ``< patch_size`` overlaps. Default: ``patch_size``.
        min_tissue: minimum tissue fraction of a patch.
        backend: slide backend used when given a path.

    Call it with ``slide_mpp`` to use that level-0 mpp instead of the file's (a slide without resolution metadata).

    Returns:
        :class:`~monai_icmil.data.tiling.TilingResult`: ``coords`` ``[N, 2]`` level-0 ``(x, y)`` in row-major
        order, ``level``, ``read_size``, ``patch_size``, ``mpp``, ``tissue_fraction`` and ``params``.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        patch_size: int = 224,
        mpp: float | None = None,
        level: int | None = None,
        stride: int | None = None,
        min_tissue: float = 0.5,
        backend: str = "auto",
    ) -> None:
        if mpp is not None and level is not None:
            raise ValueError("GridPatchCoords: pass either `mpp` or `level`, not both.")
        try:  # here rather than in a DataLoader worker at the first slide
            _check_grid_args(patch_size, mpp, level, stride, min_tissue)
            as_mpp(mpp, "mpp", optional=True)  # checked; kept as given (it is part of the stores' keys)
            if level is not None and int(level) < 0:
                raise ValueError(f"level must be >= 0 (0 is the full resolution), got {level}")
        except ValueError as e:
            raise ValueError(f"GridPatchCoords: {e}") from None
        self.patch_size, self.mpp, self.level, self.stride, self.min_tissue = patch_size, mpp, level, stride, min_tissue
        self.slide_backend = backend

    def __call__(
        self,
        slide: SlideLike,
        mask: np.ndarray | TissueMaskResult | None = None,
        mask_downsample: float | None = None,
        slide_mpp: float | None = None,
    ) -> TilingResult:
        if isinstance(mask, TissueMaskResult):
            mask, mask_downsample = mask.mask, mask.downsample
        return grid_coordinates(
            get_slide(slide, self.slide_backend, slide_mpp),
            patch_size=self.patch_size,
            mpp=self.mpp,
            level=self.level,
            stride=self.stride,
            mask=mask,
            mask_downsample=mask_downsample,
            min_tissue=self.min_tissue,
        )


class ReadPatches(Transform):
    """Read the patches of a tiling (or explicit coordinates) in one batched call.

    Args:
        num_workers: decoding threads (cuCIM's own thread pool on the cuCIM backend).
        as_tensor: return a ``uint8`` tensor ``[N, 3, H, W]``; ``False`` returns an array ``[N, H, W, 3]``.
        device: move the tensor to this device (e.g. ``"cuda"``).
        backend: slide backend used when given a path.

    Call with ``(slide, tiling)`` or ``(slide, coords, level=, read_size=, patch_size=)``: ``coords`` ``[N, 2]``
    are each patch's top-left corner in **level-0** pixels as ``(x, y)`` (column, row; MONAI's ``WSIReader``
    locations are ``(y, x)``: flip them), whole numbers; ``read_size`` is the side read at ``level``, resized to
    ``patch_size``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        num_workers: int = 0,
        as_tensor: bool = True,
        device: str | torch.device | None = None,
        backend: str = "auto",
    ) -> None:
        self.num_workers, self.as_tensor, self.device, self.slide_backend = num_workers, as_tensor, device, backend

    def __call__(
        self,
        slide: SlideLike,
        coords: TilingResult | np.ndarray | Any,
        level: int = 0,
        read_size: int | None = None,
        patch_size: int | None = None,
    ) -> torch.Tensor | np.ndarray:
        if isinstance(coords, TilingResult):
            level, read_size, patch_size, coords = coords.level, coords.read_size, coords.patch_size, coords.coords
        if read_size is None:
            if patch_size is None:
                raise ValueError("ReadPatches: give a TilingResult, or `read_size`/`patch_size` with coordinates.")
            read_size = patch_size
        coords = np.asarray(coords.cpu() if isinstance(coords, torch.Tensor) else coords)
        if coords.dtype.kind == "f" and coords.size and not np.array_equal(coords, np.round(coords)):
            raise ValueError(
                "ReadPatches: coordinates are level-0 pixels and must be whole numbers, got fractional ones such as "
                f"{coords[np.any(coords != np.round(coords), axis=-1)][0].tolist()}: round them first."
            )
        out_size = None if patch_size is None or patch_size == read_size else patch_size
        return get_slide(slide, self.slide_backend).read_patches(
            coords,
            int(read_size),
            int(level),
            out_size=out_size,
            num_workers=self.num_workers,
            as_tensor=self.as_tensor,
            device=self.device,
        )
