"""The layerline wire format: the only module that knows frame layouts (spec: docs/protocol.md).

Every message is a ZeroMQ multipart message from a DEALER to the broker's ROUTER or back:

    [tag][command][header][tensor 0][tensor 1]...

`tag` names the role and protocol version (b"LLS1" stage, b"LLC1" client, b"LLM1" monitor),
`command` is one byte, `header` is a small orjson object, and each tensor frame is raw bytes
described by the header's `tensors` list of {"dtype", "shape"}. The ROUTER adds the sender's
routing identity in front; DEALERs send no empty delimiter.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

VERSION = 1
STAGE_TAG = b"LLS1"
CLIENT_TAG = b"LLC1"
MONITOR_TAG = b"LLM1"
TAGS = {STAGE_TAG: "stage", CLIENT_TAG: "client", MONITOR_TAG: "monitor"}


class Cmd(enum.IntEnum):
    # stage <-> broker
    READY = 0x01  # S->B register: name, capabilities, checkpoint fingerprint
    ASSIGN = 0x02  # B->S your layer range for an epoch (or none)
    LOADED = 0x03  # S->B the assigned range is loaded and serving
    FORWARD = 0x04  # B->S run these items over your layers
    RESULT = 0x05  # S->B output of a FORWARD; B->C logits of a STEP
    ERROR = 0x06  # any direction: a refusal with a code
    HEARTBEAT = 0x07  # both ways, carries progress and stats
    RELEASE = 0x08  # B->S free these requests' caches
    LEAVING = 0x09  # S->B I am draining (SIGTERM); move my layers
    BYE = 0x0A  # B->S you may exit now / you are not registered, register again
    # client <-> broker
    STEP = 0x10  # C->B run a prefill or decode of one request
    END = 0x11  # C->B the request is finished or cancelled
    EVENT = 0x12  # B->C something happened to your request (reshard, not-ready wait)
    PING = 0x13  # C->B / M->B are you there
    PONG = 0x14  # B->C / B->M yes
    STATUS = 0x15  # C->B or M->B what is the cluster state; B replies STATUS
    JOBS = 0x16  # C->B recent requests; B replies JOBS
    DRAIN = 0x17  # M->B admin: drain this stage (needs the admin token)
    STEPS = 0x18  # C->B several STEPs in one message (the next steps of many requests)
    RESULTS = 0x19  # B->C several RESULTs in one message (a group's logits for one client)


# Which tags may carry which commands, as sent *to* the broker.
INBOUND = {
    STAGE_TAG: {Cmd.READY, Cmd.LOADED, Cmd.RESULT, Cmd.ERROR, Cmd.HEARTBEAT, Cmd.LEAVING},
    CLIENT_TAG: {Cmd.STEP, Cmd.STEPS, Cmd.END, Cmd.PING, Cmd.STATUS, Cmd.JOBS},
    MONITOR_TAG: {Cmd.PING, Cmd.STATUS, Cmd.JOBS, Cmd.DRAIN},
}


class Code(enum.StrEnum):
    """Error codes carried in ERROR headers (`code`)."""

    MALFORMED = "malformed"  # wrong number of frames, undecodable header
    BAD_VERSION = "bad_version"  # unknown tag / protocol version
    UNKNOWN_COMMAND = "unknown_command"
    HEADER_TOO_LARGE = "header_too_large"
    FRAME_TOO_LARGE = "frame_too_large"
    TENSOR_MISMATCH = "tensor_mismatch"  # frame length differs from its descriptor
    BAD_REQUEST = "bad_request"  # header fields missing, wrong type, out of range
    NOT_READY = "not_ready"  # the live stages cannot cover the model
    BUSY = "busy"  # a bounded queue is full; retry after `retry_after_s`
    CONTEXT_OVERFLOW = "context_overflow"  # positions beyond the model's context
    CACHE_MISS = "cache_miss"  # stage holds no cache for this request at this position
    CACHE_MISMATCH = "cache_mismatch"  # position or prefix hash does not match the cache
    STALE_EPOCH = "stale_epoch"  # message from an older layer map
    FINGERPRINT = "fingerprint"  # stage sees a different checkpoint than the broker
    REPLAY_LIMIT = "replay_limit"  # the request was replayed too often
    TIMEOUT = "timeout"  # a bounded wait ran out
    UNKNOWN_REQUEST = "unknown_request"
    UNAUTHORIZED = "unauthorized"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A message that breaks the wire format; `code` goes into the ERROR reply."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Size limits every role enforces on what it receives (defaults in docs/protocol.md)."""

    # Headers hold ids, positions and small maps; 64 KiB is 100x the largest we send.
    max_header_bytes: int = 64 * 1024
    # One tensor frame: a 32k-token prefill of an 8192-wide model in fp32 is 1 GiB; the
    # default admits 8k tokens at that width, --max-frame-mb raises it.
    max_frame_bytes: int = 256 * 1024 * 1024
    max_tensors: int = 64
    max_dims: int = 4


