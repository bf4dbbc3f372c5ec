# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Synthetic whole-slide images for demos, tests and benchmarks.

Each slide is a pyramidal, JPEG-tiled TIFF (256-px tiles, levels in the main IFD chain, mpp in the resolution
tags), so cuCIM, OpenSlide and :class:`~monai_icmil.data.slide.TiffSlide` all read it. Tissue is rendered by
Beer-Lambert mixing of a haematoxylin and an eosin stain: eosin-stained stroma with haematoxylin nuclei. Positive
slides carry tumour regions covering a small fraction of the tissue (default 2-10 %), where nuclei are larger and
sparser: the mean colour of tumour and normal tissue is nearly the same, so the class lives in the texture (the
nucleus size), not in the colour. Stain vectors and intensities vary from slide to slide.

The ground-truth tumour mask of every slide is written next to it, and a MONAI-style ``datalist.json`` lists the
slides by split.

Command line::

    python -m monai_icmil.data.synthetic --output_dir data/synthetic --num_training 8 --num_validation 4 --num_test 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from monai_icmil.data.annotations import patch_tumour_fraction
from monai_icmil.utils import atomic_path, atomic_write_json

__all__ = [
    "SyntheticSlideConfig",
    "render_slide",
    "write_slide",
    "make_dataset",
    "mean_nucleus_area",
    "patch_tumour_fraction",
    "main",
]

# reference optical-density vectors of haematoxylin and eosin (RGB), unit length
_H_REF = np.array([0.65, 0.70, 0.29], np.float32)
_E_REF = np.array([0.07, 0.99, 0.11], np.float32)


@dataclass
class SyntheticSlideConfig:
    """Parameters of the synthetic slides.

    Attributes:
        width, height: level-0 size in pixels.
        mpp: microns per pixel at level 0.
        tile_size: TIFF tile side.
        jpeg_quality: JPEG quality of the tiles.
        min_level_size: the pyramid halves until a level's short side would fall below this.
        tissue_fraction: range of the fraction of the image covered by tissue.
        tumour_fraction: range of the fraction of the tissue covered by tumour in positive slides.
        nucleus_density: nuclei per 1,000 um^2 of normal tissue.
        nucleus_sigma_um: Gaussian radius of normal nuclei (um).
        tumour_density_ratio: tumour nucleus density relative to normal.
        tumour_sigma_ratio: tumour nucleus radius relative to normal.
        stain_jitter: relative per-slide perturbation of the stain vectors and intensities.
        mask_downsample: downsample of the ground-truth tumour mask written next to each slide.
    """

    width: int = 4096
    height: int = 3072
    mpp: float = 0.5
    tile_size: int = 256
    jpeg_quality: int = 90
    min_level_size: int = 256
    tissue_fraction: tuple[float, float] = (0.35, 0.55)
    tumour_fraction: tuple[float, float] = (0.02, 0.10)
    nucleus_density: float = 4.0
    nucleus_sigma_um: float = 1.6
    tumour_density_ratio: float = 0.45
    tumour_sigma_ratio: float = 1.55
    stain_jitter: float = 0.15
    mask_downsample: int = 16
    extra: dict[str, Any] = field(default_factory=dict)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-8)


