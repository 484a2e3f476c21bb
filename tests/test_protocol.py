"""The wire format: every message round-trips as its struct, fields are validated where they
are decoded, tensors are zero-copy views, and a fuzz test that decode only ever raises
ProtocolError."""

from __future__ import annotations

import msgspec
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd, Code
from tests.wire import raw_message


def _step(n=3, **over):
    body = M.Step(rid="r1", seq=0, pos=0, n=n, prev=0, hash=5, **over)
    return P.encode(P.CLIENT_TAG, body, [torch.arange(n).view(1, n)])


MAP = (M.MapRange("s0", 0, 2), M.MapRange("s1", 2, 4))
ITEM = M.Item(rid="r1", pos=3, n=1, prev=7, hash=9, logits=False)
# One body of every command and direction, with its optional fields set.
EXAMPLES: dict[tuple[bytes, bool, Cmd], M.Body] = {
    (P.STAGE_TAG, True, Cmd.READY): M.Ready(
        name="s0",
        fingerprint="abc",
        caps=M.Caps(device="cpu", memory_bytes=1 << 30, cores=2, threads=1, max_batch=8),
        credits=32,
        held=(0, 2),
    ),
    (P.STAGE_TAG, True, Cmd.LOADED): M.Loaded(
        epoch=5, start=0, end=2, weight_bytes=123, load_s=0.5
    ),
    (P.STAGE_TAG, True, Cmd.RESULT): M.ForwardResult(
        fid=4,
        epoch=5,
        compute_s=0.01,
        queue_s=0.002,
        batch=2,
        refused=(M.Refusal(1, "r2", Code.CACHE_MISS, "no cache"),),
    ),
    (P.STAGE_TAG, True, Cmd.ERROR): M.Error(code=Code.STALE_EPOCH, message="old", fid=4, epoch=5),
    (P.STAGE_TAG, True, Cmd.HEARTBEAT): M.StageHeartbeat(
        state=M.StageState.BUSY, epoch=5, progress=10, busy_s=0.2, queued=1, kv_bytes=4096
    ),
    (P.STAGE_TAG, True, Cmd.LEAVING): M.Leaving(),
    (P.STAGE_TAG, False, Cmd.ASSIGN): M.Assign(
        epoch=5, start=0, end=2, num_layers=4, dtype="float32", map=MAP
    ),
    (P.STAGE_TAG, False, Cmd.FORWARD): M.Forward(fid=4, epoch=5, items=(ITEM,)),
    (P.STAGE_TAG, False, Cmd.RELEASE): M.Release(rids=("r1", "r2")),
    (P.STAGE_TAG, False, Cmd.BYE): M.Bye(reason="drained"),
    (P.STAGE_TAG, False, Cmd.HEARTBEAT): M.BrokerHeartbeat(epoch=5),
    (P.STAGE_TAG, False, Cmd.ERROR): M.Error(code=Code.FINGERPRINT, message="other model"),
    (P.CLIENT_TAG, True, Cmd.STEP): M.Step(
        rid="r1", seq=2, pos=0, n=1, prev=0, hash=3, logits=False
    ),
    (P.CLIENT_TAG, True, Cmd.END): M.End(rid="r1", reason="cancelled"),
    (P.CLIENT_TAG, True, Cmd.PING): M.Ping(),
    (P.CLIENT_TAG, True, Cmd.STATUS): M.StatusQuery(),
    (P.CLIENT_TAG, True, Cmd.JOBS): M.JobsQuery(),
    (P.CLIENT_TAG, True, Cmd.TOKENIZER): M.TokenizerQuery(offset=4096),
    (P.CLIENT_TAG, False, Cmd.TOKENIZER): M.TokenizerChunk(
        sha256="ab" * 32, size=9000, offset=4096
    ),
    (P.CLIENT_TAG, False, Cmd.RESULT): M.StepResult(
        rid="r1",
        seq=2,
        pos=3,
        n=1,
        epoch=5,
        trace=(M.Hop(stage="s0", start=0, end=2, compute_s=0.1, queue_s=0.0, transfer_s=0.01),),
        broker_queue_s=0.001,
    ),
    (P.CLIENT_TAG, False, Cmd.EVENT): M.Event(
        rid="r1",
        event="reshard",
        reason="silent",
        epoch=6,
        lost="s1",
        cause="silent",
        old_map=MAP,
        new_map=MAP[:1],
    ),
    (P.CLIENT_TAG, False, Cmd.PONG): M.Pong(ready=True, epoch=5),
    (P.CLIENT_TAG, False, Cmd.STATUS): M.Status(
        ready=True,
        epoch=5,
        map=MAP,
        num_layers=4,
        stages=(M.StageStatus(name="s0", state="busy", start=0, end=2, p50_s=0.01),),
        events=(M.ClusterEvent(ts=1.0, kind="join", epoch=5, stage="s0", host="h"),),
        counters={"malformed": 1},
        tokenizer=M.TokenizerInfo(sha256="cd" * 32, size=9000, files=("tokenizer.json",)),
    ),
    (P.CLIENT_TAG, False, Cmd.JOBS): M.Jobs(
        jobs=(M.Job(rid="r1", outcome="done", tokens=3, events=(M.JobEvent(event="replay"),)),)
    ),
    (P.CLIENT_TAG, False, Cmd.ERROR): M.Error(
        code=Code.BUSY, message="full", rid="r1", seq=2, retry_after_s=0.05
    ),
    (P.MONITOR_TAG, True, Cmd.DRAIN): M.Drain(stage="s0"),
}


