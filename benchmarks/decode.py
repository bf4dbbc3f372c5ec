# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""JPEG tile decoding, CPU threads vs the GPU, side by side in one run (issue #24, item 2).

Every level-0 JPEG tile of a slide (the benchmark slide, and ``--slide`` files such as an Aperio SVS), decoded
``--repeats`` times over, three ways:

(a) cuCIM on the CPU, as our reader uses it: ``read_region`` of regions of 4x4 tiles (a dense batch), with
    ``--num_workers`` decoding threads; the pixels land in host memory;
(b) nvJPEG on the GPU through ``torchvision.io.decode_jpeg(list, device="cuda")``, batches of ``--batch`` tiles: the
    compressed bytes go to the GPU and the pixels stay there (what an embedder needs);
(c) nvImageCodec's ``Decoder().decode`` on the GPU, when ``nvidia.nvimgcodec`` imports.

Tiles/s and megapixels/s per way, each the best of the repeats, and the mean absolute pixel difference of (b) and (c)
against (a) on one tile in the slide's middle (JPEG decoders may round their IDCTs differently). Tiles that share a
``JPEGTables`` tag (Aperio) are made whole streams (tables + tile) for the GPU decoders, and tiles of RGB samples
(TIFF photometric RGB) carry an Adobe marker saying so; (a) reads them as the reader does.

    python benchmarks/decode.py [--num_workers 16] [--batch 256] [--repeats 3] [--slide CMU-1-Small-Region.svs]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_data import bench_slide

import monai_icmil  # noqa: F401  (keeps nvimgcodec's loader messages quiet)
from monai_icmil.data.slide import TiffSlide
from monai_icmil.utils import atomic_write_json


def jpeg_tiles(path: str | Path) -> tuple[list[bytes], list[tuple[int, int]], int, int]:
    """The level-0 JPEG tiles of a TIFF/SVS as whole JPEG streams (our tifffile reader's), their (x, y) origins, tile
    width and height."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if not page.is_tiled or page.compression != 7:
            raise ValueError(f"{path}: level 0 is not JPEG-tiled (compression {page.compression})")
        # a JPEG of RGB samples (TIFF photometric RGB: ours and Aperio's) says so in an Adobe APP14 marker
        # (transform 0), else a decoder that reads only the stream takes it for YCbCr and converts its colours
        adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00" if page.photometric == 2 else b""
    reader = TiffSlide(str(path))
    (tw, th), (w, h) = reader.tile_size(0), reader.level_dimensions[0]
    grid = [(tx, ty) for ty in range(-(-h // th)) for tx in range(-(-w // tw))]
    streams = reader.jpeg_streams(0, grid)
    if streams is None:
        raise ValueError(f"{path}: a level-0 tile is empty or lies beyond the end of the file")
    return [s[:2] + adobe + s[2:] for s in streams], [(tx * tw, ty * th) for tx, ty in grid], tw, th


def cucim_regions(path: str | Path, origins, tw: int, th: int, workers: int) -> float:
    """Seconds to read every tile through cuCIM as regions of 4x4 tiles."""
    from cucim import CuImage

    img = CuImage(str(path))
    w, h = img.resolutions["level_dimensions"][0]
    step_x, step_y = 4 * tw, 4 * th
    starts = [(x, y) for y in range(0, h - step_y + 1, step_y) for x in range(0, w - step_x + 1, step_x)]
    t0 = time.perf_counter()
    for region in img.read_region(starts, (step_x, step_y), 0, num_workers=workers):
        np.asarray(region)
    return (time.perf_counter() - t0) * len(origins) / max(len(starts) * 16, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slide", nargs="*", default=[], help="more slides (JPEG-tiled TIFF/SVS)")
    p.add_argument("--device", default=None, help="default: cuda when there, else cpu (a check of the script only)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import torch
    import torchvision.io

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = tempfile.mkdtemp()
    slides = [bench_slide(tmp)[0], *[Path(s) for s in a.slide if Path(s).is_file()]]
    rows = []
    for path in slides:
        tiles, origins, tw, th = jpeg_tiles(path)
        n = len(tiles) * a.repeats
        mpx = n * tw * th / 1e6
        # (a) cuCIM, CPU threads (best of the repeats)
        t_a = min(cucim_regions(path, origins, tw, th, a.num_workers) for _ in range(a.repeats))
        row = {"slide": path.name, "tiles": len(tiles), "tile": [tw, th], "repeats": a.repeats}
        row["a_cucim_cpu_tiles_per_s"] = len(tiles) / t_a
        from cucim import CuImage

        mid = len(tiles) // 2  # a tile in the slide's middle (tissue, not background) for the pixel check
        x0, y0 = origins[mid]
        ref_tile = np.asarray(CuImage(str(path)).read_region((x0, y0), (tw, th), 0))[..., :3].astype(np.int16)

        # (b) nvJPEG through torchvision
        data = [torch.frombuffer(bytearray(t), dtype=torch.uint8) for t in tiles]
        torchvision.io.decode_jpeg(data[: a.batch], device=device)  # warm-up (nvJPEG handles, allocations)
        if device == "cuda":
            torch.cuda.synchronize()
        times = []  # best of the repeats, as (a)
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for i in range(0, len(data), a.batch):
                out = torchvision.io.decode_jpeg(data[i : i + a.batch], device=device)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row["b_nvjpeg_torchvision_tiles_per_s"] = len(tiles) / min(times)
        first = torchvision.io.decode_jpeg(data[mid : mid + 1], device=device)[0].permute(1, 2, 0).cpu().numpy()
        row["b_mean_abs_diff"] = float(np.abs(first.astype(np.int16) - ref_tile).mean())
        del out

        # (c) nvImageCodec, if there
        try:
            from nvidia import nvimgcodec

            decoder = nvimgcodec.Decoder()
            decoder.decode(tiles[: a.batch])
            if device == "cuda":
                torch.cuda.synchronize()
            times = []  # best of the repeats, as (a)
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                for i in range(0, len(tiles), a.batch):
                    images = decoder.decode(tiles[i : i + a.batch])
                    if device == "cuda":
                        torch.as_tensor(images[-1], device="cuda")  # a view on the GPU image (waits for it)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            row["c_nvimgcodec_tiles_per_s"] = len(tiles) / min(times)
            got = np.asarray(decoder.decode(tiles[mid : mid + 1])[0].cpu())
            row["c_mean_abs_diff"] = float(np.abs(got[..., :3].astype(np.int16) - ref_tile).mean())
        except Exception as e:  # not installed, or no GPU backend here
            row["c_nvimgcodec"] = f"not measured: {type(e).__name__}: {e}"[:200]
        for k in ("a_cucim_cpu", "b_nvjpeg_torchvision", "c_nvimgcodec"):
            if f"{k}_tiles_per_s" in row:
                row[f"{k}_mpx_per_s"] = row[f"{k}_tiles_per_s"] * tw * th / 1e6
        row["b_over_a"] = row["b_nvjpeg_torchvision_tiles_per_s"] / row["a_cucim_cpu_tiles_per_s"]
        rows.append(row)
        print(f"{path.name}: {len(tiles)} tiles of {tw}x{th}, {mpx:.0f} Mpx per way", flush=True)
        for k, v in row.items():
            if k not in ("slide", "tiles", "tile", "repeats"):
                print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}", flush=True)
    result = {"machine": f"{platform.node()} {os.cpu_count()} CPU cores", "device": device, "rows": rows}
    if a.json:
        atomic_write_json(a.json, result)


if __name__ == "__main__":
    main()
