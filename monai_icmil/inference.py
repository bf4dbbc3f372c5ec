# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Inference on new slides: slide probabilities, heatmaps a pathologist can look at, and QuPath GeoJSON."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_icmil.data.prepare import prepare_coords
from monai_icmil.data.report import RunReport
from monai_icmil.data.slide import get_slide
from monai_icmil.data.store import CoordsStore, FeatureStore, feature_key
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.networks.embedders import PatchEmbedder
from monai_icmil.utils import atomic_write_text

__all__ = ["predict_slides", "patch_scores", "geojson_patches", "list_slides"]

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif")


def list_slides(slides: str | os.PathLike | Sequence[str]) -> list[str]:
    """Slides of a folder (by suffix, sorted) or the given list; a missing path is an error naming it."""
    if isinstance(slides, (str, os.PathLike)) and Path(slides).is_dir():
        found = sorted(str(p) for p in Path(slides).iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
        if not found:
            raise FileNotFoundError(f"no slide files ({', '.join(SLIDE_SUFFIXES)}) in folder '{slides}'")
        return found
    paths = [str(slides)] if isinstance(slides, (str, os.PathLike)) else [str(s) for s in slides]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"slide(s) not found: {', '.join(missing)}")
    return paths


@torch.no_grad()
def patch_scores(net: torch.nn.Module, feats: torch.Tensor) -> dict[str, Any]:
    """Slide probabilities, per-patch attention (where the aggregator has one) and instance probabilities."""
    net.eval()
    out = net(feats)
    probs = torch.softmax(out["logits"], -1)[0]
    inst = torch.softmax(net.instance_logits(feats), -1)
    scores: dict[str, Any] = {"probs": probs.cpu().numpy(), "instance_prob": inst[:, -1].cpu().numpy()}
    if getattr(net, "has_attention", False):
        scores["attention"] = torch.softmax(net.attention(net.reduce(feats)), 0).cpu().numpy()
    return scores


def top_patches(scores: Mapping[str, np.ndarray], k: int = 8) -> dict[str, np.ndarray]:
    """Indices of the ``k`` patches with the highest instance probability (of the last class) and, where the
    aggregator has attention, the ``k`` with the highest attention: what a pathologist looks at first."""
    order = {"instance probability": np.argsort(-np.asarray(scores["instance_prob"]), kind="stable")[:k]}
    if "attention" in scores:
        order["attention"] = np.argsort(-np.asarray(scores["attention"]), kind="stable")[:k]
    return order