@pytest.mark.parametrize(
    "key", list(EXAMPLES), ids=lambda k: f"{k[0].decode()}-{'in' if k[1] else 'out'}-{k[2].name}"
)
def test_every_message_round_trips_as_its_struct(key):
    tag, inbound, cmd = key
    body = EXAMPLES[key]
    # A step carries its ids, a FORWARD one input per item, a client's RESULT its logits.
    carries = {
        (True, Cmd.STEP): [torch.zeros(1, 1, dtype=torch.int64)],
        (False, Cmd.FORWARD): [torch.zeros(1, 1, 8)],
        (False, Cmd.RESULT): [torch.zeros(1, 1, 8)],
        (False, Cmd.TOKENIZER): [torch.zeros(8, dtype=torch.uint8)],
    }
    sent = carries.get((inbound, cmd), [])
    msg = P.decode(P.encode(tag, body, sent), inbound=inbound)
    assert (msg.tag, msg.cmd) == (tag, cmd)
    assert msgspec.structs.replace(msg.body, tensors=()) == body
    assert [d.shape for d in msg.descs] == [tuple(t.shape) for t in sent]


def test_every_command_and_direction_has_its_struct_and_an_example():
    tables = {(t, True, c) for t, cmds in P.INBOUND.items() for c in cmds}
    tables |= {(t, False, c) for t, cmds in P.OUTBOUND.items() for c in cmds}
    covered = set(EXAMPLES) | {(P.CLIENT_TAG, True, Cmd.STEPS), (P.CLIENT_TAG, False, Cmd.RESULTS)}
    # The monitor's commands are the client's, less STEP/END, plus DRAIN: the same structs.
    for tag, inbound, cmd in tables - covered:
        assert tag == P.MONITOR_TAG
        kind = (P.INBOUND if inbound else P.OUTBOUND)[P.CLIENT_TAG][cmd]
        assert (P.INBOUND if inbound else P.OUTBOUND)[tag][cmd] is kind
    for tag, inbound, cmd in EXAMPLES:
        assert type(EXAMPLES[tag, inbound, cmd]) is (P.INBOUND if inbound else P.OUTBOUND)[tag][cmd]


