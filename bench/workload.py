"""The prompts every scenario uses: seeded token ids, the same for layerline and the baseline."""

from __future__ import annotations

import random

PROMPT_SEED = 7
FIRST_ID = 3  # ids below are special tokens (bos/eos/pad) in every preset


def prompt(index: int, length: int, vocab: int, seed: int = PROMPT_SEED) -> list[int]:
    rng = random.Random(seed * 1_000_003 + index)
    return [rng.randrange(FIRST_ID, vocab) for _ in range(length)]
