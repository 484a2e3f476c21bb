"""The client against a scripted broker on real sockets.

`FakeBroker` is a real ROUTER on an ephemeral loopback port, run in a thread. It decodes what
the client sends as the broker does, answers PING, STATUS and JOBS, and computes each STEP's
logits with the demo model and a DynamicCache per request (checking positions and prefix hashes
as a stage would), so greedy output can be compared with transformers' `generate`. Tests script
failures into it through `hook`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
import torch
import zmq
from transformers import AutoModelForCausalLM, AutoTokenizer

from broker import messages as M
from broker import protocol as P
from broker.protocol import (
    EMPTY_PREFIX_HASH,
    Cmd,
    Code,
    Message,
    owner_of,
    prefix_hash,
    public_id,
)
from client import (
    AsyncClient,
    BrokerUnreachable,
    BusyError,
    Client,
    ClientError,
    NotReadyError,
    RequestFailed,
    RequestTimeout,
)
from common.text import TextAssembler
from common.tokenizer_files import SHIPPED_FILES, Bundle, pack, read_directory
from stage.adapters import new_request_cache
from stage.demo_model import ensure_demo_model
from tests.tiny_models import cache_kwargs

REPO = Path(__file__).resolve().parents[1]
EOS = 1
# The maps as the client hands them to its callers (JSON), and as the broker sends them.
MAP = [{"stage": "s0", "start": 0, "end": 3}, {"stage": "s1", "start": 3, "end": 6}]
NEW_MAP = [{"stage": "s0", "start": 0, "end": 6}]


def ranges(layer_map: list[dict]) -> tuple[M.MapRange, ...]:
    return tuple(M.MapRange(**r) for r in layer_map)


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class FakeBroker(threading.Thread):
    """A scripted broker: one ROUTER, the demo model in-process, hooks for failures.

    `hook(broker, ident, step, ids)` sees every STEP first; returning True means it answered
    (or dropped) the step itself. `silent` holds identities whose messages are ignored.
    """

    def __init__(self, model_dir: Path, model, *, forced: list[int] | None = None, port: int = 0):
        super().__init__(daemon=True)
        self.model_dir = model_dir
        self.model = model
        self.forced = forced  # if set: logits that make greedy pick forced[i] at token i
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        if port:
            self.sock.bind(f"tcp://127.0.0.1:{port}")
        else:
            port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.port = port
        self.url = f"tcp://127.0.0.1:{port}"
        self.hook: Callable[..., bool] | None = None
        self.silent: set[bytes] = set()
        self.mute_all = False
        self.log: list[tuple[bytes, Cmd, M.Body]] = []  # every decoded message, in order
        self.caches: dict[str, dict] = {}
        self.prompt_len: dict[str, int] = {}
        self.failures: list[str] = []  # protocol violations seen; tests assert it stays empty
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        # The tokenizer it serves: STATUS says each of `tokenizer_states` in turn (the last one
        # from then on), and TOKENIZER answers with chunks of `bundle`.
        self.bundle: Bundle | None = None
        self.tokenizer_states: list[str] = []

    # --- views for assertions ----------------------------------------------------------------

    def steps(self, rid: str | None = None) -> list[tuple[bytes, M.Step]]:
        with self.lock:
            return [
                (i, b) for i, c, b in self.log if c == Cmd.STEP and (rid is None or b.rid == rid)
            ]

    def ends(self) -> list[M.End]:
        with self.lock:
            return [b for _, c, b in self.log if c == Cmd.END]

    def count(self, cmd: Cmd, ident: bytes | None = None) -> int:
        with self.lock:
            return sum(1 for i, c, _ in self.log if c == cmd and ident in (None, i))

    def identities(self) -> list[bytes]:
        """Every client identity heard from, in order of first message."""
        with self.lock:
            return list(dict.fromkeys(i for i, _, _ in self.log))

    def sent_by(self, ident: bytes) -> list[Cmd]:
        with self.lock:
            return [c for i, c, _ in self.log if i == ident]

    # --- loop ----------------------------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self.stop_event.is_set():
            if not poller.poll(20):
                continue
            ident, *frames = self.sock.recv_multipart(copy=False)
            ident = ident.bytes
            try:
                msg = P.decode(frames, inbound=True)
            except P.ProtocolError as e:
                self.failures.append(f"undecodable message: {e.code}: {e.message}")
                continue
            # A STEPS bundle is logged and answered step by step, as the broker takes it.
            for single in P.unbundle(msg) if msg.cmd in P.BUNDLES else [msg]:
                if isinstance(single, P.ProtocolError):
                    self.failures.append(f"bad STEPS item: {single.code}: {single.message}")
                    continue
                with self.lock:
                    self.log.append((ident, single.cmd, single.body))
                if self.mute_all or ident in self.silent:
                    continue
                try:
                    self.dispatch(ident, single)
                except Exception as e:  # surface in the test, not as a hung client
                    self.failures.append(f"{type(e).__name__}: {e}")
        self.sock.close(linger=0)
        self.ctx.term()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)

    def send(self, ident: bytes, body: M.Body, tensors=()) -> None:
        with contextlib.suppress(zmq.ZMQError):  # a client identity that is gone
            self.sock.send_multipart([ident, *P.encode(P.CLIENT_TAG, body, tensors)], zmq.NOBLOCK)

    def dispatch(self, ident: bytes, msg: Message) -> None:
        if msg.cmd == Cmd.PING:
            self.send(ident, M.Pong(ready=True, epoch=1))
        elif msg.cmd == Cmd.STATUS:
            self.send(ident, self.status())
        elif msg.cmd == Cmd.JOBS:
            job = M.Job(rid="x-1", outcome="done", steps=3, tokens=2, replays=0, duration_s=0.1)
            self.send(ident, M.Jobs(jobs=(job,)))
        elif msg.cmd == Cmd.TOKENIZER:
            data, at = self.bundle.data, msg.body.offset
            chunk = M.TokenizerChunk(sha256=self.bundle.sha256, size=len(data), offset=at)
            self.send(
                ident, chunk, [(M.bytes_desc(len(data[at : at + 1000])), data[at : at + 1000])]
            )
        elif msg.cmd == Cmd.STEP:
            ids = msg.tensor(0).reshape(-1).tolist()
            if self.hook is not None and self.hook(self, ident, msg.body, ids):
                return
            self.compute(ident, msg.body, ids)

    def status(self) -> M.Status:
        stages = tuple(
            M.StageStatus(
                name=name,
                host="here",
                pid=1,
                device="cpu",
                state="ready",
                start=start,
                end=end,
                credits=1,
                inflight=0,
                queued=0,
                tokens_per_s=0.0,
                p50_s=None,
                p99_s=None,
                batches=None,
                batched_items=None,
                kv_bytes=None,
                kv_requests=None,
                rss_bytes=None,
                memory_bytes=0,
                last_seen_s=0.0,
            )
            for name, start, end in (("s0", 0, 3), ("s1", 3, 6))
        )
        return M.Status(
            ready=True,
            reason=None,
            epoch=1,
            map=ranges(MAP),
            num_layers=6,
            stages=stages,
            model=str(self.model_dir),
            fingerprint="fake",
            tokenizer=self.tokenizer_info(),
            max_position_embeddings=2048,
            eos_token_id=EOS,
            vocab_size=2048,
            dtype="float32",
            prefill_chunk=128,
            requests=0,
            uptime_s=0.0,
            pid=1,
            ts=0.0,
        )

    def tokenizer_info(self) -> M.TokenizerInfo | None:
        if not self.tokenizer_states:
            return None
        states = self.tokenizer_states
        state = states.pop(0) if len(states) > 1 else states[0]
        if state == "preparing":
            return M.TokenizerInfo(state="preparing")
        b = self.bundle
        return M.TokenizerInfo(sha256=b.sha256, size=len(b.data), files=b.files)

    def error(self, ident: bytes, step: M.Step, code: Code, message: str, **extra) -> None:
        self.send(ident, P.error(code, message, about=step, **extra))

    def compute(self, ident: bytes, h: M.Step, ids: list[int]) -> None:
        """Check the step as a stage would, run it, and answer RESULT."""
        rid, pos, n = h.rid, h.pos, h.n
        if prefix_hash(h.prev, ids) != h.hash or len(ids) != n:
            self.failures.append(f"bad hash or length in {h}")
            return self.error(ident, h, Code.BAD_REQUEST, "hash does not match the ids")
        if pos == 0:
            if h.prev != EMPTY_PREFIX_HASH:
                self.failures.append(f"prefill with prev != 0: {h}")
            self.caches[rid] = {
                "cache": new_request_cache(self.model.config),
                "len": 0,
                "hash": EMPTY_PREFIX_HASH,
            }
            self.prompt_len.setdefault(rid, n)
        entry = self.caches.get(rid)
        if entry is None:
            return self.error(ident, h, Code.CACHE_MISS, f"no cache for {rid}")
        if entry["len"] != pos or entry["hash"] != h.prev:
            return self.error(
                ident, h, Code.CACHE_MISMATCH, f"cache at {entry['len']}, step at {pos}"
            )
        vocab = 2048
        if self.forced is None:
            with torch.no_grad():
                out = self.model(
                    input_ids=torch.tensor([ids]),
                    **cache_kwargs(self.model, entry["cache"]),
                    use_cache=True,
                    logits_to_keep=1,
                )
            logits = out.logits[:, -1:, :].contiguous()
        else:
            index = pos + n - self.prompt_len[rid]
            logits = torch.zeros((1, 1, vocab))
            logits[0, 0, self.forced[min(index, len(self.forced) - 1)]] = 10.0
        entry["len"], entry["hash"] = pos + n, h.hash
        if not h.logits:
            logits = torch.zeros((1, 0, vocab))
        hop = M.Hop(stage="s0", start=0, end=6, compute_s=0.001, queue_s=0.0, transfer_s=0.0001)
        result = M.StepResult(rid=rid, seq=h.seq, pos=pos, n=n, epoch=1, trace=(hop,))
        self.send(ident, result, [logits])


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir, local_files_only=True)


@pytest.fixture(scope="module")
def model(demo_dir):
    return AutoModelForCausalLM.from_pretrained(demo_dir).eval()


@pytest.fixture(scope="module")
def reference(demo_dir, tokenizer):
    """Greedy continuations by transformers' generate, from a model of its own."""
    ref_model = AutoModelForCausalLM.from_pretrained(demo_dir).eval()
    memo: dict[tuple, list[int]] = {}

    def greedy(prompt_ids: list[int], new: int, **kwargs) -> list[int]:
        key = (tuple(prompt_ids), new, tuple(sorted(kwargs.items())))
        if key not in memo:
            ids = torch.tensor([prompt_ids])
            out = ref_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new,
                **kwargs,
            )
            memo[key] = out[0, len(prompt_ids) :].tolist()
        return memo[key]

    return greedy