def test_round_trip_all_dtypes():
    for dtype in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.int64,
        torch.int32,
        torch.uint8,
    ):
        t = (torch.arange(24).view(2, 3, 4) * 1.5).to(dtype)
        frames = P.encode(P.STAGE_TAG, M.ForwardResult(fid=1), [t])
        msg = P.decode(frames, inbound=True)
        assert msg.cmd == Cmd.RESULT and msg.role == "stage"
        assert torch.equal(msg.tensor(0), t) and msg.tensor(0).dtype == dtype


def test_received_tensor_is_a_view_of_the_frame():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        t = torch.randn(1, 64, 512)  # 128 KiB: above pyzmq's copy threshold
        a.send_multipart(P.encode(P.STAGE_TAG, M.ForwardResult(fid=1), [t]), copy=False)
        frames = b.recv_multipart(copy=False)
        msg = P.decode(frames, inbound=True)
        view = msg.tensor(0)
        assert torch.equal(view, t)

        assert view.untyped_storage().data_ptr() == _address(frames[3])
    finally:
        a.close(0)
        b.close(0)


def _address(frame) -> int:
    import numpy as np

    return np.frombuffer(frame.buffer, dtype=np.uint8).__array_interface__["data"][0]


@pytest.mark.parametrize(
    "frames,code",
    [
        ([b"LLC1", bytes((Cmd.STEP,))], Code.MALFORMED),
        ([b"XXXX", bytes((Cmd.PING,)), b"{}"], Code.BAD_VERSION),
        ([b"LLC9", bytes((Cmd.PING,)), b"{}"], Code.BAD_VERSION),
        ([b"LLC1", b"\xee", b"{}"], Code.UNKNOWN_COMMAND),
        ([b"LLC1", b"\x13\x13", b"{}"], Code.MALFORMED),
        ([b"LLC1", bytes((Cmd.PING,)), b"{not json"], Code.MALFORMED),
        ([b"LLC1", bytes((Cmd.PING,)), b"[1,2]"], Code.MALFORMED),
        ([b"LLC1", bytes((Cmd.PING,)), b" " * (64 * 1024 + 1)], Code.HEADER_TOO_LARGE),
        ([b"LLC1", bytes((Cmd.END,)), b"{}"], Code.BAD_REQUEST),
        ([b"LLC1", bytes((Cmd.END,)), b'{"rid": 5}'], Code.BAD_REQUEST),
        ([b"LLC1", bytes((Cmd.READY,)), b"{}"], Code.UNKNOWN_COMMAND),  # a stage's command
        ([b"LLC1", bytes((Cmd.RESULT,)), b"{}"], Code.UNKNOWN_COMMAND),  # the broker's to send
        ([b"LLS1", bytes((Cmd.STEP,)), b"{}"], Code.UNKNOWN_COMMAND),  # a client's command
        ([b"LLS1"], Code.MALFORMED),
        ([], Code.MALFORMED),
    ],
)
def test_malformed_messages_get_a_code(frames, code):
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames, inbound=True)
    assert e.value.code == code
    # The tag the sender used, where it is a known one: the ERROR goes out in its role.
    assert e.value.tag == (frames[0] if frames and frames[0] in P.TAGS else None)


