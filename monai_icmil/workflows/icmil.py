# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The ICMIL loop: a thin MONAI bundle workflow over configured phase components.

Round 0 embeds every slide with the starting (frozen) embedder and trains the bag classifier. Each round ``r >= 1``
couples: the embedder phase fine-tunes round ``r-1``'s embedder with round ``r-1``'s bag classifier as teacher,
the tuned embedder re-embeds every slide (the fingerprint changed, so no stale feature is reused), and a new bag
classifier is trained. Every round keeps its artifacts under ``output_dir/round_<r>/``::

    round_<r>/embedder_phase/embedder.safetensors   the round's embedder (r >= 1)
    round_<r>/features/<slide>.safetensors           its features (the embed phase's store)
    round_<r>/bag_phase/bag_classifier.pt            the round's bag classifier, predictions, history
    round_<r>/test/                                  test predictions, ROC curve, metrics

The phases are components the bundle declares (``configs/train.json``): the tiling transforms, the starting
embedder and the aggregator (factories), :class:`~monai_icmil.engines.Pretrain`, :class:`~monai_icmil.engines.Embed`,
:class:`~monai_icmil.engines.BagPhase` and :class:`~monai_icmil.engines.EmbedderPhase`. This workflow only orders
them, with :class:`~monai_icmil.workflows.ledger.PhaseLedger` (``state.json``: a rerun after an interruption continues
at the first unfinished phase), :class:`~monai_icmil.workflows.splits.DatasetSplits`, an
:class:`~monai_icmil.handlers.tracking.MLflowRunTree` (one parent run, a nested run per round and per phase) and
:func:`~monai_icmil.workflows.summary.write_summary`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import BundleWorkflow

from monai_icmil.data.datalist import SPLITS
from monai_icmil.data.datalist import class_names as datalist_class_names
from monai_icmil.data.integrity import TileErrorPolicy
from monai_icmil.data.prepare import SlideTiles, prepare_coords, slide_signature, tiling_signature
from monai_icmil.data.report import RunReport
from monai_icmil.data.slide import as_mpp
from monai_icmil.data.store import BagDataset, CoordsStore, FeatureStore, feature_key
from monai_icmil.data.tiling import TilingConfig
from monai_icmil.engines.bag_phase import BagPhase
from monai_icmil.engines.embed import Embed
from monai_icmil.engines.embedder_phase import EmbedderPhase
from monai_icmil.engines.pretrain import Pretrain
from monai_icmil.handlers.tracking import MLflowRunTree
from monai_icmil.metrics import positive_rank
from monai_icmil.networks.aggregators import MILAggregator, aggregator_factory, aggregator_name
from monai_icmil.networks.embedders import PatchEmbedder, create_embedder
from monai_icmil.utils import (
    as_bool,
    atomic_write_json,
    barrier,
    component_signature,
    default_device,
    dist_info,
    stable_hash,
    strict_json,
)
from monai_icmil.workflows.ledger import PhaseLedger
from monai_icmil.workflows.splits import DatasetSplits
from monai_icmil.workflows.summary import coupling_metrics, write_summary

__all__ = ["ICMILWorkflow"]

#: optimizer keywords that choose an implementation for the device (train.json sets ``fused`` on CUDA), not a result
_DEVICE_KEYWORDS = frozenset({"fused", "foreach", "capturable"})


def _device_neutral(signature: Any) -> Any:
    """``signature`` (a :func:`~monai_icmil.utils.component_signature`) without :data:`_DEVICE_KEYWORDS`, so that a
    run continued on another device keeps its finished phases."""
    if isinstance(signature, dict):
        return {k: _device_neutral(v) for k, v in signature.items() if k not in _DEVICE_KEYWORDS}
    if isinstance(signature, list):
        return [_device_neutral(v) for v in signature]
    return signature


logger = logging.getLogger("monai_icmil.workflow")


def _rank() -> int:
    return dist_info()[0]


def _ends_runs_on_error(method: Callable[..., Any]) -> Callable[..., Any]:
    """A workflow command (``run`` or a single phase, ``bag_phase#run``) that raises ends its open MLflow runs FAILED
    (KILLED on Ctrl-C), so none is left RUNNING; a rerun resumes them. Only the outermost command ends them."""

    @functools.wraps(method)
    def command(self: ICMILWorkflow, *args: Any, **kwargs: Any) -> Any:
        self._command_depth += 1
        try:
            return method(self, *args, **kwargs)
        except BaseException as error:
            if self._command_depth == 1:
                self.tracking.abandon("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            self._command_depth -= 1

    return command


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Raise a logger's level to WARNING for the duration."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


class ICMILWorkflow(BundleWorkflow):
    """Rounds of embed -> bag phase -> embedder phase over configured components, resumable, tracked in MLflow.

    Args:
        dataset_dir: data root of the datalist's relative paths.
        output_dir: where every round's artifacts, ``state.json``, ``summary.md`` and ``mlruns.db`` go.
        datalist: the datalist file (relative to ``dataset_dir`` unless absolute).
        num_rounds: coupled rounds after round 0 (``num_rounds=2`` trains three bag classifiers).
        round_patience: stop early after this many rounds without a better validation AUC.
        tiling: the prepare step's dictionary transform (default :class:`~monai_icmil.data.tiling.TilingConfig`).
        embedder: a factory of the starting embedder (called after seeding, so a random init is the same in every
            run), or ``create_embedder`` arguments.
        aggregator: a factory of the bag classifier, called with ``in_dim`` and ``num_classes`` (a class or a partial
            of one), or a registered name.
        pretrain: when given, round 0's embedder is the starting embedder after this self-supervised pre-training on
            the training slides' tissue patches (kept in ``output_dir/pretrain/``).
        embed, bag_phase, embedder_phase: the phases (defaults: each component with its defaults).
        num_classes: number of slide classes.
        class_names: names of the classes (CSV headers; the last is the positive class); a datalist with string
            labels names them itself (:attr:`class_names`).
        val_fraction: fraction of training slides held out when the datalist has no validation split.
        seed: one seed for tiling order, sampling, augmentation and initialisation.
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available).
        mlflow: ``{"enabled": True, "tracking_uri": None, "experiment_name": "icmil", "run_name": "icmil",
            "registered_model_name": "icmil"}`` (:class:`~monai_icmil.handlers.tracking.MLflowRunTree`; a
            ``registered_model_name`` of ``None`` logs no model).
        synthetic: when given and the datalist is missing, generate a synthetic dataset into ``dataset_dir`` with
            these :func:`~monai_icmil.data.synthetic.make_dataset` arguments (the demo).
        on_slide_error: ``"skip"`` (record in ``report.json`` and go on) or ``"raise"``.
        min_slides: stop with a clear error when fewer usable training slides remain.
        backend: slide backend.
        progress: progress bars.
        allow_outside_root: allow datalist paths outside ``dataset_dir``.
        stain_normalize: Macenko-normalise every patch with its slide's stains (embedding, embedder phase,
            inference); off by default.
        tiling_qc: a QC image per slide in ``output_dir/coords/qc/<slide>.jpg``, ``tiling.csv`` and contact sheets.
        test_writers: when given, the final round also scores the test split with these inference writers into
            ``output_dir/test_inference/`` (:func:`~monai_icmil.inference.predict_slides`), and ``summary.md`` shows
            the highest-scoring test slide's ``<slide>_vs_truth.jpg`` where there is one
            (:class:`~monai_icmil.handlers.writers.GroundTruthWriter`).
        on_tile_error: patches on damaged JPEG tiles (found when a slide is tiled): ``"drop"`` them (recorded in
            ``report.json``, ``tiling.csv`` and the QC picture) or ``"fail"`` the slide.
        max_damaged_fraction: a slide with a larger share of its patches on damaged tiles fails whatever
            ``on_tile_error``.
        assume_mpp: level-0 microns per pixel of every slide whose file has none (TIFFs without resolution tags,
            some MRXS exports); a datalist entry's own ``mpp`` replaces its file's value whatever the file says.
        folds: ``k >= 2``: k-fold cross-validation instead of one run, stratified by label and grouped by the
            datalist's ``patient`` field (or another of :data:`~monai_icmil.workflows.folds.GROUP_KEYS`)
            (:class:`~monai_icmil.workflows.folds.CrossValidation`:
            ``output_dir/fold_<k>/`` per fold, ``summary.md`` with per-fold rows and mean +/- sd per round);
            ``0`` or ``1``: off.
        coords_dir: where the patch coordinates and the tiling QC are kept (default ``output_dir/coords``); runs
            that tile the same slides the same way can share one.
        round0_features_dir: round 0's feature store (default ``output_dir/round_0/features``); runs with the same
            frozen starting embedder and no pre-training (cross-validation folds) can share one, so every slide is
            embedded once. Its files are keyed by the embedder, so a different embedder re-embeds, never misreads.

    Raises:
        FileNotFoundError: ``dataset_dir`` does not exist (and no synthetic dataset is configured).
        ValueError: an unknown aggregator, a negative ``num_rounds`` or an unknown ``on_slide_error``.
    """

    _slides: dict[str, SlideTiles] | None  # the tiles, once prepared
    _pretrain_record: dict[str, Any] | None  # the pre-training's record, once done
    _settings_hashes: dict[str, str | None]  # each phase's settings hash, taken before it runs
    _embed_checked: set[int]  # rounds whose features were found current (or embedded) in this process
    _command_depth: int = 0  # commands running (run -> bag_phase -> embed ...): the outermost ends MLflow runs on error

    def __init__(
        self,
        dataset_dir: str,
        output_dir: str,
        datalist: str = "datalist.json",
        num_rounds: int = 1,
        round_patience: int = 1,
        tiling: Callable[[dict], Mapping[str, Any]] | None = None,
        embedder: Callable[..., PatchEmbedder] | Mapping[str, Any] | None = None,
        aggregator: Callable[..., MILAggregator] | str = "abmil",
        pretrain: Pretrain | None = None,
        embed: Embed | None = None,
        bag_phase: BagPhase | None = None,
        embedder_phase: EmbedderPhase | None = None,
        num_classes: int = 2,
        class_names: Sequence[str] | None = None,
        val_fraction: float = 0.25,
        seed: int = 0,
        device: str | torch.device | None = None,
        mlflow: Mapping[str, Any] | None = None,
        synthetic: Mapping[str, Any] | None = None,
        on_slide_error: str = "skip",
        min_slides: int = 2,
        backend: str = "auto",
        progress: bool = True,
        allow_outside_root: bool = False,
        stain_normalize: bool = False,
        tiling_qc: bool = True,
        test_writers: Sequence[Any] | None = None,
        on_tile_error: str = "drop",
        max_damaged_fraction: float = 0.05,
        assume_mpp: float | None = None,
        folds: int = 0,
        coords_dir: str | None = None,
        round0_features_dir: str | None = None,
    ):
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        with _quiet("monai.bundle.workflows"):  # "No workflow type ... specified": ours has none, on purpose
            super().__init__(workflow_type=None)
        #: the arguments as given: a cross-validation fold is this workflow with another datalist and output_dir
        self.arguments = arguments
        self.dataset_dir, self.output_dir = Path(dataset_dir), Path(output_dir)
        self.num_rounds, self.round_patience = int(num_rounds), int(round_patience)
        self.num_classes, self._class_names = int(num_classes), list(class_names) if class_names else None
        self._warned_random_start = False
        self.seed, self.device = int(seed), default_device(device)
        self.tiling = tiling if tiling is not None else TilingConfig(backend=backend)
        self.embedder = functools.partial(create_embedder, **embedder) if isinstance(embedder, Mapping) else embedder
        self.embedder = self.embedder or functools.partial(create_embedder, "resnet50_trunc")
        self.aggregator = self._check_aggregator(aggregator)
        self.progress = prog = as_bool(progress, "progress")
        dev = self.device
        self.phases = {
            "pretrain": pretrain,
            "embed": embed or Embed(progress=prog),
            "bag_phase": bag_phase or BagPhase(device=dev, progress=prog),
            "embedder_phase": embedder_phase or EmbedderPhase(device=dev, progress=prog),
        }
        if on_slide_error not in ("skip", "raise"):
            raise ValueError(f"on_slide_error must be 'skip' or 'raise', got {on_slide_error!r}")
        self.on_slide_error, self.min_slides, self.backend = on_slide_error, int(min_slides), backend
        self.stain_normalize = as_bool(stain_normalize, "stain_normalize")
        self.tiling_qc = as_bool(tiling_qc, "tiling_qc")
        self.test_writers = list(test_writers) if test_writers else []
        self.tile_policy = TileErrorPolicy(on_tile_error, float(max_damaged_fraction))
        self.assume_mpp = as_mpp(assume_mpp, "assume_mpp", optional=True)
        self.folds = int(folds)
        self.coords_dir = Path(coords_dir) if coords_dir else self.output_dir / "coords"
        self.round0_features_dir = Path(round0_features_dir) if round0_features_dir else None
        self._check_counts(synthetic)
        outside = as_bool(allow_outside_root, "allow_outside_root")
        self.splits = DatasetSplits(
            dataset_dir, datalist, output_dir, self.seed, val_fraction, synthetic, outside, self.progress
        )
        self.ledger = PhaseLedger(self.output_dir / "state.json")
        self.report = RunReport(self.output_dir / "report.json")
        self.tracking = MLflowRunTree(self.output_dir, **{**dict(mlflow or {}), "params": self.params})
        self.tiling_params = tiling_signature(self.tiling)
        self._slides, self._pretrain_record, self._settings_hashes, self._embed_checked = None, None, {}, set()

    def _check_counts(self, synthetic: Mapping[str, Any] | None) -> None:
        """The data root exists (unless generated), and the round and fold counts make sense."""
        if synthetic is None and not self.dataset_dir.is_dir():
            raise FileNotFoundError(
                f"dataset_dir '{self.dataset_dir}' does not exist. Set `dataset_dir` to the folder holding the slides "
                "and the datalist (or add configs/demo.json to generate a synthetic dataset there)."
            )
        if self.num_rounds < 0:
            raise ValueError(f"num_rounds must be >= 0, got {self.num_rounds}")
        if self.folds < 0 or self.folds == 1:
            raise ValueError(f"folds must be 0 (off) or the number of cross-validation folds (>= 2), got {self.folds}")

    def _check_aggregator(self, aggregator: Callable[..., MILAggregator] | str) -> Callable[..., MILAggregator]:
        """The aggregator as a factory (an unknown name fails here, listing the known ones), built once on a tiny
        input so that bad arguments fail before any work."""
        aggregator = aggregator_factory(aggregator)
        net = aggregator(in_dim=8, num_classes=self.num_classes)
        if not isinstance(net, MILAggregator):
            raise TypeError(f"the aggregator factory {aggregator!r} built a {type(net).__name__}, not a MILAggregator")
        return aggregator

    # ------------------------------------------------------------------------------------------------ bundle workflow
    def initialize(self) -> ICMILWorkflow:
        """Ready to run: the output folder exists (the checks that need no data ran at construction)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return self

    def finalize(self) -> None:
        """Nothing to release: :meth:`run` ends the parent MLflow run when the loop completes, and a single-phase
        command (``bag_phase#run``, ...) leaves it open so that the next command logs into the same run tree."""

    def _get_property(self, name: str, property: dict) -> Any:
        return self.__dict__.get(name)

    def _set_property(self, name: str, property: dict, value: Any) -> None:
        self.__dict__[name] = value

    def params(self) -> dict[str, Any]:
        """The parent MLflow run's parameters."""
        return {
            "dataset_dir": str(self.dataset_dir),
            "num_rounds": self.num_rounds,
            "aggregator": aggregator_name(self.aggregator),
            "aggregator_config": component_signature(self.aggregator),
            "embedder": component_signature(self.embedder),
            "tiling": self.tiling_params,
            **{name: component_signature(phase) for name, phase in self.phases.items() if phase is not None},
            "seed": self.seed,
            "stain_normalize": self.stain_normalize,
            "device": str(self.device),
            "num_classes": self.num_classes,
            "folds": self.folds,
        }

    def round_dir(self, r: int) -> Path:
        return self.output_dir / f"round_{r}"

    def features_dir(self, r: int) -> Path:
        """Round ``r``'s feature store (``round0_features_dir`` for round 0 when one is set)."""
        if r == 0 and self.round0_features_dir is not None:
            return self.round0_features_dir
        return self.round_dir(r) / "features"

    # ------------------------------------------------------------------------------------------------ data
    def prepare(self) -> dict[str, SlideTiles]:
        """Tissue masks and patch coordinates of every slide (kept in ``output_dir/coords``)."""
        if self._slides is not None:
            return self._slides
        self._record_classes()
        self._check_two_classes()
        missing = [
            f"{e['slide_id']}: '{e['tumour_mask']}'"
            for e in self.splits.all_items()
            if isinstance(e.get("tumour_mask"), str) and not Path(e["tumour_mask"]).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} tumour mask(s) of datalist '{self.splits.path}' do not exist: {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; fix their tumour_mask paths or remove the key."
            )
        if _rank() != 0:
            barrier()  # rank 0 tiles first; the others then load the same coordinates from the store
        self._slides = prepare_coords(
            self.splits.all_items(),
            self.tiling,
            CoordsStore(self.coords_dir),
            report=self.report,
            on_slide_error=self.on_slide_error,
            backend=self.backend,
            progress=self.progress,
            qc_dir=self.coords_dir / "qc" if self.tiling_qc else None,
            tile_policy=self.tile_policy,
            assume_mpp=self.assume_mpp,
        )
        if _rank() == 0:
            barrier()
        usable = self._usable("training")
        excluded = len(self.report.excluded())
        if excluded:
            warnings.warn(
                f"{excluded} slide(s) failed or have no tissue; they are left out (see {self.report.path}).",
                stacklevel=2,
            )
        if len(usable) < self.min_slides:
            raise RuntimeError(
                f"only {len(usable)} usable training slide(s) remain (min_slides={self.min_slides}); see "
                f"{self.report.path} for the slides that failed."
            )
        return self._slides

    def _normal_ids(self) -> set[str]:
        """``slide_id`` of the class-0 training and validation slides (the embedder phase's normal-slide targets)."""
        items = self.splits.items()
        return {e["slide_id"] for split in ("training", "validation") for e in items.get(split, []) if e["label"] == 0}

    def _usable(self, split: str) -> list[SlideTiles]:
        """The split's prepared slides, less those that failed or have no tissue."""
        slides, excluded = self.prepare(), self.report.excluded()
        return [
            slides[e["slide_id"]]
            for e in self.splits.items().get(split, [])
            if e["slide_id"] in slides and e["slide_id"] not in excluded and len(slides[e["slide_id"]]["coords"])
        ]

    def feature_keys(self, r: int, embedder: PatchEmbedder | None = None) -> dict[str, dict[str, Any]]:
        """The key of each prepared slide's features for round ``r``'s embedder."""
        fp = (embedder or self.embedder_for(r)).fingerprint()
        dtype = self.phases["embed"].dtype
        return {
            sid: feature_key(s["image"], slide_signature(self.tiling_params, s), fp, dtype, self.stain_normalize)
            for sid, s in self.prepare().items()
        }

    def stored_features(
        self, r: int, split: str, embedder: PatchEmbedder | None = None, keys: Mapping[str, Any] | None = None
    ) -> dict[str, str]:
        """``slide_id`` -> round ``r``'s feature file, for the usable slides of ``split`` whose file is current
        (``keys``: :meth:`feature_keys`, when already computed)."""
        store, keys = FeatureStore(self.features_dir(r)), keys or self.feature_keys(r, embedder)
        return {
            s["slide_id"]: str(store.path(s["slide_id"]))
            for s in self._usable(split)
            if s["slide_id"] in keys and store.is_current(s["slide_id"], keys[s["slide_id"]])
        }

    def _stale_features(self, r: int) -> list[str]:
        """``slide_id`` of the usable slides (every split) whose round-``r`` features are missing or stale, e.g. after
        a datalist's per-slide ``mpp`` changed and the slide was tiled again."""
        keys, stale = self.feature_keys(r), []  # (the embedder's weights hashed once)
        for split in self.splits.items():
            current = self.stored_features(r, split, keys=keys)
            stale += [s["slide_id"] for s in self._usable(split) if s["slide_id"] not in current]
        return stale

    def _embedding_stale(self, r: int) -> bool:
        """Whether round ``r``'s recorded embedding left slides with stale features (looked at once per process and
        round; under torchrun every rank looks before any rank writes, so all decide alike)."""
        if r in self._embed_checked:
            return False
        barrier()
        stale = self._stale_features(r)
        barrier()
        if stale:
            logger.info(
                f"round {r}: {len(stale)} slide(s) have features older than their tiling or embedder "
                f"(first: {', '.join(stale[:3])}); embedding them again"
            )
        else:
            self._embed_checked.add(r)
        return bool(stale)

    def bags(self, r: int, split: str, embedder: PatchEmbedder | None = None) -> BagDataset:
        """Round ``r``'s feature bags of ``split`` (every one current for the round's embedder)."""
        keys = self.feature_keys(r, embedder)
        excluded = self.report.excluded()
        items = [
            e for e in self.splits.items().get(split, []) if e["slide_id"] in keys and e["slide_id"] not in excluded
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # empty bags are already reported once
            return BagDataset(FeatureStore(self.features_dir(r)), items, keys)

    # ------------------------------------------------------------------------------------------------ models
    def starting_embedder(self) -> PatchEmbedder:
        """The configured starting embedder (random init, or the weights it names), before any pre-training."""
        torch.manual_seed(self.seed)  # a random-init starting embedder is the same in every run
        return self.embedder()

    def embedder_for(self, r: int) -> PatchEmbedder:
        """Round ``r``'s embedder: the starting one (or its pre-trained version) for round 0, the embedder phase's
        output after."""
        if r == 0 and self.phases["pretrain"] is not None:
            self.pretrain()
            return create_embedder(None, weights=self.output_dir / "pretrain" / "embedder.safetensors")
        if r == 0:
            self._warn_random_start()
            return self.starting_embedder()
        path = self.round_dir(r) / "embedder_phase" / "embedder.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"round {r}'s embedder is missing ({path}); run its embedder phase first.")
        return create_embedder(None, weights=path)

    def bag_classifier_path(self, r: int) -> Path:
        return self.round_dir(r) / "bag_phase" / "bag_classifier.pt"

    def final_round(self) -> int:
        """The finished round with the best validation AUC, ties broken by the lower validation loss, then the
        earlier round (the model :meth:`infer` uses)."""
        rounds = {r: s for r, s in self.ledger.rounds().items() if "bag_phase" in s}
        if not rounds:
            raise FileNotFoundError(f"no finished round in {self.output_dir}; run the training first.")

        def score(r: int) -> tuple[float, float, int]:
            val = rounds[r]["bag_phase"]["val"]
            auc, loss = val.get("auc"), val.get("loss")
            auc = -math.inf if auc is None or math.isnan(auc) else auc
            return auc, -math.inf if loss is None or math.isnan(loss) else -loss, -r

        return max(rounds, key=score)

    def trained_round(self, round: Any, setting: str) -> int:
        """``round`` (a setting such as ``--infer_round``) as a finished round, or the best (:meth:`final_round`) when
        it is ``None``.

        Raises:
            ValueError: not a whole number, or a round whose bag phase has not finished, naming the finished ones.
        """
        if round is None:
            return self.final_round()
        finished = sorted(r for r, s in self.ledger.rounds().items() if "bag_phase" in s)
        try:
            number = float(str(round).strip()) if not isinstance(round, bool) else math.nan
        except ValueError:
            number = math.nan
        r = int(number) if number.is_integer() else None
        if r not in finished:
            listed = ", ".join(map(str, finished)) if finished else "none yet: run the training first"
            raise ValueError(
                f"{setting} {round!r} is not a finished round of the run in '{self.output_dir}' (finished rounds: "
                f"{listed}); give one of them, or null for the best by validation AUC."
            )
        return r

    # ------------------------------------------------------------------------------------------------ phases
    def _settings(self, name: str) -> str | None:
        """The hash of what phase ``name``'s results depend on (its ``signature()``, without the optimizer keywords
        that only choose a device's implementation), recorded with them; taken once, before the phase runs (a phase
        may move its buffers in place)."""
        if name not in self._settings_hashes:
            signature = getattr(self.phases.get(name), "signature", None)
            self._settings_hashes[name] = stable_hash(_device_neutral(signature())) if callable(signature) else None
        return self._settings_hashes[name]

    def _finished(self, r: int | None, name: str) -> dict[str, Any] | None:
        """The record of phase ``name`` of round ``r`` (``None``: before the rounds) when it has finished.

        Raises:
            ValueError: it finished with other settings than this run's (its results would be mixed with the new
                settings' in one summary), naming ``state.json`` and the fix.
        """
        done = self.ledger.get(r, name)
        if done is not None and done.get("settings") not in (None, want := self._settings(name)):
            where = name if r is None else f"round {r}'s {name}"
            raise ValueError(
                f"{where} in '{self.output_dir}' was trained with other {name} settings than this run's (settings "
                f"hash {done['settings']} in '{self.ledger.path}', {want} now): its results would be mixed with the "
                f"new settings' in one summary. Use a new --output_dir for the new settings, or run with the ones it "
                "was trained with."
            )
        return done

    def _mark(self, r: int | None, name: str, record: dict[str, Any]) -> None:
        """Record phase ``name`` of round ``r`` as finished, with its settings' hash."""
        settings = self._settings(name)
        self.ledger.mark(r, name, {**record, **({"settings": settings} if settings else {})})

    @_ends_runs_on_error
    def pretrain(self) -> dict[str, Any]:
        """Pre-training of the starting embedder (``pretrain``); its output is round 0's embedder. Runs once
        (recorded in ``state.json``), on rank 0 while the others wait."""
        if self._pretrain_record is not None:
            return self._pretrain_record
        phase = self.phases["pretrain"]
        if phase is None:
            raise ValueError("no pretrain phase is configured (add configs/pretrain.json).")
        out = self.output_dir / "pretrain"
        if _rank() == 0 and not (self._finished(None, "pretrain") and (out / "embedder.safetensors").is_file()):
            run, t0 = self.tracking.nested("pretrain"), time.perf_counter()
            result = phase(
                self.starting_embedder(), self._usable("training"), out, self.seed + 7, run, self.backend,
                self.stain_normalize,
            )  # fmt: skip
            final_loss = result["history"][-1]["loss"] if result["history"] else None
            record = {
                "seconds": time.perf_counter() - t0,
                "fingerprint": result["fingerprint"],
                "final_loss": final_loss,
            }
            self.tracking.end(run)
            self._mark(None, "pretrain", record)
        barrier()  # every rank passes here once, whether or not there was work
        self._pretrain_record = self.ledger.get(None, "pretrain") or {}
        return self._pretrain_record

    @_ends_runs_on_error
    def embed(self, r: int = 0) -> dict[str, Any]:
        """Round ``r``'s embed phase: every slide through round ``r``'s embedder into ``round_<r>/features``."""
        if (done := self.ledger.get(r, "embed")) is not None and not self._embedding_stale(r):
            return done
        if r >= 1:
            self.embedder_phase(r)  # round r's embedder comes out of its embedder phase
        embedder = self.embedder_for(r)  # (round 0 with pre-training configured: pre-trains first, timed apart)
        run, t0 = self.tracking.phase(r, "embed"), time.perf_counter()
        report = self.report
        if _rank() > 0:  # under torchrun each rank > 0 reports its share of this embedding apart; rank 0 merges
            rank_file = self.output_dir / f"report.rank{_rank()}.json"
            rank_file.unlink(missing_ok=True)  # an earlier attempt's: not this embedding's
            report = RunReport(rank_file)
        result = self.phases["embed"](
            self.prepare(), embedder, FeatureStore(self.features_dir(r)), self.tiling_params,
            device=self.device, report=report, backend=self.backend, meta={"round": r},
            stain_normalize=self.stain_normalize,
        )  # fmt: skip
        if self.on_slide_error == "raise" and result["failed"]:
            raise RuntimeError(f"embedding failed for slide(s) {result['failed']} (see {report.path})")
        record = {"seconds": time.perf_counter() - t0, "patches": result["patches"]}
        record["steady_patches_per_s"] = result.get("steady_patches_per_s")
        record.update(fingerprint=result["fingerprint"], written=len(result["written"]))
        record.update(skipped=len(result["skipped"]), failed=result["failed"])
        if run is not None:
            run.log_params({"embedder": embedder.name, "fingerprint": result["fingerprint"], "round": r})
            rates = {k: result[k] for k in ("patches", "patches_per_s", "steady_patches_per_s")}
            run.log_metrics({**rates, "seconds": record["seconds"], "failed_slides": len(result["failed"])})
            self.tracking.end(run)
        barrier()  # under torchrun every rank embeds its share of the slides
        if done is not None:  # stale slides embedded again: the first embedding's figures stay
            record = {**done, "re_embedded": record}
        if _rank() == 0:
            (record.get("re_embedded") or record)["failed"] += self._merge_rank_reports(r)
            self.ledger.mark(r, "embed", record)
        barrier()
        if _rank() > 0:  # every rank goes on with every rank's failures
            self.report.reload()
        self._embed_checked.add(r)
        return record

    def _merge_rank_reports(self, r: int) -> list[str]:
        """Rank 0 under torchrun: the other ranks' reports of this embedding merged into ``report.json`` (and
        removed), and the embedding failures of slides that another rank has now embedded forgotten; returns the
        slides the other ranks found failing."""
        added = []
        for other in sorted(self.output_dir.glob("report.rank*.json")):
            rank = re.fullmatch(r"report\.rank(\d+)\.json", other.name)
            if rank and int(rank.group(1)) < dist_info()[1]:  # (not a file of an earlier run with more ranks)
                added += self.report.merge(other)
            other.unlink()
        if dist_info()[1] > 1:
            store, keys = FeatureStore(self.features_dir(r)), self.feature_keys(r)
            for sid in [sid for sid, f in self.report.failed.items() if f.get("phase") == "embed" and sid in keys]:
                if store.is_current(sid, keys[sid]):
                    self.report.succeed(sid, "embed")
        return added

    @_ends_runs_on_error
    def bag_phase(self, r: int = 0) -> dict[str, Any]:
        """Round ``r``'s bag phase on its features (embeds first if needed), then its test metrics and, where the
        datalist has ground-truth masks, its instance teacher's patch AUC (:meth:`teacher_vs_truth`)."""
        from monai_icmil.engines.bag_phase import evaluate_bags

        if (done := self._finished(r, "bag_phase")) is not None:
            if self._round_records_missing(r):  # a run stopped between the phase's record and these
                self._repair_round_records(r)
            return done
        self.embed(r)
        if _rank() != 0:  # the bag phase runs on rank 0 (bags are small); the others wait
            barrier()
            return self.ledger.get(r, "bag_phase") or {}
        run, t0 = self.tracking.phase(r, "bag_phase"), time.perf_counter()
        embedder = self.embedder_for(r)
        init_state = self.student_classifier_state(r, embedder.out_dim) if self._warm_start(r) else None
        # "student": every restart from the student's classifier; "both": fresh ones too, the best by validation kept
        warm = "both" if getattr(self.phases["bag_phase"], "warm_start", None) == "both" else "student"
        if run is not None and init_state is not None:
            run.log_params({"warm_start": warm})
        result = self.phases["bag_phase"](
            self.bags(r, "training", embedder), self.bags(r, "validation", embedder), self.aggregator,
            self.round_dir(r) / "bag_phase", self.num_classes, self.seed + r, self.class_names, run,
            **({"init_state": init_state} if init_state is not None else {}),  # (a user's phase may lack it)
        )  # fmt: skip
        val = {k[4:]: v for k, v in result["val"].items() if k.startswith("val_")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an undefined AUC is reported by the phase already
            metrics, _ = evaluate_bags(result["network"], self.bags(r, "validation", embedder), self.device)
        val.update({k: metrics[k] for k in ("auc_ci_low", "auc_ci_high") if k in metrics})
        record = {"seconds": time.perf_counter() - t0, "best_epoch": result["best_epoch"], "val": val}
        record.update(restart=result["restart"], restarts_val=[x["best_metric"] for x in result["restarts"]])
        if "witness_search" in result:
            record["witness_search"] = {k: result["witness_search"][k] for k in ("fraction", "val_auc")}
        if init_state is not None:
            record.update(warm_start=warm, kept_start=result.get("start", "warm" if warm == "student" else "unknown"))
            if run is not None:
                run.log_params({"kept_start": record["kept_start"]})
        self.tracking.end(run)
        self._mark(r, "bag_phase", record)
        self.test(r)
        self.teacher_vs_truth(r)
        barrier()
        return record

    def _warm_start(self, r: int) -> bool:
        """Whether round ``r``'s bag phase starts from the student's classifier (``bag_phase#warm_start``, r >= 1)."""
        return r >= 1 and bool(getattr(self.phases["bag_phase"], "warm_start", False))

    def student_classifier_state(self, r: int, in_dim: int) -> dict[str, torch.Tensor]:
        """The state of round ``r``'s student classifier, as round ``r``'s embedder phase saved it
        (``student_head.pt``): round ``r-1``'s bag classifier, which it copied as the student, with the dimension
        reduction and instance head it trained together with the embedder. Warns when the parts it did not train
        differ from round ``r-1``'s classifier on disk (the student was copied from another classifier, e.g. a run
        whose round ``r-1`` bag phase was trained again).

        Raises:
            FileNotFoundError: round ``r``'s embedder phase left no ``student_head.pt`` (names the file and the fix).
            ValueError: the file cannot be read or does not fit round ``r-1``'s classifier (names the file).
        """
        from monai_icmil.engines.embedder_phase import load_student_classifier

        path = self.round_dir(r) / "embedder_phase" / "student_head.pt"
        fix = (
            f"run the workflow in a new output_dir (or delete round_{r}/ and round {r}'s entries in state.json), or "
            "set bag_phase#warm_start to false"
        )
        if not path.is_file():
            raise FileNotFoundError(
                f"bag_phase#warm_start: round {r}'s embedder phase left no student classifier ({path}; runs made "
                f"before it was saved lack it): {fix}"
            )
        previous = self.bag_classifier_path(r - 1)
        try:
            net, differ = load_student_classifier(
                previous, path, expect_in_dim=in_dim, expect_aggregator=self.aggregator
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise ValueError(f"bag_phase#warm_start: cannot start round {r} from '{path}' ({e}): {fix}") from e
        if differ:
            warnings.warn(
                f"bag_phase#warm_start: '{path}' was not copied from '{previous}' "
                f"({', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''} differ): round {r} starts from the "
                "classifier the embedder phase copied, not from that file",
                stacklevel=2,
            )
        return net.state_dict()

    @_ends_runs_on_error
    def embedder_phase(self, r: int = 1) -> dict[str, Any]:
        """Round ``r``'s embedder phase: round ``r-1``'s bag classifier teaches round ``r-1``'s embedder."""
        from monai_icmil.engines.bag_phase import load_bag_classifier

        if r < 1:
            raise ValueError("the embedder phase starts round 1 (it needs round 0's bag classifier as teacher)")
        if (done := self._finished(r, "embedder_phase")) is not None:
            return done
        self.bag_phase(r - 1)
        run, t0 = self.tracking.phase(r, "embedder_phase"), time.perf_counter()
        embedder = self.embedder_for(r - 1)
        teacher = load_bag_classifier(
            self.bag_classifier_path(r - 1), "cpu", expect_in_dim=embedder.out_dim, expect_aggregator=self.aggregator
        )
        extra = {}
        if getattr(self.phases["embedder_phase"], "teacher_features", False):
            extra["teacher_features"] = self.stored_features(r - 1, "training", embedder)
            missing = [
                s["slide_id"] for s in self._usable("training") if s["slide_id"] not in extra["teacher_features"]
            ]
            if missing:
                raise RuntimeError(
                    f"embedder_phase#teacher_features: round {r - 1}'s features of training slide(s) "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} are missing or stale in "
                    f"{self.features_dir(r - 1)}: delete them and rerun (round {r - 1}'s embedding makes them again), "
                    "or set embedder_phase#teacher_features to false"
                )
        result = self.phases["embedder_phase"](
            embedder, teacher, self._usable("training"), self._usable("validation"),
            self.round_dir(r) / "embedder_phase", self.seed + 1000 * r, run, self.backend, self.stain_normalize,
            normal_ids=self._normal_ids(), **extra,
        )  # fmt: skip
        record = {"seconds": time.perf_counter() - t0}
        record.update({k: result[k] for k in ("fingerprint", "best_iteration", "best", "world_size")})
        record.update({k: result.get(k) for k in ("first_iteration_s", "steady_patches_per_s")})
        record["teacher_consistency"] = result["teacher_consistency"]
        if result.get("normal_slides") is not None:
            record["normal_slides"] = result["normal_slides"]
        if extra:  # the teacher's features came from round r - 1's store
            record["teacher_features"] = len(extra["teacher_features"])
        self.tracking.end(run)
        if _rank() == 0:  # under torchrun every rank trains (DDP); rank 0 records
            self._mark(r, "embedder_phase", record)
        barrier()
        return record

    def test(self, r: int = 0, split: str = "test") -> dict[str, Any]:
        """Metrics, predictions CSV and ROC curve of round ``r``'s bag classifier on ``split``'s labelled slides
        (unlabelled test slides, inference only, are named in the record's ``unlabelled`` and left out)."""
        from monai_icmil.engines.bag_phase import evaluate_bags, load_bag_classifier, write_predictions_csv
        from monai_icmil.metrics import threshold_metrics
        from monai_icmil.visualize import save_roc_curve

        if split == "test" and (done := self.ledger.get(r, "test")) is not None:
            return done
        out, ds = self.round_dir(r) / split, self.bags(r, split)
        unlabelled = [e["slide_id"] for e in ds.items if e.get("label") is None]
        if unlabelled:
            ds.items = [e for e in ds.items if e.get("label") is not None]
            warnings.warn(
                f"round {r}, {split}: {len(unlabelled)} slide(s) without a label ({', '.join(unlabelled[:3])}"
                f"{' ...' if len(unlabelled) > 3 else ''}) are not scored; inference (workflow#test_writers, "
                "inference.json) still predicts them. Give them a label in the datalist to score them.",
                stacklevel=2,
            )
        record: dict[str, Any] = {"metrics": {}, "slides": 0}
        if len(ds):
            net = load_bag_classifier(self.bag_classifier_path(r), self.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                metrics, rows = evaluate_bags(net, ds, self.device)
            write_predictions_csv(out / "predictions.csv", rows, self.class_names)
            probs, labels = np.array([x["probs"] for x in rows]), np.array([x["label"] for x in rows])
            if len(set(labels.tolist())) > 1:
                save_roc_curve(out / "roc.png", probs, labels, title=f"round {r}, {split}: {len(rows)} slides")
            if probs.shape[1] == 2 and (threshold := self._validation_threshold(r)) is not None:
                fair = threshold_metrics(probs[:, 1], labels, threshold)  # youden_* fit the split's own labels
                metrics.update(val_threshold=threshold, val_threshold_acc=fair["acc"], val_threshold_f1=fair["f1"])
            atomic_write_json(out / "metrics.json", strict_json(metrics))  # undefined (NaN): null
            predicted = np.bincount(probs.argmax(1), minlength=probs.shape[1]).tolist()  # slides called each class
            record = {"metrics": metrics, "slides": len(rows), "predicted": predicted}
        if unlabelled:
            record["unlabelled"] = unlabelled
        if split == "test":
            self.ledger.mark(r, "test", record)
            rr = self.tracking.round(r)
            if rr is not None:
                rr.log_metrics({f"test_{k}": v for k, v in record["metrics"].items()})
                rr.log_artifacts([out / "predictions.csv", out / "roc.png"], artifact_path="test")
        return record

    def _validation_threshold(self, r: int) -> float | None:
        """The Youden threshold of round ``r``'s classifier on its validation slides (from the bag phase's
        ``predictions_val.csv``), to score the test split with a threshold its labels did not choose; ``None``
        without the file or with one class there."""
        import csv

        from monai_icmil.metrics import youden_threshold

        path = self.round_dir(r) / "bag_phase" / "predictions_val.csv"
        if not path.is_file():
            return None
        rows = [row for row in csv.DictReader(path.open()) if row.get("label") not in (None, "")]
        positive = [k for k in (rows[0] if rows else {}) if k.startswith("prob_")][-1:]
        labels = np.array([int(row["label"]) for row in rows])
        if not positive or len(set(labels.tolist())) < 2:
            return None
        return float(youden_threshold(np.array([float(row[positive[0]]) for row in rows]), labels))

    def _round_records_missing(self, r: int) -> bool:
        """Whether finished round ``r`` lacks its test record, or its teacher record where there are masks."""
        from monai_icmil.workflows.evaluation import has_ground_truth

        items = self.splits.items()
        masks = has_ground_truth(items.get("test", []) + items.get("validation", []))
        return self.ledger.get(r, "test") is None or (masks and self.ledger.get(r, "teacher") is None)

    def _repair_round_records(self, r: int) -> None:
        """Make finished round ``r``'s missing test and teacher records (single process; under torchrun a warning
        says to rerun without it: rank 0 alone must not reach the other ranks' collectives)."""
        if dist_info()[1] > 1:
            if _rank() == 0:
                warnings.warn(
                    f"round {r} lacks its test or teacher record; rerun the command without torchrun to make it."
                )
            return
        try:
            self.test(r)
            self.teacher_vs_truth(r)
        except Exception as e:  # the round itself is done and kept; the run goes on
            warnings.warn(f"round {r}'s test or teacher record could not be made ({type(e).__name__}: {e}).")

    def teacher_vs_truth(self, r: int) -> dict[str, Any] | None:
        """Round ``r``'s instance teacher against the ground-truth tumour masks of the test slides (the validation
        slides when the test split has none): its patch AUC, recorded as the round's ``teacher`` in ``state.json``,
        MLflow and the summary (``patch_auc`` ``None`` and the reason as ``unmeasured`` when no patch is tumour
        enough to measure). ``None`` when the datalist carries no ``tumour_mask``."""
        from monai_icmil.engines.bag_phase import load_bag_classifier
        from monai_icmil.workflows.evaluation import has_ground_truth, teacher_patch_auc

        if (done := self.ledger.get(r, "teacher")) is not None:
            return done
        split = "test" if has_ground_truth(self.splits.items().get("test", [])) else "validation"
        entries = {e["slide_id"]: e for e in self.splits.items().get(split, [])}
        if not has_ground_truth(list(entries.values())):
            return None
        net = load_bag_classifier(self.bag_classifier_path(r))
        result = teacher_patch_auc(net, self.bags(r, split), entries, CoordsStore(self.coords_dir))
        if result is None:  # recorded, so that it is not measured again on every rerun
            reason = f"no patch of the {split} slides is >= 50 % tumour in its mask"
            record = {"patch_auc": None, "split": split, "unmeasured": reason}
            self.ledger.mark(r, "teacher", record)
            return record
        record = {**result, "split": split}
        self.ledger.mark(r, "teacher", record)
        rr = self.tracking.round(r)
        if rr is not None:
            rr.log_metrics({f"teacher_{k}": record[k] for k in ("patch_auc", "normal_called_tumour", "precision")})
        return record

    # ------------------------------------------------------------------------------------------------ the loop
    def run_round(self, r: int) -> dict[str, Any]:
        """Round ``r``: (embedder phase,) embed, bag phase and test; the round's MLflow run gets the validation AUC
        before and after."""
        if r >= 1:
            self.embedder_phase(r)
        self.embed(r)
        self.bag_phase(r)
        rounds = self.ledger.rounds()
        rr = self.tracking.round(r)
        if rr is not None:
            metrics = {"val_auc_after": rounds[r]["bag_phase"]["val"].get("auc")}
            if r >= 1:
                metrics["val_auc_before"] = rounds[r - 1]["bag_phase"]["val"].get("auc")
            rr.log_metrics(metrics)
            self.tracking.end(rr)
        return rounds[r]

    @_ends_runs_on_error
    def run(self) -> dict[str, Any]:
        """The whole ICMIL loop with the stopping rule; prints and saves ``summary.md``. With ``folds >= 2``, the
        loop once per cross-validation fold (:class:`~monai_icmil.workflows.folds.CrossValidation`)."""
        if self.folds >= 2:
            from monai_icmil.workflows.folds import CrossValidation

            return CrossValidation(self, self.folds).run()
        return self._run_loop()

    def _run_loop(self) -> dict[str, Any]:
        self.prepare()
        best_auc, stale = -math.inf, 0
        for r in range(self.num_rounds + 1):
            auc = self.run_round(r)["bag_phase"]["val"].get("auc", float("nan"))
            if auc is not None and not math.isnan(auc) and auc > best_auc + 1e-9:
                best_auc, stale = auc, 0
            elif r > 0:
                stale += 1
                if stale >= self.round_patience and r < self.num_rounds:
                    logger.info("validation AUC did not improve for %d round(s): stopping after round %d", stale, r)
                    break
        if _rank() != 0:
            return {}
        if self.test_writers:
            self.infer_test()
        summary = self.summary()
        self._log_run(summary)
        return summary

    def infer_test(self) -> dict[str, Any]:
        """The final round on the test split with :attr:`test_writers`, into ``output_dir/test_inference/``; records
        the highest-scoring test slide (and its ``_vs_truth`` picture, where one was drawn) for the summary."""
        excluded = self.report.excluded()
        entries = [e for e in self.splits.items().get("test", []) if e["slide_id"] not in excluded]
        out = self.output_dir / "test_inference"
        from monai_icmil.inference import NoSlideScored

        try:
            rows = self.infer(entries, str(out), writers=self.test_writers) if entries else []
        except NoSlideScored as error:  # the rounds' results stand; summary.md says why there is no showcase
            warnings.warn(f"test inference: {error}", stacklevel=2)
            rows, failure = [], str(error)
        else:
            failure = None
        record: dict[str, Any] = {"round": self.final_round(), "slides": len(rows)}
        if failure:
            record["error"] = failure
        if rows:  # ties at a probability of 1 (float32) are told apart by the other classes' (not rounded to 0)
            top = max(rows, key=lambda row: positive_rank(row["probs"]))
            picture = out / f"{top['slide_id']}_vs_truth.jpg"
            record.update(slide=top["slide_id"], probability=float(top["probs"][-1]), label=top["label"])
            record["tied"] = sum(1 for row in rows if round(row["probs"][-1], 3) == round(top["probs"][-1], 3))
            if picture.is_file():
                record["picture"] = picture.relative_to(self.output_dir).as_posix()
        self.ledger.mark(None, "test_inference", record)
        return record

    def summary(self) -> dict[str, Any]:
        """``summary.md`` (printed) and ``summary.json``: per round, val and test AUC with their intervals, the
        change from the previous round, the instance teacher's patch AUC against the ground truth where there is one,
        accuracy, F1 and time per phase; ``rounds.png``, one picture of it all."""
        start = self.starting_embedder_origin()
        title = f"{aggregator_name(self.aggregator)}, {self.starting_embedder_name()}" + (f", {start}" if start else "")
        self.report.save()  # report.json also when no slide failed
        return write_summary(
            self.output_dir,
            self.ledger.rounds(),
            self.final_round(),
            title,
            self.report.excluded(),
            showcase=self.ledger.get(None, "test_inference"),
            class_names=self.class_names,
        )

    def starting_embedder_name(self) -> str:
        """The starting embedder's name, from its configuration (nothing is built)."""
        keywords = getattr(self.embedder, "keywords", {})
        args = getattr(self.embedder, "args", ())
        return str(keywords.get("name") or (args[0] if args else getattr(self.embedder, "__name__", "embedder")))

    @property
    def class_names(self) -> list[str] | None:
        """The classes' names by index: those the datalist's string labels gave when the run was prepared (recorded
        in ``state.json``), else the configured ``class_names``."""
        recorded = self.ledger.get(None, "classes")
        return list(recorded["names"]) if recorded else self._class_names

    def _check_two_classes(self) -> None:
        """Refuse, before any tiling, a training split whose labelled slides are all of one class: a bag classifier
        learns nothing from it (the datalist's validation split is not counted, so a held-out one is)."""
        items = self.splits.items()
        labels = {e.get("label_name", e["label"]) for e in items.get("training", []) if e.get("label") is not None}
        if len(labels) == 1:
            raise ValueError(
                f"every training slide of datalist '{self.splits.path}' has the label {labels.pop()!r}: the bag "
                "classifier needs training slides of at least two classes. Add slides of the other class (or check "
                "the label column and the split column of the datalist)."
            )

    def _too_many_classes(self, labelled: list[tuple[str, dict[str, Any]]]) -> str:
        """The refusal of a datalist with classes beyond ``num_classes``: every class with its number of slides; for
        integer labels not numbered 0, 1, ..., the fix; else the slides of the rarest class where one class is rarer
        than the others (a typo in a label, 'tumer', makes a class of one slide; string labels sort, so the typo may
        take another class's index)."""
        slides: dict[int, list[str]] = {}
        names: dict[int, str] = {}
        for split, e in labelled:
            slides.setdefault(int(e["label"]), []).append(f"{e['slide_id']} ({split})")
            names[int(e["label"])] = str(e.get("label_name", e["label"]))
        counts = ", ".join(f"{names[c]!r}: {len(slides[c])}" for c in sorted(slides))
        head = (
            f"datalist '{self.splits.path}' has class indices {sorted(slides)} but num_classes is {self.num_classes} "
            f"(class indices 0-{self.num_classes - 1}); slides per class: {counts}."
        )
        k = len(slides)
        if sorted(slides) != list(range(k)):  # integer labels that do not start at 0 or skip one (1 and 2, say)
            more = f", and set num_classes (--num_classes {k}) and class_names" if k > self.num_classes else ""
            return f"{head} Number the classes 0-{k - 1} in the datalist (e.g. 0 for normal){more}."
        fewest = min(len(v) for v in slides.values())
        rare = [c for c in sorted(slides) if len(slides[c]) == fewest]
        typo = ""
        if len(rare) == 1:  # one class rarer than the others: a typo in a label ('tumer') makes a class of one slide
            listed = slides[rare[0]][:5] + (["..."] if fewest > 5 else [])
            typo = f" The rarest, {names[rare[0]]!r}, is on {', '.join(listed)}: if it is a typo, correct those labels;"
        return (
            f"{head}{typo} {'otherwise s' if typo else 'S'}et num_classes (--num_classes {k}) and class_names to the "
            "datalist's classes."
        )

    def _record_classes(self) -> None:
        """Record the class names a datalist's string labels give (their order sets the class indices:
        :func:`~monai_icmil.data.datalist.string_label_order`), and refuse a datalist that orders them differently
        from the one this ``output_dir``'s rounds were trained with; refuse class indices or ``class_names`` that do
        not fit ``num_classes``."""
        items = self.splits.items()
        labelled = [(split, e) for split, entries in items.items() for e in entries if e.get("label") is not None]
        if any(e["label"] >= self.num_classes for _, e in labelled):
            raise ValueError(self._too_many_classes(labelled))
        named = datalist_class_names(items)
        names = named if named is not None and len(named) == self.num_classes else self._class_names
        if names is not None and len(names) != self.num_classes:
            raise ValueError(
                f"class_names {names} has {len(names)} name(s) but num_classes is {self.num_classes}: give one name "
                "per class (--class_names \"['normal', ...]\")."
            )
        recorded = self.ledger.get(None, "classes")
        if named is None or (recorded is not None and named == recorded["names"]):
            return
        trained = [r for r, s in self.ledger.rounds().items() if "bag_phase" in s]
        if recorded is not None and trained:
            raise RuntimeError(
                f"the datalist's labels give the classes {named} (by index), but round(s) {trained} in "
                f"{self.output_dir} were trained with {recorded['names']}; use a new output_dir, or the datalist they "
                "were trained on."
            )
        if len(named) != self.num_classes:
            warnings.warn(
                f"the datalist's labels name {len(named)} classes ({named}) but num_classes is {self.num_classes}; "
                f"the outputs keep the configured class_names {self._class_names}.",
                stacklevel=3,
            )
            return
        if named != self._class_names:
            logger.info(
                "the outputs name the classes as the datalist's labels do: %s (in place of class_names %s)",
                named, self._class_names,
            )  # fmt: skip
        if _rank() == 0:
            self.ledger.mark(None, "classes", {"names": named})

    def starting_embedder_origin(self) -> str | None:
        """Where round 0's embedder comes from: ``"SimCLR pre-trained"``, ``"weights <file>"`` or ``"random init"``;
        ``None`` when the embedder factory does not say (a user's factory without a ``weights`` argument)."""
        if self.phases["pretrain"] is not None:
            return "SimCLR pre-trained"
        keywords = getattr(self.embedder, "keywords", {})
        if "weights" not in keywords and getattr(self.embedder, "func", None) is not create_embedder:
            return None  # a user's factory: what it loads is its own business
        weights = keywords.get("weights")
        return "random init" if weights is None else f"weights {Path(str(weights)).name}"

    def _warn_random_start(self) -> None:
        """Round 0 from a random-init embedder is a choice for synthetic data, a mistake on real slides: say so."""
        if self.starting_embedder_origin() == "random init" and not self._warned_random_start:
            self._warned_random_start = True
            stain_hint = (
                ""
                if self.stain_normalize
                else " On H&E from several labs or scanners consider `--stain_normalize true`, so that the "
                "features do not follow each slide's stain (on real H&E quilted into new slides it lifted the demo "
                "settings' test AUC, most with pre-training; benchmarks/RESULTS.md)."
            )
            logger.warning(
                "round 0 starts from a random-init %s with no pre-training (`embedder#weights` is null and "
                "`workflow#pretrain` is off): fine for the synthetic demo, weak on real slides. Give ImageNet or "
                "pathology weights from a local file (`--embedder#weights /path/resnet50.pth`) or pre-train on your "
                "slides (`--config_file \"['configs/train.json','configs/pretrain.json']\"`).%s",
                self.starting_embedder_name(),
                stain_hint,
            )

    def _log_run(self, summary: Mapping[str, Any]) -> None:
        """The parent run: final metrics, the summary, the report and the tiling QC."""
        top = self.tracking.parent()
        if top is None:
            return
        final = summary["final_round"]
        top.log_metrics({"final_round": final, **coupling_metrics(summary["rows"], final, self.output_dir)})
        top.log_metrics({"failed_slides": len(self.report.failed), "empty_slides": len(self.report.empty)})
        top.log_artifacts([self.output_dir / n for n in ("summary.md", "summary.json", "rounds.png", "report.json")])
        if (summary.get("showcase") or {}).get("picture"):
            top.log_artifacts([self.output_dir / summary["showcase"]["picture"]], artifact_path="test_inference")
        roc = Path(f"round_{final}") / "test" / "roc.png"
        if (self.output_dir / roc).is_file():  # where summary.md links it, so the logged summary shows it
            top.log_artifacts([self.output_dir / roc], artifact_path=roc.parent.as_posix())
        qc = self.coords_dir / "qc"
        # at the paths summary.md links them (the run's folder layout), so the logged summary's links resolve
        top.log_artifacts([qc / "tiling.csv"], artifact_path="coords/qc")
        top.log_artifacts([qc / "overview"], artifact_path="coords/qc/overview")  # the contact sheets, in MLflow
        self._log_model(top, summary)
        self.tracking.close()

    def _log_model(self, top: Any, summary: Mapping[str, Any]) -> None:
        """The final round's embedder and bag classifier as an MLflow ``pyfunc`` in the parent run, registered under
        ``mlflow#registered_model_name`` with the round and its validation AUC as tags (:mod:`monai_icmil.serving`).
        A registry that refuses it costs a warning, not the run."""
        name = self.tracking.registered_model_name
        if name is None:
            return
        from monai_icmil.serving import log_slide_classifier, model_settings

        r = summary["final_round"]
        excluded = self.report.excluded()
        items = self.splits.items()
        slides = [  # the input example: a slide with its datalist mpp, where it has one
            {"image": e["image"], **({"mpp": e["mpp"]} if e.get("mpp") not in (None, "") else {})}
            for s in ("test", "validation")
            for e in items.get(s, [])
            if e["slide_id"] not in excluded
        ]
        path = self.round_dir(r) / "embedder_phase" / "embedder.safetensors"
        if r == 0:  # the starting (or pre-trained) embedder, as a checkpoint the model can carry
            path = self.embedder_for(0).save(self.output_dir / "model" / "embedder.safetensors")
        tags = {"round": r, "val_auc": summary["rows"][r].get("val_auc")}
        try:
            logged = log_slide_classifier(
                top.run_id, top.tracking_uri, path, self.bag_classifier_path(r), self.tiling, model_settings(self),
                slides, name, tags,
            )  # fmt: skip
        except Exception as e:
            warnings.warn(f"the final model was not logged to MLflow ({type(e).__name__}: {e})", stacklevel=2)
            return
        logger.info("final model (round %d) registered as %s version %s", r, logged["name"], logged["version"])

    # ------------------------------------------------------------------------------------------------ evaluation
    @_ends_runs_on_error
    def evaluate(self, split: str = "test", round: int | None = None) -> dict[str, Any]:
        """Metrics, predictions CSV and ROC curve of the final (or given) round on ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)} (--split)")
        r = self.trained_round(round, "eval_round")
        if split == "test":
            self.ledger.forget(r, "test")
        record = self.test(r, split)
        print(json.dumps({"round": r, "split": split, **record}, indent=2, default=str))
        return {"round": r, **record}

    @_ends_runs_on_error
    def infer(
        self,
        slides: str | Sequence[str] | Sequence[Mapping[str, Any]],
        output_dir: str | None = None,
        round: int | None = None,
        writers: Sequence[Any] = (),
        heatmap_stride: int | None = None,
    ) -> list[dict[str, Any]]:
        """Predict new slides: ``probabilities.csv`` and what ``writers`` make of each slide (the bundle's
        ``inference_writers``: heatmaps, GeoJSON, top patches, triage sheets).

        Args:
            slides: a folder (every slide file in it), a list of paths, or datalist entries.
            output_dir: where to write (default ``output_dir/inference``).
            round: the round whose models to use (default: the best by validation AUC).
            writers: :mod:`monai_icmil.handlers.writers` objects (none: probabilities only).
            heatmap_stride: maps from overlapping patches at this step (output pixels, a divisor of the patch size;
                :func:`~monai_icmil.inference.predict_slides`); ``None``: one cell per patch of the grid.
        """
        from monai_icmil.inference import predict_slides

        r = self.trained_round(round, "infer_round")
        return predict_slides(
            slides,
            self.embedder_for(r),
            self.bag_classifier_path(r),
            self.tiling,
            Path(output_dir) if output_dir else self.output_dir / "inference",
            embed=self.phases["embed"],
            writers=writers,
            device=self.device,
            backend=self.backend,
            class_names=self.class_names,
            progress=self.progress,
            stain_normalize=self.stain_normalize,
            tile_policy=self.tile_policy,
            assume_mpp=self.assume_mpp,
            heatmap_stride=None if heatmap_stride is None else int(heatmap_stride),
        )
