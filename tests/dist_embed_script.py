# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Embedding under torchrun (gloo, CPU) for the multi-process test; also runs as a single process."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from monai_icmil.data import load_datalist
from monai_icmil.data.prepare import prepare_coords
from monai_icmil.data.store import CoordsStore, FeatureStore
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines import Embed
from monai_icmil.networks import create_embedder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--datalist", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    tiling = TilingConfig(patch_size=48, mpp=1.0)
    items = load_datalist(a.datalist)["training"]
    slides = prepare_coords(items, tiling, CoordsStore(os.path.join(a.out, f"coords_rank{rank}")), progress=False)
    torch.manual_seed(0)
    embedder = create_embedder("resnet18_trunc", input_size=48)
    Embed(num_workers=0, progress=False)(
        slides, embedder, FeatureStore(os.path.join(a.out)), tiling.params(), meta={"rank": rank}
    )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
