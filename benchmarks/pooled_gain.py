"""Round 1 minus round 0 of ``icmil_gain.py`` runs on their test and extra test slides pooled into one test set.

``--extra_test N`` scores each round's kept classifier on N more slides of the same generator; the run's own test
slides are scored by the same classifier (``round_<r>/test/predictions.csv``). This script pools both into one AUC per
round and reports, per seed and aggregator, the pooled gain with its DeLong paired standard error, the gains on the two
sets separately, and the mean and sd of each gain over the seeds (``met``: the mean above the sd). Each gain is paired:
on the slides both rounds scored. It trains nothing and reads only what ``icmil_gain.py`` stored.

    python benchmarks/pooled_gain.py --out /work/gain_runs/quilted --setting quilted --variant nt1000 \
        --seeds 6 7 8 --json benchmarks/gain_results/d13_pooled.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import monai_icmil  # noqa: E402,F401  (quiet cuCIM import first)
from monai_icmil.metrics import binary_auc, paired_auc_difference  # noqa: E402
from monai_icmil.workflows.summary import read_test_probabilities  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from icmil_gain import extra_scores_path, gain_stats, posthoc_parser, posthoc_result, run_path  # noqa: E402

SETS = ("test", "extra", "pooled")


def round_scores(run: Path, r: int, seed: int, extra_test: int | None = None) -> dict[str, tuple[int, float]]:
    """Round ``r``'s kept classifier on the run's test and extra test slides: ``{"test/<slide>" or "extra/<slide>":
    (label, probability)}`` (the two sets name their slides alike).

    Raises:
        FileNotFoundError: when the round's test predictions or the extra slides' scores are missing (names the run).
    """
    test = read_test_probabilities(run, r)
    found = extra_scores_path(run, seed, extra_test)
    if not test or found is None:
        raise FileNotFoundError(f"{run}: round {r} has no test predictions.csv or no extra_test scores.json")
    s = json.loads(found.read_text())[str(r)]
    extra = {f"extra/{k}": (int(y), float(p)) for k, y, p in zip(s["slide_ids"], s["labels"], s["kept"])}
    return {**{f"test/{k}": v for k, v in test.items()}, **extra}


def seed_rows(run: Path, seed: int, extra_test: int | None = None) -> dict[str, dict[str, float]]:
    """Per set (test, extra, pooled), round 0's and round 1's AUC and round 1 minus round 0 with its DeLong paired se,
    on the slides both rounds scored (``n``; a slide that failed to read in one round is left out of both)."""
    before, after = round_scores(run, 0, seed, extra_test), round_scores(run, 1, seed, extra_test)
    rows = {}
    for name in SETS:
        shared = sorted(k for k in set(before) & set(after) if name == "pooled" or k.startswith(f"{name}/"))
        y = np.array([before[k][0] for k in shared])
        p0, p1 = np.array([before[k][1] for k in shared]), np.array([after[k][1] for k in shared])
        d = paired_auc_difference(p0, p1, y)
        rows[name] = {"n": len(shared), "round0": binary_auc(p0, y), "round1": binary_auc(p1, y),
                      "gain": d["diff"], "se": d["se"]}  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = posthoc_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    rows = []
    for seed in args.seeds:
        for agg in args.aggregators:
            run = run_path(args.out, args.setting, seed, args.start, agg, args.variant)
            rows.append({"seed": seed, "aggregator": agg, **seed_rows(run, seed, args.extra_test)})
            print(f"seed {seed} {agg}: " + "  ".join(
                f"{k} {rows[-1][k]['round0']:.3f}->{rows[-1][k]['round1']:.3f} ({rows[-1][k]['gain']:+.3f} se "
                f"{rows[-1][k]['se']:.3f})" for k in SETS))  # fmt: skip
    gains = {}
    for agg in args.aggregators:
        for name in SETS:
            g = gain_stats(f"{agg} {name}", [row[name]["gain"] for row in rows if row["aggregator"] == agg])
            gains[f"{agg}/{name}"] = {**g, "met": bool(g["mean"] > g["sd"])}
    return posthoc_result(args, rows, gains)


if __name__ == "__main__":
    main()
