# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Checks of the ``python -m monai.bundle run ...`` command line, before any work."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["check_cli_overrides"]

_BUNDLE_ARGS = {
    "config_file",
    "meta_file",
    "logging_file",
    "args_file",
    "run_id",
    "init_id",
    "final_id",
    "tracking",
    "workflow_name",
    "workflow_type",
    "properties_path",
}


def check_cli_overrides(argv: Sequence[str] | None = None, config_ids: Sequence[str] | None = None) -> list[str]:
    """Refuse ``--id value`` overrides of ids that the config files do not define (a typo would otherwise be ignored).

    An id is known when its top-level part is defined and every nested part (``embed#batch_size``) is a key of the
    merged configs, except that a component's arguments (a dict with ``_target_``) may be added to
    (``embedder#input_size``). Reads the ``python -m monai.bundle run ...`` command line. Returns the checked ids.

    Args:
        argv: the command line after the program (default: ``sys.argv``).
        config_ids: the known top-level ids instead of the config files' (nested parts are then not checked).

    Raises:
        ValueError: naming the unknown id(s) and the known top-level ids.
    """
    if argv is None:
        if Path(sys.argv[0]).parts[-2:] != ("bundle", "__main__.py"):
            return []  # not the `python -m monai.bundle` command line (e.g. the API called in-process)
        argv = sys.argv[1:]
    overrides, files = _parse_argv(list(argv))
    config: dict[str, Any] = {}
    if config_ids is None:
        for f in files:
            if Path(f).is_file():
                _merge(config, json.loads(Path(f).read_text()))
    else:
        config = {k: _ANY for k in config_ids}
    unknown = [o for o in overrides if not _defines(config, o.replace("::", "#").split("#"))]
    if unknown and config:
        raise ValueError(
            f"override(s) of unknown id(s): {', '.join('--' + u for u in unknown)}. Known top-level ids: "
            f"{', '.join(sorted(config))}."
        )
    return overrides


_ANY = object()  # a value whose nested parts are not checked


def _merge(config: dict[str, Any], content: Mapping[str, Any]) -> None:
    """Merge one config file into ``config`` as MONAI does: ``a#b`` keys set nested values."""
    for key, value in content.items():
        parts = key.replace("::", "#").split("#")
        node = config
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value


def _defines(config: Any, parts: list[str]) -> bool:
    node = config
    for part in parts:
        if node is _ANY:
            return True
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, dict) and "_target_" in node and node is not config:
            return True  # a new argument of a component
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _parse_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(override ids, config files)`` of a command line."""
    overrides, files = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0]
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if key == "config_file":
                files = _parse_files(value)
            elif key not in _BUNDLE_ARGS:
                overrides.append(key)
            i += 1 if "=" in arg else 2
        else:
            i += 1
    return overrides, files


def _parse_files(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            return [str(v) for v in json.loads(value.replace("'", '"'))]
        except ValueError:
            return [v.strip(" '\"") for v in value.strip("[]").split(",")]
    return [value]
