"""The layerline vocabulary: one frozen struct per command and direction (docs/protocol.md).

`broker/protocol.py` encodes and decodes them, and validates every field on the way in (types,
ranges, the request-id pattern), so a handler reads `msg.body.pos` without defensive code.
Unknown fields are ignored: a newer peer may add one. A message names the tensors behind its
header in `tensors`, which the codec fills in.
"""

from __future__ import annotations

import enum
from typing import Annotated, ClassVar, Literal

import msgspec
from msgspec import Meta, Raw

from common.defaults import CPU_PREFILL_CHUNK


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
    LEAVING = 0x09  # S->B I am leaving (SIGTERM); move my layers
    BYE = 0x0A  # B->S you may exit now / you are not registered, register again
    # client <-> broker
    STEP = 0x10  # C->B run a prefill or decode of one request
    END = 0x11  # C->B the request is finished or cancelled
    EVENT = 0x12  # B->C something happened to your request (reshard, replay)
    PING = 0x13  # C->B / M->B are you there
    PONG = 0x14  # B->C / B->M yes
    STATUS = 0x15  # C->B or M->B what is the cluster state; B replies STATUS
    JOBS = 0x16  # C->B recent requests; B replies JOBS
    DRAIN = 0x17  # M->B admin: drain this stage (needs an admin key on a broker with keys)
    STEPS = 0x18  # C->B several STEPs in one message (the next steps of many requests)
    RESULTS = 0x19  # B->C several RESULTs in one message (a group's logits for one client)
    TOKENIZER = 0x1A  # C->B a chunk of the checkpoint's tokenizer files; B replies TOKENIZER


class Code(enum.StrEnum):
    """Error codes carried in ERROR messages."""

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
    DTYPE_MISMATCH = "dtype_mismatch"  # stage computes in another dtype than the cluster
    NAME_IN_USE = "name_in_use"  # a live stage of another process holds the stage name
    REPLAY_LIMIT = "replay_limit"  # the request was replayed too often
    NON_FINITE = "non_finite"  # a stage computed NaN or infinity for this request
    UNAUTHORIZED = "unauthorized"
    NO_TOKENIZER = "no_tokenizer"  # TOKENIZER asked of a checkpoint that has none
    INTERNAL = "internal"


# A refusal of one of these codes asks the request's client to replay it: the stage lost or
# never had the request's cache, or the step belongs to an older layer map.
REPLAY_CODES = frozenset({Code.CACHE_MISS, Code.CACHE_MISMATCH, Code.STALE_EPOCH})

# Items per bundle (STEPS, RESULTS): a group of the largest batch a stage takes in one FORWARD
# by default; larger sets travel as several bundles.
MAX_BUNDLE = 32
MAX_RID_LENGTH = 64
# The longest a client may ask the broker to keep a request whose answer it has not taken.
MAX_IDLE_S = 86400.0

# What a stage may announce: items held at once, items per FORWARD, and its name's length.
MAX_CREDITS = 1024
MAX_BATCH = 1024
MAX_NAME_LENGTH = 128
# The dtypes a stage computes in (tensor frames may also carry integer ids).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

Rid = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
Count = Annotated[int, Meta(ge=0)]
Positive = Annotated[int, Meta(ge=1)]
Seconds = Annotated[float, Meta(ge=0)]
# prefix_hash values are 63 bits, so they fit a JSON integer.
PrefixHash = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
Dim = Annotated[int, Meta(ge=0, lt=1 << 31)]
DType = Literal["float32", "float16", "bfloat16", "int64", "int32", "uint8"]
ComputeDType = Literal["float32", "bfloat16", "float16"]
# How a stage holds its weight matrices (common/weights.py WEIGHT_KINDS, and float16).
WeightKind = Literal["float32", "bfloat16", "float16", "int8", "q4", "native"]

# Bytes per element of each dtype a tensor frame may carry. The broker checks frame lengths
# with these alone; tensorframes turns frames into torch tensors where a role computes.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "uint8": 1,  # raw bytes: a chunk of the tokenizer files
}


def is_decode(pos: int, n: int) -> bool:
    """Whether positions `[pos, pos+n)` are a decode step: one new token after a prompt. The
    broker sends decode steps in FORWARDs of their own, ahead of prefills, and a stage runs them
    between a prompt's layers; anything else (a prompt, a chunk, a one-token prompt) is a
    prefill. (How a stage batches items is by their length alone.)"""
    return n == 1 and pos > 0


