# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""MONAI transforms for whole-slide patching and H&E stains."""

from monai_icmil.transforms.array import GridPatchCoords, ReadPatches, TissueMask
from monai_icmil.transforms.dictionary import (
    GridPatchCoordsd,
    GridPatchCoordsD,
    GridPatchCoordsDict,
    ReadPatchesd,
    ReadPatchesD,
    ReadPatchesDict,
    TissueMaskd,
    TissueMaskD,
    TissueMaskDict,
)
from monai_icmil.transforms.stain import (
    HEStainNormalizer,
    RandHEDJitter,
    RandHEDJitterd,
    RandHEDJitterD,
    RandHEDJitterDict,
)
from monai_icmil.transforms.views import BatchRandomViews
