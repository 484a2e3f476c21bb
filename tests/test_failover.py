"""Faults with real processes: kill, freeze, restart, join, drain, broker restart, all dead, chaos."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time

import pytest

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
        assert [r["stage"] for r in reshards[0]["old_map"]] == ["s0", "s1", "s2"]
        assert [r["stage"] for r in reshards[0]["new_map"]] == ["s0", "s2"]
        status = cluster.wait_for(lambda s: stage_caches(s) == 0 and s["ready"], 10, "no caches left")
        assert [r["stage"] for r in status["map"]] == ["s0", "s2"]


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
        assert client.generate(prompt2, max_new_tokens=TOKENS, ignore_eos=True).token_ids == \
            reference_greedy(directory, prompt2, TOKENS)


@pytest.mark.timeout(180)
def test_restarted_stage_refuses_unknown_positions_and_the_request_recovers(checkpoints):
    directory = checkpoints["llama"]
    prompt = prompt_ids(24)
    expected = reference_greedy(directory, prompt, TOKENS)
    with Cluster(directory, 3, broker_args=FAST) as cluster, Client(cluster.url) as client:
        def on_token(i):
            if i == 10:
                # Restart s2 under the same name before the broker can notice it died: the new
                # process has an empty cache and gets a decode step for position > 0.
                cluster.kill_stage("s2")
                cluster.stages["s2"].wait()
                cluster.start_stage("s2")

        tokens, events = run_stream(client, prompt, TOKENS, on_token)
        assert tokens == expected
        assert events, "the request must have been replayed"
        status = cluster.wait_for(lambda s: s["ready"] and stage_caches(s) == 0, 20, "ready, no caches")
        assert [r["stage"] for r in status["map"]] == ["s0", "s1", "s2"]


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
        def on_token(i):
            if i == 10:
                cluster.kill_stage("s0", signal.SIGTERM)

        tokens, events = run_stream(client, prompt, TOKENS, on_token)
        assert tokens == expected
        assert cluster.stages["s0"].wait(timeout=30) == 0
        status = cluster.wait_for(lambda s: s["ready"], 10, "ready")
        assert [r["stage"] for r in status["map"]] == ["s1", "s2"]
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
        assert events
        cluster.wait_for(lambda s: s["ready"] and stage_caches(s) == 0, 20, "ready again")


@pytest.mark.timeout(120)
def test_all_stages_dead_gives_a_clear_error_in_bounded_time(checkpoints):
    directory = checkpoints["llama"]
    with Cluster(directory, 2, broker_args=(*FAST, "--ready-wait", "3")) as cluster, \
            Client(cluster.url) as client:
        assert client.generate(prompt_ids(1), max_new_tokens=4, ignore_eos=True).token_ids
        for name in ("s0", "s1"):
            cluster.kill_stage(name)
        t0 = time.monotonic()
        with pytest.raises(NotReadyError, match="no live stages"):
            client.generate(prompt_ids(2), max_new_tokens=4, ignore_eos=True)
        assert time.monotonic() - t0 < 10


VANISHING_CLIENT = """
import sys
from client import Client
c = Client(sys.argv[1])
for e in c.stream([5, 6, 7, 8], max_new_tokens=100000, ignore_eos=True):
    if e["type"] == "token" and e["index"] == 3:
        print("streaming", flush=True)
"""


@pytest.mark.timeout(120)
def test_vanished_client_caches_are_freed(checkpoints):
    directory = checkpoints["llama"]
    with Cluster(directory, 2, broker_args=(*FAST, "--client-timeout", "2")) as cluster:
        proc = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, cluster.url],
                                stdout=subprocess.PIPE, text=True, env=cluster.env)
        try:
            assert proc.stdout.readline().strip() == "streaming"
            cluster.wait_for(lambda s: stage_caches(s) == 2, 10, "a cache on each stage")
            proc.kill()
            proc.wait()
            status = cluster.wait_for(lambda s: stage_caches(s) == 0 and s["requests"] == 0, 15,
                                      "caches freed after the client vanished")
            assert status["ready"]
        finally:
            proc.kill()


@pytest.mark.timeout(420)
def test_chaos_kill_and_restart_random_stages_under_concurrency(checkpoints):
    directory = checkpoints["llama"]
    prompts = [prompt_ids(300 + i, length=4 + i % 6) for i in range(16)]
    expected = [reference_greedy(directory, p, 64) for p in prompts]
    rng = random.Random(1234)
    broker_args = (*FAST, "--max-replays", "40")
    with Cluster(directory, 4, broker_args=broker_args) as cluster:
        async def clients():
            async with AsyncClient(cluster.url, max_replays=40) as client:
                return await asyncio.gather(*(
                    client.generate(p, max_new_tokens=64, ignore_eos=True) for p in prompts))

        async def chaos(done: asyncio.Event):
            for _ in range(3):
                await asyncio.sleep(2.0)
                victim = rng.choice(sorted(cluster.stages))
                cluster.kill_stage(victim)
                await asyncio.to_thread(cluster.stages[victim].wait)
                cluster.start_stage(victim)

        async def main():
            done = asyncio.Event()
            chaos_task = asyncio.create_task(chaos(done))
            results = await clients()
            await chaos_task
            return results

        results = asyncio.run(main())
        assert [r.token_ids for r in results] == expected
        status = cluster.wait_for(lambda s: s["ready"] and len(s["map"]) == 4 and stage_caches(s) == 0,
                                  60, "all four stages back, no caches")
        assert status["requests"] == 0
