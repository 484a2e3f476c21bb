"""Careless and hostile users (issue 19), through a real broker and stages on loopback.

Each mistake gets a documented exception (a `ClientError`) with a message that says what to
do, before anything is sent where the mistake is in the arguments; the command line says the
same in one line, never with a traceback.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from broker import messages as M
from client import (
    AsyncClient,
    Client,
    InvalidArgument,
    NotReadyError,
    StreamAbandoned,
    query_broker,
)
from stage.demo_model import ensure_demo_model
from tests.cluster import Cluster
from tests.test_client_protocol import run_cli

REPO = Path(__file__).resolve().parents[1]
BAD_URLS = [
    "http://127.0.0.1:47199",
    "tcp://127.0.0.1",
    "not a url",
    "udp://127.0.0.1:5555",
    "tcp://*:5555",
    "tcp://127.0.0.1:0",
    "tcp://127.0.0.1:5555/x",
]
# Well formed as far as the client can tell; ZeroMQ itself refuses them in connect().
ZMQ_REFUSED = ["tcp://;:5555", "ipc://" + "x" * 200]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def cluster(demo):
    with Cluster(demo, 2) as c:
        yield c


def run_clis(*runs: tuple[str, ...], timeout: float = 60) -> list[subprocess.CompletedProcess]:
    """`run_cli` of each argument list, all at once: each run is mostly its own start-up."""
    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(lambda args: run_cli(*args, timeout=timeout), runs))


def one_error_line(out: subprocess.CompletedProcess) -> str:
    """The CLI's failure: exit 1, one line on stderr, no traceback."""
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def active(cluster: Cluster) -> dict[str, dict]:
    jobs = query_broker(cluster.url, M.JobsQuery()).get("jobs", [])
    return {j["rid"]: j for j in jobs if j["outcome"] == "active"}


def stage_caches(status: dict) -> int:
    return sum(s.get("kv_requests") or 0 for s in status["stages"])


# --- 1. broker URLs ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_mistyped_broker_url_is_refused_at_once():
    t0 = time.monotonic()
    for url in BAD_URLS + ZMQ_REFUSED:
        # AsyncClient connects on first use: it checks the form at once, ZeroMQ's refusal later.
        makers = (Client, AsyncClient, query_broker) if url in BAD_URLS else (Client, query_broker)
        for make in makers:
            with pytest.raises(InvalidArgument) as info:
                make(url)
            message = str(info.value)
            assert repr(url) in message and "tcp://HOST:PORT" in message, message
    assert time.monotonic() - t0 < 10  # no connect timeout was waited out, nothing hung
    with pytest.raises(InvalidArgument, match="must be a string"):
        Client(5555)
    for url in ZMQ_REFUSED:  # the async client meets ZeroMQ's refusal when it connects

        async def connect(url: str = url) -> None:
            async with AsyncClient(url):
                pass

        with pytest.raises(InvalidArgument, match="cannot connect to broker URL"):
            asyncio.run(asyncio.wait_for(connect(), 10))


@pytest.mark.timeout(60)
def test_the_cli_names_the_bad_url_and_the_forms():
    bad = ("--broker", "http://127.0.0.1:47199")
    runs = ((*bad, "--prompt", "x"), (*bad, "status"), (*bad, "jobs", "--json"))
    for out in run_clis(*runs, timeout=30):
        line = one_error_line(out)
        assert "http://127.0.0.1:47199" in line and "tcp://HOST:PORT" in line


# --- 2-4. sampling values, chat messages, lone surrogates -------------------------------------


