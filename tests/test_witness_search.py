# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The bag phase's witness search (``bag_phase#witness_search``): linear iterative instance selection and the
pre-training of the instance head on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_bag import FAST, ShiftedBags, train_bag_classifier
from torch.utils.data import Dataset

from monai_icmil.engines.bag_phase import BagPhase, feature_stats
from monai_icmil.engines.witness_search import SingleClassError, WitnessSearch, as_witness_search
from monai_icmil.handlers.checkpoint import ResumeCheckpoint
from monai_icmil.metrics import binary_auc
from monai_icmil.networks import create_aggregator


class SparseBags(Dataset):
    """Bags of 200 instances; a positive bag's 2 % witnesses are shifted by ``shift`` along one direction, while every
    bag carries a large offset of its own in the other dimensions (slide-to-slide variation that a bag classifier can
    memorise); ``witness[i]`` marks bag ``i``'s witnesses."""

    def __init__(self, n: int, seed: int, dim: int = 24, shift: float = 4.0):
        rng = np.random.default_rng(seed)
        self.bags, self.labels, self.witness = [], [], []
        for i in range(n):
            label = i % 2
            f = rng.normal(0, 1, (200, dim))
            f[:, 4:] += rng.normal(0, 2.0, dim - 4)  # the bag's own offset
            w = np.zeros(200, bool)
            if label:
                w[rng.choice(200, 4, replace=False)] = True
                f[w, :4] += shift / 2.0  # |shift| along (1, 1, 1, 1) / 2
            self.bags.append(torch.from_numpy(f.astype(np.float32)))
            self.labels.append(label)
            self.witness.append(w)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.bags[i], "label": torch.tensor(self.labels[i]), "slide_id": f"bag_{i:03d}"}


def witness_auc(scores, data: SparseBags) -> float:
    """Patch AUC of per-bag instance ``scores`` (a callable) against the witnesses of ``data``."""
    s = np.concatenate([np.asarray(scores(b), float) for b in data.bags])
    return binary_auc(s, np.concatenate(data.witness).astype(int))


def test_the_search_finds_the_witnesses_and_keeps_a_fraction_by_validation():
    train, val = SparseBags(80, 0), SparseBags(40, 1)
    search = WitnessSearch(fractions=(0.02, 0.2), iterations=15)
    result = search.search(train, val, *feature_stats(train))
    assert witness_auc(lambda b: result.scores(b).numpy(), val) >= 0.95
    assert result.val_auc >= 0.9
    assert [c["fraction"] for c in result.candidates] == [0.02, 0.2]
    best = max(result.candidates, key=lambda c: c["val_auc"])
    assert result.fraction == best["fraction"] and result.val_auc == best["val_auc"]
    assert len(result.top(val.bags[1])) == 4  # 2 % of 200
    # the starting direction alone (one selection round of the whole bag: mean features) does not find them
    start = WitnessSearch(fractions=(1.0,), iterations=1).search(train, val, *feature_stats(train))
    assert witness_auc(lambda b: start.scores(b).numpy(), val) < 0.9


def test_fractions_that_pick_as_many_patches_of_every_bag_are_searched_once(monkeypatch):
    """Small bags: 1 % and 2 % of 200 patches differ (2 and 4), 0.1 % and 0.2 % do not (1 each): the latter are
    searched once, with every fraction still a candidate, the outcome what a search of each alone gives."""
    import monai_icmil.engines.witness_search as ws

    selected = []
    original = ws.WitnessSearch._select
    monkeypatch.setattr(ws.WitnessSearch, "_select", lambda self, *a: selected.append(a[-1]) or original(self, *a))
    train, val = SparseBags(40, 0), SparseBags(20, 1)
    stats = feature_stats(train)
    result = WitnessSearch(fractions=(0.001, 0.01, 0.002, 0.02), iterations=5).search(train, val, *stats)
    assert selected == [0.001, 0.01, 0.02]  # 0.002 picks the 1 patch of 0.001
    assert [c["fraction"] for c in result.candidates] == [0.001, 0.01, 0.002, 0.02]
    for fraction, candidate in zip((0.001, 0.01, 0.002, 0.02), result.candidates):
        alone = WitnessSearch(fractions=(fraction,), iterations=5).search(train, val, *stats)
        assert {k: v for k, v in candidate.items() if k != "fraction"} == {
            k: v for k, v in alone.candidates[0].items() if k != "fraction"
        }
        if fraction == result.fraction:
            assert torch.equal(alone.weight, result.weight) and alone.bias == result.bias
    assert result.candidates[0]["val_auc"] == result.candidates[2]["val_auc"]


