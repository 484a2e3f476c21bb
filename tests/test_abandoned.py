"""Clients that go away: a killed client's requests and caches are freed as soon as its
connections close, a slow consumer keeps its request, and a client whose request the broker
ended is told why and rebuilds it. Real processes; the killed client is a subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from broker import messages as M
from client import Client, query_broker
from tests.cluster import Cluster
from tests.test_e2e import prompt_ids, reference_greedy, stage_caches
from tests.test_failover import FAST, run_stream

TOKENS = 30

# Eight streams of one synchronous client, each past its third token; then the process holds
# them open (a sync client only moves while its streams are read) until it is killed.
EIGHT_STREAMS = """
import sys, time
from client import Client
c = Client(sys.argv[1])
streams = [c.stream([5, 6, 7, 8 + i], max_new_tokens=200, ignore_eos=True) for i in range(8)]
for s in streams:
    tokens = 0
    while tokens < 3:
        tokens += next(s)["type"] == "token"
print("streaming", flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(120)
def test_a_killed_clients_requests_and_caches_are_freed_when_its_connection_closes(checkpoints):
    directory = checkpoints["llama"]
    # A client timeout far beyond the wait below: only the closed connection can free them.
    args = (*FAST, "--client-timeout", "120")
    with Cluster(directory, 3, broker_args=args) as cluster:
        proc = subprocess.Popen(
            [sys.executable, "-c", EIGHT_STREAMS, cluster.url],
            stdout=subprocess.PIPE,
            text=True,
            env=cluster.env,
        )
        try:
            assert proc.stdout.readline().strip() == "streaming"
            cluster.wait_for(
                lambda s: s["requests"] == 8 and stage_caches(s) == 24, 20, "24 caches held"
            )
            killed = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            cluster.wait_for(
                lambda s: s["requests"] == 0 and stage_caches(s) == 0,
                15,
                "requests ended and caches freed after the client was killed",
            )
            freed_s = time.monotonic() - killed
        finally:
            proc.kill()
        jobs = query_broker(cluster.url, M.JobsQuery())["jobs"]
        assert [j["outcome"] for j in jobs] == ["abandoned"] * 8
        assert cluster.status()["ready"]
        print(f"SIGKILL to requests and caches freed: {freed_s:.2f} s")


@pytest.mark.timeout(120)
def test_a_slow_consumer_keeps_its_request(checkpoints):
    """A consumer that reads nothing for a while (its client sends nothing meanwhile) keeps
    its connection open: its request is neither ended nor rebuilt."""
    directory = checkpoints["llama"]
    prompt = prompt_ids(71)
    expected = reference_greedy(directory, prompt, TOKENS)
    with Cluster(directory, 2, broker_args=FAST) as cluster, Client(cluster.url) as client:

        def pause(i: int) -> None:
            if i != 5:
                return
            cluster.wait_for(lambda s: stage_caches(s) == 2, 10, "a cache on each stage")
            # Three times --client-gone-after, watched from another connection all along.
            until = time.monotonic() + 3.0
            while time.monotonic() < until:
                status = cluster.status()
                assert status["requests"] == 1 and stage_caches(status) == 2

        tokens, events = run_stream(client, prompt, TOKENS, pause)
        assert tokens == expected and events == []


@pytest.mark.timeout(120)
def test_a_client_whose_request_the_broker_ended_is_told_why_and_rebuilds_it(checkpoints):
    """Silent past --client-timeout, the request is ended (its caches freed); the client hears
    why when it reads again, in a replay event, and its output is unchanged."""
    directory = checkpoints["llama"]
    prompt = prompt_ids(72)
    expected = reference_greedy(directory, prompt, TOKENS)
    args = (*FAST, "--client-timeout", "1")
    with Cluster(directory, 2, broker_args=args) as cluster, Client(cluster.url) as client:
        ended = {}

        def pause(i: int) -> None:
            if i != 5:
                return
            status = cluster.wait_for(
                lambda s: s["requests"] == 0 and stage_caches(s) == 0, 15, "the request ended"
            )
            ended["jobs"] = query_broker(cluster.url, M.JobsQuery())["jobs"]
            assert status["ready"]

        tokens, events = run_stream(client, prompt, TOKENS, pause)
        assert tokens == expected
        assert [j["outcome"] for j in ended["jobs"]] == ["abandoned"]
        told = [e for e in events if "ended by the broker" in (e.get("reason") or "")]
        assert len(told) == 1 and told[0]["type"] == "replay"
        assert "sent nothing for" in told[0]["reason"]
        assert "(--client-timeout 1)" in told[0]["reason"]
