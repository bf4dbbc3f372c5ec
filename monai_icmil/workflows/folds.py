# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""k-fold cross-validation of the ICMIL loop, grouped by patient.

Slide-level results on a few hundred slides swing with the split, so they are reported as a mean +/- sd over folds.
The folds are stratified by label and grouped by the datalist's ``patient`` field (or ``patient_id``, ``case_id``,
``case``, ``subject``, ``subject_id``: :data:`GROUP_KEYS`): one patient's slides are always in one part, so no
patient is in two splits of a fold. When the datalist has a ``test`` split, it stays fixed and each fold holds out one
part of the training + validation slides as its validation split; without one, each fold's held-out part is its test
split and a patient-grouped part of the rest is its validation split.

Layout under ``output_dir``::

    folds/folds.json          the assignment (slide -> fold, group, label); a rerun reads it back
    folds/fold_<k>.json       fold k's datalist
    coords/                   shared by every fold (the slides are tiled once)
    round_0/features/         shared round-0 features (same frozen embedder; not with pre-training, which is per fold)
    fold_<k>/                 fold k's run (state.json, rounds, summary.md): rerunning resumes each fold
    summary.md, summary.json  per-fold rows and mean +/- sd per round; cv_rounds.png
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from monai_icmil.utils import atomic_write_json, atomic_write_text, strict_json

if TYPE_CHECKING:
    from monai_icmil.workflows.icmil import ICMILWorkflow

__all__ = ["GROUP_KEYS", "slide_groups", "assign_folds", "fold_splits", "CrossValidation", "cv_summary"]

logger = logging.getLogger("monai_icmil.workflow")

#: datalist fields that name the patient a slide comes from, in order of preference
GROUP_KEYS = ("patient", "patient_id", "case_id", "case", "subject", "subject_id")


def _group_value(entry: Mapping[str, Any], group_keys: Sequence[str]) -> str | None:
    """The entry's patient: its first non-empty ``group_keys`` field, as text without surrounding spaces."""
    for key in group_keys:
        value = entry.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def slide_groups(entries: Sequence[Mapping[str, Any]], group_keys: Sequence[str] = GROUP_KEYS) -> list[str]:
    """The group (patient) of each entry: ``<field>:<value>``, the field being the first of ``group_keys`` the
    datalist uses (whichever of them a row fills: ``patient`` P01 and ``patient_id`` P01 are one patient; the value
    without surrounding spaces); with none of them anywhere, each slide alone (``slide:<slide_id>``).

    Raises:
        ValueError: some rows name a patient and others do not (those would each be a patient of their own, and a
            patient's slides could then land in two splits), naming the rows and the fix.
    """
    values = [_group_value(e, group_keys) for e in entries]
    if all(v is None for v in values):
        return [f"slide:{e['slide_id']}" for e in entries]
    unnamed = [e["slide_id"] for e, v in zip(entries, values) if v is None]
    if unnamed:
        raise ValueError(
            f"{len(unnamed)} slide(s) have no patient ({' / '.join(group_keys[:3])} ...) while the others do: "
            f"{', '.join(unnamed[:5])}{' ...' if len(unnamed) > 5 else ''}. Give every row its patient (a slide of "
            "its own patient: a unique id), so that no patient's slides are split between training and evaluation."
        )
    field = next(k for k in group_keys if any(e.get(k) is not None and str(e.get(k)).strip() for e in entries))
    return [f"{field}:{v}" for v in values]


