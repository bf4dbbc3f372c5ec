# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""MIL bag classifiers that double as ICMIL instance teachers.

Every aggregator has one interface, which is all the embedder phase needs:

* ``reduce(feats) -> h``: input standardisation (fixed per-dimension mean/std, identity until
  :meth:`MILAggregator.set_input_stats` is called), ``Linear D->hidden`` + ReLU (+ optional residual blocks), per
  instance;
* ``forward(bag) -> {"logits": [1, C], "attention": [N] (where it has one)}`` for one bag ``[N, D]``;
* ``instance_logits(feats) -> [N, C]``: the bag classifier's last layer applied to each instance (the teacher);
* ``attention(h) -> [N]``: raw (pre-softmax) attention scores, where the aggregator has attention;
* ``head``: the linear layer that ``instance_logits`` applies (the part the student copies and trains);
* ``instance_head(h, confidence)``: the instance teacher's logits on reduced features (``head``; for DTFD-MIL's
  confidence-based variant ``0.7 * head + 0.3 * tier1_head``, as ICMIL's reference);
* ``confidence_scores(h) -> [N]`` in [0, 1]: what the confidence-based embedder phase weights patches by (the
  attention min-max normalised over the batch; for DTFD-MIL the product of its two tiers' normalised attentions).

Aggregators: :class:`MaxPoolMIL`, :class:`ABMIL` (gated attention), :class:`DTFDMIL` (double-tier feature
distillation), :class:`MeanPoolMIL` and :class:`TransformerMIL` (MONAI ``MILModel``'s ``att_trans`` head).

The registry is open, like timm's ``register_model``: :func:`register_aggregator` adds a class under a name (your
own too), :func:`create_aggregator` builds one by name, and a bag-classifier checkpoint records the registered name
(or, for an unregistered class, its import path) with the constructor arguments every aggregator keeps
(:attr:`MILAggregator.init_args`), so it can be rebuilt without the code that made it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "DimReduction",
    "GatedAttention",
    "MILAggregator",
    "MaxPoolMIL",
    "ABMIL",
    "DTFDMIL",
    "MeanPoolMIL",
    "TransformerMIL",
    "create_aggregator",
    "register_aggregator",
    "min_max_normalize",
    "aggregator_name",
    "aggregator_class",
    "aggregator_factory",
    "AGGREGATORS",
]


def min_max_normalize(x: torch.Tensor) -> torch.Tensor:
    """``(x - min) / (max - min)`` over a batch of scores (detached, float); all ones when the scores are equal (no
    information to weight by)."""
    a = x.detach().float().reshape(-1)
    lo, span = a.min(), a.max() - a.min()
    # no branch on a value read back to the host: one graph under torch.compile, no device sync
    return torch.where(span <= 1e-12, torch.ones_like(a), (a - lo) / span.clamp_min(1e-12))  # NaN stays NaN


class _Residual(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.fc2(F.relu(self.fc1(x))))


