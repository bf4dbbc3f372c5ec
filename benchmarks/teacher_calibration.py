# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""What the instance teacher teaches: its calibration on single patches against the ground-truth masks.

For each finished round of an ICMIL run whose datalist carries ``tumour_mask``, the round's bag classifier is applied
to every stored test-slide patch feature (ICMIL's instance teacher, as the embedder phase uses it) and compared with
the masks (>= 50 % tumour positive, tumour-free negative, as the summary's teacher patch AUC): the share of
tumour-free patches it calls tumour (probability > 0.5, and > 0.99), its precision and recall at 0.5, its precision
on its top-k patches (k = the number of tumour patches) and the quantiles of its probabilities. A patch AUC says how
well the teacher ranks patches; these figures say what the student is taught (the workflow records two of them,
``normal_called_tumour`` and ``precision``, beside the patch AUC in ``state.json``, and the first in ``summary.md``).

    python benchmarks/teacher_calibration.py --run <output_dir> --data <dataset_dir> [--run ... --data ...]

``--run`` is a workflow's ``output_dir`` (``round_<r>/features/test_*.safetensors`` and
``round_<r>/bag_phase/bag_classifier.pt``), ``--data`` the folder of its ``datalist.json`` (paths in it are relative
to it). Runs on the CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from monai_icmil.data.store import CoordsStore, FeatureStore
from monai_icmil.engines.bag_phase import load_bag_classifier
from monai_icmil.metrics import instance_auc, instance_truth
from monai_icmil.workflows.evaluation import teacher_patch_scores


def teacher_on_test(run: Path, data: Path, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Round ``r``'s teacher tumour probabilities and truth (bool) of the test patches with a clear label (the
    workflow's own measure, :func:`~monai_icmil.workflows.evaluation.teacher_patch_scores`)."""
    net = load_bag_classifier(run / f"round_{r}" / "bag_phase" / "bag_classifier.pt")
    datalist = json.loads((data / "datalist.json").read_text())
    entries = {}
    for e in datalist["test"]:  # paths in the datalist are relative to its folder
        mask = e.get("tumour_mask")
        entries[Path(e["image"]).stem] = {
            **e,
            "image": str(data / e["image"]),
            "tumour_mask": mask and str(data / mask),
        }
    store = FeatureStore(run / f"round_{r}" / "features")
    loaded = {sid: store.load(sid) for sid in sorted(entries)}
    bags = [{"slide_id": sid, **arrays} for sid, arrays in loaded.items() if arrays is not None]
    return instance_truth(*teacher_patch_scores(net, bags, entries, CoordsStore(run / "coords")))


def describe(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Calibration figures of tumour probabilities ``p`` against truth ``y``."""
    called, top = p > 0.5, np.argsort(-p)[: int(y.sum())]
    summary = instance_auc([p], [y.astype(float)])  # the workflow's figures (state.json's "teacher")
    return {
        "patch_auc": summary["patch_auc"],
        "tumour_share": float(y.mean()),
        "normal_called_tumour": summary["normal_called_tumour"],
        "normal_above_0.99": float((p[~y] > 0.99).mean()),
        "precision_at_0.5": summary["precision"],
        "recall_at_0.5": float(called[y].mean()),
        "precision_top_k": float(y[top].mean()),
        "normal_p_median": float(np.median(p[~y])),
        "tumour_p_median": float(np.median(p[y])),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, action="append", required=True)
    ap.add_argument("--data", type=Path, action="append", required=True)
    args = ap.parse_args(argv)
    if len(args.run) != len(args.data):
        raise SystemExit("give one --data per --run")
    rows = []
    for run, data in zip(args.run, args.data):
        r = 0
        while (run / f"round_{r}" / "bag_phase" / "bag_classifier.pt").is_file():
            rows.append({"run": str(run), "round": r, **describe(*teacher_on_test(run, data, r))})
            r += 1
    keys = [k for k in rows[0] if k not in ("run", "round")] if rows else []
    print("| run | round | " + " | ".join(keys) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in keys) + " |")
    for row in rows:
        print(f"| {row['run']} | {row['round']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    return rows


if __name__ == "__main__":
    main()
