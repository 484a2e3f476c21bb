"""The monitor's view of the broker: a reader thread on its feed, and the state the app renders.

`FeedReader` owns two sockets in one background thread: a SUB on the broker's feed (stats every
half second, cluster events, token progress) and a DEALER on its ROUTER for the snapshot on
connect (STATUS, JOBS) and admin commands (DRAIN). It turns frames into the small frozen
objects below and hands each one to a callback; it never touches the UI. `ClusterState` folds
those objects into what the app shows, with bounded history, and `ClusterState.view()` freezes
it into a `ClusterView` that widgets render. The app never sees a frame or a socket.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import zmq

from broker import protocol as P
from broker.protocol import Cmd
from common.text import DETOKENIZE_CONTEXT, TextAssembler, ships_tokenizer

log = structlog.get_logger("tui")

# Stats arrive every 0.5 s; four missed in a row is a lost broker, not a slow one.
LOST_AFTER_S = 2.0
# How long a DRAIN may wait for its answer before the user is told there was none.
REPLY_TIMEOUT_S = 3.0
# Short enough that a DRAIN key press is sent at once, long enough to cost nothing idle.
POLL_MS = 100
# Feed messages handled per wake-up before the thread looks at its other socket and commands.
RECV_BUDGET = 2000
# 60 samples of a 0.5 s feed: the last half minute of throughput per stage.
THROUGHPUT_SAMPLES = 60
MAX_EVENTS = 2000
MAX_TEXTS = 200  # requests whose streamed text is kept
MAX_PIECES = 4096  # tokens of text kept per request (the tail)
MAX_REQUEST_ROWS = 50
GAP = "…"  # tokens the feed dropped (a slow monitor loses feed messages, by design)


# --- what the reader hands to the app ---------------------------------------------------------


@dataclass(frozen=True)
class LayerRange:
    stage: str
    start: int
    end: int


@dataclass(frozen=True)
class StageStats:
    name: str
    host: str | None = None
    device: str | None = None
    state: str = "?"
    start: int = 0
    end: int = 0
    credits: int = 0
    inflight: int = 0
    queued: int = 0
    tokens_per_s: float = 0.0
    p50_s: float | None = None
    p99_s: float | None = None
    kv_bytes: int | None = None
    kv_requests: int | None = None
    rss_bytes: int | None = None
    memory_bytes: int | None = None
    last_seen_s: float | None = None


@dataclass(frozen=True)
class RequestStats:
    rid: str
    tokens: int = 0
    steps: int = 0
    replays: int = 0
    age_s: float = 0.0
    tokens_per_s: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """One `Broker.status()`: from the periodic stats feed or a STATUS reply."""

    ready: bool
    reason: str | None
    epoch: int
    map: tuple[LayerRange, ...]
    num_layers: int
    stages: tuple[StageStats, ...]
    active: tuple[RequestStats, ...] | None  # None: a STATUS reply, which lists no requests
    model: str | None
    ts: float
    periodic: bool  # from the 0.5 s stats feed: one throughput sample per stage


@dataclass(frozen=True)
class ClusterEvent:
    ts: float
    kind: str  # join | leave | dead | stalled | rejoin | reshard | not_ready | ready | ...
    epoch: int | None = None
    stage: str | None = None
    cause: str | None = None
    lost: str | None = None
    reason: str | None = None
    host: str | None = None
    old_map: tuple[LayerRange, ...] = ()
    new_map: tuple[LayerRange, ...] = ()


@dataclass(frozen=True)
class Tokens:
    """Ids a client sent for one step (the prompt at pos 0, then each sampled token)."""

    rid: str
    pos: int
    stage: str | None  # the stage holding the head when the step was sent
    ts: float
    ids: tuple[int, ...]
    pieces: tuple[str, ...]  # text of each id ("" where a multi-id character is still open)


@dataclass(frozen=True)
class Job:
    rid: str
    outcome: str
    tokens: int = 0
    replays: int = 0
    duration_s: float | None = None


@dataclass(frozen=True)
class Jobs:
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class Link:
    state: str  # connecting | up | lost
    since: float  # wall-clock time of the change
    reason: str = ""


@dataclass(frozen=True)
class Notice:
    """A one-off message for the user (the broker's answer to DRAIN)."""

    message: str
    error: bool = False


Update = Snapshot | ClusterEvent | Tokens | Jobs | Link | Notice


class FeedSource(Protocol):
    """What the app needs from a reader; tests pass a fake with the same three methods."""

    def start(self, post: Callable[[Update], None]) -> None: ...

    def stop(self) -> None: ...

    def drain(self, stage: str) -> None: ...


# --- header -> objects (tolerant: the broker may add or omit fields) -------------------------


def _ranges(raw: Any) -> tuple[LayerRange, ...]:
    if not isinstance(raw, list):
        return ()
    return tuple(
        LayerRange(str(r.get("stage")), int(r.get("start", 0)), int(r.get("end", 0)))
        for r in raw
        if isinstance(r, dict)
    )


def _fields(cls, raw: dict) -> dict:
    return {k: raw[k] for k in cls.__dataclass_fields__ if k in raw and raw[k] is not None}


def parse_snapshot(header: Mapping[str, Any], periodic: bool) -> Snapshot:
    active = header.get("active")
    return Snapshot(
        ready=bool(header.get("ready")),
        reason=header.get("reason"),
        epoch=int(header.get("epoch") or 0),
        map=_ranges(header.get("map")),
        num_layers=int(header.get("num_layers") or 0),
        stages=tuple(
            StageStats(**_fields(StageStats, s))
            for s in header.get("stages") or ()
            if isinstance(s, dict) and "name" in s
        ),
        active=None
        if not isinstance(active, list)
        else tuple(
            RequestStats(**_fields(RequestStats, r))
            for r in active
            if isinstance(r, dict) and "rid" in r
        ),
        model=header.get("model"),
        ts=float(header.get("ts") or time.time()),
        periodic=periodic,
    )


def parse_event(header: Mapping[str, Any]) -> ClusterEvent:
    simple = {
        k: header[k]
        for k in ("epoch", "stage", "cause", "lost", "reason", "host")
        if header.get(k) is not None
    }
    return ClusterEvent(
        ts=float(header.get("ts") or time.time()),
        kind=str(header.get("kind", "?")),
        old_map=_ranges(header.get("old_map")),
        new_map=_ranges(header.get("new_map") if "new_map" in header else header.get("map")),
        **simple,
    )


def parse_jobs(header: Mapping[str, Any]) -> Jobs:
    return Jobs(
        tuple(
            Job(**_fields(Job, j))
            for j in header.get("jobs") or ()
            if isinstance(j, dict) and "rid" in j and "outcome" in j
        )
    )


# --- token ids -> text ------------------------------------------------------------------------


def load_tokenizer(model: str | None) -> Any:
    """The checkpoint's tokenizer if it is on this machine, else None (the app shows ids)."""
    if not model or not Path(model).is_dir() or not ships_tokenizer(Path(model)):
        return None
    try:
        from transformers import AutoTokenizer  # deferred: importing it costs a second

        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as e:
        log.warning("tokenizer_unavailable", model=model, error=str(e))
        return None


class TokenText:
    """Turns each request's token ids into per-token text, incrementally, as the client does."""

    def __init__(self, tokenizer: Any = None, max_requests: int = MAX_TEXTS):
        self.tokenizer = tokenizer
        self.max_requests = max_requests
        # rid -> (next position, the request's TextAssembler)
        self.requests: collections.OrderedDict[str, tuple[int, TextAssembler]] = (
            collections.OrderedDict()
        )

    def pieces(self, rid: str, pos: int, ids: list[int]) -> tuple[str, ...] | None:
        """Text for each id, or None for ids already seen (a replay re-sends them)."""
        if self.tokenizer is None:
            return tuple(f"{i} " for i in ids)
        if pos == 0:
            text = self.tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            self._keep(rid, len(ids), TextAssembler(self.tokenizer, ids[-DETOKENIZE_CONTEXT:]))
            return (text, *("" for _ in ids[1:]))
        expected, assembler = self.requests.get(rid, (None, None))
        if expected is not None and pos < expected:
            return None
        if expected is None or pos > expected:
            # We missed the prompt or some steps: decode on from here without context.
            assembler = TextAssembler(self.tokenizer, [])
        out = tuple(assembler.push(i) for i in ids)
        self._keep(rid, pos + len(ids), assembler)
        return out

    def _keep(self, rid: str, next_pos: int, assembler: TextAssembler) -> None:
        self.requests[rid] = (next_pos, assembler)
        self.requests.move_to_end(rid)
        while len(self.requests) > self.max_requests:
            self.requests.popitem(last=False)


# --- the reader thread ------------------------------------------------------------------------


def default_feed(broker: str) -> str:
    return P.feed_endpoint(broker)


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
        admin_token: str | None = None,
        *,
        lost_after_s: float = LOST_AFTER_S,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
        tokenizer_loader: Callable[[str | None], Any] = load_tokenizer,
    ):
        self.broker = broker
        self.feed = feed or default_feed(broker)
        self.admin_token = admin_token
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
            self._post(Link("lost", time.time(), f"monitor reader failed: {e}"))

    def _dealer(self) -> zmq.Socket:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.broker)
        return sock

    def _loop(self) -> None:
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.feed)
        dealer = self._dealer()
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        self._ask_snapshot(dealer)
        link = "connecting"
        last_feed = time.monotonic()
        self._post(Link(link, time.time(), f"waiting for the feed at {self.feed}"))
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
                        self._post(Link(link, time.time()))
                elif link != "lost" and polled_at - last_feed > self.lost_after_s:
                    link = "lost"
                    log.warning("feed_lost", feed=self.feed)
                    self._post(
                        Link(
                            link,
                            time.time(),
                            f"no feed from {self.feed} for {self.lost_after_s:g} s",
                        )
                    )
                    # A fresh DEALER: requests queued to a vanished broker would answer late.
                    poller.unregister(dealer)
                    dealer.close(linger=0)
                    dealer = self._dealer()
                    poller.register(dealer, zmq.POLLIN)
                    self._fail_pending("the broker was lost before it answered")
                self._expire_pending(now)
        finally:
            sub.close(linger=0)
            dealer.close(linger=0)

    def _ask_snapshot(self, dealer: zmq.Socket) -> None:
        self._send(dealer, Cmd.STATUS, {})
        self._send(dealer, Cmd.JOBS, {})

    def _send(self, dealer: zmq.Socket, cmd: Cmd, header: dict, stage: str | None = None) -> None:
        try:
            dealer.send_multipart(P.encode(P.MONITOR_TAG, cmd, header), flags=zmq.NOBLOCK)
            self._pending.append(_Pending(cmd, stage, time.monotonic()))
        except zmq.Again:
            if cmd == Cmd.DRAIN:
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
                topic, msg = P.decode_feed(frames)
            except P.ProtocolError as e:
                log.warning("bad_feed_message", code=str(e.code), reason=e.message)
                continue
            if topic == P.FEED_STATS:
                self._on_snapshot(parse_snapshot(msg.header, periodic=True))
            elif topic == P.FEED_EVENT:
                event = parse_event(msg.header)
                self._last_event_ts = max(self._last_event_ts, event.ts)
                self._post(event)
            elif topic == P.FEED_TOKEN:
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

    def _on_history(self, events: Any) -> None:
        """Events from before we connected, if the broker's STATUS lists them (newer ones only)."""
        if not isinstance(events, list):
            return
        for raw in events:
            if isinstance(raw, dict) and float(raw.get("ts") or 0) > self._last_event_ts:
                event = parse_event(raw)
                self._last_event_ts = event.ts
                self._post(event)

    def _on_tokens(self, msg: P.Message) -> None:
        h = msg.header
        if not isinstance(h.get("rid"), str) or not isinstance(h.get("pos"), int) or not msg.descs:
            return
        ids = [int(i) for i in msg.tensor(0).reshape(-1).tolist()]
        self._active.add(h["rid"])
        pieces = self._text.pieces(h["rid"], h["pos"], ids)
        if pieces is None:
            return
        stage = h.get("stage") if isinstance(h.get("stage"), str) else None
        self._post(Tokens(h["rid"], h["pos"], stage, float(h.get("ts") or 0.0), tuple(ids), pieces))

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
                self._on_snapshot(parse_snapshot(msg.header, periodic=False))
                self._on_history(msg.header.get("events"))
            elif msg.cmd == Cmd.JOBS:
                self._post(parse_jobs(msg.header))
            elif pending is not None and pending.kind == Cmd.DRAIN:
                if msg.cmd == Cmd.PONG:
                    self._post(Notice(f"draining {pending.stage}: its layers move to other stages"))
                else:
                    reason = msg.header.get("message") or msg.header.get("code")
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
            self._send(dealer, Cmd.JOBS, {})
        while True:
            try:
                kind, stage = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "drain":
                header = {"stage": stage, "token": self.admin_token or ""}
                self._send(dealer, Cmd.DRAIN, header, stage=stage)

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


