"""The Textual monitor: widgets that render what the feed reader posts, and nothing else.

Data flows one way. The injected source (a `FeedReader`, or a fake in tests) calls
`LayerlineApp.receive` from its own thread; updates wait in an inbox and are folded into a
`ClusterState` at most every `apply_interval_s`, then one frozen `ClusterView` is posted to each
panel as a `ClusterChanged` message. Panels keep only what they need to redraw in place.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.color import Color
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.coordinate import Coordinate
from textual.message import Message
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import DataTable, Footer, RichLog, Sparkline, Static
from textual.widgets.data_table import ColumnKey

from tui.feed import (
    GAP,
    MAX_EVENTS,
    ClusterEvent,
    ClusterState,
    ClusterView,
    FeedSource,
    LayerRange,
    StageStats,
    Update,
)

# Ten redraws a second is smooth to the eye and leaves the UI thread idle under a token flood.
APPLY_INTERVAL_S = 0.1
# Below this width the panels stack and the requests panel folds away (key r shows it).
WIDE_AT = 120
# Distinct on dark and light themes; a stage keeps its colour for the whole session.
PALETTE = (
    "#5fafff",
    "#ffaf5f",
    "#87d75f",
    "#ff5f87",
    "#af87ff",
    "#5fd7d7",
    "#d7d75f",
    "#ff87d7",
    "#87afaf",
    "#d7875f",
)
STATE_STYLES = {
    "ready": "green",
    "busy": "bold cyan",
    "loading": "yellow",
    "joining": "yellow",
    "standby": "dim",
    "draining": "magenta",
    "dead": "bold red",
}
EVENT_STYLES = {
    "reshard": "bold magenta",
    "dead": "bold red",
    "stalled": "bold red",
    "not_ready": "yellow",
    "ready": "green",
    "join": "cyan",
    "rejoin": "cyan",
    "leave": "magenta",
}
HELP = """\
[b]layerline monitor[/b]: a read-only view of the broker's feed

  [b]q[/b]          quit
  [b]?[/b]          this help (escape closes it)
  [b]d[/b]          drain the selected stage (needs --admin-token)
  [b]r[/b]          show or hide the throughput and requests panels
  [b]tab[/b]        move between the stage table, the event log and the requests
  [b]↑ ↓[/b]        select a stage, or a request to follow its text

Token text is coloured by the stage that held the model's head when the token was sent; the prompt is dim. Without the checkpoint's tokenizer on this machine the text shows token ids.
"""


def color_of(view: ClusterView, stage: str | None) -> str:
    if stage is None or stage not in view.colors:
        return "white"
    return PALETTE[view.colors[stage] % len(PALETTE)]


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n}B"


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1000
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def fmt_clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def format_map(ranges: Iterable[LayerRange]) -> str:
    return " ".join(f"{r.stage}[{r.start},{r.end})" for r in ranges) or "(none)"


def format_event(ev: ClusterEvent, view: ClusterView) -> Text:
    """One log line: time, kind, and what changed (a reshard shows old map → new map)."""
    line = Text.assemble(
        (fmt_clock(ev.ts), "dim"), " ", (f"{ev.kind:<9}", EVENT_STYLES.get(ev.kind, "")), " "
    )

    def stage(name: str | None) -> tuple[str, str]:
        return (name or "?", f"bold {color_of(view, name)}")

    if ev.kind == "reshard":
        line.append(format_map(ev.old_map))
        line.append(" → ", "bold")
        line.append(format_map(ev.new_map) if ev.new_map else "(no map)")
        if ev.lost:
            line.append("  lost=")
            line.append(*stage(ev.lost))
        line.append(f"  cause={ev.cause}")
    elif ev.kind == "ready":
        line.append(format_map(ev.new_map))
    elif ev.kind == "not_ready":
        line.append(ev.reason or "")
    elif ev.kind == "join":
        line.append(*stage(ev.stage))
        line.append(f" joined from {ev.host}" if ev.host else " joined")
    elif ev.kind == "rejoin":
        line.append(*stage(ev.stage))
        line.append(" restarted in place")
    elif ev.kind == "leave":
        line.append(*stage(ev.stage))
        line.append(f" leaving ({ev.cause})" if ev.cause else " leaving")
    elif ev.kind in ("dead", "stalled"):
        line.append(*stage(ev.stage))
        line.append(f" {ev.kind}" + (f" ({ev.cause})" if ev.cause else ""))
    else:
        details = {"stage": ev.stage, "cause": ev.cause, "lost": ev.lost, "reason": ev.reason}
        line.append(" ".join(f"{k}={v}" for k, v in details.items() if v is not None))
    return line


class ClusterChanged(Message):
    """A new frozen view of the cluster, posted to every panel."""

    bubble = False

    def __init__(self, view: ClusterView) -> None:
        super().__init__()
        self.view = view


class FeedArrived(Message):
    """Updates are waiting in the app's inbox (posted once per batch, from any thread)."""


