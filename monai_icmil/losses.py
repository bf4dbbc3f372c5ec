# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""ICMIL's teacher-student distillation loss for the embedder phase.

    L = w_view * KL(p_s(view) || p_t(patch))
      + w_head * KL(head_s(f_t) || head_t(f_t))
      + w_reduce * KL(softmax(reduce_s(f_t)) || softmax(reduce_t(f_t)))

with ``p = softmax(head(reduce(embedder(x))))``, ``f_t`` the teacher embedder's feature of the plain patch, ``_s``
the student and ``_t`` the teacher. As in the paper's code, each KL is ``torch.nn.KLDivLoss(reduction="none")``
between the student's log-probabilities and the teacher's probabilities, averaged over every element. Defaults:
``w_view = 1``, ``w_head = w_reduce = 0.5``.

An optional fourth term, not in ICMIL, ``w_feature * mean((reduce_s(embedder_s(view)) - reduce_t(f_t)) ** 2)``
(``feature_weight``, default 0: off), holds the student's reduction of *its own* features of the view near the
teacher's reduction of the plain patch's features, as values rather than as a softmax. ICMIL's three terms hold each
patch's instance output and the student's reduction of the *teacher's* features; none holds the reduced features of
the student's own embedder, which the bag classifier's attention reads (a reading of the loss). On the benchmark's
hard setting, round 0's classifier with the student's reduction and head, applied to round 1's features, fell from
0.92-0.93 to 0.56-0.66 AUC on 120 extra test slides on two seeds of three (``benchmarks/RESULTS.md``, session 42). The
term's value is unnormalised (a mean over the batch and the reduction's width, at the reduction's scale), so a weight
does not carry over between reductions of different widths or scales. Measured there at weight 1 (AB-MIL, 2
seeds, session 43): round 0's classifier kept 0.90-0.92 on round 1's features, but the instance teacher no longer
gained and the retrained round 1 lost to round 0 (-0.024 +/- 0.010), so it is off by default.

The confidence-based variant weights the first term per patch by ``|2a - 1| ** beta``, where ``a`` in [0, 1] is the
teacher's confidence score (:meth:`~monai_icmil.networks.MILAggregator.confidence_scores`: the attention min-max
normalised over the batch; for DTFD-MIL the product of its two tiers' normalised attentions): patches the teacher
attends to strongly or not at all are trusted, ambiguous ones less.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ICMILDistillationLoss", "confidence_weights", "kl_terms"]


def confidence_weights(scores: torch.Tensor, beta: float) -> torch.Tensor:
    """``|2a - 1| ** beta`` per patch, ``a`` the teacher's confidence scores in [0, 1]
    (:meth:`~monai_icmil.networks.MILAggregator.confidence_scores`)."""
    a = scores.detach().float().reshape(-1)
    return (2 * a - 1).abs().pow(beta)


def kl_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Element-wise ``KLDivLoss(log_softmax(student), softmax(teacher))``, shape ``[B, K]``."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), dim=-1), F.softmax(teacher_logits.float(), dim=-1), reduction="none"
    )


