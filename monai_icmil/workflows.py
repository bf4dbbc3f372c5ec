# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The ICMIL loop as one workflow object, instantiated by the bundle's ``configs/train.json``.

Round 0 embeds every slide with the starting (frozen) embedder and trains the bag classifier. Each round ``r >= 1``
couples: the embedder phase fine-tunes round ``r-1``'s embedder with round ``r-1``'s bag classifier as teacher,
the tuned embedder re-embeds every slide (the fingerprint changed, so no stale feature is reused), and a new bag
classifier is trained. Every round keeps its artifacts under ``output_dir/round_<r>/``::

    round_<r>/embedder_phase/embedder.safetensors   the round's embedder (r >= 1)
    round_<r>/features/<slide>.safetensors           its features
    round_<r>/bag/bag_classifier.pt                  the round's bag classifier, predictions, history
    round_<r>/test/                                  test predictions, ROC curve, metrics

``output_dir/state.json`` records each finished phase, so rerunning the same command after an interruption
continues at the first unfinished phase of the first unfinished round. MLflow (SQLite in ``output_dir`` by
default) gets one parent run, a nested run per round and one per phase.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_icmil.data.datalist import SPLITS, load_datalist
from monai_icmil.data.prepare import SlideTiles, prepare_coords
from monai_icmil.data.report import RunReport
from monai_icmil.data.store import BagDataset, CoordsStore, FeatureStore, feature_key
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.networks.aggregators import create_aggregator
from monai_icmil.networks.embedders import PatchEmbedder, create_embedder
from monai_icmil.utils import atomic_write_json, atomic_write_text

__all__ = ["ICMILWorkflow", "check_cli_overrides"]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import ignite.distributed as idist

        # ignite sets up its distributed context with a collective call the first time it is asked; doing it here,
        # on every rank at once, keeps the rank-0-only bag phase from waiting on the other ranks
        idist.get_rank()
        dist.barrier()


logger = logging.getLogger("monai_icmil.workflow")


