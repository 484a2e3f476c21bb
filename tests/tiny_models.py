"""Tiny random checkpoints of every supported architecture, written with save_pretrained, and
the keyword that runs a whole reference model with a KV cache."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from stage.adapters import cache_keyword

VOCAB = 160
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Each config exercises what makes its family different: sliding windows shorter than the
# test sequences, mixed full/sliding layers, tied heads, fused projections, learned positions.
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=12, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(
        **COMMON,
        use_sliding_window=True,
        sliding_window=12,
        max_window_layers=2,
        tie_word_embeddings=True,
    ),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False),
    "phi3": lambda: Phi3Config(**COMMON, tie_word_embeddings=False),
    "gemma": lambda: GemmaConfig(**COMMON, head_dim=16),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=5,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
ARCHITECTURES = tuple(CONFIGS)


def make_checkpoint(
    arch: str, directory: Path, *, max_shard_size: str = "60KB", seed: int = 0
) -> Path:
    """Write a tiny random checkpoint of `arch` into `directory`, in several safetensors files."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    model = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


def cache_kwargs(model: nn.Module, cache) -> dict:
    """`{keyword: cache}` for calling a whole model with a KV cache, in this release's spelling."""
    return {cache_keyword(type(model)): cache}