DEFAULT_LIMITS = Limits()

# Bytes per element of each dtype a tensor frame may carry. The broker checks frame lengths
# with these alone; tensorframes turns frames into torch tensors where a role computes.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
}

# Header fields each command must carry, with their types. `decode` rejects a message that
# lacks one, so handlers can index headers without defensive code.
_INT = int
_STR = str
SCHEMAS: dict[Cmd, dict[str, type | tuple[type, ...]]] = {
    Cmd.READY: {"name": _STR, "fingerprint": _STR, "caps": dict, "credits": _INT},
    Cmd.ASSIGN: {"epoch": _INT, "start": _INT, "end": _INT},
    Cmd.LOADED: {"epoch": _INT, "start": _INT, "end": _INT},
    Cmd.FORWARD: {"step": _INT, "epoch": _INT, "items": list},
    Cmd.RESULT: {"step": _INT},
    Cmd.ERROR: {"code": _STR, "message": _STR},
    Cmd.HEARTBEAT: {},
    Cmd.RELEASE: {"rids": list},
    Cmd.LEAVING: {},
    Cmd.BYE: {},
    Cmd.STEP: {"rid": _STR, "seq": _INT, "pos": _INT, "n": _INT, "prev": _INT, "hash": _INT},
    Cmd.END: {"rid": _STR},
    Cmd.EVENT: {"rid": _STR, "event": _STR},
    Cmd.PING: {},
    Cmd.PONG: {},
    Cmd.STATUS: {},
    Cmd.JOBS: {},
    Cmd.DRAIN: {"stage": _STR, "token": _STR},
    Cmd.STEPS: {"items": list},
    Cmd.RESULTS: {"items": list},
}
# A RESULT to a client names its request instead of the broker's step id.
CLIENT_RESULT_SCHEMA: dict[str, type] = {"rid": str, "seq": int}
ITEM_SCHEMA: dict[str, type] = {"rid": str, "pos": int, "n": int, "prev": int, "hash": int}
MAX_RID_LENGTH = 64
# A bundle (STEPS, RESULTS) carries one message per item, each with its one tensor frame.
BUNDLES = {Cmd.STEPS: Cmd.STEP, Cmd.RESULTS: Cmd.RESULT}
BUNDLE_OF = {single: bundle for bundle, single in BUNDLES.items()}
# Items per bundle: a group of the largest batch a stage takes in one FORWARD by default;
# larger sets travel as several bundles.
MAX_BUNDLE = 32


@dataclass(frozen=True)
class TensorDesc:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class Message:
    """A decoded message. `frames` are the raw tensor frames (zmq.Frame or bytes), unconverted."""

    tag: bytes
    cmd: Cmd
    header: dict[str, Any]
    frames: list = field(default_factory=list)
    descs: list[TensorDesc] = field(default_factory=list)

    @property
    def role(self) -> str:
        return TAGS[self.tag]

    def tensor(self, i: int = 0) -> Any:
        """Tensor i as a view over its frame's buffer (no copy), read-only."""
        # Deferred: only stages and clients build tensors, and the broker never imports torch.
        from tensorframes import tensor_from_frame

        return tensor_from_frame(self.frames[i], self.descs[i])


def frame_buffer(frame) -> memoryview:
    """A frame's bytes (zmq.Frame, bytes or memoryview) as a memoryview, without a copy."""
    if isinstance(frame, bytes | bytearray | memoryview):
        return memoryview(frame)
    return frame.buffer  # zmq.Frame: a view of the message, no copy


def _length(frame) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def _check_schema(header: dict, schema: dict[str, type | tuple[type, ...]], what: str) -> None:
    for key, kind in schema.items():
        value = header.get(key)
        # bool is an int subclass; a flag is never a valid position or id.
        if (
            value is None
            or not isinstance(value, kind)
            or (kind is int and isinstance(value, bool))
        ):
            raise ProtocolError(Code.BAD_REQUEST, f"{what}: field {key!r} must be {_name(kind)}")


def _name(kind) -> str:
    return kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)


def _parse_desc(raw: Any, limits: Limits) -> TensorDesc:
    if not isinstance(raw, dict):
        raise ProtocolError(Code.BAD_REQUEST, "tensor descriptor must be an object")
    dtype, shape = raw.get("dtype"), raw.get("shape")
    if dtype not in DTYPE_SIZES:
        raise ProtocolError(
            Code.BAD_REQUEST, f"tensor dtype {dtype!r} is not one of {sorted(DTYPE_SIZES)}"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > limits.max_dims
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape
        )
    ):
        raise ProtocolError(Code.BAD_REQUEST, f"tensor shape {shape!r} is invalid")
    return TensorDesc(dtype, tuple(shape))


