# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The final model as an MLflow model: a ``pyfunc`` that takes slide paths and returns the slide probabilities that
``probabilities.csv`` holds, logged in the training run and registered in its model registry.

    import mlflow
    mlflow.set_tracking_uri("sqlite:///outputs/mlruns.db"); mlflow.set_registry_uri("sqlite:///outputs/mlruns.db")
    model = mlflow.pyfunc.load_model("models:/icmil/1")
    model.predict(pandas.DataFrame({"image": ["/data/slide_1.svs", "/data/slide_2.svs"]}))

Where monai-icmil is installed, MLflow's tools take it like any ``pyfunc`` (e.g. ``mlflow models serve -m
models:/icmil/1 --env-manager local``; the tests exercise ``load_model`` and ``predict`` only).
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import mlflow.pyfunc
import pandas as pd

from monai_icmil.handlers.tracking import using_store

__all__ = ["SlideClassifierModel", "log_slide_classifier", "model_settings", "INPUT_COLUMN"]

INPUT_COLUMN = "image"
#: the optional input column of each slide's level-0 microns per pixel (for a file without one, or a wrong one)
MPP_COLUMN = "mpp"


def _given_mpp(value: Any, path: str) -> float | None:
    """An input row's mpp: ``None`` where it is missing (empty, NaN), else the number (checked as the datalist's,
    naming the slide)."""
    from monai_icmil.data.slide import as_mpp

    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if math.isnan(float(value)):
            return None
    except (TypeError, ValueError):
        pass
    return as_mpp(value, f"mpp of slide '{path}' in the input")


def _inputs(model_input: Any) -> tuple[list[str], list[float | None]]:
    """Slide paths and their given mpp (``None``: the file's) from a DataFrame (its ``image`` column and an optional
    ``mpp`` column), a dict (of lists or of one slide), a list of paths, or one path."""
    if hasattr(model_input, "columns"):
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(
                f"the input table needs an '{INPUT_COLUMN}' column of slide paths, got {list(model_input.columns)}"
            )
        paths = [str(p) for p in model_input[INPUT_COLUMN]]
        mpps = list(model_input[MPP_COLUMN]) if MPP_COLUMN in model_input.columns else [None] * len(paths)
        return paths, [_given_mpp(m, p) for m, p in zip(mpps, paths)]  # (a table's columns are of one length)
    if isinstance(model_input, Mapping):
        if INPUT_COLUMN not in model_input:
            raise ValueError(f"the input needs an '{INPUT_COLUMN}' key of slide paths, got {list(model_input)}")
        given, mpps = model_input[INPUT_COLUMN], model_input.get(MPP_COLUMN)
        if isinstance(given, (str, os.PathLike)):
            return [str(given)], [_given_mpp(mpps, str(given))]
        paths = [str(p) for p in given]
        if mpps is None or isinstance(mpps, (str, int, float)):  # one value (or none) for every slide
            mpps = [mpps] * len(paths)
        if len(mpps) != len(paths):
            raise ValueError(
                f"the input gives {len(mpps)} '{MPP_COLUMN}' value(s) for {len(paths)} slide(s): give one "
                "per slide (None where the file's is right)"
            )
        return paths, [_given_mpp(m, p) for m, p in zip(mpps, paths)]
    paths = [str(model_input)] if isinstance(model_input, (str, os.PathLike)) else [str(p) for p in model_input]
    return paths, [None] * len(paths)


