"""The OpenAI-compatible gateway, spoken to through the official `openai` SDK (and raw HTTP for
the SSE framing): a real broker, real stages on the demo checkpoint (a tokenizer and a chat
template), the gateway on a real socket, in this process (uvicorn in a thread) or as
`layerline serve`."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import structlog
import uvicorn
from structlog.testing import capture_logs

from broker import messages as M
from broker.keys import make_keys
from client import AsyncClient, Client, query_broker
from gateway.app import GatewayConfig, create_app
from layerline.cluster import free_port, peer_cert
from stage.demo_model import ensure_demo_model
from tests.cluster import Cluster
from tests.test_e2e import stage_caches

# The broker admits this many requests at once: the concurrency test fills it exactly, the
# busy test one past it.
CONCURRENT = 16
# Long enough that a stream is still running whenever a test looks at it; it never runs to
# the end (the tests close it, or fail its cluster).
LONG = 1500
QUESTION = [{"role": "user", "content": "Tell me about the river."}]


class Gateway:
    """The gateway's app served by uvicorn on a free loopback port, in a thread of this
    process; stopped (and its client closed) on exit."""

    def __init__(self, config: GatewayConfig):
        self.port = free_port()
        self.app = create_app(config)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Gateway:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "the gateway's server stopped at start"
            assert time.monotonic() < deadline, "the gateway did not start within 60 s"
            time.sleep(0.05)  # polling the server thread's state
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def client_id(self) -> str:
        """The id in every rid of the gateway's requests (its AsyncClient's)."""
        return self.app.state.gateway.client.client_id

    def sdk(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, **options)

    def async_sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url, api_key="none", max_retries=0)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def post(
        self, path: str, body: dict
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """A raw POST; the caller reads (or abandons) the response and closes the connection."""
        conn = self.connection()
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def get(self, path: str) -> tuple[int, dict]:
        conn = self.connection()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()


@pytest.fixture(scope="module", autouse=True)
def default_logging():
    """The in-process gateways log through structlog's defaults (this test's stdout), whatever
    an earlier test configured: a stream it configured may be closed by now."""
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("gateway") / "demo")


@pytest.fixture(scope="module")
def cluster(demo):
    with Cluster(demo, 2, broker_args=("--max-requests", str(CONCURRENT))) as c:
        yield c


@pytest.fixture(scope="module")
def gateway(cluster):
    with Gateway(GatewayConfig(cluster.url)) as g:
        yield g


@pytest.fixture(scope="module")
def reference(cluster):
    """The client library itself, for the outputs the gateway must equal."""
    with Client(cluster.url) as c:
        yield c


@pytest.fixture
def idle(cluster, gateway):
    """The shared gateway, with no request left over from an earlier test."""
    cluster.wait_idle()
    return gateway


def gateway_jobs(cluster: Cluster, gateway: Gateway) -> list[dict]:
    jobs = query_broker(cluster.url, M.JobsQuery()).get("jobs", [])
    return [j for j in jobs if j["rid"].startswith(f"{gateway.client_id}-")]


def sse_events(body: str) -> list[str]:
    """The data of each event of an SSE body, checking the framing on the way."""
    assert body.endswith("\n\n"), body[-200:]
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e.removeprefix("data: ") for e in events]


# --- models, health, greedy equality ---------------------------------------------------------


def test_models_and_health(idle, demo):
    status, body = idle.get("/health")
    assert status == 200 and body["status"] == "ready" and body["stages"] == 2
    models = idle.sdk().models.list()
    assert [m.id for m in models.data] == [demo.name]
    assert body["model"] == demo.name


def test_greedy_chat_equals_the_client_token_for_token_with_logprobs(idle, demo, reference):
    expected = reference.generate(QUESTION, max_new_tokens=12, chat=True)
    tokenizer = reference.tokenizer
    reply = idle.sdk().chat.completions.create(
        model=demo.name,
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == {"length": "length", "eos": "stop"}[expected.finish_reason]
    tokens = choice.logprobs.content
    assert [t.token for t in tokens] == [tokenizer.decode([i]) for i in expected.token_ids]
    for t in tokens:
        # Greedy: the chosen token is the most likely one, and the alternatives come in order.
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == t.logprob <= 0
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True
        )
        assert t.bytes == list(t.token.encode())
    assert reply.usage.prompt_tokens == len(expected.prompt_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == len(expected.prompt_ids) + len(expected.token_ids)
    assert reply.object == "chat.completion" and reply.model == demo.name


def test_greedy_completion_equals_the_client_streamed_or_not(idle, demo, reference):
    expected = reference.generate("The river", max_new_tokens=10)
    sdk = idle.sdk()
    whole = sdk.completions.create(
        model=demo.name, prompt="The river", max_tokens=10, temperature=0, logprobs=2
    )
    assert whole.choices[0].text == expected.text
    assert whole.choices[0].finish_reason == "length"
    assert whole.choices[0].logprobs.tokens == [
        reference.tokenizer.decode([i]) for i in expected.token_ids
    ]
    assert whole.usage.completion_tokens == 10
    chunks = list(
        sdk.completions.create(
            model=demo.name,
            prompt="The river",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    # A prompt of token ids is taken as it is.
    ids = whole.usage.prompt_tokens
    by_ids = sdk.completions.create(
        model=demo.name, prompt=expected.prompt_ids, max_tokens=10, temperature=0
    )
    assert by_ids.choices[0].text == expected.text and by_ids.usage.prompt_tokens == ids


def test_greedy_chat_stream_role_deltas_finish_and_usage(idle, demo, reference):
    expected = reference.generate(QUESTION, max_new_tokens=12, chat=True)
    chunks = list(
        idle.sdk().chat.completions.create(
            model=demo.name,
            messages=QUESTION,
            max_completion_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == len(expected.prompt_ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_sse_framing_on_the_wire(idle, demo):
    body = {"model": demo.name, "messages": QUESTION, "max_tokens": 5, "stream": True}
    conn, resp = idle.post("/v1/chat/completions", {**body, "temperature": 0})
    try:
        assert resp.status == 200
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        events = sse_events(resp.read().decode())
    finally:
        conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunks[-1]  # not asked for


# --- stop strings and seeds ------------------------------------------------------------------


@pytest.mark.parametrize("form", ["string", "list"])
def test_stop_strings_end_the_text_before_them(idle, demo, reference, form):
    free = reference.generate("The river", max_new_tokens=24)
    stop = free.text[len(free.text) // 2 :][:3]
    expected = reference.generate("The river", max_new_tokens=24, stop=[stop])
    assert expected.finish_reason == "stop"
    stops = stop if form == "string" else ["zzzz-never", stop]
    reply = idle.sdk().completions.create(
        model=demo.name, prompt="The river", max_tokens=24, temperature=0, stop=stops
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == expected.text and stop not in reply.choices[0].text
    streamed = idle.sdk().completions.create(
        model=demo.name, prompt="The river", max_tokens=24, temperature=0, stop=stops, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("seed", [0, 7, 2**40])
def test_a_seed_gives_the_clients_sample_every_time(idle, demo, reference, seed):
    ids = reference.encode(QUESTION, chat=True)
    expected = reference.generate(ids, max_new_tokens=10, temperature=1.0, seed=seed)
    sdk = idle.sdk()
    texts = [
        sdk.chat.completions.create(model=demo.name, messages=QUESTION, max_tokens=10, seed=seed)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    # OpenAI's default temperature is 1: a seeded request samples, reproducibly.
    assert texts == [expected.text] * 2
    streamed = sdk.chat.completions.create(
        model=demo.name, messages=QUESTION, max_tokens=10, seed=seed, top_p=1.0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected.text


# --- concurrency, and the jobs list ----------------------------------------------------------


@pytest.mark.timeout(180)
def test_sixteen_concurrent_async_streams_are_each_the_clients_output(
    idle, cluster, demo, reference
):
    prompts = [f"Story {i}: the river" for i in range(CONCURRENT)]
    expected = [reference.generate(p, max_new_tokens=8).text for p in prompts]
    done_before = len(gateway_jobs(cluster, idle))

    async def one(sdk: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        stream = await sdk.completions.create(
            model=demo.name, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def all_of_them() -> list[tuple[str, str | None]]:
        async with idle.async_sdk() as sdk:
            return await asyncio.gather(*(one(sdk, p) for p in prompts))

    results = asyncio.run(all_of_them())
    assert [text for text, _ in results] == expected
    assert all(reason is not None for _, reason in results)
    # Like any client's requests, they are in the broker's jobs list.
    jobs = gateway_jobs(cluster, idle)[done_before:]
    assert [j["outcome"] for j in jobs] == ["done"] * CONCURRENT
    assert all(j["tokens"] >= 1 for j in jobs)


# --- disconnects ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_every_stage_cache(idle, cluster, demo, stream):
    body = {"model": demo.name, "prompt": "The river", "max_tokens": LONG, "stream": stream}
    with capture_logs() as logs:
        conn = idle.connection()
        try:
            conn.request(
                "POST",
                "/v1/completions",
                json.dumps({**body, "temperature": 0}),
                {"Content-Type": "application/json"},
            )
            if stream:
                resp = conn.getresponse()
                assert resp.status == 200 and resp.readline().startswith(b"data: ")
            cluster.wait_for(
                lambda s: s["requests"] == 1 and stage_caches(s) == 2, 20, "a cache on each stage"
            )
        finally:
            conn.close()
        cluster.wait_for(
            lambda s: s["requests"] == 0 and stage_caches(s) == 0,
            15,
            "the request ended and every stage's cache freed after the disconnect",
        )
        jobs = gateway_jobs(cluster, idle)
        assert jobs[-1]["outcome"] == "cancelled"
        line = _wait_for_log(logs, lambda e: e.get("path") == "/v1/completions")
    assert line["status"] == 499 and line["disconnected"] is True
    assert line["stream"] is stream and line["prompt_tokens"] >= 1


def _wait_for_log(logs: list[dict], match, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in logs if e["event"] == "gateway_request" and match(e)]
        if found:
            return found[-1]
        time.sleep(0.02)  # the server thread writes the line once the answer is complete
    raise AssertionError(f"no gateway_request log line matched; got {logs}")


def test_each_request_logs_one_structured_line(idle, demo):
    with capture_logs() as logs:
        idle.sdk().completions.create(
            model=demo.name, prompt="The river", max_tokens=3, temperature=0
        )
        line = _wait_for_log(logs, lambda e: e.get("path") == "/v1/completions")
    assert line["method"] == "POST" and line["status"] == 200
    assert line["completion_tokens"] == 3 and line["finish_reason"] == "length"
    assert line["rid"].startswith(idle.client_id)
    assert line["duration_s"] >= line["generate_s"] >= line["ttft_s"] > 0


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"temperature": 5}, "temperature", "temperature"),
        ({"top_p": 0}, "top_p", "top_p"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens"),
        ({"n": 2}, "n", "n=2 is not supported"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format", "response_format"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "role"),
    ],
)
def test_invalid_requests_are_refused_400_naming_the_field(idle, demo, fields, param, says):
    request = {"model": demo.name, "messages": QUESTION, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        idle.sdk().chat.completions.create(**request)
    assert refused.value.status_code == 400
    assert refused.value.param == param
    assert says in refused.value.body["message"]
    assert refused.value.type == "invalid_request_error"


def test_unknown_fields_are_ignored(idle, demo):
    reply = idle.sdk().chat.completions.create(
        model=demo.name,
        messages=QUESTION,
        max_tokens=2,
        temperature=0,
        extra_body={"user_tag": "x", "presence_penalty": 0},
        user="someone",
    )
    assert reply.choices[0].finish_reason == "length"


def test_a_prompt_past_the_context_is_refused_context_length_exceeded(idle, demo, cluster):
    context = cluster.status()["max_position_embeddings"]
    with pytest.raises(openai.BadRequestError) as refused:
        idle.sdk().completions.create(model=demo.name, prompt="The river", max_tokens=context)
    assert refused.value.code == "context_length_exceeded"
    assert f"context is {context} tokens" in refused.value.body["message"]
    long_prompt = list(range(10, 10 + context))
    with pytest.raises(openai.BadRequestError) as refused:
        idle.sdk().completions.create(model=demo.name, prompt=long_prompt, max_tokens=1)
    assert refused.value.code == "context_length_exceeded"


def test_an_unknown_model_is_404(idle):
    with pytest.raises(openai.NotFoundError) as refused:
        idle.sdk().chat.completions.create(model="gpt-5", messages=QUESTION, max_tokens=2)
    assert refused.value.code == "model_not_found" and "gpt-5" in refused.value.body["message"]


@pytest.mark.timeout(120)
def test_a_full_broker_answers_429_with_retry_after(idle, cluster, demo):
    """The broker is filled by streams that cannot end early (the client library's
    `ignore_eos`; a greedy stream through the API may meet its end-of-sequence token first),
    then the gateway's next request is refused busy."""
    stop = threading.Event()

    async def hold() -> None:
        async with AsyncClient(cluster.url, tokenizer=None) as client:

            async def one(i: int) -> None:
                async for _ in client.stream([5, 6, 7, i], max_new_tokens=LONG, ignore_eos=True):
                    if stop.is_set():
                        break

            await asyncio.gather(*(one(i) for i in range(CONCURRENT)))

    holder = threading.Thread(target=asyncio.run, args=(hold(),), daemon=True)
    holder.start()
    try:
        cluster.wait_for(lambda s: s["requests"] == CONCURRENT, 20, "the broker full")
        with pytest.raises(openai.RateLimitError) as refused:
            idle.sdk().completions.create(model=demo.name, prompt="One more", max_tokens=2)
        assert refused.value.status_code == 429 and refused.value.code == "busy"
        assert int(refused.value.response.headers["Retry-After"]) >= 1
        assert "busy" in refused.value.body["message"]
    finally:
        stop.set()
        holder.join(timeout=30)
    assert not holder.is_alive()
    cluster.wait_for(
        lambda s: s["requests"] == 0 and stage_caches(s) == 0, 20, "the held streams ended"
    )


