"""The client's one DEALER connection to the broker: liveness, reconnects, dispatch by request id.

`Link` holds what the sync and async clients share: it routes each incoming message to its
request, sends what the request answers, pings while requests wait, and replaces a silent
socket with a fresh one (new identity), replaying every active request when the broker answers
again. The next steps that one incoming message causes (a RESULTS bundle answers a whole
group) leave as one STEPS bundle, so the broker sees the group's steps together. `SyncLink`
waits in the caller's thread; `AsyncLink` runs a receiver task and a heartbeat task on the
caller's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd, Message
from client.checks import URL_FORMS
from client.errors import (
    BrokerRefused,
    BrokerUnreachable,
    ClientError,
    InvalidArgument,
    NotReadyError,
    RequestFailed,
    StreamAbandoned,
)
from client.session import Outgoing, Request
from common.keys import HANDSHAKE_FAILED, PeerKeys, handshake_refusal

log = structlog.get_logger("client")
# How often a wait for the broker's first answer looks for a refused handshake.
HANDSHAKE_POLL_S = 0.1

_ROUTED = (Cmd.RESULT, Cmd.EVENT, Cmd.ERROR)


class Link:
    """Routing and liveness for one client; subclasses own the socket and the waiting."""

    def __init__(
        self,
        url: str,
        *,
        secret: str,
        heartbeat: float,
        broker_timeout: float,
        reconnect_timeout: float,
        idle_timeout: float | None = None,
        keys: PeerKeys | None = None,
    ):
        self.url = url
        self.keys = keys  # CURVE: this client's certificate and the broker's public key
        # Why the broker refused our handshake, once it did (then every wait ends with it).
        self.refused: str | None = None
        self.secret = secret  # owns this client's requests at the broker (protocol.owner_of)
        self.heartbeat = heartbeat
        self.broker_timeout = broker_timeout
        self.reconnect_timeout = reconnect_timeout
        self.idle_timeout = idle_timeout  # a stream unread this long is ended; None: never
        self.requests: dict[str, Request] = {}
        self.incarnation = 0
        self.identity = b""
        self.sock: Any = None
        self.monitor: zmq.Socket | None = None  # connection events of `sock`
        self.closed = False
        self.heard_at = 0.0  # the last message from the broker
        self.quiet_since = 0.0  # start of the current wait; silence before it does not count
        self.pinged_at = 0.0
        self.lost_at: float | None = None  # when the broker was declared silent

    # --- hooks -----------------------------------------------------------------------------

    def _socket(self) -> Any:
        raise NotImplementedError

    def _deliver(self, rid: str, items: list) -> None:
        """Hand stream events (dicts) or one terminal exception to the request's consumer."""
        raise NotImplementedError

    def _reply(self, msg: Message) -> None:
        """A message addressed to no request: PONG, STATUS, JOBS, or an ERROR about them."""

    # --- socket ----------------------------------------------------------------------------

    def open_socket(self) -> None:
        """A fresh DEALER with a new routing identity; the old one, if any, is dropped unsent.
        Every identity carries the client's secret, so the requests stay this client's."""
        self.close_socket()
        self.incarnation += 1
        self.identity = P.client_identity(self.secret, str(self.incarnation))
        # Held at once, so that close_socket closes them whatever fails below: a socket left
        # open would block Context.term() in close() forever.
        self.sock = sock = self._socket()
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            self.keys.apply(sock)
        # A broker restarted within broker_timeout answers PINGs at once, so silence never
        # shows that it lost our in-flight steps; the TCP disconnect does. A refused CURVE
        # handshake shows only here too: the broker just never answers.
        address = f"inproc://layerline-client-{self.identity.decode()}"
        sock.monitor(address, zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED)
        self.monitor = monitor = zmq.Context.shadow(sock.context.underlying).socket(zmq.PAIR)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.connect(address)
        try:
            sock.connect(self.url)
        except zmq.ZMQError as e:
            self.close_socket()
            raise InvalidArgument(
                f"cannot connect to broker URL {self.url!r}: {e.strerror}; give it as {URL_FORMS}"
            ) from None

    def close_socket(self) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def disconnected(self) -> bool:
        """Whether the connection to the broker dropped since the last call."""
        dropped = False
        while self.monitor is not None:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            dropped |= event["event"] == zmq.EVENT_DISCONNECTED
            if event["event"] & HANDSHAKE_FAILED and self.refused is None:
                self.refused = handshake_refusal(
                    self.url, event["event"], event["value"], self.keys
                )
                if self.refused is not None:
                    log.warning("client_handshake_refused", broker=self.url, reason=self.refused)
        return dropped

    def send(self, frames: list) -> bool:
        """Send without blocking; a full pipe drops the message (the silence path recovers)."""
        if self.sock is None:
            return False
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def post(self, messages: list[Outgoing]) -> None:
        """Encode and send: every STEP in one STEPS bundle, then the other messages in order."""
        steps = [(body, tensors[0]) for body, tensors in messages if isinstance(body, M.Step)]
        if steps:
            for frames in P.encode_bundled(P.CLIENT_TAG, steps):
                self.send(frames)
        for body, tensors in messages:
            if not isinstance(body, M.Step):
                self.send(P.encode(P.CLIENT_TAG, body, tensors))

    def ping(self, now: float) -> None:
        """A PING; a STATUS instead while a request waits for readiness (it says why not)."""
        self.pinged_at = now
        held = any(req.gate == "held" for req in self.requests.values())
        self.send(P.encode(P.CLIENT_TAG, M.StatusQuery() if held else M.Ping()))

    # --- requests --------------------------------------------------------------------------

    def add(self, req: Request, now: float) -> None:
        if not self.requests:
            self.quiet_since = now
        self.requests[req.rid] = req
        self.post(req.start())
        # Its PONG, sent after the broker took the steps, says whether it can run them now.
        self.ping(now)

    def read(self, rid: str, item: Any, now: float) -> None:
        """The consumer took `item` from the request's stream: send what that lets go."""
        req = self.requests.get(rid)
        if req is not None and isinstance(item, dict):
            self.post(req.read(item, now))

    def cancel(self, rid: str) -> None:
        """Forget a request and tell the broker, so every stage frees its cache."""
        req = self.requests.pop(rid, None)
        if req is not None:
            self.post([req.end("cancelled")])

    # --- incoming --------------------------------------------------------------------------

    def on_frames(self, frames: list, now: float) -> None:
        self.heard_at = now
        try:
            msg = P.decode(frames, expect=P.CLIENT_TAG)
        except P.ProtocolError as e:
            log.warning("client_bad_message", code=str(e.code), reason=e.message)
            return
        if self.lost_at is not None:
            self._recovered(now)
        out: list[Outgoing] = []
        # A RESULTS bundle's items were decoded with it: unbundle refuses none of them.
        for single in P.unbundle(msg) if msg.cmd in P.BUNDLES else [msg]:
            self._route(single, now, out)
        self.post(out)

    def _route(self, msg: Message, now: float, out: list[Outgoing]) -> None:
        """Hand one message to its request; what the request answers goes into `out`."""
        rid = msg.body.rid if msg.cmd in _ROUTED else None
        if rid is None:
            self._readiness(msg, now, out)
            self._reply(msg)
            return
        req = self.requests.get(rid)
        if req is None:
            return  # finished or cancelled: a late result, or the END's acknowledgement
        try:
            answer, events = req.handle(msg, now)
        except Exception as e:  # a refusal, or a failure in sampling / detokenizing
            self.requests.pop(rid, None)
            out.append(req.end("failed"))
            self._deliver(rid, [e])
            return
        out.extend(answer)
        if req.result is not None:
            self.requests.pop(rid, None)
        if events:
            self._deliver(rid, events)

    def _readiness(self, msg: Message, now: float, out: list[Outgoing]) -> None:
        """A PONG or STATUS says whether the broker can run the requests that wait to hear it."""
        gated = [req for req in self.requests.values() if req.gate is not None]
        if msg.cmd not in (Cmd.PONG, Cmd.STATUS) or not gated:
            return
        if msg.body.ready:
            for req in gated:
                req.admitted()
        elif msg.cmd == Cmd.PONG:
            out.append((M.StatusQuery(), []))  # not ready: STATUS says why
        else:
            reason = msg.body.reason or "no reason given"
            for req in gated:
                try:
                    events = req.not_ready(reason, now)
                except NotReadyError as e:
                    self.requests.pop(req.rid, None)
                    out.append(req.end("failed"))
                    self._deliver(req.rid, [e])
                    continue
                if events:
                    self._deliver(req.rid, events)

    def _reap_idle(self, now: float) -> None:
        """End the requests whose consumer left a token unread for idle_timeout."""
        if self.idle_timeout is None:
            return
        for rid, req in list(self.requests.items()):
            if req.unread and now - req.unread_since > self.idle_timeout:
                log.info("client_stream_abandoned", rid=rid, unread=req.unread)
                self.requests.pop(rid)
                self.post([req.end("cancelled")])
                error = StreamAbandoned(
                    f"request {rid} was ended: its stream was not read for "
                    f"{self.idle_timeout:g} s (idle_timeout); read a stream to its end or "
                    "close it, or give the client a longer idle_timeout"
                )
                self._deliver(rid, [error])

    def _recovered(self, now: float) -> None:
        """The broker answers through the fresh socket: rebuild every request there."""
        log.info("client_reconnected", broker=self.url, after_s=round(now - self.lost_at, 3))
        self.lost_at = None
        out: list[Outgoing] = []
        for rid, req in list(self.requests.items()):
            steps, events = req.reconnected()
            out.extend(steps)
            self._deliver(rid, events)
        self.post(out)

    # --- liveness --------------------------------------------------------------------------

    def tick(self, now: float) -> float:
        """Ping, detect a lost broker, give up on one gone too long; return when to tick next."""
        dropped = self.disconnected()
        if self.refused is not None:
            self._give_up(BrokerRefused(self.refused))
            return now + self.heartbeat
        self._reap_idle(now)
        if not self.requests:
            return now + self.heartbeat
        if self.lost_at is not None:
            if now - self.lost_at > self.reconnect_timeout:
                self._give_up()
                return now + self.heartbeat
        elif dropped:
            self._reconnect(now, "disconnected")
        elif now - max(self.heard_at, self.quiet_since) > self.broker_timeout:
            self._reconnect(now, "silent")
        if now - self.pinged_at >= self.heartbeat:
            self.ping(now)
        if self.lost_at is not None:
            return min(
                self.pinged_at + self.heartbeat, self.lost_at + self.reconnect_timeout + 1e-3
            )
        silent_at = max(self.heard_at, self.quiet_since) + self.broker_timeout
        return min(self.pinged_at + self.heartbeat, silent_at + 1e-3)

    def _reconnect(self, now: float, cause: str) -> None:
        log.warning(
            "client_broker_lost",
            broker=self.url,
            cause=cause,
            silent_s=round(now - max(self.heard_at, self.quiet_since), 3),
            requests=len(self.requests),
        )
        self.lost_at = now
        self.open_socket()

    def _give_up(self, error: BrokerUnreachable | None = None) -> None:
        error = error or BrokerUnreachable(
            f"broker at {self.url} went silent and did not come back within "
            f"{self.reconnect_timeout} s; is `python -m broker` running?"
        )
        log.warning("client_broker_gone", broker=self.url, requests=len(self.requests))
        for rid in list(self.requests):
            self.requests.pop(rid)
            self._deliver(rid, [error])
        self.lost_at = None

    def unreachable(self, timeout: float) -> BrokerUnreachable:
        self.disconnected()
        if self.refused is not None:
            return BrokerRefused(self.refused)
        return BrokerUnreachable(
            f"broker at {self.url} did not answer within {timeout} s; is `python -m broker` running?"
        )


