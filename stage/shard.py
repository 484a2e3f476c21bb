"""A shard: a contiguous range of decoder layers, and its forward for one request or a batch.

Its forward calls transformers' modules in the order the monolithic forward does, so at batch
1 the bits are the same; stage.loading builds a shard from a checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from stage.adapters import Adapter, Cache, cache_nbytes, new_request_cache
from stage.batchcache import BatchCache
from stage.checkpoint import Checkpoint
from stage.products import batched_head

# Decode batches a shard keeps between steps (see Shard.live).
MAX_LIVE_BATCHES = 8


class ShardError(ValueError):
    """A shard cannot be built or cannot run the step it was given."""


class CacheMismatch(ShardError):
    """A step does not continue the sequence that this cache holds."""


class ContextOverflow(ShardError):
    """A step reaches past the model's context length."""


@dataclass
class KVState:
    """One request's KV cache for one shard's layers, and how many positions it holds.

    The keys and values live in the request's own `cache`, or, while the request decodes in
    a batch, in a row of that batch's tensors (`batch`); `own()` brings them back.
    """

    cache: Cache | None
    length: int = 0
    batch: BatchCache | None = field(default=None, repr=False)

    def own(self) -> None:
        """Move this request's keys and values out of its batch into a cache of its own."""
        if self.batch is not None:
            self.batch.release(self)

    def free(self) -> None:
        """Forget this request's keys and values, its row in a batch too: the position -1
        matches no step, so nothing computes on this state again."""
        if self.batch is not None:
            self.batch.forget(self)
        self.cache, self.length = None, -1

    def nbytes(self) -> int:
        if self.batch is not None:
            return self.batch.row_bytes()
        return cache_nbytes(self.cache)


