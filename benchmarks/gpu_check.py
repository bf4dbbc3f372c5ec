# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Every GPU figure the issues ask for, in one run (driven by ``benchmarks/gpu_check.sh`` on the device machine).

1. #2 tissue mask: CuPy vs NumPy masks of the same slides (generated + the CMU slide when carried) agree within one
   boundary pixel; both timings.
2. #2 reading: ``benchmarks/read_patches.py`` (cuCIM batched vs the OpenSlide loop, when OpenSlide is there).
3. #3 embedding: ``benchmarks/embed.py`` with ResNet50-trunc at 224 px (ours vs model-only vs the reference).
4. #5 embedder phase: ``benchmarks/couple.py`` with ResNet50-trunc, 256 px, batch 100, bf16 (patches/s, peak memory).
5. #7 end to end: ``benchmarks/end_to_end.py`` (one ICMIL round, time per phase vs the reference pattern).

Each step has a time budget and its own JSON; ``gpu_check.json`` and ``gpu_check.md`` gather them. ``--dry`` runs
the same steps at tiny sizes on the CPU (to check the script here before spending device time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]


def mask_parity(out: Path, dry: bool) -> dict:
    import numpy as np
    import torch

    import monai_icmil  # noqa: F401
    from monai_icmil.data.slide import open_slide
    from monai_icmil.data.synthetic import SyntheticSlideConfig, render_slide, write_slide
    from monai_icmil.data.tiling import compute_tissue_mask

    slides = []
    size = (1024, 768) if dry else (8192, 6144)
    for i in range(2):
        cfg = SyntheticSlideConfig(width=size[0], height=size[1])
        path = out / f"mask_{i}.tiff"
        write_slide(path, render_slide((5, i), bool(i), cfg)["image"], cfg.mpp)
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


def script(name: str, args: list[str], out: Path, budget: int) -> dict:
    js = out / f"{name}.json"
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args]
    if name != "end_to_end" or "--json" not in args:
        cmd += ["--json", str(js)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
        text, rc = proc.stdout + proc.stderr[-2000:], proc.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"timed out after {budget} s: {(e.stdout or '')[-2000:]}", 124
    (out / f"{name}.log").write_text(text)
    print(f"--- {name} (rc {rc}, {time.perf_counter() - t0:.0f} s)\n{text[-3000:]}", flush=True)
    return {"rc": rc, "figures": json.loads(js.read_text()) if js.is_file() else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    p.add_argument("--dry", action="store_true", help="tiny sizes on the CPU")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = str(min(16, os.cpu_count() or 2))
    dry = a.dry
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    results["mask_parity"] = mask_parity(out, dry)
    print(json.dumps(results["mask_parity"], indent=1), flush=True)
    results["read_patches"] = script(
        "read_patches",
        ["--patches", "200" if dry else "5000", "--num_workers", workers, "--repeats", "1" if dry else "3"],
        out,
        120,
    )
    results["embed"] = script(
        "embed",
        ["--model", "resnet18_trunc" if dry else "resnet50_trunc", "--patch_size", "64" if dry else "224"]
        + ["--patches", "256" if dry else "30000", "--batch_size", "64" if dry else "512"]
        + ["--num_workers", "1" if dry else "8", "--read_threads", "2" if dry else "4"],
        out,
        180,
    )
    results["couple"] = script(
        "couple",
        ["--model", "resnet18_trunc" if dry else "resnet50_trunc", "--patch_size", "64" if dry else "256"]
        + [
            "--batch_size",
            "16" if dry else "100",
            "--batches",
            "4" if dry else "60",
            "--num_workers",
            "1" if dry else "8",
        ],
        out,
        150,
    )
    results["end_to_end"] = script(
        "end_to_end",
        ["--train", "4" if dry else "16", "--val", "2" if dry else "8", "--test", "2" if dry else "8"],
        out,
        150,
    )
    results["seconds"] = time.perf_counter() - t0
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [
        "# GPU check",
        "",
        f"{results['started']}, {results['seconds']:.0f} s",
        "",
        "| check | figures |",
        "| --- | --- |",
    ]
    lines.append(
        f"| tissue mask parity | ok={results['mask_parity']['ok']}: "
        + "; ".join(
            f"{r['slide']}: {r['differing']} px differ ({r['differing_off_boundary']} off the boundary), "
            f"cpu {r['cpu_s']:.2f} s / {r['device']} {r['gpu_s']:.2f} s"
            for r in results["mask_parity"]["rows"]
        )
        + " |"
    )
    for k in ("read_patches", "embed", "couple", "end_to_end"):
        fig = results[k]["figures"]
        lines.append(f"| {k} | rc {results[k]['rc']}: " + (json.dumps(fig) if fig else "no figures") + " |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
