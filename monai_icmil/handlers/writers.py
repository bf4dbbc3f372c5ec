# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Inference writers: what a pathologist looks at for each predicted slide, declared in ``configs/inference.json``.

Inference (:func:`~monai_icmil.inference.predict_slides`) scores every slide and hands each writer a
:class:`SlidePrediction` (slide, reader, coordinates, scores); after the last slide each writer's :meth:`finish`
runs. A writer of your own needs only those two methods (``write`` and ``finish``) and goes into the bundle's
``inference_writers`` list.

* :class:`HeatmapWriter`: ``<slide>_heatmap.jpg``, attention and instance probability over the thumbnail;
* :class:`GeoJSONWriter`: ``<slide>.geojson``, one polygon per patch with its scores (QuPath: File > Import objects);
* :class:`TopPatchesWriter`: ``<slide>_top_patches.jpg``, the patches with the highest tumour probability and
  attention, as the model saw them;
* :class:`TriageSheetWriter`: ``overview/page_<k>.jpg``, every slide's instance-probability overlay on contact
  sheets, the highest positive-class probability first, predicted-positive captions in red;
* :class:`GroundTruthWriter`: ``<slide>_vs_truth.jpg``, the instance-probability overlay beside the slide's
  ground-truth tumour region, for slides whose datalist entry has a ``tumour_mask``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monai_icmil.metrics import positive_rank
from monai_icmil.utils import atomic_write_text

__all__ = [
    "SlidePrediction",
    "SlideWriter",
    "HeatmapWriter",
    "GeoJSONWriter",
    "TopPatchesWriter",
    "TriageSheetWriter",
    "GroundTruthWriter",
    "top_patches",
    "geojson_patches",
]


@dataclass
class SlidePrediction:
    """One scored slide, as the writers see it.

    Attributes:
        slide_id: the slide's name in the outputs.
        image: its path.
        reader: the open slide.
        tiles: its tiling (``level``, ``read_size``, ``patch_size`` and ``stride``: below ``patch_size`` the
            patches overlap).
        coords: ``[N, 2]`` level-0 patch coordinates.
        scores: ``probs`` (slide probabilities), ``instance_prob`` (``[N]``, last class) and, where the aggregator
            has attention, ``attention`` (``[N]``, softmax over the slide).
        output_dir: the inference folder.
        class_names: class names (the last is the positive class).
        tumour_mask: the slide's ground-truth tumour mask or annotation, where it has one.
    """

    slide_id: str
    image: str
    reader: Any
    tiles: Mapping[str, Any]
    coords: np.ndarray
    scores: Mapping[str, np.ndarray]
    output_dir: Path
    class_names: Sequence[str] | None = None
    tumour_mask: str | None = None
    dense: Mapping[str, Any] | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def footprint(self) -> float:
        """Patch side in level-0 pixels."""
        return float(self.tiles["read_size"] * self.reader.level_downsamples[self.tiles["level"]])

    @property
    def positive(self) -> str:
        return self.class_names[-1] if self.class_names else "last class"

    @property
    def predicted(self) -> str:
        k = int(np.argmax(self.scores["probs"]))
        return str(self.class_names[k]) if self.class_names else str(k)

    def thumbnail(self) -> tuple[np.ndarray, float]:
        """The slide's thumbnail (at most 1024 px) and its downsample, read once for all writers."""
        if "thumbnail" not in self._cache:
            self._cache["thumbnail"] = self.reader.thumbnail(1024)
        return self._cache["thumbnail"]

    @property
    def cell(self) -> float:
        """Side of a cell of :meth:`maps` in level-0 pixels: the patch footprint, or the step of the grid's stride
        when the patches overlap (the heatmap stride's with ``dense``, else the training grid's)."""
        if self.dense is not None:
            return float(self.dense["cell"])
        stride = self.tiles.get("stride") or self.tiles["patch_size"]
        return self.footprint * min(1.0, float(stride) / float(self.tiles["patch_size"]))

    def maps(self) -> dict[str, np.ndarray]:
        """Score grids: attention (min-max normalised, where there is one) and instance probability, one cell per
        patch, or, with ``dense`` (overlapping patches: ``coords``, ``scores``, ``cell``), per stride cell, each cell
        the mean over the patches that cover it (:func:`~monai_icmil.visualize.overlap_grid`)."""
        if "maps" not in self._cache:
            from monai_icmil.visualize import overlap_grid, score_grid

            dims, foot = self.reader.dimensions, self.footprint
            coords, scores = (
                (self.dense["coords"], self.dense["scores"])
                if self.dense is not None
                else (
                    self.coords,
                    self.scores,
                )
            )

            def grid(values: np.ndarray) -> np.ndarray:
                if self.cell >= foot - 1e-6:
                    return score_grid(coords, values, foot, dims)
                return overlap_grid(coords, values, foot, self.cell, dims)  # overlapping patches: mean per cell

            maps = {"instance probability": grid(np.asarray(scores["instance_prob"]))}
            if "attention" in scores:
                att = np.asarray(scores["attention"])
                spread = float(att.max() - att.min()) if att.size else 0.0
                att_norm = (att - att.min()) / spread if spread > 1e-12 else np.full_like(att, 0.5)  # one patch: mid
                maps = {"attention (min-max)": grid(att_norm), **maps}
            self._cache["maps"] = maps
        return self._cache["maps"]


