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


def test_the_digests_of_a_loaded_are_checked_against_the_checkpoint(checkpoints):
    """What `on_loaded` refuses: another digest (the first by name is named), malformed
    records, a layer of the range without any digest."""
    meta = read_checkpoint(checkpoints["llama"])
    table = meta.digest_table.digests
    layers_1_2 = {k: d for k, d in table.items() if meta.layer_of(k) in (1, 2)}
    packed = meta.pack_digests(layers_1_2)
    assert len(packed) == 20 * len(layers_1_2)
    assert meta.unpack_digests(packed) == layers_1_2
    assert meta.digest_problem(packed, 1, 3) is None

    first, second = sorted(layers_1_2)[:2]
    other = {**layers_1_2, first: bytes(16), second: bytes(16)}
    assert meta.digest_problem(meta.pack_digests(other), 1, 3) == (
        f"loaded tensor {first} with other bytes than the broker's checkpoint {meta.path} "
        f"holds (digest {'00' * 16}, expected {table[first].hex()})"
    )
    assert meta.digest_problem(packed, 1, 4) == (
        "sent no tensor digest for layer 3 of its layers [1,4)"
    )
    assert meta.digest_problem(packed[:-1], 1, 3) == (
        f"sent malformed tensor digests ({len(packed) - 1} bytes are not whole tensor digests)"
    )
    beyond = (len(meta.tensors)).to_bytes(4, "little") + bytes(16)
    assert meta.digest_problem(packed + beyond, 1, 3) == (
        f"sent malformed tensor digests (tensor index {len(meta.tensors)} is beyond the "
        f"{len(meta.tensors)} tensors)"
    )
