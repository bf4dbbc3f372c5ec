# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Witness search: find the few tumour patches of sparse positive slides before the bag phase trains.

On slides whose tumour covers ~1-2 % of the tissue, a bag classifier trained from a random initialisation can sit on
the loss plateau and never find the witnesses that its features separate (a linear probe fitted against the masks
scores them at ~0.97 patch AUC, while the bag phase stays at chance): the search over which patches matter fails, not
the features. :class:`WitnessSearch` does that search on its own, with a linear instance scorer (standardised
features, so it is cheap and cannot memorise slides):

1. start from the logistic regression of the slide labels on the slides' mean features (the direction in which
   positive slides differ on average);
2. repeat: on every training slide, take the ``fraction`` of its patches that score highest and give them the
   slide's label (on a class-0 slide these are its most tumour-like normal patches, the hard negatives), and fit the
   logistic regression on them; stop when the selection no longer changes or after ``iterations``;
3. do this for each of ``fractions`` (the witness rate is unknown) and keep the fraction whose scorer ranks the
   validation slides best by the mean of their top-``fraction`` patch scores.

:meth:`WitnessSearch.pretrain` then trains a fresh bag classifier's instance logits (``instance_logits``: the ICMIL
teacher) on the search's pseudo-labels (a positive bag's top-``fraction`` patches carry its label, random patches of
class-0 bags are class 0; class-balanced batches), before the bag phase trains it as usual. This is iterative instance
selection in the spirit of mi-SVM (Andrews et al., NIPS 2002), seeded by the mean-feature direction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from monai_icmil.metrics import binary_auc, fit_logistic
from monai_icmil.networks.aggregators import MILAggregator

__all__ = ["SingleClassError", "WitnessSearch", "WitnessSearchResult", "as_witness_search"]

logger = logging.getLogger("monai_icmil.bag_phase")


class SingleClassError(ValueError):
    """The training bags hold a single class: there is nothing to search for (the bag phase skips the search)."""


@dataclass
class WitnessSearchResult:
    """The kept linear instance scorer of a :class:`WitnessSearch`.

    Attributes:
        fraction: the share of each bag's patches that carried its label.
        weight, bias: the scorer on standardised features: ``((feats - mean) / std) @ weight + bias``.
        mean, std: the standardisation (the training instances'; ``None``: none).
        val_auc: validation slide AUC of the kept scorer (slide score: mean of its top-``fraction`` patch scores).
        candidates: per fraction tried, ``{"fraction", "val_auc", "iterations", "converged"}``.
    """

    fraction: float
    weight: torch.Tensor
    bias: float
    mean: torch.Tensor | None
    std: torch.Tensor | None
    val_auc: float
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Instance scores ``[N]`` of a bag's features ``[N, D]`` (higher: more like a witness)."""
        return _standardise(feats, self.mean, self.std) @ self.weight.float() + self.bias

    def top(self, feats: torch.Tensor) -> torch.Tensor:
        """Indices of the bag's top-``fraction`` instances (at least one)."""
        return _top(self.scores(feats), self.fraction)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no weights; an undefined AUC as ``None``)."""
        candidates = [{**c, "val_auc": _finite_or_none(c["val_auc"])} for c in self.candidates]
        return {"fraction": self.fraction, "val_auc": _finite_or_none(self.val_auc), "candidates": candidates}


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _items(dataset: Any) -> Any:
    """``(index, item)`` of the dataset's items with a non-empty bag."""
    for i in range(len(dataset)):
        item = dataset[i]
        if len(item["features"]):
            yield i, item


