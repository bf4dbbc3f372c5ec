# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""One small ICMIL run (round 0 + one coupled round) that can SIGKILL itself at a deterministic point.

``--kill embed:N`` dies while the N-th slide's features are written, ``--kill bag_phase:N`` at the N-th bag of the
bag phase, ``--kill embedder_phase:N`` at the N-th embedder-phase iteration; without ``--kill`` it runs to the end. The
crash tests run it once with a kill point, then again without, and compare with an uninterrupted run.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal

import torch

import monai_icmil.data.store as store
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines import BagPhase, BagPhaseTrainer, Embed, EmbedderPhase, EmbedderPhaseTrainer
from monai_icmil.networks import ABMIL
from monai_icmil.workflows import ICMILWorkflow


def settings() -> dict:
    """A small run's components, as train.json declares them."""
    adam = functools.partial(torch.optim.Adam, weight_decay=1e-4)
    return dict(
        tiling=TilingConfig(patch_size=32, mpp=1.0),
        embedder={"name": "resnet18_trunc", "input_size": 32},
        aggregator=functools.partial(ABMIL, hidden_dim=32, dropout=0.25),
        embed=Embed(batch_size=64, num_workers=0, progress=False),
        bag_phase=BagPhase(
            optimizer=functools.partial(adam, lr=2e-4),
            lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=4),
            epochs=4,
            early_stop_patience=None,
            device="cpu",
            progress=False,
        ),
        embedder_phase=EmbedderPhase(
            optimizer=functools.partial(adam, lr=1e-4),
            epochs=2,
            batches_per_epoch=4,
            batch_size=8,
            val_interval=2,
            val_patches=16,
            num_workers=1,
            read_threads=1,
            select="last",  # the final student, so that every iteration after the kill point counts
            device="cpu",
            progress=False,
        ),
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
            "bag_phase": (BagPhaseTrainer, "_iteration"),
            "embedder_phase": (EmbedderPhaseTrainer, "_iteration"),
        }
        _die_at(*target[phase], int(n))
    ICMILWorkflow(dataset_dir=args.data, output_dir=args.out, **settings()).run()
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
