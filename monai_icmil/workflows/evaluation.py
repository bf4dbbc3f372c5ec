# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Does coupling help? The instance teacher of a round (its bag classifier applied to single patches) measured
against ground-truth tumour masks: the patch AUC, the measure ICMIL's coupling is about."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai_icmil.data.annotations import GroundTruth
from monai_icmil.data.slide import get_slide
from monai_icmil.data.store import BagDataset, CoordsStore
from monai_icmil.metrics import instance_auc
from monai_icmil.networks.aggregators import MILAggregator

__all__ = ["has_ground_truth", "teacher_patch_auc", "teacher_patch_scores"]


def has_ground_truth(entries: list[Mapping[str, Any]]) -> bool:
    """Whether some entry carries a ground-truth ``tumour_mask``."""
    return any(e.get("tumour_mask") for e in entries)


@torch.no_grad()
def teacher_patch_scores(
    net: MILAggregator,
    bags: BagDataset | Sequence[Mapping[str, Any]],
    entries: Mapping[str, Mapping[str, Any]],
    coords: CoordsStore,
    backend: str = "auto",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The instance teacher's tumour probability and the ground-truth tumour fraction of every patch, per slide.

    A slide with a ``tumour_mask`` is measured against it; a slide of class 0 without one counts as tumour-free; other
    slides are left out. The score of a patch is the teacher's probability of the last class.

    Args:
        net: the round's bag classifier.
        bags: the round's feature bags (``features``, ``coords``, ``slide_id``) of the slides to measure on.
        entries: ``{slide_id: datalist entry}`` (``image``, ``label``, ``tumour_mask``).
        coords: the coordinate store (each slide's patch footprint).
        backend: slide backend (each slide's dimensions).

    Returns:
        ``(scores, fractions)``: one array per measured slide each.
    """
    net = net.cpu().eval()
    scores, fractions = [], []
    for i in range(len(bags)):
        bag = bags[i]
        entry = entries[bag["slide_id"]]
        mask = entry.get("tumour_mask")
        if mask is None and entry.get("label") != 0:
            continue
        footprint = float(coords.metadata(bag["slide_id"])["footprint"])
        truth = GroundTruth(mask, get_slide(entry["image"], backend).dimensions, label=entry.get("label"))
        fractions.append(truth.patch_fraction(bag["coords"].numpy(), footprint))
        scores.append(torch.softmax(net.instance_logits(bag["features"].float()), -1)[:, -1].numpy())
    return scores, fractions


def teacher_patch_auc(
    net: MILAggregator,
    bags: BagDataset | Sequence[Mapping[str, Any]],
    entries: Mapping[str, Mapping[str, Any]],
    coords: CoordsStore,
    backend: str = "auto",
) -> dict[str, Any] | None:
    """The instance teacher's patch AUC on ``bags`` against their slides' ground truth
    (:func:`teacher_patch_scores`; :func:`~monai_icmil.metrics.instance_auc`: >= 50 % tumour positive, tumour-free
    negative), with the labels it gives at 0.5.

    Returns:
        :func:`~monai_icmil.metrics.instance_auc`'s record, or ``None`` without any tumour patch to measure.
    """
    scores, fractions = teacher_patch_scores(net, bags, entries, coords, backend)
    if not any((np.asarray(f) >= 0.5).any() for f in fractions):
        return None
    return instance_auc(scores, fractions)
