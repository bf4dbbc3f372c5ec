# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""One small ICMIL run (round 0 + one coupled round) that can SIGKILL itself at a deterministic point.

``--kill prepare:N`` dies while the N-th slide's coordinates are written, ``--kill embed:N`` while the N-th slide's
features are written, ``--kill bag_phase:N`` at the N-th bag of the bag phase, ``--kill embedder_phase:N`` at the N-th
embedder-phase iteration; without ``--kill`` it runs to the end. ``--only prepare`` stops after tiling. ``--infer DIR``
scores every slide of the datalist with the trained run in ``--out`` into ``DIR``, with every inference writer
(``--kill`` points there: ``prepare``, ``embed`` and ``write:N``, the N-th call of a writer's ``write`` or
``finish``). The crash tests run it once with a kill point, then again without, and compare with an uninterrupted run.
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
from monai_icmil.data.datalist import load_datalist
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines import BagPhase, BagPhaseTrainer, Embed, EmbedderPhase, EmbedderPhaseTrainer
from monai_icmil.handlers import GeoJSONWriter, HeatmapWriter, TopPatchesWriter, TriageSheetWriter
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


WRITERS = (HeatmapWriter, GeoJSONWriter, TopPatchesWriter, TriageSheetWriter)


def _die_at(targets: list[tuple[object, str]], n: int) -> None:
    """SIGKILL this process at the ``n``-th call of any of ``targets`` (counted together)."""
    calls = {"n": 0}

    def wrap(real):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return wrapper

    for owner, name in targets:
        setattr(owner, name, wrap(getattr(owner, name)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill", default=None)
    parser.add_argument("--infer", default=None)
    parser.add_argument("--only", choices=["prepare"], default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.kill:
        phase, n = args.kill.split(":")
        target = {
            "prepare": [(store.CoordsStore, "save")],
            "embed": [(store.FeatureStore, "save")],
            "bag_phase": [(BagPhaseTrainer, "_iteration")],
            "embedder_phase": [(EmbedderPhaseTrainer, "_iteration")],
            "write": [(w, "write") for w in WRITERS] + [(w, "finish") for w in WRITERS],
        }
        _die_at(target[phase], int(n))
    workflow = ICMILWorkflow(dataset_dir=args.data, output_dir=args.out, **settings())
    if args.infer:
        slides = [e for split in load_datalist(os.path.join(args.data, "datalist.json")).values() for e in split]
        workflow.initialize().infer(slides, args.infer, writers=[w() for w in WRITERS])
    elif args.only == "prepare":
        workflow.initialize().prepare()
    else:
        workflow.run()
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
