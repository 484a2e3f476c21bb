"""Next-token selection on the client: transformers' own logits processors, in `generate`'s order.

The sampler owns the request's RNG. It is advanced only when a token is actually chosen, so a
replay (which recomputes logits but samples nothing) leaves the stream of random draws as it
was, and a seeded request gives the same tokens with or without failures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def check_sampling_args(
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
) -> None:
    """Raise ValueError for a sampling setting that transformers would reject or misread."""
    if temperature is not None and not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


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
        check_sampling_args(temperature, top_k, top_p, repetition_penalty)
        self.greedy = not temperature
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
                self.generator.manual_seed(seed)

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
            return int(logits.reshape(-1).argmax())
        scores = self.process(logits, input_ids)
        if self.greedy:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))
