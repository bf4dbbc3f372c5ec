# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The tests' forked runner (``tests/forked_python.py``) gives what a fresh interpreter gives: the same output, exit
code, working directory, environment, ``sys.path`` and start method, and it waits for the processes a run leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import forked_python

# a program as the forked runner is for: one that imports monai_icmil (the bundle's runs, the kill script)
PROBE = """
import json, multiprocessing, os, random, signal, subprocess, sys, threading, time
import monai_icmil
print(json.dumps({
    "argv": sys.argv[1:], "cwd": os.getcwd(), "path": sys.path[:2], "probe_var": os.environ.get("PROBE_VAR"),
    "start_method": multiprocessing.get_start_method(),
    "cufile": os.environ.get("CUFILE_LOGFILE_PATH"), "random": random.random(),
}), flush=True)
print("to stderr", file=sys.stderr)
action = sys.argv[1]
if action == "thread":  # a non-daemon thread: the interpreter waits for it at exit
    threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished", flush=True))).start()
elif action == "grandchild":  # a process the run starts and leaves: its output is the run's output
    code = f"import time; time.sleep({sys.argv[2] if len(sys.argv) > 2 else 1}); print('grandchild finished')"
    subprocess.Popen([sys.executable, "-c", code])
elif action == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
elif action == "raise":
    raise ValueError("probe failed")
elif action == "exit-text":
    sys.exit("probe says no")
else:
    sys.exit(int(action))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("forked")
    script, cwd, lib = root / "scripts" / "probe.py", root / "work", root / "lib"
    for d in (script.parent, cwd, lib):
        d.mkdir()
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CUFILE_LOGFILE_PATH"}
    env.update(PROBE_VAR="set", PYTHONPATH=str(lib))
    return script, cwd, env


def _both(script: Path, cwd: Path, env: dict, action: str) -> tuple[subprocess.CompletedProcess, ...]:
    real = subprocess.run([sys.executable, str(script), action], capture_output=True, text=True, env=env, cwd=cwd)
    return real, forked_python.run([str(script), action], env=env, cwd=cwd, timeout=60)


def _facts(out: str) -> dict:
    facts = json.loads(out.splitlines()[0])
    facts.pop("random")
    return facts


@pytest.mark.parametrize("action", ["0", "3", "thread", "grandchild", "kill", "raise", "exit-text"])
def test_a_forked_run_gives_what_a_fresh_interpreter_gives(probe, action):
    script, cwd, env = probe
    real, forked = _both(script, cwd, env, action)
    assert forked.returncode == real.returncode, (forked.stderr, real.stderr)
    assert _facts(forked.stdout) == _facts(real.stdout)
    assert forked.stdout.splitlines()[1:] == real.stdout.splitlines()[1:]
    # a traceback's last line, or the exit text, in the same place
    assert forked.stderr.splitlines()[-1] == real.stderr.splitlines()[-1]
    facts = _facts(real.stdout)
    assert facts["path"] == [str(script.parent), str(cwd.parent / "lib")]
    assert facts["cwd"] == str(cwd) and facts["probe_var"] == "set" and facts["start_method"] == "fork"
    assert facts["cufile"] == os.devnull  # monai_icmil's default, the caller's environment having none


def test_forked_runs_draw_fresh_random_numbers_and_time_out_with_their_output(probe):
    script, cwd, env = probe
    a, b = (forked_python.run([str(script), "0"], env=env, cwd=cwd) for _ in range(2))
    assert json.loads(a.stdout.splitlines()[0])["random"] != json.loads(b.stdout.splitlines()[0])["random"]
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as caught:  # the run ends at once; its grandchild holds its output
        forked_python.run([str(script), "grandchild", "6"], env=env, cwd=cwd, timeout=3)
    assert time.monotonic() - start < 5 and '"argv": ["grandchild", "6"]' in caught.value.stdout
