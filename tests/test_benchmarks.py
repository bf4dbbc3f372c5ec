# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The accuracy benchmark's smoke mode: it drives the bundle for every seed, start, aggregator and round and its
report has every row (the numbers at these sizes mean nothing)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_icmil.engines.bag_phase import load_bag_classifier

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "icmil_gain.py"


def _module(name: str = "icmil_gain"):
    spec = importlib.util.spec_from_file_location(name, BENCH.with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "settings,starts",
    [(["default", "hard"], ["ssl"]), pytest.param(["default", "hard", "sparse"], None, marks=pytest.mark.slow)],
    ids=["default-hard-ssl", "all"],
)
def test_icmil_gain_smoke_report_has_every_row(tmp_path, settings, starts):
    """``--smoke`` at test size: every row of the given data settings and starts (the default run: the default
    setting, which the scripts on a run's outputs read, and the hard one, #21's, from the SimCLR start, the start the
    project documents as best; the slow one adds the sparse setting, whose code paths differ only in the generated
    data, and the random start, which is the bundle's own default that the demo tests run)."""
    gain = _module()
    assert gain.parse(["--smoke"]).settings == list(gain.DATA_SETTINGS) == ["default", "hard", "sparse"]
    assert gain.parse(["--smoke"]).starts == list(gain.STARTS)
    starts = starts or list(gain.STARTS)
    chosen = ["--settings", *settings, "--starts", *starts]
    rows = gain.main(["--smoke", "--out", str(tmp_path), *chosen])
    report = json.loads((tmp_path / "report.json").read_text())
    assert json.dumps(report["rows"]) == json.dumps(rows)  # (NaN != NaN, so compare the text)
    want = {
        (setting, 0, start, agg, r)
        for setting in settings
        for start in starts
        for agg in gain.AGGREGATORS
        for r in (0, 1)
    }
    assert {(r["setting"], r["seed"], r["start"], r["aggregator"], r["round"]) for r in rows} == want
    for r in rows:
        for key in ("val_auc", "test_auc", "test_acc", "test_f1", "teacher_patch_auc", "probe_patch_auc"):
            assert isinstance(r[key], float) and (0 <= r[key] <= 1 or math.isnan(r[key])), (key, r)
        assert 0 <= r["test_acc"] <= 1  # two test slides: always defined
        # every restart is scored on the test slides; the kept one is the workflow's own test result
        assert len(r["restart_test_aucs"]) == 2
        same = lambda a, b: a == pytest.approx(b) or (math.isnan(a) and math.isnan(b))  # noqa: E731
        assert any(same(a, r["test_auc"]) for a in r["restart_test_aucs"]), r
        assert same(r["restart_mean_test_auc"], float(np.mean(r["restart_test_aucs"])))
        # restart k of round r is seeded seed + r + k; its fit is read from its own history
        assert r["restart_seeds"] == [r["seed"] + r["round"] + k for k in range(2)], r
        assert len(r["restart_fit"]) == 2
        for fit in r["restart_fit"]:
            assert 1 <= fit["kept_epoch"] <= fit["epochs"] <= 2 and 1 <= fit["lowest_val_loss_epoch"] <= fit["epochs"]
            assert fit["train_loss_at_kept"] > 0, fit
        if r["round"] == 0:
            assert r["teacher_view_agreement"] is None
        else:
            assert 0 <= r["teacher_view_agreement"] <= 1
    # every round has its teacher record: measured, or why not (the smoke's small hard slides may have no patch
    # that is half tumour)
    for state_path in (tmp_path / "runs").glob("*/seed_0/*/*/state.json"):
        for r, s in json.loads(state_path.read_text())["rounds"].items():
            teacher = s["teacher"]
            assert (teacher["patch_auc"] is None) == bool(teacher.get("unmeasured")), (state_path, r, teacher)
            if teacher["patch_auc"] is None:
                summary = (state_path.parent / "summary.md").read_text()
                assert "Teacher patch AUC: not measured: no patch of the" in summary
    # the ssl start pre-trained once per seed and every aggregator's round 0 used that embedder
    for setting in settings:
        runs = tmp_path / "runs" / setting / "seed_0"
        fps = {
            json.loads((runs / "ssl" / agg / "state.json").read_text())["rounds"]["0"]["embed"]["fingerprint"]
            for agg in gain.AGGREGATORS
        }
        pretrained = json.loads((runs / "ssl" / "abmil" / "state.json").read_text())["pretrain"]["fingerprint"]
        assert fps == {pretrained}  # the pre-trained embedder, not the random-init one it started from
        if "random" in starts:
            random_fp = json.loads((runs / "random" / "abmil" / "state.json").read_text())["rounds"]["0"]["embed"]
            assert random_fp["fingerprint"] not in fps
    # the hard and sparse settings' slides: tumour in 0.5-3 % of the tissue of positive slides
    for setting in [s for s in ("hard", "sparse") if s in settings]:
        data = json.loads((tmp_path / "data" / setting / "seed_0" / "datalist.json").read_text())
        fractions = [
            e["tumour_fraction"] for split in ("training", "validation", "test") for e in data[split] if e["label"]
        ]
        assert fractions and all(0.003 <= f <= 0.035 for f in fractions), (setting, fractions)
    md = (tmp_path / "report.md").read_text()
    assert (
        md.count("| 0 | ssl |") == 6 * len(settings)
        and "Mean +/- sd over seeds" in md
        and "| hard | ssl | dtfd | 1 |" in md
    )
    fits = rows[0]["restart_fit"]
    assert f"| {fits[0]['kept_epoch']} ({fits[0]['train_loss_at_kept']:.2f}) / {fits[1]['kept_epoch']} (" in md
    # --bag_from: the bag phases again on the plain runs' features and embedders, with another weight decay (the
    # variants on the first setting only: their code does not depend on the data)
    with pytest.raises(SystemExit):
        gain.parse(["--bag_from", "plain"])  # needs --variant
    settings = settings[:1]
    again = ["--smoke", "--out", str(tmp_path), "--starts", "ssl", "--aggregators", "abmil", "--settings", *settings]
    again += ["--variant", "wd"]
    rebag = gain.main(again + ["--bag_from", "plain", "--bag_weight_decay", "0.05", "--extra_test", "3"])
    assert {(r["setting"], r["variant"], r["round"]) for r in rebag} == {(s, "wd", k) for s in settings for k in (0, 1)}
    for setting in settings:
        runs = tmp_path / "runs" / setting / "seed_0" / "ssl"
        src, new = (json.loads((runs / d / "state.json").read_text())["rounds"] for d in ("abmil", "abmil-wd"))
        assert new["1"]["embedder_phase"] == src["1"]["embedder_phase"]  # not trained again
        assert [new[k]["embed"]["fingerprint"] for k in "01"] == [src[k]["embed"]["fingerprint"] for k in "01"]
        assert all("bag_phase" in new[k] and "test" in new[k] for k in "01")
        # restart 0 of round 1 had the same seed and features in both: its record's phase signature (the optimizer's
        # settings among them) says the new weight decay trained it
        signatures = [
            json.loads((runs / d / "round_1" / "bag_phase" / "restart_0" / "restart.json").read_text())["signature"]
            for d in ("abmil", "abmil-wd")
        ]
        assert signatures[0] != signatures[1]
    assert len(json.loads((tmp_path / "report-wd.json").read_text())["rows"]) == len(rebag)
    # --bag_witness_search: every round's bag phase searched first, and the workflow's record says what it kept
    gain.main(again[:-1] + ["ws", "--bag_from", "plain", "--bag_witness_search"])
    for setting in settings:
        rounds = json.loads((tmp_path / "runs" / setting / "seed_0" / "ssl" / "abmil-ws" / "state.json").read_text())
        for k in "01":
            assert rounds["rounds"][k]["bag_phase"]["witness_search"]["fraction"] in (0.005, 0.01, 0.02, 0.05)
    # --keep_round0 --bag_warm_start: round 0 copied whole (not trained again), round 1 from the student's classifier
    with pytest.raises(SystemExit):
        gain.parse(["--variant", "x", "--keep_round0"])  # needs --bag_from
    assert [gain.parse(a).bag_warm_start for a in ([], ["--bag_warm_start"], ["--bag_warm_start", "both"])] == [
        False, True, "both"
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        gain.parse(["--bag_warm_start", "sometimes"])
    warm = again[:-1] + ["warm", "--bag_from", "plain", "--keep_round0", "--bag_warm_start"]
    assert {(r["variant"], r["round"]) for r in gain.main(warm)} == {("warm", 0), ("warm", 1)}
    for setting in settings:
        runs = tmp_path / "runs" / setting / "seed_0" / "ssl"
        src, new = (json.loads((runs / d / "state.json").read_text())["rounds"] for d in ("abmil", "abmil-warm"))
        assert new["0"] == src["0"] and new["1"]["embedder_phase"] == src["1"]["embedder_phase"]
        assert new["1"]["bag_phase"]["warm_start"] == "student" and "warm_start" not in src["1"]["bag_phase"]
        kept = (runs / "abmil-warm" / "round_0" / "bag_phase" / "bag_classifier.pt").read_bytes()
        assert kept == (runs / "abmil" / "round_0" / "bag_phase" / "bag_classifier.pt").read_bytes()
    # --bag_warm_start both: each start's best restart by validation is what that start alone kept (the plain run:
    # fresh; the warm run: from the student's classifier), and the run keeps one of the two
    both = gain.main(
        again[:-1] + ["both", "--bag_from", "plain", "--keep_round0", "--bag_warm_start", "both", "--extra_test", "3"]
    )
    ssl_abmil = [r for r in [*rows, *gain.main(warm), *both] if (r["start"], r["aggregator"]) == ("ssl", "abmil")]
    by_key = {(r["setting"], r["variant"], r["round"]): r for r in ssl_abmil}
    for r in both:
        if r["round"] == 0:
            assert r["start_best"] == {}  # round 0: fresh restarts only
            continue
        best = r["start_best"]
        assert (
            set(best) == {"fresh", "warm"} and best["fresh"]["restart"] in (0, 1) and best["warm"]["restart"] in (2, 3)
        )
        alone = {"fresh": by_key[(r["setting"], "", 1)], "warm": by_key[(r["setting"], "warm", 1)]}
        runs = tmp_path / "runs" / r["setting"] / "seed_0" / "ssl"
        for start, d, offset in (("fresh", "abmil", 0), ("warm", "abmil-warm", 2)):
            chosen = json.loads((runs / d / "round_1" / "bag_phase" / "restarts.json").read_text())["chosen"]
            assert best[start]["restart"] == chosen + offset, (start, r)
            assert best[start]["test_auc"] == pytest.approx(alone[start]["test_auc"], nan_ok=True), (start, r)
        # the run kept the first of the two picks; each pick's AUCs are its own restart's
        record = json.loads((runs / "abmil-both" / "round_1" / "bag_phase" / "restarts.json").read_text())
        assert best[record["restarts"][record["chosen"]]["start"]]["restart"] == record["chosen"]
        assert r["val_auc"] == pytest.approx(max(best[s]["val_auc"] for s in best))
        extra = r["extra_start_best"]
        for start, b in best.items():
            assert b["test_auc"] == pytest.approx(r["restart_test_aucs"][b["restart"]], nan_ok=True)
            k = extra[start]["restart"]
            assert extra[start]["auc"] == pytest.approx(r["extra_restart_test_aucs"][k], nan_ok=True)
    assert "## Each start's best restart" in (tmp_path / "report-both.md").read_text()
    # --extra_test: every round's classifiers on 3 more test slides, and round 1's paired gain over round 0 there
    for r in rebag:
        assert r["extra_test_n"] == 3 and len(r["extra_restart_test_aucs"]) == 2
        assert ("extra_test_gain" in r) == (r["round"] == 1) == ("extra_teacher_slide_gain_se" in r)
        assert ("extra_round0_classifier_auc" in r) == (r["round"] == 1) == ("extra_round0_classifier_gain_se" in r)
        assert ("extra_student_classifier_auc" in r) == (r["round"] == 1) == ("extra_student_classifier_gain_se" in r)
        assert 0 <= r["extra_teacher_slide_auc"] <= 1 or math.isnan(r["extra_teacher_slide_auc"])
        assert r["round"] or r["test_gain_paired_se"] is None  # (2 test slides: no paired variance in round 1)
    extra = json.loads((tmp_path / "data" / settings[0] / "seed_0_extra_test_3" / "datalist.json").read_text())
    assert [len(extra[k]) for k in ("training", "validation", "test")] == [0, 0, 3]
    assert "## On the extra test slides" in (tmp_path / "report-wd.md").read_text()
    # witness_bound.py on a smoke run: its bag test AUC is the workflow's, read back from predictions.csv
    bound = _module("witness_bound")
    assert bound.slide_scores(np.array([0.1, 0.9, 0.5])) == {"max": 0.9, "top5%": 0.9, "mean": pytest.approx(0.5)}
    run = tmp_path / "runs" / settings[0] / "seed_0" / "ssl" / "abmil"
    data = tmp_path / "data" / settings[0] / "seed_0"
    got = bound.main(["--run", str(run), "--data", str(data), "--out", str(tmp_path / "bound")])
    assert json.dumps(json.loads((tmp_path / "bound" / "report.json").read_text())["rows"]) == json.dumps(got)
    state = json.loads((run / "state.json").read_text())
    datalist = json.loads((data / "datalist.json").read_text())
    same = lambda a, b: a == pytest.approx(b) or (math.isnan(a) and math.isnan(b))  # noqa: E731
    for row in got:
        assert same(row["bag_test_auc"], state["rounds"][str(row["round"])]["test"]["metrics"]["auc"]), row
        assert row["positive_slides"] == sum(e["label"] for e in datalist["training"])
        assert 0 <= row["positive_slides_without_witness"] <= row["positive_slides"]
        assert all(0 <= row[k] <= 1 or math.isnan(row[k]) for k in row if "auc" in k)
        # the teacher on its own training slides, by hand: is each positive slide's top patch a witness?
        teacher = load_bag_classifier(run / f"round_{row['round']}" / "bag_phase" / "bag_classifier.pt").eval()
        hits = []
        for entry, feats, frac in bound.patches(run, row["round"], data, datalist["training"]):
            if entry["label"] and (frac >= 0.5).any():
                with torch.no_grad():
                    top = int(torch.argmax(torch.softmax(teacher.instance_logits(torch.from_numpy(feats)), -1)[:, 1]))
                hits.append(frac[top] >= 0.5)
        assert same(row["teacher_train_top_is_witness"], float(np.mean(hits)) if hits else float("nan")), row
    assert (tmp_path / "bound" / "report.md").read_text().count(f"| {settings[0]}/seed_0/ssl/abmil |") == 2
    # --extra_test's scoring (the bundle's inference, then every restart on the features it stored), given the run's
    # own test slides, gives the workflow's test predictions and every restart's test AUC
    scores = gain.extra_test_scores(run, data, data, 0, "abmil", "ssl", gain.parse(["--smoke", "--out", str(tmp_path)]))
    for r in ("0", "1"):
        with open(run / f"round_{r}" / "test" / "predictions.csv") as f:
            want = {row["slide"]: float(row["prob_tumour"]) for row in csv.DictReader(f)}
        assert dict(zip(scores[r]["slide_ids"], scores[r]["kept"])) == pytest.approx(want, abs=1e-5)
        restarts = gain.extra_test_rows(scores)[int(r)]["extra_restart_test_aucs"]
        assert all(same(a, b) for a, b in zip(restarts, gain.restart_test_aucs(run, int(r), datalist))), restarts
        # the teacher as slide scorer, by hand on one slide: the kept classifier's instance head, top 1 % (>= 1 patch)
        net = gain.load_bag_classifier(run / f"round_{r}" / "bag_phase" / "bag_classifier.pt")
        sid = scores[r]["slide_ids"][-1]
        feats = gain.FeatureStore(run / "extra_test" / data.name / f"round_{r}" / "features").load(sid)["features"]
        with torch.no_grad():
            probs = np.sort(torch.softmax(net.instance_logits(feats.float()).double(), -1)[:, 1].numpy())
        assert scores[r]["teacher_top"][-1] == pytest.approx(probs[-max(1, int(0.01 * len(probs))) :].mean(), abs=1e-6)
        s, y = np.array(scores[r]["teacher_top"]), np.array(scores[r]["labels"])
        pairs = (s[y == 1][:, None] > s[y == 0][None]) + 0.5 * (s[y == 1][:, None] == s[y == 0][None])
        assert same(gain.extra_test_rows(scores)[int(r)]["extra_teacher_slide_auc"], float(pairs.mean()))
    # teacher_calibration.py on the same run: its patch AUC and labels are the workflow's teacher record
    calibration = _module("teacher_calibration").main(["--run", str(run), "--data", str(data)])
    assert [row["round"] for row in calibration] == [0, 1]
    for row in calibration:
        teacher = state["rounds"][str(row["round"])]["teacher"]
        for key in ("patch_auc", "normal_called_tumour"):
            assert same(row[key], teacher[key]), (key, row, teacher)
        assert same(row["precision_at_0.5"], teacher["precision"])
        assert 0 <= row["tumour_share"] <= 1 and 0 <= row["normal_above_0.99"] <= row["normal_called_tumour"] + 1e-12


def _scale():
    spec = importlib.util.spec_from_file_location("scale", BENCH.with_name("scale.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_icmil_gain_reports_of_commands_into_one_out_add_up_unless_their_options_differ(tmp_path):
    """A second command into the same ``--out`` (another aggregator, same options) keeps the first one's rows and
    replaces only those it measures again; one with other options (a size) replaces the report."""
    gain = _module()
    args = gain.parse(["--out", str(tmp_path), "--aggregators", "abmil", "--seeds", "0"])
    row = dict(setting="hard", variant="v", seed=0, start="ssl", aggregator="abmil", test_auc=0.5)
    first = [{**row, "round": r} for r in (0, 1)]
    report = tmp_path / "report-v.json"
    report.write_text(json.dumps({"args": vars(args), "rows": first}))
    dtfd = [{**row, "aggregator": "dtfd", "round": 1}]
    assert gain.merge_rows(report, dtfd, gain.parse(["--out", str(tmp_path), "--aggregators", "dtfd"])) == first + dtfd
    again = [{**row, "round": 1, "test_auc": 0.9}]
    assert gain.merge_rows(report, again, args) == first[:1] + again
    other = gain.parse(["--out", str(tmp_path), "--aggregators", "dtfd", "--width", "1000"])
    assert gain.merge_rows(report, dtfd, other) == dtfd
    assert gain.merge_rows(tmp_path / "none.json", dtfd, args) == dtfd


def test_scale_round_smoke_times_every_phase_and_extrapolates(tmp_path):
    result = _scale().main(
        ["round", "--smoke", "--device", "cpu", "--out", str(tmp_path), "--json", str(tmp_path / "r.json")]
    )
    assert json.loads((tmp_path / "r.json").read_text())["measured"] == result["measured"]
    assert set(result["measured"]) == set(result["extrapolated"]) and len(result["measured"]) == 5
    assert all(v > 0 for v in [*result["measured"].values(), *result["rates"].values()])
    assert result["patches"][0] == result["patches"][1] > 6 * 100  # every generated slide has tissue patches
    # the measured call, plus the rest of the target at the phase's steady rate (its start-up paid once)
    rates, measured, extrapolated = result["rates"], result["measured"], result["extrapolated"]
    embed = measured["embed round 0 (s)"] + (2.7e6 - result["patches"][0]) / rates["embed round 0 steady patches/s"]
    assert extrapolated["embed round 0 (s)"] == pytest.approx(embed)
    more = (2000 - 2) * 8 / rates["embedder phase round 1 steady patches/s"]  # --smoke: 2 batches of 8
    assert extrapolated["embedder phase round 1 (s)"] == pytest.approx(measured["embedder phase round 1 (s)"] + more)
    # the bag phase: measured with 1 restart, extrapolated at the bundle's 3 restarts of 50 epochs on 270 of 400 slides
    bag = rates["bag phase s per 1k instance-epochs"] * 2.7e6 * 270 / 400 * 50 * 3 / 1000
    assert extrapolated["bag phase round 0 (s)"] == pytest.approx(bag) == extrapolated["bag phase round 1 (s)"]


def test_scale_bags_measures_peak_memory_per_bag_size():
    rows = _scale().main(["bags", "--sizes", "2000", "--dim", "32", "--cohort", "4"])
    assert [(r["size"], r["bags"]) for r in rows] == [(2000, 2), (2000, 4)]
    assert all(r["peak_gib"] > 0.1 and r["seconds_per_bag_step"] > 0 for r in rows)


def test_icmil_gain_same_init_gain_pairs_restarts_by_seed():
    """Round 1's restart k shares its seed with round 0's restart k + 1: the same-init gain pairs those, per seed."""
    gain = _module()
    row = dict(setting="hard", variant="", start="ssl", aggregator="abmil", restart_mean_test_auc=0.5)
    row.update(
        dict.fromkeys(("val_auc", "test_auc", "test_acc", "test_f1", "teacher_patch_auc", "probe_patch_auc"), 0.5)
    )
    row["teacher_view_agreement"] = None
    group = [
        {**row, "seed": 0, "round": 0, "restart_seeds": [0, 1, 2], "restart_test_aucs": [0.5, 0.6, 0.7]},
        {**row, "seed": 0, "round": 1, "restart_seeds": [1, 2, 3], "restart_test_aucs": [0.9, 0.6, 0.1]},
        {**row, "seed": 1, "round": 0, "restart_seeds": [1, 2, 3], "restart_test_aucs": [0.8, 0.8, 0.8]},
        {**row, "seed": 1, "round": 1, "restart_seeds": [2, 3, 4], "restart_test_aucs": [0.7, 0.9, 0.2]},
        {**row, "seed": 2, "round": 0, "restart_test_aucs": [0.8]},  # a report from before restart_seeds: left out
        {**row, "seed": 2, "round": 1, "restart_test_aucs": [0.9]},
    ]
    sel = [r for r in group if r["round"] == 1]
    assert gain._same_init_gains(group, sel) == pytest.approx([((0.9 - 0.6) + (0.6 - 0.7)) / 2, (-0.1 + 0.1) / 2])
    md = gain.markdown(group, gain.parse([]), 1.0)
    assert "| hard | ssl | abmil | 1 |" in md and md.rstrip().endswith("| 0.050 +/- 0.071 |")


def test_icmil_gain_teacher_slide_score_and_its_paired_gain_on_the_extra_slides():
    """The teacher as slide scorer averages the top 1 % of patches (2 of 250 here, not the max), and the extra-slide
    rows give its AUC and its paired gain over round 0 (DeLong), and the same for round 0's classifier and the
    student's on round 1's features, leaving the bag classifier's keys as they were; a round 0 scored before the
    teacher score existed gives no teacher gain."""
    gain = _module()
    torch.manual_seed(0)
    net = gain.aggregator_class("abmil")(in_dim=8, hidden_dim=16, attention_dim=4)
    feats = torch.randn(250, 8)
    with torch.no_grad():
        logits = net.instance_logits(feats).double()
    p = np.sort(np.exp(logits[:, 1]) / np.exp(logits).sum(1))
    assert gain.teacher_slide_score(net, feats) == pytest.approx(p[-2:].mean()) and p[-1] != pytest.approx(p[-2])
    few = np.exp(logits[:30, 1]) / np.exp(logits[:30]).sum(1)
    assert gain.teacher_slide_score(net, feats[:30]) == pytest.approx(float(few.max()))  # < 100 patches: the top one
    y = [0, 0, 0, 1, 1, 1]
    ids = [f"s{i}" for i in range(6)]
    r0 = {"slide_ids": ids, "labels": y, "kept": [0.1, 0.5, 0.3, 0.4, 0.8, 0.9], "restarts": [[0.2] * 6]}
    r1 = {"slide_ids": ids, "labels": y, "kept": [0.2, 0.1, 0.3, 0.4, 0.8, 0.6], "restarts": []}
    r1["round0_kept"] = [0.9, 0.1, 0.2, 0.3, 0.4, 0.5]  # round 0's classifier on round 1's features: AUC 6 / 9
    r1["student_kept"] = [0.5, 0.4, 0.3, 0.6, 0.7, 0.2]  # the student's classifier on them: AUC 6 / 9 too
    top0, top1 = [0.3, 0.6, 0.2, 0.5, 0.4, 0.7], [0.1, 0.2, 0.3, 0.6, 0.5, 0.4]
    rows = gain.extra_test_rows({"0": {**r0, "teacher_top": top0}, "1": {**r1, "teacher_top": top1}})
    assert rows[0]["extra_teacher_slide_auc"] == pytest.approx(7 / 9) and "extra_teacher_slide_gain" not in rows[0]
    assert rows[1]["extra_teacher_slide_auc"] == 1.0 and rows[0]["extra_test_auc"] == pytest.approx(8 / 9)
    want = gain.paired_auc_difference(top0, top1, np.array(y))
    assert (rows[1]["extra_teacher_slide_gain"], rows[1]["extra_teacher_slide_gain_se"]) == (want["diff"], want["se"])
    assert rows[1]["extra_teacher_slide_gain"] == pytest.approx(1 - 7 / 9)
    assert rows[1]["extra_test_gain"] == pytest.approx(1 - 8 / 9) and rows[1]["extra_restart_test_aucs"] == []
    assert rows[1]["extra_round0_classifier_auc"] == pytest.approx(6 / 9)
    want = gain.paired_auc_difference(r0["kept"], r1["round0_kept"], np.array(y))
    assert (rows[1]["extra_round0_classifier_gain"], rows[1]["extra_round0_classifier_gain_se"]) == tuple(
        want[k] for k in ("diff", "se")
    )
    assert want["diff"] == pytest.approx(6 / 9 - 8 / 9) and "extra_round0_classifier_auc" not in rows[0]
    want = gain.paired_auc_difference(r0["kept"], r1["student_kept"], np.array(y))
    assert rows[1]["extra_student_classifier_auc"] == pytest.approx(6 / 9)
    assert (rows[1]["extra_student_classifier_gain"], rows[1]["extra_student_classifier_gain_se"]) == tuple(
        want[k] for k in ("diff", "se")
    )
    old = gain.extra_test_rows({"0": r0, "1": {**r1, "teacher_top": top1}})  # round 0 from before the score
    assert "extra_teacher_slide_gain" not in old[1] and old[1]["extra_test_gain_se"] == rows[1]["extra_test_gain_se"]


def test_embed_benchmark_loader_names_choose_the_compile_mode():
    """``t8x2se`` eager, ``t8x2sc`` inductor's default mode, ``t8x2sg`` CUDA graphs, ``t8x2s`` the engine's default
    (CUDA graphs on CUDA): the GPU check times each under its own name."""
    import sys

    sys.path.insert(0, str(BENCH.parent))
    try:
        embed = _module("embed")
    finally:
        sys.path.remove(str(BENCH.parent))
    loaders = {spec: embed.parse_loader(spec) for spec in ("t8x2se", "t8x2sc", "t8x2sg", "t8x2s", "8x2")}
    assert [loaders[s].get("compile", "default") for s in loaders] == [
        False,
        True,
        "reduce-overhead",
        "default",
        "default",
    ]
    assert loaders["t8x2s"] == {"num_workers": 0, "prefetch_threads": 8, "read_threads": 2, "copy_stream": True}
    assert loaders["8x2"]["num_workers"] == 8 and not loaders["8x2"]["copy_stream"]


def test_start_picks_rank_each_start_as_the_bag_phase_does(tmp_path):
    """Per start, the restart ``restart_rank`` puts first among that start's (validation AUC, then loss, then the
    earlier); nothing for a round of one start or without restarts."""
    gain = _module()
    bag = tmp_path / "round_1" / "bag_phase"
    vals = [(0.8, 0.5), (0.9, 0.6), (0.9, 0.4), (0.95, 0.3), (0.95, 0.2), (0.7, 0.1)]  # (val AUC, val loss)
    starts = ["fresh"] * 3 + ["warm"] * 3
    for k, (auc, loss) in enumerate(vals):
        (bag / f"restart_{k}").mkdir(parents=True)
        record = {"restart": k, "best_metric": auc, "val": {"val_auc": auc, "val_loss": loss}}
        (bag / f"restart_{k}" / "restart.json").write_text(json.dumps(record))
    assert gain.start_picks(tmp_path, 1) == {}  # no restarts.json
    restarts = [
        {"restart": k, "seed": k, "best_metric": v[0], "start": st} for k, (v, st) in enumerate(zip(vals, starts))
    ]
    (bag / "restarts.json").write_text(json.dumps({"chosen": 4, "restarts": restarts}))
    # fresh: 1 and 2 tie on AUC, 2 has the lower loss; warm: 3 and 4 tie on AUC, 4 has the lower loss
    assert gain.start_picks(tmp_path, 1) == {"fresh": 2, "warm": 4}
    one = [{k: v for k, v in x.items() if k != "start"} for x in restarts]  # records without a start: all fresh
    (bag / "restarts.json").write_text(json.dumps({"chosen": 4, "restarts": one}))
    assert gain.start_picks(tmp_path, 1) == {}


def test_extra_start_best_is_each_picked_restart_against_round0():
    """``extra_start_best``: the picked restart's AUC on every extra slide, and its paired gain over round 0's kept
    classifier on the slides round 0 scored too."""
    from monai_icmil.metrics import binary_auc, paired_auc_difference

    gain = _module()
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 6)
    ids = [f"s{i}" for i in range(12)]
    restarts = [(y * w + rng.random(12)).tolist() for w in (0.2, 0.5, 0.8, 1.1)]
    kept0 = (y * 0.4 + rng.random(12)).tolist()
    scores = {
        "0": {"slide_ids": ids[1:], "labels": y[1:].tolist(), "kept": kept0[1:], "restarts": [kept0[1:]]},
        "1": {"slide_ids": ids, "labels": y.tolist(), "kept": restarts[2], "restarts": restarts},
    }
    rows = gain.extra_test_rows(scores, {0: {}, 1: {"fresh": 1, "warm": 2}})
    assert "extra_start_best" not in rows[0]
    for start, k in (("fresh", 1), ("warm", 2)):
        got = rows[1]["extra_start_best"][start]
        assert got["restart"] == k and got["auc"] == pytest.approx(binary_auc(np.array(restarts[k]), y))
        want = paired_auc_difference(np.array(kept0[1:]), np.array(restarts[k][1:]), y[1:])  # s0: round 1 only
        assert got["gain"] == pytest.approx(want["diff"]) and got["gain_se"] == pytest.approx(want["se"])
    assert rows[1]["extra_start_best"]["warm"]["auc"] != pytest.approx(rows[1]["extra_start_best"]["fresh"]["auc"])


def test_tissue_zoo_smoke_new_detector_clears_tinted_glass_finds_faded_and_pale_stain_and_keeps_cmu1(
    tmp_path, cmu_slide
):
    """The zoo's smoke cases: against the detector without glass balance, adaptive floor and pale-tissue split, the
    defaults leave a blank yellowish slide empty, find CMU-1 faded to a tenth of its stain and the pale half of an
    unevenly stained CMU-1, and keep all of the old mask of CMU-1 itself (plus its pale strand); the JSON is the
    returned result; without the slide only the blank cases are run."""
    zoo = _module("tissue_zoo")
    result = zoo.main(
        ["--smoke", "--old", "s58", "--oracle", "new", "--cmu", cmu_slide, "--json", str(tmp_path / "z.json")]
    )
    assert json.loads((tmp_path / "z.json").read_text()) == result
    rows = {r["case"]: r for r in result["rows"]}
    assert list(rows) == list(zoo.SMOKE)
    tinted, white = rows["blank_yellow"], rows["blank_white"]
    assert tinted["old"]["cover"] > 0.5 and tinted["old"]["warning"] == "cover"
    assert tinted["new"]["cover"] == 0 and tinted["new"]["warning"] == "empty"
    assert white["old"]["cover"] == white["new"]["cover"] == 0 and white["identical"]
    faded = rows["cmu1_fade0.1_white"]
    assert faded["new"]["recall"] > faded["old"]["recall"] + 0.5 and faded["new"]["precision"] > 0.9
    assert (faded["old"]["warning"], faded["new"]["warning"]) == ("faint", "lowered")
    uneven = rows["cmu1_uneven"]  # Otsu's threshold split the dark half from the pale one
    assert uneven["old"]["recall"] < 0.3 and uneven["new"]["recall"] > 0.9 and uneven["new"]["precision"] > 0.9
    cmu1 = rows["cmu1"]  # the oracle is the new mask: the old one is inside it
    assert cmu1["old"]["precision"] == 1.0 and 0.8 < cmu1["old"]["recall"] < 0.95 and cmu1["new"]["warning"] == "-"
    assert set(result["regressions"]) <= {"cmu1_uneven"}
    assert {"blank_yellow", "cmu1_fade0.1_white", "cmu1_uneven", "cmu1"} <= set(result["improvements"])
    assert result["summary"].startswith("tissue zoo (seed 59, old s58, oracle new): 7 cases")
    # the rules: a recall drop beyond 0.05 regresses, a new warning only where the case is not meant to be faint
    old = {"cover": 0.3, "recall": 0.9, "precision": None, "warning": "-"}
    new = {"cover": 0.3, "recall": 0.8, "precision": 0.99, "warning": "cover"}
    assert zoo.worse("dense95", False, old, new) == ["recall", "warning"]
    assert zoo.worse("cmu1_fade0.1_white", False, old, new) == ["recall"]
    assert zoo.worse("blank_x", True, old, {**new, "cover": 0.303}) == ["cover"]
    blanks = zoo.main(["--smoke", "--cmu", str(tmp_path / "missing.svs")])
    assert [r["case"] for r in blanks["rows"]] == ["blank_white", "blank_yellow"] and blanks["cmu"] is None


def test_quilted_slides_are_a_datalist_of_pyramids_with_masks_and_the_new_detector_keeps_more_of_their_tissue(
    tmp_path, cmu_slide
):
    """Four slides of the other generator (real H&E quilted): pyramidal TIFFs read with the mpp of their resolution
    tags, string labels, a tumour mask on the malignant slide, a tissue mask on each; the detector's comparison
    keeps at least the old recall at a plausible precision."""
    quilted = _module("quilted_slides")
    out = tmp_path / "q"
    with pytest.raises(
        FileNotFoundError, match=r"missing\.svs' does not exist: give CMU-1-Small-Region\.svs with --cmu"
    ):
        quilted.main(["make", str(out), "--cmu", str(tmp_path / "missing.svs")])
    datalist = quilted.main(["make", str(out), "--counts", "2,1,1", "--workers", "1", "--cmu", cmu_slide])
    assert json.loads((out / "datalist.json").read_text()) == datalist
    assert sorted(e["label"] for e in datalist["training"]) == ["benign", "malignant"]
    malignant = next(e for e in datalist["training"] if e["label"] == "malignant")
    assert (out / malignant["tumour_mask"]).is_file() and not any("tumour_mask" in e for e in datalist["test"])
    from monai_icmil.data import open_slide

    with open_slide(out / datalist["test"][0]["image"]) as reader:
        assert reader.mpp == pytest.approx(1.0) and reader.level_count == 3 and reader.dimensions == (1500, 1200)
    result = quilted.main(["tissue", str(out), "--json", str(tmp_path / "t.json")])
    assert json.loads((tmp_path / "t.json").read_text()) == result and len(result["rows"]) == 4
    old, new = result["summary"]["old"], result["summary"]["new"]
    assert new["recall_mean"] >= old["recall_mean"] and new["recall_min"] > 0.8 and new["precision_min"] > 0.8
    with pytest.raises(SystemExit):
        quilted.main(["make", str(out), "--counts", "2,0,1"])
    with pytest.raises(SystemExit):
        quilted.main(["make", str(out), "--tumour", "0.5,0.2"])


def test_icmil_gain_quilted_setting_runs_on_real_texture_with_ints_and_every_mask(tmp_path, cmu_slide):
    """``--settings quilted`` (issue #21's real-texture attempt): the other generator's slides, with 0 / 1 labels, a
    tumour mask on every slide (empty on benign ones) and tumour on 5-15 % of a malignant slide's tissue, run through
    the bundle for both rounds; a datalist left with the generator's string labels is converted on the next run."""
    gain = _module()
    assert gain.QUILTED_SETTINGS == {"quilted": (0.05, 0.15)} and "quilted" not in gain.parse(["--smoke"]).settings
    args = ["--smoke", "--out", str(tmp_path), "--settings", "quilted", "--starts", "ssl", "--aggregators", "abmil"]
    rows = gain.main(args + ["--cmu", cmu_slide])
    assert {(r["setting"], r["aggregator"], r["round"]) for r in rows} == {("quilted", "abmil", k) for k in (0, 1)}
    assert all(0 <= r["test_auc"] <= 1 and not math.isnan(r["teacher_patch_auc"]) for r in rows), rows
    data = tmp_path / "data" / "quilted" / "seed_0"
    datalist = json.loads((data / "datalist.json").read_text())
    entries = [e for split in ("training", "validation", "test") for e in datalist[split]]
    assert sorted({e["label"] for e in entries}) == [0, 1]
    from PIL import Image

    for e in entries:
        tumour = np.asarray(Image.open(data / e["tumour_mask"])) > 0
        if e["label"] == 0:
            assert not tumour.any(), e
        else:
            slide_id = Path(e["image"]).stem
            tissue = np.asarray(Image.open(data / "masks" / f"{slide_id}_tissue.png")) > 0
            assert 0.03 <= tumour.sum() / tissue.sum() <= 0.15, e  # (the region's opening trims it a little)
    # an interrupted conversion: string labels again, no empty masks; the next make_data restores both
    strings = {
        s: [{k: v for k, v in e.items() if e["label"] or k != "tumour_mask"} for e in es] for s, es in datalist.items()
    }
    for es in strings.values():
        for e in es:
            e["label"] = ["benign", "malignant"][e["label"]]
    (data / "datalist.json").write_text(json.dumps(strings))
    gain.make_data("quilted", 0, gain.parse(args + ["--cmu", str(tmp_path / "unused.svs")]), tmp_path)
    assert json.loads((data / "datalist.json").read_text()) == datalist


def test_restart_average_scores_the_mean_of_every_restarts_probability(tmp_path):
    """``restart_average.py`` scores each round by the mean of its restarts' tumour probabilities, on the stored test
    features and on the extra slides' ``scores.json``, and gives round 1 minus round 0 per seed with mean and sd."""
    from monai_icmil.data.store import FeatureStore
    from monai_icmil.engines.bag_phase import evaluate_bags, save_bag_classifier
    from monai_icmil.metrics import binary_auc

    avg = _module("restart_average")
    gain = _module()
    torch.manual_seed(0)
    labels = [0, 1, 0, 1, 1, 0, 1, 0]
    datalist = {"test": [{"image": f"te_{i:03d}.tiff", "label": y} for i, y in enumerate(labels)]}
    want = {}
    for seed in (0, 1):
        (tmp_path / "data" / "quilted" / f"seed_{seed}").mkdir(parents=True)
        (tmp_path / "data" / "quilted" / f"seed_{seed}" / "datalist.json").write_text(json.dumps(datalist))
        run = tmp_path / "runs" / "quilted" / f"seed_{seed}" / "ssl" / "abmil-v"
        for r in (0, 1):
            store = FeatureStore(run / f"round_{r}" / "features")
            bags = []
            for i, y in enumerate(labels):
                feats = torch.randn(5 + i, 8) + 0.3 * y
                store.save(f"te_{i:03d}", {"features": feats, "coords": torch.zeros(5 + i, 2)}, key={"k": 1})
                bags.append({"slide_id": f"te_{i:03d}", "label": y, "features": feats.half().float()})
            probs = []
            for k in range(2 + r):  # round 0: 2 restarts, round 1: 3
                net = gain.aggregator_class("abmil")(in_dim=8, hidden_dim=16, attention_dim=4)
                save_bag_classifier(run / f"round_{r}" / "bag_phase" / f"restart_{k}" / "bag_classifier.pt", net)
                probs.append([row["probs"][-1] for row in evaluate_bags(net, bags)[1]])
            extra = [[0.5, 0.4, 0.1, 0.9], [0.1, 0.6, 0.7, 0.8], [0.2, 0.3, 0.6, 0.4]][: 2 + r]  # each 3/4 or less
            scores = {"slide_ids": ["a", "b", "c", "d"], "labels": [0, 1, 0, 1], "restarts": extra}
            where = run / "extra_test" / f"seed_{seed}_extra_test_4"
            where.mkdir(parents=True, exist_ok=True)
            old = json.loads((where / "scores.json").read_text()) if (where / "scores.json").is_file() else {}
            (where / "scores.json").write_text(json.dumps({**old, str(r): scores}))
            want[seed, r] = (
                binary_auc(np.mean(probs, 0), np.array(labels)),
                binary_auc(np.mean(extra, 0), np.array([0, 1, 0, 1])),
            )
    argv = f"--out {tmp_path} --variant v --aggregators abmil --seeds 0 1 --json {tmp_path / 'a.json'}".split()
    out = avg.main(argv)
    got = {(x["seed"], x["round"]): (x["test_auc"], x["extra_test_auc"]) for x in out["rows"]}
    assert sorted(got) == sorted(want)
    assert [got[k] for k in sorted(got)] == [pytest.approx(want[k]) for k in sorted(want)]
    assert got[0, 0][1] == 1.0 and got[0, 1][1] == pytest.approx(3 / 4)  # round 0: 3/4 each, 1 averaged
    assert [x["restarts"] for x in out["rows"]] == [2, 3, 2, 3]
    assert [x["test_slides"] for x in out["rows"]] == [8] * 4
    gains = [want[s, 1][0] - want[s, 0][0] for s in (0, 1)]
    assert out["gains"]["abmil/test_auc"]["gains"] == pytest.approx(gains)
    assert out["gains"]["abmil/test_auc"]["sd"] == pytest.approx(float(np.std(gains, ddof=1)))
    assert json.loads((tmp_path / "a.json").read_text())["gains"]["abmil/extra_test_auc"]["mean"] == pytest.approx(
        np.mean([want[s, 1][1] - want[s, 0][1] for s in (0, 1)])
    )


def test_pooled_gain_pools_the_test_and_extra_slides_both_rounds_scored(tmp_path):
    """``pooled_gain.py`` scores each round's kept classifier on the run's test slides (``predictions.csv``) and its
    extra slides (``scores.json``) pooled, pairs the rounds on the slides both scored, and gives mean and sd over
    seeds; with scores of two extra sets it asks which one."""
    pooled = _module("pooled_gain")
    # test: round 0 3/4, round 1 1; extra: the same; pooled by hand: 13/16 and 15/16 (not the mean of the parts)
    test = {0: [0.2, 0.6, 0.7, 0.8, 0.95], 1: [0.2, 0.6, 0.5, 0.8]}  # te_004 failed to read in round 1
    extra = {0: [0.1, 0.3, 0.4, 0.9], 1: [0.1, 0.3, 0.2, 0.9]}
    labels = [0, 1, 0, 1, 0]
    for seed in (0, 1):
        run = tmp_path / "runs" / "quilted" / f"seed_{seed}" / "ssl" / "dtfd-v"
        scores = {}
        for r in (0, 1):
            (run / f"round_{r}" / "test").mkdir(parents=True)
            rows = [f"te_{i:03d},{labels[i]},{1 - p:.2f},{p},{int(p > 0.5)}" for i, p in enumerate(test[r])]
            text = "slide,label,prob_normal,prob_tumour,pred\n" + "\n".join(rows) + "\n"
            (run / f"round_{r}" / "test" / "predictions.csv").write_text(text)
            scores[str(r)] = {"slide_ids": [f"te_{i:03d}" for i in range(4)], "labels": labels[:4], "kept": extra[r]}
        (run / "extra_test" / f"seed_{seed}_extra_test_4").mkdir(parents=True)
        (run / "extra_test" / f"seed_{seed}_extra_test_4" / "scores.json").write_text(json.dumps(scores))
    argv = f"--out {tmp_path} --variant v --aggregators dtfd --seeds 0 1 --json {tmp_path / 'p.json'}".split()
    out = pooled.main(argv)
    row = out["rows"][0]
    assert (row["test"]["n"], row["extra"]["n"], row["pooled"]["n"]) == (4, 4, 8)
    assert (row["test"]["round0"], row["test"]["round1"]) == (0.75, 1.0)  # te_004 (0.95, normal) left out of both
    assert (row["pooled"]["round0"], row["pooled"]["round1"]) == (13 / 16, 15 / 16)
    assert row["pooled"]["gain"] == pytest.approx(2 / 16) and row["pooled"]["se"] > 0
    g = out["gains"]["dtfd/pooled"]
    assert g["gains"] == pytest.approx([2 / 16, 2 / 16]) and g["sd"] == 0 and g["met"]
    assert json.loads((tmp_path / "p.json").read_text())["gains"]["dtfd/test"]["mean"] == pytest.approx(0.25)
    second = tmp_path / "runs" / "quilted" / "seed_0" / "ssl" / "dtfd-v" / "extra_test" / "seed_0_extra_test_8"
    second.mkdir()
    (second / "scores.json").write_text("{}")
    with pytest.raises(ValueError, match=r"seed_0_extra_test_4, seed_0_extra_test_8.*--extra_test N"):
        pooled.main(argv)
    assert pooled.main([*argv, "--extra_test", "4"])["rows"][0]["pooled"]["gain"] == pytest.approx(2 / 16)
