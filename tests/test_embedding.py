# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
from __future__ import annotations

import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from monai_icmil.data import load_datalist, open_slide
from monai_icmil.data.prepare import prepare_coords
from monai_icmil.data.report import RunReport
from monai_icmil.data.store import BagDataset, CoordsStore, FeatureStore, feature_key
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines import Embed
from monai_icmil.engines import embed as embedding_module
from monai_icmil.networks import EmbedderWeightsError, create_embedder

TILING = TilingConfig(patch_size=48, mpp=1.0)
ROOT = Path(__file__).resolve().parents[1]


def embed_slides(slides, embedder, store, tiling_params, **kw):
    """The embed phase configured with ``kw``'s settings (the rest are the call's), run on ``slides``."""
    call = {k: kw.pop(k) for k in ("device", "report", "backend", "meta", "stain_normalize") if k in kw}
    return Embed(**kw)(slides, embedder, store, tiling_params, **call)


@pytest.fixture(scope="module")
def prepared(synthetic_dataset, tmp_path_factory):
    items = load_datalist(synthetic_dataset)["training"]
    root = tmp_path_factory.mktemp("prepared")
    slides = prepare_coords(items, TILING, CoordsStore(root / "coords"), progress=False)
    return items, slides


@pytest.fixture(scope="module")
def small_embedder():
    torch.manual_seed(0)
    return create_embedder("resnet18_trunc", input_size=48)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _features(store, slides, fp):
    return {sid: store.load(sid, feature_key(s["image"], TILING.params(), fp))["features"] for sid, s in slides.items()}


# ------------------------------------------------------------------------------------------ embedder factory


def test_default_embedder_is_the_1024d_truncated_resnet50():
    e = create_embedder()
    assert e.name == "resnet50_trunc" and e.out_dim == 1024
    out = e(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8))
    assert out.shape == (2, 1024)
    assert not any(k.startswith("body.layer4") for k in e.backbone.state_dict())


def test_any_timm_model_is_a_pooled_feature_extractor():
    assert create_embedder("resnet18").out_dim == 512
    assert create_embedder("resnet18")(torch.zeros(3, 3, 64, 64)).shape == (3, 512)
    vit = create_embedder("vit_tiny_patch16_224")
    assert vit.out_dim == 192 and vit.input_size == 224
    assert vit.mean.flatten().tolist() == pytest.approx([0.5, 0.5, 0.5])  # from timm's pretrained config
    assert create_embedder("resnet18").mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_normalisation_travels_with_the_embedder():
    e = create_embedder("resnet18", mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5)).eval()
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    manual = (x.float() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / 0.5
    torch.testing.assert_close(e(x), e.backbone(manual))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_weights_load_from_local_files(tmp_path, suffix):
    full = timm.create_model("resnet50", pretrained=False)
    path = tmp_path / f"resnet50{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(full.state_dict(), str(path))
    else:
        torch.save({"state_dict": full.state_dict()}, path)  # nested checkpoints are unwrapped
    e = create_embedder("resnet50_trunc", weights=path)
    torch.testing.assert_close(e.backbone.body.layer3[0].conv1.weight, full.layer3[0].conv1.weight)


def test_own_checkpoint_round_trips_with_its_fingerprint(tmp_path, small_embedder):
    path = small_embedder.save(tmp_path / "embedder.safetensors")
    again = create_embedder(None, weights=path)
    assert again.name == "resnet18_trunc" and again.input_size == 48
    assert again.fingerprint() == small_embedder.fingerprint()
    x = torch.randint(0, 255, (2, 3, 48, 48), dtype=torch.uint8)
    torch.testing.assert_close(again.eval()(x), small_embedder.eval()(x))


def test_fingerprint_changes_with_weights_and_normalisation(small_embedder):
    other = create_embedder("resnet18_trunc", input_size=48)
    other.load_state_dict(small_embedder.state_dict())
    assert other.fingerprint() == small_embedder.fingerprint()
    with torch.no_grad():
        other.backbone.body.conv1.weight[0, 0, 0, 0] += 1e-3
    assert other.fingerprint() != small_embedder.fingerprint()
    renorm = create_embedder("resnet18_trunc", input_size=48, mean=(0.5, 0.5, 0.5))
    renorm.load_state_dict(small_embedder.state_dict())
    assert renorm.fingerprint() != small_embedder.fingerprint()


def test_mismatched_weights_name_the_file_and_the_first_bad_key(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), path)
    with pytest.raises(EmbedderWeightsError, match=r"r50\.pth.*key '.*layer1\.0\.conv1\.weight' has shape"):
        create_embedder("resnet18", weights=path)


