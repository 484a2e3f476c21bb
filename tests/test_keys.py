"""CurveZMQ keys: the key maker, a broker that refuses to run open off loopback (and, run so
with --insecure, refuses DRAIN), a keyless loopback broker that drains for a local monitor, and
a cluster with keys where every role is checked from the key that sent each message. Real
processes and real sockets on loopback; each refused peer gets a message that names the cause."""

from __future__ import annotations

import contextlib
import queue
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from broker import messages as M
from broker import protocol as P
from broker.keys import make_keys
from broker.protocol import Code
from client import BrokerRefused, Client, RequestFailed, query_broker
from common.keys import KeyRing, PeerKeys, handshake_refusal, peer_mechanism
from layerline.cluster import cluster_env, free_port
from tests.cluster import Cluster
from tests.test_e2e import prompt_ids, reference_greedy
from tests.test_tui import next_update
from tests.wire import step
from tui.reader import FeedReader
from tui.records import LinkState, Notice, Snapshot

TOKENS = 12
# A refused peer must know within a few seconds; this bound leaves room for a loaded machine.
REFUSED_WITHIN_S = 5.0


def _keys(root: Path, name: str) -> dict:
    return {"cert": root / "private" / f"{name}.key_secret", "broker_key": root / "broker.key"}


# --- the key maker --------------------------------------------------------------------------


def test_keygen_writes_the_layout_the_broker_reads(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "broker.keys", str(tmp_path), "--stages", "s0", "s1",
         "--clients", "alice", "--admins", "ops"],
        capture_output=True, text=True, env=cluster_env(), timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    public = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.key"))
    assert public == [
        "admins/ops.key", "broker.key", "clients/alice.key", "stages/s0.key", "stages/s1.key",
    ]  # fmt: skip
    secrets = sorted(p.name for p in (tmp_path / "private").iterdir())
    assert secrets == [f"{n}.key_secret" for n in ("alice", "broker", "ops", "s0", "s1")]
    for path in (tmp_path / "private").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    ring = KeyRing.from_layout(tmp_path)
    assert ring.counts() == {"stage": 2, "client": 1, "admin": 1}
    alice = PeerKeys.load(**_keys(tmp_path, "alice"))
    assert ring.roles(alice.public) == {"client"}
    # A second run keeps every key; a name taken by another role is refused.
    before = (tmp_path / "clients" / "alice.key").read_bytes()
    assert make_keys(tmp_path, {"client": ["alice"]}) == []
    assert (tmp_path / "clients" / "alice.key").read_bytes() == before
    with pytest.raises(ValueError, match="another role"):
        make_keys(tmp_path, {"admin": ["alice"]})


def test_a_key_removed_from_its_directory_is_forgotten_at_the_next_refresh(tmp_path):
    make_keys(tmp_path, {"client": ["alice", "bob"]})
    ring = KeyRing.from_layout(tmp_path)
    bob = PeerKeys.load(**_keys(tmp_path, "bob"))
    assert ring.roles(bob.public) == {"client"}
    (tmp_path / "clients" / "bob.key").unlink()
    assert ring.refresh()
    assert ring.roles(bob.public) == frozenset()
    assert not ring.refresh()  # nothing changed since


# --- a broker without keys ------------------------------------------------------------------


def _broker(checkpoint: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "broker", "--model", str(checkpoint), "--feed", "none", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster_env(),
    )  # fmt: skip


def test_a_broker_off_loopback_without_keys_refuses_to_start(checkpoints):
    proc = _broker(checkpoints["llama"], "--bind", f"tcp://0.0.0.0:{free_port()}")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "reachable from other hosts" in out
    assert "python -m broker.keys" in out and "--insecure" in out


def test_insecure_is_explicit_shows_in_status_and_refuses_drain(checkpoints):
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = _broker(checkpoints["llama"], "--bind", f"tcp://0.0.0.0:{port}", "--insecure")
    try:
        status = None
        deadline = time.monotonic() + 30
        while status is None and time.monotonic() < deadline:
            try:
                status = query_broker(url, timeout=1.0)
            except BrokerRefused:
                raise
            except Exception:
                assert proc.poll() is None, proc.stdout.read()
        assert status is not None and status["security"] == "insecure"
        # Anyone who reaches the port would be an admin: no one may drain.
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(url)
        try:
            sock.send_multipart(P.encode(P.MONITOR_TAG, M.Drain(stage="s0")))
            assert sock.poll(10_000)
            reply = P.decode(sock.recv_multipart())
        finally:
            sock.close()
        assert (reply.body.code, reply.body.message) == (
            Code.UNAUTHORIZED,
            "DRAIN needs an admin key: start the broker with --keys (this broker runs --insecure)",
        )
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert '"event": "insecure"' in out


