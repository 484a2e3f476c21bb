"""What the monitor's reader hands to the app: small frozen records, the `FeedSource` interface,
and the parsers from feed headers to records (tolerant: the broker may add or omit fields).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol


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


# --- header -> records ------------------------------------------------------------------------


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
