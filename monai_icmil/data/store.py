# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Per-slide array stores: patch coordinates and patch features, keyed so they are never stale.

One file per slide (safetensors): the arrays plus a JSON *key* in the header metadata. A lookup returns the arrays
only when every field of the stored key equals the requested key: the slide's identity (path, size, mtime), the
tiling parameters and, for features, the embedder fingerprint. Changing any of them makes the file stale, and the
next run recomputes it. Writes are atomic (temp file + rename): an interrupted run leaves either the old file or
the new one, never half a file, and resumes at the first slide without a current file.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable
from torch.utils.data import Dataset

from monai_icmil.data.slide import slide_identity
from monai_icmil.utils import atomic_path, stable_hash, sweep_temporaries

__all__ = [
    "SlideArrayStore",
    "FeatureStore",
    "CoordsStore",
    "BagDataset",
    "feature_key",
    "coords_key",
    "StoredArray",
    "stored_array",
    "stored_file_key",
    "is_file_name",
]


def coords_key(slide_path: str | os.PathLike, tiling: Mapping[str, Any]) -> dict[str, Any]:
    """The key of a slide's coordinates: slide identity + tiling parameters."""
    return {"slide": slide_identity(slide_path), "tiling": dict(sorted(tiling.items()))}


def feature_key(
    slide_path: str | os.PathLike,
    tiling: Mapping[str, Any],
    fingerprint: str,
    dtype: str = "float16",
    stain_normalize: bool = False,
) -> dict[str, Any]:
    """The key of a slide's features: slide identity + tiling parameters + embedder fingerprint + dtype (+ stain
    normalisation, when on)."""
    key = {**coords_key(slide_path, tiling), "embedder": fingerprint, "dtype": dtype}
    return {**key, "stain_normalize": "macenko"} if stain_normalize else key


def is_file_name(slide_id: str) -> bool:
    """Whether ``slide_id`` can name a store file: not empty, no ``/`` or ``\\``, not ``.`` or ``..``."""
    return bool(slide_id) and not any(c in slide_id for c in "/\\") and slide_id not in (".", "..")


_SWEPT: dict[str, int] = {}  # store folder -> its modification time when this process last swept it


class SlideArrayStore:
    """A folder of ``<slide_id>.safetensors`` files, each holding named arrays and the key they were made with.

    Args:
        root: the folder (created on first write).
    """

    suffix = ".safetensors"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        # a write cut by kill -9 leaves its temporary file; an hour on, it is an orphan: looked for again only when
        # the folder changed since this process last looked (stores are built often; listing a big folder is not free)
        with contextlib.suppress(OSError):
            if _SWEPT.get(str(self.root)) != self.root.stat().st_mtime_ns:
                sweep_temporaries(self.root)
                _SWEPT[str(self.root)] = self.root.stat().st_mtime_ns  # (after the sweep's own removals)

    def path(self, slide_id: str) -> Path:
        if not is_file_name(slide_id):
            raise ValueError(f"invalid slide id {slide_id!r} for a store file name")
        return self.root / f"{slide_id}{self.suffix}"

    def _header(self, slide_id: str) -> dict[str, str] | None:
        return _file_metadata(self.path(slide_id))

    def stored_key(self, slide_id: str) -> dict[str, Any] | None:
        return stored_file_key(self.path(slide_id))

    def is_current(self, slide_id: str, key: Mapping[str, Any]) -> bool:
        """Whether the stored file exists and was made with exactly ``key``."""
        stored = self.stored_key(slide_id)
        return stored is not None and stable_hash(stored, 64) == stable_hash(dict(key), 64)

    def metadata(self, slide_id: str) -> dict[str, Any]:
        header = self._header(slide_id) or {}
        return json.loads(header.get("meta", "{}"))

    def load(self, slide_id: str, key: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor] | None:
        """The slide's arrays, or ``None`` when missing or (with ``key``) stale."""
        from safetensors.torch import load_file

        if key is not None and not self.is_current(slide_id, key):
            return None
        p = self.path(slide_id)
        if not p.is_file():
            return None
        return load_file(str(p))

    def save(
        self,
        slide_id: str,
        arrays: Mapping[str, np.ndarray | torch.Tensor],
        key: Mapping[str, Any],
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the slide's arrays with their key (atomically)."""
        from safetensors.torch import save_file

        tensors = {
            k: (
                torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu()
            ).contiguous()
            for k, v in arrays.items()
        }
        header = {"key": json.dumps(dict(key), sort_keys=True), "meta": json.dumps(dict(meta or {}), default=str)}
        path = self.path(slide_id)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        return path

    def slide_ids(self) -> list[str]:
        return sorted(p.name[: -len(self.suffix)] for p in self.root.glob(f"*{self.suffix}"))


class CoordsStore(SlideArrayStore):
    """Patch coordinates per slide: ``coords`` ``[N, 2]`` int64 and ``tissue_fraction`` ``[N]``."""


class FeatureStore(SlideArrayStore):
    """Patch features per slide: ``features`` ``[N, D]`` (float16 by default) and ``coords`` ``[N, 2]``."""

    def load_features(self, slide_id: str, key: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        arrays = self.load(slide_id, key)
        if arrays is None:
            return None
        return arrays["features"], arrays["coords"]


_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": np.uint16, "I64": np.int64}


def _safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The header's byte size and its JSON (array name -> dtype, shape, data offsets) of a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= os.fstat(f.fileno()).st_size - 8:
            raise ValueError(f"{path}: not a safetensors file (header size {size})")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not an object)")
    return size, header


@dataclass(frozen=True)
class StoredArray:
    """Where one array of a store file lies (read from its header once): rows of it are then read through a memory
    map, so only their pages are read and DataLoader workers share them through the page cache. Picklable.

    Attributes:
        path: the store file.
        offset: the array's first byte in the file.
        dtype: its safetensors dtype (``"F16"``, ``"BF16"``, ``"F32"`` or ``"I64"``).
        shape: its shape.
    """

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    def rows(self, rows: np.ndarray | slice = slice(None)) -> torch.Tensor:
        """Rows ``rows`` (any order, repeats allowed) as a tensor of the stored dtype."""
        array = np.memmap(
            self.path, dtype=_SAFETENSORS_DTYPES[self.dtype], mode="r", offset=self.offset, shape=self.shape
        )
        out = torch.from_numpy(np.array(array[rows]))  # a copy: the map is read-only and is closed after
        return out.view(torch.bfloat16) if self.dtype == "BF16" else out


def stored_array(path: str | os.PathLike, name: str = "features") -> StoredArray | None:
    """The array ``name`` of a store file (``None`` when the file has no such array).

    Raises:
        ValueError: the array's dtype is not float16, bfloat16, float32 or int64 (names the file).
    """
    size, header = _safetensors_header(Path(path))
    info = header.get(name)
    if info is None:
        return None
    if info.get("dtype") not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: array {name!r} is {info.get('dtype')}, not float16/bfloat16/float32/int64")
    return StoredArray(str(path), 8 + size + info["data_offsets"][0], info["dtype"], tuple(info["shape"]))


def _file_metadata(path: Path) -> dict[str, str] | None:
    """A store file's metadata strings (``key``, ``meta``); ``None`` when it is missing, unreadable (e.g. written by
    something else) or not as long as its header says (a copy cut short): treated as missing, so it is made again."""
    if not path.is_file():
        return None
    try:
        size, header = _safetensors_header(path)
    except (OSError, ValueError):
        return None
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and "data_offsets" in v]
    if 8 + size + max(ends, default=0) != path.stat().st_size:  # truncated (or appended to): not a finished file
        return None
    return dict(header.get("__metadata__") or {})