@pytest.fixture
def broker(demo_dir, model):
    fake = FakeBroker(demo_dir, model)
    fake.start()
    yield fake
    fake.stop()
    assert fake.failures == []


def make_client(broker: FakeBroker, **kwargs) -> Client:
    kwargs.setdefault("connect_timeout", 5.0)
    return Client(broker.url, **kwargs)


PROMPT = "The quick brown fox"


def history_cuts(steps: list[tuple[bytes, M.Step]]) -> list[tuple[int, int, bool]]:
    return [(h.pos, h.n, h.logits) for _, h in steps]


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_unreachable_broker_fails_fast():
    """First contact gives up after connect_timeout, not after the (longer) silence or
    reconnect timeouts, and sends nothing but its one PING meanwhile."""
    ctx = zmq.Context()
    probe = ctx.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)  # a port with nobody listening
    url = f"tcp://127.0.0.1:{port}"
    with pytest.raises(BrokerUnreachable) as info:
        Client(url, connect_timeout=1.0, broker_timeout=7.0, reconnect_timeout=50.0)
    assert (
        url in str(info.value)
        and "did not answer within 1.0 s" in str(info.value)
        and "python -m broker" in str(info.value)
    )

    silent = ctx.socket(zmq.ROUTER)  # listening, never answering
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    with pytest.raises(BrokerUnreachable, match="did not answer within 1.0 s"):
        Client(f"tcp://127.0.0.1:{port}", connect_timeout=1.0, broker_timeout=7.0)
    received = []
    while silent.poll(200):
        received.append(P.decode(silent.recv_multipart()[1:], inbound=True).cmd)
    silent.close(linger=0)
    ctx.term()
    assert received == [Cmd.PING]


