# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Slides from another generator than ours: real H&E quilted into new pieces, for tissue detection and the bundle.

The tissue comes from the real slide CMU-1-Small-Region (0.5 um/px), averaged to 1 um/px and quilted from random
flipped and turned 192-px crops (each at least 75 % tissue) into 1-3 irregular pieces on white glass (1500 x 1200 px,
30-55 % of the slide), with a per-slide stain change (haematoxylin and eosin each x 0.75-1.3, as labs differ). Dense
dermis and epidermis lie beside pale, loose stroma: the case where Otsu's threshold splits the tissue instead of
glass from tissue. Slides of class ``malignant`` carry 1-3 regions (15-40 % of the tissue; ``--tumour``) whose
nuclei are enlarged, about 60 % denser, darker and more purple; ``benign`` slides carry none. (At 5-15 % the demo's
random-init ResNet18 learns nothing from 16 test slides: test AUC 0.30 in a helper's trial; at 20-50 %, 0.98.)

Files unlike the demo's: tiled (256 px) JPEG pyramidal TIFFs with two reduced levels in SubIFDs, the mpp only in the
TIFF resolution tags (pixels per centimetre), no image description; string labels; 0/255 PNG tumour masks
(``tumour_mask``) and tissue masks (``masks/<slide>_tissue.png``, what the detector should find).

    python benchmarks/quilted_slides.py make OUT [--seed 0] [--counts 60,20,24] [--workers 2] [--cmu CMU-1.svs]
        [--tumour 0.15,0.40]
    python benchmarks/quilted_slides.py tissue OUT [--json tissue.json]

``make`` needs CMU-1-Small-Region.svs (``--cmu``; default ``../shared/data/`` beside the repository; OpenSlide's
test data has it) and writes ``OUT/slides``, ``OUT/masks`` and ``OUT/datalist.json`` (the bundle's ``--dataset_dir
OUT``); ``tissue`` compares the tissue detector before the pale-tissue split and the hole limit ("old":
``pale_tissue=False``, ``max_hole_um2=None``) with its defaults ("new") against the tissue masks at the detector's
resolution (a mask pixel is tissue when at least half of it is): per slide recall and precision, and their mean and
worst.
"""

from __future__ import annotations

import argparse
import time
import warnings
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "CMU-1-Small-Region.svs"
SIZE = (1200, 1500)  # (h, w) at level 0, 1 um/px
MPP = 1.0
CROP = 192
#: the detectors compared (keyword arguments of compute_tissue_mask)
DETECTORS: dict[str, dict[str, Any]] = {"old": {"pale_tissue": False, "max_hole_um2": None}, "new": {}}

_source: dict[str, np.ndarray] = {}


def _load_source(path: Path | None = None) -> dict[str, np.ndarray]:
    """CMU-1 (``path``, default :data:`CMU`) at 1 um/px and the corners of its crops that are at least 75 % tissue
    (once per process)."""
    if not _source:
        import tifffile

        from monai_icmil.data.tiling import saturation

        path = Path(path or CMU)
        if not path.is_file():
            raise FileNotFoundError(f"the source slide '{path}' does not exist: give CMU-1-Small-Region.svs with --cmu")

        a = tifffile.imread(path).astype(np.float32)
        a = a[: a.shape[0] // 2 * 2, : a.shape[1] // 2 * 2]
        a = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, 3).mean(axis=(1, 3))
        tissue = ndi.uniform_filter((saturation(a) > 0.12).astype(np.float32), 9) > 0.5
        cover = ndi.uniform_filter(tissue.astype(np.float32), CROP)
        half = CROP // 2
        ys, xs = np.nonzero(cover[half:-half, half:-half] > 0.75)
        _source.update(image=a.astype(np.uint8), corners=np.stack([ys, xs], 1))
    return _source


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Unit-s.d. noise smoothed at ``sigma`` pixels (made at a quarter of the size)."""
    n = ndi.gaussian_filter(rng.standard_normal((h // 4 + 1, w // 4 + 1)).astype(np.float32), sigma / 4)
    n = ndi.zoom(n, 4, order=1)[:h, :w]
    return (n - n.mean()) / (n.std() + 1e-6)


def tissue_shape(rng: np.random.Generator) -> np.ndarray:
    """1-3 irregular pieces covering roughly 30-55 % of the slide, a 20-px clear border, a few small holes."""
    h, w = SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.25, 0.75) * w
        ry, rx, th = rng.uniform(0.18, 0.35) * h, rng.uniform(0.15, 0.32) * w, rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / rx
        v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / ry
        field = np.maximum(field, 1.0 - (u**2 + v**2))
    field += 0.35 * _smooth_noise(rng, h, w, 60) + 0.12 * _smooth_noise(rng, h, w, 12)
    mask = field > 0.25
    mask[:20], mask[-20:], mask[:, :20], mask[:, -20:] = False, False, False, False
    labels, n = ndi.label(mask)
    if n:
        sizes = ndi.sum(mask, labels, range(1, n + 1))
        mask = np.isin(labels, 1 + np.nonzero(sizes > 20000)[0])
    return mask & ~(_smooth_noise(rng, h, w, 8) > 2.3)


def quilt(rng: np.random.Generator, overlap: int = 32) -> np.ndarray:
    """A tissue canvas of CMU-1 crops, flipped and turned at random, feathered where they overlap."""
    src = _load_source()
    h, w = SIZE
    acc, weight = np.zeros((h, w, 3), np.float32), np.zeros((h, w), np.float32)
    ramp = np.clip(np.minimum(np.arange(CROP) + 1, np.arange(CROP)[::-1] + 1) / overlap, 0, 1).astype(np.float32)
    wblock = np.outer(ramp, ramp) + 1e-3
    for y0 in range(-overlap, h, CROP - overlap):
        for x0 in range(-overlap, w, CROP - overlap):
            cy, cx = src["corners"][rng.integers(len(src["corners"]))]
            crop = np.rot90(src["image"][cy : cy + CROP, cx : cx + CROP].astype(np.float32), rng.integers(4))
            crop = crop[:, ::-1] if rng.random() < 0.5 else crop
            jy, jx = rng.integers(-12, 13, 2)
            ya, xa, yb, xb = max(0, y0 + jy), max(0, x0 + jx), min(h, y0 + jy + CROP), min(w, x0 + jx + CROP)
            if yb <= ya or xb <= xa:
                continue
            cya, cxa = ya - (y0 + jy), xa - (x0 + jx)
            wb = wblock[cya : cya + yb - ya, cxa : cxa + xb - xa]
            acc[ya:yb, xa:xb] += crop[cya : cya + yb - ya, cxa : cxa + xb - xa] * wb[..., None]
            weight[ya:yb, xa:xb] += wb
    return acc / np.maximum(weight, 1e-6)[..., None]


def tumour_region(rng: np.random.Generator, tissue: np.ndarray, fraction: float) -> np.ndarray:
    """1-3 soft blobs in the tissue, thresholded to cover ``fraction`` of it."""
    ys, xs = np.nonzero(tissue)
    yy, xx = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]].astype(np.float32)
    field = np.zeros(tissue.shape, np.float32)
    for _ in range(rng.integers(1, 4)):
        i, s = rng.integers(len(ys)), rng.uniform(80, 200)
        field += np.exp(-((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2) / (2 * s * s))
    field *= 1.0 + 0.3 * _smooth_noise(rng, *tissue.shape, 25)
    region = (field > np.quantile(field[tissue], 1.0 - fraction)) & tissue
    return ndi.binary_opening(region, iterations=3)


def atypia(rng: np.random.Generator, img: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``img`` (float RGB) with enlarged, denser, darker and more purple nuclei inside ``region``."""
    from skimage.color import rgb2hed

    haem = rgb2hed(np.clip(img, 1, 255).astype(np.uint8))[..., 0]
    nuclei = ndi.binary_opening((haem > np.quantile(haem[region], 0.85)) & region, iterations=1)
    _, n = ndi.label(nuclei)
    extra = np.zeros_like(nuclei)
    ys, xs = np.nonzero(region)
    for _ in range(int(0.6 * max(n, 1))):  # ~60 % more nuclei: small ellipses
        i = rng.integers(len(ys))
        r = rng.uniform(2.5, 4.5)
        ry, rx, y0, x0 = r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3), ys[i], xs[i]
        y1, y2 = max(0, int(y0 - ry - 1)), min(region.shape[0], int(y0 + ry + 2))
        x1, x2 = max(0, int(x0 - rx - 1)), min(region.shape[1], int(x0 + rx + 2))
        gy, gx = np.mgrid[y1:y2, x1:x2]
        extra[y1:y2, x1:x2] |= ((gy - y0) / ry) ** 2 + ((gx - x0) / rx) ** 2 <= 1
    big = (ndi.binary_dilation(nuclei, iterations=2) | extra) & region
    ref = img[nuclei].reshape(-1, 3)
    colour = (np.median(ref, 0) if len(ref) else np.array([90.0, 60.0, 130.0])) * np.array([0.80, 0.72, 0.92])
    alpha = (ndi.gaussian_filter(big.astype(np.float32), 0.8) * 0.85)[..., None]
    chromatin = ndi.gaussian_filter(1.0 + 0.12 * rng.standard_normal(img.shape[:2]).astype(np.float32), 0.7)
    out = img * (1 - alpha) + colour * chromatin[..., None] * alpha
    soft = ndi.gaussian_filter(region.astype(np.float32), 6)[..., None]  # a slight purple cast over the region
    return out * (1 - 0.10 * soft) + np.array([150.0, 110.0, 170.0]) * 0.10 * soft


def restain(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Haematoxylin and eosin each scaled by 0.75-1.3 and shifted a little, brightness by 0.95-1.04."""
    from skimage.color import hed2rgb, rgb2hed

    scale, shift = rng.uniform(0.75, 1.3, 3), rng.uniform(-0.02, 0.02, 3)
    scale[2], shift[2] = 1.0, 0.0
    hed = rgb2hed(np.clip(img, 1, 255).astype(np.uint8)) * scale + shift
    return hed2rgb(hed) * 255.0 * rng.uniform(0.95, 1.04)


def write_pyramid(path: Path, img: np.ndarray) -> None:
    """A tiled JPEG TIFF, two reduced levels in SubIFDs, mpp in the resolution tags only."""
    import tifffile

    levels = [img]
    for _ in range(2):
        p = levels[-1]
        h2, w2 = p.shape[0] // 2, p.shape[1] // 2
        levels.append(p[: h2 * 2, : w2 * 2].reshape(h2, 2, w2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8))
    res = 1e4 / MPP  # pixels per centimetre
    kw = dict(
        tile=(256, 256), compression="jpeg", compressionargs={"level": 85}, photometric="rgb",
        resolutionunit="CENTIMETER", metadata=None,
    )  # fmt: skip
    tmp = path.with_suffix(".tmp.tif")
    with tifffile.TiffWriter(tmp) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, resolution=(res, res), **kw)
        for k, level in enumerate(levels[1:], 1):
            tw.write(level, subfiletype=1, resolution=(res / 2**k, res / 2**k), **kw)
    tmp.replace(path)


def make_slide(job: tuple[str, str, int, str, str, tuple[float, float]]) -> dict[str, Any]:
    """One slide, its tissue mask and (``malignant``) its tumour mask; its datalist entry."""
    name, label, seed, out, cmu, tumour = job
    _load_source(Path(cmu))
    rng = np.random.default_rng(seed)
    tissue = tissue_shape(rng)
    texture = quilt(rng)
    entry: dict[str, Any] = {"image": f"slides/{name}.tif", "label": label}
    if label == "malignant":
        region = tumour_region(rng, tissue, rng.uniform(*tumour))
        texture = atypia(rng, texture, region)
        Image.fromarray((region * 255).astype(np.uint8)).save(Path(out) / "masks" / f"{name}_mask.png")
        entry["tumour_mask"] = f"masks/{name}_mask.png"
    texture = restain(rng, texture)
    glass = np.array([244.0, 243.0, 246.0]) + rng.uniform(-4, 4, 3)
    edge = ndi.gaussian_filter(tissue.astype(np.float32), 1.5)[..., None]
    background = glass + rng.normal(0, 1.5, (*SIZE, 3))
    img = np.clip(texture * edge + background * (1 - edge), 0, 255).round().astype(np.uint8)
    write_pyramid(Path(out) / "slides" / f"{name}.tif", img)
    Image.fromarray((tissue * 255).astype(np.uint8)).save(Path(out) / "masks" / f"{name}_tissue.png")
    return entry


def make(
    out: Path,
    seed: int = 0,
    counts: tuple[int, int, int] = (60, 20, 24),
    workers: int = 2,
    cmu: Path = CMU,
    tumour: tuple[float, float] = (0.15, 0.40),
) -> dict[str, Any]:
    """Write the slides, masks and ``datalist.json`` (labels balanced in each split; a malignant slide's tumour covers
    a share of its tissue drawn from ``tumour``); returns the datalist."""
    _load_source(cmu)  # a missing source fails here, not in a worker
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    splits = dict(zip(("training", "validation", "test"), counts))
    seeds = iter(np.random.SeedSequence(seed).generate_state(sum(counts)))
    jobs, names = [], []
    for split, n in splits.items():
        labels = ["benign", "malignant"] * (n // 2) + ["benign"] * (n % 2)
        np.random.default_rng(seed + len(split)).shuffle(labels)
        for i, label in enumerate(labels):
            jobs.append((f"{split[:2]}_{i:03d}", label, int(next(seeds)), str(out), str(cmu), tumour))
            names.append(split)
    t0 = time.perf_counter()
    if workers > 1:
        with Pool(workers) as pool:
            entries = pool.map(make_slide, jobs, chunksize=1)
    else:  # in this process (also where the module was loaded from a file path, which workers cannot import)
        entries = [make_slide(job) for job in jobs]
    datalist: dict[str, list] = {split: [] for split in splits}
    for split, entry in zip(names, entries):
        datalist[split].append(entry)
    from monai_icmil.utils import atomic_write_json

    atomic_write_json(out / "datalist.json", datalist)
    print(f"{len(jobs)} slides in {time.perf_counter() - t0:.1f} s: {out}", flush=True)
    return datalist


def tissue(out: Path) -> dict[str, Any]:
    """Each detector's recall and precision against the tissue masks, per slide and over the set."""
    from monai_icmil.data import open_slide
    from monai_icmil.data.tiling import compute_tissue_mask

    rows = []
    for path in sorted((out / "slides").glob("*.tif")):
        truth_full = np.asarray(Image.open(out / "masks" / f"{path.stem}_tissue.png")) > 0
        row: dict[str, Any] = {"slide": path.stem}
        with open_slide(path) as reader, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, options in DETECTORS.items():
                result = compute_tissue_mask(reader, device="cpu", **options)
                h, w = result.mask.shape
                ds = int(round(result.downsample))
                truth = truth_full[: h * ds, : w * ds].reshape(h, ds, w, ds).mean(axis=(1, 3)) >= 0.5
                hits = int((result.mask & truth).sum())
                row[name] = {
                    "recall": hits / max(int(truth.sum()), 1),
                    "precision": hits / max(int(result.mask.sum()), 1),
                    "threshold": float(result.threshold),
                }
        rows.append(row)
    summary = {}
    for name in DETECTORS:
        recall, precision = (np.array([r[name][k] for r in rows]) for k in ("recall", "precision"))
        summary[name] = {
            "recall_mean": float(recall.mean()),
            "recall_min": float(recall.min()),
            "slides_recall_under_0.8": int((recall < 0.8).sum()),
            "precision_mean": float(precision.mean()),
            "precision_min": float(precision.min()),
        }
        print(
            f"{name}: recall mean {recall.mean():.3f}, worst {recall.min():.3f}, under 0.8 on {(recall < 0.8).sum()} "
            f"of {len(rows)} slides; precision mean {precision.mean():.3f}, worst {precision.min():.3f}",
            flush=True,
        )
    return {"rows": rows, "summary": summary, "detectors": DETECTORS}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["make", "tissue"])
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--counts", default="60,20,24", help="training,validation,test slides")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None, help="tissue: write the result here")
    p.add_argument("--cmu", type=Path, default=CMU, help="make: CMU-1-Small-Region.svs, the tissue's source")
    p.add_argument(
        "--tumour", default="0.15,0.40", help="make: a malignant slide's tumour share of its tissue, min,max"
    )
    args = p.parse_args(argv)
    if args.command == "make":
        counts = tuple(int(c) for c in args.counts.split(","))
        if len(counts) != 3 or min(counts) < 1:
            p.error(f"--counts: three positive numbers, got {args.counts!r}")
        tumour = tuple(float(t) for t in args.tumour.split(","))
        if len(tumour) != 2 or not 0 < tumour[0] <= tumour[1] < 1:
            p.error(f"--tumour: min,max with 0 < min <= max < 1, got {args.tumour!r}")
        return make(args.out, args.seed, counts, args.workers, args.cmu, tumour)
    result = tissue(args.out)
    if args.json:
        from monai_icmil.utils import atomic_write_json

        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