@pytest.mark.parametrize(
    "tag,cmd,header,field",
    [
        (P.CLIENT_TAG, Cmd.STEP, {"pos": -1}, "$.pos"),
        (P.CLIENT_TAG, Cmd.STEP, {"n": 0}, "$.n"),
        (P.CLIENT_TAG, Cmd.STEP, {"rid": "has space"}, "$.rid"),
        (P.CLIENT_TAG, Cmd.STEP, {"rid": "r" * 65}, "$.rid"),
        (P.CLIENT_TAG, Cmd.STEP, {"hash": 1 << 63}, "$.hash"),
        (P.CLIENT_TAG, Cmd.STEP, {"logits": 1}, "$.logits"),
        (P.CLIENT_TAG, Cmd.END, {"rid": "r1", "reason": "because"}, "$.reason"),
        (P.STAGE_TAG, Cmd.READY, {"credits": 0}, "$.credits"),
        (P.STAGE_TAG, Cmd.READY, {"caps": {"max_batch": 0}}, "$.caps.max_batch"),
        (P.STAGE_TAG, Cmd.READY, {"held": [0]}, "$.held"),
        (
            P.STAGE_TAG,
            Cmd.RESULT,
            {"refused": [{"i": 0, "rid": "r", "code": "nope", "message": ""}]},
            "$.refused[0].code",
        ),
        (P.STAGE_TAG, Cmd.HEARTBEAT, {"state": "asleep"}, "$.state"),
        (P.STAGE_TAG, Cmd.HEARTBEAT, {"progress": -1}, "$.progress"),
    ],
)
def test_optional_and_nested_fields_are_validated_where_they_are_decoded(tag, cmd, header, field):
    good = {
        Cmd.STEP: {"rid": "r1", "seq": 0, "pos": 0, "n": 1, "prev": 0, "hash": 0},
        Cmd.END: {"rid": "r1"},
        Cmd.READY: {"name": "s0", "fingerprint": "f", "caps": {}, "credits": 4},
        Cmd.RESULT: {"fid": 1},
        Cmd.HEARTBEAT: {},
    }[cmd]
    tensors = (
        [torch.zeros(1, max(1, header.get("n", 1)), dtype=torch.int64)] if cmd == Cmd.STEP else []
    )
    P.decode(raw_message(tag, cmd, good, tensors), inbound=True)  # the good one decodes
    with pytest.raises(P.ProtocolError) as e:
        P.decode(raw_message(tag, cmd, {**good, **header}, tensors), inbound=True)
    assert e.value.code == Code.BAD_REQUEST
    assert field in e.value.message


def test_an_assign_names_a_dtype_a_stage_computes_in():
    assign = {"epoch": 1, "start": 0, "end": 2, "num_layers": 2, "dtype": "float16"}
    assert P.decode(raw_message(P.STAGE_TAG, Cmd.ASSIGN, assign)).body.dtype == "float16"
    with pytest.raises(P.ProtocolError) as e:
        P.decode(raw_message(P.STAGE_TAG, Cmd.ASSIGN, {**assign, "dtype": "int64"}))
    assert e.value.code == Code.BAD_REQUEST and "$.dtype" in e.value.message


def test_a_refused_step_echoes_the_ids_it_could_read():
    frames = raw_message(
        P.CLIENT_TAG,
        Cmd.STEP,
        {"rid": "r1", "seq": 7, "pos": -2, "n": 1, "prev": 0, "hash": 0},
        [torch.zeros(1, 1, dtype=torch.int64)],
    )
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames, inbound=True)
    assert e.value.ids == {"rid": "r1", "seq": 7}
    error = P.error(e.value.code, e.value.message, **e.value.ids)
    assert (error.rid, error.seq, error.code) == ("r1", 7, Code.BAD_REQUEST)


def test_a_step_carries_one_int64_row_of_n_ids():
    for tensor in (
        torch.zeros(1, 2, dtype=torch.int64),
        torch.zeros(1, 3, dtype=torch.int32),
        torch.zeros(3, dtype=torch.int64),
    ):
        frames = P.encode(
            P.CLIENT_TAG, M.Step(rid="r1", seq=0, pos=0, n=3, prev=0, hash=0), [tensor]
        )
        with pytest.raises(P.ProtocolError) as e:
            P.decode(frames, inbound=True)
        assert (e.value.code, e.value.ids) == (Code.BAD_REQUEST, {"rid": "r1", "seq": 0})


