"""`python -m broker`: the ROUTER that tracks stages, owns the layer map and routes steps."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import structlog

from broker.auth import is_loopback
from broker.broker import BindError, Broker
from broker.layermap import STRATEGIES
from broker.messages import COMPUTE_DTYPES
from broker.protocol import DEFAULT_LIMITS, feed_endpoint
from broker.records import BrokerConfig
from broker.tokenizer import TokenizerSource
from common.checkpoint import CheckpointError, CheckpointMeta, read_checkpoint
from common.defaults import DEFAULT_DEMO_DIR
from common.keys import BROKER_NAME, PRIVATE_DIR, ROLE_DIRS, KeyFileError, ServerKeys
from common.logs import configure_logging
from common.models import builtin_model
from common.text import ships_tokenizer

D = BrokerConfig()
# A TOKENIZER reply's chunk travels in one frame: 64 MiB, far under --max-frame-mb's default.
MAX_CHUNK_KB = 64 << 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m broker", description=__doc__)
    p.add_argument("--bind", default=D.bind, help="ROUTER endpoint (default %(default)s)")
    p.add_argument(
        "--model",
        default=None,
        help="local checkpoint: a Hugging Face directory, a GGUF file, or a directory holding "
        f"one (default: the built-in SmolLM2-135M-Instruct; {DEFAULT_DEMO_DIR} is a tiny random "
        "one, built on first use)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=D.strategy,
        help="balanced: even compute per stage, the head counted (default); uniform: even "
        "layer counts; capacity: layers in proportion to each stage's --memory-mb",
    )
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=D.dtype)
    p.add_argument(
        "--expect-stages",
        type=int,
        default=D.expect_stages,
        help="form the first layer map once this many stages registered (or after --settle)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=D.settle_s,
        help="seconds of no joins before forming the map",
    )
    p.add_argument("--heartbeat", type=float, default=D.heartbeat_s)
    p.add_argument("--dead-after", type=float, default=D.dead_after_s)
    p.add_argument(
        "--load-grace",
        type=float,
        default=D.load_grace_s,
        help="silence after which a stage that is loading its layers is dead (default %(default)s)",
    )
    p.add_argument("--stall-floor", type=float, default=D.stall_floor_s)
    p.add_argument("--ready-wait", type=float, default=D.ready_wait_s)
    p.add_argument(
        "--client-timeout",
        type=float,
        default=D.client_timeout_s,
        help="seconds without a message from a client (it PINGs while it waits for a request) "
        "after which its requests end (`abandoned`); a client still there is told so in a "
        "replay EVENT and rebuilds them (default %(default)s)",
    )
    p.add_argument(
        "--client-gone-after",
        type=float,
        default=D.client_gone_after_s,
        help="seconds after a client's last connection closed (its process died) at which its "
        "requests end and their caches are freed (default %(default)s)",
    )
    p.add_argument("--rebalance-cooldown", type=float, default=D.rebalance_cooldown_s)
    p.add_argument(
        "--max-queue",
        type=int,
        default=D.max_queue,
        help="admission: new requests are refused `busy` while this many steps wait in the "
        "broker (all stages' queues together); the steps of admitted requests are always "
        "taken (default %(default)s)",
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=D.max_requests,
        help="active requests; a new one beyond it is refused `busy` (default %(default)s)",
    )
    p.add_argument(
        "--max-client-requests",
        type=int,
        default=D.max_client_requests,
        help="active requests of one client; a new one beyond it is refused `busy` "
        "(default %(default)s)",
    )
    p.add_argument("--max-replays", type=int, default=D.max_replays)
    p.add_argument(
        "--stage-window",
        type=int,
        default=D.stage_window,
        help="FORWARDs outstanding at a stage at once; the rest wait and batch (default %(default)s)",
    )
    p.add_argument(
        "--forward-tokens",
        type=int,
        default=D.forward_tokens,
        help="tokens one FORWARD carries past its first step (default %(default)s)",
    )
    p.add_argument(
        "--batch-linger-ms",
        type=float,
        default=D.batch_linger_s * 1e3,
        help="how long the first stage waits for requests about to answer, so that their "
        "steps travel as one batch; 0 turns it off (default %(default)s)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=D.prefill_chunk,
        help="prompt chunk advised to clients in STATUS; 0 chooses from the stages' devices: "
        "128 tokens with any CPU stage, 1024 when every stage has an accelerator (default 0)",
    )
    p.add_argument(
        "--tokenizer-chunk-kb",
        type=int,
        default=D.tokenizer_chunk_bytes >> 10,
        help="KiB of the tokenizer files per TOKENIZER reply (default %(default)s)",
    )
    p.add_argument("--max-frame-mb", type=int, default=DEFAULT_LIMITS.max_frame_bytes >> 20)
    p.add_argument(
        "--feed",
        default=None,
        help="monitor feed PUB endpoint (default: the --bind port + 1; 'none' disables it)",
    )
    keys = p.add_argument_group(
        "keys (CurveZMQ)",
        "encrypt every connection and admit only known keys, by role; "
        "make them with `python -m broker.keys DIR`",
    )
    keys.add_argument(
        "--keys",
        type=Path,
        default=None,
        metavar="DIR",
        help="the layout `python -m broker.keys DIR` wrote: DIR/private/broker.key_secret and "
        "DIR/stages, DIR/clients, DIR/admins",
    )
    keys.add_argument("--cert", type=Path, default=None, help="the broker's NAME.key_secret")
    for role, folder in ROLE_DIRS.items():
        keys.add_argument(
            f"--{role}-keys",
            type=Path,
            default=None,
            metavar="DIR",
            help=f"the public keys allowed as {folder} (default: --keys DIR/{folder})",
        )
    keys.add_argument(
        "--insecure",
        action="store_true",
        help="bind off loopback without keys: anyone who reaches the port can register a "
        "stage, read hidden states and submit work",
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address for --metrics-port")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def open_model(model: str | None) -> CheckpointMeta:
    """The --model checkpoint (None: the built-in model); the demo one is built first where it
    is missing or incomplete.

    The builder needs torch, which the broker never imports: it runs in a subprocess.
    """
    if model is None:
        return read_checkpoint(builtin_model())
    if model != str(DEFAULT_DEMO_DIR):
        return read_checkpoint(model)
    try:
        checkpoint = read_checkpoint(model)
        if ships_tokenizer(checkpoint.path):
            return checkpoint
    except CheckpointError:
        pass
    build = subprocess.run(
        [sys.executable, "-m", "stage.demo_model", "--if-missing", model], stdout=subprocess.DEVNULL
    )
    if build.returncode != 0:
        raise CheckpointError(
            f"building the demo checkpoint with `python -m stage.demo_model {model}` failed "
            f"(exit code {build.returncode})"
        )
    return read_checkpoint(model)


def server_keys(args: argparse.Namespace) -> ServerKeys | None:
    """The broker's keys from --keys / --cert / --ROLE-keys; None when none are given.
    KeyFileError when they are incomplete or unreadable, or when the bind address is off
    loopback without keys or --insecure."""
    dirs = {role: getattr(args, f"{role}_keys") for role in ROLE_DIRS}
    cert = args.cert
    if args.keys is not None:
        cert = cert or args.keys / PRIVATE_DIR / f"{BROKER_NAME}.key_secret"
        dirs = {role: d or args.keys / ROLE_DIRS[role] for role, d in dirs.items()}
    if cert is None and not any(dirs.values()):
        if not is_loopback(args.bind) and not args.insecure:
            raise KeyFileError(
                f"--bind {args.bind} is reachable from other hosts, and without keys anyone "
                "there could register a stage, read every request's hidden states and submit "
                "work. Make keys with `python -m broker.keys DIR --stages ... --clients ...` "
                "and start with --keys DIR; or bind to 127.0.0.1; or pass --insecure on a "
                "network you trust"
            )
        return None
    if cert is None:
        raise KeyFileError("role key directories need the broker's certificate: --cert or --keys")
    missing = [f"--{role}-keys" for role, d in dirs.items() if d is None]
    if missing:
        raise KeyFileError(f"with --cert, give {' and '.join(missing)} too (or use --keys DIR)")
    return ServerKeys.load(cert, dirs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        keys = server_keys(args)
    except KeyFileError as e:
        print(f"broker: {e}", file=sys.stderr)
        return 2
    if (
        args.stage_window < 1
        or args.forward_tokens < 1
        or args.batch_linger_ms < 0
        or args.prefill_chunk < 0
        or not 1 <= args.tokenizer_chunk_kb <= MAX_CHUNK_KB
    ):
        print(
            "broker: --stage-window and --forward-tokens must be at least 1, "
            "--batch-linger-ms and --prefill-chunk at least 0, --tokenizer-chunk-kb in "
            f"[1, {MAX_CHUNK_KB}]",
            file=sys.stderr,
        )
        return 2
    log = structlog.get_logger("broker")
    try:
        checkpoint = open_model(args.model)
        # Every tensor's digest, which each LOADED is checked against: hashed now, once per
        # checkpoint, or read from its digest file.
        started = time.perf_counter()
        table = checkpoint.digest_table
    except CheckpointError as e:
        print(f"broker: {e}", file=sys.stderr)
        return 2
    log.info(
        "tensor_digests",
        tensors=len(table.digests),
        hashed_mb=table.hashed_bytes >> 20,
        seconds=round(time.perf_counter() - started, 3),
        file=str(table.file),
    )
    tokenizer = TokenizerSource(checkpoint)
    if tokenizer.bundle is not None:
        bundle = tokenizer.bundle
        log.info("tokenizer_served", bytes=len(bundle.data), files=list(bundle.files))
    feed = args.feed
    if feed is None:
        with contextlib.suppress(ValueError):  # an endpoint with no port to add one to: no feed
            feed = feed_endpoint(args.bind)
    config = BrokerConfig(
        bind=args.bind,
        strategy=args.strategy,
        dtype=args.dtype,
        heartbeat_s=args.heartbeat,
        dead_after_s=args.dead_after,
        load_grace_s=args.load_grace,
        stall_floor_s=args.stall_floor,
        ready_wait_s=args.ready_wait,
        client_timeout_s=args.client_timeout,
        client_gone_after_s=args.client_gone_after,
        max_queue=args.max_queue,
        max_requests=args.max_requests,
        max_client_requests=args.max_client_requests,
        max_replays=args.max_replays,
        stage_window=args.stage_window,
        forward_tokens=args.forward_tokens,
        batch_linger_s=args.batch_linger_ms / 1e3,
        prefill_chunk=args.prefill_chunk,
        expect_stages=args.expect_stages,
        settle_s=args.settle,
        rebalance_cooldown_s=args.rebalance_cooldown,
        limits=dataclasses.replace(DEFAULT_LIMITS, max_frame_bytes=args.max_frame_mb << 20),
        tokenizer_chunk_bytes=args.tokenizer_chunk_kb << 10,
        feed=None if feed == "none" else feed,
        keys=keys,
        insecure=keys is None and not is_loopback(args.bind),
    )
    try:
        broker = Broker(config, checkpoint, tokenizer=tokenizer)
    except BindError as e:
        tokenizer.close()
        print(f"broker: {e}", file=sys.stderr)
        return 2
    if args.metrics_port is not None:
        try:
            broker.metrics.serve(args.metrics_port, args.metrics_addr)
        except OSError as e:
            print(
                f"broker: cannot serve metrics on {args.metrics_addr}:{args.metrics_port}: {e}",
                file=sys.stderr,
            )
            tokenizer.close()
            return 2
        log.info("metrics_serving", url=f"http://{args.metrics_addr}:{args.metrics_port}/metrics")
    if config.insecure:
        log.warning(
            "insecure",
            bind=args.bind,
            reason="no keys off loopback (--insecure): traffic is in clear and anyone who "
            "reaches the port is trusted",
        )
    elif keys is not None:
        log.info("keys_loaded", **keys.ring.counts())
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    signal.signal(signal.SIGINT, lambda *_: broker.stop())
    broker.run()
    log.info("exit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
