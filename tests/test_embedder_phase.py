# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai_icmil.data import load_datalist
from monai_icmil.data.prepare import prepare_coords
from monai_icmil.data.store import CoordsStore
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines import embedder_phase as phase_module
from monai_icmil.engines.bag_phase import load_bag_classifier, save_bag_classifier
from monai_icmil.engines.embedder_phase import (
    DistillationBatches,
    EmbedderPhase,
    EmbedderPhaseError,
    InstanceClassifier,
    StudentStep,
    normal_slide_targets,
    view_consistency,
)
from monai_icmil.losses import ICMILDistillationLoss, confidence_weights
from monai_icmil.networks import create_aggregator, create_embedder
from monai_icmil.networks.aggregators import min_max_normalize
from monai_icmil.transforms import BatchRandomViews
from monai_icmil.utils import stable_hash

TILING = TilingConfig(patch_size=48, mpp=1.0)
FAST = dict(epochs=1, batch_size=16, val_patches=32, num_workers=0, progress=False, device="cpu")


def finetune_embedder(embedder, aggregator, train, val, output_dir, lr=1e-5, confidence=False, beta=None, **kw):
    """The embedder phase as train.json configures it (Adam, ICMIL's loss and views), with these tests' settings."""
    phase = EmbedderPhase(
        loss_function=ICMILDistillationLoss(confidence=confidence, beta=beta),
        optimizer=functools.partial(torch.optim.Adam, lr=lr, weight_decay=1e-4),
        **kw,
    )
    return phase(embedder, aggregator, train, val, output_dir)


@pytest.fixture(scope="module")
def slides(synthetic_dataset, tmp_path_factory):
    dl = load_datalist(synthetic_dataset)
    store = CoordsStore(tmp_path_factory.mktemp("coords"))
    train = prepare_coords(dl["training"], TILING, store, progress=False)
    val = prepare_coords(dl["validation"], TILING, store, progress=False)
    return list(train.values()), list(val.values())


def _teacher(name: str, in_dim: int, seed: int = 0):
    """A bag classifier with a confident head, so the teacher's probabilities are far from uniform."""
    torch.manual_seed(seed)
    agg = create_aggregator(name, in_dim, 2, hidden_dim=32)
    with torch.no_grad():
        agg.head.weight.mul_(30.0)
    return agg


def _kl(student, teacher):
    return (F.softmax(teacher, -1) * (F.log_softmax(teacher, -1) - F.log_softmax(student, -1))).mean()


# ------------------------------------------------------------------------------------------------------- loss


def test_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    s_view, t, s_head = (torch.randn(4, 2, generator=g) for _ in range(3))
    h_s, h_t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    out = ICMILDistillationLoss()(s_view, t, s_head, h_s, h_t)
    expected = _kl(s_view, t) + 0.5 * _kl(s_head, t) + 0.5 * _kl(h_s, h_t)
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["view"], _kl(s_view, t))


def test_feature_term_adds_the_students_own_reduction_against_the_teachers():
    g = torch.Generator().manual_seed(2)
    s_view, t, s_head = (torch.randn(4, 2, generator=g) for _ in range(3))
    h_s, h_t, h_view = (torch.randn(4, 5, generator=g) for _ in range(3))
    plain = ICMILDistillationLoss()(s_view, t, s_head, h_s, h_t)
    out = ICMILDistillationLoss(feature_weight=0.7)(s_view, t, s_head, h_s, h_t, student_view_reduce=h_view)
    squared = ((h_view - h_t) ** 2).sum() / h_view.numel()
    torch.testing.assert_close(out["feature"], squared)
    torch.testing.assert_close(out["loss"], plain["loss"] + 0.7 * squared)
    # off (ICMIL's loss, the default): the student's own reduction is not used
    off = ICMILDistillationLoss()(s_view, t, s_head, h_s, h_t, student_view_reduce=h_view)
    assert "feature" not in off and torch.equal(off["loss"], plain["loss"])
    with pytest.raises(ValueError, match="reduced features of its views"):
        ICMILDistillationLoss(feature_weight=0.7)(s_view, t, s_head, h_s, h_t)
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="feature_weight must be a finite number >= 0"):
            ICMILDistillationLoss(feature_weight=bad)
    # the plain phase's resume key is the one it had before the term existed; the term's weight keys its own
    plain_key = stable_hash(EmbedderPhase(loss_function=ICMILDistillationLoss(feature_weight=0)).signature())
    assert plain_key == stable_hash(EmbedderPhase().signature()) == "6d2dfcfb386b0850"  # the key at f111372
    assert stable_hash(EmbedderPhase(loss_function=ICMILDistillationLoss(feature_weight=1)).signature()) != plain_key