class SlideWriter(ABC):
    """Base of the inference writers: :meth:`write` per slide, :meth:`finish` after the last one."""

    @abstractmethod
    def write(self, pred: SlidePrediction) -> None:
        """Write this slide's outputs into ``pred.output_dir``."""

    def outputs(self, pred: SlidePrediction) -> list[Path]:
        """The files :meth:`write` makes for this slide (none by default): removed when it fails, or when the slide
        is not scored (then ``pred`` carries only ``slide_id``, ``output_dir`` and ``image``), so that an earlier
        run's picture is not taken for this run's."""
        return []

    def finish(self, output_dir: Path) -> None:
        """After the last slide (nothing by default)."""


class HeatmapWriter(SlideWriter):
    """``<slide>_heatmap.jpg``: the thumbnail, then attention (min-max normalised) and instance probability over it,
    each with a colour bar (:func:`~monai_icmil.visualize.heatmap_panels`: NumPy and Pillow, tens of milliseconds a
    slide)."""

    def outputs(self, pred: SlidePrediction) -> list[Path]:
        return [pred.output_dir / f"{pred.slide_id}_heatmap.jpg"]

    def write(self, pred: SlidePrediction) -> None:
        from monai_icmil.visualize import save_heatmaps

        thumb, thumb_ds = pred.thumbnail()
        title = f"{pred.slide_id}: predicted {pred.predicted} (p={float(np.max(pred.scores['probs'])):.3f})"
        save_heatmaps(self.outputs(pred)[0], thumb, thumb_ds, pred.maps(), pred.cell, title)


