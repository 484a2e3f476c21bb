"""The I/O thread of a stage: its one DEALER socket to the broker, a session at a time.

It registers, heartbeats, notices a lost broker and reconnects on a fresh socket, and turns
broker messages into jobs for the compute thread (`stage.compute`). Replies come back from
that thread over an inproc PAIR socket, polled here beside the broker's, and go on to the
broker; replies of a connection that has since been voided are dropped.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket as pysocket
import time
from dataclasses import dataclass

import psutil
import structlog
import zmq
from zmq.utils.monitor import parse_monitor_message

from broker import messages as M
from broker import protocol as P
from broker.messages import Cmd, Code
from broker.protocol import Message
from common.keys import HANDSHAKE_FAILED, handshake_refusal
from stage.checkpoint import Checkpoint
from stage.compute import Compute, ForwardJob, LoadJob, ReleaseJob
from stage.config import EXIT_OK, EXIT_REFUSED, StageConfig

# Reconnect backoff after losing the broker: fast for a blip, capped so a stage waiting for a
# restarted broker wakes only every few seconds; the jitter spreads a fleet's reconnects.
BACKOFF_START_S = 0.1
BACKOFF_FACTOR = 2.0
BACKOFF_CAP_S = 5.0
BACKOFF_JITTER = 0.5

# The cluster runs another checkpoint or dtype: this stage can never serve it, whenever the
# broker says so.
MISMATCH_CODES = frozenset({Code.FINGERPRINT, Code.DTYPE_MISMATCH})
# An ERROR in reply to READY with one of these codes will not go away by asking again.
FATAL_REGISTRATION_CODES = MISMATCH_CODES | frozenset(
    {
        Code.BAD_VERSION,
        Code.UNAUTHORIZED,
        Code.MALFORMED,
        Code.UNKNOWN_COMMAND,
        Code.HEADER_TOO_LARGE,
        Code.NAME_IN_USE,
    }
)


@dataclass
class _Session:
    """One socket incarnation: a fresh identity, registered or not."""

    sock: zmq.Socket
    identity: bytes
    last_rx: float
    monitor: zmq.Socket | None = None  # refused CURVE handshakes
    registered: bool = False
    leaving_sent: bool = False
    retry: bool = False  # registration refused for now: reconnect after a backoff


class Link:
    """The stage's side of the broker connection; everything here runs on the I/O thread."""

    def __init__(
        self,
        config: StageConfig,
        checkpoint: Checkpoint,
        ctx: zmq.Context,
        compute: Compute,
        log: structlog.typing.FilteringBoundLogger,
    ):
        self.config = config
        self.checkpoint = checkpoint
        self.log = log
        self.exit_code: int | None = None
        self.exit_reason = ""
        self._ctx = ctx
        self._compute = compute
        self._leave_requested = False
        self._process = psutil.Process()

    # --- control, callable from any thread or a signal handler ------------------------------

    def stop(self, code: int = EXIT_OK, reason: str = "stopped") -> None:
        """Exit as soon as the I/O loop next wakes (within one heartbeat interval)."""
        if self.exit_code is None:
            self.exit_code = code
            self.exit_reason = reason

    def leave(self) -> None:
        """Drain: tell the broker we are leaving, serve until it says BYE drained."""
        self._leave_requested = True

    @property
    def leaving(self) -> bool:
        return self._leave_requested

    # --- sessions, one socket incarnation after another -------------------------------------

    def run(self, results: zmq.Socket) -> None:
        """Serve the broker, reconnecting after a backoff, until told to exit."""
        backoff = BACKOFF_START_S
        leave_deadline: float | None = None
        while self.exit_code is None:
            session = self._connect()
            registered, leave_deadline = self._serve(session, results, leave_deadline)
            if session.monitor is not None:
                session.sock.disable_monitor()
                session.monitor.close(linger=0)
            session.sock.close(linger=0)
            if self.exit_code is not None:
                break
            self._compute.void()
            if registered:
                backoff = BACKOFF_START_S
            delay = backoff * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)
            backoff = min(backoff * BACKOFF_FACTOR, BACKOFF_CAP_S)
            if not self._leave_requested:
                self.log.info("reconnecting", after_s=round(delay, 3), broker=self.config.broker)
                self._wait(results, delay)
            if self._leave_requested:
                # Nobody to drain to: the broker counts us dead and moves our layers.
                self.stop(EXIT_OK, "broker lost while leaving")

    def _connect(self) -> _Session:
        sock = self._ctx.socket(zmq.DEALER)
        identity = os.urandom(8)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        monitor = None
        if self.config.keys is not None:
            self.config.keys.apply(sock)
            # A refused handshake shows only here: the broker never answers a stranger.
            monitor = sock.get_monitor_socket(HANDSHAKE_FAILED)
        sock.connect(self.config.broker)
        session = _Session(sock=sock, identity=identity, last_rx=time.monotonic(), monitor=monitor)
        self._send_ready(session)
        return session

    def _serve(
        self, session: _Session, results: zmq.Socket, leave_deadline: float | None
    ) -> tuple[bool, float | None]:
        """Poll one socket incarnation until the broker is lost or we exit."""
        cfg = self.config
        poller = zmq.Poller()
        poller.register(session.sock, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        if session.monitor is not None:
            poller.register(session.monitor, zmq.POLLIN)
        next_heartbeat = time.monotonic()
        ever_registered = False
        while self.exit_code is None:
            now = time.monotonic()
            if self._leave_requested and not session.leaving_sent:
                self._send(session, M.Leaving())
                session.leaving_sent = True
                if leave_deadline is None:
                    leave_deadline = now + cfg.drain_timeout
                    self.log.info("leaving", drain_timeout_s=cfg.drain_timeout)
            if leave_deadline is not None and now >= leave_deadline:
                self.stop(EXIT_OK, "drain timeout")
                break
            if session.retry:
                break
            if now - session.last_rx >= cfg.dead_after:
                # This thread may have been the silent one (a busy machine, a compute thread
                # holding the GIL): read what the broker sent meanwhile before judging it.
                self._receive(session)
                ever_registered = ever_registered or session.registered
                if now - session.last_rx >= cfg.dead_after and self.exit_code is None:
                    self.log.warning("broker lost", silent_s=round(now - session.last_rx, 3))
                    break
                now = time.monotonic()
            if now >= next_heartbeat:
                self._send(session, self._heartbeat())
                next_heartbeat = now + cfg.heartbeat
            wake = min(next_heartbeat, session.last_rx + cfg.dead_after)
            if leave_deadline is not None:
                wake = min(wake, leave_deadline)
            events = dict(poller.poll(max(0.0, wake - time.monotonic()) * 1000))
            if session.monitor in events:
                event = parse_monitor_message(session.monitor.recv_multipart())
                reason = handshake_refusal(
                    cfg.broker, event["event"], event["value"], cfg.keys, role="stage"
                )
                if reason is not None:
                    self.log.error("refused by broker", error=reason)
                    self.stop(EXIT_REFUSED, f"refused by broker: {reason}")
                    break
            if results in events:
                self._forward_results(results, session)
            if session.sock in events:
                self._receive(session)
                ever_registered = ever_registered or session.registered
        return ever_registered, leave_deadline

    def _wait(self, results: zmq.Socket, seconds: float) -> None:
        """Sleep without a socket to the broker, still draining (and dropping) results."""
        deadline = time.monotonic() + seconds
        poller = zmq.Poller()
        poller.register(results, zmq.POLLIN)
        while self.exit_code is None and not self._leave_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # Wake at least every heartbeat so a stop or a signal is seen promptly.
            if poller.poll(min(left, self.config.heartbeat) * 1000):
                self._forward_results(results, None)

    # --- what the broker sends --------------------------------------------------------------

    def _receive(self, session: _Session) -> None:
        """Handle everything the broker has sent, without blocking."""
        sock = session.sock
        # EVENTS instead of a NOBLOCK recv that ends in zmq.Again: no exception per wake-up.
        while self.exit_code is None and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = sock.recv_multipart(copy=False)
            received = time.perf_counter()
            session.last_rx = time.monotonic()
            try:
                msg = P.decode(frames, expect=P.STAGE_TAG)
            except P.ProtocolError as e:
                self.log.warning("bad message from broker", code=str(e.code), error=e.message)
                continue
            handler = self._handlers.get(msg.cmd)
            if handler is None:
                self.log.warning("unexpected command from broker", command=msg.cmd.name)
                continue
            handler(self, session, msg, received)

    def _registered(self, session: _Session) -> None:
        if not session.registered:
            session.registered = True
            self.log.info("registered", identity=session.identity.hex())

    def on_forward(self, session: _Session, msg: Message, received: float) -> None:
        self._registered(session)
        job = ForwardJob(msg, self._compute.generation, received)
        if not self._run_inline(session, job):
            self._compute.submit(job)

    def _run_inline(self, session: _Session, job: ForwardJob) -> bool:
        """Run a FORWARD of single positions on the I/O thread when the compute thread is idle.

        Handing a step to the compute thread and its result back costs two thread wake-ups
        per stage visit, a large share of a small model's time per token; one position per
        item is short enough not to hold up heartbeats. Items of several positions, anything
        queued, and steps that arrive while others wait on the socket (a batch in the making)
        still go through the compute thread, in order.
        """
        if not self._compute.can_run_inline(job):
            return False
        if session.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return False  # more steps are waiting: let the compute thread batch them
        return self._compute.run_inline(job, lambda frames: _send_frames(session.sock, frames))

    def on_assign(self, session: _Session, msg: Message, received: float) -> None:
        self._registered(session)
        assign: M.Assign = msg.body
        problem = self._assign_problem(assign)
        if problem is not None:
            self._send(session, P.error(Code.BAD_REQUEST, problem, about=assign))
            return
        epoch, start, end, dtype = assign.epoch, assign.start, assign.end, assign.dtype
        self.log.info("assigned", epoch=epoch, start=start, end=end, dtype=dtype)
        self._compute.submit(LoadJob(epoch, start, end, dtype, self._compute.generation))

    def _assign_problem(self, assign: M.Assign) -> str | None:
        """Why this stage cannot load what ASSIGN asks for, or None."""
        num_layers = self.checkpoint.num_layers
        start, end = assign.start, assign.end
        if assign.num_layers != num_layers:
            return f"ASSIGN is for {assign.num_layers} layers but the checkpoint has {num_layers}"
        if not (start == end == 0 or start < end <= num_layers):
            return f"layer range [{start},{end}) is not within [0,{num_layers})"
        return None  # the dtype is one a stage computes in: the wire format checked it

    def on_release(self, session: _Session, msg: Message, received: float) -> None:
        self._registered(session)
        self._compute.submit(ReleaseJob(list(msg.body.rids)))

    def on_heartbeat(self, session: _Session, msg: Message, received: float) -> None:
        self._registered(session)

    def on_bye(self, session: _Session, msg: Message, received: float) -> None:
        reason = msg.body.reason
        if reason == "drained":
            self.stop(EXIT_OK, "drained")
            return
        if session.retry:
            # Our READY was refused for now (it answers the heartbeats that followed): the
            # retry goes on a new socket, not on this one, which is about to close.
            return
        # "unknown": the broker forgot us (it restarted, or counted us dead). What we held
        # for it is void; register again on this socket.
        self.log.info("re-registering", reason=reason)
        self._compute.void()
        session.registered = False
        self._send_ready(session)
        session.leaving_sent = False

    def on_error(self, session: _Session, msg: Message, received: float) -> None:
        err: M.Error = msg.body
        # An ERROR that names no FORWARD, before we are registered, answers our READY.
        refuses_ready = not session.registered and err.fid is None
        if err.code in MISMATCH_CODES or (refuses_ready and err.code in FATAL_REGISTRATION_CODES):
            self.log.error("refused by broker", code=str(err.code), error=err.message)
            self.stop(EXIT_REFUSED, f"refused by broker: {err.message}")
        elif refuses_ready:
            # Retryable (busy, a name still held by our previous identity, ...): give the
            # broker time, then register again on a fresh socket.
            self.log.warning(
                "registration refused; will retry", code=str(err.code), error=err.message
            )
            session.retry = True
        else:
            self.log.warning("error from broker", code=str(err.code), error=err.message)

    _handlers = {
        Cmd.FORWARD: on_forward,
        Cmd.ASSIGN: on_assign,
        Cmd.RELEASE: on_release,
        Cmd.HEARTBEAT: on_heartbeat,
        Cmd.BYE: on_bye,
        Cmd.ERROR: on_error,
    }

    # --- what the stage sends ---------------------------------------------------------------

    def _forward_results(self, results: zmq.Socket, session: _Session | None) -> None:
        """Pass every finished reply on to the broker; drop those of a voided connection."""
        while results.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            parts = results.recv_multipart(copy=False)
            if (
                session is None
                or int.from_bytes(parts[0].buffer, "little") != self._compute.generation
            ):
                continue
            if not _send_frames(session.sock, parts[1:]):
                self.log.warning("broker not reading; reply dropped")

    def _send(self, session: _Session, body: M.Body) -> None:
        # Never block the I/O loop: a broker that does not read will be declared lost.
        with contextlib.suppress(zmq.Again):
            session.sock.send_multipart(P.encode(P.STAGE_TAG, body), flags=zmq.NOBLOCK)

    def _send_ready(self, session: _Session) -> None:
        cfg = self.config
        held = self._compute.held
        caps = M.Caps(
            device=cfg.device,
            dtype=cfg.dtype,
            weights=cfg.weights or cfg.dtype,
            memory_bytes=cfg.memory_bytes,
            runtime_bytes=cfg.runtime_bytes,
            runtime_file_bytes=cfg.runtime_file_bytes,
            runtime_peak_bytes=cfg.runtime_peak_bytes,
            cores=_cores(),
            threads=cfg.threads,
            max_batch=cfg.max_batch,
            host=pysocket.gethostname(),
            pid=os.getpid(),
        )
        ready = M.Ready(
            name=cfg.name,
            fingerprint=self.checkpoint.fingerprint,
            caps=caps,
            credits=cfg.credits,
            held=held,
        )
        self._send(session, ready)
        self.log.info("registering", broker=cfg.broker, identity=session.identity.hex(), held=held)

    def _heartbeat(self) -> M.StageHeartbeat:
        compute = self._compute
        stats, store = compute.stats, compute.store
        running = stats.running
        queued = compute.queued
        if running == "load":
            state = M.StageState.LOADING
        elif running is not None or queued:
            state = M.StageState.BUSY
        else:
            state = M.StageState.IDLE
        return M.StageHeartbeat(
            state=state,
            epoch=compute.epoch,
            progress=stats.progress,
            busy_s=round(time.monotonic() - stats.running_since, 6) if running else 0.0,
            queued=queued,
            kv_bytes=store.total_bytes(),
            kv_requests=len(store),
            kv_evictions=store.evictions,
            rss_bytes=self._process.memory_info().rss,
            tokens=stats.tokens,
            batches=stats.batches,
            batched_items=stats.batched_items,
        )


def _send_frames(sock: zmq.Socket, frames: list) -> bool:
    """Send without blocking; zero-copy only where it pays (large tensor frames)."""
    copy = (
        sum(len(f) if not isinstance(f, memoryview) else f.nbytes for f in frames)
        < zmq.COPY_THRESHOLD
    )
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
    except zmq.Again:
        return False
    return True


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