def test_student_step_returns_the_students_outputs_and_its_reduction_of_its_own_view_features():
    torch.manual_seed(0)
    embedder = create_embedder("resnet18_trunc", input_size=32)
    student = InstanceClassifier(embedder, _teacher("abmil", embedder.out_dim)).eval()
    view, f_t = torch.rand(5, 3, 32, 32), torch.randn(5, embedder.out_dim)
    with torch.no_grad():
        logits, h_on_t, logits_on_t, h_view = StudentStep(student)(view, f_t)
        assert torch.equal(logits, student(view))
        assert torch.equal(h_view, student.aggregator.reduce(student.embedder(view)))
        assert torch.equal(h_on_t, student.aggregator.reduce(f_t))
        assert torch.equal(logits_on_t, student.aggregator.head(h_on_t))


def test_confidence_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    s_view, t, s_head = (torch.randn(4, 2, generator=g) for _ in range(3))
    h_s, h_t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    att = torch.tensor([0.0, 1.0, 2.0, 4.0])
    a = att / 4.0  # min-max normalised
    w = (2 * a - 1).abs() ** 2
    per_patch = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s_view, -1))).mean(-1)
    expected = (w * per_patch).mean() + 0.5 * _kl(s_head, t) + 0.5 * _kl(h_s, h_t)
    scores = min_max_normalize(att)
    out = ICMILDistillationLoss(confidence=True, beta=2.0)(s_view, t, s_head, h_s, h_t, scores)
    torch.testing.assert_close(out["loss"], expected)


def test_dtfd_confidence_variant_follows_the_reference_equations():
    """DTFD-MIL's confidence-based embedder phase, as ICMIL's reference: the teacher's instance logits are
    ``0.7 * tier-2 classifier + 0.3 * tier-1 classifier`` on the reduced features, and each patch's view term is
    weighted by ``|2a - 1| ** 2`` with ``a`` the product of the min-max-normalised tier-1 and tier-2 attention
    scores; the engine's step computes exactly this (checked on random tensors through its teacher)."""
    torch.manual_seed(3)
    agg = create_aggregator("dtfd", 16, 2, hidden_dim=8).eval()
    feats, s_view, h_s, s_head = torch.randn(6, 16), torch.randn(6, 2), torch.randn(6, 8), torch.randn(6, 2)
    with torch.no_grad():
        h = agg.reduce(feats)
        mm = lambda x: (x - x.min()) / (x.max() - x.min())  # noqa: E731
        a = mm(agg.tier1_attention(h)) * mm(agg.gated(h))
        teacher = 0.7 * agg.head(h) + 0.3 * agg.tier1_head(h)
        per_patch = (F.softmax(teacher, -1) * (F.log_softmax(teacher, -1) - F.log_softmax(s_view, -1))).mean(-1)
        expected = ((2 * a - 1).abs() ** 2 * per_patch).mean() + 0.5 * _kl(s_head, teacher) + 0.5 * _kl(h_s, h)
        loss = ICMILDistillationLoss(confidence=True).for_teacher(agg)
        assert loss.beta == 2.0  # DTFD's exponent in the reference, chosen from the teacher
        instance = InstanceClassifier(torch.nn.Identity(), agg, confidence=True)
        h_t, logits_t = instance.head_on_features(feats)
        out = loss(s_view, logits_t, s_head, h_s, h_t, agg.confidence_scores(h_t))
    torch.testing.assert_close(logits_t, teacher)
    torch.testing.assert_close(agg.confidence_scores(h_t), a)
    torch.testing.assert_close(out["loss"], expected)
    plain = InstanceClassifier(torch.nn.Identity(), agg)  # the plain variant's teacher is tier 2 alone
    torch.testing.assert_close(plain.head_on_features(feats)[1], agg.head(h))
    assert ICMILDistillationLoss(confidence=True).for_teacher(create_aggregator("abmil", 16, 2)).beta == 6.0


