# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The run report: which slides failed (and why), had no tissue, or lost patches on damaged JPEG tiles, kept in
``report.json``."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from monai_icmil.utils import atomic_write_json

__all__ = ["RunReport"]


class RunReport:
    """Slides that failed or were empty, per phase; saved atomically after every change.

    The file looks like ``{"failed": {slide_id: {"path", "phase", "reason"}}, "empty": {slide_id: {...}},
    "damaged": {slide_id: {"path", "patches", "of", "positions"}}}``: a slide in ``damaged`` is still used, without
    the listed patches. Inference adds ``"outputs_failed": {slide_id: {"path", writer name: reason}}`` when a writer
    fails on a slide (its probabilities and other outputs are kept). A slide that later succeeds in the same phase
    is removed from ``failed``.

    Args:
        path: the JSON file (``None`` keeps the report in memory only).
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        self.failed: dict[str, dict[str, Any]] = {}
        self.empty: dict[str, dict[str, Any]] = {}
        self.damaged: dict[str, dict[str, Any]] = {}
        self.outputs_failed: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            data = json.loads(self.path.read_text())
            self.failed, self.empty = data.get("failed", {}), data.get("empty", {})
            self.damaged, self.outputs_failed = data.get("damaged", {}), data.get("outputs_failed", {})

    def fail(self, slide_id: str, path: str, phase: str, reason: str) -> None:
        with self._lock:
            self.failed[slide_id] = {"path": str(path), "phase": phase, "reason": reason}
            self._save()

    def mark_empty(self, slide_id: str, path: str, phase: str, reason: str = "no tissue patches") -> None:
        """``slide_id`` has no patches; the tiling's entry (with the tissue detector's reason) is kept."""
        with self._lock:
            if slide_id in self.empty and self.empty[slide_id].get("phase") == "prepare" != phase:
                return
            self.empty[slide_id] = {"path": str(path), "phase": phase, "reason": reason}
            self._save()

    def mark_damaged(self, slide_id: str, path: str, positions: Any, total: int) -> None:
        """Patches of a slide dropped for lying on damaged JPEG tiles (level-0 ``positions``, of ``total``)."""
        with self._lock:
            self.damaged[slide_id] = {
                "path": str(path),
                "patches": len(positions),
                "of": int(total),
                "positions": [[int(x), int(y)] for x, y in positions],
            }
            self._save()

    def mark_output_failed(self, slide_id: str, path: str, output: str, reason: str) -> None:
        """An output of a predicted slide (a heatmap, GeoJSON...) could not be written; the prediction stands."""
        with self._lock:
            self.outputs_failed.setdefault(slide_id, {"path": str(path)})[output] = reason
            self._save()

    def succeed(self, slide_id: str, phase: str | None = None) -> None:
        """``slide_id`` went through ``phase``: its failure, or its being empty, in that phase is forgotten (``None``:
        in any phase). A failure in another phase stands: a slide that failed embedding stays out of the bag phase
        when a later run tiles it again, since that run's embedding is already recorded and will not retry it."""
        with self._lock:
            changed = False
            for entries in (self.failed, self.empty):  # (a slide tiled again with other settings may have tissue)
                if slide_id in entries and phase in (None, entries[slide_id].get("phase")):
                    entries.pop(slide_id)
                    changed = True
            if changed:
                self._save()

    def reload(self) -> None:
        """Read the file again (another process wrote it: torchrun's rank 0 after merging the ranks' reports)."""
        fresh = RunReport(self.path)
        with self._lock:
            self.failed, self.empty, self.damaged = fresh.failed, fresh.empty, fresh.damaged
            self.outputs_failed = fresh.outputs_failed

    def merge(self, other: str | os.PathLike) -> list[str]:
        """Add the entries of another report file that this one lacks (under torchrun, another rank's report of its
        share of one embedding) and save; returns the slide ids newly ``failed``."""
        if not Path(other).is_file():  # nothing recorded there
            return []
        data = json.loads(Path(other).read_text())
        with self._lock:
            added = [sid for sid in data.get("failed", {}) if sid not in self.failed]
            for name in ("failed", "empty", "damaged", "outputs_failed"):
                mine = getattr(self, name)
                for sid, entry in data.get(name, {}).items():
                    mine.setdefault(sid, entry)
            self._save()
        return added

    def excluded(self) -> set[str]:
        """Slide ids to leave out of training and metrics."""
        return set(self.failed) | set(self.empty)

    def as_dict(self) -> dict[str, Any]:
        record = {"failed": self.failed, "empty": self.empty, "damaged": self.damaged}
        return {**record, "outputs_failed": self.outputs_failed} if self.outputs_failed else record

    def save(self) -> None:
        """Write the report (also when nothing failed: a run's ``report.json`` then says so)."""
        with self._lock:
            self._save()

    def _save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, self.as_dict())