# --- panels -----------------------------------------------------------------------------------


class StatusLine(Widget):
    """One line: connection, readiness and its reason, epoch, sizes, the clock."""

    DEFAULT_CSS = "StatusLine { height: 1; background: $panel; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view: ClusterView | None = None

    def on_cluster_changed(self, message: ClusterChanged) -> None:
        self.view = message.view
        self.refresh()

    def render(self) -> Text:
        v = self.view
        width = self.size.width
        line = Text.assemble((" layerline ", "bold"))
        if v is None:
            return line
        snap = v.snapshot
        if v.link.state == "lost":
            line.append(" ✖ broker lost ", "bold white on red")
            line.append(f" reconnecting… {max(0, v.now - v.link.since):.0f} s", "red")
            extras = [(f"  {v.link.reason}", "dim")]
        elif snap is None:
            line.append(" ◌ connecting ", "bold black on yellow")
            extras = [(f"  {v.link.reason}", "dim")]
        else:
            if snap.ready:
                line.append(" ● ready ", "bold black on green")
            else:
                line.append(" ● not ready ", "bold black on yellow")
                line.append(f" {snap.reason or ''}", "yellow")
            active = sum(1 for r in v.requests if r.status == "active")
            extras = [
                (f"  epoch {snap.epoch}", "bold"),
                (f" · {plural(len(snap.stages), 'stage')}", "dim"),
                (f" · {plural(active, 'request')}", "dim"),
                (f" · {plural(snap.num_layers, 'layer')}", "dim"),
                (f" · {Path(snap.model).name}" if snap.model else "", "dim"),
            ]
        clock = f" {fmt_clock(v.now)} "
        room = width - len(clock)
        for text, style in extras:  # in order of importance: stop at the first that does not fit
            if line.cell_len + len(text) > room:
                break
            line.append(text, style)
        if line.cell_len <= room:
            line.append(" " * (room - line.cell_len))
            line.append(clock, "bold")
        line.truncate(width, overflow="ellipsis")
        return line