@pytest.mark.timeout(60)
def test_greedy_equals_generate_and_headers_are_exact(broker, tokenizer, reference):
    with make_client(broker) as client:
        result = client.generate(PROMPT, max_new_tokens=12)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert result.prompt_ids == prompt_ids
    assert result.token_ids == reference(prompt_ids, 12)
    assert result.finish_reason == "length"
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert result.events == []
    assert len(result.trace) == 12 and result.trace[0]["stages"][0]["stage"] == "s0"
    assert all(t["index"] == i and t["latency_s"] >= 0 for i, t in enumerate(result.trace))
    assert 0 < result.ttft_s <= result.total_s

    # STEP headers: the prompt as one step, one decode step per token (the last sampled token
    # is never sent), each hash chained over the whole sequence.
    steps = broker.steps(result.rid)
    sequence = prompt_ids + result.token_ids
    P = len(prompt_ids)
    assert history_cuts(steps) == [(0, P, True)] + [(P + i, 1, True) for i in range(11)]
    for k, (_, h) in enumerate(steps):
        assert h.seq == k + 1
        assert h.prev == prefix_hash(EMPTY_PREFIX_HASH, sequence[: h.pos])
        assert h.hash == prefix_hash(EMPTY_PREFIX_HASH, sequence[: h.pos + h.n])
    # The request id is the client's public id and a counter; the public id is derived from
    # the secret that opens the client's routing identity, which names the owner.
    rid_client, counter = result.rid.rsplit("-", 1)
    assert len(rid_client) == 16 and int(rid_client, 16) >= 0 and counter == "1"
    ident = steps[0][0]
    assert len(owner_of(ident)) == 32 and rid_client == public_id(owner_of(ident))
    wait_until(lambda: M.End(rid=result.rid, reason="done") in broker.ends(), what="END done")