@pytest.mark.timeout(120)
def test_bad_arguments_are_refused_before_anything_is_sent(cluster):
    bad = {
        "temperature=inf": dict(temperature=math.inf),
        "temperature=nan": dict(temperature=math.nan),
        "temperature='hot'": dict(temperature="hot"),
        "top_k=1.5": dict(temperature=1.0, top_k=1.5),
        "top_p=nan": dict(temperature=1.0, top_p=math.nan),
        "repetition_penalty=inf": dict(repetition_penalty=math.inf),
        "seed='abc' (greedy)": dict(seed="abc"),
        "seed='abc'": dict(temperature=1.0, seed="abc"),
        "seed=2**70": dict(temperature=1.0, seed=2**70),
        "seed=-1": dict(temperature=1.0, seed=-1),
        "seed=True": dict(seed=True),
        "max_new_tokens=2.0": dict(max_new_tokens=2.0),
        "timeout=nan": dict(timeout=math.nan),
        "stop=5": dict(stop=5),
        "wait_ready=-1": dict(wait_ready=-1),
        "chat='yes'": dict(chat="yes"),
    }
    bad_prompts = {
        "content=123": [{"role": "user", "content": 123}],
        "content=None": [{"role": "user", "content": None}],
        "image part": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ],
        "non-dict part": [{"role": "user", "content": ["hi"]}],
        "role=5": [{"role": 5, "content": "hi"}],
        "unknown role": [{"role": "wizard", "content": "hi"}],
        "surrogate": "abc\ud800def",
        "surrogate in a message": [{"role": "user", "content": "\udcff"}],
        "ids out of range": [5, 2**70],
    }
    with Client(cluster.url) as client:
        before = len(query_broker(cluster.url, M.JobsQuery()).get("jobs", []))
        failures = {}
        for name, kwargs in bad.items():
            with pytest.raises(InvalidArgument) as info:
                client.generate("hello", **{"max_new_tokens": 2, **kwargs})
            failures[name] = str(info.value)
        for name, prompt in bad_prompts.items():
            with pytest.raises(InvalidArgument) as info:
                client.generate(prompt, max_new_tokens=2)
            failures[name] = str(info.value)
        with pytest.raises(InvalidArgument) as info:
            client.generate("hello", max_new_tokens=2, stop=["a\ud800"])
        failures["surrogate in a stop string"] = str(info.value)
        assert len(query_broker(cluster.url, M.JobsQuery()).get("jobs", [])) == before  # none sent
        assert active(cluster) == {}
    assert "temperature must be a finite number >= 0" in failures["temperature=inf"]
    assert "seed must be an integer in [0, 18446744073709551615]" in failures["seed=2**70"]
    assert "got 'abc'" in failures["seed='abc' (greedy)"]
    assert "only text parts" in failures["image part"] and "'image_url'" in failures["image part"]
    assert "content must be a string or a list of text parts" in failures["content=None"]
    assert "role must be one of system, user, assistant, tool, got 5" in failures["role=5"]
    surrogate = failures["surrogate"]
    assert "U+D800" in surrogate and "character 3" in surrogate and "remove it" in surrogate
    assert (
        "message 0's 'content' holds a lone surrogate (U+DCFF)"
        in failures["surrogate in a message"]
    )
    assert "stop string" in failures["surrogate in a stop string"]


@pytest.mark.timeout(120)
def test_text_parts_are_joined_and_numbers_still_work(cluster):
    with Client(cluster.url) as client:
        plain = client.generate([{"role": "user", "content": "Hello there"}], max_new_tokens=3)
        parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
        split = client.generate([{"role": "user", "content": parts}], max_new_tokens=3)
        assert split.prompt_ids == plain.prompt_ids and split.token_ids == plain.token_ids
        # Integral values that are not floats pass: an int temperature, a numpy seed.
        a = client.generate("Hello", max_new_tokens=4, temperature=1, seed=np.int64(7))
        b = client.generate("Hello", max_new_tokens=4, temperature=1.0, seed=7)
        assert a.token_ids == b.token_ids


# --- 5-6. the command line ---------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_cli_options_before_or_after_the_subcommand(cluster):
    before, after, jobs = run_clis(
        ("--broker", cluster.url, "status"),
        ("status", "--broker", cluster.url),
        ("--broker", cluster.url, "--json", "jobs"),
    )
    for out in (before, after):
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("ready") and "requests active: " in out.stdout
        assert "caches" in out.stdout and "kv MiB" in out.stdout
    assert jobs.returncode == 0 and jobs.stdout.startswith("["), jobs.stderr


@pytest.mark.timeout(120)
def test_cli_reports_argument_errors_in_one_line(cluster):
    temperature, top_p = run_clis(
        ("--broker", cluster.url, "--prompt", "x", "--temperature", "inf"),
        ("--broker", cluster.url, "--prompt", "x", "--top-p", "7"),
    )
    assert "temperature must be a finite number" in one_error_line(temperature)
    assert "top_p must be a finite number in (0, 1]" in one_error_line(top_p)


@pytest.mark.timeout(120)
def test_ctrl_c_cancels_the_request_and_exits_130(cluster):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "client", "--broker", cluster.url, "--prompt", "Once upon a time"]
        + ["--max-new-tokens", "2000", "--ignore-eos"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        # As a terminal starts it: a suite run in the background (`make test &`) has SIGINT
        # ignored, and a child would inherit that and never see the Ctrl-C.
        preexec_fn=_default_sigint,
    )
    try:
        cluster.wait_for(lambda s: s["requests"] == 1, 60, "the CLI's request")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().endswith("interrupted; the request was cancelled")
    cluster.wait_for(lambda s: s["requests"] == 0, 10, "the request ended")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
