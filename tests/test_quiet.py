# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Importing and using the package prints nothing and leaves nothing behind, on machines without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CUFILE_LOGFILE_PATH"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "code",
    [
        # MONAI first, then the package and its transforms
        "from monai.transforms import Compose\nimport monai_icmil\nfrom monai_icmil.transforms import GridPatchCoordsd",
        "from monai_icmil.transforms import GridPatchCoordsd, TissueMaskd\nfrom monai.transforms import Compose",
    ],
    ids=["monai-first", "monai_icmil-first"],
)
def test_imports_in_either_order_print_nothing(code, tmp_path):
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_reading_a_slide_with_cucim_leaves_no_log_in_the_working_directory(cmu_slide, tmp_path):
    """cuFile, which cuCIM loads, writes cufile.log into the working directory unless told otherwise."""
    code = (
        "from monai_icmil.data import open_slide\n"
        f"s = open_slide({cmu_slide!r}, 'cucim')\n"
        "print(s.read_patches([[0, 0]], 64, 0).shape)"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(1, 64, 64, 3)" and proc.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_real_errors_still_surface(tmp_path):
    proc = _python("from monai_icmil.data import open_slide\nopen_slide('missing.svs')", tmp_path)
    assert proc.returncode != 0 and "slide 'missing.svs' does not exist" in proc.stderr


def test_progress_bars_redraw_on_a_terminal_and_update_every_30_s_in_a_log_file(monkeypatch, caplog):
    """A batch job's log file got every redraw of every bar (1.7 MB for a two-minute demo, mostly ignite's); tqdm's
    own TQDM_MININTERVAL sets the interval there."""
    import io
    import logging

    from ignite.engine import Engine

    from monai_icmil.handlers.common import PeriodicProgress, attach_progress_bar
    from monai_icmil.utils import LOG_PROGRESS_INTERVAL, progress_bar, progress_options

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert progress_options(Terminal()) == {} and LOG_PROGRESS_INTERVAL == 30.0
    assert progress_options(io.StringIO()) == {"mininterval": 30.0}
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # as under a batch job
    assert progress_bar(range(3), file=io.StringIO()).mininterval == 30.0
    assert progress_bar(range(3), file=io.StringIO(), mininterval=1).mininterval == 1  # the caller's wins
    engine = Engine(lambda e, b: {"loss": 0.25})
    periodic = attach_progress_bar(engine, "bag_phase")  # a log line every 30 s, not ignite's bar (every step)
    assert isinstance(periodic, PeriodicProgress) and periodic.interval == 30.0
    periodic.interval = 0.0  # a line at every step, to read one
    with caplog.at_level(logging.INFO, logger="monai_icmil.bag_phase"):
        engine.run(range(4), max_epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "monai_icmil.bag_phase"]
    assert len(lines) == 8 and lines[-1].startswith("bag_phase: iteration 8 of 8 (epoch 2 of 2), loss 0.25, ")
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert type(attach_progress_bar(Engine(lambda e, b: {"loss": 0.0}), "x")).__name__ == "ProgressBar"
    monkeypatch.setenv("TQDM_MININTERVAL", "5")
    assert progress_options(io.StringIO()) == {"mininterval": 5.0} and progress_options(Terminal()) == {}
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert attach_progress_bar(Engine(lambda e, b: {"loss": 0.0}), "x").interval == 5.0  # still lines, not the bar
