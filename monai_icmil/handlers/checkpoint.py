# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Resume checkpoints: an interrupted phase continues where it stopped and ends exactly as an uninterrupted one.

:class:`ResumeCheckpoint` wraps ignite's :class:`~ignite.handlers.Checkpoint` (atomic
:class:`~ignite.handlers.DiskSaver` writes, the two newest kept, so a kill while one is written leaves the previous one)
around everything a phase's future depends on: the trainer's epoch/iteration, network, optimiser, scheduler,
early-stopping counters, the phase's own bookkeeping (history, best score) and the random number generators
(:class:`RNGState`). Files are loaded with ``weights_only=True``; a checkpoint written with other settings (its
``signature`` differs) is ignored with a warning.

Data order must not depend on the global generators for this to be exact: the phases use samplers seeded by
``(seed, epoch)`` and give their ``DataLoader`` its own generator.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine

__all__ = ["RNGState", "PhaseProgress", "ResumeCheckpoint"]

logger = logging.getLogger("monai_icmil.checkpoint")
_NAME = re.compile(r"^resume_checkpoint_(\d+)\.pt$")


class RNGState:
    """The Python, NumPy, torch (and CUDA) generators as a ``state_dict`` that loads with ``weights_only=True``."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached": float(cached),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        random.setstate(_as_tuple(state["python"]))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():  # as many devices as both machines have
            for device, cuda_state in enumerate(list(state["cuda"])[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, device)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class PhaseProgress:
    """A phase's own bookkeeping (``history`` rows and a ``best`` record, plus free ``extra`` values) as a
    ``state_dict``; the lists and dicts are updated in place so closures that hold them stay valid."""

    def __init__(self, best: dict[str, Any] | None = None):
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = dict(best or {})
        self.extra: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "best": dict(self.best), "extra": dict(self.extra)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history[:] = list(state["history"])
        self.best.clear()
        self.best.update(state["best"])
        self.extra.clear()
        self.extra.update(state["extra"])


class _Meta:
    """The phase's signature (checked before loading) and whether its engine had finished when saved."""

    def __init__(self, signature: str):
        self.signature, self.finished = signature, False

    def state_dict(self) -> dict[str, Any]:
        return {"signature": self.signature, "finished": self.finished}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.finished = bool(state.get("finished", False))


class ResumeCheckpoint:
    """Save a phase's whole state now and then; on the next run, load the newest one.

    Args:
        directory: where the checkpoints go (a folder of their own: stray temporaries in it are removed).
        objects: the stateful objects (``state_dict``/``load_state_dict``): trainer, network, optimiser, ...
        signature: what the phase was started with (e.g. a hash of its settings and data); a checkpoint with another
            signature is not resumed.

    Example::

        ckpt = ResumeCheckpoint(out / "resume", {"trainer": trainer, "network": net, "optimizer": opt}, signature)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, ckpt)
        ckpt.run(trainer)  # resume (random generators included) and train what is left
        ckpt.clear()
    """

    def __init__(self, directory: str | os.PathLike, objects: Mapping[str, Any], signature: str):
        from ignite.handlers import Checkpoint, DiskSaver

        self.directory = Path(directory)
        self.signature = str(signature)
        self._meta = _Meta(self.signature)
        self.objects = {**dict(objects), "rng": RNGState(), "signature": self._meta}
        self._checkpoint = Checkpoint(
            self.objects,
            DiskSaver(str(self.directory), require_empty=False, create_dir=True, atomic=True),
            filename_prefix="resume",
            n_saved=2,
            global_step_transform=lambda engine, _: engine.state.iteration,
        )

    def __call__(self, engine: Engine) -> None:
        """Save now (attach to an event, or call from a handler, after the handlers that may terminate the engine)."""
        s = engine.state
        self._meta.finished = bool(engine.should_terminate) or (
            s.max_epochs is not None and s.epoch_length is not None and s.iteration >= s.max_epochs * s.epoch_length
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self._checkpoint(engine)

    def files(self) -> list[Path]:
        """Checkpoints on disk, newest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def _newest(self, warn: bool = False) -> tuple[Path, dict[str, Any]] | None:
        """The newest readable checkpoint and its state (``warn``: about each unreadable one skipped)."""
        for path in self.files():
            try:
                return path, torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - a damaged file: try the previous one
                if warn:
                    warnings.warn(f"skipping unreadable checkpoint '{path}' ({type(e).__name__}: {e})", stacklevel=3)
        return None

    def pending(self) -> bool:
        """Whether :meth:`resume` would load a checkpoint: the newest readable one carries this signature (loads
        nothing into the objects)."""
        newest = self._newest()
        return newest is not None and newest[1].get("signature", {}).get("signature") == self.signature

    def resume(self) -> int | None:
        """Load the newest readable checkpoint with this signature; returns its iteration (``None``: fresh start).

        Call it after everything is built and right before the engine runs: the random generators are restored too.
        """
        if self.directory.is_dir():
            for p in self.directory.iterdir():
                if p.name.startswith("tmp"):  # a save that was interrupted
                    p.unlink(missing_ok=True)
        if (newest := self._newest(warn=True)) is None:
            return None
        path, state = newest
        if state.get("signature", {}).get("signature") != self.signature:
            warnings.warn(
                f"'{path}' was written with other settings or data; starting this phase afresh.", stacklevel=2
            )
            self.clear()
            return None
        from ignite.handlers import Checkpoint

        Checkpoint.load_objects(self.objects, state)
        iteration = int(_NAME.match(path.name).group(1))
        for older in self.files():
            if older != path:
                older.unlink(missing_ok=True)
        self._checkpoint.load_state_dict({"_saved": [(iteration, path.name)]})
        logger.info("resuming from %s (iteration %d)", path, iteration)
        return iteration

    def run(self, engine: Engine) -> None:
        """:meth:`resume`, then run ``engine`` unless the checkpoint was taken after it had finished (ignite would
        start a finished engine over from the beginning)."""
        self.resume()
        if not self._meta.finished:
            engine.run()

    def clear(self) -> None:
        """Remove every checkpoint (the phase finished; its results are elsewhere)."""
        shutil.rmtree(self.directory, ignore_errors=True)