def _reply_error(msg: Message) -> ClientError:
    return RequestFailed(str(msg.body.code), msg.body.message)


class SyncLink(Link):
    """Waits in the caller's thread; whichever consumer waits drives every request."""

    def __init__(self, url: str, **kwargs: Any):
        super().__init__(url, **kwargs)
        self.ctx = zmq.Context()
        # Each request's undelivered stream events (or its terminal exception), by rid.
        self.mail: dict[str, collections.deque] = {}
        self.replies: collections.deque[Message] = collections.deque(maxlen=16)
        self.pumped_at = 0.0
        self.poller: zmq.Poller | None = None  # kept per socket, not built per wait
        self.polled: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        return self.ctx.socket(zmq.DEALER)

    def _deliver(self, rid: str, items: list) -> None:
        box = self.mail.get(rid)
        if box is not None:
            box.extend(items)

    def _reply(self, msg: Message) -> None:
        self.replies.append(msg)

    def add(self, req: Request, now: float) -> None:
        self.mail[req.rid] = collections.deque()
        super().add(req, now)

    def forget(self, rid: str) -> None:
        self.cancel(rid)
        self.mail.pop(rid, None)

    def pump(self, until: float | None) -> None:
        """Wait for traffic until `until` or the next tick, then handle all that arrived."""
        now = time.perf_counter()
        due = self.tick(now)
        if until is not None:
            due = min(due, until)
        sock = self.sock
        if self.poller is None or self.polled is not sock:
            self.poller, self.polled = zmq.Poller(), sock
            self.poller.register(sock, zmq.POLLIN)
        if self.poller.poll(max(0.0, due - now) * 1000):
            while True:
                try:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self.on_frames(frames, time.perf_counter())
                if sock is not self.sock:
                    break  # a reconnect replaced the socket
        self.pumped_at = time.perf_counter()

    def next_items(self, rid: str, deadline: float | None) -> collections.deque:
        """The request's mailbox, once it holds something; TimeoutError at `deadline`."""
        box = self.mail[rid]
        if box:
            return box
        now = time.perf_counter()
        if now - self.pumped_at > self.heartbeat:
            self.quiet_since = now  # the consumer paused; that silence is not the broker's
        while not box:
            if deadline is not None and time.perf_counter() >= deadline:
                raise TimeoutError
            self.pump(deadline)
        return box

    def connect(self, timeout: float) -> None:
        """First contact: PING must be answered within `timeout`."""
        self.open_socket()
        self.call(M.Ping(), Cmd.PONG, timeout)

    def call(self, query: M.Body, reply: Cmd, timeout: float) -> Message:
        """Send a control message and wait for its reply (BrokerUnreachable on silence)."""
        self.replies.clear()
        self.send(P.encode(P.CLIENT_TAG, query))
        deadline = time.perf_counter() + timeout
        while True:
            while self.replies:
                msg = self.replies.popleft()
                if msg.cmd == reply:
                    return msg
                if msg.cmd == Cmd.ERROR:
                    raise _reply_error(msg)
            if time.perf_counter() >= deadline or self.refused is not None:
                raise self.unreachable(timeout)
            self.pump(min(deadline, time.perf_counter() + HANDSHAKE_POLL_S))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for rid in list(self.requests):
            self.cancel(rid)
        self.close_socket()
        self.ctx.term()


