"""The monitor's reader: one background thread on the broker's feed and its ROUTER.

`FeedReader` owns two sockets in that thread: a SUB on the broker's feed (stats every half
second, cluster events, token progress) and a DEALER on its ROUTER for the snapshot on connect
(STATUS, JOBS) and admin commands (DRAIN). It turns frames into the records of `tui.records`
and hands each one to a callback; it never touches the UI.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import zmq
from zmq.utils.monitor import parse_monitor_message

from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd
from common.keys import HANDSHAKE_FAILED, PeerKeys, handshake_refusal
from tui.records import LinkState, Notice, Snapshot, Tokens, Update, snapshot_of
from tui.token_text import TokenText, load_tokenizer

log = structlog.get_logger("tui")

# Stats arrive every 0.5 s; four missed in a row is a lost broker, not a slow one.
LOST_AFTER_S = 2.0
# How long a DRAIN may wait for its answer before the user is told there was none.
REPLY_TIMEOUT_S = 3.0
# Short enough that a DRAIN key press is sent at once, long enough to cost nothing idle.
POLL_MS = 100
# Feed messages handled per wake-up before the thread looks at its other socket and commands.
RECV_BUDGET = 2000


@dataclass
class _Pending:
    kind: Cmd
    stage: str | None
    sent: float


class FeedReader:
    """The real source: one background thread, a SUB on the feed and a DEALER on the broker.

    `post` (given to `start`) is called from that thread with each `Update`; it must be
    thread-safe (Textual's `post_message` is).
    """

    def __init__(
        self,
        broker: str,
        feed: str | None = None,
        *,
        lost_after_s: float = LOST_AFTER_S,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
        tokenizer_loader: Callable[[str | None], Any] = load_tokenizer,
        keys: PeerKeys | None = None,
    ):
        self.broker = broker
        self.keys = keys  # CURVE: the monitor's certificate (a client or admin key)
        self.feed = feed or P.feed_endpoint(broker)
        self.lost_after_s = lost_after_s
        self.reply_timeout_s = reply_timeout_s
        self.tokenizer_loader = tokenizer_loader
        self._commands: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._post: Callable[[Update], None] = lambda update: None
        self._text = TokenText()
        self._model: str | None = None
        self._active: set[str] = set()
        self._ask_jobs = False  # a request finished: ask JOBS for its outcome
        self._last_event_ts = 0.0
        self._pending: collections.deque[_Pending] = collections.deque()
        self._context = zmq.Context.instance()
        self._watches: list[tuple[zmq.Socket, zmq.Socket]] = []
        for url in (self.broker, self.feed):
            probe = self._context.socket(zmq.DEALER)
            try:
                probe.connect(url)  # a typo fails here, on the command line, not in the thread
            except zmq.ZMQError as e:
                raise ValueError(f"bad endpoint {url!r}: {e}") from None
            finally:
                probe.close(linger=0)

    # --- the FeedSource interface ---

    def start(self, post: Callable[[Update], None]) -> None:
        self._post = post
        self._thread = threading.Thread(target=self._run, name="layerline-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def drain(self, stage: str) -> None:
        self._commands.put(("drain", stage))

    # --- the thread ---

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a bug here must show on screen, not kill the monitor silently
            log.exception("feed_reader_failed")
            self._post(LinkState("lost", time.time(), f"monitor reader failed: {e}"))

    def _dealer(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        self._secure(sock)
        sock.connect(self.broker)
        return sock

    def _secure(self, sock: zmq.Socket) -> None:
        """With keys, make `sock` a CURVE client and watch its handshakes: a refused one shows
        only there (the broker never answers a stranger)."""
        if self.keys is None:
            return
        self.keys.apply(sock)
        watch = sock.get_monitor_socket(HANDSHAKE_FAILED)
        self._watches.append((sock, watch))

    def _refused(self) -> str | None:
        """Why the broker refused a handshake of ours, if it did."""
        for sock, watch in self._watches:
            with contextlib.suppress(zmq.ZMQError):
                while watch.poll(0):
                    event = parse_monitor_message(watch.recv_multipart())
                    url = self.feed if sock.type == zmq.SUB else self.broker
                    reason = handshake_refusal(
                        url, event["event"], event["value"], self.keys, "client", sock.type
                    )
                    if reason is not None:
                        return reason
        return None

    def _unwatch(self, only: zmq.Socket | None = None) -> None:
        """Stop watching `only` (before it closes), or every socket."""
        kept = []
        for sock, watch in self._watches:
            if only is not None and sock is not only:
                kept.append((sock, watch))
                continue
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            watch.close(linger=0)
        self._watches = kept

    def _loop(self) -> None:
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._secure(sub)
        sub.connect(self.feed)
        dealer = self._dealer()
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        self._ask_snapshot(dealer)
        link = "connecting"
        last_feed = time.monotonic()
        self._post(LinkState(link, time.time(), f"waiting for the feed at {self.feed}"))
        try:
            while not self._stopping.is_set():
                # Silence is judged from before the poll: handling a message may take seconds
                # (the first one loads the tokenizer) while the feed queues up behind it.
                polled_at = time.monotonic()
                ready = dict(poller.poll(POLL_MS))
                fed = sub in ready and self._recv_feed(sub)
                if dealer in ready:
                    self._recv_replies(dealer)
                self._run_commands(dealer)
                now = time.monotonic()
                if fed:
                    last_feed = now
                    if link != "up":
                        if link == "lost":
                            self._ask_snapshot(dealer)  # the broker may have restarted
                        link = "up"
                        self._post(LinkState(link, time.time()))
                elif link != "lost" and polled_at - last_feed > self.lost_after_s:
                    link = "lost"
                    log.warning("feed_lost", feed=self.feed)
                    self._post(
                        LinkState(
                            link,
                            time.time(),
                            f"no feed from {self.feed} for {self.lost_after_s:g} s",
                        )
                    )
                    # A fresh DEALER: requests queued to a vanished broker would answer late.
                    poller.unregister(dealer)
                    self._unwatch(dealer)
                    dealer.close(linger=0)
                    dealer = self._dealer()
                    poller.register(dealer, zmq.POLLIN)
                    self._fail_pending("the broker was lost before it answered")
                self._expire_pending(now)
                refused = self._refused()
                if refused is not None:
                    log.warning("monitor_refused", reason=refused)
                    self._post(LinkState("refused", time.time(), refused))
                    break
        finally:
            self._unwatch()
            sub.close(linger=0)
            dealer.close(linger=0)

    def _ask_snapshot(self, dealer: zmq.Socket) -> None:
        self._send(dealer, M.StatusQuery())
        self._send(dealer, M.JobsQuery())

    def _send(self, dealer: zmq.Socket, body: M.Body, stage: str | None = None) -> None:
        try:
            dealer.send_multipart(P.encode(P.MONITOR_TAG, body), flags=zmq.NOBLOCK)
            self._pending.append(_Pending(body.cmd, stage, time.monotonic()))
        except zmq.Again:
            if body.cmd == Cmd.DRAIN:
                self._post(Notice(f"cannot send DRAIN {stage}: broker unreachable", error=True))

    def _recv_feed(self, sub: zmq.Socket) -> bool:
        got = False
        for _ in range(RECV_BUDGET):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            got = True
            try:
                msg = P.decode_feed(frames)
            except P.ProtocolError as e:
                log.warning("bad_feed_message", code=str(e.code), reason=e.message)
                continue
            if msg.topic == P.FEED_STATS:
                self._on_snapshot(snapshot_of(msg.body, periodic=True))
            elif msg.topic == P.FEED_EVENT:
                self._last_event_ts = max(self._last_event_ts, msg.body.ts)
                self._post(msg.body)
            elif msg.topic == P.FEED_TOKEN:
                self._on_tokens(msg)
        return got

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.model != self._model:
            # Lazily, here in the reader thread: loading a tokenizer takes a second or more.
            self._model = snapshot.model
            self._text = TokenText(self.tokenizer_loader(snapshot.model))
        if snapshot.active is not None:
            rids = {r.rid for r in snapshot.active}
            if self._active - rids:
                self._ask_jobs = True
            self._active = rids
        self._post(snapshot)

    def _on_history(self, events: tuple[M.ClusterEvent, ...]) -> None:
        """Events from before we connected, as the broker's STATUS lists them (newer ones only)."""
        for event in events:
            if event.ts > self._last_event_ts:
                self._last_event_ts = event.ts
                self._post(event)

    def _on_tokens(self, msg: P.FeedMessage) -> None:
        seen = msg.body
        if not msg.descs:
            return
        ids = [int(i) for i in msg.tensor(0).reshape(-1).tolist()]
        self._active.add(seen.rid)
        pieces = self._text.pieces(seen.rid, seen.pos, ids)
        if pieces is None:
            return
        self._post(Tokens(seen.rid, seen.pos, seen.stage, seen.ts, tuple(ids), pieces))

    def _recv_replies(self, dealer: zmq.Socket) -> None:
        while True:
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = P.decode(frames)
            except P.ProtocolError as e:
                log.warning("bad_reply", code=str(e.code), reason=e.message)
                continue
            pending = self._pop_pending(msg.cmd)
            if msg.cmd == Cmd.STATUS:
                self._on_snapshot(snapshot_of(msg.body, periodic=False))
                self._on_history(msg.body.events)
            elif msg.cmd == Cmd.JOBS:
                self._post(msg.body)
            elif pending is not None and pending.kind == Cmd.DRAIN:
                if msg.cmd == Cmd.PONG:
                    self._post(Notice(f"draining {pending.stage}: its layers move to other stages"))
                else:
                    reason = msg.body.message or msg.body.code
                    self._post(Notice(f"drain {pending.stage} refused: {reason}", error=True))

    def _pop_pending(self, cmd: Cmd) -> _Pending | None:
        # STATUS and JOBS answer with their own command; PONG and ERROR answer a DRAIN.
        kinds = {cmd} if cmd in (Cmd.STATUS, Cmd.JOBS) else {Cmd.DRAIN}
        for p in self._pending:
            if p.kind in kinds:
                self._pending.remove(p)
                return p
        return None

    def _run_commands(self, dealer: zmq.Socket) -> None:
        if self._ask_jobs:
            self._ask_jobs = False
            self._send(dealer, M.JobsQuery())
        while True:
            try:
                kind, stage = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "drain":
                self._send(dealer, M.Drain(stage=stage), stage=stage)

    def _expire_pending(self, now: float) -> None:
        for p in [p for p in self._pending if now - p.sent > self.reply_timeout_s]:
            self._pending.remove(p)
            if p.kind == Cmd.DRAIN:
                self._post(Notice(f"no answer to DRAIN {p.stage} from {self.broker}", error=True))

    def _fail_pending(self, reason: str) -> None:
        for p in self._pending:
            if p.kind == Cmd.DRAIN:
                self._post(Notice(f"DRAIN {p.stage}: {reason}", error=True))
        self._pending.clear()
