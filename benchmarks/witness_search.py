# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The bag phase's witness search on a finished run's stored features: the search as the bag phase runs it (every
fraction of ``bag_phase#witness_search`` in one :class:`~monai_icmil.engines.WitnessSearch`, which searches fractions
that pick as many patches of every bag only once) against the baseline pattern, each fraction searched on its own
(what every fraction cost before). Both run side by side in this process on the same bags, alternating, and must give
the same candidates.

    python benchmarks/witness_search.py --run <output_dir> --data <dataset_dir> --round 0

``--run``: a bundle ``output_dir`` (or an ``icmil_gain.py`` run folder) with ``round_<r>/features``; ``--data``: its
dataset folder (``datalist.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai_icmil.engines.bag_phase import feature_stats  # noqa: E402
from monai_icmil.engines.witness_search import WitnessSearch, _count  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from icmil_gain import stored_bags  # noqa: E402  (the bags of a run's stored features, as icmil_gain reads them)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    run, datalist = Path(args.run), json.loads((Path(args.data) / "datalist.json").read_text())
    train, val = (stored_bags(run, args.round, datalist, split) for split in ("training", "validation"))
    stats = feature_stats(train)
    search = WitnessSearch()
    times: dict[str, list[float]] = {"ours": [], "each fraction alone": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        ours = search.search(train, val, *stats)
        times["ours"].append(time.perf_counter() - t)
        t = time.perf_counter()
        alone = [WitnessSearch(fractions=(f,)).search(train, val, *stats).candidates[0] for f in search.fractions]
        times["each fraction alone"].append(time.perf_counter() - t)
    if ours.candidates != alone:
        raise AssertionError(f"the searches differ: {ours.candidates} vs {alone}")
    patches = [len(b["features"]) for b in train]
    result = {
        "command": " ".join(sys.argv),
        "torch_threads": torch.get_num_threads(),
        "train_bags": len(train),
        "val_bags": len(val),
        "patches_per_bag_median": float(np.median(patches)),
        "fractions": search.fractions,
        # fractions that pick different numbers of patches of some bag: the searches ours runs
        "fractions_searched": len(
            {tuple(_count(len(b["features"]), f) for b in train + val) for f in search.fractions}
        ),
        "seconds": {k: min(v) for k, v in times.items()},
        "candidates": ours.candidates,
    }
    result["ratio"] = result["seconds"]["each fraction alone"] / result["seconds"]["ours"]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