def _zoom_to(field_: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    zoom = (shape[0] / field_.shape[0], shape[1] / field_.shape[1])
    out = ndi.zoom(field_, zoom, order=1, mode="nearest", grid_mode=True)
    return out[: shape[0], : shape[1]]


def _tissue_and_tumour(
    rng: np.random.Generator, cfg: SyntheticSlideConfig, positive: bool, tumour_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Continuous low-resolution fields for tissue and tumour, thresholded at full resolution."""
    low = (max(16, cfg.height // 32), max(16, cfg.width // 32))
    yy, xx = np.mgrid[0 : low[0], 0 : low[1]].astype(np.float32)
    cy, cx = low[0] * rng.uniform(0.4, 0.6), low[1] * rng.uniform(0.4, 0.6)
    ry, rx = low[0] * rng.uniform(0.3, 0.42), low[1] * rng.uniform(0.3, 0.42)
    envelope = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    tissue_field = envelope + 0.35 * _smooth_noise(rng, low, sigma=min(low) / 10)
    target = rng.uniform(*cfg.tissue_fraction)
    t_thr = np.quantile(tissue_field, target)
    tissue_low = tissue_field <= t_thr
    tumour_field = np.full(low, np.inf, np.float32)
    if positive:
        inside = np.argwhere(tissue_low & (tissue_field <= np.quantile(tissue_field, target * 0.7)))
        n_regions = int(rng.integers(1, 4))
        dist = np.full(low, np.inf, np.float32)
        for _ in range(n_regions):
            py, px = inside[rng.integers(len(inside))]
            scale = rng.uniform(0.6, 1.4)
            dist = np.minimum(dist, np.hypot(yy - py, xx - px) / scale)
        tumour_field = dist + 1.5 * _smooth_noise(rng, low, sigma=2.0)
    full = (cfg.height, cfg.width)
    tissue = _zoom_to(tissue_field, full) <= t_thr
    if not positive:
        return tissue, np.zeros(full, bool)
    tumour_full = _zoom_to(tumour_field, full)
    # bisection on the threshold so the tumour covers the requested fraction of the tissue
    vals = tumour_full[tissue]
    lo, hi = float(vals.min()), float(np.quantile(vals, 0.5))
    for _ in range(40):
        mid = (lo + hi) / 2
        frac = float((vals <= mid).mean())
        if frac < tumour_fraction:
            lo = mid
        else:
            hi = mid
    tumour = (tumour_full <= hi) & tissue
    return tissue, tumour


def _nuclei(
    rng: np.random.Generator, region: np.ndarray, density_px: float, sigma_px: float, peak_od: float
) -> np.ndarray:
    """Haematoxylin optical density of Gaussian nuclei scattered over ``region`` (a Poisson process)."""
    impulses = (rng.random(region.shape, dtype=np.float32) < density_px) & region
    amp = rng.lognormal(0.0, 0.2, size=int(impulses.sum())).astype(np.float32)
    field_ = np.zeros(region.shape, np.float32)
    field_[impulses] = amp * peak_od * (2 * math.pi * sigma_px**2)
    return ndi.gaussian_filter(field_, sigma_px, mode="constant", truncate=3.0)


def render_slide(
    seed: int | tuple[int, ...],
    positive: bool,
    cfg: SyntheticSlideConfig | None = None,
) -> dict[str, Any]:
    """Render one slide at level 0.

    Args:
        seed: seed (or seed sequence) of this slide; the same seed gives the same slide.
        positive: whether the slide carries tumour.
        cfg: generation parameters.

    Returns:
        ``{"image": uint8 [H, W, 3], "tissue": bool [H, W], "tumour": bool [H, W], "tumour_fraction": float,
        "stain": {...}}``.
    """
    cfg = cfg or SyntheticSlideConfig()
    rng = np.random.default_rng(seed)
    tf = float(rng.uniform(*cfg.tumour_fraction)) if positive else 0.0
    tissue, tumour = _tissue_and_tumour(rng, cfg, positive, tf)
    normal = tissue & ~tumour
    px_area_um2 = cfg.mpp**2
    sigma_px = cfg.nucleus_sigma_um / cfg.mpp
    dens = cfg.nucleus_density / 1000.0 * px_area_um2
    h_od = _nuclei(rng, normal, dens, sigma_px, peak_od=0.9)
    if positive:
        h_od += _nuclei(rng, tumour, dens * cfg.tumour_density_ratio, sigma_px * cfg.tumour_sigma_ratio, peak_od=0.9)
    h_od = 1.3 * np.tanh(h_od / 1.3)
    # eosin stroma: smooth variation plus fibre-like mid-frequency texture, the same in tumour and normal
    stroma = 0.30 + 0.06 * _zoom_to(_smooth_noise(rng, (cfg.height // 16, cfg.width // 16), 3.0), tissue.shape)
    stroma += 0.05 * ndi.gaussian_filter(rng.standard_normal(tissue.shape).astype(np.float32), 1.5 / cfg.mpp) * 3.0
    e_od = np.where(tissue, np.clip(stroma, 0.05, None), 0.0).astype(np.float32)
    # per-slide stain: jitter the stain vectors and intensities
    j = cfg.stain_jitter
    hv = np.clip(_H_REF * (1 + j * rng.standard_normal(3)), 0.02, None).astype(np.float32)
    ev = np.clip(_E_REF * (1 + j * rng.standard_normal(3)), 0.02, None).astype(np.float32)
    hv, ev = hv / np.linalg.norm(hv), ev / np.linalg.norm(ev)
    hs, es = float(1 + j * rng.standard_normal()), float(1 + j * rng.standard_normal())
    od = (h_od * hs)[..., None] * hv + (e_od * es)[..., None] * ev
    od += 0.01 * np.abs(rng.standard_normal(tissue.shape, dtype=np.float32))[..., None]
    img = np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)
    return {
        "image": img,
        "tissue": tissue,
        "tumour": tumour,
        "tumour_fraction": float(tumour.sum() / max(tissue.sum(), 1)),
        "stain": {"h": hv.tolist(), "e": ev.tolist(), "h_scale": hs, "e_scale": es},
    }


def _pyramid(img: np.ndarray, min_size: int) -> list[np.ndarray]:
    levels = [img]
    while min(levels[-1].shape[:2]) // 2 >= min_size:
        prev = levels[-1]
        h, w = prev.shape[0] // 2 * 2, prev.shape[1] // 2 * 2
        levels.append(_halve(prev[:h, :w]))
    return levels


def _halve(img: np.ndarray, rows: int = 64) -> np.ndarray:
    """The 2x2 block means of a uint8 image, rounded half to even (``np.round(mean)``, exactly), in integers and in
    bands of ``rows`` output rows that stay in cache: a float mean of a whole slide's level 0 took most of the time of
    writing a large slide."""
    out = np.empty((img.shape[0] // 2, img.shape[1] // 2, img.shape[2]), np.uint8)
    for r0 in range(0, out.shape[0], rows):
        band = img[2 * r0 : 2 * (r0 + rows)]
        s = band[0::2, 0::2].astype(np.uint16)
        s += band[1::2, 0::2]
        s += band[0::2, 1::2]
        s += band[1::2, 1::2]
        odd = s >> 2
        odd &= 1
        odd += 1
        s += odd  # (s + 1 + (s // 4) % 2) // 4 is s / 4 rounded half to even
        s >>= 2
        out[r0 : r0 + rows] = s
    return out


def write_slide(
    path: str | os.PathLike,
    img: np.ndarray,
    mpp: float,
    tile_size: int = 256,
    jpeg_quality: int = 90,
    min_level_size: int = 256,
) -> Path:
    """Write ``img`` as a pyramidal JPEG-tiled TIFF with mpp in the resolution tags (atomically)."""
    import tifffile

    path = Path(path)
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=img.nbytes > 2**31) as tif:
            for k, level in enumerate(_pyramid(img, min_level_size)):
                res = 1e4 / (mpp * 2**k)  # pixels per centimetre
                tif.write(
                    level,
                    tile=(tile_size, tile_size),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": jpeg_quality},
                    resolution=(res, res),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if k == 0 else 1,
                    description="monai-icmil synthetic slide" if k == 0 else None,
                    metadata=None,
                )
    return path


def _write_mask(path: Path, mask: np.ndarray, downsample: int) -> None:
    from PIL import Image

    h, w = mask.shape[0] // downsample, mask.shape[1] // downsample
    low = mask[: h * downsample, : w * downsample].reshape(h, downsample, w, downsample).mean(axis=(1, 3)) >= 0.5
    with atomic_path(path) as tmp:
        Image.fromarray((low * 255).astype(np.uint8)).save(tmp, format="PNG")


def _generate_one(args: tuple[str, str, int, int, bool, SyntheticSlideConfig]) -> dict[str, Any]:
    out_dir, name, seed, index, positive, cfg = args
    root = Path(out_dir)
    slide_rel, mask_rel = f"slides/{name}.tiff", f"masks/{name}_tumour.png"
    rendered = render_slide((seed, index), positive, cfg)
    _write_mask(root / mask_rel, rendered["tumour"], cfg.mask_downsample)
    write_slide(root / slide_rel, rendered["image"], cfg.mpp, cfg.tile_size, cfg.jpeg_quality, cfg.min_level_size)
    return {
        "image": slide_rel,
        "label": int(positive),
        "tumour_mask": mask_rel,
        "tumour_fraction": round(rendered["tumour_fraction"], 5),
    }


def _is_complete(datalist_path: Path, params: dict[str, Any]) -> bool:
    """A datalist made with these parameters whose slides are all on disk."""
    if not datalist_path.exists():
        return False
    try:
        existing = json.loads(datalist_path.read_text())
        if json.loads(json.dumps(existing.get("synthetic", {}))) != json.loads(json.dumps(params)):
            return False
        entries = [e for split in ("training", "validation", "test") for e in existing.get(split, [])]
        return all((datalist_path.parent / e["image"]).is_file() for e in entries)
    except (ValueError, KeyError, TypeError):
        return False


def _jobs(
    root: Path, seed: int, cfg: SyntheticSlideConfig, positive_fraction: float, *sizes: int
) -> list[tuple[str, tuple[str, str, int, int, bool, SyntheticSlideConfig]]]:
    """``(split, job)`` per slide: a shuffled balanced label per split (at least one of each class from 2 slides)."""
    jobs: list[tuple[str, tuple[str, str, int, int, bool, SyntheticSlideConfig]]] = []
    labels_rng = np.random.default_rng((seed, 10**6))
    for split, n in zip(("training", "validation", "test"), sizes):
        n_pos = int(round(n * positive_fraction))
        if n >= 2:
            n_pos = min(max(n_pos, 1), n - 1)
        labels = np.array([1] * n_pos + [0] * (n - n_pos), bool)
        labels_rng.shuffle(labels)
        for i, positive in enumerate(labels):
            jobs.append((split, (str(root), f"{split}_{i:03d}", seed, len(jobs), bool(positive), cfg)))
    return jobs


def _render(jobs: list[tuple[str, Any]], num_workers: int, progress: bool) -> list[dict[str, Any]]:
    """Render and write every slide (in ``num_workers`` processes), in job order."""
    pool = None
    if num_workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(num_workers)
        iterator: Any = pool.map(_generate_one, [j for _, j in jobs])
    else:
        iterator = map(_generate_one, [j for _, j in jobs])
    if progress:
        from monai_icmil.utils import progress_bar

        iterator = progress_bar(iterator, total=len(jobs), desc="synthetic slides", unit="slide")
    try:
        return list(iterator)
    finally:
        if pool is not None:
            pool.shutdown()


#: the file :func:`make_dataset` leaves in a dataset folder it writes (a folder of someone's own slides has none)
SYNTHETIC_MARKER = ".monai_icmil_synthetic"


def make_dataset(
    output_dir: str | os.PathLike,
    num_training: int = 8,
    num_validation: int = 4,
    num_test: int = 4,
    seed: int = 0,
    positive_fraction: float = 0.5,
    config: SyntheticSlideConfig | dict[str, Any] | None = None,
    num_workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Generate a synthetic dataset and its ``datalist.json``.

    Args:
        output_dir: dataset root; slides go to ``slides/``, tumour masks to ``masks/``.
        num_training, num_validation, num_test: slides per split.
        seed: the dataset seed; the same seed and config give the same slides.
        positive_fraction: fraction of positive slides in each split (at least one of each class per split when
            the split has two or more slides).
        config: slide generation parameters (:class:`SyntheticSlideConfig` or a dict of its fields).
        num_workers: processes used to render slides.
        progress: show a progress bar.
        overwrite: regenerate even when a complete dataset with the same parameters exists.

    Returns:
        The path of ``datalist.json``. An existing dataset made with the same parameters is reused.
    """
    cfg = config if isinstance(config, SyntheticSlideConfig) else SyntheticSlideConfig(**(config or {}))
    root = Path(output_dir)
    datalist_path = root / "datalist.json"
    params = {
        "num_training": num_training,
        "num_validation": num_validation,
        "num_test": num_test,
        "seed": seed,
        "positive_fraction": positive_fraction,
        "config": asdict(cfg),
    }
    if not overwrite and _is_complete(datalist_path, params):
        return datalist_path
    root.mkdir(parents=True, exist_ok=True)
    (root / SYNTHETIC_MARKER).touch()  # before any slide: an interrupted generation is ours to finish
    jobs = _jobs(root, seed, cfg, positive_fraction, num_training, num_validation, num_test)
    results = _render(jobs, num_workers, progress)
    datalist: dict[str, Any] = {"training": [], "validation": [], "test": []}
    for (split, _), entry in zip(jobs, results):
        datalist[split].append(entry)
    datalist["synthetic"] = params
    datalist["tumour_mask_downsample"] = cfg.mask_downsample
    atomic_write_json(datalist_path, datalist)
    return datalist_path


def mean_nucleus_area(patch: np.ndarray, mpp: float, od_threshold: float = 0.35) -> float:
    """The texture statistic that separates synthetic tumour from normal tissue: mean nucleus area (um^2).

    Nuclei are the connected components of the haematoxylin optical density (colour deconvolution with the
    reference stain vectors) above ``od_threshold``.
    """
    od = -np.log(np.clip(patch.astype(np.float32), 1, 255) / 255.0)
    stains = np.stack([_H_REF, _E_REF, np.cross(_H_REF, _E_REF)])
    conc = od.reshape(-1, 3) @ np.linalg.pinv(stains)
    h = conc[:, 0].reshape(patch.shape[:2])
    labels, n = ndi.label(h > od_threshold)
    if n == 0:
        return 0.0
    sizes = np.bincount(labels.ravel())[1:]
    sizes = sizes[sizes >= 3]
    return float(sizes.mean() * mpp * mpp) if len(sizes) else 0.0


def main(argv: list[str] | None = None) -> None:
    """Command line: generate a synthetic dataset."""
    p = argparse.ArgumentParser(
        description="Generate synthetic pyramidal TIFF slides with tumour masks and a datalist."
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_training", type=int, default=8)
    p.add_argument("--num_validation", type=int, default=4)
    p.add_argument("--num_test", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=SyntheticSlideConfig.width)
    p.add_argument("--height", type=int, default=SyntheticSlideConfig.height)
    p.add_argument("--mpp", type=float, default=SyntheticSlideConfig.mpp)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    cfg = SyntheticSlideConfig(width=a.width, height=a.height, mpp=a.mpp)
    path = make_dataset(
        a.output_dir,
        a.num_training,
        a.num_validation,
        a.num_test,
        a.seed,
        config=cfg,
        num_workers=a.num_workers,
        overwrite=a.overwrite,
    )
    print(f"datalist: {path}")


if __name__ == "__main__":
    main()
