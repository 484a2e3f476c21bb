"""Token ids to text, as a client and the monitor show it: incremental detokenization and stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Files of which a checkpoint directory holds at least one when it ships a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
)
# Prompt tokens decoded together with the first generated ones, so that a tokenizer which
# strips a leading space at the start of a decode keeps the space of the first new word.
DETOKENIZE_CONTEXT = 5
# Tokens held back while their text ends in U+FFFD (an incomplete UTF-8 character); four
# covers any character split over single-byte tokens.
MAX_PENDING_TOKENS = 4


def ships_tokenizer(directory: Path) -> bool:
    """Whether a checkpoint directory holds a tokenizer (a bare one serves token ids only)."""
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_source(model: str | Path) -> tuple[str, dict[str, str]] | None:
    """Where `AutoTokenizer.from_pretrained` finds a checkpoint's tokenizer: (directory,
    keyword arguments), a GGUF file's own vocabulary and chat template included. None for a
    checkpoint without one (it serves token ids only) or one not on this machine."""
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir() and ships_tokenizer(path):
        return str(path), {}
    return None


class TextAssembler:
    """Turns generated ids into text deltas: incremental detokenization plus stop strings.

    Decodes only a short window of recent ids per token (O(1) per token), and holds back any
    text that could still become a stop string, so the deltas never show a stop string and
    always add up to the final text.
    """

    def __init__(self, tokenizer: Any, context: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0
        self.stop = tuple(stop)
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.searched = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""  # a checkpoint without a tokenizer: ids in, ids out
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _advance(self, final: bool) -> None:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        # A trailing U+FFFD is usually half of a multi-byte character: wait for the next
        # token, but not forever (a model can emit invalid UTF-8), so the window stays small.
        pending = len(self.ids) - self.read_offset
        if not final and full.endswith("\ufffd") and pending < MAX_PENDING_TOKENS:
            return
        self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that may be shown now."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self._advance(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """No more tokens: return whatever text was still held back."""
        if not self.stopped and self.read_offset < len(self.ids):
            self._advance(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        safe = len(self.text)
        if self.stop and not self.stopped:
            start = max(0, self.searched - self.max_stop + 1)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                safe = len(self.text)
            else:
                self.searched = len(self.text)
                if not final:
                    safe -= self._held_back()
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
