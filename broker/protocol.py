"""The layerline wire format: the only module that encodes and decodes messages (docs/protocol.md).

Every message is a ZeroMQ multipart message from a DEALER to the broker's ROUTER or back:

    [tag][command][header][tensor 0][tensor 1]...

`tag` names the role and protocol version (b"LLS1" stage, b"LLC1" client, b"LLM1" monitor),
`command` is one byte, `header` is a JSON object, one struct of `broker/messages.py` per
command and direction, and each tensor frame is raw bytes described by the header's
`tensors`. The ROUTER adds the sender's routing identity in front; DEALERs send no empty
delimiter. The monitor feed (PUB) has a layout of its own: `[topic][header][tensors...]`.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from broker import messages as M
from broker.messages import (  # noqa: F401  (the vocabulary, re-exported for every role)
    DTYPE_SIZES,
    MAX_BUNDLE,
    MAX_RID_LENGTH,
    REPLAY_CODES,
    Body,
    Cmd,
    Code,
    TensorDesc,
)

VERSION = 1
STAGE_TAG = b"LLS1"
CLIENT_TAG = b"LLC1"
MONITOR_TAG = b"LLM1"
TAGS = {STAGE_TAG: "stage", CLIENT_TAG: "client", MONITOR_TAG: "monitor"}

# What each role may send to the broker, and the header struct of each command.
INBOUND: dict[bytes, dict[Cmd, type[Body]]] = {
    STAGE_TAG: {
        Cmd.READY: M.Ready,
        Cmd.LOADED: M.Loaded,
        Cmd.RESULT: M.ForwardResult,
        Cmd.ERROR: M.Error,
        Cmd.HEARTBEAT: M.StageHeartbeat,
        Cmd.LEAVING: M.Leaving,
    },
    CLIENT_TAG: {
        Cmd.STEP: M.Step,
        Cmd.STEPS: M.Steps,
        Cmd.END: M.End,
        Cmd.PING: M.Ping,
        Cmd.STATUS: M.StatusQuery,
        Cmd.JOBS: M.JobsQuery,
        Cmd.TOKENIZER: M.TokenizerQuery,
    },
    MONITOR_TAG: {
        Cmd.PING: M.Ping,
        Cmd.STATUS: M.StatusQuery,
        Cmd.JOBS: M.JobsQuery,
        Cmd.DRAIN: M.Drain,
    },
}
# What the broker sends to each role.
OUTBOUND: dict[bytes, dict[Cmd, type[Body]]] = {
    STAGE_TAG: {
        Cmd.ASSIGN: M.Assign,
        Cmd.FORWARD: M.Forward,
        Cmd.RELEASE: M.Release,
        Cmd.BYE: M.Bye,
        Cmd.HEARTBEAT: M.BrokerHeartbeat,
        Cmd.ERROR: M.Error,
    },
    CLIENT_TAG: {
        Cmd.RESULT: M.StepResult,
        Cmd.RESULTS: M.Results,
        Cmd.EVENT: M.Event,
        Cmd.PONG: M.Pong,
        Cmd.STATUS: M.Status,
        Cmd.JOBS: M.Jobs,
        Cmd.TOKENIZER: M.TokenizerChunk,
        Cmd.ERROR: M.Error,
    },
    MONITOR_TAG: {
        Cmd.PONG: M.Pong,
        Cmd.STATUS: M.Status,
        Cmd.JOBS: M.Jobs,
        Cmd.ERROR: M.Error,
    },
}
# A bundle (STEPS, RESULTS) carries one message per item, each with its one tensor frame.
BUNDLES = {Cmd.STEPS: Cmd.STEP, Cmd.RESULTS: Cmd.RESULT}


class ProtocolError(Exception):
    """A message that breaks the wire format; `code` goes into the ERROR reply, with `ids`:
    the request or FORWARD the message named, as far as it could be read. `tag` is the
    sender's protocol tag where `decode` could read a known one (None otherwise), so that the
    reply goes out in the sender's role."""

    def __init__(self, code: Code, message: str, ids: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.ids = ids or {}
        self.tag: bytes | None = None


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


@dataclass
class Message:
    """A decoded message. `frames` are the raw tensor frames (zmq.Frame or bytes), unconverted."""

    tag: bytes
    cmd: Cmd
    body: Any  # the command's struct from broker/messages.py
    frames: list = field(default_factory=list)
    descs: list[TensorDesc] = field(default_factory=list)

    @property
    def role(self) -> str:
        return TAGS[self.tag]

    def tensor(self, i: int = 0) -> Any:
        """Tensor i as a view over its frame's buffer (no copy), read-only."""
        return _tensor(self.frames[i], self.descs[i])


def _tensor(frame, desc: TensorDesc) -> Any:
    # Deferred: only stages, clients and monitors build tensors; the broker never imports torch.
    from tensorframes import tensor_from_frame

    return tensor_from_frame(frame, desc)


def frame_buffer(frame) -> memoryview:
    """A frame's bytes (zmq.Frame, bytes or memoryview) as a memoryview, without a copy."""
    if isinstance(frame, bytes | bytearray | memoryview):
        return memoryview(frame)
    return frame.buffer  # zmq.Frame: a view of the message, no copy


def _length(frame) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


# One decoder per header struct, built once: msgspec checks every field's type and range in C.
_DECODERS: dict[type, msgspec.json.Decoder] = {
    kind: msgspec.json.Decoder(kind)
    for table in (*INBOUND.values(), *OUTBOUND.values())
    for kind in table.values()
} | {kind: msgspec.json.Decoder(kind) for kind in (M.Step, M.ClusterEvent, M.TokenSeen)}
_ENCODER = msgspec.json.Encoder()
_ID_TYPES = {"rid": str, "seq": int, "fid": int, "epoch": int}


def ids_of(body: Any) -> dict[str, Any]:
    """The ids (`rid`, `seq`, `fid`, `epoch`) of a message, which an ERROR answering it echoes."""
    out = {}
    for key in _ID_TYPES:
        value = getattr(body, key, None)
        if value is not None:
            out[key] = value
    return out


def _raw_ids(buf) -> dict[str, Any]:
    """The ids of a header that did not decode as its struct, where they have the right type."""
    try:
        raw = msgspec.json.decode(buf)
    except msgspec.DecodeError:
        return {}
    if not isinstance(raw, dict):
        return {}
    return {
        key: raw[key]
        for key, kind in _ID_TYPES.items()
        if isinstance(raw.get(key), kind)
        and not isinstance(raw[key], bool)
        and not (kind is str and len(raw[key]) > MAX_RID_LENGTH)
    }


def _decode_header(kind: type, buf, what: str) -> Any:
    try:
        return _DECODERS[kind].decode(buf)
    except msgspec.ValidationError as e:
        reason = str(e)
        if reason.startswith("Expected `object`") and " - at " not in reason:
            raise ProtocolError(Code.MALFORMED, "header must be a JSON object") from None
        raise ProtocolError(Code.BAD_REQUEST, f"{what}: {reason}", _raw_ids(buf)) from None
    except msgspec.DecodeError as e:
        raise ProtocolError(Code.MALFORMED, f"header is not valid JSON: {e}") from None


def _check_tensors(body: Any, frames: list, limits: Limits, what: str) -> list[TensorDesc]:
    descs = list(body.tensors)
    if len(descs) > limits.max_tensors:
        raise ProtocolError(
            Code.BAD_REQUEST,
            f"header 'tensors' must be a list of at most {limits.max_tensors} descriptors",
            ids_of(body),
        )
    if len(descs) != len(frames):
        raise ProtocolError(
            Code.TENSOR_MISMATCH,
            f"header describes {len(descs)} tensors but {len(frames)} frames follow",
            ids_of(body),
        )
    for i, (desc, frame) in enumerate(zip(descs, frames, strict=True)):
        if len(desc.shape) > limits.max_dims:
            raise ProtocolError(
                Code.BAD_REQUEST,
                f"tensor shape {list(desc.shape)} has more than {limits.max_dims} dimensions",
                ids_of(body),
            )
        size = _length(frame)
        if size > limits.max_frame_bytes:
            raise ProtocolError(
                Code.FRAME_TOO_LARGE,
                f"tensor frame {i} of {size} bytes exceeds {limits.max_frame_bytes}",
                ids_of(body),
            )
        if size != desc.nbytes:
            raise ProtocolError(
                Code.TENSOR_MISMATCH,
                f"tensor frame {i} has {size} bytes but {desc.dtype}{list(desc.shape)} "
                f"needs {desc.nbytes}",
                ids_of(body),
            )
    return descs


def _check_layout(cmd: Cmd, body: Any, descs: Sequence[TensorDesc]) -> None:
    """The tensors a command must carry, beyond what its descriptors say about themselves."""
    if cmd == Cmd.STEP:
        if len(descs) != 1 or descs[0].dtype != "int64" or descs[0].shape != (1, body.n):
            raise ProtocolError(
                Code.BAD_REQUEST,
                f"STEP carries one int64 tensor of shape [1, {body.n}]",
                ids_of(body),
            )
    elif isinstance(body, M.TokenizerChunk) and (
        len(descs) != 1 or descs[0].dtype != "uint8" or len(descs[0].shape) != 1
    ):
        raise ProtocolError(Code.BAD_REQUEST, "a TOKENIZER reply carries one uint8 [n] frame")
    elif isinstance(body, M.StepResult) and len(descs) != 1:
        raise ProtocolError(
            Code.TENSOR_MISMATCH, "a RESULT to a client carries one logits tensor", ids_of(body)
        )
    elif cmd in (*BUNDLES, Cmd.FORWARD) and len(descs) != len(body.items):
        raise ProtocolError(
            Code.TENSOR_MISMATCH,
            f"{cmd.name} has {len(body.items)} items but {len(descs)} tensor frames",
            ids_of(body),
        )


def decode(
    frames: Sequence,
    limits: Limits = DEFAULT_LIMITS,
    expect: bytes | None = None,
    inbound: bool = False,
) -> Message:
    """Validate and parse one message (without the routing identity). Raises ProtocolError,
    with the sender's `tag` where it was readable.

    `inbound=True` (the broker) reads what a role sends to the broker, and refuses a command
    that role may not send; otherwise it reads what the broker sends to the tag's role.
    """
    tag = bytes(frame_buffer(frames[0])) if frames and _length(frames[0]) <= 8 else b""
    try:
        return _decode(tag, frames, limits, expect, inbound)
    except ProtocolError as e:
        e.tag = tag if tag in TAGS else None
        raise


def _decode(
    tag: bytes, frames: Sequence, limits: Limits, expect: bytes | None, inbound: bool
) -> Message:
    if len(frames) < 3:
        raise ProtocolError(
            Code.MALFORMED, f"message has {len(frames)} frames; need tag, command, header"
        )
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
    byte = bytes(frame_buffer(frames[1]))[0]
    try:
        cmd = Cmd(byte)
    except ValueError:
        raise ProtocolError(Code.UNKNOWN_COMMAND, f"unknown command 0x{byte:02x}") from None
    kind = (INBOUND if inbound else OUTBOUND)[tag].get(cmd)
    if kind is None:
        direction = "to" if inbound else "from"
        raise ProtocolError(
            Code.UNKNOWN_COMMAND, f"{cmd.name} is not a {TAGS[tag]} command {direction} the broker"
        )
    if _length(frames[2]) > limits.max_header_bytes:
        raise ProtocolError(
            Code.HEADER_TOO_LARGE,
            f"header of {_length(frames[2])} bytes exceeds {limits.max_header_bytes}",
        )
    body = _decode_header(kind, frame_buffer(frames[2]), cmd.name)
    tensor_frames = list(frames[3:])
    descs = _check_tensors(body, tensor_frames, limits, cmd.name)
    _check_layout(cmd, body, descs)
    return Message(tag=tag, cmd=cmd, body=body, frames=tensor_frames, descs=descs)


def unbundle(msg: Message) -> list[Message | ProtocolError]:
    """The single messages a STEPS or RESULTS carries, each with its own tensor frame.

    A STEPS item that does not decode, or does not match its frame, comes back as the
    ProtocolError to answer it with, so one bad item is refused alone.
    """
    single = BUNDLES[msg.cmd]
    out: list[Message | ProtocolError] = []
    for item, frame, desc in zip(msg.body.items, msg.frames, msg.descs, strict=True):
        try:
            body = _decode_header(M.Step, item, "STEPS item") if single == Cmd.STEP else item
            _check_layout(single, body, [desc])
        except ProtocolError as e:
            out.append(e)
            continue
        out.append(Message(msg.tag, single, body, [frame], [desc]))
    return out


def encode(tag: bytes, body: Body, tensors: Sequence = ()) -> list:
    """Frames for one message. `tensors` are torch tensors or (TensorDesc, frame) pairs to forward.

    A pair is re-sent as the same frame object it arrived in: forwarding never copies.
    """
    if not hasattr(body, "cmd"):  # ClusterEvent, TokenSeen: their feed topic names them
        raise TypeError(f"{type(body).__name__} is a feed message; use encode_feed")
    frames, descs = _tensor_frames(tensors)
    if descs:
        body = msgspec.structs.replace(body, tensors=tuple(descs))
    return [tag, bytes((body.cmd,)), _ENCODER.encode(body), *frames]


def _tensor_frames(tensors: Sequence) -> tuple[list, list[TensorDesc]]:
    frames: list = []
    descs: list[TensorDesc] = []
    for t in tensors:
        if isinstance(t, tuple):
            desc, buf = t
        else:
            # Deferred: only stages and clients send tensors; the broker forwards pairs.
            from tensorframes import tensor_to_frame

            desc, buf = tensor_to_frame(t)
        descs.append(desc)
        frames.append(buf)
    return frames, descs


def encode_bundled(
    tag: bytes,
    entries: Sequence[tuple[Body, Any]],
    limits: Limits = DEFAULT_LIMITS,
) -> list[list]:
    """Messages carrying `entries` of (STEP or RESULT body, tensor).

    One entry goes as the plain message; more go as bundles of at most MAX_BUNDLE items whose
    header fits `limits.max_header_bytes` (a bundle that would not is halved).
    """
    if len(entries) == 1:
        body, tensor = entries[0]
        return [encode(tag, body, [tensor])]
    out: list[list] = []
    for at in range(0, len(entries), MAX_BUNDLE):
        part = entries[at : at + MAX_BUNDLE]
        bodies = [b for b, _ in part]
        if isinstance(bodies[0], M.Step):
            bundle = M.Steps(items=tuple(msgspec.Raw(_ENCODER.encode(b)) for b in bodies))
        else:
            bundle = M.Results(items=tuple(bodies))
        frames = encode(tag, bundle, [t for _, t in part])
        if len(frames[2]) > limits.max_header_bytes and len(part) > 1:
            half = len(part) // 2
            out += encode_bundled(tag, part[:half], limits)
            out += encode_bundled(tag, part[half:], limits)
        else:
            out.append(frames)
    return out


def error(code: Code, message: str, about: Any = None, **extra: Any) -> M.Error:
    """An ERROR body; `about` is the message it answers, whose ids it echoes."""
    return M.Error(code=code, message=message, **{**ids_of(about), **extra})


# --- client identities and who owns a request -----------------------------------------------
# A client's routing identity is `<secret>.<socket>.<random>`. The secret is the same on every
# socket the client opens (a reconnect, its heartbeat socket) and only the broker sees routing
# identities, so the broker binds each request to it at its first step: only sockets with the
# same secret may step, end or read that request. The owner is taken from the connection, not
# from a header, as a CURVE public key will be. Request ids are `<public id>-<n>`: the public
# id is a hash of the secret, so JOBS and logs may show it, and a request id that starts with
# one is reserved for the owner it belongs to (no one can take a client's next id first).
SECRET_BYTES = 16  # 128 random bits: not guessable
PUBLIC_ID_BYTES = 8  # 64 bits: no secret hashes to another client's public id by search
_PUBLIC_ID_HEX = 2 * PUBLIC_ID_BYTES


def new_client_secret() -> str:
    return secrets.token_hex(SECRET_BYTES)


def client_identity(secret: str, socket: str) -> bytes:
    """The routing identity of one client socket (`socket` tells its incarnations apart)."""
    return f"{secret}.{socket}.{secrets.token_hex(2)}".encode()


def owner_of(identity: bytes) -> bytes:
    """Whose requests a socket may touch: its identity's secret. An identity without one (a
    libzmq default starts with a zero byte) owns only what it starts itself."""
    secret, dot, _ = identity.partition(b".")
    return secret if dot and secret and identity[:1] != b"\x00" else identity


def public_id(owner: bytes | str) -> str:
    """The owner's public id, the prefix of its request ids."""
    if isinstance(owner, str):
        owner = owner.encode()
    return hashlib.blake2b(owner, digest_size=PUBLIC_ID_BYTES).hexdigest()


def reserved_by_another(rid: str, owner: bytes) -> bool:
    """Whether `rid` starts with a public id (`<16 hex digits>-`) that is not `owner`'s."""
    prefix, dash, _ = rid.partition("-")
    return (
        bool(dash)
        and len(prefix) == _PUBLIC_ID_HEX
        and all(c in "0123456789abcdef" for c in prefix)
        and prefix != public_id(owner)
    )


# --- the monitor feed (PUB) ---------------------------------------------------------------
# [topic][header][tensors...]: topics are subscription prefixes.
FEED_STATS = b"stats"
FEED_EVENT = b"event"
FEED_TOKEN = b"token"
FEED_TOPICS: dict[bytes, type[Body]] = {
    FEED_STATS: M.Status,
    FEED_EVENT: M.ClusterEvent,
    FEED_TOKEN: M.TokenSeen,
}
_FEED_TOPIC_OF = {kind: topic for topic, kind in FEED_TOPICS.items()}


@dataclass
class FeedMessage:
    """One decoded feed message: its topic, header struct and raw tensor frames."""

    topic: bytes
    body: Any
    frames: list = field(default_factory=list)
    descs: list[TensorDesc] = field(default_factory=list)

    def tensor(self, i: int = 0) -> Any:
        return _tensor(self.frames[i], self.descs[i])


def feed_endpoint(bind: str) -> str:
    """The feed binds next to the ROUTER unless told otherwise: tcp://host:5555 -> :5556."""
    host, _, port = bind.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"cannot derive the feed endpoint from {bind!r}; pass --feed URL")
    return f"{host}:{int(port) + 1}"


