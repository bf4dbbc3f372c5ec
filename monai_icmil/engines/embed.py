# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The embed phase: every tissue patch of every slide through the current embedder, into the feature store.

:class:`Embed` is the phase as the bundle declares it (``embed`` in ``configs/train.json``). An ignite
:class:`EmbeddingEngine` runs the embedder over batches of patches; reader threads (or DataLoader workers) over
:class:`PatchBatches` read them by coordinate (cuCIM's own threads inside), so reading overlaps the forward pass. The
:class:`SlideFeatureWriter` handler gathers each slide's features and writes them atomically when the slide is
complete (on CUDA, once its features have reached the host, without stalling the GPU). Slides whose features are
current are skipped; a slide that fails to read is recorded in the run report and the others go on; nothing
half-written is left.

Under ``torchrun`` the pending slides are split across ranks, each slide written by exactly one rank.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, EventEnum, Events
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from monai_icmil.data.prefetch import Prefetcher
from monai_icmil.data.prepare import SlideTiles, slide_signature
from monai_icmil.data.report import RunReport
from monai_icmil.data.slide import get_slide
from monai_icmil.data.store import FeatureStore, feature_key
from monai_icmil.handlers.common import attach_handlers
from monai_icmil.networks.embedders import PatchEmbedder
from monai_icmil.transforms.stain import slide_stain_normalizer
from monai_icmil.utils import as_bool, default_device, dist_info

logger = logging.getLogger("monai_icmil.embed")

__all__ = [
    "Embed",
    "PatchBatches",
    "EmbeddingEngine",
    "EmbeddingEvents",
    "SlideFeatureWriter",
    "patch_loader",
]


class EmbeddingEvents(EventEnum):
    """Fired by :class:`SlideFeatureWriter`: a slide's features were written, or the slide failed."""

    SLIDE_COMPLETED = "slide_completed"
    SLIDE_FAILED = "slide_failed"


class PatchBatches(IterableDataset):
    """Batches of patches of several slides, read by coordinate; DataLoader workers take whole slides.

    Yields ``{"slide": index, "start": first patch index, "patches": uint8 [B, 3, H, W]}`` (channels-last strides:
    a view of ``[B, H, W, 3]``); a slide that fails to read yields ``{"slide": index, "error": message}`` and nothing
    more. :meth:`tasks` and :meth:`load` are the same work one batch at a time, for reader threads
    (:func:`patch_loader`).

    Args:
        slides: per slide, ``image``, ``coords``, ``level``, ``read_size``, ``patch_size``.
        batch_size: patches per batch.
        read_threads: decoding threads per read (cuCIM's thread pool).
        backend: slide backend.
        stain_normalize: Macenko-normalise the patches with the stains of their slide
            (:class:`~monai_icmil.transforms.stain.HEStainNormalizer`).
    """

    def __init__(
        self,
        slides: Sequence[Mapping[str, Any]],
        batch_size: int = 256,
        read_threads: int = 2,
        backend: str = "auto",
        stain_normalize: bool = False,
    ):
        self.slides, self.batch_size, self.read_threads, self.backend = list(slides), batch_size, read_threads, backend
        self.stain_normalize = stain_normalize
        self._failed: set[int] = set()  # slides not to read further in this process

    def tasks(self, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[int, int]]:
        """``(slide index, first patch)`` of every batch of this worker's slides, in order."""
        for index in range(worker, len(self.slides), num_workers):
            for start in range(0, len(self.slides[index]["coords"]), self.batch_size):
                yield index, start

    def load(self, task: tuple[int, int], pin_memory: bool = False) -> dict[str, Any]:
        """Read one batch; a read error is returned as ``{"slide": index, "error": message}``.

        Args:
            task: ``(slide index, first patch)`` from :meth:`tasks`.
            pin_memory: read straight into pinned host memory (CUDA), so the batch goes to the GPU without a copy.
        """
        index, start = task
        if index in self._failed:  # read ahead of the error: drop (the error itself was reported with its batch)
            return {"slide": index, "error": "an earlier batch of this slide failed"}
        s = self.slides[index]
        try:
            reader = get_slide(s["image"], self.backend)
            normalize = slide_stain_normalizer(s["image"], reader) if self.stain_normalize else None
            coords = s["coords"][start : start + self.batch_size]
            size = s["patch_size"]
            out = _pinned_batch((len(coords), size, size, 3)) if pin_memory and normalize is None else None
            patches = reader.read_patches(
                coords,
                s["read_size"],
                s["level"],
                out_size=size if size != s["read_size"] else None,
                num_workers=self.read_threads,
                as_tensor=True,
                out=out,
            )
            if normalize is not None:
                patches = normalize(patches)
                patches = patches.pin_memory() if pin_memory else patches
            return {"slide": index, "start": start, "patches": patches}
        except Exception as e:  # reported per slide; the other slides go on
            self._failed.add(index)
            return {"slide": index, "error": f"{type(e).__name__}: {e}"}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        yield from _until_failed(map(self.load, self.tasks(*((0, 1) if info is None else (info.id, info.num_workers)))))


def _pinned_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty ``uint8`` batch in pinned host memory (from PyTorch's caching host allocator, which reuses a block
    only once the non-blocking copies queued from it are done)."""
    return torch.empty(shape, dtype=torch.uint8, pin_memory=True)


def _until_failed(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``batches`` without those of a slide after its first error."""
    failed: set[int] = set()
    for batch in batches:
        if batch["slide"] in failed:
            continue
        if "error" in batch:
            failed.add(batch["slide"])
        yield batch


def _collate(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class EmbeddingEngine(Engine):
    """An ignite engine whose iteration embeds one batch of patches.

    Args:
        embedder: the patch embedder (normalises its own inputs).
        device: where to run it.
        amp: bf16 autocast (default: on for CUDA, off on CPU).
        channels_last: channels-last memory format (default on: measured 1.35x faster for ResNet18 on 2 CPU cores).
        copy_stream: on CUDA, move each batch to the GPU on a stream of its own, so the copy of the next batch runs
            while the current one is embedded instead of waiting behind it on the compute stream (ignored on CPU).
        compile: run the embedder through ``torch.compile`` with one fixed batch shape (default: on for CUDA, in
            ``"reduce-overhead"`` mode, which replays CUDA graphs; off on CPU, where the compile costs ~30 s and buys
            little); ``True`` compiles with inductor's default mode, a string is ``torch.compile``'s ``mode``
            (:func:`compile_setting`). Batches smaller than ``batch_size`` (a slide's last)
            are padded to it and the padding's features dropped, so the graph is compiled once; the compiled code is
            cached per process and architecture, so later rounds' embedders (same architecture, new weights) reuse it.
        batch_size: the fixed batch shape of the compiled embedder (default: the first batch's size).
    """

    def __init__(
        self,
        embedder: PatchEmbedder,
        device: str | torch.device = "cpu",
        amp: bool | None = None,
        channels_last: bool | None = None,
        copy_stream: bool = False,
        compile: bool | str | None = None,
        batch_size: int | None = None,
    ):
        super().__init__(self._iteration)
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.amp = as_bool(amp, "amp", cuda)
        self.channels_last = as_bool(channels_last, "channels_last", True)  # faster on CUDA and on CPU (oneDNN)
        self.embedder = embedder.to(self.device).eval()
        if self.channels_last:
            self.embedder = self.embedder.to(memory_format=torch.channels_last)
        self.copy_stream = torch.cuda.Stream(self.device) if copy_stream and cuda else None
        compile = compile_setting(compile)
        if compile is None:  # on CUDA CUDA graphs: 20.1-21.0k patches/s against 16.5-18.1k for inductor alone on one
            # H200 (ResNet50-trunc, 224 px, benchmarks/RESULTS.md, run 8), features equal
            compile = "reduce-overhead" if cuda else False
        self.compiled, self.compile_mode = bool(compile), compile if isinstance(compile, str) else None
        self.batch_size = batch_size
        self._forward = self.embedder
        self._proven = False  # whether a compiled call has succeeded (until then a failure falls back to eager)
        if self.compiled:
            self._forward = torch.compile(self.embedder, dynamic=False, mode=self.compile_mode)
        self.register_events(*EmbeddingEvents)

    def _compiled(self, x: torch.Tensor) -> torch.Tensor:
        """The compiled embedder on a batch of the fixed shape. If its first call fails (a compiler or CUDA-graph
        error, not the data), the engine warns and embeds eagerly from then on: the run goes on, slower."""
        if self._proven:
            return self._forward(x)
        try:
            out = self._forward(x)
        except Exception as e:  # noqa: BLE001 - any compile failure; eager runs the same model
            warnings.warn(
                f"torch.compile of the embedder (mode {self.compile_mode or 'default'}) failed at its first batch "
                f"({type(e).__name__}: {str(e)[:300]}); embedding eagerly instead, which is slower. Set "
                "embed#compile to false to skip the compile, or to another mode.",
                stacklevel=2,
            )
            self.compiled, self._forward = False, self.embedder
            return self.embedder(x)
        self._proven = True
        return out

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedder on ``x``; compiled, on ``x`` padded to the fixed batch shape (padding rows dropped)."""
        if not self.compiled:
            return self.embedder(x)
        n = x.shape[0]
        self.batch_size = self.batch_size or n
        if n == self.batch_size:
            return self._compiled(x)
        if n > self.batch_size:  # not expected from the loader: embed in fixed-size pieces
            # cloned: with CUDA graphs each replay reuses the previous piece's output memory
            return torch.cat([self._embed(part).clone() for part in x.split(self.batch_size)])
        with torch.inference_mode(False):  # a normal tensor like the loader's batches: the graph's guards hold
            padded = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
            if self.channels_last:
                padded = padded.contiguous(memory_format=torch.channels_last)
        return self._compiled(padded)[:n]

    def _to_device(self, patches: torch.Tensor) -> torch.Tensor:
        """``patches`` on the engine's device; with a copy stream, the compute stream waits for the copy only."""
        if self.copy_stream is None:
            return patches.to(self.device, non_blocking=True)
        with torch.cuda.stream(self.copy_stream):
            x = patches.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.copy_stream)
        x.record_stream(compute)  # its memory is not reused before the compute stream is done with it
        return x

    def _iteration(self, engine: Engine, batch: dict[str, Any]) -> dict[str, Any]:
        if "error" in batch:
            return batch
        x = self._to_device(batch["patches"])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            feats, ready = _to_host(self._embed(x))
        return {"slide": batch["slide"], "start": batch["start"], "features": feats, "ready": ready}


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_setting(value: bool | str | None) -> bool | str | None:
    """A ``compile`` setting: ``None`` (the device's default), a boolean (also as the strings ``as_bool`` takes) or
    one of ``torch.compile``'s modes (:data:`COMPILE_MODES`; ``"reduce-overhead"`` replays CUDA graphs).

    Raises:
        ValueError: anything else, naming the setting and the accepted values.
    """
    if isinstance(value, str) and value.strip().lower() in COMPILE_MODES:
        return value.strip().lower()
    try:
        return None if value is None else as_bool(value, "compile")
    except ValueError:
        raise ValueError(f"compile must be true, false or one of {', '.join(COMPILE_MODES)}; got {value!r}") from None


def _to_host(feats: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``feats`` as float32 on the host, and the CUDA event after which they are there (``None``: already there).

    On CUDA the copy goes into pinned memory without blocking, so the next batch is read, moved and launched while
    this one still runs; a blocking ``.cpu()`` per batch would leave the GPU idle for that time. Whoever reads the
    values first waits on the event (:class:`SlideFeatureWriter` does, once per slide).
    """
    if feats.device.type != "cuda":
        return feats.float().cpu(), None
    host = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(feats.float(), non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


class SlideFeatureWriter:
    """Gathers each slide's features from the engine's outputs and writes the slide when it is complete.

    On CUDA a slide's last features may still be on their way to the host when its last batch completes. The
    writer does not wait for them there: that would drain the GPU's queue at every slide and leave it idle while
    the slide is written (a concatenation and an fsync'ed file, 10-20 ms against ~120 ms of GPU work for a
    2,000-patch slide at 16k patches/s). Such a slide waits in a queue instead and is written on a later iteration
    once its copies have landed (its event says so without blocking), while the GPU runs the batches queued after
    it; :meth:`flush` (when the run completes, or is interrupted) waits for and writes the rest. Slides are written
    in the order they complete.

    Args:
        slides: the slides being embedded (same order as the :class:`PatchBatches`).
        store: the feature store.
        keys: ``{slide_id: feature key}``.
        dtype: stored feature dtype (``"float16"`` or ``"float32"``).
        report: failures are recorded here.
        meta: extra metadata stored with every slide (e.g. embedder name, round).
    """

    def __init__(
        self,
        slides: Sequence[Mapping[str, Any]],
        store: FeatureStore,
        keys: Mapping[str, Mapping[str, Any]],
        dtype: str = "float16",
        report: RunReport | None = None,
        meta: Mapping[str, Any] | None = None,
    ):
        self.slides, self.store, self.keys, self.report = slides, store, keys, report
        self.dtype = getattr(torch, dtype)
        self.meta = dict(meta or {})
        self.buffers: dict[int, dict[int, torch.Tensor]] = {}
        self.counts: dict[int, int] = {}
        self.failed: set[int] = set()
        self.written: list[str] = []
        self.landing: deque[tuple[int, Any]] = deque()  # complete slides whose copies to the host are in flight

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.flush)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        index = out["slide"]
        s = self.slides[index]
        if "error" in out:
            self.buffers.pop(index, None)
            self.failed.add(index)
            if self.report is not None:
                self.report.fail(s["slide_id"], s["image"], "embed", out["error"])
            warnings.warn(
                f"slide '{s['slide_id']}' ({s['image']}) failed during embedding: {out['error']}", stacklevel=2
            )
            engine.fire_event(EmbeddingEvents.SLIDE_FAILED)
            return
        if index in self.failed:
            return
        self.buffers.setdefault(index, {})[out["start"]] = out["features"]
        self.counts[index] = self.counts.get(index, 0) + len(out["features"])
        if self.counts[index] == len(s["coords"]):
            self.landing.append((index, out.get("ready")))
        self._write_landed(engine, wait=False)

    def flush(self, engine: Engine) -> None:
        """Wait for the copies still in flight and write their slides."""
        self._write_landed(engine, wait=True)

    def _write_landed(self, engine: Engine, wait: bool) -> None:
        # the copies were queued in order on one stream: a slide's last event covers all its batches, and once the
        # first slide in the queue has not landed, none after it has
        while self.landing:
            index, ready = self.landing[0]
            if ready is not None and not ready.query():
                if not wait:
                    return
                ready.synchronize()
            self.landing.popleft()
            parts = self.buffers.pop(index)
            s = self.slides[index]
            self.write(s, torch.cat([parts[k] for k in sorted(parts)]).to(self.dtype))
            engine.state.last_slide = s["slide_id"]
            engine.fire_event(EmbeddingEvents.SLIDE_COMPLETED)

    def write(self, s: Mapping[str, Any], feats: torch.Tensor) -> None:
        meta = {
            **self.meta,
            "num_patches": int(len(feats)),
            "slide_path": s["image"],
            "level": s["level"],
            "read_size": s["read_size"],
            "patch_size": s["patch_size"],
        }
        coords = torch.as_tensor(np.asarray(s["coords"], np.int64))
        self.store.save(s["slide_id"], {"features": feats, "coords": coords}, self.keys[s["slide_id"]], meta)
        if self.report is not None:
            self.report.succeed(s["slide_id"], "embed")
        self.written.append(s["slide_id"])


def patch_loader(
    slides: Sequence[Mapping[str, Any]],
    batch_size: int = 256,
    num_workers: int = 2,
    read_threads: int = 2,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    stain_normalize: bool = False,
    prefetch_threads: int = 1,
) -> Iterable[dict[str, Any]]:
    """The batches :class:`Embed` embeds (:class:`PatchBatches`), read ahead of the engine.

    The DataLoader can be iterated again; the reader threads' iterator, once.

    Args:
        slides, batch_size, read_threads, backend, stain_normalize: as for :class:`PatchBatches`.
        num_workers: DataLoader worker processes (each reads whole slides); 0: ``prefetch_threads`` reader threads
            in this process (:class:`~monai_icmil.data.prefetch.Prefetcher`), each reading whole batches, with no
            inter-process copies.
        device: batches for CUDA come in pinned memory; reader threads read straight into it.
        prefetch_threads: reader threads when ``num_workers`` is 0.
    """
    batches = PatchBatches(slides, batch_size, read_threads, backend, stain_normalize)
    pin = torch.device(device).type == "cuda"
    if num_workers > 0:
        return DataLoader(
            batches,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin,
            collate_fn=_collate,
            persistent_workers=False,
            prefetch_factor=4,
            in_order=False,  # a batch as soon as any worker has one: a slow slide (large, on a slow share) holds
            # up only its own worker (the writer gathers each slide's batches by position, in any order)
        )
    read = functools.partial(batches.load, pin_memory=pin)
    threads = int(prefetch_threads)
    return _until_failed(Prefetcher(read, batches.tasks(), threads, depth=max(4, threads + 2)))  # bounds pinned memory


class Embed:
    """ICMIL's embed phase as configured: every patch of every slide whose features are not current, through the
    embedder, into the feature store.

    Args:
        batch_size: patches per forward pass.
        num_workers: DataLoader worker processes reading patches; 0: ``prefetch_threads`` background reader threads
            in this process (:class:`~monai_icmil.data.prefetch.Prefetcher`), reading straight into pinned memory on
            CUDA.
        read_threads: decoding threads per read.
        prefetch_threads: reader threads when ``num_workers`` is 0.
        copy_stream: on CUDA, copy batches to the GPU on a stream of their own (:class:`EmbeddingEngine`).
        dtype: stored dtype, ``"float16"`` (default), ``"bfloat16"`` or ``"float32"`` (part of the feature key).
        amp: bf16 autocast (default on CUDA only).
        channels_last: channels-last memory format (default on).
        compile: ``torch.compile`` the embedder with a fixed batch shape (default on CUDA only, with CUDA graphs;
            ``True``: inductor's default mode; or a ``torch.compile`` mode; :class:`EmbeddingEngine`). Features equal
            the eager path's within the dtype's tolerance, so the setting is not part of the feature key.
        handlers: more handlers for the :class:`EmbeddingEngine` (e.g. on :class:`EmbeddingEvents`).
        progress: progress bars over slides and patches.

    Raises:
        ValueError: an unknown ``dtype``.
    """

    def __init__(
        self,
        batch_size: int = 256,
        num_workers: int = 2,
        read_threads: int = 2,
        prefetch_threads: int = 1,
        copy_stream: bool = False,
        dtype: str = "float16",
        amp: bool | None = None,
        channels_last: bool | None = None,
        compile: bool | str | None = None,
        handlers: Sequence[Any] = (),
        progress: bool = True,
    ):
        if dtype not in ("float16", "float32", "bfloat16"):
            raise ValueError(f"embed: dtype must be 'float16', 'float32' or 'bfloat16', got {dtype!r}")
        self.batch_size, self.num_workers, self.read_threads = int(batch_size), int(num_workers), int(read_threads)
        self.prefetch_threads, self.copy_stream, self.dtype = (
            int(prefetch_threads),
            as_bool(copy_stream, "copy_stream"),
            dtype,
        )
        self.amp, self.channels_last = as_bool(amp, "amp", None), as_bool(channels_last, "channels_last", None)
        self.handlers = list(handlers or [])
        self.compile = compile_setting(compile)
        self.progress = as_bool(progress, "progress")

    def __call__(
        self,
        slides: Mapping[str, SlideTiles] | Sequence[SlideTiles],
        embedder: PatchEmbedder,
        store: FeatureStore,
        tiling_params: Mapping[str, Any],
        device: str | torch.device | None = None,
        report: RunReport | None = None,
        backend: str = "auto",
        meta: Mapping[str, Any] | None = None,
        stain_normalize: bool = False,
    ) -> dict[str, Any]:
        """Embed the slides whose features are not current and write them to ``store``.

        Args:
            slides: the prepared slides (from :func:`~monai_icmil.data.prepare.prepare_coords`).
            embedder: the current embedder.
            store: the feature store (one file per slide).
            tiling_params: the tiling's description (part of the feature key).
            device: default CUDA when available, else CPU.
            report: failed and empty slides are recorded here.
            backend: slide backend.
            meta: extra metadata stored with each slide.
            stain_normalize: Macenko-normalise every patch with its slide's stains (part of the feature key).

        Returns:
            ``{"written": [...], "skipped": [...], "failed": [...], "empty": [...], "patches": n, "seconds": t,
            "patches_per_s": r, "steady_patches_per_s": r1, "fingerprint": f}`` for this rank; ``r1`` leaves out
            the start-up (loader start, first read, first forward): the patches after the first batch over the time
            from it to the last write, the rate a long run settles at (0 with fewer than two batches).
        """
        items = list(slides.values()) if isinstance(slides, Mapping) else list(slides)
        device = default_device(device)
        fingerprint = embedder.fingerprint()
        keys = {
            s["slide_id"]: feature_key(
                s["image"], slide_signature(tiling_params, s), fingerprint, self.dtype, stain_normalize
            )
            for s in items
        }
        pending, skipped, empty = _pending(items, store, keys)
        meta = {**dict(meta or {}), "embedder": embedder.name, "embedder_fingerprint": fingerprint}
        writer = SlideFeatureWriter(pending, store, keys, self.dtype, report, meta)
        for s in empty:  # an empty bag is recorded as such, so it is current and excluded from training
            writer.write(s, torch.zeros(0, embedder.out_dim, dtype=getattr(torch, self.dtype)))
            if report is not None:
                report.mark_empty(s["slide_id"], s["image"], "embed")
        t0 = time.perf_counter()
        pace = self._run(pending, embedder, writer, device, backend, stain_normalize) if pending else None
        seconds = time.perf_counter() - t0
        done = int(sum(len(s["coords"]) for s in pending if s["slide_id"] in set(writer.written)))
        logger.info(
            "embed: %d slide(s) written (%d patches, %.1f s), %d current, %d empty, %d failed",
            len(writer.written), done, seconds, len(skipped), len(empty), len(writer.failed),
        )  # fmt: skip
        return {
            "written": writer.written,
            "skipped": skipped,
            "failed": [pending[i]["slide_id"] for i in sorted(writer.failed)],
            "empty": [s["slide_id"] for s in empty],
            "patches": done,
            "seconds": seconds,
            "patches_per_s": done / seconds if seconds > 0 and done else 0.0,
            "steady_patches_per_s": pace.rate if pace is not None else 0.0,
            "fingerprint": fingerprint,
        }

    def _run(
        self,
        pending: list[SlideTiles],
        embedder: PatchEmbedder,
        writer: SlideFeatureWriter,
        device: torch.device,
        backend: str,
        stain_normalize: bool,
    ) -> _SteadyPace:
        """The engine over the pending slides' batches, with the writer, the pace and the progress bars."""
        engine = EmbeddingEngine(
            embedder, device, self.amp, self.channels_last, self.copy_stream, self.compile, self.batch_size
        )
        writer.attach(engine)
        pace = _SteadyPace()
        pace.attach(engine)
        attach_handlers(engine, self.handlers)
        total = int(sum(len(s["coords"]) for s in pending))
        bars = _attach_progress(engine, len(pending), total) if self.progress and dist_info()[0] == 0 else {}
        loader = patch_loader(
            pending, self.batch_size, self.num_workers, self.read_threads, device, backend, stain_normalize,
            self.prefetch_threads,
        )  # fmt: skip
        try:
            engine.run(loader, max_epochs=1)
        except BaseException:
            with contextlib.suppress(Exception):  # keep the slides completed before the error
                writer.flush(engine)
            raise
        finally:
            for bar in bars.values():
                bar.close()
        return pace


def _pending(
    items: Sequence[SlideTiles], store: FeatureStore, keys: Mapping[str, Any]
) -> tuple[list[SlideTiles], list[str], list[SlideTiles]]:
    """This rank's share of the slides: ``(to embed, current ids, empty)``. The full list is sharded first, then what
    is current skipped, so every rank sees the same shards even while others write."""
    rank, world = dist_info()
    pending, skipped, empty = [], [], []
    for s in items[rank::world]:
        if store.is_current(s["slide_id"], keys[s["slide_id"]]):
            skipped.append(s["slide_id"])
        elif len(s["coords"]) == 0:
            empty.append(s)
        else:
            pending.append(s)
    return pending, skipped, empty


class _SteadyPace:
    """Patches/s after the first batch: from its end to the end of the run (the last slide written)."""

    def __init__(self):
        self.first: float | None = None
        self.patches = 0
        self.rate = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.step)
        engine.add_event_handler(Events.COMPLETED, self.end)  # after the writer's flush: attached after it

    def step(self, engine: Engine) -> None:
        if "features" not in engine.state.output:
            return
        if self.first is None:
            self.first = time.perf_counter()
        else:
            self.patches += len(engine.state.output["features"])

    def end(self, _: Engine) -> None:
        if self.first is not None and self.patches:
            self.rate = self.patches / (time.perf_counter() - self.first)


def _attach_progress(engine: Engine, n_slides: int, n_patches: int) -> dict[str, Any]:
    from monai_icmil.utils import progress_bar

    bars: dict[str, Any] = {}

    @engine.on(Events.STARTED)
    def _open(_: Engine) -> None:
        bars["slides"] = progress_bar(total=n_slides, desc="embed slides", unit="slide", position=0)
        bars["patches"] = progress_bar(total=n_patches, desc="embed patches", unit="patch", position=1, leave=False)

    @engine.on(Events.ITERATION_COMPLETED)
    def _step(e: Engine) -> None:
        out = e.state.output
        if "features" in out:
            bars["patches"].update(len(out["features"]))

    @engine.on(EmbeddingEvents.SLIDE_COMPLETED)
    @engine.on(EmbeddingEvents.SLIDE_FAILED)
    def _slide(_: Engine) -> None:
        bars["slides"].update(1)

    return bars
