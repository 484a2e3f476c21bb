"""Clients that go away: a killed client's requests and caches are freed as soon as its
connections close, a stream left unread is ended at its client's idle_timeout, a slow consumer
keeps its request, and a client whose request the broker ended is told why and rebuilds it.
Real processes; the killed client is a subprocess."""

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


@pytest.fixture(scope="module")
def cluster(checkpoints):
    """Two stages whose broker waits 120 s for a silent client: far beyond every wait below, so
    only a closed connection or an unread answer ends a request here."""
    with Cluster(checkpoints["llama"], 2, broker_args=(*FAST, "--client-timeout", "120")) as c:
        yield c


@pytest.fixture
def idle_cluster(cluster):
    """The shared cluster with no request left over from an earlier test."""
    return cluster.wait_idle()


@pytest.mark.timeout(120)
def test_a_killed_clients_requests_and_caches_are_freed_when_its_connection_closes(idle_cluster):
    cluster = idle_cluster
    done_before = len(query_broker(cluster.url, M.JobsQuery()).get("jobs", ()))
    proc = subprocess.Popen(
        [sys.executable, "-c", EIGHT_STREAMS, cluster.url],
        stdout=subprocess.PIPE,
        text=True,
        env=cluster.env,
    )
    try:
        assert proc.stdout.readline().strip() == "streaming"
        cluster.wait_for(
            lambda s: s["requests"] == 8 and stage_caches(s) == 16, 20, "16 caches held"
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
    assert [j["outcome"] for j in jobs[done_before:]] == ["abandoned"] * 8
    assert cluster.status()["ready"]
    print(f"SIGKILL to requests and caches freed: {freed_s:.2f} s")


@pytest.mark.timeout(120)
def test_a_stream_left_unread_is_ended_at_its_clients_idle_timeout(idle_cluster, checkpoints):
    """A sync client runs nothing while its stream is not read, so it cannot end the stream
    itself: the broker ends the request once its answer has waited the client's idle_timeout
    (told in every step), long before --client-timeout. Read again, the stream rebuilds the
    request and its output is unchanged."""
    cluster = idle_cluster
    prompt = prompt_ids(73)
    expected = reference_greedy(checkpoints["llama"], prompt, TOKENS)
    with Client(cluster.url, idle_timeout=2) as client:
        stream = client.stream(prompt, max_new_tokens=TOKENS, ignore_eos=True)
        tokens, events = [], []
        for event in stream:
            if event["type"] == "token":
                tokens.append(event["token_id"])
                if len(tokens) == 5:
                    break  # the stream is still referenced, and not read
        left = time.monotonic()
        cluster.wait_for(
            lambda s: s["requests"] == 1 and stage_caches(s) == 2, 10, "a cache on each stage"
        )
        cluster.wait_for(
            lambda s: s["requests"] == 0 and stage_caches(s) == 0,
            15,
            "the unread request ended and its caches freed",
        )
        freed_s = time.monotonic() - left
        jobs = query_broker(cluster.url, M.JobsQuery())["jobs"]
        assert jobs[-1]["outcome"] == "abandoned"
        for event in stream:
            if event["type"] == "token":
                tokens.append(event["token_id"])
            elif event["type"] == "replay":
                events.append(event)
    assert tokens == expected
    told = [e for e in events if "ended by the broker" in e["reason"]]
    assert len(told) == 1 and "was not read for" in told[0]["reason"]
    assert "the client's idle_timeout is 2 s" in told[0]["reason"]
    print(f"stream left unread to caches freed: {freed_s:.2f} s (idle_timeout 2 s)")


@pytest.mark.timeout(120)
def test_a_slow_consumer_keeps_its_request(idle_cluster, checkpoints):
    """A consumer that reads nothing for a while (its client sends nothing meanwhile) keeps
    its connection open: its request is neither ended nor rebuilt."""
    cluster = idle_cluster
    directory = checkpoints["llama"]
    prompt = prompt_ids(71)
    expected = reference_greedy(directory, prompt, TOKENS)
    with Client(cluster.url) as client:

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
