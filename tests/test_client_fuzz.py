"""The client's public arguments, fuzzed against a real broker and stage: every call either
generates or raises a documented `ClientError` with a message, within its timeout."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from client import Client, ClientError
from stage.demo_model import ensure_demo_model
from tests.cluster import Cluster

# A request's own bound; a call that returns later than this (plus the time to notice) hangs.
CALL_TIMEOUT_S = 20.0
SLACK_S = 5.0
FUZZ = settings(
    max_examples=80,
    deadline=None,  # calls reach a real cluster; CALL_TIMEOUT_S bounds each one instead
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Any code point, lone surrogates and controls included.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=24)
numbers = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 3),
    st.sampled_from([2**70, -(2**70), True, "1", b"1", [1]]),
)
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": any_text}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "audio", 3]), "text": any_text}),
    any_text,
    st.none(),
    st.integers(),
)
content = st.one_of(any_text, st.lists(part, max_size=3), st.none(), st.integers(), st.floats())
role = st.sampled_from(["system", "user", "assistant", "tool", "wizard", "", 5, None])
message = st.one_of(
    st.fixed_dictionaries({"role": role, "content": content}),
    st.fixed_dictionaries({"content": content}),
    st.dictionaries(st.text(max_size=5), any_text, max_size=2),
)
prompts = st.one_of(
    any_text,
    st.lists(st.integers(-5, 2100), max_size=12),
    st.lists(message, max_size=3),
    st.lists(st.one_of(st.integers(0, 100), message, st.none()), max_size=3),
    st.sampled_from([None, 3, 1.5, b"bytes", {"role": "user", "content": "hi"}, ("a",)]),
)
stops = st.one_of(
    st.none(), any_text, st.lists(any_text, max_size=3), st.integers(), st.tuples(any_text)
)
max_new_tokens = st.one_of(st.integers(-2, 5), st.sampled_from([None, 2.0, "3", 2**70, 5000, True]))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    demo = ensure_demo_model(tmp_path_factory.mktemp("demo") / "model")
    with Cluster(demo, 1) as cluster, Client(cluster.url) as c:
        yield c


def check_call(call) -> str:
    """Run `call`; 'ok', or the documented exception's class name. Anything else fails."""
    t0 = time.monotonic()
    try:
        call()
        outcome = "ok"
    except ClientError as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        outcome = type(e).__name__
    assert time.monotonic() - t0 < CALL_TIMEOUT_S + SLACK_S
    return outcome


# Values the client must take, by argument: a call made of these alone generates.
text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24)
good_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant"]),
        "content": st.one_of(
            text,
            st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=3),
        ),
    }
)
VALID = {
    "prompt": st.one_of(
        text,
        st.lists(st.integers(0, 2047), min_size=1, max_size=12),
        st.lists(good_message, min_size=1, max_size=3),
    ),
    "max_new_tokens": st.integers(1, 4),
    "temperature": st.one_of(st.none(), st.just(0), st.floats(0.05, 2.0)),
    "top_k": st.one_of(st.none(), st.integers(1, 3000)),
    "top_p": st.one_of(st.none(), st.floats(0.05, 1.0)),
    "repetition_penalty": st.one_of(st.none(), st.floats(0.5, 2.0)),
    "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    "stop": st.one_of(st.none(), text, st.lists(text, max_size=3)),
    "chat": st.booleans(),
    "wait_ready": st.one_of(st.booleans(), st.floats(0.0, 5.0)),
}
# Anything at all, by argument: a call with one of these generates or is refused.
HOSTILE = {
    "prompt": prompts,
    "max_new_tokens": max_new_tokens,
    "temperature": numbers,
    "top_k": st.one_of(numbers, st.integers(-(2**70), 2**70)),
    "top_p": numbers,
    "repetition_penalty": numbers,
    "seed": st.one_of(numbers, st.integers(-(2**66), 2**66), any_text),
    "stop": stops,
    "chat": st.sampled_from([0, 1, "yes", None, []]),
    "wait_ready": numbers,
}


@pytest.mark.timeout(240)
@FUZZ
@given(data=st.data())
def test_any_arguments_generate_or_raise_a_client_error(client, data):
    hostile = data.draw(st.lists(st.sampled_from(sorted(HOSTILE)), max_size=2, unique=True))
    kwargs = {
        name: data.draw((HOSTILE if name in hostile else VALID)[name], label=name) for name in VALID
    }
    outcome = check_call(lambda: client.generate(**kwargs, timeout=CALL_TIMEOUT_S))
    event(outcome)
    if not hostile:
        assert outcome == "ok"
    # The cluster is ready and the calls are sequential: the only refusals are the client's
    # own checks (a temperature near 0 overflows the logits), never the broker's (busy, not
    # ready) nor a hang (timeout).
    assert outcome in ("ok", "InvalidArgument", "SamplingError"), outcome


@pytest.mark.timeout(120)
@settings(FUZZ, max_examples=60)
@given(
    url=st.one_of(
        any_text,
        st.integers(),
        st.builds(
            "{}://{}:{}".format,
            st.sampled_from(["tcp", "ipc", "inproc", "udp", "http", "", "TCP"]),
            st.sampled_from(["127.0.0.1", "[::1]", "*", "", "a b", ";", "127.0.0.1;"]),
            st.one_of(st.integers(-1, 70000), any_text),
        ),
        st.builds("tcp://127.0.0.1:{}/{}".format, st.integers(1, 65535), any_text),
    )
)
def test_any_broker_url_connects_or_raises_a_client_error(url):
    def connect() -> None:
        # An empty URL means the default broker, which may be a real one on this machine.
        Client(url or "tcp://127.0.0.1:9", connect_timeout=0.3).close()

    outcome = check_call(connect)
    event(outcome)
    assert outcome in ("ok", "InvalidArgument", "BrokerUnreachable"), outcome
