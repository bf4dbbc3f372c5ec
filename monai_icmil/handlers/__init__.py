# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Handlers and writers: resume checkpoints, MLflow wiring, configured handlers, inference writers."""

from monai_icmil.handlers.checkpoint import PhaseProgress, ResumeCheckpoint, RNGState
from monai_icmil.handlers.common import EpochLoss, attach_handlers, attach_progress_bar, describe_components
from monai_icmil.handlers.tracking import MLflowRun, MLflowRunTree, mlflow_handler, start_run
from monai_icmil.handlers.writers import (
    GeoJSONWriter,
    GroundTruthWriter,
    HeatmapWriter,
    SlidePrediction,
    SlideWriter,
    TopPatchesWriter,
    TriageSheetWriter,
)


def __getattr__(name: str):
    """``WarmEarlyStopHandler`` on first use (it loads ``monai.handlers``, which ``import monai_icmil`` does not)."""
    if name == "WarmEarlyStopHandler":
        from monai_icmil.handlers.early_stop import WarmEarlyStopHandler

        return WarmEarlyStopHandler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
