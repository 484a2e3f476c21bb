"""`python -m broker.cluster` (what `make run-cluster` runs): a broker and N stages on loopback.

It builds the demo checkpoint if needed, starts the processes, waits until the cluster is
ready, shows the layer map, runs one demo generation, then keeps the cluster up until Ctrl-C
and stops every process it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

from broker import protocol as P
from stage.demo_model import DEFAULT_DEMO_DIR, ensure_demo_model

READY_TIMEOUT_S = 180.0


def query_status(url: str, timeout_s: float = 1.0) -> dict | None:
    """One STATUS round trip on a fresh socket; None if the broker does not answer in time."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(url)
        sock.send_multipart(P.encode(P.MONITOR_TAG, P.Cmd.STATUS, {}))
        if sock.poll(timeout_s * 1000):
            msg = P.decode(sock.recv_multipart())
            if msg.cmd == P.Cmd.STATUS:
                return msg.header
        return None
    finally:
        sock.close(linger=0)


def wait_ready(url: str, procs: list[subprocess.Popen], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    last_reason = None
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(
                    f"{' '.join(p.args[:3])} exited with code {p.returncode} before the cluster was ready"
                )
        status = query_status(url)
        if status is not None and status["ready"]:
            return status
        reason = status["reason"] if status else "broker not answering yet"
        if reason != last_reason:
            print(f"  waiting: {reason}", flush=True)
            last_reason = reason
        time.sleep(0.2)  # polling an external process's state; nothing to wait on instead
    raise RuntimeError(f"cluster not ready after {timeout_s:.0f} s: {last_reason}")


def format_map(status: dict) -> str:
    lines = [f"layer map (epoch {status['epoch']}, {status['num_layers']} layers):"]
    width = 48
    for r in status["map"]:
        a = r["start"] * width // status["num_layers"]
        b = r["end"] * width // status["num_layers"]
        bar = " " * a + "#" * max(1, b - a)
        lines.append(f"  {r['stage']:<12} [{r['start']:>3},{r['end']:>3})  |{bar:<{width}}|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m broker.cluster", description=__doc__)
    p.add_argument("--stages", type=int, default=int(os.environ.get("STAGES", 3)))
    p.add_argument("--model", default=os.environ.get("MODEL") or str(DEFAULT_DEMO_DIR))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", 5555)))
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per stage (default: cores / stages)",
    )
    p.add_argument("--no-demo", action="store_true", help="skip the demo generation")
    p.add_argument(
        "--exit-after-demo", action="store_true", help="stop the cluster after the demo (for tests)"
    )
    args = p.parse_args(argv)
    if args.stages < 1:
        p.error("--stages must be at least 1")
    model = Path(args.model)
    if str(model) == str(DEFAULT_DEMO_DIR):
        print(f"demo model: {ensure_demo_model(model)}", flush=True)
    url = f"tcp://127.0.0.1:{args.port}"
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.stages)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    procs: list[subprocess.Popen] = []
    logs = Path(".cache/cluster-logs")
    logs.mkdir(parents=True, exist_ok=True)

    def spawn(name: str, cmd: list[str]) -> None:
        out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def stop_all(*_: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # SIGTERM (timeout, a supervisor) must also stop the children, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        spawn(
            "broker",
            [
                py,
                "-m",
                "broker",
                "--bind",
                url,
                "--model",
                str(model),
                "--expect-stages",
                str(args.stages),
            ],
        )
        for i in range(args.stages):
            spawn(
                f"s{i}",
                [
                    py,
                    "-m",
                    "stage",
                    "--broker",
                    url,
                    "--model",
                    str(model),
                    "--name",
                    f"s{i}",
                    "--threads",
                    str(threads),
                ],
            )
        print(
            f"started a broker on {url} and {args.stages} stages ({threads} torch thread(s) each); "
            f"logs in {logs}/",
            flush=True,
        )
        status = wait_ready(url, procs, READY_TIMEOUT_S)
        print(format_map(status), flush=True)
        if not args.no_demo:
            from client import Client

            with Client(url) as client:
                prompt = "The river carries"
                result = client.generate(prompt, max_new_tokens=48)
                tps = len(result.token_ids) / result.total_s if result.total_s else 0.0
                print(
                    f"\ndemo generation ({len(result.token_ids)} tokens, {tps:.0f} tokens/s, "
                    f"finish: {result.finish_reason}):\n  {prompt}{result.text}\n",
                    flush=True,
                )
        print(
            "The demo model's weights are random, so its text is meaningless. Submit more with:\n"
            f"  .venv/bin/python -m client --broker {url} --prompt 'hello' --stream\n"
            f"  .venv/bin/python -c \"from client import Client; print(Client('{url}').generate('hello').text)\"\n"
            f"  make tui BROKER={url}\n"
            "Ctrl-C stops the cluster.",
            flush=True,
        )
        if args.exit_after_demo:
            return 0
        # Stages may die or be killed to watch a reshard; the cluster lives as long as its broker.
        reported: set[int] = set()
        while procs[0].poll() is None:
            for i, proc in enumerate(procs[1:]):
                if proc.poll() is not None and i not in reported:
                    reported.add(i)
                    print(
                        f"stage s{i} exited (code {proc.returncode}); the broker reshards "
                        "its layers onto the others",
                        flush=True,
                    )
            time.sleep(0.5)  # idle supervision; Ctrl-C interrupts it
        print(
            f"the broker exited (code {procs[0].returncode}); stopping the stages", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print("\nstopping the cluster", flush=True)
        return 0
    except RuntimeError as e:
        print(f"run-cluster: {e}; see {logs}/", file=sys.stderr)
        return 1
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