class ICMILWorkflow:
    """Rounds of embed -> bag phase -> embedder phase, resumable, tracked in MLflow.

    Args:
        dataset_dir: data root of the datalist's relative paths.
        output_dir: where every round's artifacts, ``state.json``, ``summary.md`` and ``mlruns.db`` go.
        datalist: the datalist file (relative to ``dataset_dir`` unless absolute).
        num_rounds: coupled rounds after round 0 (``num_rounds=2`` trains three bag classifiers).
        round_patience: stop early after this many rounds without a better validation AUC.
        tiling: :class:`~monai_icmil.data.tiling.TilingConfig` fields.
        embedder: ``create_embedder`` arguments of the starting embedder (``name``, ``weights``, ``input_size``).
        aggregator: ``"maxpool"``, ``"abmil"``, ``"dtfd"``, ``"mean"`` or ``"transformer"``.
        aggregator_kwargs: its extra arguments (``hidden_dim``, ``num_groups``, ...).
        embed: embedding settings (``batch_size``, ``num_workers``, ``read_threads``, ``prefetch_threads``,
            ``copy_stream``, ``dtype``; see :func:`~monai_icmil.engines.embedding.embed_slides`).
        bag: bag-phase settings (``train_bag_classifier`` arguments).
        couple: embedder-phase settings (``finetune_embedder`` arguments).
        num_classes: number of slide classes.
        class_names: names of the classes (CSV headers).
        val_fraction: fraction of training slides held out when the datalist has no validation split.
        seed: one seed for tiling order, sampling, augmentation and initialisation.
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available).
        mlflow: ``{"enabled": True, "tracking_uri": None, "experiment_name": "icmil", "run_name": "icmil"}``.
        synthetic: when given and the datalist is missing, generate a synthetic dataset into ``dataset_dir`` with
            these :func:`~monai_icmil.data.synthetic.make_dataset` arguments (the demo).
        on_slide_error: ``"skip"`` (record in ``report.json`` and go on) or ``"raise"``.
        min_slides: stop with a clear error when fewer usable training slides remain.
        backend: slide backend.
        progress: progress bars.
        allow_outside_root: allow datalist paths outside ``dataset_dir``.
        stain_normalize: Macenko-normalise every patch with its slide's stains (embedding, embedder phase,
            inference); off by default.
        pretrain: when given, round 0's embedder is the starting embedder after self-supervised pre-training (SimCLR)
            on the training slides' tissue patches, with these :func:`~monai_icmil.engines.pretrain
            .pretrain_embedder` arguments (``configs/pretrain.json``); kept in ``output_dir/pretrain/``.
        tiling_qc: a QC image per slide in ``output_dir/coords/qc/<slide>.jpg`` (thumbnail, patches' area tinted and
            outlined), to check tissue detection and the grid at a glance.
    """

    def __init__(
        self,
        dataset_dir: str,
        output_dir: str,
        datalist: str = "datalist.json",
        num_rounds: int = 1,
        round_patience: int = 1,
        tiling: Mapping[str, Any] | None = None,
        embedder: Mapping[str, Any] | None = None,
        aggregator: str = "abmil",
        aggregator_kwargs: Mapping[str, Any] | None = None,
        embed: Mapping[str, Any] | None = None,
        bag: Mapping[str, Any] | None = None,
        couple: Mapping[str, Any] | None = None,
        num_classes: int = 2,
        class_names: Sequence[str] | None = None,
        val_fraction: float = 0.25,
        seed: int = 0,
        device: str | None = None,
        mlflow: Mapping[str, Any] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        on_slide_error: str = "skip",
        min_slides: int = 2,
        backend: str = "auto",
        progress: bool = True,
        allow_outside_root: bool = False,
        stain_normalize: bool = False,
        pretrain: Mapping[str, Any] | None = None,
        tiling_qc: bool = True,
    ):
        self.dataset_dir = Path(dataset_dir)
        self.output_dir = Path(output_dir)
        self.datalist_path = Path(datalist) if Path(datalist).is_absolute() else self.dataset_dir / datalist
        self.num_rounds, self.round_patience = int(num_rounds), int(round_patience)
        self.tiling = TilingConfig(**dict(tiling or {}))
        self.embedder_cfg = {"name": "resnet50_trunc", **dict(embedder or {})}
        self.aggregator = aggregator
        self.aggregator_kwargs = dict(aggregator_kwargs or {})
        from monai_icmil.engines.embedding import embed_settings

        self.embed_cfg = embed_settings(embed)
        self.bag_cfg = dict(bag or {})
        self.couple_cfg = dict(couple or {})
        self.num_classes, self.class_names = int(num_classes), list(class_names) if class_names else None
        self.val_fraction, self.seed = float(val_fraction), int(seed)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.mlflow_cfg = {
            "enabled": True,
            "tracking_uri": None,
            "experiment_name": "icmil",
            "run_name": "icmil",
            **dict(mlflow or {}),
        }
        self.synthetic = dict(synthetic) if synthetic else None
        if on_slide_error not in ("skip", "raise"):
            raise ValueError(f"on_slide_error must be 'skip' or 'raise', got {on_slide_error!r}")
        self.on_slide_error, self.min_slides = on_slide_error, int(min_slides)
        self.backend, self.progress, self.allow_outside_root = backend, progress, allow_outside_root
        self.stain_normalize = bool(stain_normalize)
        self.pretrain_cfg = dict(pretrain) if pretrain is not None else None
        self.tiling_qc = bool(tiling_qc)
        # checks that must fail before any heavy work
        create_aggregator(self.aggregator, 8, self.num_classes, **self.aggregator_kwargs)
        if self.synthetic is None and not self.dataset_dir.is_dir():
            raise FileNotFoundError(
                f"dataset_dir '{self.dataset_dir}' does not exist. Set `dataset_dir` to the folder holding the slides "
                "and the datalist (or add configs/demo.json to generate a synthetic dataset there)."
            )
        if self.num_rounds < 0:
            raise ValueError(f"num_rounds must be >= 0, got {num_rounds}")
        self._items: dict[str, list[dict[str, Any]]] | None = None
        self._slides: dict[str, SlideTiles] | None = None
        self._parent_run: Any = None
        self._pretrain_record: dict[str, Any] | None = None
        self.report = RunReport(self.output_dir / "report.json")

    # ------------------------------------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.output_dir / "state.json"

    def _state(self) -> dict[str, Any]:
        if self.state_path.is_file():
            return json.loads(self.state_path.read_text())
        return {"rounds": {}}

    def _done(self, r: int, phase: str) -> dict[str, Any] | None:
        return self._state()["rounds"].get(str(r), {}).get(phase)

    def _mark(self, r: int | None, phase: str, record: Mapping[str, Any]) -> None:
        """Record a finished phase of round ``r`` (``None``: a phase before the rounds, e.g. pre-training)."""
        state = self._state()
        if r is None:
            state[phase] = dict(record)
        else:
            state["rounds"].setdefault(str(r), {})[phase] = dict(record)
        atomic_write_json(self.state_path, state)

    def round_dir(self, r: int) -> Path:
        return self.output_dir / f"round_{r}"

    # ------------------------------------------------------------------------------------------------ data
    def items(self) -> dict[str, list[dict[str, Any]]]:
        """The datalist by split (validated); generates the synthetic dataset first when configured."""
        if self._items is not None:
            return self._items
        if self.synthetic is not None:
            from monai_icmil.data.synthetic import make_dataset

            if _rank() == 0 and not self.datalist_path.is_file():  # one rank writes it; every rank waits here
                logger.info("generating the synthetic dataset into %s", self.dataset_dir)
                made = make_dataset(self.dataset_dir, progress=self.progress, **self.synthetic)
                if made.resolve() != self.datalist_path.resolve():
                    raise FileNotFoundError(f"the synthetic datalist is {made}, but `datalist` is {self.datalist_path}")
            _barrier()
        if not self.datalist_path.is_file():
            raise FileNotFoundError(
                f"datalist '{self.datalist_path}' does not exist (set `datalist` or `dataset_dir`)."
            )
        items = load_datalist(
            self.datalist_path,
            self.dataset_dir,
            labels=None,
            check_files=False,
            require_labels=("training", "validation"),
            allow_outside_root=self.allow_outside_root,
        )
        if not items.get("validation"):
            items = self._make_validation_split(items)
        self._items = items
        return items

    def _make_validation_split(self, items: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        split_file = self.output_dir / "validation_split.json"
        train = items["training"]
        if split_file.is_file():
            val_ids = set(json.loads(split_file.read_text())["validation"])
        else:
            rng = np.random.default_rng(self.seed)
            val_ids = set()
            for label in sorted({e["label"] for e in train}):
                ids = [e["slide_id"] for e in train if e["label"] == label]
                k = max(1, int(round(len(ids) * self.val_fraction))) if len(ids) > 1 else 0
                val_ids.update(rng.choice(ids, k, replace=False).tolist() if k else [])
            atomic_write_json(
                split_file, {"validation": sorted(val_ids), "seed": self.seed, "val_fraction": self.val_fraction}
            )
        warnings.warn(
            f"the datalist has no validation split: {len(val_ids)} training slides were held out (stratified, seed "
            f"{self.seed}); the split is recorded in {split_file}.",
            stacklevel=2,
        )
        return {
            **items,
            "training": [e for e in train if e["slide_id"] not in val_ids],
            "validation": [e for e in train if e["slide_id"] in val_ids],
        }

    def all_items(self) -> list[dict[str, Any]]:
        return [e for split in SPLITS for e in self.items().get(split, [])]

    def prepare(self) -> dict[str, SlideTiles]:
        """Tissue masks and patch coordinates of every slide (kept in ``output_dir/coords``)."""
        if self._slides is None:
            if _rank() != 0:
                _barrier()  # rank 0 tiles first; the others then load the same coordinates from the store
            self._slides = prepare_coords(
                self.all_items(),
                self.tiling,
                CoordsStore(self.output_dir / "coords"),
                report=self.report,
                on_slide_error=self.on_slide_error,
                backend=self.backend,
                progress=self.progress,
                qc_dir=self.output_dir / "coords" / "qc" if self.tiling_qc else None,
            )
            if _rank() == 0:
                _barrier()
            usable = [
                e
                for e in self.items()["training"]
                if e["slide_id"] in self._slides and len(self._slides[e["slide_id"]]["coords"]) > 0
            ]
            excluded = len(self.report.excluded())
            if excluded:
                warnings.warn(
                    f"{excluded} slide(s) failed or have no tissue; they are left out (see " f"{self.report.path}).",
                    stacklevel=2,
                )
            if len(usable) < self.min_slides:
                raise RuntimeError(
                    f"only {len(usable)} usable training slide(s) remain (min_slides={self.min_slides}); see "
                    f"{self.report.path} for the slides that failed."
                )
        return self._slides

    def _split_slides(self, split: str) -> list[SlideTiles]:
        slides = self.prepare()
        return [slides[e["slide_id"]] for e in self.items().get(split, []) if e["slide_id"] in slides]

    # ------------------------------------------------------------------------------------------------ models
    def embedder_for(self, r: int) -> PatchEmbedder:
        """Round ``r``'s embedder: the starting one for round 0, the embedder phase's output after."""
        if r == 0 and self.pretrain_cfg is not None:
            self.pretrain()
            return create_embedder(None, weights=self.pretrain_path)
        if r == 0:
            return self.starting_embedder()
        path = self.round_dir(r) / "embedder_phase" / "embedder.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"round {r}'s embedder is missing ({path}); run its embedder phase first.")
        return create_embedder(None, weights=path)

    def starting_embedder(self) -> PatchEmbedder:
        """The configured ``embedder`` (random init, or the weights it names), before any pre-training."""
        cfg = dict(self.embedder_cfg)
        name = cfg.pop("name")
        torch.manual_seed(self.seed)  # a random-init starting embedder is the same in every run
        return create_embedder(name, **cfg)

    @property
    def pretrain_path(self) -> Path:
        return self.output_dir / "pretrain" / "embedder.safetensors"

    def pretrain(self) -> dict[str, Any]:
        """Self-supervised pre-training of the starting embedder (SimCLR) on the training slides' tissue patches;
        its output is round 0's embedder. Runs once (recorded in ``state.json``), on rank 0 while the others wait."""
        if self._pretrain_record is not None:
            return self._pretrain_record
        done = self._state().get("pretrain") is not None and self.pretrain_path.is_file()
        if _rank() == 0 and not done:
            self._run_pretrain()
        _barrier()  # every rank passes here once, whether or not there was work
        self._pretrain_record = self._state().get("pretrain", {})
        return self._pretrain_record

    def _run_pretrain(self) -> None:
        from monai_icmil.engines.pretrain import pretrain_embedder

        run = self._nested("pretrain")
        t0 = time.perf_counter()
        result = pretrain_embedder(
            self.starting_embedder(),
            self._usable("training"),
            self.output_dir / "pretrain",
            **self._patch_phase_kwargs(run, self.seed + 7),
            **(self.pretrain_cfg or {}),
        )
        record = {
            "seconds": time.perf_counter() - t0,
            "fingerprint": result["fingerprint"],
            "final_loss": result["history"][-1]["loss"] if result["history"] else None,
        }
        self._end(run)
        self._mark(None, "pretrain", record)

    def _patch_phase_kwargs(self, run: Any, seed: int) -> dict[str, Any]:
        """What the phases that sample patches from the slides (pre-training, embedder phase) share."""
        return {
            "device": self.device,
            "seed": seed,
            "mlflow_run": run,
            "progress": self.progress,
            "backend": self.backend,
            "stain_normalize": self.stain_normalize,
        }

    def _usable(self, split: str) -> list[SlideTiles]:
        """The split's prepared slides, less those that failed or have no tissue."""
        excluded = self.report.excluded()
        return [s for s in self._split_slides(split) if s["slide_id"] not in excluded]

    def bag_classifier_path(self, r: int) -> Path:
        return self.round_dir(r) / "bag" / "bag_classifier.pt"

    def _keys(self, r: int, embedder: PatchEmbedder) -> dict[str, dict[str, Any]]:
        fp = embedder.fingerprint()
        return {
            sid: feature_key(s["image"], self.tiling.params(), fp, self.embed_cfg["dtype"], self.stain_normalize)
            for sid, s in self.prepare().items()
        }

    def bags(self, r: int, split: str, embedder: PatchEmbedder | None = None, **kwargs: Any) -> BagDataset:
        embedder = embedder or self.embedder_for(r)
        keys = self._keys(r, embedder)
        items = [
            e
            for e in self.items().get(split, [])
            if e["slide_id"] in keys and e["slide_id"] not in self.report.excluded()
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # empty bags are already reported once
            return BagDataset(FeatureStore(self.round_dir(r) / "features"), items, keys, **kwargs)

    # ------------------------------------------------------------------------------------------------ mlflow
    def _tracking(self) -> Any:
        if not self.mlflow_cfg.get("enabled", True) or _rank() != 0:  # MLflow logs from rank 0 only
            return None
        if self._parent_run is None:
            from monai_icmil.handlers.tracking import sqlite_tracking_uri, start_run

            uri = self.mlflow_cfg.get("tracking_uri") or sqlite_tracking_uri(self.output_dir)
            self._parent_run = start_run(uri, self.mlflow_cfg["experiment_name"], self.mlflow_cfg["run_name"])
            self._parent_run.log_params(self.params())
        return self._parent_run

    def _nested(self, name: str, parent: Any = None) -> Any:
        top = self._tracking()
        if top is None:
            return None
        from monai_icmil.handlers.tracking import start_run

        parent = parent or top
        return start_run(top.tracking_uri, top.experiment_name, name, parent=parent)

    def _round_run(self, r: int) -> Any:
        return self._nested(f"round_{r}")

    def _phase_run(self, r: int, phase: str) -> Any:
        rr = self._round_run(r)
        return None if rr is None else self._nested(f"round_{r}/{phase}", parent=rr)

    def _end(self, run: Any) -> None:
        if run is not None:
            from monai_icmil.handlers.tracking import end_run

            end_run(run)

    def params(self) -> dict[str, Any]:
        return {
            "dataset_dir": str(self.dataset_dir),
            "num_rounds": self.num_rounds,
            "aggregator": self.aggregator,
            "aggregator_kwargs": self.aggregator_kwargs,
            "tiling": self.tiling.params(),
            "embedder": self.embedder_cfg,
            "embed": self.embed_cfg,
            "bag": self.bag_cfg,
            "couple": self.couple_cfg,
            "seed": self.seed,
            "stain_normalize": self.stain_normalize,
            "pretrain": self.pretrain_cfg,
            "device": str(self.device),
            "num_classes": self.num_classes,
        }

    # ------------------------------------------------------------------------------------------------ phases
    def embed(self, r: int = 0) -> dict[str, Any]:
        """Embed every slide with round ``r``'s embedder into ``round_<r>/features``."""
        if (done := self._done(r, "embed")) is not None:
            return done
        if r >= 1:
            self.finetune_embedder(r)  # round r's embedder comes out of its embedder phase
        from monai_icmil.engines.embedding import embed_slides

        embedder = self.embedder_for(r)  # (round 0 with pre-training configured: pre-trains first, timed apart)
        run = self._phase_run(r, "embed")
        t0 = time.perf_counter()
        result = embed_slides(
            self.prepare(),
            embedder,
            FeatureStore(self.round_dir(r) / "features"),
            self.tiling.params(),
            **self.embed_cfg,
            device=self.device,
            report=self.report,
            backend=self.backend,
            progress=self.progress,
            meta={"round": r},
            stain_normalize=self.stain_normalize,
        )
        if self.on_slide_error == "raise" and result["failed"]:
            raise RuntimeError(f"embedding failed for slide(s) {result['failed']} (see {self.report.path})")
        record = {
            "seconds": time.perf_counter() - t0,
            "patches": result["patches"],
            "fingerprint": result["fingerprint"],
            "written": len(result["written"]),
            "skipped": len(result["skipped"]),
            "failed": result["failed"],
        }
        if run is not None:
            run.log_params({"embedder": embedder.name, "fingerprint": result["fingerprint"], "round": r})
            run.log_metrics(
                {
                    "patches": result["patches"],
                    "patches_per_s": result["patches_per_s"],
                    "steady_patches_per_s": result["steady_patches_per_s"],
                    "seconds": record["seconds"],
                    "failed_slides": len(result["failed"]),
                }
            )
            self._end(run)
        _barrier()  # under torchrun every rank embeds its share of the slides
        if _rank() == 0:
            self._mark(r, "embed", record)
        _barrier()
        return record

    def train_bag(self, r: int = 0) -> dict[str, Any]:
        """Train round ``r``'s bag classifier on its features (embeds first if needed) and test it."""
        if (done := self._done(r, "bag")) is not None:
            return done
        self.embed(r)
        if _rank() != 0:  # the bag phase runs on rank 0 (bags are small); the others wait
            _barrier()
            return self._done(r, "bag") or {}
        from monai_icmil.engines.bag import train_bag_classifier

        run = self._phase_run(r, "bag")
        t0 = time.perf_counter()
        embedder = self.embedder_for(r)
        cfg = dict(self.bag_cfg)
        train_ds = self.bags(r, "training", embedder)
        val_ds = self.bags(r, "validation", embedder)
        result = train_bag_classifier(
            train_ds,
            val_ds,
            self.aggregator,
            self.round_dir(r) / "bag",
            num_classes=self.num_classes,
            aggregator_kwargs=self.aggregator_kwargs,
            device=self.device,
            seed=self.seed + r,
            mlflow_run=run,
            progress=self.progress,
            class_names=self.class_names,
            **cfg,
        )
        record = {
            "seconds": time.perf_counter() - t0,
            "best_epoch": result["best_epoch"],
            "val": {k[4:]: v for k, v in result["val"].items() if k.startswith("val_")},
            "restart": result["restart"],
            "restarts_val": [r["best_metric"] for r in result["restarts"]],
        }
        self._end(run)
        self._mark(r, "bag", record)
        self.test(r)
        _barrier()
        return record

    def test(self, r: int = 0, split: str = "test") -> dict[str, Any]:
        """Metrics, predictions CSV and ROC curve of round ``r``'s bag classifier on ``split``."""
        if split == "test" and (done := self._done(r, "test")) is not None:
            return done
        from monai_icmil.engines.bag import evaluate_bags, load_bag_classifier, write_predictions_csv
        from monai_icmil.visualize import save_roc_curve

        out = self.round_dir(r) / split
        ds = self.bags(r, split)
        if len(ds) == 0:
            record = {"metrics": {}, "slides": 0}
        else:
            net = load_bag_classifier(self.bag_classifier_path(r), self.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                metrics, rows = evaluate_bags(net, ds, self.device)
            write_predictions_csv(out / "predictions.csv", rows, self.class_names)
            probs = np.array([row["probs"] for row in rows])
            labels = np.array([row["label"] for row in rows])
            if len(set(labels.tolist())) > 1:
                save_roc_curve(out / "roc.png", probs, labels, title=f"round {r}, {split}: {len(rows)} slides")
            atomic_write_json(out / "metrics.json", metrics)
            record = {"metrics": metrics, "slides": len(rows)}
        if split == "test":
            self._mark(r, "test", record)
            rr = self._round_run(r)
            if rr is not None:
                rr.log_metrics({f"test_{k}": v for k, v in record["metrics"].items()})
                rr.log_artifacts([out / "predictions.csv", out / "roc.png"], artifact_path="test")
        return record

    def finetune_embedder(self, r: int = 1) -> dict[str, Any]:
        """Round ``r``'s embedder phase: round ``r-1``'s bag classifier teaches round ``r-1``'s embedder."""
        if r < 1:
            raise ValueError("the embedder phase starts round 1 (it needs round 0's bag classifier as teacher)")
        if (done := self._done(r, "embedder_phase")) is not None:
            return done
        self.train_bag(r - 1)
        from monai_icmil.engines.bag import load_bag_classifier
        from monai_icmil.engines.couple import finetune_embedder

        run = self._phase_run(r, "embedder_phase")
        t0 = time.perf_counter()
        embedder = self.embedder_for(r - 1)
        teacher = load_bag_classifier(
            self.bag_classifier_path(r - 1), "cpu", expect_in_dim=embedder.out_dim, expect_aggregator=self.aggregator
        )
        result = finetune_embedder(
            embedder,
            teacher,
            self._usable("training"),
            self._usable("validation"),
            self.round_dir(r) / "embedder_phase",
            **self._patch_phase_kwargs(run, self.seed + 1000 * r),
            **self.couple_cfg,
        )
        record = {
            "seconds": time.perf_counter() - t0,
            "fingerprint": result["fingerprint"],
            "best_iteration": result["best_iteration"],
            "best": result["best"],
            "world_size": result["world_size"],
            "teacher_consistency": result["teacher_consistency"],
        }
        self._end(run)
        if _rank() == 0:  # under torchrun every rank trains (DDP); rank 0 records
            self._mark(r, "embedder_phase", record)
        _barrier()
        return record

    def run_round(self, r: int) -> dict[str, Any]:
        if r >= 1:
            self.finetune_embedder(r)
        self.embed(r)
        self.train_bag(r)
        state = self._state()["rounds"][str(r)]
        rr = self._round_run(r)
        if rr is not None:
            metrics = {"val_auc_after": state["bag"]["val"].get("auc")}
            if r >= 1:
                metrics["val_auc_before"] = self._state()["rounds"][str(r - 1)]["bag"]["val"].get("auc")
            rr.log_metrics(metrics)
            self._end(rr)
        return state

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """The whole ICMIL loop with the stopping rule; prints and saves ``summary.md``."""
        self.prepare()
        best_auc, stale = -math.inf, 0
        for r in range(self.num_rounds + 1):
            state = self.run_round(r)
            auc = state["bag"]["val"].get("auc", float("nan"))
            if auc is not None and not math.isnan(auc) and auc > best_auc + 1e-9:
                best_auc, stale = auc, 0
            elif r > 0:
                stale += 1
                if stale >= self.round_patience and r < self.num_rounds:
                    logger.info("validation AUC did not improve for %d round(s): stopping after round %d", stale, r)
                    break
        if _rank() != 0:
            return {}
        summary = self.summary()
        top = self._tracking()
        if top is not None:
            top.log_metrics(
                {
                    "final_round": summary["final_round"],
                    **{
                        f"final_{k}": v
                        for k, v in summary["rows"][summary["final_round"]].items()
                        if isinstance(v, (int, float))
                    },
                }
            )
            top.log_metrics({"failed_slides": len(self.report.failed), "empty_slides": len(self.report.empty)})
            top.log_artifacts([self.output_dir / "summary.md", self.output_dir / "report.json"])
            qc = self.output_dir / "coords" / "qc"
            top.log_artifacts([qc / "tiling.csv"], artifact_path="qc")
            top.log_artifacts([qc / "overview"], artifact_path="qc/overview")  # the contact sheets, viewable in MLflow
            self._end(top)
        return summary

    def final_round(self) -> int:
        """The finished round with the best validation AUC (the model :meth:`infer` uses)."""
        rounds = {int(r): s for r, s in self._state()["rounds"].items() if "bag" in s}
        if not rounds:
            raise FileNotFoundError(f"no finished round in {self.output_dir}; run the training first.")

        def score(r: int) -> float:
            auc = rounds[r]["bag"]["val"].get("auc")
            return -math.inf if auc is None or math.isnan(auc) else auc

        return max(sorted(rounds), key=score)

    def summary(self) -> dict[str, Any]:
        """Round, val AUC, test AUC/accuracy/F1 and time per phase, as ``summary.md`` (printed) and a dict."""
        state = self._state()["rounds"]
        rows = []
        for r in sorted(state, key=int):
            s = state[r]
            test = s.get("test", {}).get("metrics", {})
            rows.append(
                {
                    "round": int(r),
                    "val_auc": s.get("bag", {}).get("val", {}).get("auc"),
                    "test_auc": test.get("auc"),
                    "test_auc_ci": [test.get("auc_ci_low"), test.get("auc_ci_high")],
                    "test_slides": s.get("test", {}).get("slides"),
                    "test_acc": test.get("acc"),
                    "test_f1": test.get("f1"),
                    "embedder_phase_s": s.get("embedder_phase", {}).get("seconds"),
                    "embed_s": s.get("embed", {}).get("seconds"),
                    "bag_s": s.get("bag", {}).get("seconds"),
                }
            )
        final = self.final_round()

        def fmt(v: Any, digits: int = 3) -> str:
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"

        def ci(bounds: list[Any]) -> str:
            if any(v is None or math.isnan(v) for v in bounds):
                return ""
            return f" ({bounds[0]:.2f}-{bounds[1]:.2f})"

        lines = [
            f"# ICMIL summary ({self.aggregator}, {self.embedder_cfg['name']})",
            "",
            "| round | val AUC | test AUC | test acc | test F1 | embedder phase (s) | embed (s) | bag phase (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in rows:
            lines.append(
                f"| {row['round']}{' (final)' if row['round'] == final else ''} | {fmt(row['val_auc'])} | "
                f"{fmt(row['test_auc'])}{ci(row['test_auc_ci'])} | {fmt(row['test_acc'])} | {fmt(row['test_f1'])} | "
                f"{fmt(row['embedder_phase_s'], 1)} | {fmt(row['embed_s'], 1)} | {fmt(row['bag_s'], 1)} |"
            )
        if any(ci(row["test_auc_ci"]) for row in rows):
            n_test = max(row["test_slides"] or 0 for row in rows)
            lines += ["", f"Test AUC with its 95 % DeLong confidence interval, over {n_test} test slides."]
        excluded = self.report.excluded()
        if excluded:
            lines += ["", f"{len(excluded)} slide(s) left out (failed or no tissue): {', '.join(sorted(excluded))}"]
        roc = Path(f"round_{final}") / "test" / "roc.png"
        if (self.output_dir / roc).is_file():
            lines += ["", f"![test ROC, round {final}]({roc.as_posix()})"]
        pages = sorted((self.output_dir / "coords" / "qc" / "overview").glob("page_*.jpg"))
        if pages:
            links = ", ".join(f"[{p.stem}]({p.relative_to(self.output_dir).as_posix()})" for p in pages)
            lines += ["", f"Tiling QC of every slide: {links} (per slide: `coords/qc/tiling.csv`)."]
        text = "\n".join(lines) + "\n"
        atomic_write_text(self.output_dir / "summary.md", text)
        atomic_write_json(self.output_dir / "summary.json", {"rows": rows, "final_round": final})
        print(text)
        return {"rows": {row["round"]: row for row in rows}, "final_round": final, "markdown": text}

    # ------------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "test", round: int | None = None) -> dict[str, Any]:
        """Metrics, predictions CSV and ROC curve of the final (or given) round on ``split``."""
        r = self.final_round() if round is None else int(round)
        record = self.test(r, split) if split != "test" else self._evaluate_test(r)
        print(json.dumps({"round": r, "split": split, **record}, indent=2, default=str))
        return {"round": r, **record}

    def _evaluate_test(self, r: int) -> dict[str, Any]:
        state = self._state()
        state["rounds"].get(str(r), {}).pop("test", None)
        atomic_write_json(self.state_path, state)
        return self.test(r, "test")

    def infer(
        self,
        slides: str | Sequence[str],
        output_dir: str | None = None,
        round: int | None = None,
        heatmaps: bool = True,
    ) -> list[dict[str, Any]]:
        """Predict new slides: probabilities CSV, heatmaps (attention, instance probability) and GeoJSON.

        Args:
            slides: a folder (every ``.svs``/``.tif``/``.tiff``/``.ndpi``/``.mrxs`` in it) or a list of paths.
            output_dir: where to write (default ``output_dir/inference``).
            round: the round whose models to use (default: the best by validation AUC).
            heatmaps: write the PNG heatmaps and GeoJSON files.
        """
        from monai_icmil.inference import predict_slides

        r = self.final_round() if round is None else int(round)
        return predict_slides(
            slides,
            self.embedder_for(r),
            self.bag_classifier_path(r),
            self.tiling,
            Path(output_dir) if output_dir else self.output_dir / "inference",
            device=self.device,
            embed_cfg=self.embed_cfg,
            backend=self.backend,
            class_names=self.class_names,
            heatmaps=heatmaps,
            progress=self.progress,
            stain_normalize=self.stain_normalize,
        )


# ---------------------------------------------------------------------------------------------------- CLI checks

_BUNDLE_ARGS = {
    "config_file",
    "meta_file",
    "logging_file",
    "args_file",
    "run_id",
    "init_id",
    "final_id",
    "tracking",
    "workflow_name",
    "workflow_type",
    "properties_path",
}


def check_cli_overrides(argv: Sequence[str] | None = None, config_ids: Sequence[str] | None = None) -> list[str]:
    """Refuse ``--id value`` overrides of ids that no config file defines (a typo would otherwise be ignored).

    Reads the ``python -m monai.bundle run ...`` command line. Returns the checked override ids.

    Raises:
        ValueError: naming the unknown id(s) and the known top-level ids.
    """
    if argv is None:
        if Path(sys.argv[0]).parts[-2:] != ("bundle", "__main__.py"):
            return []  # not the `python -m monai.bundle` command line (e.g. the API called in-process)
        argv = sys.argv[1:]
    argv = list(argv)
    overrides, files = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0]
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if key == "config_file":
                files = _parse_files(value)
            elif key not in _BUNDLE_ARGS:
                overrides.append(key)
            i += 1 if "=" in arg else 2
        else:
            i += 1
    if config_ids is None:
        config_ids = set()
        for f in files:
            if Path(f).is_file():
                config_ids |= set(json.loads(Path(f).read_text()))
    known = set(config_ids)
    unknown = [o for o in overrides if o.replace("::", "#").split("#")[0] not in known]
    if unknown and known:
        raise ValueError(
            f"override(s) of unknown id(s): {', '.join('--' + u for u in unknown)}. Known top-level ids: "
            f"{', '.join(sorted(known))}."
        )
    return overrides


def _parse_files(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            return [str(v) for v in json.loads(value.replace("'", '"'))]
        except ValueError:
            return [v.strip(" '\"") for v in value.strip("[]").split(",")]
    return [value]
