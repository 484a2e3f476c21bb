"""Text for the monitor's panels: stage colours, sizes, times, layer maps and event lines."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from rich.text import Text

from tui.records import ClusterEvent, MapRange
from tui.state import ClusterView

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


def format_map(ranges: Iterable[MapRange]) -> str:
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
