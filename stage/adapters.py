"""Architecture adapters: where each model family keeps its embeddings, layers, norm and head.

An adapter never does math of its own. It names the modules of transformers' own model class
and calls them in the order that model's forward does, so a shard computes the same bits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import masking_utils
from transformers.cache_utils import Cache


class UnsupportedArchitecture(ValueError):
    """The checkpoint's model_type has no adapter."""


def _mask_fn_takes(name: str) -> bool:
    return name in inspect.signature(masking_utils.create_causal_mask).parameters


# transformers before 5.20 still threads cache_position through masks and layers.
_MASKS_TAKE_CACHE_POSITION = _mask_fn_takes("cache_position")


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module: nn.Module | None = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


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
    call_layer: Callable[..., torch.Tensor] | None = None

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
            "past_key_values": cache,
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
        extra = {"cache_position": position_ids[0]} if _MASKS_TAKE_CACHE_POSITION else {}
        if self.call_layer is not None:
            return self.call_layer(layer, hidden, mask, position_ids, cache, **extra)
        out = layer(
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            position_embeddings=position_embeddings,
            **extra,
        )
        # Older releases return a tuple from decoder layers.
        return out[0] if isinstance(out, tuple) else out


def _call_gpt2_block(layer, hidden, mask, position_ids, cache, **extra) -> torch.Tensor:
    out = layer(hidden, cache, mask, None, use_cache=True, position_ids=position_ids, **extra)
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
        call_layer=_call_gpt2_block,
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
