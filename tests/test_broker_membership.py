"""A stage that vanishes while the broker is busy sending: its death waits for the send loop;
and refusals, counted alike in STATUS and in the metrics.

The broker runs in this process, driven by hand; the stages are real DEALER sockets on
loopback, so the broker's ROUTER finds a closed one unreachable exactly as in a cluster.
"""

from __future__ import annotations

import errno
import time

import pytest
import zmq

from broker import messages as M
from broker import protocol as P
from broker.broker import Broker
from broker.protocol import Cmd, Code
from broker.records import BrokerConfig
from stage.checkpoint import open_checkpoint


@pytest.fixture
def cluster(checkpoints):
    """A broker expecting three stages, and three registered DEALERs s0, s1, s2."""
    ctx = zmq.Context()
    checkpoint = open_checkpoint(checkpoints["llama"])
    broker = Broker(
        BrokerConfig(bind="tcp://127.0.0.1:*", feed=None, expect_stages=3),
        checkpoint,
        context=ctx,
    )
    dealers = {}
    for name in ("s0", "s1", "s2"):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(broker.endpoint)
        ready = M.Ready(
            name=name,
            fingerprint=checkpoint.fingerprint,
            caps=M.Caps(device="cpu", dtype="float32", memory_bytes=1 << 30),
            credits=8,
        )
        sock.send_multipart(P.encode(P.STAGE_TAG, ready))
        dealers[name] = sock
    deadline = time.monotonic() + 10
    while len(broker.stages) < 3:
        assert time.monotonic() < deadline, "the stages did not register"
        broker.socket.poll(100)
        broker.read_burst()
    yield broker, dealers
    for sock in dealers.values():
        sock.close(linger=0)
    broker.socket.close(linger=0)
    ctx.term()


def _assigns(sock: zmq.Socket) -> list[M.Assign]:
    """Every ASSIGN a stage's socket has received so far, in order."""
    out = []
    while sock.poll(200):
        msg = P.decode(sock.recv_multipart(copy=False), P.DEFAULT_LIMITS, inbound=False)
        if msg.cmd == Cmd.ASSIGN:
            out.append(msg.body)
    return out


