"""The client's sampler against transformers' own `generate`: same processors, order and draws."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from client import InvalidArgument, SamplingError
from client.sampling import Sampler, token_logprobs

VOCAB = 160


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> LlamaForCausalLM:
    """A tiny random Llama, saved and reloaded as any checkpoint would be."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=None,  # never stop early: every run compares max_new_tokens draws
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    return LlamaForCausalLM.from_pretrained(directory).eval()


def _logits(seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn((1, vocab), generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.timeout(60)
def test_greedy_is_argmax():
    for seed in range(20):
        logits = _logits(seed)
        assert Sampler().next_token(logits) == int(logits.argmax())
        assert Sampler(temperature=None).next_token(logits.to(torch.bfloat16)) == int(
            logits.to(torch.bfloat16).float().argmax()
        )


@pytest.mark.timeout(60)
def test_top_k_1_is_greedy():
    for seed in range(20):
        logits = _logits(seed)
        sampler = Sampler(temperature=1.3, top_k=1, seed=seed)
        assert sampler.next_token(logits) == int(logits.argmax())


@pytest.mark.timeout(60)
def test_seeded_sampling_is_reproducible_and_seed_dependent():
    def draws(seed: int) -> list[int]:
        sampler = Sampler(temperature=1.0, seed=seed)
        return [sampler.next_token(torch.zeros(1, VOCAB)) for _ in range(32)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)
    # The sampler's RNG is private: the global one neither feeds it nor is advanced by it.
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert draws(3) == draws(3)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.timeout(60)
def test_sampler_does_not_write_into_the_received_logits():
    logits = _logits(1)
    copy = logits.clone()
    Sampler(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3, seed=0).next_token(
        logits, [1, 2, 3]
    )
    assert torch.equal(logits, copy)


@pytest.mark.timeout(60)
def test_invalid_settings_raise():
    for kwargs in (
        {"temperature": -0.1},
        {"top_k": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"repetition_penalty": 0.0},
    ):
        with pytest.raises(ValueError):
            Sampler(**kwargs)


@pytest.mark.timeout(60)
def test_non_finite_and_mistyped_settings_are_refused_with_their_range():
    cases = [
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": "0.7"}, "temperature must be a finite number >= 0"),
        ({"top_k": 2.5}, "top_k must be an integer >= 1"),
        ({"top_p": float("nan")}, r"top_p must be a finite number in \(0, 1\]"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number > 0"),
        ({"seed": "abc"}, r"seed must be an integer in \[0, 18446744073709551615\], got 'abc'"),
        ({"seed": 2**70}, r"seed must be an integer in \[0, "),
        ({"seed": -1}, r"seed must be an integer in \[0, "),
        ({"seed": True}, r"seed must be an integer"),
    ]
    for kwargs, message in cases:
        for temperature in (0.0, 0.8):  # refused under greedy too, where a seed is unused
            with pytest.raises(InvalidArgument, match=message):
                Sampler(**{"temperature": temperature, **kwargs})


@pytest.mark.timeout(60)
def test_integer_settings_sample_as_their_floats():
    logits = _logits(3)
    ints = Sampler(temperature=2, top_k=50, repetition_penalty=2, seed=2**64 - 1)
    floats = Sampler(temperature=2.0, top_k=50, repetition_penalty=2.0, seed=2**64 - 1)
    history = torch.tensor([[1, 2, 3]])
    drawn = [(ints.next_token(logits, history), floats.next_token(logits, history))]
    assert all(a == b for a, b in drawn)


@pytest.mark.timeout(60)
def test_non_finite_logits_raise_a_sampling_error():
    for bad in (float("nan"), float("inf")):
        logits = _logits(4)
        logits[0, 5] = bad
        for sampler in (Sampler(), Sampler(repetition_penalty=1.3), Sampler(0.8, seed=1)):
            with pytest.raises(SamplingError, match="--dtype float32"):
                sampler.next_token(logits, [1, 2])
    with pytest.raises(SamplingError, match="logits hold 0 nan and 160 infinite"):
        Sampler().next_token(torch.full((1, VOCAB), float("-inf")))
    # Finite logits that the settings themselves overflow: the message names the settings.
    with pytest.raises(SamplingError, match=r"temperature=1e-300.*use temperature=0"):
        Sampler(temperature=1e-300, seed=0).next_token(_logits(5))


SETTINGS = [
    # (temperature, top_k, top_p, repetition_penalty)
    (0.7, 20, 0.9, 1.3),
    (1.0, None, None, None),
    (1.5, 5, None, 1.1),
    (0.5, None, 0.8, 0.9),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("temperature", "top_k", "top_p", "repetition_penalty"), SETTINGS)
def test_matches_generate_do_sample(tiny_llama, temperature, top_k, top_p, repetition_penalty):
    """Same processed scores at every step, and the same tokens from the same seed."""
    prompt = torch.tensor([[1, 17, 42, 99, 5, 17, 23]])
    seed, new = 1234, 24
    torch.manual_seed(seed)
    out = tiny_llama.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        temperature=temperature,
        top_k=top_k if top_k is not None else 0,  # generate's default would be 50
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        max_new_tokens=new,
        min_new_tokens=new,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    sequence = out.sequences
    assert sequence.shape[1] == prompt.shape[1] + new

    sampler = Sampler(temperature, top_k, top_p, repetition_penalty, seed=seed)
    tokens = []
    for i in range(new):
        history = sequence[:, : prompt.shape[1] + i]
        assert torch.equal(sampler.process(out.logits[i], history), out.scores[i])
        tokens.append(sampler.next_token(out.logits[i], history))
    assert tokens == sequence[0, prompt.shape[1] :].tolist()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("repetition_penalty", [None, 1.4])
def test_greedy_matches_generate(tiny_llama, repetition_penalty):
    prompt = torch.tensor([[1, 8, 9, 10, 11]])
    new = 16
    out = tiny_llama.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        repetition_penalty=repetition_penalty,
        max_new_tokens=new,
        output_logits=True,
        return_dict_in_generate=True,
    )
    sampler = Sampler(temperature=0, repetition_penalty=repetition_penalty)
    tokens = [
        sampler.next_token(out.logits[i], out.sequences[:, : prompt.shape[1] + i])
        for i in range(new)
    ]
    assert tokens == out.sequences[0, prompt.shape[1] :].tolist()


def test_token_logprobs_are_the_models_distribution_in_order():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3), dtype=torch.float16)
    token = int(logits.argmax())
    scores = token_logprobs(logits, 17, 5)
    exact = torch.log_softmax(logits.float().reshape(-1), dim=-1)
    assert scores["logprob"] == pytest.approx(float(exact[17]))
    top = scores["top_logprobs"]
    assert [i for i, _ in top][0] == token and len(top) == 5
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert all(lp == pytest.approx(float(exact[i])) for i, lp in top)
    assert token_logprobs(logits, 17, 0)["top_logprobs"] == []
