"""Admission control: limits refuse new requests, never the steps of admitted ones.

Real broker and stage processes on loopback, with --max-queue set low to provoke the flood.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
import zmq
from transformers import AutoModelForCausalLM

from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd, Code
from client import AsyncClient, BusyError, Client, query_broker
from tests.cluster import Cluster
from tests.test_e2e import prompt_ids, reference_greedy, stage_caches
from tests.wire import step

CONTEXT = 256  # the tiny checkpoints' max_position_embeddings


def greedy_references(directory, prompts: list[list[int]], n: int) -> list[list[int]]:
    """`reference_greedy` of each prompt, the model loaded once (one thread, as the stages)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        out = []
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n)
            out.append(ids[0, len(prompt) :].tolist())
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(240)
def test_a_flood_of_new_prompts_never_fails_an_admitted_stream(checkpoints):
    """Three streams run; then three other clients send 18 long prompts at once, one of them
    one token per step. The admitted streams all finish with their calm-run output; new
    prompts are refused busy (and retried a few times) while the queue is full, never after
    admission."""
    directory = checkpoints["llama"]
    running = [prompt_ids(500 + i) for i in range(3)]
    run_tokens = 64
    floods = {  # prefill_chunk: prompts of one client
        1: [prompt_ids(700 + i, length=48 + i) for i in range(2)],
        8: [prompt_ids(600 + i, length=96 + i) for i in range(8)],
        128: [prompt_ids(800 + i, length=160 + i) for i in range(8)],
    }
    flood_tokens = 3
    tries = 6
    expected_running = greedy_references(directory, running, run_tokens)
    expected_flood = {
        chunk: greedy_references(directory, prompts, flood_tokens)
        for chunk, prompts in floods.items()
    }
    cancel_at = 24  # the last running stream is cancelled by its own client there

    counts = [0, 0, 0]  # tokens of each running stream so far
    busy_at: list[list[int]] = []  # `counts` at each busy refusal

    with Cluster(directory, 2, broker_args=("--max-queue", "16")) as cluster:

        async def run(client: AsyncClient, k: int, started: asyncio.Event):
            tokens, others = [], []
            stream = client.stream(running[k], max_new_tokens=run_tokens, ignore_eos=True)
            async for event in stream:
                if event["type"] == "done":
                    continue
                if event["type"] != "token":
                    others.append(event["type"])
                    continue
                tokens.append(event["token_id"])
                counts[k] = len(tokens)
                if min(counts) >= 5:
                    started.set()
                if k == 2 and len(tokens) == cancel_at:
                    break
            await stream.aclose()  # the last one is cancelled by its own client
            return tokens, others

        async def flood(client: AsyncClient, chunk: int, i: int):
            """One new prompt, sent again after each busy refusal; its tokens, or None."""
            busy = 0
            while busy < tries:
                tokens = []
                try:
                    async for event in client.stream(
                        floods[chunk][i], max_new_tokens=flood_tokens, ignore_eos=True
                    ):
                        if event["type"] == "token":
                            tokens.append(event["token_id"])
                    return tokens, busy
                except BusyError as e:
                    assert not tokens, f"an admitted request was refused: {e}"
                    assert "--max-queue" in e.message, e
                    assert e.retry_after_s == 0.5
                    busy_at.append(list(counts))
                    busy += 1
                    await asyncio.sleep(e.retry_after_s)  # what a caller told busy does
            return None, busy

        async def main():
            started = asyncio.Event()
            async with AsyncClient(cluster.url) as runner:
                runs = [asyncio.create_task(run(runner, k, started)) for k in range(3)]
                await asyncio.wait_for(started.wait(), 60)
                clients = {chunk: AsyncClient(cluster.url, prefill_chunk=chunk) for chunk in floods}
                try:
                    floods_done = await asyncio.gather(
                        *(
                            flood(clients[chunk], chunk, i)
                            for chunk, prompts in floods.items()
                            for i in range(len(prompts))
                        )
                    )
                finally:
                    for c in clients.values():
                        await c.close()
                return await asyncio.gather(*runs), floods_done

        runs, flooded = asyncio.run(main())
        for k, (tokens, others) in enumerate(runs):
            assert others == [], f"running stream {k} saw {others}"
            want = expected_running[k][:cancel_at] if k == 2 else expected_running[k]
            assert tokens == want, f"running stream {k}"
        want_flood = [t for chunk in floods for t in expected_flood[chunk]]
        admitted = [(got, want) for (got, _), want in zip(flooded, want_flood, strict=True) if got]
        assert admitted and all(got == want for got, want in admitted)
        refusals = sum(busy for _, busy in flooded)
        assert refusals > 0, "the flood never filled the queue: lower --max-queue"
        # New prompts were refused while the admitted streams were running.
        assert max(busy_at[0][:2]) < run_tokens, busy_at[0]
        status = cluster.wait_for(
            lambda s: s["requests"] == 0 and stage_caches(s) == 0, 20, "every request ended"
        )
        assert status["counters"]["busy"] == refusals
        jobs = query_broker(cluster.url, M.JobsQuery())["jobs"]
        assert [j["outcome"] for j in jobs].count("cancelled") == 1


