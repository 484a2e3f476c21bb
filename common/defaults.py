"""Defaults that several roles share, each next to the reason for its value."""

from __future__ import annotations

import os
from pathlib import Path

# The broker's ROUTER, where clients, stages and the monitor look first: loopback, so that a
# cluster started without arguments is reachable from this machine only; serving a network
# takes an explicit --bind.
DEFAULT_BROKER = "tcp://127.0.0.1:5555"
# The environment variable that points the client, its command line and the monitor at
# another broker, so that a shell session names it once.
BROKER_ENV = "LAYERLINE_BROKER"
# The built-in demo checkpoint: under the working directory's cache, so that it is built once
# per checkout and `make clean` removes it.
DEFAULT_DEMO_DIR = Path(".cache/demo-model")


def default_broker() -> str:
    """$LAYERLINE_BROKER, else DEFAULT_BROKER."""
    return os.environ.get(BROKER_ENV) or DEFAULT_BROKER