def assign_folds(
    entries: Sequence[Mapping[str, Any]], num_folds: int, seed: int = 0, group_keys: Sequence[str] = GROUP_KEYS
) -> list[int]:
    """Stratified, grouped k-fold assignment: the fold of each entry.

    Every group (patient) goes whole to one fold. Groups are placed largest first (ties in a seeded random order),
    each into the fold where the per-label shares of the folds end most even, ties to the fold with fewest slides.

    Args:
        entries: datalist entries with ``label`` and ``slide_id`` (and a group field where known).
        num_folds: number of folds (>= 2).
        seed: seeds the order of equal-sized groups.
        group_keys: the fields that name a slide's patient.

    Raises:
        ValueError: fewer than 2 folds, or fewer groups than folds (naming both counts).
    """
    if num_folds < 2:
        raise ValueError(f"folds must be >= 2 for cross-validation, got {num_folds}")
    groups = slide_groups(entries, group_keys)
    names = sorted(set(groups))
    if len(names) < num_folds:
        raise ValueError(
            f"{num_folds} folds need at least {num_folds} patients (or slides without a patient field); the datalist "
            f"has {len(names)}. Use fewer folds."
        )
    labels = sorted({e["label"] for e in entries}, key=str)
    counts = np.zeros((len(names), len(labels)))
    index = {g: i for i, g in enumerate(names)}
    for g, e in zip(groups, entries):
        counts[index[g], labels.index(e["label"])] += 1
    order = np.random.default_rng(seed).permutation(len(names))
    order = sorted(order, key=lambda i: -counts[i].sum())  # stable: equal sizes keep the seeded order
    per_fold, total = np.zeros((num_folds, len(labels))), counts.sum(0)
    where = {}
    for i in order:
        cost = []
        for f in range(num_folds):
            trial = per_fold.copy()
            trial[f] += counts[i]
            cost.append((float((trial / total).std(0).sum()), float(trial[f].sum()), f))
        f = min(cost)[2]
        per_fold[f] += counts[i]
        where[names[i]] = f
    lacking = [(f, labels[c]) for f in range(num_folds) for c in range(len(labels)) if per_fold[f, c] == 0]
    if lacking and len(labels) > 1:
        logger.warning(
            "%d part(s) of %d hold no slide of a class (%s): an AUC there is undefined and left out of the means "
            "(the summary gives each mean's count); fewer folds, or more patients of the rarer class, avoid it",
            len(lacking), num_folds, ", ".join(f"part {f}: no label {lab}" for f, lab in lacking[:4]),
        )  # fmt: skip
    return [where[g] for g in groups]


def fold_splits(
    items: Mapping[str, Sequence[Mapping[str, Any]]],
    num_folds: int,
    seed: int = 0,
    val_fraction: float = 0.25,
    group_keys: Sequence[str] = GROUP_KEYS,
) -> tuple[list[dict[str, list[dict[str, Any]]]], list[int]]:
    """Each fold's ``training``, ``validation`` and ``test`` entries, and the fold of each training + validation
    entry (in that order).

    Args:
        items: the datalist by split (:func:`~monai_icmil.data.datalist.load_datalist`'s output).
        num_folds: number of folds.
        seed: seeds the assignment.
        val_fraction: without a test split, the share of each fold's remaining patients held out for validation.
        group_keys: the fields that name a slide's patient.
    """
    pool = [dict(e) for split in ("training", "validation") for e in items.get(split, [])]
    test = [dict(e) for e in items.get("test", [])]
    folds = assign_folds(pool, num_folds, seed, group_keys)
    out = []
    for k in range(num_folds):
        held = [e for e, f in zip(pool, folds) if f == k]
        rest = [e for e, f in zip(pool, folds) if f != k]
        if test:
            out.append({"training": rest, "validation": held, "test": test})
            continue
        parts = max(2, int(round(1.0 / val_fraction)))
        try:
            val = assign_folds(rest, parts, seed + 1 + k, group_keys)
        except ValueError as e:
            raise ValueError(
                f"fold {k}: holding out val_fraction {val_fraction:g} of its {len(set(slide_groups(rest, group_keys)))}"
                f" training patients for validation needs at least {parts} of them ({e}). Use fewer folds, a larger "
                "val_fraction, or give the datalist a test split (each fold then validates on its held-out part)."
            ) from None
        train_k = [e for e, p in zip(rest, val) if p != 0]
        out.append({"training": train_k, "validation": [e for e, p in zip(rest, val) if p == 0], "test": held})
    return out, folds


