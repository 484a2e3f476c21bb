"""A real cluster for tests: broker and stage subprocesses on loopback, always cleaned up."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from broker.cluster import query_status

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Broker + named stages as subprocesses. Use as a context manager."""

    def __init__(
        self,
        model: Path,
        stages: int = 3,
        *,
        broker_args: tuple[str, ...] = (),
        stage_args: tuple[str, ...] = (),
        log_dir: Path | None = None,
    ):
        self.model = Path(model)
        self.port = free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.feed_url = f"tcp://127.0.0.1:{free_port()}"
        self.n = stages
        self.broker_args = broker_args
        self.stage_args = stage_args
        # LAYERLINE_TEST_LOGS=DIR keeps every cluster's process logs, one folder per cluster.
        kept = os.environ.get("LAYERLINE_TEST_LOGS")
        if log_dir is None and kept:
            log_dir = Path(kept) / f"{time.strftime('%H%M%S')}-{self.port}"
        self.log_dir = log_dir
        self.broker: subprocess.Popen | None = None
        self.stages: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        return subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def start_broker(self) -> None:
        self.broker = self._spawn(
            "broker",
            [
                PY,
                "-m",
                "broker",
                "--bind",
                self.url,
                "--feed",
                self.feed_url,
                "--model",
                str(self.model),
                "--expect-stages",
                str(self.n),
                *self.broker_args,
            ],
        )

    def start_stage(self, name: str, *extra: str) -> subprocess.Popen:
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
                "1",
                *self.stage_args,
                *extra,
            ],
        )
        self.stages[name] = proc
        return proc

    def _start_broker_on_free_ports(self, attempts: int = 3) -> None:
        """Start the broker and wait until it answers. `free_port` only finds ports free a
        moment ago; another process (an outgoing connection of an earlier test's processes)
        can take one before the broker binds it, and the broker then exits at once. It is
        started again on new ports."""
        for _ in range(attempts):
            self.start_broker()
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline and self.broker.poll() is None:
                if self.status(0.5) is not None:
                    return
            if self.broker.poll() is None:
                raise TimeoutError("the broker did not answer STATUS within 30 s of its start")
            self.port = free_port()
            self.url = f"tcp://127.0.0.1:{self.port}"
            self.feed_url = f"tcp://127.0.0.1:{free_port()}"
        raise RuntimeError(
            f"the broker exited at start {attempts} times (exit code {self.broker.returncode})"
        )

    def __enter__(self) -> Cluster:
        try:
            self._start_broker_on_free_ports()
            for i in range(self.n):
                self.start_stage(f"s{i}")
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def status(self, timeout_s: float = 1.0) -> dict | None:
        return query_status(self.url, timeout_s)

    def wait_for(self, predicate, timeout_s: float = 60.0, what: str = "condition") -> dict:
        deadline = time.monotonic() + timeout_s
        status = None
        while time.monotonic() < deadline:
            if self.broker is not None and self.broker.poll() is not None:
                raise RuntimeError(
                    f"the broker exited (code {self.broker.returncode}) while waiting for {what}"
                )
            status = self.status()
            if status is not None and predicate(status):
                return status
            time.sleep(0.05)
        raise TimeoutError(f"{what} not reached within {timeout_s} s; last status: {status}")

    def wait_ready(self, timeout_s: float = 90.0, stages: int | None = None) -> dict:
        want = self.n if stages is None else stages
        return self.wait_for(
            lambda s: s["ready"] and len(s["map"]) == want, timeout_s, f"ready with {want} stages"
        )

    def kill_stage(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.stages[name].send_signal(sig)

    def close(self) -> None:
        procs = [*self.stages.values(), *([self.broker] if self.broker else [])]
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.kill()
                except ProcessLookupError:
                    pass
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
