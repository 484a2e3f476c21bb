"""The frame parser: round trips, zero-copy views, and a fuzz test that it only ever raises ProtocolError."""

from __future__ import annotations

import orjson
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import protocol as P
from broker.protocol import Cmd, Code


def _step(n=3, **over):
    header = {"rid": "r1", "seq": 0, "pos": 0, "n": n, "prev": 0, "hash": 5, **over}
    return P.encode(P.CLIENT_TAG, Cmd.STEP, header, [torch.arange(n).view(1, n)])


def test_round_trip_all_dtypes():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32):
        t = (torch.arange(24).view(2, 3, 4) * 1.5).to(dtype)
        frames = P.encode(P.STAGE_TAG, Cmd.RESULT, {"step": 1}, [t])
        msg = P.decode(frames)
        assert msg.cmd == Cmd.RESULT and msg.role == "stage"
        assert torch.equal(msg.tensor(0), t) and msg.tensor(0).dtype == dtype


def test_received_tensor_is_a_view_of_the_frame():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        t = torch.randn(1, 64, 512)  # 128 KiB: above pyzmq's copy threshold
        a.send_multipart(P.encode(P.STAGE_TAG, Cmd.RESULT, {"step": 1}, [t]), copy=False)
        frames = b.recv_multipart(copy=False)
        msg = P.decode(frames)
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
    ],
)
def test_malformed_messages_get_a_code(frames, code):
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames)
    assert e.value.code == code


def test_tensor_frame_length_must_match_descriptor():
    frames = _step(3)
    frames[3] = bytes(frames[3])[:-8]
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames)
    assert e.value.code == Code.TENSOR_MISMATCH


def test_descriptor_count_must_match_frames():
    frames = _step(3)
    with pytest.raises(P.ProtocolError) as e:
        P.decode(frames[:3])
    assert e.value.code == Code.TENSOR_MISMATCH


def test_oversized_frame_is_refused():
    limits = P.Limits(max_frame_bytes=16)
    with pytest.raises(P.ProtocolError) as e:
        P.decode(_step(3), limits)
    assert e.value.code == Code.FRAME_TOO_LARGE


def test_bool_is_not_an_int():
    with pytest.raises(P.ProtocolError):
        P.decode(_step(3, pos=True))


def test_prefix_hash_does_not_depend_on_cuts():
    tokens = list(range(100, 140))
    whole = P.prefix_hash(P.EMPTY_PREFIX_HASH, tokens)
    h = P.EMPTY_PREFIX_HASH
    for chunk in (tokens[:7], tokens[7:8], tokens[8:30], tokens[30:]):
        h = P.prefix_hash(h, chunk)
    assert h == whole
    assert P.prefix_hash(0, tokens[:-1] + [999]) != whole
    assert 0 <= whole < 2**63


def _entries(count: int, **extra) -> list[tuple[dict, torch.Tensor]]:
    return [
        (
            {"rid": f"r{i}", "seq": i, "pos": 0, "n": 2, "prev": 0, "hash": i, **extra},
            torch.tensor([[i, i + 1]]),
        )
        for i in range(count)
    ]


def test_one_entry_goes_as_the_plain_message():
    [frames] = P.encode_bundled(P.CLIENT_TAG, Cmd.STEP, _entries(1))
    msg = P.decode(frames, inbound=True)
    assert msg.cmd == Cmd.STEP and msg.header["rid"] == "r0"
    assert msg.tensor(0).tolist() == [[0, 1]]


def test_bundles_round_trip_in_order_and_split_at_the_item_cap():
    count = P.MAX_BUNDLE + 8
    messages = [
        P.decode(f, inbound=True) for f in P.encode_bundled(P.CLIENT_TAG, Cmd.STEP, _entries(count))
    ]
    assert [m.cmd for m in messages] == [Cmd.STEPS, Cmd.STEPS]
    assert [len(m.frames) for m in messages] == [P.MAX_BUNDLE, 8]
    singles = [s for m in messages for s in P.unbundle(m)]
    assert [s.cmd for s in singles] == [Cmd.STEP] * count
    assert [s.header["rid"] for s in singles] == [f"r{i}" for i in range(count)]
    assert [s.tensor(0).tolist() for s in singles] == [[[i, i + 1]] for i in range(count)]
    for s in singles:
        P.check_header(s.tag, s.cmd, s.header)


def test_a_bundle_whose_header_is_too_large_is_halved():
    limits = P.Limits(max_header_bytes=2048)
    entries = _entries(24, note="x" * 200)  # ~300 bytes per item header
    out = P.encode_bundled(P.CLIENT_TAG, Cmd.RESULT, entries, limits)
    assert len(out) > 1
    assert all(len(frames[2]) <= limits.max_header_bytes for frames in out)
    singles = [s for f in out for s in P.unbundle(P.decode(f, limits))]
    assert [s.header["seq"] for s in singles] == list(range(24))


def test_bundle_items_must_match_the_frames():
    header = {"items": [_entries(1)[0][0]] * 2}
    with pytest.raises(P.ProtocolError) as e:
        P.decode(P.encode(P.CLIENT_TAG, Cmd.STEPS, header, [torch.tensor([[1, 2]])]))
    assert e.value.code == Code.TENSOR_MISMATCH
    with pytest.raises(P.ProtocolError) as e:
        P.decode(
            P.encode(P.CLIENT_TAG, Cmd.STEPS, {"items": [1, 2]}, [torch.zeros(1), torch.zeros(1)])
        )
    assert e.value.code == Code.BAD_REQUEST


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
            "step",
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
    header=headers.map(orjson.dumps) | frame_bytes,
    tensors=st.lists(frame_bytes, max_size=3),
)
def test_fuzz_decode_only_raises_protocol_errors(tag, cmd, header, tensors):
    try:
        msg = P.decode([tag, cmd, header, *tensors])
    except P.ProtocolError as e:
        assert isinstance(e.code, Code) and e.message
        return
    # Whatever decodes is internally consistent: one descriptor per frame, lengths match.
    assert len(msg.descs) == len(msg.frames)
    for i, desc in enumerate(msg.descs):
        assert desc.nbytes == len(msg.frames[i])
        assert msg.tensor(i).numel() * msg.tensor(i).element_size() == desc.nbytes
    if msg.cmd in P.BUNDLES:
        assert len(P.unbundle(msg)) == len(msg.frames) == len(msg.header["items"])
