"""`Client` and `AsyncClient`: prompts in, tokens out, over one DEALER socket to the broker.

Both share the request logic (`client.session`) and the connection logic (`client.transport`);
they differ only in how they wait. `Client` waits in the caller's thread with no helper
thread, which keeps batch-1 overhead to a poll, a decode and a sample per token.
`AsyncClient` serves many concurrent requests from one event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd
from client import checks
from client.errors import ClientError, InvalidArgument, RequestTimeout
from client.sampling import MAX_LOGPROBS, Sampler, check_sampling_args
from client.session import GenerationResult, Request, as_json, check_prompt, encode_prompt
from client.tokenizer import PREPARE_POLL_S, PREPARE_WAIT_S, TokenizerFetch, preparing_too_long
from client.transport import AsyncLink, SyncLink
from common.defaults import (
    CLIENT_BROKER_TIMEOUT_S,
    CLIENT_CONNECT_TIMEOUT_S,
    CLIENT_RECONNECT_TIMEOUT_S,
    HEARTBEAT_S,
    MAX_REPLAYS,
    default_broker,
)
from common.keys import KeyFileError, PeerKeys, peer_keys
from common.text import DETOKENIZE_CONTEXT, TextAssembler, tokenizer_source

# `wait_ready=True`: as long as a broker holds the step of a request for a cluster that is
# not ready (its default --ready-wait), so True waits as the broker itself would.
WAIT_READY_S = 30.0
# A stream whose consumer leaves a token unread this long is ended, freeing the caches it
# holds on every stage. A consumer that keeps up reads each token within milliseconds, and a
# slow cluster does not count (the clock runs only while a token waits unread), so ten seconds
# is a thousand token times: long enough for a slow reader (a gateway writing to a slow HTTP
# client), short enough that an abandoned stream's caches go back well before the broker's own
# 30 s bound on a silent client. `idle_timeout=None` keeps streams forever.
STREAM_IDLE_TIMEOUT_S = 10.0


def query_broker(
    broker: str | None,
    query: M.StatusQuery | M.JobsQuery | None = None,
    timeout: float = CLIENT_CONNECT_TIMEOUT_S,
    cert: str | os.PathLike | None = None,
    broker_key: str | os.PathLike | None = None,
) -> dict:
    """The reply to one STATUS (the default) or JOBS, as JSON, without a tokenizer: for the CLI,
    tools and the cluster launcher. BrokerUnreachable when the broker does not answer in time
    (BrokerRefused when it refused the keys, or their absence)."""
    query = query or M.StatusQuery()
    timeout = checks.seconds(timeout, "timeout")
    link = SyncLink(
        checks.broker_url(broker or default_broker()),
        secret=P.new_client_secret(),
        heartbeat=HEARTBEAT_S,
        broker_timeout=timeout,
        reconnect_timeout=timeout,
        keys=_keys(cert, broker_key),
    )
    try:
        link.connect(timeout)
        return as_json(link.call(query, query.cmd, timeout).body)
    finally:
        link.close()


class ModelInfo:
    """What validation and stopping need to know about the served model."""

    def __init__(self, status: M.Status, tokenizer: Any, local_dir: Path | None):
        local = _local_config(local_dir)
        self.vocab_size = _first_int(status.vocab_size, local.get("vocab_size"))
        # The broker's, by the one rule of common.checkpoint.context_length.
        self.context = status.max_position_embeddings
        eos: set[int] = set()
        for source in (
            status.eos_token_id,
            local.get("eos_token_id"),
            _local_json(local_dir, "generation_config.json").get("eos_token_id"),
            getattr(tokenizer, "eos_token_id", None),
        ):
            eos.update(_ids(source))
        self.eos_ids = frozenset(eos)


def _first_int(*values: Any) -> int | None:
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _local_json(directory: Path | None, name: str) -> dict:
    if directory is None:
        return {}
    try:
        data = json.loads((directory / name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _local_config(directory: Path | None) -> dict:
    config = _local_json(directory, "config.json")
    return (
        {**config, **config.get("text_config", {})}
        if isinstance(config.get("text_config"), dict)
        else config
    )


def _load_tokenizer(tokenizer: Any, status: M.Status) -> tuple[Any, Path | None]:
    """The tokenizer (None for a checkpoint without one) and the local directory it came from."""
    if tokenizer is not None and not isinstance(tokenizer, str | os.PathLike):
        return tokenizer, None  # already a tokenizer object
    path = Path(status.model if tokenizer is None else tokenizer).expanduser()
    if not path.exists():
        if tokenizer is not None:
            raise ClientError(f"tokenizer {path} does not exist")
        return None, None  # a checkpoint elsewhere that serves no tokenizer: token ids only
    local = path.parent if path.is_file() else path
    source = tokenizer_source(path)
    if source is None:
        return None, local  # a bare checkpoint (tests, benchmarks): token ids only
    from transformers import AutoTokenizer  # deferred: importing it costs a second

    directory, options = source
    try:
        loaded = AutoTokenizer.from_pretrained(directory, local_files_only=True, **options)
    except (OSError, ValueError) as e:
        raise ClientError(f"cannot load a tokenizer from {path}: {e}") from None
    return loaded, local


class _Frontend:
    """Validation and request building shared by Client and AsyncClient."""

    def __init__(
        self,
        broker: str | None,
        *,
        connect_timeout: float,
        broker_timeout: float,
        heartbeat: float,
        reconnect_timeout: float,
        max_replays: int,
        prefill_chunk: int | None,
        idle_timeout: float | None,
        cert: Any = None,
        broker_key: Any = None,
    ):
        if prefill_chunk is not None:
            checks.integer(prefill_chunk, "prefill_chunk", 1)
        checks.integer(max_replays, "max_replays", 0)
        timeouts = dict(
            connect_timeout=connect_timeout,
            broker_timeout=broker_timeout,
            heartbeat=heartbeat,
            reconnect_timeout=reconnect_timeout,
        )
        for name, value in timeouts.items():
            checks.seconds(value, name)
        if idle_timeout is not None:  # told to the broker in every step, which takes up to a day
            checks.real(
                idle_timeout,
                "idle_timeout",
                f"of seconds in (0, {M.MAX_IDLE_S:g}], or None to keep streams forever",
                lambda s: 0 < s <= M.MAX_IDLE_S,
            )
        self.broker = checks.broker_url(broker or default_broker())
        self.connect_timeout = connect_timeout
        # The secret goes only into this client's routing identities, where the broker reads
        # who owns a request; request ids carry the public id derived from it.
        self._secret = P.new_client_secret()
        self.client_id = P.public_id(self._secret)
        self._counter = itertools.count(1)
        self._max_replays = max_replays
        self._prefill_chunk = prefill_chunk
        self._idle_timeout = idle_timeout
        self._link_args = dict(
            secret=self._secret,
            heartbeat=heartbeat,
            broker_timeout=broker_timeout,
            reconnect_timeout=reconnect_timeout,
            idle_timeout=idle_timeout,
            keys=_keys(cert, broker_key),
        )
        self.tokenizer: Any = None
        self.model: ModelInfo | None = None

    def _configure(self, status: M.Status, tokenizer: Any) -> None:
        self.tokenizer, local_dir = _load_tokenizer(tokenizer, status)
        self.model = ModelInfo(status, self.tokenizer, local_dir)
        # Unless told otherwise, the broker's advice for its stages' devices.
        self.prefill_chunk = self._prefill_chunk or status.prefill_chunk

    def encode(self, prompt: Any, chat: bool = False) -> list[int]:
        """The token ids a request sends for `prompt` (through the chat template with `chat`):
        for callers that count or check tokens first, then pass the ids as the prompt."""
        if self.model is None:
            raise ClientError("the client is not connected yet: connect first")
        return encode_prompt(self.tokenizer, prompt, checks.flag(chat, "chat"))

    def _request(
        self,
        prompt: Any,
        max_new_tokens: int,
        temperature: float | None,
        top_k: int | None,
        top_p: float | None,
        repetition_penalty: float | None,
        seed: int | None,
        stop: str | Sequence[str] | None,
        chat: bool,
        timeout: float | None,
        ignore_eos: bool,
        wait_ready: float | bool,
        logprobs: int | None,
    ) -> Request:
        """Validate everything and build the request; nothing is sent yet."""
        max_new_tokens = checks.integer(max_new_tokens, "max_new_tokens", 1)
        check_sampling_args(temperature, top_k, top_p, repetition_penalty, seed)
        if timeout is not None:
            checks.seconds(timeout, "timeout")
        checks.flag(chat, "chat")
        checks.flag(ignore_eos, "ignore_eos")
        if logprobs is not None:
            checks.integer(logprobs, "logprobs", 0, MAX_LOGPROBS)
        wait_ready_s = _wait_ready_s(wait_ready)
        stops = _stop_strings(stop)
        if stops and self.tokenizer is None:
            raise InvalidArgument(
                "stop strings need a tokenizer, and the served checkpoint has none"
            )
        ids = encode_prompt(self.tokenizer, prompt, chat)
        check_prompt(ids, self.model.vocab_size, self.model.context, max_new_tokens)
        return Request(
            rid=f"{self.client_id}-{next(self._counter)}",
            prompt_ids=ids,
            max_new_tokens=max_new_tokens,
            sampler=Sampler(temperature, top_k, top_p, repetition_penalty, seed),
            assembler=TextAssembler(self.tokenizer, ids[-DETOKENIZE_CONTEXT:], stops),
            eos_ids=frozenset() if ignore_eos else self.model.eos_ids,
            max_replays=self._max_replays,
            prefill_chunk=self.prefill_chunk,
            wait_ready_s=wait_ready_s,
            idle_s=self._idle_timeout,
            logprobs=logprobs,
        )


def _keys(cert: Any, broker_key: Any) -> PeerKeys | None:
    """This client's certificate and the broker's public key, for a broker with keys."""
    try:
        return peer_keys(cert, broker_key)
    except KeyFileError as e:
        raise InvalidArgument(str(e)) from None


def _wait_ready_s(wait_ready: Any) -> float:
    """Seconds a request waits for a cluster that is not ready: False 0, True WAIT_READY_S."""
    if isinstance(wait_ready, bool):
        return WAIT_READY_S if wait_ready else 0.0
    if wait_ready is None:
        return 0.0
    return checks.real(wait_ready, "wait_ready", "of seconds >= 0, or a bool", lambda s: s >= 0)


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    elif not isinstance(stop, list | tuple):
        raise InvalidArgument(
            f"stop must be a string or a list of strings, got {type(stop).__name__}"
        )
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidArgument(f"stop strings must be non-empty strings, got {s!r}")
        checks.text(s, "a stop string")
    return tuple(stop)


def _timeout_error(req: Request, timeout: float) -> RequestTimeout:
    return RequestTimeout(
        f"request {req.rid} did not finish within {timeout} s "
        f"({len(req.generated)} tokens generated); it was cancelled"
    )


class Client(_Frontend):
    """Synchronous client. Connects (PING, STATUS, tokenizer) when constructed.

    `tokenizer`: a directory or GGUF file, or a tokenizer object; by default the broker's
    checkpoint where it is on this machine, else the files the broker serves (fetched once into
    ~/.cache/layerline/tokenizers/, see client.tokenizer).

    One thread at a time: for concurrent requests from one process use AsyncClient.
    `idle_timeout`: seconds a stream may leave a token unread before its request is ended
    (StreamAbandoned; None: never). A sync client runs nothing between its calls, so the
    broker, told the idle_timeout in every step, ends such a request itself 1 s later and
    frees its caches; read again, the stream rebuilds it.
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        tokenizer: Any = None,
        connect_timeout: float = CLIENT_CONNECT_TIMEOUT_S,
        broker_timeout: float = CLIENT_BROKER_TIMEOUT_S,
        heartbeat: float = HEARTBEAT_S,
        reconnect_timeout: float = CLIENT_RECONNECT_TIMEOUT_S,
        max_replays: int = MAX_REPLAYS,
        prefill_chunk: int | None = None,
        idle_timeout: float | None = STREAM_IDLE_TIMEOUT_S,
        cert: str | os.PathLike | None = None,
        broker_key: str | os.PathLike | None = None,
    ):
        super().__init__(
            broker,
            cert=cert,
            broker_key=broker_key,
            connect_timeout=connect_timeout,
            broker_timeout=broker_timeout,
            heartbeat=heartbeat,
            reconnect_timeout=reconnect_timeout,
            max_replays=max_replays,
            prefill_chunk=prefill_chunk,
            idle_timeout=idle_timeout,
        )
        self._link = SyncLink(self.broker, **self._link_args)
        try:
            self._link.connect(connect_timeout)
            status = self._query(M.StatusQuery())
            self._configure(status, self._fetch_tokenizer(status, tokenizer))
        except BaseException:
            self._link.close()
            raise

    def _query(self, query: M.StatusQuery | M.JobsQuery) -> Any:
        return self._link.call(query, query.cmd, self.connect_timeout).body

    def _fetch_tokenizer(self, status: M.Status, tokenizer: Any) -> Any:
        """`tokenizer`, or the cache directory of the broker's tokenizer where the client needs
        it fetched (TokenizerFetch.needed); fetched now unless the cache holds it."""
        fetch = TokenizerFetch.needed(status, tokenizer)
        deadline = time.monotonic() + PREPARE_WAIT_S
        while fetch is not None and fetch.preparing:
            if time.monotonic() > deadline:
                raise preparing_too_long(status)
            time.sleep(PREPARE_POLL_S)
            status = self._query(M.StatusQuery())
            fetch = TokenizerFetch.needed(status, tokenizer)
        if fetch is None:
            return tokenizer
        if not fetch.cached():
            while (query := fetch.next_query()) is not None:
                fetch.take(self._link.call(query, query.cmd, self.connect_timeout))
            fetch.install()
        return fetch.directory

    def status(self) -> dict:
        """The broker's STATUS reply, as JSON: readiness, epoch, layer map, stages, model."""
        return as_json(self._query(M.StatusQuery()))

    def jobs(self) -> list[dict]:
        """Recent and active requests as the broker records them, as JSON."""
        return as_json(self._query(M.JobsQuery()).jobs)

    def generate(
        self,
        prompt: Any,
        max_new_tokens: int = 64,
        temperature: float | None = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = False,
        timeout: float | None = None,
        ignore_eos: bool = False,
        wait_ready: float | bool = False,
        logprobs: int | None = None,
    ) -> GenerationResult:
        """Generate to the end and return the result (arguments as `stream`)."""
        events = self.stream(
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            chat,
            timeout,
            ignore_eos,
            wait_ready,
            logprobs,
        )
        # A stream ends right after its one done event: this reads it to the end.
        (done,) = [e for e in events if e["type"] == "done"]
        return done["result"]

    def stream(
        self,
        prompt: Any,
        max_new_tokens: int = 64,
        temperature: float | None = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = False,
        timeout: float | None = None,
        ignore_eos: bool = False,
        wait_ready: float | bool = False,
        logprobs: int | None = None,
    ) -> Iterator[dict]:
        """Events as they arrive: token, reshard/replay, waiting, then done.

        `wait_ready`: what to do when the broker says the cluster is not ready. False (the
        default) raises NotReadyError at once, with the broker's reason; a number waits up to
        that many seconds (True: WAIT_READY_S), yielding a `waiting` event with the reason
        when it changes and once a second, then NotReadyError. `timeout` bounds the wait too.
        The request runs at most one token ahead of the reader: a stream not read on stalls,
        is ended (StreamAbandoned) after the client's `idle_timeout`, and is cancelled at once
        when closed or garbage-collected.
        `logprobs`: k in [0, MAX_LOGPROBS] adds to each token event the model's log-probability
        of the token (`logprob`) and its k most likely tokens (`top_logprobs`, [id, logprob]
        pairs), from the raw logits before any sampling setting; the result keeps them too.
        """
        if self._link.closed:
            raise ClientError("client is closed")
        req = self._request(
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            chat,
            timeout,
            ignore_eos,
            wait_ready,
            logprobs,
        )
        return self._events(req, timeout)

    def _events(self, req: Request, timeout: float | None) -> Iterator[dict]:
        link = self._link
        deadline = None if timeout is None else req.started + timeout
        link.add(req, time.perf_counter())
        try:
            while True:
                try:
                    box = link.next_items(req.rid, deadline)
                except TimeoutError:
                    raise _timeout_error(req, timeout) from None
                item = box.popleft()
                if isinstance(item, BaseException):
                    raise item
                link.read(req.rid, item, time.perf_counter())
                yield item
                if item["type"] == "done":
                    return
        finally:
            if not link.closed:
                link.forget(req.rid)

    def close(self) -> None:
        """Cancel what is running and close the socket."""
        self._link.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Frontend):
    """asyncio client: many concurrent requests over one DEALER socket.

    Connects on first use (or `await connect()`, or `async with`). `idle_timeout` as Client's.
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        tokenizer: Any = None,
        connect_timeout: float = CLIENT_CONNECT_TIMEOUT_S,
        broker_timeout: float = CLIENT_BROKER_TIMEOUT_S,
        heartbeat: float = HEARTBEAT_S,
        reconnect_timeout: float = CLIENT_RECONNECT_TIMEOUT_S,
        max_replays: int = MAX_REPLAYS,
        prefill_chunk: int | None = None,
        idle_timeout: float | None = STREAM_IDLE_TIMEOUT_S,
        cert: str | os.PathLike | None = None,
        broker_key: str | os.PathLike | None = None,
    ):
        super().__init__(
            broker,
            cert=cert,
            broker_key=broker_key,
            connect_timeout=connect_timeout,
            broker_timeout=broker_timeout,
            heartbeat=heartbeat,
            reconnect_timeout=reconnect_timeout,
            max_replays=max_replays,
            prefill_chunk=prefill_chunk,
            idle_timeout=idle_timeout,
        )
        self._tokenizer_arg = tokenizer
        self._link: AsyncLink | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    async def connect(self) -> None:
        """First contact (PING within connect_timeout), STATUS, and the tokenizer."""
        if self._closed:
            raise ClientError("client is closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.model is not None:
                return
            link = AsyncLink(self.broker, **self._link_args)
            try:
                await link.connect(self.connect_timeout)
                status = (await link.call(M.StatusQuery(), Cmd.STATUS, self.connect_timeout)).body
                tokenizer = await self._fetch_tokenizer(link, status)
                await asyncio.to_thread(self._configure, status, tokenizer)
            except BaseException:
                await link.close()
                raise
            self._link = link

    async def _fetch_tokenizer(self, link: AsyncLink, status: M.Status) -> Any:
        """As Client._fetch_tokenizer, on the event loop; the disk work in a thread."""
        fetch = TokenizerFetch.needed(status, self._tokenizer_arg)
        deadline = time.monotonic() + PREPARE_WAIT_S
        while fetch is not None and fetch.preparing:
            if time.monotonic() > deadline:
                raise preparing_too_long(status)
            await asyncio.sleep(PREPARE_POLL_S)
            status = (await link.call(M.StatusQuery(), Cmd.STATUS, self.connect_timeout)).body
            fetch = TokenizerFetch.needed(status, self._tokenizer_arg)
        if fetch is None:
            return self._tokenizer_arg
        if not await asyncio.to_thread(fetch.cached):
            while (query := fetch.next_query()) is not None:
                fetch.take(await link.call(query, query.cmd, self.connect_timeout))
            await asyncio.to_thread(fetch.install)
        return fetch.directory

    async def _query(self, query: M.StatusQuery | M.JobsQuery) -> Any:
        await self.connect()
        return (await self._link.call(query, query.cmd, self.connect_timeout)).body

    async def status(self) -> dict:
        """The broker's STATUS reply, as JSON."""
        return as_json(await self._query(M.StatusQuery()))

    async def jobs(self) -> list[dict]:
        """Recent and active requests as the broker records them, as JSON."""
        return as_json((await self._query(M.JobsQuery())).jobs)

    async def generate(
        self,
        prompt: Any,
        max_new_tokens: int = 64,
        temperature: float | None = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = False,
        timeout: float | None = None,
        ignore_eos: bool = False,
        wait_ready: float | bool = False,
        logprobs: int | None = None,
    ) -> GenerationResult:
        """Generate to the end and return the result (arguments as `Client.stream`);
        cancelling the task cancels the request."""
        events = self.stream(
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            chat,
            timeout,
            ignore_eos,
            wait_ready,
            logprobs,
        )
        try:
            (done,) = [e async for e in events if e["type"] == "done"]
            return done["result"]
        finally:
            await events.aclose()

    async def stream(
        self,
        prompt: Any,
        max_new_tokens: int = 64,
        temperature: float | None = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = False,
        timeout: float | None = None,
        ignore_eos: bool = False,
        wait_ready: float | bool = False,
        logprobs: int | None = None,
    ) -> AsyncIterator[dict]:
        """Events as they arrive, as `Client.stream` (`wait_ready`, back-pressure, idle end);
        closing it, or dropping it unread, cancels the request."""
        await self.connect()
        req = self._request(
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            chat,
            timeout,
            ignore_eos,
            wait_ready,
            logprobs,
        )
        link = self._link
        link.add(req, time.perf_counter())
        queue = link.mail[req.rid]
        timer = None
        if timeout is not None:
            # One timer per request wakes the consumer; cheaper than a wait_for per token.
            timer = asyncio.get_running_loop().call_later(timeout, queue.put_nowait, TimeoutError())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, TimeoutError) and not isinstance(item, ClientError):
                    raise _timeout_error(req, timeout)
                if isinstance(item, BaseException):
                    raise item
                link.read(req.rid, item, time.perf_counter())
                yield item
                if item["type"] == "done":
                    return
        finally:
            if timer is not None:
                timer.cancel()
            if not link.closed:
                link.forget(req.rid)

    async def close(self) -> None:
        """Cancel what is running and close the socket."""
        self._closed = True
        if self._link is not None:
            await self._link.close()

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
