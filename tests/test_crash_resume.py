# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""``kill -9`` during embedding, the bag phase or the embedder phase, then the same command again: the run resumes
(it does not start over) and ends with exactly the uninterrupted run's metrics and weights (CPU, same seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("kill_script.py")
ROOT = SCRIPT.parents[1]


def _run(data: Path, out: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--data", str(data), "--out", str(out)] + (["--kill", kill] if kill else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def uninterrupted(synthetic_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    proc = _run(synthetic_dataset.parent, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _final(out: Path) -> dict:
    rounds = json.loads((out / "state.json").read_text())["rounds"]
    return {
        r: {"val": s["bag_phase"]["val"], "test": s["test"]["metrics"], "fingerprint": s["embed"]["fingerprint"]}
        for r, s in rounds.items()
    }


@pytest.mark.parametrize(
    "kill, resumed",
    [
        ("embed:3", None),  # while the third slide's features of round 0 are written
        (
            "bag_phase:10",
            "round_0/bag_phase/resume/resume_checkpoint_8.pt (iteration 8)",
        ),  # round 0's bag phase, in its third epoch
        (
            "embedder_phase:7",
            "round_1/embedder_phase/resume/resume_checkpoint_6.pt (iteration 6)",
        ),  # round 1's embedder phase, inside its second epoch
    ],
)
def test_kill_9_then_rerun_ends_as_the_uninterrupted_run(kill, resumed, uninterrupted, synthetic_dataset, tmp_path):
    out = tmp_path / "out"
    killed = _run(synthetic_dataset.parent, out, kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "summary.json").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith((".", "tmp")) and p.is_file()]  # no partial write
    rerun = _run(synthetic_dataset.parent, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if resumed:
        assert resumed in rerun.stderr
    else:  # the two slides written before the kill were kept, not embedded again
        assert json.loads((out / "state.json").read_text())["rounds"]["0"]["embed"]["skipped"] == 2
    assert _final(out) == _final(uninterrupted)
    for r in (0, 1):
        want = torch.load(uninterrupted / f"round_{r}/bag_phase/bag_classifier.pt", weights_only=True)["state_dict"]
        got = torch.load(out / f"round_{r}/bag_phase/bag_classifier.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert not list(out.rglob("resume_checkpoint_*.pt"))  # finished phases leave no resume checkpoint
