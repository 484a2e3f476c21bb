"""A broker and N stages as subprocesses on loopback, always stopped: the one cluster launcher.

`make run-cluster` (`layerline run-cluster`, `python -m layerline.cluster`) serves the
built-in model (SmolLM2-135M-Instruct, GGUF) unless told another, starts the processes, waits
until the cluster is ready, shows the layer map, asks the model one chat question, then keeps
the cluster up until Ctrl-C and stops every process it started. The tests and the benchmark start their clusters with the same `Cluster`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from broker.keys import make_keys
from broker.protocol import feed_endpoint
from client import Client, ClientError, query_broker
from common.defaults import DEFAULT_DEMO_DIR
from common.keys import BROKER_NAME, PRIVATE_DIR
from common.models import DEMO_QUESTION, builtin_model
from stage.demo_model import ensure_demo_model

PY = sys.executable
# A stage loads a small checkpoint from the page cache in seconds; the first map waits for
# every stage (--expect-stages), so this bounds a start that will never finish.
READY_TIMEOUT_S = 90.0
# A broker answers STATUS within a second of its start (it imports neither torch nor
# transformers); this bounds a start on a loaded machine.
BROKER_START_S = 30.0
# `make run-cluster` loads a real model from a cold page cache; a slow disk takes minutes.
RUN_CLUSTER_READY_S = 180.0
# After SIGTERM a stage drains its in-flight steps and deregisters; this bounds the wait.
STOP_GRACE_S = 10.0
RUN_CLUSTER_LOGS = Path(".cache/cluster-logs")
# The admin key a cluster with keys asks for STATUS with.
LAUNCHER_KEY = "launcher"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (another process may take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_status(url: str, timeout_s: float = 1.0, keys: Path | None = None) -> dict | None:
    """The broker's STATUS, or None while it does not answer (it is starting, or gone). With
    `keys` (a `python -m broker.keys` layout), asked with its admin key `launcher`."""
    try:
        return query_broker(url, timeout=timeout_s, **launcher_keys(keys))
    except ClientError:
        return None


def launcher_keys(keys: Path | None) -> dict[str, Path]:
    """The `cert` and `broker_key` arguments of a client that uses the launcher's admin key in
    the `keys` layout; none without keys."""
    if keys is None:
        return {}
    return {"cert": peer_cert(keys, LAUNCHER_KEY), "broker_key": keys / f"{BROKER_NAME}.key"}


def peer_cert(keys: Path, name: str) -> Path:
    """A peer's secret certificate in a `python -m broker.keys` layout."""
    return keys / PRIVATE_DIR / f"{name}.key_secret"


