# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Small shared helpers: atomic writes, quiet optional imports, hashing, component signatures, distributed rank."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "stable_hash",
    "component_signature",
    "quiet_native_output",
    "dist_info",
    "barrier",
    "default_device",
    "as_bool",
    "progress_bar",
    "progress_options",
]

#: seconds between progress-bar updates when stderr is not a terminal (a batch job's log file)
LOG_PROGRESS_INTERVAL = 30.0

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
#: the words :func:`as_bool` reads (in any case)
BOOL_WORDS = _TRUE + _FALSE


def progress_options(stream: Any = None) -> dict[str, Any]:
    """tqdm settings for ``stream`` (default: ``sys.stderr``): a terminal redraws its bars in place; a log file (a
    batch job's, a captured run) gets an update every :data:`LOG_PROGRESS_INTERVAL` seconds instead of at every step
    (a two-minute demo wrote 1.7 MB of bars); ``TQDM_MININTERVAL`` in the environment, tqdm's own setting, sets
    that interval."""
    import sys

    stream = sys.stderr if stream is None else stream
    try:
        terminal = bool(stream.isatty())
    except (AttributeError, ValueError):
        terminal = False
    if terminal:
        return {}
    try:  # tqdm's own setting gives the interval
        interval = float(os.environ.get("TQDM_MININTERVAL", LOG_PROGRESS_INTERVAL))
    except ValueError:
        interval = LOG_PROGRESS_INTERVAL
    return {"mininterval": interval}


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(iterable, **kwargs)`` with :func:`progress_options` (given ``kwargs`` win)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, **{**progress_options(), **kwargs})


def as_bool(value: Any, name: str = "value", none: Any = ...) -> Any:
    """A boolean setting as given on a command line or in a config: ``True``/``False``, 1/0, or the strings
    true/false, yes/no, on/off, 1/0 in any case (``python -m monai.bundle run ... --heatmaps false`` passes the string);
    ``None`` returns ``none`` where one is given (a setting whose ``None`` means "the device's default").

    Raises:
        ValueError: anything else, naming the setting and the accepted values.
    """
    if value is None and none is not ...:
        return none
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(
        f"'{name}' must be a boolean (true or false, in any case; also 1/0, yes/no, on/off), got {value!r}"
    )


def as_positive(value: Any, name: str = "value", optional: bool = False) -> float | None:
    """A positive number setting (a string such as ``"0.5"`` is parsed); ``None`` passes when ``optional``.

    Raises:
        ValueError: anything else, naming the setting.
    """
    if value is None and optional:
        return None
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise ValueError(f"'{name}' must be a positive number{' or null' if optional else ''}, got {value!r}")
    return number


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


def sweep_temporaries(folder: PathLike, max_age_s: float = 3600.0) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` in ``folder`` that a killed process left (``kill -9``,
    power loss) and that are older than ``max_age_s`` (a younger one may be another process's write in progress).
    Returns the removed paths."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):  # gone already, or not ours to remove
            if now - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
                removed.append(tmp)
    return removed


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


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) as ``None``, for files other tools parse as strict JSON
    (``summary.json``; Python writes NaN as a bare ``NaN``, which JSON does not have)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path) or type(o).__module__ == "torch":  # paths, torch.device, torch.dtype
        return str(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serialisable")


def update_state_digest(digest: Any, state: Mapping[str, Any]) -> Any:
    """Feed a state dict into ``digest`` (a :mod:`hashlib` object): every tensor's name, dtype and raw bytes, in name
    order. Returns ``digest``."""
    import torch

    for key, tensor in sorted(state.items()):
        digest.update(key.encode())
        t = tensor.detach().to("cpu").contiguous()
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short, order-independent SHA-256 hex digest of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


_SIMPLE = (str, int, float, bool, type(None))


def component_signature(obj: Any, _depth: int = 0) -> Any:
    """A JSON-able description of a configured component that changes when its configuration changes.

    Used to key resume checkpoints, restarts and stores by what a phase was built with: a ``functools.partial``
    (what a bundle's ``_mode_: "callable"`` gives) is its target and keywords; a class or function its import path;
    a tensor its shape and sum; any other object its class and public attributes, recursively (transforms, losses,
    views). Private attributes and large containers are left out.
    """
    import functools
    import inspect

    if _depth > 16:
        return type(obj).__qualname__
    if isinstance(obj, _SIMPLE):
        return obj
    if isinstance(obj, (list, tuple)):
        return [component_signature(v, _depth + 1) for v in obj[:64]]
    if isinstance(obj, dict):
        return {str(k): component_signature(v, _depth + 1) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, functools.partial):
        return {"callable": component_signature(obj.func, _depth + 1), **component_signature(obj.keywords, _depth + 1)}
    if isinstance(obj, type) or inspect.isroutine(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
    if type(obj).__module__.startswith("torch") and hasattr(obj, "shape"):
        return {"shape": list(obj.shape), "sum": float(obj.double().sum())}
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return component_signature(obj.tolist(), _depth + 1)
    cls = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if not hasattr(obj, "__dict__"):  # e.g. torch.device, a NumPy RandomState
        text = repr(obj)
        return {"class": cls, "repr": "" if " at 0x" in text else text}
    attrs = obj.__dict__
    if hasattr(obj, "state_dict") and hasattr(obj, "named_modules"):  # torch modules: hyper-parameters + buffers
        attrs = {**{k: v for k, v in attrs.items() if not k.startswith("_")}, "buffers": dict(obj.named_buffers())}
    return {"class": cls, **component_signature({k: v for k, v in attrs.items() if not k.startswith("_")}, _depth + 1)}


def default_device(device: Any = None) -> Any:
    """``device`` as a ``torch.device``; ``None``: CUDA when available, else the CPU."""
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group (``(0, 1)`` without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op without a process group).

    ignite sets up its distributed context with a collective call the first time it is asked; doing it here, on
    every rank at once, keeps a rank-0-only phase (the bag phase) from waiting on the other ranks later.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import ignite.distributed as idist

        idist.get_rank()
        dist.barrier()


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
