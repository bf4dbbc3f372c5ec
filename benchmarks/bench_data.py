# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The slide every benchmark measures on: one generated 8192x6144 JPEG-tiled pyramidal TIFF at 0.5 um/px."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monai_icmil.data.synthetic import SyntheticSlideConfig, render_slide, write_slide


def bench_slide(directory: str | Path, width: int = 8192, height: int = 6144) -> tuple[Path, np.ndarray]:
    """Write the benchmark slide into ``directory``; returns its path and its level-0 tissue mask."""
    cfg = SyntheticSlideConfig(width=width, height=height)
    rendered = render_slide(0, True, cfg)
    path = Path(directory) / "bench.tiff"
    write_slide(path, rendered["image"], cfg.mpp)
    return path, rendered["tissue"]