class DimReduction(nn.Module):
    """``Linear in_dim -> out_dim`` (no bias) + ReLU, then ``num_res_blocks`` residual blocks."""

    def __init__(self, in_dim: int, out_dim: int = 512, num_res_blocks: int = 0):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim, bias=False)
        self.res = nn.Sequential(*[_Residual(out_dim) for _ in range(num_res_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(F.relu(self.fc(x)))


class GatedAttention(nn.Module):
    """Gated attention (Ilse et al. 2018): ``w^T (tanh(V h) * sigmoid(U h))``, raw scores ``[N]``."""

    def __init__(self, dim: int = 512, hidden: int = 128):
        super().__init__()
        self.v, self.u, self.w = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)


class MILAggregator(nn.Module):
    """Base class: dimension reduction and the common interface.

    Args:
        in_dim: feature dimension of the bags (the embedder's output).
        num_classes: number of classes, >= 2.
        hidden_dim: width of the reduced features.
        num_res_blocks: residual blocks after the reduction.
        dropout: dropout on the reduced features during training.

    The buffers ``input_mean`` and ``input_std`` standardise every instance feature before the reduction. They are
    the identity until :meth:`set_input_stats` sets them (the bag phase does, from the training bags). Being part
    of the network, they travel with its checkpoints and apply wherever the network does, also to the single
    patches the instance teacher labels and to the student's features in the embedder phase.
    """

    has_attention = False
    #: the exponent of ICMIL's confidence weight for this teacher (6 in the paper; 2 for DTFD-MIL)
    confidence_beta = 6.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass records the arguments it was built with (:attr:`init_args`), for its checkpoints."""
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording_init(cls.__init__)

    def __init__(
        self, in_dim: int, num_classes: int = 2, hidden_dim: int = 512, num_res_blocks: int = 0, dropout: float = 0.0
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.in_dim, self.num_classes, self.hidden_dim = int(in_dim), int(num_classes), int(hidden_dim)
        self.dim_reduction = DimReduction(in_dim, hidden_dim, num_res_blocks)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, num_classes)
        self.register_buffer("input_mean", torch.zeros(self.in_dim))
        self.register_buffer("input_std", torch.ones(self.in_dim))

    @torch.no_grad()
    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        """Standardise inputs with this per-dimension ``mean`` and ``std`` (``[in_dim]`` each) from now on."""
        mean, std = torch.as_tensor(mean).float().reshape(-1), torch.as_tensor(std).float().reshape(-1)
        if mean.numel() != self.in_dim or std.numel() != self.in_dim:
            raise ValueError(f"input stats must have {self.in_dim} entries, got {mean.numel()} and {std.numel()}")
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(eps))

    def reduce(self, feats: torch.Tensor) -> torch.Tensor:
        return self.dim_reduction((feats - self.input_mean) / self.input_std)

    def instance_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The bag classifier applied to each instance: ``[N, D] -> [N, C]``."""
        return self.head(self.reduce(feats))

    def instance_head(self, h: torch.Tensor, confidence: bool = False) -> torch.Tensor:
        """The instance teacher's logits on reduced features ``h`` (``[N, hidden] -> [N, C]``): ``head``."""
        return self.head(h)

    def confidence_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Per-instance confidence ``a`` in [0, 1] for the confidence-based embedder phase: the attention scores
        min-max normalised over the batch (weight ``|2a - 1| ** beta``: patches attended to strongly or not at all are
        trusted, ambiguous ones less).

        Raises:
            TypeError: the aggregator has no attention.
        """
        if not self.has_attention:
            raise TypeError(f"{type(self).__name__} has no attention to weight instances by")
        return min_max_normalize(self.attention(h))

    @staticmethod
    def _as_bag(bag: torch.Tensor) -> torch.Tensor:
        if bag.dim() == 3:
            if bag.shape[0] != 1:
                raise ValueError(f"one bag per call: expected [N, D] or [1, N, D], got {tuple(bag.shape)}")
            bag = bag[0]
        if bag.dim() != 2 or bag.shape[0] == 0:
            raise ValueError(f"a bag must be a non-empty [N, D] tensor, got {tuple(bag.shape)}")
        return bag

    @property
    def init_args(self) -> dict[str, Any]:
        """The constructor arguments of this aggregator (defaults filled in), as recorded when it was built."""
        return dict(self.__dict__.get("_init_args", {}))


def _recording_init(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap an aggregator's ``__init__`` so that the outermost class's bound arguments are kept in ``_init_args``."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: MILAggregator, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values: dict[str, Any] = {}
        for name, param in list(signature.parameters.items())[1:]:
            if param.kind is param.VAR_KEYWORD:
                values.update(bound.arguments.get(name, {}))
            elif param.kind is not param.VAR_POSITIONAL:
                values[name] = bound.arguments[name]
        object.__setattr__(self, "_init_args", values)  # the subclass's wrapper runs last and wins

    return wrapper


MILAggregator.__init__ = _recording_init(MILAggregator.__init__)


class MaxPoolMIL(MILAggregator):
    """Max-pooling MIL.

    ``pooling="feature"`` (default, as ICMIL's reference code): the bag feature is the element-wise max of the
    reduced instances, classified by ``head``; the same ``head`` on one instance gives its instance logits.
    ``pooling="instance"``: the instance classifier scores every instance and the bag takes the logits of its most
    positive instance (the one least likely to be class 0). On bags whose positives hold 1-5 % shifted instances
    the instance version memorised noise instances and stayed at chance (AUC ~0.5 after 25 epochs), while the
    feature version learns in a few epochs, hence the default.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        hidden_dim: int = 512,
        num_res_blocks: int = 0,
        dropout: float = 0.0,
        pooling: str = "feature",
    ):
        super().__init__(in_dim, num_classes, hidden_dim, num_res_blocks, dropout)
        if pooling not in ("feature", "instance"):
            raise ValueError(f"pooling must be 'feature' or 'instance', got {pooling!r}")
        self.pooling = pooling

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(self.reduce(self._as_bag(bag)))
        if self.pooling == "feature":
            return {"logits": self.head(h.max(dim=0, keepdim=True).values)}
        inst = self.head(h)
        top = int(torch.argmax(-torch.log_softmax(inst, dim=-1)[:, 0]))  # -log p(class 0): larger = more positive
        return {"logits": inst[top : top + 1], "instance_logits": inst}


class MeanPoolMIL(MILAggregator):
    """Mean of the reduced features, then the classifier (= mean of the instance logits)."""

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(self.reduce(self._as_bag(bag)))
        return {"logits": self.head(h.mean(dim=0, keepdim=True))}


class ABMIL(MILAggregator):
    """Attention-based MIL with gated attention (tanh and sigmoid branches of width ``attention_dim``).

    The bag feature is the attention-weighted mean of the reduced instances; ``head`` (``Linear hidden->C``)
    classifies it, and the same ``head`` on each instance gives the instance logits.
    """

    has_attention = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        hidden_dim: int = 512,
        num_res_blocks: int = 0,
        dropout: float = 0.0,
        attention_dim: int = 128,
    ):
        super().__init__(in_dim, num_classes, hidden_dim, num_res_blocks, dropout)
        self.gated = GatedAttention(hidden_dim, attention_dim)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        return self.gated(h)

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(self.reduce(self._as_bag(bag)))
        a = torch.softmax(self.attention(h), dim=0)
        return {"logits": self.head((a[:, None] * h).sum(dim=0, keepdim=True)), "attention": a}


class DTFDMIL(MILAggregator):
    """Double-tier feature distillation MIL (Zhang et al. 2022).

    Tier 1 splits the bag into ``num_groups`` random pseudo-bags, each classified by a gated-attention classifier
    (``tier1_attention`` + ``tier1_head``) and distilled into one feature: ``"AFS"`` (the attention-weighted
    feature), ``"MaxS"`` (the instance with the highest tier-1 instance probability of the positive class) or
    ``"MaxMinS"`` (the highest and the lowest). Tier 2 (``attention`` + ``head``) classifies the distilled
    features into the slide logits. Instance logits are tier 2's ``head`` on each reduced instance.

    In eval mode the pseudo-bags come from a fixed permutation, so predictions are deterministic.
    """

    has_attention = True
    confidence_beta = 2.0

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        hidden_dim: int = 512,
        num_res_blocks: int = 0,
        dropout: float = 0.0,
        attention_dim: int = 128,
        num_groups: int = 5,
        distill: str = "AFS",
    ):
        super().__init__(in_dim, num_classes, hidden_dim, num_res_blocks, dropout)
        if distill not in ("AFS", "MaxS", "MaxMinS"):
            raise ValueError(f"distill must be 'AFS', 'MaxS' or 'MaxMinS', got {distill!r}")
        self.num_groups, self.distill = int(num_groups), distill
        self.tier1_attention = GatedAttention(hidden_dim, attention_dim)
        self.tier1_head = nn.Linear(hidden_dim, num_classes)
        self.gated = GatedAttention(hidden_dim, attention_dim)  # tier 2

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        return self.gated(h)

    #: the confidence-based variant's teacher: tier-2 and tier-1 instance classifiers mixed (ICMIL's reference)
    teacher_mix = (0.7, 0.3)

    def instance_head(self, h: torch.Tensor, confidence: bool = False) -> torch.Tensor:
        """Tier 2's classifier on ``h``; in the confidence-based variant ``0.7 * tier 2 + 0.3 * tier 1``."""
        if not confidence:
            return self.head(h)
        w2, w1 = self.teacher_mix
        return w2 * self.head(h) + w1 * self.tier1_head(h)

    def confidence_scores(self, h: torch.Tensor) -> torch.Tensor:
        """The product of the min-max normalised tier-1 and tier-2 attention scores (ICMIL's reference)."""
        return min_max_normalize(self.tier1_attention(h)) * min_max_normalize(self.attention(h))

    def _groups(self, n: int, device: torch.device) -> list[torch.Tensor]:
        if self.training:
            perm = torch.randperm(n, device=device)
        else:
            g = torch.Generator().manual_seed(n)
            perm = torch.randperm(n, generator=g).to(device)
        return [idx for idx in torch.tensor_split(perm, min(self.num_groups, n)) if len(idx)]

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(self.reduce(self._as_bag(bag)))
        tier1_logits, distilled = [], []
        for idx in self._groups(len(h), h.device):
            hg = h[idx]
            a = torch.softmax(self.tier1_attention(hg), dim=0)
            pooled = (a[:, None] * hg).sum(dim=0)
            tier1_logits.append(self.tier1_head(pooled))
            if self.distill == "AFS":
                distilled.append(pooled[None])
            else:
                # instance probabilities of the tier-1 classifier on attention-weighted instances (as DTFD does)
                prob = torch.softmax(self.tier1_head(a[:, None] * hg), dim=-1)[:, -1]
                order = torch.argsort(prob, descending=True)
                pick = order[:1] if self.distill == "MaxS" else torch.cat([order[:1], order[-1:]])
                distilled.append(hg[pick])
        d = torch.cat(distilled)
        a2 = torch.softmax(self.attention(d), dim=0)
        logits = self.head((a2[:, None] * d).sum(dim=0, keepdim=True))
        return {"logits": logits, "tier1_logits": torch.stack(tier1_logits)}