def test_min_max_normalisation_maps_to_0_1_is_ones_for_equal_scores_and_keeps_a_nan():
    """Branch-free (one graph under torch.compile), with the values of the branching version: a NaN score still
    poisons the batch, so the non-finite loss check stops the phase instead of weighting every patch 1."""
    torch.testing.assert_close(min_max_normalize(torch.tensor([[2.0], [4.0], [3.0]])), torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(min_max_normalize(torch.full((3,), 7.0)), torch.ones(3))
    assert torch.equal(min_max_normalize(torch.tensor([5.0])), torch.ones(1))
    assert torch.isnan(min_max_normalize(torch.tensor([1.0, float("nan"), 2.0]))).all()


def test_loss_is_zero_when_student_equals_teacher_and_view_equals_patch():
    logits, h = torch.randn(6, 3), torch.randn(6, 8)
    out = ICMILDistillationLoss(confidence=True)(logits, logits, logits, h, h, min_max_normalize(torch.randn(6)))
    assert out["loss"].abs().item() < 1e-6


def test_confidence_weight_grows_with_distance_from_one_half():
    att = torch.linspace(0, 1, 11)
    w = confidence_weights(min_max_normalize(att), beta=6.0)
    dist = (2 * att - 1).abs()
    order = torch.argsort(dist)
    assert torch.all(w[order][1:] >= w[order][:-1])
    assert w[5].item() == pytest.approx(0.0) and w[0].item() == pytest.approx(1.0) and w[-1].item() == 1.0
    assert torch.all(confidence_weights(min_max_normalize(torch.full((4,), 3.0)), 6.0) == 1)


# ------------------------------------------------------------------------------------------------------ engine


def test_batches_are_the_same_for_any_worker_and_views_differ_from_patches(slides):
    train, _ = slides
    a = DistillationBatches(train, batch_size=8, num_batches=3, seed=5)
    b = DistillationBatches(train, batch_size=8, num_batches=3, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    x, y = a[1], b[1]
    torch.testing.assert_close(x["plain"], y["plain"])
    torch.testing.assert_close(x["view"], y["view"])
    assert x["plain"].shape == (8, 3, 48, 48) and x["view"].shape == (8, 3, 48, 48)
    assert not torch.allclose(x["view"], x["plain"].float() / 255)
    a.set_epoch(3)
    assert not torch.equal(a[1]["plain"], x["plain"])


def test_ddp_ranks_split_each_batch_into_exactly_the_single_process_batch(slides):
    train, _ = slides
    whole = DistillationBatches(train, batch_size=8, num_batches=2, seed=5)
    parts = [DistillationBatches(train, batch_size=8, num_batches=2, seed=5, rank=k, world_size=2) for k in (0, 1)]
    for ds in (whole, *parts):
        ds.set_epoch(1)
    full, halves = whole[1], [p[1] for p in parts]
    for key in ("plain", "view"):
        assert halves[0][key].shape[0] == 4
        torch.testing.assert_close(halves[0][key], full[key][0::2])
        torch.testing.assert_close(halves[1][key], full[key][1::2])
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        DistillationBatches(train, batch_size=9, num_batches=2, rank=0, world_size=2)


def test_views_made_on_the_training_device_equal_the_workers_views(slides):
    """Without ``views_in_worker`` a batch carries only the views' parameters; the step's views are the same."""
    train, _ = slides
    views = BatchRandomViews(48, hed_jitter=0.05)
    a = DistillationBatches(train, views, batch_size=8, num_batches=2, seed=5)
    b = DistillationBatches(train, views, batch_size=8, num_batches=2, seed=5, views_in_worker=False)
    x, y = a[1], b[1]
    assert "view" not in y and y["view_params"].shape == (8, 15)
    torch.testing.assert_close(b.views(y["plain"], y["view_params"]), x["view"])


def test_an_embedder_phase_with_views_on_the_device_trains_as_with_views_in_the_workers(slides, tmp_path):
    train, val = slides
    embedder = create_embedder("resnet18_trunc", input_size=48)
    runs = [
        finetune_embedder(
            embedder,
            _teacher("abmil", embedder.out_dim),
            train,
            val,
            tmp_path / str(on_device),
            batches_per_epoch=2,
            val_interval=2,
            views_on_device=on_device,
            **FAST,
        )
        for on_device in (False, True)
    ]
    losses = [r["history"][-1]["loss_loss"] for r in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_the_sampler_resumes_an_epoch_where_it_stopped():
    sampler = phase_module.ResumableSequentialSampler(5)
    assert list(sampler) == [0, 1, 2, 3, 4]
    sampler.start = 3
    assert list(sampler) == [3, 4] and len(sampler) == 2


def test_short_run_keeps_the_teacher_and_lowers_the_student_loss(slides, tmp_path):
    train, val = slides
    torch.manual_seed(0)
    embedder = create_embedder("resnet18_trunc", input_size=48)
    agg = _teacher("abmil", embedder.out_dim)
    before = {k: v.clone() for k, v in {**embedder.state_dict(), **agg.state_dict()}.items()}
    fixed = DistillationBatches(train, batch_size=32, num_batches=1, seed=123)[0]
    teacher = InstanceClassifier(copy.deepcopy(embedder), copy.deepcopy(agg)).eval()
    criterion = ICMILDistillationLoss()

    def fixed_loss(out_dir) -> float:
        student = InstanceClassifier(
            create_embedder(None, weights=out_dir / "embedder.safetensors"), copy.deepcopy(agg)
        ).eval()
        student.aggregator.load_state_dict(torch.load(out_dir / "student_head.pt", weights_only=True))
        with torch.no_grad():
            f_t = teacher.embedder(fixed["plain"])
            h_t, logits_t = teacher.head_on_features(f_t)
            h_s, logits_s_t = student.head_on_features(f_t)
            return criterion(student(fixed["view"]), logits_t, logits_s_t, h_s, h_t)["loss"].item()

    # the same seeded run, stopped after its first iteration and after sixteen
    finetune_embedder(
        embedder, agg, train, val, tmp_path / "first", batches_per_epoch=1, lr=1e-4, select="last", **FAST
    )
    result = finetune_embedder(
        embedder,
        agg,
        train,
        val,
        tmp_path / "full",
        batches_per_epoch=16,
        lr=1e-4,
        val_interval=4,
        select="last",
        **FAST,
    )
    after = {k: v for k, v in {**embedder.state_dict(), **agg.state_dict()}.items()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher is bit-identical
    assert fixed_loss(tmp_path / "full") < fixed_loss(tmp_path / "first")
    assert result["fingerprint"] != embedder.fingerprint()
    reloaded = create_embedder(None, weights=result["checkpoint"])
    assert reloaded.fingerprint() == result["fingerprint"] and reloaded.name == "resnet18_trunc"
    assert [h["iteration"] for h in result["history"]] == [4, 8, 12, 16]


def test_a_checkpoint_is_resumed_only_with_the_same_validation_slides(slides, tmp_path, monkeypatch):
    train, val = slides
    monkeypatch.setattr(phase_module.ResumeCheckpoint, "clear", lambda self: None)  # the finished run's stays
    embedder = create_embedder("resnet18_trunc", input_size=48)
    agg = _teacher("abmil", embedder.out_dim)

    def run(validation):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            finetune_embedder(embedder, agg, train, validation, tmp_path, batches_per_epoch=2, val_interval=2, **FAST)
        return [str(w.message) for w in caught if "other settings or data" in str(w.message)]

    assert run(val) == []  # nothing to resume
    assert run(val) == []  # the same data: resumed (the finished phase is not run again)
    assert len(run(val[:-1])) == 1  # one validation slide fewer: the checkpoint is not taken for this run's


def test_the_feature_term_keeps_the_students_own_reduction_near_the_teachers(slides, tmp_path):
    """``feature_weight``: the same seeded run with and without the term; with it, the student's reduction of its
    own features of held-out patches ends closer to the teacher's reduction of the teacher's features, and the phase
    logs the term."""
    train, val = slides
    torch.manual_seed(0)
    embedder = create_embedder("resnet18_trunc", input_size=48)
    agg = _teacher("abmil", embedder.out_dim)
    fixed = DistillationBatches(val, batch_size=32, num_batches=1, seed=7, with_views=False)[0]["plain"]
    with torch.no_grad():
        h_t = agg.reduce(copy.deepcopy(embedder).eval()(fixed))

    def distance(weight: float, out_dir: Path) -> tuple[float, dict]:
        phase = EmbedderPhase(
            loss_function=ICMILDistillationLoss(feature_weight=weight),
            optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
            batches_per_epoch=48,
            val_interval=48,
            select="last",
            views=BatchRandomViews(48, min_area=1.0),
            **FAST,
        )
        result = phase(embedder, agg, train, val, out_dir)
        student = InstanceClassifier(
            create_embedder(None, weights=out_dir / "embedder.safetensors"), copy.deepcopy(agg)
        )
        student.aggregator.load_state_dict(torch.load(out_dir / "student_head.pt", weights_only=True))
        student.eval()
        with torch.no_grad():
            h_s = student.aggregator.reduce(student.embedder(fixed))
        return (h_s - h_t).pow(2).mean().item(), result["history"][-1]

    without, last_without = distance(0.0, tmp_path / "off")
    with_term, last_with = distance(1.0, tmp_path / "on")
    assert "loss_feature" in last_with and "loss_feature" not in last_without
    assert with_term < 0.6 * without, (with_term, without)  # measured: 0.45


@pytest.mark.parametrize("name,confidence", [("maxpool", False), ("abmil", True), ("dtfd", True)])
def test_one_iteration_end_to_end_for_each_teacher(slides, tmp_path, name, confidence):
    train, val = slides
    embedder = create_embedder("resnet18_trunc", input_size=48)
    agg = _teacher(name, embedder.out_dim)
    result = finetune_embedder(
        embedder, agg, train, val, tmp_path, batches_per_epoch=1, val_interval=1, confidence=confidence, **FAST
    )
    assert len(result["history"]) == 1 and np.isfinite(result["history"][0]["loss_loss"])
    assert (tmp_path / "embedder.safetensors").is_file()
    c = result["teacher_consistency"]
    assert 0.0 <= c["view_agreement"] <= 1.0 and 0.0 <= c["view_mae"] <= 1.0 and c["view_kl"] >= 0.0


def test_view_consistency_equals_a_hand_computation():
    torch.manual_seed(0)
    embedder = create_embedder("resnet18_trunc", input_size=32)
    teacher = InstanceClassifier(embedder, _teacher("abmil", embedder.out_dim)).eval()
    plain = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    same = plain.float() / 255.0
    c = view_consistency(teacher, plain, same, torch.device("cpu"), batch_size=10)
    assert c["view_agreement"] == 1.0 and c["view_mae"] < 1e-6 and abs(c["view_kl"]) < 1e-6
    flipped = same.flip(-1)
    c = view_consistency(teacher, plain, flipped, torch.device("cpu"), batch_size=10)
    with torch.no_grad():
        lp, lv = teacher(plain), teacher(flipped)
    pp, pv = lp.softmax(-1), lv.softmax(-1)
    assert c["view_mae"] == pytest.approx(float((pv - pp).abs().mean()), rel=1e-5) and c["view_mae"] > 0
    assert c["view_agreement"] == pytest.approx(float((pv.argmax(1) == pp.argmax(1)).float().mean()))
    assert c["view_kl"] == pytest.approx(float(_kl(lv, lp)), rel=1e-5)


def test_normal_slide_targets_replace_the_teachers_labels_on_normal_slides_only():
    logits = torch.tensor([[2.0, 5.0, -1.0], [0.5, 0.1, 3.0], [4.0, -2.0, 0.0]])
    out = normal_slide_targets(logits, torch.tensor([True, False, True]))
    probs = torch.softmax(out, -1)
    torch.testing.assert_close(probs[[0, 2]], torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(out[1], logits[1])
    assert normal_slide_targets(logits, None) is logits


def test_batches_flag_the_patches_of_normal_slides_without_changing_the_draw(slides):
    train, _ = slides
    normal = {train[0]["slide_id"], train[-1]["slide_id"]}
    plain = DistillationBatches(train, batch_size=24, num_batches=2, seed=5, read_threads=1)
    flagged = DistillationBatches(train, batch_size=24, num_batches=2, seed=5, read_threads=1, normal_ids=normal)
    item, ref = flagged[1], plain[1]
    assert "normal" not in ref and torch.equal(item["plain"], ref["plain"]) and torch.equal(item["view"], ref["view"])
    flat, _ = flagged.indices(1)
    starts = np.cumsum([len(s["coords"]) for s in flagged.slides])  # slide i holds flat indices < starts[i]
    expected = [flagged.slides[int(np.argmax(f < starts))]["slide_id"] in normal for f in flat]
    assert item["normal"].tolist() == expected and 0 < sum(expected) < len(expected)
    # each DDP rank's flags follow its share of the patches; views made on the device carry them too
    ranks = [
        DistillationBatches(train, batch_size=24, num_batches=2, seed=5, rank=k, world_size=2, normal_ids=normal)
        for k in (0, 1)
    ]
    assert [r.is_normal(r.indices(1)[0]).tolist() for r in ranks] == [expected[0::2], expected[1::2]]
    on_device = DistillationBatches(
        train, batch_size=24, num_batches=2, seed=5, views_in_worker=False, normal_ids=normal
    )
    assert on_device[1]["normal"].tolist() == expected and "view_params" in on_device[1]


def _all_tumour_teacher(in_dim: int):
    agg = _teacher("abmil", in_dim)
    with torch.no_grad():
        agg.head.weight.zero_()
        agg.head.bias.copy_(torch.tensor([-3.0, 3.0]))  # every patch tumour, p 0.998
    return agg


def test_normal_slide_targets_teach_the_student_normal_on_normal_slides(slides, tmp_path):
    train, val = slides
    torch.manual_seed(0)
    embedder = create_embedder("resnet18_trunc", input_size=48)
    agg = _all_tumour_teacher(embedder.out_dim)
    normal = {s["slide_id"] for s in (*train[::2], *val[::2])}
    kw = dict(FAST, batches_per_epoch=2, val_interval=1, val_patches=16, batch_size=8)
    with pytest.raises(EmbedderPhaseError, match="normal_slide_targets.*class-0"):
        EmbedderPhase(normal_slide_targets=True, **kw)(embedder, agg, train, val, tmp_path / "x")
    # a frozen student is the teacher: its agreement with the targets is the share of non-normal held-out patches
    frozen = functools.partial(torch.optim.SGD, lr=0.0)
    phase = EmbedderPhase(optimizer=frozen, normal_slide_targets=True, **kw)
    result = phase(embedder, agg, train, val, tmp_path / "a", normal_ids=normal)
    held = DistillationBatches(val, batch_size=16, num_batches=1, seed=1, read_threads=1, normal_ids=normal)
    share = 1.0 - float(held.is_normal(held.indices(0)[0]).float().mean())
    assert 0.0 < share < 1.0 and [h["agreement"] for h in result["history"]] == pytest.approx([share, share])
    assert phase.signature() != EmbedderPhase(optimizer=frozen, **kw).signature()
    # trained, the student moves towards normal on the normal slides' patches, and only with the targets
    adam = functools.partial(torch.optim.Adam, lr=1e-2)
    moved = {}
    for name, flag in (("targets", True), ("plain", False)):
        phase = EmbedderPhase(optimizer=adam, normal_slide_targets=flag, **dict(kw, batches_per_epoch=6))
        phase(embedder, agg, train, val, tmp_path / name, normal_ids=normal)
        head = copy.deepcopy(agg)
        head.load_state_dict(torch.load(tmp_path / name / "student_head.pt"))
        student = InstanceClassifier(create_embedder(None, weights=tmp_path / name / "embedder.safetensors"), head)
        patches = DistillationBatches([s for s in val if s["slide_id"] in normal], batch_size=32, num_batches=1)
        with torch.no_grad():
            logits = student.eval()(patches.draw(0)[0])
        moved[name] = float((logits[:, 1] - logits[:, 0]).mean())  # tumour margin (6 for the teacher)
    assert moved["targets"] < moved["plain"] - 0.5 and abs(moved["plain"] - 6.0) < 0.5, moved


def test_a_teacher_that_disagrees_with_itself_on_the_views_is_warned_about(slides, tmp_path, monkeypatch):
    train, val = slides
    torch.manual_seed(0)
    embedder = create_embedder("resnet18_trunc", input_size=48)
    agg = _teacher("abmil", embedder.out_dim)
    kw = dict(FAST, batches_per_epoch=1, val_interval=1, val_patches=16, batch_size=8)
    monkeypatch.setattr(phase_module, "VIEW_AGREEMENT_WARN", 1.01)  # no teacher can reach it
    with pytest.warns(UserWarning, match="invariance.*embedder_phase#min_crop_area"):
        finetune_embedder(embedder, agg, train, val, tmp_path / "a", **kw)
    monkeypatch.setattr(phase_module, "VIEW_AGREEMENT_WARN", 0.0)  # every teacher reaches it
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        finetune_embedder(embedder, agg, train, val, tmp_path / "b", **kw)


def test_checkpoint_of_another_aggregator_or_dimension_fails_before_training(slides, tmp_path):
    train, val = slides
    embedder = create_embedder("resnet18_trunc", input_size=48)  # 256-d
    path = save_bag_classifier(tmp_path / "bag.pt", create_aggregator("abmil", 512, 2, hidden_dim=32))
    with pytest.raises(ValueError, match="expects 512-d features but the embedder gives 256-d"):
        load_bag_classifier(path, expect_in_dim=embedder.out_dim)
    with pytest.raises(ValueError, match="holds a 'abmil' bag classifier, but 'dtfd' was configured"):
        load_bag_classifier(path, expect_aggregator="dtfd")
    with pytest.raises(ValueError, match="expects 512-d features but the embedder 'resnet18_trunc' gives 256-d"):
        finetune_embedder(embedder, load_bag_classifier(path), train, val, tmp_path / "out", **FAST)
    assert not (tmp_path / "out" / "embedder.safetensors").exists()
    with pytest.raises(EmbedderPhaseError, match="needs attention; MaxPoolMIL has none"):
        finetune_embedder(
            embedder, create_aggregator("maxpool", 256, 2), train, val, tmp_path / "o2", confidence=True, **FAST
        )


def test_slides_without_tissue_patches_are_a_clear_error(slides, tmp_path):
    train, val = slides
    empty = [{**s, "coords": np.zeros((0, 2), np.int64)} for s in train]
    embedder = create_embedder("resnet18_trunc", input_size=48)
    with pytest.raises(EmbedderPhaseError, match="no tissue patches to sample"):
        finetune_embedder(embedder, _teacher("abmil", 256), empty, val, tmp_path, **FAST)


def test_nan_loss_stops_with_the_iteration_and_keeps_the_best_embedder(slides, tmp_path, monkeypatch):
    train, val = slides
    original = DistillationBatches.__getitem__

    def poisoned(self, i):
        batch = original(self, i)
        if self.num_batches > 1 and i >= 2:
            batch["view"] = torch.full_like(batch["view"], float("nan"))
        return batch

    monkeypatch.setattr(phase_module.DistillationBatches, "__getitem__", poisoned)
    embedder = create_embedder("resnet18_trunc", input_size=48)
    with pytest.raises(EmbedderPhaseError, match="non-finite loss .* at iteration 3"):
        finetune_embedder(
            embedder, _teacher("abmil", 256), train, val, tmp_path, batches_per_epoch=5, val_interval=2, **FAST
        )
    kept = create_embedder(None, weights=tmp_path / "embedder.safetensors")
    assert all(torch.isfinite(p).all() for p in kept.parameters())


def test_the_embedder_phase_fine_tunes_a_vit_from_a_model_folder(slides, vit_folder, tmp_path):
    """A ViT (LayerNorm, no batch-norm statistics to freeze) at the slides' 48 px through the dynamic image size."""
    train, val = slides
    embedder = create_embedder(None, weights=vit_folder, input_size=48)
    before = embedder.fingerprint()
    agg = _teacher("abmil", embedder.out_dim)
    result = finetune_embedder(
        embedder, agg, train, val, tmp_path, batches_per_epoch=2, val_interval=2, lr=1e-3, **FAST
    )
    assert np.isfinite(result["history"][0]["loss_loss"]) and embedder.fingerprint() == before  # the teacher's
    tuned = create_embedder(None, weights=result["checkpoint"])
    assert tuned.name == "vit_small_patch16_224" and tuned.input_size == 48
    assert tuned.fingerprint() == result["fingerprint"] != before


def test_the_compiled_teacher_and_student_steps_train_as_the_eager_ones(slides, tmp_path):
    """``compile: true`` runs the teacher's pass and the student's forward and backward through ``torch.compile`` as
    one graph each (no graph break, e.g. at the confidence scores' normalisation): the confidence-weighted loss and
    the tuned embedder follow the eager path, and the phase reports its first iteration apart from its steady rate.
    Off by default (slower than eager on an H200, benchmarks/RESULTS.md)."""
    from torch._dynamo.utils import counters

    train, val = slides
    embedder = create_embedder("resnet18_trunc", input_size=48)
    teacher = _teacher("abmil", embedder.out_dim)
    runs = {}
    for compiled in (False, True):
        counters.clear()
        runs[compiled] = finetune_embedder(
            embedder, teacher, train, val, tmp_path / str(compiled), confidence=True, batches_per_epoch=3,
            val_interval=3, compile=compiled, **FAST,
        )  # fmt: skip
        graphs = counters["stats"]["unique_graphs"]
    assert graphs == 2  # the teacher's step and the student's step, each whole (no graph breaks)
    eager, compiled = runs[False], runs[True]
    assert compiled["history"][-1]["loss_loss"] == pytest.approx(eager["history"][-1]["loss_loss"], rel=1e-3)
    for (name, p), q in zip(eager["embedder"].state_dict().items(), compiled["embedder"].state_dict().values()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
    assert compiled["first_iteration_s"] > 0 and compiled["steady_patches_per_s"] > 0
    assert EmbedderPhase(device="cpu").compile is False and EmbedderPhase(device="cpu", compile="true").compile


def test_teacher_features_from_the_store_are_the_teachers_own_and_train_the_student_alike(slides, tmp_path):
    """``teacher_features``: the batches carry the stored features of exactly the drawn patches (the teacher
    embedder's output within float16 storage), and the phase trains as with recomputed ones; a slide without stored
    features, or the option without them, fails naming the fix."""
    from monai_icmil.data.store import FeatureStore
    from monai_icmil.engines import Embed

    train, val = slides
    torch.manual_seed(0)
    embedder = create_embedder("resnet18_trunc", input_size=48).eval()
    store = FeatureStore(tmp_path / "features")
    Embed(batch_size=32, num_workers=0, progress=False)(train, embedder, store, TILING.params(), device="cpu")
    files = {s["slide_id"]: store.path(s["slide_id"]) for s in train}
    data = DistillationBatches(train, batch_size=16, num_batches=2, seed=0, teacher_features=files)
    item = data[1]
    with torch.no_grad():
        direct = embedder(item["plain"])
    assert item["teacher_features"].dtype == torch.float16 and item["teacher_features"].shape == direct.shape
    torch.testing.assert_close(item["teacher_features"].float(), direct, atol=2e-3, rtol=2e-3)

    teacher = _teacher("abmil", embedder.out_dim)
    runs = []
    for stored in (False, True):
        phase = EmbedderPhase(batches_per_epoch=3, val_interval=3, teacher_features=stored, **FAST)
        extra = {"teacher_features": files} if stored else {}
        runs.append(phase(embedder, teacher, train, val, tmp_path / str(stored), **extra))
    recomputed, from_store = (r["history"][-1]["loss_loss"] for r in runs)
    assert from_store == pytest.approx(recomputed, rel=2e-2) and from_store != recomputed  # float16, so not bit-equal
    assert EmbedderPhase(teacher_features=True).signature() != EmbedderPhase().signature()  # resumes keep apart

    missing = dict(list(files.items())[1:])
    with pytest.raises(EmbedderPhaseError, match=r"no stored teacher features for training slide .*teacher_features"):
        DistillationBatches(train, batch_size=16, teacher_features=missing)
    with pytest.raises(EmbedderPhaseError, match=r"made by another embedder .*re-embed the slide"):  # a stale file
        DistillationBatches(train, batch_size=16, teacher_features=files, teacher_fingerprint="another")
    with pytest.raises(EmbedderPhaseError, match="made with stain normalisation off, the phase has it on"):
        DistillationBatches(train, batch_size=16, teacher_features=files, stain_normalize=True)
    other = dict(train[0], coords=np.asarray(train[0]["coords"])[::-1])  # the same patches in another order
    with pytest.raises(EmbedderPhaseError, match=r"are of other patches"):
        DistillationBatches([other], batch_size=16, teacher_features=files)
    with pytest.raises(EmbedderPhaseError, match="teacher_features is on but no stored teacher features"):
        EmbedderPhase(teacher_features=True, **FAST)(embedder, teacher, train, val, tmp_path / "none")


def test_stored_arrays_read_any_rows_as_the_file_holds_them(tmp_path):
    """Memory-mapped rows (any order, repeats) equal safetensors' own reading, for every dtype a store writes."""
    from safetensors.torch import load_file

    from monai_icmil.data.store import FeatureStore, stored_array, stored_file_key

    store = FeatureStore(tmp_path)
    rows = np.array([4, 0, 4, 2])
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        feats = torch.randn(5, 3).to(dtype)
        path = store.save(f"s_{str(dtype)[6:]}", {"features": feats, "coords": torch.arange(10).view(5, 2)}, {"k": 1})
        got = stored_array(path).rows(rows)
        assert got.dtype == dtype and torch.equal(got, load_file(str(path))["features"][torch.as_tensor(rows)])
        assert torch.equal(stored_array(path, "coords").rows(), torch.arange(10).view(5, 2))
        assert stored_array(path, "nothing") is None and stored_file_key(path) == {"k": 1}


def test_a_phase_stopped_before_any_validation_still_leaves_the_students_head(slides, tmp_path):
    """Stopped after its first step (no validation ran), the phase keeps the student as it is: its embedder and
    ``student_head.pt`` (the state ``bag_phase#warm_start`` starts from), the pair the trained student gives."""
    from ignite.engine import Events

    train, val = slides
    torch.manual_seed(0)
    embedder = create_embedder("resnet18_trunc", input_size=48)
    agg = _teacher("abmil", embedder.out_dim)

    class StopAtOnce:
        def attach(self, engine):
            engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: e.terminate())

    out = tmp_path / "stopped"
    adam = functools.partial(torch.optim.Adam, lr=1e-2)
    phase = EmbedderPhase(optimizer=adam, handlers=[StopAtOnce()], **dict(FAST, batches_per_epoch=4, val_interval=4))
    result = phase(embedder, agg, train, val, out)
    assert result["history"] == [] and (out / "embedder.safetensors").is_file()
    head = copy.deepcopy(agg)
    head.load_state_dict(torch.load(out / "student_head.pt", weights_only=True))  # every key, strictly
    assert not torch.equal(head.head.weight, agg.head.weight)  # the student after its one step, not the teacher
    untrained = {k: v for k, v in agg.state_dict().items() if not k.startswith(("dim_reduction.", "head."))}
    assert untrained and all(torch.equal(head.state_dict()[k], v) for k, v in untrained.items())  # attention, stats
