"""Every touch of transformers' internals, and the architecture adapters built on them.

An adapter never does math of its own. It names the modules of transformers' own model class
and calls them in the order that model's forward does, so a shard computes the same bits.

This module is the only place in layerline that knows how transformers' modules are built,
called and cached: the keyword a decoder layer takes its cache by, how masks are made, the
private attention setting a layer reads, where a layer keeps its cache slot, how a rotary
module is built, and the cache-layer extension point (`CacheLayerMixin` in
`Cache(layers=...)`). Each such fact has a contract test in `tests/test_adapters.py`, so a
release that changes one shows up as one red test with its name. (Reading GGUF files leans on
transformers' GGUF tables in the same way, in `stage/gguf.py`, with its contract tests in
`tests/test_gguf.py`.)
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import AutoModelForCausalLM, masking_utils
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer


class UnsupportedArchitecture(ValueError):
    """The checkpoint's model_type has no adapter."""


def _takes(fn: Callable, name: str) -> bool:
    # inspect.signature follows functools.wraps, so deprecation wrappers show the real names.
    return name in inspect.signature(fn).parameters


# transformers before 5.20 still threads cache_position through masks and layers.
_MASKS_TAKE_CACHE_POSITION = _takes(masking_utils.create_causal_mask, "cache_position")
# transformers 5.24 renamed the masks' and layers' `past_key_values` to `cache` (the old name
# goes in 5.40); 5.17 to 5.23 know only `past_key_values`.
_MASK_CACHE_KEYWORD = (
    "cache" if _takes(masking_utils.create_causal_mask, "cache") else "past_key_values"
)


