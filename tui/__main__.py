"""`python -m tui --broker URL [--feed URL] [--cert C --broker-key K]`: the cluster monitor."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from common.defaults import default_broker


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tui", description=__doc__)
    p.add_argument(
        "--broker",
        default=default_broker(),
        help="the broker's ROUTER endpoint (default %(default)s, or $LAYERLINE_BROKER)",
    )
    p.add_argument(
        "--feed", default=None, help="the broker's feed endpoint (default: the --broker port + 1)"
    )
    p.add_argument(
        "--cert",
        default=None,
        help="the monitor's secret certificate (a client or admin NAME.key_secret), for a "
        "broker with keys; an admin key may drain",
    )
    p.add_argument(
        "--broker-key",
        default=None,
        help="the broker's public key: its broker.key file, or the 40-character key",
    )
    p.add_argument(
        "--log-file", default=None, help="write the monitor's own logs here (default: nowhere)"
    )
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def configure_quiet_logging(log_file: str | None, level: str) -> None:
    """The screen belongs to the TUI: logs go to a file or nowhere, never to the terminal."""
    from common.logs import configure_logging

    stream = open(log_file, "a", buffering=1) if log_file else open(os.devnull, "w")  # noqa: SIM115
    configure_logging(level, stream=stream, json=True)
    logging.basicConfig(handlers=[logging.StreamHandler(stream)], level=level.upper(), force=True)
    logging.captureWarnings(True)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer comes from disk, never a hub


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_quiet_logging(args.log_file, args.log_level)
    from common.keys import peer_keys
    from tui.app import LayerlineApp
    from tui.reader import FeedReader

    try:
        keys = peer_keys(args.cert, args.broker_key)
        source = FeedReader(args.broker, args.feed, keys=keys)
    except ValueError as e:  # KeyFileError is one
        print(f"tui: {e}", file=sys.stderr)
        return 2
    LayerlineApp(source).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
