"""Contracts with transformers: one test for each internal that stage/adapters.py relies on.

A transformers release that changes one of these shows up here as one red test with its name,
before any shard computes a wrong bit. `make canary` runs them against the newest releases.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from stage import adapters
from stage.checkpoint import open_checkpoint
from tests.tiny_models import ARCHITECTURES, CONFIGS, cache_kwargs

N = 7  # positions of a test prompt


def _model(arch: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def _ids(n: int = N) -> torch.Tensor:
    return torch.arange(3, 3 + n).unsqueeze(0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cache_keyword_is_what_the_model_and_its_layers_take(arch):
    """The keyword found by signature really carries the cache: the model fills it."""
    model = _model(arch)
    adapter = adapters.adapter_for(model.config)
    layer = adapter.module(model, "layers")[0]
    assert adapters.cache_keyword(type(layer)) in ("cache", "past_key_values")
    cache = adapters.new_request_cache(model.config)
    with torch.no_grad():
        model(_ids(), **cache_kwargs(model, cache), use_cache=True)
    assert cache.get_seq_length() == N
    assert len(cache.layers) == model.config.num_hidden_layers


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_kv_and_nbytes_read_what_a_forward_stored(arch):
    model = _model(arch)
    cache = adapters.new_request_cache(model.config)
    with torch.no_grad():
        model(_ids(), **cache_kwargs(model, cache), use_cache=True)
    keys, values = adapters.cached_kv(cache, 0)
    assert keys.shape[0] == 1 and keys.shape[2] == N and values.shape == keys.shape
    per_layer = 2 * keys.numel() * keys.element_size()
    assert adapters.cache_nbytes(cache) == per_layer * model.config.num_hidden_layers
    assert adapters.cache_nbytes(None) == 0


def _blocked(mask: torch.Tensor, q: int, k: int) -> bool:
    value = mask[0, 0, q, k]
    return not bool(value) if mask.dtype == torch.bool else bool(value < -1e30)


def test_masks_built_with_the_cache_keyword_are_causal_and_slide():
    """create_causal_mask and its sliding sibling take the cache by the keyword found, and
    block the future and, for a sliding layer, what lies behind its window."""
    config = CONFIGS["mistral"]()  # sliding window of 12
    config._attn_implementation = "eager"  # a mask tensor, never the "is causal" shortcut
    adapter = adapters.adapter_for(config)
    n = 20
    hidden = torch.zeros(1, n, config.hidden_size)
    cache = adapters.new_request_cache(config)
    positions = torch.arange(n).unsqueeze(0)
    masks = adapter.build_masks(
        config, {"full_attention", "sliding_attention"}, hidden, cache, positions
    )
    full, sliding = masks["full_attention"], masks["sliding_attention"]
    assert full.shape[-2:] == (n, n) and sliding.shape[-2:] == (n, n)
    assert _blocked(full, 3, 4) and not _blocked(full, 19, 0)
    assert _blocked(sliding, 19, 0) and not _blocked(sliding, 19, 19 - 11)


def _cache_slot(layer: torch.nn.Module, adapter: adapters.Adapter) -> int:
    """The slot the layer's attention writes its keys to (the attribute transformers reads)."""
    return int(getattr(layer, adapter.attention).layer_idx)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_layer_built_with_its_global_index_writes_the_cache_slot_it_is_given(arch):
    config = CONFIGS[arch]()
    skeleton = adapters.meta_model(config, torch.float32)
    assert all(p.is_meta for p in skeleton.parameters())
    adapter = adapters.adapter_for(config)
    layer_cls = type(adapter.module(skeleton, "layers")[0])
    layer = adapters.build_layer(layer_cls, adapters.layer_config(config, skeleton.config), 3)
    assert _cache_slot(layer, adapter) == 3
    adapters.set_cache_slot(layer, adapter, 1)
    assert _cache_slot(layer, adapter) == 1
    # A real layer (off the meta device) writes its keys to slot 1 and nowhere else.
    real = _model(arch)
    layer = adapter.module(real, "layers")[3]
    adapters.set_cache_slot(layer, adapter, 1)
    cache = adapters.new_request_cache(real.config)
    hidden = torch.randn(1, N, real.config.hidden_size)
    positions = torch.arange(N).unsqueeze(0)
    rotary = adapter.module(real, "rotary")
    embeddings = rotary(hidden, positions) if rotary is not None else None
    with torch.no_grad():
        adapter.run_layer(layer, hidden, None, positions, embeddings, cache)
    assert cache.get_seq_length(1) == N and cache.get_seq_length(0) == 0


