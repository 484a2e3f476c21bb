"""The broker: one ROUTER loop that tracks stages, owns the layer map and routes every step.

It reads like the zguide's Majordomo broker: poll with a timeout equal to the next timer,
dispatch on the command byte to a handler named after the command, then run the timers
(dead and stalled stages, waits that ran out, vanished clients, heartbeats). Tensor frames pass
through as the `zmq.Frame` objects they arrived in; the broker never builds a tensor.

The handlers live beside the loop, one concern to a module: `membership` (stages),
`clients` (steps and requests), `routing` (FORWARDs and their answers, with the policy of
`batching`), `recovery` (lost stages and new maps) and `views` (status and gauges).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import time

import structlog
import zmq
from zmq.utils.monitor import parse_monitor_message

from broker import messages as M
from broker import protocol as P
from broker.auth import FEED_DOMAIN, HANDSHAKE_EVENTS, HANDSHAKE_FAILURES, Gate
from broker.clients import Clients
from broker.layermap import LayerCost, LayerMap
from broker.membership import Membership
from broker.metrics import Metrics
from broker.protocol import Cmd
from broker.records import BrokerConfig, ClientRecord, QueuedStep, Request, StageRecord
from broker.recovery import Recovery
from broker.routing import Routing
from broker.tokenizer import TokenizerFiles, TokenizerSource
from broker.views import Views
from common.checkpoint import CheckpointMeta

log = structlog.get_logger("broker")


class BindError(Exception):
    """An endpoint of the broker cannot be bound; the message names its option."""


def bind(sock: zmq.Socket, endpoint: str, what: str, fix: str) -> None:
    """Bind `sock`, or close it and raise a BindError that names the endpoint and says `fix`."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        held = e.errno == errno.EADDRINUSE
        held = "another process holds that port (another broker?): stop it, or " if held else ""
        raise BindError(
            f"cannot bind {what} {endpoint}: {zmq.strerror(e.errno)}; {held}{fix}"
        ) from e


