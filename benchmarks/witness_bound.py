# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""How much slide-level signal a finished ICMIL run's features can hold, measured against the ground-truth masks.

For each round of a run folder (an ``icmil_gain.py`` run or any bundle ``output_dir`` with ``coords/`` and
``round_<r>/features``) and its dataset (``datalist.json`` with ``tumour_mask`` entries):

- **witnesses**: patches >= 50 % tumour per positive training slide (median, and positive slides with none). MIL
  needs witnesses; a witness rate given as a share of the tissue says little until multiplied by the patches a slide
  has.
- **oracle**: a linear probe fitted on the training slides' patches against the masks (every witness and up to
  ``--negatives`` tumour-free patches a slide), then scored on the test slides: its patch AUC, and the slide AUC of
  three slide scores (the highest patch score, the mean of the top 5 %, the mean). No weakly supervised model of the
  same features should be expected to beat the oracle's slide AUC by much.
- **teacher**: the same three slide scores from the round's instance teacher (the bag classifier applied to each
  patch), beside the bag classifier's own test AUC (``round_<r>/test/predictions.csv``); and on the training slides,
  the ones it learnt from: its patch AUC (witnesses against tumour-free patches) and the share of positive slides
  with a witness whose highest-scoring patch is one. High there and low on the test slides: it memorised where the
  witnesses are; low (or below 0.5) on both: it never found them.

    python benchmarks/witness_bound.py --run /tmp/gain/sparse/runs/sparse/seed_0/ssl/abmil \\
        --data /tmp/gain/sparse/data/sparse/seed_0 --out /tmp/witness
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import monai_icmil  # noqa: E402,F401  (quiet cuCIM import first)
from monai_icmil.data import open_slide  # noqa: E402
from monai_icmil.data.annotations import GroundTruth  # noqa: E402
from monai_icmil.data.store import CoordsStore, FeatureStore  # noqa: E402
from monai_icmil.engines.bag_phase import load_bag_classifier  # noqa: E402
from monai_icmil.metrics import binary_auc, fit_linear_probe  # noqa: E402
from monai_icmil.utils import atomic_write_json, atomic_write_text  # noqa: E402

SLIDE_SCORES = ("max", "top5%", "mean")