@pytest.mark.timeout(120)
def test_a_prompt_sent_one_token_per_step_is_never_refused_by_its_own_length(checkpoints):
    """One client alone, prefill_chunk=1: its 150 steps pass a --max-queue of 16."""
    directory = checkpoints["llama"]
    prompt = prompt_ids(900, length=150)
    expected = reference_greedy(directory, prompt, 6)
    with (
        Cluster(directory, 2, broker_args=("--max-queue", "16")) as cluster,
        Client(cluster.url, prefill_chunk=1) as client,
    ):
        result = client.generate(prompt, max_new_tokens=6, ignore_eos=True)
        assert result.token_ids == expected and result.events == []
        assert cluster.status()["counters"]["busy"] == 0


def _replies(sock: zmq.Socket, count: int, timeout_s: float = 20.0) -> list[P.Message]:
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count:
        left = deadline - time.monotonic()
        assert left > 0 and sock.poll(left * 1000), f"{len(out)} replies of {count}"
        msg = P.decode(sock.recv_multipart())
        out += P.unbundle(msg) if msg.cmd in P.BUNDLES else [msg]
    return out


@pytest.mark.timeout(120)
def test_an_admitted_request_holds_at_most_its_context_and_new_ones_wait_for_the_queue(
    checkpoints,
):
    """A broker with no stage holds every step: a peer that floods one admitted request
    with steps is refused beyond the context's positions, and new requests are told busy."""
    cluster = Cluster(checkpoints["llama"], 0, broker_args=("--max-queue", "100"))
    try:
        cluster.start_broker()
        deadline = time.monotonic() + 30
        while cluster.status() is None:
            assert time.monotonic() < deadline, "the broker did not start"
        ctx = zmq.Context.instance()
        flooder, newcomer = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        for sock in (flooder, newcomer):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(cluster.url)
        tokens = [5, 6, 7]
        flooder.send_multipart(step("flood-1", 0, tokens, 0, 1))
        extra = 300
        for seq in range(1, extra + 1):  # the same position again and again
            flooder.send_multipart(step("flood-1", seq, tokens, 1, 1))
        over = 1 + extra - CONTEXT
        refused = _replies(flooder, over)
        assert all(m.cmd == Cmd.ERROR and m.body.code == Code.CONTEXT_OVERFLOW for m in refused)
        assert [m.body.seq for m in refused] == list(range(extra - over + 1, extra + 1))
        assert "wait for their answers" in refused[0].body.message
        # 256 steps wait (no stage): a new request is refused, with the limit that did it.
        newcomer.send_multipart(step("new-1", 0, tokens, 0, 2))
        [busy] = _replies(newcomer, 1)
        assert busy.cmd == Cmd.ERROR and busy.body.code == Code.BUSY
        assert busy.body.retry_after_s == 0.5
        assert "256 steps queued for the stages (limit 100, --max-queue)" in busy.body.message
        # The rest of its prompt is dropped quietly (it was told once): the next reply is the
        # PING's, where a request unknown to the broker would have been told to replay first.
        newcomer.send_multipart(step("new-1", 1, tokens, 2, 1))
        newcomer.send_multipart(P.encode(P.CLIENT_TAG, M.Ping()))
        [pong] = _replies(newcomer, 1)
        assert pong.cmd == Cmd.PONG
    finally:
        cluster.close()