def geojson_patches(coords: np.ndarray, footprint: float, measurements: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection with one square polygon per patch (level-0 pixels) and its scores.

    QuPath imports it (File > Import objects) as tiles carrying the scores as measurements.
    """
    features = []
    for i, (x, y) in enumerate(np.asarray(coords, dtype=float)):
        ring = [[x, y], [x + footprint, y], [x + footprint, y + footprint], [x, y + footprint], [x, y]]
        values = {k: float(v[i]) for k, v in measurements.items()}
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "tile", "name": f"patch {i}", "measurements": values},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def predict_slides(
    slides: str | os.PathLike | Sequence[str],
    embedder: PatchEmbedder,
    bag_classifier: str | os.PathLike,
    tiling: TilingConfig,
    output_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    embed_cfg: Mapping[str, Any] | None = None,
    backend: str = "auto",
    class_names: Sequence[str] | None = None,
    heatmaps: bool = True,
    progress: bool = True,
    stain_normalize: bool = False,
) -> list[dict[str, Any]]:
    """Predict each slide; write ``probabilities.csv``, ``<slide>_heatmap.png``, ``<slide>_top_patches.jpg`` (the
    patches with the highest instance probability and attention, at the model's resolution) and
    ``<slide>.geojson``, the tiling QC images and ``tiling.csv`` in ``coords/qc/``, and (with ``heatmaps``)
    ``overview/page_<k>.jpg``: contact sheets of every slide's instance-probability overlay, the highest
    positive-class probability first, its caption in red where that class is predicted (triage: the slides to look
    at first are on page 1).

    Slides that fail are listed in ``output_dir/report.json`` and skipped. ``stain_normalize`` must match the
    training run's setting.
    """
    from monai_icmil.engines.bag import load_bag_classifier, write_predictions_csv
    from monai_icmil.engines.embedding import embed_settings, embed_slides
    from monai_icmil.visualize import (
        encode_jpeg,
        save_contact_sheets,
        save_heatmaps,
        save_patch_montage,
        score_grid,
        score_overlay,
    )

    cfg = embed_settings(embed_cfg)  # refuses an unknown key before any work

    out = Path(output_dir)
    paths = list_slides(slides)
    items, seen = [], {}
    for p in paths:
        sid = Path(p).stem
        if sid in seen:
            sid = f"{sid}-{len(seen)}"
        seen[sid] = p
        items.append({"image": p, "slide_id": sid, "label": None})
    report = RunReport(out / "report.json")
    tiles = prepare_coords(
        items,
        tiling,
        CoordsStore(out / "coords"),
        report=report,
        backend=backend,
        progress=progress,
        qc_dir=out / "coords" / "qc",  # new slides in the wild: pen marks, folds, odd scans show here first
    )
    store = FeatureStore(out / "features")
    embed_slides(
        tiles,
        embedder,
        store,
        tiling.params(),
        **cfg,
        device=device,
        report=report,
        backend=backend,
        progress=progress,
        stain_normalize=stain_normalize,
    )
    net = load_bag_classifier(bag_classifier, device, expect_in_dim=embedder.out_dim)
    fp = embedder.fingerprint()
    positive = class_names[-1] if class_names else "last class"
    rows, cells = [], []
    iterator: Any = items
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc="predict (scores + pictures)" if heatmaps else "predict", unit="slide")
    for item in iterator:
        sid = item["slide_id"]
        if sid not in tiles or sid in report.failed:
            continue
        arrays = store.load(sid, feature_key(item["image"], tiling.params(), fp, cfg["dtype"], stain_normalize))
        if arrays is None or len(arrays["features"]) == 0:
            warnings.warn(f"slide '{item['image']}' has no tissue patches; no prediction", stacklevel=2)
            continue
        feats = arrays["features"].float().to(device)
        coords = arrays["coords"].numpy()
        scores = patch_scores(net, feats)
        rows.append({"slide_id": sid, "label": None, "probs": scores["probs"].tolist(), "image": item["image"]})
        if heatmaps:
            reader = get_slide(item["image"], backend)
            t = tiles[sid]
            footprint = t["read_size"] * reader.level_downsamples[t["level"]]
            thumb, thumb_ds = reader.thumbnail(1024)
            maps = {"instance probability": score_grid(coords, scores["instance_prob"], footprint, reader.dimensions)}
            measurements = {"instance_probability": scores["instance_prob"]}
            if "attention" in scores:
                att = scores["attention"]
                att_norm = (att - att.min()) / max(float(att.max() - att.min()), 1e-12)
                maps = {"attention (min-max)": score_grid(coords, att_norm, footprint, reader.dimensions), **maps}
                measurements["attention"] = att
            overlay = score_overlay(thumb, thumb_ds, maps["instance probability"], footprint)
            p_positive = float(scores["probs"][-1])
            cells.append(
                (
                    p_positive,
                    {
                        "picture": encode_jpeg(overlay, 384),  # a few KB a slide until the pages are drawn
                        "lines": (sid, f"{positive} {p_positive:.3f}"),
                        "color": (190, 0, 0) if int(np.argmax(scores["probs"])) == len(scores["probs"]) - 1 else 0,
                    },
                )
            )
            grid_h, grid_w = next(iter(maps.values())).shape
            extent = (grid_w * footprint / thumb_ds, grid_h * footprint / thumb_ds)
            label = class_names[int(np.argmax(scores["probs"]))] if class_names else int(np.argmax(scores["probs"]))
            save_heatmaps(
                out / f"{sid}_heatmap.png",
                thumb,
                extent,
                maps,
                title=f"{sid}: predicted {label} (p={float(np.max(scores['probs'])):.3f})",
            )
            atomic_write_text(out / f"{sid}.geojson", json.dumps(geojson_patches(coords, footprint, measurements)))
            top = top_patches(scores)
            k = min(len(v) for v in top.values())
            picks = np.concatenate([v[:k] for v in top.values()])
            patches = reader.read_patches(
                coords[picks], t["read_size"], t["level"], out_size=t["patch_size"], num_workers=2
            )
            by = " / ".join({"instance probability": f"{positive} probability"}.get(n, n) for n in top)
            save_patch_montage(
                out / f"{sid}_top_patches.jpg", patches, ncols=k, caption=f"{sid}: top {k} patches by {by} (rows)"
            )
    write_predictions_csv(out / "probabilities.csv", rows, class_names)
    if cells:  # triage: every slide's instance-probability overlay, the most likely positive first
        ranked = [cell for _, cell in sorted(cells, key=lambda pc: -pc[0])]
        save_contact_sheets(
            out / "overview", ranked, f"predictions, highest {positive} probability first (red: predicted)"
        )
    return rows