@dataclass
class Shard:
    """Layers [start, end) of a checkpoint, plus embeddings if first and norm + head if last."""

    checkpoint: Checkpoint
    start: int
    end: int
    adapter: Adapter
    shard_config: object
    layers: nn.ModuleList
    device: torch.device
    dtype: torch.dtype
    embed: nn.Module | None = None
    positions: nn.Module | None = None
    norm: nn.Module | None = None
    head: nn.Module | None = None
    rotary: nn.Module | None = None
    kinds: tuple[str, ...] = field(default=())
    max_positions: int = 1 << 30
    vocab_size: int = 0
    # A decode group's products take stage.kernels' row kernel (see RowKernelLinear).
    row_kernel: bool = False
    # How the weight matrices are held (common/weights.py): the compute dtype's name, or a
    # bfloat16 or block form.
    weights: str = "float32"
    # The digest of each checkpoint tensor the shard holds, of its bytes as the file stores
    # them (`stage.checkpoint.tensor_digest`): what LOADED reports.
    digests: dict[str, bytes] = field(default_factory=dict, repr=False)
    # Decode batches whose tensors stay from one step to the next (see `BatchCache`), most
    # recently used last: a pipeline keeps several groups of requests in flight, and each
    # group comes back to every stage once per token.
    live: list[BatchCache] = field(default_factory=list, repr=False)
    # Decode forwards that found their batch kept, and those that had to build one.
    batches_kept: int = 0
    batches_built: int = 0
    # A single request's decode step through each layer in a few compiled calls
    # (stage/fused.py), where the layers' matrices are held in blocks; None: the modules.
    fused: list | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return self.checkpoint.num_layers

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.num_layers

    @property
    def hidden_size(self) -> int:
        return int(self.checkpoint.config.hidden_size)

    def modules(self) -> list[nn.Module]:
        parts = [self.embed, self.positions, self.layers, self.norm, self.head]
        return [m for m in parts if m is not None]

    def weight_bytes(self) -> int:
        """Bytes of the weights held: parameters, and the buffers of matrices held in blocks
        (stage/quant.py); a tensor shared by two modules (a tied head) counts once."""
        seen: set[int] = set()
        total = 0
        for module in self.modules():
            tensors = list(module.parameters())
            for sub in module.modules():
                if getattr(sub, "holds_blocks", False):
                    tensors.extend(sub.buffers(recurse=False))
            for t in tensors:
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    def new_cache(self) -> KVState:
        return KVState(new_request_cache(self.shard_config))

    @torch.inference_mode()
    def forward(
        self,
        inputs: torch.Tensor,
        state: KVState,
        logits: str = "last",
        between: Callable[[], object] | None = None,
    ) -> torch.Tensor:
        """Run n new positions: token ids [1, n] on the first shard, hidden [1, n, H] after.

        Returns the hidden states for the next shard, or on the last shard the logits of the
        last position (`logits="last"`, what generation needs) or of every position ("all").
        `between`, if given, is called between two layers, and on the last shard also
        between its last layer and the head (a one-layer last shard has no other such point):
        the stage runs other requests' decode steps there while a long prompt computes (they
        share no cache with it).
        """
        state.own()
        n = inputs.shape[1]
        position_ids = torch.arange(state.length, state.length + n, device=self.device).unsqueeze(0)
        if self.first:
            hidden = self.embed(inputs)
            if self.positions is not None:
                hidden = hidden + self.positions(position_ids)
        else:
            hidden = inputs
        if n == 1 and self.fused is not None:
            from stage import fused  # loaded already: it built self.fused

            if fused.active():
                rotary = self.rotary(hidden, position_ids)
                hidden = fused.run(self.fused, hidden, rotary, state.cache)
                return self._finish(hidden, state, n, logits, between)
        masks = self.adapter.build_masks(
            self.shard_config, set(self.kinds), hidden, state.cache, position_ids
        )
        rotary = self.rotary(hidden, position_ids) if self.rotary is not None else None
        for i, (layer, kind) in enumerate(zip(self.layers, self.kinds, strict=True)):
            if i and between is not None:
                between()
            hidden = self.adapter.run_layer(
                layer, hidden, masks[kind], position_ids, rotary, state.cache
            )
        return self._finish(hidden, state, n, logits, between)

    def _finish(
        self,
        hidden: torch.Tensor,
        state: KVState,
        n: int,
        logits: str,
        between: Callable[[], object] | None,
    ) -> torch.Tensor:
        """After the layers: the hidden states, or on the last shard the logits."""
        state.length += n
        if not self.last:
            return hidden
        if between is not None:
            between()
        hidden = self.norm(hidden)
        if logits == "last":
            hidden = hidden[:, -1:, :]
        return self.head(hidden)

    @property
    def batchable(self) -> bool:
        """Whether decode steps of several requests can run as one batch on this shard.

        Sliding-window caches keep a per-layer window that a padded batch cannot share.
        """
        return all(kind == "full_attention" for kind in self.kinds)

    @torch.inference_mode()
    def forward_batch(
        self,
        inputs: list[torch.Tensor],
        states: list[KVState],
        between: Callable[[], object] | None = None,
    ) -> list[torch.Tensor]:
        """The same number n of new positions for each of several requests, as one forward.

        Decode steps (n = 1) and prompts or chunks of equal length alike: the requests' keys
        and values are left-padded into one tensor per layer (a new prompt's cache is empty),
        the padding masked out. Decode steps keep that tensor for the next step (`live`): while
        the same requests decode together, a step costs one copy per layer for its new column,
        not two copies of every request's cache. Prompts and chunks go back to their own
        caches.

        Matrix products over a batch may round differently from batch 1: results are equal in
        value to `forward`, not always in every bit (run with a batch limit of 1 for
        batch-invariant results). Returns per request what `forward` returns with
        `logits="last"`. `between` is called where `forward` calls it.
        """
        n = inputs[0].shape[1]
        if n < 1 or any(x.shape[1] != n for x in inputs):
            raise ShardError("a batch runs the same number of new positions for every request")
        # One position per request, a one-token prompt too: the same batch serves the next step.
        if n == 1:
            batch = self._decode_batch(states)
        else:
            for state in states:
                state.own()
            batch = BatchCache(self.shard_config, len(self.layers), states, room=n)
        rows = [batch.row(state) for state in states]
        ordered: list[torch.Tensor] = [inputs[0]] * len(rows)
        for x, row in zip(inputs, rows, strict=True):
            ordered[row] = x
        try:
            with _batch_attention(self.device):
                hidden = self._run_batch(ordered, batch, n, between)
        except BaseException:
            batch.discard()
            if batch in self.live:
                self.live.remove(batch)
            raise
        batch.advance(n)
        if n > 1:
            for state in states:
                batch.release(state)
        outputs = hidden.split(1)
        return [outputs[row] for row in rows]

    def _decode_batch(self, states: list[KVState]) -> BatchCache:
        """A kept batch that holds exactly these requests with room for a step, else a new
        one built from the kept batch that holds most of them (its rows are gathered with one
        copy per layer) and from the others' own caches. Requests of that batch that are not
        in the new one get their own caches back; so do the rows of batches beyond
        MAX_LIVE_BATCHES, least recently used first."""
        for batch in self.live:
            if batch.serves(states, 1):
                self.live.remove(batch)
                self.live.append(batch)
                self.batches_kept += 1
                return batch
        holders = [s.batch for s in states if s.batch is not None]
        previous = max(set(holders), key=holders.count, default=None)
        longest = max(state.length for state in states)
        batch = BatchCache(
            self.shard_config, len(self.layers), states, previous, room=max(32, longest // 4)
        )
        if previous is not None:
            previous.retire()
            self.live.remove(previous)
        self.live = [b for b in self.live if b.states_held()]
        while len(self.live) >= MAX_LIVE_BATCHES:
            self.live.pop(0).retire()
        self.live.append(batch)
        self.batches_built += 1
        return batch

    def _run_batch(
        self,
        inputs: list[torch.Tensor],
        batch: BatchCache,
        n: int,
        between: Callable[[], object] | None,
    ) -> torch.Tensor:
        lengths = [state.length for state in batch.states]
        end = batch.end
        dev = self.device
        columns = torch.arange(n, device=dev)
        position_ids = torch.tensor(lengths, device=dev).unsqueeze(1) + columns
        if self.first:
            hidden = self.embed(torch.cat(inputs))
            if self.positions is not None:
                hidden = hidden + self.positions(position_ids)
        else:
            hidden = torch.cat(inputs)
        # Additive mask over [padding..., cached..., new...]: padding, and new positions after
        # a query's own, get the dtype's minimum.
        keys = torch.arange(end + n, device=dev)
        starts = torch.tensor([end - x for x in lengths], device=dev)
        hidden_mask = (keys[None, None, :] < starts[:, None, None]) | (
            keys[None, None, :] > end + columns[None, :, None]
        )
        mask = torch.zeros(len(lengths), 1, n, end + n, dtype=hidden.dtype, device=dev)
        mask.masked_fill_(hidden_mask[:, None], torch.finfo(hidden.dtype).min)
        rotary = self.rotary(hidden, position_ids) if self.rotary is not None else None
        for i, layer in enumerate(self.layers):
            if i and between is not None:
                between()
            hidden = self.adapter.run_layer(layer, hidden, mask, position_ids, rotary, batch.cache)
        if self.last:
            if between is not None:
                between()
            hidden = batched_head(self.head, self.norm(hidden[:, -1:, :]), self.row_kernel)
        return hidden

    def check_inputs(self, inputs: torch.Tensor, state: KVState, start_pos: int) -> None:
        """Refuse a step that does not continue this cache; never compute on wrong state."""
        if start_pos != state.length:
            raise CacheMismatch(
                f"step starts at position {start_pos} but the cache of layers "
                f"[{self.start},{self.end}) holds {state.length}"
            )
        if start_pos + inputs.shape[1] > self.max_positions:
            raise ContextOverflow(
                f"positions up to {start_pos + inputs.shape[1]} exceed the context {self.max_positions}"
            )
        if self.first:
            if inputs.dtype != torch.int64 or inputs.dim() != 2:
                raise ShardError("the first shard takes int64 token ids of shape [1, n]")
            vocab = self.vocab_size
            if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= vocab):
                raise ShardError(f"token ids must lie in [0, {vocab})")
        elif inputs.dim() != 3 or inputs.shape[2] != self.hidden_size or inputs.dtype != self.dtype:
            raise ShardError(
                f"expected hidden states [1, n, {self.hidden_size}] of {self.dtype}, "
                f"got {list(inputs.shape)} of {inputs.dtype}"
            )


def _batch_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernels of a batched forward: on CUDA, any but cuDNN's.

    Given a batch's explicit mask PyTorch prefers cuDNN's attention on recent GPUs, and cuDNN
    plans anew for every key length, that is at every decode step. Batch 1 keeps PyTorch's
    own choice, the one the monolithic model makes, so its bits stay the same.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )
