"""The broker: one ROUTER loop that tracks stages, owns the layer map and routes every step.

It reads like the zguide's Majordomo broker: poll with a timeout equal to the next timer,
dispatch on the command byte to a handler named after the command, then run the timers
(dead and stalled stages, waits that ran out, vanished clients, heartbeats). Tensor frames pass
through as the `zmq.Frame` objects they arrived in; the broker never builds a tensor.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import zmq

from broker import protocol as P
from broker.metrics import STAGE_STATES, Metrics
from broker.protocol import Cmd, Code
from broker.scheduler import (
    LayerCost,
    LayerMap,
    SchedulerError,
    StageCapacity,
    parallel_lanes,
    plan,
)
from common.checkpoint import CheckpointMeta

log = structlog.get_logger("broker")

RID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# Prompt chunks advised to clients (STATUS `prefill_chunk`). Measured: on a 2-core CPU
# (`small`, 3 stages) 128-token chunks gave a 1024-token prompt its first token sooner than 64
# or 32 and kept 8 other streams' p99 within 2.4x; on an H100 (`tinyllama`, bf16) a 128-token
# chunk costs about what a decode step does, and a 1024-token prompt in 8 chunks took 221 ms.
CPU_PREFILL_CHUNK = 128
ACCELERATOR_PREFILL_CHUNK = 1024
# A decode FORWARD overtakes a stage's prefills only if they hold this many positions.
OVERTAKE_POSITIONS = 64


@dataclass(frozen=True)
class BrokerConfig:
    """Every knob of the broker, with the default and the reason for it."""

    bind: str = "tcp://127.0.0.1:5555"
    strategy: str = "balanced"
    dtype: str = "float32"
    # Stages run on one LAN: 250 ms heartbeats notice a dead peer within about a second
    # while costing a few hundred bytes per second.
    heartbeat_s: float = 0.25
    dead_after_s: float = 1.0
    # A step may take long (a big prefill); it is stalled only past this floor and
    # stall_factor times its expected duration from the stage's measured per-token time.
    stall_floor_s: float = 5.0
    stall_factor: float = 20.0
    stall_first_s: float = 60.0  # before any measurement
    ready_wait_s: float = 30.0
    client_timeout_s: float = 30.0
    max_queue: int = 1024
    # Batching: the steps queued for a stage travel as one FORWARD, and the stage runs their
    # decode steps as one batched forward. A stage holds stage_window FORWARDs at once; what
    # arrives meanwhile waits in the broker and joins the next one, so groups of requests
    # form and stay together through the pipeline. One FORWARD carries at most the stage's
    # max_batch requests, at most forward_tokens tokens past its first step, and at most
    # ceil(active requests / pipeline lanes) requests, so that every stage that can run in
    # parallel with another gets a group (see scheduler.parallel_lanes).
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
    max_replays: int = 8
    busy_retry_s: float = 0.5
    # Stages expected at start: the first map waits for them (or settle_s of quiet) so that
    # a cluster start does not load the whole model on the first stage and then reshard.
    expect_stages: int = 1
    settle_s: float = 2.0
    rebalance_cooldown_s: float = 5.0
    history: int = 256
    limits: P.Limits = P.DEFAULT_LIMITS
    admin_token: str | None = None
    # The monitor feed (PUB): stats snapshots, cluster events and token progress.
    feed: str | None = None
    feed_interval_s: float = 0.5


@dataclass
class Step:
    """One client step on its way through the pipeline."""

    id: int
    rid: str
    seq: int
    client: bytes
    item: dict
    frames: list
    descs: list
    want_logits: bool
    created: float
    epoch: int = 0
    hop: int = 0
    enqueued: float = 0.0
    sent: float = 0.0
    broker_queue_s: float = 0.0
    trace: list = field(default_factory=list)
    dead: bool = False  # its request is replaying or the map changed: ignore its outcome
    passed: bool = False  # a prefill that a decode FORWARD went ahead of at this stage

    @property
    def decode(self) -> bool:
        """One new token on an existing cache: the steps a stage runs as one batch."""
        return self.item["n"] == 1 and self.item["pos"] > 0


@dataclass
class StageRecord:
    name: str
    ident: bytes
    caps: dict
    credits: int
    joined: float
    held: tuple[int, int] | None = None
    last_seen: float = 0.0
    state: str = "joining"  # joining | loading | ready | draining | dead
    start: int = 0
    end: int = 0
    loaded_epoch: int = -1
    inflight: dict[int, Step] = field(default_factory=dict)  # by step id
    forwards: dict[int, list[Step]] = field(default_factory=dict)  # by FORWARD id
    max_batch: int = 32
    queue: collections.deque = field(default_factory=collections.deque)
    progress: int = 0
    progress_at: float = 0.0
    per_token_s: float = 0.0  # smoothed compute seconds per token
    step_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=256))
    tokens: int = 0
    stats: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.name}[{self.start},{self.end})"


@dataclass
class Request:
    rid: str
    client: bytes
    created: float
    last_seen: float
    replays: int = 0
    replay_pending: bool = False
    steps: int = 0
    tokens: int = 0
    events: list = field(default_factory=list)
    first_result_at: float | None = None


@dataclass
class Counters:
    forwarded: int = 0
    forwarded_bytes: int = 0
    malformed: int = 0
    stale: int = 0
    send_failures: int = 0
    reshards: int = 0
    busy: int = 0


class Broker:
    """The ROUTER loop. `run()` blocks; `stop()` may be called from a signal handler."""

    def __init__(
        self,
        config: BrokerConfig,
        checkpoint: CheckpointMeta,
        context: zmq.Context | None = None,
        metrics: Metrics | None = None,
    ):
        self.config = config
        self.metrics = metrics or Metrics()
        self.checkpoint = checkpoint
        self.num_layers = checkpoint.num_layers
        self.max_positions = checkpoint.context_length
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.socket.bind(config.bind)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.feed: zmq.Socket | None = None
        if config.feed:
            self.feed = self.context.socket(zmq.PUB)
            self.feed.setsockopt(zmq.LINGER, 0)
            self.feed.setsockopt(zmq.SNDHWM, 10_000)
            self.feed.bind(config.feed)
        self.next_feed = 0.0

        dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[config.dtype]
        wb = checkpoint.weight_bytes(dtype_bytes)
        self.cost = LayerCost(
            layer_bytes=wb["layer"], first_extra_bytes=wb["first"], last_extra_bytes=wb["last"]
        )

        self.stages: dict[str, StageRecord] = {}  # insertion order is the pipeline order
        self.by_ident: dict[bytes, str] = {}
        self.layer_map: LayerMap | None = None
        # Epochs grow across broker restarts too, so a stage never confuses two incarnations.
        self.epoch = int(time.time() * 1000)
        self.not_ready_reason = (
            "no stages registered; start one with `python -m stage --broker URL`"
        )
        self.map_formed = False
        self.last_reshard = 0.0
        self.rebalance_at: float | None = None
        self.requests: dict[str, Request] = {}
        self.clients_seen: dict[bytes, float] = {}
        self.waiting: collections.deque[Step] = collections.deque()
        self.next_step_id = 1
        self.next_forward_id = 1
        self.lanes = 1  # stages of the map that can compute at the same time
        # Stages to dispatch once the socket is drained: steps that arrive together leave
        # together, as one FORWARD.
        self.dirty: dict[str, StageRecord] = {}
        self.unreachable: list[bytes] = []  # identities a send found gone (bury_unreachable)
        self.draining = False
        # Requests that were just sent a token, by when: their next step is expected.
        self.answering: dict[str, float] = {}
        self.linger_until: float | None = None
        self.history: collections.deque = collections.deque(maxlen=config.history)
        self.events: collections.deque = collections.deque(maxlen=1000)
        self.counters = Counters()
        self.started = time.monotonic()
        self.next_heartbeat = 0.0
        self._running = True
        self.handlers = {
            Cmd.READY: self.on_ready,
            Cmd.LOADED: self.on_loaded,
            Cmd.RESULT: self.on_result,
            Cmd.ERROR: self.on_stage_error,
            Cmd.HEARTBEAT: self.on_heartbeat,
            Cmd.LEAVING: self.on_leaving,
            Cmd.STEP: self.on_step,
            Cmd.STEPS: self.on_steps,
            Cmd.END: self.on_end,
            Cmd.PING: self.on_ping,
            Cmd.STATUS: self.on_status,
            Cmd.JOBS: self.on_jobs,
            Cmd.DRAIN: self.on_drain,
        }

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        self.log.info(
            "broker_started",
            bind=self.endpoint,
            model=str(self.checkpoint.path),
            layers=self.num_layers,
            fingerprint=self.checkpoint.fingerprint,
        )
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while self._running:
                timeout = max(0.0, self.next_timer() - time.monotonic())
                if poller.poll(timeout * 1000):
                    self.drain_socket()
                self.run_timers()
                self.bury_unreachable()
        finally:
            self.socket.close(linger=0)
            if self.feed is not None:
                self.feed.close(linger=0)
            self.log.info("broker_stopped")

    def stop(self) -> None:
        self._running = False

    @property
    def log(self):
        return log.bind(epoch=self.epoch)

    def drain_socket(self, budget: int = 256) -> None:
        self.draining = True
        try:
            for _ in range(budget):
                try:
                    frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.handle(frames)
                self.bury_unreachable()
        finally:
            self.draining = False
            dirty, self.dirty = self.dirty, {}
            for stage in dirty.values():
                self.dispatch(stage)
            self.bury_unreachable()

    def handle(self, frames: list) -> None:
        ident = frames[0].bytes
        try:
            msg = P.decode(frames[1:], self.config.limits, inbound=True)
        except P.ProtocolError as e:
            self.counters.malformed += 1
            self.metrics.malformed.inc()
            self.log.warning("malformed_message", code=str(e.code), reason=e.message)
            tag = frames[1].bytes if len(frames) > 1 and frames[1].bytes in P.TAGS else P.CLIENT_TAG
            self.send(ident, P.encode(tag, Cmd.ERROR, P.error_header(e.code, e.message)))
            return
        if msg.role == "stage":
            stage = self.stage_of(ident)
            if stage is not None:
                now = time.monotonic()
                missed = int((now - stage.last_seen) / self.config.heartbeat_s) - 1
                if missed > 0:
                    self.metrics.heartbeat_misses.labels(stage.name).inc(missed)
                stage.last_seen = now
            elif msg.cmd != Cmd.READY:
                # A stage we do not know (we restarted, or declared it dead): make it register.
                self.send(ident, P.encode(P.STAGE_TAG, Cmd.BYE, {"reason": "unknown"}))
                return
        else:
            self.clients_seen[ident] = time.monotonic()
        try:
            self.handlers[msg.cmd](ident, msg)
        except P.ProtocolError as e:
            self.refuse(ident, msg, e)

    def refuse(self, ident: bytes, msg: P.Message, e: P.ProtocolError) -> None:
        """Answer a message (or one item of a bundle) that breaks the protocol with an ERROR."""
        self.counters.malformed += 1
        self.send(
            ident,
            P.encode(msg.tag, Cmd.ERROR, P.error_header(e.code, e.message, **_ids(msg.header))),
        )

    def next_timer(self) -> float:
        deadlines = [self.next_heartbeat, self.next_feed if self.feed is not None else float("inf")]
        if self.rebalance_at is not None:
            deadlines.append(self.rebalance_at)
        if self.linger_until is not None:
            deadlines.append(self.linger_until)
        return min(deadlines)

    def run_timers(self) -> None:
        now = time.monotonic()
        if self.linger_until is not None and now >= self.linger_until:
            self.linger_until = None
            if self.layer_map is not None and self.layer_map.ranges[0].name in self.stages:
                self.dispatch(self.stages[self.layer_map.ranges[0].name])
        if now >= self.next_feed and self.feed is not None:
            self.send_feed(P.FEED_STATS, self.status(requests=True))
            self.next_feed = now + self.config.feed_interval_s
        if now < self.next_heartbeat and (self.rebalance_at is None or now < self.rebalance_at):
            return
        self.purge_stages(now)
        self.form_map_if_due(now)
        self.expire_waiting(now)
        self.purge_clients(now)
        if now >= self.next_heartbeat:
            self.send_heartbeats()
            self.update_gauges()
            self.next_heartbeat = now + self.config.heartbeat_s

    # --- sending -----------------------------------------------------------------------------

    def send(self, ident: bytes, frames: list) -> bool:
        """Non-blocking send; an unreachable stage is a death signal at once."""
        try:
            # copy=True: the broker's own frames are small headers, cheaper copied; forwarded
            # tensors are zmq.Frame objects, which pyzmq sends by reference either way.
            self.socket.send_multipart([ident, *frames], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:
            self.counters.send_failures += 1
            name = self.by_ident.get(ident)
            if e.errno == errno.EHOSTUNREACH and name is not None:
                # Declared dead once the caller is done: a reshard started here, inside a
                # reshard's or a dispatch's loop, would change the map under that loop.
                if ident not in self.unreachable:
                    self.log.warning("stage_unreachable", stage=name)
                    self.unreachable.append(ident)
            elif e.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            return False

    def bury_unreachable(self) -> None:
        """Declare dead the stages a send found gone, one at a time, each after the last's
        reshard has finished. An identity the stage has replaced since is left alone."""
        while self.unreachable:
            ident = self.unreachable.pop(0)
            stage = self.stages.get(self.by_ident.get(ident, ""))
            if stage is not None and stage.ident == ident:
                self.stage_dead(stage, cause="unreachable")

    def send_heartbeats(self) -> None:
        frames = P.encode(P.STAGE_TAG, Cmd.HEARTBEAT, {"epoch": self.epoch})
        for stage in list(self.stages.values()):
            self.send(stage.ident, frames)

    def publish(self, kind: str, **data) -> None:
        event = {"ts": time.time(), "kind": kind, "epoch": self.epoch, **data}
        self.events.append(event)
        self.send_feed(P.FEED_EVENT, event)

    def send_feed(self, topic: bytes, header: dict, tensors: list = ()) -> None:
        if self.feed is None:
            return
        # A slow monitor loses feed messages; it never slows the broker.
        with contextlib.suppress(zmq.Again):
            self.feed.send_multipart(P.encode_feed(topic, header, tensors), flags=zmq.NOBLOCK)

    # --- stage handlers ----------------------------------------------------------------------

    def stage_of(self, ident: bytes) -> StageRecord | None:
        name = self.by_ident.get(ident)
        return self.stages.get(name) if name is not None else None

    def on_ready(self, ident: bytes, msg: P.Message) -> None:
        h = msg.header
        name = h["name"]
        if h["fingerprint"] != self.checkpoint.fingerprint:
            self.log.warning("stage_refused", stage=name, reason="fingerprint")
            return self.refuse_stage(
                ident,
                f"stage {name} sees checkpoint {h['fingerprint']} but the broker serves "
                f"{self.checkpoint.fingerprint} ({self.checkpoint.path}); point --model at the same checkpoint",
            )
        dtype = h["caps"].get("dtype", "float32")
        if dtype != self.config.dtype:
            return self.refuse_stage(
                ident,
                f"stage {name} runs {dtype} but the cluster runs {self.config.dtype}; "
                f"start it with --dtype {self.config.dtype}",
            )
        if not 1 <= h["credits"] <= 1024:
            raise P.ProtocolError(Code.BAD_REQUEST, "credits must be in [1, 1024]")
        max_batch = h["caps"].get("max_batch", 1)
        if not isinstance(max_batch, int) or not 1 <= max_batch <= 1024:
            raise P.ProtocolError(Code.BAD_REQUEST, "caps.max_batch must be in [1, 1024]")
        now = time.monotonic()
        old = self.stages.get(name)
        held = h.get("held")
        stage = StageRecord(
            name=name,
            ident=ident,
            caps=h["caps"],
            credits=h["credits"],
            max_batch=max_batch,
            joined=now,
            held=tuple(held) if isinstance(held, list) and len(held) == 2 else None,
            last_seen=now,
            progress_at=now,
        )
        if old is not None:
            # The same name from a new identity is that stage restarted or reconnected.
            lost = {s.rid for s in [*old.queue, *old.inflight.values()] if not s.dead}
            self.remove_stage(old)
            if (
                old.state != "draining"
                and self.layer_map is not None
                and self.layer_map.range_of(name)
            ):
                self.restart_in_place(stage, old, lost)
                return
        self.stages[name] = stage
        self.by_ident[ident] = name
        self.log.info(
            "stage_joined",
            stage=name,
            host=stage.caps.get("host"),
            device=stage.caps.get("device"),
            memory_mb=int(stage.caps.get("memory_bytes", 0)) >> 20,
            credits=stage.credits,
        )
        self.publish("join", stage=name, host=stage.caps.get("host"))
        # Answered at once: a stage that hears nothing for its dead-after time reconnects under
        # a new identity, and the map may form only later (expect_stages, settle_s).
        self.send(ident, P.encode(P.STAGE_TAG, Cmd.HEARTBEAT, {"epoch": self.epoch}))
        if self.map_formed:
            self.schedule_rebalance(cause="join", now=now, immediate=not self.ready)

    def restart_in_place(self, stage: StageRecord, old: StageRecord, lost: set[str]) -> None:
        """A stage came back before it was declared dead: same range, same epoch, empty caches.

        Its requests replay when it refuses their next step (`cache_miss`); the ones that had a
        step inside the old process are told at once.
        """
        self.stages[stage.name] = stage
        self.by_ident[stage.ident] = stage.name
        stage.start, stage.end, stage.state = old.start, old.end, "loading"
        self.log.info("stage_restarted", stage=stage.name, layers=f"[{stage.start},{stage.end})")
        self.publish("rejoin", stage=stage.name)
        self.send(
            stage.ident,
            P.encode(
                P.STAGE_TAG,
                Cmd.ASSIGN,
                {
                    "epoch": self.epoch,
                    "start": stage.start,
                    "end": stage.end,
                    "num_layers": self.num_layers,
                    "dtype": self.config.dtype,
                    "map": self.layer_map.to_json(),
                },
            ),
        )
        for rid in lost:
            self.replay(rid, event="replay", reason=f"stage {stage.name} restarted")

    def refuse_stage(self, ident: bytes, reason: str) -> None:
        """A stage that must not join this cluster: it exits with the reason."""
        self.send(ident, P.encode(P.STAGE_TAG, Cmd.ERROR, P.error_header(Code.FINGERPRINT, reason)))

    def on_loaded(self, ident: bytes, msg: P.Message) -> None:
        stage = self.stage_of(ident)
        h = msg.header
        if h["epoch"] != self.epoch:
            self.counters.stale += 1
            return
        stage.loaded_epoch = h["epoch"]
        if stage.state in ("loading", "joining"):
            stage.state = "ready" if stage.end > stage.start else "standby"
        self.log.info(
            "stage_loaded",
            stage=stage.name,
            start=h["start"],
            end=h["end"],
            epoch=h["epoch"],
            load_s=h.get("load_s"),
            weight_mb=int(h.get("weight_bytes", 0)) >> 20,
        )
        if self.ready:
            self.on_map_ready()

    def on_result(self, ident: bytes, msg: P.Message) -> None:
        stage = self.stage_of(ident)
        h = msg.header
        steps = self.take_forward(stage, h["step"])
        now = time.monotonic()
        if steps is None or h.get("epoch") != self.epoch:
            self.counters.stale += 1
            self.dispatch(stage)
            return
        refused = _refusals(h.get("refused"), len(steps))
        if refused is None or len(msg.frames) != len(steps) - len(refused):
            self.log.warning("bad_result", stage=stage.name, frames=len(msg.frames))
            for step in steps:
                if not step.dead and step.epoch == self.epoch:
                    self.fail_step(
                        step,
                        Code.INTERNAL,
                        f"stage {stage.name} returned {len(msg.frames)} outputs for "
                        f"{len(steps)} items",
                    )
            self.dispatch(stage)
            return
        compute = float(h.get("compute_s", 0.0))
        queued = float(h.get("queue_s", 0.0))
        computed = [s for i, s in enumerate(steps) if i not in refused]
        tokens = sum(s.item["n"] for s in computed)
        self.metrics.step_seconds.labels(stage.name).observe(compute)
        self.metrics.hop_seconds.labels(stage.name).observe(now - steps[0].sent)
        if tokens:
            stage.tokens += tokens
            stage.step_times.append((now, compute, tokens))
            per_token = compute / tokens
            stage.per_token_s = (
                per_token if stage.per_token_s == 0 else 0.9 * stage.per_token_s + 0.1 * per_token
            )
        stage.progress_at = now
        outputs = iter(zip(msg.frames, msg.descs, strict=True))
        following = None
        answers: dict[bytes, list[Step]] = {}
        for i, step in enumerate(steps):
            live = not step.dead and step.epoch == self.epoch
            if i in refused:
                if live:
                    self.step_refused(stage, step, *refused[i])
                continue
            frame, desc = next(outputs)
            if not live:
                self.counters.stale += 1
                continue
            step.trace.append(
                {
                    "stage": stage.name,
                    "start": stage.start,
                    "end": stage.end,
                    "compute_s": compute,
                    "queue_s": queued,
                    "transfer_s": max(0.0, now - step.sent - compute - queued),
                }
            )
            step.frames, step.descs = [frame], [desc]
            step.hop += 1
            self.counters.forwarded += 1
            self.counters.forwarded_bytes += desc.nbytes
            self.metrics.forwarded.inc()
            self.metrics.forwarded_bytes.inc(desc.nbytes)
            if step.hop < len(self.layer_map.ranges):
                following = self.enqueue(step, now)
            else:
                answers.setdefault(step.client, []).append(step)
        for client, done in answers.items():
            self.deliver(client, done, now)
        if following is not None:
            self.dispatch(following)
        self.dispatch(stage)

    def on_stage_error(self, ident: bytes, msg: P.Message) -> None:
        """A FORWARD refused or failed as a whole: every step in it shares the outcome."""
        stage = self.stage_of(ident)
        h = msg.header
        steps = self.take_forward(stage, h.get("step"))
        if steps is None:
            self.log.warning("stage_error", stage=stage.name, code=h["code"], reason=h["message"])
            return
        if h.get("epoch") == self.epoch:
            for step in steps:
                if not step.dead and step.epoch == self.epoch:
                    self.step_refused(stage, step, h["code"], h["message"])
        self.dispatch(stage)

    def take_forward(self, stage: StageRecord, forward_id) -> list[Step] | None:
        """The steps of an answered FORWARD, no longer outstanding at the stage."""
        steps = stage.forwards.pop(forward_id, None) if isinstance(forward_id, int) else None
        for step in steps or ():
            stage.inflight.pop(step.id, None)
        return steps

    def step_refused(self, stage: StageRecord, step: Step, code: str, message: str) -> None:
        """A lost or stale cache asks for a replay; any other refusal fails the step."""
        if code in (Code.CACHE_MISS, Code.CACHE_MISMATCH, Code.STALE_EPOCH):
            self.replay(step.rid, event="replay", reason=f"stage {stage.name}: {message}")
        else:
            self.fail_step(
                step,
                Code(code) if code in Code.__members__.values() else Code.INTERNAL,
                f"stage {stage.name}: {message}",
            )

    def on_heartbeat(self, ident: bytes, msg: P.Message) -> None:
        stage = self.stage_of(ident)
        progress = msg.header.get("progress")
        if isinstance(progress, int) and progress != stage.progress:
            stage.progress = progress
            stage.progress_at = time.monotonic()
        stage.stats = msg.header

    def on_leaving(self, ident: bytes, msg: P.Message) -> None:
        self.drain_stage(self.stage_of(ident), cause="leave")

    def drain_stage(self, stage: StageRecord, cause: str) -> None:
        if stage.state == "draining":
            return
        self.log.info("stage_draining", stage=stage.name, cause=cause)
        stage.state = "draining"
        self.publish("leave", stage=stage.name, cause=cause)
        if stage.end > stage.start:
            self.reshard(cause=cause, lost=stage.name)
        else:
            self.finish_drains()

    # --- client handlers ---------------------------------------------------------------------

    def on_steps(self, ident: bytes, msg: P.Message) -> None:
        """A bundle of steps: each is taken or refused on its own, as if sent alone."""
        for item in P.unbundle(msg):
            try:
                P.check_header(item.tag, item.cmd, item.header)
                self.on_step(ident, item)
            except P.ProtocolError as e:
                self.refuse(ident, item, e)

    def on_step(self, ident: bytes, msg: P.Message) -> None:
        h = msg.header
        rid, pos, n = h["rid"], h["pos"], h["n"]
        ids = _ids(h)
        if not RID_PATTERN.match(rid):
            raise P.ProtocolError(
                Code.BAD_REQUEST, "rid must be 1-64 characters of [A-Za-z0-9_.:-]"
            )
        if pos < 0 or n < 1:
            raise P.ProtocolError(
                Code.BAD_REQUEST, f"need pos >= 0 and n >= 1, got pos={pos} n={n}"
            )
        if len(msg.descs) != 1 or msg.descs[0].dtype != "int64" or msg.descs[0].shape != (1, n):
            raise P.ProtocolError(
                Code.BAD_REQUEST, f"STEP carries one int64 tensor of shape [1, {n}]"
            )
        if pos + n > self.max_positions:
            raise P.ProtocolError(
                Code.CONTEXT_OVERFLOW,
                f"positions up to {pos + n} exceed the model's context of {self.max_positions}",
            )
        now = time.monotonic()
        request = self.requests.get(rid)
        if request is None:
            if pos != 0:
                # The broker restarted or released it: the client must replay from the start.
                self.send(
                    ident,
                    P.encode(
                        P.CLIENT_TAG,
                        Cmd.EVENT,
                        {"rid": rid, "event": "replay", "reason": "request unknown to the broker"},
                    ),
                )
                return
            if len(self.requests) >= self.config.max_requests:
                return self.busy(
                    ident,
                    ids,
                    f"{len(self.requests)} requests active (limit {self.config.max_requests})",
                )
            mine = sum(1 for r in self.requests.values() if r.client == ident)
            if mine >= self.config.max_client_requests:
                return self.busy(
                    ident,
                    ids,
                    f"this client has {mine} requests active "
                    f"(limit {self.config.max_client_requests})",
                )
            request = self.requests[rid] = Request(
                rid=rid, client=ident, created=now, last_seen=now
            )
        request.client, request.last_seen = ident, now
        self.answering.pop(rid, None)
        if request.replay_pending:
            if pos != 0:
                return  # superseded by the replay the client was told to make
            request.replay_pending = False
        if (
            self.layer_map is not None
            and len(self.stages[self.layer_map.ranges[0].name].queue) >= self.config.max_queue
        ):
            return self.busy(ident, ids, f"stage queue full ({self.config.max_queue} steps)")
        item = {
            "rid": rid,
            "pos": pos,
            "n": n,
            "prev": h["prev"],
            "hash": h["hash"],
            "logits": bool(h.get("logits", True)),
        }
        step = Step(
            id=self.next_step_id,
            rid=rid,
            seq=h["seq"],
            client=ident,
            item=item,
            frames=msg.frames,
            descs=msg.descs,
            want_logits=item["logits"],
            created=now,
        )
        self.next_step_id += 1
        request.steps += 1
        if item["logits"] and self.feed is not None:
            # Token progress for monitors: the step's own id frame, forwarded, not decoded.
            last = self.layer_map.ranges[-1].name if self.layer_map else None
            self.send_feed(
                P.FEED_TOKEN,
                {"rid": rid, "pos": pos, "n": n, "stage": last, "ts": time.time()},
                list(zip(msg.descs, msg.frames, strict=True)),
            )
        if not self.ready:
            step.enqueued = now
            self.waiting.append(step)
            return
        self.enqueue(step, now)
        self.dispatch(self.stages[self.layer_map.ranges[0].name])

    def busy(self, ident: bytes, ids: dict, reason: str) -> None:
        self.counters.busy += 1
        self.metrics.busy.inc()
        self.send(
            ident,
            P.encode(
                P.CLIENT_TAG,
                Cmd.ERROR,
                P.error_header(
                    Code.BUSY,
                    f"broker busy: {reason}; retry later",
                    retry_after_s=self.config.busy_retry_s,
                    **ids,
                ),
            ),
        )

    def on_end(self, ident: bytes, msg: P.Message) -> None:
        request = self.requests.get(msg.header["rid"])
        if request is not None:
            self.finish_request(request, outcome=str(msg.header.get("reason", "done")))

    def on_ping(self, ident: bytes, msg: P.Message) -> None:
        for request in self.requests.values():
            if request.client == ident:
                request.last_seen = time.monotonic()
        self.send(ident, P.encode(msg.tag, Cmd.PONG, {"ready": self.ready, "epoch": self.epoch}))

    def on_status(self, ident: bytes, msg: P.Message) -> None:
        # A monitor's snapshot on connect carries the recent cluster events too.
        self.send(
            ident,
            P.encode(msg.tag, Cmd.STATUS, {**self.status(), "events": list(self.events)[-100:]}),
        )

    def on_jobs(self, ident: bytes, msg: P.Message) -> None:
        active = [
            {
                "rid": r.rid,
                "outcome": "active",
                "steps": r.steps,
                "tokens": r.tokens,
                "replays": r.replays,
                "age_s": round(time.monotonic() - r.created, 3),
            }
            for r in self.requests.values()
        ]
        self.send(ident, P.encode(msg.tag, Cmd.JOBS, {"jobs": list(self.history) + active}))

    def on_drain(self, ident: bytes, msg: P.Message) -> None:
        h = msg.header
        if self.config.admin_token is None or h["token"] != self.config.admin_token:
            raise P.ProtocolError(
                Code.UNAUTHORIZED, "DRAIN needs the broker's admin token (--admin-token)"
            )
        stage = self.stages.get(h["stage"])
        if stage is None:
            raise P.ProtocolError(Code.BAD_REQUEST, f"no stage named {h['stage']!r}")
        self.drain_stage(stage, cause="drain")
        self.send(ident, P.encode(msg.tag, Cmd.PONG, {"ready": self.ready, "epoch": self.epoch}))

    # --- routing -----------------------------------------------------------------------------

    def enqueue(self, step: Step, now: float) -> StageRecord:
        step.epoch = self.epoch
        step.enqueued = now
        step.passed = False
        stage = self.stages[self.layer_map.ranges[step.hop].name]
        stage.queue.append(step)
        return stage

    def dispatch(self, stage: StageRecord) -> None:
        """Send a stage its queued steps, batched into FORWARDs, while it has room."""
        if self.draining:
            self.dirty[stage.name] = stage
            return
        if self.lingering(stage):
            return
        while (
            stage.queue
            and len(stage.inflight) < stage.credits
            and stage.state in ("ready", "draining")
        ):
            cap = min(stage.credits - len(stage.inflight), stage.max_batch, self.batch_cap())
            if len(stage.forwards) < self.config.stage_window:
                steps = self.next_batch(stage, cap)
            elif self.overtaking(stage):
                steps = self._take(stage, cap, 4 * cap + 16, decode=True)
            else:
                return
            if not steps:
                return
            now = time.monotonic()
            forward_id = self.next_forward_id
            self.next_forward_id += 1
            items, tensors = [], []
            for step in steps:
                step.broker_queue_s += now - step.enqueued
                step.sent = now
                stage.inflight[step.id] = step
                items.append(step.item)
                tensors.extend(zip(step.descs, step.frames, strict=True))
            stage.forwards[forward_id] = steps
            self.metrics.batch_items.labels(stage.name).observe(len(steps))
            header = {"step": forward_id, "epoch": self.epoch, "items": items}
            if not self.send(stage.ident, P.encode(P.STAGE_TAG, Cmd.FORWARD, header, tensors)):
                return

    def overtaking(self, stage: StageRecord) -> bool:
        """Whether a decode FORWARD may go to a stage beyond its window: when every FORWARD
        it holds is a prefill and together they hold OVERTAKE_POSITIONS positions or more (a
        long prompt's chunk, or many short prompts that arrived together). The stage runs it
        between two layers of the prefill or before the head, so decode groups wait for one
        layer of it at each stage, not for all of it; a short prompt, which finishes soon, is
        not interrupted."""
        steps = [step for forward in stage.forwards.values() for step in forward]
        return (
            bool(steps)
            and not any(step.decode for step in steps)
            and sum(step.item["n"] for step in steps) >= OVERTAKE_POSITIONS
        )

    def lingering(self, stage: StageRecord) -> bool:
        """Hold the first stage's next FORWARD a moment for requests about to answer."""
        if (
            not stage.queue
            or stage.forwards
            or not self.answering
            or self.config.batch_linger_s <= 0
            or self.layer_map is None
            or self.layer_map.ranges[0].name != stage.name
        ):
            return False
        now = time.monotonic()
        linger = self.config.batch_linger_s
        expired = [rid for rid, t in self.answering.items() if now - t >= linger]
        for rid in expired:
            del self.answering[rid]
        if not self.answering or len(stage.queue) >= self.batch_cap():
            return False
        due = min(self.answering.values()) + linger
        self.linger_until = due if self.linger_until is None else min(self.linger_until, due)
        return True

    def batch_cap(self) -> int:
        """Requests per FORWARD that leave a group for every lane of the pipeline."""
        return max(1, -(-len(self.requests) // self.lanes))

    def next_batch(self, stage: StageRecord, cap: int) -> list[Step]:
        """Take up to `cap` queued steps, one per request, in order, for one FORWARD.

        A request's steps keep their order: once one of its steps is left in the queue, so
        are its later ones. Steps of other requests may pass it.

        Decode steps and prefills (prompts and their chunks) leave in separate FORWARDs: a
        prefill inside a decode group would hold every token of the group for its own compute
        at each stage. Decode steps go first, but a prefill that a decode FORWARD has passed
        once leads the next FORWARD, so it waits for at most one decode FORWARD per stage.
        Within a prefill FORWARD, a chunk that would exceed the token budget waits.
        """
        window = 4 * cap + 16
        decode = _decode_turn(stage.queue, window)
        taken = self._take(stage, cap, window, decode)
        if not taken:  # nothing of that kind may leave now: the other kind does
            taken = self._take(stage, cap, window, not decode)
        return taken

    def _take(self, stage: StageRecord, cap: int, window: int, decode: bool) -> list[Step]:
        """Pop the steps of one FORWARD of the given kind (see `next_batch`)."""
        taken: list[Step] = []
        kept: list[Step] = []
        rids: set[str] = set()
        blocked: set[str] = set()
        tokens = 0
        budget = self.config.forward_tokens
        queue = stage.queue
        scanned = 0
        while queue and len(taken) < cap and scanned < window:
            step = queue.popleft()
            if step.dead:
                continue
            if step.rid in rids or step.rid in blocked:
                kept.append(step)  # behind an earlier step of its request: not scanned
                continue
            scanned += 1
            n = step.item["n"]
            if step.decode != decode or (taken and tokens + n > budget):
                if decode and not step.decode:
                    step.passed = True
                blocked.add(step.rid)
                kept.append(step)
                continue
            taken.append(step)
            rids.add(step.rid)
            tokens += n
        queue.extendleft(reversed(kept))
        return taken

    def deliver(self, client: bytes, steps: list[Step], now: float) -> None:
        """Send one client the logits of its finished steps: one RESULTS for a whole group, so
        the client answers them together and their next steps arrive together."""
        entries = []
        for step in steps:
            request = self.requests.get(step.rid)
            if request is not None and step.want_logits:
                self.answering[step.rid] = now
                request.tokens += 1
                self.metrics.tokens.inc()
                if request.first_result_at is None:
                    request.first_result_at = now
            header = {
                "rid": step.rid,
                "seq": step.seq,
                "pos": step.item["pos"],
                "n": step.item["n"],
                "epoch": step.epoch,
                "trace": step.trace,
                "broker_queue_s": step.broker_queue_s,
            }
            entries.append((header, (step.descs[0], step.frames[0])))
        for frames in P.encode_bundled(P.CLIENT_TAG, Cmd.RESULT, entries):
            self.send(client, frames)

    def fail_step(self, step: Step, code: Code, message: str) -> None:
        step.dead = True
        self.send(
            step.client,
            P.encode(
                P.CLIENT_TAG, Cmd.ERROR, P.error_header(code, message, rid=step.rid, seq=step.seq)
            ),
        )

    def kill_steps(self, rid: str | None = None) -> None:
        """Drop queued and in-flight steps (of one request, or all); credits return on reply."""
        for stage in self.stages.values():
            for step in list(stage.queue) + list(stage.inflight.values()):
                if rid is None or step.rid == rid:
                    step.dead = True
            stage.queue = collections.deque(s for s in stage.queue if not s.dead)
        self.waiting = collections.deque(
            s for s in self.waiting if not (rid is None or s.rid == rid)
        )

    # --- recovery ----------------------------------------------------------------------------

    def replay(self, rid: str, event: str, reason: str = "", **data) -> None:
        """Tell a request's client to re-send its steps; its old steps are dropped."""
        request = self.requests.get(rid)
        if request is None:
            return
        self.kill_steps(rid)
        request.replays += 1
        if request.replays > self.config.max_replays:
            self.send(
                request.client,
                P.encode(
                    P.CLIENT_TAG,
                    Cmd.ERROR,
                    P.error_header(
                        Code.REPLAY_LIMIT,
                        f"request {rid} was replayed {request.replays - 1} times "
                        f"(limit {self.config.max_replays}); the cluster is unstable",
                        rid=rid,
                    ),
                ),
            )
            self.finish_request(request, outcome="failed")
            return
        request.replay_pending = True
        self.metrics.replays.labels(event).inc()
        body = {"rid": rid, "event": event, "reason": reason, **data}
        request.events.append(body)
        self.send(request.client, P.encode(P.CLIENT_TAG, Cmd.EVENT, body))

    def stage_dead(self, stage: StageRecord, cause: str) -> None:
        if stage.name not in self.stages or self.stages[stage.name] is not stage:
            return
        self.log.warning(
            "stage_dead", stage=stage.name, cause=cause, layers=f"[{stage.start},{stage.end})"
        )
        self.publish("dead", stage=stage.name, cause=cause)
        had_layers = self.layer_map is not None and self.layer_map.range_of(stage.name) is not None
        self.remove_stage(stage)
        if had_layers:
            self.reshard(cause=cause, lost=stage.name)

    def remove_stage(self, stage: StageRecord) -> None:
        stage.state = "dead"
        for step in list(stage.queue) + list(stage.inflight.values()):
            step.dead = True
        self.stages.pop(stage.name, None)
        self.by_ident.pop(stage.ident, None)
        if stage.name not in self.stages:
            self.metrics.forget_stage(stage.name)

    def schedule_rebalance(self, cause: str, now: float, immediate: bool) -> None:
        if immediate:
            self.reshard(cause=cause)
            return
        due = max(now, self.last_reshard + self.config.rebalance_cooldown_s)
        self.rebalance_at = due if self.rebalance_at is None else min(self.rebalance_at, due)

    def form_map_if_due(self, now: float) -> None:
        if not self.map_formed:
            if not self.stages:
                return
            quiet = now - max(s.joined for s in self.stages.values()) >= self.config.settle_s
            if len(self.stages) >= self.config.expect_stages or quiet:
                self.map_formed = True
                self.reshard(cause="start")
        elif self.rebalance_at is not None and now >= self.rebalance_at:
            self.rebalance_at = None
            self.reshard(cause="rebalance")

    def pipeline_order(self) -> list[StageRecord]:
        """Survivors keep their places; newcomers go after them, by held range, then name."""
        live = [s for s in self.stages.values() if s.state not in ("dead", "draining")]
        rank = {r.name: i for i, r in enumerate(self.layer_map.ranges)} if self.layer_map else {}
        return sorted(
            live,
            key=lambda s: (rank.get(s.name, len(rank)), s.held[0] if s.held else 1 << 30, s.name),
        )

    def reshard(self, cause: str, lost: str | None = None) -> None:
        """Compute a new map over the live stages, bump the epoch, and replay every request."""
        old = self.layer_map
        order = self.pipeline_order()
        self.epoch += 1
        self.last_reshard = time.monotonic()
        self.rebalance_at = None
        self.counters.reshards += 1
        self.metrics.reshards.labels(cause).inc()
        caps = [StageCapacity(s.name, int(s.caps.get("memory_bytes", 0))) for s in order]
        try:
            if not caps:
                raise SchedulerError(
                    "no live stages; start one with `python -m stage --broker URL`"
                )
            new = plan(caps, self.num_layers, self.config.strategy, self.cost, epoch=self.epoch)
            self.not_ready_reason = "waiting for stages to load their layers"
        except SchedulerError as e:
            new = None
            self.not_ready_reason = f"the live stages cannot hold the model: {e}"
            self.log.warning("not_ready", reason=self.not_ready_reason)
            self.publish("not_ready", reason=self.not_ready_reason)
        self.layer_map = new
        self.lanes = parallel_lanes([self.stages[r.name].caps for r in new.ranges]) if new else 1
        for stage in order:
            r = new.range_of(stage.name) if new is not None else None
            stage.start, stage.end = (r.start, r.end) if r is not None else (0, 0)
            stage.state = "loading"
            stage.loaded_epoch = -1
            header = {
                "epoch": self.epoch,
                "start": stage.start,
                "end": stage.end,
                "num_layers": self.num_layers,
                "dtype": self.config.dtype,
                "map": new.to_json() if new is not None else [],
            }
            self.send(stage.ident, P.encode(P.STAGE_TAG, Cmd.ASSIGN, header))
        old_json = old.to_json() if old is not None else []
        new_json = new.to_json() if new is not None else []
        self.log.info(
            "reshard",
            cause=cause,
            lost=lost,
            epoch=self.epoch,
            old=old.describe() if old else None,
            new=new.describe() if new else None,
        )
        self.publish(
            "reshard", cause=cause, lost=lost, epoch=self.epoch, old_map=old_json, new_map=new_json
        )
        self.kill_steps()
        for rid in list(self.requests):
            self.replay(
                rid,
                event="reshard",
                reason=cause,
                epoch=self.epoch,
                lost=lost,
                cause=cause,
                old_map=old_json,
                new_map=new_json,
            )

    @property
    def ready(self) -> bool:
        if self.layer_map is None:
            return False
        return all(
            (s := self.stages.get(r.name)) is not None and s.loaded_epoch == self.epoch
            for r in self.layer_map.ranges
        )

    def on_map_ready(self) -> None:
        self.log.info("cluster_ready", epoch=self.epoch, map=self.layer_map.describe())
        self.publish("ready", epoch=self.epoch, map=self.layer_map.to_json())
        self.finish_drains()
        now = time.monotonic()
        waiting, self.waiting = self.waiting, collections.deque()
        for step in waiting:
            if not step.dead:
                self.enqueue(step, now)
        for stage in self.stages.values():
            self.dispatch(stage)

    def finish_drains(self) -> None:
        """A draining stage goes once the map no longer needs it."""
        for stage in list(self.stages.values()):
            if (
                stage.state == "draining"
                and (self.layer_map is None or self.layer_map.range_of(stage.name) is None)
                and (self.ready or self.layer_map is None)
            ):
                self.send(stage.ident, P.encode(P.STAGE_TAG, Cmd.BYE, {"reason": "drained"}))
                self.log.info("stage_left", stage=stage.name)
                self.remove_stage(stage)

    # --- timers ------------------------------------------------------------------------------

    def purge_stages(self, now: float) -> None:
        for stage in list(self.stages.values()):
            if now - stage.last_seen > self.config.dead_after_s:
                self.stage_dead(stage, cause="silent")
            elif self.is_stalled(stage, now):
                self.log.warning(
                    "stage_stalled", stage=stage.name, since_s=round(now - stage.progress_at, 3)
                )
                self.publish("stalled", stage=stage.name)
                self.stage_dead(stage, cause="stalled")

    def is_stalled(self, stage: StageRecord, now: float) -> bool:
        live = [s for s in stage.inflight.values() if not s.dead]
        if not live:
            return False
        tokens = sum(s.item["n"] for s in live)
        expected = stage.per_token_s * tokens
        deadline = (
            max(self.config.stall_floor_s, self.config.stall_factor * expected)
            if stage.per_token_s > 0
            else self.config.stall_first_s
        )
        oldest = min(s.sent for s in live)
        return now - max(oldest, stage.progress_at) > deadline

    def expire_waiting(self, now: float) -> None:
        while self.waiting and now - self.waiting[0].enqueued > self.config.ready_wait_s:
            step = self.waiting.popleft()
            if not step.dead:
                self.fail_step(
                    step,
                    Code.NOT_READY,
                    f"cluster not ready after {self.config.ready_wait_s:.0f} s: "
                    f"{self.not_ready_reason}",
                )

    def purge_clients(self, now: float) -> None:
        for request in list(self.requests.values()):
            seen = max(request.last_seen, self.clients_seen.get(request.client, 0.0))
            if now - seen > self.config.client_timeout_s:
                self.log.info("client_vanished", rid=request.rid, silent_s=round(now - seen, 1))
                self.finish_request(request, outcome="abandoned")
        for ident, seen in list(self.clients_seen.items()):
            if now - seen > self.config.client_timeout_s:
                del self.clients_seen[ident]

    def finish_request(self, request: Request, outcome: str) -> None:
        self.requests.pop(request.rid, None)
        self.answering.pop(request.rid, None)
        self.kill_steps(request.rid)
        release = P.encode(P.STAGE_TAG, Cmd.RELEASE, {"rids": [request.rid]})
        for stage in self.stages.values():
            self.send(stage.ident, release)
        now = time.monotonic()
        record = {
            "rid": request.rid,
            "outcome": outcome,
            "steps": request.steps,
            "tokens": request.tokens,
            "replays": request.replays,
            "duration_s": round(now - request.created, 4),
            "ttft_s": round(request.first_result_at - request.created, 4)
            if request.first_result_at
            else None,
            "events": [
                {k: v for k, v in e.items() if k in ("event", "reason", "lost", "epoch")}
                for e in request.events
            ],
            "finished": time.time(),
        }
        self.history.append(record)
        self.metrics.requests.labels(outcome).inc()
        self.log.info(
            "request_finished",
            rid=request.rid,
            outcome=outcome,
            tokens=request.tokens,
            replays=request.replays,
            duration_s=record["duration_s"],
        )

    def update_gauges(self) -> None:
        m = self.metrics
        counts = dict.fromkeys(STAGE_STATES, 0)
        for stage in self.stages.values():
            state = "busy" if stage.state == "ready" and stage.inflight else stage.state
            counts[state] = counts.get(state, 0) + 1
            m.queue_depth.labels(stage.name).set(len(stage.queue))
            m.inflight.labels(stage.name).set(len(stage.inflight))
            for gauge, key in ((m.kv_bytes, "kv_bytes"), (m.rss_bytes, "rss_bytes")):
                if isinstance(stage.stats.get(key), int):
                    gauge.labels(stage.name).set(stage.stats[key])
        for state, n in counts.items():
            m.stages.labels(state).set(n)
        m.active_requests.set(len(self.requests))
        m.ready.set(1 if self.ready else 0)
        m.epoch.set(self.epoch)

    # --- views -------------------------------------------------------------------------------

    def prefill_chunk(self) -> int:
        """The prompt chunk advised to clients: CPU_PREFILL_CHUNK while any stage of the map
        computes on a CPU, where a chunk's compute holds the decode groups waiting behind it;
        ACCELERATOR_PREFILL_CHUNK when every stage has an accelerator, where a forward is
        bound by kernel launches and costs about the same up to a thousand tokens, so small
        chunks only multiply the waits."""
        if self.config.prefill_chunk:
            return self.config.prefill_chunk
        ranges = self.layer_map.ranges if self.layer_map else ()
        devices = [self.stages[r.name].caps.get("device") for r in ranges if r.name in self.stages]
        if devices and all(isinstance(d, str) and d != "cpu" for d in devices):
            return ACCELERATOR_PREFILL_CHUNK
        return CPU_PREFILL_CHUNK

    def status(self, requests: bool = False) -> dict:
        cfg = self.checkpoint.raw_config
        view = {
            "ready": self.ready,
            "reason": None if self.ready else self.not_ready_reason,
            "epoch": self.epoch,
            "map": self.layer_map.to_json() if self.layer_map else [],
            "num_layers": self.num_layers,
            "stages": [self.stage_view(s) for s in self.stages.values()],
            "model": str(Path(self.checkpoint.path).resolve()),
            "fingerprint": self.checkpoint.fingerprint,
            "max_position_embeddings": self.max_positions,
            "eos_token_id": cfg.get("eos_token_id"),
            "vocab_size": cfg.get("vocab_size"),
            "dtype": self.config.dtype,
            "prefill_chunk": self.prefill_chunk(),
            "requests": len(self.requests),
            "counters": self.counters.__dict__,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "pid": os.getpid(),
            "ts": time.time(),
        }
        if requests:
            now = time.monotonic()
            view["active"] = [
                {
                    "rid": r.rid,
                    "tokens": r.tokens,
                    "steps": r.steps,
                    "replays": r.replays,
                    "age_s": round(now - r.created, 3),
                    "tokens_per_s": round(r.tokens / max(1e-6, now - (r.first_result_at or now)), 2)
                    if r.first_result_at
                    else 0.0,
                }
                for r in list(self.requests.values())[:200]
            ]
        return view

    def stage_view(self, stage: StageRecord) -> dict:
        now = time.monotonic()
        recent = [(t, c, n) for t, c, n in stage.step_times if now - t <= 10.0]
        tokens = sum(n for _, _, n in recent)
        times = sorted(c for _, c, _ in recent)
        return {
            "name": stage.name,
            "host": stage.caps.get("host"),
            "pid": stage.caps.get("pid"),
            "device": stage.caps.get("device"),
            "state": "busy" if stage.state == "ready" and stage.inflight else stage.state,
            "start": stage.start,
            "end": stage.end,
            "credits": stage.credits,
            "inflight": len(stage.inflight),
            "queued": len(stage.queue),
            "tokens_per_s": round(tokens / 10.0, 2),
            "p50_s": times[len(times) // 2] if times else None,
            "p99_s": times[min(len(times) - 1, int(len(times) * 0.99))] if times else None,
            "batches": stage.stats.get("batches"),
            "batched_items": stage.stats.get("batched_items"),
            "kv_bytes": stage.stats.get("kv_bytes"),
            "kv_requests": stage.stats.get("kv_requests"),
            "rss_bytes": stage.stats.get("rss_bytes"),
            "memory_bytes": stage.caps.get("memory_bytes"),
            "last_seen_s": round(now - stage.last_seen, 3),
        }


def _decode_turn(queue: collections.deque[Step], window: int) -> bool:
    """Whether the next FORWARD from `queue` is a decode one (else a prefill one).

    A decode step counts only if it may leave now, that is, no earlier step of its request
    is queued (a replay queues a request's prefill and then its decode steps). Only the
    first queued step of each request counts towards `window`, so the chunks of a long
    prompt, queued at once, never hide the decode steps behind them.
    """
    first: Step | None = None
    waiting: set[str] = set()  # requests with a step ahead in the queue
    scanned = 0
    for step in queue:
        if step.dead or step.rid in waiting:
            continue  # a later step of a waiting request (a long prompt's chunks) is free
        scanned += 1
        if scanned > window:
            break
        if first is None:
            if step.decode or step.passed:
                return step.decode
            first = step
        elif step.decode and step.rid not in waiting:
            return True
        waiting.add(step.rid)
    return first is None


def _refusals(refused, items: int) -> dict[int, tuple[str, str]] | None:
    """A RESULT's per-item refusals by item index, or None when the list is malformed."""
    out: dict[int, tuple[str, str]] = {}
    for entry in refused or ():
        if not isinstance(entry, dict):
            return None
        i, code, message = entry.get("i"), entry.get("code"), entry.get("message")
        if not isinstance(i, int) or not 0 <= i < items or i in out:
            return None
        if not isinstance(code, str) or not isinstance(message, str):
            return None
        out[i] = (code, message)
    return out


def _ids(header: dict) -> dict:
    return {k: header[k] for k in ("rid", "seq", "step") if isinstance(header.get(k), str | int)}
