# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""monai-icmil: ICMIL (Iteratively Coupled Multiple Instance Learning) for whole-slide images, as a MONAI plugin."""

from __future__ import annotations

import importlib
import os

__version__ = "0.2.0"

# cuFile (GPUDirect Storage, loaded with cuCIM) writes its log, full of harmless "initialization failed" lines on
# machines without it, to cufile.log in the working directory: send it nowhere unless the user chose a place
os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)


def _preload_cucim() -> None:
    """Import cuCIM once with native output silenced.

    On machines without a GPU, nvImageCodec prints harmless 'Failed to load nvjpeg...' lines when it is first
    imported and a codec library is missing. The install brings nvJPEG2000 and nvTIFF (so importing MONAI first is
    quiet too); importing the rest here, quietly, keeps users' logs clean.
    """
    from monai_icmil.utils import quiet_native_output

    with quiet_native_output():
        for name in ("cucim", "nvidia.nvimgcodec"):
            try:
                importlib.import_module(name)
            except Exception:  # optional at run time: other backends take over
                pass


_preload_cucim()
