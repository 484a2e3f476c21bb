"""The request bodies the gateway takes, as pydantic models, and the rules that refuse the rest.

Unknown fields are ignored, as OpenAI's own server does, except those that change what a
request means (tools, a response format, penalties the sampler lacks): the gateway cannot
honour them, so it refuses them by name instead of answering something else.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from client.sampling import MAX_LOGPROBS
from gateway.errors import APIError

# OpenAI's own bounds, so that a request valid there is valid here and the reverse.
MAX_STOP_STRINGS = 4
MAX_TEMPERATURE = 2.0
MAX_COMPLETION_LOGPROBS = 5
# /v1/completions without max_tokens generates this many, as OpenAI's does.
DEFAULT_COMPLETION_TOKENS = 16

# Fields that change the meaning of a request, with the values that leave it unchanged (sent
# with one of those, a field is accepted). Everything else unknown is ignored.
MEANING_CHANGING: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "suffix": (None, ""),
    "echo": (None, False),
    "best_of": (None, 1),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Generation(BaseModel):
    """What both endpoints take."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)

    def check(self) -> None:
        """Refuse what pydantic's types cannot say: meaning-changing fields, n > 1, stops."""
        extra = self.model_extra or {}
        refused = sorted(
            name
            for name, neutral in MEANING_CHANGING.items()
            if name in extra and extra[name] not in neutral
        )
        if refused:
            raise APIError.invalid(
                f"{', '.join(refused)} {'is' if len(refused) == 1 else 'are'} not supported by "
                "this server: it generates plain text with the model's own sampler; remove "
                f"{'it' if len(refused) == 1 else 'them'} from the request",
                param=refused[0],
            )
        if self.n not in (None, 1):
            raise APIError.invalid(
                f"n={self.n} is not supported: each request returns one choice; send n "
                "requests (with different seeds) instead",
                param="n",
            )
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError.invalid(
                f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop"
            )
        if any(not s for s in stops):
            raise APIError.invalid("stop strings must not be empty", param="stop")
        if self.stream_options is not None and not self.stream:
            raise APIError.invalid(
                "stream_options is only allowed with stream: true", param="stream_options"
            )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop or None


class ChatRequest(_Generation):
    """POST /v1/chat/completions."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError.invalid("top_logprobs needs logprobs: true", param="top_logprobs")
        both = (self.max_tokens, self.max_completion_tokens)
        if None not in both and both[0] != both[1]:
            raise APIError.invalid(
                f"max_tokens ({both[0]}) and max_completion_tokens ({both[1]}) differ; "
                "give one of them",
                param="max_completion_tokens",
            )

    @property
    def token_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def alternatives(self) -> int | None:
        """k for the client's `logprobs`: None when no log-probabilities are asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    def check(self) -> None:
        super().check()
        prompt = self.prompt
        batch = isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list)
        if batch and len(prompt) != 1:
            raise APIError.invalid(
                f"a batch of {len(prompt)} prompts is not supported: send one request per "
                "prompt (they run concurrently)",
                param="prompt",
            )
        if prompt in ("", []) or prompt == [""] or prompt == [[]]:
            raise APIError.invalid("prompt is empty", param="prompt")

    @property
    def one_prompt(self) -> str | list[int]:
        """The prompt itself: a batch of one is unwrapped."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return prompt[0]
        return prompt

    @property
    def token_cap(self) -> int:
        return self.max_tokens or DEFAULT_COMPLETION_TOKENS

    @property
    def alternatives(self) -> int | None:
        return self.logprobs
