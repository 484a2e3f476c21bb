"""A shard: a contiguous range of decoder layers that holds only its own weights.

The shard is built on the meta device from transformers' own model class and filled only with
its own tensors, read straight from the checkpoint's safetensors files. Its forward calls
transformers' modules in the order the monolithic forward does, so the bits are the same.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.checkpoint import CheckpointError
from stage.adapters import (
    Adapter,
    Cache,
    adapter_for,
    batch_cache,
    build_layer,
    build_rotary,
    cache_nbytes,
    cached_kv,
    layer_config,
    materialize_buffer,
    meta_model,
    new_request_cache,
    set_cache_slot,
)
from stage.checkpoint import Checkpoint, open_checkpoint

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# Decode batches a shard keeps between steps (see Shard.live).
MAX_LIVE_BATCHES = 8
# Decode batches of at most this many rows multiply a float32 CPU layer's weights as
# `weight @ x.T` (see _SkinnyLinear); at 8 rows, in a running cluster, `linear` was as fast.
# On one thread the row kernel takes batches of up to its KERNEL_ROWS (_RowKernelLinear).
SKINNY_ROWS = 6


class ShardError(ValueError):
    """A shard cannot be built or cannot run the step it was given."""


class CacheMismatch(ShardError):
    """A step does not continue the sequence that this cache holds."""


class ContextOverflow(ShardError):
    """A step reaches past the model's context length."""


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ShardError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def check_device(device: str | torch.device, dtype: torch.dtype) -> torch.device:
    """Refuse a device or a dtype that cannot run here, before any weight is read."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ShardError(
            f"device {device} requested but CUDA is not available here; use --device cpu"
        )
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ShardError(f"{device} cannot run bfloat16; use --dtype float16 or float32")
    try:  # a one-element probe catches dtypes the backend has no kernels for
        probe = torch.ones(2, 2, dtype=dtype, device=device)
        (probe @ probe).sum().item()
    except (RuntimeError, TypeError) as e:
        raise ShardError(f"device {device} cannot run {dtype}: {e}") from e
    return device


@dataclass
class KVState:
    """One request's KV cache for one shard's layers, and how many positions it holds.

    The keys and values live in the request's own `cache`, or, while the request decodes in
    a batch, in a row of that batch's tensors (`batch`); `own()` brings them back.
    """

    cache: Cache | None
    length: int = 0
    batch: _BatchCache | None = field(default=None, repr=False)

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
    # A decode group's products take stage.kernels' row kernel (see _RowKernelLinear).
    row_kernel: bool = False
    # Decode batches whose tensors stay from one step to the next (see `_BatchCache`), most
    # recently used last: a pipeline keeps several groups of requests in flight, and each
    # group comes back to every stage once per token.
    live: list[_BatchCache] = field(default_factory=list, repr=False)
    # Decode forwards that found their batch kept, and those that had to build one.
    batches_kept: int = 0
    batches_built: int = 0

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
        seen: set[int] = set()
        total = 0
        for module in self.modules():
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel() * p.element_size()
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
        if n == 1:
            batch = self._decode_batch(states)
        else:
            for state in states:
                state.own()
            batch = _BatchCache(self.shard_config, len(self.layers), states, room=n)
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

    def _decode_batch(self, states: list[KVState]) -> _BatchCache:
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
        batch = _BatchCache(
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
        batch: _BatchCache,
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
            hidden = _batched_head(self.head, self.norm(hidden[:, -1:, :]), self.row_kernel)
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


class _BatchCache:
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

    def __init__(self, config, num_layers: int, states: list[KVState], previous=None, room=0):
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


def _batch_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernels of a batched forward: on CUDA, any but cuDNN's.

    A batch passes an explicit mask, for which PyTorch prefers cuDNN's attention on recent
    GPUs, and cuDNN builds a plan for every new key length, that is at every decode step:
    measured on an H100 (torch 2.11, tinyllama in bf16), 2 ms of CPU per layer, and a
    batch of 8 took 80 ms against 22 ms with the memory-efficient kernel. Batch 1 keeps
    PyTorch's own choice, the one the monolithic model makes, so its bits stay the same.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(
        [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    )


def _batched_head(head: nn.Module, hidden: torch.Tensor, row_kernel: bool) -> torch.Tensor:
    """The vocabulary projection of a batch of single positions, [B, 1, H] -> [B, 1, V].

    For a few rows against a wide head, BLAS's `linear(hidden, weight)` packs the large
    matrix first. With `row_kernel`, on one thread, the rows take stage.kernels' product
    (`small`'s 32000 x 512 head at 8 rows: 7.4 ms); otherwise `weight @ hidden.T`, which
    streams the weight once (11 ms, against 19 ms for `linear`). Same values, other
    rounding, as any batched product.
    """
    weight = getattr(head, "weight", None)
    if (
        not isinstance(head, nn.Linear)
        or weight is None
        or weight.device.type != "cpu"
        or hidden.shape[1] != 1
    ):
        return head(hidden)
    rows = hidden.reshape(hidden.shape[0], hidden.shape[2])
    if row_kernel:
        kernels = _kernels()
        if kernels.takes(rows, weight):
            return kernels.rows_linear(rows, weight, head.bias).unsqueeze(1)
    logits = torch.mm(weight, rows.t()).t()
    if head.bias is not None:
        logits = logits + head.bias
    return logits.unsqueeze(1)


def _kernels():
    """stage.kernels, imported (and its kernel compiled or loaded from its cache) on first use.

    Only float32 CPU shards with the row kernel import it, so an accelerator host never
    imports numba; `python -m stage` imports it at start, before it registers.
    """
    from stage import kernels

    return kernels


class _SkinnyLinear(nn.Linear):
    """A float32 CPU linear layer that multiplies a decode batch of 2 to SKINNY_ROWS rows as
    `weight @ x.T`.

    BLAS's `linear` packs the weight for a product of a few rows; `weight @ x.T` streams it
    once. Measured on `small`, one thread: a stage's decoder layers took 20-25 % less at 4
    rows and 10-20 % less at 6, alone; in a 3-stage cluster at 8 streams (groups of 4) the
    three stages' compute per group fell from 34 to 29 ms. At 8 rows the gain seen alone
    (5-10 %) did not hold in the cluster, and from 12 rows on `linear` is faster.
    Batch 1 ([1, n, H]) and prompts ([B, n > 1, H]) take `F.linear`, the call `nn.Linear`
    makes, so the batch-1 path keeps the monolithic model's bits. Batched results are
    equal in value, not always in every bit, as for any batched product.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dim() != 3 or x.shape[1] != 1 or not 2 <= rows <= SKINNY_ROWS:
            return nn.functional.linear(x, self.weight, self.bias)
        y = torch.mm(self.weight, x.reshape(rows, -1).t()).t().contiguous()
        if self.bias is not None:
            y += self.bias
        return y.unsqueeze(1)


class _RowKernelLinear(_SkinnyLinear):
    """A _SkinnyLinear whose decode batches of 2 to KERNEL_ROWS rows, on one thread, take
    stage.kernels' row kernel, which reads each weight row once.

    On `small` at 8 rows, one thread: 1.38 ms a decoder layer, against 2.72 ms with
    `linear` and 2.24 ms as `weight @ x.T`. With more torch threads the kernel, which runs
    on the calling thread only, gives way to _SkinnyLinear's BLAS products, which use them
    all. Batch 1 and prompts still take `F.linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dim() == 3 and x.shape[1] == 1 and rows >= 2:
            kernels = _kernels()
            flat = x.reshape(rows, -1)
            if kernels.takes(flat, self.weight):
                return kernels.rows_linear(flat, self.weight, self.bias).unsqueeze(1)
        return super().forward(x)


def _skinny_linears(layer: nn.Module, row_kernel: bool) -> None:
    """Give a CPU layer's plain linear sublayers the decode-batch products of _SkinnyLinear,
    or of _RowKernelLinear with `row_kernel`.

    Only the class changes: the parameters, their names and the module tree stay. Only
    float32 layers get them: that is the dtype they were measured in.
    """
    cls = _RowKernelLinear if row_kernel else _SkinnyLinear
    for module in layer.modules():
        if type(module) is nn.Linear:
            module.__class__ = cls


def _shard_config(config, start: int, end: int):
    """The config a k-layer model would have: the cache and the masks are built from it."""
    shard_config = copy.deepcopy(config)
    shard_config.num_hidden_layers = end - start
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        shard_config.layer_types = list(layer_types[start:end])
    return shard_config


def _checkpoint_key(checkpoint: Checkpoint, key: str) -> str | None:
    if key in checkpoint.tensors:
        return key
    # Original GPT-2 checkpoints store the transformer's tensors without the prefix.
    bare = key.removeprefix("transformer.")
    return bare if bare in checkpoint.tensors else None


def _load_tensors(
    checkpoint: Checkpoint, wanted: dict[str, str], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Read exactly the named tensors (local name -> checkpoint key), grouped by file."""
    by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for local, key in wanted.items():
        by_file[checkpoint.tensors[key].file].append((local, key))
    out: dict[str, torch.Tensor] = {}
    for file, items in sorted(by_file.items()):
        path = checkpoint.path / file
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for local, key in items:
                    t = f.get_tensor(key)
                    if t.is_floating_point():
                        t = t.to(dtype)
                    out[local] = t.to(device)
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read tensors from {path}: {e}") from e
    return out


def _fill(
    module: nn.Module,
    local_prefix: str,
    ckpt_prefix: str,
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    fallback: dict[str, str] | None = None,
) -> None:
    wanted: dict[str, str] = {}
    for name in module.state_dict():
        key = _checkpoint_key(checkpoint, f"{ckpt_prefix}.{name}")
        if key is None and fallback is not None:
            key = fallback.get(name)
        if key is None:
            raise CheckpointError(
                f"{checkpoint.path} lacks tensor {ckpt_prefix}.{name} (needed by {local_prefix}); "
                "the checkpoint is incomplete or of another architecture"
            )
        wanted[name] = key
    tensors = _load_tensors(checkpoint, wanted, dtype, device)
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{checkpoint.path}: tensors for {ckpt_prefix} do not fit: {e}"
        ) from e
    _materialize_buffers(module, device)


