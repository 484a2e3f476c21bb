"""The monitor's two tables, stages and requests: rows keyed by name, only changed cells rewritten."""

from __future__ import annotations

from rich.text import Text
from textual.coordinate import Coordinate
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey

from tui.format import color_of, fmt_bytes, fmt_ms, plural
from tui.records import StageStatus
from tui.state import ClusterView
from tui.widgets import ClusterChanged

STATE_STYLES = {
    "ready": "green",
    "busy": "bold cyan",
    "loading": "yellow",
    "joining": "yellow",
    "standby": "dim",
    "draining": "magenta",
    "dead": "bold red",
}

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


def stage_cells(s: StageStatus, view: ClusterView) -> tuple[Text | str, ...]:
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