def encode_feed(body: Body, tensors: Sequence = ()) -> list:
    """Frames of one feed message; the topic follows from the body's type."""
    frames, descs = _tensor_frames(tensors)
    if descs:
        body = msgspec.structs.replace(body, tensors=tuple(descs))
    return [_FEED_TOPIC_OF[type(body)], _ENCODER.encode(body), *frames]


def decode_feed(frames: Sequence, limits: Limits = DEFAULT_LIMITS) -> FeedMessage:
    """One feed message, validated like a message; raises ProtocolError."""
    if len(frames) < 2:
        raise ProtocolError(Code.MALFORMED, "a feed message has a topic and a header")
    topic = bytes(frame_buffer(frames[0]))
    if topic not in FEED_TOPICS:
        raise ProtocolError(Code.UNKNOWN_COMMAND, f"unknown feed topic {topic!r}")
    if _length(frames[1]) > limits.max_header_bytes:
        raise ProtocolError(
            Code.HEADER_TOO_LARGE,
            f"header of {_length(frames[1])} bytes exceeds {limits.max_header_bytes}",
        )
    body = _decode_header(FEED_TOPICS[topic], frame_buffer(frames[1]), topic.decode())
    tensor_frames = list(frames[2:])
    descs = _check_tensors(body, tensor_frames, limits, topic.decode())
    return FeedMessage(topic, body, tensor_frames, descs)


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