def test_the_search_holds_at_most_max_instances_of_a_bag_and_still_finds_the_witnesses(monkeypatch):
    """Large slides: the search holds a fixed random subset of each bag (memory bounded by the cohort, not the slide
    size), and the scorer it fits on the subsets ranks the whole bags' witnesses."""
    import monai_icmil.engines.witness_search as ws

    held = []
    original = ws._standardise
    monkeypatch.setattr(ws, "_standardise", lambda f, m, s: held.append(len(f)) or original(f, m, s))
    train, val = SparseBags(80, 0), SparseBags(40, 1)
    result = WitnessSearch(fractions=(0.02,), iterations=15, max_instances=120).search(
        train, val, *feature_stats(train)
    )
    assert held == [120] * 120  # 80 training and 40 validation bags of 200, 120 held of each
    assert witness_auc(lambda b: result.scores(b).numpy(), val) >= 0.95 and len(result.top(val.bags[0])) == 4
    subset = WitnessSearch(max_instances=50)._held(train.bags[3], 3, None, None)
    assert subset.dtype == torch.float32
    assert len(subset) == 50 and torch.equal(
        subset, WitnessSearch(max_instances=50)._held(train.bags[3], 3, None, None)
    )
    assert len(WitnessSearch(max_instances=None)._held(train.bags[3], 3, None, None)) == 200


def test_pretraining_puts_the_witnesses_on_top_of_the_instance_head():
    train = SparseBags(80, 0)
    result = WitnessSearch(fractions=(0.02,), iterations=15).search(train, SparseBags(40, 1), *feature_stats(train))
    torch.manual_seed(0)
    net = create_aggregator("abmil", 24, 2, hidden_dim=32)
    net.set_input_stats(*feature_stats(train))

    def margin(b: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            inst = net.instance_logits(b)
        return (inst[:, 1] - inst[:, 0]).numpy()

    before = witness_auc(margin, train)
    losses = WitnessSearch(pretrain_steps=100, pretrain_batch_size=64, pretrain_negatives=50).pretrain(
        net, train, result, torch.optim.Adam(net.parameters(), lr=1e-3), torch.nn.CrossEntropyLoss(), seed=0
    )
    assert len(losses) == 100 and np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert before < 0.8 and witness_auc(margin, train) >= 0.95


def test_the_search_needs_both_classes_and_checks_its_settings():
    one_class = ShiftedBags(10, 0, labels=[0] * 10)
    with pytest.raises(SingleClassError, match="witness_search: the training bags hold no class-0 slides or only"):
        WitnessSearch().search(one_class, ShiftedBags(6, 1))
    # a validation split of one class cannot choose: the first fraction listed is kept, its AUC recorded as None
    train = SparseBags(40, 0)
    blind = WitnessSearch(fractions=(0.05, 0.02), iterations=3).search(train, ShiftedBags(6, 1, dim=24, labels=[0] * 6))
    assert blind.fraction == 0.05 and np.isnan(blind.val_auc)
    assert blind.to_dict()["val_auc"] is None and json.dumps(blind.to_dict(), allow_nan=False)
    for bad in (
        {"fractions": [0.0]},
        {"fractions": [1.5]},
        {"iterations": 0},
        {"pretrain_steps": -1},
        {"max_instances": 0},
    ):
        with pytest.raises(ValueError, match="witness_search"):
            as_witness_search(bad)
    with pytest.raises(ValueError, match="witness_search: .*unexpected keyword"):
        as_witness_search({"fraction": 0.1})
    with pytest.raises(ValueError, match="true, false or a mapping"):
        as_witness_search("maybe")
    assert as_witness_search(False) is None and as_witness_search(None) is None
    assert as_witness_search(True).fractions == [0.005, 0.01, 0.02, 0.05]
    # as a command line passes booleans (python -m monai.bundle run ... --bag_phase#witness_search false)
    for off in ("false", "FALSE", "0", "off", 0):
        assert as_witness_search(off) is None
    for on in ("true", "True", "1", "yes"):
        assert isinstance(as_witness_search(on), WitnessSearch)
    assert WitnessSearch().signature()["max_instances"] == 2048
    assert as_witness_search({"max_instances": None}).signature()["max_instances"] is None
    assert as_witness_search({"fractions": [0.1], "iterations": 3}).signature()["iterations"] == 3


def test_the_bag_phase_runs_the_search_once_records_it_and_keys_its_records_on_it(tmp_path, monkeypatch):
    assert BagPhase(witness_search=False).signature() == BagPhase().signature()  # off: older records still count
    assert BagPhase(witness_search=True).signature() != BagPhase().signature()
    calls = []
    original = WitnessSearch.search

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WitnessSearch, "search", counted)
    settings = {"fractions": [0.02, 0.05], "iterations": 5}
    result = train_bag_classifier(
        ShiftedBags(40, 0), ShiftedBags(20, 1), "abmil", tmp_path, aggregator_kwargs=FAST, epochs=5, lr=5e-4,
        progress=False, device="cpu", early_stop_patience=None, restarts=2, witness_search=settings,
    )  # fmt: skip
    assert len(calls) == 1  # one search for both restarts
    record = json.loads((tmp_path / "witness_search.json").read_text())
    assert record["fraction"] in (0.02, 0.05) and record["settings"]["fractions"] == [0.02, 0.05]
    assert record["val_auc"] >= 0.9  # 1-5 % of each positive bag shifted: found
    assert result["best_metric"] >= 0.95
    assert result["witness_search"]["fraction"] == record["fraction"]
    # a rerun finds both restarts on disk and does not search again
    again = train_bag_classifier(
        ShiftedBags(40, 0), ShiftedBags(20, 1), "abmil", tmp_path, aggregator_kwargs=FAST, epochs=5, lr=5e-4,
        progress=False, device="cpu", early_stop_patience=None, restarts=2, witness_search=settings,
    )  # fmt: skip
    assert len(calls) == 1
    assert again["witness_search"] == result["witness_search"]


