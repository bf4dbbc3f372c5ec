# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Slide-level classification metrics: AUC, accuracy, F1, and accuracy/F1 at the Youden threshold.

Pure NumPy functions (checked against scikit-learn in the tests) and an ignite metric that accumulates slide
probabilities over an epoch. An AUC that is undefined (a split with one class) is ``nan`` with a warning. A binary
AUC comes with its DeLong confidence interval: on the few slides of a pathology test set it is wide, and saying so
is part of the result.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

__all__ = [
    "positive_rank",
    "threshold_metrics",
    "binary_auc",
    "auc_confidence_interval",
    "paired_auc_difference",
    "roc_curve",
    "slide_metrics",
    "SlideMetric",
    "METRIC_NAMES",
    "SLIDE_METRICS",
    "youden_threshold",
    "linear_probe_auc",
    "fit_logistic",
    "fit_linear_probe",
    "instance_auc",
    "instance_truth",
]

METRIC_NAMES = ("auc", "acc", "f1", "youden_acc", "youden_f1")
"""Slide metrics that select models (higher is better)."""
SLIDE_METRICS = (*METRIC_NAMES, "loss")
"""Every slide metric :class:`SlideMetric` computes; ``loss`` is the mean negative log-likelihood of the true class
(lower is better), which breaks ties of the others (a validation AUC of 1.0 from the second epoch on)."""


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) with ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney statistic; ``nan`` when only one class is present."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(scores)
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def positive_rank(probs: Sequence[float]) -> tuple[float, float]:
    """A sort key ranking slides by their positive-class (last) probability, ties broken by the other classes'
    total: several confident slides all read 1.0 in float32, while the others' probabilities (1e-9, 1e-11) still
    tell them apart."""
    return float(probs[-1]), -float(sum(probs[:-1]))


