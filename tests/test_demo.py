# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The README's main job learns: ``train.json`` + ``demo.json``, at CI size, through ``python -m monai.bundle run``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "icmil"
CONFIGS = BUNDLE / "configs"

# demo.json at CI size: half its training and validation slides, two thirds of its test slides, round 0 only (about
# 1 min on 2 cores instead of 4; the coupled rounds' workings are tests/test_bundle.py's, on the same configs)
CI_SIZE = {
    "synthetic#num_training": 48,
    "synthetic#num_validation": 16,
    "synthetic#num_test": 16,
    "num_rounds": 0,
    "mlflow#enabled": False,
    "progress": False,
}
# the final test AUC the CI-size demo must reach: seeds 0, 1 and 2 at this size with one coupled round gave 1.000 /
# 0.969 / 0.906, validation keeping round 0 in all three (so these are round 0's, which this test runs alone; the
# witness search on; 0.906 / 0.828 / 0.906 without it; benchmarks/RESULTS.md); 0.75 is below
# all three by more than one misordered pair in five of the 64 positive-negative pairs of a 16-slide split (thread
# counts and library versions move a run by a pair or two), and far above chance
MIN_TEST_AUC = 0.75


def test_the_demo_learns_to_find_the_tumour_slides(tmp_path):
    """Seed 0 at CI size: round 0's test AUC clears the bar set from three seeds, its tumour probabilities are not all
    on one side of 0.5, it does not call every test slide one class, and its instance teacher is measured against the
    ground truth."""
    ci = tmp_path / "ci.json"
    ci.write_text(json.dumps(CI_SIZE))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    cmd += [
        json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json"), str(ci)]),
        "--bundle_root",
        str(BUNDLE),
    ]
    cmd += ["--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--seed", "0"]
    env = {k: v for k, v in os.environ.items() if k != "CUFILE_LOGFILE_PATH"}  # as a user's shell has it
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # a fresh interpreter in the user's working directory, MONAI imported first: cuCIM's reads leave no cufile.log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ci.json", "data", "out"]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    final = next(row for row in summary["rows"] if row["round"] == summary["final_round"])
    assert final["test_auc"] >= MIN_TEST_AUC, summary["rows"]
    probs = [float(r["prob_tumour"]) for r in csv.DictReader(open(out / "test_inference" / "probabilities.csv"))]
    assert len(probs) == 16 and min(probs) < 0.5 < max(probs)
    assert "calls every test slide" not in (out / "summary.md").read_text()
    assert all(0.5 < row["teacher_patch_auc"] <= 1 for row in summary["rows"])
    # train.json's bag phase runs the witness search by default: recorded in the round
    state = json.loads((out / "state.json").read_text())
    assert summary["final_round"] == 0 and [row["round"] for row in summary["rows"]] == [0]
    assert (out / "round_0" / "bag_phase" / "witness_search.json").is_file()
    assert 0 < state["rounds"]["0"]["bag_phase"]["witness_search"]["fraction"] <= 0.05
