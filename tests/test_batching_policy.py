"""The batching policy as functions of the records: no broker, no socket, no clock."""

from __future__ import annotations

import collections

from broker import batching
from broker import messages as M
from broker.records import QueuedStep, StageRecord


def _step(k: int, rid: str, n: int, pos: int | None = None) -> QueuedStep:
    """Step `k` of `rid`: `n` tokens at `pos`; one token without a pos is a decode."""
    pos = pos if pos is not None else (0 if n > 1 else 40)
    item = M.Item(rid=rid, pos=pos, n=n, prev=0, hash=0)
    return QueuedStep(
        id=k, rid=rid, seq=k, client=b"c", item=item, frames=[], descs=[], created=0.0
    )


def _queue(*steps: tuple) -> collections.deque[QueuedStep]:
    return collections.deque(_step(k, *spec) for k, spec in enumerate(steps))


def _stage(max_batch: int = 32) -> StageRecord:
    caps = M.Caps(max_batch=max_batch)
    return StageRecord(name="s0", ident=b"s0", caps=caps, credits=8, joined=0.0)


def test_each_forward_takes_one_step_per_request_and_keeps_their_order():
    queue = _queue(("a", 1), ("a", 1), ("b", 1), ("b", 1), ("c", 1))
    a1, a2, b1, b2, c1 = queue
    assert batching.next_batch(queue, cap=8, budget=256) == [a1, b1, c1]
    assert batching.next_batch(queue, cap=8, budget=256) == [a2, b2]
    assert not queue


def test_dead_steps_are_dropped_and_the_cap_holds():
    queue = _queue(*[(f"r{i}", 1) for i in range(5)])
    steps = list(queue)
    steps[0].dead = True
    assert batching.next_batch(queue, cap=2, budget=256) == steps[1:3]
    assert list(queue) == steps[3:]


def test_a_decode_forward_passes_a_prefill_once_then_the_prefill_leads():
    queue = _queue(("p", 32), ("d", 1))
    prefill, decode = queue
    assert batching.next_batch(queue, cap=8, budget=256) == [decode]
    assert prefill.passed
    queue.append(_step(9, "e", 1))
    assert batching.decode_turn(queue, batching.scan_window(8)) is False
    assert batching.next_batch(queue, cap=8, budget=256) == [prefill]


def test_prefills_share_a_forward_up_to_the_token_budget():
    queue = _queue(("p", 40), ("q", 30), ("r", 20))
    p, q, r = queue
    assert batching.take(queue, cap=8, window=32, budget=64, decode=False) == [p, r]
    assert list(queue) == [q]


def test_a_first_step_leaves_even_over_the_budget():
    queue = _queue(("p", 500))
    (p,) = queue
    assert batching.next_batch(queue, cap=8, budget=64) == [p]


def test_the_choice_looks_only_at_the_scan_window():
    """With cap 1 the scan covers 20 requests: a decode step behind 20 prompts is not seen."""
    queue = _queue(*[(f"p{i}", 4) for i in range(20)], ("d", 1))
    assert batching.scan_window(1) == 20
    assert batching.decode_turn(queue, batching.scan_window(1)) is False
    queue.popleft()
    assert batching.decode_turn(queue, batching.scan_window(1)) is True


def test_overtaking_needs_only_prefills_of_enough_positions_in_flight():
    big, small, decode = _step(0, "p", 64), _step(1, "s", 8), _step(2, "d", 1)
    assert not batching.overtaking([])
    assert not batching.overtaking([[small]])
    assert batching.overtaking([[big]])
    assert batching.overtaking([[small], [big]])
    assert not batching.overtaking([[big], [decode]])


def test_the_batch_cap_leaves_a_group_per_lane():
    assert batching.batch_cap(requests=0, lanes=2) == 1
    assert batching.batch_cap(requests=16, lanes=2) == 8
    assert batching.batch_cap(requests=16, lanes=3) == 6


def test_a_forward_carries_no_more_than_credits_batch_and_cap_allow():
    stage = _stage(max_batch=4)
    assert batching.forward_cap(stage, cap=6) == 4
    stage.inflight = {k: _step(k, f"r{k}", 1) for k in range(6)}
    assert batching.forward_cap(stage, cap=6) == 2
    assert batching.forward_cap(_stage(max_batch=32), cap=3) == 3


def test_the_first_stage_lingers_for_requests_about_to_answer():
    stage = _stage()
    stage.queue = _queue(("a", 1))
    answering = {"b": 10.0, "c": 10.25}
    assert batching.linger_deadline(stage, answering, 10.375, 0.5, cap=3) == 10.5
    # A request that was sent its token a whole linger ago is no longer waited for.
    assert batching.linger_deadline(stage, answering, 10.5, 0.5, cap=3) == 10.75
    assert batching.linger_deadline(stage, answering, 10.75, 0.5, cap=3) is None


def test_no_linger_for_a_lone_request_a_full_group_or_a_busy_stage():
    stage = _stage()
    stage.queue = _queue(("a", 1), ("b", 1))
    answering = {"c": 10.0}
    assert batching.linger_deadline(stage, {}, 10.0, 0.008, cap=3) is None
    assert batching.linger_deadline(stage, answering, 10.0, 0.008, cap=2) is None
    assert batching.linger_deadline(stage, answering, 10.0, 0.0, cap=3) is None
    stage.forwards[1] = [_step(9, "d", 1)]
    assert batching.linger_deadline(stage, answering, 10.0, 0.008, cap=3) is None
