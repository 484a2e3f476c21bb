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

# Heartbeats between the broker and its stages, and the PINGs of a waiting client: peers run
# on one LAN, where 250 ms notices a dead peer within about a second while costing a few
# hundred bytes per second.
HEARTBEAT_S = 0.25
# Silence after which a peer is dead (a stage to the broker, the broker to a stage): four
# heartbeats, so that a beat or two delayed by a busy host is not a death.
DEAD_AFTER_S = 1.0
# A client's patience with the broker: its first answer, and silence while a request waits
# (then the client reconnects and replays). Twelve heartbeats: a broker busy for a moment is
# not taken for lost, and a missing one is reported within seconds.
CLIENT_CONNECT_TIMEOUT_S = 3.0
CLIENT_BROKER_TIMEOUT_S = 3.0
# How long a client keeps trying to reach a lost broker before its requests fail: a broker
# restarted by hand or by a supervisor is back well within it.
CLIENT_RECONNECT_TIMEOUT_S = 30.0
# Replays per request before it fails with `replay_limit`, the same on the client and in the
# broker: each fault costs a request one replay, so more than this many during one request
# means the cluster is unstable, not unlucky.
MAX_REPLAYS = 8
# Prompt chunks the broker advises clients (STATUS `prefill_chunk`). On a CPU a chunk's compute
# holds every decode group behind it, so chunks stay short; on an accelerator a forward costs
# about the same up to a thousand tokens, so small chunks only multiply the waits. The figures
# behind both are in docs/performance.md (the long-prompt figures, CPU and GPU).
CPU_PREFILL_CHUNK = 128
ACCELERATOR_PREFILL_CHUNK = 1024


def default_broker() -> str:
    """$LAYERLINE_BROKER, else DEFAULT_BROKER."""
    return os.environ.get(BROKER_ENV) or DEFAULT_BROKER