def reshard_once(at_token: int) -> Callable[..., bool]:
    """A hook that answers the step computing token `at_token` with a reshard event, once."""
    fired = []

    def hook(b: FakeBroker, ident: bytes, h: M.Step, ids: list[int]) -> bool:
        prompt = b.prompt_len.get(h.rid)
        if fired or prompt is None or h.pos != prompt + at_token - 1 or not h.logits:
            return False
        fired.append(h.seq)
        b.caches.pop(h.rid, None)  # every stage dropped its caches
        event = M.Event(
            rid=h.rid,
            event="reshard",
            reason="silent",
            epoch=2,
            lost="s1",
            cause="silent",
            old_map=ranges(MAP),
            new_map=ranges(NEW_MAP),
        )
        b.send(ident, event)
        return True

    return hook


def check_replayed_history(steps: list[tuple[bytes, M.Step]], P: int, at_token: int) -> None:
    """Before the failure: the normal cuts. Then: every cut again, logits only on the last."""
    before = [(0, P, True)] + [(P + i, 1, True) for i in range(at_token)]
    replay = [(p, n, False) for p, n, _ in before[:-1]] + [before[-1]]
    cuts = history_cuts(steps)
    assert cuts[: len(before)] == before
    assert cuts[len(before) : 2 * len(before)] == replay
    seqs = [h.seq for _, h in steps]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


@pytest.mark.timeout(60)
def test_reshard_event_replays_history_and_output_is_unchanged(broker, tokenizer, reference):
    broker.hook = reshard_once(at_token=4)
    with make_client(broker) as client:
        events = list(client.stream(PROMPT, max_new_tokens=10))
    result = events[-1]["result"]
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert result.token_ids == reference(prompt_ids, 10)
    check_replayed_history(broker.steps(result.rid), len(prompt_ids), at_token=4)
    [event] = result.events
    assert event["type"] == "reshard" and event["index"] == 4 and event["lost"] == "s1"
    assert event["old_map"] == MAP and event["new_map"] == NEW_MAP and event["epoch"] == 2
    assert [e["type"] for e in events].count("reshard") == 1
    # The reshard is yielded between token 3 and token 4.
    kinds = [(e["type"], e.get("index")) for e in events]
    assert kinds.index(("reshard", 4)) == kinds.index(("token", 3)) + 1
    assert "".join(e["text"] for e in events if e["type"] in ("token", "done")) == result.text


@pytest.mark.timeout(60)
def test_seeded_sampling_survives_a_reshard(broker):
    with make_client(broker) as client:
        clean = client.generate(PROMPT, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=11)
        broker.hook = reshard_once(at_token=3)
        failed = client.generate(PROMPT, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=11)
        other = client.generate(PROMPT, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=12)
    assert len(failed.events) == 1
    assert failed.token_ids == clean.token_ids
    assert other.token_ids != clean.token_ids


@pytest.mark.timeout(60)
def test_cache_miss_error_replays(broker, tokenizer, reference):
    fired = []

    def hook(b: FakeBroker, ident: bytes, h: M.Step, ids: list[int]) -> bool:
        prompt = b.prompt_len.get(h.rid)
        if fired or prompt is None or h.pos != prompt + 2:
            return False
        fired.append(h.seq)
        b.caches.pop(h.rid, None)
        b.error(ident, h, Code.CACHE_MISS, "stage s1 holds no cache for this request")
        return True

    broker.hook = hook
    with make_client(broker) as client:
        result = client.generate(PROMPT, max_new_tokens=8)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert result.token_ids == reference(prompt_ids, 8)
    check_replayed_history(broker.steps(result.rid), len(prompt_ids), at_token=3)
    [event] = result.events
    assert event["type"] == "replay" and event["reason"] == "cache_miss" and event["index"] == 3


@pytest.mark.timeout(60)
def test_replay_cap_fails_the_request(broker):
    def hook(b: FakeBroker, ident: bytes, h: M.Step, ids: list[int]) -> bool:
        if h.logits:
            b.send(ident, M.Event(rid=h.rid, event="replay", reason="flaky stage"))
        return True

    broker.hook = hook
    with make_client(broker) as client, pytest.raises(RequestFailed) as info:
        client.generate(PROMPT, max_new_tokens=4)
    assert info.value.code == "replay_limit"
    awaited = [h for _, h in broker.steps() if h.logits]
    assert len(awaited) == 1 + 8  # the first attempt and 8 replays
    wait_until(lambda: [e.reason for e in broker.ends()] == ["failed"], what="END failed")