def _existing(paths: list[str], mpps: list[float | None]) -> tuple[list[str], list[float | None]]:
    """The paths that name a file (with their mpp); the others are left out with a warning (as a slide that fails
    is)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        warnings.warn(f"slide(s) not found, left out: {', '.join(missing)}", stacklevel=3)
    kept = [(p, m) for p, m in zip(paths, mpps) if p not in missing]
    return [p for p, _ in kept], [m for _, m in kept]


class SlideClassifierModel(mlflow.pyfunc.PythonModel):
    """One round's embedder and bag classifier with the run's tiling, as an MLflow ``pyfunc``.

    Args:
        tiling: the training run's tiling transforms (pickled with the model).
        settings: ``class_names``, ``stain_normalize``, ``backend``, ``assume_mpp``, ``embed`` (the embed phase's
            settings) and ``device`` (``None``: CUDA when available).

    ``predict`` takes a table with an ``image`` column of slide paths and an optional ``mpp`` column (a slide's
    level-0 microns per pixel, for a file without one or with a wrong one; empty: the file's). It tiles, embeds and
    scores the slides in a temporary folder (:func:`~monai_icmil.inference.predict_slides`) and returns one row per
    scored slide: ``slide`` (the file name's stem, made unique),
    ``image`` (the path as given) and ``prob_<class>`` per class. A slide that fails or does not exist is left out
    (as in ``probabilities.csv``), with the reason in a warning; when none is scored the table is empty and a
    warning gives the counts.
    """

    def __init__(self, tiling: Any, settings: Mapping[str, Any]):
        self.tiling, self.settings = tiling, dict(settings)

    def load_context(self, context: Any) -> None:
        from monai_icmil.networks import create_embedder

        self.embedder = create_embedder(None, weights=context.artifacts["embedder"])
        self.bag_classifier = context.artifacts["bag_classifier"]

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        # (a DataFrame hint: MLflow takes the schema from the logged signature, not from the hint)
        names = self.settings.get("class_names") or [str(k) for k in range(self._num_classes())]
        paths, mpps = _existing(*_inputs(model_input))
        rows = self._scored(paths, mpps, names) if paths else []
        columns = ["slide", INPUT_COLUMN] + [f"prob_{c}" for c in names]
        return pd.DataFrame([[r["slide_id"], r["image"], *map(float, r["probs"])] for r in rows], columns=columns)

    def _num_classes(self) -> int:
        """The bag classifier's number of classes (a model logged without class names, e.g. before they were
        filled in from the run)."""
        from monai_icmil.engines.bag_phase import load_bag_classifier

        if getattr(self, "_classes", None) is None:
            self._classes = int(load_bag_classifier(self.bag_classifier).num_classes)
        return self._classes

    def _scored(self, paths: list[str], mpps: list[float | None], names: list[str]) -> list[dict[str, Any]]:
        """:func:`~monai_icmil.inference.predict_slides`' rows in a temporary folder (none scored: ``[]``)."""
        from monai_icmil.data.integrity import TileErrorPolicy
        from monai_icmil.engines.embed import Embed
        from monai_icmil.inference import NoSlideScored, predict_slides, slide_entries
        from monai_icmil.utils import default_device

        with tempfile.TemporaryDirectory(prefix="icmil_pyfunc_") as tmp:
            try:
                return predict_slides(
                    slide_entries(paths, mpps),
                    self.embedder,
                    self.bag_classifier,
                    self.tiling,
                    tmp,
                    embed=Embed(**{**self.settings.get("embed", {}), "progress": False}),
                    device=default_device(self.settings.get("device")),
                    backend=self.settings.get("backend", "auto"),
                    class_names=names,
                    progress=False,
                    stain_normalize=bool(self.settings.get("stain_normalize", False)),
                    assume_mpp=self.settings.get("assume_mpp"),
                    tile_policy=TileErrorPolicy(**self.settings.get("tile_policy", {})),
                )
            except NoSlideScored as error:  # the request's answer is an empty table, as for each failed slide
                warnings.warn(error.describe(), stacklevel=3)  # (the temporary folder with report.json is gone)
                return []


def log_slide_classifier(
    run_id: str,
    tracking_uri: str,
    embedder_path: str | os.PathLike,
    bag_classifier_path: str | os.PathLike,
    tiling: Any,
    settings: Mapping[str, Any],
    example_slides: Sequence[str],
    registered_model_name: str | None = "icmil",
    tags: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Log the model into run ``run_id`` (artifact ``model``; the run is ended as MLflow ends a run it was given)
    and register it as the next version of
    ``registered_model_name`` in the same store, with ``tags`` on the version.

    Args:
        run_id: the training's parent run.
        tracking_uri: its store (tracking and registry, e.g. ``sqlite:///<output_dir>/mlruns.db``).
        embedder_path, bag_classifier_path: the final round's embedder checkpoint and bag classifier.
        tiling: the run's tiling transforms.
        settings: see :class:`SlideClassifierModel`.
        example_slides: slides for the input example: paths, or datalist entries (``image``, and ``mpp`` where the
            datalist gives one); the first is used, and MLflow scores it once to check the model serves.
        registered_model_name: the registry name (``None``: log without registering).
        tags: the version's tags (e.g. the round and its validation AUC).

    Returns:
        ``{"model_uri", "name", "version"}`` (``version`` ``None`` when not registered).
    """
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema

    import monai_icmil

    model = SlideClassifierModel(tiling, settings)
    artifacts = {"embedder": str(embedder_path), "bag_classifier": str(bag_classifier_path)}
    if not len(example_slides):
        raise ValueError("log_slide_classifier: example_slides is empty; give one slide path for the input example")
    first = example_slides[0]
    first = dict(first) if isinstance(first, Mapping) else {INPUT_COLUMN: first}
    example = pd.DataFrame({INPUT_COLUMN: [str(first[INPUT_COLUMN])]})
    if first.get(MPP_COLUMN) is not None:
        example[MPP_COLUMN] = [float(first[MPP_COLUMN])]
    names = settings.get("class_names") or ["0", "1"]
    output = pd.DataFrame({"slide": ["s"], INPUT_COLUMN: ["s.svs"], **{f"prob_{c}": [0.5] for c in names}})
    inputs = Schema([ColSpec("string", INPUT_COLUMN), ColSpec("double", MPP_COLUMN, required=False)])
    signature = ModelSignature(inputs=inputs, outputs=infer_signature(example, output).outputs)
    requirements = [f"monai-icmil=={monai_icmil.__version__}"]
    with using_store(tracking_uri):
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=model,
                artifacts=artifacts,
                signature=signature,
                input_example=example,
                pip_requirements=requirements,
                registered_model_name=registered_model_name,
            )
        version = None
        if registered_model_name:
            version = info.registered_model_version
            for key, value in (tags or {}).items():
                client.set_model_version_tag(registered_model_name, version, key, str(value))
    return {"model_uri": info.model_uri, "name": registered_model_name, "version": version}


def model_settings(workflow: Any) -> dict[str, Any]:
    """What :class:`SlideClassifierModel` needs of a workflow besides its files."""
    embed, policy = workflow.phases["embed"], workflow.tile_policy
    return {
        "class_names": list(workflow.class_names or [str(k) for k in range(workflow.num_classes)]),
        "stain_normalize": workflow.stain_normalize,
        "backend": workflow.backend,
        "assume_mpp": workflow.assume_mpp,
        "device": None,
        "tile_policy": {"on_tile_error": policy.on_tile_error, "max_damaged_fraction": policy.max_damaged_fraction},
        "embed": {
            "batch_size": embed.batch_size,
            "num_workers": 0,
            "read_threads": embed.read_threads,
            "dtype": embed.dtype,
            "amp": embed.amp,
            "channels_last": embed.channels_last,
            "compile": False,  # each request builds its engine: compiling would be paid on every request
        },
    }