@pytest.mark.parametrize("idle_timeout", [0, -1, 86401, math.inf, "10"])
def test_an_idle_timeout_the_broker_cannot_take_is_refused_at_once(client_class, idle_timeout):
    """Every step tells the broker the client's idle_timeout, which it takes up to a day: a
    value outside (0, 86400] is refused when the client is made, not at every step."""
    with pytest.raises(InvalidArgument, match=r"idle_timeout must be .* in \(0, 86400\]"):
        client_class("tcp://127.0.0.1:9", idle_timeout=idle_timeout)


# --- 8. abandoned streams ----------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_stream_left_unread_stops_and_is_ended_after_idle_timeout(cluster):
    with Client(cluster.url, idle_timeout=3.0) as client:
        stream = client.stream("Once upon", max_new_tokens=500, ignore_eos=True)
        read = [next(stream) for _ in range(3)]
        [rid] = active(cluster)
        # Another request pumps the socket: the unread stream runs at most one token ahead
        # plus the step in flight, instead of on to max_new_tokens.
        client.generate("Hello", max_new_tokens=10, ignore_eos=True)
        tokens = active(cluster)[rid]["tokens"]
        assert tokens <= len(read) + 2, tokens
        # Nobody reads it: idle_timeout ends it, and the next call on the client notices.
        time.sleep(3.5)  # the idle time itself is what is tested
        client.generate("Hello", max_new_tokens=2)
        assert rid not in active(cluster)
        rest = []
        with pytest.raises(StreamAbandoned, match=r"not read for 3 s \(idle_timeout\)"):
            for event in stream:
                rest.append(event)
        assert 1 <= len(rest) <= 2 and all(e["type"] == "token" for e in rest)
    cluster.wait_for(lambda s: stage_caches(s) == 0, 10, "caches freed")


@pytest.mark.timeout(120)
def test_a_dropped_stream_is_ended_at_once(cluster):
    with Client(cluster.url) as client:
        stream = client.stream("Once upon", max_new_tokens=500, ignore_eos=True)
        for _ in range(3):
            next(stream)
        del stream
        cluster.wait_for(lambda s: s["requests"] == 0, 2, "END of the dropped stream")

    async def drop() -> None:
        async with AsyncClient(cluster.url) as client:
            async for event in client.stream("Once upon", max_new_tokens=500, ignore_eos=True):
                if event["index"] == 2:
                    break  # the loop held the only reference: the generator is collected
            gc.collect()
            for _ in range(100):
                await asyncio.sleep(0.01)
                if query_broker(cluster.url)["requests"] == 0:
                    return
            raise AssertionError("the dropped async stream was not ended")

    asyncio.run(asyncio.wait_for(drop(), 30))


@pytest.mark.timeout(120)
def test_an_async_stream_left_unread_stops_and_is_ended(cluster):
    async def main() -> None:
        async with AsyncClient(cluster.url, idle_timeout=1.5) as client:
            stream = client.stream("Once upon", max_new_tokens=500, ignore_eos=True)
            first = await stream.__anext__()
            [rid] = active(cluster)
            await asyncio.sleep(1.0)  # the receiver task runs on; the stream must not
            tokens = active(cluster)[rid]["tokens"]
            assert tokens <= 1 + 2, tokens
            t0 = time.monotonic()
            while rid in active(cluster):
                await asyncio.sleep(0.05)
                assert time.monotonic() - t0 < 5, "not ended after idle_timeout"
            with pytest.raises(StreamAbandoned):
                async for _ in stream:
                    pass
            assert first["index"] == 0

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.timeout(180)
def test_a_stalled_stream_survives_a_reshard(demo):
    """A reshard while a stream waits for its reader rebuilds its caches without computing a
    token; reading on gives the tokens of a run without the failure."""
    with Cluster(demo, 2) as cluster, Client(cluster.url) as client:
        clean = client.generate("Once upon", max_new_tokens=12, ignore_eos=True).token_ids
        stream = client.stream("Once upon", max_new_tokens=12, ignore_eos=True)
        head = [next(stream)["token_id"] for _ in range(2)]
        [rid] = active(cluster)
        # Other requests pump the socket until the unread stream stalls: two tokens read, one
        # waiting, one computed while it waited, and no step in flight.
        while active(cluster)[rid]["tokens"] < 4:
            client.generate("Hi", max_new_tokens=2)
        client.generate("Hi", max_new_tokens=2)
        assert active(cluster)[rid]["tokens"] == 4
        cluster.kill_stage("s1")
        # Pumps until after the reshard, whose event reaches the stalled stream too.
        client.generate("Hi", max_new_tokens=4, wait_ready=60)
        rest = list(stream)
    assert head + [e["token_id"] for e in rest if e["type"] == "token"] == clean
    assert [e["lost"] for e in rest if e["type"] == "reshard"] == ["s1"]
    assert rest[-1]["result"].rid == rid