def decode(
    frames: Sequence,
    limits: Limits = DEFAULT_LIMITS,
    expect: bytes | None = None,
    inbound: bool = False,
) -> Message:
    """Validate and parse one message (without the routing identity). Raises ProtocolError.

    `inbound=True` (the broker) also refuses commands the sender's role may not send.
    """
    if len(frames) < 3:
        raise ProtocolError(
            Code.MALFORMED, f"message has {len(frames)} frames; need tag, command, header"
        )
    tag = bytes(frame_buffer(frames[0])) if _length(frames[0]) <= 8 else b""
    if tag not in TAGS:
        if tag[:2] == b"LL":
            raise ProtocolError(
                Code.BAD_VERSION,
                f"protocol {tag!r} is not supported; this broker speaks version {VERSION}",
            )
        raise ProtocolError(Code.BAD_VERSION, "unknown protocol tag; not a layerline peer")
    if expect is not None and tag != expect:
        raise ProtocolError(
            Code.BAD_VERSION, f"expected {TAGS.get(expect)} messages, got {TAGS[tag]}"
        )
    if _length(frames[1]) != 1:
        raise ProtocolError(Code.MALFORMED, "command frame must be exactly one byte")
    try:
        cmd = Cmd(bytes(frame_buffer(frames[1]))[0])
    except ValueError:
        raise ProtocolError(
            Code.UNKNOWN_COMMAND, f"unknown command 0x{bytes(frame_buffer(frames[1]))[0]:02x}"
        ) from None
    if inbound and cmd not in INBOUND[tag]:
        raise ProtocolError(Code.UNKNOWN_COMMAND, f"{cmd.name} is not a {TAGS[tag]} command")
    if _length(frames[2]) > limits.max_header_bytes:
        raise ProtocolError(
            Code.HEADER_TOO_LARGE,
            f"header of {_length(frames[2])} bytes exceeds {limits.max_header_bytes}",
        )
    try:
        header = orjson.loads(frame_buffer(frames[2]))
    except orjson.JSONDecodeError as e:
        raise ProtocolError(Code.MALFORMED, f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(Code.MALFORMED, "header must be a JSON object")
    check_header(tag, cmd, header)
    if cmd == Cmd.FORWARD:
        for item in header["items"]:
            if not isinstance(item, dict):
                raise ProtocolError(Code.BAD_REQUEST, "FORWARD items must be objects")
            _check_schema(item, ITEM_SCHEMA, "FORWARD item")
    if cmd in BUNDLES:
        items = header["items"]
        if not 1 <= len(items) <= MAX_BUNDLE or not all(isinstance(i, dict) for i in items):
            raise ProtocolError(
                Code.BAD_REQUEST, f"{cmd.name} carries 1 to {MAX_BUNDLE} item objects"
            )
    raw_descs = header.get("tensors", [])
    if not isinstance(raw_descs, list) or len(raw_descs) > limits.max_tensors:
        raise ProtocolError(
            Code.BAD_REQUEST,
            f"header 'tensors' must be a list of at most {limits.max_tensors} descriptors",
        )
    tensor_frames = list(frames[3:])
    if len(raw_descs) != len(tensor_frames):
        raise ProtocolError(
            Code.TENSOR_MISMATCH,
            f"header describes {len(raw_descs)} tensors but {len(tensor_frames)} frames follow",
        )
    if cmd in BUNDLES and len(tensor_frames) != len(header["items"]):
        raise ProtocolError(
            Code.TENSOR_MISMATCH,
            f"{cmd.name} has {len(header['items'])} items but {len(tensor_frames)} tensor frames",
        )
    descs = [_parse_desc(d, limits) for d in raw_descs]
    for i, (desc, frame) in enumerate(zip(descs, tensor_frames, strict=True)):
        size = _length(frame)
        if size > limits.max_frame_bytes:
            raise ProtocolError(
                Code.FRAME_TOO_LARGE,
                f"tensor frame {i} of {size} bytes exceeds {limits.max_frame_bytes}",
            )
        if size != desc.nbytes:
            raise ProtocolError(
                Code.TENSOR_MISMATCH,
                f"tensor frame {i} has {size} bytes but {desc.dtype}{list(desc.shape)} needs {desc.nbytes}",
            )
    return Message(tag=tag, cmd=cmd, header=header, frames=tensor_frames, descs=descs)


def check_header(tag: bytes, cmd: Cmd, header: dict[str, Any]) -> None:
    """Refuse (ProtocolError) a header that lacks a field its command needs."""
    schema = CLIENT_RESULT_SCHEMA if cmd == Cmd.RESULT and tag == CLIENT_TAG else SCHEMAS[cmd]
    _check_schema(header, schema, cmd.name)


def unbundle(msg: Message) -> list[Message]:
    """The single messages a STEPS or RESULTS carries, each with its own tensor frame.

    Item headers are not checked yet: the receiver runs `check_header` on each, so one bad
    item is refused alone.
    """
    single = BUNDLES[msg.cmd]
    return [
        Message(msg.tag, single, item, [frame], [desc])
        for item, frame, desc in zip(msg.header["items"], msg.frames, msg.descs, strict=True)
    ]


def encode_bundled(
    tag: bytes,
    cmd: Cmd,
    entries: Sequence[tuple[dict[str, Any], Any]],
    limits: Limits = DEFAULT_LIMITS,
) -> list[list]:
    """Messages carrying `entries` of (header, tensor) for `cmd` (STEP or RESULT).

    One entry goes as the plain message; more go as bundles of at most MAX_BUNDLE items whose
    header fits `limits.max_header_bytes` (a bundle that would not is halved).
    """
    if len(entries) == 1:
        header, tensor = entries[0]
        return [encode(tag, cmd, header, [tensor])]
    out: list[list] = []
    for at in range(0, len(entries), MAX_BUNDLE):
        part = entries[at : at + MAX_BUNDLE]
        frames = encode(tag, BUNDLE_OF[cmd], {"items": [h for h, _ in part]}, [t for _, t in part])
        if len(frames[2]) > limits.max_header_bytes and len(part) > 1:
            half = len(part) // 2
            out += encode_bundled(tag, cmd, part[:half], limits)
            out += encode_bundled(tag, cmd, part[half:], limits)
        else:
            out.append(frames)
    return out


def encode(tag: bytes, cmd: Cmd, header: dict[str, Any], tensors: Sequence = ()) -> list:
    """Frames for one message. `tensors` are torch tensors or (TensorDesc, frame) pairs to forward.

    A pair is re-sent as the same frame object it arrived in: forwarding never copies.
    """
    frames: list = []
    descs: list[dict] = []
    for t in tensors:
        if isinstance(t, tuple):
            desc, buf = t
        else:
            # Deferred: only stages and clients send tensors; the broker forwards pairs.
            from tensorframes import tensor_to_frame

            desc, buf = tensor_to_frame(t)
        descs.append(desc.to_json())
        frames.append(buf)
    if descs or "tensors" in header:
        header = {**header, "tensors": descs}
    return [tag, bytes((cmd,)), orjson.dumps(header), *frames]


# --- the monitor feed (PUB) ---------------------------------------------------------------
# [topic][header][tensors...]: topics are subscription prefixes, the rest as in a message.
FEED_STATS = b"stats"
FEED_EVENT = b"event"
FEED_TOKEN = b"token"
FEED_TOPICS = (FEED_STATS, FEED_EVENT, FEED_TOKEN)


def feed_endpoint(bind: str) -> str:
    """The feed binds next to the ROUTER unless told otherwise: tcp://host:5555 -> :5556."""
    host, _, port = bind.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"cannot derive the feed endpoint from {bind!r}; pass --feed URL")
    return f"{host}:{int(port) + 1}"


