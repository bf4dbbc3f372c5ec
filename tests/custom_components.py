# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Components a user brings by config alone (tests/test_bundle.py): an aggregator class of their own and a handler."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from monai_icmil.networks import MILAggregator


class MeanMaxMIL(MILAggregator):
    """The bag feature is the mean of the element-wise mean and max of the reduced instances; the same head classifies
    it and, on one instance, labels that instance (so it is an ICMIL instance teacher too)."""

    def forward(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(self.reduce(self._as_bag(bag)))
        pooled = 0.5 * (h.mean(dim=0, keepdim=True) + h.max(dim=0, keepdim=True).values)
        return {"logits": self.head(pooled)}


class IterationCounter:
    """Counts the iterations of every engine it is attached to and, as each one completes, appends a record (its
    iterations, its optimizer's and network's classes, the running total) to a JSON file."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.total = Path(path), 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.count)
        engine.add_event_handler(Events.COMPLETED, self.record)

    def count(self, engine: Engine) -> None:
        self.total += 1

    def record(self, engine: Engine) -> None:
        records = json.loads(self.path.read_text()) if self.path.is_file() else []
        records.append(
            {
                "iterations": engine.state.iteration,
                "optimizer": type(engine.optimizer).__name__,
                "network": type(engine.network).__name__,
                "total": self.total,
            }
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(records))
