# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The prepare step: tissue mask and grid coordinates of every slide, kept in a :class:`CoordsStore`.

Each slide goes through a dictionary transform, by default a MONAI ``Compose`` of our own
:class:`~monai_icmil.transforms.TissueMaskd` and :class:`~monai_icmil.transforms.GridPatchCoordsd` (the bundle's
``prepare#transforms``; :class:`~monai_icmil.data.tiling.TilingConfig` is the same pair as one object), so a transform
added to that ``Compose`` (a pen-mark filter, another tissue detector) shapes the grid every later phase uses. The
coordinates are stored under a key made of the slide's identity and the transforms' configuration
(:func:`tiling_signature`): changing either tiles the slide again.

When a slide is tiled, the JPEG tiles under its grid are checked once (:mod:`monai_icmil.data.integrity`): patches on
damaged tiles are dropped from the grid or fail the slide (:class:`~monai_icmil.data.integrity.TileErrorPolicy`),
so no later phase reads them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_icmil.data.integrity import TileErrorPolicy, damaged_patches
from monai_icmil.data.report import RunReport
from monai_icmil.data.slide import MPP_DISAGREEMENT, as_mpp, get_slide
from monai_icmil.data.store import CoordsStore, coords_key
from monai_icmil.data.tiling import (
    DETECTOR_CHANGES,
    DETECTOR_VERSION,
    EmptySlideWarning,
    TissueMaskWarning,
    detects_tissue,
    patch_grids,
)
from monai_icmil.utils import component_signature

__all__ = ["prepare_coords", "SlideTiles", "tiling_signature", "slide_signature"]


def _save_qc(
    path: Path, reader: Any, sid: str, coords: np.ndarray, meta: Mapping[str, Any], damaged: np.ndarray | None = None
) -> None:
    from monai_icmil.visualize import save_tiling_qc

    mpp = f"{meta['mpp']:.2f} um/px, " if meta.get("mpp") else ""
    caption = f"{sid}: {len(coords)} patches of {meta['patch_size']} px ({mpp}level {meta['level']})"
    if meta.get("damaged_patches"):
        caption += f"; {meta['damaged_patches']} dropped on damaged JPEG tiles (red)"
    try:
        thumb, ds = reader.thumbnail(1024)
        save_tiling_qc(path, thumb, ds, np.asarray(coords), float(meta["footprint"]), caption, damaged=damaged)
    except Exception as e:  # a picture is not worth a slide
        warnings.warn(f"slide '{sid}': no tiling QC image ({type(e).__name__}: {e})", stacklevel=3)


_SUMMARY_COLUMNS = (
    "slide", "image", "status", "patches", "damaged_patches", "level", "read_size", "patch_size", "mpp", "slide_mpp",
    "area_mm2",
)  # fmt: skip


def _summary_row(sid: str, path: str, n: int, meta: Mapping[str, Any], file_mpp: float | None = None) -> dict[str, Any]:
    """A slide's row of ``tiling.csv``; ``slide_mpp`` is its level-0 mpp, given (datalist, ``assume_mpp``; with the
    file's where that differs) or read from the file (``file_mpp``)."""
    mpp = meta.get("mpp")
    if meta.get("slide_mpp"):
        said = f"; file {file_mpp:.4g}" if file_mpp and _disagree(meta["slide_mpp"], file_mpp) else ""
        slide_mpp = f"{meta['slide_mpp']:.4g} (given{said})"
    else:
        slide_mpp = f"{file_mpp:.4g} (file)" if file_mpp else ""
    return {
        "slide": sid,
        "image": path,
        "status": "ok" if n else "empty (no tissue patches)",
        "patches": n,
        "damaged_patches": int(meta.get("damaged_patches", 0)),
        "level": meta["level"],
        "read_size": meta["read_size"],
        "patch_size": meta["patch_size"],
        "mpp": f"{mpp:.4g}" if mpp else "",
        "slide_mpp": slide_mpp,
        "area_mm2": f"{n * (meta['patch_size'] * mpp) ** 2 / 1e6:.3f}" if mpp else "",  # the patches' area
    }


def _disagree(given: float, file_mpp: float) -> bool:
    """Whether a given level-0 mpp and the file's differ by more than :data:`~monai_icmil.data.slide
    .MPP_DISAGREEMENT` (as the readers' own sources are compared)."""
    return abs(given - file_mpp) > MPP_DISAGREEMENT * file_mpp


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
    """One slide's tiles: ``slide_id``, ``image``, ``coords`` ``[N, 2]``, ``level``, ``read_size``, ``patch_size``,
    ``stride`` (output pixels; below ``patch_size`` the patches overlap), and ``slide_mpp`` when the slide's level-0
    mpp was given rather than read from its file."""


def tiling_signature(transforms: Any) -> dict[str, Any]:
    """The configuration of a tiling transform as a dict (part of the coordinate and feature stores' keys)."""
    return {"transforms": component_signature(transforms)}


def slide_signature(signature: Mapping[str, Any], slide: Mapping[str, Any]) -> dict[str, Any]:
    """The tiling signature of one slide (a :class:`SlideTiles` or datalist entry): the experiment's, with the
    slide's own level-0 mpp when one replaces the file's (so that changing it tiles and embeds the slide again)."""
    mpp = slide.get("slide_mpp")
    return {**signature, "slide_mpp": float(mpp)} if mpp is not None else dict(signature)


def _slide_mpp(item: Mapping[str, Any], reader: Any, assume_mpp: float | None) -> float | None:
    """The level-0 mpp to use instead of the file's: the datalist's ``mpp`` for this slide, else ``assume_mpp``
    when the file has none; ``None`` keeps the file's."""
    mpp = item.get("mpp")
    if mpp in (None, ""):
        return as_mpp(assume_mpp, "assume_mpp") if assume_mpp is not None and reader.mpp is None else None
    return as_mpp(mpp, f"mpp of slide '{item['image']}' in the datalist")


def _transform_error(error: BaseException) -> BaseException:
    """The error a transform raised, out of MONAI's "applying transform <object at 0x...>" wrappers (whose
    message says nothing about the slide)."""
    while isinstance(error, RuntimeError) and str(error).startswith("applying transform") and error.__cause__:
        error = error.__cause__
    return error


def _tile(
    transforms: Callable[[dict], Mapping[str, Any]], sid: str, path: str, slide_mpp: float | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the tiling transforms on one slide: its coordinates and the metadata the store keeps with them."""
    data = {"image": path, "slide_id": sid, **({"mpp": slide_mpp} if slide_mpp is not None else {})}
    with warnings.catch_warnings(record=True) as said:  # an empty slide is reported once, by prepare_coords
        warnings.simplefilter("always")
        try:
            d = transforms(data)
        except RuntimeError as e:
            raise _transform_error(e) from e
    if "coords" not in d or "tiling" not in d:
        raise KeyError(
            "the tiling transforms must put 'coords' and 'tiling' in the data (end them with GridPatchCoordsd)"
        )
    tiling = d["tiling"]
    coords = np.asarray(d["coords"], np.int64).reshape(-1, 2)
    meta = {
        "level": int(tiling["level"]),
        "read_size": int(tiling["read_size"]),
        "patch_size": int(tiling["patch_size"]),
        "mpp": tiling.get("effective_mpp"),
        "footprint": float(tiling["footprint"]),
        "stride": int(tiling.get("stride") or tiling["patch_size"]),
        "num_patches": len(coords),
    }
    if not len(coords):  # why (the tissue detector's or the grid's words: what to change), for report.json
        reasons = [w.message.reason for w in said if isinstance(w.message, EmptySlideWarning)]
        meta["empty_reason"] = reasons[0] if reasons else "no tissue patches"
    else:  # a doubtful mask (tinted glass, faint tissue dropped) is said once, here
        for w in said:
            if issubclass(w.category, TissueMaskWarning):
                warnings.warn(w.message, stacklevel=3)
    fraction = d.get("tissue_fraction")
    fraction = np.ones(len(coords), np.float32) if fraction is None else np.asarray(fraction, np.float32)
    return coords, {"meta": meta, "tissue_fraction": fraction}


def _load_or_tile(
    item: Mapping[str, Any],
    transforms: Any,
    store: CoordsStore,
    backend: str,
    signature: Mapping[str, Any],
    policy: TileErrorPolicy,
    assume_mpp: float | None = None,
) -> tuple[Any, dict[str, np.ndarray], dict[str, Any], bool]:
    """``(reader, arrays, meta, tiled now)`` of one slide: its current coordinates from the store, or tiled and
    checked for damaged tiles (``arrays``: ``coords``, ``damaged``: the dropped patches' coordinates).

    Raises:
        DamagedSlideError: the slide's damaged share of patches is not acceptable under ``policy``.
    """
    sid, path = item["slide_id"], item["image"]
    reader = get_slide(path, backend)  # a missing or unreadable slide fails here, with its name
    slide_mpp = _slide_mpp(item, reader, assume_mpp)
    if slide_mpp is not None:
        reader = get_slide(path, backend, slide_mpp)
    key = coords_key(path, slide_signature(signature, {"slide_mpp": slide_mpp}))
    stored = store.load(sid, key)
    if stored is not None:
        meta = store.metadata(sid)
        arrays = {k: v.numpy() for k, v in stored.items()}
        arrays.setdefault("damaged", np.zeros((0, 2), np.int64))
        policy.check(path, len(arrays["damaged"]), len(arrays["coords"]) + len(arrays["damaged"]))
        return reader, arrays, meta, False
    coords, out = _tile(transforms, sid, path, slide_mpp)
    meta = {**out["meta"], "slide_mpp": slide_mpp}
    if detects_tissue(transforms):
        meta["detector"] = DETECTOR_VERSION
    bad = damaged_patches(reader, coords, meta["read_size"], meta["level"])
    policy.check(path, len(bad), len(coords))
    keep = np.setdiff1d(np.arange(len(coords)), bad)
    arrays = {"coords": coords[keep], "tissue_fraction": out["tissue_fraction"][keep], "damaged": coords[bad]}
    meta.update(num_patches=len(keep), damaged_patches=len(bad))
    store.save(sid, arrays, key, meta)
    return reader, arrays, meta, True


def prepare_coords(
    items: Sequence[Mapping[str, Any]],
    transforms: Callable[[dict], Mapping[str, Any]],
    store: CoordsStore,
    report: RunReport | None = None,
    on_slide_error: str = "skip",
    backend: str = "auto",
    progress: bool = True,
    qc_dir: str | os.PathLike | None = None,
    tile_policy: TileErrorPolicy | None = None,
    assume_mpp: float | None = None,
) -> dict[str, SlideTiles]:
    """Tile every slide (or load its current coordinates from ``store``), dropping the patches on damaged JPEG tiles.

    Args:
        items: datalist entries with ``slide_id`` and ``image``.
        transforms: a dictionary transform called with ``{"image": path, "slide_id": id}`` that adds ``"coords"``
            (``[N, 2]`` level-0 x, y) and ``"tiling"`` (level, read_size, patch_size, effective_mpp, footprint), e.g.
            ``Compose([TissueMaskd(...), GridPatchCoordsd(...)])`` or a :class:`~monai_icmil.data.tiling
            .TilingConfig`.
        store: where coordinates are kept; a slide whose stored key matches is not tiled again.
        report: failures and empty slides are recorded here.
        on_slide_error: ``"skip"`` records a failing slide and goes on; ``"raise"`` stops at it.
        backend: slide backend (opening each slide, QC thumbnails).
        progress: show a progress bar.
        qc_dir: when given, a QC image per slide, ``<qc_dir>/<slide_id>.jpg``: the thumbnail with the patches' area
            tinted and outlined (:func:`~monai_icmil.visualize.save_tiling_qc`), made when the slide is tiled or
            its image is missing. A slide whose image cannot be drawn is warned about, not failed. Also
            ``<qc_dir>/tiling.csv``: per slide, its status (ok, empty, or failed with the reason), patch count,
            level, read and patch size, mpp and the patches' area in mm^2; and ``<qc_dir>/overview/page_<k>.jpg``,
            contact sheets of the QC pictures, 48 slides a page, failed and empty slides marked
            (:func:`~monai_icmil.visualize.save_qc_overview`).
        tile_policy: what damaged JPEG tiles do (default: drop their patches; a slide with more than 5 % of its
            patches on them fails).
        assume_mpp: level-0 microns per pixel of the slides whose files have none (a datalist entry's own ``mpp``
            replaces the file's for that slide, whatever the file says). Either is part of the slide's keys.

    Returns:
        ``{slide_id: SlideTiles}`` for the slides that could be tiled (empty ones included, with zero coords).
    """
    if on_slide_error not in ("skip", "raise"):
        raise ValueError(f"on_slide_error must be 'skip' or 'raise', got {on_slide_error!r}")
    signature, policy = tiling_signature(transforms), tile_policy or TileErrorPolicy()
    grids = patch_grids(transforms)  # their stride, for coordinate stores that did not record it
    grid_stride = (grids[0].stride or grids[0].patch_size) if grids else None
    out: dict[str, SlideTiles] = {}
    summary: list[dict[str, Any]] = []
    older: dict[str, int] = {}  # coordinates reused from an earlier tissue detector: its version
    overruled: list[str] = []  # slides whose given mpp is not their file's
    for item in _progress(items, progress):
        sid, path = item["slide_id"], item["image"]
        try:
            reader, arrays, meta, tiled = _load_or_tile(item, transforms, store, backend, signature, policy, assume_mpp)
        except Exception as e:
            if on_slide_error == "raise":
                raise
            if report is not None:
                report.fail(sid, path, "prepare", f"{type(e).__name__}: {e}")
            warnings.warn(f"slide '{sid}' ({path}) skipped: {type(e).__name__}: {e}", stacklevel=2)
            summary.append({"slide": sid, "image": path, "status": f"failed: {type(e).__name__}: {e}"})
            continue
        coords, damaged = arrays["coords"], arrays["damaged"]
        if not tiled and int(meta.get("detector", 1)) < DETECTOR_VERSION:
            older[sid] = int(meta.get("detector", 1))
        _record(report, sid, path, coords, damaged, meta.get("empty_reason"))
        if qc_dir is not None and (tiled or not (Path(qc_dir) / f"{sid}.jpg").is_file()):
            _save_qc(Path(qc_dir) / f"{sid}.jpg", reader, sid, coords, meta, damaged)
        file_mpp = get_slide(path, backend).mpp if meta.get("slide_mpp") else getattr(reader, "mpp", None)
        if meta.get("slide_mpp") and file_mpp and _disagree(meta["slide_mpp"], file_mpp):
            overruled.append(f"{sid} ({meta['slide_mpp']:g}, file {file_mpp:g})")
        summary.append(_summary_row(sid, path, len(coords), meta, file_mpp))
        out[sid] = _slide_tiles(sid, path, coords, meta, grid_stride)
    if qc_dir is not None:
        _write_qc_summary(Path(qc_dir), summary)
    _warn_older_detector(older, store, transforms)
    _warn_overruled_mpp(overruled)
    return out


def _slide_tiles(
    sid: str, path: str, coords: np.ndarray, meta: Mapping[str, Any], grid_stride: int | None
) -> SlideTiles:
    """A slide's :class:`SlideTiles` from its coordinates and their store's metadata (``grid_stride``: the tiling's
    stride, for stores made before 2026-12, which did not record it)."""
    return SlideTiles(
        slide_id=sid,
        image=path,
        coords=np.asarray(coords, np.int64),
        level=int(meta["level"]),
        read_size=int(meta["read_size"]),
        patch_size=int(meta["patch_size"]),
        stride=int(meta.get("stride") or grid_stride or meta["patch_size"]),
        **({"slide_mpp": meta["slide_mpp"]} if meta.get("slide_mpp") is not None else {}),
    )


def _warn_overruled_mpp(overruled: Sequence[str]) -> None:
    """One warning for the slides tiled at a given mpp that is not their file's (``"<slide> (<given>, file
    <file's>)"``)."""
    if overruled:
        warnings.warn(
            f"{len(overruled)} slide(s) are tiled at an mpp given for them that is not their file's: "
            f"{', '.join(overruled[:5])}{' ...' if len(overruled) > 5 else ''} (um/px at level 0; all in tiling.csv). "
            "The given value is used; if the file is right, remove the slide's `mpp` from the datalist (a "
            "magnification is not an mpp: 20x is about 0.5 um/px, 40x about 0.25).",
            stacklevel=3,
        )


def _warn_older_detector(older: Mapping[str, int], store: CoordsStore, transforms: Any) -> None:
    """One warning for the slides whose reused coordinates an earlier tissue detector tiled (``{slide: its
    version}``), when ``transforms`` hold the detector."""
    if older and detects_tissue(transforms):
        missed = [why for v, why in DETECTOR_CHANGES.items() if v > min(older.values())]
        warnings.warn(
            f"{len(older)} slide(s) (e.g. '{next(iter(older))}') keep coordinates tiled by an earlier tissue detector "
            f"(before {'; '.join(missed)}) in '{store.root}': they are reused as they are, with the "
            f"features made from them. To tile them again with this one, use a new output folder, or delete that "
            f"folder and the feature stores beside it in '{store.root.parent}' (round_<r>/features, features/).",
            stacklevel=3,
        )


def _record(
    report: RunReport | None, sid: str, path: str, coords: np.ndarray, damaged: np.ndarray, why: str | None = None
) -> None:
    """A tiled slide in the run report (its empty grid, with ``why``; its dropped patches), with a warning naming
    it."""
    if len(damaged):
        warnings.warn(
            f"slide '{sid}' ({path}): {len(damaged)} of {len(coords) + len(damaged)} patches lie on damaged JPEG "
            "tiles and were dropped (their positions are in report.json and red in the tiling QC picture).",
            stacklevel=3,
        )
    if report is None:
        return
    report.succeed(sid, "prepare")
    if len(coords) == 0:
        report.mark_empty(sid, path, "prepare", why or "no tissue patches")
    if len(damaged):
        report.mark_damaged(sid, path, damaged, len(coords) + len(damaged))


def _progress(items: Sequence[Any], progress: bool) -> Any:
    if not progress:
        return items
    from monai_icmil.utils import progress_bar

    return progress_bar(items, desc="prepare (tissue + grid)", unit="slide")


def _write_qc_summary(qc_dir: Path, summary: Sequence[Mapping[str, Any]]) -> None:
    from monai_icmil.visualize import save_qc_overview

    _write_summary(qc_dir / "tiling.csv", summary)
    try:
        save_qc_overview(qc_dir, summary)
    except Exception as e:  # pictures are not worth a run
        warnings.warn(f"no tiling QC overview in {qc_dir}/overview ({type(e).__name__}: {e})", stacklevel=3)