def encode_feed(topic: bytes, header: dict[str, Any], tensors: Sequence = ()) -> list:
    return [topic, *encode(MONITOR_TAG, Cmd.STATUS, header, tensors)[2:]]


def decode_feed(frames: Sequence, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, Message]:
    """(topic, message) of one feed message; raises ProtocolError."""
    if not frames:
        raise ProtocolError(Code.MALFORMED, "empty feed message")
    topic = bytes(frame_buffer(frames[0]))
    if topic not in FEED_TOPICS:
        raise ProtocolError(Code.UNKNOWN_COMMAND, f"unknown feed topic {topic!r}")
    return topic, decode([MONITOR_TAG, bytes((Cmd.STATUS,)), *frames[1:]], limits)


def error_header(code: Code, message: str, **extra: Any) -> dict[str, Any]:
    return {"code": str(code), "message": message, **extra}


def reply_frames(tag: bytes, cmd: Cmd, header: dict[str, Any], tensors: Sequence = ()) -> list:
    return encode(tag, cmd, header, tensors)


# --- prefix hashes -------------------------------------------------------------------------
# Every step carries the hash of the token prefix before it (`prev`) and after it (`hash`).
# Chained per token, so the value does not depend on how a sequence was cut into steps: a
# replay that chunks differently still names the same prefix.
EMPTY_PREFIX_HASH = 0
_TOKEN = struct.Struct("<Qq")


def prefix_hash(prev: int, tokens: Iterable[int]) -> int:
    """Extend the rolling hash `prev` by `tokens`; 63 bits so it fits a JSON integer."""
    h = prev
    for tok in tokens:
        digest = hashlib.blake2b(_TOKEN.pack(h, int(tok)), digest_size=8).digest()
        h = int.from_bytes(digest, "little") >> 1
    return h
