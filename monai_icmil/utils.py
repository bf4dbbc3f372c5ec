# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Small shared helpers: atomic writes, quiet optional imports, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "stable_hash",
    "quiet_native_output",
]

PathLike = str | os.PathLike


def _umask() -> int:
    """The process's umask: from ``/proc/self/status`` on Linux, elsewhere by setting and restoring it (``os.umask``
    can only read it by changing it, which is not thread-safe)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """The permissions a plain ``open(path, "w")`` would leave: the replaced file's, else ``0o666`` less the umask
    (temporary files are created ``0o600``, which would hide every output from the rest of a lab's group)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``.

    The temporary file lives in the same directory so that ``os.replace`` is atomic. If the body
    raises (disk full, interrupted write), the temporary file is removed and ``path`` is untouched. The file ends
    with the permissions a plain write would give it (:func:`_final_mode`), not the temporary file's ``0o600``.

    Args:
        path: final destination.
        suffix: suffix of the temporary file (defaults to the destination's own suffix, so that
            libraries which pick a format from the extension still work).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=(path.suffix if suffix is None else suffix) + ".tmp", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _final_mode(path))
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (temp file + rename)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    """Serialise ``obj`` as JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path) or type(o).__module__ == "torch":  # paths, torch.device, torch.dtype
        return str(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serialisable")


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short, order-independent SHA-256 hex digest of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


@contextlib.contextmanager
def quiet_native_output(enabled: bool = True) -> Iterator[None]:
    """Silence native libraries that print to file descriptors 1 and 2 (e.g. cuCIM/nvImageCodec on CPU machines).

    Python-level exceptions are unaffected; only raw writes to fd 1/2 inside the block are dropped.
    """
    if not enabled:
        yield
        return
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no real stdout/stderr (some notebook kernels)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
