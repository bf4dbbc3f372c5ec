# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The run's summary: one row per round (validation AUC, test AUC with its confidence interval, accuracy, F1, time per
phase) as ``summary.md`` (printed, with the final round's ROC curve and the tiling QC sheets linked) and
``summary.json``."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from monai_icmil.utils import atomic_write_json, atomic_write_text

__all__ = ["summary_rows", "write_summary"]


def summary_rows(rounds: Mapping[int, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per round from the ledger's records."""
    rows = []
    for r in sorted(rounds):
        s = rounds[r]
        test = s.get("test", {}).get("metrics", {})
        rows.append(
            {
                "round": int(r),
                "val_auc": s.get("bag_phase", {}).get("val", {}).get("auc"),
                "test_auc": test.get("auc"),
                "test_auc_ci": [test.get("auc_ci_low"), test.get("auc_ci_high")],
                "test_slides": s.get("test", {}).get("slides"),
                "test_acc": test.get("acc"),
                "test_f1": test.get("f1"),
                "embedder_phase_s": s.get("embedder_phase", {}).get("seconds"),
                "embed_s": s.get("embed", {}).get("seconds"),
                "bag_phase_s": s.get("bag_phase", {}).get("seconds"),
            }
        )
    return rows


def _fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ci(bounds: list[Any]) -> str:
    if any(v is None or math.isnan(v) for v in bounds):
        return ""
    return f" ({bounds[0]:.2f}-{bounds[1]:.2f})"


def write_summary(
    output_dir: str | os.PathLike,
    rounds: Mapping[int, Mapping[str, Any]],
    final_round: int,
    title: str,
    excluded: Iterable[str] = (),
) -> dict[str, Any]:
    """Write ``summary.md`` and ``summary.json`` into ``output_dir``, print the markdown and return
    ``{"rows": {round: row}, "final_round", "markdown"}``.

    Args:
        output_dir: the run's folder (the pictures it links are relative to it).
        rounds: the ledger's records by round.
        final_round: the round whose models count (best validation AUC).
        title: what the heading names (aggregator, embedder).
        excluded: slides left out (failed or without tissue).
    """
    out = Path(output_dir)
    rows = summary_rows(rounds)
    lines = [
        f"# ICMIL summary ({title})",
        "",
        "| round | val AUC | test AUC | test acc | test F1 | embedder phase (s) | embed (s) | bag phase (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['round']}{' (final)' if row['round'] == final_round else ''} | {_fmt(row['val_auc'])} | "
            f"{_fmt(row['test_auc'])}{_ci(row['test_auc_ci'])} | {_fmt(row['test_acc'])} | {_fmt(row['test_f1'])} | "
            f"{_fmt(row['embedder_phase_s'], 1)} | {_fmt(row['embed_s'], 1)} | {_fmt(row['bag_phase_s'], 1)} |"
        )
    if any(_ci(row["test_auc_ci"]) for row in rows):
        n_test = max(row["test_slides"] or 0 for row in rows)
        lines += ["", f"Test AUC with its 95 % DeLong confidence interval, over {n_test} test slides."]
    excluded = sorted(excluded)
    if excluded:
        lines += ["", f"{len(excluded)} slide(s) left out (failed or no tissue): {', '.join(excluded)}"]
    roc = Path(f"round_{final_round}") / "test" / "roc.png"
    if (out / roc).is_file():
        lines += ["", f"![test ROC, round {final_round}]({roc.as_posix()})"]
    pages = sorted((out / "coords" / "qc" / "overview").glob("page_*.jpg"))
    if pages:
        links = ", ".join(f"[{p.stem}]({p.relative_to(out).as_posix()})" for p in pages)
        lines += ["", f"Tiling QC of every slide: {links} (per slide: `coords/qc/tiling.csv`)."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "summary.md", text)
    atomic_write_json(out / "summary.json", {"rows": rows, "final_round": final_round})
    print(text)
    return {"rows": {row["round"]: row for row in rows}, "final_round": final_round, "markdown": text}
