# Copyright (c) monai-icmil contributors
# Licensed under the Apache License, Version 2.0 (the "License");
"""MONAI's :class:`~monai.handlers.StatsHandler`, logging through the application's logging set-up."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["stats_handler"]


def stats_handler(name: str, **kwargs: Any) -> Any:
    """A :class:`~monai.handlers.StatsHandler` whose records reach the handlers the application configured.

    MONAI builds the handler's logger with ``monai.apps.get_logger``, which turns propagation off and adds its own
    stdout handler only to a logger that does not exist yet. For one of our module loggers, which exist from import
    on, every epoch summary was dropped. Here the logger is created first (so MONAI adds no handler) and propagation
    is turned back on: the records go wherever logging is configured (the bundle's ``logging.conf``, pytest).

    Args:
        name: logger name, e.g. ``"monai_icmil.bag"``.
        kwargs: the other :class:`~monai.handlers.StatsHandler` arguments.
    """
    from monai.handlers import StatsHandler

    logger = logging.getLogger(name)
    handler = StatsHandler(name=name, **kwargs)
    logger.propagate = True
    return handler
