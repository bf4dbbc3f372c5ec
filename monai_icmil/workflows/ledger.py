# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The phase ledger: ``output_dir/state.json`` records each finished phase of each round, so that rerunning the same
command after an interruption continues at the first unfinished phase of the first unfinished round."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai_icmil.utils import atomic_write_json

__all__ = ["PhaseLedger"]


class PhaseLedger:
    """``{"rounds": {"<r>": {"<phase>": record}}, "<phase before the rounds>": record}`` in a JSON file, written
    atomically after every change.

    Args:
        path: the ledger file (``output_dir/state.json``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def state(self) -> dict[str, Any]:
        """The whole ledger (an empty one when the file does not exist yet).

        Raises:
            RuntimeError: the ledger was written by monai-icmil 0.1 (its stores are keyed otherwise, so nothing in
                that folder can be continued): the message says to use a new ``output_dir``.
        """
        if not self.path.is_file():
            return {"rounds": {}}
        try:
            state = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(
                f"'{self.path}' (the run's record of finished phases) is not valid JSON ({e}): fix the edit, or use a "
                "new output_dir (or delete the file to redo every phase: the stores keep the features)."
            ) from e
        if any("bag" in phases for phases in state.get("rounds", {}).values()):
            raise RuntimeError(
                f"'{self.path}' was written by monai-icmil 0.1, whose coordinate and feature stores are keyed "
                "differently: this run cannot continue it. Use a new output_dir (or remove this one)."
            )
        return state

    def get(self, r: int | None, phase: str) -> dict[str, Any] | None:
        """The record of ``phase`` in round ``r`` (``None``: a phase before the rounds, e.g. pre-training)."""
        state = self.state()
        if r is None:
            return state.get(phase)
        return state["rounds"].get(str(r), {}).get(phase)

    def mark(self, r: int | None, phase: str, record: Mapping[str, Any]) -> None:
        """Record a finished phase."""
        state = self.state()
        if r is None:
            state[phase] = dict(record)
        else:
            state["rounds"].setdefault(str(r), {})[phase] = dict(record)
        atomic_write_json(self.path, state)

    def forget(self, r: int, phase: str) -> None:
        """Drop a record, so the phase runs again (e.g. a new evaluation of the test split)."""
        state = self.state()
        state["rounds"].get(str(r), {}).pop(phase, None)
        atomic_write_json(self.path, state)

    def rounds(self) -> dict[int, dict[str, Any]]:
        """Every round's records, by round number."""
        return {int(r): s for r, s in self.state()["rounds"].items()}
