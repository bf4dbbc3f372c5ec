# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""pytorch-ignite engines for the ICMIL phases: embedding, bag phase, embedder phase."""

from monai_icmil.engines.bag import train_bag_classifier
from monai_icmil.engines.couple import finetune_embedder
from monai_icmil.engines.embedding import (
    EmbeddingEngine,
    EmbeddingEvents,
    PatchBatches,
    SlideFeatureWriter,
    embed_slides,
    patch_loader,
)