class Broker(Membership, Clients, Routing, Recovery, Views, TokenizerFiles):
    """The ROUTER loop. `run()` blocks; `stop()` may be called from a signal handler.

    Its handlers and paths live beside it, one concern to a module; the state is all here.
    """

    def __init__(
        self,
        config: BrokerConfig,
        checkpoint: CheckpointMeta,
        context: zmq.Context | None = None,
        metrics: Metrics | None = None,
        tokenizer: TokenizerSource | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer  # the checkpoint's tokenizer files, served to clients
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
        self.gate = Gate(self.context, config.keys) if config.keys is not None else None
        # The key and roles of the message being handled (with keys; empty without).
        self.sender_key = b""
        if self.gate is not None:
            self.gate.secure(self.socket)
        bind(self.socket, config.bind, "the broker (--bind)", "pass --bind with a free port")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.feed: zmq.Socket | None = None
        if config.feed:
            self.feed = self.context.socket(zmq.PUB)
            self.feed.setsockopt(zmq.LINGER, 0)
            self.feed.setsockopt(zmq.SNDHWM, 10_000)
            if self.gate is not None:
                self.gate.secure(self.feed, FEED_DOMAIN)
            try:
                bind(
                    self.feed,
                    config.feed,
                    "the monitor feed (--feed; by default the --bind port + 1)",
                    "pass --feed with a free endpoint, or --feed none to run without a feed",
                )
            except BindError:
                self.socket.close(linger=0)
                if self.gate is not None:
                    self.gate.stop()
                raise
        self.next_feed = 0.0

        self.costs: dict[str, LayerCost] = {}
        self.cost = self.cost_of(config.dtype)

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
        self.clients: dict[bytes, ClientRecord] = {}  # by owner
        self.client_fds: dict[int, bytes] = {}  # a client socket's identity by its connection
        # Owner by request id, of new requests refused (clients.REFUSED_RIDS).
        self.refused: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        # Connection events of the ROUTER, opened by run(): a client's closed connections.
        self.monitor: zmq.Socket | None = None
        self.waiting: collections.deque[QueuedStep] = collections.deque()
        self.next_step_id = 1
        self.next_fid = 1  # the id of the next FORWARD
        self.lanes = 1  # stages of the map that can compute at the same time
        # Stages to dispatch once a burst of messages is read: steps that arrive together
        # leave together, as one FORWARD.
        self.dirty: dict[str, StageRecord] = {}
        self.unreachable: list[bytes] = []  # identities a send found gone (bury_unreachable)
        self.in_burst = False
        # Requests that were just sent a token, by when: their next step is expected.
        self.answering: dict[str, float] = {}
        self.linger_until: float | None = None
        self.history: collections.deque[M.Job] = collections.deque(maxlen=config.history)
        self.events: collections.deque[M.ClusterEvent] = collections.deque(maxlen=1000)
        self.started = time.monotonic()
        self.next_heartbeat = 0.0
        self._running = True
        self.handlers = {
            Cmd.READY: self.on_ready,
            Cmd.LOADED: self.on_loaded,
            Cmd.RESULT: self.on_result,
            Cmd.ERROR: self.on_error,
            Cmd.HEARTBEAT: self.on_heartbeat,
            Cmd.LEAVING: self.on_leaving,
            Cmd.STEP: self.on_step,
            Cmd.STEPS: self.on_steps,
            Cmd.END: self.on_end,
            Cmd.PING: self.on_ping,
            Cmd.STATUS: self.on_status,
            Cmd.JOBS: self.on_jobs,
            Cmd.DRAIN: self.on_drain,
            Cmd.TOKENIZER: self.on_tokenizer,
        }

    def cost_of(self, weights: str) -> LayerCost:
        """Bytes per layer, and of the embeddings and the head, for a stage that holds its
        weights as `weights` (common/weights.py), in the cluster's compute dtype."""
        if weights not in self.costs:
            wb = self.checkpoint.weight_bytes(P.DTYPE_SIZES[self.config.dtype], weights)
            self.costs[weights] = LayerCost(
                layer_bytes=wb["layer"], first_extra_bytes=wb["first"], last_extra_bytes=wb["last"]
            )
        return self.costs[weights]

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        self.log.info(
            "broker_started",
            bind=self.endpoint,
            model=str(self.checkpoint.path),
            layers=self.num_layers,
            fingerprint=self.checkpoint.fingerprint,
        )
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | HANDSHAKE_EVENTS)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        try:
            while self._running:
                timeout = max(0.0, self.next_timer() - time.monotonic())
                if poller.poll(timeout * 1000):
                    self.read_monitor()
                    self.read_burst()
                self.run_timers()
                self.bury_unreachable()
        finally:
            if self.tokenizer is not None:
                self.tokenizer.close()
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.socket.close(linger=0)
            if self.feed is not None:
                self.feed.close(linger=0)
            if self.gate is not None:
                self.gate.stop()
            self.log.info("broker_stopped")

    def stop(self) -> None:
        self._running = False

    @property
    def log(self):
        return log.bind(epoch=self.epoch)

    def read_burst(self, budget: int = 256) -> None:
        """Handle the messages waiting on the socket (up to `budget`), then dispatch once."""
        self.in_burst = True
        try:
            for _ in range(budget):
                try:
                    frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.handle(frames)
                self.bury_unreachable()
        finally:
            self.in_burst = False
            dirty, self.dirty = self.dirty, {}
            for stage in dirty.values():
                self.dispatch(stage)
            self.bury_unreachable()

    def handle(self, frames: list) -> None:
        ident = frames[0].bytes
        try:
            msg = P.decode(frames[1:], self.config.limits, inbound=True)
        except P.ProtocolError as e:
            self.log.warning("malformed_message", code=str(e.code), reason=e.message)
            # Answered in the sender's role where its tag says which; a stranger as a client.
            self.refuse(ident, e.tag or P.CLIENT_TAG, e)
            return
        if self.gate is not None:
            try:
                self.sender_key = self.gate.check(frames[1], msg)
            except P.ProtocolError as e:
                self.metrics.role_refusals.labels(msg.cmd.name).inc()
                self.log.warning("message_refused", cmd=msg.cmd.name, reason=e.message)
                self.send(ident, P.encode(msg.tag, P.error(e.code, e.message, msg.body)))
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
                self.send(ident, P.encode(P.STAGE_TAG, M.Bye(reason="unknown")))
                return
        elif msg.role == "client":
            self.client_heard(ident, frames[1], time.monotonic())
        try:
            self.handlers[msg.cmd](ident, msg)
        except P.ProtocolError as e:
            self.refuse(ident, msg.tag, e, about=msg.body)

    def read_monitor(self) -> None:
        """Handle the connection events waiting on the ROUTER's monitor: closed connections."""
        if self.monitor is None:
            return
        now = time.monotonic()
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.connection_closed(int(event["value"]), now)
            elif event["event"] in HANDSHAKE_FAILURES:
                # The peer's key is not allowed, or it holds a wrong broker key: it learns
                # nothing but a closed connection, so the broker says it here (no key logged).
                reason = HANDSHAKE_FAILURES[event["event"]]
                self.metrics.handshake_refusals.labels(reason).inc()
                self.log.warning(
                    "handshake_refused", reason=reason, endpoint=event["endpoint"].decode()
                )

    def refuse(
        self, ident: bytes, tag: bytes, e: P.ProtocolError, about: M.Body | None = None
    ) -> None:
        """Answer a message (or one item of a bundle) that breaks the protocol with an ERROR
        that names it (its ids as far as they could be read, or those of `about`)."""
        self.metrics.malformed.inc()
        self.send(ident, P.encode(tag, P.error(e.code, e.message, about, **e.ids)))

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
        if self.tokenizer is not None:
            self.tokenizer.poll(now)
        if now >= self.next_feed and self.feed is not None:
            self.send_feed(self.status(active=True))
            self.next_feed = now + self.config.feed_interval_s
        if now < self.next_heartbeat and (self.rebalance_at is None or now < self.rebalance_at):
            return
        if self.gate is not None and self.gate.refresh():
            self.log.info("keys_loaded", **self.gate.keys.ring.counts())
        self.purge_stages(now)
        self.form_map_if_due(now)
        self.expire_waiting(now)
        self.purge_clients(now)
        self.expire_unread(now)
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
            self.metrics.send_failures.inc()
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
        frames = P.encode(P.STAGE_TAG, M.BrokerHeartbeat(epoch=self.epoch))
        for stage in list(self.stages.values()):
            self.send(stage.ident, frames)

    def publish(self, kind: str, **fields) -> None:
        """A cluster event: kept for STATUS and sent on the feed."""
        event = M.ClusterEvent(ts=time.time(), kind=kind, epoch=self.epoch, **fields)
        self.events.append(event)
        self.send_feed(event)

    def send_feed(self, body: M.Body, tensors: list = ()) -> None:
        if self.feed is None:
            return
        # A slow monitor loses feed messages; it never slows the broker.
        with contextlib.suppress(zmq.Again):
            self.feed.send_multipart(P.encode_feed(body, tensors), flags=zmq.NOBLOCK)