# --- the state the app renders ----------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    pos: int
    text: str
    stage: str | None  # the stage holding the head when it was sent; None for a gap marker
    prompt: bool = False


@dataclass(frozen=True)
class RequestRow:
    rid: str
    status: str  # "active" or the outcome (done, failed, abandoned, finished)
    tokens: int = 0
    tokens_per_s: float = 0.0
    replays: int = 0
    age_s: float | None = None


@dataclass(frozen=True)
class ClusterView:
    """Everything the widgets show, frozen at one moment."""

    now: float
    link: Link
    snapshot: Snapshot | None
    colors: Mapping[str, int]  # stage -> palette index, stable for the session
    throughput: tuple[tuple[str, tuple[float, ...]], ...]
    events: tuple[ClusterEvent, ...]  # the newest, at most MAX_EVENTS
    event_count: int  # events ever seen: widgets write the ones past what they wrote
    epoch: int | None  # of the layer map below
    layer_map: tuple[LayerRange, ...]  # from the newest snapshot or reshard event
    num_layers: int
    requests: tuple[RequestRow, ...]
    selected: str | None
    text: tuple[Piece, ...]  # the selected request's text


@dataclass
class _Text:
    pieces: list[Piece] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.pieces[-1].pos + 1 if self.pieces else 0


