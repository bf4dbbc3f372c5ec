# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The slide every benchmark measures on: one generated 8192x6144 JPEG-tiled pyramidal TIFF at 0.5 um/px.

Rendering it takes ~30 s of one core. Set ``ICMIL_BENCH_CACHE`` to a folder to render it once and reuse it (the
GPU check makes it here and carries it, so device time is not spent drawing slides).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from monai_icmil.data.synthetic import SyntheticSlideConfig, render_slide, write_slide


def bench_slide(directory: str | Path, width: int = 8192, height: int = 6144) -> tuple[Path, np.ndarray]:
    """Write the benchmark slide into ``directory`` (or reuse ``$ICMIL_BENCH_CACHE``'s); returns its path and its
    level-0 tissue mask."""
    cache = os.environ.get("ICMIL_BENCH_CACHE")
    if cache:
        directory = Path(cache)
        directory.mkdir(parents=True, exist_ok=True)
    path = Path(directory) / f"bench_{width}x{height}.tiff"
    mask_path = path.with_suffix(".tissue.npz")
    if cache and path.is_file() and mask_path.is_file():
        with np.load(mask_path) as z:
            return path, np.unpackbits(z["bits"], count=width * height).reshape(height, width).astype(bool)
    cfg = SyntheticSlideConfig(width=width, height=height)
    rendered = render_slide(0, True, cfg)
    write_slide(path, rendered["image"], cfg.mpp)
    if cache:
        tmp = mask_path.with_name(mask_path.name + ".tmp.npz")
        np.savez_compressed(tmp, bits=np.packbits(rendered["tissue"].ravel()))
        os.replace(tmp, mask_path)
    return path, rendered["tissue"]
