# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Damaged JPEG tiles: found once, when a slide is tiled, so that no phase learns from or scores a damaged patch.

cuCIM and libjpeg-based decoders return wrong pixels for a damaged JPEG tile without raising: libjpeg only prints
"Corrupt JPEG data: premature end of data segment" to the process's standard error. OpenSlide raises. So the tiles
under a slide's patch grid are checked when the slide is tiled (:func:`damaged_patches`): each reader decodes them
once, in batches, with native output captured (:func:`native_output`), and a batch that prints a JPEG
warning or raises is split in halves until the damaged tiles are found. The embedding and every later read then run
without any check: the patches on damaged tiles are no longer in the grid.

The policy (``on_tile_error``): ``"drop"`` the patches that overlap a damaged tile (the count and positions go to
``report.json``, ``coords/qc/tiling.csv`` and the QC picture, and a warning names the slide), or ``"fail"`` the slide.
A slide whose damaged share of patches exceeds ``max_damaged_fraction`` (default 5 %) fails whatever the policy.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "JPEG_PROBLEM",
    "native_output",
    "tiles_under",
    "find_damaged",
    "damaged_patches",
    "TileErrorPolicy",
    "DamagedSlideError",
]

#: what libjpeg (and cuCIM around it) prints for a damaged JPEG stream
JPEG_PROBLEM = re.compile(
    r"corrupt jpeg|premature end of|invalid jpeg|bogus (marker|huffman|dqt|dht|sampling)|while decompressing jpeg"
    r"|huffman table|jpeg datastream|not a jpeg|unsupported marker|reading jpeg header|extraneous bytes",
    re.IGNORECASE,
)
_CAPTURE_LOCK = threading.Lock()
#: tiles decoded per check before splitting (a damaged batch is halved until single tiles)
CHUNK_TILES = 256


class DamagedSlideError(RuntimeError):
    """A slide whose damaged tiles leave it unusable under the policy; the message names the share and the fix."""


def _flush_c_stdio() -> None:
    """Flush the C library's stdio buffers (a native library's ``printf`` to a pipe or file waits in them)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def native_output() -> Iterator[list[str]]:
    """Capture what is written to file descriptors 1 and 2 inside the block (native libraries included: cuCIM prints
    libjpeg's warnings to standard output) into the yielded list of lines; lines that are not JPEG decoder messages
    are written to the real standard error afterwards.

    One capture at a time (a lock): the file descriptors are the process's.
    """
    lines: list[str] = []
    with _CAPTURE_LOCK:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        _flush_c_stdio()
        saved = [os.dup(1), os.dup(2)]
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            try:
                yield lines
            finally:
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                _flush_c_stdio()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)
                tmp.seek(0)
                lines.extend(tmp.read().decode("utf-8", "replace").splitlines())
        others = [line for line in lines if line.strip() and not JPEG_PROBLEM.search(line)]
        if others:
            sys.stderr.write("\n".join(others) + "\n")


def tiles_under(
    coords: np.ndarray, read_size: int, level: int, downsample: float, tile_size: tuple[int, int]
) -> dict[tuple[int, int], list[int]]:
    """``{(tile column, tile row): [patch indices]}``: the tiles of ``level`` that each patch (level-0 top-left
    ``coords``, ``read_size`` pixels at ``level``) overlaps."""
    tw, th = tile_size
    out: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(np.asarray(coords, np.int64).reshape(-1, 2)):
        lx, ly = int(x // downsample), int(y // downsample)
        for ty in range(ly // th, (ly + read_size - 1) // th + 1):
            for tx in range(lx // tw, (lx + read_size - 1) // tw + 1):
                out.setdefault((tx, ty), []).append(i)
    return out


def find_damaged(
    tiles: Sequence[tuple[int, int]], probe: Callable[[Sequence[tuple[int, int]]], bool], chunk: int = CHUNK_TILES
) -> set[tuple[int, int]]:
    """The tiles for which ``probe`` (``True``: something in this list is damaged) holds, by halving the failing
    lists: ``len(tiles) / chunk`` probes when nothing is damaged, ``O(k log n)`` more for ``k`` damaged tiles."""
    damaged: set[tuple[int, int]] = set()
    pending = [list(tiles[i : i + chunk]) for i in range(0, len(tiles), chunk)]
    while pending:
        part = pending.pop()
        if not part or not probe(part):
            continue
        if len(part) == 1:
            damaged.add(part[0])
        else:
            pending += [part[: len(part) // 2], part[len(part) // 2 :]]
    return damaged


class TileErrorPolicy:
    """What to do with patches on damaged tiles.

    Args:
        on_tile_error: ``"drop"`` the patches (default) or ``"fail"`` the slide.
        max_damaged_fraction: a slide with a larger share of damaged patches fails whatever ``on_tile_error``.

    Raises:
        ValueError: an unknown ``on_tile_error`` or a fraction outside [0, 1].
    """

    def __init__(self, on_tile_error: str = "drop", max_damaged_fraction: float = 0.05):
        if on_tile_error not in ("drop", "fail"):
            raise ValueError(f"on_tile_error must be 'drop' or 'fail', got {on_tile_error!r}")
        if not 0.0 <= float(max_damaged_fraction) <= 1.0:
            raise ValueError(f"max_damaged_fraction must be within [0, 1], got {max_damaged_fraction}")
        self.on_tile_error, self.max_damaged_fraction = on_tile_error, float(max_damaged_fraction)

    def check(self, slide: str, damaged: int, total: int) -> None:
        """Raise :class:`DamagedSlideError` when ``damaged`` of ``total`` patches make the slide unusable."""
        if not damaged:
            return
        share = damaged / max(total, 1)
        what = f"{damaged} of {total} patches ({share:.1%}) lie on damaged JPEG tiles"
        fix = "Re-scan or re-export the slide, or re-copy it if the copy is damaged."
        if share > self.max_damaged_fraction:
            raise DamagedSlideError(
                f"slide '{slide}': {what}, above max_damaged_fraction {self.max_damaged_fraction:.0%}. {fix}"
            )
        if self.on_tile_error == "fail":
            raise DamagedSlideError(f"slide '{slide}': {what} (on_tile_error 'fail'). {fix}")


#: decoding threads of the damaged-tile check at most (it decodes every tile under the patches once, at tiling)
MAX_CHECK_THREADS = 16


def check_threads() -> int:
    """Decoding threads for the damaged-tile check: the cores this process may use, at most
    :data:`MAX_CHECK_THREADS` (on a 16-core GPU machine, 2 threads made the check cost as much as the embedding)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, min(MAX_CHECK_THREADS, cores))


def damaged_patches(
    reader: Any, coords: np.ndarray, read_size: int, level: int, num_workers: int | None = None
) -> np.ndarray:
    """Indices of the patches that overlap a damaged tile of ``level`` (:meth:`SlideReader.damaged_tiles`), decoded
    with ``num_workers`` threads (default: :func:`check_threads`)."""
    if len(coords) == 0:
        return np.zeros(0, np.int64)
    num_workers = check_threads() if num_workers is None else int(num_workers)
    tile_size = reader.tile_size(level)
    by_tile = tiles_under(coords, read_size, level, reader.level_downsamples[level], tile_size)
    bad = reader.damaged_tiles(level, sorted(by_tile), num_workers=num_workers)
    return np.array(sorted({i for t in bad for i in by_tile[t]}), np.int64)
