"""A request belongs to the client that started it: no other peer may end, step or read it,
across the owner's reconnects and a broker restart. Real processes and sockets; the hostile
peer is a raw DEALER."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import structlog
import zmq

from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd, Code
from client import Client, query_broker
from tests.cluster import Cluster
from tests.test_e2e import prompt_ids, reference_greedy, stage_caches
from tests.test_failover import FAST, run_stream
from tests.wire import step

TOKENS = 40


class Peer:
    """A raw client socket; `identity` None leaves libzmq's default."""

    def __init__(self, url: str, identity: bytes | None = None):
        self.seen: list[P.Message] = []  # what came before the replies `ask` waited for
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(url)

    def send(self, frames: list) -> None:
        self.sock.send_multipart(frames)

    def reply(self, timeout_s: float = 20.0) -> P.Message:
        assert self.sock.poll(timeout_s * 1000), "the broker did not answer"
        return P.decode(self.sock.recv_multipart())

    def ask(self, body: M.Body, answer: Cmd) -> P.Message:
        """Send a query and return its `answer`; what arrives before it goes to `seen`."""
        self.send(P.encode(P.CLIENT_TAG, body))
        while True:
            msg = self.reply()
            if msg.cmd == answer:
                return msg
            self.seen.append(msg)

    def close(self) -> None:
        self.sock.close(linger=0)


def refused(peer: Peer, frames: list) -> M.Error:
    """Send `frames` and return the ERROR that answers them."""
    peer.send(frames)
    msg = peer.reply()
    assert msg.cmd == Cmd.ERROR, msg
    return msg.body


@pytest.fixture(scope="module")
def cluster(checkpoints):
    """Two stages with the default arguments, shared by the tests that neither kill nor freeze
    a process."""
    with Cluster(checkpoints["llama"], 2) as c:
        yield c


@pytest.fixture
def idle_cluster(cluster):
    """The shared cluster with no request left over from an earlier test."""
    return cluster.wait_idle()


@pytest.mark.timeout(180)
def test_a_hostile_peer_cannot_end_step_or_take_another_clients_request(checkpoints, idle_cluster):
    directory = checkpoints["llama"]
    prompt, second = prompt_ids(61), prompt_ids(62)
    expected = reference_greedy(directory, prompt, TOKENS)
    expected_second = reference_greedy(directory, second, 8)
    cluster = idle_cluster
    with Client(cluster.url) as client:
        hostile = Peer(cluster.url)
        answers: dict[str, M.Error] = {}
        target = {}

        def attack(i: int) -> None:
            if i != 5:
                return
            jobs = hostile.ask(M.JobsQuery(), Cmd.JOBS).body.jobs
            [rid] = [j.rid for j in jobs if j.outcome == "active"]  # JOBS shows every id
            public, _, n = rid.rpartition("-")
            target.update(rid=rid, next=f"{public}-{int(n) + 1}")
            answers["end"] = refused(hostile, P.encode(P.CLIENT_TAG, M.End(rid=rid)))
            answers["restart"] = refused(hostile, step(rid, 1, [5, 6, 7], 0, 3))
            grown = prompt + [9] * (i + 1)
            answers["next step"] = refused(hostile, step(rid, 2, grown, len(prompt) + i, 1))
            # The honest client's next request id, taken first: it is reserved for its owner.
            answers["squat"] = refused(hostile, step(target["next"], 1, [5, 6, 7], 0, 3))

        tokens, events = run_stream(client, prompt, TOKENS, attack)
        assert tokens == expected and events == []
        for what in ("end", "restart", "next step"):
            error = answers[what]
            assert (error.code, error.rid) == (Code.UNAUTHORIZED, target["rid"]), what
            assert "belongs to another client" in error.message, what
        squat = answers["squat"]
        assert (squat.code, squat.rid) == (Code.UNAUTHORIZED, target["next"])
        assert "reserved for another client" in squat.message
        result = client.generate(second, max_new_tokens=8, ignore_eos=True)
        assert result.rid == target["next"] and result.token_ids == expected_second
        # Nothing of the honest requests ever reached the hostile peer.
        hostile.ask(M.Ping(), Cmd.PONG)
        assert hostile.seen == []
        hostile.close()
        outcomes = {j["rid"]: j["outcome"] for j in _jobs(cluster)}
        assert outcomes[target["rid"]] == outcomes[target["next"]] == "done"


def _jobs(cluster: Cluster) -> list[dict]:
    return query_broker(cluster.url, M.JobsQuery())["jobs"]


