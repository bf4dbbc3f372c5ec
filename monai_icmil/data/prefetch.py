# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Read ahead in a background thread of this process.

cuCIM decodes a batched ``read_region`` in its own threads without holding the GIL, so one reader thread in the
training process keeps a GPU fed without DataLoader worker processes, and without their cost per batch: a copy into
shared memory in the worker, page faults mapping it in the main process, and a second copy by the pinning thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["Prefetcher"]

_DONE = object()


class Prefetcher:
    """Iterate ``src`` in a background thread, ``depth`` items ahead; items come out in order in the caller's thread.

    Unlike MONAI's ``ThreadBuffer``, an exception raised by ``src`` is raised again in the caller (with the reader's
    traceback chained) instead of ending the iteration early, and tensors can be pinned in the reader thread.

    Args:
        src: the iterable (e.g. :class:`~monai_icmil.engines.embedding.PatchBatches`).
        depth: how many items to read ahead.
        pin_memory: pin the tensors of each item (a tensor, or a dict of them) for fast, asynchronous host-to-GPU
            copies.
    """

    def __init__(self, src: Iterable[Any], depth: int = 4, pin_memory: bool = False):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.src, self.depth, self.pin_memory = src, int(depth), bool(pin_memory)

    def _pin(self, item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return item.pin_memory()
        if isinstance(item, dict):
            return {k: self._pin(v) for k, v in item.items()}
        return item

    def __iter__(self) -> Iterator[Any]:
        q: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def run() -> None:
            try:
                for item in self.src:
                    if not put(self._pin(item) if self.pin_memory else item):
                        return
                put(_DONE)
            except BaseException as e:  # handed to the consumer
                put(e)

        thread = threading.Thread(target=run, name="monai_icmil-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the background reader failed: {type(item).__name__}: {item}") from item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)
