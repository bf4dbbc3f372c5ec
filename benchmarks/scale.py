# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""What a Camelyon16-size cohort costs (issue #24).

``bags``: bag-phase time and peak memory for bags of 1k / 10k / 100k instances of 1024-d features (float16 on disk,
as the embed phase stores them), each size in a fresh process (peak memory: the process's maximum resident set).
At the largest size the cohort is run with 2 and with 8 training bags: the bag phase reads one bag at a time from
the feature store, so its peak must not grow with the cohort. Runs on the CPU:

    python benchmarks/scale.py bags [--sizes 1000 10000 100000] [--dim 1024]

``round``: one ICMIL round (embed, bag phase, embedder phase, re-embed) of the bundle on generated slides whose patch
counts are drawn from ``--min_patches``-``--max_patches`` at ``--patch_size`` px (Camelyon16 at 20x: 5k-20k at 256
px), timed per phase from ``state.json``; each phase's measured rate (patches/s embedded, seconds per bag instance and
epoch; for embedding and the embedder phase, the measured time plus the rest at the phase's steady rate, its start-up
and compile paid once) extrapolates to ``--target_patches`` (Camelyon16: 2.7 M patches in 400 slides, 270 of them for
training and validation), labelled as an extrapolation. The bag phase is measured with 1 restart, no witness search
and no early stopping, and extrapolated at ``--target_restarts`` (the bundle's 3) restarts of ``--target_bag_epochs``
epochs (an upper bound: early stopping may end them sooner); the witness search is not in the figure. Made for a GPU;
``--smoke`` runs it at toy size on the CPU (CI):

    python benchmarks/scale.py round --slides 6 [--embedder_batches 200] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
BUNDLE = ROOT / "bundles" / "icmil"

# ----------------------------------------------------------------------------------------------- bag-phase memory


def bag_child(size: int, bags: int, dim: int, epochs: int, folder: Path, generate: bool) -> dict[str, Any]:
    """Write ``bags`` training bags (and 2 validation bags) of ``size`` instances (``generate``), or run the bag phase
    on them in this process (a fresh one, so its peak memory is the phase's)."""
    import torch

    from monai_icmil.data.store import BagDataset, FeatureStore
    from monai_icmil.engines import BagPhase
    from monai_icmil.networks import ABMIL

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    store, rng = FeatureStore(folder / "features"), np.random.default_rng(0)
    items = []
    for k in range(bags + 2):
        sid, label = f"bag_{k}", k % 2
        key = {"bag": sid, "size": size, "dim": dim}
        items.append({"slide_id": sid, "label": label, "image": sid, "key": key})
        if generate:
            feats = rng.standard_normal((size, dim), dtype=np.float32)
            feats[: max(1, size // 50), :8] += 2.0 * label  # a few witnesses in positive bags
            coords = np.zeros((size, 2), np.int64)
            store.save(sid, {"features": feats.astype(np.float16), "coords": coords}, key, {"num_patches": size})
            del feats
    if generate:
        return {"written": len(items)}
    keys = {i["slide_id"]: i["key"] for i in items}
    train, val = BagDataset(store, items[:bags], keys), BagDataset(store, items[bags:], keys)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # imports
    phase = BagPhase(epochs=epochs, restarts=1, early_stop_patience=None, device="cpu", progress=False)
    t0 = time.perf_counter()
    phase(train, val, lambda **kw: ABMIL(hidden_dim=512, **kw), folder / "out")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "size": size,
        "bags": bags,
        "dim": dim,
        "epochs": epochs,
        "seconds": seconds,
        "seconds_per_bag_step": seconds / (epochs * (bags + 2)),
        "peak_gib": peak / 2**20,
        "peak_after_imports_gib": rss0 / 2**20,
        "bag_gib_float32": size * dim * 4 / 2**30,
    }


def run_bags(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = [(s, 2) for s in args.sizes] + [(max(args.sizes), args.cohort)]
    rows = []
    for size, bags in runs:
        with tempfile.TemporaryDirectory(prefix="icmil_scale_") as tmp:
            cmd = [sys.executable, __file__, "_bag", "--size", str(size), "--bags", str(bags), "--dim", str(args.dim)]
            cmd += ["--epochs", str(args.epochs), "--folder", tmp]
            bag_child(size, bags, args.dim, args.epochs, Path(tmp), generate=True)  # the bags, here
            proc = subprocess.run(cmd, capture_output=True, text=True)  # the phase alone, in a fresh process
            if proc.returncode != 0:
                raise RuntimeError(f"bag run of size {size} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"bag phase, AB-MIL (hidden 512), {args.dim}-d float16 features, CPU ({os.cpu_count()} cores)")
    print("s / bag pass: the phase's seconds / (epochs x (training bags + 2 validation bags)), fixed costs included")
    head = ("instances", 10), ("train bags", 11), ("s / bag pass", 14), ("peak GiB", 10), ("after imports", 15)
    print("".join(f"{name:>{width}}" for name, width in head) + f"{'one bag fp32':>14}")
    for r in rows:
        print(
            f"{r['size']:>10}{r['bags']:>11}{r['seconds_per_bag_step']:>14.3f}{r['peak_gib']:>10.2f}"
            f"{r['peak_after_imports_gib']:>15.2f}{r['bag_gib_float32']:>14.2f}"
        )
    small, large = max(rows[:-1], key=lambda r: r["size"]), rows[-1]  # the largest size with 2 bags, and the cohort
    print(
        f"peak with {large['bags']} bags of {large['size']} / with {small['bags']}: "
        f"{large['peak_gib'] / small['peak_gib']:.2f}x (1.0: the cohort is not held in memory)"
    )
    return rows


# --------------------------------------------------------------------------------------------- a round at scale


def _cohort_slide(path: Path, texture: np.ndarray, target: int, patch_size: int, mpp: float) -> None:
    """One generated slide: ``texture`` tiled over ``target`` patches' worth of tissue, in a background margin."""
    from monai_icmil.data.synthetic import write_slide

    side = math.ceil(math.sqrt(target)) * patch_size
    margin = side // 8  # background around the tissue, as on a real slide (tissue detection needs some)
    img = np.full((side + 2 * margin, side + 2 * margin, 3), 242, np.uint8)
    t = texture.shape[0]
    for y in range(0, side, t):  # the texture tiled block by block (no slide-sized temporary)
        for x in range(0, side, t):
            h, w = min(t, side - y), min(t, side - x)
            img[margin + y : margin + y + h, margin + x : margin + x + w] = texture[:h, :w]
    write_slide(path, img, mpp)


def make_cohort(root: Path, slides: int, patches: tuple[int, int], patch_size: int, seed: int) -> tuple[Path, list]:
    """Generated slides with ``patches`` (range) tissue patches each at ``patch_size`` px and 0.5 um/px: a rendered
    tissue texture (one per class: normal, and tumour over about half of the tissue) tiled to the slide's size.
    Slides are written in parallel processes on machines with 8 cores or more (one per 4 cores)."""
    from concurrent.futures import ProcessPoolExecutor

    from monai_icmil.data.synthetic import SyntheticSlideConfig, render_slide

    rng = np.random.default_rng(seed)
    cfg = SyntheticSlideConfig(width=2048, height=2048, tissue_fraction=(0.97, 0.99), tumour_fraction=(0.5, 0.6))
    texture = {  # the rendered slide's central 1024 px, all tissue
        label: render_slide((seed, label), bool(label), cfg)["image"][512:1536, 512:1536] for label in (0, 1)
    }
    root.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list] = {"training": [], "validation": [], "test": []}
    counts, jobs = [], []
    for k in range(slides):
        label, split = k % 2, ("training", "training", "validation", "validation", "test", "test")[k % 6]
        target = int(rng.integers(patches[0], patches[1] + 1))
        name = f"slide_{k:03d}.tiff"
        jobs.append((root / name, texture[label], target, patch_size, cfg.mpp))
        splits[split].append({"image": name, "label": label})
        counts.append(target)
    workers = min(slides, len(os.sched_getaffinity(0)) // 4)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for future in [pool.submit(_cohort_slide, *job) for job in jobs]:
                future.result()
    else:
        for job in jobs:
            _cohort_slide(*job)
    (root / "datalist.json").write_text(json.dumps(splits, indent=2))
    return root / "datalist.json", counts


def run_round(args: argparse.Namespace) -> dict[str, Any]:
    from monai.bundle import run

    tmp = Path(args.out or tempfile.mkdtemp(prefix="icmil_scale_"))
    t0 = time.perf_counter()
    make_cohort(tmp / "data", args.slides, (args.min_patches, args.max_patches), args.patch_size, args.seed)
    generate = time.perf_counter() - t0
    overrides = {
        "tiling#patch_size": args.patch_size,
        "tiling#mpp": 0.5,
        "embedder#name": args.embedder,
        "embedder#input_size": args.input_size or args.patch_size,
        "embed#batch_size": args.embed_batch,
        "bag_phase#epochs": args.bag_epochs,
        "bag_phase#restarts": 1,
        "bag_phase#witness_search": False,  # the extrapolation is per instance-epoch; the search is a one-off per phase
        "bag_phase#early_stop_patience": None,
        "embedder_phase#epochs": 1,
        "embedder_phase#batches_per_epoch": args.embedder_batches,
        "embedder_phase#batch_size": args.embedder_batch,
        "embedder_phase#val_interval": args.embedder_batches,
        "num_rounds": 1,
        "round_patience": 1,
        "device": args.device,
        "progress": False,
        "mlflow#enabled": False,
        "tiling_qc": False,
    }
    if args.smoke:
        overrides.update({"embed#num_workers": 0, "embed#prefetch_threads": 1, "embedder_phase#num_workers": 0})
        overrides.update({"embedder_phase#val_patches": 32, "aggregator#hidden_dim": 32})
    t1 = time.perf_counter()
    run(
        run_id="run",
        config_file=[str(BUNDLE / "configs" / "train.json")],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        bundle_root=str(BUNDLE),
        dataset_dir=str(tmp / "data"),
        output_dir=str(tmp / "out"),
        **overrides,
    )
    wall = time.perf_counter() - t1
    rounds = json.loads((tmp / "out" / "state.json").read_text())["rounds"]
    history = json.loads((tmp / "out" / "round_0" / "bag_phase" / "history.json").read_text())
    patches = {int(r): rounds[r]["embed"]["patches"] for r in ("0", "1")}
    bag_instances = _bag_instances(tmp / "out", tmp / "data" / "datalist.json")
    measured = {
        "embed round 0 (s)": rounds["0"]["embed"]["seconds"],
        "bag phase round 0 (s)": rounds["0"]["bag_phase"]["seconds"],
        "embedder phase round 1 (s)": rounds["1"]["embedder_phase"]["seconds"],
        "embed round 1 (s)": rounds["1"]["embed"]["seconds"],
        "bag phase round 1 (s)": rounds["1"]["bag_phase"]["seconds"],
    }
    epochs = max(1, len(history))  # one row per epoch run
    steady = {  # the phases' own rates after their first batch (start-up and compile left out)
        "embed round 0": rounds["0"]["embed"].get("steady_patches_per_s"),
        "embed round 1": rounds["1"]["embed"].get("steady_patches_per_s"),
        "embedder phase round 1": rounds["1"]["embedder_phase"].get("steady_patches_per_s"),
    }
    rates = {
        "embed patches/s (round 0)": patches[0] / max(measured["embed round 0 (s)"], 1e-9),
        "embed patches/s (round 1)": patches[1] / max(measured["embed round 1 (s)"], 1e-9),
        "bag phase s per 1k instance-epochs": 1000 * measured["bag phase round 0 (s)"] / (bag_instances * epochs),
        "embedder phase s per batch": measured["embedder phase round 1 (s)"] / args.embedder_batches,
        **{f"{k} steady patches/s": v for k, v in steady.items()},
    }
    train_share = 270 / 400  # Camelyon16: 270 training (validation drawn from them), 130 test slides

    def grow(seconds: float, done: float, todo: float, rate: float | None) -> float:
        """``seconds`` for ``done`` units, plus ``todo - done`` more at the steady ``rate`` (units/s); without one,
        the whole call's rate (start-up and compile included, so an overestimate)."""
        return seconds + (todo - done) / rate if rate else seconds * todo / max(done, 1e-9)

    phase_patches = args.embedder_batches * args.embedder_batch
    target = {
        "embed round 0 (s)": grow(
            measured["embed round 0 (s)"], patches[0], args.target_patches, steady["embed round 0"]
        ),
        "bag phase round 0 (s)": rates["bag phase s per 1k instance-epochs"]
        * args.target_patches
        * train_share
        * args.target_bag_epochs
        * args.target_restarts
        / 1000,
        "embedder phase round 1 (s)": grow(
            measured["embedder phase round 1 (s)"],
            phase_patches,
            args.target_embedder_batches * args.embedder_batch,
            steady["embedder phase round 1"],
        ),
        "embed round 1 (s)": grow(
            measured["embed round 1 (s)"], patches[1], args.target_patches, steady["embed round 1"]
        ),
    }
    target["bag phase round 1 (s)"] = target["bag phase round 0 (s)"]
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} CPU cores, device {args.device}",
        "slides": args.slides,
        "patches": patches,
        "generate_s": generate,
        "bundle_wall_s": wall,
        "measured": measured,
        "rates": rates,
        "extrapolated": target,
        "extrapolated_round_min": sum(target.values()) / 60,
    }
    print(f"one ICMIL round at scale: {args.slides} generated slides, {patches[0]} patches at {args.patch_size} px,")
    print(f"{args.embedder}, {result['machine']}; slides generated in {generate:.0f} s, bundle {wall:.0f} s")
    print(f"{'phase':<30}{'measured (s)':>14}{'EXTRAPOLATED to C16 (s)':>26}")
    for k in measured:
        print(f"{k:<30}{measured[k]:>14.1f}{target[k]:>26.0f}")
    for k, v in rates.items():
        print(f"  rate: {k} = {v:.4g}" if v is not None else f"  rate: {k} = n/a")
    print(
        f"EXTRAPOLATED one round at {args.target_patches:.3g} patches, {args.target_embedder_batches} embedder-phase "
        f"batches, {args.target_restarts} bag restart(s) of {args.target_bag_epochs} epochs (no early stop, no witness "
        f"search): {result['extrapolated_round_min']:.1f} min (goal < 30)"
    )
    if args.json:
        from monai_icmil.utils import atomic_write_json

        atomic_write_json(args.json, result)
    return result


def _bag_instances(out: Path, datalist: Path) -> int:
    """Instances the bag phase reads per epoch (round 0's training and validation bags)."""
    from safetensors import safe_open

    splits = json.loads(datalist.read_text())
    ids = {Path(e["image"]).stem for split in ("training", "validation") for e in splits[split]}
    total = 0
    for sid in ids:
        with safe_open(str(out / "round_0" / "features" / f"{sid}.safetensors"), "np") as f:
            total += f.get_slice("features").get_shape()[0]
    return max(total, 1)


def main(argv: list[str] | None = None) -> Any:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("bags", help="bag-phase time and peak memory per bag size (CPU)")
    b.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    b.add_argument("--dim", type=int, default=1024)
    b.add_argument("--epochs", type=int, default=1)
    b.add_argument("--cohort", type=int, default=8, help="training bags of the largest size in the last run")
    c = sub.add_parser("_bag")
    for name in ("size", "bags", "dim", "epochs"):
        c.add_argument(f"--{name}", type=int, required=True)
    c.add_argument("--folder", required=True)
    r = sub.add_parser("round", help="one round at scale, timed per phase and extrapolated (GPU)")
    r.add_argument("--slides", type=int, default=6)
    r.add_argument("--min_patches", type=int, default=5000)
    r.add_argument("--max_patches", type=int, default=20000)
    r.add_argument("--patch_size", type=int, default=256)
    r.add_argument("--input_size", type=int, default=None)
    r.add_argument("--embedder", default="resnet50_trunc")
    r.add_argument("--embed_batch", type=int, default=512)
    r.add_argument("--bag_epochs", type=int, default=3)
    r.add_argument("--embedder_batches", type=int, default=200)
    r.add_argument("--embedder_batch", type=int, default=100)
    r.add_argument("--target_patches", type=float, default=2.7e6)
    r.add_argument("--target_embedder_batches", type=int, default=2000)
    r.add_argument("--target_bag_epochs", type=int, default=50)
    r.add_argument("--target_restarts", type=int, default=3, help="bag restarts per phase (the bundle's: 3)")
    r.add_argument("--device", default=None)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default=None)
    r.add_argument("--json", default=None)
    r.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (CI): no meaningful numbers")
    args = p.parse_args(argv)
    if args.mode == "_bag":
        print(json.dumps(bag_child(args.size, args.bags, args.dim, args.epochs, Path(args.folder), generate=False)))
        return None
    if args.mode == "bags":
        return run_bags(args)
    if args.smoke:
        args.device = "cpu"
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.slides, args.min_patches, args.max_patches, args.patch_size = 6, 150, 250, 32
        args.embedder, args.embed_batch, args.embedder_batches, args.embedder_batch = "resnet18_trunc", 64, 2, 8
        args.bag_epochs = 1
    return run_round(args)


if __name__ == "__main__":
    main()