def cluster_env() -> dict[str, str]:
    """The environment of the processes a cluster starts: offline, with unbuffered logs."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


class Cluster:
    """A broker and stages s0..s{N-1} as subprocesses. Use as a context manager.

    `port=None` picks free ports (and picks again if another process takes one first); the
    monitor feed then binds a free port too, else the one after `port`, as the broker does.
    Each process logs to `log_dir/NAME.log`, or nowhere.
    """

    def __init__(
        self,
        model: Path,
        stages: int = 3,
        *,
        port: int | None = None,
        feed: bool = True,
        threads: int = 1,
        dtype: str | None = None,
        device: str | None = None,
        log_level: str | None = None,
        broker_args: Sequence[str] = (),
        stage_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        stop_grace_s: float = 0.0,
        own_session: bool = False,
        keys: Path | None = None,
        bind_host: str = "127.0.0.1",
    ):
        self.model = Path(model)
        # CURVE: a `python -m broker.keys` layout, made here where keys are missing: a key per
        # stage name, and the admin key `launcher` that asks for STATUS.
        self.keys = keys
        if keys is not None:
            make_keys(keys, {"stage": [f"s{i}" for i in range(stages)], "admin": [LAUNCHER_KEY]})
        self.n = stages
        # The broker binds this host's port; every process here reaches it on 127.0.0.1. Off
        # loopback a broker without keys starts only with --insecure in `broker_args`.
        self.bind_host = bind_host
        self.fixed_port = port
        self.feed = feed
        self.threads = threads
        self.dtype = dtype
        self.device = device
        self.log_level = log_level
        self.broker_args = tuple(broker_args)
        self.stage_args = tuple(stage_args)
        self.env = dict(env) if env is not None else cluster_env()
        self.log_dir = log_dir
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        # A terminal's Ctrl-C reaches its whole foreground process group; in a session of
        # their own the processes are stopped by close(), in order, instead.
        self.own_session = own_session
        self.broker: subprocess.Popen | None = None
        self.stages: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.port = self.fixed_port or free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        if not self.feed:
            self.feed_url = None
        elif self.fixed_port is None:
            self.feed_url = f"tcp://127.0.0.1:{free_port()}"
        else:
            self.feed_url = feed_endpoint(self.url)

    # --- processes ---------------------------------------------------------------------------

    def _log(self, name: str) -> IO[bytes] | int:
        if self.log_dir is None:
            return subprocess.DEVNULL
        if name not in self._logs:  # a restarted process writes on in its predecessor's log
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._logs[name] = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in close()
        return self._logs[name]

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            cmd,
            env=self.env,
            stdout=self._log(name),
            stderr=subprocess.STDOUT,
            start_new_session=self.own_session,
        )

    def start_broker(self) -> subprocess.Popen:
        dtype = ("--dtype", self.dtype) if self.dtype else ()
        log_level = ("--log-level", self.log_level) if self.log_level else ()
        self.broker = self._spawn(
            "broker",
            [
                PY,
                "-m",
                "broker",
                "--bind",
                f"tcp://{self.bind_host}:{self.port}",
                "--feed",
                self.feed_url or "none",
                "--model",
                str(self.model),
                *dtype,
                "--expect-stages",
                str(self.n),
                # The launcher starts every stage itself: the first map waits for all of them
                # (not for a quiet spell, which a slow start on a loaded machine outlasts, and
                # which would load the model onto fewer stages, then reshard).
                "--settle",
                str(self.ready_timeout_s),
                *log_level,
                *(("--keys", str(self.keys)) if self.keys is not None else ()),
                *self.broker_args,
            ],
        )
        return self.broker

    def start_stage(self, name: str, *extra: str) -> subprocess.Popen:
        keys: tuple[str, ...] = ()
        if self.keys is not None:
            make_keys(self.keys, {"stage": [name]})
            cert, broker_key = peer_cert(self.keys, name), self.keys / f"{BROKER_NAME}.key"
            keys = ("--cert", str(cert), "--broker-key", str(broker_key))
        dtype = ("--dtype", self.dtype) if self.dtype else ()
        device = ("--device", self.device) if self.device else ()
        log_level = ("--log-level", self.log_level) if self.log_level else ()
        proc = self._spawn(
            name,
            [
                PY,
                "-m",
                "stage",
                "--broker",
                self.url,
                "--model",
                str(self.model),
                "--name",
                name,
                "--threads",
                str(self.threads),
                *dtype,
                *device,
                *log_level,
                *keys,
                *self.stage_args,
                *extra,
            ],
        )
        self.stages[name] = proc
        return proc

    def _start_broker_on_free_ports(self, attempts: int = 3) -> None:
        """Start the broker and wait until it answers. `free_port` only finds ports free a
        moment ago; another process (an outgoing connection of an earlier cluster's processes)
        can take one before the broker binds it, and the broker then exits at once. It is
        started again on new ports, unless the port was given."""
        for _ in range(attempts if self.fixed_port is None else 1):
            self.start_broker()
            deadline = time.monotonic() + BROKER_START_S
            while time.monotonic() < deadline and self.broker.poll() is None:
                if self.status(0.5) is not None:
                    return
            if self.broker.poll() is None:
                raise TimeoutError(
                    f"the broker did not answer STATUS within {BROKER_START_S:.0f} s of its start"
                )
            self._pick_ports()
        raise RuntimeError(
            f"the broker exited at start (exit code {self.broker.returncode}){self._see('broker')}"
        )

    def start(
        self, progress: Callable[[str], None] | None = None, every_stage: bool = True
    ) -> dict:
        """Start the broker, then the stages; the first ready STATUS, with every stage in the
        map unless `every_stage` is false (a model may have fewer layers than stages).

        Any process that exits before then is an error; `progress` hears each new reason why
        the cluster is not ready yet.
        """
        self._start_broker_on_free_ports()
        for i in range(self.n):
            self.start_stage(f"s{i}")
        ready = self._ready(self.n if every_stage else None)
        return self._wait(ready, self.ready_timeout_s, "ready", True, progress)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def kill_stage(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.stages[name].send_signal(sig)

    def pids(self) -> dict[str, int]:
        out = {name: p.pid for name, p in self.stages.items()}
        if self.broker is not None:
            out["broker"] = self.broker.pid
        return out

    def close(self) -> None:
        """Stop every process: SIGTERM and `stop_grace_s` to drain first where that is > 0."""
        procs = [*self.stages.values(), *([self.broker] if self.broker else [])]
        sig = signal.SIGTERM if self.stop_grace_s > 0 else signal.SIGKILL
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGCONT)  # a frozen (SIGSTOP) process cannot drain
                    p.send_signal(sig)
        deadline = time.monotonic() + (self.stop_grace_s or STOP_GRACE_S)
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=STOP_GRACE_S)
        for f in self._logs.values():
            f.close()
        self._logs.clear()

    # --- state -------------------------------------------------------------------------------

    def status(self, timeout_s: float = 1.0) -> dict | None:
        return broker_status(self.url, timeout_s, self.keys)

    def wait_for(
        self, predicate: Callable[[dict], bool], timeout_s: float = 60.0, what: str = "condition"
    ) -> dict:
        """The first STATUS that satisfies `predicate`; RuntimeError if the broker exits first."""
        return self._wait(predicate, timeout_s, what, False, None)

    def wait_ready(self, timeout_s: float | None = None, stages: int | None = None) -> dict:
        """The first STATUS with `stages` (default: all) stages in a complete map."""
        want = self.n if stages is None else stages
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        return self.wait_for(self._ready(want), timeout_s, f"ready with {want} stages")

    @staticmethod
    def _ready(stages: int | None) -> Callable[[dict], bool]:
        return lambda s: s["ready"] and (stages is None or len(s["map"]) == stages)

    def _wait(
        self,
        predicate: Callable[[dict], bool],
        timeout_s: float,
        what: str,
        every_process: bool,
        progress: Callable[[str], None] | None,
    ) -> dict:
        deadline = time.monotonic() + timeout_s
        status = None
        reason = None
        while time.monotonic() < deadline:
            watched = {"broker": self.broker, **(self.stages if every_process else {})}
            for name, proc in watched.items():
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited (code {proc.returncode}) while waiting for {what}"
                        + self._see(name)
                    )
            status = self.status()
            if status is not None and predicate(status):
                return status
            new_reason = status["reason"] if status else "broker not answering yet"
            if progress is not None and new_reason != reason:
                progress(new_reason)
            reason = new_reason
            time.sleep(0.05)  # polling other processes' state; there is nothing to wait on
        logs = f"; logs in {self.log_dir}/" if self.log_dir is not None else ""
        raise TimeoutError(
            f"{what} not reached within {timeout_s:g} s; last status: {status}{logs}"
        )

    def _see(self, name: str) -> str:
        return f"; see {self.log_dir}/{name}.log" if self.log_dir is not None else ""


# --- make run-cluster ------------------------------------------------------------------------


def format_map(status: dict) -> str:
    lines = [f"layer map (epoch {status['epoch']}, {status['num_layers']} layers):"]
    width = 48
    for r in status["map"]:
        a = r["start"] * width // status["num_layers"]
        b = r["end"] * width // status["num_layers"]
        bar = " " * a + "#" * max(1, b - a)
        lines.append(f"  {r['stage']:<12} [{r['start']:>3},{r['end']:>3})  |{bar:<{width}}|")
    return "\n".join(lines)


def demo_generation(url: str) -> None:
    """One greedy chat answer; a checkpoint without a chat template continues a text instead."""
    with Client(url) as client:
        chat = getattr(client.tokenizer, "chat_template", None) is not None
        prompt = DEMO_QUESTION if chat else "The river carries"
        result = client.generate(prompt, max_new_tokens=48, chat=chat)
        tps = len(result.token_ids) / result.total_s if result.total_s else 0.0
        shown = f"> {prompt}\n  {result.text.strip()}" if chat else f"  {prompt}{result.text}"
        print(
            f"\ndemo generation ({len(result.token_ids)} tokens, {tps:.0f} tokens/s, "
            f"finish: {result.finish_reason}):\n{shown}\n",
            flush=True,
        )


def how_to_use(url: str) -> str:
    """What `make run-cluster` prints once its cluster is up: how to submit more, watch it and
    serve it to OpenAI clients."""
    return (
        "Submit more with:\n"
        f"  .venv/bin/layerline generate --broker {url} --chat "
        "--prompt 'Name three rivers.' --stream\n"
        f'  .venv/bin/python -c "from client import Client; '
        f"print(Client('{url}').generate('hello').text)\"\n"
        f"  make tui BROKER={url}\n"
        "Serve it to OpenAI clients (http://127.0.0.1:8000/v1) with:\n"
        f"  .venv/bin/layerline serve --broker {url} --port 8000\n"
        "Ctrl-C stops the cluster."
    )


def supervise(cluster: Cluster) -> None:
    """Report stages that exit; return when the broker does."""
    # Stages may die or be killed to watch a reshard; the cluster lives as long as its broker.
    reported: set[str] = set()
    while cluster.broker.poll() is None:
        for name, proc in cluster.stages.items():
            if proc.poll() is not None and name not in reported:
                reported.add(name)
                print(
                    f"stage {name} exited (code {proc.returncode}); the broker reshards "
                    "its layers onto the others",
                    flush=True,
                )
        time.sleep(0.5)  # idle supervision; Ctrl-C interrupts it


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="layerline run-cluster",
        description="A broker and N stages on loopback, a demo generation, until Ctrl-C.",
    )
    p.add_argument("--stages", type=int, default=int(os.environ.get("STAGES", 3)))
    p.add_argument(
        "--model",
        default=os.environ.get("MODEL") or None,
        help="a checkpoint directory or GGUF file (default: the built-in SmolLM2-135M-Instruct; "
        f"{DEFAULT_DEMO_DIR} is a tiny random one)",
    )
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
    try:
        model = Path(args.model) if args.model else builtin_model()
    except ValueError as e:  # CheckpointError: the built-in model is not installed
        print(f"run-cluster: {e}", file=sys.stderr)
        return 2
    if str(model) == str(DEFAULT_DEMO_DIR):
        print(f"demo model: {ensure_demo_model(model)}", flush=True)
    else:
        print(f"model: {model}", flush=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.stages)
    cluster = Cluster(
        model,
        args.stages,
        port=args.port,
        threads=threads,
        log_dir=RUN_CLUSTER_LOGS,
        ready_timeout_s=RUN_CLUSTER_READY_S,
        stop_grace_s=STOP_GRACE_S,
        own_session=True,
    )
    # SIGTERM (timeout, a supervisor) must also stop the children, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        print(
            f"starting a broker on {cluster.url} and {args.stages} stages "
            f"({threads} torch thread(s) each); logs in {RUN_CLUSTER_LOGS}/",
            flush=True,
        )
        status = cluster.start(
            lambda reason: print(f"  waiting: {reason}", flush=True), every_stage=False
        )
        print(format_map(status), flush=True)
        if not args.no_demo:
            demo_generation(cluster.url)
        print(how_to_use(cluster.url), flush=True)
        if args.exit_after_demo:
            return 0
        supervise(cluster)
        print(
            f"the broker exited (code {cluster.broker.returncode}); stopping the stages",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("\nstopping the cluster", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"run-cluster: {e}", file=sys.stderr)
        return 1
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