def test_a_failing_request_is_500_with_its_reason_and_the_gateway_serves_on(idle, demo):
    # A temperature this close to 0 turns finite logits into inf: the sampler refuses.
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as failed:
            reply = idle.sdk().completions.create(
                model=demo.name,
                prompt="The river",
                max_tokens=3,
                temperature=1e-300,
                stream=stream,
            )
            list(reply) if stream else None
        assert failed.value.status_code == 500
        assert "nan or inf" in failed.value.body["message"]
    reply = idle.sdk().completions.create(
        model=demo.name, prompt="The river", max_tokens=3, temperature=0
    )
    assert reply.choices[0].finish_reason == "length"


@pytest.mark.timeout(120)
def test_an_api_key_is_asked_for_and_layerline_serve_runs_the_gateway(cluster, demo):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "layerline",
            "serve",
            "--broker",
            cluster.url,
            "--port",
            str(port),
            "--api-key",
            "sesame",
            "--model-name",
            "tiny",
        ],
        env=cluster.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            assert time.monotonic() < deadline, "layerline serve did not answer within 60 s"
            time.sleep(0.1)  # polling a starting process's port
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert refused.value.code == "invalid_api_key"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/v1/models")
        assert conn.getresponse().status == 401  # no Authorization header at all
        sdk = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0)
        assert [m.id for m in sdk.models.list().data] == ["tiny"]
        reply = sdk.chat.completions.create(
            model="tiny", messages=QUESTION, max_tokens=2, temperature=0
        )
        assert reply.usage.completion_tokens == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    logged = [(e["path"], e["status"]) for e in lines if e["event"] == "gateway_request"]
    assert ("/v1/models", 401) in logged and ("/v1/chat/completions", 200) in logged


