# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""The ICMIL loop as a MONAI bundle workflow, and the small units it is made of."""

from monai_icmil.workflows.cli import check_config
from monai_icmil.workflows.icmil import ICMILWorkflow
from monai_icmil.workflows.ledger import PhaseLedger
from monai_icmil.workflows.splits import DatasetSplits
from monai_icmil.workflows.summary import summary_rows, write_summary

__all__ = ["ICMILWorkflow", "PhaseLedger", "DatasetSplits", "check_config", "summary_rows", "write_summary"]
