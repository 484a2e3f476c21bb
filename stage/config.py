"""What a stage is asked to do, the defaults of each setting with the reason for its value, and
the exit codes of `python -m stage`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.defaults import DEAD_AFTER_S, HEARTBEAT_S

if TYPE_CHECKING:
    from common.keys import PeerKeys

# Defaults, as in docs/protocol.md ("Limits and timeouts").
# Credits bound the steps a stage holds; batching needs several of them queued at once, and
# 32 covers 16 streams with room for replays while keeping a bounded queue.
DEFAULT_CREDITS = 32
# Decode steps of different requests run as one batch up to this size; 1 turns batching off
# (batch-invariant results, bit-exact with the monolithic forward under any load).
DEFAULT_MAX_BATCH = 32
DEFAULT_KV_MB = 1024
# Long enough for the broker to move this stage's layers and replay the requests it held.
DEFAULT_DRAIN_TIMEOUT_S = 30.0

# Exit codes, as `python -m stage` documents them. Here, not in stage.link, because the command
# line needs EXIT_USAGE before it imports torch.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3


@dataclass(frozen=True)
class StageConfig:
    """What `python -m stage` was asked to do."""

    broker: str
    model: Path
    name: str
    memory_bytes: int
    # Resident before any layer is loaded: the interpreter, torch, transformers, the row
    # kernel and the checkpoint's index. A stage's memory is this plus what its layers take.
    runtime_bytes: int = 0
    # Of it, pages mapped from files (the libraries' code): clean, shared by the stages of a
    # host, and more of them are mapped as kernels first run, whatever the layers.
    runtime_file_bytes: int = 0
    # The peak before any layer (imports, parsing the checkpoint's index). The process's peak
    # is reset after it is read (Linux), so the peak read later is that of the layers' loads
    # and the forwards.
    runtime_peak_bytes: int = 0
    keys: PeerKeys | None = None  # CURVE: this stage's certificate and the broker's key
    device: str = "cpu"
    dtype: str = "float32"
    # How the weight matrices are held (common/weights.py); None: in the compute dtype.
    weights: str | None = None
    threads: int = 1
    credits: int = DEFAULT_CREDITS
    max_batch: int = DEFAULT_MAX_BATCH
    kv_bytes: int = DEFAULT_KV_MB * 1024 * 1024
    heartbeat: float = HEARTBEAT_S
    dead_after: float = DEAD_AFTER_S
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S
    # Decode groups of a float32 CPU shard take stage.kernels' row kernel on one thread.
    row_kernel: bool = True
