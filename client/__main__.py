"""Command line: generate text, or show the cluster's status and recent jobs.

    python -m client --prompt "Once upon a time" [--max-new-tokens 64] [--json] ...
    python -m client [--broker URL] status [--broker URL] [--json]
    python -m client [--broker URL] jobs [--broker URL] [--json]

The common options (--broker, --connect-timeout, --json, --verbose) go before or after the
subcommand. The broker defaults to $LAYERLINE_BROKER or tcp://127.0.0.1:5555. Failures exit 1
with one line on stderr, never a traceback; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from broker import messages as M
from client.errors import ClientError
from common.defaults import CLIENT_CONNECT_TIMEOUT_S, default_broker
from common.logs import configure_logging

SUBCOMMANDS = ("status", "jobs")


def _common(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The options every command takes. A subcommand's copies default to SUPPRESS, so that
    they do not overwrite what was given before the subcommand."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--broker",
        default=default(default_broker()),
        help=f"broker URL (default: {default_broker()})",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=default(CLIENT_CONNECT_TIMEOUT_S),
        metavar="S",
        help=f"seconds to wait for the broker's first answer (default: {CLIENT_CONNECT_TIMEOUT_S})",
    )
    parser.add_argument(
        "--cert",
        default=default(None),
        metavar="FILE",
        help="this client's secret certificate (NAME.key_secret), for a broker with keys",
    )
    parser.add_argument(
        "--broker-key",
        default=default(None),
        metavar="KEY",
        help="the broker's public key: its broker.key file, or the 40-character key",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print one JSON object"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=default(False),
        help="log reconnects and replays to stderr",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Generate text with a layerline cluster, or show its status or jobs.",
    )
    _common(parser)
    commands = parser.add_subparsers(dest="command", metavar="{status,jobs}")
    summaries = ("the cluster's readiness, layer map and caches", "recent and active requests")
    for name, summary in zip(SUBCOMMANDS, summaries, strict=True):
        _common(commands.add_parser(name, help=summary, description=summary), suppress=True)
    parser.add_argument("--prompt", help="prompt text (required to generate)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", nargs="+", default=None, metavar="S", help="stop strings")
    parser.add_argument("--chat", action="store_true", help="apply the chat template")
    parser.add_argument("--ignore-eos", action="store_true", help="generate past the eos token")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="print tokens as they arrive (the default without --json)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole request")
    parser.add_argument(
        "--wait-ready",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds to wait for a cluster that is not ready, showing why on stderr "
        "(default: fail at once)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="local tokenizer: a directory, or a GGUF file (default: the broker's checkpoint where "
        "it is on this machine, else the files the broker serves, cached)",
    )
    return parser


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _status(args: argparse.Namespace) -> None:
    from client.core import query_broker  # deferred: torch loads in seconds; Ctrl-C is handled

    status = query_broker(
        args.broker, M.StatusQuery(), args.connect_timeout, args.cert, args.broker_key
    )
    if args.json:
        print(json.dumps(status))
        return
    state = "ready" if status["ready"] else f"not ready: {status['reason'] or 'unknown reason'}"
    print(f"{state}  epoch {status['epoch']}  model {status['model']}")
    print(f"requests active: {status.get('requests', 0)}")
    stages = {s["name"]: s for s in status["stages"]}
    rows = []
    for item in status["map"]:
        info = stages.get(item["stage"], {})
        rows.append(
            [
                item["stage"],
                f"[{item['start']}, {item['end']})",
                info.get("host"),
                info.get("device"),
                info.get("state"),
                info.get("tokens_per_s"),
                info.get("kv_requests"),
                _mib(info.get("kv_bytes")),
            ]
        )
    if rows:
        header = ["stage", "layers", "host", "device", "state", "tok/s", "caches", "kv MiB"]
        print(_table(rows, header))
    else:
        print("no layer map")
    standby = [name for name in stages if name not in {i["stage"] for i in status["map"]}]
    if standby:
        print("standby: " + ", ".join(str(s) for s in standby))
    active = status.get("active") or []
    if active:
        columns = ["rid", "tokens", "steps", "replays", "age_s", "tokens_per_s"]
        print(_table([[r.get(c) for c in columns] for r in active], columns))


def _mib(size: int | None) -> str | None:
    return None if size is None else f"{size / 2**20:.1f}"


def _jobs(args: argparse.Namespace) -> None:
    from client.core import query_broker

    jobs = query_broker(
        args.broker, M.JobsQuery(), args.connect_timeout, args.cert, args.broker_key
    ).get("jobs", [])
    if args.json:
        print(json.dumps(jobs))
        return
    if not jobs:
        print("no jobs")
        return
    columns = ["rid", "outcome", "steps", "tokens", "replays", "duration_s", "ttft_s"]
    rows = [
        [job.get(c, job.get("age_s") if c == "duration_s" else None) for c in columns]
        for job in jobs
    ]
    print(_table(rows, columns))


def _generate(args: argparse.Namespace) -> None:
    from client.core import Client

    progress = _Progress(sys.stderr)
    with Client(
        args.broker,
        tokenizer=args.tokenizer,
        connect_timeout=args.connect_timeout,
        cert=args.cert,
        broker_key=args.broker_key,
    ) as client:
        events = client.stream(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=args.stop,
            chat=args.chat,
            timeout=args.timeout,
            ignore_eos=args.ignore_eos,
            wait_ready=args.wait_ready,
        )
        result = None
        for event in events:
            kind = event["type"]
            if kind == "waiting":
                progress.show(
                    f"waiting for the cluster ({event['waited_s']:.0f} of "
                    f"{event['wait_ready_s']:g} s): {event['reason']}"
                )
                continue
            progress.end()
            if kind == "done":
                result = event["result"]
                if not args.json:
                    sys.stdout.write(event["text"])
            elif args.json:
                continue
            elif kind == "token":
                sys.stdout.write(event["text"])
                sys.stdout.flush()
            else:
                detail = ", ".join(
                    f"{k}={event[k]}" for k in ("reason", "lost", "epoch") if event.get(k)
                )
                print(
                    f"\n[{kind} at token {event.get('index')}: {detail}]",
                    file=sys.stderr,
                    flush=True,
                )
    if args.json:
        n = len(result.token_ids)
        print(
            json.dumps(
                {
                    "token_ids": result.token_ids,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "prompt_tokens": len(result.prompt_ids),
                    "timings": {
                        "ttft_s": result.ttft_s,
                        "total_s": result.total_s,
                        "tokens_per_s": n / result.total_s if result.total_s > 0 else None,
                    },
                    "events": result.events,
                }
            )
        )
    else:
        sys.stdout.write("\n")


class _Progress:
    """One line on stderr that a terminal rewrites in place; elsewhere one line per update."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.tty = stream.isatty()
        self.shown = False

    def show(self, line: str) -> None:
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
        else:
            self.stream.write(f"{line}\n")
        self.stream.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown and self.tty:
            self.stream.write("\n")
        self.shown = False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None and args.prompt is None:
        parser.error("--prompt is required to generate (or give a subcommand: status, jobs)")
    run = {"status": _status, "jobs": _jobs, None: _generate}[args.command]
    # Logs go to stderr, and only errors unless --verbose: stdout carries the answer.
    configure_logging("info" if args.verbose else "error", stream=sys.stderr)
    try:
        run(args)
    except KeyboardInterrupt:
        cancelled = "; the request was cancelled" if run is _generate else ""
        print(f"\ninterrupted{cancelled}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout left (`| head`): nothing more to say, and nowhere to say it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ClientError, TimeoutError, OSError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # the command line never shows a traceback
        print(
            f"error: unexpected {type(e).__name__}: {_one_line(e)}; please report it",
            file=sys.stderr,
        )
        return 1
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
