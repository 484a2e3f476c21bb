"""Checks of a FORWARD before anything is computed: each item against this stage's cache.

A FORWARD that cannot run at all (stale epoch, standby, malformed) raises a `Refusal`; an
item that must not run (lost cache, wrong position or prefix) becomes the `Refusal` of that
item alone, and the others run as if it were not there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from broker.protocol import Code, Message, prefix_hash
from stage.kvcache import KVStore
from stage.shard import ContextOverflow, KVState, Shard, ShardError


class Refusal(Exception):
    """A FORWARD item that must not be computed; becomes one ERROR for the step."""

    def __init__(self, code: Code, message: str, rid: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.rid = rid


@dataclass(frozen=True)
class CheckedItem:
    """An item cleared to run: its header, its input, and a new cache when it starts at 0."""

    item: dict
    x: torch.Tensor
    fresh: KVState | None


def check_forward(
    msg: Message, shard: Shard | None, epoch: int | None, store: KVStore
) -> list[CheckedItem | Refusal]:
    """Check a FORWARD before anything is computed: per item, what runs or the Refusal of that
    item. A problem with the FORWARD as a whole raises Refusal."""
    header = msg.header
    items = header["items"]
    if header["epoch"] != epoch:
        raise Refusal(
            Code.STALE_EPOCH,
            f"step is for epoch {header['epoch']} but this stage serves {epoch}",
        )
    if shard is None:
        raise Refusal(Code.BAD_REQUEST, "this stage holds no layers (standby)")
    if not items:
        raise Refusal(Code.BAD_REQUEST, "FORWARD has no items")
    if len(msg.frames) != len(items):
        raise Refusal(
            Code.BAD_REQUEST, f"FORWARD has {len(items)} items but {len(msg.frames)} tensors"
        )
    seen: set[str] = set()
    for item in items:
        if item["rid"] in seen:
            raise Refusal(
                Code.BAD_REQUEST,
                f"request {item['rid']} appears twice in one step",
                item["rid"],
            )
        seen.add(item["rid"])
    plan: list[CheckedItem | Refusal] = []
    for i, item in enumerate(items):
        try:
            plan.append(check_item(item, msg.tensor(i), shard, store))
        except Refusal as r:
            plan.append(r)
    return plan


def check_item(item: dict, x: torch.Tensor, shard: Shard, store: KVStore) -> CheckedItem:
    """One item against the request's cache: position, shape, prefix hash; raises Refusal."""
    rid, pos, n = item["rid"], item["pos"], item["n"]
    if pos < 0 or n < 1:
        raise Refusal(Code.BAD_REQUEST, f"bad position {pos} or token count {n}", rid)
    if pos + n > shard.max_positions:
        raise Refusal(
            Code.CONTEXT_OVERFLOW,
            f"positions up to {pos + n} exceed the model's context {shard.max_positions}",
            rid,
        )
    if x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != n:
        raise Refusal(
            Code.BAD_REQUEST,
            f"input of shape {list(x.shape)} does not hold [1, {n}, ...]",
            rid,
        )
    if pos == 0:
        if item["prev"] != 0:
            raise Refusal(
                Code.CACHE_MISMATCH,
                "a step at position 0 must have prev 0 (the empty prefix)",
                rid,
            )
        fresh = state = shard.new_cache()
    else:
        fresh = None
        entry = store.get(rid)
        if entry is None:
            raise Refusal(
                Code.CACHE_MISS,
                f"no cache for request {rid} at position {pos}; replay it",
                rid,
            )
        if entry.state.length != pos:
            raise Refusal(
                Code.CACHE_MISMATCH,
                f"step starts at position {pos} but the cache of {rid} holds {entry.state.length}",
                rid,
            )
        if entry.hash != item["prev"]:
            raise Refusal(
                Code.CACHE_MISMATCH,
                f"prefix hash {item['prev']} does not match the cache of {rid}",
                rid,
            )
        state = entry.state
    try:
        shard.check_inputs(x, state, pos)
    except ContextOverflow as e:
        raise Refusal(Code.CONTEXT_OVERFLOW, str(e), rid) from None
    except ShardError as e:
        raise Refusal(Code.BAD_REQUEST, str(e), rid) from None
    if shard.first and prefix_hash(item["prev"], x.view(-1).tolist()) != item["hash"]:
        raise Refusal(
            Code.CACHE_MISMATCH,
            f"hash {item['hash']} is not the prefix hash of {rid}'s tokens "
            f"[0, {pos + n}) given prev {item['prev']}",
            rid,
        )
    return CheckedItem(item, x, fresh)
