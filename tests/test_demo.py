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

# demo.json at CI size: half its training and validation slides, two thirds of its test slides, one coupled round
# (about 2 min on 2 cores instead of 4)
CI_SIZE = {
    "synthetic#num_training": 48,
    "synthetic#num_validation": 16,
    "synthetic#num_test": 16,
    "num_rounds": 1,
    "round_patience": 1,
    "mlflow#enabled": False,
    "progress": False,
}
# the final test AUC the CI-size demo must reach: seeds 0, 1 and 2 at this size gave 1.000 / 0.969 / 0.906 (final
# round 0 in all three, the witness search on; 0.906 / 0.828 / 0.906 without it; benchmarks/RESULTS.md); 0.75 is below
# all three by more than one misordered pair in five of the 64 positive-negative pairs of a 16-slide split (thread
# counts and library versions move a run by a pair or two), and far above chance
MIN_TEST_AUC = 0.75


def test_the_demo_learns_to_find_the_tumour_slides(tmp_path):
    """Seed 0 at CI size: the final round's test AUC clears the bar set from three seeds, its tumour probabilities are
    not all on one side of 0.5, no round calls every test slide one class, and every round's instance teacher is
    measured against the ground truth."""
    ci = tmp_path / "ci.json"
    ci.write_text(json.dumps(CI_SIZE))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    cmd += [
        json.dumps([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json"), str(ci)]),
        "--bundle_root",
        str(BUNDLE),
    ]
    cmd += ["--dataset_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--seed", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    final = next(row for row in summary["rows"] if row["round"] == summary["final_round"])
    assert final["test_auc"] >= MIN_TEST_AUC, summary["rows"]
    probs = [float(r["prob_tumour"]) for r in csv.DictReader(open(out / "test_inference" / "probabilities.csv"))]
    assert len(probs) == 16 and min(probs) < 0.5 < max(probs)
    assert "calls every test slide" not in (out / "summary.md").read_text()
    assert all(0.5 < row["teacher_patch_auc"] <= 1 for row in summary["rows"])
    # train.json's bag phase runs the witness search by default: recorded in every round
    state = json.loads((out / "state.json").read_text())
    for r in (0, 1):
        assert (out / f"round_{r}" / "bag_phase" / "witness_search.json").is_file()
        assert 0 < state["rounds"][str(r)]["bag_phase"]["witness_search"]["fraction"] <= 0.05