def geojson_patches(coords: np.ndarray, footprint: float, measurements: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection with one square polygon per patch (level-0 pixels) and its scores.

    QuPath imports it (File > Import objects) as tiles carrying the scores as measurements (a score that is not a
    finite number is left out of its tile's measurements, so the file stays strict JSON).
    """
    features = []
    for i, (x, y) in enumerate(np.asarray(coords, dtype=float)):
        ring = [[x, y], [x + footprint, y], [x + footprint, y + footprint], [x, y + footprint], [x, y]]
        values = {k: float(v[i]) for k, v in measurements.items() if np.isfinite(v[i])}  # NaN: no measurement
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "tile", "name": f"patch {i}", "measurements": values},
            }
        )
    return {"type": "FeatureCollection", "features": features}


class GeoJSONWriter(SlideWriter):
    """``<slide>.geojson``: one square per patch with its instance probability and attention."""

    def outputs(self, pred: SlidePrediction) -> list[Path]:
        return [pred.output_dir / f"{pred.slide_id}.geojson"]

    def write(self, pred: SlidePrediction) -> None:
        measurements = {"instance_probability": pred.scores["instance_prob"]}
        if "attention" in pred.scores:
            measurements["attention"] = pred.scores["attention"]
        collection = geojson_patches(pred.coords, pred.footprint, measurements)
        atomic_write_text(self.outputs(pred)[0], json.dumps(collection, allow_nan=False))


def top_patches(scores: Mapping[str, np.ndarray], k: int = 8) -> dict[str, np.ndarray]:
    """Indices of the ``k`` patches with the highest instance probability (of the last class) and, where the
    aggregator has attention, the ``k`` with the highest attention: what a pathologist looks at first."""
    order = {"instance probability": np.argsort(-np.asarray(scores["instance_prob"]), kind="stable")[:k]}
    if "attention" in scores:
        order["attention"] = np.argsort(-np.asarray(scores["attention"]), kind="stable")[:k]
    return order


class TopPatchesWriter(SlideWriter):
    """``<slide>_top_patches.jpg``: row 1 the ``k`` patches with the highest positive-class probability, row 2 those
    with the highest attention, read at the model's resolution.

    Args:
        k: patches per row.
        read_threads: decoding threads.
    """

    def __init__(self, k: int = 8, read_threads: int = 2):
        self.k, self.read_threads = int(k), int(read_threads)

    def outputs(self, pred: SlidePrediction) -> list[Path]:
        return [pred.output_dir / f"{pred.slide_id}_top_patches.jpg"]

    def write(self, pred: SlidePrediction) -> None:
        from monai_icmil.visualize import save_patch_montage

        top = top_patches(pred.scores, self.k)
        k = min(len(v) for v in top.values())
        picks = np.concatenate([v[:k] for v in top.values()])
        t = pred.tiles
        patches = pred.reader.read_patches(
            pred.coords[picks], t["read_size"], t["level"], out_size=t["patch_size"], num_workers=self.read_threads
        )
        by = " / ".join({"instance probability": f"{pred.positive} probability"}.get(n, n) for n in top)
        caption = f"{pred.slide_id}: top {k} patches by {by} (rows)"
        save_patch_montage(self.outputs(pred)[0], patches, ncols=k, caption=caption)


class TriageSheetWriter(SlideWriter):
    """``overview/page_<k>.jpg``: every slide's instance-probability overlay, the most likely positive first, its
    caption in red where the positive class is predicted (triage: the slides to look at first are on page 1).

    Args:
        cell_side: the overlay kept per slide until the pages are drawn (JPEG, a few KB).
    """

    def __init__(self, cell_side: int = 384):
        self.cell_side = int(cell_side)
        self.cells: list[tuple[tuple[float, float], dict[str, Any]]] = []
        self.positive = "last class"

    def write(self, pred: SlidePrediction) -> None:
        from monai_icmil.visualize import encode_jpeg, score_overlay

        thumb, thumb_ds = pred.thumbnail()
        overlay = score_overlay(thumb, thumb_ds, pred.maps()["instance probability"], pred.cell)
        probs = pred.scores["probs"]
        p_positive = float(probs[-1])
        rank = positive_rank(probs)
        self.positive = pred.positive
        cell = {
            "picture": encode_jpeg(overlay, self.cell_side),
            "lines": (pred.slide_id, f"{pred.positive} {p_positive:.3f}"),
            "color": (190, 0, 0) if int(np.argmax(probs)) == len(probs) - 1 else 0,
        }
        self.cells.append((rank, cell))

    def finish(self, output_dir: Path) -> None:
        from monai_icmil.visualize import save_contact_sheets

        if not self.cells:
            return
        ranked = [cell for _, cell in sorted(self.cells, key=lambda pc: pc[0], reverse=True)]
        title = f"predictions, highest {self.positive} probability first (red: predicted)"
        save_contact_sheets(Path(output_dir) / "overview", ranked, title)
        self.cells = []


class GroundTruthWriter(SlideWriter):
    """``<slide>_vs_truth.jpg``: the predicted instance probability of each patch over the thumbnail, beside the
    slide's ground-truth tumour region (:class:`~monai_icmil.data.annotations.GroundTruth`), for slides whose entry
    has a ``tumour_mask``; drawn with NumPy (~0.1 s a slide)."""

    def outputs(self, pred: SlidePrediction) -> list[Path]:
        return [pred.output_dir / f"{pred.slide_id}_vs_truth.jpg"]

    def write(self, pred: SlidePrediction) -> None:
        from monai_icmil.data.annotations import GroundTruth
        from monai_icmil.visualize import prediction_vs_truth, save_prediction_vs_truth

        if pred.tumour_mask is None:  # no truth for this slide (any more): no picture, not an earlier run's
            self.outputs(pred)[0].unlink(missing_ok=True)
            return
        truth = GroundTruth(pred.tumour_mask, pred.reader.dimensions)
        thumb, thumb_ds = pred.thumbnail()
        grid = pred.maps()["instance probability"]
        picture = prediction_vs_truth(thumb, thumb_ds, grid, pred.cell, truth.mask, truth.downsample)
        p = float(pred.scores["probs"][-1])
        caption = (
            f"{pred.slide_id}: p({pred.positive}) = {p:.3f}. Left: each patch's {pred.positive} probability (the "
            "instance teacher; its colour bar beside it), the ground truth outlined in white; right: the ground "
            "truth (red)"
        )
        save_prediction_vs_truth(self.outputs(pred)[0], picture, caption)