@pytest.mark.timeout(60)
def test_busy_and_not_ready_errors(broker):
    def busy(b: FakeBroker, ident: bytes, h: M.Step, ids: list[int]) -> bool:
        b.error(
            ident, h, Code.BUSY, "broker busy: 512 requests active; retry later", retry_after_s=0.5
        )
        return True

    broker.hook = busy
    with make_client(broker) as client:
        with pytest.raises(BusyError) as info:
            client.generate(PROMPT, max_new_tokens=4)
        assert info.value.retry_after_s == 0.5 and info.value.code == "busy"
        # The caller decides when to retry: the client gave up on its first refused step and
        # told the broker so, without retrying after `retry_after_s` itself.
        [(_, step)] = broker.steps()
        wait_until(lambda: broker.ends() == [M.End(rid=step.rid, reason="failed")], what="END")
        assert len(broker.steps()) == 1

        def not_ready(b: FakeBroker, ident: bytes, h: M.Step, ids: list[int]) -> bool:
            b.error(ident, h, Code.NOT_READY, "cluster not ready: layers [3, 6) have no stage")
            return True

        broker.hook = not_ready
        with pytest.raises(NotReadyError, match=r"layers \[3, 6\) have no stage"):
            client.generate(PROMPT, max_new_tokens=4)

        def overflow(b: FakeBroker, ident: bytes, h: M.Step, ids: list[int]) -> bool:
            b.error(ident, h, Code.CONTEXT_OVERFLOW, "positions up to 9000 exceed 2048")
            return True

        broker.hook = overflow
        with pytest.raises(RequestFailed) as info:
            client.generate(PROMPT, max_new_tokens=4)
        assert info.value.code == "context_overflow" and "9000" in info.value.message


@pytest.mark.timeout(60)
def test_closing_a_stream_cancels_the_request(broker):
    with make_client(broker) as client:
        stream = client.stream(PROMPT, max_new_tokens=50)
        tokens = [next(stream) for _ in range(3)]
        rid = broker.steps()[0][1].rid
        stream.close()
        wait_until(lambda: M.End(rid=rid, reason="cancelled") in broker.ends(), what="END")
        assert [t["index"] for t in tokens] == [0, 1, 2]
        # The client is still usable afterwards.
        assert len(client.generate(PROMPT, max_new_tokens=3).token_ids) == 3


@pytest.mark.timeout(60)
def test_timeout_cancels_the_request(broker):
    def slow(b: FakeBroker, ident: bytes, h: M.Step, ids: list[int]) -> bool:
        return h.pos > 0  # answers the prefill only; decode steps never come back

    broker.hook = slow
    with make_client(broker, heartbeat=0.05) as client:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            client.generate(PROMPT, max_new_tokens=8, timeout=0.5)
        assert time.monotonic() - t0 >= 0.5  # the request had its whole timeout
        assert isinstance(info.value, RequestTimeout)
        assert "within 0.5 s (1 tokens generated)" in str(info.value)
        rid = broker.steps()[0][1].rid
        wait_until(lambda: M.End(rid=rid, reason="cancelled") in broker.ends(), what="END")
        # The prefill and the one unanswered decode step, on one socket: a broker that answers
        # PINGs is alive, so the wait neither re-sent the step nor reconnected.
        prompt = broker.steps()[0][1].n
        assert history_cuts(broker.steps()) == [(0, prompt, True), (prompt, 1, True)]
        assert len(broker.identities()) == 1
        assert broker.count(Cmd.PING) >= 2  # heartbeats while waiting


@pytest.mark.timeout(60)
def test_silent_broker_means_fresh_socket_and_replay(broker, tokenizer, reference):
    went_silent = []

    def hook(b: FakeBroker, ident: bytes, h: M.Step, ids: list[int]) -> bool:
        prompt = b.prompt_len.get(h.rid)
        if not went_silent and prompt is not None and h.pos == prompt + 3:
            went_silent.append(ident)
            b.silent.add(ident)  # this identity is never answered again
            return True
        return False

    broker.hook = hook
    with make_client(broker, broker_timeout=0.5, heartbeat=0.1) as client:
        t0 = time.monotonic()
        result = client.generate(PROMPT, max_new_tokens=8)
        elapsed = time.monotonic() - t0
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert result.token_ids == reference(prompt_ids, 8)
    assert elapsed >= 0.5  # the socket was given broker_timeout of silence before it was dropped
    steps = broker.steps(result.rid)
    identities = list(dict.fromkeys(i for i, _ in steps))
    assert len(identities) == 2 and identities[0] == went_silent[0]
    assert broker.identities() == identities  # one reconnect, no more
    assert broker.count(Cmd.PING, went_silent[0]) >= 1  # silent although pinged
    check_replayed_history(steps, len(prompt_ids), at_token=4)
    assert all(i == identities[1] for i, _ in steps[5:])
    [event] = result.events
    assert event["type"] == "replay" and event["reason"] == "reconnect"


