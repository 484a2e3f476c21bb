"""The HTTP API: FastAPI endpoints over one AsyncClient, which does all the talking to the broker.

A request is checked, its prompt encoded (the chat template applied) and its length checked
against the model's context here; then it is one `AsyncClient` request like any other, so it
shows in `layerline jobs`, the monitor and the broker's metrics. Streams are server-sent
events; a client that disconnects cancels its request, which frees every stage's cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from client import AsyncClient, ClientError
from common.defaults import CLIENT_CONNECT_TIMEOUT_S
from gateway.errors import APIError, from_client_error
from gateway.schemas import ChatRequest, CompletionRequest

log = structlog.get_logger("gateway")
T = TypeVar("T")

# What the access log says of a request whose HTTP client left before the answer (nginx's code).
CLIENT_CLOSED = 499
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


@dataclass(frozen=True)
class GatewayConfig:
    broker: str
    api_key: str | None = None  # None: no key asked for
    model_name: str | None = None  # None: the checkpoint's file or directory name
    cert: str | None = None
    broker_key: str | None = None
    connect_timeout: float = CLIENT_CONNECT_TIMEOUT_S


class Disconnected(Exception):
    """The HTTP client went away before its answer was ready."""


class Gateway:
    """The one AsyncClient of a gateway process and what it learned from the broker."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.client = AsyncClient(
            config.broker,
            cert=config.cert,
            broker_key=config.broker_key,
            connect_timeout=config.connect_timeout,
        )
        self.model_id: str | None = None

    async def connect(self) -> None:
        """First contact (tokenizer included) and the model's id; again after a failure."""
        await self.client.connect()
        if self.model_id is None:
            status = await self.client.status()
            self.model_id = self.config.model_name or Path(status["model"]).name

    async def prepare(self, body: ChatRequest | CompletionRequest, chat: bool) -> dict:
        """The keyword arguments of the client's request, or the APIError that refuses it."""
        await self.connect()
        if body.model != self.model_id:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist here; this server serves "
                f"{self.model_id!r} (GET /v1/models)",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        body.check()
        prompt_field = "messages" if chat else "prompt"
        try:
            ids = self.client.encode(body.messages if chat else body.one_prompt, chat=chat)
        except ClientError as e:
            raise APIError.invalid(str(e), param=prompt_field) from None
        context = self.client.model.context
        # Chat without a cap may fill the context, as OpenAI's does.
        cap = body.token_cap or context - len(ids)
        if cap < 1 or len(ids) + cap > context:
            raise APIError.invalid(
                f"this model's context is {context} tokens, and the prompt takes {len(ids)} "
                f"with max_tokens {cap} asked for ({len(ids) + cap} in all); shorten the "
                "prompt or lower max_tokens",
                param=prompt_field if body.token_cap is None else "max_tokens",
                code="context_length_exceeded",
            )
        return dict(
            prompt=ids,
            max_new_tokens=cap,
            # OpenAI's defaults: temperature 1 samples; 0 is greedy.
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stops,
            logprobs=body.alternatives,
        )

    def token_text(self, token_id: int) -> str:
        """A token as text; a checkpoint without a tokenizer has only its id to show."""
        if self.client.tokenizer is None:
            return str(token_id)
        return self.client.tokenizer.decode([token_id])


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway's ASGI app; its lifespan connects to the broker and closes the client."""
    gateway = Gateway(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await gateway.connect()
            log.info("gateway_connected", broker=config.broker, model=gateway.model_id)
        except ClientError as e:
            # Served anyway: /health says 503, and each request tries the broker again.
            log.warning("gateway_broker_unreachable", broker=config.broker, error=str(e))
        yield
        await gateway.client.close()

    app = FastAPI(title="layerline", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    app.add_middleware(AccessLog)
    _error_handlers(app)

    async def authorized(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Compared in constant time, so the answer's timing tells nothing about the key.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), config.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key: send it as 'Authorization: Bearer KEY' "
                "(the SDKs' api_key)",
                "invalid_request_error",
                "invalid_api_key",
            )

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            await gateway.connect()
            status = await gateway.client.status()
        except ClientError as e:
            raise from_client_error(e) from None
        if not status["ready"]:
            raise APIError(
                503,
                f"cluster not ready: {status.get('reason') or 'unknown reason'}",
                "service_unavailable",
                "cluster_not_ready",
            )
        return JSONResponse(
            {"status": "ready", "model": gateway.model_id, "stages": len(status["map"])}
        )

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> JSONResponse:
        try:
            await gateway.connect()
        except ClientError as e:
            raise from_client_error(e) from None
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": gateway.model_id,
                        "object": "model",
                        "created": 0,
                        "owned_by": "layerline",
                    }
                ],
            }
        )

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await _generate(gateway, request, body, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _generate(gateway, request, body, chat=False)

    return app


async def _generate(
    gateway: Gateway, request: Request, body: ChatRequest | CompletionRequest, chat: bool
) -> Response:
    shape = _Shape(gateway, chat, body)
    fields: dict = request.state.log
    fields.update(model=body.model, stream=body.stream)
    try:
        kwargs = await gateway.prepare(body, chat)
        fields["prompt_tokens"] = len(kwargs["prompt"])
        events = gateway.client.stream(**kwargs)
        if not body.stream:
            result = await _unless_disconnected(request, _result(events))
            fields.update(_result_fields(result))
            return JSONResponse(shape.whole(result))
        # The first event is awaited before the 200: a refusal (busy, not ready) still gets
        # its own status instead of an error inside a stream.
        first = await _unless_disconnected(request, anext(events))
    except Disconnected:
        fields["disconnected"] = True
        return Response(status_code=CLIENT_CLOSED)
    except (APIError, ClientError) as e:
        raise from_client_error(e) from None
    except Exception as e:  # a 500 that says why; the gateway goes on serving
        log.exception("gateway_request_failed")
        raise from_client_error(e) from None
    return _EventStream(
        _sse(shape, first, events, fields, body.include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


class _EventStream(StreamingResponse):
    """A StreamingResponse that closes its generator however it ends: a disconnect cancels the
    send and leaves the generator suspended, and closing it cancels the client's request."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _result(events: AsyncIterator[dict]) -> Any:
    try:
        async for event in events:
            if event["type"] == "done":
                return event["result"]
        raise ClientError("the stream ended without a result")
    finally:
        await events.aclose()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or Disconnected (with `work` cancelled) if the HTTP client leaves first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise Disconnected()


async def _disconnect(request: Request) -> None:
    """Returns when the HTTP client disconnects (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(
    shape: _Shape, first: dict, events: AsyncIterator[dict], fields: dict, include_usage: bool
) -> AsyncIterator[str]:
    """The stream's chunks: the role, a delta per token, the finish, [DONE]. An error after
    the 200 comes as a last chunk `{"error": {...}}`."""
    fields["disconnected"] = True  # until the stream's end says otherwise
    try:
        yield _data(shape.chunk({"role": "assistant", "content": ""} if shape.chat else ""))
        event = first
        while True:
            if event["type"] == "token":
                scores = shape.scores([event]) if shape.logprobs else None
                if event["text"] or scores is not None:
                    yield _data(shape.chunk(shape.delta(event["text"]), logprobs=scores))
            elif event["type"] == "done":
                result = event["result"]
                fields.update(_result_fields(result))
                reason = FINISH_REASONS[result.finish_reason]
                usage = shape.usage(result) if include_usage else None
                yield _data(shape.chunk(shape.delta(event["text"]), reason, usage=usage))
                break
            event = await anext(events)
    except ClientError as e:
        error = from_client_error(e)
        fields["error"] = error.message
        yield _data(error.body())
    except Exception as e:  # anything else: said in the stream, and the gateway goes on
        error = from_client_error(e)
        fields["error"] = error.message
        log.exception("gateway_stream_failed")
        yield _data(error.body())
    finally:
        # A disconnect cancels this generator: closing the client's stream ends the request
        # on the broker, which frees every stage's cache for it.
        await events.aclose()
    fields["disconnected"] = False
    yield "data: [DONE]\n\n"


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _result_fields(result: Any) -> dict:
    return {
        "rid": result.rid,
        "completion_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason,
        "ttft_s": round(result.ttft_s, 4),
        "generate_s": round(result.total_s, 4),
    }


class _Shape:
    """One endpoint's JSON: chat.completion(.chunk) or text_completion objects."""

    def __init__(self, gateway: Gateway, chat: bool, body: ChatRequest | CompletionRequest):
        self.gateway = gateway
        self.chat = chat
        self.model = body.model
        self.logprobs = body.alternatives is not None
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _object(self, kind: str, choices: list, usage: dict | None) -> dict:
        out = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        return out

    def whole(self, result: Any) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        choice["logprobs"] = self.scores(self._tokens(result)) if self.logprobs else None
        choice["finish_reason"] = FINISH_REASONS[result.finish_reason]
        kind = "chat.completion" if self.chat else "text_completion"
        return self._object(kind, [choice], self.usage(result))

    def delta(self, text: str) -> dict | str:
        return {"content": text} if self.chat else text

    def chunk(
        self,
        delta: dict | str,
        finish_reason: str | None = None,
        logprobs: dict | None = None,
        usage: dict | None = None,
    ) -> dict:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [choice], usage)

    @staticmethod
    def usage(result: Any) -> dict:
        prompt, completion = len(result.prompt_ids), len(result.token_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    @staticmethod
    def _tokens(result: Any) -> list[dict]:
        return [
            {"token_id": t, **scores}
            for t, scores in zip(result.token_ids, result.logprobs, strict=True)
        ]

    def scores(self, tokens: list[dict]) -> dict:
        """The logprobs object of some tokens (each with token_id, logprob, top_logprobs)."""
        text = self.gateway.token_text
        if self.chat:
            return {
                "content": [
                    {
                        **_token_entry(text(t["token_id"]), t["logprob"]),
                        "top_logprobs": [_token_entry(text(i), lp) for i, lp in t["top_logprobs"]],
                    }
                    for t in tokens
                ]
            }
        strings = [text(t["token_id"]) for t in tokens]
        offsets, at = [], 0
        for s in strings:
            offsets.append(at)
            at += len(s)
        return {
            "tokens": strings,
            "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{text(i): lp for i, lp in t["top_logprobs"]} for t in tokens],
            "text_offset": offsets,
        }


def _token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


# --- errors and the access log --------------------------------------------------------------


def _error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        request.state.log["error"] = e.message
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = [str(part) for part in first["loc"] if part != "body"]
        param = where[0] if where else None
        if not where:
            message = (
                f"the request body must be a JSON object, sent with 'Content-Type: "
                f"application/json' ({first['msg']})"
            )
        else:
            message = f"{'.'.join(where)}: {first['msg']}"
        return await api_error(request, APIError.invalid(message, param))

    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return await api_error(request, APIError(e.status_code, message, kind, None))

    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        return await api_error(request, from_client_error(e))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(Exception, unexpected)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)


class AccessLog:
    """One structured log line per request, once its answer is complete: method, path,
    status, duration, and what the endpoint added to `request.state.log`."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fields: dict = {}
        scope.setdefault("state", {})["log"] = fields
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if fields.get("disconnected"):
                status = CLIENT_CLOSED
            log.info(
                "gateway_request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_s=round(time.perf_counter() - started, 4),
                **fields,
            )