class AsyncLink(Link):
    """Runs on one event loop: a receiver task dispatches by rid to per-request queues."""

    def __init__(self, url: str, **kwargs: Any):
        super().__init__(url, **kwargs)
        self.ctx = zmq.asyncio.Context()
        self.mail: dict[str, asyncio.Queue] = {}
        self.waiters: dict[Cmd, collections.deque[asyncio.Future]] = collections.defaultdict(
            collections.deque
        )
        self.receiver: asyncio.Task | None = None
        self.beater: asyncio.Task | None = None
        self.wake = asyncio.Event()

    def _socket(self) -> zmq.asyncio.Socket:
        return self.ctx.socket(zmq.DEALER)

    def send(self, frames: list) -> bool:
        if self.sock is None:
            return False
        # With NOBLOCK the future is already done: the send happened (or hit a full pipe).
        future = self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
        return future.exception() is None

    def open_socket(self) -> None:
        if self.receiver is not None:
            self.receiver.cancel()
        super().open_socket()
        self.receiver = asyncio.get_running_loop().create_task(self._receive(self.sock))

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            try:
                self.on_frames(frames, time.perf_counter())
            except Exception:  # never let one message stop the receiver
                log.exception("client_dispatch_failed")

    async def _beat(self) -> None:
        while not self.closed:
            now = time.perf_counter()
            due = self.tick(now)
            self.wake.clear()
            if self.requests:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), max(0.0, due - now))
            else:
                await self.wake.wait()  # idle: nothing waits, nothing to ping for

    def _deliver(self, rid: str, items: list) -> None:
        queue = self.mail.get(rid)
        if queue is not None:
            for item in items:
                queue.put_nowait(item)

    def _reply(self, msg: Message) -> None:
        if msg.cmd == Cmd.ERROR:
            for waiters in self.waiters.values():
                while waiters:
                    fut = waiters.popleft()
                    if not fut.done():
                        fut.set_exception(_reply_error(msg))
            return
        waiters = self.waiters.get(msg.cmd)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(msg)
                return

    def add(self, req: Request, now: float) -> None:
        self.mail[req.rid] = asyncio.Queue()
        idle = not self.requests
        super().add(req, now)
        if idle:
            self.wake.set()  # start pinging

    def forget(self, rid: str) -> None:
        self.cancel(rid)
        self.mail.pop(rid, None)

    async def connect(self, timeout: float) -> None:
        self.open_socket()
        self.beater = asyncio.get_running_loop().create_task(self._beat())
        await self.call(M.Ping(), Cmd.PONG, timeout)

    async def call(self, query: M.Body, reply: Cmd, timeout: float) -> Message:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[reply].append(fut)
        self.send(P.encode(P.CLIENT_TAG, query))
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            try:
                return await asyncio.wait_for(asyncio.shield(fut), min(left, HANDSHAKE_POLL_S))
            except TimeoutError:
                self.disconnected()
                if left <= HANDSHAKE_POLL_S or self.refused is not None:
                    fut.cancel()
                    raise self.unreachable(timeout) from None

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for rid in list(self.requests):
            self.cancel(rid)
        for task in (self.receiver, self.beater):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.wake.set()
        self.close_socket()
        self.ctx.term()