class ClusterState:
    """Folds updates into bounded state; `view()` freezes it for the widgets."""

    def __init__(
        self,
        *,
        samples: int = THROUGHPUT_SAMPLES,
        max_events: int = MAX_EVENTS,
        max_texts: int = MAX_TEXTS,
        max_rows: int = MAX_REQUEST_ROWS,
    ):
        self.link = Link("connecting", 0.0)
        self.snapshot: Snapshot | None = None
        self.samples = samples
        self.throughput: dict[str, collections.deque[float]] = {}
        self.colors: dict[str, int] = {}
        self.events: collections.deque[ClusterEvent] = collections.deque(maxlen=max_events)
        self.event_count = 0
        self.max_texts = max_texts
        self.texts: collections.OrderedDict[str, _Text] = collections.OrderedDict()
        self.max_rows = max_rows
        self.rows: collections.OrderedDict[str, RequestRow] = collections.OrderedDict()
        self.notices: list[Notice] = []
        self.epoch: int | None = None
        self.layer_map: tuple[LayerRange, ...] = ()

    def apply(self, update: Update) -> None:
        if isinstance(update, Snapshot):
            self._apply_snapshot(update)
        elif isinstance(update, ClusterEvent):
            self.events.append(update)
            self.event_count += 1
            if update.kind in ("reshard", "ready", "not_ready"):
                # The map changes at once, not at the next stats half a second later.
                self._set_map(update.epoch, update.new_map if update.kind != "not_ready" else ())
            for r in (*update.old_map, *update.new_map):
                self.color(r.stage)
            if update.stage:
                self.color(update.stage)
        elif isinstance(update, Tokens):
            self._apply_tokens(update)
        elif isinstance(update, Jobs):
            self._apply_jobs(update)
        elif isinstance(update, Link):
            self.link = update
        elif isinstance(update, Notice):
            self.notices.append(update)

    def color(self, stage: str) -> int:
        """A stage's palette index: assigned on first sight, kept after it dies."""
        return self.colors.setdefault(stage, len(self.colors))

    def take_notices(self) -> list[Notice]:
        notices, self.notices = self.notices, []
        return notices

    def _set_map(self, epoch: int | None, ranges: tuple[LayerRange, ...]) -> None:
        if epoch is None or self.epoch is None or epoch >= self.epoch:
            self.epoch, self.layer_map = epoch, ranges

    def _apply_snapshot(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self._set_map(snap.epoch, snap.map)
        names = {s.name for s in snap.stages}
        for r in snap.map:
            self.color(r.stage)
        for s in snap.stages:
            self.color(s.name)
            if snap.periodic:
                history = self.throughput.setdefault(s.name, collections.deque(maxlen=self.samples))
                history.append(float(s.tokens_per_s))
        for gone in [n for n in self.throughput if n not in names]:
            del self.throughput[gone]
        if snap.active is None:
            return
        active = {r.rid for r in snap.active}
        for rid, row in list(self.rows.items()):
            if row.status == "active" and rid not in active:
                self.rows[rid] = RequestRow(
                    rid, "finished", row.tokens, 0.0, row.replays, row.age_s
                )
        for r in snap.active:
            self.rows[r.rid] = RequestRow(
                r.rid, "active", r.tokens, r.tokens_per_s, r.replays, r.age_s
            )
        self._trim_rows()

    def _apply_jobs(self, jobs: Jobs) -> None:
        for j in jobs.jobs:
            row = self.rows.get(j.rid)
            if j.outcome == "active":
                continue  # the stats feed is fresher about active requests
            if row is not None or len(self.rows) < self.max_rows:
                self.rows[j.rid] = RequestRow(
                    j.rid, j.outcome, j.tokens, 0.0, j.replays, j.duration_s
                )
        self._trim_rows()

    def _trim_rows(self) -> None:
        while len(self.rows) > self.max_rows:
            victim = next((rid for rid, r in self.rows.items() if r.status != "active"), None)
            self.rows.pop(victim if victim is not None else next(iter(self.rows)))

    def _apply_tokens(self, tokens: Tokens) -> None:
        text = self.texts.get(tokens.rid)
        if text is None or tokens.pos == 0:
            text = self.texts[tokens.rid] = _Text()
        self.texts.move_to_end(tokens.rid)
        while len(self.texts) > self.max_texts:
            self.texts.popitem(last=False)
        if tokens.pos < text.end:
            # A replay re-sends what we have: cut back to where it starts, then append.
            text.pieces = [p for p in text.pieces if p.pos < tokens.pos]
        elif tokens.pos > text.end and text.pieces:
            text.pieces.append(Piece(tokens.pos - 1, GAP, None))
        if tokens.stage:
            self.color(tokens.stage)
        if tokens.rid not in self.rows:
            # Seen before any stats listed it (a short request may finish between two).
            self.rows[tokens.rid] = RequestRow(tokens.rid, "active")
            self._trim_rows()
        prompt = tokens.pos == 0
        for i, piece in enumerate(tokens.pieces):
            text.pieces.append(Piece(tokens.pos + i, piece, tokens.stage, prompt))
        if len(text.pieces) > MAX_PIECES:
            del text.pieces[: len(text.pieces) - MAX_PIECES]

    def text_of(self, rid: str | None) -> tuple[Piece, ...]:
        text = self.texts.get(rid) if rid is not None else None
        return tuple(text.pieces) if text is not None else ()

    def view(self, now: float, selected: str | None = None) -> ClusterView:
        return ClusterView(
            now=now,
            link=self.link,
            snapshot=self.snapshot,
            colors=dict(self.colors),
            throughput=tuple((name, tuple(h)) for name, h in self.throughput.items()),
            events=tuple(self.events),
            event_count=self.event_count,
            epoch=self.epoch,
            layer_map=self.layer_map,
            num_layers=self.snapshot.num_layers
            if self.snapshot
            else max((r.end for r in self.layer_map), default=0),
            requests=tuple(self.rows.values()),
            selected=selected,
            text=self.text_of(selected),
        )
