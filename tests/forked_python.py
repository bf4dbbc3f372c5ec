# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""``python -m monai.bundle ...`` and ``python script.py ...`` for the tests, without paying ``import monai`` each time.

Every bundle run in the tests is its own process (a crash, a kill or a leak stays in it), but a fresh interpreter spends
~10 s on this machine importing MONAI (which imports mlflow, torchvision, scipy, pandas...) before any work. Here the
processes are forked from one server process that imported MONAI and monai_icmil once (:mod:`multiprocessing`'s
``forkserver``, which only imports, so no thread pool is running when it forks). Each child sets its own environment,
working directory and ``sys.argv``, runs monai_icmil's import-time setup again against that environment (as a fresh
interpreter would: it sets ``CUFILE_LOGFILE_PATH`` unless the user did), runs the module or script as ``__main__``,
joins its threads and runs its ``atexit`` handlers, and exits with the code the interpreter would have (``-signal``
if killed); like ``subprocess.run``, :func:`run` returns once every process holding the child's output has exited.
What only a fresh interpreter shows is tested with real ones: the import-time output (``tests/test_quiet.py``), the
README's command with a user's environment and working directory (``tests/test_demo.py``), string-hash order and
fresh random state between runs (the crash tests' uninterrupted runs), and torchrun's ranks.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import runpy
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PRELOAD = ["monai_icmil", "monai", "monai.bundle", "monai_icmil.workflows", "monai_icmil.engines"]
_CONTEXT = None
_SITE_PATH: list[str] = []  # a fresh interpreter's sys.path after its first entry, without PYTHONPATH
_ENVIRON = dict(os.environ)  # at collection, before any test changed it: the server imports with this environment


def _context() -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its server started (once) with MONAI imported.

    Started on first use, not at import: each child imports this module to find :func:`_child`, and a server started
    at module level would be started again in every child (multiprocessing refuses that during a child's start)."""
    global _CONTEXT, _SITE_PATH
    if _CONTEXT is None:
        env = {k: v for k, v in _ENVIRON.items() if k != "PYTHONPATH"}
        code = "import json, sys; print(json.dumps(sys.path[1:]))"
        _SITE_PATH = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, env=env).stdout)
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
        current = dict(os.environ)
        os.environ.clear()
        os.environ.update(_ENVIRON)
        try:  # started here, not from whichever test first runs: what libraries read on import is the same each time
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(current)
    return _CONTEXT


def _child(args: list[str], env: dict[str, str], cwd: str, out: str, err: str, site_path: list[str]) -> None:
    """Runs in the forked process: ``args`` as ``python`` would take them (``-m module ...`` or ``script ...``)."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        fcntl.flock(f, fcntl.LOCK_SH)  # held while any process (this one, or one it starts) still has the file open
        os.dup2(f, fd)
        os.close(f)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    first = os.getcwd() if args[0] == "-m" else str(Path(args[0]).resolve().parent)
    sys.path[:] = [first, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p), *site_path]
    if "monai_icmil" in sys.modules:  # (if the server could not import it, the run's own import shows why)
        importlib.reload(sys.modules["monai_icmil"])  # its import-time defaults, against this environment
    if "torch" in sys.modules and env.get("OMP_NUM_THREADS", "").isdigit():  # torch read the server's environment
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
    # multiprocessing started this process with forkserver and set that as its default: a fresh interpreter's default
    # (fork on Linux) for the processes the run starts (its DataLoader workers), not forked servers of their own
    multiprocessing.set_start_method(None, force=True)
    random.seed()  # a fresh interpreter's global generators start from fresh entropy, not the server's state
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    code = 0
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if code == 1 and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # as the interpreter reports an uncaught exception (a run may set the hook)
        code = 1
    try:
        threading._shutdown()  # as the interpreter does at exit: join non-daemon threads, then the atexit handlers
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _released(paths: list[str], deadline: float) -> bool:
    """Waits until no process holds ``paths`` open (as ``subprocess.run`` waits for its pipes to close), or the
    deadline; returns whether they were released."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.05)
        finally:
            os.close(fd)
    return True


def run(
    args: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *args], capture_output=True, text=True, ...)`` in a forked child.

    Args:
        args: the interpreter's arguments: ``["-m", "monai.bundle", "run", ...]`` or ``[script, ...]``.
        env: the child's whole environment (default: this process's).
        cwd: the child's working directory (default: this process's).
        timeout: seconds before the child is killed and :class:`subprocess.TimeoutExpired` raised; the processes the
            child started must have exited (closed its output) by then too.

    Returns:
        the child's return code (``-N`` if signal ``N`` ended it), stdout and stderr.
    """
    env = dict(os.environ if env is None else env)
    cmd = [sys.executable, *args]
    with tempfile.TemporaryDirectory(prefix="forked_python_") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")

        def read() -> tuple[str, str]:
            return tuple(Path(p).read_text(errors="replace") if os.path.exists(p) else "" for p in (out, err))

        deadline = time.monotonic() + timeout
        proc = _context().Process(target=_child, args=(list(args), env, str(cwd or os.getcwd()), out, err, _SITE_PATH))
        try:
            proc.start()
            proc.join(timeout)
        except BaseException:  # interrupted: the child must not outlive the test
            proc.kill()
            proc.join()
            raise
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout, *read())
        if not _released([out, err], deadline):
            raise subprocess.TimeoutExpired(cmd, timeout, *read())  # a process it started is still running
        stdout, stderr = read()
    return subprocess.CompletedProcess(cmd, proc.exitcode, stdout, stderr)