def auc_confidence_interval(scores: np.ndarray, labels: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Two-sided confidence interval of the binary ROC AUC by DeLong's variance (DeLong et al., Biometrics 1988).

    Each positive's placement (the share of negatives it outscores, ties counting half) and each negative's (the
    share of positives that outscore it) average to the AUC; the AUC's variance is the sum of their variances over
    their counts. The normal interval is clipped to ``[0, 1]``. It collapses to a point when every placement is the
    same (e.g. AUC 0 or 1): with few slides read it as "no overlap in this sample", not as certainty.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when a class has fewer than 2 slides (a class's variance needs two: with one,
        the interval would leave out its share and look far narrower than it is).
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) < 2 or len(neg) < 2:
        return float("nan"), float("nan")
    v10 = _placements(pos, np.sort(neg))  # share of negatives each positive outscores
    v01 = 1.0 - _placements(neg, np.sort(pos))  # share of positives that outscore each negative
    auc = float(v10.mean())
    var = np.var(v10, ddof=1) / len(pos) + np.var(v01, ddof=1) / len(neg)
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    half = z * math.sqrt(max(var, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def paired_auc_difference(
    scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray, level: float = 0.95
) -> dict[str, float]:
    """The difference of two binary ROC AUCs on the same slides (``b - a``: e.g. round 1's minus round 0's), with
    DeLong's paired standard error and interval (DeLong et al., Biometrics 1988).

    The two AUCs of one test set are correlated (the same hard slides are hard for both), so the difference's
    variance is ``var_a + var_b - 2 cov_ab``, each from the slides' placements (see
    :func:`auc_confidence_interval`): on a shared test set this is far narrower than the two separate intervals
    suggest.

    Args:
        scores_a: the first scorer's positive-class score per slide.
        scores_b: the second scorer's, for the same slides in the same order.
        labels: the slides' binary labels.
        level: the interval's confidence level.

    Returns:
        ``{"diff", "se", "low", "high"}`` (the interval clipped to ``[-1, 1]``); all ``nan`` with fewer than two
        slides of a class (no variance to estimate) or a score that is not finite.

    Raises:
        ValueError: when the three arrays do not have one value per slide each.
    """
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    labels = np.asarray(labels).astype(bool)
    if a.shape != b.shape or a.shape != labels.shape:
        raise ValueError(f"scores_a {a.shape}, scores_b {b.shape} and labels {labels.shape} must be one per slide")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos < 2 or n_neg < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return dict.fromkeys(("diff", "se", "low", "high"), float("nan"))
    # per slide, placement under b minus placement under a: the difference's own placements
    d10 = _placements(b[labels], np.sort(b[~labels])) - _placements(a[labels], np.sort(a[~labels]))
    d01 = _placements(a[~labels], np.sort(a[labels])) - _placements(b[~labels], np.sort(b[labels]))
    var = np.var(d10, ddof=1) / n_pos + np.var(d01, ddof=1) / n_neg
    diff, se = float(d10.mean()), math.sqrt(max(float(var), 0.0))
    half = NormalDist().inv_cdf(0.5 + level / 2.0) * se
    return {"diff": diff, "se": se, "low": max(-1.0, diff - half), "high": min(1.0, diff + half)}


def _placements(x: np.ndarray, others_sorted: np.ndarray) -> np.ndarray:
    """Per value of ``x``, the share of ``others_sorted`` below it, ties counting half (O(n log n))."""
    below = np.searchsorted(others_sorted, x, side="left")
    ties = np.searchsorted(others_sorted, x, side="right") - below
    return (below + 0.5 * ties) / len(others_sorted)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` with thresholds decreasing; a point per distinct score, plus (0, 0)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thr = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thr


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises ``TPR - FPR`` (predict positive when ``score >= threshold``)."""
    fpr, tpr, thr = roc_curve(scores, labels)
    best = int(np.argmax(tpr - fpr))
    return float(thr[best]) if np.isfinite(thr[best]) else float(np.max(scores) + 1e-12)


def threshold_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy and F1 of predicting positive when ``score >= threshold`` (a threshold chosen elsewhere, e.g. on the
    validation split, so that these are fair test figures: a threshold fitted on the test labels is not)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(int)
    pred = (scores >= threshold).astype(int)
    return {"acc": float((pred == labels).mean()) if len(labels) else float("nan"), "f1": _f1(pred, labels)}


def _f1(pred: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    tp = float(np.sum((pred == positive) & (labels == positive)))
    fp = float(np.sum((pred == positive) & (labels != positive)))
    fn = float(np.sum((pred != positive) & (labels == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def slide_metrics(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, warn: bool = True) -> dict:
    """Metrics of slide probabilities ``[N, C]`` against labels ``[N]``.

    AUC is binary for ``C == 2`` and macro one-vs-rest for ``C > 2``; F1 is the positive class's for ``C == 2``
    and macro for ``C > 2``. The Youden metrics (binary only) threshold the positive probability at the value
    that maximises ``TPR - FPR``; for ``C > 2`` they equal the argmax metrics.
    """
    p = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, np.float64)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).astype(int).reshape(-1)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probabilities must be [N, C] for N labels, got {p.shape} and {y.shape}")
    n_classes = p.shape[1]
    pred = p.argmax(axis=1)
    out: dict[str, float] = {"acc": float((pred == y).mean()) if len(y) else float("nan")}
    true = p[np.arange(len(y)), np.clip(y, 0, n_classes - 1)] if len(y) else np.zeros(0)
    out["loss"] = float(-np.log(np.clip(true, 1e-12, 1.0)).mean()) if len(y) else float("nan")
    if n_classes == 2:
        out["auc"] = binary_auc(p[:, 1], y)
        out["auc_ci_low"], out["auc_ci_high"] = auc_confidence_interval(p[:, 1], y)
        out["f1"] = _f1(pred, y)
        if math.isnan(out["auc"]):
            out["youden_acc"] = out["youden_f1"] = float("nan")
        else:
            thr = youden_threshold(p[:, 1], y)
            at_threshold = threshold_metrics(p[:, 1], y, thr)
            out["youden_acc"], out["youden_f1"], out["youden_threshold"] = at_threshold["acc"], at_threshold["f1"], thr
    else:
        aucs = [binary_auc(p[:, c], y == c) for c in range(n_classes)]
        out["auc"] = float("nan") if any(math.isnan(a) for a in aucs) else float(np.mean(aucs))
        out["f1"] = float(np.mean([_f1((pred == c).astype(int), (y == c).astype(int)) for c in range(n_classes)]))
        out["youden_acc"], out["youden_f1"] = out["acc"], out["f1"]
    if warn and math.isnan(out["auc"]):
        present = sorted(set(y.tolist()))
        warnings.warn(f"AUC is undefined: the labels contain only class(es) {present}; reported as nan.", stacklevel=2)
    return out


class SlideMetric(Metric):
    """An ignite metric over slide probabilities: one of ``"auc"``, ``"acc"``, ``"f1"``, ``"youden_acc"``,
    ``"youden_f1"``, ``"loss"`` (:data:`SLIDE_METRICS`). The engine's output must give ``(probs [B, C], labels [B])``
    through ``output_transform``.
    """

    def __init__(
        self,
        name: str = "auc",
        output_transform: Callable = lambda x: (x["pred"], x["label"]),
        device: str | torch.device = "cpu",
    ):
        if name not in SLIDE_METRICS:
            raise ValueError(f"unknown slide metric {name!r}; choose one of {SLIDE_METRICS}")
        self.name = name
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        probs, labels = output
        self._probs.append(torch.as_tensor(probs).detach().float().cpu().reshape(-1, torch.as_tensor(probs).shape[-1]))
        self._labels.append(torch.as_tensor(labels).detach().cpu().reshape(-1))

    def compute(self) -> float:
        if not self._probs:
            return float("nan")
        return float(slide_metrics(torch.cat(self._probs), torch.cat(self._labels), warn=self.name == "auc")[self.name])


def instance_truth(
    scores: Sequence[np.ndarray], fractions: Sequence[np.ndarray], positive: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """All slides' patch scores and truth (bool) for the patches with a clear label: at least ``positive`` of their
    area in tumour (positive) or none (negative); the ones in between, on a tumour's border, are left out."""
    s, y = [], []
    for sc, fr in zip(scores, fractions):
        sc, fr = np.asarray(sc, np.float64).reshape(-1), np.asarray(fr, np.float64).reshape(-1)
        keep = (fr >= positive) | (fr == 0)
        s.append(sc[keep])
        y.append(fr[keep] >= positive)
    return (np.concatenate(s) if s else np.zeros(0)), (np.concatenate(y) if y else np.zeros(0, bool))


def instance_auc(
    scores: Sequence[np.ndarray], fractions: Sequence[np.ndarray], positive: float = 0.5, threshold: float = 0.5
) -> dict[str, float | int]:
    """Patch-level AUC of instance scores against ground truth (the instance teacher's quality, what ICMIL couples):
    patches with at least ``positive`` of their area in tumour are positive, tumour-free ones negative, the ones in
    between (on a tumour's border) left out; and the labels the scores give at ``threshold``, which are what ICMIL's
    student is taught: a teacher can rank patches well (AUC) and still call most tumour-free patches tumour.

    Args:
        scores: per slide, each patch's score (e.g. the teacher's tumour probability).
        fractions: per slide, each patch's tumour fraction (:class:`~monai_icmil.data.annotations.GroundTruth`).
        positive: the tumour fraction from which a patch is positive.
        threshold: the score above which a patch is called tumour.

    Returns:
        ``{"patch_auc", "patches", "tumour_patches", "slides", "normal_called_tumour" (share of the tumour-free
        patches scored above ``threshold``), "precision" (share of the patches scored above it that are tumour)}``
        (``nan`` where undefined: an AUC without both kinds, a precision without a patch above the threshold).
    """
    s_all, y_all = instance_truth(scores, fractions, positive)
    auc = binary_auc(s_all, y_all) if 0 < y_all.sum() < len(y_all) else float("nan")
    called = s_all > threshold
    return {
        "patch_auc": auc,
        "patches": int(len(y_all)),
        "tumour_patches": int(y_all.sum()),
        "slides": len(scores),
        "normal_called_tumour": float(called[~y_all].mean()) if (~y_all).any() else float("nan"),
        "precision": float(y_all[called].mean()) if called.any() else float("nan"),
    }


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression of binary ``y`` (``[N]``) on ``x`` (``[N, D]``, used as given) with weight decay ``l2`` on
    the mean loss (full-batch L-BFGS in ``x``'s dtype).

    Returns:
        ``(w [D], b [1])``: the logit is ``x @ w + b`` (higher: class 1).
    """
    y = y.to(device=x.device, dtype=x.dtype)
    w = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(1, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_linear_probe(
    features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, l2: float = 1e-3
) -> Callable[[np.ndarray | torch.Tensor], np.ndarray]:
    """A logistic-regression probe (:func:`fit_logistic`) fitted on ``features`` (``[N, D]``, standardised on
    themselves) against binary ``labels`` with weight decay ``l2`` (float64).

    Returns:
        its scorer: ``[M, D]`` features -> ``[M]`` logits (higher: class 1).
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels).astype(int), dtype=torch.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w, b = fit_logistic((x - mu) / sd, y, l2)

    def score(new: np.ndarray | torch.Tensor) -> np.ndarray:
        z = (torch.as_tensor(np.asarray(new), dtype=torch.float64) - mu) / sd
        return (z @ w + b).numpy()

    return score


def linear_probe_auc(
    features: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    train_fraction: float = 0.5,
    l2: float = 1e-3,
    seed: int = 0,
    train_mask: np.ndarray | None = None,
) -> float:
    """Held-out AUC of a logistic-regression probe (:func:`fit_linear_probe`) on frozen features (binary labels): how
    linearly the features separate the classes. Features are standardised on the training part; the split is
    stratified.

    Args:
        features: ``[N, D]``.
        labels: ``[N]`` of 0/1.
        train_fraction: share of each class the probe is fitted on; the AUC is measured on the rest.
        l2: weight decay of the probe.
        seed: the split.
        train_mask: an explicit split instead (``True``: fit on it), e.g. by slide, to measure how the probe carries
            over to other slides.
    """
    x = np.asarray(features)
    y = np.asarray(labels).astype(int)
    if set(np.unique(y).tolist()) != {0, 1}:
        raise ValueError("linear_probe_auc needs binary labels with both classes present")
    if train_mask is not None:
        train = np.asarray(train_mask, bool)
    else:
        rng = np.random.default_rng(seed)
        train = np.zeros(len(y), bool)
        for c in (0, 1):
            idx = rng.permutation(np.flatnonzero(y == c))
            train[idx[: max(1, int(round(len(idx) * train_fraction)))]] = True
    score = fit_linear_probe(x[train], y[train], l2)
    return binary_auc(score(x[~train]), y[~train])
