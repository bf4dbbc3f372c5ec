# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Read ahead in background threads of this process.

cuCIM decodes without holding the GIL, and numpy copies release it too, so a few reader threads in the training
process keep a GPU fed without DataLoader worker processes, and without their cost per batch: a copy into shared
memory in the worker, page faults mapping it in the main process, and a second copy by the pinning thread. A reader
thread can also write a batch straight into pinned memory (``SlideReader.read_patches(out=...)``), so nothing but the
decode and one cut touches the pixels on the host.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["Prefetcher"]


class Prefetcher:
    """``fn(item)`` for each of ``items``, computed in ``threads`` background threads, at most ``depth`` items ahead;
    the results come out in the order of ``items``, in the caller's thread.

    ``items`` itself is iterated lazily in the caller's thread, so it should be cheap (e.g. which batch to read);
    ``fn`` does the work (e.g. reads that batch). Unlike MONAI's ``ThreadBuffer``, an exception raised by ``fn`` is
    raised again in the caller, at that item's place and with the reader's traceback chained, instead of ending the
    iteration early; the items after it are not started. Stopping the iteration early (``break``, ``close()``) cancels
    what has not started and waits for what has.

    Args:
        fn: the work for one item.
        items: the items, in order.
        threads: reader threads.
        depth: results in flight or waiting (default ``2 * threads``); bounds the memory they hold.
    """

    def __init__(self, fn: Callable[[Any], Any], items: Iterable[Any], threads: int = 1, depth: int | None = None):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        depth = 2 * threads if depth is None else depth
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.fn, self.items, self.threads, self.depth = fn, items, int(threads), int(depth)

    @staticmethod
    def _result(future: Future) -> Any:
        try:
            return future.result()
        except Exception as e:
            raise RuntimeError(f"the background reader failed: {type(e).__name__}: {e}") from e

    def __iter__(self) -> Iterator[Any]:
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="monai_icmil-read")
        pending: collections.deque[Future] = collections.deque()
        try:
            for item in self.items:
                pending.append(pool.submit(self.fn, item))
                if len(pending) >= self.depth:
                    yield self._result(pending.popleft())
            while pending:
                yield self._result(pending.popleft())
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
