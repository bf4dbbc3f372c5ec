# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Small handlers every phase engine uses: configured handlers, the epoch's mean loss, a progress bar, MLflow params."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from ignite.engine import Engine, Events
from monai.handlers import EarlyStopHandler

__all__ = ["attach_handlers", "EpochLoss", "WarmEarlyStopHandler", "attach_progress_bar", "describe_components"]


def attach_handlers(engine: Engine, handlers: Iterable[Any] | None) -> list[Any]:
    """Attach the handlers a bundle declares for a phase (``<phase>#handlers``) to ``engine``.

    Each entry is a handler object with ``attach(engine)`` (e.g. MONAI's ``TensorBoardStatsHandler``), or a class or
    ``functools.partial`` of one (``_mode_: "callable"`` in the config) that is called first, so that every engine
    (round, restart) gets a fresh handler. Returns the attached handlers.

    Raises:
        TypeError: an entry that is neither (names it).
    """
    attached = []
    for handler in handlers or ():
        if not hasattr(handler, "attach") and (isinstance(handler, (type, functools.partial))):
            handler = handler()
        if not hasattr(handler, "attach"):
            raise TypeError(
                f"handler {handler!r} has no attach(engine): give a handler object or a class/partial building one."
            )
        handler.attach(engine)
        attached.append(handler)
    return attached


class EpochLoss:
    """The mean of ``output[key]`` over each epoch's iterations, as ``engine.state.metrics[name]`` at epoch end.

    Attach it before the handlers that read the value (validation, history, statistics).
    """

    def __init__(self, key: str = "loss", name: str = "train_loss"):
        self.key, self.name = key, name
        self.values: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.values.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.compute)

    def collect(self, engine: Engine) -> None:
        self.values.append(engine.state.output[self.key])

    def compute(self, engine: Engine) -> None:
        engine.state.metrics[self.name] = float(np.nanmean(self.values or [np.nan]))


class WarmEarlyStopHandler(EarlyStopHandler):
    """MONAI's :class:`~monai.handlers.EarlyStopHandler` that only starts counting after ``min_epochs`` epochs of
    ``trainer``: the patience runs from the first validation after them, against the best score seen from then on.

    An attention-based bag classifier on slides with a low witness rate (a few % of the tissue is tumour) can sit on a
    loss plateau for tens of epochs before it finds the tumour patches, then learn within a few epochs. A patience
    counted from epoch 1 stops it on the plateau, at a validation peak that is noise (``benchmarks/RESULTS.md``).

    Args:
        patience, score_function, min_delta, cumulative_delta, epoch_level: see ``EarlyStopHandler``.
        trainer: the engine to stop, whose epoch counts.
        min_epochs: epochs of ``trainer`` before the first validation that counts (0: MONAI's handler).

    Example::

        WarmEarlyStopHandler(10, lambda ev: ev.state.metrics["val_auc"], trainer, min_epochs=30).attach(evaluator)
    """

    def __init__(self, patience: int, score_function: Any, trainer: Engine, min_epochs: int = 0, **kwargs: Any):
        if int(min_epochs) < 0:
            raise ValueError(f"early stopping: min_epochs must be >= 0, got {min_epochs}")
        super().__init__(patience, score_function, trainer=trainer, **kwargs)
        self.trainer, self.min_epochs = trainer, int(min_epochs)

    def __call__(self, engine: Engine) -> None:
        if self.trainer.state.epoch > self.min_epochs:
            super().__call__(engine)


def attach_progress_bar(engine: Engine, desc: str, key: str = "loss") -> None:
    """ignite's progress bar over an engine's iterations, showing ``output[key]``."""
    from ignite.contrib.handlers import ProgressBar

    ProgressBar(desc=desc, persist=False).attach(engine, output_transform=lambda o: {key: o[key]})


def describe_components(**components: Any) -> dict[str, Any]:
    """MLflow parameters of configured components: an optimizer's class and defaults (lr, weight decay, ...), a
    scheduler factory's class and keywords, a loss's class; ``None`` entries are left out."""
    out: dict[str, Any] = {}
    for name, c in components.items():
        if c is None:
            continue
        target = c.func if isinstance(c, functools.partial) else c
        out[name] = target.__name__ if isinstance(target, type) else type(target).__name__
        keywords: Mapping[str, Any] = c.keywords if isinstance(c, functools.partial) else {}
        for k, v in keywords.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                out[f"{name}.{k}"] = v
    return out
