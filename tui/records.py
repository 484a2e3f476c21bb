"""What the monitor's reader hands to the app: the feed's own structs (`broker/messages.py`),
a few frozen records of its own, and the `FeedSource` interface.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from broker.messages import ActiveRequest, ClusterEvent, Jobs, MapRange, StageStatus, Status

__all__ = ["ActiveRequest", "ClusterEvent", "Jobs", "MapRange", "StageStatus", "Status"]


@dataclass(frozen=True)
class Snapshot:
    """One `Broker.status()`: from the periodic stats feed or a STATUS reply."""

    ready: bool
    reason: str | None
    epoch: int
    map: tuple[MapRange, ...]
    num_layers: int
    stages: tuple[StageStatus, ...]
    active: tuple[ActiveRequest, ...] | None  # None: a STATUS reply, which lists no requests
    model: str | None
    ts: float
    periodic: bool  # from the 0.5 s stats feed: one throughput sample per stage
    # "curve" (keys), "loopback" (no keys, this host only) or "insecure" (no keys, off loopback)
    security: str = "loopback"


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
class LinkState:
    """The state of the monitor's link to the broker's feed, posted on each change."""

    state: str  # connecting | up | lost | refused (the broker refused our keys: final)
    since: float  # wall-clock time of the change
    reason: str = ""


@dataclass(frozen=True)
class Notice:
    """A one-off message for the user (the broker's answer to DRAIN)."""

    message: str
    error: bool = False


Update = Snapshot | ClusterEvent | Tokens | Jobs | LinkState | Notice


class FeedSource(Protocol):
    """What the app needs from a reader; tests pass a fake with the same three methods."""

    def start(self, post: Callable[[Update], None]) -> None: ...

    def stop(self) -> None: ...

    def drain(self, stage: str) -> None: ...


# --- status -> snapshot ------------------------------------------------------------------------


def snapshot_of(status: Status, periodic: bool) -> Snapshot:
    return Snapshot(
        ready=status.ready,
        reason=status.reason,
        epoch=status.epoch,
        map=status.map,
        num_layers=status.num_layers,
        stages=status.stages,
        active=status.active if periodic else None,
        model=status.model or None,
        ts=status.ts or time.time(),
        periodic=periodic,
        security=status.security,
    )
