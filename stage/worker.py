"""The stage worker: one DEALER to the broker, an I/O thread and a compute thread.

The I/O thread (the one that calls `StageWorker.run`) is the only user of the DEALER socket.
It registers, heartbeats, notices a lost broker and reconnects, and turns broker messages
into jobs on one FIFO queue. The compute thread takes jobs off that queue (loads, forwards,
releases), and hands the reply frames back over an inproc PAIR socket so the I/O thread wakes
at once. Torch releases the GIL inside its ops, so heartbeats keep flowing during a long
forward or a load.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import queue
import random
import socket as pysocket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog
import torch
import zmq

from broker.protocol import (
    STAGE_TAG,
    Cmd,
    Code,
    Message,
    ProtocolError,
    decode,
    encode,
    error_header,
    prefix_hash,
)
from stage.checkpoint import Checkpoint, open_checkpoint
from stage.devices import resolve_dtype
from stage.kvcache import KVStore
from stage.loading import load_shard
from stage.shard import ContextOverflow, KVState, Shard, ShardError

# Defaults, as in docs/protocol.md ("Limits and timeouts").
# Credits bound the steps a stage holds; batching needs several of them queued at once, and
# 32 covers 16 streams with room for replays while keeping a bounded queue.
DEFAULT_CREDITS = 32
# Decode steps of different requests run as one batch up to this size; 1 turns batching off
# (batch-invariant results, bit-exact with the monolithic forward under any load).
DEFAULT_MAX_BATCH = 32
DEFAULT_KV_MB = 1024
DEFAULT_HEARTBEAT_S = 0.25
DEFAULT_DEAD_AFTER_S = 1.0
# Long enough for the broker to move this stage's layers and replay the requests it held.
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# Reconnect backoff after losing the broker: fast for a blip, capped so a stage waiting for a
# restarted broker wakes only every few seconds; the jitter spreads a fleet's reconnects.
BACKOFF_START_S = 0.1
BACKOFF_FACTOR = 2.0
BACKOFF_CAP_S = 5.0
BACKOFF_JITTER = 0.5

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3

# An ERROR in reply to READY with one of these codes will not go away by asking again.
FATAL_REGISTRATION_CODES = frozenset(
    {
        Code.FINGERPRINT,
        Code.BAD_VERSION,
        Code.UNAUTHORIZED,
        Code.MALFORMED,
        Code.UNKNOWN_COMMAND,
        Code.HEADER_TOO_LARGE,
    }
)


@dataclass(frozen=True)
class StageConfig:
    """What `python -m stage` was asked to do."""

    broker: str
    model: Path
    name: str
    memory_bytes: int
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    credits: int = DEFAULT_CREDITS
    max_batch: int = DEFAULT_MAX_BATCH
    kv_bytes: int = DEFAULT_KV_MB * 1024 * 1024
    heartbeat: float = DEFAULT_HEARTBEAT_S
    dead_after: float = DEFAULT_DEAD_AFTER_S
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S
    # Decode groups of a float32 CPU shard take stage.kernels' row kernel on one thread.
    row_kernel: bool = True


# --- jobs for the compute thread (one FIFO queue) -------------------------------------------


@dataclass
class ForwardJob:
    msg: Message
    generation: int
    received: float


@dataclass
class LoadJob:
    epoch: int
    start: int
    end: int
    dtype: str
    generation: int


@dataclass
class ReleaseJob:
    rids: list[str]


@dataclass
class ResetJob:
    """The broker is gone or forgot us: every cache and the epoch are void."""


class Refusal(Exception):
    """A FORWARD item that must not be computed; becomes one ERROR for the step."""

    def __init__(self, code: Code, message: str, rid: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.rid = rid


@dataclass
class _Stats:
    """Counters the compute thread writes and the I/O thread reads for heartbeats."""

    progress: int = 0
    tokens: int = 0
    batches: int = 0  # batched forwards of more than one request
    batched_items: int = 0
    running: str | None = None  # "forward" or "load"
    running_since: float = 0.0


@dataclass
class _Session:
    """One socket incarnation: a fresh identity, registered or not."""

    sock: zmq.Socket
    identity: bytes
    last_rx: float
    registered: bool = False
    leaving_sent: bool = False
    retry: bool = False  # registration refused for now: reconnect after a backoff


class StageWorker:
    """A stage: registers with the broker, loads the layers it is assigned, runs forwards."""

    def __init__(self, config: StageConfig, checkpoint: Checkpoint | None = None):
        self.config = config
        self.checkpoint = checkpoint or open_checkpoint(config.model)
        self.device = torch.device(config.device)
        self.log = structlog.get_logger("stage").bind(stage=config.name)
        self.exit_code: int | None = None
        self._exit_reason = ""

        self._ctx = zmq.Context()
        self._results_addr = f"inproc://stage-results-{id(self):x}"
        self._jobs: queue.Queue = queue.Queue()
        # Held by whichever thread runs a job: the compute thread, or the I/O thread taking
        # the inline fast path (below) while the compute thread has nothing to do.
        self._compute_lock = threading.Lock()
        self._stats = _Stats()
        self._store = KVStore(config.kv_bytes)
        # Owned by the compute thread; the I/O thread reads `_shard` only for READY's `held`.
        self._shard: Shard | None = None
        self._epoch: int | None = None
        # Bumped by the I/O thread when a connection's work becomes void; jobs and results
        # carry the generation they belong to, and stale ones are dropped unseen.
        self._generation = 0
        # Compute thread only: jobs taken off the queue but not run yet, in arrival order
        # (see _gather_round and _overtake), and the requests of the rounds now computing,
        # whose caches an eviction must not take.
        self._pending: collections.deque = collections.deque()
        self._busy: frozenset[str] = frozenset()
        self._closing = False
        self._leave_requested = False
        self._process = psutil.Process()
        self._compute: threading.Thread | None = None

    # --- control, callable from any thread or a signal handler ------------------------------

    def stop(self, code: int = EXIT_OK, reason: str = "stopped") -> None:
        """Exit as soon as the I/O loop next wakes (within one heartbeat interval)."""
        if self.exit_code is None:
            self.exit_code = code
            self._exit_reason = reason

    def leave(self) -> None:
        """Drain: tell the broker we are leaving, serve until it says BYE drained."""
        self._leave_requested = True

    @property
    def leaving(self) -> bool:
        return self._leave_requested

    @property
    def compute_alive(self) -> bool:
        return self._compute is not None and self._compute.is_alive()

    # --- the I/O thread ---------------------------------------------------------------------

    def run(self) -> int:
        """Serve until told to exit; return the process exit code."""
        results = self._ctx.socket(zmq.PAIR)
        results.setsockopt(zmq.LINGER, 0)
        results.bind(self._results_addr)
        self._compute = threading.Thread(target=self._compute_loop, name="compute", daemon=True)
        self._compute.start()
        backoff = BACKOFF_START_S
        leave_deadline: float | None = None
        try:
            while self.exit_code is None:
                session = self._connect()
                registered, leave_deadline = self._serve(session, results, leave_deadline)
                session.sock.close(linger=0)
                if self.exit_code is not None:
                    break
                self._void_connection()
                if registered:
                    backoff = BACKOFF_START_S
                delay = backoff * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)
                backoff = min(backoff * BACKOFF_FACTOR, BACKOFF_CAP_S)
                if not self._leave_requested:
                    self.log.info(
                        "reconnecting", after_s=round(delay, 3), broker=self.config.broker
                    )
                    self._wait(results, delay)
                if self._leave_requested:
                    # Nobody to drain to: the broker counts us dead and moves our layers.
                    self.stop(EXIT_OK, "broker lost while leaving")
        finally:
            self._shutdown(results)
        self.log.info("exit", code=self.exit_code, reason=self._exit_reason)
        return self.exit_code

    def _connect(self) -> _Session:
        sock = self._ctx.socket(zmq.DEALER)
        identity = os.urandom(8)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.config.broker)
        session = _Session(sock=sock, identity=identity, last_rx=time.monotonic())
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
        next_heartbeat = time.monotonic()
        ever_registered = False
        while self.exit_code is None:
            now = time.monotonic()
            if self._leave_requested and not session.leaving_sent:
                self._send(session, Cmd.LEAVING, {})
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
                self.log.warning("broker lost", silent_s=round(now - session.last_rx, 3))
                break
            if now >= next_heartbeat:
                self._send(session, Cmd.HEARTBEAT, self._heartbeat())
                next_heartbeat = now + cfg.heartbeat
            wake = min(next_heartbeat, session.last_rx + cfg.dead_after)
            if leave_deadline is not None:
                wake = min(wake, leave_deadline)
            events = dict(poller.poll(max(0.0, wake - time.monotonic()) * 1000))
            if results in events:
                self._forward_results(results, session)
            if session.sock in events:
                self._receive(session)
                ever_registered = ever_registered or session.registered
        return ever_registered, leave_deadline

    def _receive(self, session: _Session) -> None:
        """Handle everything the broker has sent, without blocking."""
        sock = session.sock
        # EVENTS instead of a NOBLOCK recv that ends in zmq.Again: no exception per wake-up.
        while self.exit_code is None and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = sock.recv_multipart(copy=False)
            received = time.perf_counter()
            session.last_rx = time.monotonic()
            try:
                msg = decode(frames, expect=STAGE_TAG)
            except ProtocolError as e:
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
        job = ForwardJob(msg, self._generation, received)
        if not self._run_inline(session, job):
            self._jobs.put(job)

    def _run_inline(self, session: _Session, job: ForwardJob) -> bool:
        """Run a FORWARD of decode steps on the I/O thread when the compute thread is idle.

        Handing a step to the compute thread and its result back costs two thread wake-ups
        per stage visit, measured at several hundred microseconds on a busy 2-core machine:
        a large share of a small model's time per token. A decode step takes milliseconds, so
        heartbeats are barely delayed; prefills, anything queued, and steps that arrive while
        others wait on the socket (a batch in the making) still go through the compute
        thread, in order.
        """
        items = job.msg.header["items"]
        if any(item["n"] != 1 for item in items) or self._jobs.unfinished_tasks:
            return False
        if session.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return False  # more steps are waiting: let the compute thread batch them

        if not self._compute_lock.acquire(blocking=False):
            return False
        try:
            stats = self._stats
            stats.running, stats.running_since = "forward", time.monotonic()
            try:
                self._answer_round([job], lambda frames: _send_frames(session.sock, frames))
            finally:
                stats.running = None
        finally:
            self._compute_lock.release()
        return True

    def on_assign(self, session: _Session, msg: Message, received: float) -> None:
        self._registered(session)
        h = msg.header
        epoch, start, end = h["epoch"], h.get("start"), h.get("end")
        num_layers = self.checkpoint.num_layers
        dtype = h.get("dtype") or self.config.dtype
        problem = None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
            problem = "ASSIGN needs integer start and end"
        elif h.get("num_layers", num_layers) != num_layers:
            problem = (
                f"ASSIGN is for {h.get('num_layers')} layers but the checkpoint has {num_layers}"
            )
        elif not (start == end == 0 or 0 <= start < end <= num_layers):
            problem = f"layer range [{start},{end}) is not within [0,{num_layers})"
        else:
            try:
                resolve_dtype(dtype)
            except ShardError as e:
                problem = str(e)
        if problem is not None:
            self._send(session, Cmd.ERROR, error_header(Code.BAD_REQUEST, problem, epoch=epoch))
            return
        self.log.info("assigned", epoch=epoch, start=start, end=end, dtype=dtype)
        self._jobs.put(LoadJob(epoch, start, end, dtype, self._generation))

    def on_release(self, session: _Session, msg: Message, received: float) -> None:
        self._registered(session)
        self._jobs.put(ReleaseJob([r for r in msg.header["rids"] if isinstance(r, str)]))

    def on_heartbeat(self, session: _Session, msg: Message, received: float) -> None:
        self._registered(session)

    def on_bye(self, session: _Session, msg: Message, received: float) -> None:
        reason = msg.header.get("reason")
        if reason == "drained":
            self.stop(EXIT_OK, "drained")
            return
        # "unknown": the broker forgot us (it restarted, or counted us dead). What we held
        # for it is void; register again on this socket.
        self.log.info("re-registering", reason=reason)
        self._void_connection()
        session.registered = False
        self._send_ready(session)
        session.leaving_sent = False

    def on_error(self, session: _Session, msg: Message, received: float) -> None:
        h = msg.header
        code, message = h["code"], h["message"]
        if code == Code.FINGERPRINT or (
            not session.registered and "step" not in h and code in FATAL_REGISTRATION_CODES
        ):
            self.log.error("refused by broker", code=code, error=message)
            self.stop(EXIT_REFUSED, f"refused by broker: {message}")
        elif not session.registered and "step" not in h:
            # Retryable (busy, a name still held by our previous identity, ...): give the
            # broker time, then register again on a fresh socket.
            self.log.warning("registration refused; will retry", code=code, error=message)
            session.retry = True
        else:
            self.log.warning("error from broker", code=code, error=message)

    _handlers = {
        Cmd.FORWARD: on_forward,
        Cmd.ASSIGN: on_assign,
        Cmd.RELEASE: on_release,
        Cmd.HEARTBEAT: on_heartbeat,
        Cmd.BYE: on_bye,
        Cmd.ERROR: on_error,
    }

    def _forward_results(self, results: zmq.Socket, session: _Session | None) -> None:
        """Pass every finished reply on to the broker; drop those of a voided connection."""
        while results.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            parts = results.recv_multipart(copy=False)
            if session is None or int.from_bytes(parts[0].buffer, "little") != self._generation:
                continue
            if not _send_frames(session.sock, parts[1:]):
                self.log.warning("broker not reading; reply dropped")

    def _send(self, session: _Session, cmd: Cmd, header: dict[str, Any]) -> None:
        # Never block the I/O loop: a broker that does not read will be declared lost.
        with contextlib.suppress(zmq.Again):
            session.sock.send_multipart(encode(STAGE_TAG, cmd, header), flags=zmq.NOBLOCK)

    def _send_ready(self, session: _Session) -> None:
        cfg = self.config
        shard = self._shard
        held = [shard.start, shard.end] if shard is not None else None
        caps = {
            "device": cfg.device,
            "dtype": cfg.dtype,
            "memory_bytes": cfg.memory_bytes,
            "cores": _cores(),
            "threads": cfg.threads,
            "max_batch": cfg.max_batch,
            "host": pysocket.gethostname(),
            "pid": os.getpid(),
        }
        header = {
            "name": cfg.name,
            "fingerprint": self.checkpoint.fingerprint,
            "caps": caps,
            "credits": cfg.credits,
            "held": held,
        }
        self._send(session, Cmd.READY, header)
        self.log.info("registering", broker=cfg.broker, identity=session.identity.hex(), held=held)

    def _heartbeat(self) -> dict[str, Any]:
        stats = self._stats
        running = stats.running
        queued = self._jobs.qsize()
        if running == "load":
            state = "loading"
        elif running is not None or queued:
            state = "busy"
        else:
            state = "idle"
        return {
            "state": state,
            "epoch": self._epoch,
            "progress": stats.progress,
            "busy_s": round(time.monotonic() - stats.running_since, 6) if running else 0.0,
            "queued": queued,
            "kv_bytes": self._store.total_bytes(),
            "kv_requests": len(self._store),
            "kv_evictions": self._store.evictions,
            "rss_bytes": self._process.memory_info().rss,
            "tokens": stats.tokens,
            "batches": stats.batches,
            "batched_items": stats.batched_items,
        }

    def _void_connection(self) -> None:
        """Forget work of the current connection: queued steps and every KV cache."""
        self._generation += 1
        self._jobs.put(ResetJob())

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

    def _shutdown(self, results: zmq.Socket) -> None:
        self._closing = True
        self._jobs.put(None)
        if self._compute is not None:
            self._compute.join(timeout=2.0)
        results.close(linger=0)
        if not self.compute_alive:
            self._ctx.term()

    # --- the compute thread -----------------------------------------------------------------

    def _compute_loop(self) -> None:
        out = self._ctx.socket(zmq.PAIR)
        out.setsockopt(zmq.LINGER, 0)
        out.connect(self._results_addr)
        stats = self._stats
        pending = self._pending
        try:
            with torch.inference_mode():
                while True:
                    job = pending.popleft() if pending else self._jobs.get()
                    if job is None or self._closing:
                        return
                    generation = getattr(job, "generation", self._generation)
                    if generation != self._generation:
                        self._jobs.task_done()
                        continue  # its connection is gone; nobody waits for the answer
                    jobs = [job]
                    if isinstance(job, ForwardJob):
                        jobs = self._gather_round(job, pending)
                    prefix = generation.to_bytes(8, "little")

                    def send(frames: list | None, prefix: bytes = prefix) -> None:
                        if frames is not None:
                            out.send_multipart([prefix, *frames], copy=False)

                    with self._compute_lock:
                        stats.running = "load" if isinstance(job, LoadJob) else "forward"
                        stats.running_since = time.monotonic()
                        try:
                            if isinstance(job, ForwardJob):
                                self._answer_round(jobs, send)
                            else:
                                try:
                                    send(self._run_job(job))
                                except Exception as e:  # answer, go on
                                    send(self._internal_error(job, e))
                        finally:
                            stats.running = None
                            # Counted done only now: the inline path waits for an idle queue.
                            for _ in jobs:
                                self._jobs.task_done()
        finally:
            out.close(linger=0)

    def _gather_round(self, first: ForwardJob, pending: collections.deque) -> list[ForwardJob]:
        """The FORWARDs waiting behind `first` that can run with it as one round.

        A round holds each request at most once, so every check can be made before anything
        runs. A step of a request already in the round (the next chunk of a long prompt) is
        left for a later round, and so is everything after it for that request; steps of
        other requests behind it may still join: decode steps overtake queued prefill chunks
        of other requests, never one of their own. A load, release or reset is a barrier.
        """
        jobs = [first]
        rids = _rids(first)
        deferred_rids: set[str] = set()
        items = len(rids)
        kept: collections.deque = collections.deque()
        scanned = 0
        while items < self.config.max_batch and scanned < 4 * self.config.max_batch:
            if pending:
                job = pending.popleft()
            else:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
            scanned += 1
            if not isinstance(job, ForwardJob) or job.generation != first.generation:
                kept.append(job)
                break
            more = _rids(job)
            if items + len(more) > self.config.max_batch:
                kept.append(job)
                break
            if more & (rids | deferred_rids):
                deferred_rids |= more
                kept.append(job)
                continue
            jobs.append(job)
            rids |= more
            items += len(more)
        pending.extendleft(reversed(kept))
        return jobs

    def _run_job(self, job) -> list | None:
        if isinstance(job, LoadJob):
            return self._load(job)
        if isinstance(job, ReleaseJob):
            self._store.release(job.rids)
            return None
        if isinstance(job, ResetJob):
            self._store.clear()
            self._epoch = None
            return None
        raise TypeError(f"unknown job {job!r}")

    def _internal_error(self, job, e: Exception) -> list | None:
        self.log.exception("job failed", job=type(job).__name__)
        if isinstance(job, ForwardJob):
            where = {"step": job.msg.header["step"], "epoch": job.msg.header["epoch"]}
        elif isinstance(job, LoadJob):
            where = {"epoch": job.epoch}
        else:
            return None
        message = f"{type(job).__name__} failed: {type(e).__name__}: {e}"
        return encode(STAGE_TAG, Cmd.ERROR, error_header(Code.INTERNAL, message, **where))

    def _load(self, job: LoadJob) -> list:
        started = time.perf_counter()
        self._store.clear()
        self._epoch = None
        old, self._shard = self._shard, None
        dtype = resolve_dtype(job.dtype)
        if old is not None and (
            job.start == job.end
            or old.dtype != dtype
            or old.device != self.device
            or old.end <= job.start
            or job.end <= old.start
        ):
            old = None  # nothing to reuse: free it before reading the new layers
            gc.collect()
        if job.start == job.end:
            weight_bytes = 0
        else:
            try:
                shard = load_shard(
                    self.checkpoint,
                    job.start,
                    job.end,
                    dtype=dtype,
                    device=self.device,
                    reuse=old,
                    row_kernel=self.config.row_kernel,
                )
            except Exception as e:
                # A reused layer may already have been renumbered for the new shard: the old
                # one is not safe to keep. Standby until the broker assigns again.
                del old
                gc.collect()
                self.log.error(
                    "load failed", epoch=job.epoch, start=job.start, end=job.end, error=str(e)
                )
                message = f"cannot load layers [{job.start},{job.end}): {e}"
                return encode(
                    STAGE_TAG, Cmd.ERROR, error_header(Code.INTERNAL, message, epoch=job.epoch)
                )
            del old
            gc.collect()
            self._shard = shard
            weight_bytes = shard.weight_bytes()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._epoch = job.epoch
        load_s = time.perf_counter() - started
        self.log.info(
            "loaded",
            epoch=job.epoch,
            start=job.start,
            end=job.end,
            weight_bytes=weight_bytes,
            load_s=round(load_s, 3),
        )
        header = {
            "epoch": job.epoch,
            "start": job.start,
            "end": job.end,
            "weight_bytes": weight_bytes,
            "load_s": load_s,
        }
        return encode(STAGE_TAG, Cmd.LOADED, header)

    def _answer_round(self, jobs: list[ForwardJob], send: Callable[[list], object]) -> None:
        """Run a round and send each FORWARD's answer as soon as it is ready. If the round
        fails, the FORWARDs not answered yet get an internal ERROR."""
        answered: set[int] = set()
        try:
            for job, frames in self._forward_round(jobs, send):
                answered.add(id(job))
                send(frames)
        except Exception as e:  # a bug or an exhausted resource: answer, go on
            for job in jobs:
                if id(job) not in answered:
                    send(self._internal_error(job, e))

    def _forward_round(
        self, jobs: list[ForwardJob], send: Callable[[list], object]
    ) -> Iterator[tuple[ForwardJob, list]]:
        """Check every item of a round, run items of one length as one batch, and yield each
        FORWARD's answer as soon as all its items are computed.

        Batches run shortest first: decode steps gathered into a round with a prompt or a
        chunk are answered before the prompt is computed, not after it. A FORWARD-wide
        problem (stale epoch, malformed) refuses the whole FORWARD with an ERROR; a refused
        item (lost cache, bad position) is listed in its FORWARD's RESULT under `refused` and
        the other items are computed as if it were not there.

        Between two layers of a prompt or chunk, and on the last stage before its head,
        decode FORWARDs of other requests that have arrived meanwhile run to their answers
        (`_overtake`): a decode group waits for one layer of a long prompt at a stage, not
        for all of its layers.
        """
        started = time.perf_counter()
        shard, store = self._shard, self._store
        outer = self._busy
        self._busy = outer.union(*(_rids(job) for job in jobs))
        try:
            yield from self._compute_round(jobs, send, started, shard, store)
        finally:
            self._busy = outer

    def _compute_round(
        self,
        jobs: list[ForwardJob],
        send: Callable[[list], object],
        started: float,
        shard: Shard,
        store: KVStore,
    ) -> Iterator[tuple[ForwardJob, list]]:
        """`_forward_round` for its jobs, while their requests count as busy."""
        checked: list[list | Refusal] = []
        for job in jobs:
            try:
                checked.append(self._check_forward(job.msg))
            except Refusal as r:
                checked.append(r)
        # Items with the same number of new positions run as one batch (decode steps
        # together, prompts or chunks of one length together); a lone item, and every item
        # of a shard that cannot batch, takes the exact batch-1 path.
        groups: dict[int, list[tuple[int, int]]] = {}
        solo: list[tuple[int, int]] = []
        inputs: dict[tuple[int, int], tuple[torch.Tensor, KVState]] = {}
        unfinished: dict[int, int] = {}
        for j, plan in enumerate(checked):
            if isinstance(plan, Refusal):
                yield jobs[j], self._refuse_forward(jobs[j], plan)
                continue
            for i, entry in enumerate(plan):
                if isinstance(entry, Refusal):
                    continue
                item, x, fresh = entry
                cache = (
                    store.start(item["rid"], fresh) if fresh is not None else store.get(item["rid"])
                )
                if x.device != shard.device:
                    x = x.to(shard.device)
                inputs[(j, i)] = (x, cache.state)
                unfinished[j] = unfinished.get(j, 0) + 1
                if shard.batchable:
                    groups.setdefault(item["n"], []).append((j, i))
                else:
                    solo.append((j, i))
        for j, plan in enumerate(checked):
            if not isinstance(plan, Refusal) and j not in unfinished:
                yield jobs[j], self._result(jobs[j], j, plan, {}, started, 0)  # all refused
        batches = [groups[n] for n in sorted(groups)] + [[key] for key in solo]
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        widths: dict[int, int] = {}
        for batch in batches:
            prompt = inputs[batch[0]][0].shape[1] > 1
            between = (lambda: self._overtake(send)) if prompt else None
            try:
                if len(batch) == 1:
                    x, state = inputs[batch[0]]
                    outputs[batch[0]] = shard.forward(x, state, logits="last", between=between)
                else:
                    xs, states = zip(*(inputs[key] for key in batch), strict=True)
                    results = shard.forward_batch(list(xs), list(states), between=between)
                    outputs.update(zip(batch, results, strict=True))
                    self._stats.batches += 1
                    self._stats.batched_items += len(batch)
            except Exception:
                # A cache of an unanswered FORWARD may hold some of its layers or steps but not
                # all: never reuse it.
                store.release(checked[j][i][0]["rid"] for j, i in inputs if j in unfinished)
                raise
            for j, _ in batch:
                widths[j] = max(widths.get(j, 0), len(batch))
                unfinished[j] -= 1
                if not unfinished[j]:
                    del unfinished[j]
                    yield jobs[j], self._result(jobs[j], j, checked[j], outputs, started, widths[j])
        store.evict(keep=self._busy)

    def _overtake(self, send: Callable[[list], object]) -> None:
        """Run the decode FORWARDs waiting in the queue, between two layers of a prompt (or
        before the head).

        Only FORWARDs whose every item is one decode position, of requests not in a round now
        computing and not in an earlier waiting FORWARD, and only up to the first load,
        release or reset (a barrier), in arrival order.
        """
        pending = self._pending
        while True:
            try:
                pending.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        taken, seen = [], set(self._busy)
        for job in pending:
            if not isinstance(job, ForwardJob):
                break
            if job.generation != self._generation:
                continue
            rids = _decode_rids(job)
            if rids is not None and not rids & seen:
                taken.append(job)
            seen |= rids if rids is not None else _rids(job)
        if not taken:
            return
        for job in taken:
            pending.remove(job)
        try:
            self._answer_round(taken, send)
        finally:
            for _ in taken:
                self._jobs.task_done()

    def _refuse_forward(self, job: ForwardJob, refusal: Refusal) -> list:
        header = job.msg.header
        return encode(
            STAGE_TAG,
            Cmd.ERROR,
            error_header(
                refusal.code,
                refusal.message,
                step=header["step"],
                epoch=header["epoch"],
                rid=refusal.rid,
            ),
        )

    def _result(
        self,
        job: ForwardJob,
        j: int,
        plan: list,
        outputs: dict[tuple[int, int], torch.Tensor],
        started: float,
        width: int,
    ) -> list:
        """A FORWARD's RESULT: its items' outputs in order, and the items it refused.

        `compute_s` runs from the round's start to this answer; `batch` is the width of the
        widest forward its items ran in (1: alone)."""
        shard, store = self._shard, self._store
        done = time.perf_counter()
        tensors, refused = [], []
        for i, entry in enumerate(plan):
            if isinstance(entry, Refusal):
                refused.append(
                    {"i": i, "rid": entry.rid, "code": str(entry.code), "message": entry.message}
                )
                continue
            item = entry[0]
            out = outputs[(j, i)]
            if shard.last and not item.get("logits", True):
                out = out[:, :0]
            store.commit(item["rid"], item["hash"])
            tensors.append(out)
            self._stats.tokens += item["n"]
            self._stats.progress += 1
        header = job.msg.header
        reply = {
            "step": header["step"],
            "epoch": header["epoch"],
            "compute_s": done - started,
            "queue_s": started - job.received,
            "batch": width,
        }
        if refused:
            reply["refused"] = refused
        return encode(STAGE_TAG, Cmd.RESULT, reply, tensors)

    def _check_forward(self, msg: Message) -> list:
        """Check a FORWARD before anything is computed: per item, (item, input, fresh cache)
        or the Refusal of that item. A problem with the FORWARD as a whole raises Refusal."""
        header = msg.header
        items = header["items"]
        shard = self._shard
        if header["epoch"] != self._epoch:
            raise Refusal(
                Code.STALE_EPOCH,
                f"step is for epoch {header['epoch']} but this stage serves {self._epoch}",
            )
        if shard is None:
            raise Refusal(Code.BAD_REQUEST, "this stage holds no layers (standby)")
        if not items:
            raise Refusal(Code.BAD_REQUEST, "FORWARD has no items")
        if len(msg.frames) != len(items):
            raise Refusal(
                Code.BAD_REQUEST, f"FORWARD has {len(items)} items but {len(msg.frames)} tensors"
            )
        seen: set[str] = set()
        for item in items:
            if item["rid"] in seen:
                raise Refusal(
                    Code.BAD_REQUEST,
                    f"request {item['rid']} appears twice in one step",
                    item["rid"],
                )
            seen.add(item["rid"])
        plan = []
        for i, item in enumerate(items):
            try:
                plan.append(self._check_item(item, msg.tensor(i)))
            except Refusal as r:
                plan.append(r)
        return plan

    def _check_item(self, item: dict, x: torch.Tensor) -> tuple[dict, torch.Tensor, Any]:
        shard = self._shard
        rid, pos, n = item["rid"], item["pos"], item["n"]
        if pos < 0 or n < 1:
            raise Refusal(Code.BAD_REQUEST, f"bad position {pos} or token count {n}", rid)
        if pos + n > shard.max_positions:
            raise Refusal(
                Code.CONTEXT_OVERFLOW,
                f"positions up to {pos + n} exceed the model's context {shard.max_positions}",
                rid,
            )
        if x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != n:
            raise Refusal(
                Code.BAD_REQUEST,
                f"input of shape {list(x.shape)} does not hold [1, {n}, ...]",
                rid,
            )
        if pos == 0:
            if item["prev"] != 0:
                raise Refusal(
                    Code.CACHE_MISMATCH,
                    "a step at position 0 must have prev 0 (the empty prefix)",
                    rid,
                )
            fresh = state = shard.new_cache()
        else:
            fresh = None
            entry = self._store.get(rid)
            if entry is None:
                raise Refusal(
                    Code.CACHE_MISS,
                    f"no cache for request {rid} at position {pos}; replay it",
                    rid,
                )
            if entry.state.length != pos:
                raise Refusal(
                    Code.CACHE_MISMATCH,
                    f"step starts at position {pos} but the cache of {rid} holds "
                    f"{entry.state.length}",
                    rid,
                )
            if entry.hash != item["prev"]:
                raise Refusal(
                    Code.CACHE_MISMATCH,
                    f"prefix hash {item['prev']} does not match the cache of {rid}",
                    rid,
                )
            state = entry.state
        try:
            shard.check_inputs(x, state, pos)
        except ContextOverflow as e:
            raise Refusal(Code.CONTEXT_OVERFLOW, str(e), rid) from None
        except ShardError as e:
            raise Refusal(Code.BAD_REQUEST, str(e), rid) from None
        if shard.first and prefix_hash(item["prev"], x.view(-1).tolist()) != item["hash"]:
            raise Refusal(
                Code.CACHE_MISMATCH,
                f"hash {item['hash']} is not the prefix hash of {rid}'s tokens "
                f"[0, {pos + n}) given prev {item['prev']}",
                rid,
            )
        return item, x, fresh


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


def _rids(job: ForwardJob) -> set[str]:
    return {item["rid"] for item in job.msg.header["items"]}


def _decode_rids(job: ForwardJob) -> set[str] | None:
    """A FORWARD's request ids if every item is one decode position (n 1 past position 0).
    Its items were checked against the protocol's item schema when it was decoded."""
    items = job.msg.header["items"]
    if not items or any(item["n"] != 1 or item["pos"] == 0 for item in items):
        return None
    return _rids(job)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
