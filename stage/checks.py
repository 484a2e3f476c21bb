"""Checks of a FORWARD before anything is computed: each item against this stage's cache.

A FORWARD that cannot run at all (stale epoch, standby, a request twice) raises `Refused`; an
item that must not run (lost cache, wrong position or prefix) becomes the `M.Refusal` of that
item alone, and the others run as if it were not there. What the FORWARD's struct guarantees
(ids, positions, one frame per item) was checked when it was decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from broker import messages as M
from broker.messages import Code
from broker.protocol import Message, prefix_hash
from stage.kvcache import KVStore
from stage.shard import ContextOverflow, KVState, Shard, ShardError


class Refused(Exception):
    """A FORWARD, or one of its items, that must not be computed."""

    def __init__(self, code: Code, message: str, rid: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.rid = rid


@dataclass(frozen=True)
class CheckedItem:
    """An item cleared to run: the item, its input, and a new cache when it starts at 0."""

    item: M.Item
    x: torch.Tensor
    fresh: KVState | None


def check_forward(
    msg: Message, shard: Shard | None, epoch: int | None, store: KVStore
) -> list[CheckedItem | M.Refusal]:
    """Check a FORWARD before anything is computed: per item, what runs or the refusal of that
    item. A problem with the FORWARD as a whole raises Refused."""
    forward: M.Forward = msg.body
    if forward.epoch != epoch:
        raise Refused(
            Code.STALE_EPOCH,
            f"step is for epoch {forward.epoch} but this stage serves {epoch}",
        )
    if shard is None:
        raise Refused(Code.BAD_REQUEST, "this stage holds no layers (standby)")
    if not forward.items:
        raise Refused(Code.BAD_REQUEST, "FORWARD has no items")
    seen: set[str] = set()
    for item in forward.items:
        if item.rid in seen:
            raise Refused(
                Code.BAD_REQUEST, f"request {item.rid} appears twice in one step", item.rid
            )
        seen.add(item.rid)
    plan: list[CheckedItem | M.Refusal] = []
    for i, item in enumerate(forward.items):
        try:
            plan.append(check_item(item, msg.tensor(i), shard, store))
        except Refused as r:
            plan.append(M.Refusal(i=i, rid=item.rid, code=r.code, message=r.message))
    return plan


def check_item(item: M.Item, x: torch.Tensor, shard: Shard, store: KVStore) -> CheckedItem:
    """One item against the request's cache: position, shape, prefix hash; raises Refused."""
    rid, pos, n = item.rid, item.pos, item.n
    if pos + n > shard.max_positions:
        raise Refused(
            Code.CONTEXT_OVERFLOW,
            f"positions up to {pos + n} exceed the model's context {shard.max_positions}",
            rid,
        )
    if x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != n:
        raise Refused(
            Code.BAD_REQUEST,
            f"input of shape {list(x.shape)} does not hold [1, {n}, ...]",
            rid,
        )
    if pos == 0:
        if item.prev != 0:
            raise Refused(
                Code.CACHE_MISMATCH,
                "a step at position 0 must have prev 0 (the empty prefix)",
                rid,
            )
        fresh = state = shard.new_cache()
    else:
        fresh = None
        entry = store.get(rid)
        if entry is None:
            raise Refused(
                Code.CACHE_MISS,
                f"no cache for request {rid} at position {pos}; replay it",
                rid,
            )
        if entry.state.length != pos:
            raise Refused(
                Code.CACHE_MISMATCH,
                f"step starts at position {pos} but the cache of {rid} holds {entry.state.length}",
                rid,
            )
        if entry.hash != item.prev:
            raise Refused(
                Code.CACHE_MISMATCH,
                f"prefix hash {item.prev} does not match the cache of {rid}",
                rid,
            )
        state = entry.state
    try:
        shard.check_inputs(x, state, pos)
    except ContextOverflow as e:
        raise Refused(Code.CONTEXT_OVERFLOW, str(e), rid) from None
    except ShardError as e:
        raise Refused(Code.BAD_REQUEST, str(e), rid) from None
    if shard.first and prefix_hash(item.prev, x.view(-1).tolist()) != item.hash:
        raise Refused(
            Code.CACHE_MISMATCH,
            f"hash {item.hash} is not the prefix hash of {rid}'s tokens "
            f"[0, {pos + n}) given prev {item.prev}",
            rid,
        )
    return CheckedItem(item, x, fresh)
