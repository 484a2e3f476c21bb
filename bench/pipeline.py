"""Drive a running cluster with the client library and turn the results into figures.

Concurrency 1 uses the synchronous `Client` (what a batch-1 user runs: no helper thread);
higher concurrency uses one `AsyncClient` with C streams, each taking the next request as
its previous one finishes. Every request is greedy, from seeded token ids, and runs to
exactly gen-len tokens (`ignore_eos`), so every configuration does the same work.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.stats import summary
from bench.workload import prompt
from client import AsyncClient, Client
from layerline.cluster import broker_status, launcher_keys


@dataclass
class Phase:
    """The raw outcome of one load phase: per-request records and broker snapshots."""

    concurrency: int
    records: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    broker_before: dict | None = None
    broker_after: dict | None = None
    broker_cpu_s: float | None = None
    # CPU seconds that processes other than the cluster and this client used meanwhile:
    # other work on the machine that competed for the cores (a disturbed measurement).
    foreign_cpu_s: float | None = None
    # CPU seconds each of our processes used in the phase: broker, stages, this client.
    process_cpu_s: dict[str, float] = field(default_factory=dict)


def _record(result, arrivals: list[float] | None) -> dict:
    return {
        "tokens": len(result.token_ids),
        "token_ids": list(result.token_ids),
        "ttft_s": result.ttft_s,
        "total_s": result.total_s,
        "trace": result.trace,
        "gaps": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)] if arrivals else [],
    }


def _run_sync(
    url: str, prompts: list[list[int]], gen_len: int, stream: bool, keys: Path | None = None
) -> list[dict]:
    records = []
    with Client(url, tokenizer=None, **launcher_keys(keys)) as client:
        for ids in prompts:
            if stream:
                arrivals, result = [], None
                for event in client.stream(ids, max_new_tokens=gen_len, ignore_eos=True):
                    if event["type"] == "token":
                        arrivals.append(time.perf_counter())
                    elif event["type"] == "done":
                        result = event["result"]
                records.append(_record(result, arrivals))
            else:
                records.append(
                    _record(client.generate(ids, max_new_tokens=gen_len, ignore_eos=True), None)
                )
    return records


async def _run_async(
    url: str,
    prompts: list[list[int]],
    gen_len: int,
    stream: bool,
    concurrency: int,
    keys: Path | None = None,
) -> list[dict]:
    records: list[dict | None] = [None] * len(prompts)
    todo = iter(range(len(prompts)))

    async def worker(client: AsyncClient) -> None:
        for i in todo:
            if stream:
                arrivals, result = [], None
                async for event in client.stream(
                    prompts[i], max_new_tokens=gen_len, ignore_eos=True
                ):
                    if event["type"] == "token":
                        arrivals.append(time.perf_counter())
                    elif event["type"] == "done":
                        result = event["result"]
                records[i] = _record(result, arrivals)
            else:
                records[i] = _record(
                    await client.generate(prompts[i], max_new_tokens=gen_len, ignore_eos=True), None
                )

    async with AsyncClient(url, tokenizer=None, **launcher_keys(keys)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return [r for r in records if r is not None]


def warm_up(url: str, vocab: int, prompt_len: int, keys: Path | None = None) -> None:
    """One short request: first-call allocations in every stage happen outside the figures."""
    _run_sync(url, [prompt(10_000, prompt_len, vocab)], 4, stream=False, keys=keys)


def chat_ttft(url: str, question: str, repeats: int = 3) -> dict | None:
    """Time to the first token of a chat question (the tokenizer's template applied), median
    of `repeats`; None when the served checkpoint has no chat template."""
    from client import Client

    with Client(url) as client:
        if getattr(client.tokenizer, "chat_template", None) is None:
            return None
        runs = [
            client.generate(question, max_new_tokens=1, chat=True, ignore_eos=True)
            for _ in range(repeats)
        ]
    return {
        "prompt_tokens": len(runs[0].prompt_ids),
        "ttft_s": statistics.median(r.ttft_s for r in runs),
        "ttft_runs_s": [r.ttft_s for r in runs],
    }


def run_phase(
    url: str,
    broker_pid: int | None,
    *,
    concurrency: int,
    requests: int,
    prompt_len: int,
    gen_len: int,
    vocab: int,
    stream: bool,
    pids: dict[str, int] | None = None,
    keys: Path | None = None,
) -> Phase:
    """Run `requests` requests on `concurrency` streams; `keys`: the cluster's key layout, whose
    launcher key the client uses."""
    prompts = [prompt(i, prompt_len, vocab) for i in range(requests)]
    phase = Phase(concurrency=concurrency)
    proc = psutil.Process(broker_pid) if broker_pid else None
    named = {**(pids or {}), "client": os.getpid()}
    procs = {name: psutil.Process(pid) for name, pid in named.items()}
    ours = list(procs.values())
    phase.broker_before = broker_status(url, 5.0, keys)
    cpu0 = _cpu(proc)
    busy0, ours0 = busy_cpu_s(), _total(ours)
    each0 = {name: _total([p]) for name, p in procs.items()}
    t0 = time.perf_counter()
    if concurrency == 1:
        phase.records = _run_sync(url, prompts, gen_len, stream, keys)
    else:
        phase.records = asyncio.run(_run_async(url, prompts, gen_len, stream, concurrency, keys))
    phase.wall_s = time.perf_counter() - t0
    cpu1 = _cpu(proc)
    phase.foreign_cpu_s = max(0.0, (busy_cpu_s() - busy0) - (_total(ours) - ours0))
    phase.process_cpu_s = {name: _total([p]) - each0[name] for name, p in procs.items()}
    phase.broker_after = broker_status(url, 5.0, keys)
    if cpu0 is not None and cpu1 is not None:
        phase.broker_cpu_s = cpu1 - cpu0
    return phase


def busy_cpu_s() -> float:
    """CPU seconds every process on the machine has used since boot."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0) + getattr(t, "steal", 0.0)
    # guest time is already inside user time on Linux.
    return sum(t) - idle - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _total(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _cpu(proc: psutil.Process | None) -> float | None:
    if proc is None:
        return None
    t = proc.cpu_times()
    return t.user + t.system


def analyse(phase: Phase, stage_names: list[str]) -> dict:
    """Figures of one phase: TTFT, time per output token, throughput, latency breakdown."""
    recs = phase.records
    tokens = sum(r["tokens"] for r in recs)
    decode = [t for r in recs for t in r["trace"] if t["index"] >= 1]
    n_stages = len(stage_names)

    # Means are additive, so the breakdown's parts add up to the per-token latency.
    per_stage = []
    for name in stage_names:
        hops = [h for t in decode for h in t["stages"] if h["stage"] == name]
        per_stage.append(
            {
                "stage": name,
                "start": hops[0]["start"] if hops else None,
                "end": hops[0]["end"] if hops else None,
                "compute_s": _mean(h["compute_s"] for h in hops),
                "queue_s": _mean(h["queue_s"] for h in hops),
                "transfer_s": _mean(h["transfer_s"] for h in hops),
                "transfer_p50_s": summary(h["transfer_s"] for h in hops)["p50"],
            }
        )
    latency = _mean(t["latency_s"] for t in decode)
    broker_queue = _mean(t["broker_queue_s"] for t in decode)
    sampling = _mean(t["sampling_s"] for t in decode)
    compute = sum(s["compute_s"] for s in per_stage)
    stage_queue = sum(s["queue_s"] for s in per_stage)
    transfer = sum(s["transfer_s"] for s in per_stage)
    # What no stage entry covers: client <-> broker legs and the broker's own handling.
    rest = latency - compute - stage_queue - transfer - broker_queue

    # Per hop, everything but compute and waiting: the token path has n_stages + 1 one-way hops
    # (client -> s0 -> ... -> s_last -> client), each DEALER -> ROUTER -> DEALER.
    non_compute = [
        (
            t["latency_s"]
            - sum(h["compute_s"] + h["queue_s"] for h in t["stages"])
            - t["broker_queue_s"]
        )
        / (len(t["stages"]) + 1)
        for t in decode
    ]
    transfers = [h["transfer_s"] for t in decode for h in t["stages"]]

    fwd0 = (phase.broker_before or {}).get("counters", {}).get("forwarded")
    fwd1 = (phase.broker_after or {}).get("counters", {}).get("forwarded")
    forwarded = fwd1 - fwd0 if fwd0 is not None and fwd1 is not None else None
    return {
        "concurrency": phase.concurrency,
        "requests": len(recs),
        "tokens": tokens,
        "wall_s": phase.wall_s,
        "tokens_per_s": tokens / phase.wall_s if phase.wall_s else None,
        "request_tokens_per_s": summary(r["tokens"] / r["total_s"] for r in recs if r["total_s"]),
        "ttft_s": summary(r["ttft_s"] for r in recs),
        "tpot_s": summary(t["latency_s"] for t in decode),
        "itl_s": summary(g for r in recs for g in r["gaps"])
        if any(r["gaps"] for r in recs)
        else None,
        "breakdown": {
            "per_token_s": {
                "latency": latency,
                "compute": compute,
                "stage_queue": stage_queue,
                "transfer": transfer,
                "broker_queue": broker_queue,
                "client_broker_legs": rest,
                "sampling": sampling,
            },
            "stages": per_stage,
        },
        "hop": {
            "hops_per_token": n_stages + 1,
            "transfer_s": summary(transfers),
            "non_compute_per_hop_s": summary(non_compute),
        },
        "broker": {
            "forwarded": forwarded,
            "messages_per_s": forwarded / phase.wall_s
            if forwarded is not None and phase.wall_s
            else None,
            "cpu_s": phase.broker_cpu_s,
            "cpu_us_per_message": 1e6 * phase.broker_cpu_s / forwarded
            if forwarded and phase.broker_cpu_s is not None
            else None,
        },
        # Each process's CPU use over the phase, in cores (1.0 = one core busy throughout).
        "process_cores": {name: cpu / phase.wall_s for name, cpu in phase.process_cpu_s.items()}
        if phase.wall_s
        else {},
        "foreign_cpu_share": phase.foreign_cpu_s / (phase.wall_s * (os.cpu_count() or 1))
        if phase.foreign_cpu_s is not None and phase.wall_s
        else None,
        "first_token_ids": recs[0]["token_ids"] if recs else [],
    }


def _mean(values) -> float:
    xs = list(values)
    return statistics.fmean(xs) if xs else math.nan