class TransformerMIL(MILAggregator):
    """MONAI ``MILModel``'s ``att_trans`` head on reduced features: transformer encoder + attention pooling.

    ``head`` is ``MILModel.myfc``; instance logits apply it to each reduced instance (without the transformer
    context, which needs the whole bag).
    """

    has_attention = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        hidden_dim: int = 512,
        num_res_blocks: int = 0,
        dropout: float = 0.0,
        trans_blocks: int = 2,
        trans_dropout: float = 0.0,
    ):
        super().__init__(in_dim, num_classes, hidden_dim, num_res_blocks, dropout)
        from monai.networks.nets import MILModel

        with warnings.catch_warnings():  # torch's nested-tensor hint about MONAI's sequence-first layers
            warnings.simplefilter("ignore", UserWarning)
            self.mil = MILModel(
                num_classes,
                mil_mode="att_trans",
                pretrained=False,
                backbone=nn.Identity(),
                backbone_num_features=hidden_dim,
                trans_blocks=trans_blocks,
                trans_dropout=trans_dropout,
            )
        self.head = self.mil.myfc

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        return self.mil.attention(h).squeeze(-1)

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(self.reduce(self._as_bag(bag)))
        x = self.mil.transformer(h[:, None, :])[:, 0, :]  # sequence-first: [N, 1, hidden]
        a = torch.softmax(self.attention(x), dim=0)
        return {"logits": self.head((a[:, None] * x).sum(dim=0, keepdim=True)), "attention": a}


