"""The network scenario: the broker and each stage on a host of their own (a Linux network
namespace on one bridge, `layerline.netns`), CURVE on, and this process as the client's host.

Every connection to the broker, the client's and each stage's, passes through one delaying
relay (`bench.relay`) in this process's namespace, so that each hop of a token's path
(client -> broker -> s0 -> broker -> ... -> client) pays the same one-way delay. Its delay is
changed between phases without a reconnect, and the bandwidth of one stage host's link is
limited with `tc tbf`: the cluster is started once, and every figure of a run comes from the
same processes. The relay with no delay is the baseline of the ratios: it costs what it
costs at every delay (a Python process copying each message).

Needs root; `run` returns {"skipped": why} where namespaces cannot be made.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import pipeline
from bench.cluster import bench_env
from broker.keys import make_keys
from common.keys import BROKER_NAME
from layerline import netns
from layerline.cluster import LAUNCHER_KEY, broker_status, peer_cert

PORT = 5555
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class NetworkLoad:
    stages: int = 3
    delays_ms: tuple[float, ...] = (0, 5, 20)
    concurrency: tuple[int, ...] = (1, 8, 16)
    bandwidths_mbit: tuple[float, ...] = (1000, 100, 10)
    bandwidth_concurrency: tuple[int, ...] = (1, 16)
    prompt_len: int = 32
    gen_len: int = 32
    requests: int = 4  # per phase at concurrency 1; C streams run 2C requests (at least this)
    threads: int = 1
    omp_wait_policy: str = "PASSIVE"


class DelayRelay:
    """`python -m bench.relay` as a child process, driven over its stdin."""

    def __init__(self, routes: list[str], log: Path):
        self.err = open(log, "ab")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.relay", *routes],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            env=bench_env(),
        )
        if not self._answer().get("ready"):
            raise RuntimeError("the delaying relay did not start")

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the delaying relay exited ({self.proc.wait(10)})")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.err.close()


def run(
    model_path: Path,
    vocab: int,
    load: NetworkLoad,
    log_dir: Path,
    log=print,
) -> dict:
    why_not = netns.unavailable()
    if why_not is not None:
        log(f"network: skipped: {why_not}")
        return {"skipped": why_not}
    log_dir.mkdir(parents=True, exist_ok=True)
    keys = log_dir / "keys"
    names = [f"s{i}" for i in range(load.stages)]
    make_keys(keys, {"stage": names, "admin": [LAUNCHER_KEY]})
    broker_key = keys / f"{BROKER_NAME}.key"
    hosts = [f"h{i}" for i in range(load.stages)]
    limited = hosts[len(hosts) // 2]  # the middle stage's host: traffic in and out of it
    env = bench_env(load.omp_wait_policy)
    records: list[dict] = []
    with netns.Net(["broker", *hosts]) as net:
        broker_at = f"{net.addr('broker')}:{PORT}"
        peers = ["client", *names]
        # One relay port per peer, on this process's address on the bridge.
        relay_at = {peer: f"{net.local}:{PORT + 10 + i}" for i, peer in enumerate(peers)}
        relay = DelayRelay([f"{relay_at[p]}={broker_at}" for p in peers], log_dir / "relay.log")
        try:
            broker = net.spawn(
                "broker",
                [sys.executable, "-m", "broker", "--bind", f"tcp://{broker_at}",
                 "--feed", "none", "--model", str(model_path), "--keys", str(keys),
                 "--expect-stages", str(load.stages), "--settle", "1",
                 "--log-level", "warning"],
                log_dir / "broker.log", env,
            )  # fmt: skip
            stage_procs = {}
            for host, name in zip(hosts, names, strict=True):
                stage_procs[name] = net.spawn(
                    host,
                    [sys.executable, "-m", "stage", "--broker", f"tcp://{relay_at[name]}",
                     "--model", str(model_path), "--name", name,
                     "--threads", str(load.threads), "--log-level", "warning",
                     "--cert", str(peer_cert(keys, name)), "--broker-key", str(broker_key)],
                    log_dir / f"{name}.log", env,
                )  # fmt: skip
            url = f"tcp://{relay_at['client']}"
            status = _wait_ready(url, keys, load.stages, [broker, *stage_procs.values()])
            order = [r["stage"] for r in status["map"]]
            pids = {"broker": broker.pid, "relay": relay.proc.pid}
            pids.update({name: p.pid for name, p in stage_procs.items()})
            pipeline.warm_up(url, vocab, load.prompt_len, keys)

            def phase(concurrency: int, **condition) -> None:
                n = load.requests if concurrency == 1 else max(load.requests, 2 * concurrency)
                relay.ask("stats")  # lateness from here on
                result = pipeline.run_phase(
                    url,
                    broker.pid,
                    concurrency=concurrency,
                    requests=n,
                    prompt_len=load.prompt_len,
                    gen_len=load.gen_len,
                    vocab=vocab,
                    stream=False,
                    pids=pids,
                    keys=keys,
                )
                fig = pipeline.analyse(result, order)
                late = relay.ask("stats")
                records.append(
                    {
                        **condition,
                        "concurrency": concurrency,
                        "requests": fig["requests"],
                        "tokens": fig["tokens"],
                        "tokens_per_s": fig["tokens_per_s"],
                        "ttft_s": fig["ttft_s"],
                        "tpot_s": fig["tpot_s"],
                        "process_cores": fig["process_cores"],
                        "foreign_cpu_share": fig["foreign_cpu_share"],
                        "relay_late_p50_s": late["late_p50_s"],
                        "breakdown": fig["breakdown"],
                        "first_token_ids": fig["first_token_ids"],
                    }
                )
                shown = ", ".join(f"{k} {v}" for k, v in condition.items())
                log(
                    f"  network {shown}, C={concurrency}: {fig['tokens_per_s']:.1f} tokens/s, "
                    f"TTFT p50 {fig['ttft_s']['p50'] * 1e3:.0f} ms, "
                    f"TPOT p50 {fig['tpot_s']['p50'] * 1e3:.1f} ms"
                )

            for delay in load.delays_ms:
                relay.ask(f"delay {delay}")
                for c in load.concurrency:
                    phase(c, delay_ms=delay, bandwidth_mbit=None)
            relay.ask("delay 0")
            for mbit in load.bandwidths_mbit:
                net.limit(limited, mbit)
                for c in load.bandwidth_concurrency:
                    phase(c, delay_ms=0, bandwidth_mbit=mbit)
            net.limit(limited, None)
        finally:
            relay.close()
    return {
        "stages": load.stages,
        "map": status["map"],
        "security": status.get("security"),
        "limited_host": {"host": limited, "stage": names[hosts.index(limited)]},
        "load": {k: list(v) if isinstance(v, tuple) else v for k, v in load.__dict__.items()},
        "records": records,
        # Every phase's first request has the same prompt: greedy, it must give the same tokens
        # whatever the delay or the bandwidth.
        "same_output": len({tuple(r["first_token_ids"]) for r in records}) == 1,
    }


def _wait_ready(url: str, keys: Path, stages: int, procs: list) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(
                "a process of the network cluster exited; see its log beside the results"
            )
        status = broker_status(url, 1.0, keys)
        if status is not None and status["ready"] and len(status["map"]) == stages:
            return status
        time.sleep(0.2)  # a poll interval
    raise TimeoutError(f"the network cluster was not ready in {READY_TIMEOUT_S:.0f} s: {status}")
