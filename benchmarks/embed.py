# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Embedding-phase throughput, side by side in one run:

(a) model alone: the embedder on random uint8 tensors already in memory (the ceiling);
ours: the full embed phase, :class:`~monai_icmil.engines.Embed` (read by coordinate + normalise + forward + atomic
    write), timed over the whole call and, as ``ours_steady_by_loader``, after its first batch (without the start-up);
(b) the reference pattern: patches saved as PNG beforehand (not timed), then per batch of 448: PIL open one by one,
    ``ToTensor``, ``torch.cat`` onto the device one image at a time, fp32 forward, ``np.save`` of the features.

Ours runs once per ``--loaders`` entry: ``WxT`` is ``W`` DataLoader worker processes with ``T`` decoding threads
each; ``tKxT`` is ``K`` reader threads in this process (:class:`~monai_icmil.data.prefetch.Prefetcher`, reading
straight into pinned memory on CUDA) with ``T`` decoding threads each; ``0xT`` is ``t1xT``. A trailing ``s``
(``t8x2s``) moves the batches to the GPU on a copy stream of their own (``Embed(copy_stream=True)``); a trailing
``e`` (``t8x2se``) runs the embedder eagerly (``Embed(compile=False)``), a trailing ``c`` (``t8x2sc``) compiles it
with inductor's default mode (``Embed(compile=True)``), a trailing ``g`` (``t8x2sg``) with CUDA graphs
(``Embed(compile="reduce-overhead")``); without any the engine's default applies (``torch.compile`` with CUDA graphs
and a fixed batch shape on CUDA, eager on the CPU; before 1d4b90d inductor's default mode). On CUDA, (a) is also
timed compiled (``a_model_only_compiled``), the ceiling of the compiled path. A loader named twice (``t8x2s
t8x2s``) is reported for its second call, the first as ``"t8x2s (first call)"`` (both reuse the compile of (a): same
module, same shapes).

    python benchmarks/embed.py [--model resnet18] [--patch_size 224] [--patches 448] [--batch_size 64]
                               [--loaders 2x2 0x4 t2x2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_data import bench_slide

import monai_icmil  # noqa: F401
from monai_icmil.data.integrity import damaged_patches
from monai_icmil.data.prepare import SlideTiles
from monai_icmil.data.slide import open_slide
from monai_icmil.data.store import FeatureStore
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines import Embed, patch_loader
from monai_icmil.networks import create_embedder
from monai_icmil.utils import atomic_write_json


def model_only(embedder, n: int, size: int, batch: int, device: torch.device, amp: bool) -> float:
    x = torch.randint(0, 255, (batch, 3, size, size), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    with torch.inference_mode(), ctx:
        embedder(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        while done < n:
            embedder(x)
            done += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def reference_pattern(embedder, pngs: list[str], device: torch.device, out: Path, batch: int = 448) -> float:
    import PIL.Image
    import torchvision.transforms as T

    to_tensor = T.ToTensor()
    import copy

    # the reference feeds ToTensor output (0-1) to a plain fp32 network in the default memory format
    model = copy.deepcopy(embedder.backbone).to(memory_format=torch.contiguous_format).float().eval()
    t0 = time.perf_counter()
    feats = []
    for i in range(0, len(pngs), batch):
        x = torch.FloatTensor().to(device)
        for name in pngs[i : i + batch]:
            x = torch.cat([x, to_tensor(PIL.Image.open(name)).to(device).unsqueeze(0)], dim=0)
        with torch.no_grad():
            feats.extend(model(x).cpu().numpy())
    np.save(out / "reference_feats.npy", np.array(feats))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(pngs) / (time.perf_counter() - t0)


def feature_check(embedder, store: FeatureStore, item: SlideTiles, device: torch.device, amp: bool, n: int = 64):
    """Largest difference between the stored features of the first ``n`` patches and the embedder applied to the
    same patches read directly, under the same precision: the engine's reading, batching and copies are exact."""
    patches = open_slide(item["image"]).read_patches(
        item["coords"][:n],
        item["read_size"],
        item["level"],
        out_size=item["patch_size"] if item["patch_size"] != item["read_size"] else None,
        num_workers=2,
        as_tensor=True,
    )
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    with torch.inference_mode(), ctx:
        direct = embedder(patches.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
    stored = store.load(item["slide_id"])["features"][:n].float()
    return float((stored - direct.to(stored.dtype)).abs().max())


def parse_loader(spec: str) -> dict[str, int]:
    """``"8x2"`` -> 8 worker processes x 2 decoding threads; ``"t8x2"`` -> 8 reader threads in this process x 2;
    ``"t8x2s"`` -> the same, with the copies to the GPU on a stream of their own; a trailing ``e`` runs the embedder
    eagerly, ``c`` compiles it with inductor's default mode (``compile=True``), ``g`` with CUDA graphs
    (``compile="reduce-overhead"``, the engine's default on CUDA)."""
    spec = spec.lower()
    mode = {"e": False, "g": "reduce-overhead", "c": True}.get(spec[-1:])  # else the engine's default
    spec = spec.rstrip("egc")
    threaded, copy_stream = spec.startswith("t"), spec.endswith("s")
    k, t = (int(v) for v in spec.strip("ts").split("x"))
    flags: dict = {"copy_stream": copy_stream}
    if mode is not None:
        flags["compile"] = mode
    if threaded:
        return {"num_workers": 0, "prefetch_threads": k, "read_threads": t, **flags}
    return {"num_workers": k, "prefetch_threads": 1, "read_threads": t, **flags}


def loader_only(items: list, batch_size: int, loader: dict[str, int], device: torch.device) -> float:
    """Patches/s of the embedding phase's loader alone (read, pin, move to ``device``; no model): what ours is
    capped at when reading, not the GPU, is the limit."""
    t0 = time.perf_counter()
    n = 0
    reading = {k: v for k, v in loader.items() if k not in ("copy_stream", "compile")}  # engine settings
    for batch in patch_loader(items, batch_size, device=device, **reading):
        n += len(batch["patches"].to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def compare_loaders(
    items: list, batch_size: int, loaders: list[str], device: torch.device, rounds: int, n: int, out: str | None
) -> None:
    """The loaders alone, side by side: ``rounds`` interleaved passes each, median patches/s and its ratio to the
    first loader's."""
    runs: dict[str, list[float]] = {spec: [] for spec in loaders}
    for _ in range(rounds):
        for spec in loaders:
            runs[spec].append(loader_only(items, batch_size, parse_loader(spec), device))
    med = {spec: float(np.median(v)) for spec, v in runs.items()}
    print(f"loaders alone: {n} patches per pass, batch {batch_size}, {device}, {os.cpu_count()} CPU cores")
    print(f"{'loader':<10}{'patches/s (median)':>20}{'vs ' + loaders[0]:>12}   passes")
    for spec in loaders:
        passes = " ".join(f"{v:.0f}" for v in runs[spec])
        print(f"{spec:<10}{med[spec]:>20.1f}{med[spec] / med[loaders[0]]:>11.2f}x   {passes}")
    if out:
        atomic_write_json(out, {"loader_only": med, "passes": runs, "n": n, "batch_size": batch_size})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--patch_size", type=int, default=224)
    p.add_argument("--patches", type=int, default=448)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--read_threads", type=int, default=2)
    p.add_argument("--loaders", nargs="*", default=None, help="WxT entries (default: --num_workers x --read_threads)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--amp",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 autocast for (a) and ours (auto: on CUDA only, as the engine); (b) stays fp32",
    )
    p.add_argument(
        "--loader_only",
        type=int,
        default=0,
        help="only time each loader alone (read, pin, move; no model, no reference), this many rounds interleaved",
    )
    a = p.parse_args()
    device = torch.device(a.device)
    amp = device.type == "cuda" if a.amp == "auto" else a.amp == "on"
    tmp = Path(tempfile.mkdtemp())
    slide, _ = bench_slide(tmp)
    tiling = TilingConfig(patch_size=a.patch_size, mpp=0.5, stride=a.patch_size // 2, min_tissue=0.25)
    tiles = tiling.tile(open_slide(slide))
    coords = tiles.coords[: a.patches]
    # one slide holds a few thousand tiles; ours embeds it as many times as --patches asks (as separate slides, so
    # worker start-up is amortised as over a real dataset), the reference embeds its tiles once (its rate is per patch)
    copies = -(-a.patches // len(coords))
    n = copies * len(coords)
    items = [
        SlideTiles(
            slide_id=f"bench_{i}",
            image=str(slide),
            coords=coords,
            level=tiles.level,
            read_size=tiles.read_size,
            patch_size=tiles.patch_size,
        )
        for i in range(copies)
    ]
    loaders = a.loaders or [f"{a.num_workers}x{a.read_threads}"]
    if a.loader_only:
        compare_loaders(items, a.batch_size, loaders, device, a.loader_only, n, a.json)
        return
    embedder = create_embedder(a.model, input_size=a.patch_size).to(device).eval()
    embedder = embedder.to(memory_format=torch.channels_last)  # as the engine does, so (a) is the same model
    rate_model = model_only(embedder, max(n, 4 * a.batch_size), a.patch_size, a.batch_size, device, amp)
    rate_compiled = compile_s = rate_graphs = None
    rate_tuned = None  # (a) with cuDNN's autotuner: does the engine leave speed on the table by not turning it on?
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        rate_tuned = model_only(embedder, max(n, 4 * a.batch_size), a.patch_size, a.batch_size, device, amp)
        torch.backends.cudnn.benchmark = False
        print(f"(a) with cudnn.benchmark: {rate_tuned:.1f} patches/s (without: {rate_model:.1f})", flush=True)
        t0 = time.perf_counter()
        compiled = torch.compile(embedder, dynamic=False)
        rate_compiled = model_only(compiled, max(n, 4 * a.batch_size), a.patch_size, a.batch_size, device, amp)
        compile_s = time.perf_counter() - t0  # the first call's compile, and the timed passes
        print(f"(a) compiled: {rate_compiled:.1f} patches/s (compile + timing {compile_s:.0f} s)", flush=True)
        if any(spec.lower().endswith("g") for spec in loaders):  # the ceiling of the CUDA-graph loaders
            try:
                graphed = torch.compile(embedder, dynamic=False, mode="reduce-overhead")
                rate_graphs = model_only(graphed, max(n, 4 * a.batch_size), a.patch_size, a.batch_size, device, amp)
                print(f"(a) compiled with CUDA graphs: {rate_graphs:.1f} patches/s", flush=True)
            except Exception as e:  # noqa: BLE001 - a figure missing, not the run
                print(f"(a) compiled with CUDA graphs failed: {type(e).__name__}: {e}", flush=True)
    print(f"(a) model only: {rate_model:.1f} patches/s", flush=True)
    rates, steady, reads, checks, errors = {}, {}, {}, {}, {}

    def dump(**final) -> None:
        """The JSON so far (after each loader: a run cut off by its time budget keeps what it measured)."""
        if not a.json:
            return
        figures = {
            "a_model_only": rate_model,
            "a_model_only_cudnn_benchmark": rate_tuned,
            "a_model_only_compiled": rate_compiled,
            "a_model_only_cudagraphs": rate_graphs,
            "a_compile_and_time_s": compile_s,
            "ours_by_loader": rates,
            "ours_steady_by_loader": steady,
            "loader_only": reads,
            "feature_check_by_loader": checks,
            "errors_by_loader": errors,
            "model": a.model,
            "patch_size": a.patch_size,
            "amp": amp,
            "n": n,
            "partial": not final,
            **final,
        }
        atomic_write_json(a.json, figures)

    for k, spec in enumerate(loaders):
        loader = parse_loader(spec)
        if spec in rates:  # a loader named twice: its first call is kept apart
            for d in (rates, steady, reads, checks):
                d[f"{spec} (first call)"] = d.pop(spec)
        store = FeatureStore(tmp / f"features_{k}")
        t0 = time.perf_counter()
        phase = Embed(batch_size=a.batch_size, amp=amp, progress=False, **loader)
        try:
            res = phase(items, embedder, store, tiling.params(), device=device)
        except Exception as e:  # noqa: BLE001 - one loader failing (a compile mode, say) must not lose the others
            print(f"ours with {spec} failed: {type(e).__name__}: {e}", flush=True)
            errors[spec] = f"{type(e).__name__}: {e}"[:500]
            continue
        rates[spec] = res["patches"] / (time.perf_counter() - t0)
        steady[spec] = res["steady_patches_per_s"]
        reads[spec] = loader_only(items, a.batch_size, loader, device)
        how = (
            (
                f"{loader['num_workers']} worker processes"
                if loader["num_workers"]
                else f"{loader['prefetch_threads']} reader threads"
            )
            + (" (copy stream)" if loader["copy_stream"] else "")
            + (" (eager)" if loader.get("compile") is False else "")
        )
        checks[spec] = feature_check(embedder, store, items[0], device, amp)
        print(
            f"ours with {how} x {loader['read_threads']} decoding threads: {rates[spec]:.1f} patches/s, "
            f"{steady[spec]:.1f} after the first batch (its loader alone, batches moved to {device.type}: "
            f"{reads[spec]:.1f}; stored features vs direct: max |diff| {checks[spec]:.2e})",
            flush=True,
        )
        dump()
    if not rates:
        raise SystemExit(
            f"every loader failed ({'; '.join(f'{k}: {v}' for k, v in errors.items())}); no figure for ours"
        )
    best = max(rates, key=rates.get)
    rate_ours = rates[best]
    check = max(checks.values())

    png_dir = tmp / "pngs"
    png_dir.mkdir()
    import PIL.Image

    patches = open_slide(slide).read_patches(coords, tiles.read_size, tiles.level, num_workers=2)
    pngs = []
    for i, patch in enumerate(patches):
        pngs.append(str(png_dir / f"{i:06d}.png"))
        PIL.Image.fromarray(patch).save(pngs[-1])
    rate_ref = reference_pattern(embedder, pngs, device, tmp)

    print(
        f"{a.model} at {a.patch_size}px, {n} patches, batch {a.batch_size}, device {device} "
        f"({'bf16' if amp else 'fp32'} + channels_last), {os.cpu_count()} CPU cores ({platform.machine()})"
    )
    rows = {"a_model_only": rate_model, "ours_full_phase": rate_ours, "b_reference_pattern": rate_ref}
    print(f"{'way':<22}{'patches/s':>12}")
    for k, v in rows.items():
        print(f"{k:<22}{v:>12.1f}")
    print(
        f"ours (best loader: {best}) / (b) = {rate_ours / rate_ref:.2f}x   ours / (a) eager model = "
        f"{rate_ours / rate_model:.0%}"
    )
    # the damaged-tile check (issue #22) runs once per slide when it is tiled, not in the embedding: its cost, as a
    # share of the embedding of the same slides, is what one pass of it adds to a run of one round
    t0 = time.perf_counter()
    for item in items:
        damaged_patches(open_slide(item["image"]), item["coords"], item["read_size"], item["level"])  # as prepare
    check_s = time.perf_counter() - t0
    tile_check_share = check_s / (n / rate_ours)
    print(f"damaged-tile check of the same slides: {check_s:.2f} s, {tile_check_share:.1%} of their embedding")
    if device.type == "cuda":  # #3's GPU targets, read off this run
        met = {
            ">= 10,000 patches/s": rate_ours >= 10_000,
            ">= 60 % of (a)": rate_ours >= 0.6 * rate_model,
            ">= 40x (b)": rate_ours >= 40 * rate_ref,
        }
        print("targets: " + "; ".join(f"{k}: {'met' if v else 'not met'}" for k, v in met.items()), flush=True)
        compiled_rates = {s: r for s, r in rates.items() if not s.endswith(("e", "(first call)"))}
        if compiled_rates and rate_compiled:  # #24: the compiled path, its compile paid by an earlier call
            spec = max(compiled_rates, key=compiled_rates.get)
            r = compiled_rates[spec]
            print(
                f"#24 targets ({spec}): >= 22,000 patches/s: {r:.0f} -> {r >= 22_000}; >= 77 % of the compiled model "
                f"alone ({rate_compiled:.0f}): {r / rate_compiled:.0%} -> {r >= 0.77 * rate_compiled}",
                flush=True,
            )
    dump(
        **rows,
        tile_check_share=tile_check_share,
        feature_check_max_abs=check,
        n_reference=len(pngs),
        best_loader=best,
    )


if __name__ == "__main__":
    main()