def test_a_keyless_broker_on_loopback_lets_a_local_monitor_drain(checkpoints):
    """On loopback without keys every local process can already register a stage and read
    hidden states: the host is the trust boundary, and a monitor without keys drains."""
    with Cluster(checkpoints["llama"], 2) as cluster:
        assert cluster.status()["security"] == "loopback"
        updates: queue.SimpleQueue = queue.SimpleQueue()
        reader = FeedReader(cluster.url, cluster.feed_url, tokenizer_loader=lambda m: None)
        reader.start(updates.put)
        try:
            reader.drain("s1")
            notice = next_update(updates, Notice, 10)
            assert (notice.error, notice.message) == (
                False,
                "draining s1: its layers move to other stages",
            )
        finally:
            reader.stop()
        assert cluster.stages["s1"].wait(timeout=30) == 0
        status = cluster.wait_for(lambda s: s["ready"], 10, "ready")
        assert [r["stage"] for r in status["map"]] == ["s0"]
        assert [s["name"] for s in status["stages"]] == ["s0"]


# --- a cluster with keys --------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    make_keys(root, {"client": ["alice", "bob", "carol"], "admin": ["ops"]})
    return root


@pytest.fixture(scope="module")
def cluster(checkpoints, keys):
    with Cluster(checkpoints["llama"], 2, keys=keys) as c:
        yield c


def test_greedy_through_a_cluster_with_keys_equals_generate(cluster, keys, checkpoints):
    prompt = prompt_ids(81)
    expected = reference_greedy(checkpoints["llama"], prompt, TOKENS)
    with Client(cluster.url, **_keys(keys, "alice")) as client:
        assert client.status()["security"] == "curve"
        result = client.generate(prompt, max_new_tokens=TOKENS, ignore_eos=True)
    assert result.token_ids == expected


@pytest.mark.parametrize(
    "who, match",
    [
        ("no keys", r"requires keys; pass this client's certificate \(--cert"),
        ("a stranger's key", r"refused this client's key: its public key is not in the broker's"),
        ("another broker's key", r"the broker key given \(--broker-key\) is not that broker's"),
        ("keys for a broker without them", r"runs without keys, and this client was given keys"),
    ],
)
def test_a_refused_client_is_told_why_within_seconds(cluster, keys, tmp_path, who, match):
    kwargs, url, plain = {}, cluster.url, None
    if who == "keys for a broker without them":  # a ZeroMQ peer without CURVE stands for one
        plain = zmq.Context.instance().socket(zmq.ROUTER)
        plain.linger = 0
        url = f"tcp://127.0.0.1:{plain.bind_to_random_port('tcp://127.0.0.1')}"
        kwargs = _keys(keys, "alice")
    elif who == "a stranger's key":
        stranger = tmp_path / "stranger"
        make_keys(stranger, {"client": ["mallory"]})
        kwargs = {"cert": _keys(stranger, "mallory")["cert"], "broker_key": keys / "broker.key"}
    elif who == "another broker's key":
        other = tmp_path / "other"
        make_keys(other, {})
        kwargs = {"cert": _keys(keys, "alice")["cert"], "broker_key": other / "broker.key"}
    started = time.monotonic()
    try:
        with pytest.raises(BrokerRefused, match=match):
            Client(url, connect_timeout=30, **kwargs)
    finally:
        if plain is not None:
            plain.close()
    assert time.monotonic() - started < REFUSED_WITHIN_S
    assert cluster.status()["ready"]  # the cluster keeps serving


def test_a_handshake_dropped_without_detail_is_told_apart_by_the_brokers_greeting(
    cluster, keys, tmp_path
):
    """Which side drops a mismatched handshake first is a race: a peer may see the failure
    without detail. The mechanism in the broker's greeting then tells a broker without keys
    from a wrong broker key; a peer that sends no greeting says nothing about keys, and nor
    does a failure that a second handshake with the same keys does not repeat."""
    no_detail = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    alice = PeerKeys.load(**_keys(keys, "alice"))
    make_keys(tmp_path / "other", {})
    wrong = PeerKeys.load(_keys(keys, "alice")["cert"], tmp_path / "other" / "broker.key")
    plain = zmq.Context.instance().socket(zmq.ROUTER)
    plain.linger = 0
    try:
        url = f"tcp://127.0.0.1:{plain.bind_to_random_port('tcp://127.0.0.1')}"
        assert peer_mechanism(url) == "NULL"
        assert re.search("runs without keys", handshake_refusal(url, no_detail, 0, alice))
        assert handshake_refusal(url, no_detail, 0, None) is None  # a passing fault
    finally:
        plain.close()
    assert peer_mechanism(cluster.url) == "CURVE"
    wrong_key = handshake_refusal(cluster.url, no_detail, 0, wrong, role="stage")
    assert re.search(r"the broker key given \(--broker-key\) is not", wrong_key)
    assert re.search(r"requires keys; pass this stage's", handshake_refusal(
        cluster.url, no_detail, 0, None, role="stage"
    ))  # fmt: skip
    assert handshake_refusal(cluster.url, no_detail, 0, alice) is None  # a passing fault
    # A TCP proxy whose broker is down accepts and closes: no greeting, so no verdict.
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        closer = threading.Thread(target=lambda: proxy.accept()[0].close(), daemon=True)
        closer.start()
        url = f"tcp://127.0.0.1:{proxy.getsockname()[1]}"
        assert handshake_refusal(url, no_detail, 0, alice) is None
        closer.join(timeout=10)


