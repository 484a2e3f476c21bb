"""One request's state on the client: its token sequence, the steps it sent, and their replay.

The client is the source of truth for a request, so everything a replay needs lives here: the
tokens, the rolling prefix hash at every position, and the `(pos, n)` cut of every step sent.
A `Request` does no I/O: it turns incoming messages into outgoing messages and stream events,
and the transports (`client.transport`) encode and move them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import torch

from broker import messages as M
from broker.protocol import EMPTY_PREFIX_HASH, REPLAY_CODES, Cmd, Code, Message, prefix_hash
from client import checks
from client.errors import (
    BusyError,
    InvalidArgument,
    NotReadyError,
    RequestFailed,
)
from client.sampling import Sampler, token_logprobs
from common.defaults import MAX_REPLAYS
from common.text import TextAssembler

# A message for the broker, not yet encoded: (body, tensors). The transport sends the STEPs
# that one incoming message caused as one STEPS bundle.
Outgoing = tuple[M.Body, list]


def as_json(value: Any) -> Any:
    """A message struct (or part of one) as the JSON it travels as: dicts and lists, with the
    fields at their defaults left out. What the client hands its callers."""
    return msgspec.json.decode(msgspec.json.encode(value))


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]  # generated tokens only, without the eos that ended the request
    prompt_ids: list[int]
    text: str  # decoded generated text, without eos and without the stop string
    finish_reason: str  # "eos" | "stop" | "length"
    trace: list[dict] = field(default_factory=list)  # one entry per generated token
    events: list[dict] = field(default_factory=list)  # reshard / replay events
    ttft_s: float = 0.0
    total_s: float = 0.0
    rid: str = ""
    # With `logprobs=k`: per generated token, its `logprob` and `top_logprobs` ([id, logprob]).
    logprobs: list[dict] = field(default_factory=list)


class Request:
    """A generation request: its sequence, its step history and what it is waiting for."""

    def __init__(
        self,
        rid: str,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampler: Sampler,
        assembler: TextAssembler,
        eos_ids: frozenset[int],
        prefill_chunk: int,
        max_replays: int = MAX_REPLAYS,
        wait_ready_s: float = 0.0,
        idle_s: float | None = None,
        logprobs: int | None = None,
    ):
        self.rid = rid
        self.logprobs = logprobs  # k alternatives per token, or None for no log-probabilities
        # The client's idle_timeout, told to the broker in every step: it ends the request
        # itself when an answer waits that long for its next step (a client whose thread does
        # not run while its stream is not read cannot end it).
        self.idle_s = idle_s
        self.prefill_chunk = prefill_chunk
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.assembler = assembler
        self.eos_ids = eos_ids
        self.max_replays = max_replays
        self.started = time.perf_counter()
        self.tokens: list[int] = list(prompt_ids)
        # hashes[i] is the prefix hash of tokens[:i]; kept per position so every step's
        # `prev` and `hash` are two lookups, whatever the length of the sequence.
        self.hashes: list[int] = [EMPTY_PREFIX_HASH]
        for tok in self.tokens:
            self.hashes.append(prefix_hash(self.hashes[-1], (tok,)))
        self.steps: list[tuple[int, int]] = []  # (pos, n) of every step, as first cut
        self.seq = 0
        self.awaited = 0  # seq of the step whose logits come next
        self.oldest_live = 0  # first seq of the latest send (a replay sends many)
        self.replays = 0
        self.generated: list[int] = []
        self.trace: list[dict] = []
        self.token_logprobs: list[dict] = []
        self.events: list[dict] = []
        self.sent_at = self.started  # when the step of the awaited token was first sent
        self.ttft_s = 0.0
        self.result: GenerationResult | None = None
        # Readiness: "probe" until the broker's first answer after the start says it can run
        # the request, "held" while the caller waits for a cluster that is not ready.
        self.wait_ready_s = wait_ready_s
        self.gate: Literal["probe", "held"] | None = "probe"
        self.told: tuple[str, float] = ("", 0.0)  # the last waiting event: reason, time
        # Back-pressure: tokens delivered that the consumer has not read, since when, and
        # whether the next step waits for the consumer (see `read`).
        self.unread = 0
        self.unread_since = self.started
        self.stalled = False
        # The repetition penalty reads every id so far; a preallocated buffer saves building
        # a tensor from the whole list at each token.
        self.ids_buffer: torch.Tensor | None = None
        if sampler.uses_history:
            self.ids_buffer = torch.zeros((1, len(self.tokens) + max_new_tokens), dtype=torch.long)
            self.ids_buffer[0, : len(self.tokens)] = torch.tensor(self.tokens, dtype=torch.long)

    # --- outgoing ------------------------------------------------------------------------

    def _step(self, pos: int, n: int, logits: bool) -> Outgoing:
        self.seq += 1
        step = M.Step(
            rid=self.rid,
            seq=self.seq,
            pos=pos,
            n=n,
            prev=self.hashes[pos],
            hash=self.hashes[pos + n],
            logits=logits,
            idle_s=self.idle_s,
        )
        return step, [torch.tensor([self.tokens[pos : pos + n]], dtype=torch.long)]

    def _next_step(self, pos: int, n: int) -> Outgoing:
        self.steps.append((pos, n))
        step = self._step(pos, n, logits=True)
        self.awaited = self.oldest_live = self.seq
        self.sent_at = time.perf_counter()
        return step

    def start(self) -> list[Outgoing]:
        """The prefill: the prompt as one step, or as chunks of `prefill_chunk` tokens sent at
        once; only the last chunk asks for logits."""
        # Chunks flow through the pipeline together, and other requests' decode steps overtake
        # them at every stage instead of waiting behind one long prefill.
        n, chunk = len(self.tokens), self.prefill_chunk
        cuts = [(pos, min(chunk, n - pos)) for pos in range(0, n, chunk)]
        out = []
        # The first chunk's seq: a refusal of it (busy, at admission) ends the request.
        first = self.seq + 1
        for pos, size in cuts[:-1]:
            self.steps.append((pos, size))
            out.append(self._step(pos, size, logits=False))
        out.append(self._next_step(*cuts[-1]))
        self.oldest_live = first
        return out

    def replay(self, event: dict, counted: bool = True) -> list[Outgoing]:
        """Steps that re-send every step as first cut; only the last one asks for logits."""
        if counted:
            self.replays += 1
            if self.replays > self.max_replays:
                raise RequestFailed(
                    str(Code.REPLAY_LIMIT),
                    f"request {self.rid} needed more than {self.max_replays} replays "
                    f"(last: {event.get('reason') or event['type']}); the cluster is unstable",
                )
        self.events.append(event)
        first = self.seq + 1
        # A stalled request has sampled from its last step already: the replay only rebuilds
        # the caches, and the next step leaves when the consumer reads on.
        last = len(self.steps) - 1 if not self.stalled else -1
        out = [self._step(p, n, logits=i == last) for i, (p, n) in enumerate(self.steps)]
        self.oldest_live, self.awaited = first, self.seq if not self.stalled else 0
        return out

    def end(self, reason: Literal["done", "cancelled", "failed"]) -> Outgoing:
        return M.End(rid=self.rid, reason=reason), []

    # --- incoming ------------------------------------------------------------------------

    def handle(self, msg: Message, now: float) -> tuple[list[Outgoing], list[dict]]:
        """Messages to send and stream events for one message addressed to this request.

        Raises BusyError, NotReadyError or RequestFailed when the request cannot go on.
        """
        if msg.cmd == Cmd.RESULT:
            if msg.body.seq != self.awaited or self.result is not None:
                return [], []
            return self._on_result(msg, now)
        if msg.cmd == Cmd.EVENT:
            return self._on_event(msg.body)
        if msg.cmd == Cmd.ERROR:
            return self._on_error(msg.body, now)
        return [], []

    def _on_result(self, msg: Message, now: float) -> tuple[list[Outgoing], list[dict]]:
        body: M.StepResult = msg.body
        # The struct does not say how many frames follow a RESULT: the logits may be missing.
        logits = msg.tensor(0) if msg.frames else None
        if logits is None or logits.numel() == 0:
            raise RequestFailed(str(Code.INTERNAL), f"step {body.seq} returned no logits")
        self.gate = None  # computed: the cluster was ready
        t0 = time.perf_counter()
        history = None
        if self.ids_buffer is not None:
            history = self.ids_buffer[:, : len(self.tokens)]
        token = self.sampler.next_token(
            logits.reshape(1, -1), history if history is not None else ()
        )
        sampling_s = time.perf_counter() - t0
        index = len(self.generated)
        if index == 0:
            self.ttft_s = time.perf_counter() - self.started
        out: list[Outgoing] = []
        events: list[dict] = []
        if token in self.eos_ids:
            reason = "eos"  # the eos itself is neither a generated token nor text
        else:
            trace = {
                "index": index,
                "stages": as_json(body.trace),
                "broker_queue_s": body.broker_queue_s,
                "sampling_s": sampling_s,
                "latency_s": now - self.sent_at,
            }
            self.generated.append(token)
            self.trace.append(trace)
            scores = {}
            if self.logprobs is not None:
                scores = token_logprobs(logits, token, self.logprobs)
                self.token_logprobs.append(scores)
            if not self.unread:
                self.unread_since = now
            self.unread += 1
            reason = "length" if len(self.generated) >= self.max_new_tokens else None
            if reason is None:
                self._append(token)
                if not self.assembler.stop:
                    # No stop string to look for: the next step leaves before detokenizing.
                    out.extend(self._advance())
            text = self.assembler.push(token)
            if self.assembler.stopped:
                reason = "stop"
            elif reason is None and self.assembler.stop:
                out.extend(self._advance())
            events.append(
                {
                    "type": "token",
                    "index": index,
                    "token_id": token,
                    "text": text,
                    "trace": trace,
                    **scores,
                }
            )
        if reason is not None:
            out.append(self.end("done"))
            # Text held back until the end (a possible stop string's start, a split
            # character) arrives with the done event.
            tail = self.assembler.flush()
            events.append({"type": "done", "text": tail, "result": self._finish(reason)})
        return out, events

    def _advance(self) -> list[Outgoing]:
        """The next decode step, unless the consumer has not read the token before this one:
        then the request stalls until `read` (one token waiting, one step in flight at most)."""
        if self.unread > 1:
            self.stalled = True
            return []
        return [self._next_step(len(self.tokens) - 1, 1)]

    def read(self, event: dict, now: float) -> list[Outgoing]:
        """The consumer took `event` from the stream: the stalled next step may leave."""
        if event.get("type") != "token":
            return []
        self.unread -= 1
        self.unread_since = now
        if self.stalled and self.unread <= 1 and self.result is None:
            self.stalled = False
            return [self._next_step(len(self.tokens) - 1, 1)]
        return []

    def admitted(self) -> None:
        """The broker said it is ready: the request runs."""
        self.gate = None

    def not_ready(self, reason: str, now: float) -> list[dict]:
        """The broker says it cannot run the request yet: a waiting event while `wait_ready_s`
        lasts (one per new reason, or per second), then NotReadyError."""
        waited = now - self.started
        if waited >= self.wait_ready_s:
            if self.wait_ready_s:
                raise NotReadyError(
                    f"cluster still not ready after waiting {waited:.1f} s: {reason}", reason
                )
            raise NotReadyError(
                f"cluster not ready: {reason}; nothing was computed. Wait for it with "
                "wait_ready=SECONDS (command line: --wait-ready SECONDS)",
                reason,
            )
        self.gate = "held"
        told_reason, told_at = self.told
        if reason == told_reason and now - told_at < 1.0:
            return []
        self.told = (reason, now)
        event = {
            "type": "waiting",
            "reason": reason,
            "waited_s": round(waited, 3),
            "wait_ready_s": self.wait_ready_s,
            "index": len(self.generated),
        }
        return [event]

    def _append(self, token: int) -> None:
        if self.ids_buffer is not None:
            self.ids_buffer[0, len(self.tokens)] = token
        self.tokens.append(token)
        self.hashes.append(prefix_hash(self.hashes[-1], (token,)))

    def _finish(self, reason: str) -> GenerationResult:
        self.result = GenerationResult(
            token_ids=list(self.generated),
            prompt_ids=list(self.prompt_ids),
            text=self.assembler.text,
            finish_reason=reason,
            trace=self.trace,
            events=self.events,
            ttft_s=self.ttft_s,
            total_s=time.perf_counter() - self.started,
            rid=self.rid,
            logprobs=self.token_logprobs,
        )
        return self.result

    def _on_event(self, body: M.Event) -> tuple[list[Outgoing], list[dict]]:
        fields = as_json(body)
        event = {"type": fields.pop("event"), **fields, "index": len(self.generated)}
        return self.replay(event), [event]

    def _on_error(self, body: M.Error, now: float) -> tuple[list[Outgoing], list[dict]]:
        if body.seq is not None and body.seq < self.oldest_live:
            return [], []  # about a step that a replay has already superseded
        code, message = str(body.code), body.message
        if body.code in REPLAY_CODES:
            event = self._replay_event(code, message)
            return self.replay(event), [event]
        if body.code == Code.BUSY:
            raise BusyError(message, body.retry_after_s)
        if body.code == Code.NOT_READY:
            if now - self.started < self.wait_ready_s:
                # The broker's own wait (--ready-wait) ended first; the caller's goes on.
                self.gate = "held"
                event = self._replay_event(code, message)
                return self.replay(event, counted=False), [event]
            raise NotReadyError(message)
        raise RequestFailed(code, message)

    def reconnected(self) -> tuple[list[Outgoing], list[dict]]:
        """Steps that rebuild this request through a fresh socket (not counted as a replay)."""
        event = self._replay_event(
            "reconnect", "the broker was silent; reconnected on a fresh socket and replayed"
        )
        return self.replay(event, counted=False), [event]

    def _replay_event(self, reason: str, message: str) -> dict:
        """The stream's `replay` event: why the request is rebuilt, at which token."""
        return {
            "type": "replay",
            "rid": self.rid,
            "reason": reason,
            "message": message,
            "index": len(self.generated),
        }


