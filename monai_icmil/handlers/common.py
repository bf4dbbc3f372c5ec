# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Small handlers every phase engine uses: configured handlers, the epoch's mean loss, a progress bar, MLflow params."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from ignite.engine import Engine, Events

__all__ = ["attach_handlers", "EpochLoss", "attach_progress_bar", "PeriodicProgress", "describe_components"]


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
    """ignite's progress bar over an engine's iterations, showing ``output[key]``, on a terminal; in a log file
    (stderr not a terminal, :func:`~monai_icmil.utils.progress_options`) a :class:`PeriodicProgress` line every 30 s
    instead (ignite's bar redraws at every step whatever tqdm's interval). Returns the handler attached."""
    from ignite.contrib.handlers import ProgressBar

    from monai_icmil.utils import progress_options

    options = progress_options()
    if options:
        periodic = PeriodicProgress(desc, key, options["mininterval"])
        periodic.attach(engine)
        return periodic
    bar = ProgressBar(desc=desc, persist=False)
    bar.attach(engine, output_transform=lambda o: {key: o[key]})
    return bar


class PeriodicProgress:
    """One log line every ``interval`` seconds while an engine runs: ``<desc>: iteration i of n (epoch e of E),
    <key> v, r it/s`` (logger ``monai_icmil.<desc>``), for log files where a progress bar is noise.

    Args:
        desc: what runs (the line's start and the logger's name).
        key: the output's value to show.
        interval: seconds between lines.
    """

    def __init__(self, desc: str, key: str = "loss", interval: float = 30.0):
        self.desc, self.key, self.interval = desc, key, float(interval)
        self.logger = logging.getLogger(f"monai_icmil.{desc}")
        self.start = self.last = 0.0
        self.first = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)

    def _started(self, engine: Engine) -> None:
        self.start = self.last = time.monotonic()
        self.first = engine.state.iteration

    def _step(self, engine: Engine) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last, s = now, engine.state
        total = s.epoch_length * s.max_epochs if s.epoch_length and s.max_epochs else None
        output = s.output.get(self.key) if isinstance(s.output, Mapping) else None
        value = f", {self.key} {float(output):.4g}" if isinstance(output, (int, float, np.floating)) else ""
        rate = (s.iteration - self.first) / max(now - self.start, 1e-9)
        self.logger.info(
            "%s: iteration %d%s (epoch %d of %s)%s, %.1f it/s",
            self.desc, s.iteration, f" of {total}" if total else "", s.epoch, s.max_epochs, value, rate,
        )  # fmt: skip


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