def test_each_message_needs_its_role(cluster, keys):
    """A stage's key cannot ask as a client; a client's key cannot register as a stage, and its
    process exits 3 saying so; a client cannot drain, an admin can be asked for STATUS."""
    with pytest.raises(RequestFailed, match=r"PING needs a key of the admin or client role"):
        query_broker(cluster.url, timeout=10, **_keys(keys, "s0"))
    assert query_broker(cluster.url, timeout=10, **_keys(keys, "ops"))["ready"]
    impostor = subprocess.run(
        [sys.executable, "-m", "stage", "--broker", cluster.url, "--model", str(cluster.model),
         "--name", "s7", "--cert", str(_keys(keys, "bob")["cert"]),
         "--broker-key", str(keys / "broker.key")],
        capture_output=True, text=True, env=cluster_env(), timeout=120,
    )  # fmt: skip
    assert impostor.returncode == 3
    assert "READY needs a key of the stage role; this key's role is client" in impostor.stderr
    status = cluster.status()
    assert sorted(s["name"] for s in status["stages"]) == ["s0", "s1"]
    with _raw(cluster, keys, "carol") as sock:
        sock.send_multipart(P.encode(P.MONITOR_TAG, M.Drain(stage="s0")))
        assert sock.poll(10_000)
        reply = P.decode(sock.recv_multipart())
    assert reply.body.code == Code.UNAUTHORIZED
    assert "DRAIN needs a key of the admin role" in reply.body.message
    with _raw(cluster, keys, "ops") as sock:
        sock.send_multipart(P.encode(P.MONITOR_TAG, M.Drain(stage="nobody")))
        assert sock.poll(10_000)
        reply = P.decode(sock.recv_multipart())
    assert (reply.body.code, reply.body.message) == (Code.BAD_REQUEST, "no stage named 'nobody'")
    assert cluster.status()["counters"]["role_refusals"] >= 3


def test_a_stranger_stage_exits_with_the_reason(cluster, keys, tmp_path):
    stranger = tmp_path / "stranger"
    make_keys(stranger, {"stage": ["s8"]})
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "stage", "--broker", cluster.url, "--model", str(cluster.model),
         "--name", "s8", "--cert", str(stranger / "private" / "s8.key_secret"),
         "--broker-key", str(keys / "broker.key")],
        capture_output=True, text=True, env=cluster_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3
    assert "refused this stage's key: its public key is not in the broker's allowed stages" in (
        proc.stderr
    )
    # The stage's own start (imports, the checkpoint) comes before its handshake.
    assert time.monotonic() - started < 60
    assert sorted(s["name"] for s in cluster.status()["stages"]) == ["s0", "s1"]


def test_a_request_belongs_to_its_key(cluster, keys):
    """Another client's key cannot end a request even with its id; an admin's key can."""
    with Client(cluster.url, **_keys(keys, "alice")) as alice:
        stream = alice.stream(prompt_ids(82), max_new_tokens=200, ignore_eos=True)
        next(stream)
        [rid] = _active(cluster, keys)
        with _raw(cluster, keys, "bob") as sock:
            sock.send_multipart(P.encode(P.CLIENT_TAG, M.End(rid=rid, reason="cancelled")))
            assert sock.poll(10_000)
            reply = P.decode(sock.recv_multipart())
            assert reply.body.code == Code.UNAUTHORIZED
            sock.send_multipart(step(rid, 99, [1, 2, 3, 4], 3, 1))
            assert sock.poll(10_000)
            assert P.decode(sock.recv_multipart()).body.code == Code.UNAUTHORIZED
        assert _active(cluster, keys) == [rid]
        with _raw(cluster, keys, "ops") as sock:
            sock.send_multipart(P.encode(P.CLIENT_TAG, M.End(rid=rid, reason="cancelled")))
            cluster.wait_for(lambda s: s["requests"] == 0, 10, "the admin's END")
        stream.close()