def test_unknown_fields_are_ignored_for_newer_peers():
    frames = raw_message(P.CLIENT_TAG, Cmd.END, {"rid": "r1", "priority": 3})
    assert P.decode(frames, inbound=True).body == M.End(rid="r1")


def test_tensor_frame_length_must_match_descriptor():
    frames = _step(3)
    frames[3] = bytes(frames[3])[:-8]
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames, inbound=True)
    assert e.value.code == Code.TENSOR_MISMATCH


def test_descriptor_count_must_match_frames():
    frames = _step(3)
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames[:3], inbound=True)
    assert e.value.code == Code.TENSOR_MISMATCH


def test_oversized_frame_is_refused():
    limits = P.Limits(max_frame_bytes=16)
    with pytest.raises(P.ProtocolError) as e:
        P.decode(_step(3), limits, inbound=True)
    assert e.value.code == Code.FRAME_TOO_LARGE


def test_bool_is_not_an_int():
    header = {"rid": "r1", "seq": 0, "pos": True, "n": 3, "prev": 0, "hash": 5}
    frames = raw_message(P.CLIENT_TAG, Cmd.STEP, header, [torch.zeros(1, 3, dtype=torch.int64)])
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames, inbound=True)
    assert e.value.code == Code.BAD_REQUEST and "$.pos" in e.value.message


@pytest.mark.parametrize("idle_s", [0, -1.0, 86400.5, "10"])
def test_a_step_idle_s_outside_its_range_is_refused(idle_s):
    """A client's idle_timeout told in a STEP is a positive number of seconds up to a day."""
    header = {"rid": "r1", "seq": 0, "pos": 0, "n": 3, "prev": 0, "hash": 5, "idle_s": idle_s}
    frames = raw_message(P.CLIENT_TAG, Cmd.STEP, header, [torch.zeros(1, 3, dtype=torch.int64)])
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames, inbound=True)
    assert e.value.code == Code.BAD_REQUEST and "$.idle_s" in e.value.message


def test_a_step_carries_its_clients_idle_timeout():
    header = {"rid": "r1", "seq": 0, "pos": 0, "n": 3, "prev": 0, "hash": 5, "idle_s": 10.0}
    frames = raw_message(P.CLIENT_TAG, Cmd.STEP, header, [torch.zeros(1, 3, dtype=torch.int64)])
    assert P.decode(frames, inbound=True).body.idle_s == 10.0


def test_prefix_hash_does_not_depend_on_cuts():
    tokens = list(range(100, 140))
    whole = P.prefix_hash(P.EMPTY_PREFIX_HASH, tokens)
    h = P.EMPTY_PREFIX_HASH
    for chunk in (tokens[:7], tokens[7:8], tokens[8:30], tokens[30:]):
        h = P.prefix_hash(h, chunk)
    assert h == whole
    assert P.prefix_hash(0, tokens[:-1] + [999]) != whole
    assert 0 <= whole < 2**63


def _entries(count: int) -> list[tuple[M.Step, torch.Tensor]]:
    return [
        (M.Step(rid=f"r{i}", seq=i, pos=0, n=2, prev=0, hash=i), torch.tensor([[i, i + 1]]))
        for i in range(count)
    ]


def test_one_entry_goes_as_the_plain_message():
    [frames] = P.encode_bundled(P.CLIENT_TAG, _entries(1))
    msg = P.decode(frames, inbound=True)
    assert msg.cmd == Cmd.STEP and msg.body.rid == "r0"
    assert msg.tensor(0).tolist() == [[0, 1]]


def test_bundles_round_trip_in_order_and_split_at_the_item_cap():
    count = P.MAX_BUNDLE + 8
    entries = _entries(count)
    messages = [P.decode(f, inbound=True) for f in P.encode_bundled(P.CLIENT_TAG, entries)]
    assert [m.cmd for m in messages] == [Cmd.STEPS, Cmd.STEPS]
    assert [len(m.frames) for m in messages] == [P.MAX_BUNDLE, 8]
    singles = [s for m in messages for s in P.unbundle(m)]
    assert [s.cmd for s in singles] == [Cmd.STEP] * count
    assert [s.body for s in singles] == [body for body, _ in entries]
    assert [s.tensor(0).tolist() for s in singles] == [[[i, i + 1]] for i in range(count)]


