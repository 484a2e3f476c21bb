"""Token ids to per-token text for the monitor, decoded in the reader thread as the client does."""

from __future__ import annotations

import collections
from typing import Any

import structlog

from common.text import DETOKENIZE_CONTEXT, TextAssembler, tokenizer_source
from tui.state import MAX_TEXTS

log = structlog.get_logger("tui")


def load_tokenizer(model: str | None) -> Any:
    """The checkpoint's tokenizer if it is on this machine, else None (the app shows ids)."""
    source = tokenizer_source(model) if model else None
    if source is None:
        return None
    try:
        from transformers import AutoTokenizer  # deferred: importing it costs a second

        directory, options = source
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, **options)
    except (OSError, ValueError) as e:
        log.warning("tokenizer_unavailable", model=model, error=str(e))
        return None


class TokenText:
    """Turns each request's token ids into per-token text, incrementally, as the client does."""

    def __init__(self, tokenizer: Any = None, max_requests: int = MAX_TEXTS):
        self.tokenizer = tokenizer
        self.max_requests = max_requests
        # rid -> (next position, the request's TextAssembler)
        self.requests: collections.OrderedDict[str, tuple[int, TextAssembler]] = (
            collections.OrderedDict()
        )

    def pieces(self, rid: str, pos: int, ids: list[int]) -> tuple[str, ...] | None:
        """Text for each id, or None for ids already seen (a replay re-sends them)."""
        if self.tokenizer is None:
            return tuple(f"{i} " for i in ids)
        if pos == 0:
            text = self.tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            self._keep(rid, len(ids), TextAssembler(self.tokenizer, ids[-DETOKENIZE_CONTEXT:]))
            return (text, *("" for _ in ids[1:]))
        expected, assembler = self.requests.get(rid, (None, None))
        if expected is not None and pos < expected:
            return None
        if expected is None or pos > expected:
            # We missed the prompt or some steps: decode on from here without context.
            assembler = TextAssembler(self.tokenizer, [])
        out = tuple(assembler.push(i) for i in ids)
        self._keep(rid, pos + len(ids), assembler)
        return out

    def _keep(self, rid: str, next_pos: int, assembler: TextAssembler) -> None:
        self.requests[rid] = (next_pos, assembler)
        self.requests.move_to_end(rid)
        while len(self.requests) > self.max_requests:
            self.requests.popitem(last=False)
