"""The monitor's panels (its two tables are in `tui.tables`): each renders the `ClusterView` it is
posted, and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.color import Color
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widget import Widget
from textual.widgets import RichLog, Sparkline, Static

from tui.format import color_of, fmt_clock, format_event, plural
from tui.records import ClusterEvent
from tui.state import GAP, MAX_EVENTS, ClusterView


class ClusterChanged(Message):
    """A new frozen view of the cluster, posted to every panel."""

    bubble = False

    def __init__(self, view: ClusterView) -> None:
        super().__init__()
        self.view = view


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
        if v.link.state == "refused":
            line.append(" ✖ refused ", "bold white on red")
            extras = [(f"  {v.link.reason}", "red")]
        elif v.link.state == "lost":
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
            if snap.security == "insecure":
                line.append(" ⚠ insecure: no keys off loopback ", "bold white on red")
            active = sum(1 for r in v.requests if r.status == "active")
            extras = [
                (" · CURVE" if snap.security == "curve" else "", "green"),
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
