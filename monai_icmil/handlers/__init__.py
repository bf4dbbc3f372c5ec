# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""Handlers and writers: MLflow wiring, predictions, heatmaps."""
