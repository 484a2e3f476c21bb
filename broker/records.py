"""What the broker keeps: its configuration, and one record per step, stage, client and request."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from broker import messages as M
from broker import protocol as P
from common.defaults import DEAD_AFTER_S, DEFAULT_BROKER, HEARTBEAT_S, MAX_REPLAYS
from common.keys import ServerKeys
from common.tokenizer_files import CHUNK_BYTES


@dataclass(frozen=True)
class BrokerConfig:
    """Every knob of the broker, with the default and the reason for it."""

    bind: str = DEFAULT_BROKER
    strategy: str = "balanced"
    dtype: str = "float32"
    heartbeat_s: float = HEARTBEAT_S
    dead_after_s: float = DEAD_AFTER_S
    # A stage that is loading its layers cannot serve anyway, and reading and dequantizing
    # weights on a busy machine may keep its I/O thread from the CPU for seconds: it is dead
    # only after this much silence, so that a slow load is not a death and a reshard.
    load_grace_s: float = 10.0
    # A step may take long (a big prefill); it is stalled only past this floor and
    # stall_factor times its expected duration from the stage's measured per-token time.
    stall_floor_s: float = 5.0
    stall_factor: float = 20.0
    stall_first_s: float = 60.0  # before any measurement
    ready_wait_s: float = 30.0
    # A client silent this long (no message from any of its sockets) has its requests ended.
    # Its connection may still be open: a stopped process, or a consumer that reads nothing
    # (a client PINGs only while it waits). Should it come back, it rebuilds them (replay).
    client_timeout_s: float = 30.0
    # A client whose every connection has closed (its process died: the kernel closed its
    # sockets) has its requests ended this long after, so that their caches do not wait out
    # client_timeout_s. A client that replaces its socket (a reconnect) sends on the new one
    # within a heartbeat: four heartbeats.
    client_gone_after_s: float = 4 * HEARTBEAT_S
    # Admission: a new request (its first step) is refused `busy` while this many steps wait
    # in the broker (every stage's queue and the not-ready wait together). An admitted
    # request's steps are never refused for it: its outstanding steps are bounded by its
    # context (they cover at most max_positions positions) and requests by max_requests.
    max_queue: int = 1024
    # Batching: the steps queued for a stage travel as one FORWARD, and the stage runs their
    # decode steps as one batched forward. A stage holds stage_window FORWARDs at once; what
    # arrives meanwhile waits in the broker and joins the next one, so groups of requests
    # form and stay together through the pipeline. One FORWARD carries at most the stage's
    # max_batch requests, at most forward_tokens tokens past its first step, and at most
    # ceil(active requests / pipeline lanes) requests, so that every stage that can run in
    # parallel with another gets a group (see layermap.parallel_lanes).
    stage_window: int = 1
    forward_tokens: int = 256
    # Clients answer a token with their next step within a few milliseconds, one after
    # another. While the first stage is idle and requests that just got a token have not
    # answered yet, their group's first arrivals wait up to this long for the rest, instead
    # of leaving alone and splitting the group for good. A lone request never waits.
    batch_linger_s: float = 0.008
    # The prompt chunk the broker advises clients in STATUS (0: chosen from the stages'
    # devices, see Broker.prefill_chunk).
    prefill_chunk: int = 0
    max_requests: int = 512
    max_client_requests: int = 64
    max_replays: int = MAX_REPLAYS
    busy_retry_s: float = 0.5
    # Stages expected at start: the first map waits for them (or settle_s of quiet) so that
    # a cluster start does not load the whole model on the first stage and then reshard.
    expect_stages: int = 1
    settle_s: float = 2.0
    rebalance_cooldown_s: float = 5.0
    history: int = 256
    limits: P.Limits = P.DEFAULT_LIMITS
    # Bytes of the tokenizer bundle per TOKENIZER reply (common.tokenizer_files.CHUNK_BYTES).
    tokenizer_chunk_bytes: int = CHUNK_BYTES
    # CURVE: the broker's certificate and the keys it allows by role (None: no encryption, for
    # loopback, or off it with `insecure`).
    keys: ServerKeys | None = None
    insecure: bool = False
    # The monitor feed (PUB): stats snapshots, cluster events and token progress.
    feed: str | None = None
    feed_interval_s: float = 0.5


@dataclass
class QueuedStep:
    """The broker's record of one client STEP on its way through the pipeline."""

    id: int
    rid: str
    seq: int
    client: bytes
    item: M.Item
    frames: list
    descs: list
    created: float
    epoch: int = 0
    hop: int = 0
    enqueued: float = 0.0
    sent: float = 0.0
    broker_queue_s: float = 0.0
    trace: list[M.Hop] = field(default_factory=list)
    dead: bool = False  # its request is replaying or the map changed: ignore its outcome
    passed: bool = False  # a prefill that a decode FORWARD went ahead of at this stage


@dataclass
class StageRecord:
    """One registered stage: its capabilities, its layers, its queue and what it holds."""

    name: str
    ident: bytes
    caps: M.Caps
    credits: int
    joined: float
    held: tuple[int, int] | None = None
    last_seen: float = 0.0
    state: str = "joining"  # joining | loading | ready | standby | draining | dead
    start: int = 0
    end: int = 0
    loaded_epoch: int = -1
    load_s: float | None = None  # how long its last load took, as its LOADED said
    inflight: dict[int, QueuedStep] = field(default_factory=dict)  # by step id
    forwards: dict[int, list[QueuedStep]] = field(default_factory=dict)  # by FORWARD id (fid)
    queue: collections.deque = field(default_factory=collections.deque)
    progress: int = 0
    progress_at: float = 0.0
    per_token_s: float = 0.0  # smoothed compute seconds per token
    step_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=256))
    tokens: int = 0
    stats: M.StageHeartbeat | None = None  # its latest heartbeat

    @property
    def max_batch(self) -> int:
        return self.caps.max_batch

    def describe(self) -> str:
        return f"{self.name}[{self.start},{self.end})"


@dataclass
class ClientRecord:
    """One client, by owner (the secret of its routing identities): when it was last heard,
    its open connections and its requests."""

    owner: bytes
    last_seen: float
    # Its sockets heard from, by identity: the file descriptor of each one's connection
    # (-1 where the transport has none, as inproc); a closed connection leaves.
    sockets: dict[bytes, int] = field(default_factory=dict)
    gone_since: float | None = None  # when its last connection closed
    rids: set[str] = field(default_factory=set)


@dataclass
class Request:
    """One request of a client, from its first step until it ends, fails or is abandoned."""

    rid: str
    client: bytes  # the socket its latest step came from, where its answers go
    owner: bytes  # the client's secret: only sockets of this owner may touch the request
    created: float
    key: bytes = b""  # with keys, the CURVE key that started it: only it (or an admin's END)
    replays: int = 0
    replay_pending: bool = False
    idle_s: float | None = None  # its client's idle_timeout (STEP `idle_s`)
    steps: int = 0
    tokens: int = 0
    events: list[M.Event] = field(default_factory=list)
    first_result_at: float | None = None
    # Its steps in the broker's hands (queued, in flight, or dead but not yet dropped), by
    # step id, and the positions they cover: bounded by the context (Clients.hold).
    held: dict[int, QueuedStep] = field(default_factory=dict)
    held_positions: int = 0