def stored_file_key(path: str | os.PathLike) -> dict[str, Any] | None:
    """The key a store file was written with (``None`` when it has none, or is missing or unreadable)."""
    meta = _file_metadata(Path(path)) or {}
    return json.loads(meta["key"]) if "key" in meta else None


class BagDataset(Dataset, Randomizable):
    """Bags of patch features for the bag phase: ``{"features", "label", "slide_id", "coords"}`` per slide (the
    label of an unlabelled slide, ``label`` ``None``, is -1: an inference-only test slide).

    Args:
        store: the feature store.
        items: datalist entries (``slide_id``, ``label``, ``image``).
        keys: ``{slide_id: feature key}``: every bag must be current for its key, so the bag phase never trains on
            stale features.
        max_instances: randomly subsample bags larger than this (for memory); ``None`` keeps all.
        dtype: dtype of the served features.

    Slides whose bag is empty (no tissue patches) are left out with a warning that names them.

    Raises:
        FileNotFoundError: a slide's features are missing or stale (the message names it and says to embed).
    """

    def __init__(
        self,
        store: FeatureStore,
        items: Sequence[Mapping[str, Any]],
        keys: Mapping[str, Mapping[str, Any]],
        max_instances: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.store, self.max_instances, self.dtype = store, max_instances, dtype
        self.items: list[dict[str, Any]] = []
        stale, empty = [], []
        for item in items:
            sid = item["slide_id"]
            if not store.is_current(sid, keys[sid]):
                stale.append(sid)
                continue
            if int(store.metadata(sid).get("num_patches", 1)) == 0:
                empty.append(sid)
                continue
            self.items.append({**item, "key": keys[sid]})
        if stale:
            raise FileNotFoundError(
                f"features of {len(stale)} slide(s) are missing or stale in '{store.root}' (e.g. '{stale[0]}'); "
                "run the embedding phase first."
            )
        if empty:
            warnings.warn(f"{len(empty)} slide(s) with an empty bag left out: {', '.join(empty)}", stacklevel=2)
        self.set_random_state(0)

    def __len__(self) -> int:
        return len(self.items)

    def feature_dims(self) -> dict[str, int]:
        """``{slide_id: feature dimension}`` of every bag, read from the store files' headers (no bag is loaded)."""
        dims = {}
        for item in self.items:
            if not self.store.is_current(item["slide_id"], item["key"]):
                raise FileNotFoundError(
                    f"features of slide '{item['slide_id']}' changed on disk since the dataset was made"
                )
            stored = stored_array(self.store.path(item["slide_id"]))
            if stored is None:
                raise FileNotFoundError(f"the feature file of slide '{item['slide_id']}' holds no features")
            dims[item["slide_id"]] = int(stored.shape[-1])
        return dims

    def randomize(self, n: int) -> np.ndarray | None:
        if self.max_instances is None or n <= self.max_instances:
            return None
        return np.sort(self.R.choice(n, self.max_instances, replace=False))

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        arrays = self.store.load(item["slide_id"], item["key"])
        if arrays is None:
            raise FileNotFoundError(
                f"features of slide '{item['slide_id']}' changed on disk since the dataset was made"
            )
        feats, coords = arrays["features"], arrays["coords"]
        pick = self.randomize(len(feats))
        if pick is not None:
            feats, coords = feats[pick], coords[pick]
        return {
            "features": feats.to(self.dtype),
            "coords": coords,
            "label": torch.as_tensor(-1 if item["label"] is None else item["label"], dtype=torch.long),
            "slide_id": item["slide_id"],
        }
