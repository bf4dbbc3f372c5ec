# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Every GPU figure the issues ask for, in one run (driven by ``benchmarks/gpu_check.sh`` on the device machine).

1. #2 tissue mask: CuPy vs NumPy masks of the same slides (generated + the CMU slide when carried) agree within one
   boundary pixel; both timings.
2. #2 reading: ``benchmarks/read_patches.py`` (cuCIM batched vs the OpenSlide loop, when OpenSlide is there);
   #24 decoding: ``benchmarks/decode.py`` (cuCIM's CPU threads vs nvJPEG on the GPU, per JPEG tile).
3. #3 embedding: ``benchmarks/embed.py`` with ResNet50-trunc at 224 px (ours vs model-only vs the reference).
4. #5 / #24 embedder phase: ``benchmarks/embedder_phase.py`` with ResNet50-trunc, 256 px, batch 100, bf16, eager
   and compiled (patches/s, peak memory).
5. #24 scale: ``benchmarks/scale.py round`` (a round on generated Camelyon16-size slides, per-phase rates and the
   extrapolation to 2.7 M patches). Step 3 also times the embedder with CUDA graphs (``t8x2s``, the default on CUDA)
   and with inductor's default mode (``t8x2sc``) against the eager one (``t8x2se``) and the compiled model alone.
   For #24 alone:
   ``bash benchmarks/gpu_check.sh --only decode embed embedder_phase scale``.
6. #7 end to end: ``benchmarks/end_to_end.py`` (one ICMIL round, time per phase vs the reference pattern).

Each step has a time budget and its own JSON; ``gpu_check.json`` and ``gpu_check.md`` gather them. ``--dry`` runs
the same steps at tiny sizes on the CPU (to check the script here before spending device time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]


def mask_parity(out: Path, dry: bool) -> dict:
    import numpy as np
    import torch
    from bench_data import bench_slide

    import monai_icmil  # noqa: F401
    from monai_icmil.data.slide import open_slide
    from monai_icmil.data.synthetic import SyntheticSlideConfig, render_slide, write_slide
    from monai_icmil.data.tiling import compute_tissue_mask

    # the benchmark slide (8192x6144, cached by gpu_check.sh --fetch) and one small negative slide
    slides = [bench_slide(out)[0]]
    cfg = SyntheticSlideConfig(width=1024 if dry else 3072, height=768 if dry else 2048)
    path = out / "mask_negative.tiff"
    write_slide(path, render_slide((5, 0), False, cfg)["image"], cfg.mpp)
    slides.append(path)
    cmu = Path(os.environ.get("ICMIL_CMU_SLIDE", ROOT / ".gpu_data" / "CMU-1-Small-Region.svs"))
    if cmu.is_file():
        slides.append(cmu)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for path in slides:
        reader = open_slide(path)
        t0 = time.perf_counter()
        cpu = compute_tissue_mask(reader, device="cpu")
        t_cpu = time.perf_counter() - t0
        t0 = time.perf_counter()
        gpu = compute_tissue_mask(reader, device=device)
        t_gpu = time.perf_counter() - t0
        a, b = np.asarray(cpu.mask), np.asarray(gpu.mask)
        diff = a != b
        # a differing pixel must touch the boundary of the CPU mask (within one pixel)
        import scipy.ndimage as ndi

        boundary = ndi.binary_dilation(a) & ~ndi.binary_erosion(a)
        boundary = ndi.binary_dilation(boundary)
        rows.append(
            {
                "slide": path.name,
                "pixels": int(a.size),
                "differing": int(diff.sum()),
                "differing_off_boundary": int((diff & ~boundary).sum()),
                "cpu_s": t_cpu,
                "gpu_s": t_gpu,
                "device": device,
                "thresholds": [float(cpu.threshold), float(gpu.threshold)],
            }
        )
    return {"rows": rows, "ok": all(r["differing_off_boundary"] == 0 for r in rows)}


def script(name: str, args: list[str], work: Path, budget: float) -> dict:
    js = work / f"{name}.json"
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(js)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
        text, rc = proc.stdout + proc.stderr[-2000:], proc.returncode
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text, rc = f"timed out after {budget:.0f} s: {partial[-2000:]}", 124
    (work / f"{name}.log").write_text(text)
    print(f"--- {name} (rc {rc}, {time.perf_counter() - t0:.0f} s)\n{text[-3000:]}", flush=True)
    try:  # the scripts write atomically; a file from another writer, cut short, must not cost the later steps
        figures = json.loads(js.read_text()) if js.is_file() else None
    except ValueError as e:
        figures = {"unreadable": f"{js}: {e}"}
    return {"rc": rc, "seconds": time.perf_counter() - t0, "figures": figures}