@pytest.mark.timeout(60)
def test_restarted_broker_is_noticed_by_the_disconnect(demo_dir, model, tokenizer, reference):
    """A broker back within broker_timeout answers PINGs, so only the disconnect tells."""
    first = FakeBroker(demo_dir, model)
    stalled = threading.Event()

    def hook(b: FakeBroker, ident: bytes, h: M.Step, ids: list[int]) -> bool:
        prompt = b.prompt_len.get(h.rid)
        if prompt is not None and h.pos == prompt + 3:
            stalled.set()  # the step is lost with the broker
            return True
        return False

    first.hook = hook
    first.start()
    brokers = [first]

    def restart() -> None:
        if stalled.wait(20):
            first.stop()
            brokers.append(FakeBroker(demo_dir, model, port=first.port))
            brokers[-1].start()

    restarter = threading.Thread(target=restart, daemon=True)
    restarter.start()
    try:
        # Silence would take an hour to count: only the disconnect can end the stall.
        with (
            structlog.testing.capture_logs() as logs,
            make_client(first, broker_timeout=3600.0, heartbeat=0.1) as client,
        ):
            events = list(client.stream(PROMPT, max_new_tokens=8))
    finally:
        stalled.set()
        restarter.join(10)
        for b in brokers:
            b.stop()
    assert len(brokers) == 2
    second = brokers[1]
    result = events[-1]["result"]
    assert result.token_ids == reference(tokenizer(PROMPT)["input_ids"], 8)
    assert [e["reason"] for e in result.events] == ["reconnect"]
    lost = [e["cause"] for e in logs if e["event"] == "client_broker_lost"]
    assert lost == ["disconnected"]
    assert [h.pos for _, h in second.steps()][0] == 0  # rebuilt from the prompt
    assert first.failures == [] and second.failures == []


@pytest.mark.timeout(60)
def test_broker_that_never_comes_back(broker):
    def hook(b: FakeBroker, ident: bytes, h: M.Step, ids: list[int]) -> bool:
        if h.pos > 0:
            b.mute_all = True
            return True
        return False

    broker.hook = hook
    with make_client(broker, broker_timeout=0.4, heartbeat=0.1, reconnect_timeout=0.6) as client:
        with pytest.raises(BrokerUnreachable, match="did not come back within 0.6 s"):
            client.generate(PROMPT, max_new_tokens=8)
        # One fresh socket, on which the client only pinged: nothing is replayed to a broker
        # that has not answered, and the client gave up instead of reconnecting again.
        wait_until(lambda: len(broker.identities()) >= 2, what="the fresh socket's PING")
        first, fresh = broker.identities()
        prompt = broker.steps()[0][1].n
        assert history_cuts(broker.steps()) == [(0, prompt, True), (prompt, 1, True)]
        assert all(i == first for i, _ in broker.steps())
        assert set(broker.sent_by(fresh)) == {Cmd.PING}


@pytest.mark.timeout(60)
def test_stop_string_eos_and_length(demo_dir, model, tokenizer):
    text = "hello world. The end is near"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4
    fake = FakeBroker(demo_dir, model, forced=ids + [EOS])
    fake.start()
    try:
        with make_client(fake) as client:
            events = list(client.stream("x", max_new_tokens=40, stop=["end is", "d. T"]))
            result = events[-1]["result"]
            assert result.finish_reason == "stop"
            assert result.text == "hello worl"
            streamed = [e["text"] for e in events if e["type"] in ("token", "done")]
            assert "".join(streamed) == result.text
            assert not any("d. T" in s for s in streamed)
            assert tokenizer.decode(result.token_ids).startswith("hello world. T")

            events = list(client.stream("x", max_new_tokens=40))
            result = events[-1]["result"]
            assert result.finish_reason == "eos"
            assert result.token_ids == ids  # the eos is neither a token nor text
            assert [e["token_id"] for e in events if e["type"] == "token"] == ids
            assert result.text == text and len(result.trace) == len(ids)

            result = client.generate("x", max_new_tokens=len(ids) + 3, ignore_eos=True)
            assert result.finish_reason == "length" and result.token_ids[len(ids)] == EOS

            result = client.generate("x", max_new_tokens=3)
            assert result.finish_reason == "length" and result.token_ids == ids[:3]
            assert result.text == tokenizer.decode(ids[:3])
    finally:
        fake.stop()
    assert fake.failures == []