class TensorDesc(msgspec.Struct, frozen=True):
    """The dtype and shape of one tensor frame."""

    dtype: DType
    shape: tuple[Dim, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def bytes_desc(n: int) -> TensorDesc:
    """The descriptor of a frame of `n` raw bytes."""
    return TensorDesc("uint8", (n,))


class Body(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A message header. `cmd` is the command byte it travels under.

    Fields left at their defaults stay off the wire, except in what clients and monitors read
    as JSON (STATUS, JOBS, EVENT, cluster events), which spell out every field.
    """

    cmd: ClassVar[Cmd]
    tensors: tuple[TensorDesc, ...] = ()


class MapRange(msgspec.Struct, frozen=True):
    """One stage's layers `[start, end)` in a layer map."""

    stage: str
    start: Count
    end: Count


# --- stage -> broker -----------------------------------------------------------------------


class Caps(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a stage offers. A stage that names no `max_batch` is sent one item at a time."""

    device: str = "cpu"
    dtype: ComputeDType = "float32"
    weights: WeightKind = "float32"  # held as: the memory plan counts its bytes per layer
    memory_bytes: Count = 0
    runtime_bytes: Count = 0  # resident before any layer: interpreter, libraries, kernel, index
    runtime_file_bytes: Count = 0  # of it, pages mapped from files (libraries' code)
    runtime_peak_bytes: Count = 0  # the peak before any layer (imports, the checkpoint's index)
    cores: Positive = 1
    threads: Positive = 1
    max_batch: Annotated[int, Meta(ge=1, le=MAX_BATCH)] = 1
    host: str = ""
    pid: Count = 0


class Ready(Body, frozen=True, kw_only=True, omit_defaults=True):
    """Register: who I am, what I offer, which checkpoint I see, which layers I still hold."""

    cmd = Cmd.READY
    name: Name
    fingerprint: str
    caps: Caps
    credits: Annotated[int, Meta(ge=1, le=MAX_CREDITS)]
    held: tuple[Count, Count] | None = None


class Loaded(Body, frozen=True, kw_only=True, omit_defaults=True):
    """Layers `[start, end)` are loaded; `digests` says which bytes: per tensor read, its index
    in the checkpoint's sorted tensor names (u32 little-endian) and its 16-byte digest
    (`common.checkpoint.CheckpointMeta.pack_digests`)."""

    cmd = Cmd.LOADED
    epoch: int
    start: Count
    end: Count
    weight_bytes: Count = 0
    load_s: Seconds = 0.0
    digests: bytes = b""


class Refusal(msgspec.Struct, frozen=True):
    """Item `i` of a FORWARD that the stage refused, and why."""

    i: Count
    rid: str
    code: Code
    message: str


class ForwardResult(Body, frozen=True, kw_only=True, omit_defaults=True):
    """The answer to FORWARD `fid`: one output frame per item not refused, in item order."""

    cmd = Cmd.RESULT
    fid: int
    epoch: int | None = None
    compute_s: Seconds = 0.0
    queue_s: Seconds = 0.0
    batch: Count = 1
    refused: tuple[Refusal, ...] = ()


class StageState(enum.StrEnum):
    """What a stage's compute thread is doing, as its heartbeat says."""

    IDLE = "idle"
    LOADING = "loading"
    BUSY = "busy"


class StageHeartbeat(Body, frozen=True, kw_only=True, omit_defaults=True):
    """A stage's heartbeat, from its I/O thread: `progress` moves while compute does."""

    cmd = Cmd.HEARTBEAT
    state: StageState = StageState.IDLE
    epoch: int | None = None
    progress: Count = 0
    busy_s: Seconds = 0.0
    queued: Count = 0
    kv_bytes: Count = 0
    kv_requests: Count = 0
    kv_evictions: Count = 0
    rss_bytes: Count = 0
    tokens: Count = 0
    batches: Count = 0
    batched_items: Count = 0


class Leaving(Body, frozen=True, kw_only=True, omit_defaults=True):
    cmd = Cmd.LEAVING


# --- broker -> stage -----------------------------------------------------------------------


class Assign(Body, frozen=True, kw_only=True, omit_defaults=True):
    """Layers `[start, end)` for `epoch`; `start == end == 0` is standby."""

    cmd = Cmd.ASSIGN
    epoch: int
    start: Count
    end: Count
    num_layers: Positive
    dtype: ComputeDType
    map: tuple[MapRange, ...] = ()


class Item(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One request's step inside a FORWARD: positions `[pos, pos+n)` of `rid`."""

    rid: Rid
    pos: Count
    n: Positive
    prev: PrefixHash
    hash: PrefixHash
    logits: bool = True

    @property
    def is_decode(self) -> bool:
        return is_decode(self.pos, self.n)


class Forward(Body, frozen=True, kw_only=True, omit_defaults=True):
    """Run `items` over your layers; `fid` names this FORWARD in its RESULT or ERROR."""

    cmd = Cmd.FORWARD
    fid: int
    epoch: int
    items: Annotated[tuple[Item, ...], Meta(min_length=1)]


class Release(Body, frozen=True, kw_only=True, omit_defaults=True):
    cmd = Cmd.RELEASE
    rids: tuple[str, ...]


class Bye(Body, frozen=True, kw_only=True, omit_defaults=True):
    """`unknown`: register again; `drained`: exit."""

    cmd = Cmd.BYE
    reason: Literal["unknown", "drained"]


class BrokerHeartbeat(Body, frozen=True, kw_only=True, omit_defaults=True):
    cmd = Cmd.HEARTBEAT
    epoch: int


# --- either way ----------------------------------------------------------------------------


class Error(Body, frozen=True, kw_only=True, omit_defaults=True):
    """A refusal. It names what it answers: a request's step (`rid`, `seq`), a FORWARD
    (`fid`, `epoch`), or nothing (a message the sender could not be told apart from)."""

    cmd = Cmd.ERROR
    code: Code
    message: str
    rid: str | None = None
    seq: int | None = None
    fid: int | None = None
    epoch: int | None = None
    retry_after_s: Seconds | None = None


# --- client -> broker ----------------------------------------------------------------------


class Step(Body, frozen=True, kw_only=True, omit_defaults=True):
    """Run positions `[pos, pos+n)` of request `rid`; `seq` names this step in its answer.

    One int64 `[1, n]` tensor of token ids follows. `logits: false` (a replay) asks for none.
    """

    cmd = Cmd.STEP
    rid: Rid
    seq: int
    pos: Count
    n: Positive
    prev: PrefixHash
    hash: PrefixHash
    logits: bool = True
    # The client's idle_timeout: the broker ends the request when one of its answers waits this
    # long for the request's next step or END (a stream its consumer left unread).
    idle_s: Annotated[float, Meta(gt=0, le=MAX_IDLE_S)] | None = None

    def item(self) -> Item:
        return Item(
            rid=self.rid,
            pos=self.pos,
            n=self.n,
            prev=self.prev,
            hash=self.hash,
            logits=self.logits,
        )


class Steps(Body, frozen=True, kw_only=True, omit_defaults=True):
    """Several STEPs, one tensor frame each. Decoded one item at a time (`unbundle`), so one
    bad item is refused alone."""

    cmd = Cmd.STEPS
    items: Annotated[tuple[Raw, ...], Meta(min_length=1, max_length=MAX_BUNDLE)]


class End(Body, frozen=True, kw_only=True, omit_defaults=True):
    cmd = Cmd.END
    rid: Rid
    reason: Literal["done", "cancelled", "failed"] = "done"


class Ping(Body, frozen=True, kw_only=True, omit_defaults=True):
    cmd = Cmd.PING


class StatusQuery(Body, frozen=True, kw_only=True, omit_defaults=True):
    cmd = Cmd.STATUS


class JobsQuery(Body, frozen=True, kw_only=True, omit_defaults=True):
    cmd = Cmd.JOBS


class TokenizerQuery(Body, frozen=True, kw_only=True, omit_defaults=True):
    """The chunk of the tokenizer bundle that starts at byte `offset`."""

    cmd = Cmd.TOKENIZER
    offset: Count = 0


class Drain(Body, frozen=True, kw_only=True, omit_defaults=True):
    """Admin: drain `stage` as SIGTERM would (with keys, only an admin key may)."""

    cmd = Cmd.DRAIN
    stage: str


# --- broker -> client ----------------------------------------------------------------------


class Hop(msgspec.Struct, frozen=True, kw_only=True):
    """One stage a step visited: `queue_s` inside the stage, `transfer_s` wire and broker."""

    stage: str
    start: Count
    end: Count
    compute_s: Seconds
    queue_s: Seconds
    transfer_s: Seconds


class StepResult(Body, frozen=True, kw_only=True, omit_defaults=True):
    """The logits of step `seq` of `rid` (`[1, 1, V]`, or `[1, 0, V]` when none were asked)."""

    cmd = Cmd.RESULT
    rid: str
    seq: int
    pos: Count
    n: Positive
    epoch: int
    trace: tuple[Hop, ...] = ()
    broker_queue_s: Seconds = 0.0


class Results(Body, frozen=True, kw_only=True, omit_defaults=True):
    cmd = Cmd.RESULTS
    items: Annotated[tuple[StepResult, ...], Meta(min_length=1, max_length=MAX_BUNDLE)]


class Event(Body, frozen=True, kw_only=True, omit_defaults=False):
    """Request `rid` must replay: the map changed (`reshard`) or a stage lost its cache."""

    cmd = Cmd.EVENT
    rid: str
    event: Literal["reshard", "replay"]
    reason: str = ""
    epoch: int | None = None
    lost: str | None = None
    cause: str | None = None
    old_map: tuple[MapRange, ...] = ()
    new_map: tuple[MapRange, ...] = ()


class TokenizerChunk(Body, frozen=True, kw_only=True, omit_defaults=True):
    """Bytes `[offset, offset + n)` of the tokenizer bundle named `sha256`, of `size` bytes in
    all: one uint8 `[n]` frame follows (`n` is 0 at the end)."""

    cmd = Cmd.TOKENIZER
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
    size: Count
    offset: Count


class Pong(Body, frozen=True, kw_only=True, omit_defaults=True):
    cmd = Cmd.PONG
    ready: bool
    epoch: int


class ClusterEvent(Body, frozen=True, kw_only=True, omit_defaults=False):
    """Something that happened to the cluster (the feed's `event` topic, STATUS `events`)."""

    ts: float
    kind: Literal["join", "rejoin", "leave", "dead", "stalled", "reshard", "not_ready", "ready"]
    epoch: int | None = None
    stage: str | None = None
    host: str | None = None
    cause: str | None = None
    lost: str | None = None
    reason: str | None = None
    old_map: tuple[MapRange, ...] = ()
    new_map: tuple[MapRange, ...] = ()  # after a reshard, and the map that became ready


class StageStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One stage as STATUS shows it; the stats a stage has not sent yet are null."""

    name: str
    state: Literal["joining", "loading", "ready", "busy", "standby", "draining", "dead"]
    start: Count
    end: Count
    host: str = ""
    pid: int = 0
    device: str = "cpu"
    weights: WeightKind = "float32"
    credits: Count = 0
    inflight: Count = 0
    queued: Count = 0
    tokens_per_s: float = 0.0
    p50_s: float | None = None
    p99_s: float | None = None
    batches: Count | None = None
    batched_items: Count | None = None
    kv_bytes: Count | None = None
    kv_requests: Count | None = None
    rss_bytes: Count | None = None
    memory_bytes: Count = 0
    runtime_bytes: Count = 0
    runtime_file_bytes: Count = 0
    runtime_peak_bytes: Count = 0
    last_seen_s: float = 0.0
    load_s: float | None = None  # its last load of layers, in seconds


class ActiveRequest(msgspec.Struct, frozen=True, kw_only=True):
    rid: str
    tokens: Count = 0
    steps: Count = 0
    replays: Count = 0
    age_s: float = 0.0
    tokens_per_s: float = 0.0


class TokenizerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The tokenizer bundle the broker serves (TOKENIZER): its SHA-256, size and files; or
    `preparing` while the broker exports it from a GGUF file (ask again)."""

    state: Literal["ready", "preparing"] = "ready"
    sha256: str = ""
    size: Count = 0
    files: tuple[str, ...] = ()


class Status(Body, frozen=True, kw_only=True, omit_defaults=False):
    """The cluster as the broker sees it: the STATUS reply, and the feed's `stats`."""

    cmd = Cmd.STATUS
    ready: bool
    reason: str | None = None
    epoch: int
    map: tuple[MapRange, ...] = ()
    num_layers: Count
    stages: tuple[StageStatus, ...] = ()
    model: str = ""
    fingerprint: str = ""
    tokenizer: TokenizerInfo | None = None  # None: the checkpoint has none, send token ids
    max_position_embeddings: Count = 0
    eos_token_id: int | list[int] | None = None
    vocab_size: int | None = None
    dtype: ComputeDType = "float32"
    prefill_chunk: Positive = CPU_PREFILL_CHUNK
    # "curve": encrypted, keys checked; "loopback": no keys, reachable from this host only;
    # "insecure": no keys off loopback (--insecure).
    security: Literal["curve", "loopback", "insecure"] = "loopback"
    requests: Count = 0
    counters: dict[str, int] = {}
    uptime_s: float = 0.0
    pid: int = 0
    ts: float = 0.0
    events: tuple[ClusterEvent, ...] = ()  # the latest ones, in a STATUS reply
    active: tuple[ActiveRequest, ...] = ()  # the active requests, in the feed's stats


class JobEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=False):
    """What a request's EVENT said, kept in its job record."""

    event: str
    reason: str = ""
    lost: str | None = None
    epoch: int | None = None


class Job(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=False):
    """A request, finished (with its outcome) or `active`."""

    rid: str
    outcome: str
    steps: Count = 0
    tokens: Count = 0
    replays: Count = 0
    duration_s: float | None = None
    ttft_s: float | None = None
    age_s: float | None = None
    finished: float | None = None
    events: tuple[JobEvent, ...] = ()


class Jobs(Body, frozen=True, kw_only=True, omit_defaults=True):
    cmd = Cmd.JOBS
    jobs: tuple[Job, ...] = ()


# --- the monitor feed ----------------------------------------------------------------------


class TokenSeen(Body, frozen=True, kw_only=True, omit_defaults=True):
    """The feed's `token`: a step that asked for logits entered the pipeline (its ids follow)."""

    rid: str
    pos: Count
    n: Positive
    stage: str | None = None
    ts: float
