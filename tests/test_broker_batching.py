"""How the broker cuts a stage's queue into FORWARDs: one step per request, in order, bounded."""

from __future__ import annotations

import pytest
import zmq

from broker.broker import Broker, BrokerConfig, StageRecord, Step
from stage.checkpoint import open_checkpoint


@pytest.fixture
def broker(checkpoints):
    ctx = zmq.Context()
    b = Broker(
        BrokerConfig(bind="tcp://127.0.0.1:*", forward_tokens=64, feed=None),
        open_checkpoint(checkpoints["llama"]),
        context=ctx,
    )
    yield b
    b.socket.close(linger=0)
    ctx.term()


def _stage() -> StageRecord:
    return StageRecord(name="s0", ident=b"s0", caps={}, credits=32, joined=0.0, max_batch=32)


def _queue(stage: StageRecord, *steps: tuple[str, int]) -> list[Step]:
    out = []
    for k, (rid, n) in enumerate(steps):
        step = Step(
            id=k,
            rid=rid,
            seq=k,
            client=b"c",
            item={"rid": rid, "pos": 0, "n": n},
            frames=[],
            descs=[],
            want_logits=True,
            created=0.0,
        )
        stage.queue.append(step)
        out.append(step)
    return out


def test_one_step_per_request_in_order(broker):
    stage = _stage()
    a1, b1, a2, c1, b2 = _queue(stage, ("a", 1), ("b", 1), ("a", 1), ("c", 1), ("b", 1))
    assert broker.next_batch(stage, cap=32) == [a1, b1, c1]
    assert list(stage.queue) == [a2, b2]  # each request's later step waits, in order
    assert broker.next_batch(stage, cap=32) == [a2, b2]
    assert not stage.queue


def test_cap_and_dead_steps(broker):
    stage = _stage()
    steps = _queue(stage, *[(f"r{i}", 1) for i in range(6)])
    steps[1].dead = True
    assert broker.next_batch(stage, cap=3) == [steps[0], steps[2], steps[3]]
    assert list(stage.queue) == steps[4:]


def test_decode_steps_pass_a_chunk_over_the_token_budget(broker):
    """forward_tokens=64: a 64-token chunk fills a FORWARD; decode steps behind it may not
    join it, but they leave first when a chunk is stuck behind the budget."""
    stage = _stage()
    d1, chunk1, chunk2, d2, d3 = _queue(stage, ("d", 1), ("p", 64), ("p", 64), ("e", 1), ("f", 1))
    # d1 opened the FORWARD: the chunk would exceed the budget, so it and its successor wait;
    # the other requests' decode steps overtake it.
    assert broker.next_batch(stage, cap=32) == [d1, d2, d3]
    assert list(stage.queue) == [chunk1, chunk2]
    # A FORWARD always takes its first step, however large.
    assert broker.next_batch(stage, cap=32) == [chunk1]
    assert broker.next_batch(stage, cap=32) == [chunk2]


def test_batch_cap_leaves_a_group_per_lane(broker):
    broker.lanes = 2
    assert broker.batch_cap() == 1  # no requests: one at a time
    broker.requests = {f"r{i}": object() for i in range(16)}
    assert broker.batch_cap() == 8
    broker.lanes = 3
    assert broker.batch_cap() == 6
