"""The batching policy: which queued steps form a stage's next FORWARD, and when it leaves.

Functions of the records alone, with no socket and no clock: the broker binds them to its
state and configuration, and a test can queue steps and read off the FORWARDs they form.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

from broker.records import QueuedStep, StageRecord

# A decode FORWARD overtakes a stage's prefills only if they hold this many positions.
OVERTAKE_POSITIONS = 64


def batch_cap(requests: int, lanes: int) -> int:
    """Requests per FORWARD that leave a group for every lane of the pipeline."""
    return max(1, -(-requests // lanes))


def forward_cap(stage: StageRecord, cap: int) -> int:
    """Requests the stage's next FORWARD may carry: its free credits, its batch, the cap."""
    return min(stage.credits - len(stage.inflight), stage.max_batch, cap)


def scan_window(cap: int) -> int:
    """How many requests' first queued steps the choice of one FORWARD looks at."""
    return 4 * cap + 16


def linger_deadline(
    stage: StageRecord, answering: Mapping[str, float], now: float, linger_s: float, cap: int
) -> float | None:
    """Until when the first stage's next FORWARD waits for the requests that were just sent
    a token (`answering`, by when), or None when it leaves now."""
    if not stage.queue or stage.forwards or linger_s <= 0 or len(stage.queue) >= cap:
        return None
    expected = [t for t in answering.values() if now - t < linger_s]
    return min(expected) + linger_s if expected else None


def overtaking(forwards: Iterable[list[QueuedStep]]) -> bool:
    """Whether a decode FORWARD may go to a stage beyond its window: when every FORWARD
    it holds is a prefill and together they hold OVERTAKE_POSITIONS positions or more (a
    long prompt's chunk, or many short prompts that arrived together). The stage runs it
    between two layers of the prefill or before the head, so decode groups wait for one
    layer of it at each stage, not for all of it; a short prompt, which finishes soon, is
    not interrupted."""
    steps = [step for forward in forwards for step in forward]
    return (
        bool(steps)
        and not any(step.item.is_decode for step in steps)
        and sum(step.item.n for step in steps) >= OVERTAKE_POSITIONS
    )


def next_batch(queue: collections.deque[QueuedStep], cap: int, budget: int) -> list[QueuedStep]:
    """Take up to `cap` queued steps, one per request, in order, for one FORWARD.

    A request's steps keep their order: once one of its steps is left in the queue, so
    are its later ones. Steps of other requests may pass it.

    Decode steps and prefills (prompts and their chunks) leave in separate FORWARDs: a
    prefill inside a decode group would hold every token of the group for its own compute
    at each stage. Decode steps go first, but a prefill that a decode FORWARD has passed
    once leads the next FORWARD, so it waits for at most one decode FORWARD per stage.
    Within a prefill FORWARD, a chunk that would exceed the token `budget` waits.
    """
    window = scan_window(cap)
    decode = decode_turn(queue, window)
    taken = take(queue, cap, window, budget, decode)
    if not taken:  # nothing of that kind may leave now: the other kind does
        taken = take(queue, cap, window, budget, not decode)
    return taken


def take(
    queue: collections.deque[QueuedStep], cap: int, window: int, budget: int, decode: bool
) -> list[QueuedStep]:
    """Pop the steps of one FORWARD of the given kind (see `next_batch`)."""
    taken: list[QueuedStep] = []
    kept: list[QueuedStep] = []
    rids: set[str] = set()
    blocked: set[str] = set()
    tokens = 0
    scanned = 0
    while queue and len(taken) < cap and scanned < window:
        step = queue.popleft()
        if step.dead:
            continue
        if step.rid in rids or step.rid in blocked:
            kept.append(step)  # behind an earlier step of its request: not scanned
            continue
        scanned += 1
        n, kind = step.item.n, step.item.is_decode
        if kind != decode or (taken and tokens + n > budget):
            if decode and not kind:
                step.passed = True
            blocked.add(step.rid)
            kept.append(step)
            continue
        taken.append(step)
        rids.add(step.rid)
        tokens += n
    queue.extendleft(reversed(kept))
    return taken


def decode_turn(queue: collections.deque[QueuedStep], window: int) -> bool:
    """Whether the next FORWARD from `queue` is a decode one (else a prefill one).

    A decode step counts only if it may leave now, that is, no earlier step of its request
    is queued (a replay queues a request's prefill and then its decode steps). Only the
    first queued step of each request counts towards `window`, so the chunks of a long
    prompt, queued at once, never hide the decode steps behind them.
    """
    first: QueuedStep | None = None
    waiting: set[str] = set()  # requests with a step ahead in the queue
    scanned = 0
    for step in queue:
        if step.dead or step.rid in waiting:
            continue  # a later step of a waiting request (a long prompt's chunks) is free
        scanned += 1
        if scanned > window:
            break
        if first is None:
            if step.item.is_decode or step.passed:
                return step.item.is_decode
            first = step
        elif step.item.is_decode and step.rid not in waiting:
            return True
        waiting.add(step.rid)
    return first is None