# The roles of OpenAI-style chat messages that chat templates know.
CHAT_ROLES = ("system", "user", "assistant", "tool")
# Token ids travel as int64 tensors.
MAX_TOKEN_ID = 2**63 - 1


def encode_prompt(tokenizer: Any, prompt: Any, chat: bool) -> list[int]:
    """Token ids of a prompt: a string, a list of ids, or chat messages."""
    is_chat = (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and bool(prompt)
        and all(isinstance(m, dict) for m in prompt)
    )
    if tokenizer is None and (isinstance(prompt, str) or is_chat):
        raise InvalidArgument(
            "the served checkpoint has no tokenizer: pass the prompt as token ids, "
            "or a tokenizer directory (tokenizer=DIR, --tokenizer DIR)"
        )
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidArgument("prompt is empty")
        checks.text(prompt, "the prompt")
        if not chat:
            return list(tokenizer(prompt)["input_ids"])
        prompt, is_chat = [{"role": "user", "content": prompt}], True
    if is_chat:
        messages = chat_messages(prompt)
        if getattr(tokenizer, "chat_template", None) is None:
            raise InvalidArgument("this tokenizer has no chat template; pass a plain prompt")
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # the template is the checkpoint's own Jinja code
            raise InvalidArgument(f"the chat template refused the messages: {e}") from None
        # The template writes the special tokens (BOS included) itself.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, Sequence) and not isinstance(prompt, bytes | bytearray):
        ids = list(prompt)
        if not ids:
            raise InvalidArgument("prompt is empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidArgument(
                "a prompt given as a list must hold token ids (int) or chat messages (dict)"
            )
        return ids
    raise InvalidArgument(
        f"prompt must be a string, a list of token ids or chat messages, not {type(prompt).__name__}"
    )