def _disconnect(broker: Broker, name: str, sock: zmq.Socket) -> None:
    """Close a stage's socket and wait until the broker's ROUTER refuses its identity.

    libzmq drops a peer's pipe in a few steps between its I/O thread and the socket's user;
    a probe on the raw socket (not through Broker.send) returns EHOSTUNREACH once it is gone.
    """
    ident = broker.stages[name].ident
    probe = P.encode(P.STAGE_TAG, M.BrokerHeartbeat(epoch=broker.epoch))
    sock.close(linger=0)
    deadline = time.monotonic() + 10
    while True:
        try:
            broker.socket.send_multipart([ident, *probe], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            if e.errno == errno.EHOSTUNREACH:
                return
        assert time.monotonic() < deadline, "the broker's ROUTER still routes to the closed stage"
        time.sleep(0.01)


def test_a_stage_gone_during_the_first_map_is_dropped_after_it(cluster):
    """s1 vanishes before the first map's ASSIGNs go out. The map is sent whole, then s1 is
    declared dead and the layers reshard onto s0 and s2: every live stage's last ASSIGN is
    its range in the broker's final map, and no epoch names two ranges for one stage."""
    broker, dealers = cluster
    _disconnect(broker, "s1", dealers.pop("s1"))

    broker.form_map_if_due(time.monotonic())  # three stages joined: the first map forms
    broker.bury_unreachable()

    assert "s1" not in broker.stages
    final = broker.layer_map
    assert [r.name for r in final.ranges] == ["s0", "s2"]
    assert final.ranges[0].start == 0 and final.ranges[-1].end == broker.num_layers
    for name, sock in dealers.items():
        assigns = _assigns(sock)
        assert assigns, f"{name} got no ASSIGN"
        last = assigns[-1]
        mine = final.range_of(name)
        assert (last.epoch, last.start, last.end) == (broker.epoch, mine.start, mine.end)
        assert last.map == final.to_ranges()
        ranges_by_epoch: dict[int, set] = {}
        for a in assigns:
            ranges_by_epoch.setdefault(a.epoch, set()).add((a.start, a.end))
        assert all(len(r) == 1 for r in ranges_by_epoch.values()), assigns


def test_a_joining_stage_hears_from_the_broker_at_once(cluster):
    """Before any map forms, a registered stage has a HEARTBEAT: its silence clock, which
    would make it reconnect under a new identity, restarts when the broker knows it."""
    broker, dealers = cluster
    assert broker.layer_map is None
    for name, sock in dealers.items():
        assert sock.poll(1000), f"{name} heard nothing"
        msg = P.decode(sock.recv_multipart(copy=False), P.DEFAULT_LIMITS)
        assert msg.cmd == Cmd.HEARTBEAT and msg.body.epoch == broker.epoch


def _step(rid: str, seq: int) -> tuple[M.Step, tuple[P.TensorDesc, bytes]]:
    """A one-token prompt step of `rid`, with its token id frame."""
    step = M.Step(rid=rid, seq=seq, pos=0, n=1, prev=0, hash=1)
    return step, (P.TensorDesc("int64", (1, 1)), (7).to_bytes(8, "little"))


def test_every_refusal_counts_in_status_and_in_the_metric(cluster):
    """A message that does not decode and one bad item of a STEPS bundle are both refused,
    and each refusal shows in STATUS `counters` and in the Prometheus counter alike."""
    broker, _ = cluster
    client = broker.context.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(broker.endpoint)
    try:
        client.send_multipart([P.CLIENT_TAG, bytes([Cmd.STEP]), b"{not json"])
        bad_rid = _step("no spaces allowed", 0)  # the rid pattern refuses it on decode
        (bundle,) = P.encode_bundled(P.CLIENT_TAG, [_step("good", 0), bad_rid])
        client.send_multipart(bundle)
        errors = []
        deadline = time.monotonic() + 10
        while len(errors) < 2:
            assert time.monotonic() < deadline, f"the broker answered only {errors}"
            broker.socket.poll(100)
            broker.read_burst()
            while client.poll(0):
                errors.append(P.decode(client.recv_multipart(), P.DEFAULT_LIMITS).body)
        assert [e.code for e in errors] == [Code.MALFORMED, Code.BAD_REQUEST]
        assert errors[1].rid == "no spaces allowed" and errors[1].seq == 0
        assert [s.rid for s in broker.waiting] == ["good"]  # its neighbour was taken
        metric = broker.metrics.registry.get_sample_value("layerline_malformed_messages_total")
        assert broker.status().counters["malformed"] == metric == 2
        # STATUS on the wire says the same.
        client.send_multipart(P.encode(P.CLIENT_TAG, M.StatusQuery()))
        deadline = time.monotonic() + 10
        while not client.poll(0):
            assert time.monotonic() < deadline, "no STATUS reply"
            broker.socket.poll(100)
            broker.read_burst()
        status = P.decode(client.recv_multipart(), P.DEFAULT_LIMITS).body
        assert isinstance(status, M.Status) and status.counters["malformed"] == 2
    finally:
        client.close(linger=0)


def test_a_message_that_does_not_decode_is_answered_in_its_senders_role(cluster):
    """The ERROR goes out under the tag the sender used where it is a known one, so a stage
    can read it; a sender whose tag is unknown is answered as a client."""
    broker, dealers = cluster
    stage = dealers["s0"]
    while stage.poll(0):  # what registration brought
        stage.recv_multipart()
    stranger = broker.context.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(broker.endpoint)
    try:
        stage.send_multipart([P.STAGE_TAG, bytes([Cmd.HEARTBEAT]), b"{not json"])
        stranger.send_multipart([b"HTTP", b"GET /", b"{}"])
        replies: dict[str, list] = {"stage": [], "stranger": []}
        deadline = time.monotonic() + 10
        while not (replies["stage"] and replies["stranger"]):
            assert time.monotonic() < deadline, f"the broker answered only {replies}"
            broker.socket.poll(100)
            broker.read_burst()
            for who, sock in (("stage", stage), ("stranger", stranger)):
                while sock.poll(0):
                    frames = sock.recv_multipart()
                    if frames[1] == bytes([Cmd.ERROR]):
                        replies[who].append(frames)
        [stage_error], [stranger_error] = replies["stage"], replies["stranger"]
        assert stage_error[0] == P.STAGE_TAG and stranger_error[0] == P.CLIENT_TAG
        assert P.decode(stage_error).body.code == Code.MALFORMED
        assert P.decode(stranger_error).body.code == Code.BAD_VERSION
    finally:
        stranger.close(linger=0)


@pytest.fixture
def lone_broker(checkpoints):
    """`start(heartbeat_s)`: a broker driven by hand, and a factory of raw DEALERs."""
    ctx = zmq.Context()
    checkpoint = open_checkpoint(checkpoints["llama"])
    made: list = []

    def start(heartbeat_s: float):
        config = BrokerConfig(
            bind="tcp://127.0.0.1:*",
            feed=None,
            heartbeat_s=heartbeat_s,
            dead_after_s=4 * heartbeat_s,
        )
        broker = Broker(config, checkpoint, context=ctx)
        made.append(broker.socket)

        def dealer(identity: bytes) -> zmq.Socket:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(broker.endpoint)
            made.append(sock)
            return sock

        return broker, dealer

    yield start
    for sock in made:
        sock.close(linger=0)
    ctx.term()


def _register(broker: Broker, sock: zmq.Socket, name: str, host: str, pid: int) -> P.Message:
    """Send READY for `name` as process `pid` on `host`; the broker's first answer."""
    ready = M.Ready(
        name=name,
        fingerprint=broker.checkpoint.fingerprint,
        caps=M.Caps(memory_bytes=1 << 30, host=host, pid=pid),
        credits=4,
    )
    sock.send_multipart(P.encode(P.STAGE_TAG, ready))
    deadline = time.monotonic() + 10
    while not sock.poll(0):
        assert time.monotonic() < deadline, f"no answer to READY {name}"
        broker.socket.poll(100)
        broker.read_burst()
    return P.decode(sock.recv_multipart(copy=False), P.DEFAULT_LIMITS)


def test_a_live_stage_keeps_its_name(lone_broker):
    """Issue 19: a READY for a live stage's name from another identity does not displace it.
    Another process is told the name is in use (it exits); the same process (a reconnect whose
    old connection the broker has not seen close) is told to retry, and gets in once it has."""
    broker, dealer = lone_broker(heartbeat_s=30.0)  # the raw "stage" misses no beat here
    old = dealer(b"old-s0")
    assert _register(broker, old, "s0", "a", 11).cmd == Cmd.HEARTBEAT

    other = _register(broker, dealer(b"other"), "s0", "b", 22)
    assert other.cmd == Cmd.ERROR and other.body.code == Code.NAME_IN_USE
    assert other.body.message == (
        "stage name s0 is in use by a live stage (host a, pid 11); start this one with a "
        "different --name, or stop the other one first"
    )
    same = dealer(b"new-s0")
    again = _register(broker, same, "s0", "a", 11)
    assert again.cmd == Cmd.ERROR and again.body.code == Code.BUSY
    assert again.body.retry_after_s == broker.config.heartbeat_s
    assert broker.stages["s0"].ident == b"old-s0"

    _disconnect(broker, "s0", old)
    assert _register(broker, same, "s0", "a", 11).cmd == Cmd.HEARTBEAT
    assert broker.stages["s0"].ident == b"new-s0"
    assert broker.by_ident == {b"new-s0": "s0"}


def test_a_silent_stage_gives_up_its_name(lone_broker):
    """A stage that missed a beat (silent for two heartbeat intervals, its connection still
    open: frozen, or cut off) may be replaced under its name by another process, without
    waiting for its dead-after time."""
    broker, dealer = lone_broker(heartbeat_s=0.1)
    assert _register(broker, dealer(b"old-s0"), "s0", "a", 11).cmd == Cmd.HEARTBEAT
    deadline = time.monotonic() + 10
    while time.monotonic() - broker.stages["s0"].last_seen <= 2 * broker.config.heartbeat_s:
        assert time.monotonic() < deadline
        time.sleep(0.02)  # the raw DEALER stays silent; the clock is what we wait for
    assert _register(broker, dealer(b"restarted"), "s0", "a", 33).cmd == Cmd.HEARTBEAT
    assert broker.stages["s0"].ident == b"restarted" and broker.stages["s0"].caps.pid == 33