class CrossValidation:
    """k-fold cross-validation of an :class:`~monai_icmil.workflows.ICMILWorkflow` (its ``folds`` argument).

    Each fold is the same workflow (same components and settings) with the fold's datalist and
    ``output_dir/fold_<k>``, its coordinates shared and, without pre-training, its round-0 features shared (round
    0's embedder is then the same frozen one in every fold; every later round has a per-fold teacher, so per-fold
    features). In MLflow, each fold's run tree is nested under the cross-validation's parent run. A rerun skips
    finished folds (recorded in ``output_dir/state.json``) and resumes the interrupted one where it stopped.

    Args:
        workflow: the configured workflow (``output_dir`` is the cross-validation's folder).
        num_folds: number of folds (>= 2).
        group_keys: the datalist fields that name a slide's patient.
    """

    def __init__(self, workflow: ICMILWorkflow, num_folds: int, group_keys: Sequence[str] = GROUP_KEYS):
        self.workflow, self.num_folds, self.group_keys = workflow, int(num_folds), tuple(group_keys)
        self.dir = workflow.output_dir / "folds"

    def plan(self) -> list[Path]:
        """Write (or check) ``folds/folds.json`` and each fold's datalist; returns the datalists' paths.

        Raises:
            ValueError: ``folds.json`` was written for other slides, another number of folds or another seed: the
                message names what differs and says to use a new ``output_dir``.
        """
        wf = self.workflow
        path = self.dir / "folds.json"
        before = json.loads(path.read_text()) if path.is_file() else None
        if before and self.group_keys == GROUP_KEYS and before.get("group_keys"):
            self.group_keys = tuple(before["group_keys"])  # a started cross-validation keeps its grouping fields
        items = wf.splits.items()
        splits, folds = fold_splits(items, self.num_folds, wf.seed, wf.splits.val_fraction, self.group_keys)
        pool = [e for s in ("training", "validation") for e in items.get(s, [])]
        groups = slide_groups(pool, self.group_keys)
        record = {
            "num_folds": self.num_folds,
            "seed": wf.seed,
            "group_keys": list(self.group_keys),
            "test": "fixed" if items.get("test") else "held-out part of each fold",
            "val_fraction": wf.splits.val_fraction,
            "slides": {
                e["slide_id"]: {"fold": f, "group": g, "label": e["label"]} for e, f, g in zip(pool, folds, groups)
            },
        }
        if before is not None:
            for key in ("num_folds", "seed", "slides", "test", "val_fraction"):
                if key in before and before.get(key) != record[key]:  # (val_fraction: recorded since 2026-12)
                    raise ValueError(
                        f"{path} was written for another cross-validation (its {key} differs: a changed datalist, "
                        "fold count, seed or val_fraction). Use a new output_dir, or remove that folder to start over."
                    )
        atomic_write_json(path, record)
        paths = []
        for k, split in enumerate(splits):
            paths.append(self.dir / f"fold_{k}.json")
            atomic_write_json(paths[-1], {s: [_plain(e) for e in entries] for s, entries in split.items()})
        return paths

    def fold(self, k: int, datalist: Path) -> ICMILWorkflow:
        """Fold ``k``'s workflow."""
        from monai_icmil.workflows.icmil import ICMILWorkflow

        wf = self.workflow
        mlflow = {**dict(wf.arguments.get("mlflow") or {}), "run_name": f"fold_{k}", "registered_model_name": None}
        top = wf.tracking.parent()
        if top is not None:
            mlflow.update(tracking_uri=top.tracking_uri, experiment_name=top.experiment_name, parent_run_id=top.run_id)
        shared = wf.output_dir / "round_0" / "features" if wf.phases["pretrain"] is None else None
        return ICMILWorkflow(
            **{
                **wf.arguments,
                "output_dir": str(wf.output_dir / f"fold_{k}"),
                "datalist": str(datalist.resolve()),
                "synthetic": None,
                "folds": 0,
                "mlflow": mlflow,
                "coords_dir": str(wf.coords_dir),
                "round0_features_dir": None if shared is None else str(shared),
            }
        )

    def run(self) -> dict[str, Any]:
        """Every fold's ICMIL loop (finished folds are read back), then ``summary.md`` and ``summary.json``."""
        wf = self.workflow
        wf.initialize()
        wf.splits.hold_out_validation = False  # the folds make their own validation splits
        datalists = self.plan()
        wf.prepare()  # tile every slide once, into the shared coordinate store
        summaries = []
        for k, datalist in enumerate(datalists):
            done = wf.ledger.get(None, f"fold_{k}")  # a finished fold is read back, not run (or logged) again
            if done is None:
                child = self.fold(k, datalist)
                logger.info("cross-validation: fold %d of %d (%s)", k + 1, self.num_folds, child.output_dir)
                result = child.run()
                if not result:  # under torchrun, rank 0 summarises
                    continue
                done = {"final_round": result["final_round"], "rows": list(result["rows"].values())}
                wf.ledger.mark(None, f"fold_{k}", done)
            summaries.append({"final_round": done["final_round"], "rows": {row["round"]: row for row in done["rows"]}})
        if len(summaries) < self.num_folds:
            return {}
        summary = cv_summary(wf.output_dir, summaries, f"{self.num_folds}-fold cross-validation")
        top = wf.tracking.parent()
        if top is not None:
            top.log_metrics({k: v for k, v in summary["final"].items() if isinstance(v, float)})
            names = ("summary.md", "summary.json", "cv_rounds.png", "folds/folds.json")
            top.log_artifacts([wf.output_dir / n for n in names])
            wf.tracking.close()
        return summary


