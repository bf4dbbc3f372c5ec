# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The run's summary, and whether coupling helped: one row per round (validation and test AUC with their 95 %
intervals, the change from the previous round with its paired interval, the instance teacher's patch AUC against the
ground truth where the datalist has tumour masks, accuracy, F1, time per phase) as ``summary.md`` (printed; with
``rounds.png``, the final round's ROC curve, the highest-scoring test slide beside its ground truth and the tiling QC
sheets) and ``summary.json``."""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_icmil.utils import atomic_write_json, atomic_write_text, strict_json

__all__ = ["summary_rows", "write_summary", "paired_test_change", "read_test_probabilities", "coupling_metrics"]


def read_test_probabilities(output_dir: str | os.PathLike, round_index: int) -> dict[str, tuple[int, float]] | None:
    """Round ``round_index``'s test inference of a binary run (``round_<r>/test/predictions.csv``): per labelled
    slide, its label and positive-class probability.

    Args:
        output_dir: the run's folder.
        round_index: the round.

    Returns:
        ``{slide: (label, probability)}``; ``None`` where the file is missing or unreadable or the task is not binary.
    """
    path = Path(output_dir) / f"round_{round_index}" / "test" / "predictions.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        probs = [k for k in (rows[0] if rows else {}) if k.startswith("prob_")]
        if len(probs) != 2:
            return None
        return {row["slide"]: (int(row["label"]), float(row[probs[1]])) for row in rows if row["label"]}
    except (OSError, KeyError, ValueError, TypeError, csv.Error):  # a short row reads as None: TypeError
        return None


def paired_test_change(output_dir: str | os.PathLike, before: int, after: int) -> dict[str, float] | None:
    """Round ``after``'s test AUC minus round ``before``'s on the test slides both scored (``round_<r>/test/
    predictions.csv``), with DeLong's paired 95 % interval (:func:`~monai_icmil.metrics.paired_auc_difference`).

    Two rounds' AUCs on one test set share its easy and hard slides, so their difference is known far more precisely
    than the two separate intervals suggest; this interval says whether a round-over-round change is more than the
    test set's noise.

    Args:
        output_dir: the run's folder.
        before: the earlier round.
        after: the later round.

    Returns:
        ``{"diff", "se", "low", "high", "slides"}`` (``diff`` from the CSVs' probabilities, on the shared slides);
        ``None`` where either file is missing or unreadable, the task is not binary, or the shared slides hold fewer
        than two of a class.
    """
    from monai_icmil.metrics import paired_auc_difference  # here: the summary module imports without torch

    scores = [read_test_probabilities(output_dir, r) for r in (before, after)]
    if scores[0] is None or scores[1] is None:
        return None
    shared = sorted(set(scores[0]) & set(scores[1]))
    labels = [scores[0][k][0] for k in shared]
    d = paired_auc_difference([scores[0][k][1] for k in shared], [scores[1][k][1] for k in shared], labels)
    return {**d, "slides": len(shared)} if _finite(d["se"]) else None


def summary_rows(
    rounds: Mapping[int, Mapping[str, Any]], output_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """One row per round from the ledger's records (``*_delta``: the change from the previous round; with
    ``output_dir``, ``test_auc_delta_ci``: that change's paired 95 % interval, :func:`paired_test_change`)."""
    rows, previous = [], None
    for r in sorted(rounds):
        s = rounds[r]
        test, val = s.get("test", {}).get("metrics", {}), s.get("bag_phase", {}).get("val", {})
        row = {
            "round": int(r),
            "val_auc": val.get("auc"),
            "val_auc_ci": [val.get("auc_ci_low"), val.get("auc_ci_high")],
            "val_loss": val.get("loss"),
            "test_auc": test.get("auc"),
            "test_auc_ci": [test.get("auc_ci_low"), test.get("auc_ci_high")],
            "test_slides": s.get("test", {}).get("slides"),
            "test_acc": test.get("acc"),
            "test_f1": test.get("f1"),
            "test_val_threshold": test.get("val_threshold"),
            "test_val_threshold_acc": test.get("val_threshold_acc"),
            "test_val_threshold_f1": test.get("val_threshold_f1"),
            "test_predicted": s.get("test", {}).get("predicted"),
            "teacher_patch_auc": s.get("teacher", {}).get("patch_auc"),
            "teacher_patches": s.get("teacher", {}).get("patches"),
            "teacher_normal_called_tumour": s.get("teacher", {}).get("normal_called_tumour"),
            "teacher_unmeasured": s.get("teacher", {}).get("unmeasured"),
            "embedder_phase_s": s.get("embedder_phase", {}).get("seconds"),
            "embed_s": s.get("embed", {}).get("seconds"),
            "bag_phase_s": s.get("bag_phase", {}).get("seconds"),
        }
        if "kept_start" in s.get("bag_phase", {}):  # bag_phase#warm_start: where the kept classifier started
            row["bag_phase_start"] = s["bag_phase"]["kept_start"]
        for key in ("val_auc", "test_auc", "teacher_patch_auc"):
            row[f"{key}_delta"] = _delta(row[key], previous[key]) if previous else None
        paired = paired_test_change(output_dir, previous["round"], row["round"]) if previous and output_dir else None
        row["test_auc_delta_ci"] = [paired["low"], paired["high"]] if paired else [None, None]
        if paired and _other_slides(paired, row, previous):  # a slide read in one round only: compare like with like
            row["test_auc_delta"], row["test_auc_delta_slides"] = paired["diff"], paired["slides"]
        rows.append(row)
        previous = row
    return rows


def coupling_metrics(
    rows: Mapping[int, Mapping[str, Any]], final_round: int, output_dir: str | os.PathLike | None = None
) -> dict[str, float]:
    """The run's headline metrics for MLflow: ``final_<metric>`` of the final round, ``final_<metric>_vs_prev`` its
    change from the round before it, and, when the final round is a coupled one, ``coupling_<metric>_delta`` its
    change from the first round (what coupling did; for the test AUC with ``coupling_test_auc_delta_ci_low`` /
    ``_high``, the paired 95 % interval)."""
    rows = {int(r): row for r, row in rows.items()}
    final, first = rows[int(final_round)], rows[min(rows)]
    out: dict[str, float] = {}
    for key, value in final.items():
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and key not in ("round", "test_auc_delta_slides")
        ):
            out[f"final_{key[: -len('_delta')]}_vs_prev" if key.endswith("_delta") else f"final_{key}"] = value
    if final["round"] == first["round"]:  # round 0 kept: no coupled round to compare (not "coupling did nothing")
        return out
    for key in ("val_auc", "test_auc", "teacher_patch_auc"):
        if (delta := _delta(final.get(key), first.get(key))) is not None:
            out[f"coupling_{key}_delta"] = delta
    paired = paired_test_change(output_dir, first["round"], final["round"]) if output_dir is not None else None
    if paired:
        out.update(coupling_test_auc_delta_ci_low=paired["low"], coupling_test_auc_delta_ci_high=paired["high"])
        if _other_slides(paired, final, first):
            out["coupling_test_auc_delta"] = paired["diff"]
    return out


