"""How the broker cuts a stage's queue into FORWARDs: one step per request, in order, bounded."""

from __future__ import annotations

import msgspec
import pytest
import zmq

from broker import messages as M
from broker.broker import Broker
from broker.records import BrokerConfig, QueuedStep, StageRecord
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
    return StageRecord(name="s0", ident=b"s0", caps=M.Caps(max_batch=32), credits=32, joined=0.0)


def _queue(stage: StageRecord, *steps: tuple[str, int] | tuple[str, int, int]) -> list[QueuedStep]:
    """Queue steps given as (rid, n) or (rid, n, pos); one token without a pos is a decode."""
    out = []
    for k, (rid, n, *at) in enumerate(steps):
        pos = at[0] if at else (0 if n > 1 else 40)
        step = QueuedStep(
            id=k,
            rid=rid,
            seq=k,
            client=b"c",
            item=M.Item(rid=rid, pos=pos, n=n, prev=0, hash=0),
            frames=[],
            descs=[],
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


def test_prefill_chunks_share_a_forward_up_to_the_token_budget(broker):
    """forward_tokens=64: a FORWARD always takes its first step, however large; a chunk that
    would pass the budget waits, and prompts of other requests that fit go ahead of it."""
    stage = _stage()
    p1, q1, q2, r1 = _queue(stage, ("p", 40), ("q", 64, 0), ("q", 64, 64), ("r", 24))
    assert broker.next_batch(stage, cap=32) == [p1, r1]
    assert broker.next_batch(stage, cap=32) == [q1]
    assert broker.next_batch(stage, cap=32) == [q2]
    assert not stage.queue


def test_decode_steps_go_before_a_prefill_and_never_with_it(broker):
    """A prefill in a decode group would hold the group's tokens for its compute at every
    stage: decode FORWARDs go first, and a prefill passed once leads the next FORWARD."""
    stage = _stage()
    p1, d1, d2, one = _queue(stage, ("p", 32), ("d", 1), ("e", 1), ("o", 1, 0))
    assert broker.next_batch(stage, cap=32) == [d1, d2]  # a one-token prompt is a prefill
    assert list(stage.queue) == [p1, one] and p1.passed and one.passed
    (d3,) = _queue(stage, ("d", 1))
    assert broker.next_batch(stage, cap=32) == [p1, one]  # passed once: they lead now
    assert broker.next_batch(stage, cap=32) == [d3]
    # Only prefills queued: they leave together without waiting for decode steps.
    chunk, prompt = _queue(stage, ("c", 16), ("n", 8))
    assert broker.next_batch(stage, cap=32) == [chunk, prompt] and not chunk.passed


def test_batch_cap_leaves_a_group_per_lane(broker):
    broker.lanes = 2
    assert broker.batch_cap() == 1  # no requests: one at a time
    broker.requests = {f"r{i}": object() for i in range(16)}
    assert broker.batch_cap() == 8
    broker.lanes = 3
    assert broker.batch_cap() == 6


def test_a_replayed_request_leaves_prefill_first(broker):
    """A replay queues a request's prefill and then its decode steps: those decode steps
    cannot leave before the prefill, so they never make the turn a decode one."""
    stage = _stage()
    prefill, d1, d2 = _queue(stage, ("r", 9, 0), ("r", 1, 9), ("r", 1, 10))
    assert broker.next_batch(stage, cap=32) == [prefill]
    assert broker.next_batch(stage, cap=32) == [d1]
    assert broker.next_batch(stage, cap=32) == [d2]
    # Beside another request's decode step, which may leave now, the decode goes first.
    prefill, d1, other = _queue(stage, ("r", 9, 0), ("r", 1, 9), ("o", 1))
    assert broker.next_batch(stage, cap=32) == [other]
    assert broker.next_batch(stage, cap=32) == [prefill]
    assert broker.next_batch(stage, cap=32) == [d1]


def test_decode_steps_behind_a_long_prompts_chunks_still_go_first(broker):
    """A long prompt queues all its chunks at once; they cannot leave before their first, so
    they do not use up the scan: decode steps queued behind 64 of them still go first."""
    stage = _stage()
    chunks = _queue(stage, *[("long", 16, 16 * k) for k in range(64)])
    d1, d2 = _queue(stage, ("d", 1), ("e", 1))
    assert broker.next_batch(stage, cap=2) == [d1, d2]
    assert broker.next_batch(stage, cap=2) == [chunks[0]]  # passed once: it leads now
    (d3,) = _queue(stage, ("d", 1))
    assert broker.next_batch(stage, cap=2) == [d3]
    assert broker.next_batch(stage, cap=2) == [chunks[1]]
    assert list(stage.queue) == chunks[2:]


def test_the_advised_prefill_chunk_follows_the_stages_devices(broker):
    """Small chunks while any stage computes on a CPU, large ones when every stage has an
    accelerator (a forward there costs about the same up to a thousand tokens)."""
    from broker.layermap import assign_uniform
    from common.defaults import ACCELERATOR_PREFILL_CHUNK, CPU_PREFILL_CHUNK

    assert broker.prefill_chunk() == CPU_PREFILL_CHUNK  # no map yet
    for name, device in (("a", "cuda"), ("b", "cpu")):
        broker.stages[name] = StageRecord(
            name=name, ident=name.encode(), caps=M.Caps(device=device), credits=32, joined=0.0
        )
    broker.layer_map = assign_uniform(["a", "b"], 5)
    assert broker.prefill_chunk() == CPU_PREFILL_CHUNK
    b = broker.stages["b"]
    b.caps = msgspec.structs.replace(b.caps, device="cuda:1")
    assert broker.prefill_chunk() == ACCELERATOR_PREFILL_CHUNK
    assert broker.status().prefill_chunk == ACCELERATOR_PREFILL_CHUNK


def test_a_decode_forward_overtakes_only_prefills_in_flight(broker):
    """Beyond its window a stage gets a decode FORWARD only while every FORWARD it holds is a
    prefill, of 64 positions or more in all: it runs the decode steps between two layers."""
    stage = _stage()
    assert not broker.overtaking(stage)  # nothing in flight: the window decides
    prompt, short, tiny, decode = _queue(stage, ("p", 64), ("s", 63), ("t", 1, 0), ("d", 1))
    stage.queue.clear()
    stage.forwards[1] = [short]
    assert not broker.overtaking(stage)  # a short prompt finishes soon: not interrupted
    stage.forwards[1] = [prompt]
    assert broker.overtaking(stage)
    stage.forwards[1] = [short, tiny]  # prompts that arrived together: 64 positions in all
    assert broker.overtaking(stage)
    stage.forwards[1] = [short, prompt]
    assert broker.overtaking(stage)
    stage.forwards[2] = [decode]
    assert not broker.overtaking(stage)