@pytest.mark.timeout(60)
def test_invalid_arguments_raise_before_anything_is_sent(broker):
    with make_client(broker) as client:
        bad = [
            dict(prompt=""),
            dict(prompt=[]),
            dict(prompt=[5, 2048]),
            dict(prompt=[5, -1]),
            dict(prompt=PROMPT, max_new_tokens=0),
            dict(prompt=PROMPT, temperature=-0.5),
            dict(prompt=PROMPT, top_k=0),
            dict(prompt=PROMPT, top_p=0.0),
            dict(prompt=PROMPT, top_p=1.2),
            dict(prompt=PROMPT, repetition_penalty=0.0),
            dict(prompt=PROMPT, stop=[""]),
            dict(prompt=[{"content": "no role"}], chat=True),
        ]
        for kwargs in bad:
            with pytest.raises(ValueError):
                client.generate(**kwargs)
            with pytest.raises(ValueError):
                client.stream(**kwargs)  # eager, before the first next()
        with pytest.raises(
            ValueError, match=r"2000 tokens \+ max_new_tokens 100 needs 2099 .* 2048"
        ):
            client.generate(list(range(10, 2010)), max_new_tokens=100)
    assert broker.steps() == []


@pytest.mark.timeout(60)
def test_a_request_may_fill_the_context_exactly(demo_dir, model):
    """The last sampled token is never sent, so a request needs prompt + max_new_tokens - 1
    positions: exactly the context is accepted, one more is refused before anything is sent."""
    fake = FakeBroker(demo_dir, model, forced=[5])  # forced logits: no forward over 2048
    fake.start()
    try:
        with make_client(fake) as client:
            context = client.model.context
            prompt = [3] * (context - 8)
            result = client.generate(prompt, max_new_tokens=9)
            assert len(result.token_ids) == 9 and result.finish_reason == "length"
            *_, (_, last) = fake.steps(result.rid)
            assert last.pos + last.n == context
            sent = len(fake.steps())
            with pytest.raises(
                ValueError, match=f"needs {context + 1} positions, more than .* of {context};"
            ):
                client.generate(prompt, max_new_tokens=10)
            assert len(fake.steps()) == sent
    finally:
        fake.stop()
    assert fake.failures == []