def test_a_bad_item_of_a_bundle_is_refused_alone():
    items = [
        {"rid": "r0", "seq": 0, "pos": 0, "n": 1, "prev": 0, "hash": 0},
        {"rid": "r1", "seq": 1, "pos": 0, "n": 0, "prev": 0, "hash": 0},  # n must be >= 1
        {"rid": "r2", "seq": 2, "pos": 0, "n": 2, "prev": 0, "hash": 0},  # its frame is [1, 1]
        {"rid": "r3", "seq": 3, "pos": 0, "n": 1, "prev": 0, "hash": 0},
    ]
    ids = [torch.zeros(1, 1, dtype=torch.int64)] * 4
    out = P.unbundle(
        P.decode(raw_message(P.CLIENT_TAG, Cmd.STEPS, {"items": items}, ids), inbound=True)
    )
    assert [type(x).__name__ for x in out] == [
        "Message",
        "ProtocolError",
        "ProtocolError",
        "Message",
    ]
    assert [out[1].ids, out[2].ids] == [{"rid": "r1", "seq": 1}, {"rid": "r2", "seq": 2}]
    assert [out[0].body.rid, out[3].body.rid] == ["r0", "r3"]


def test_a_bundle_whose_header_is_too_large_is_halved():
    limits = P.Limits(max_header_bytes=2048)
    hops = tuple(
        M.Hop(stage="s" * 40, start=0, end=1, compute_s=0.0, queue_s=0.0, transfer_s=0.0)
        for _ in range(2)
    )
    entries = [
        (M.StepResult(rid=f"r{i}", seq=i, pos=0, n=1, epoch=1, trace=hops), torch.zeros(1, 1, 4))
        for i in range(24)
    ]  # ~300 bytes per item header
    out = P.encode_bundled(P.CLIENT_TAG, entries, limits)
    assert len(out) > 1
    assert all(len(frames[2]) <= limits.max_header_bytes for frames in out)
    singles = [s for f in out for s in P.unbundle(P.decode(f, limits))]
    assert [s.body.seq for s in singles] == list(range(24))


def test_bundle_items_must_match_the_frames():
    item = {"rid": "r0", "seq": 0, "pos": 0, "n": 2, "prev": 0, "hash": 0}
    with pytest.raises(P.ProtocolError) as e:
        P.decode(
            raw_message(P.CLIENT_TAG, Cmd.STEPS, {"items": [item] * 2}, [torch.tensor([[1, 2]])]),
            inbound=True,
        )
    assert e.value.code == Code.TENSOR_MISMATCH
    for items in ([], [item] * (P.MAX_BUNDLE + 1)):
        ids = [torch.tensor([[1, 2]])] * len(items)
        with pytest.raises(P.ProtocolError) as e:
            P.decode(raw_message(P.CLIENT_TAG, Cmd.STEPS, {"items": items}, ids), inbound=True)
        assert e.value.code == Code.BAD_REQUEST


