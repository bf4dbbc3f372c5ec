# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""monai-icmil: ICMIL (Iteratively Coupled Multiple Instance Learning) for whole-slide images, as a MONAI plugin."""

from __future__ import annotations

import importlib

__version__ = "0.2.0"


def _preload_cucim() -> None:
    """Import cuCIM once with native output silenced.

    On machines without a GPU, nvImageCodec prints harmless 'Failed to load nvjpeg...' lines when cuCIM is first
    imported (also when MONAI imports it). Importing it here, quietly, keeps users' logs clean.
    """
    from monai_icmil.utils import quiet_native_output

    with quiet_native_output():
        for name in ("cucim", "nvidia.nvimgcodec"):
            try:
                importlib.import_module(name)
            except Exception:  # optional at run time: other backends take over
                pass


_preload_cucim()
