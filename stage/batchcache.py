"""A batch's keys and values, in one padded tensor per layer that a decode group keeps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from stage.adapters import batch_cache, cached_kv, new_request_cache

if TYPE_CHECKING:  # a KVState leases its row here; shard.py imports this module, not the reverse
    from stage.shard import KVState


class BatchCache:
    """Several requests' keys and values, left-padded into one tensor per layer.

    Row i holds request i's positions in columns [end - length_i, end); the columns up to
    `capacity` are room for later steps. The layers are `adapters.BatchLayer`s inside a
    transformers `Cache` (`cache`), which the decoder layers update: a forward's n new
    columns go to [end, end + n) for every row with one copy, and the caller masks the
    padding. Zeros (not uninitialised memory) keep a masked score from being NaN.

    Each layer's tensors are built on its first update, when the layer's key shape is known
    (`build`): rows that were in `previous` (the batch these requests last decoded in) are
    gathered from its tensors, the others copied from their own caches. Rows stay leased to
    the batch (`KVState.batch`) until `release` copies one back into its own cache.
    """

    def __init__(
        self,
        config,
        num_layers: int,
        states: list[KVState],
        previous: BatchCache | None = None,
        room: int = 0,
    ):
        self.config = config
        self.states: list[KVState | None] = list(states)
        self._rows = {id(state): i for i, state in enumerate(self.states)}
        self.end = max(state.length for state in states)
        self.capacity = self.end + room
        self.cache = batch_cache(self, num_layers)
        if previous is None:
            kept = []
        else:
            kept = [(i, previous.row(s)) for i, s in enumerate(states) if s.batch is previous]
        self._previous = previous if kept else None
        self._kept_to = torch.tensor([i for i, _ in kept], dtype=torch.long)
        self._kept_from = torch.tensor([j for _, j in kept], dtype=torch.long)
        self._joiners = [
            (i, s) for i, s in enumerate(states) if not kept or s.batch is not previous
        ]
        for state in states:
            if state.batch is not None and state.batch is not previous:
                state.own()
            state.batch = self

    def row(self, state: KVState) -> int:
        return self._rows[id(state)]

    def serves(self, states: list[KVState], n: int) -> bool:
        """Whether these requests are exactly this batch's rows and n more columns fit."""
        return (
            len(states) == len(self._rows) == len(self.states)
            and all(state.batch is self for state in states)
            and self.end + n <= self.capacity
        )

    def build(self, slot: int, name: str, like: torch.Tensor) -> torch.Tensor:
        """A layer's keys or values, [B, heads, capacity, dim], holding every row's past."""
        batch, heads, _, dim = like.shape
        shape = (batch, heads, self.capacity, dim)
        out = torch.zeros(shape, dtype=like.dtype, device=like.device)
        previous = self._previous
        if previous is not None:
            span = min(previous.end, self.end)
            held = getattr(previous.cache.layers[slot], name)
            old = held[:, :, previous.end - span : previous.end]
            rows = old.index_select(0, self._kept_from.to(old.device))
            out[:, :, self.end - span : self.end].index_copy_(0, self._kept_to.to(out.device), rows)
        which = 0 if name == "keys" else 1
        for i, state in self._joiners:
            if state.length:
                cached = cached_kv(state.cache, slot)[which][0]
                out[i, :, self.end - state.length : self.end].copy_(cached)
        return out

    def advance(self, n: int) -> None:
        """A forward of n new positions finished: every row holds n more."""
        self.end += n
        for state in self.states:
            if state is not None:
                state.length += n
        for _, state in self._joiners:
            state.cache = None  # its keys and values now live here
        self._previous, self._joiners = None, []

    def forget(self, state: KVState) -> int:
        """Take a row out of the batch (its columns stay, unused); return its index."""
        i = self._rows.pop(id(state))
        self.states[i] = None
        state.batch = None
        return i

    def release(self, state: KVState) -> None:
        """Copy one row back into the request's own cache; the row no longer counts."""
        i = self.forget(state)
        cache = new_request_cache(self.config)
        if state.length:
            begin = self.end - state.length
            for slot, layer in enumerate(self.cache.layers):
                cache.update(
                    layer.keys[i : i + 1, :, begin : self.end],
                    layer.values[i : i + 1, :, begin : self.end],
                    slot,
                )
        state.cache = cache

    def states_held(self) -> int:
        return len(self._rows)

    def retire(self) -> None:
        """Give every request still in this batch its own cache back."""
        for state in list(self.states):
            if state is not None and state.batch is self:
                self.release(state)

    def discard(self) -> None:
        """A forward failed part-way: no row's keys and values can be trusted any more. The
        requests' positions no longer match any step, so their next step is refused."""
        for state in self.states:
            if state is not None:
                state.batch, state.cache, state.length = None, None, -1
        self.states, self._rows = [], {}

    def row_bytes(self) -> int:
        """Bytes one row takes, padding and room included."""
        return sum(
            t[0].numel() * t.element_size()
            for layer in self.cache.layers
            if layer.is_initialized
            for t in (layer.keys, layer.values)
        )