@pytest.mark.timeout(180)
def test_an_error_mid_stream_is_a_last_chunk_then_503_while_not_ready(demo, reference, tmp_path):
    """On a broker with CURVE keys (the gateway's --cert and --broker-key), the only stage dies
    mid-stream: the stream ends with an error chunk; then the cluster is not ready, and
    /health and every request say 503."""
    prompt = "The river"
    # Greedy runs long on this prompt, so the stream is still going when its stage dies.
    assert reference.generate(prompt, max_new_tokens=100).finish_reason == "length"
    keys = tmp_path / "keys"
    make_keys(keys, {"client": ["gateway"]})
    config = dict(cert=str(peer_cert(keys, "gateway")), broker_key=str(keys / "broker.key"))
    with (
        Cluster(demo, 1, broker_args=("--ready-wait", "1"), keys=keys) as lonely,
        Gateway(GatewayConfig(lonely.url, **config)) as gateway,
    ):
        assert lonely.status()["security"] == "curve"
        stream = gateway.sdk().completions.create(
            model=demo.name, prompt=prompt, max_tokens=LONG, temperature=0, stream=True
        )
        chunks = iter(stream)
        assert next(chunks).choices[0].finish_reason is None
        lonely.kill_stage("s0")
        with pytest.raises(openai.APIError) as failed:
            for _ in chunks:
                pass
        assert "not ready" in failed.value.body["message"]
        lonely.wait_for(lambda s: not s["ready"], 10, "the cluster not ready")
        status, body = gateway.get("/health")
        assert status == 503 and body["error"]["code"] == "cluster_not_ready"
        with pytest.raises(openai.InternalServerError) as refused:
            gateway.sdk().completions.create(model=demo.name, prompt=prompt, max_tokens=2)
        assert refused.value.status_code == 503 and refused.value.code == "cluster_not_ready"
        assert refused.value.body["message"].startswith("cluster not ready: ")
        assert "GET /health" in refused.value.body["message"]


