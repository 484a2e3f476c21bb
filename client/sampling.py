"""Next-token selection on the client: transformers' own logits processors, in `generate`'s order.

The sampler owns the request's RNG. It is advanced only when a token is actually chosen, so a
replay (which recomputes logits but samples nothing) leaves the stream of random draws as it
was, and a seeded request gives the same tokens with or without failures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from client import checks
from client.errors import SamplingError

# torch.Generator.manual_seed takes any 64-bit pattern; one range keeps seeds portable.
MAX_SEED = 2**64 - 1
# Alternatives reported per token with `logprobs=k`: OpenAI's own bound on top_logprobs. Each
# costs a top-k over the vocabulary on the client, nothing on the stages.
MAX_LOGPROBS = 20


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> dict:
    """The model's log-probability of `token` and of its `k` most likely tokens, from the raw
    logits (before temperature or penalties: the model's own distribution)."""
    logp = torch.log_softmax(logits.reshape(-1).to(torch.float32), dim=-1)
    values, ids = torch.topk(logp, min(k, logp.numel()))
    return {
        "logprob": float(logp[token]),
        "top_logprobs": [[int(i), float(v)] for v, i in zip(values, ids, strict=True)],
    }


def check_sampling_args(
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
    seed: int | None = None,
) -> None:
    """Raise InvalidArgument (a ValueError) for a sampling setting that is not a finite
    number in its range, before transformers or torch would reject or misread it."""
    if temperature is not None:
        checks.real(temperature, "temperature", ">= 0 (0 means greedy)", lambda t: t >= 0)
    if top_k is not None:
        checks.integer(top_k, "top_k", 1)
    if top_p is not None:
        checks.real(top_p, "top_p", "in (0, 1]", lambda p: 0 < p <= 1)
    if repetition_penalty is not None:
        checks.real(repetition_penalty, "repetition_penalty", "> 0", lambda r: r > 0)
    if seed is not None:
        checks.integer(seed, "seed", 0, MAX_SEED)


class Sampler:
    """Chooses each next token from a `[1, V]` row of logits.

    Greedy when `temperature` is 0 or None (argmax after the repetition penalty, as
    `generate(do_sample=False)`); otherwise repetition penalty, temperature, top-k, top-p and
    a multinomial draw, as `generate(do_sample=True)`. With `seed`, draws come from a private
    `torch.Generator`, so the same seed gives the same tokens.
    """

    def __init__(
        self,
        temperature: float | None = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
    ):
        check_sampling_args(temperature, top_k, top_p, repetition_penalty, seed)
        # transformers' processors take floats only (an int temperature is refused there).
        temperature = float(temperature or 0.0)
        top_k = None if top_k is None else int(top_k)
        top_p = None if top_p is None else float(top_p)
        if repetition_penalty is not None:
            repetition_penalty = float(repetition_penalty)
        self.greedy = not temperature
        self.settings = f"temperature={temperature:g}, repetition_penalty={repetition_penalty}"
        # Built and ordered as GenerationMixin._get_logits_processor does: processors first,
        # then the warpers that only apply when sampling; neutral values add nothing.
        processors = LogitsProcessorList()
        if repetition_penalty is not None and repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if not self.greedy:
            if temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if top_k is not None:
                processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
            if top_p is not None and top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
        self.processors = processors
        self.uses_history = repetition_penalty is not None and repetition_penalty != 1.0
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator()
            if seed is None:
                self.generator.seed()  # non-deterministic; the default seed is a constant
            else:
                self.generator.manual_seed(int(seed))

    def process(
        self, logits: torch.Tensor, input_ids: torch.Tensor | Sequence[int]
    ) -> torch.Tensor:
        """The processed scores `[1, V]` in float32, before softmax (what `generate` samples from)."""
        scores = logits.reshape(1, -1).to(torch.float32, copy=True)
        if not self.processors:
            return scores
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
        elif input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        return self.processors(input_ids, scores)

    def next_token(self, logits: torch.Tensor, input_ids: torch.Tensor | Sequence[int] = ()) -> int:
        """The next token id, given the logits `[1, V]` (any float dtype) and the ids so far."""
        if self.greedy and not self.processors:
            # The hot path: argmax on the received buffer itself, without a copy.
            token = int(logits.reshape(-1).argmax())
            # argmax takes nan for the largest value: checking the winner alone finds nan,
            # +inf and a row of -inf, at O(1) per token.
            if not math.isfinite(float(logits.reshape(-1)[token])):
                raise self._non_finite(logits)
            return token
        scores = self.process(logits, input_ids)
        if self.greedy:
            token = int(scores.argmax(dim=-1))
            if not math.isfinite(float(scores[0, token])):
                raise self._non_finite(logits)
            return token
        probs = torch.softmax(scores, dim=-1)
        try:
            return int(torch.multinomial(probs, num_samples=1, generator=self.generator))
        except RuntimeError:  # torch refuses a distribution with nan, inf or negative values
            raise self._non_finite(logits) from None

    def _non_finite(self, logits: torch.Tensor) -> SamplingError:
        nan = int(torch.isnan(logits).sum())
        inf = int(torch.isinf(logits).sum())
        if nan or inf:
            return SamplingError(
                f"the model's logits hold {nan} nan and {inf} infinite values of "
                f"{logits.numel()}, so no token can be chosen; the checkpoint's weights are "
                "broken or the stages' dtype overflows (serve it with --dtype float32)"
            )
        return SamplingError(
            f"the sampling settings ({self.settings}) turn the model's finite logits into nan "
            "or inf, so no token can be chosen; a temperature this close to 0 overflows "
            "(use temperature=0 for greedy), as does an extreme repetition_penalty"
        )
