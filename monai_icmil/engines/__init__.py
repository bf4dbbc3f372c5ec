# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The ICMIL phases, each a configured component over pytorch-ignite engines: embed, bag phase, embedder phase,
pretrain."""

from monai_icmil.engines.bag_phase import BagPhase, BagPhaseEvaluator, BagPhaseTrainer, BagSelection
from monai_icmil.engines.embed import (
    Embed,
    EmbeddingEngine,
    EmbeddingEvents,
    PatchBatches,
    SlideFeatureWriter,
    patch_loader,
)
from monai_icmil.engines.embedder_phase import EmbedderPhase, EmbedderPhaseTrainer, StudentSelection
from monai_icmil.engines.pretrain import Pretrain, PretrainTrainer
from monai_icmil.engines.witness_search import SingleClassError, WitnessSearch, WitnessSearchResult
