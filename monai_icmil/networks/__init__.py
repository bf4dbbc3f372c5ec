# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Networks: patch embedders and MIL aggregators (an open registry)."""

from monai_icmil.networks.aggregators import (
    ABMIL,
    AGGREGATORS,
    DTFDMIL,
    MaxPoolMIL,
    MeanPoolMIL,
    MILAggregator,
    TransformerMIL,
    aggregator_class,
    aggregator_factory,
    aggregator_name,
    create_aggregator,
    register_aggregator,
)
from monai_icmil.networks.embedders import EmbedderWeightsError, PatchEmbedder, create_embedder, load_state_dict_file
