"""Command line: generate text, or show the cluster's status and recent jobs.

    python -m client --prompt "Once upon a time" [--max-new-tokens 64] [--json] ...
    python -m client status [--broker URL] [--json]
    python -m client jobs [--broker URL] [--json]

The broker defaults to $LAYERLINE_BROKER or tcp://127.0.0.1:5555. Failures exit 1 with one
line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from broker import messages as M
from client.core import Client, query_broker
from client.session import ClientError
from common.defaults import CLIENT_CONNECT_TIMEOUT_S, default_broker
from common.logs import configure_logging

SUBCOMMANDS = ("status", "jobs")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker", default=default_broker(), help="broker URL (default: %(default)s)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=CLIENT_CONNECT_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for the broker's first answer (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--verbose", action="store_true", help="log reconnects and replays to stderr"
    )


def _generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Generate text with a layerline cluster (subcommands: status, jobs).",
    )
    _common(parser)
    parser.add_argument("--prompt", required=True, help="prompt text")
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
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="local tokenizer: a directory, or a GGUF file (default: the broker's checkpoint)",
    )
    return parser


def _admin_parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m client {command}")
    _common(parser)
    return parser


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _status(args: argparse.Namespace) -> None:
    status = query_broker(args.broker, M.StatusQuery(), args.connect_timeout)
    if args.json:
        print(json.dumps(status))
        return
    state = "ready" if status["ready"] else f"not ready: {status['reason'] or 'unknown reason'}"
    print(f"{state}  epoch {status['epoch']}  model {status['model']}")
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
            ]
        )
    if rows:
        print(_table(rows, ["stage", "layers", "host", "device", "state", "tok/s"]))
    else:
        print("no layer map")
    standby = [name for name in stages if name not in {i["stage"] for i in status["map"]}]
    if standby:
        print("standby: " + ", ".join(str(s) for s in standby))


def _jobs(args: argparse.Namespace) -> None:
    jobs = query_broker(args.broker, M.JobsQuery(), args.connect_timeout).get("jobs", [])
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
    with Client(
        args.broker, tokenizer=args.tokenizer, connect_timeout=args.connect_timeout
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
        )
        result = None
        for event in events:
            kind = event["type"]
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        command = argv.pop(0)
        args = _admin_parser(command).parse_args(argv)
        run = _status if command == "status" else _jobs
    else:
        args = _generate_parser().parse_args(argv)
        run = _generate
    # Logs go to stderr, and only errors unless --verbose: stdout carries the answer.
    configure_logging("info" if args.verbose else "error", stream=sys.stderr)
    try:
        run(args)
    except KeyboardInterrupt:
        print("interrupted; the request was cancelled", file=sys.stderr)
        return 130
    except (ClientError, ValueError, TimeoutError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