@pytest.mark.timeout(120)
def test_a_request_follows_its_owner_to_a_new_socket_and_no_one_else(checkpoints, idle_cluster):
    """The owner is the secret in the routing identity, not the socket: a client that opens a
    new socket (a reconnect) goes on with its request; another secret may not touch it."""
    directory = checkpoints["llama"]
    tokens = prompt_ids(63)
    expected = reference_greedy(directory, tokens, 2)
    cluster = idle_cluster
    secret = P.new_client_secret()
    rid = f"{P.public_id(secret)}-1"
    first = Peer(cluster.url, P.client_identity(secret, "1"))
    first.send(step(rid, 1, tokens, 0, len(tokens)))
    answer = first.reply()
    assert answer.cmd == Cmd.RESULT and answer.body.seq == 1
    assert int(answer.tensor(0).reshape(-1).argmax()) == expected[0]
    first.close()
    again = Peer(cluster.url, P.client_identity(secret, "2"))
    grown = tokens + [expected[0]]
    again.send(step(rid, 2, grown, len(tokens), 1))
    answer = again.reply()
    assert answer.cmd == Cmd.RESULT and answer.body.seq == 2
    assert int(answer.tensor(0).reshape(-1).argmax()) == expected[1]
    stranger = Peer(cluster.url, P.client_identity(P.new_client_secret(), "1"))
    error = refused(stranger, P.encode(P.CLIENT_TAG, M.End(rid=rid)))
    assert (error.code, error.rid) == (Code.UNAUTHORIZED, rid)
    error = refused(stranger, step(rid, 3, grown + [4], len(grown), 1))
    assert (error.code, error.rid, error.seq) == (Code.UNAUTHORIZED, rid, 3)
    again.send(P.encode(P.CLIENT_TAG, M.End(rid=rid, reason="done")))
    status = cluster.wait_for(
        lambda s: s["requests"] == 0 and stage_caches(s) == 0, 10, "the request ended"
    )
    assert status["ready"]
    outcomes = {j["rid"]: j["outcome"] for j in _jobs(cluster)}
    assert outcomes[rid] == "done"  # ended by its owner, not abandoned, not a stranger's
    for peer in (again, stranger):
        peer.close()


@pytest.mark.timeout(180)
def test_a_reconnecting_client_keeps_its_request(checkpoints):
    """The client library replaces a silent socket (new identity) and replays: its request is
    still its own. The broker is frozen (SIGSTOP) until the client has given up on the socket."""
    directory = checkpoints["llama"]
    prompt = prompt_ids(64)
    expected = reference_greedy(directory, prompt, TOKENS)
    slow = ("--dead-after", "10")  # the freeze must not look like a death to anyone else
    with (
        Cluster(directory, 2, broker_args=(*FAST, *slow), stage_args=slow) as cluster,
        structlog.testing.capture_logs() as logs,
        Client(cluster.url, broker_timeout=0.5) as client,
    ):
        broker = cluster.broker.pid
        thawed = threading.Event()

        def thaw_after_reconnect() -> None:
            deadline = time.monotonic() + 30
            try:
                while time.monotonic() < deadline:
                    if any(e["event"] == "client_broker_lost" for e in list(logs)):
                        return
                    time.sleep(0.01)  # polling another thread's log; nothing to wait on
            finally:
                os.kill(broker, signal.SIGCONT)
                thawed.set()

        def freeze(i: int) -> None:
            if i == 5:
                os.kill(broker, signal.SIGSTOP)
                threading.Thread(target=thaw_after_reconnect, daemon=True).start()

        try:
            tokens, events = run_stream(client, prompt, TOKENS, freeze)
        finally:
            thawed.wait(35)
        assert tokens == expected
        assert [e["reason"] for e in events] == ["reconnect"]
    lost = [e for e in logs if e["event"] == "client_broker_lost"]
    assert [e["cause"] for e in lost] == ["silent"]


@pytest.mark.timeout(180)
def test_after_a_broker_restart_no_one_else_can_take_the_request(checkpoints):
    """A restarted broker knows no request; a peer that names one before its owner replays it
    is refused, and the owner's replay is served."""
    directory = checkpoints["llama"]
    prompt = prompt_ids(65)
    expected = reference_greedy(directory, prompt, TOKENS)
    with Cluster(directory, 2, broker_args=FAST) as cluster, Client(cluster.url) as client:
        squat: dict[str, M.Error] = {}

        def restart_and_squat(i: int) -> None:
            if i != 10:
                return
            [rid] = [j["rid"] for j in _jobs(cluster) if j["outcome"] == "active"]
            cluster.broker.kill()
            cluster.broker.wait()
            cluster.start_broker()
            hostile = Peer(cluster.url)
            squat["error"] = refused(hostile, step(rid, 1, prompt, 0, len(prompt)))
            hostile.close()

        tokens, events = run_stream(client, prompt, TOKENS, restart_and_squat)
        assert tokens == expected
        assert any(e["type"] == "replay" for e in events), events
        error = squat["error"]
        assert error.code == Code.UNAUTHORIZED and "reserved for another client" in error.message
