# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""One small ICMIL run (round 0 + one coupled round) that can SIGKILL itself at a deterministic point.

``--kill embed:N`` dies while the N-th slide's features are written, ``--kill bag:N`` at the N-th bag of the bag
phase, ``--kill couple:N`` at the N-th embedder-phase iteration; without ``--kill`` it runs to the end. The crash
tests run it once with a kill point, then again without, and compare with an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal

import monai_icmil.data.store as store
import monai_icmil.engines.bag as bag
import monai_icmil.engines.couple as couple
from monai_icmil.workflows import ICMILWorkflow

SETTINGS = dict(
    tiling={"patch_size": 32, "mpp": 1.0},
    embedder={"name": "resnet18_trunc", "input_size": 32},
    aggregator_kwargs={"hidden_dim": 32, "dropout": 0.25},
    embed={"batch_size": 64, "num_workers": 0},
    bag={"epochs": 4, "early_stop_patience": None},
    couple={
        "epochs": 2,
        "batches_per_epoch": 4,
        "batch_size": 8,
        "val_interval": 2,
        "val_patches": 16,
        "num_workers": 1,
        "read_threads": 1,
        "lr": 1e-4,
        "select": "last",  # the final student, so that every iteration after the kill point counts
    },
    num_rounds=1,
    round_patience=2,
    progress=False,
    mlflow={"enabled": False},
    device="cpu",
    seed=5,
)


def _die_at(module: object, name: str, n: int) -> None:
    real, calls = getattr(module, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.kill:
        phase, n = args.kill.split(":")
        target = {
            "embed": (store.FeatureStore, "save"),
            "bag": (bag, "bag_train_step"),
            "couple": (couple, "couple_step"),
        }
        _die_at(*target[phase], int(n))
    ICMILWorkflow(dataset_dir=args.data, output_dir=args.out, **SETTINGS).run()
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
