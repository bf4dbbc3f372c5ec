# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""One ICMIL round end to end on a demo-sized synthetic dataset: time per phase, ours next to the reference pattern.

ours: the bundle (``train.json`` + ``demo.json``, ``num_rounds=1``): tiling, round-0 embedding, bag phase, embedder
phase, re-embedding, bag phase; phase times from ``state.json``.

baseline, the reference code's pattern for the same round: every tissue patch written as a PNG first (its step 0),
then each embedding pass reads the PNGs one by one (PIL -> ``ToTensor`` -> ``torch.cat``, fp32 forward). The bag and
embedder phases are the same computation in both and are run once (ours); the baseline is credited with our
embedder-phase time, although the reference also reads PNGs there, so the ratio understates the difference.

    python benchmarks/end_to_end.py [--train 8 --val 4 --test 4] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from embed import reference_pattern  # noqa: E402

import monai_icmil  # noqa: E402,F401
from monai_icmil.data.slide import open_slide  # noqa: E402
from monai_icmil.data.store import CoordsStore  # noqa: E402
from monai_icmil.networks import create_embedder  # noqa: E402
from monai_icmil.utils import atomic_write_json  # noqa: E402

BUNDLE = ROOT / "bundles" / "icmil"


def dump_pngs(out: Path, data: Path, coords_dir: Path) -> tuple[list[str], float]:
    """The reference's step 0: every tissue patch of every slide as a PNG file."""
    import PIL.Image

    store = CoordsStore(coords_dir)
    datalist = json.loads((data / "datalist.json").read_text())
    t0 = time.perf_counter()
    pngs = []
    for split in ("training", "validation", "test"):
        for e in datalist[split]:
            sid = Path(e["image"]).stem
            arrays, meta = store.load(sid), store.metadata(sid)
            if arrays is None or not len(arrays["coords"]):
                continue
            reader = open_slide(data / e["image"])
            patches = reader.read_patches(arrays["coords"].numpy(), meta["read_size"], meta["level"], num_workers=1)
            for i, patch in enumerate(patches):
                pngs.append(str(out / f"{sid}_{i:06d}.png"))
                img = PIL.Image.fromarray(patch)
                if meta["read_size"] != meta["patch_size"]:
                    img = img.resize((meta["patch_size"], meta["patch_size"]), PIL.Image.BILINEAR)
                img.save(pngs[-1])
    return pngs, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=8)
    p.add_argument("--val", type=int, default=4)
    p.add_argument("--test", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--mlflow", action="store_true", help="track the run in MLflow too (off: phase times only)")
    a = p.parse_args()
    from monai.bundle import run

    tmp = Path(a.out or tempfile.mkdtemp(prefix="icmil_e2e_"))
    data, out = tmp / "data", tmp / "out"
    synthetic = json.loads((BUNDLE / "configs" / "demo.json").read_text())["synthetic"]
    synthetic.update(num_training=a.train, num_validation=a.val, num_test=a.test)
    t0 = time.perf_counter()
    run(
        run_id="run",
        config_file=[str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "demo.json")],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        bundle_root=str(BUNDLE),
        dataset_dir=str(data),
        output_dir=str(out),
        synthetic=synthetic,
        num_rounds=1,
        device=a.device,
        progress=False,
        **{"mlflow#enabled": a.mlflow},
    )
    wall = time.perf_counter() - t0
    rounds = json.loads((out / "state.json").read_text())["rounds"]
    ours = {
        "embed round 0": rounds["0"]["embed"]["seconds"],
        "bag phase round 0": rounds["0"]["bag_phase"]["seconds"],
        "embedder phase round 1": rounds["1"]["embedder_phase"]["seconds"],
        "embed round 1": rounds["1"]["embed"]["seconds"],
        "bag phase round 1": rounds["1"]["bag_phase"]["seconds"],
    }

    demo = json.loads((BUNDLE / "configs" / "demo.json").read_text())
    cfg = {"name": demo["embedder#name"], "input_size": demo["embedder#input_size"]}
    png_dir = tmp / "pngs"
    png_dir.mkdir(exist_ok=True)
    pngs, dump_s = dump_pngs(png_dir, data, out / "coords")
    device = torch.device(a.device)
    feats_dir = tmp / "reference"
    feats_dir.mkdir(exist_ok=True)
    r0 = create_embedder(cfg["name"], input_size=cfg["input_size"])
    r1 = create_embedder(None, weights=out / "round_1" / "embedder_phase" / "embedder.safetensors")
    ref_embed = {r: len(pngs) / reference_pattern(e.to(device), pngs, device, feats_dir) for r, e in ((0, r0), (1, r1))}
    baseline = {
        "patch dump (PNG)": dump_s,
        "embed round 0": ref_embed[0],
        "bag phase round 0": ours["bag phase round 0"],
        "embedder phase round 1": ours["embedder phase round 1"],
        "embed round 1": ref_embed[1],
        "bag phase round 1": ours["bag phase round 1"],
    }
    print(
        f"one ICMIL round, {a.train}/{a.val}/{a.test} demo slides, {len(pngs)} patches, device {device}, "
        f"{os.cpu_count()} CPU cores ({platform.machine()}); bundle wall time {wall:.1f} s (incl. data generation)"
    )
    print(f"{'phase':<26}{'ours (s)':>10}{'baseline (s)':>14}")
    for k in baseline:
        o = ours.get(k)
        print(f"{k:<26}{'-' if o is None else f'{o:.1f}':>10}{baseline[k]:>14.1f}")
    t_ours, t_base = sum(ours.values()), sum(baseline.values())
    print(f"{'total':<26}{t_ours:>10.1f}{t_base:>14.1f}   baseline / ours = {t_base / t_ours:.2f}x")
    if a.json:
        atomic_write_json(a.json, {"ours": ours, "baseline": baseline, "patches": len(pngs)})


if __name__ == "__main__":
    main()
