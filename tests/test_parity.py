"""Sharded forward == monolithic transformers forward, bit for bit, for every architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from stage.adapters import new_request_cache
from stage.loading import load_shard
from tests.tiny_models import ARCHITECTURES, VOCAB, cache_kwargs

# 5 layers; uneven splits on purpose.
SPLITS = {
    "1": [(0, 5)],
    "2": [(0, 2), (2, 5)],
    "2-uneven": [(0, 4), (4, 5)],
    "3": [(0, 1), (1, 3), (3, 5)],
    "4": [(0, 2), (2, 3), (3, 4), (4, 5)],
}
PROMPT_LEN = 9
DECODE_STEPS = 20  # beyond the 12-token sliding windows of mistral and qwen2
GREEDY_TOKENS = 32


def _prompt(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, PROMPT_LEN), generator=g)


def _run(shards, states, ids, logits="all"):
    """Chain the shards; return the boundary hidden states and the logits."""
    boundaries = []
    x = ids
    for shard, state in zip(shards, states, strict=True):
        x = shard.forward(x, state, logits=logits)
        if not shard.last:
            boundaries.append((shard.end, x))
    return boundaries, x


def _reference(directory, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # always generate the full length
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_and_decode_bit_exact(checkpoints, arch, split):
    directory = checkpoints[arch]
    shards = [load_shard(directory, a, b) for a, b in SPLITS[split]]
    assert_chain_equals_reference(_reference(directory), shards, f"{arch} split {split}")


def assert_chain_equals_reference(
    ref, shards, label: str, decode_steps: int = DECODE_STEPS
) -> None:
    """Prefill then `decode_steps` greedy steps through the chained shards: every stage
    boundary and the logits equal the monolithic forward's, bit for bit."""
    states = [s.new_cache() for s in shards]
    ref_cache = new_request_cache(ref.config)
    ids = _prompt()
    with torch.no_grad():
        for step in range(decode_steps + 1):
            out = ref(
                ids, **cache_kwargs(ref, ref_cache), use_cache=True, output_hidden_states=True
            )
            boundaries, logits = _run(shards, states, ids)
            for layer, hidden in boundaries:
                assert torch.equal(hidden, out.hidden_states[layer]), (
                    f"{label}: hidden state at layer {layer} differs at step {step}"
                )
            assert torch.equal(logits, out.logits), f"{label}: logits differ at step {step}"
            ids = out.logits[:, -1:].argmax(-1)
    assert all(state.length == PROMPT_LEN + decode_steps for state in states)


def _greedy(shards, prompt, n):
    states = [s.new_cache() for s in shards]
    tokens = []
    x = prompt
    for _ in range(n):
        _, logits = _run(shards, states, x, logits="last")
        nxt = logits[:, -1].float().argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        x = nxt
    return tokens


@pytest.mark.parametrize("split", ["1", "3", "4"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_equals_generate(checkpoints, arch, split):
    directory = checkpoints[arch]
    ref = _reference(directory)
    prompt = _prompt(seed=2)
    expected = ref.generate(prompt, do_sample=False, max_new_tokens=GREEDY_TOKENS)[0, PROMPT_LEN:]
    shards = [load_shard(directory, a, b) for a, b in SPLITS[split]]
    assert _greedy(shards, prompt, GREEDY_TOKENS) == expected.tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bfloat16_greedy_equals_generate(checkpoints, arch):
    directory = checkpoints[arch]
    ref = _reference(directory, dtype=torch.bfloat16)
    prompt = _prompt(seed=3)
    expected = ref.generate(prompt, do_sample=False, max_new_tokens=GREEDY_TOKENS)[0, PROMPT_LEN:]
    shards = [load_shard(directory, a, b, dtype="bfloat16") for a, b in SPLITS["3"]]
    assert all(
        p.dtype == torch.bfloat16 for s in shards for m in s.modules() for p in m.parameters()
    )
    assert _greedy(shards, prompt, GREEDY_TOKENS) == expected.tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_reshard_reuses_held_layers_and_stays_exact(checkpoints, arch):
    """A shard rebuilt for a new range keeps the layers it held and reads only the new ones."""
    directory = checkpoints[arch]
    old = load_shard(directory, 1, 4)
    new = load_shard(directory, 0, 3, reuse=old)
    assert new.layers[1] is old.layers[0] and new.layers[2] is old.layers[1]
    tail = load_shard(directory, 3, 5, reuse=old)
    assert tail.layers[0] is old.layers[2]
    ref = _reference(directory)
    prompt = _prompt(seed=4)
    expected = ref.generate(prompt, do_sample=False, max_new_tokens=12)[0, PROMPT_LEN:]
    assert _greedy([new, tail], prompt, 12) == expected.tolist()