def test_the_command_line_refuses_a_public_gateway_without_key_and_tls_and_a_bad_url(capsys):
    from gateway.__main__ import main

    with pytest.raises(SystemExit) as refused:
        main(["--host", "0.0.0.0", "--api-key", "k"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "needs --ssl-certfile" in err and "--insecure" in err
    with pytest.raises(SystemExit):
        main(["--host", "0.0.0.0", "--ssl-certfile", "c.pem"])
    assert "go together" in capsys.readouterr().err
    assert main(["--broker", "http://127.0.0.1:5555"]) == 2
    assert "the broker speaks ZeroMQ" in capsys.readouterr().err


def test_without_a_broker_the_gateway_serves_503_and_says_why():
    nobody = f"tcp://127.0.0.1:{free_port()}"
    with Gateway(GatewayConfig(nobody, connect_timeout=0.5)) as gateway:
        status, body = gateway.get("/health")
        assert status == 503 and body["error"]["code"] == "broker_unreachable"
        with pytest.raises(openai.InternalServerError) as refused:
            gateway.sdk().completions.create(model="any", prompt="hi", max_tokens=2)
        assert refused.value.status_code == 503 and refused.value.code == "broker_unreachable"
        status, body = gateway.get("/v1/nowhere")
        assert status == 404 and body["error"]["type"] == "not_found_error"