def slide_scores(p: np.ndarray) -> dict[str, float]:
    """A slide's scores from its patch scores ``p``: the highest, the mean of the top 5 % (>= 1 patch), the mean."""
    s = np.sort(np.asarray(p, float))[::-1]
    return {"max": float(s[0]), "top5%": float(s[: max(1, len(s) // 20)].mean()), "mean": float(s.mean())}


@functools.lru_cache(maxsize=None)
def tumour_fraction(run: Path, data: Path, image: str, mask: str | None, sid: str) -> np.ndarray:
    """Each patch's tumour fraction on slide ``sid`` of ``run`` (its tiling, shared by every round: read and
    measured once), 0 throughout for a slide without a mask."""
    coords = CoordsStore(run / "coords")
    xy = coords.load(sid)["coords"].numpy()
    if not mask:
        return np.zeros(len(xy))
    truth = GroundTruth(data / mask, open_slide(data / image).dimensions)
    return truth.patch_fraction(xy, float(coords.metadata(sid)["footprint"]))


def patches(
    run: Path, r: int, data: Path, entries: list[dict[str, Any]]
) -> Iterator[tuple[dict, np.ndarray, np.ndarray]]:
    """``(entry, features [N, D], tumour fraction [N])`` of each slide of ``entries`` with a non-empty bag in round
    ``r`` (fraction 0 throughout for a slide without a mask)."""
    store = FeatureStore(run / f"round_{r}" / "features")
    for entry in entries:
        sid = Path(entry["image"]).stem
        arrays = store.load(sid)
        if arrays is None or not len(arrays["features"]):
            continue
        frac = tumour_fraction(run, data, entry["image"], entry.get("tumour_mask"), sid)
        yield entry, arrays["features"].float().numpy(), frac


def _auc(scores: list[float], labels: list[int]) -> float:
    return binary_auc(np.asarray(scores), np.asarray(labels)) if 0 < sum(labels) < len(labels) else float("nan")


def measure_round(run: Path, r: int, data: Path, datalist: dict[str, Any], negatives: int = 60) -> dict[str, Any]:
    """The witness counts, the oracle and the teacher of round ``r`` (see the module docstring)."""
    rng = np.random.default_rng(0)
    teacher = load_bag_classifier(run / f"round_{r}" / "bag_phase" / "bag_classifier.pt").cpu().eval()

    def teach(feats: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(teacher.instance_logits(torch.from_numpy(feats)), -1)[:, -1].numpy()

    fit_x, fit_y, per_slide, witnesses, train_y, train_s, hits = [], [], [], [], [], [], []
    for entry, feats, frac in patches(run, r, data, datalist["training"]):
        pos, neg = np.flatnonzero(frac >= 0.5), np.flatnonzero(frac == 0)
        t, keep = teach(feats), (frac >= 0.5) | (frac == 0)
        train_y.append(frac[keep] >= 0.5)
        train_s.append(t[keep])
        neg = rng.choice(neg, min(len(neg), negatives), replace=False)
        fit_x += [feats[pos], feats[neg]]
        fit_y += [np.ones(len(pos)), np.zeros(len(neg))]
        if int(entry["label"]):
            per_slide.append(len(feats))
            witnesses.append(int(len(pos)))
            if len(pos):
                hits.append(bool(frac[int(np.argmax(t))] >= 0.5))
    y = np.concatenate(fit_y)
    oracle = fit_linear_probe(np.concatenate(fit_x), y) if 0 < y.sum() < len(y) else None
    ty = np.concatenate(train_y) if train_y else np.zeros(0, bool)
    labels, ids, patch_y, patch_s = [], [], [], []
    scores = {"oracle": {k: [] for k in SLIDE_SCORES}, "teacher": {k: [] for k in SLIDE_SCORES}}
    for entry, feats, frac in patches(run, r, data, datalist["test"]):
        labels.append(int(entry["label"]))
        ids.append(Path(entry["image"]).stem)
        for k, v in slide_scores(teach(feats)).items():
            scores["teacher"][k].append(v)
        if oracle is not None:
            o = oracle(feats)
            keep = (frac >= 0.5) | (frac == 0)
            patch_y.append(frac[keep] >= 0.5)
            patch_s.append(o[keep])
            for k, v in slide_scores(o).items():
                scores["oracle"][k].append(v)
    py = np.concatenate(patch_y) if patch_y else np.zeros(0, bool)
    predictions = {row["slide"]: row for row in csv.DictReader(open(run / f"round_{r}" / "test" / "predictions.csv"))}
    bag = [float([v for k, v in predictions[i].items() if k.startswith("prob_")][-1]) for i in ids]  # last class
    return {
        "round": r,
        "positive_slides": len(witnesses),
        "patches_per_positive_slide": float(np.median(per_slide)) if per_slide else float("nan"),
        "witnesses_per_positive_slide": float(np.median(witnesses)) if witnesses else float("nan"),
        "positive_slides_without_witness": int(sum(w == 0 for w in witnesses)),
        "oracle_patch_auc": (binary_auc(np.concatenate(patch_s), py) if 0 < py.sum() < len(py) else float("nan")),
        **{f"oracle_slide_auc_{k}": _auc(v, labels) if oracle else float("nan") for k, v in scores["oracle"].items()},
        **{f"teacher_slide_auc_{k}": _auc(v, labels) for k, v in scores["teacher"].items()},
        "teacher_train_patch_auc": binary_auc(np.concatenate(train_s), ty) if 0 < ty.sum() < len(ty) else float("nan"),
        "teacher_train_top_is_witness": float(np.mean(hits)) if hits else float("nan"),
        "bag_test_auc": _auc(bag, labels),
    }


COLUMNS = [
    ("round", "round"),
    ("witnesses_per_positive_slide", "witnesses / positive slide (median)"),
    ("positive_slides_without_witness", "positive slides without one"),
    ("patches_per_positive_slide", "patches / positive slide (median)"),
    ("oracle_patch_auc", "oracle patch AUC"),
    *[(f"oracle_slide_auc_{k}", f"oracle slide AUC ({k})") for k in SLIDE_SCORES],
    *[(f"teacher_slide_auc_{k}", f"teacher slide AUC ({k})") for k in SLIDE_SCORES],
    ("bag_test_auc", "bag test AUC"),
    ("teacher_train_patch_auc", "teacher patch AUC, training slides"),
    ("teacher_train_top_is_witness", "positive training slides whose top patch is a witness"),
]


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    def cell(key: str, v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) and ("auc" in key or "_is_" in key) else f"{v:g}"

    lines = [f"Command: `{command}`", "", "| run | " + " | ".join(h for _, h in COLUMNS) + " |"]
    lines.append("| --- " * (len(COLUMNS) + 1) + "|")
    for r in rows:
        name = "/".join(Path(r["run"]).parts[-4:])  # e.g. <setting>/seed_<s>/<start>/<aggregator>
        lines.append("| " + " | ".join([name, *(cell(k, r[k]) for k, _ in COLUMNS)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="+", required=True, help="run folders (coords/ and round_<r>/ inside)")
    p.add_argument("--data", nargs="+", required=True, help="each run's dataset folder (one for all, or one per run)")
    p.add_argument("--rounds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--negatives", type=int, default=60, help="tumour-free patches per training slide for the oracle")
    p.add_argument("--out", required=True, help="report.json and report.md go here")
    args = p.parse_args(argv)
    if len(args.data) not in (1, len(args.run)):
        p.error(f"--data: give one folder or one per run ({len(args.run)}), got {len(args.data)}")
    rows = []
    for k, run in enumerate(args.run):
        data = Path(args.data[k if len(args.data) > 1 else 0])
        datalist = json.loads((data / "datalist.json").read_text())
        for r in args.rounds:
            row = {"run": str(run), **measure_round(Path(run), r, data, datalist, args.negatives)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", {"args": vars(args), "rows": rows})
    atomic_write_text(
        out / "report.md", markdown(rows, "python benchmarks/witness_bound.py " + " ".join(argv or sys.argv[1:]))
    )
    return rows


if __name__ == "__main__":
    main()
