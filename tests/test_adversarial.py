"""One adversarial client cannot hurt honest ones.

While 8 honest greedy streams run through 3 real stage processes, one peer floods the broker
with long prompts (one token per prefill chunk), tries to end and to take over every honest
request whose id it reads from JOBS, and sends forged and malformed frames. Every honest
stream must finish with exactly its reference tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

import pytest
import torch
import zmq

from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd
from client import AsyncClient, Client, ClientError
from tests.cluster import Cluster
from tests.test_e2e import prompt_ids, reference_greedy
from tests.wire import raw_message

HONEST = 8
TOKENS = 24
FLOOD_PROMPT = 160  # tokens; the tiny llama's context is 256


@pytest.fixture(scope="module")
def cluster(checkpoints):
    # A small queue bound, so that the flood meets it while the honest streams run.
    with Cluster(checkpoints["llama"], 3, broker_args=("--max-queue", "48")) as cluster:
        yield cluster


@pytest.mark.timeout(240)
def test_an_adversary_cannot_hurt_honest_streams(checkpoints, cluster):
    directory = checkpoints["llama"]
    prompts = [prompt_ids(400 + i, length=4 + i % 4) for i in range(HONEST)]
    expected = [reference_greedy(directory, p, TOKENS) for p in prompts]

    honest = _Honest(cluster.url, prompts)
    honest.start()
    # Every honest stream has its first token, so all were admitted, before the attack starts.
    assert honest.started.wait(timeout=60) and honest.error is None, honest.error

    stop = threading.Event()
    flood = _Flood(cluster.url, stop)
    flood.start()
    attacker = _Attacker(cluster.url)
    try:
        while honest.is_alive():
            attacker.round()
        honest.join()
    finally:
        stop.set()
        flood.join(timeout=60)
        attacker.close()

    assert honest.error is None, f"an honest stream failed: {honest.error!r}"
    assert honest.tokens == expected
    # The attack really ran: honest ids were seen while they ran, and the ENDs and STEPs sent
    # for them were refused to the attacker (one that arrives after its request finished
    # meets an unknown id instead).
    assert attacker.targets, "the attacker saw no honest request"
    assert attacker.refusals > 0
    assert flood.submitted > 0
    # The broker is still healthy and serves the next request exactly.
    with Client(cluster.url) as client:
        prompt = prompt_ids(499)
        result = client.generate(prompt, max_new_tokens=8, ignore_eos=True)
    assert result.token_ids == reference_greedy(directory, prompt, 8)
    assert cluster.status()["ready"]


class _Honest(threading.Thread):
    """Eight greedy streams from two AsyncClients; `started` is set once each has a token."""

    def __init__(self, url: str, prompts: list[list[int]]):
        super().__init__(daemon=True)
        self.url, self.prompts = url, prompts
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.error: BaseException | None = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            asyncio.run(self._all())
        except BaseException as e:  # reported by the test, not swallowed
            self.error = e
            self.started.set()

    async def _all(self) -> None:
        async with AsyncClient(self.url) as a, AsyncClient(self.url) as b:
            await asyncio.gather(
                *(self._one(a if i % 2 else b, i) for i in range(len(self.prompts)))
            )

    async def _one(self, client: AsyncClient, i: int) -> None:
        async for event in client.stream(
            self.prompts[i], max_new_tokens=TOKENS, ignore_eos=True, timeout=180
        ):
            if event["type"] == "token":
                self.tokens[i].append(event["token_id"])
                if all(self.tokens):
                    self.started.set()


class _Flood(threading.Thread):
    """New long prompts, one token per prefill chunk, as fast as the broker takes them."""

    def __init__(self, url: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.stop = url, stop
        self.submitted = 0

    def run(self) -> None:
        asyncio.run(self._flood())

    async def _flood(self) -> None:
        async with AsyncClient(self.url, prefill_chunk=1) as client:
            running: set[asyncio.Task] = set()
            seed = 0
            while not self.stop.is_set():
                while len(running) < 16:
                    seed += 1
                    prompt = prompt_ids(1000 + seed, length=FLOOD_PROMPT)
                    running.add(asyncio.create_task(self._one(client, prompt)))
                    self.submitted += 1
                _, running = await asyncio.wait(
                    running, timeout=0.2, return_when=asyncio.FIRST_COMPLETED
                )
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _one(self, client: AsyncClient, prompt: list[int]) -> None:
        # Refused as busy, or slow: the flood only has to press.
        with contextlib.suppress(ClientError, ValueError, TimeoutError):
            await client.generate(prompt, max_new_tokens=4, ignore_eos=True, timeout=30)


class _Attacker:
    """A raw DEALER that reads honest request ids from JOBS and tries to end or take them."""

    def __init__(self, url: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.targets: set[str] = set()
        self.refusals = 0  # ERRORs answered for honest ids

    def round(self) -> None:
        self.sock.send_multipart(P.encode(P.CLIENT_TAG, M.JobsQuery()))
        for rid in self._active():
            if rid.startswith("attacker"):
                continue
            self.targets.add(rid)
            # End it, then claim it with a step past its start (results would come here).
            self.sock.send_multipart(P.encode(P.CLIENT_TAG, M.End(rid=rid, reason="cancelled")))
            ids = torch.tensor([[5]])
            step = {"rid": rid, "seq": 99, "pos": 3, "n": 1, "prev": 0, "hash": 1}
            self.sock.send_multipart(raw_message(P.CLIENT_TAG, Cmd.STEP, step, [ids]))
        for frames in _forgeries():
            self.sock.send_multipart(frames)
        self._drain(0.05)

    def _active(self) -> list[str]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = self._receive(deadline - time.monotonic())
            if message is not None and message.cmd == Cmd.JOBS:
                return [j.rid for j in message.body.jobs if j.outcome == "active"]
        raise AssertionError("the broker did not answer JOBS within 5 s")

    def _drain(self, wait_s: float) -> None:
        while self._receive(wait_s) is not None:
            pass

    def _receive(self, wait_s: float) -> P.Message | None:
        if not self.sock.poll(max(0.0, wait_s) * 1000):
            return None
        try:
            message = P.decode(self.sock.recv_multipart())
        except P.ProtocolError:
            return None
        if message.cmd == Cmd.ERROR and getattr(message.body, "rid", None) in self.targets:
            self.refusals += 1
        return message

    def close(self) -> None:
        self._drain(0.5)
        self.sock.close(linger=0)


def _forgeries() -> list[list[bytes]]:
    """Frames no honest peer sends: garbage, a stage's commands, results, oversized headers."""
    junk = os.urandom(64)
    return [
        [junk],
        [P.CLIENT_TAG, junk],
        [P.CLIENT_TAG, bytes((Cmd.READY,)), b'{"name": "s0"}'],
        [P.STAGE_TAG, bytes((Cmd.RESULT,)), b'{"fid": 1, "epoch": 0}', junk],
        [P.CLIENT_TAG, bytes((Cmd.RESULTS,)), b"{}"],
        [P.CLIENT_TAG, bytes((Cmd.PING,)), b"{" + b" " * 70_000 + b"}"],
        [P.CLIENT_TAG, bytes((Cmd.STEP,)), b"not json", junk],
    ]