AGGREGATORS: dict[str, type[MILAggregator]] = {}
"""The aggregator registry: name -> class (:func:`register_aggregator` adds to it)."""
_ALIASES: dict[str, str] = {}


def register_aggregator(name: str, *aliases: str) -> Callable[[type[MILAggregator]], type[MILAggregator]]:
    """Register an aggregator class under ``name`` (and ``aliases``), as timm's ``register_model`` does for models.

    Example::

        @register_aggregator("meanmax")
        class MeanMaxMIL(MILAggregator):
            ...

        create_aggregator("meanmax", in_dim=1024)

    Raises:
        ValueError: ``name`` is taken by another class, or the class is not a :class:`MILAggregator`.
    """

    def decorator(cls: type[MILAggregator]) -> type[MILAggregator]:
        if not (isinstance(cls, type) and issubclass(cls, MILAggregator)):
            raise ValueError(f"register_aggregator('{name}'): {cls!r} is not a MILAggregator subclass")
        key = name.lower()
        if AGGREGATORS.get(key, cls) is not cls:
            raise ValueError(f"aggregator name '{name}' is already registered to {AGGREGATORS[key].__qualname__}")
        AGGREGATORS[key] = cls
        _ALIASES.update({a.lower(): key for a in aliases})
        return cls

    return decorator


