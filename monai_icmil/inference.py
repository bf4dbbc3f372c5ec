# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Inference on new slides: slide probabilities, and the pictures and files the configured writers make of them
(heatmaps, QuPath GeoJSON, top patches, triage sheets: :mod:`monai_icmil.handlers.writers`)."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from monai_icmil.data.prepare import prepare_coords, slide_signature, tiling_signature
from monai_icmil.data.report import RunReport
from monai_icmil.data.slide import as_mpp, get_slide
from monai_icmil.data.store import CoordsStore, FeatureStore, feature_key
from monai_icmil.data.tiling import patch_grids
from monai_icmil.engines.embed import Embed
from monai_icmil.handlers.writers import SlidePrediction
from monai_icmil.networks.embedders import PatchEmbedder

__all__ = ["predict_slides", "patch_scores", "list_slides", "with_stride", "NoSlideScored"]


class NoSlideScored(RuntimeError):
    """Raised by :func:`predict_slides` when slides were given and none of them was scored (each failed or had no
    tissue); ``report.json`` in the output folder says why, slide by slide.

    Args:
        total: how many slides were given.
        failed: the report's records (``path``, ``reason``) of those that failed.
        empty: the same for those without tissue patches.
        report_path: the ``report.json`` that lists them.
    """

    def __init__(self, total: int, failed: Sequence[Mapping], empty: Sequence[Mapping], report_path: Any = None):
        self.total, self.failed, self.empty, self.report_path = total, list(failed), list(empty), report_path
        super().__init__(self.describe(report_path))

    def describe(self, report_path: Any = None) -> str:
        """The counts, the first reasons, ``report_path`` (when given) and what to check."""
        first = [f"'{e['path']}': {e['reason']}" for e in [*self.failed, *self.empty][:3]]
        where = f"; each slide's reason is in '{report_path}'" if report_path else ""
        return (
            f"none of the {self.total} slide(s) was scored ({len(self.failed)} failed, {len(self.empty)} without "
            f"tissue patches), so no probabilities.csv was written{where}"
            + (f", e.g. {'; '.join(first)}" if first else "")
            + ". Check that the slides open with the backend and that the tiling's mpp and tissue threshold suit them."
        )


#: what a folder of slides is searched for
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".qptiff", ".btf", ".tf8")
#: plain images, taken as a folder's slides only when it has none of the above (beside slides they are as often
#: masks or thumbnails)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def list_slides(slides: str | os.PathLike | Sequence[str]) -> list[str]:
    """Slides of a folder (by suffix, sorted: whole-slide files, else plain images) or the given list; a missing path
    is an error naming it."""
    if isinstance(slides, (str, os.PathLike)) and Path(slides).is_dir():
        files = sorted(p for p in Path(slides).iterdir() if p.is_file())
        found = [str(p) for p in files if p.suffix.lower() in SLIDE_SUFFIXES]
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if found and images:
            names = ", ".join(p.name for p in images[:5])
            warnings.warn(
                f"folder '{slides}': {len(images)} plain image(s) beside its {len(found)} slide file(s) are left out, "
                f"taken for masks or thumbnails: {names}{' ...' if len(images) > 5 else ''}. To predict them too, "
                "give the slides by path (--input_slides \"['a.svs', 'b.png']\").",
                stacklevel=2,
            )
        found = found or [str(p) for p in images]
        if not found:
            raise FileNotFoundError(
                f"no slide files ({', '.join(SLIDE_SUFFIXES + IMAGE_SUFFIXES)}) in folder '{slides}'"
            )
        return found
    paths = [str(slides)] if isinstance(slides, (str, os.PathLike)) else [str(s) for s in slides]
    lists = [p for p in paths if p.lower().endswith((".csv", ".json"))]
    if lists:
        raise ValueError(
            f"{', '.join(lists)}: a datalist, not a slide; slides to predict are a folder or slide paths "
            "(--input_slides). To score a datalist's split with its labels, use evaluate.json (--split)."
        )
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"slide(s) not found: {', '.join(missing)}")
    return paths


def with_stride(tiling: Any, stride: int) -> Any:
    """A copy of the tiling transforms whose patch grid steps by ``stride`` output pixels (overlapping patches when
    below the patch size): every grid in it (a :class:`~monai_icmil.transforms.GridPatchCoordsd`'s, a
    :class:`~monai_icmil.data.tiling.TilingConfig`) gets the stride.

    Raises:
        ValueError: ``stride`` not a positive divisor of the patch size, or no grid with a stride in ``tiling``.
    """
    dense = copy.deepcopy(tiling)
    grids = patch_grids(dense)
    if not grids:
        raise ValueError("heatmap_stride: the tiling has no patch grid with a stride (GridPatchCoordsd, TilingConfig).")
    for grid in grids:
        if int(stride) <= 0 or int(grid.patch_size) % int(stride):
            raise ValueError(
                f"heatmap_stride must be a positive divisor of the patch size ({grid.patch_size}), got {stride}; "
                f"e.g. {int(grid.patch_size) // 2} for patches that overlap by half."
            )
        object.__setattr__(grid, "stride", int(stride))
    return dense


