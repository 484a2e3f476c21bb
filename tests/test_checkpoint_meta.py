"""Checkpoint metadata read without torch: the weight bytes the broker plans layer maps with."""

from __future__ import annotations

from common.checkpoint import read_checkpoint
from tests.tiny_models import CONFIGS


def test_a_tied_head_is_sized_in_the_dtype_it_is_stored_in(tmp_path):
    """A tied head shares the embedding: the last stage holds it in the checkpoint's dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    config = CONFIGS["qwen2"]()
    assert config.tie_word_embeddings
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    meta = read_checkpoint(tmp_path)
    embedding = config.vocab_size * config.hidden_size
    final_norm = config.hidden_size
    assert meta.weight_bytes()["last"] == 2 * (embedding + final_norm)
    assert meta.weight_bytes(4)["last"] == 4 * (embedding + final_norm)