def test_layer_config_carries_the_attention_implementation_transformers_chose():
    config = CONFIGS["llama"]()
    skeleton = adapters.meta_model(config, torch.float32)
    chosen = skeleton.config._attn_implementation
    assert chosen in ("sdpa", "eager")
    assert adapters.layer_config(config, skeleton.config)._attn_implementation == chosen


def test_rebuilt_rotary_embedding_equals_the_models_own():
    config = CONFIGS["llama"]()
    skeleton = adapters.meta_model(config, torch.float32)
    adapter = adapters.adapter_for(config)
    rotary = adapters.build_rotary(adapter.module(skeleton, "rotary"), config, torch.device("cpu"))
    own = adapter.module(_model("llama"), "rotary")
    hidden = torch.zeros(1, N, config.hidden_size)
    positions = torch.arange(N).unsqueeze(0)
    for mine, theirs in zip(rotary(hidden, positions), own(hidden, positions), strict=True):
        assert torch.equal(mine, theirs)


def test_gemma_embed_scale_is_materialized_as_the_model_holds_it():
    config = CONFIGS["gemma"]()
    skeleton = adapters.meta_model(config, torch.float32)
    embed = adapters.adapter_for(config).module(skeleton, "embed")
    assert embed.embed_scale.is_meta
    assert adapters.materialize_buffer(embed, "embed_scale", torch.device("cpu"))
    own = adapters.adapter_for(config).module(_model("gemma"), "embed")
    assert torch.equal(embed.embed_scale, own.embed_scale)
    assert not adapters.materialize_buffer(embed, "no_such_buffer", torch.device("cpu"))


class _Rows:
    """The smallest batch a BatchLayer can belong to: `end` filled columns, zeros before."""

    def __init__(self, end: int, capacity: int):
        self.end, self.capacity = end, capacity

    def build(self, slot, name, like):
        batch, heads, _, dim = like.shape
        return torch.zeros(batch, heads, self.capacity, dim, dtype=like.dtype)


def test_batch_layers_in_a_cache_take_transformers_update_and_tell_their_length():
    rows = _Rows(end=4, capacity=10)
    cache = adapters.batch_cache(rows, num_layers=2)
    assert isinstance(cache, adapters.Cache) and len(cache.layers) == 2
    assert cache.get_seq_length(0) == 4 and cache.get_mask_sizes(1, 0) == (5, 0)
    k = torch.ones(3, 2, 2, 8)
    # The keywords a 5.24 attention module passes on (`kwargs=`) must be accepted.
    keys, values = cache.update(k, 2 * k, 0, kwargs={"position_ids": None})
    assert keys.shape == (3, 2, 6, 8) and torch.equal(values[:, :, 4:], 2 * k)
    assert torch.count_nonzero(keys[:, :, :4]) == 0
    assert cache.get_seq_length(0) == 6 and cache.get_seq_length(1) == 4
    assert cache.get_mask_sizes(1, 0) == (7, 0) and cache.get_max_length(0) == 10
    with pytest.raises(ValueError, match="holds 10 columns"):
        cache.update(torch.ones(3, 2, 5, 8), k, 0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_a_decoder_layer_over_a_batch_cache_equals_it_over_a_request_cache(arch):
    """One unpadded row through a real decoder layer: the batch cache's path gives the
    request cache's values, over a prompt and a decode step."""
    model = _model(arch)
    adapter = adapters.adapter_for(model.config)
    layer = adapter.module(model, "layers")[0]
    rotary = adapter.module(model, "rotary")
    request = adapters.new_request_cache(model.config)
    rows = _Rows(end=0, capacity=N + 1)
    batch = adapters.batch_cache(rows, num_layers=model.config.num_hidden_layers)
    torch.manual_seed(1)
    hidden = torch.randn(1, N + 1, model.config.hidden_size)
    for begin, end in ((0, N), (N, N + 1)):
        x = hidden[:, begin:end]
        positions = torch.arange(begin, end).unsqueeze(0)
        embeddings = rotary(x, positions) if rotary is not None else None
        causal = torch.full((end - begin, end), torch.finfo(x.dtype).min).triu(begin + 1)
        mask = causal[None, None]
        with torch.no_grad():
            want = adapter.run_layer(layer, x, mask, positions, embeddings, request)
            got = adapter.run_layer(layer, x, mask, positions, embeddings, batch)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert batch.get_seq_length(0) == request.get_seq_length(0) == N + 1


def test_checkpoint_config_of_a_real_directory_has_an_adapter(checkpoints):
    for arch, directory in checkpoints.items():
        assert adapters.adapter_for(open_checkpoint(directory).config).family == arch
