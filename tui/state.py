"""The state the monitor renders: `ClusterState` folds the reader's records into bounded history,
and `ClusterState.view()` freezes it into a `ClusterView` that widgets render. The app never sees
a frame or a socket.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field

from broker.messages import is_decode
from tui.records import (
    ClusterEvent,
    Jobs,
    LinkState,
    MapRange,
    Notice,
    Snapshot,
    Tokens,
    Update,
)

# 60 samples of a 0.5 s feed: the last half minute of throughput per stage.
THROUGHPUT_SAMPLES = 60
MAX_EVENTS = 2000
MAX_TEXTS = 200  # requests whose streamed text is kept
MAX_PIECES = 4096  # tokens of text kept per request (the tail)
MAX_REQUEST_ROWS = 50
GAP = "…"  # tokens the feed dropped (a slow monitor loses feed messages, by design)


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
    link: LinkState
    snapshot: Snapshot | None
    colors: Mapping[str, int]  # stage -> palette index, stable for the session
    throughput: tuple[tuple[str, tuple[float, ...]], ...]
    events: tuple[ClusterEvent, ...]  # the newest, at most MAX_EVENTS
    event_count: int  # events ever seen: widgets write the ones past what they wrote
    epoch: int | None  # of the layer map below
    layer_map: tuple[MapRange, ...]  # from the newest snapshot or reshard event
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
        self.link = LinkState("connecting", 0.0)
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
        self.layer_map: tuple[MapRange, ...] = ()

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
        elif isinstance(update, LinkState):
            self.link = update
        elif isinstance(update, Notice):
            self.notices.append(update)

    def color(self, stage: str) -> int:
        """A stage's palette index: assigned on first sight, kept after it dies."""
        return self.colors.setdefault(stage, len(self.colors))

    def take_notices(self) -> list[Notice]:
        notices, self.notices = self.notices, []
        return notices

    def _set_map(self, epoch: int | None, ranges: tuple[MapRange, ...]) -> None:
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
        prompt = not is_decode(tokens.pos, len(tokens.ids))
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