def _plain(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A loaded datalist entry as a datalist row (absolute paths, class indices)."""
    return {k: v for k, v in entry.items() if isinstance(v, (str, int, float, bool)) or v is None}


def _mean_sd(values: Sequence[Any]) -> tuple[float | None, float | None, int]:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None, len(v)


def _mean_cell(mean: float | None, sd: float | None, n: int, of: int) -> str:
    """``mean +/- sd``, with the count when it is not every fold (an undefined AUC is left out)."""
    if mean is None:
        return "-"
    text = f"{mean:.3f} +/- {sd:.3f}" if sd is not None else f"{mean:.3f}"
    return text + (f" (n={n})" if n < of else "")


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def cv_summary(output_dir: str | Path, summaries: Sequence[Mapping[str, Any]], title: str) -> dict[str, Any]:
    """``summary.md`` (printed), ``summary.json`` and ``cv_rounds.png`` of a cross-validation: one row per fold and
    round, the mean +/- sd over folds per round, and over each fold's final round (best validation AUC).

    Args:
        output_dir: the cross-validation's folder.
        summaries: each fold's :meth:`~monai_icmil.workflows.ICMILWorkflow.run` result, in fold order.
        title: the heading.
    """
    from monai_icmil.visualize import save_rounds_plot

    out, keys = Path(output_dir), ("val_auc", "test_auc", "teacher_patch_auc", "test_acc", "test_f1")
    lines = [f"# ICMIL summary ({title})", "", "| fold | round | val AUC | test AUC | teacher patch AUC | test acc |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    per_fold = []
    for k, s in enumerate(summaries):
        for r, row in sorted(s["rows"].items()):
            mark = " (final)" if r == s["final_round"] else ""
            lines.append(
                f"| {k} | {r}{mark} | {_fmt(row['val_auc'])} | {_fmt(row['test_auc'])} | "
                f"{_fmt(row['teacher_patch_auc'])} | {_fmt(row['test_acc'])} |"
            )
            per_fold.append(
                {
                    "fold": k,
                    "final": r == s["final_round"],
                    **{key: row.get(key) for key in keys},
                    "round": r,
                }
            )
    rounds = sorted({row["round"] for row in per_fold})
    mean_rows, lines = [], lines + ["", "Mean +/- sd over the folds:", ""]
    lines += [
        "| round | folds | val AUC | test AUC | teacher patch AUC | test acc |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in [*rounds, "final"]:
        sel = [row for row in per_fold if (row["final"] if r == "final" else row["round"] == r)]
        stats = {key: _mean_sd([row[key] for row in sel]) for key in keys}
        cells = " | ".join(_mean_cell(*stats[key], len(sel)) for key in keys[:4])
        lines.append(f"| {r} | {len(sel)} | {cells} |")
        row = {"round": r, "folds": len(sel)}
        for key in keys:
            row[key], row[f"{key}_sd"], row[f"{key}_n"] = stats[key]
            if key in ("val_auc", "test_auc") and stats[key][1] is not None:  # the plot's band: +/- sd, within 0-1
                row[f"{key}_ci"] = [max(0.0, stats[key][0] - stats[key][1]), min(1.0, stats[key][0] + stats[key][1])]
        mean_rows.append(row)
    changes = _round_changes(per_fold, rounds)
    if changes:
        lines += ["", "Change from the previous round, fold by fold (the folds that reached both rounds):", ""]
        lines += ["| round | folds | val AUC change | test AUC change |", "| --- | --- | --- | --- |"]
        for change in changes:
            cells = " | ".join(_mean_cell(*change[key], change["folds"]) for key in ("val_auc", "test_auc"))
            lines.append(f"| {change['round']} | {change['folds']} | {cells} |")
    lines += [
        "",
        "sd: sample standard deviation over the folds (none from one fold); `(n=k)`: the mean of the k folds where the "
        "value is defined (an AUC needs both classes), and a round reached by fewer folds (early stopping) averages "
        "those folds only; `final`: each fold's round with the best val AUC.",
    ]
    lines += ["Per fold: `fold_<k>/summary.md`. Assignment: `folds/folds.json`."]
    try:
        save_rounds_plot(out / "cv_rounds.png", mean_rows[:-1], title=f"{title}: mean, band +/- sd")
        lines += ["", "![mean over the folds per round](cv_rounds.png)"]
    except Exception as e:  # a picture is not worth a run
        logger.warning("no cv_rounds.png (%s: %s)", type(e).__name__, e)
    text = "\n".join(lines) + "\n"
    final = {f"cv_{k}": v for k, v in mean_rows[-1].items() if k not in ("round",) and not k.endswith("_ci")}
    atomic_write_text(out / "summary.md", text)
    changes = [
        {"round": c["round"], "folds": c["folds"], **{f"{k}_change": list(c[k]) for k in ("val_auc", "test_auc")}}
        for c in changes
    ]  # [mean, sd, n] each
    record = {"folds": per_fold, "rounds": mean_rows, "final": final, "changes": changes}
    atomic_write_json(out / "summary.json", strict_json(record))
    print(text)
    return {**record, "markdown": text}


def _round_changes(per_fold: Sequence[Mapping[str, Any]], rounds: Sequence[int]) -> list[dict[str, Any]]:
    """Per round r >= 1, the mean, sd and count of each fold's change from round r - 1 in val and test AUC, over
    the folds with both (a mean per round alone would compare different folds where early stopping ended some)."""
    by_fold = {(row["fold"], row["round"]): row for row in per_fold}
    out = []
    for r in rounds:
        pairs = [(by_fold[(f, r - 1)], row) for (f, rr), row in by_fold.items() if rr == r and (f, r - 1) in by_fold]
        if r < 1 or not pairs:
            continue
        change = {"round": r, "folds": len(pairs)}
        for key in ("val_auc", "test_auc"):
            change[key] = _mean_sd([_difference(b.get(key), a.get(key)) for a, b in pairs])
        out.append(change)
    return out


def _difference(after: Any, before: Any) -> float | None:
    return None if after is None or before is None else float(after) - float(before)