for _name, _cls, _aliases in (
    ("maxpool", MaxPoolMIL, ("max", "maxpool_mil")),
    ("abmil", ABMIL, ("ab-mil", "ab_mil", "attention")),
    ("dtfd", DTFDMIL, ("dtfd-mil", "dtfd_mil")),
    ("mean", MeanPoolMIL, ("meanpool",)),
    ("transformer", TransformerMIL, ("att_trans",)),
):
    register_aggregator(_name, *_aliases)(_cls)


def aggregator_class(name: str) -> type[MILAggregator]:
    """The class of a registered name (or alias), or of an import path ``"package.module.Class"``.

    Raises:
        ValueError: neither a registered name nor an importable :class:`MILAggregator` (the message lists the names).
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key in AGGREGATORS:
        return AGGREGATORS[key]
    module, _, attr = name.rpartition(".")
    cls = None
    if module:
        try:
            cls = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, MILAggregator)):
        raise ValueError(
            f"unknown aggregator '{name}'; choose one of {sorted(AGGREGATORS)}, or give the import path of a "
            "MILAggregator subclass (package.module.Class)."
        )
    return cls


def aggregator_name(cls_or_net: type[MILAggregator] | MILAggregator | Callable[..., MILAggregator]) -> str:
    """The registered name of an aggregator class (or instance, or ``functools.partial`` of a class), else its import
    path: what a checkpoint records and :func:`aggregator_class` resolves."""
    cls = cls_or_net
    while isinstance(cls, functools.partial):
        cls = cls.func
    if isinstance(cls, MILAggregator):
        cls = type(cls)
    for name, registered in AGGREGATORS.items():
        if registered is cls:
            return name
    return f"{cls.__module__}.{cls.__qualname__}"


def aggregator_factory(aggregator: str | Callable[..., MILAggregator]) -> Callable[..., MILAggregator]:
    """A factory of bag classifiers (called with ``in_dim``, ``num_classes`` and more arguments): a registered name
    or import path becomes its class; a class or a partial of one (the bundle's ``aggregator``) is returned as is.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    return aggregator_class(aggregator) if isinstance(aggregator, str) else aggregator


def create_aggregator(name: str, in_dim: int, num_classes: int = 2, **kwargs: Any) -> MILAggregator:
    """Build an aggregator by registered name (``"maxpool"``, ``"abmil"``, ``"dtfd"``, ``"mean"``, ``"transformer"``,
    or one added with :func:`register_aggregator`) or by import path.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    return aggregator_class(name)(in_dim, num_classes, **kwargs)
