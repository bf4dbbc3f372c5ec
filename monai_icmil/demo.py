# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Patching demo: generate a synthetic slide, detect tissue, tile it and read the patches in one MONAI Compose.

python -m monai_icmil.demo --output_dir outputs/demo
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from monai.transforms import Compose

from monai_icmil.data.slide import get_slide
from monai_icmil.data.synthetic import SyntheticSlideConfig, make_dataset
from monai_icmil.transforms import GridPatchCoordsd, ReadPatchesd, TissueMaskd
from monai_icmil.utils import atomic_write_json
from monai_icmil.visualize import save_patch_montage, save_tiling_qc


def run_demo(output_dir: str, patch_size: int = 128, mpp: float = 1.0, num_workers: int = 2, seed: int = 0) -> dict:
    """Run the patching demo and return its summary (also written to ``output_dir/summary.json``)."""
    out = Path(output_dir)
    datalist = make_dataset(
        out / "data",
        num_training=2,
        num_validation=0,
        num_test=0,
        seed=seed,
        config=SyntheticSlideConfig(width=3072, height=2304),
        progress=True,
    )
    import json

    entries = json.loads(datalist.read_text())["training"]
    pipeline = Compose(
        [
            TissueMaskd("image"),
            GridPatchCoordsd("image", patch_size=patch_size, mpp=mpp, min_tissue=0.5),
            ReadPatchesd("image", num_workers=num_workers, as_tensor=False),
        ]
    )
    summary = {"slides": []}
    for entry in entries:
        path = str(out / "data" / entry["image"])
        t0 = time.perf_counter()
        d = pipeline({"image": path, "label": entry["label"]})
        elapsed = time.perf_counter() - t0
        reader = get_slide(path)
        thumb, thumb_ds = reader.thumbnail(768)
        name = Path(path).stem
        save_tiling_qc(
            out / f"{name}_tiling.png",
            thumb,
            thumb_ds,
            d["coords"],
            d["tiling"]["footprint"],
            caption=f"{name}: label {entry['label']}, {len(d['coords'])} patches of {patch_size}px at {mpp} um/px",
            mask=d["tissue_mask"],
            mask_downsample=d["tissue_mask_downsample"],
        )
        save_patch_montage(out / f"{name}_patches.png", d["patches"])
        row = {
            "slide": path,
            "label": entry["label"],
            "levels": reader.level_count,
            "mpp": reader.mpp,
            "backend": reader.backend,
            "tissue_fraction_of_image": float(np.mean(d["tissue_mask"])),
            "patches": int(len(d["coords"])),
            "read_level": d["tiling"]["level"],
            "seconds": round(elapsed, 3),
        }
        summary["slides"].append(row)
        print(
            f"{name}: {row['patches']} patches ({patch_size}px @ {mpp} um/px, level {row['read_level']}, "
            f"{reader.backend}) tissue {row['tissue_fraction_of_image']:.0%} in {elapsed:.2f}s -> {name}_tiling.png"
        )
    atomic_write_json(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--patch_size", type=int, default=128)
    p.add_argument("--mpp", type=float, default=1.0)
    p.add_argument("--num_workers", type=int, default=2)
    a = p.parse_args(argv)
    run_demo(a.output_dir, a.patch_size, a.mpp, a.num_workers)


if __name__ == "__main__":
    main()