@pytest.mark.timeout(60)
def test_chat_prompts_and_status_and_jobs(broker, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with make_client(broker, tokenizer=str(broker.model_dir)) as client:
        result = client.generate(messages, max_new_tokens=2)
        expected = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        assert result.prompt_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
        single = client.generate("hi", chat=True, max_new_tokens=2)
        assert (
            single.prompt_ids
            == client.generate([{"role": "user", "content": "hi"}], max_new_tokens=2).prompt_ids
        )
        assert client.status()["map"] == MAP
        assert client.jobs()[0]["rid"] == "x-1"


@pytest.mark.timeout(60)
def test_checkpoint_without_a_tokenizer_takes_token_ids(tmp_path, model):
    bare = tmp_path / "bare"
    bare.mkdir()
    fake = FakeBroker(bare, model, forced=[5, 6, EOS, 7])
    fake.start()
    try:
        with make_client(fake) as client:
            result = client.generate([3, 4], max_new_tokens=10)
            assert result.token_ids == [5, 6] and result.finish_reason == "eos"
            assert result.text == ""
            result = client.generate([3, 4], max_new_tokens=5, ignore_eos=True)
            assert result.token_ids == [5, 6, EOS, 7, 7] and result.finish_reason == "length"
            for kwargs in (dict(prompt="text"), dict(prompt=[3], stop=["x"])):
                with pytest.raises(ValueError, match="tokenizer"):
                    client.generate(**kwargs)
    finally:
        fake.stop()
    assert fake.failures == []


@pytest.mark.timeout(60)
def test_checkpoint_elsewhere_without_a_served_tokenizer_takes_token_ids(broker, tmp_path):
    """A broker whose checkpoint is not on this machine and that serves no tokenizer (STATUS
    `tokenizer: null`) is asked for none: its client takes token ids, and says so for text."""
    broker.model_dir = tmp_path / "not-here"
    with make_client(broker) as client:
        assert client.tokenizer is None
        with pytest.raises(ValueError, match="tokenizer=DIR"):
            client.generate("text")
        assert client.generate([3, 4], max_new_tokens=2).token_ids
    assert broker.count(Cmd.TOKENIZER) == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_client_waits_while_the_broker_exports_its_tokenizer(
    broker, tokenizer, tmp_path, monkeypatch, kind
):
    """STATUS `tokenizer.state: preparing` (a broker exporting a GGUF file's tokenizer): the
    client asks STATUS again until the bundle is ready, then fetches it (1000-byte chunks)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    broker.bundle = pack(read_directory(broker.model_dir, SHIPPED_FILES))
    broker.model_dir = tmp_path / "not-here"
    broker.tokenizer_states = ["preparing", "preparing", "ready"]

    async def async_ids() -> list[int]:
        async with AsyncClient(broker.url, connect_timeout=5.0) as client:
            return client.tokenizer(PROMPT)["input_ids"]

    if kind == "sync":
        with make_client(broker) as client:
            ids = client.tokenizer(PROMPT)["input_ids"]
    else:
        ids = asyncio.run(async_ids())
    assert ids == tokenizer(PROMPT)["input_ids"]
    assert broker.count(Cmd.STATUS) == 3
    assert broker.count(Cmd.TOKENIZER) == -(-len(broker.bundle.data) // 1000)


@pytest.mark.timeout(60)
def test_client_gives_up_on_an_export_that_never_ends(broker, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("client.core.PREPARE_WAIT_S", 1.0)
    monkeypatch.setattr("client.tokenizer.PREPARE_WAIT_S", 1.0)
    broker.model_dir = tmp_path / "not-here"
    broker.tokenizer_states = ["preparing"]
    with pytest.raises(ClientError, match="exporting its checkpoint's tokenizer for over 1 s"):
        make_client(broker)
    assert broker.count(Cmd.TOKENIZER) == 0


@pytest.mark.timeout(60)
def test_async_client_serves_concurrent_requests(broker, tokenizer, reference):
    prompts = [f"{PROMPT} number {i}" for i in range(8)]

    async def main() -> list:
        async with AsyncClient(broker.url, connect_timeout=5.0) as client:
            return await asyncio.gather(*(client.generate(p, max_new_tokens=8) for p in prompts))

    results = asyncio.run(main())
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == reference(tokenizer(prompt)["input_ids"], 8)
    assert len({r.rid for r in results}) == 8
    assert len({i for i, _ in broker.steps()}) == 1  # one socket for all


@pytest.mark.timeout(60)
def test_async_cancel_and_stream_close(broker):
    async def main() -> None:
        async with AsyncClient(broker.url, connect_timeout=5.0) as client:
            broker.hook = lambda b, ident, h, ids: h.pos > 0  # decode never answered
            task = asyncio.create_task(client.generate(PROMPT, max_new_tokens=8))
            await asyncio.sleep(0)
            while not broker.steps():
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            rid = broker.steps()[0][1].rid
            while M.End(rid=rid, reason="cancelled") not in broker.ends():
                await asyncio.sleep(0.01)

            broker.hook = None
            stream = client.stream(PROMPT, max_new_tokens=30)
            first = await stream.__anext__()
            assert first["type"] == "token"
            await stream.aclose()
            rid2 = broker.steps()[-1][1].rid
            while M.End(rid=rid2, reason="cancelled") not in broker.ends():
                await asyncio.sleep(0.01)

            broker.hook = lambda b, ident, h, ids: h.pos > 0
            with pytest.raises(TimeoutError):
                await client.generate(PROMPT, max_new_tokens=8, timeout=0.3)

    asyncio.run(asyncio.wait_for(main(), 30))


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


@pytest.mark.timeout(60)
def test_cli_json_and_failures(broker, tokenizer, reference):
    done = run_cli("--broker", broker.url, "--prompt", PROMPT, "--max-new-tokens", "6", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["token_ids"] == reference(tokenizer(PROMPT)["input_ids"], 6)
    assert out["finish_reason"] == "length" and out["prompt_tokens"] == len(
        tokenizer(PROMPT)["input_ids"]
    )
    assert set(out["timings"]) == {"ttft_s", "total_s", "tokens_per_s"} and out["events"] == []

    status = run_cli("status", "--broker", broker.url)
    assert status.returncode == 0 and "ready" in status.stdout and "s1" in status.stdout

    broker.stop()
    failed = run_cli("--broker", broker.url, "--prompt", "x", "--connect-timeout", "0.5")
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert "did not answer" in failed.stderr


@pytest.mark.timeout(60)
def test_repetition_penalty_matches_generate(broker, tokenizer, reference):
    with make_client(broker) as client:
        result = client.generate(PROMPT, max_new_tokens=12, repetition_penalty=1.5)
    assert result.token_ids == reference(tokenizer(PROMPT)["input_ids"], 12, repetition_penalty=1.5)


@pytest.mark.timeout(60)
def test_text_deltas_split_characters_and_hold_back_stop_strings(tokenizer):
    text = "naïve café 🙂 ok: déjà vu"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    assembler = TextAssembler(tokenizer, [0], ())
    deltas = [assembler.push(t) for t in ids] + [assembler.flush()]
    assert "".join(deltas) == text == assembler.text
    assert not any("\ufffd" in d for d in deltas)

    assembler = TextAssembler(tokenizer, [0], ["🙂 ok", "zz"])
    deltas = []
    for t in ids:
        deltas.append(assembler.push(t))
        if assembler.stopped:
            break
    deltas.append(assembler.flush())
    assert assembler.stopped and assembler.text == "naïve café "
    assert "".join(deltas) == "naïve café "
