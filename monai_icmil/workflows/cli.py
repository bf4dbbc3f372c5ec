# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Checks of the ``python -m monai.bundle run ...`` command line and its config files, before any work."""

from __future__ import annotations

import json
import math
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
_FLAG = re.compile(r"--|-[A-Za-z]")  # what fire takes for a flag, not a value (-5 is a value)
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


#: what MONAI's config runner wraps an expression's error in (and the message a user would otherwise read last)
_WRAPPER = re.compile(r"^Failed to (evaluate ConfigExpression|instantiate component)")


def repeat_the_error_last() -> None:
    """Make a failed ``python -m monai.bundle`` command end with the error that stopped it.

    MONAI's config runner wraps an expression's exception in ``RuntimeError: Failed to evaluate ConfigExpression:
    "$@workflow.run()"`` (a component's constructor's in ``Failed to instantiate component ...``), which the
    traceback prints last, below ours (the slide, the setting, the fix). This
    ``sys.excepthook`` prints the traceback as before, then ``monai-icmil stopped: <the error>`` as the last line.
    Installed once, by :func:`check_config` on that command line.
    """
    previous = sys.excepthook
    if getattr(previous, "_repeats_the_error", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        previous(kind, value, tb)
        error = value
        while isinstance(error, RuntimeError) and _WRAPPER.match(str(error)) and error.__cause__ is not None:
            error = error.__cause__
        if error is not value:
            print(f"\nmonai-icmil stopped: {type(error).__name__}: {error}", file=sys.stderr)

    hook._repeats_the_error = True  # type: ignore[attr-defined]
    sys.excepthook = hook


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
        repeat_the_error_last()
    pairs, files = _parse_argv(list(argv))
    config: dict[str, Any] = {}
    base: dict[str, Any] = {}  # the first file (train.json)
    changed: set[str] = set()  # the settings the files after the first set
    if config_ids is None:
        for k, f in enumerate(files):
            if Path(f).is_file():
                content = _load(f)
                _merge(config, content)
                base = base or json.loads(json.dumps(config))
                changed |= _settings_of(content) if k else set()
    else:
        config = {k: _ANY for k in config_ids}
    overrides = [key for key, _ in pairs]
    unknown = [o for o in overrides if not _defines(config, o.replace("::", "#").split("#"))]
    if unknown and config:
        moved = [f"'{u}' is now {_REMOVED[u.split('#')[0]]}" for u in unknown if u.split("#")[0] in _REMOVED]
        raise ValueError(
            f"override(s) of unknown id(s): {', '.join('--' + u for u in unknown)}. "
            + (f"In this version {'; '.join(moved)}. " if moved else "")
            + f"Known top-level ids: {', '.join(sorted(config))}."
        )
    if config_ids is None:
        _check_settings(config, changed, base)
        _check_types(config, pairs)
    return overrides


# boolean settings that also take a word (read downstream, e.g. bag_phase#warm_start "both")
_BOOLEAN_OR = {"bag_phase#warm_start": ("both",)}
# boolean settings that also take a mapping of settings (e.g. --bag_phase#witness_search "{'max_instances': 4096}")
_BOOLEAN_OR_MAPPING = {"bag_phase#witness_search"}
# settings that take None (off / the file's own / never) beside a value of their default's type
_NULLABLE = {
    "bag_phase#early_stop_patience", "bag_phase#grad_clip", "bag_phase#witness_search", "embedder_phase#grad_clip",
    "tiling#mpp", "tiling#level", "tiling#stride", "assume_mpp", "bag_phase#max_instances", "embedder_phase#beta",
    "embedder_phase#early_stop_patience", "embed#compile", "embedder_phase#compile", "tiling#max_hole_um2",
}  # fmt: skip
# the type of the settings whose default is None (a number given as text is refused before any work)
_NULL_DEFAULT_TYPES = {
    "tiling#level": int, "tiling#stride": int, "assume_mpp": float, "bag_phase#max_instances": int,
    "embedder_phase#beta": float, "embedder_phase#early_stop_patience": int,
}  # fmt: skip


def _check_types(config: Mapping[str, Any], pairs: Sequence[tuple[str, Any]]) -> None:
    """Override values that cannot be what the config holds at that id: a boolean (true/false in any case, 1/0,
    yes/no, on/off, as :func:`~monai_icmil.utils.as_bool` reads them downstream; for the ids of ``_BOOLEAN_OR``, also
    their words) or a finite number (a whole one where the default is); ``None`` only where the setting takes it;
    ``$`` expressions and ``@`` references are left to MONAI.
    Values are read as the command line's parser (fire) reads them: ``None``, numbers, dicts and lists are parsed.
    A ``None`` typed on the command line is refused even where the setting takes it: ``python -m monai.bundle run``
    drops overrides whose value is ``None`` (MONAI's ``update_kwargs``), so the setting would silently keep its
    default; ``'$None'`` (an expression) gets through, as does ``null`` in an ``--args_file``."""
    problems = []
    for key, given in pairs:
        name = key.replace("::", "#")
        default = _value_at(config, name.split("#"))
        if default is None:
            default = {int: 0, float: 0.0}.get(_NULL_DEFAULT_TYPES.get(name))
        value = _parsed(given)
        if isinstance(value, str) and value.startswith(("$", "@", "%")):
            continue  # an expression or a reference: MONAI evaluates it when the config is parsed
        try:
            if _bool_word(value) and _unconverted(config, name.split("#"), default):
                raise ValueError(
                    f"{value!r} would reach its component as text, and a non-empty text reads as true (its config "
                    "value is an expression or absent, so nothing converts it); write True or False (the command "
                    "line reads those as booleans)"
                )
            if value is None:
                if isinstance(default, (bool, int, float)) and name not in _NULLABLE:  # (lists, components: may be)
                    raise ValueError(f"'{key}' cannot be None")
                if isinstance(given, str) and _value_at(config, name.split("#")) is not None:
                    raise ValueError(  # typed on the command line, where the bundle runner would drop it
                        f"the bundle runner drops an override whose value is None, so '{key}' would keep its "
                        f"configured value; write --{key} '$None' if it takes None (or null in a config or args file)"
                    )
            elif isinstance(default, bool):
                _check_boolean(key, name, value)
            elif isinstance(default, (int, float)):
                _check_number(key, value, whole=isinstance(default, int))
        except ValueError as e:
            problems.append(f"--{key} {value}: {e}")
    if problems:
        raise ValueError("override(s) of the wrong type: " + "; ".join(problems) + ".")


def _bool_word(value: Any) -> bool:
    """A boolean word given as text (``false``, ``off``, ...): fire passes it on as a string."""
    from monai_icmil.utils import BOOL_WORDS

    return isinstance(value, str) and value.strip().lower() in BOOL_WORDS


def _unconverted(config: Any, parts: list[str], default: Any) -> bool:
    """Whether a boolean word at ``parts`` would reach a component as text: its config value is an expression, or
    absent (an argument added to a component), and the component is not ours (ours read words with ``as_bool``) or
    hands its arguments on to timm (``create_embedder``)."""
    if not (_expression(default) or not _present(config, parts)):
        return False
    node, target = config, None
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get("_target_"), str):
            target = node["_target_"]
    return not (target or "").startswith("monai_icmil.") or target in _PASSES_ON