def test_a_removed_key_is_refused_without_a_restart(cluster, keys):
    """Removing a key's file revokes it within a heartbeat, on its open connection too."""
    with Client(cluster.url, **_keys(keys, "carol")) as carol:
        assert carol.generate(prompt_ids(83), max_new_tokens=2).token_ids
        saved = keys / "carol.key.saved"
        shutil.move(keys / "clients" / "carol.key", saved)
        try:
            deadline = time.monotonic() + 10
            refused = None
            while refused is None and time.monotonic() < deadline:
                try:
                    carol.generate(prompt_ids(83), max_new_tokens=2)
                except RequestFailed as e:
                    refused = e
            assert refused is not None, "the removed key still served after 10 s"
            assert "unauthorized" in str(refused) and "none any more" in str(refused)
            with pytest.raises(BrokerRefused, match="refused this client's key"):
                Client(cluster.url, connect_timeout=30, **_keys(keys, "carol"))
        finally:
            shutil.move(saved, keys / "clients" / "carol.key")
    assert cluster.status()["counters"]["handshake_refusals"] >= 1


def _active(cluster: Cluster, keys: Path) -> list[str]:
    jobs = query_broker(cluster.url, M.JobsQuery(), 10, **_keys(keys, "ops")).get("jobs", [])
    return [j["rid"] for j in jobs if j["outcome"] == "active"]


@pytest.mark.parametrize(
    "who, state, match",
    [
        ("alice", "up", None),
        ("s0", "refused", r"refused this client's key"),  # a stage key may not watch the feed
        ("stranger", "refused", r"refused this client's key"),
    ],
)
def test_the_monitor_feed_admits_client_and_admin_keys(cluster, keys, tmp_path, who, state, match):
    if who == "stranger":
        make_keys(tmp_path, {"client": ["mallory"]})
        peer = PeerKeys.load(tmp_path / "private" / "mallory.key_secret", keys / "broker.key")
    else:
        peer = PeerKeys.load(**_keys(keys, who))
    updates: queue.SimpleQueue = queue.SimpleQueue()
    reader = FeedReader(cluster.url, cluster.feed_url, keys=peer, tokenizer_loader=lambda m: None)
    started = time.monotonic()
    reader.start(updates.put)
    try:
        link = next_update(updates, LinkState, REFUSED_WITHIN_S, lambda u: u.state == state)
        assert time.monotonic() - started < REFUSED_WITHIN_S
        if match is not None:
            assert re.search(match, link.reason), link.reason
        else:
            snapshot = next_update(updates, Snapshot)
            assert snapshot.ready and snapshot.security == "curve"
    finally:
        reader.stop()


def test_nothing_crosses_the_wire_in_clear(cluster, keys, checkpoints):
    """A relay between a client and the broker records every byte: the ZMTP greeting names
    the CURVE mechanism, and neither the prompt's token ids nor any header is readable."""
    prompt = prompt_ids(84, length=16)
    expected = reference_greedy(checkpoints["llama"], prompt, 4)
    port = int(cluster.url.rsplit(":", 1)[1])
    with _Relay(port) as relay, Client(relay.url, **_keys(keys, "alice")) as client:
        result = client.generate(prompt, max_new_tokens=4, ignore_eos=True)
    assert result.token_ids == expected
    up, down = bytes(relay.up), bytes(relay.down)
    assert up[:1] == b"\xff" and up[10:11] == b"\x03"  # a ZMTP 3 greeting
    assert up[12:17] == b"CURVE" and down[12:17] == b"CURVE"
    ids = torch.tensor(prompt, dtype=torch.int64).numpy().tobytes()
    for needle in (ids, ids[:16], b"rid", b"STEP", b"fingerprint", b"float32"):
        assert needle not in up and needle not in down, needle
    assert len(up) > len(ids) and len(down) > 4 * 160  # the logits did travel


class _Relay:
    """A TCP relay on loopback that records the bytes of one connection, both ways."""

    def __init__(self, target: int):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.target = target
        self.up, self.down = bytearray(), bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stopping = threading.Event()

    def __enter__(self) -> _Relay:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.server.close()

    def _run(self) -> None:
        self.server.settimeout(0.1)
        conn = None
        while conn is None and not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = self.server.accept()
        if conn is None:
            return
        upstream = socket.create_connection(("127.0.0.1", self.target))
        pairs = {conn: (upstream, self.up), upstream: (conn, self.down)}
        with conn, upstream:
            while not self.stopping.is_set():
                readable, _, _ = select.select(list(pairs), [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    other, record = pairs[sock]
                    record.extend(data)
                    other.sendall(data)


class _raw:
    """A DEALER with a client's keys, speaking the wire protocol itself."""

    def __init__(self, cluster: Cluster, keys: Path, name: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.identity = P.client_identity(P.new_client_secret(), "raw")
        PeerKeys.load(**_keys(keys, name)).apply(self.sock)
        self.sock.connect(cluster.url)

    def __enter__(self) -> zmq.Socket:
        return self.sock

    def __exit__(self, *exc) -> None:
        self.sock.close(0)
        self.ctx.term()