def _standardise(feats: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """A bag's features on the CPU in float32, standardised with ``mean`` and ``std`` where given (the search and
    the kept scorer share it, so the pre-training picks the instances the search picked)."""
    feats = feats.detach().cpu().float()
    if mean is None or std is None:
        return feats
    return (feats - mean.cpu().float()) / std.cpu().float().clamp_min(1e-6)


def _count(n: int, fraction: float) -> int:
    """How many of a bag's ``n`` patches its top ``fraction`` holds: at least one, at most ``n``."""
    return min(max(1, int(round(fraction * n))), n)


def _top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    return torch.topk(scores, _count(len(scores), fraction)).indices


class WitnessSearch:
    """Iterative instance selection with a linear scorer, then pre-training of the bag classifier's instance head on
    the selected instances (see the module docstring).

    Args:
        fractions: shares of each bag's patches that carry its label, tried in turn (validation keeps one). The
            defaults span witness rates of ~0.5-5 % of a slide's patches; add larger ones for slides whose tumour
            covers more. Fractions that pick as many patches of every bag (small bags: at least one each) select
            alike and are searched once.
        iterations: most selection rounds per fraction (it stops earlier once the selection no longer changes).
        l2: weight decay of the logistic regressions (on their mean loss).
        pretrain_steps: batches that train the instance head on the pseudo-labels (0: search only, recorded but not
            used).
        pretrain_batch_size: instances per batch, half pseudo-witnesses and half class-0 instances.
        pretrain_negatives: random instances taken from each class-0 bag into the class-0 pool.
        max_instances: the search holds at most this many instances of a bag (a fixed random subset of larger bags;
            the selection's fractions apply to it) and all bags together in memory, standardised, in float32: bags of
            up to 2,048 patches are searched whole, and 270 slides of 1,024-d features take ~2.3 GB however large the
            slides; ``None``: whole bags (memory grows with the cohort). A lesion of a few patches in a much larger
            bag may lose some of them to the subset; the pre-training scores whole bags, one at a time.
    """

    def __init__(
        self,
        fractions: Sequence[float] = (0.005, 0.01, 0.02, 0.05),
        iterations: int = 30,
        l2: float = 1e-3,
        pretrain_steps: int = 500,
        pretrain_batch_size: int = 512,
        pretrain_negatives: int = 1024,
        max_instances: int | None = 2048,
    ):
        self.fractions = [float(f) for f in fractions]
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise ValueError(f"bag_phase#witness_search: fractions must be in (0, 1], got {list(fractions)}")
        self.iterations, self.l2 = int(iterations), float(l2)
        self.pretrain_steps, self.pretrain_batch_size = int(pretrain_steps), int(pretrain_batch_size)
        self.pretrain_negatives = int(pretrain_negatives)
        self.max_instances = None if max_instances is None else int(max_instances)
        if self.max_instances is not None and self.max_instances < 1:
            raise ValueError(f"bag_phase#witness_search: max_instances must be >= 1 or null, got {max_instances}")
        if (
            min(self.iterations, self.pretrain_batch_size, self.pretrain_negatives) < 1
            or min(self.pretrain_steps, l2) < 0
        ):
            raise ValueError(
                "bag_phase#witness_search: iterations, pretrain_batch_size and pretrain_negatives must be >= 1, "
                f"pretrain_steps and l2 >= 0; got {iterations}, {pretrain_batch_size}, {pretrain_negatives}, "
                f"{pretrain_steps}, {l2}"
            )

    def signature(self) -> dict[str, Any]:
        """The settings its results depend on."""
        return {
            "fractions": self.fractions,
            "iterations": self.iterations,
            "l2": self.l2,
            "pretrain_steps": self.pretrain_steps,
            "pretrain_batch_size": self.pretrain_batch_size,
            "pretrain_negatives": self.pretrain_negatives,
            "max_instances": self.max_instances,
        }

    def search(
        self, train_ds: Any, val_ds: Any, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
    ) -> WitnessSearchResult:
        """Run the search on the training bags and keep a fraction by the validation bags.

        Args:
            train_ds, val_ds: bag datasets (items with ``features [N, D]`` and ``label``); empty bags are left out.
            mean, std: the standardisation (default: none).

        Returns:
            the kept scorer with every fraction's outcome. Ties of the validation AUC (or a validation split without
            both classes: AUC NaN) keep the fraction listed first.

        Raises:
            SingleClassError: the training bags hold a single class (nothing to search for; a ``ValueError``).
        """
        # the training instances are held once (at most max_instances a bag), standardised, in float32 (the fits run
        # in float64 on the selection)
        bags = [(self._held(item["features"], i, mean, std), int(item["label"])) for i, item in _items(train_ds)]
        labels = torch.tensor([float(y != 0) for _, y in bags], dtype=torch.float64)
        if len(labels.unique()) < 2:
            raise SingleClassError(
                "bag_phase#witness_search: the training bags hold no class-0 slides or only class-0 slides; the search "
                "needs both (or set bag_phase#witness_search to false)"
            )
        start = fit_logistic(torch.stack([z.double().mean(0) for z, _ in bags]), labels, self.l2)
        val = [(self._held(item["features"], i, mean, std), int(item["label"])) for i, item in _items(val_ds)]
        results, done = [], {}
        for fraction in self.fractions:
            # fractions that pick as many patches of every bag as one already tried select alike (small bags): the
            # same outcome, computed once
            counts = tuple(_count(len(z), fraction) for z, _ in (*bags, *val))
            if counts in done:
                results.append((fraction, *done[counts][1:]))
                logger.info(
                    "bag_phase: witness search, fraction %.3g: the patches of fraction %.3g (as many from every bag)",
                    fraction, done[counts][0],
                )  # fmt: skip
                continue
            (w, b), n, converged = self._select(bags, labels, start, fraction)
            auc = float("nan")
            if len({y != 0 for _, y in val}) == 2:
                s = [z @ w.float() for z, _ in val]
                slide = [float(x[_top(x, fraction)].mean() + b) for x in s]
                auc = binary_auc(np.array(slide), np.array([int(y != 0) for _, y in val]))
            results.append((fraction, w, float(b), auc, n, converged))
            done[counts] = results[-1]
            logger.info(
                "bag_phase: witness search, fraction %.3g: validation AUC %.3f after %d selection rounds%s",
                fraction, auc, n, "" if converged else " (its picks still changed in the last round)",
            )  # fmt: skip
        # the best validation AUC; ties (or no validation classes) keep the fraction listed first
        best = max(range(len(results)), key=lambda i: (np.nan_to_num(results[i][3], nan=-1.0), -i))
        fraction, w, b, auc, _, _ = results[best]
        candidates = [{"fraction": f, "val_auc": a, "iterations": n, "converged": c} for f, _, _, a, n, c in results]
        return WitnessSearchResult(fraction, w, b, mean, std, auc, candidates)

    def _held(
        self, feats: torch.Tensor, index: int, mean: torch.Tensor | None, std: torch.Tensor | None
    ) -> torch.Tensor:
        """Bag ``index``'s instances as the search holds them: a fixed random subset of ``max_instances`` (seeded by
        the index), standardised."""
        if self.max_instances is not None and len(feats) > self.max_instances:
            keep = torch.randperm(len(feats), generator=torch.Generator().manual_seed(index))[: self.max_instances]
            feats = feats[keep.sort().values]
        return _standardise(feats, mean, std)

    def _select(
        self,
        bags: list[tuple[torch.Tensor, int]],
        labels: torch.Tensor,
        start: tuple[torch.Tensor, torch.Tensor],
        fraction: float,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], int, bool]:
        """Selection rounds from ``start``: ``((w, b), rounds run, converged)``."""
        (w, b), previous = start, None
        for n in range(1, self.iterations + 1):
            wf = w.float()
            picks = [_top(z @ wf, fraction).sort().values for z, _ in bags]
            if previous is not None and all(torch.equal(p, q) for p, q in zip(picks, previous)):
                return (w, b), n - 1, True
            x = torch.cat([z[p] for (z, _), p in zip(bags, picks)]).double()
            y = torch.cat([labels[i].expand(len(p)) for i, p in enumerate(picks)])
            w, b = fit_logistic(x, y, self.l2)
            previous = picks
        return (w, b), self.iterations, False

    def pretrain(
        self,
        net: MILAggregator,
        train_ds: Any,
        result: WitnessSearchResult,
        optimizer: torch.optim.Optimizer,
        loss_function: torch.nn.Module,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> list[float]:
        """Train ``net``'s instance logits (``instance_logits``: the dimension reduction and the head that score one
        instance, the ICMIL teacher) on the search's pseudo-labels: the top-``fraction`` instances of every bag of
        class ``c != 0`` are class ``c``, up to ``pretrain_negatives`` random instances of every class-0 bag are
        class 0; each of ``pretrain_steps`` batches draws half its instances from either pool (so both classes weigh
        alike however few the witnesses).

        Args:
            net: a fresh bag classifier (its input statistics set).
            train_ds: the training bags.
            result: the search's outcome (:meth:`search`).
            optimizer: an optimizer over ``net``'s parameters (used for these steps only).
            loss_function: instance loss on ``(logits [B, C], labels [B])`` (the bag phase's).
            seed: seeds the negatives' and the batches' draws.
            device: where ``net`` is.

        Returns:
            the loss of every step.
        """
        if not self.pretrain_steps:
            return []
        g = torch.Generator().manual_seed(int(seed))
        if isinstance(loss_function, torch.nn.Module):
            loss_function = loss_function.to(device)  # e.g. class weights
        pos, pos_y, neg = [], [], []
        for i in range(len(train_ds)):
            item = train_ds[i]
            feats, label = item["features"], int(item["label"])
            if not len(feats):
                continue
            if label:
                top = feats[result.top(feats)]
                pos.append(top.float())
                pos_y.append(torch.full((len(top),), label, dtype=torch.long))
            else:
                pick = torch.randperm(len(feats), generator=g)[: self.pretrain_negatives]
                neg.append(feats[pick].float())
        pos, pos_y, neg = torch.cat(pos), torch.cat(pos_y), torch.cat(neg)
        half = max(1, self.pretrain_batch_size // 2)
        losses = []
        net.train()
        for _ in range(self.pretrain_steps):
            p = torch.randint(len(pos), (half,), generator=g)
            n = torch.randint(len(neg), (half,), generator=g)
            feats = torch.cat([pos[p], neg[n]]).to(device)
            target = torch.cat([pos_y[p], torch.zeros(half, dtype=torch.long)]).to(device)
            loss = loss_function(net.instance_logits(feats), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses


def as_witness_search(value: Any) -> WitnessSearch | None:
    """``bag_phase#witness_search`` as given: ``false``/``None`` (off), ``true`` (the defaults), a boolean as a
    command line passes it (``false``, ``0``, ``off`` ... in any case: :func:`~monai_icmil.utils.as_bool`), a mapping of
    :class:`WitnessSearch` arguments, or a :class:`WitnessSearch`."""
    from monai_icmil.utils import as_bool

    if value is None:
        return None
    if isinstance(value, (bool, int, float, str)):
        try:
            on = as_bool(value, "bag_phase#witness_search")
        except ValueError:
            raise ValueError(
                f"bag_phase#witness_search must be true, false or a mapping of settings, got {value!r}"
            ) from None
        return WitnessSearch() if on else None
    if isinstance(value, WitnessSearch):
        return value
    if isinstance(value, Mapping):
        try:
            return WitnessSearch(**value)
        except TypeError as e:
            raise ValueError(f"bag_phase#witness_search: {e}") from e
    raise ValueError(f"bag_phase#witness_search must be true, false or a mapping of settings, got {value!r}")