def _other_slides(paired: Mapping[str, Any], *rows: Mapping[str, Any]) -> bool:
    """Whether a paired change covers fewer slides than one of the rounds' test AUCs did (a slide failed to read or
    was left out in one round): then the difference of the two AUCs compares different slides, and the paired
    change, on the slides both scored, is the round-over-round change."""
    return any(row.get("test_slides") is not None and row["test_slides"] != paired["slides"] for row in rows)


def _finite(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _delta(now: Any, before: Any) -> float | None:
    return float(now) - float(before) if _finite(now) and _finite(before) else None


def _fmt(v: Any, digits: int = 3, sign: bool = False) -> str:
    return f"{v:{'+' if sign else ''}.{digits}f}" if _finite(v) else "-"


def _pct(v: Any) -> str:
    return f"{100 * v:.1f} %" if _finite(v) else "-"


def _ci(bounds: Sequence[Any], signed: bool = False) -> str:
    """`` (0.91-0.99)``, or a change's signed `` (-0.04 to +0.06)``; `` (no CI)`` for an interval without width (see
    the notes); nothing without bounds."""
    if not all(_finite(v) for v in bounds):
        return ""
    if bounds[0] == bounds[1]:
        return " (no CI)"
    return f" ({bounds[0]:+.2f} to {bounds[1]:+.2f})" if signed else f" ({bounds[0]:.2f}-{bounds[1]:.2f})"


def _table(rows: list[dict[str, Any]], final_round: int) -> list[str]:
    lines = [
        "| round | val AUC (95 % CI) | test AUC (95 % CI) | change in test AUC (paired 95 % CI) | teacher patch AUC "
        "| change in teacher "
        "| tumour-free called tumour | test acc | test F1 | embedder phase (s) | embed (s) | bag phase (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['round']}{' (final)' if row['round'] == final_round else ''} | {_fmt(row['val_auc'])}"
            f"{_ci(row['val_auc_ci'])} | {_fmt(row['test_auc'])}{_ci(row['test_auc_ci'])} | "
            f"{_fmt(row['test_auc_delta'], sign=True)}{_ci(row['test_auc_delta_ci'], signed=True)}"
            f"{f' on {n} shared slides' if (n := row.get('test_auc_delta_slides')) else ''} | "
            f"{_fmt(row['teacher_patch_auc'])} | "
            f"{_fmt(row['teacher_patch_auc_delta'], sign=True)} | {_pct(row['teacher_normal_called_tumour'])} | "
            f"{_fmt(row['test_acc'])} | {_fmt(row['test_f1'])} | "
            f"{_fmt(row['embedder_phase_s'], 1)} | {_fmt(row['embed_s'], 1)} | {_fmt(row['bag_phase_s'], 1)} |"
        )
    return lines


def _notes(
    rows: list[dict[str, Any]], final_round: int, class_names: Sequence[str] | None, output_dir: Path | None = None
) -> list[str]:
    """What the table says: intervals, whether coupling helped (and whether by more than the test set's noise),
    rounds that call every slide one class."""
    notes = []
    if any(_ci(row["test_auc_ci"]) for row in rows):
        n_test = max(row["test_slides"] or 0 for row in rows)
        notes.append(
            f"AUCs with their 95 % DeLong confidence intervals; the test split has {n_test} slides. A change in test "
            "AUC has its paired interval (both rounds on the same slides: narrower than the two intervals suggest)."
        )
    if any(_ci(row[k]) == " (no CI)" for row in rows for k in ("val_auc_ci", "test_auc_ci", "test_auc_delta_ci")):
        notes.append(
            "No CI: DeLong's interval has no width, as for an AUC of 1.000 (the classes do not overlap in that split) "
            "or a change between two rounds that order every tumour/normal pair alike; it is not certainty: on a "
            "few dozen slides a classifier that separates them all can still be imperfect."
        )
    if any(_finite(row["teacher_patch_auc"]) for row in rows):
        n = max(row["teacher_patches"] or 0 for row in rows)
        notes.append(
            "Teacher patch AUC: each round's bag classifier applied to single patches (ICMIL's instance teacher), "
            f"against the ground-truth tumour masks of the test slides ({n} patches: >= 50 % tumour vs tumour-free). "
            "Tumour-free called tumour: the share of those tumour-free patches the teacher gives a tumour probability "
            "> 0.5; the next round's student is taught such labels on the training slides, so a teacher can rank "
            "patches well and still teach many of them wrongly."
        )
    unmeasured = next((row["teacher_unmeasured"] for row in rows if row.get("teacher_unmeasured")), None)
    if unmeasured and not any(_finite(row["teacher_patch_auc"]) for row in rows):
        notes.append(
            f"Teacher patch AUC: not measured: {unmeasured} (the tumour regions are smaller than half a patch at this "
            "tiling, or the masks are empty)."
        )
    first, last = rows[0], next((row for row in rows if row["round"] == final_round), rows[-1])
    if last["round"] > first["round"]:
        paired = paired_test_change(output_dir, first["round"], last["round"]) if output_dir is not None else None
        other = paired is not None and _other_slides(paired, first, last)  # the paired change follows instead
        parts = [
            f"{name} {_fmt(first[key])} -> {_fmt(last[key])}"
            + (f" (on {first['test_slides']} and {last['test_slides']} slides)" if other and key == "test_auc" else
               f" ({_fmt(_delta(last[key], first[key]), sign=True)})")
            for key, name in (("test_auc", "test AUC"), ("teacher_patch_auc", "teacher patch AUC"))
            if _finite(first[key]) and _finite(last[key])
        ]  # fmt: skip
        if parts:
            notes.append(
                f"Coupling, round {first['round']} -> round {last['round']} (final): "
                + "; ".join(parts)
                + "."
                + _paired_verdict(paired)
            )
    elif len(rows) > 1:
        notes.append(f"Coupling did not improve the validation AUC: round {final_round} (frozen embedder) is final.")
    notes += _tie_note(rows, final_round)
    notes += _threshold_note(last) + _chance_note(last)
    started = [(row["round"], row["bag_phase_start"]) for row in rows if row.get("bag_phase_start")]
    if started:
        where = {"warm": "the student's classifier", "fresh": "a fresh initialisation"}
        said = "; ".join(f"round {r}, {where.get(start, start)}" for r, start in started)
        notes.append(f"Start of the kept bag classifier (`bag_phase#warm_start`): {said}.")
    for row in rows:
        predicted = row["test_predicted"] or []
        if sum(1 for c in predicted if c) == 1 and sum(predicted) > 1:
            k = next(i for i, c in enumerate(predicted) if c)
            name = class_names[k] if class_names and k < len(class_names) else f"class {k}"
            notes.append(f"**Round {row['round']} calls every test slide {name}**: it has not learnt to separate them.")
    return notes


def _chance_note(row: dict[str, Any]) -> list[str]:
    """Where the final round's (``row``) test AUC interval includes 0.5 (no better than chance on these slides) or
    lies under it, and where its validation interval is wide (the split that picked it, and much else, is small)."""
    notes = []
    low, high = row["test_auc_ci"]
    if _finite(high) and high < 0.5:
        notes.append(
            f"**Round {row['round']}'s test AUC ({_fmt(row['test_auc'])}, {low:.2f}-{high:.2f}) is below chance**: it "
            "ranks the test slides the wrong way round. Check that the test labels mean what the training labels do."
        )
    elif _finite(low) and _finite(high) and low <= 0.5 <= high:
        notes.append(
            f"**Round {row['round']}'s test AUC ({_fmt(row['test_auc'])}, {low:.2f}-{high:.2f}) cannot be told from "
            "chance on these test slides.** Common causes: tumour in a small share of the tissue, an embedder that "
            "does not see the cue (random-init or not pre-trained on such tissue: `embedder#weights`, "
            "`workflow#pretrain`), too few slides."
        )
    low, high = row["val_auc_ci"]
    if _finite(low) and _finite(high) and high - low > 0.3:
        notes.append(
            f"Round {row['round']}'s validation AUC interval is wide ({low:.2f}-{high:.2f}): few validation slides "
            "picked the final round, and within each round the bag classifier (its restart, its stopping epoch and, "
            "when on, the witness-search fraction), so the validation AUC is optimistic; the test AUC is the fair "
            "figure."
        )
    return notes


def _threshold_note(row: dict[str, Any]) -> list[str]:
    """Where the final round's (``row``) test accuracy at the probability threshold the validation slides pick
    differs from its accuracy at 0.5 (probabilities that sit high or low on every slide): both, and where they are
    kept."""
    if not (_finite(row.get("test_val_threshold_acc")) and _finite(row["test_acc"])):
        return []
    if abs(row["test_val_threshold_acc"] - row["test_acc"]) < 0.02:
        return []
    return [
        f"Test accuracy and F1 are at probability 0.5. At the threshold the validation slides pick "
        f"(p = {row['test_val_threshold']:.3f}), round {row['round']}'s test accuracy is "
        f"{row['test_val_threshold_acc']:.3f} (F1 {_fmt(row.get('test_val_threshold_f1'))}; "
        f"`round_{row['round']}/test/metrics.json`, `val_threshold_*`): its probabilities are not centred on 0.5, "
        "which the AUC does not mind (on few validation slides the threshold itself is rough)."
    ]


def _tie_note(rows: list[dict[str, Any]], final_round: int) -> list[str]:
    """Where several rounds share the best validation AUC: the final one was picked by the validation loss."""
    best = max((row["val_auc"] for row in rows if _finite(row["val_auc"])), default=None)
    tied = [row["round"] for row in rows if best is not None and _finite(row["val_auc"]) and row["val_auc"] == best]
    if len(tied) < 2:
        return []
    losses = {row["round"]: row.get("val_loss") for row in rows if row["round"] in tied}
    final_loss = losses.get(final_round)
    by_loss = _finite(final_loss) and all(
        not _finite(v) or v > final_loss for r, v in losses.items() if r != final_round
    )
    if by_loss:
        how = "by the lower validation loss"
    elif final_round == min(tied):
        how = "as the earliest of them (their validation losses are equal too)"
    else:
        how = "by validation loss, then the earlier round"
    return [
        f"Validation AUC ties at {best:.3f} in rounds {', '.join(map(str, tied))}: round {final_round} is final {how}. "
        "Validation cannot tell these rounds apart; their test AUCs (paired) are the fairer comparison."
    ]


def _paired_verdict(d: Mapping[str, Any] | None) -> str:
    """Whether a test AUC's change (:func:`paired_test_change`, ``None`` where unknown) exceeds the test set's noise."""
    if d is None:
        return ""
    if d["low"] == d["high"]:
        return (
            f" On the {d['slides']} test slides both rounds scored, the change in test AUC ({d['diff']:+.3f}) has a "
            "paired interval of no width: both rounds order every tumour/normal pair alike (or misorder the same "
            "ones), so the test set cannot tell them apart."
        )
    verdict = "more than the test set's noise" if d["low"] > 0 or d["high"] < 0 else "within the test set's noise"
    return (
        f" On the {d['slides']} test slides both rounds scored, the change in test AUC ({d['diff']:+.3f}) has a "
        f"paired 95 % interval of {d['low']:+.3f} to {d['high']:+.3f}: {verdict}."
    )


def _tied(showcase: Mapping[str, Any]) -> str:
    """``; 3 test slides at 1.000 to 3 decimals`` where the showcase's probability is shared."""
    n = int(showcase.get("tied") or 1)
    return f"; {n} test slides at {showcase['probability']:.3f} to 3 decimals" if n > 1 else ""


def write_summary(
    output_dir: str | os.PathLike,
    rounds: Mapping[int, Mapping[str, Any]],
    final_round: int,
    title: str,
    excluded: Iterable[str] = (),
    showcase: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write ``summary.md``, ``summary.json`` and ``rounds.png`` into ``output_dir``, print the markdown and return
    ``{"rows": {round: row}, "final_round", "markdown", "showcase"}``.

    Args:
        output_dir: the run's folder (the pictures it links are relative to it).
        rounds: the ledger's records by round.
        final_round: the round whose models count (best validation AUC).
        title: what the heading names (aggregator, embedder).
        excluded: slides left out (failed or without tissue).
        showcase: the test inference's record (highest-scoring slide, its picture beside the ground truth).
        class_names: names of the classes.
    """
    from monai_icmil.visualize import save_rounds_plot

    out = Path(output_dir)
    rows = summary_rows(rounds, out)
    lines = [f"# ICMIL summary ({title})", "", *_table(rows, final_round)]
    lines += [line for note in _notes(rows, final_round, class_names, out) for line in ("", note)]
    try:
        save_rounds_plot(out / "rounds.png", rows, title=f"ICMIL rounds ({title})", final_round=final_round)
        lines += ["", "![the rounds: validation, test and teacher patch AUC](rounds.png)"]
    except Exception as e:  # a picture is not worth a run
        warnings.warn(f"no rounds.png ({type(e).__name__}: {e})", stacklevel=2)
    excluded = sorted(excluded)
    if excluded:
        lines += ["", f"{len(excluded)} slide(s) left out (failed or no tissue): {', '.join(excluded)}"]
    roc = Path(f"round_{final_round}") / "test" / "roc.png"
    if (out / roc).is_file():
        lines += ["", f"![test ROC, round {final_round}]({roc.as_posix()})"]
    if showcase and showcase.get("error"):
        lines += ["", f"The test inference scored no slide: {showcase['error']}"]
    if showcase and showcase.get("picture"):
        lines += [
            "",
            f"The test slide the final round scores highest, {showcase['slide']} (tumour probability "
            f"{showcase['probability']:.3f}{_tied(showcase)}), each patch's predicted probability beside the ground "
            "truth:",
            "",
            f"![{showcase['slide']}: prediction vs ground truth]({showcase['picture']})",
        ]
    pages = sorted((out / "coords" / "qc" / "overview").glob("page_*.jpg"))
    if pages:
        links = ", ".join(f"[{p.stem}]({p.relative_to(out).as_posix()})" for p in pages)
        lines += ["", f"Tiling QC of every slide: {links} (per slide: `coords/qc/tiling.csv`)."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "summary.md", text)
    atomic_write_json(
        out / "summary.json", strict_json({"rows": rows, "final_round": final_round, "showcase": showcase})
    )
    print(text)
    return {
        "rows": {row["round"]: row for row in rows},
        "final_round": final_round,
        "markdown": text,
        "showcase": showcase,
    }