class MapBar(Widget):
    """Which stage holds which layers: one coloured segment per stage, layer numbers below."""

    DEFAULT_CSS = "MapBar { height: 2; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view: ClusterView | None = None

    def on_cluster_changed(self, message: ClusterChanged) -> None:
        v = message.view
        old = self.view
        self.view = v
        if old is None or (old.layer_map, old.epoch, old.colors) != (
            v.layer_map,
            v.epoch,
            v.colors,
        ):
            self.border_title = (
                f"layer map · epoch {v.epoch}" if v.epoch is not None else "layer map"
            )
            self.border_subtitle = plural(v.num_layers, "layer") if v.num_layers else ""
            self.refresh()

    def render(self) -> Text:
        v = self.view
        width = self.content_size.width
        if v is None or not v.layer_map or width <= 0:
            reason = v.snapshot.reason if v is not None and v.snapshot is not None else None
            return Text(f"no layer map: {reason or 'waiting for the broker'}", style="yellow")
        layers = max(v.num_layers, max(r.end for r in v.layer_map))
        bar, axis = Text(), [" "] * width
        col = 0
        for r in v.layer_map:
            a, b = max(col, r.start * width // layers), max(col, r.end * width // layers)
            if b == a and a < width:
                b = a + 1  # a stage with few layers still shows
            if a > col:
                bar.append(" " * (a - col))
            label = next(
                (t for t in (f"{r.stage} [{r.start},{r.end})", r.stage) if len(t) + 2 <= b - a),
                r.stage if len(r.stage) <= b - a else "",
            )
            bar.append(label.center(b - a), f"bold black on {color_of(v, r.stage)}")
            self._mark(axis, a, str(r.start))
            col = b
        self._mark(axis, width - len(str(layers)), str(layers))
        bar.append("\n")
        bar.append("".join(axis), "dim")
        return bar

    @staticmethod
    def _mark(axis: list[str], at: int, label: str) -> None:
        if at < 0 or at + len(label) > len(axis):
            return
        if all(c == " " for c in axis[max(0, at - 1) : at + len(label) + 1]):
            axis[at : at + len(label)] = list(label)


STAGE_COLUMNS = (
    ("stage", "Stage"),
    ("layers", "Layers"),
    ("state", "State"),
    ("tps", "tok/s"),
    ("p50", "p50 ms"),
    ("p99", "p99 ms"),
    ("queue", "Queue"),
    ("credits", "Busy"),
    ("kv", "KV cache"),
    ("memory", "Memory"),
    ("host", "Host"),
)


def stage_cells(s: StageStats, view: ClusterView) -> tuple[Text | str, ...]:
    num = lambda value: Text(value, justify="right")  # noqa: E731
    layers = f"[{s.start},{s.end})" if s.end > s.start else "—"
    kv = f"{fmt_bytes(s.kv_bytes)} ({s.kv_requests})" if s.kv_requests is not None else "–"
    memory = fmt_bytes(s.rss_bytes)
    if s.memory_bytes:
        memory += f"/{fmt_bytes(s.memory_bytes)}"
    return (
        Text.assemble(("█ ", color_of(view, s.name)), s.name),
        layers,
        Text(s.state, style=STATE_STYLES.get(s.state, "")),
        num(f"{s.tokens_per_s:.1f}"),
        num(fmt_ms(s.p50_s)),
        num(fmt_ms(s.p99_s)),
        num(str(s.queued)),
        num(f"{s.inflight}/{s.credits}"),
        num(kv),
        num(memory),
        s.host or "–",
    )


def update_row(table: DataTable, row: str, columns: tuple, cells: tuple, old: tuple) -> None:
    """Rewrite the cells that changed. A column only ever widens: narrowing it would measure
    every cell of the column, per update, which is what makes 50-row tables slow."""
    for (key, _), new, was in zip(columns, cells, old, strict=True):
        if new != was:
            wider = len(new) > table.columns[ColumnKey(key)].content_width
            table.update_cell(row, key, new, update_width=wider)


class StageTable(DataTable):
    """One row per stage, keyed by name; a stats update rewrites only the cells that changed."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.cells: dict[str, tuple] = {}

    def on_mount(self) -> None:
        self.border_title = "stages"
        for key, label in STAGE_COLUMNS:
            self.add_column(label, key=key)

    def on_cluster_changed(self, message: ClusterChanged) -> None:
        v = message.view
        stages = v.snapshot.stages if v.snapshot is not None else ()
        names = {s.name for s in stages}
        for gone in [n for n in self.cells if n not in names]:
            self.remove_row(gone)
            del self.cells[gone]
        for s in stages:
            cells = stage_cells(s, v)
            old = self.cells.get(s.name)
            if old is None:
                self.add_row(*cells, key=s.name)
            else:
                update_row(self, s.name, STAGE_COLUMNS, cells, old)
            self.cells[s.name] = cells
        # Rows follow the pipeline (layer order, standby last); sort only when that changed.
        rank = {s.name: (s.start if s.end > s.start else 1 << 30, s.name) for s in stages}
        if [row.key.value for row in self.ordered_rows] != sorted(rank, key=rank.__getitem__):
            # The stage cell is "█ name" (see stage_cells).
            self.sort("stage", key=lambda cell: rank[cell.plain[2:]])
        self.border_subtitle = plural(len(stages), "stage")

    def selected_stage(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(Coordinate(self.cursor_row, 0)).row_key.value


class SparkLabel(Widget):
    """A stage's swatch, name and current tok/s; fixed width, so an update never re-lays out."""

    DEFAULT_CSS = "SparkLabel { width: 18; height: 1; }"

    def __init__(self, name: str, color: str) -> None:
        super().__init__()
        self.stage, self.color, self.value = name, color, 0.0

    def render(self) -> Text:
        return Text.assemble(
            ("█ ", self.color), f"{self.stage:<8.8}", (f"{self.value:>7.1f}", "bold")
        )


class SparkRow(Horizontal):
    DEFAULT_CSS = """
    SparkRow { height: 1; }
    SparkRow > Sparkline { width: 1fr; }
    """

    def __init__(self, name: str, color: str) -> None:
        super().__init__()
        self.stage = name
        self.label = SparkLabel(name, color)
        self.spark = Sparkline([], min_color=Color.parse(color).with_alpha(0.3), max_color=color)

    def compose(self) -> ComposeResult:
        yield self.label
        yield self.spark

    def show(self, history: tuple[float, ...]) -> None:
        value = history[-1] if history else 0.0
        if value != self.label.value:
            self.label.value = value
            self.label.refresh()
        self.spark.data = list(history)


class ThroughputPanel(VerticalScroll):
    """Tokens per second of each stage over the last half minute, one sparkline per stage."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rows: dict[str, SparkRow] = {}

    def on_mount(self) -> None:
        self.border_title = "throughput · tok/s"

    def on_cluster_changed(self, message: ClusterChanged) -> None:
        v = message.view
        names = {name for name, _ in v.throughput}
        for gone in [n for n in self.rows if n not in names]:
            self.rows.pop(gone).remove()
        new = []
        for name, history in v.throughput:
            row = self.rows.get(name)
            if row is None:
                row = self.rows[name] = SparkRow(name, color_of(v, name))
                new.append(row)
            else:
                row.show(history)
        if new:
            self.mount(*new)
            for row in new:
                row.show(dict(v.throughput)[row.stage])


class EventLog(RichLog):
    """Cluster events as they happen; capped, and written only for events it has not shown.

    Lines are wrapped to the panel's width when written, so a new width rewrites them.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(max_lines=MAX_EVENTS, min_width=20, wrap=True, markup=False, **kwargs)
        self.view: ClusterView | None = None
        self.written = 0  # event_count up to which lines exist
        self.wrapped_at: int | None = None

    def on_mount(self) -> None:
        self.border_title = "events"

    def on_cluster_changed(self, message: ClusterChanged) -> None:
        v = self.view = message.view
        new = v.event_count - self.written
        if self.wrapped_at is not None and new > 0:
            self.add_lines(v.events[-min(new, len(v.events)) :], clear=new >= self.max_lines)

    def on_resize(self) -> None:
        width = self.scrollable_content_region.width
        if width > 0 and width != self.wrapped_at:
            self.wrapped_at = width
            if self.view is not None:
                self.add_lines(self.view.events[-self.max_lines :], clear=True)

    def add_lines(self, events: Iterable[ClusterEvent], clear: bool) -> None:
        if clear:
            self.clear()
        for ev in events:
            self.write(format_event(ev, self.view), width=self.wrapped_at, scroll_end=False)
        self.written = self.view.event_count
        self.border_subtitle = plural(self.view.event_count, "event")
        self.scroll_end(animate=False, immediate=False)


REQUEST_COLUMNS = (
    ("rid", "Request"),
    ("status", "State"),
    ("tokens", "Tokens"),
    ("tps", "tok/s"),
    ("replays", "Replays"),
    ("age", "Age s"),
)


class RequestTable(DataTable):
    """Active requests, then recently finished ones; the highlighted row's text is shown."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", **kwargs)
        self.cells: dict[str, tuple] = {}

    def on_mount(self) -> None:
        self.border_title = "requests"
        for key, label in REQUEST_COLUMNS:
            self.add_column(label, key=key)

    def on_cluster_changed(self, message: ClusterChanged) -> None:
        v = message.view
        rows = {r.rid: r for r in v.requests}
        for gone in [rid for rid in self.cells if rid not in rows]:
            self.remove_row(gone)
            del self.cells[gone]
        for r in v.requests:
            style = (
                "bold green" if r.status == "active" else "red" if r.status == "failed" else "dim"
            )
            cells = (
                r.rid,
                Text(r.status, style=style),
                Text(str(r.tokens), justify="right"),
                Text(f"{r.tokens_per_s:.1f}" if r.status == "active" else "–", justify="right"),
                Text(str(r.replays), justify="right"),
                Text("–" if r.age_s is None else f"{r.age_s:.1f}", justify="right"),
            )
            old = self.cells.get(r.rid)
            if old is None:
                self.add_row(*cells, key=r.rid)
            else:
                update_row(self, r.rid, REQUEST_COLUMNS, cells, old)
            self.cells[r.rid] = cells
        active = sum(1 for r in v.requests if r.status == "active")
        self.border_subtitle = f"{active} active"
        # Unless the user is in this table, move on from a finished request to the newest active one.
        current = rows.get(self.selected_request() or "")
        newest = next((r.rid for r in reversed(v.requests) if r.status == "active"), None)
        if (
            newest is not None
            and not self.has_focus
            and (current is None or current.status != "active")
        ):
            self.move_cursor(row=self.get_row_index(newest))

    def selected_request(self) -> str | None:
        if not self.row_count:
            return None
        return self.coordinate_to_cell_key(Coordinate(self.cursor_row, 0)).row_key.value


class RequestText(VerticalScroll):
    """The selected request's text as it streams, each token coloured by its stage."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.body = Static()
        self.shown: tuple = ()

    def compose(self) -> ComposeResult:
        yield self.body

    def on_mount(self) -> None:
        self.border_title = "text"

    def on_cluster_changed(self, message: ClusterChanged) -> None:
        v = message.view
        key = (v.selected, len(v.text), v.text[-1] if v.text else None, tuple(v.colors))
        if key == self.shown:
            return
        self.shown = key
        text, run, run_style = Text(), [], ""
        for piece in v.text:  # one span per run of same-coloured tokens, not one per token
            if piece.prompt:
                style = "dim"
            elif piece.stage is None and piece.text == GAP:
                style = "bold red"
            else:
                style = color_of(v, piece.stage)
            if style != run_style and run:
                text.append("".join(run), run_style)
                run = []
            run.append(piece.text)
            run_style = style
        if run:
            text.append("".join(run), run_style)
        if v.selected is None:
            text = Text("no request selected", style="dim")
        elif not v.text:
            text = Text("no tokens seen yet", style="dim")
        self.border_title = f"text · {v.selected}" if v.selected else "text"
        at_end = self.scroll_y >= self.max_scroll_y
        self.body.update(text)
        if at_end:
            self.scroll_end(animate=False, immediate=False)


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static {
        width: 76; max-width: 100%; height: auto; padding: 1 2;
        border: round $accent; background: $surface;
    }
    """
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Close"),
        Binding("question_mark", "app.pop_screen", "Close"),
    ]

    def compose(self) -> ComposeResult:
        yield Static(HELP.strip(), id="help")


# --- the app ----------------------------------------------------------------------------------


class LayerlineApp(App[None]):
    """`LayerlineApp(source, clock)`: `source` is a FeedReader or a fake with its interface."""

    TITLE = "layerline"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-compact"), (WIDE_AT, "-wide")]
    CSS = """
    #map { height: 4; border: round $primary 60%; padding: 0 1; }
    #body { height: 1fr; }
    #main { width: 3fr; }
    #side { width: 2fr; max-width: 64; }
    #stages { height: auto; max-height: 50%; border: round $primary 60%; }
    #events {
        height: 1fr; border: round $primary 60%;
        scrollbar-size-vertical: 1; scrollbar-gutter: stable; overflow-x: hidden;
    }
    #throughput { height: auto; max-height: 40%; border: round $primary 60%; }
    #requests { height: auto; max-height: 12; border: round $primary 60%; }
    #text { height: 1fr; border: round $primary 60%; }
    DataTable:focus { border: round $accent; }
    Screen.-compact #map { height: 2; border: none; padding: 0; }
    Screen.-compact #side { display: none; }
    Screen.-compact #main { width: 1fr; }
    Screen.-compact #stages { max-height: 40%; scrollbar-size-horizontal: 0; }
    Screen.-compact.-show-side #side { display: block; width: 1fr; }
    Screen.-compact.-show-side #main { display: none; }
    Screen.-wide.-hide-side #side { display: none; }
    Screen.-stale #body, Screen.-stale #map { text-opacity: 50%; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("d", "drain", "Drain stage"),
        Binding("r", "toggle_side", "Requests"),
    ]

    def __init__(
        self,
        source: FeedSource,
        clock: Callable[[], float] = time.time,
        *,
        apply_interval_s: float = APPLY_INTERVAL_S,
    ) -> None:
        super().__init__()
        self.source = source
        self.clock = clock
        self.apply_interval_s = apply_interval_s
        self.state = ClusterState()
        self.selected: str | None = None
        self.inbox: collections.deque[Update] = collections.deque()
        self.wake_posted = False
        self.last_apply = 0.0
        self.batches = 0  # how many times the inbox was folded in (tests check coalescing)
        self.panels: list[Widget] = []

    def compose(self) -> ComposeResult:
        yield StatusLine(classes="view")
        yield MapBar(classes="view", id="map")
        with Horizontal(id="body"):
            with Vertical(id="main"):
                yield StageTable(classes="view", id="stages")
                yield EventLog(classes="view", id="events")
            with Vertical(id="side"):
                yield ThroughputPanel(classes="view", id="throughput")
                yield RequestTable(classes="view", id="requests")
                yield RequestText(classes="view", id="text")
        yield Footer()

    def on_mount(self) -> None:
        self.panels = list(self.query(".view"))
        self.publish()
        self.set_interval(1.0, self.publish)  # the clock and "lost for N s" move on their own
        self.source.start(self.receive)

    def on_unmount(self) -> None:
        self.source.stop()

    # --- from the source (any thread) ---

    def receive(self, update: Update) -> None:
        """The source's callback; thread-safe. One wake-up message per batch of updates."""
        self.inbox.append(update)
        if not self.wake_posted:
            self.wake_posted = True
            self.post_message(FeedArrived())

    def on_feed_arrived(self, _: FeedArrived) -> None:
        wait = self.last_apply + self.apply_interval_s - time.monotonic()
        if wait > 0:
            self.set_timer(wait, self.apply_inbox)
        else:
            self.apply_inbox()

    def apply_inbox(self) -> None:
        # Clear the flag before draining: an update appended after the drain posts a new wake-up.
        self.wake_posted = False
        inbox = self.inbox
        while inbox:
            self.state.apply(inbox.popleft())
        self.last_apply = time.monotonic()
        self.batches += 1
        for notice in self.state.take_notices():
            self.notify(
                notice.message, severity="error" if notice.error else "information", timeout=8
            )
        self.publish()

    def publish(self) -> None:
        if not self.screen_stack:
            return  # shutting down: a last feed update may still arrive
        view = self.state.view(self.clock(), self.selected)
        # The last known values stay on screen, dimmed, while the broker is lost.
        self.screen_stack[0].set_class(view.link.state == "lost", "-stale")
        for panel in self.panels:
            panel.post_message(ClusterChanged(view))

    # --- user ---

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if isinstance(event.data_table, RequestTable) and event.row_key.value != self.selected:
            self.selected = event.row_key.value
            self.publish()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_drain(self) -> None:
        stage = self.query_one(StageTable).selected_stage()
        if stage is None:
            self.notify("no stage selected", severity="warning")
            return
        self.source.drain(stage)
        self.notify(f"asked the broker to drain {stage}…", timeout=4)

    def action_toggle_side(self) -> None:
        main = self.screen_stack[0]
        main.toggle_class("-show-side" if main.has_class("-compact") else "-hide-side")