def report(results: dict, out: Path) -> str:
    """Write ``gpu_check.json`` and ``gpu_check.md`` (atomically) from the steps done so far; returns the markdown."""
    lines = ["# GPU check", "", f"{results['started']}, {results.get('seconds', 0):.0f} s", ""]
    lines += ["| check | figures |", "| --- | --- |"]
    if "mask_parity" in results:
        mp = results["mask_parity"]
        rows = "; ".join(
            f"{r['slide']}: {r['differing']} px differ ({r['differing_off_boundary']} off the boundary), "
            f"cpu {r['cpu_s']:.2f} s / {r['device']} {r['gpu_s']:.2f} s"
            for r in mp["rows"]
        )
        lines.append(f"| tissue mask parity | ok={mp['ok']}: {rows} |")
    for k in STEPS:
        if k in results:
            fig = results[k]["figures"]
            lines.append(f"| {k} | rc {results[k]['rc']}: " + (json.dumps(fig) if fig else "no figures") + " |")
    md = "\n".join(lines) + "\n"
    for name, text in (("gpu_check.json", json.dumps(results, indent=2, default=str)), ("gpu_check.md", md)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return md


STEPS = ("read_patches", "decode", "embed", "embedder_phase", "scale", "end_to_end")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    p.add_argument("--work", default=None, help="scratch folder for slides and per-step files (default: a temp dir)")
    p.add_argument("--deadline", type=float, default=470, help="seconds for the whole check; later steps get less")
    p.add_argument(
        "--dry", action="store_true", help="tiny sizes (a smoke run; the steps still use a GPU where there is one)"
    )
    p.add_argument("--only", nargs="*", default=None, choices=("mask_parity", *STEPS), help="run only these steps")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # only gpu_check.json / .md come back from the device (it returns at most 8 files); the rest stays in work
    work = Path(a.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    workers = str(min(16, os.cpu_count() or 2))
    cmu = Path(os.environ.get("ICMIL_CMU_SLIDE", ROOT / ".gpu_data" / "CMU-1-Small-Region.svs"))
    dry = a.dry
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    if a.only is None or "mask_parity" in a.only:
        results["mask_parity"] = mask_parity(work, dry)
        print(json.dumps(results["mask_parity"], indent=1), flush=True)
        report(results, out)
    steps = {
        "read_patches": (
            ["--patches", "200" if dry else "5000", "--num_workers", workers, "--repeats", "1" if dry else "3"],
            120,
        ),
        "decode": (
            ["--num_workers", workers, "--batch", "256", "--repeats", "1" if dry else "3"]
            + (["--slide", str(cmu)] if cmu.is_file() else []),
            60,
        ),
        "embed": (
            ["--model", "resnet18_trunc" if dry else "resnet50_trunc", "--patch_size", "64" if dry else "224"]
            + ["--patches", "256" if dry else "60000", "--batch_size", "64" if dry else "512"]
            # eager, then inductor's default mode twice, then CUDA graphs (the default on CUDA) twice (#24 item 1; two
            # calls show the spread)
            + [
                "--loaders",
                *(["t2x1se", "t2x1sc", "t2x1s"] if dry else ["t8x2se", "t8x2sc", "t8x2sc", "t8x2s", "t8x2s"]),
            ],
            180,
        ),
        "embedder_phase": (
            ["--model", "resnet18_trunc" if dry else "resnet50_trunc", "--patch_size", "64" if dry else "256"]
            + ["--batch_size", "16" if dry else "100", "--batches", "4" if dry else "30"]
            + ["--num_workers", "1" if dry else "8", "--compile", "both", "--skip_b", "--teacher_features"]
            + ["--loader_only", *(["1x1"] if dry else ["8x2", "12x4", "16x2"])],
            320,
        ),
        # 20 bag epochs: the bag phase's fixed costs (loading, validation) weigh less in its per-epoch rate
        "scale": (
            ["round", "--smoke", "--device", "cpu"] if dry else ["round", "--slides", "6", "--bag_epochs", "20"],
            240,
        ),
        "end_to_end": (
            ["--train", "4" if dry else "16", "--val", "2" if dry else "8", "--test", "2" if dry else "8"],
            150,
        ),
    }
    for name in STEPS:
        if a.only is not None and name not in a.only:
            continue
        args, budget = steps[name]
        left = a.deadline - (time.perf_counter() - t0) - 5
        if left < 20:
            print(f"--- {name} skipped: {left:.0f} s left of the {a.deadline:.0f} s deadline", flush=True)
            results[name] = {"rc": None, "figures": None, "skipped": "deadline"}
            continue
        results[name] = script(name, args, work, min(budget, left))
        results["seconds"] = time.perf_counter() - t0
        report(results, out)
    print(report(results, out))


if __name__ == "__main__":
    main()
