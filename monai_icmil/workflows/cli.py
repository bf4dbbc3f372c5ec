# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Checks of the ``python -m monai.bundle run ...`` command line and its config files, before any work."""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["check_config"]

#: the value dicts whose settings the phase components reference (``@bag_phase#epochs``)
_SETTINGS = ("tiling", "embed", "bag_phase", "embedder_phase", "pretrain")
#: top-level ids of monai-icmil 0.1 and where their settings went
_REMOVED = {
    "aggregator_kwargs": "aggregator#<argument> (the aggregator is a component)",
    "embedding": "embed#<setting>",
}
_REFERENCE = re.compile(r"@([A-Za-z_]\w*(?:(?:#|::)\w+)*)")

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


def check_config(argv: Sequence[str] | None = None, config_ids: Sequence[str] | None = None) -> list[str]:
    """Refuse what would otherwise be silently ignored: ``--id value`` overrides of ids that the config files do not
    define, and settings in the config files that no component uses.

    An override id is known when its top-level part is defined and every nested part (``embed#batch_size``) is a key
    of the merged configs, except that a component's arguments (a dict with ``_target_``) may be added to
    (``embedder#input_size``). A setting of ``tiling``, ``embed``, ``bag_phase``, ``embedder_phase`` or ``pretrain``
    is used when some ``@`` reference names it; ids of monai-icmil 0.1 (``aggregator_kwargs``, ``embedding``) are
    refused with where their settings went. Reads the ``python -m monai.bundle run ...`` command line. Returns the
    checked override ids.

    Args:
        argv: the command line after the program (default: ``sys.argv``).
        config_ids: the known top-level ids instead of the config files' (nested parts are then not checked).

    Raises:
        ValueError: naming the unknown id(s) and the known top-level ids, or the unused settings.
    """
    if argv is None:
        if Path(sys.argv[0]).parts[-2:] != ("bundle", "__main__.py"):
            return []  # not the `python -m monai.bundle` command line (e.g. the API called in-process)
        argv = sys.argv[1:]
    pairs, files = _parse_argv(list(argv))
    overrides = [key for key, _ in pairs]
    config: dict[str, Any] = {}
    base: dict[str, Any] = {}  # the first file (train.json)
    changed: set[str] = set()  # the settings the files after the first set
    if config_ids is None:
        for k, f in enumerate(files):
            if Path(f).is_file():
                content = json.loads(Path(f).read_text())
                _merge(config, content)
                base = base or json.loads(json.dumps(config))
                changed |= _settings_of(content) if k else set()
    else:
        config = {k: _ANY for k in config_ids}
    unknown = [o for o in overrides if not _defines(config, o.replace("::", "#").split("#"))]
    if unknown and config:
        raise ValueError(
            f"override(s) of unknown id(s): {', '.join('--' + u for u in unknown)}. Known top-level ids: "
            f"{', '.join(sorted(config))}."
        )
    if config_ids is None:
        _check_settings(config, changed, base)
        _check_types(config, pairs)
    return overrides


# boolean settings that also take a word (read downstream, e.g. bag_phase#warm_start "both")
_BOOLEAN_OR = {"bag_phase#warm_start": ("both",)}
# boolean settings that also take a mapping of settings (e.g. --bag_phase#witness_search "{'max_instances': 4096}")
_BOOLEAN_OR_MAPPING = {"bag_phase#witness_search"}


def _check_types(config: Mapping[str, Any], pairs: Sequence[tuple[str, str]]) -> None:
    """Override values that cannot be what the config holds at that id: a boolean (true/false in any case, 1/0,
    yes/no, on/off, as :func:`~monai_icmil.utils.as_bool` reads them downstream; for the ids of ``_BOOLEAN_OR``, also
    their words) or a number."""
    from monai_icmil.utils import as_bool

    problems = []
    for key, value in pairs:
        name = key.replace("::", "#")
        default, words = _value_at(config, name.split("#")), _BOOLEAN_OR.get(name, ())
        try:
            if isinstance(default, bool):
                if isinstance(value, Mapping) and name in _BOOLEAN_OR_MAPPING:
                    continue  # its settings are checked where they are read
                if str(value).strip().lower() not in words:
                    try:
                        as_bool(value, key)
                    except ValueError:
                        if not words:
                            raise
                        said = " or ".join(map(repr, words))
                        raise ValueError(f"'{key}' must be true, false or {said}, got {value!r}") from None
            elif isinstance(default, int) and not float(value).is_integer():
                raise ValueError(f"'{key}' must be a whole number, got {value!r}")
            elif isinstance(default, float):
                float(value)
        except ValueError as e:
            number = isinstance(default, (int, float)) and not isinstance(default, bool)
            problems.append(
                f"--{key} {value}: " + (f"'{key}' must be a number" if number and "number" not in str(e) else str(e))
            )
    if problems:
        raise ValueError("override(s) of the wrong type: " + "; ".join(problems) + ".")


def _value_at(config: Any, parts: list[str]) -> Any:
    node = config
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _settings_of(content: Mapping[str, Any]) -> set[str]:
    """The ``<settings>#<key>`` ids a config file sets (``tiling#mpp``, or every key of a whole ``tiling`` dict)."""
    out = set()
    for key, value in content.items():
        parts = key.replace("::", "#").split("#")
        if parts[0] not in _SETTINGS:
            continue
        if len(parts) > 1:
            out.add(f"{parts[0]}#{parts[1]}")
        elif isinstance(value, dict):
            out |= {f"{parts[0]}#{k}" for k in value}
    return out


def _check_settings(config: Mapping[str, Any], changed: set[str], base: Mapping[str, Any]) -> None:
    """Settings that a config file after the first sets but no component references: refused when the first file
    (train.json) does not define them either (a typo, or a setting this version no longer has), warned about when it
    does (a later file swapped the component that used it); ids this version no longer has are refused."""
    removed = [f"'{k}' (now {_REMOVED[k]})" for k in _REMOVED if k in config]
    refs = {r.replace("::", "#") for r in _REFERENCE.findall(json.dumps(config))}
    unknown, unused = [], []
    for name in _SETTINGS:
        values = config.get(name)
        if not isinstance(values, dict) or "_target_" in values or name in refs:
            continue
        for key in values:
            ref = f"{name}#{key}"
            used = ref in refs or any(r.startswith(ref + "#") for r in refs)
            if key in ("run", "phase") or ref not in changed or used:
                continue
            (unused if isinstance(base.get(name), dict) and key in base[name] else unknown).append(ref)
    if unused:
        warnings.warn(
            f"setting(s) {', '.join(unused)} are set by a config file but used by no component: the component that "
            "read them was replaced. Give the value to the new component instead.",
            stacklevel=3,
        )
    if removed or unknown:
        problems = [f"id(s) of monai-icmil 0.1: {', '.join(removed)}"] if removed else []
        if unknown:
            problems.append(
                f"setting(s) no component uses: {', '.join(unknown)} (a typo, or a setting no longer there)"
            )
        raise ValueError("the config files hold " + "; ".join(problems) + ". See bundles/icmil/docs/README.md.")


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


def _parse_argv(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """``([(override id, value)], config files)`` of a command line."""
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
                overrides.append((key, value))
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