def test_the_feed_has_its_own_codec():
    status = EXAMPLES[P.CLIENT_TAG, False, Cmd.STATUS]
    event = M.ClusterEvent(
        ts=2.0, kind="reshard", epoch=6, cause="silent", lost="s1", old_map=MAP, new_map=MAP[:1]
    )
    token = M.TokenSeen(rid="r1", pos=4, n=1, stage="s1", ts=3.0)
    for body, topic, tensors in (
        (status, P.FEED_STATS, []),
        (event, P.FEED_EVENT, []),
        (token, P.FEED_TOKEN, [torch.tensor([[42]])]),
    ):
        frames = P.encode_feed(body, tensors)
        assert frames[0] == topic
        msg = P.decode_feed(frames)
        assert msg.topic == topic
        assert msgspec.structs.replace(msg.body, tensors=()) == body
        assert [msg.tensor(i).tolist() for i in range(len(tensors))] == [
            t.tolist() for t in tensors
        ]
    with pytest.raises(P.ProtocolError) as e:
        P.decode_feed([b"gossip", b"{}"])
    assert e.value.code == Code.UNKNOWN_COMMAND
    with pytest.raises(P.ProtocolError) as e:
        P.decode_feed([P.FEED_EVENT, b'{"ts": 1, "kind": "party", "epoch": 1}'])
    assert e.value.code == Code.BAD_REQUEST


@pytest.mark.parametrize(
    "body",
    [
        M.ClusterEvent(ts=2.0, kind="reshard", epoch=6, cause="silent"),
        M.TokenSeen(rid="r1", pos=4, n=1, stage="s1", ts=3.0),
    ],
)
def test_a_feed_only_message_is_refused_by_the_command_encoder(body):
    with pytest.raises(
        TypeError, match=f"{type(body).__name__} is a feed message; use encode_feed"
    ):
        P.encode(P.MONITOR_TAG, body)
    assert P.encode_feed(body)  # where it belongs


frame_bytes = st.binary(max_size=64)
header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
headers = st.dictionaries(
    st.sampled_from(
        [
            "rid",
            "seq",
            "pos",
            "n",
            "prev",
            "hash",
            "tensors",
            "fid",
            "epoch",
            "items",
            "name",
            "fingerprint",
            "caps",
            "credits",
            "code",
            "message",
            "rids",
            "event",
            "x",
        ]
    ),
    header_values,
    max_size=8,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tag=st.sampled_from([b"LLS1", b"LLC1", b"LLM1", b"LLC2", b"", b"\x00" * 9]) | frame_bytes,
    cmd=st.sampled_from([bytes((c,)) for c in Cmd]) | frame_bytes,
    header=headers.map(msgspec.json.encode) | frame_bytes,
    tensors=st.lists(frame_bytes, max_size=3),
    inbound=st.booleans(),
)
def test_fuzz_decode_only_raises_protocol_errors(tag, cmd, header, tensors, inbound):
    try:
        msg = P.decode([tag, cmd, header, *tensors], inbound=inbound)
    except P.ProtocolError as e:
        assert isinstance(e.code, Code) and e.message
        assert e.tag == (tag if tag in P.TAGS else None)
        return
    # Whatever decodes is internally consistent: one descriptor per frame, lengths match.
    assert len(msg.descs) == len(msg.frames)
    for i, desc in enumerate(msg.descs):
        assert desc.nbytes == len(msg.frames[i])
        assert msg.tensor(i).numel() * msg.tensor(i).element_size() == desc.nbytes
    if msg.cmd in P.BUNDLES:
        assert len(P.unbundle(msg)) == len(msg.frames) == len(msg.body.items)


def test_a_tokenizer_reply_carries_one_byte_frame():
    chunk = M.TokenizerChunk(sha256="ab" * 32, size=3, offset=0)
    msg = P.decode(P.encode(P.CLIENT_TAG, chunk, [(M.bytes_desc(3), b"abc")]))
    assert bytes(P.frame_buffer(msg.frames[0])) == b"abc"
    for frames in ([], [torch.zeros(3)], [torch.zeros(1, 3, dtype=torch.uint8)]):
        with pytest.raises(P.ProtocolError, match="one uint8") as info:
            P.decode(P.encode(P.CLIENT_TAG, chunk, frames))
        assert info.value.code == Code.BAD_REQUEST
    with pytest.raises(P.ProtocolError, match="sha256"):
        P.decode(P.encode(P.CLIENT_TAG, msgspec.structs.replace(chunk, sha256="x")))