#: our components that hand their added arguments on unread (to timm): a boolean word reaches timm as text
_PASSES_ON = {"monai_icmil.networks.create_embedder", "monai_icmil.networks.embedders.create_embedder"}


def _expression(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("$")


_ABSENT = object()


def _present(config: Any, parts: list[str]) -> bool:
    """Whether the merged configs hold a value (``null`` included) at ``parts``."""
    return _value_at(config, parts, _ABSENT) is not _ABSENT


def _check_boolean(key: str, name: str, value: Any) -> None:
    from monai_icmil.utils import as_bool

    words = _BOOLEAN_OR.get(name, ())
    if (isinstance(value, Mapping) and name in _BOOLEAN_OR_MAPPING) or str(value).strip().lower() in words:
        return  # a mapping's settings are checked where they are read
    try:
        as_bool(value, key)
    except ValueError:
        if not words:
            raise
        said = " or ".join(map(repr, words))
        raise ValueError(f"'{key}' must be true, false or {said}, got {value!r}") from None


def _check_number(key: str, value: Any, whole: bool) -> None:
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None:
        raise ValueError(f"'{key}' must be a number, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"'{key}' must be a finite number, got {value!r}")
    if whole and not number.is_integer():
        raise ValueError(f"'{key}' must be a whole number, got {value!r}")


def _parsed(value: Any) -> Any:
    """A command-line value as fire (``python -m monai.bundle``'s parser) gives it to the bundle."""
    if not isinstance(value, str):
        return value
    try:
        from fire.parser import DefaultParseValue
    except ImportError:  # fire is only needed by the bundle command line
        return None if value == "None" else value
    return DefaultParseValue(value)


def _value_at(config: Any, parts: list[str], missing: Any = None) -> Any:
    """The value at ``parts`` of the merged configs, ``missing`` where there is none."""
    node = config
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return missing
    return node


def _settings_of(content: Mapping[str, Any]) -> set[str]:
    """The ``<settings>#<key>`` ids a config file sets (``tiling#mpp``, or every key of a whole ``tiling`` dict)."""
    out = set()
    for key, value in content.items():
        parts = key.lstrip("+").replace("::", "#").split("#")
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
    """Merge one config file into ``config`` as MONAI does: ``a#b`` keys set nested values (list items by index),
    ``+a`` keys merge a dict into (or extend a list of) ``a``."""
    for key, value in content.items():
        parts = key.lstrip("+").replace("::", "#").split("#")
        node: Any = config
        for part in parts[:-1]:
            node = _value_at(node, [part])
            if not isinstance(node, (dict, list)):
                break
        else:
            last, old = parts[-1], _value_at(node, [parts[-1]])
            if key.startswith("+") and isinstance(old, dict) and isinstance(value, dict):
                old.update(value)
            elif key.startswith("+") and isinstance(old, list) and isinstance(value, list):
                old.extend(value)
            elif isinstance(node, dict):
                node[last] = value
            elif last.isdigit() and int(last) < len(node):
                node[int(last)] = value


def _load(path: str) -> dict[str, Any]:
    """One config file (JSON or YAML, as MONAI reads them); an unreadable one is named."""
    from monai.bundle import ConfigParser

    try:
        content = ConfigParser.load_config_file(path)
    except Exception as e:
        raise ValueError(f"config file '{path}' cannot be read: {type(e).__name__}: {e}") from e
    if not isinstance(content, dict):
        raise ValueError(f"config file '{path}' must hold a mapping of ids to values, got {type(content).__name__}")
    return content


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


def _parse_argv(argv: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """``([(override id, value)], config files)`` of a command line, read as fire reads it: ``-`` in a flag is
    ``_``, a flag followed by another flag (or nothing) is True (``--noX``: X is False); an ``--args_file``'s ids
    come before the command line's."""
    given: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            key = arg[2:].split("=", 1)[0].replace("-", "_")
            if "=" in arg:
                given[key], i = arg.split("=", 1)[1], i + 1
            elif i + 1 < len(argv) and not _FLAG.match(argv[i + 1]):
                given[key], i = argv[i + 1], i + 2
            elif key.startswith("no"):  # fire: a flag --noX without a value sets X to False
                given[key[2:]], i = False, i + 1
            else:
                given[key], i = True, i + 1
        else:
            i += 1
    if "args_file" in given and Path(str(given["args_file"])).is_file():
        given = {**_load(str(given["args_file"])), **given}
    files = _parse_files(given.get("config_file", ""))
    return [(k, v) for k, v in given.items() if k not in _BUNDLE_ARGS], files


def _parse_files(value: Any) -> list[str]:
    """The config files of ``--config_file``: a list, a JSON/Python list as text, or names separated by commas."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    value = str(value).strip()
    if value.startswith("["):
        try:
            return [str(v) for v in json.loads(value.replace("'", '"'))]
        except ValueError:
            return [v.strip(" '\"") for v in value.strip("[]").split(",")]
    if "," in value and not Path(value).is_file():
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value] if value else []
