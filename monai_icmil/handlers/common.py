# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Small handlers every phase engine uses: configured handlers, the epoch's mean loss, a progress bar, MLflow params."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from ignite.engine import Engine, Events

__all__ = ["attach_handlers", "EpochLoss", "attach_progress_bar", "describe_components"]


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


def attach_progress_bar(engine: Engine, desc: str, key: str = "loss") -> Any:
    """ignite's progress bar over an engine's iterations, showing ``output[key]`` (returned; its updates spaced as
    :func:`~monai_icmil.utils.progress_options` says)."""
    from ignite.contrib.handlers import ProgressBar

    from monai_icmil.utils import progress_options

    bar = ProgressBar(desc=desc, persist=False, **progress_options())
    bar.attach(engine, output_transform=lambda o: {key: o[key]})
    return bar


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
