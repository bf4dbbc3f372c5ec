# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Slide access, tiling, datalists and synthetic slides."""

from monai_icmil.data.datalist import SPLITS, DatalistError, load_datalist
from monai_icmil.data.slide import (
    BACKENDS,
    CuCIMSlide,
    OpenSlideSlide,
    SlideError,
    SlideReader,
    TiffSlide,
    available_backends,
    get_slide,
    open_slide,
    resize_patches,
    slide_identity,
)
from monai_icmil.data.tiling import (
    TilingResult,
    TissueMaskResult,
    compute_tissue_mask,
    grid_coordinates,
    tissue_mask_from_rgb,
)
