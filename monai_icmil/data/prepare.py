# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The prepare step: tissue mask and grid coordinates of every slide, kept in a :class:`CoordsStore`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_icmil.data.report import RunReport
from monai_icmil.data.slide import get_slide
from monai_icmil.data.store import CoordsStore, coords_key
from monai_icmil.data.tiling import TilingConfig

__all__ = ["prepare_coords", "SlideTiles"]


def _save_qc(path: Path, reader: Any, sid: str, coords: np.ndarray, meta: Mapping[str, Any]) -> None:
    from monai_icmil.visualize import save_tiling_qc

    mpp = f"{meta['mpp']:.2f} um/px, " if meta.get("mpp") else ""
    caption = f"{sid}: {len(coords)} patches of {meta['patch_size']} px ({mpp}level {meta['level']})"
    try:
        thumb, ds = reader.thumbnail(1024)
        save_tiling_qc(path, thumb, ds, np.asarray(coords), float(meta["footprint"]), caption)
    except Exception as e:  # a picture is not worth a slide
        warnings.warn(f"slide '{sid}': no tiling QC image ({type(e).__name__}: {e})", stacklevel=3)


_SUMMARY_COLUMNS = ("slide", "image", "status", "patches", "level", "read_size", "patch_size", "mpp", "area_mm2")


def _summary_row(sid: str, path: str, n: int, meta: Mapping[str, Any]) -> dict[str, Any]:
    mpp = meta.get("mpp")
    return {
        "slide": sid,
        "image": path,
        "status": "ok" if n else "empty (no tissue patches)",
        "patches": n,
        "level": meta["level"],
        "read_size": meta["read_size"],
        "patch_size": meta["patch_size"],
        "mpp": f"{mpp:.4g}" if mpp else "",
        "area_mm2": f"{n * (meta['patch_size'] * mpp) ** 2 / 1e6:.3f}" if mpp else "",  # the patches' area
    }


def _write_summary(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """One row per slide (tiled, empty or failed), atomically: outliers in patch count or area stand out."""
    import csv
    import io

    from monai_icmil.utils import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, _SUMMARY_COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


class SlideTiles(dict):
    """One slide's tiles: ``slide_id``, ``image``, ``coords`` ``[N, 2]``, ``level``, ``read_size``, ``patch_size``."""


def prepare_coords(
    items: Sequence[Mapping[str, Any]],
    tiling: TilingConfig,
    store: CoordsStore,
    report: RunReport | None = None,
    on_slide_error: str = "skip",
    backend: str = "auto",
    device: str | torch.device | None = "auto",
    progress: bool = True,
    qc_dir: str | os.PathLike | None = None,
) -> dict[str, SlideTiles]:
    """Tile every slide (or load its current coordinates from ``store``).

    Args:
        items: datalist entries with ``slide_id`` and ``image``.
        tiling: the tiling configuration.
        store: where coordinates are kept; a slide whose stored key matches is not tiled again.
        report: failures and empty slides are recorded here.
        on_slide_error: ``"skip"`` records a failing slide and goes on; ``"raise"`` stops at it.
        backend: slide backend.
        device: tissue-mask device.
        progress: show a progress bar.
        qc_dir: when given, a QC image per slide, ``<qc_dir>/<slide_id>.jpg``: the thumbnail with the patches' area
            tinted and outlined (:func:`~monai_icmil.visualize.save_tiling_qc`), made when the slide is tiled or
            its image is missing. A slide whose image cannot be drawn is warned about, not failed. Also
            ``<qc_dir>/tiling.csv``: per slide, its status (ok, empty, or failed with the reason), patch count,
            level, read and patch size, mpp and the patches' area in mm^2; and ``<qc_dir>/overview/page_<k>.jpg``,
            contact sheets of the QC pictures, 48 slides a page, failed and empty slides marked
            (:func:`~monai_icmil.visualize.save_qc_overview`).

    Returns:
        ``{slide_id: SlideTiles}`` for the slides that could be tiled (empty ones included, with zero coords).
    """
    if on_slide_error not in ("skip", "raise"):
        raise ValueError(f"on_slide_error must be 'skip' or 'raise', got {on_slide_error!r}")
    params = tiling.params()
    out: dict[str, SlideTiles] = {}
    summary: list[dict[str, Any]] = []
    iterator: Any = items
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc="prepare (tissue + grid)", unit="slide")
    for item in iterator:
        sid, path = item["slide_id"], item["image"]
        try:
            reader = get_slide(path, backend)  # a missing or unreadable slide fails here, with its name
            key = coords_key(path, params)
            arrays = store.load(sid, key)
            if arrays is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # an empty slide is reported below, once
                    result = tiling.tile(reader, device=device)
                meta = {
                    "level": result.level,
                    "read_size": result.read_size,
                    "patch_size": result.patch_size,
                    "mpp": result.mpp,
                    "footprint": result.footprint,
                    "num_patches": len(result),
                }
                store.save(sid, {"coords": result.coords, "tissue_fraction": result.tissue_fraction}, key, meta)
                coords = result.coords
            else:
                meta = store.metadata(sid)
                coords = arrays["coords"].numpy()
        except Exception as e:
            if on_slide_error == "raise":
                raise
            if report is not None:
                report.fail(sid, path, "prepare", f"{type(e).__name__}: {e}")
            warnings.warn(f"slide '{sid}' ({path}) skipped: {type(e).__name__}: {e}", stacklevel=2)
            summary.append({"slide": sid, "image": path, "status": f"failed: {type(e).__name__}: {e}"})
            continue
        if report is not None:
            report.succeed(sid)
            if len(coords) == 0:
                report.mark_empty(sid, path, "prepare")
        if qc_dir is not None and (arrays is None or not (Path(qc_dir) / f"{sid}.jpg").is_file()):
            _save_qc(Path(qc_dir) / f"{sid}.jpg", reader, sid, coords, meta)
        summary.append(_summary_row(sid, path, len(coords), meta))
        out[sid] = SlideTiles(
            slide_id=sid,
            image=path,
            coords=np.asarray(coords, np.int64),
            level=int(meta["level"]),
            read_size=int(meta["read_size"]),
            patch_size=int(meta["patch_size"]),
        )
    if qc_dir is not None:
        _write_summary(Path(qc_dir) / "tiling.csv", summary)
        from monai_icmil.visualize import save_qc_overview

        try:
            save_qc_overview(qc_dir, summary)
        except Exception as e:  # pictures are not worth a run
            warnings.warn(f"no tiling QC overview in {qc_dir}/overview ({type(e).__name__}: {e})", stacklevel=2)
    return out