class ICMILDistillationLoss(nn.Module):
    """The ICMIL embedder-phase loss, plain or confidence-weighted.

    Args:
        view_weight: weight of the student-view vs teacher-patch term.
        head_weight: weight of the student-head-on-teacher-features term.
        reduce_weight: weight of the reduced-feature term.
        confidence: weight the view term per patch by the teacher's confidence scores.
        beta: exponent of the confidence weight (ICMIL uses 6 for AB-MIL, 2 for DTFD); ``None``: the teacher's
            (:meth:`for_teacher`; 6 when used directly).
        feature_weight: weight of the mean squared difference between the student's reduction of its own view
            features and the teacher's reduction of the plain patch's (0: off, ICMIL's loss).

    ``forward`` returns a dict: ``"loss"`` (the total) and the unweighted terms ``"view"``, ``"head"``, ``"reduce"``
    (and ``"feature"`` with ``feature_weight > 0``).

    Raises:
        ValueError: a negative or non-finite ``feature_weight``.
    """

    def __init__(
        self,
        view_weight: float = 1.0,
        head_weight: float = 0.5,
        reduce_weight: float = 0.5,
        confidence: bool = False,
        beta: float | None = None,
        feature_weight: float = 0.0,
    ):
        super().__init__()
        self.view_weight, self.head_weight, self.reduce_weight = view_weight, head_weight, reduce_weight
        from monai_icmil.utils import as_bool

        self.confidence, self.beta = as_bool(confidence, "confidence"), None if beta is None else float(beta)
        if not math.isfinite(float(feature_weight)) or float(feature_weight) < 0:
            raise ValueError(f"feature_weight must be a finite number >= 0 (0: off), got {feature_weight}")
        # private, so that the loss's signature (resume keys) is the one it had before the term existed; the
        # embedder phase adds the weight to its signature where it is on
        self._feature_weight = float(feature_weight)

    @property
    def feature_weight(self) -> float:
        """Weight of the student's-own-reduced-feature term (0: off)."""
        return self._feature_weight

    def for_teacher(self, aggregator: nn.Module) -> ICMILDistillationLoss:
        """This loss with ``beta`` set to the teacher aggregator's ``confidence_beta`` (2 for DTFD-MIL, 6 for the
        others, as ICMIL) when it was left ``None``; otherwise itself."""
        if self.beta is not None:
            return self
        resolved = copy.copy(self)
        resolved.beta = float(getattr(aggregator, "confidence_beta", 6.0))
        return resolved

    def forward(
        self,
        student_view_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_head_on_teacher: torch.Tensor,
        student_reduce_on_teacher: torch.Tensor,
        teacher_reduce: torch.Tensor,
        confidence_scores: torch.Tensor | None = None,
        student_view_reduce: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            student_view_logits: ``head_s(reduce_s(embedder_s(view)))``, ``[B, C]``.
            teacher_logits: ``head_t(reduce_t(embedder_t(patch)))``, ``[B, C]``.
            student_head_on_teacher: ``head_s(reduce_s(f_t))``, ``[B, C]``.
            student_reduce_on_teacher: ``reduce_s(f_t)``, ``[B, H]``.
            teacher_reduce: ``reduce_t(f_t)``, ``[B, H]``.
            confidence_scores: the teacher's confidence ``a`` in [0, 1], ``[B]`` (required with ``confidence=True``).
            student_view_reduce: ``reduce_s(embedder_s(view))``, ``[B, H]`` (required with ``feature_weight > 0``).
        """
        teacher_logits = teacher_logits.detach()
        view = kl_terms(student_view_logits, teacher_logits)
        if self.confidence:
            if confidence_scores is None:
                raise ValueError("the confidence-based loss needs the teacher's confidence scores")
            beta = 6.0 if self.beta is None else self.beta
            view_term = (view * confidence_weights(confidence_scores, beta).to(view.device)[:, None]).mean()
        else:
            view_term = view.mean()
        head_term = kl_terms(student_head_on_teacher, teacher_logits).mean()
        reduce_term = kl_terms(student_reduce_on_teacher, teacher_reduce.detach()).mean()
        total = self.view_weight * view_term + self.head_weight * head_term + self.reduce_weight * reduce_term
        out = {"view": view_term.detach(), "head": head_term.detach(), "reduce": reduce_term.detach()}
        if self.feature_weight > 0:
            if student_view_reduce is None:
                raise ValueError("feature_weight > 0 needs the student's reduced features of its views")
            feature_term = (student_view_reduce.float() - teacher_reduce.detach().float()).pow(2).mean()
            total = total + self.feature_weight * feature_term
            out["feature"] = feature_term.detach()
        return {"loss": total, **out}
