"""Long prompts under load: a prompt of L tokens prefilled while other streams decode.

Two figures come out, each against the same cluster without the disturbance:
- the long prompt's time to first token while `streams` other requests decode, against its
  time to first token on the idle cluster;
- the other streams' p99 time per output token while a long prompt is prefilled (tokens that
  arrive between its submission and its first token), against their p99 over a window of the
  same load with no long prompt.

The streams run greedy requests of `stream_prompt` tokens to `stream_gen` tokens each and
start the next as one finishes, as in the pipeline scenario's concurrency phases.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bench.stats import median, percentile, ratio, summary
from bench.workload import prompt
from client import AsyncClient

# Prompt indices of the long prompts and the streams' prompts: disjoint, so no request
# repeats another's tokens.
LONG_INDEX = 50_000
STREAM_INDEX = 60_000


@dataclass(frozen=True)
class LongPromptLoad:
    prompt_len: int = 1024
    streams: int = 8
    repeats: int = 3
    stream_prompt: int = 32
    stream_gen: int = 48
    settle_s: float = 3.0  # load running before the baseline window opens
    baseline_s: float = 4.0
    gap_s: float = 1.0  # between long prompts, so each window starts from steady decoding
    prefill_chunk: int | None = None  # the client's default when None


def measure(url: str, vocab: int, load: LongPromptLoad) -> dict:
    return asyncio.run(_measure(url, vocab, load))


async def _measure(url: str, vocab: int, load: LongPromptLoad) -> dict:
    kwargs = {} if load.prefill_chunk is None else {"prefill_chunk": load.prefill_chunk}
    async with AsyncClient(url, tokenizer=None, **kwargs) as client:

        async def long_ttft(index: int) -> float:
            ids = prompt(LONG_INDEX + index, load.prompt_len, vocab)
            result = await client.generate(ids, max_new_tokens=1, ignore_eos=True)
            return result.ttft_s

        await long_ttft(0)  # warm-up: the first long prefill allocates its caches
        idle = [await long_ttft(1 + k) for k in range(load.repeats)]

        tokens: list[tuple[float, float]] = []  # (arrival, time per output token)
        stop = asyncio.Event()

        async def stream(first: int) -> None:
            index = first
            while not stop.is_set():
                ids = prompt(STREAM_INDEX + index, load.stream_prompt, vocab)
                events = client.stream(ids, max_new_tokens=load.stream_gen, ignore_eos=True)
                async for event in events:
                    if event["type"] == "token" and event["index"] >= 1:
                        tokens.append((time.perf_counter(), event["trace"]["latency_s"]))
                index += load.streams

        tasks = [asyncio.create_task(stream(i)) for i in range(load.streams)]
        try:
            await asyncio.sleep(load.settle_s)
            base_from = time.perf_counter()
            await asyncio.sleep(load.baseline_s)
            base_to = time.perf_counter()
            loaded, windows = [], []
            for k in range(load.repeats):
                started = time.perf_counter()
                loaded.append(await long_ttft(1 + load.repeats + k))
                windows.append((started, time.perf_counter()))
                await asyncio.sleep(load.gap_s)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    base = [t for at, t in tokens if base_from <= at <= base_to]
    during = [t for at, t in tokens if any(a <= at <= b for a, b in windows)]
    if not base or not during:
        raise RuntimeError(
            f"no stream tokens measured ({len(base)} in the baseline, {len(during)} during "
            "long prefills); lengthen --long-baseline or check the cluster's logs"
        )
    return {
        **load.__dict__,
        "idle_ttft_s": idle,
        "loaded_ttft_s": loaded,
        "ttft_ratio": ratio(median(loaded), median(idle)),
        "others_tpot_s": {"baseline": summary(base), "during": summary(during)},
        "others_p99_ratio": ratio(percentile(during, 99), percentile(base, 99)),
    }