def test_training_bags_of_one_class_train_without_the_search(tmp_path, caplog):
    """With the search on (train.json's default), a training split of a single class leaves nothing to search for:
    the bag phase warns once and trains its restarts without it, instead of failing the run."""
    (tmp_path / "witness_search.json").write_text("{}")  # an earlier run's record, on other bags: removed
    with caplog.at_level("WARNING", logger="monai_icmil.bag_phase"):
        result = train_bag_classifier(
            ShiftedBags(10, 0, labels=[0] * 10), ShiftedBags(6, 1), "abmil", tmp_path, aggregator_kwargs=FAST,
            epochs=2, progress=False, device="cpu", early_stop_patience=None, restarts=2, witness_search=True,
        )  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if "only class-0 slides" in r.getMessage()]
    assert len(warnings) == 1 and "trains without it" in warnings[0]
    assert "witness_search" not in result and not (tmp_path / "witness_search.json").exists()
    assert (tmp_path / "bag_classifier.pt").is_file() and len(result["restarts"]) == 2


def test_a_resumed_restart_neither_searches_nor_pretrains_again(tmp_path, monkeypatch):
    """A fresh restart whose resume checkpoint is on disk continues from it: the checkpoint replaces the weights, so
    the search and the pre-training are not run again (a bag phase interrupted on a large cohort restarts at once)."""
    calls = []
    search, pretrain = WitnessSearch.search, WitnessSearch.pretrain
    monkeypatch.setattr(WitnessSearch, "search", lambda self, *a, **k: calls.append("search") or search(self, *a, **k))
    monkeypatch.setattr(
        WitnessSearch, "pretrain", lambda self, *a, **k: calls.append("pretrain") or pretrain(self, *a, **k)
    )
    monkeypatch.setattr(ResumeCheckpoint, "clear", lambda self: None)  # the finished run's checkpoint stays
    kwargs = dict(
        aggregator_kwargs=FAST, epochs=3, lr=5e-4, progress=False, device="cpu", early_stop_patience=None, restarts=1,
        witness_search={"fractions": [0.05], "iterations": 3, "pretrain_steps": 20},
    )  # fmt: skip
    first = train_bag_classifier(ShiftedBags(20, 0), ShiftedBags(10, 1), "abmil", tmp_path, **kwargs)
    assert calls == ["search", "pretrain"]
    again = train_bag_classifier(ShiftedBags(20, 0), ShiftedBags(10, 1), "abmil", tmp_path, **kwargs)
    assert calls == ["search", "pretrain"]  # resumed from the checkpoint: neither ran again
    assert again["best_metric"] == first["best_metric"] and again["witness_search"] == first["witness_search"]
    # another seed is another run: its checkpoint does not match, so it searches and pre-trains
    train_bag_classifier(ShiftedBags(20, 0), ShiftedBags(10, 1), "abmil", tmp_path, seed=1, **kwargs)
    assert calls == ["search", "pretrain", "search", "pretrain"]


def test_the_command_line_takes_a_boolean_or_a_mapping_for_the_search():
    """``--bag_phase#witness_search false`` (a string, as fire passes it) and a mapping of settings pass the bundle's
    override check; a word that is neither is refused, naming the id."""
    from monai_icmil.workflows.cli import _check_types

    config = {"bag_phase": {"witness_search": True}}
    for value in ("false", "FALSE", "0", {"max_instances": 4096}):
        _check_types(config, [("bag_phase#witness_search", value)])
    with pytest.raises(ValueError, match="bag_phase#witness_search"):
        _check_types(config, [("bag_phase#witness_search", "maybe")])
    with pytest.raises(ValueError, match="bag_phase#warm_start"):  # a mapping only where the setting takes one
        _check_types({"bag_phase": {"warm_start": False}}, [("bag_phase#warm_start", {"a": 1})])