@torch.no_grad()
def patch_scores(net: torch.nn.Module, feats: torch.Tensor) -> dict[str, Any]:
    """Slide probabilities, per-patch attention (where the aggregator has one) and instance probabilities."""
    net.eval()
    out = net(feats)
    probs = torch.softmax(out["logits"], -1)[0]
    inst = torch.softmax(net.instance_logits(feats), -1)
    scores: dict[str, Any] = {"probs": probs.cpu().numpy(), "instance_prob": inst[:, -1].cpu().numpy()}
    if getattr(net, "has_attention", False):
        scores["attention"] = torch.softmax(net.attention(net.reduce(feats)), 0).cpu().numpy()
    return scores


def _slide_items(slides: str | os.PathLike | Sequence[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Datalist-like entries: datalist entries as they are; paths (or a folder's slides) named by file stem (made
    unique), without a label."""
    if not isinstance(slides, (str, os.PathLike)) and all(isinstance(s, Mapping) for s in slides):
        return [{"label": None, **dict(s)} for s in slides]
    return slide_entries(list_slides(slides))


def slide_entries(paths: Sequence[str], mpps: Sequence[float | None] | None = None) -> list[dict[str, Any]]:
    """Datalist-like entries of slide paths: named by file stem (made unique), without a label, with each slide's
    level-0 ``mpp`` where ``mpps`` gives one (``None``: the file's)."""
    items, seen = [], set()
    for i, p in enumerate(paths):
        sid, k = Path(p).stem, 1
        while sid in seen:  # a.tif and x/a.tif: a, a-1 (a-1 taken by a slide of that name: a-2)
            sid, k = f"{Path(p).stem}-{k}", k + 1
        seen.add(sid)
        mpp = None if mpps is None else mpps[i]
        items.append({"image": p, "slide_id": sid, "label": None, **({"mpp": mpp} if mpp is not None else {})})
    return items


def predict_slides(
    slides: str | os.PathLike | Sequence[str] | Sequence[Mapping[str, Any]],
    embedder: PatchEmbedder,
    bag_classifier: str | os.PathLike,
    tiling: Callable[[dict], Mapping[str, Any]],
    output_dir: str | os.PathLike,
    embed: Embed | None = None,
    writers: Sequence[Any] = (),
    device: str | torch.device = "cpu",
    backend: str = "auto",
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    stain_normalize: bool = False,
    tile_policy: Any = None,
    assume_mpp: float | None = None,
    heatmap_stride: int | None = None,
) -> list[dict[str, Any]]:
    """Predict each slide: ``probabilities.csv``, the tiling QC images and ``tiling.csv`` in ``coords/qc/`` (new
    slides in the wild: pen marks, folds, odd scans show there first), and whatever ``writers`` make of each slide
    (:class:`~monai_icmil.handlers.writers.SlidePrediction`; the bundle's ``inference_writers``).

    Args:
        slides: a folder (every slide file in it), a list of paths, or datalist entries (``image``, ``slide_id``,
            ``label``, ``tumour_mask``: a split of a training run, as its test inference does).
        embedder: the round's embedder.
        bag_classifier: the round's bag classifier checkpoint.
        tiling: the training run's tiling transforms (the same grid as in training).
        output_dir: where everything goes (``coords/``, ``features/``, ``report.json``, ...).
        embed: the embed phase (default :class:`~monai_icmil.engines.embed.Embed`).
        writers: objects with ``write(pred)`` and ``finish(output_dir)``.
        device: where to embed and score.
        backend: slide backend.
        class_names: class names (CSV header; the last is the positive class).
        progress: progress bars.
        stain_normalize: must match the training run's setting.
        tile_policy: what damaged JPEG tiles do (:class:`~monai_icmil.data.integrity.TileErrorPolicy`; default: drop
            their patches, fail a slide with more than 5 % of them).
        assume_mpp: level-0 microns per pixel of the slides whose files have none (a datalist entry's ``mpp``
            replaces its file's value).
        heatmap_stride: with ``writers``, draw the maps from overlapping patches that step by this many output
            pixels (a divisor of the patch size, e.g. half of it): they are tiled and embedded too (``heatmap/``),
            and each map cell is the mean instance probability (and attention) of the patches covering it, for
            smooth maps. The slide probability stays that of the training grid.

    Returns:
        ``[{"slide_id", "label", "probs", "image"}]`` per scored slide (``label`` ``None`` for new slides). Slides
        that fail are listed in ``output_dir/report.json`` and skipped.

    Raises:
        NoSlideScored: slides were given and none was scored (each failed or had no tissue); ``report.json`` is kept.
    """
    from monai_icmil.engines.bag_phase import write_predictions_csv

    run = SimpleNamespace(
        out=Path(output_dir), report=RunReport(Path(output_dir) / "report.json"), backend=backend, device=device,
        progress=progress, stain_normalize=stain_normalize, tile_policy=tile_policy,
        assume_mpp=as_mpp(assume_mpp, "assume_mpp", optional=True),
        embed=embed if embed is not None else Embed(progress=progress), embedder=embedder,
    )  # fmt: skip
    items = _slide_items(slides)
    net = _classifier(bag_classifier, device, embedder.out_dim, class_names)  # before any work: fails fast
    tiles, store = _tile_and_embed(run, items, tiling, run.out)
    dense = _dense_patches(run, items, tiling, heatmap_stride) if writers and heatmap_stride else None
    run.net, run.store, run.params, run.fp = net, store, tiling_signature(tiling), embedder.fingerprint()
    rows = []
    for item in _progress(items, progress, bool(writers)):
        row = _predict_one(run, item, tiles, writers, dense, class_names)
        if row is not None:
            rows.append(row)
        else:  # an earlier run's pictures of this slide must not pass for this run's
            unscored = SimpleNamespace(slide_id=item["slide_id"], output_dir=run.out, image=item["image"])
            for writer in writers:
                _remove_outputs(writer, unscored, quiet=(AttributeError,))
    if items and not rows:  # no table at all rather than an empty one, or a stale one beside this run's report
        (run.out / "probabilities.csv").unlink(missing_ok=True)
        raise _none_scored(run.report, items)
    write_predictions_csv(run.out / "probabilities.csv", rows, class_names)
    for writer in writers:  # a cohort picture must not cost the run its probabilities
        _write_guarded(run, writer, "finish", run.out, "(all slides)", str(run.out))
    return rows


def _classifier(path: Any, device: Any, in_dim: int, class_names: Sequence[str] | None) -> Any:
    """The bag classifier at ``path`` for ``in_dim``-d features, refusing ``class_names`` of another length."""
    from monai_icmil.engines.bag_phase import load_bag_classifier

    net = load_bag_classifier(path, device, expect_in_dim=in_dim)
    if class_names is not None and len(class_names) != net.num_classes:
        raise ValueError(
            f"class_names {list(class_names)} has {len(class_names)} name(s) but bag classifier '{path}' "
            f"has {net.num_classes} classes: give the names it was trained with (--class_names, --num_classes)."
        )
    return net


def _write_guarded(run: SimpleNamespace, writer: Any, method: str, arg: Any, slide_id: str, path: str) -> None:
    """``writer.<method>(arg)``; a failure is listed in ``report.json`` (``outputs_failed``) and warned about, the
    files the writer names for the slide (``outputs``) are removed, and the probabilities and the other outputs are
    kept."""
    try:
        getattr(writer, method)(arg)
    except Exception as e:
        if method == "write":  # an earlier run's picture of this slide must not pass for this run's
            _remove_outputs(writer, arg)
        name, reason = type(writer).__name__, f"{type(e).__name__}: {e}"
        run.report.mark_output_failed(slide_id, path, name, reason)
        where = f"slide '{path}'" if method == "write" else f"'{path}' ({method})"
        warnings.warn(
            f"{where}: {name} failed ({reason}); its probabilities and other outputs are kept (listed in "
            f"'{run.report.path}')",
            stacklevel=4,
        )


def _remove_outputs(writer: Any, pred: Any, quiet: tuple[type[BaseException], ...] = ()) -> None:
    """Remove the files a writer names for this slide (``outputs``, when it has that method), after it failed or for
    a slide not scored; a file that cannot be removed is warned about, never raised (``quiet``: errors passed over
    without a warning, e.g. a user writer whose ``outputs`` needs more of the prediction than an unscored slide has)."""
    outputs = getattr(writer, "outputs", None)
    try:
        for stale in outputs(pred) if callable(outputs) else ():
            Path(stale).unlink(missing_ok=True)
    except quiet:
        pass
    except Exception as e:
        warnings.warn(f"{type(writer).__name__}: an earlier output could not be removed ({type(e).__name__}: {e})")


def _none_scored(report: RunReport, items: list[dict[str, Any]]) -> NoSlideScored:
    """The error for ``items`` none of which was scored, from ``report`` (a slide that failed now counts as failed,
    whatever an earlier run into the same folder recorded)."""
    ids = [item["slide_id"] for item in items]
    failed = [report.failed[sid] for sid in ids if sid in report.failed]
    empty = [report.empty[sid] for sid in ids if sid in report.empty and sid not in report.failed]
    return NoSlideScored(len(ids), failed, empty, report.path)


def _predict_one(
    run: SimpleNamespace, item: dict[str, Any], tiles: Mapping[str, Any], writers: Sequence[Any], dense: Any, names: Any
) -> dict[str, Any] | None:
    """One slide's probabilities row (``None``: failed or without patches), and what the writers make of it."""
    sid = item["slide_id"]
    if sid not in tiles or sid in run.report.failed:
        return None
    key = feature_key(
        item["image"], slide_signature(run.params, tiles[sid]), run.fp, run.embed.dtype, run.stain_normalize
    )
    arrays = run.store.load(sid, key) if len(tiles[sid]["coords"]) else None
    if arrays is None or len(arrays["features"]) == 0:
        why = (
            "has no tissue patches"
            if not len(tiles[sid]["coords"]) or arrays is not None
            else f"has no current features in '{run.store.path(sid)}' (missing, or made with other settings and not "
            f"embedded again; see '{run.report.path}')"
        )
        warnings.warn(f"slide '{item['image']}' {why}; no prediction", stacklevel=3)
        return None
    scores = patch_scores(run.net, arrays["features"].float().to(run.device))
    if writers:
        extra = dense(run.net, sid, tiles[sid]) if dense is not None else None
        reader, mask = get_slide(item["image"], run.backend), item.get("tumour_mask")
        coords = arrays["coords"].numpy()
        pred = SlidePrediction(sid, item["image"], reader, tiles[sid], coords, scores, run.out, names, mask, extra)
        for writer in writers:  # one picture must not cost this slide's probabilities or the next slides
            _write_guarded(run, writer, "write", pred, sid, item["image"])
    return {"slide_id": sid, "label": item["label"], "probs": scores["probs"].tolist(), "image": item["image"]}


def _tile_and_embed(run: SimpleNamespace, items: list[dict[str, Any]], tiling: Any, root: Path) -> tuple[dict, Any]:
    """Coordinates (``root/coords``, with the QC pictures for the main grid) and features (``root/features``) of the
    slides; returns ``(tiles, feature store)``."""
    main = root == run.out
    tiles = prepare_coords(
        items, tiling, CoordsStore(root / "coords"), report=run.report, backend=run.backend, progress=run.progress,
        qc_dir=root / "coords" / "qc" if main else None, tile_policy=run.tile_policy, assume_mpp=run.assume_mpp,
    )  # fmt: skip
    store = FeatureStore(root / "features")
    run.embed(
        tiles, run.embedder, store, tiling_signature(tiling), device=run.device, report=run.report,
        backend=run.backend, stain_normalize=run.stain_normalize,
    )  # fmt: skip
    return tiles, store


def _dense_patches(
    run: SimpleNamespace, items: list[dict[str, Any]], tiling: Any, stride: int
) -> Callable[..., dict[str, Any] | None]:
    """Tile and embed the overlapping patches (``out/heatmap/``); returns ``(net, slide_id, tiles) -> {"coords",
    "scores", "cell"}`` for :class:`SlidePrediction` (``None`` for a slide without them)."""
    dense_tiling = with_stride(tiling, stride)
    dense_tiles, store = _tile_and_embed(run, items, dense_tiling, run.out / "heatmap")
    params, fp = tiling_signature(dense_tiling), run.embedder.fingerprint()

    def scores(net: torch.nn.Module, sid: str, slide: Any) -> dict[str, Any] | None:
        if sid not in dense_tiles:
            return None
        item = dense_tiles[sid]
        key = feature_key(item["image"], slide_signature(params, item), fp, run.embed.dtype, run.stain_normalize)
        arrays = store.load(sid, key)
        if arrays is None or len(arrays["features"]) == 0:
            return None
        downsample = get_slide(item["image"], run.backend).level_downsamples[slide["level"]]
        cell = float(slide["read_size"]) * downsample * int(stride) / int(slide["patch_size"])
        found = patch_scores(net, arrays["features"].float().to(run.device))
        return {"coords": arrays["coords"].numpy(), "scores": found, "cell": cell}

    return scores


def _progress(items: Sequence[Any], progress: bool, pictures: bool) -> Any:
    if not progress:
        return items
    from monai_icmil.utils import progress_bar

    return progress_bar(items, desc="predict (scores + pictures)" if pictures else "predict", unit="slide")
