"""Faults with real processes: kill, freeze, restart, join, drain, broker restart, all dead, chaos."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest
import torch
import zmq

from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd
from client import AsyncClient, Client, NotReadyError
from tests.cluster import Cluster
from tests.test_e2e import prompt_ids, reference_greedy, stage_caches

TOKENS = 40
FAST = ("--rebalance-cooldown", "1", "--settle", "1")


def run_stream(client, prompt, n, on_token):
    """Stream a request; call on_token(index) after each token; return (tokens, events)."""
    tokens, events = [], []
    for event in client.stream(prompt, max_new_tokens=n, ignore_eos=True):
        if event["type"] == "token":
            tokens.append(event["token_id"])
            on_token(len(tokens))
        elif event["type"] in ("reshard", "replay"):
            events.append(event)
        elif event["type"] == "done":
            assert event["result"].token_ids == tokens
    return tokens, events


@pytest.mark.timeout(180)
def test_killed_stage_mid_stream(checkpoints):
    directory = checkpoints["llama"]
    prompt = prompt_ids(21)
    expected = reference_greedy(directory, prompt, TOKENS)
    with Cluster(directory, 3, broker_args=FAST) as cluster, Client(cluster.url) as client:
        # The pipeline's order is the order the stages registered in, which load can change.
        before = [r["stage"] for r in cluster.status()["map"]]
        after = [name for name in before if name != "s1"]
        t_kill = {}

        def on_token(i):
            if i == 10:
                cluster.kill_stage("s1")
                t_kill["t"] = time.monotonic()

        tokens, events = run_stream(client, prompt, TOKENS, on_token)
        assert tokens == expected
        reshards = [e for e in events if e["type"] == "reshard"]
        assert len(reshards) == 1
        assert reshards[0]["lost"] == "s1"
        assert sorted(before) == ["s0", "s1", "s2"]
        assert [r["stage"] for r in reshards[0]["old_map"]] == before
        assert [r["stage"] for r in reshards[0]["new_map"]] == after
        status = cluster.wait_for(
            lambda s: stage_caches(s) == 0 and s["ready"], 10, "no caches left"
        )
        assert [r["stage"] for r in status["map"]] == after


@pytest.mark.timeout(180)
def test_frozen_stage_thawed_after_reshard_corrupts_nothing(checkpoints):
    directory = checkpoints["llama"]
    prompt = prompt_ids(22)
    expected = reference_greedy(directory, prompt, TOKENS)
    with Cluster(directory, 3, broker_args=FAST) as cluster, Client(cluster.url) as client:

        def on_token(i):
            if i == 8:
                cluster.kill_stage("s1", signal.SIGSTOP)

        tokens, events = run_stream(client, prompt, TOKENS, on_token)
        assert tokens == expected
        assert any(e["type"] == "reshard" and e["lost"] == "s1" for e in events)
        # Thaw it: it wakes with an old epoch, is told to register again and rejoins.
        cluster.kill_stage("s1", signal.SIGCONT)
        cluster.wait_for(lambda s: s["ready"] and len(s["map"]) == 3, 30, "s1 back in the map")
        prompt2 = prompt_ids(23)
        assert client.generate(
            prompt2, max_new_tokens=TOKENS, ignore_eos=True
        ).token_ids == reference_greedy(directory, prompt2, TOKENS)


def _send_step(sock, rid, seq, tokens, pos, n, logits=True):
    prev = P.prefix_hash(0, tokens[:pos])
    step = M.Step(
        rid=rid,
        seq=seq,
        pos=pos,
        n=n,
        prev=prev,
        hash=P.prefix_hash(prev, tokens[pos : pos + n]),
        logits=logits,
    )
    sock.send_multipart(P.encode(P.CLIENT_TAG, step, [torch.tensor([tokens[pos : pos + n]])]))


def _recv(sock, timeout_s=30.0) -> P.Message:
    assert sock.poll(timeout_s * 1000), "no reply from the broker"
    return P.decode(sock.recv_multipart())


@pytest.mark.timeout(180)
def test_restarted_stage_refuses_unknown_positions_and_the_request_recovers(checkpoints):
    """A stage process replaced under its name has an empty cache: it refuses the next decode
    step (cache_miss), the broker tells the client to replay, and the replay gives the same token."""
    directory = checkpoints["llama"]
    prompt = prompt_ids(24)
    expected = reference_greedy(directory, prompt, 2)
    # dead-after is long so the frozen old process is replaced, not declared dead.
    with Cluster(directory, 3, broker_args=(*FAST, "--dead-after", "20")) as cluster:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cluster.url)
        try:
            _send_step(sock, "rr-1", 0, prompt, 0, len(prompt))
            first = _recv(sock)
            assert first.cmd == Cmd.RESULT and int(first.tensor(0)[0, -1].argmax()) == expected[0]
            epoch = cluster.status()["epoch"]
            old = cluster.stages["s2"]
            old.send_signal(signal.SIGSTOP)
            new = cluster.start_stage("s2")
            cluster.wait_for(
                lambda s: (
                    s["ready"]
                    and any(
                        st["name"] == "s2" and st["state"] == "ready" and st["pid"] == new.pid
                        for st in s["stages"]
                    )
                ),
                60,
                "s2 replaced in place",
            )
            assert cluster.status()["epoch"] == epoch, "a restart in place keeps the layer map"
            old.kill()
            tokens = prompt + [expected[0]]
            _send_step(sock, "rr-1", 1, tokens, len(prompt), 1)
            event = _recv(sock)
            assert event.cmd == Cmd.EVENT and event.body.event == "replay"
            assert "cache" in event.body.reason
            # The replay: the prompt as one prefill, then the decode step, as first cut.
            _send_step(sock, "rr-1", 2, tokens, 0, len(prompt), logits=False)
            _send_step(sock, "rr-1", 3, tokens, len(prompt), 1)
            replies = [_recv(sock), _recv(sock)]
            assert [r.cmd for r in replies] == [Cmd.RESULT, Cmd.RESULT]
            assert replies[0].descs[0].shape[1] == 0  # no logits for the replayed prefill
            assert int(replies[1].tensor(0)[0, -1].argmax()) == expected[1]
            sock.send_multipart(P.encode(P.CLIENT_TAG, M.End(rid="rr-1")))
            cluster.wait_for(lambda s: stage_caches(s) == 0, 10, "caches released")
        finally:
            sock.close(0)


@pytest.mark.timeout(180)
def test_stage_joins_mid_stream(checkpoints):
    directory = checkpoints["llama"]
    prompt = prompt_ids(25)
    expected = reference_greedy(directory, prompt, 80)
    with Cluster(directory, 2, broker_args=FAST) as cluster, Client(cluster.url) as client:

        def on_token(i):
            if i == 5:
                cluster.start_stage("s9")

        tokens, _ = run_stream(client, prompt, 80, on_token)
        assert tokens == expected
        status = cluster.wait_for(lambda s: s["ready"] and len(s["map"]) == 3, 30, "s9 in the map")
        assert "s9" in [r["stage"] for r in status["map"]]


@pytest.mark.timeout(180)
def test_sigterm_drains_a_stage_and_no_request_fails(checkpoints):
    directory = checkpoints["llama"]
    prompt = prompt_ids(26)
    expected = reference_greedy(directory, prompt, TOKENS)
    with Cluster(directory, 3, broker_args=FAST) as cluster, Client(cluster.url) as client:
        # Stages register in any order: the survivors keep the places they had before.
        before = [r["stage"] for r in cluster.status()["map"]]

        def on_token(i):
            if i == 10:
                cluster.kill_stage("s0", signal.SIGTERM)

        tokens, events = run_stream(client, prompt, TOKENS, on_token)
        assert tokens == expected
        assert cluster.stages["s0"].wait(timeout=30) == 0
        status = cluster.wait_for(lambda s: s["ready"], 10, "ready")
        assert sorted(before) == ["s0", "s1", "s2"]
        assert [r["stage"] for r in status["map"]] == [name for name in before if name != "s0"]
        assert all(s["name"] != "s0" for s in status["stages"])


@pytest.mark.timeout(180)
def test_broker_restart_mid_stream(checkpoints):
    directory = checkpoints["llama"]
    prompt = prompt_ids(27)
    expected = reference_greedy(directory, prompt, TOKENS)
    with Cluster(directory, 3, broker_args=FAST) as cluster, Client(cluster.url) as client:

        def on_token(i):
            if i == 10:
                cluster.broker.kill()
                cluster.broker.wait()
                cluster.start_broker()

        tokens, events = run_stream(client, prompt, TOKENS, on_token)
        assert tokens == expected
        # The new broker knows nothing of the request: the client replays it from its tokens.
        assert any(e["type"] == "replay" for e in events), events
        cluster.wait_for(lambda s: s["ready"] and stage_caches(s) == 0, 20, "ready again")


@pytest.mark.timeout(120)
def test_all_stages_dead_gives_a_clear_error_in_bounded_time(checkpoints):
    directory = checkpoints["llama"]
    with (
        Cluster(directory, 2, broker_args=(*FAST, "--ready-wait", "3")) as cluster,
        Client(cluster.url) as client,
    ):
        prompt = prompt_ids(1)
        assert client.generate(
            prompt, max_new_tokens=4, ignore_eos=True
        ).token_ids == reference_greedy(directory, prompt, 4)
        for name in ("s0", "s1"):
            cluster.kill_stage(name)
        # The broker's own bound (--ready-wait 3) ends the wait, with the reason.
        with pytest.raises(NotReadyError, match=r"not ready after 3 s: .*no live stages"):
            client.generate(prompt_ids(2), max_new_tokens=4, ignore_eos=True)


@pytest.mark.timeout(420)
def test_chaos_kill_and_restart_random_stages_under_concurrency(checkpoints):
    directory = checkpoints["llama"]
    prompts = [prompt_ids(300 + i, length=4 + i % 6) for i in range(16)]
    expected = [reference_greedy(directory, p, 64) for p in prompts]
    rng = random.Random(1234)
    broker_args = (*FAST, "--max-replays", "40")
    with Cluster(directory, 4, broker_args=broker_args) as cluster:
        produced = [0]
        total = 16 * 64

        async def one(client, prompt):
            async for event in client.stream(prompt, max_new_tokens=64, ignore_eos=True):
                if event["type"] == "token":
                    produced[0] += 1
                elif event["type"] == "done":
                    return event["result"]
            raise AssertionError("stream ended without a result")

        async def clients():
            async with AsyncClient(cluster.url, max_replays=40) as client:
                return await asyncio.gather(*(one(client, p) for p in prompts))

        kills_during_streams = []

        async def chaos(done: asyncio.Event):
            # Three kills spread over the run, by tokens produced (a batched cluster may finish
            # the 1024 tokens in a few seconds); each victim is restarted at once.
            for fraction in (0.2, 0.45, 0.7):
                while produced[0] < fraction * total and not done.is_set():
                    await asyncio.sleep(0.01)
                victim = rng.choice(sorted(cluster.stages))
                kills_during_streams.append(not done.is_set())
                cluster.kill_stage(victim)
                await asyncio.to_thread(cluster.stages[victim].wait)
                cluster.start_stage(victim)

        async def main():
            done = asyncio.Event()
            chaos_task = asyncio.create_task(chaos(done))
            results = await clients()
            done.set()
            await chaos_task
            return results

        results = asyncio.run(main())
        assert kills_during_streams == [True, True, True], "every kill must land while streams run"
        assert [r.token_ids for r in results] == expected
        assert all(r.events for r in results), "every stream saw the failures"
        status = cluster.wait_for(
            lambda s: s["ready"] and len(s["map"]) == 4 and stage_caches(s) == 0,
            60,
            "all four stages back, no caches",
        )
        assert status["requests"] == 0