@functools.cache
def cache_keyword(module_cls: type[nn.Module]) -> str:
    """The keyword a module's forward (a decoder layer, a whole model) takes its cache by."""
    params = inspect.signature(module_cls.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise UnsupportedArchitecture(
        f"{module_cls.__name__}.forward takes no cache keyword this transformers release "
        "is known to use (cache, past_key_values)"
    )


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module: nn.Module | None = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


# ---- building a shard's modules -----------------------------------------------------------


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    """transformers' own `*ForCausalLM` for a config, on the meta device: no weight is read."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def layer_config(full_config, shard_config):
    """The config a decoder layer is built from: the whole model's (some families derive a
    layer's attention kind or scaling from its global index), with the attention
    implementation that transformers chose for the shard's skeleton."""
    config = copy.deepcopy(full_config)
    config._attn_implementation = shard_config._attn_implementation
    return config


def build_layer(layer_cls: type[nn.Module], config, global_idx: int) -> nn.Module:
    """One decoder layer with its global index, on the meta device."""
    with torch.device("meta"):
        return layer_cls(config, layer_idx=global_idx)


def set_cache_slot(layer: nn.Module, adapter: Adapter, slot: int) -> None:
    """Point a decoder layer at its slot in a shard's cache (its index within the shard)."""
    getattr(layer, adapter.attention).layer_idx = slot


def build_rotary(skeleton_rotary: nn.Module, config, device: torch.device) -> nn.Module:
    """A rotary embedding rebuilt off the meta device (its buffers are computed, not read)."""
    return type(skeleton_rotary)(config=config).to(device)


def materialize_buffer(module: nn.Module, name: str, device: torch.device) -> bool:
    """Give a non-persistent buffer that no checkpoint holds its value; False if unknown.

    Gemma's `embed_scale` is the one such buffer of the supported families.
    """
    if name == "embed_scale" and hasattr(module, "scalar_embed_scale"):
        value = torch.tensor(module.scalar_embed_scale, device=device)
        module.register_buffer(name, value, persistent=False)
        return True
    return False


# ---- KV caches ----------------------------------------------------------------------------


def new_request_cache(config) -> DynamicCache:
    """An empty cache for one request's positions in a shard's layers: transformers' own
    layers, each full-attention one grown in place (`GrowingLayer`) instead of by `torch.cat`."""
    cache = DynamicCache(config=config)
    cache.layers = [
        GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views [B, heads, length, dim] of buffers
    with room for later positions: a decode step writes its column in place.

    transformers' layer concatenates the whole cache at every step, two copies of every
    layer's keys and values per token: at 1,000 positions of a 30-layer model, 46 MB moved to
    add 46 KB. Here a full buffer is copied once into one a quarter larger (`_reserve`), so a
    request's copies stay proportional to its length. The values the layer holds and returns
    are the same; its bytes (`held_bytes`, what a stage counts against its KV limit) include
    the room.

    `keys` and `values` stay plain tensors that any caller may read or replace (crop, the
    batch methods): a layer whose `keys` is no longer its own view copies it into a new buffer
    at the next update. Unlike transformers' layer, a view handed out earlier is overwritten
    when a crop is followed by an update: callers copy what they keep (`BatchCache` does).
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._room: tuple[torch.Tensor, torch.Tensor] | None = None
        self._arrays = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        n = key_states.shape[-2]
        keys, values = self._reserve(key_states, value_states, length + n)
        keys[:, :, length : length + n].copy_(key_states)
        values[:, :, length : length + n].copy_(value_states)
        return self._advance(length + n)

    def _reserve(
        self, key_like: torch.Tensor, value_like: torch.Tensor, needed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers with room for `needed` positions that hold the layer's current ones."""
        held = self._room
        if (
            held is not None
            and held[0].shape[2] >= needed
            and self.keys.data_ptr() == held[0].data_ptr()
            and self.values.data_ptr() == held[1].data_ptr()
        ):
            return held
        length = self.get_seq_length()
        # A prompt's positions exactly (many requests may wait with theirs); then a quarter
        # more each time, so that a decode step copies the cache once in a while, not always.
        room = needed if length == 0 else needed + needed // 4 + 16
        keys = key_like.new_empty((*key_like.shape[:2], room, key_like.shape[3]))
        values = value_like.new_empty((*value_like.shape[:2], room, value_like.shape[3]))
        if length:
            keys[:, :, :length].copy_(self.keys)
            values[:, :, :length].copy_(self.values)
        self._room, self._arrays = (keys, values), None
        return keys, values

    def _advance(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._room
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        return self.keys, self.values

    def room(self, heads: int, dim: int) -> tuple[object, object, int]:
        """For `stage.fused`: float32 numpy views [heads, capacity, dim] of one row's buffers,
        with room for one more position, and the number of positions held. The caller writes
        that position and calls `grown`."""
        if not self.is_initialized:
            like = torch.empty(1, heads, 0, dim)
            self.lazy_initialization(like, like)
        length = self.get_seq_length()
        arrays = self._arrays
        if (
            arrays is None
            or arrays[1].shape[1] <= length
            or self.keys.data_ptr() != arrays[0]
            or self.values.data_ptr() != arrays[2].ctypes.data
        ):
            like = torch.empty(1, heads, 1, dim)
            keys, values = self._reserve(like, like, length + 1)
            arrays = self._arrays = (keys.data_ptr(), keys[0].numpy(), values[0].numpy())
        return arrays[1], arrays[2], length

    def grown(self) -> None:
        """One position was written into the buffers `room` gave."""
        self._advance(self.get_seq_length() + 1)

    def reset(self) -> None:
        super().reset()
        self._room = self._arrays = None

    def held_bytes(self) -> int:
        """Bytes of the buffers, the room for later positions included."""
        held = getattr(self, "_room", None)
        if held is None:
            return sum(
                t.numel() * t.element_size()
                for t in (getattr(self, "keys", None), getattr(self, "values", None))
                if isinstance(t, torch.Tensor)
            )
        return sum(t.numel() * t.element_size() for t in held)


def cached_kv(cache: Cache, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a request cache holds for one layer, [1, heads, length, dim]."""
    layer = cache.layers[slot]
    return layer.keys, layer.values


def cache_nbytes(cache: Cache | None) -> int:
    """Bytes of key and value tensors a cache holds."""
    total = 0
    for layer in cache.layers if cache is not None else ():
        if isinstance(layer, GrowingLayer):
            total += layer.held_bytes()
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class BatchRows(Protocol):
    """What a `BatchLayer` asks of the batch it belongs to."""

    end: int
    capacity: int

    def build(self, slot: int, name: str, like: torch.Tensor) -> torch.Tensor: ...


class BatchLayer(CacheLayerMixin):
    """One layer of a left-padded batch of requests: keys and values [B, heads, capacity, dim].

    Columns [0, length) are filled (each row's padding on the left, masked by the caller);
    `update` writes n new columns for every row with one copy and returns columns
    [0, length + n). The tensors are built on the first update, when the layer's key shape is
    known, by the batch (`BatchRows.build`), which gathers its rows' earlier keys and values.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, rows: BatchRows, slot: int):
        super().__init__()
        self.rows = rows
        self.slot = slot
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.keys = self.rows.build(self.slot, "keys", key_states)
        self.values = self.rows.build(self.slot, "values", value_states)
        self.length = self.rows.end
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        stop = self.length + key_states.shape[-2]
        if stop > self.keys.shape[-2]:
            raise ValueError(
                f"batch cache of layer slot {self.slot} holds {self.keys.shape[-2]} columns, "
                f"a step needs {stop}"
            )
        self.keys[:, :, self.length : stop].copy_(key_states)
        self.values[:, :, self.length : stop].copy_(value_states)
        self.length = stop
        return self.keys[:, :, :stop], self.values[:, :, :stop]

    def get_seq_length(self) -> int:
        """Filled columns, each row's left padding included."""
        return self.length if self.is_initialized else self.rows.end

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else self.rows.capacity


def batch_cache(rows: BatchRows, num_layers: int) -> Cache:
    """A transformers `Cache` whose layers are `BatchLayer`s of one batch."""
    return Cache(layers=[BatchLayer(rows, slot) for slot in range(num_layers)])


# ---- the adapters -------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """Module paths of one model family inside its `*ForCausalLM` class."""

    family: str
    embed: str  # token embedding
    layers: str  # ModuleList of decoder layers
    norm: str  # final norm
    head: str  # LM head
    attention: str  # attribute of a decoder layer holding the attention module (owns layer_idx)
    rotary: str | None = None  # rotary embedding module, rebuilt on the real device
    positions: str | None = None  # learned absolute position embedding (GPT-2)
    # Whether the decoder layer takes position_ids and rotary position_embeddings.
    rotary_layers: bool = True

    def module(self, model: nn.Module, role: str) -> nn.Module | None:
        path = getattr(self, role)
        return None if path is None else _get(model, path)

    def attention_kind(self, config, layer_idx: int) -> str:
        """Which mask a layer uses, the same rule the family's own forward applies."""
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return layer_types[layer_idx]
        if getattr(config, "sliding_window", None) is not None:
            return "sliding_attention"
        return "full_attention"

    def build_masks(
        self,
        shard_config,
        kinds: set[str],
        hidden: torch.Tensor,
        cache: Cache,
        position_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor | None]:
        kwargs = {
            "config": shard_config,
            "inputs_embeds": hidden,
            "attention_mask": None,
            _MASK_CACHE_KEYWORD: cache,
            "position_ids": position_ids,
        }
        if _MASKS_TAKE_CACHE_POSITION:
            kwargs["cache_position"] = position_ids[0]
        masks: dict[str, torch.Tensor | None] = {}
        if "full_attention" in kinds:
            masks["full_attention"] = masking_utils.create_causal_mask(**kwargs)
        if "sliding_attention" in kinds:
            masks["sliding_attention"] = masking_utils.create_sliding_window_causal_mask(**kwargs)
        return masks

    def run_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        position_embeddings,
        cache: Cache,
    ) -> torch.Tensor:
        kwargs = {
            cache_keyword(type(layer)): cache,
            "attention_mask": mask,
            "position_ids": position_ids,
            "use_cache": True,
        }
        if self.rotary_layers:
            kwargs["position_embeddings"] = position_embeddings
        if _MASKS_TAKE_CACHE_POSITION:
            kwargs["cache_position"] = position_ids[0]
        out = layer(hidden, **kwargs)
        # Older releases return a tuple from decoder layers.
        return out[0] if isinstance(out, tuple) else out


_LLAMA_LIKE = dict(
    embed="model.embed_tokens",
    layers="model.layers",
    norm="model.norm",
    head="lm_head",
    attention="self_attn",
    rotary="model.rotary_emb",
)

ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(family="llama", **_LLAMA_LIKE),
    "mistral": Adapter(family="mistral", **_LLAMA_LIKE),
    "qwen2": Adapter(family="qwen2", **_LLAMA_LIKE),
    "qwen3": Adapter(family="qwen3", **_LLAMA_LIKE),
    "phi3": Adapter(family="phi3", **_LLAMA_LIKE),
    "gemma": Adapter(family="gemma", **_LLAMA_LIKE),
    "gpt2": Adapter(
        family="gpt2",
        embed="transformer.wte",
        positions="transformer.wpe",
        layers="transformer.h",
        norm="transformer.ln_f",
        head="lm_head",
        attention="attn",
        rotary_layers=False,
    ),
}

SUPPORTED = tuple(sorted(ADAPTERS))


def adapter_for(config) -> Adapter:
    """The adapter for a config, or an error naming the supported architectures."""
    model_type = getattr(config, "model_type", None)
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; layerline supports: "
            f"{', '.join(SUPPORTED)}"
        ) from None
