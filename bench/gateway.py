"""The gateway scenario: the same streaming requests through the OpenAI-compatible gateway (with
the official `openai` SDK) and through `AsyncClient` directly, on one cluster, phase after
phase, at each stream count.

Both paths send the same token-id prompts, greedy, with the same token cap; each request's
tokens must be the same on both (`same_output`), so both do the same work. Each path runs
twice per phase, in the order A, B, B, A. Throughput is the
tokens generated over the phase's wall time; time to first token is from the call to the first
token (direct) or the first streamed chunk (gateway). The gateway runs as its own process
(`python -m gateway`), as a user would run it.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.cluster import bench_env
from bench.workload import prompt
from client import AsyncClient
from layerline.cluster import free_port

GATEWAY_START_S = 120.0


async def _direct(
    url: str, prompts: list[list[int]], gen_len: int, streams: int
) -> tuple[list[dict], float]:
    """Each request's figures and the wall time of all, from a connected client."""
    todo = iter(range(len(prompts)))
    out: list[dict | None] = [None] * len(prompts)

    async def worker(client: AsyncClient) -> None:
        for i in todo:
            t0 = time.perf_counter()
            first, result = None, None
            async for event in client.stream(prompts[i], max_new_tokens=gen_len):
                if event["type"] == "token":
                    first = first or time.perf_counter()
                elif event["type"] == "done":
                    result = event["result"]
            out[i] = {"ttft_s": first - t0, "text": result.text, "tokens": len(result.token_ids)}

    async with AsyncClient(url) as client:
        await client.connect()  # the tokenizer is loaded before the clock starts
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(streams)))
        wall = time.perf_counter() - t0
    return [r for r in out if r is not None], wall


async def _gateway(
    base: str, model: str, prompts: list[list[int]], gen_len: int, streams: int
) -> tuple[list[dict], float]:
    """As `_direct`, through the gateway with the openai SDK."""
    import openai

    todo = iter(range(len(prompts)))
    out: list[dict | None] = [None] * len(prompts)

    async def worker(client) -> None:
        for i in todo:
            t0 = time.perf_counter()
            first, text, tokens = None, [], 0
            stream = await client.completions.create(
                model=model,
                prompt=prompts[i],
                max_tokens=gen_len,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.choices:
                    first = first or time.perf_counter()
                    text.append(chunk.choices[0].text)
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            out[i] = {"ttft_s": first - t0, "text": "".join(text), "tokens": tokens}

    async with openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(streams)))
        wall = time.perf_counter() - t0
    return [r for r in out if r is not None], wall


def _joined(runs: list[tuple[list[dict], float]]) -> tuple[list[dict], float]:
    """Several runs of a path as one: every request, and their wall times added."""
    return [r for records, _ in runs for r in records], sum(wall for _, wall in runs)


def _figures(records: list[dict], wall_s: float) -> dict:
    tokens = sum(r["tokens"] for r in records)
    return {
        "requests": len(records),
        "tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s else None,
        "ttft_p50_s": statistics.median(r["ttft_s"] for r in records),
    }


def run(
    url: str,
    vocab: int,
    *,
    concurrency: tuple[int, ...],
    requests: int,
    prompt_len: int,
    gen_len: int,
    log_dir: Path,
    rnd: int = 0,
    log=print,
) -> dict:
    """Measure both paths on the cluster at `url` (its checkpoint needs a tokenizer: the
    gateway speaks text)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    with open(log_dir / f"gateway-r{rnd}.log", "ab") as out:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--broker", url, "--port", str(port),
             "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, env=bench_env(),
        )  # fmt: skip
    try:
        model = _wait_healthy(f"http://127.0.0.1:{port}", gateway)
        warm = [prompt(10_000, prompt_len, vocab)]
        asyncio.run(_direct(url, warm, 4, 1))
        asyncio.run(_gateway(base, model, warm, 4, 1))
        phases = []
        for i, c in enumerate(concurrency):
            n = max(requests, c) if c == 1 else max(requests, 2 * c)
            prompts = [prompt(j, prompt_len, vocab) for j in range(n)]
            # A, B, B, A: whichever path runs second in a pair meets warmer caches and
            # allocators, so each path runs once first and once second.
            first = ("direct", "gateway") if (rnd + i) % 2 == 0 else ("gateway", "direct")
            done: dict[str, list[tuple[list[dict], float]]] = {"direct": [], "gateway": []}
            for path in (*first, *reversed(first)):
                if path == "direct":
                    done[path].append(asyncio.run(_direct(url, prompts, gen_len, c)))
                else:
                    done[path].append(asyncio.run(_gateway(base, model, prompts, gen_len, c)))
            direct = _figures(*_joined(done["direct"]))
            through = _figures(*_joined(done["gateway"]))
            texts = {
                path: [(r["tokens"], r["text"]) for records, _ in runs for r in records]
                for path, runs in done.items()
            }
            same = texts["direct"] == texts["gateway"]
            phases.append(
                {
                    "round": rnd,
                    "concurrency": c,
                    "direct": direct,
                    "gateway": through,
                    "same_output": same,
                    "throughput_ratio": through["tokens_per_s"] / direct["tokens_per_s"],
                    "ttft_overhead_s": through["ttft_p50_s"] - direct["ttft_p50_s"],
                }
            )
            log(
                f"  gateway C={c}: {through['tokens_per_s']:.1f} vs {direct['tokens_per_s']:.1f} "
                f"tokens/s direct; TTFT p50 {through['ttft_p50_s'] * 1e3:.1f} vs "
                f"{direct['ttft_p50_s'] * 1e3:.1f} ms"
            )
    finally:
        gateway.terminate()
        try:
            gateway.wait(timeout=10)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait(timeout=10)
    return {"model_id": model, "phases": phases}


def _wait_healthy(root: str, proc: subprocess.Popen) -> str:
    """Wait for /health, then return the served model's id."""
    deadline = time.monotonic() + GATEWAY_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"{root}/health", timeout=2) as r:
                if r.status == 200:
                    with urllib.request.urlopen(f"{root}/v1/models", timeout=2) as m:
                        return json.load(m)["data"][0]["id"]
        except OSError:
            pass
        time.sleep(0.2)  # a poll interval
    raise TimeoutError(f"the gateway did not answer /health within {GATEWAY_START_S:.0f} s")