# --- 7. a cluster that is not ready -----------------------------------------------------------


@pytest.mark.timeout(180)
def test_not_ready_is_told_at_once_or_waited_for(demo):
    with Cluster(demo, 1) as cluster:
        cluster.kill_stage("s0")
        cluster.wait_for(lambda s: not s["ready"], 10, "not ready")
        with Client(cluster.url) as client:
            t0 = time.monotonic()
            with pytest.raises(NotReadyError) as info:
                client.generate("Hello", max_new_tokens=2)
            assert time.monotonic() - t0 < 2  # not the broker's 30 s
            message = str(info.value)
            assert "no live stages" in message and "wait_ready=SECONDS" in message

            t0 = time.monotonic()
            events = []
            with pytest.raises(NotReadyError, match=r"still not ready after waiting 1\.\d s"):
                for event in client.stream("Hello", max_new_tokens=2, wait_ready=1.0):
                    events.append(event)
            assert 1.0 <= time.monotonic() - t0 < 4
            assert events and events[0]["type"] == "waiting"
            assert "no live stages" in events[0]["reason"]
            cluster.wait_for(lambda s: s["requests"] == 0, 5, "the failed request ended")

            # A stage comes back while the request waits: it runs.
            cluster.stages.pop("s0").wait()
            stream = client.stream("Hello", max_new_tokens=3, wait_ready=60, ignore_eos=True)
            assert next(stream)["type"] == "waiting"
            cluster.start_stage("s0")
            result = [e for e in stream if e["type"] == "done"][0]["result"]
            assert len(result.token_ids) == 3

            # The command line: one progress line per update on stderr (not a terminal).
            cluster.kill_stage("s0")
            cluster.wait_for(lambda s: not s["ready"], 10, "not ready")
            out = run_cli("--broker", cluster.url, "--prompt", "x", "--wait-ready", "1.5")
            assert out.returncode == 1 and "Traceback" not in out.stderr
            *progress, last = out.stderr.strip().splitlines()
            assert progress[0].startswith("waiting for the cluster (0 of 1.5 s): ")
            assert "no live stages" in progress[0]
            assert last.startswith("error: ") and "still not ready after waiting" in last


# --- 6. a model whose logits are not finite ---------------------------------------------------


@pytest.fixture(scope="module")
def nan_model(demo, tmp_path_factory) -> Path:
    """The demo checkpoint with one row of its head set to nan."""
    directory = tmp_path_factory.mktemp("nan") / "demo"
    shutil.copytree(demo, directory)
    for path in directory.glob("*.safetensors"):
        tensors = load_file(path)
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"][7] = float("nan")
            save_file(tensors, path, metadata={"format": "pt"})
    return directory


@pytest.mark.timeout(180)
def test_nan_weights_leave_the_cluster_not_ready_and_say_which_tensor(nan_model):
    """The stage refuses the damaged head at load; the client and the CLI are told at once,
    with the tensor's name, instead of waiting for a load that will never finish."""
    cluster = Cluster(nan_model, 1)
    try:
        cluster.start_broker()
        cluster.start_stage("s0")
        status = cluster.wait_for(
            lambda s: "could not load" in (s.get("reason") or ""), 120, "the load refused"
        )
        assert re.search(r"tensor lm_head.weight holds \d+ non-finite values", status["reason"])
        with (
            Client(cluster.url) as client,
            pytest.raises(
                NotReadyError,
                match=r"s0 could not load its layers: .*lm_head.weight holds \d+ non-finite",
            ),
        ):
            client.generate("Hello", max_new_tokens=2)
        line = one_error_line(run_cli("--broker", cluster.url, "--prompt", "Hello"))
        assert re.search(r"lm_head.weight holds \d+ non-finite values", line)
    finally:
        cluster.close()