def test_unreadable_weights_file_is_named(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(EmbedderWeightsError, match=r"cannot read weights file '.*garbage\.pth'"):
        create_embedder("resnet18", weights=path)
    with pytest.raises(EmbedderWeightsError, match=r"does not exist"):
        create_embedder("resnet18", weights=tmp_path / "missing.safetensors")


def test_hub_id_fails_fast_offline_and_says_to_pass_a_file(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: like a machine offline
    t0 = time.perf_counter()
    with pytest.raises(EmbedderWeightsError, match=r"not reachable.*Pass a local file"):
        create_embedder("resnet18", weights="hf-hub:timm/resnet18.not_cached_here")
    assert time.perf_counter() - t0 < 10
    # "models/UNI", a folder mistyped or relative to another directory, reads as a hub id: the message says so
    with pytest.raises(EmbedderWeightsError, match=r"not reachable.*If 'models/UNI' is meant as a path: no such file"):
        create_embedder("resnet18", weights="models/UNI")


# ------------------------------------------------------------------------------------------ engine and store


def test_features_equal_the_embedder_applied_to_the_patch_read_directly(prepared, small_embedder, tmp_path):
    items, slides = prepared
    store = FeatureStore(tmp_path / "features")
    result = embed_slides(
        slides, small_embedder, store, TILING.params(), batch_size=16, num_workers=0, progress=False, dtype="float32"
    )
    assert sorted(result["written"]) == sorted(slides)
    sid, s = next(iter(slides.items()))
    arrays = store.load(sid)
    assert arrays["features"].shape == (len(s["coords"]), 256) and arrays["features"].dtype == torch.float32
    np.testing.assert_array_equal(arrays["coords"].numpy(), s["coords"])
    reader = open_slide(s["image"], "openslide")  # another backend than the engine's, to check the plumbing
    for i in (0, len(s["coords"]) // 2, len(s["coords"]) - 1):
        patch = reader.read_patches(
            s["coords"][i : i + 1], s["read_size"], s["level"], out_size=s["patch_size"], as_tensor=True
        )
        with torch.inference_mode():
            direct = small_embedder.eval()(patch)[0]
        torch.testing.assert_close(arrays["features"][i], direct, atol=1e-4, rtol=1e-4)


class _Copies:
    """Stand-ins for the host copies the engine queues on CUDA, in order on one stream, and their events."""

    def __init__(self):
        self.queued: list[torch.Tensor] = []  # host buffers whose copies are still in flight
        self.waits = 0

    def queue(self, n: int, dim: int = 4) -> tuple[torch.Tensor, "_Copies.Event"]:
        self.queued.append(torch.zeros(n, dim))
        return self.queued[-1], self.Event(self, self.queued[-1])

    def land(self) -> None:  # the stream catches up: every copy queued so far lands
        while self.queued:
            self.queued.pop().fill_(7.0)

    class Event:
        def __init__(self, copies: "_Copies", buffer: torch.Tensor):
            self.copies, self.buffer = copies, buffer

        def query(self) -> bool:
            return not any(b is self.buffer for b in self.copies.queued)

        def synchronize(self) -> None:
            self.copies.waits += 1
            self.copies.land()


def _writer_and_engine(tmp_path, sizes):
    from types import SimpleNamespace

    slides = [
        {"slide_id": sid, "image": f"{sid}.tiff", "coords": np.zeros((n, 2), int), "level": 0, "read_size": 8}
        for sid, n in sizes.items()
    ]
    for s in slides:
        s["patch_size"] = 8
    store = FeatureStore(tmp_path)
    writer = embedding_module.SlideFeatureWriter(slides, store, {sid: {"k": 1} for sid in sizes}, "float32")
    fired = []
    engine = SimpleNamespace(state=SimpleNamespace(), fire_event=lambda e: fired.append(engine.state.last_slide))
    return writer, engine, store, fired


def test_writer_waits_for_the_queued_host_copies_once_per_slide_before_reading_them(tmp_path):
    """On CUDA the engine queues each batch's copy to the host and carries an event; nothing is read before the
    slide's copies have landed, and the writer never waits per batch (that would bring back the blocking copy)."""
    copies = _Copies()
    writer, engine, store, fired = _writer_and_engine(tmp_path, {"a": 5})
    for start, n in ((0, 2), (2, 3)):
        feats, ready = copies.queue(n)
        engine.state.output = {"slide": 0, "start": start, "features": feats, "ready": ready}
        writer(engine)
    assert copies.waits == 0 and store.slide_ids() == [] and fired == []  # complete, but still landing
    writer.flush(engine)  # the run completes
    assert copies.waits == 1 and fired == ["a"]
    assert store.load("a")["features"].eq(7.0).all()  # nothing was read before the copies landed


def test_writer_does_not_drain_the_gpu_at_each_slide_but_writes_it_once_its_copies_land(tmp_path):
    """A complete slide whose copies are in flight is written on a later iteration, when its event says they have
    landed, without ever blocking; slides are written in the order they completed."""
    copies = _Copies()
    writer, engine, store, fired = _writer_and_engine(tmp_path, {"a": 2, "b": 3, "c": 2, "d": 2})

    def step(index, start, n):
        feats, ready = copies.queue(n)
        engine.state.output = {"slide": index, "start": start, "features": feats, "ready": ready}
        writer(engine)

    step(0, 0, 2)  # a complete, its copy in flight
    step(1, 0, 2)
    assert store.slide_ids() == [] and fired == []
    copies.land()  # the GPU got through a and b's first batch while the main thread went on
    step(1, 2, 1)  # b complete (in flight); a has landed and is written now
    assert fired == ["a"] and store.slide_ids() == ["a"]
    step(2, 0, 2)  # c complete; b has not landed: neither is written, and nothing waits
    assert fired == ["a"] and copies.waits == 0
    copies.land()
    step(3, 0, 1)  # the next iteration writes both
    assert fired == ["a", "b", "c"] and copies.waits == 0
    for sid in "abc":
        assert store.load(sid)["features"].eq(7.0).all()


def test_slides_complete_on_the_gpu_are_written_at_the_end_and_on_an_interruption(
    prepared, small_embedder, tmp_path, monkeypatch
):
    """With copies whose events never report landed on their own, every slide is still written when the run ends
    (the writer waits then), and an interruption keeps the slides completed before it."""
    _, slides = prepared
    fp = small_embedder.fingerprint()
    plain = FeatureStore(tmp_path / "plain")
    embed_slides(slides, small_embedder, plain, TILING.params(), batch_size=16, num_workers=0, progress=False)

    class InFlight:
        waits = 0

        def query(self) -> bool:
            return False

        def synchronize(self) -> None:
            InFlight.waits += 1

    monkeypatch.setattr(embedding_module, "_to_host", lambda feats: (feats.float().cpu(), InFlight()))
    ended = FeatureStore(tmp_path / "ended")
    result = embed_slides(slides, small_embedder, ended, TILING.params(), batch_size=16, num_workers=0, progress=False)
    assert sorted(result["written"]) == sorted(slides) and InFlight.waits == len(slides)
    a, b = _features(plain, slides, fp), _features(ended, slides, fp)
    for sid in slides:
        torch.testing.assert_close(a[sid], b[sid])

    first = next(iter(slides.values()))
    batches_of_first = -(-len(first["coords"]) // 16)
    original, calls = embedding_module.EmbeddingEngine._iteration, {"n": 0}

    def interrupt_after_the_first_slide(self, engine, batch):
        calls["n"] += 1
        if calls["n"] > batches_of_first + 1:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, engine, batch)

    monkeypatch.setattr(embedding_module.EmbeddingEngine, "_iteration", interrupt_after_the_first_slide)
    cut = FeatureStore(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        embed_slides(slides, small_embedder, cut, TILING.params(), batch_size=16, num_workers=0, progress=False)
    assert cut.slide_ids() == [first["slide_id"]]  # complete but not yet landed when interrupted: kept
    assert not [p for p in cut.root.iterdir() if p.name.endswith(".tmp")]


def test_steady_rate_leaves_out_the_start_up(prepared, small_embedder, tmp_path, monkeypatch):
    """``steady_patches_per_s`` counts from the end of the first batch: a slow first read (a worker starting, a
    slide opening) lowers the whole-call rate but not the steady one."""
    _, slides = prepared
    delay, original, calls = 1.5, embedding_module.PatchBatches.load, {"n": 0}

    def slow_first_read(self, task, pin_memory=False):
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(delay)
        return original(self, task, pin_memory)

    monkeypatch.setattr(embedding_module.PatchBatches, "load", slow_first_read)
    res = embed_slides(slides, small_embedder, FeatureStore(tmp_path), TILING.params(), batch_size=16, num_workers=0)
    first = min(16, len(next(iter(slides.values()))["coords"]))
    assert res["seconds"] > delay and res["steady_patches_per_s"] > res["patches_per_s"] > 0
    steady_window = (res["patches"] - first) / res["steady_patches_per_s"]
    assert steady_window < res["seconds"] - delay + 0.5  # the delay is outside the steady window


def test_interrupted_extraction_resumes_and_matches_an_uninterrupted_run(
    prepared, small_embedder, tmp_path, monkeypatch
):
    _, slides = prepared
    fp = small_embedder.fingerprint()
    full = FeatureStore(tmp_path / "full")
    embed_slides(slides, small_embedder, full, TILING.params(), batch_size=16, num_workers=0, progress=False)

    store = FeatureStore(tmp_path / "interrupted")
    original = embedding_module.SlideFeatureWriter.write
    calls = {"n": 0}

    def write_then_die(self, s, feats):
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls["n"] += 1
        original(self, s, feats)

    monkeypatch.setattr(embedding_module.SlideFeatureWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        embed_slides(slides, small_embedder, store, TILING.params(), batch_size=16, num_workers=0, progress=False)
    monkeypatch.setattr(embedding_module.SlideFeatureWriter, "write", original)
    assert len(store.slide_ids()) == 2
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]  # nothing half-written
    resumed = embed_slides(slides, small_embedder, store, TILING.params(), batch_size=16, num_workers=0, progress=False)
    assert len(resumed["skipped"]) == 2 and len(resumed["written"]) == len(slides) - 2
    a, b = _features(full, slides, fp), _features(store, slides, fp)
    for sid in slides:
        torch.testing.assert_close(a[sid], b[sid], atol=2e-3, rtol=1e-3)


def test_store_recomputes_when_weights_or_tiling_change(prepared, small_embedder, tmp_path):
    _, slides = prepared
    store = FeatureStore(tmp_path / "f")
    first = embed_slides(slides, small_embedder, store, TILING.params(), num_workers=0, progress=False)
    assert len(first["written"]) == len(slides)
    again = embed_slides(slides, small_embedder, store, TILING.params(), num_workers=0, progress=False)
    assert again["written"] == [] and len(again["skipped"]) == len(slides)
    changed = create_embedder("resnet18_trunc", input_size=48)
    changed.load_state_dict(small_embedder.state_dict())
    with torch.no_grad():
        changed.backbone.body.layer3[0].conv1.weight.mul_(1.01)
    after = embed_slides(slides, changed, store, TILING.params(), num_workers=0, progress=False)
    assert len(after["written"]) == len(slides)
    other_tiling = {**TILING.params(), "min_tissue": 0.6}
    sid = next(iter(slides))
    assert not store.is_current(sid, feature_key(slides[sid]["image"], other_tiling, changed.fingerprint()))
    assert store.is_current(sid, feature_key(slides[sid]["image"], TILING.params(), changed.fingerprint()))


def test_workers_and_reader_threads_read_in_parallel_and_give_the_same_features(prepared, small_embedder, tmp_path):
    _, slides = prepared
    fp = small_embedder.fingerprint()
    s0, s2, t3 = FeatureStore(tmp_path / "w0"), FeatureStore(tmp_path / "w2"), FeatureStore(tmp_path / "t3")
    embed_slides(slides, small_embedder, s0, TILING.params(), batch_size=16, num_workers=0, progress=False)
    embed_slides(slides, small_embedder, s2, TILING.params(), batch_size=16, num_workers=2, progress=False)
    embed_slides(
        slides, small_embedder, t3, TILING.params(), batch_size=16, num_workers=0, prefetch_threads=3, progress=False
    )
    a, b, c = _features(s0, slides, fp), _features(s2, slides, fp), _features(t3, slides, fp)
    for sid in slides:
        torch.testing.assert_close(a[sid], b[sid])
        torch.testing.assert_close(a[sid], c[sid])


def test_a_slow_slide_holds_up_only_its_own_worker(prepared, small_embedder, tmp_path, monkeypatch):
    """Worker processes hand over batches as they finish them: while one worker is stuck on a slow slide, the other's
    batches flow (in order, the loader would alternate and wait for the slow one), and the features are the same."""
    _, slides = prepared
    items = list(slides.values())[:2]
    slow_image = items[0]["image"]
    original = embedding_module.PatchBatches.load

    def slow_on_the_first_slide(self, task, pin_memory=False):
        if self.slides[task[0]]["image"] == slow_image:
            time.sleep(0.4)
        return original(self, task, pin_memory)

    monkeypatch.setattr(embedding_module.PatchBatches, "load", slow_on_the_first_slide)  # workers are forked
    order = [b["slide"] for b in embedding_module.patch_loader(items, batch_size=16, num_workers=2, read_threads=1)]
    slow = [i for i, index in enumerate(order) if index == 0]
    fast = [i for i, index in enumerate(order) if index == 1]
    assert len(slow) >= 3 and len(fast) >= 3
    assert max(fast) < slow[1], order  # the fast slide is done before the slow one's second batch
    monkeypatch.setattr(embedding_module.PatchBatches, "load", original)
    a = FeatureStore(tmp_path / "workers")
    embed_slides(items, small_embedder, a, TILING.params(), batch_size=16, num_workers=2, progress=False)
    b = FeatureStore(tmp_path / "serial")
    embed_slides(items, small_embedder, b, TILING.params(), batch_size=16, num_workers=0, progress=False)
    for s in items:
        torch.testing.assert_close(a.load(s["slide_id"])["features"], b.load(s["slide_id"])["features"])


def test_reader_threads_give_the_batches_of_a_serial_read_in_order(prepared):
    """Three reader threads, each reading whole batches of any slide: the same batches, pixels and order as one
    serial pass, in channels-last layout (a view of ``[B, H, W, 3]``, as the engine runs the model)."""
    _, slides = prepared
    items = list(slides.values())[:3]
    serial = list(embedding_module.PatchBatches(items, batch_size=16, read_threads=1))
    threaded = list(embedding_module.patch_loader(items, 16, num_workers=0, read_threads=1, prefetch_threads=3))
    assert [(b["slide"], b["start"]) for b in threaded] == [(b["slide"], b["start"]) for b in serial]
    assert len(serial) > 6  # several batches per slide, so threads overlap within and across slides
    for x, y in zip(threaded, serial):
        torch.testing.assert_close(x["patches"], y["patches"], rtol=0, atol=0)
        assert x["patches"].is_contiguous(memory_format=torch.channels_last)


def test_reader_threads_reaching_a_new_slide_together_open_and_stain_fit_it_once(prepared, tmp_path, monkeypatch):
    import collections
    import shutil

    from monai_icmil.data import slide as slide_module

    _, slides = prepared
    items = []
    for k, s in enumerate(list(slides.values())[:2]):  # fresh paths: nothing cached yet
        shutil.copy(s["image"], tmp_path / f"copy_{k}.tiff")
        items.append({**s, "image": str(tmp_path / f"copy_{k}.tiff")})
    opened, thumbs = collections.Counter(), collections.Counter()
    open_slide, thumbnail = slide_module.open_slide, slide_module.SlideReader.thumbnail

    def slow_open(path, backend="auto", mpp=None, **kwargs):
        opened[path] += 1
        time.sleep(0.05)  # the threads all miss the cache inside this window
        return open_slide(path, backend, mpp, **kwargs)

    def counted_thumbnail(self, *args, **kwargs):
        thumbs[self.path] += 1
        return thumbnail(self, *args, **kwargs)

    monkeypatch.setattr(slide_module, "open_slide", slow_open)
    monkeypatch.setattr(slide_module.SlideReader, "thumbnail", counted_thumbnail)
    batches = list(
        embedding_module.patch_loader(items, 4, 0, 1, stain_normalize=True, prefetch_threads=4)  # 4 batches in flight
    )
    assert len(batches) > 8 and all("patches" in b for b in batches)
    assert sorted(opened.values()) == [1, 1] and sorted(thumbs.values()) == [1, 1]


def test_reader_threads_for_cuda_read_straight_into_the_pinned_buffers(prepared, monkeypatch):
    """For CUDA each batch is read into a buffer from the pinned allocator, and that buffer is what goes to the
    engine: no copy after the read (the allocator is replaced by plain memory here; there is no GPU)."""
    _, slides = prepared
    items = list(slides.values())[:2]
    buffers = []

    def fake_pinned(shape):
        buffers.append(torch.empty(shape, dtype=torch.uint8))
        return buffers[-1]

    monkeypatch.setattr(embedding_module, "_pinned_batch", fake_pinned)
    batches = list(embedding_module.patch_loader(items, 16, 0, 1, device="cuda", prefetch_threads=2))
    serial = list(embedding_module.PatchBatches(items, batch_size=16, read_threads=1))
    assert len(buffers) == len(batches) == len(serial)
    assert sorted(b["patches"].data_ptr() for b in batches) == sorted(t.data_ptr() for t in buffers)
    for x, y in zip(batches, serial):
        torch.testing.assert_close(x["patches"], y["patches"], rtol=0, atol=0)


def test_copy_stream_moves_each_batch_on_its_own_stream_and_the_forward_waits_for_it(small_embedder, monkeypatch):
    """With ``copy_stream`` each batch is copied inside the copy stream's context; the compute stream then waits for
    the copy stream and holds the batch's memory before the forward runs; the features are those of the plain path
    (the streams are stand-ins here; there is no GPU)."""
    import contextlib

    log: list[str] = []

    class Stream:
        def __init__(self, name: str):
            self.name = name

        def wait_stream(self, other: "Stream") -> None:
            log.append(f"{self.name} waits for {other.name}")

    copy, compute = Stream("copy"), Stream("compute")

    @contextlib.contextmanager
    def in_stream(s: Stream):
        log.append(f"enter {s.name}")
        yield
        log.append(f"leave {s.name}")

    plain = embedding_module.EmbeddingEngine(small_embedder, "cpu")
    engine = embedding_module.EmbeddingEngine(small_embedder, "cpu", copy_stream=True)
    assert engine.copy_stream is None  # ignored on the CPU
    engine.copy_stream = copy
    patches = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    expected = plain._iteration(plain, {"slide": 0, "start": 0, "patches": patches})["features"]

    move = torch.Tensor.to
    monkeypatch.setattr(torch.cuda, "stream", in_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(f"held by {s.name}"))
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: (log.append("copy"), move(t, *a, **k))[1])
    hook = engine.embedder.register_forward_pre_hook(lambda *_: log.append("forward"))
    try:
        out = engine._iteration(engine, {"slide": 0, "start": 0, "patches": patches})
    finally:
        hook.remove()  # the embedder is the module's
    assert log[: log.index("forward") + 1] == [
        "enter copy",
        "copy",
        "leave copy",
        "compute waits for copy",
        "held by compute",
        "forward",
    ]
    torch.testing.assert_close(out["features"], expected)


@pytest.mark.parametrize("threads", [1, 3])
def test_slide_failing_midway_is_reported_and_the_others_continue(
    synthetic_dataset, small_embedder, tmp_path, monkeypatch, threads
):
    """One slide starts failing after two batches (as on a dropped network share), one was truncated after tiling:
    each is reported once, with its reason, nothing of either is written, and the third slide is."""
    import shutil
    import warnings

    from monai_icmil.data.slide import SlideError, SlideReader

    items = [dict(e) for e in load_datalist(synthetic_dataset)["training"][:3]]
    for k, name in ((0, "broken"), (1, "truncated")):
        shutil.copy(items[k]["image"], tmp_path / f"{name}.tiff")
        items[k] = {**items[k], "image": str(tmp_path / f"{name}.tiff"), "slide_id": name}
    slides = prepare_coords(items, TILING, CoordsStore(tmp_path / "coords"), progress=False)
    later = {tuple(xy) for xy in np.asarray(slides["broken"]["coords"][16:]).tolist()}
    assert len(later) > 8  # more batches after the failure, which must not be read or written
    read = SlideReader.read_patches
    failed_reads = []

    def fail_midway(self, locations, *args, **kwargs):
        if self.path.endswith("broken.tiff") and later & {tuple(xy) for xy in np.asarray(locations).tolist()}:
            failed_reads.append(len(locations))
            raise SlideError(self.path, "Input/output error while reading tile data")
        return read(self, locations, *args, **kwargs)

    monkeypatch.setattr(SlideReader, "read_patches", fail_midway)
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size * 2 // 3])  # after tiling
    report = RunReport(tmp_path / "report.json")
    store = FeatureStore(tmp_path / "features")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = embed_slides(
            slides,
            small_embedder,
            store,
            TILING.params(),
            batch_size=8,
            num_workers=0,
            prefetch_threads=threads,
            report=report,
            progress=False,
        )
    failures = sorted(str(w.message) for w in caught if "failed during embedding" in str(w.message))
    assert len(failures) == 2  # once per slide, although several of its batches were in flight
    assert "'broken'" in failures[0] and "'truncated'" in failures[1]
    assert 1 <= len(failed_reads) <= threads  # after its first error, only reads already running touch the slide
    assert result["failed"] == ["broken", "truncated"] and result["written"] == [items[2]["slide_id"]]
    assert store.slide_ids() == [items[2]["slide_id"]]  # nothing half-written for the failed slides
    saved = RunReport(tmp_path / "report.json")
    assert "Input/output error" in saved.failed["broken"]["reason"]
    assert "truncated" in saved.failed["truncated"]["reason"] and "Copy it again" in saved.failed["truncated"]["reason"]


def test_zero_patch_slide_is_an_empty_bag_excluded_from_training(
    blank_slide, synthetic_dataset, small_embedder, tmp_path
):
    items = load_datalist(synthetic_dataset)["training"][:1] + [{"image": blank_slide, "slide_id": "blank", "label": 0}]
    report = RunReport(tmp_path / "report.json")
    slides = prepare_coords(items, TILING, CoordsStore(tmp_path / "coords"), report=report, progress=False)
    assert len(slides["blank"]["coords"]) == 0
    store = FeatureStore(tmp_path / "features")
    result = embed_slides(slides, small_embedder, store, TILING.params(), num_workers=0, report=report, progress=False)
    assert result["empty"] == ["blank"] and "blank" in report.empty
    fp = small_embedder.fingerprint()
    keys = {s["slide_id"]: feature_key(s["image"], TILING.params(), fp) for s in slides.values()}
    with pytest.warns(UserWarning, match="empty bag left out: blank"):
        ds = BagDataset(store, items, keys)
    assert len(ds) == 1 and ds[0]["slide_id"] == items[0]["slide_id"]


def test_bag_dataset_serves_bags_subsamples_and_refuses_stale_features(prepared, small_embedder, tmp_path):
    items, slides = prepared
    store = FeatureStore(tmp_path / "f")
    embed_slides(slides, small_embedder, store, TILING.params(), num_workers=0, progress=False)
    fp = small_embedder.fingerprint()
    keys = {s["slide_id"]: feature_key(s["image"], TILING.params(), fp) for s in slides.values()}
    ds = BagDataset(store, items, keys)
    bag = ds[0]
    assert bag["features"].dtype == torch.float32 and bag["features"].shape[1] == 256
    assert bag["label"].item() == items[0]["label"] and bag["slide_id"] == items[0]["slide_id"]
    sub = BagDataset(store, items, keys, max_instances=5)
    assert sub[0]["features"].shape == (5, 256)
    stale = {k: {**v, "embedder": "another"} for k, v in keys.items()}
    with pytest.raises(FileNotFoundError, match="missing or stale.*run the embedding phase"):
        BagDataset(store, items, stale)


def test_bag_dimensions_are_checked_from_the_file_headers_without_loading_a_bag(
    prepared, small_embedder, tmp_path, monkeypatch
):
    from monai_icmil.engines.bag_phase import check_bag_dims, feature_stats

    items, slides = prepared
    store = FeatureStore(tmp_path / "f")
    embed_slides(slides, small_embedder, store, TILING.params(), num_workers=0, progress=False)
    fp = small_embedder.fingerprint()
    ds = BagDataset(
        store, items, {s["slide_id"]: feature_key(s["image"], TILING.params(), fp) for s in slides.values()}
    )
    assert ds.feature_dims() == {i["slide_id"]: 256 for i in items}
    mean, sd = feature_stats(ds)
    bar_mean, bar_sd = feature_stats(ds, chunk=7, progress=True)  # the bar and the chunking change nothing
    torch.testing.assert_close(bar_mean, mean)
    torch.testing.assert_close(bar_sd, sd)
    monkeypatch.setattr(FeatureStore, "load", lambda *a, **k: pytest.fail("a bag was loaded"))
    check_bag_dims(ds, 256)
    with pytest.raises(ValueError, match=rf"slide '{items[0]['slide_id']}' has 256-d features .* expects 512-d"):
        check_bag_dims(ds, 512)
    monkeypatch.undo()
    sid = items[0]["slide_id"]
    store.save(sid, {"features": np.zeros((3, 64), np.float32), "coords": np.zeros((3, 2), np.int64)}, {"k": 2})
    with pytest.raises(FileNotFoundError, match=f"features of slide '{sid}' changed on disk"):
        check_bag_dims(ds, 256)  # a file replaced after the dataset was made: as reading its bag would say


def test_two_ranks_under_torchrun_write_each_slide_once_and_match_one_process(synthetic_dataset, tmp_path, monkeypatch):
    script = ROOT / "tests" / "dist_embed_script.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # the single process: the script's main here (one thread, as each rank has)
    monkeypatch.setattr(
        sys, "argv", [str(script), "--datalist", str(synthetic_dataset), "--out", str(tmp_path / "single")]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # (the script seeds the global generator)
            runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    dist_cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(script),
        "--datalist",
        str(synthetic_dataset),
        "--out",
        str(tmp_path / "dist"),
    ]
    two = subprocess.run(dist_cmd, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one, many = FeatureStore(tmp_path / "single"), FeatureStore(tmp_path / "dist")
    assert one.slide_ids() == many.slide_ids() and len(one.slide_ids()) == 4
    ranks = [many.metadata(sid)["rank"] for sid in many.slide_ids()]
    assert sorted(ranks) == [0, 0, 1, 1]  # each slide written by exactly one rank, the work split in two
    for sid in one.slide_ids():
        torch.testing.assert_close(one.load(sid)["features"], many.load(sid)["features"])


def test_the_compiled_embedder_pads_each_slides_last_batch_and_gives_the_eager_features(prepared, tmp_path):
    """``compile: true`` (the default on CUDA) compiles the embedder once for one batch shape: each slide's last,
    smaller batch is padded, and every slide's features equal the eager path's."""
    from torch._dynamo.utils import counters

    _, slides = prepared
    slides = dict(list(slides.items())[:2])
    assert all(len(s["coords"]) % 32 for s in slides.values())  # every slide ends on a smaller batch
    torch.manual_seed(0)
    embedder = create_embedder("resnet18_trunc", input_size=48)
    params, fp = TILING.params(), embedder.fingerprint()
    eager, compiled = FeatureStore(tmp_path / "eager"), FeatureStore(tmp_path / "compiled")
    common = dict(batch_size=32, num_workers=0, progress=False, device="cpu")
    embed_slides(slides, embedder, eager, params, compile=False, **common)
    counters.clear()
    embed_slides(slides, embedder, compiled, params, compile="true", **common)
    assert counters["stats"]["unique_graphs"] == 1  # one shape, one graph, for every batch of both slides
    want, got = _features(eager, slides, fp), _features(compiled, slides, fp)
    for sid in slides:
        assert got[sid].shape == want[sid].shape
        torch.testing.assert_close(got[sid].float(), want[sid].float(), atol=2e-3, rtol=2e-3)  # stored as float16
    assert embedding_module.EmbeddingEngine(embedder, "cpu").compiled is False  # off on the CPU unless asked


def test_a_compile_that_fails_at_the_first_batch_warns_and_embeds_eagerly(prepared, tmp_path, monkeypatch):
    """A compiler or CUDA-graph failure (here: a stand-in that raises) does not stop the run: a warning names the
    fix, and every slide's features are the eager ones."""
    _, slides = prepared
    slides = dict(list(slides.items())[:2])
    embedder = create_embedder("resnet18_trunc", input_size=48)
    params, fp = TILING.params(), embedder.fingerprint()
    common = dict(batch_size=32, num_workers=0, progress=False, device="cpu")
    eager = FeatureStore(tmp_path / "eager")
    embed_slides(slides, embedder, eager, params, compile=False, **common)

    def broken(*args, **kwargs):
        def call(x):
            raise RuntimeError("stand-in compiler failure")

        return call

    monkeypatch.setattr(embedding_module.torch, "compile", broken)
    fallback = FeatureStore(tmp_path / "fallback")
    with pytest.warns(UserWarning, match=r"failed at its first batch \(RuntimeError: stand-in.*embed#compile to false"):
        embed_slides(slides, embedder, fallback, params, compile="reduce-overhead", **common)
    want, got = _features(eager, slides, fp), _features(fallback, slides, fp)
    for sid in slides:
        torch.testing.assert_close(got[sid], want[sid])


def test_compile_takes_a_boolean_or_a_torch_compile_mode_and_names_the_choices_otherwise():
    """``embed#compile``: true/false (also as strings from the command line) or one of torch.compile's modes, which
    the engine passes on; anything else fails naming the accepted values."""
    from monai_icmil.engines.embed import compile_setting

    assert compile_setting(None) is None and compile_setting("true") is True and compile_setting(0) is False
    assert compile_setting(" Reduce-Overhead ") == "reduce-overhead"
    with pytest.raises(ValueError, match="compile must be true, false or one of default, reduce-overhead"):
        compile_setting("fast")
    embedder = create_embedder("resnet18_trunc", input_size=48)
    engine = embedding_module.EmbeddingEngine(embedder, "cpu", compile="max-autotune-no-cudagraphs")
    assert engine.compiled and engine.compile_mode == "max-autotune-no-cudagraphs"
    assert embedding_module.EmbeddingEngine(embedder, "cpu", compile=True).compile_mode is None  # inductor's default


def test_a_vit_model_folder_loads_offline_with_its_own_architecture_arguments_and_normalisation(vit_folder, tmp_path):
    """A UNI-style folder (timm config.json + weights): no name needed, the file's model_args (layer scale, register
    tokens, dynamic image size) and normalisation are used, the call's arguments win, .bin weights load too."""
    import shutil

    import timm
    from conftest import VIT_ARGS
    from safetensors.torch import load_file

    reference = timm.create_model("vit_small_patch16_224", pretrained=False, **VIT_ARGS).eval()
    reference.load_state_dict(load_file(str(vit_folder / "model.safetensors")))
    embedder = create_embedder(None, weights=vit_folder).eval()
    assert embedder.name == "vit_small_patch16_224" and embedder.input_size == 32 and embedder.out_dim == 64
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(embedder(x), reference((x.float() / 255 - 0.5) / 0.25))
        assert embedder(torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)).shape == (2, 64)  # other sizes
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    shutil.copy(vit_folder / "config.json", bin_folder)
    torch.save(load_file(str(vit_folder / "model.safetensors")), bin_folder / "pytorch_model.bin")
    from_bin = create_embedder(None, weights=bin_folder / "pytorch_model.bin", input_size=48, mean=(0.4, 0.4, 0.4))
    assert from_bin.input_size == 48 and from_bin.mean.flatten().tolist() == pytest.approx([0.4] * 3)
    assert from_bin.std.flatten().tolist() == pytest.approx([0.25] * 3)
    with pytest.warns(UserWarning, match="holds a 'vit_small_patch16_224'"):
        assert create_embedder("resnet50_trunc", weights=vit_folder).fingerprint() == embedder.fingerprint()
    saved = create_embedder(None, weights=embedder.save(tmp_path / "own.safetensors"))  # our checkpoint of it
    assert saved.fingerprint() == embedder.fingerprint() and saved.input_size == 32
    with pytest.raises(EmbedderWeightsError, match="no weights file"):
        create_embedder(None, weights=tmp_path)


def test_the_phases_read_command_line_words_for_their_device_settings_and_none_as_the_devices_default():
    """``--embed#phase#amp false`` passes the string "false": read as off, not as a true string; None keeps the
    device's default (CPU here: no autocast; channels-last on)."""
    from monai_icmil.engines.embedder_phase import EmbedderPhase
    from monai_icmil.engines.pretrain import Pretrain

    embed = Embed(amp="false", channels_last="off", progress=False)
    assert embed.amp is False and embed.channels_last is False
    for phase in (EmbedderPhase(device="cpu"), Pretrain(device="cpu")):
        assert phase.amp is False and phase.channels_last is True and phase.views_on_device is False
    for phase in (
        EmbedderPhase(device="cpu", amp="no", channels_last="false", views_on_device="true"),
        Pretrain(device="cpu", amp="0", channels_last="False", views_on_device="on"),
    ):
        assert phase.amp is False and phase.channels_last is False and phase.views_on_device is True
    with pytest.raises(ValueError, match="'amp' must be a boolean"):
        EmbedderPhase(device="cpu", amp="sometimes")
