"""Command line of a stage worker: ``python -m stage --broker tcp://HOST:PORT [--model DIR]``.

Exit codes: 0 done (drained or stopped), 2 bad arguments or checkpoint, 3 refused by the
broker (another checkpoint or dtype), 128+N killed by a second signal N.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import NoReturn

from broker.messages import COMPUTE_DTYPES, MAX_BATCH, MAX_CREDITS, MAX_NAME_LENGTH
from common.defaults import DEAD_AFTER_S, DEFAULT_DEMO_DIR, HEARTBEAT_S
from common.keys import KeyFileError, peer_keys
from common.models import builtin_model
from common.weights import QUANTIZED_KINDS, WEIGHT_KINDS
from stage.config import (
    DEFAULT_CREDITS,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_KV_MB,
    DEFAULT_MAX_BATCH,
    EXIT_USAGE,
)

# Idle OpenMP threads spin-wait by default and steal the core that the next stage on the same
# machine needs, which slows decode badly when stages share cores. Set before torch is
# imported (the worker imports it lazily).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Only the standard library, the ground floor's constants and stage.config's above this line:
# arguments are checked, and torch's thread pools sized, before torch is imported and does any
# work.

DEVICE_CHOICES = ("cpu", "cuda")
_URL = re.compile(
    r"^(?P<scheme>tcp)://(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\s]+):(?P<port>\d+)$|^ipc://\S+$"
)


class UsageError(Exception):
    """An argument that cannot work; the process exits 2 with this one-line message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: str) -> NoReturn:
    print(f"python -m stage: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m stage", description="Run one layerline stage worker.")
    p.add_argument("--broker", required=True, help="broker URL, e.g. tcp://127.0.0.1:5555")
    p.add_argument(
        "--cert",
        type=Path,
        default=None,
        help="this stage's secret certificate (NAME.key_secret from `python -m broker.keys`), "
        "for a broker with keys",
    )
    p.add_argument(
        "--broker-key",
        default=None,
        help="the broker's public key: its broker.key file, or the 40-character key",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="local checkpoint: a Hugging Face directory, a GGUF file, or a directory holding "
        f"one (default: the built-in SmolLM2-135M-Instruct; {DEFAULT_DEMO_DIR} is a tiny random "
        "one, built on first use)",
    )
    p.add_argument("--name", help="stable stage name (default: HOST-PID)")
    p.add_argument(
        "--memory-mb",
        type=int,
        help="memory offered for weights (default: available RAM or free CUDA memory)",
    )
    p.add_argument("--device", default="cpu", choices=DEVICE_CHOICES)
    p.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES)
    p.add_argument(
        "--weights",
        choices=WEIGHT_KINDS,
        default=None,
        help="how the weight matrices are held: float32 or bfloat16, or int8 or q4 blocks "
        "(quantized at load), or native (a GGUF file's own blocks); the products of the last "
        "three are not bit-exact (default: as --dtype, exact)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch intra-op threads (default: all cores)",
    )
    p.add_argument(
        "--credits",
        type=int,
        default=DEFAULT_CREDITS,
        help="FORWARDs held at once (default %(default)s)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help="decode steps of different requests run as one batch (1: off, batch-invariant)",
    )
    p.add_argument(
        "--kv-mb", type=int, default=DEFAULT_KV_MB, help="KV cache memory before LRU eviction"
    )
    p.add_argument(
        "--no-row-kernel",
        dest="row_kernel",
        action="store_false",
        help="multiply decode groups with BLAS, not the row kernel that a one-thread float32 "
        "CPU stage uses by default (saves about 130 MiB: numba's runtime)",
    )
    p.add_argument(
        "--heartbeat", type=float, default=HEARTBEAT_S, help="heartbeat interval, seconds"
    )
    p.add_argument(
        "--dead-after",
        type=float,
        default=DEAD_AFTER_S,
        help="broker silence after which it is lost, seconds",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help="after SIGTERM, exit at the latest after this many seconds",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def check_url(url: str) -> None:
    m = _URL.match(url)
    if m is None:
        raise UsageError(f"--broker {url!r} is not a ZeroMQ URL like tcp://127.0.0.1:5555")
    if m.group("scheme") != "tcp":
        return
    host, port = m.group("host").strip("[]"), int(m.group("port"))
    if not 0 < port < 65536:
        raise UsageError(f"--broker {url!r}: port {port} is out of range 1-65535")
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise UsageError(f"--broker {url!r}: cannot resolve host {host!r} ({e})") from None


def check_numbers(args: argparse.Namespace) -> None:
    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    # The broker refuses a READY outside these bounds; say so here, before anything loads.
    if not 1 <= args.credits <= MAX_CREDITS:
        raise UsageError(f"--credits must be between 1 and {MAX_CREDITS}")
    if not 1 <= args.max_batch <= MAX_BATCH:
        raise UsageError(f"--max-batch must be between 1 and {MAX_BATCH}")
    if args.name is not None and not 1 <= len(args.name) <= MAX_NAME_LENGTH:
        raise UsageError(f"--name must be 1 to {MAX_NAME_LENGTH} characters")
    if args.kv_mb < 0:
        raise UsageError("--kv-mb must not be negative")
    if args.memory_mb is not None and args.memory_mb < 1:
        raise UsageError("--memory-mb must be at least 1")
    if args.heartbeat <= 0:
        raise UsageError("--heartbeat must be positive")
    if args.dead_after <= args.heartbeat:
        raise UsageError(
            f"--dead-after ({args.dead_after}) must exceed --heartbeat ({args.heartbeat})"
        )
    if args.drain_timeout < 0:
        raise UsageError("--drain-timeout must not be negative")


def configure_logging(level: str) -> None:
    from common.logs import configure_logging as configure

    configure(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_numbers(args)
        check_url(args.broker)
        keys = peer_keys(args.cert, args.broker_key)
    except (UsageError, KeyFileError) as e:
        _fail(str(e))
    if args.model is None:
        try:
            args.model = builtin_model()
        except ValueError as e:  # CheckpointError: the built-in model is not installed
            _fail(str(e))
    if args.model != DEFAULT_DEMO_DIR and not args.model.exists():
        _fail(f"checkpoint {args.model} does not exist")  # before seconds of imports

    import torch

    # Several stages may share a few cores: each takes only the threads it was given.
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    configure_logging(args.log_level)

    import psutil

    from common.checkpoint import CheckpointError
    from stage.adapters import UnsupportedArchitecture, adapter_for
    from stage.checkpoint import open_checkpoint
    from stage.config import StageConfig
    from stage.devices import check_device, resolve_dtype
    from stage.resident import reset_peak, resident
    from stage.shard import ShardError
    from stage.weights import held_weights
    from stage.worker import StageWorker

    try:
        device = check_device(args.device, resolve_dtype(args.dtype))
        # Exact unless asked: block products round differently from transformers' (with
        # 8-bit activations, SmolLM2's demo answer changes; docs/performance.md).
        args.weights, convert = held_weights(
            args.weights or args.dtype, resolve_dtype(args.dtype), device
        )
    except ShardError as e:
        _fail(str(e))
    model = args.model
    try:
        if model == DEFAULT_DEMO_DIR:
            from stage.demo_model import ensure_demo_model

            model = ensure_demo_model(model)
        checkpoint = open_checkpoint(model)
        adapter_for(checkpoint.config)
    except (CheckpointError, UnsupportedArchitecture, OSError) as e:
        _fail(str(e))

    # The row kernel runs on one thread only; with more, BLAS's products use them all.
    row_kernel = args.row_kernel and args.device == "cpu" and args.threads == 1
    if convert in QUANTIZED_KINDS:
        from stage import quant  # noqa: F401  (its kernels compiled or loaded now, as below)
    if row_kernel:
        # Compiled or loaded from its cache now: before the memory on offer is measured, and
        # before the stage registers, so that no ASSIGN waits for it.
        from stage import kernels  # noqa: F401

    if args.memory_mb is not None:
        memory_bytes = args.memory_mb * 1024 * 1024
    elif args.device == "cuda":
        memory_bytes = torch.cuda.mem_get_info()[0]
    else:
        memory_bytes = psutil.virtual_memory().available
    # What the stage holds before any layer, and its peak so far (imports, the checkpoint's
    # index); the peak restarts here, so the one read later is that of its loads and forwards.
    held = resident()
    reset_peak()
    config = StageConfig(
        broker=args.broker,
        keys=keys,
        model=Path(model),
        name=args.name or f"{socket.gethostname()}-{os.getpid()}",
        memory_bytes=memory_bytes,
        runtime_bytes=held.rss,
        runtime_file_bytes=held.file,
        runtime_peak_bytes=held.peak,
        device=args.device,
        dtype=args.dtype,
        weights=args.weights,
        threads=args.threads,
        credits=args.credits,
        max_batch=args.max_batch,
        kv_bytes=args.kv_mb * 1024 * 1024,
        heartbeat=args.heartbeat,
        dead_after=args.dead_after,
        drain_timeout=args.drain_timeout,
        row_kernel=row_kernel,
    )
    worker = StageWorker(config, checkpoint)

    def on_signal(signum: int, _frame) -> None:
        if worker.leaving:
            worker.log.warning("exit", reason=f"second {signal.Signals(signum).name}")
            os._exit(128 + signum)
        worker.leave()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = worker.run()
    if worker.compute_alive:
        # A forward is still running in C code; nothing is left to hand over, so do not wait.
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