def _materialize_buffers(module: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers are not in the checkpoint; rebuild the few families that have one."""
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf.is_meta and not materialize_buffer(sub, name, device):
                raise ShardError(f"{type(sub).__name__}.{name} has no value after loading")


def load_shard(
    checkpoint: str | Path | Checkpoint,
    start: int,
    end: int,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    reuse: Shard | None = None,
    row_kernel: bool = True,
) -> Shard:
    """Build layers [start, end) of a checkpoint, reading only their own tensors.

    With `reuse`, layers (and embeddings or head) that shard already holds are moved over
    instead of read again: a reshard loads only what is new. With `row_kernel`, a float32
    CPU shard multiplies decode groups with stage.kernels' row kernel when it runs on one
    thread (see _RowKernelLinear); it costs the process about 130 MiB for numba, once.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    num_layers = ckpt.num_layers
    if not (isinstance(start, int) and isinstance(end, int)):
        raise ShardError(f"layer range bounds must be integers, got {start!r}, {end!r}")
    if start >= end:
        raise ShardError(f"layer range [{start},{end}) is empty or inverted; need start < end")
    if start < 0 or end > num_layers:
        raise ShardError(
            f"layer range [{start},{end}) is outside the model's layers [0,{num_layers})"
        )
    torch_dtype = resolve_dtype(dtype)
    dev = check_device(device, torch_dtype)
    adapter = adapter_for(ckpt.config)

    # The skeleton has end - start layers: local layer i is global layer start + i, and the
    # cache is indexed locally. Layers are rebuilt with their global index (some families
    # derive their attention kind or scaling from it) and then told their local cache slot.
    skeleton = meta_model(_shard_config(ckpt.config, start, end), torch_dtype)
    shard_config = skeleton.config
    full_config = layer_config(ckpt.config, shard_config)
    layers = adapter.module(skeleton, "layers")
    layer_cls = type(layers[0])
    if reuse is not None and (
        reuse.checkpoint.fingerprint != ckpt.fingerprint
        or reuse.dtype != torch_dtype
        or reuse.device != dev
    ):
        reuse = None
    skinny = dev.type == "cpu" and torch_dtype == torch.float32
    row_kernel = row_kernel and skinny
    if row_kernel:
        _kernels()  # compiled or loaded now, not at the first decode step
    if reuse is not None and reuse.row_kernel != row_kernel:
        reuse = None
    rebuilt = nn.ModuleList()
    for i in range(end - start):
        g = start + i
        if reuse is not None and reuse.start <= g < reuse.end:
            layer = reuse.layers[g - reuse.start]
        else:
            layer = build_layer(layer_cls, full_config, g)
            _fill(layer, f"layers.{i}", f"{adapter.layers}.{g}", ckpt, torch_dtype, dev)
            if skinny:
                _skinny_linears(layer, row_kernel)
        rebuilt.append(layer)

    parts: dict[str, nn.Module | None] = {
        "embed": None,
        "positions": None,
        "norm": None,
        "head": None,
    }
    if start == 0:
        for role in ("embed", "positions"):
            module = adapter.module(skeleton, role)
            if reuse is not None and reuse.first and getattr(reuse, role) is not None:
                parts[role] = getattr(reuse, role)
            elif module is not None:
                _fill(module, role, getattr(adapter, role), ckpt, torch_dtype, dev)
                parts[role] = module
    if end == num_layers and reuse is not None and reuse.last:
        parts["norm"], parts["head"] = reuse.norm, reuse.head
    elif end == num_layers:
        parts["norm"] = adapter.module(skeleton, "norm")
        _fill(parts["norm"], "norm", adapter.norm, ckpt, torch_dtype, dev)
        head = adapter.module(skeleton, "head")
        tied = bool(getattr(ckpt.config, "tie_word_embeddings", False))
        if (
            tied
            and parts["embed"] is not None
            and _checkpoint_key(ckpt, f"{adapter.head}.weight") is None
        ):
            head.weight = parts["embed"].weight  # one matrix, as in the monolithic model
        else:
            fallback = (
                {"weight": _checkpoint_key(ckpt, f"{adapter.embed}.weight")} if tied else None
            )
            _fill(head, "head", adapter.head, ckpt, torch_dtype, dev, fallback)
        parts["head"] = head

    # Cache slots are renumbered only now: a load that failed above leaves `reuse` intact.
    for i, layer in enumerate(rebuilt):
        set_cache_slot(layer, adapter, i)
    rotary = None
    skeleton_rotary = adapter.module(skeleton, "rotary")
    if skeleton_rotary is not None:
        rotary = build_rotary(skeleton_rotary, shard_config, dev)
    del skeleton

    shard = Shard(
        checkpoint=ckpt,
        start=start,
        end=end,
        adapter=adapter,
        shard_config=shard_config,
        layers=rebuilt,
        device=dev,
        dtype=torch_dtype,
        rotary=rotary,
        kinds=tuple(adapter.attention_kind(ckpt.config, start + i) for i in range(end - start)),
        max_positions=ckpt.context_length,
        vocab_size=int(ckpt.config.vocab_size),
        row_kernel=row_kernel,
        **parts,
    )
    for module in shard.modules():
        module.eval().requires_grad_(False)
    return shard
