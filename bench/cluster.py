"""A broker and N stages as subprocesses on loopback, as a user starts them, always stopped.

The approach of tests/cluster.py, kept separate so that bench never imports tests. Each
process's peak memory is read from /proc/<pid>/status of the process bench started.
"""

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
# Loading tinyllama (4.4 GB) from a cold page cache on a slow disk takes minutes.
READY_TIMEOUT_S = 900.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_env(omp_wait_policy: str | None = None) -> dict[str, str]:
    """The environment of every process bench starts: offline, unbuffered, OpenMP as asked."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("OMP_WAIT_POLICY", None)  # "default" means libgomp's own default, not the caller's
    if omp_wait_policy and omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    return env


def proc_status(pid: int) -> dict[str, int]:
    """Memory fields of /proc/<pid>/status in bytes (VmHWM, VmRSS, RssAnon, RssFile)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


class Cluster:
    """Broker + stages s0..s{N-1}. Use as a context manager."""

    def __init__(
        self,
        model: Path,
        stages: int,
        *,
        threads: int = 1,
        dtype: str = "float32",
        device: str = "cpu",
        omp_wait_policy: str | None = None,
        log_dir: Path | None = None,
        broker_args: tuple[str, ...] = (),
    ):
        self.model = Path(model)
        self.n = stages
        self.threads = threads
        self.dtype = dtype
        self.device = device
        self.url = f"tcp://127.0.0.1:{free_port()}"
        self.env = bench_env(omp_wait_policy)
        self.log_dir = log_dir
        self.broker_args = broker_args
        self.broker: subprocess.Popen | None = None
        self.stages: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
            self._logs.append(out)
        return subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def __enter__(self) -> Cluster:
        try:
            self.broker = self._spawn(
                "broker",
                [
                    PY,
                    "-m",
                    "broker",
                    "--bind",
                    self.url,
                    "--feed",
                    "none",
                    "--model",
                    str(self.model),
                    "--dtype",
                    self.dtype,
                    "--expect-stages",
                    str(self.n),
                    "--log-level",
                    "warning",
                    *self.broker_args,
                ],
            )
            for i in range(self.n):
                self.stages[f"s{i}"] = self._spawn(
                    f"s{i}",
                    [
                        PY,
                        "-m",
                        "stage",
                        "--broker",
                        self.url,
                        "--model",
                        str(self.model),
                        "--name",
                        f"s{i}",
                        "--threads",
                        str(self.threads),
                        "--dtype",
                        self.dtype,
                        "--device",
                        self.device,
                        "--log-level",
                        "warning",
                    ],
                )
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def status(self, timeout_s: float = 2.0) -> dict | None:
        return query_status(self.url, timeout_s)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        status = None
        while time.monotonic() < deadline:
            for name, proc in [("broker", self.broker), *self.stages.items()]:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with code {proc.returncode} before the cluster was ready"
                        + (f"; see {self.log_dir}/{name}.log" if self.log_dir else "")
                    )
            status = self.status()
            if status is not None and status["ready"] and len(status["map"]) == self.n:
                return status
            time.sleep(0.1)  # polling other processes' state; there is nothing to wait on
        raise RuntimeError(
            f"cluster not ready after {timeout_s:.0f} s: "
            f"{status['reason'] if status else 'broker not answering'}"
        )

    def pids(self) -> dict[str, int]:
        out = {name: p.pid for name, p in self.stages.items()}
        if self.broker is not None:
            out["broker"] = self.broker.pid
        return out

    def close(self) -> None:
        procs = [*self.stages.values(), *([self.broker] if self.broker else [])]
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for f in self._logs:
            f.close()
        self._logs.clear()