def chat_messages(messages: Sequence[dict]) -> list[dict]:
    """The messages with every content as one string: text parts (OpenAI style) are joined;
    a role outside CHAT_ROLES, and any content but text, are refused."""
    out = []
    for i, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise InvalidArgument(
                f"chat messages need a 'role' and a 'content' each; message {i} has "
                f"{sorted(map(str, message))}"
            )
        role = message["role"]
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise InvalidArgument(
                f"message {i}: role must be one of {', '.join(CHAT_ROLES)}, got {role!r}"
            )
        for key, value in message.items():
            if isinstance(value, str):
                checks.text(value, f"message {i}'s {key!r}")
        out.append({**message, "content": _content_text(message["content"], i)})
    return out


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list | tuple):
        raise InvalidArgument(
            f"message {i}: content must be a string or a list of text parts "
            f"[{{'type': 'text', 'text': '...'}}], got {type(content).__name__}"
        )
    texts = []
    for j, part in enumerate(content):
        if not (
            isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ):
            kind = repr(part.get("type")) if isinstance(part, dict) else type(part).__name__
            raise InvalidArgument(
                f"message {i}: content part {j} is {kind}; only text parts "
                "{'type': 'text', 'text': '...'} are supported (the model reads text only)"
            )
        texts.append(checks.text(part["text"], f"message {i}'s content part {j}"))
    return "".join(texts)


def check_prompt(
    ids: Iterable[int], vocab_size: int | None, context: int, max_new_tokens: int
) -> None:
    ids = list(ids)
    if not ids:
        raise InvalidArgument("prompt is empty (it encodes to no tokens)")
    top = vocab_size or MAX_TOKEN_ID + 1
    bad = [t for t in ids if not 0 <= t < top]
    if bad:
        raise InvalidArgument(f"token ids {bad[:5]} are outside the vocabulary [0, {top})")
    # The last sampled token is never sent to the cluster: it takes no position.
    needed = len(ids) + max_new_tokens - 1
    if needed > context:
        raise InvalidArgument(
            f"prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} needs {needed} "
            f"positions, more than the model's context of {context}; shorten the prompt or "
            "lower max_new_tokens"
        )
