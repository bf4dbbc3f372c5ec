# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Early stopping that lets a warm-up pass before its patience counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ignite.engine import Engine
from monai.handlers import EarlyStopHandler

__all__ = ["WarmEarlyStopHandler"]


class WarmEarlyStopHandler(EarlyStopHandler):
    """MONAI's :class:`~monai.handlers.EarlyStopHandler` that only starts counting after ``min_epochs`` epochs of
    ``trainer``: the patience runs from the first validation after them, against the best score seen from then on.

    An attention-based bag classifier on slides with a low witness rate (tumour in a few % of the tissue) can sit on a
    loss plateau for tens of epochs before it finds the tumour patches, then learn within a few epochs. A patience
    counted from epoch 1 stops it on the plateau, at a validation peak that is noise (``benchmarks/RESULTS.md``,
    "Large slides").

    Args:
        patience: validations without a better score before the trainer is stopped.
        score_function: the score of an engine's state (higher is better).
        trainer: the engine to stop; its epoch counts for ``min_epochs``.
        min_epochs: epochs of ``trainer`` before the first validation that counts (0: MONAI's handler).
        kwargs: ``min_delta``, ``cumulative_delta``, ``epoch_level`` of ``EarlyStopHandler``.

    Example::

        WarmEarlyStopHandler(10, lambda ev: ev.state.metrics["val_auc"], trainer, min_epochs=30).attach(evaluator)
    """

    def __init__(
        self,
        patience: int,
        score_function: Callable[[Engine], float],
        trainer: Engine,
        min_epochs: int = 0,
        **kwargs: Any,
    ) -> None:
        if int(min_epochs) < 0:
            raise ValueError(f"early stopping: min_epochs must be >= 0, got {min_epochs}")
        super().__init__(patience, score_function, trainer=trainer, **kwargs)
        self.min_epochs = int(min_epochs)

    def __call__(self, engine: Engine) -> None:
        if self._handler is not None and self._handler.trainer.state.epoch <= self.min_epochs:
            return  # (without a trainer, MONAI's handler raises its own error)
        super().__call__(engine)
