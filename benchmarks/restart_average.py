"""Post-hoc analysis of an ``icmil_gain.py`` run: each round's bag-phase restarts averaged instead of one kept.

The bag phase keeps the restart with the best validation AUC (ties to the validation loss); where every restart
separates the validation slides, that choice is noise. This script scores, per seed, aggregator and round, the mean of
every restart's tumour probability on the run's test slides (from the round's stored features) and on its extra test
slides (from ``extra_test/<name>/scores.json``), each on the slides both rounds scored, and prints round 1 minus round 0
with the mean and sd over seeds. It trains nothing and reads only what ``icmil_gain.py`` stored.

    python benchmarks/restart_average.py --out /work/gain_runs/quilted --setting quilted --variant nt1000 \
        --seeds 0 1 2 3 4 5 --json benchmarks/gain_results/d11_restart_average.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import monai_icmil  # noqa: E402,F401  (quiet cuCIM import first)
from monai_icmil.engines.bag_phase import evaluate_bags, load_bag_classifier  # noqa: E402
from monai_icmil.metrics import binary_auc  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from icmil_gain import (  # noqa: E402  (icmil_gain's run layout and readers)
    extra_scores_path,
    gain_stats,
    posthoc_parser,
    posthoc_result,
    restart_nets,
    run_path,
    stored_bags,
)


def averaged_probs(run: Path, r: int, datalist: dict) -> tuple[dict[str, tuple[int, float]], int]:
    """Round ``r``'s restarts' averaged tumour probability on each of the run's test slides it stored features of,
    ``{slide: (label, probability)}``, and the number of restarts."""
    bags = stored_bags(run, r, datalist)
    nets = restart_nets(run / f"round_{r}" / "bag_phase")
    probs = np.mean([[row["probs"][-1] for row in evaluate_bags(load_bag_classifier(p), bags)[1]] for p in nets], 0)
    return {b["slide_id"]: (int(b["label"]), float(q)) for b, q in zip(bags, probs)}, len(nets)


def averaged_extra_probs(run: Path, r: int, seed: int, extra_test: int | None = None) -> dict | None:
    """The same on the extra test slides (:func:`icmil_gain.extra_scores_path`), from the restarts' probabilities
    ``icmil_gain.py`` stored (``None`` without them)."""
    found = extra_scores_path(run, seed, extra_test)
    if found is None:
        return None
    s = json.loads(found.read_text())[str(r)]
    return {k: (int(y), float(q)) for k, y, q in zip(s["slide_ids"], s["labels"], np.mean(s["restarts"], 0))}


def shared_aucs(before: dict | None, after: dict | None) -> tuple[float | None, float | None, int]:
    """Both rounds' AUCs on the slides both scored (a slide that failed to read in one round is left out of both),
    and their number."""
    if before is None or after is None:
        return None, None, 0
    shared = sorted(set(before) & set(after))
    y = np.array([before[k][0] for k in shared])
    return (*(binary_auc(np.array([d[k][1] for k in shared]), y) for d in (before, after)), len(shared))


def main(argv: list[str] | None = None) -> dict:
    args = posthoc_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    rows = []
    for seed in args.seeds:
        datalist = json.loads((args.out / "data" / args.setting / f"seed_{seed}" / "datalist.json").read_text())
        for agg in args.aggregators:
            run = run_path(args.out, args.setting, seed, args.start, agg, args.variant)
            (test0, n0), (test1, n1) = (averaged_probs(run, r, datalist) for r in (0, 1))
            extra = [averaged_extra_probs(run, r, seed, args.extra_test) for r in (0, 1)]
            tests, extras = shared_aucs(test0, test1), shared_aucs(*extra)
            for r, n in ((0, n0), (1, n1)):
                rows.append({"seed": seed, "aggregator": agg, "round": r, "restarts": n, "test_auc": tests[r],
                             "test_slides": tests[2], "extra_test_auc": extras[r]})  # fmt: skip
    gains = {}
    for agg in args.aggregators:
        for key in ("test_auc", "extra_test_auc"):
            by = {(x["seed"], x["round"]): x[key] for x in rows if x["aggregator"] == agg}
            g = [by[s, 1] - by[s, 0] for s in args.seeds if by.get((s, 1)) is not None and by.get((s, 0)) is not None]
            gains[f"{agg}/{key}"] = gain_stats(f"{agg} {key}", g)
    return posthoc_result(args, rows, gains)


if __name__ == "__main__":
    main()
