# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""``kill -9`` during tiling, embedding, the bag phase, the embedder phase or inference, then the same command again:
the run resumes (it does not start over) and ends with exactly the uninterrupted run's metrics, weights and files
(CPU, same seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forked_python

SCRIPT = Path(__file__).with_name("kill_script.py")
ROOT = SCRIPT.parents[1]


def _run(
    data: Path, out: Path, kill: str | None = None, *extra: str, fresh: bool = False
) -> subprocess.CompletedProcess:
    """The kill script on ``data`` into ``out``, forked from the tests' MONAI-imported server, or in a fresh
    interpreter (``fresh``: its own string-hash seed and random state, so that a resumed run matching it shows no
    dependence on either)."""
    cmd = [str(SCRIPT), "--data", str(data), "--out", str(out), *extra]
    cmd += ["--kill", kill] if kill else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    if fresh:
        return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600, env=env)
    return forked_python.run(cmd, env=env, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(synthetic_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    proc = _run(synthetic_dataset.parent, out, fresh=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _final(out: Path) -> dict:
    rounds = json.loads((out / "state.json").read_text())["rounds"]
    return {
        r: {"val": s["bag_phase"]["val"], "test": s["test"]["metrics"], "fingerprint": s["embed"]["fingerprint"]}
        for r, s in rounds.items()
    }


def _killed_at(kill: str, data: Path, out: Path) -> subprocess.CompletedProcess:
    """One run of the command, SIGKILLed at ``kill``: it died there and left no partial write."""
    killed = _run(data, out, kill)
    assert killed.returncode == -signal.SIGKILL, (kill, killed.stderr[-3000:])
    assert not (out / "summary.json").exists()
    _no_partial_writes(out)
    return killed


def test_kill_9_in_each_phase_then_rerun_ends_as_the_uninterrupted_run(uninterrupted, synthetic_dataset, tmp_path):
    """The same command four times, killed in turn while round 0's features are written (the third slide), in round
    0's bag phase (its third epoch) and in round 1's embedder phase (its second epoch), then left to finish: each
    rerun resumes where the last one died (it does not start over), and the run ends with exactly the uninterrupted
    run's metrics and weights."""
    data, out = synthetic_dataset.parent, tmp_path / "out"
    _killed_at("embed:3", data, out)
    _killed_at("bag_phase:10", data, out)  # the rerun's 10th bag-phase step: the embed phase went on from slide 3
    # the two slides written before the first kill were kept, not embedded again
    assert json.loads((out / "state.json").read_text())["rounds"]["0"]["embed"]["skipped"] == 2
    killed = _killed_at("embedder_phase:7", data, out)
    assert "round_0/bag_phase/resume/resume_checkpoint_8.pt (iteration 8)" in killed.stderr, killed.stderr[-3000:]
    rerun = _run(data, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "round_1/embedder_phase/resume/resume_checkpoint_6.pt (iteration 6)" in rerun.stderr
    assert _final(out) == _final(uninterrupted)
    for r in (0, 1):
        want = torch.load(uninterrupted / f"round_{r}/bag_phase/bag_classifier.pt", weights_only=True)["state_dict"]
        got = torch.load(out / f"round_{r}/bag_phase/bag_classifier.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(want[k], got[k]) for k in want)
    assert not list(out.rglob("resume_checkpoint_*.pt"))  # finished phases leave no resume checkpoint


def _content(path: Path) -> object:
    """A file's bytes; a safetensors file's metadata and tensors (its header's key order varies between processes)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return f.metadata(), {k: f.get_tensor(k).tobytes() for k in sorted(f.keys())}


def _files(folder: Path) -> dict[str, object]:
    return {str(p.relative_to(folder)): _content(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_partial_writes(out: Path) -> None:
    assert not [p for p in out.rglob("*") if p.name.startswith((".", "tmp")) and p.is_file()]


def test_kill_9_while_tiling_then_rerun_keeps_the_tiled_slides_and_ends_with_the_same_files(
    uninterrupted, synthetic_dataset, tmp_path
):
    out = tmp_path / "out"
    killed = _run(synthetic_dataset.parent, out, "prepare:4", "--only", "prepare")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    _no_partial_writes(out)
    done = {p: p.stat().st_mtime_ns for p in (out / "coords").glob("*.safetensors")}
    assert len(done) == 3  # three slides tiled before the kill; no tiling.csv yet
    assert not (out / "coords" / "qc" / "tiling.csv").exists()
    rerun = _run(synthetic_dataset.parent, out, None, "--only", "prepare")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # not tiled again
    assert _files(out / "coords") == _files(uninterrupted / "coords")  # coordinates, QC pictures, tiling.csv
    assert (
        not (out / "report.json").exists()
        or (out / "report.json").read_bytes() == (uninterrupted / "report.json").read_bytes()
    )


@pytest.fixture(scope="module")
def inferred(uninterrupted, synthetic_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inferred") / "inference"
    proc = _run(synthetic_dataset.parent, uninterrupted, None, "--infer", str(out), fresh=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("kill", ["write:6"])  # a writer on the second slide (a kill while tiling: the test above)
def test_kill_9_during_inference_then_rerun_writes_the_same_files(
    kill, inferred, uninterrupted, synthetic_dataset, tmp_path
):
    out = tmp_path / "inference"
    killed = _run(synthetic_dataset.parent, uninterrupted, kill, "--infer", str(out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "probabilities.csv").exists()
    _no_partial_writes(out)
    rerun = _run(synthetic_dataset.parent, uninterrupted, None, "--infer", str(out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    want, got = _files(inferred), _files(out)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []
