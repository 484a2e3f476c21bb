"""The stage worker as a real process, driven by a test that plays the broker on a ROUTER."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import psutil
import pytest
import torch
import zmq
from transformers import AutoModelForCausalLM, LlamaConfig

from broker import messages as M
from broker import protocol as P
from broker.messages import Cmd, Code
from broker.protocol import Message, prefix_hash
from common.checkpoint import read_checkpoint
from stage.checkpoint import open_checkpoint
from stage.kvcache import KVStore
from stage.loading import load_shard
from tests.cluster import Cluster
from tests.tiny_models import CONFIGS, VOCAB

REPO = Path(__file__).resolve().parents[1]
EPOCH = 1


class FakeBroker:
    """A real ROUTER socket that the test drives by hand, one stage per broker."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.url = f"tcp://127.0.0.1:{port}"
        self.identity: bytes | None = None
        self.epoch = EPOCH  # of the last ASSIGN; FORWARDs carry it unless told otherwise
        self.heartbeats: list[tuple[float, M.StageHeartbeat]] = []
        self._fid = itertools.count(1)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def recv(self, timeout: float) -> tuple[bytes, Message] | None:
        if not self.sock.poll(timeout * 1000):
            return None
        identity, *frames = self.sock.recv_multipart(copy=False)
        msg = P.decode(frames, expect=P.STAGE_TAG, inbound=True)
        if msg.cmd == Cmd.HEARTBEAT:
            self.heartbeats.append((time.monotonic(), msg.body))
        return identity.bytes, msg

    def expect(self, *cmds: Cmd, timeout: float = 20.0, keepalive: float | None = None) -> Message:
        """The next message with one of `cmds`, skipping heartbeats; READY sets the peer.

        With `keepalive`, a HEARTBEAT goes to the peer every that many seconds meanwhile, as
        a real broker's do: the stage then does not count the broker lost while it works.
        """
        deadline = time.monotonic() + timeout
        beat = time.monotonic()
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            if keepalive is not None:
                if time.monotonic() >= beat:
                    self.send(M.BrokerHeartbeat(epoch=self.epoch))
                    beat = time.monotonic() + keepalive
                left = min(left, max(beat - time.monotonic(), 0.0))
            got = self.recv(left)
            if got is None:
                if keepalive is not None and time.monotonic() < deadline:
                    continue
                break
            identity, msg = got
            if msg.cmd == Cmd.READY:
                self.identity = identity
            if msg.cmd in cmds:
                return msg
            if msg.cmd != Cmd.HEARTBEAT:
                seen.append((msg.cmd.name, msg.body))
        raise AssertionError(f"no {[c.name for c in cmds]} within {timeout} s; saw {seen}")

    def next_heartbeat(self, timeout: float = 5.0) -> M.StageHeartbeat:
        return self.expect(Cmd.HEARTBEAT, timeout=timeout).body

    def send(self, body: M.Body, tensors=()) -> None:
        assert self.identity is not None, "no stage has registered"
        self.sock.send_multipart([self.identity, *P.encode(P.STAGE_TAG, body, tensors)])

    def assign(self, start: int, end: int, num_layers: int = 5, epoch: int = EPOCH) -> M.Loaded:
        self.epoch = epoch
        assign = M.Assign(
            epoch=epoch,
            start=start,
            end=end,
            num_layers=num_layers,
            dtype="float32",
            map=(M.MapRange("s", start, end),),
        )
        self.send(assign)
        # A load may take longer than a stage's --dead-after: heartbeat meanwhile, as the
        # broker does, so that the stage answers on the identity it was assigned on.
        return self.expect(Cmd.LOADED, timeout=30, keepalive=0.25).body

    def forward(
        self,
        items: list[M.Item],
        tensors: list,
        epoch: int | None = None,
        timeout: float = 20.0,
    ) -> Message:
        """Send one FORWARD and return its RESULT or ERROR (checked to be for this FORWARD)."""
        epoch = self.epoch if epoch is None else epoch
        fid = next(self._fid)
        self.send(M.Forward(fid=fid, epoch=epoch, items=tuple(items)), tensors)
        reply = self.expect(Cmd.RESULT, Cmd.ERROR, timeout=timeout)
        assert reply.body.fid == fid, reply.body
        return reply


@dataclass
class Seq:
    """One request's token sequence as a client keeps it: position and prefix hash."""

    rid: str
    pos: int = 0
    hash: int = 0
    tokens: list[int] = field(default_factory=list)

    def item(self, ids: list[int], logits: bool = True) -> M.Item:
        return M.Item(
            rid=self.rid,
            pos=self.pos,
            n=len(ids),
            prev=self.hash,
            hash=prefix_hash(self.hash, ids),
            logits=logits,
        )

    def advance(self, ids: list[int]) -> None:
        self.pos += len(ids)
        self.hash = prefix_hash(self.hash, ids)
        self.tokens += ids


def refusal_code(reply: Message) -> str:
    """The code of a one-item FORWARD's refused item: a RESULT with no output."""
    assert reply.cmd == Cmd.RESULT and not reply.frames, reply.body
    [refusal] = reply.body.refused
    assert refusal.i == 0 and refusal.message, refusal
    return refusal.code


def ids_tensor(ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.int64)


def prompt(seed: int, n: int = 9) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def stage_command(url: str, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stage",
        "--broker",
        url,
        "--model",
        str(model),
        "--threads",
        "1",
        *extra,
    ]


class Procs:
    """Stage subprocesses of one test; every one is killed at teardown."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, url: str, model: Path, *extra: str) -> subprocess.Popen:
        log = self.logdir / f"stage-{len(self.procs)}.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(
                stage_command(url, model, *extra), cwd=REPO, stdout=subprocess.DEVNULL, stderr=f
            )
        self.procs.append((proc, log))
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return next(log.read_text() for p, log in self.procs if p is proc)

    def kill_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def procs(tmp_path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    b = FakeBroker()
    try:
        yield b
    finally:
        b.close()


@dataclass
class Running:
    broker: FakeBroker
    proc: subprocess.Popen
    ready: M.Ready
    loaded: M.Loaded
    rids: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def llama_stage(checkpoints, tmp_path_factory) -> Iterator[Running]:
    """One stage holding all 5 layers of the tiny Llama, shared by the tests that only step.

    The broker side here is silent between tests, so the stage waits 60 s before it would
    count the broker lost.
    """
    b = FakeBroker()
    p = Procs(tmp_path_factory.mktemp("llama-stage"))
    try:
        proc = p.start(b.url, checkpoints["llama"], "--name", "s0", "--dead-after", "60")
        ready = b.expect(Cmd.READY, timeout=60).body
        loaded = b.assign(0, 5)
        yield Running(b, proc, ready, loaded)
    finally:
        p.kill_all()
        b.close()


@pytest.fixture(scope="module")
def reference(checkpoints):
    return load_shard(checkpoints["llama"], 0, 5)


@contextlib.contextmanager
def stage_threads() -> Iterator[None]:
    """Compute as a `--threads 1` stage does: the bits of a matmul depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_reference(shard, state, ids: list[int]) -> torch.Tensor:
    with stage_threads():
        return shard.forward(ids_tensor(ids), state, logits="last")


# --- registration, loading and exact math ---------------------------------------------------


@pytest.mark.timeout(60)
def test_ready_and_loaded(llama_stage, checkpoints):
    ready, loaded = llama_stage.ready, llama_stage.loaded
    assert ready.name == "s0"
    assert ready.fingerprint == open_checkpoint(checkpoints["llama"]).fingerprint
    assert ready.credits == 32  # the default
    assert ready.held is None
    caps = ready.caps
    assert caps.device == "cpu" and caps.dtype == "float32" and caps.threads == 1
    assert caps.memory_bytes > 0 and caps.cores >= 1 and caps.pid == llama_stage.proc.pid
    # What the stage held before its first layer: torch alone is over 100 MiB resident, and
    # the process holds at least as much once its layers are loaded.
    rss_now = psutil.Process(llama_stage.proc.pid).memory_info().rss
    assert 100 * 2**20 < caps.runtime_bytes < rss_now
    # Of it, the libraries' pages mapped from files: torch's code alone is tens of MiB.
    assert 10 * 2**20 < caps.runtime_file_bytes < caps.runtime_bytes
    # Its peak until then is at least what it held then.
    assert caps.runtime_peak_bytes >= caps.runtime_bytes
    assert (loaded.epoch, loaded.start, loaded.end) == (EPOCH, 0, 5)
    assert loaded.weight_bytes > 0 and loaded.load_s >= 0
    # The digest of every tensor it read: all of them, each the broker's.
    meta = read_checkpoint(checkpoints["llama"])
    assert meta.unpack_digests(loaded.digests) == meta.digest_table.digests


@pytest.mark.timeout(60)
def test_prefill_and_decode_bit_exact(llama_stage, reference):
    b = llama_stage.broker
    seq = Seq("exact")
    llama_stage.rids.add(seq.rid)
    state = reference.new_cache()
    ids = prompt(1)
    for _ in range(6):
        reply = b.forward([seq.item(ids)], [ids_tensor(ids)])
        assert reply.cmd == Cmd.RESULT, reply.body
        assert reply.body.batch == 1 and reply.body.refused == ()
        assert reply.body.compute_s > 0 and reply.body.queue_s >= 0
        logits = reply.tensor(0)
        expected = run_reference(reference, state, ids)
        assert logits.shape == (1, 1, VOCAB)
        assert torch.equal(logits, expected)
        seq.advance(ids)
        ids = [int(logits[0, -1].argmax())]


@pytest.mark.timeout(60)
def test_replay_step_sends_empty_logits(llama_stage, reference):
    b = llama_stage.broker
    seq = Seq("replay")
    llama_stage.rids.add(seq.rid)
    state = reference.new_cache()
    first, second = prompt(2, 6), prompt(3, 4)
    reply = b.forward([seq.item(first, logits=False)], [ids_tensor(first)])
    assert reply.cmd == Cmd.RESULT and reply.tensor(0).shape == (1, 0, VOCAB)
    run_reference(reference, state, first)
    seq.advance(first)
    reply = b.forward([seq.item(second)], [ids_tensor(second)])
    assert torch.equal(reply.tensor(0), run_reference(reference, state, second))


@pytest.mark.timeout(90)
def test_two_stages_chained(checkpoints, procs, reference):
    a, b = FakeBroker(), FakeBroker()
    try:
        # Both start at once; this test's brokers send no heartbeats, hence the long dead-after.
        procs.start(a.url, checkpoints["llama"], "--name", "a", "--dead-after", "60")
        procs.start(b.url, checkpoints["llama"], "--name", "b", "--dead-after", "60")
        a.expect(Cmd.READY, timeout=60)
        b.expect(Cmd.READY, timeout=60)
        a.assign(0, 2)
        b.assign(2, 5)
        seq = Seq("chain")
        state = reference.new_cache()
        first = load_shard(checkpoints["llama"], 0, 2)
        first_state = first.new_cache()
        ids = prompt(4)
        for _ in range(4):
            item = seq.item(ids)
            hidden = a.forward([item], [ids_tensor(ids)])
            assert hidden.cmd == Cmd.RESULT, hidden.body
            h = hidden.tensor(0)
            assert h.shape == (1, len(ids), 64)
            with stage_threads():
                assert torch.equal(h, first.forward(ids_tensor(ids), first_state))
            # Forwarded as the very frame it arrived in, as the broker does.
            logits = b.forward([item], [(hidden.descs[0], hidden.frames[0])])
            assert logits.cmd == Cmd.RESULT, logits.body
            assert torch.equal(logits.tensor(0), run_reference(reference, state, ids))
            seq.advance(ids)
            ids = [int(logits.tensor(0)[0, -1].argmax())]
    finally:
        a.close()
        b.close()


# --- refusals: an explicit error and nothing computed ---------------------------------------


@pytest.mark.timeout(60)
def test_refusals_compute_nothing(llama_stage, reference):
    b = llama_stage.broker
    seq = Seq("refuse")
    llama_stage.rids.update({seq.rid, "never", "half"})
    state = reference.new_cache()

    def refused(items, tensors, code, epoch=None, whole=False):
        """A FORWARD-wide refusal is an ERROR; a lone item's, the RESULT's `refused` entry."""
        reply = b.forward(items, tensors, epoch=epoch)
        if whole:
            assert reply.cmd == Cmd.ERROR, reply.body
            refusal = reply.body
            assert refusal.epoch == (epoch or b.epoch)
        else:
            assert reply.cmd == Cmd.RESULT and not reply.frames, reply.body
            [refusal] = reply.body.refused
            assert refusal.i == 0 and refusal.rid == items[0].rid
        assert refusal.code == code and refusal.message, refusal
        return refusal

    def works(ids):
        reply = b.forward([seq.item(ids)], [ids_tensor(ids)])
        assert reply.cmd == Cmd.RESULT, reply.body
        assert torch.equal(reply.tensor(0), run_reference(reference, state, ids))
        seq.advance(ids)

    ids = prompt(5)
    refused([seq.item(ids)], [ids_tensor(ids)], "stale_epoch", epoch=b.epoch + 7, whole=True)
    works(ids)

    tok = [7]
    refusal = refused([Seq("never", pos=9, hash=123).item(tok)], [ids_tensor(tok)], "cache_miss")
    assert refusal.rid == "never"
    works([11])

    wrong_pos = msgspec.structs.replace(seq.item(tok), pos=seq.pos - 1)
    assert refused([wrong_pos], [ids_tensor(tok)], "cache_mismatch").rid == seq.rid
    works([12])

    wrong_prev = msgspec.structs.replace(seq.item(tok), prev=seq.hash ^ 1)
    refused([wrong_prev], [ids_tensor(tok)], "cache_mismatch")
    works([13])

    wrong_hash = msgspec.structs.replace(seq.item(tok), hash=prefix_hash(seq.hash, [tok[0] + 1]))
    assert "prefix hash" in refused([wrong_hash], [ids_tensor(tok)], "cache_mismatch").message
    works([14])

    # A refused item is refused alone: the valid prefill beside it is computed, exactly.
    half, half_state = Seq("half"), reference.new_cache()
    p = prompt(6)
    reply = b.forward([half.item(p), wrong_prev], [ids_tensor(p), ids_tensor(tok)])
    assert reply.cmd == Cmd.RESULT, reply.body
    [refusal] = reply.body.refused
    assert (refusal.i, refusal.rid, refusal.code) == (1, seq.rid, "cache_mismatch")
    assert len(reply.frames) == 1
    assert torch.equal(reply.tensor(0), run_reference(reference, half_state, p))
    half.advance(p)
    works([16])  # the refused item left its own cache as it was
    nxt = [int(reply.tensor(0)[0, -1].argmax())]
    reply = b.forward([half.item(nxt)], [ids_tensor(nxt)])
    assert reply.cmd == Cmd.RESULT and reply.body.refused == ()
    assert torch.equal(reply.tensor(0), run_reference(reference, half_state, nxt))

    # A request twice in one FORWARD is the sender's bug: the whole FORWARD is refused.
    twice = seq.item([17])
    refused([twice, twice], [ids_tensor([17]), ids_tensor([17])], "bad_request", whole=True)
    works([17])

    bad_ids = [VOCAB + 5]
    refused([seq.item(bad_ids)], [ids_tensor(bad_ids)], "bad_request")
    works([15])


@pytest.mark.timeout(60)
def test_release_frees_the_cache(llama_stage):
    b = llama_stage.broker
    seq = Seq("released")
    ids = prompt(7)
    assert b.forward([seq.item(ids)], [ids_tensor(ids)]).cmd == Cmd.RESULT
    seq.advance(ids)
    b.send(M.Release(rids=tuple(sorted(llama_stage.rids | {seq.rid}))))
    deadline = time.monotonic() + 5
    while (hb := b.next_heartbeat()).kv_requests != 0:
        assert time.monotonic() < deadline, hb
    assert hb.kv_bytes == 0 and hb.epoch == b.epoch
    reply = b.forward([seq.item([5])], [ids_tensor([5])])
    assert refusal_code(reply) == "cache_miss"


@pytest.mark.timeout(60)
def test_reassign_standby_then_back(llama_stage, reference):
    """A new epoch drops every cache; standby holds no layers; layers come back on ASSIGN."""
    b = llama_stage.broker
    seq = Seq("epochs")
    ids = prompt(11)
    assert b.forward([seq.item(ids)], [ids_tensor(ids)]).cmd == Cmd.RESULT
    old_epoch = b.epoch

    loaded = b.assign(0, 0, epoch=old_epoch + 1)
    assert (loaded.start, loaded.end, loaded.weight_bytes) == (0, 0, 0)
    reply = b.forward([Seq("standby").item(ids)], [ids_tensor(ids)])
    assert reply.cmd == Cmd.ERROR and reply.body.code == "bad_request"
    reply = b.forward([Seq("old").item(ids)], [ids_tensor(ids)], epoch=old_epoch)
    assert reply.cmd == Cmd.ERROR and reply.body.code == "stale_epoch"

    loaded = b.assign(0, 5, epoch=old_epoch + 2)
    assert (loaded.epoch, loaded.start, loaded.end) == (old_epoch + 2, 0, 5)
    assert loaded.weight_bytes == llama_stage.loaded.weight_bytes
    seq.advance(ids)
    reply = b.forward([seq.item([4])], [ids_tensor([4])])
    assert refusal_code(reply) == "cache_miss"
    fresh = Seq("epochs-again")
    reply = b.forward([fresh.item(ids)], [ids_tensor(ids)])
    llama_stage.rids.add(fresh.rid)
    assert torch.equal(reply.tensor(0), run_reference(reference, reference.new_cache(), ids))


@pytest.mark.timeout(60)
def test_an_assign_the_stage_cannot_load_is_refused(llama_stage, reference):
    """An ASSIGN outside the checkpoint is refused with its epoch, and the stage goes on
    serving the layers it holds. (One in a dtype no stage computes in does not decode:
    tests/test_protocol.py.)"""
    b = llama_stage.broker
    epoch = b.epoch + 1
    cases = [
        ({"num_layers": 4, "end": 4}, "the checkpoint has 5"),
        ({"end": 6}, "not within [0,5)"),
    ]
    for change, reason in cases:
        fields = {"epoch": epoch, "start": 0, "end": 5, "num_layers": 5, "dtype": "float32"}
        b.send(M.Assign(**(fields | change)))
        error = b.expect(Cmd.ERROR).body
        assert error.code == "bad_request" and reason in error.message, error
        assert error.epoch == epoch and error.fid is None, error
    seq = Seq("after-bad-assign")
    llama_stage.rids.add(seq.rid)
    ids = prompt(14)
    reply = b.forward([seq.item(ids)], [ids_tensor(ids)])
    assert torch.equal(reply.tensor(0), run_reference(reference, reference.new_cache(), ids))


# --- weights and outputs that are not finite ------------------------------------------------


def _nan_llama(directory: Path) -> Path:
    """The tiny Llama with 1,024 NaNs in every layer's down_proj."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.view(-1)[:1024] = float("nan")
    model.save_pretrained(directory)
    return directory


# The token on which `_overflowing_llama` overflows.
OVERFLOW_TOKEN = 7


def _overflowing_llama(directory: Path) -> Path:
    """A tiny Llama whose weights are all finite but whose first layer overflows float32 on
    OVERFLOW_TOKEN, and on no other token.

    Layer 0's attention adds nothing (o_proj is 0), so its MLP sees the normalized embedding.
    Channel 0 of that is +8 for OVERFLOW_TOKEN (its embedding is e_0) and about -7.6 for every
    other token (-0.5 against values of about 0.02). MLP channel 0 is silu(100 x_0) * 100 x_0:
    640,000 for OVERFLOW_TOKEN, exactly 0 for the others (exp(760) overflows, silu is -0.0);
    down_proj's column 0 of 1e33 turns 640,000 into 6.4e38, beyond float32's 3.4e38.
    """
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = -0.5
        embed[OVERFLOW_TOKEN] = 0.0
        embed[OVERFLOW_TOKEN, 0] = 1.0
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[0] = 0.0
            proj.weight[0, 0] = 100.0
        layer.mlp.down_proj.weight[:, 0] = 1e33
    model.save_pretrained(directory)
    return directory


@pytest.mark.timeout(90)
def test_nan_weights_are_refused_at_load_naming_the_tensor(tmp_path, procs, broker):
    model = _nan_llama(tmp_path / "nan-llama")
    procs.start(broker.url, model, "--name", "s0", "--dead-after", "60")
    broker.expect(Cmd.READY, timeout=60)
    broker.send(M.Assign(epoch=EPOCH, start=0, end=5, num_layers=5, dtype="float32"))
    error = broker.expect(Cmd.ERROR, Cmd.LOADED, timeout=30, keepalive=0.25)
    assert error.cmd == Cmd.ERROR, error.body
    assert error.body.code == Code.INTERNAL and error.body.epoch == EPOCH
    assert (
        f"cannot load layers [0,5): {model}: tensor model.layers.0.mlp.down_proj.weight "
        "holds 1024 non-finite values (NaN or infinity); the checkpoint is damaged"
    ) in error.body.message
    # It stays, on standby: nothing to compute with.
    seq = Seq("after-nan")
    reply = broker.forward([seq.item([5, 6])], [ids_tensor([5, 6])], epoch=EPOCH)
    assert reply.cmd == Cmd.ERROR and reply.body.code == Code.STALE_EPOCH


@pytest.mark.timeout(90)
def test_a_non_finite_output_fails_its_request_alone(tmp_path, procs, broker):
    """Two prompts in one FORWARD, computed as one batch: the one that overflows is refused
    with `non_finite` and its cache dropped; the other is answered and goes on decoding."""
    model = _overflowing_llama(tmp_path / "overflowing-llama")
    procs.start(broker.url, model, "--name", "s0", "--dead-after", "60")
    broker.expect(Cmd.READY, timeout=60)
    broker.assign(0, 5)
    bad, good = Seq("bad"), Seq("good")
    bad_ids, good_ids = [11, 12, OVERFLOW_TOKEN, 13, 14], [11, 12, 15, 13, 14]
    reply = broker.forward(
        [bad.item(bad_ids), good.item(good_ids)], [ids_tensor(bad_ids), ids_tensor(good_ids)]
    )
    assert reply.cmd == Cmd.RESULT, reply.body
    assert reply.body.batch == 2  # one batched forward
    [refusal] = reply.body.refused
    assert (refusal.i, refusal.rid, refusal.code) == (0, "bad", Code.NON_FINITE)
    assert refusal.message.startswith(
        f"layers [0,5) of {model} computed non-finite logits (NaN or infinity) for request bad "
        "at positions [0,5); the weights overflow on this input"
    )
    assert len(reply.frames) == 1
    logits = reply.tensor(0)
    assert torch.isfinite(logits).all()
    shard = load_shard(model, 0, 5)
    state = shard.new_cache()
    expected = run_reference(shard, state, good_ids)
    torch.testing.assert_close(logits, expected)
    good.advance(good_ids)
    nxt = [int(expected[0, -1].argmax())]
    reply = broker.forward([good.item(nxt)], [ids_tensor(nxt)])
    assert reply.cmd == Cmd.RESULT and reply.body.refused == ()
    torch.testing.assert_close(reply.tensor(0), run_reference(shard, state, nxt))
    # The refused request's cache is gone: its next step is a cache miss.
    bad.advance(bad_ids)
    assert refusal_code(broker.forward([bad.item([5])], [ids_tensor([5])])) == "cache_miss"


@pytest.mark.timeout(150)
def test_the_client_of_a_non_finite_request_gets_an_error_and_the_other_its_logits(tmp_path):
    """Through a real broker: the request that overflows ends with ERROR `non_finite` naming
    the stage and its layers; the other one, sent with it, gets its logits."""
    model = _overflowing_llama(tmp_path / "overflowing-llama")
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    with Cluster(model, 1, log_dir=tmp_path / "logs") as cluster:
        client.connect(cluster.url)
        prompts = {"bad": [11, 12, OVERFLOW_TOKEN, 13, 14], "good": [11, 12, 15, 13, 14]}
        for seq, (rid, ids) in enumerate(prompts.items()):
            step = M.Step(rid=rid, seq=seq, pos=0, n=5, prev=0, hash=prefix_hash(0, ids))
            client.send_multipart(P.encode(P.CLIENT_TAG, step, [ids_tensor(ids)]))
        answers = {}
        while len(answers) < 2:
            assert client.poll(60_000), f"no answer for {set(prompts) - set(answers)}"
            msg = P.decode(client.recv_multipart(copy=False), expect=P.CLIENT_TAG)
            if msg.cmd in (Cmd.RESULT, Cmd.ERROR):
                answers[msg.body.rid] = msg
    client.close(linger=0)
    bad, good = answers["bad"], answers["good"]
    assert bad.cmd == Cmd.ERROR and bad.body.code == Code.NON_FINITE, bad.body
    assert bad.body.message.startswith(
        f"stage s0: layers [0,5) of {model} computed non-finite logits (NaN or infinity) "
        "for request bad at positions [0,5)"
    )
    assert good.cmd == Cmd.RESULT, good.body
    assert torch.isfinite(good.tensor(0)).all()


def test_kvstore_evicts_least_recently_used_others(reference):
    store = KVStore(max_bytes=0)
    ids = ids_tensor(prompt(12))

    def step(rid: str) -> None:
        entry = store.get(rid) or store.start(rid, reference.new_cache())
        with stage_threads():
            reference.forward(ids, entry.state)
        store.commit(rid, entry.hash + 1)

    step("a")
    one = store.total_bytes()
    assert one > 0 and len(store) == 1
    step("b")
    step("a")  # a is now the most recently used
    step("c")
    two = store.get("a").nbytes  # a's two steps, and the room its cache keeps to grow
    assert two >= 2 * one
    assert store.total_bytes() == two + 2 * one
    store.max_bytes = two + one  # a and one other fit: one too many
    assert store.evict(keep={"c"}) == 1
    assert store.get("b") is None and store.get("a") is not None and store.evictions == 1
    assert store.get("a").hash == 2 and store.get("a").state.length == 2 * ids.shape[1]
    store.max_bytes = 0
    assert store.evict(keep={"a", "c"}) == 0  # the step's own caches are never evicted
    assert store.release(["a", "zzz"]) == 1 and len(store) == 1
    store.start("c", reference.new_cache())  # position 0 replaces the old cache
    assert store.get("c").state.length == 0 and store.total_bytes() == 0
    store.clear()
    assert len(store) == 0 and store.total_bytes() == 0


# --- heartbeats, a lost broker, leaving, refusal ----------------------------------------------


def _wide_llama(tmp_path_factory, name: str, layers: int, seed: int) -> Path:
    """A Llama of `layers` layers of hidden size 1024: a 1024-token prefill takes about half
    a second per layer on one core."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    directory = tmp_path_factory.mktemp(name)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory) -> Path:
    """Two wide layers: a 1024-token prefill takes about 1 s on one core."""
    return _wide_llama(tmp_path_factory, "wide", layers=2, seed=0)


@pytest.mark.timeout(90)
def test_heartbeats_flow_during_a_long_forward(wide_checkpoint, procs, broker):
    procs.start(broker.url, wide_checkpoint, "--heartbeat", "0.25", "--dead-after", "30")
    broker.expect(Cmd.READY, timeout=60)
    broker.assign(0, 2, num_layers=2)
    ids = prompt(8, 1024)
    broker.send(M.Forward(fid=1, epoch=EPOCH, items=(Seq("long").item(ids),)), [ids_tensor(ids)])
    broker.heartbeats.clear()
    reply = broker.expect(Cmd.RESULT, timeout=60)
    times = [t for t, _ in broker.heartbeats]
    busy = [h for _, h in broker.heartbeats if h.state == "busy"]
    assert reply.body.compute_s > 0.5, "the forward was too short to test anything"
    assert busy and max(h.busy_s for h in busy) > 0.25, broker.heartbeats
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 2 and max(gaps) < 0.75, gaps
    hb = broker.next_heartbeat()
    assert hb.state == "idle" and hb.progress == 1 and hb.tokens == 1024
    assert hb.kv_requests == 1 and hb.kv_bytes > 0


def _stage_with_a_short_request(procs, broker, checkpoint: Path, layers: int, seed: int):
    """A stage holding all `layers`, with one short request prefilled and checked against
    the batch-1 reference: (reference shard, the request, its reference cache, its next id)."""
    procs.start(broker.url, checkpoint, "--dead-after", "30", "--heartbeat", "0.1")
    broker.expect(Cmd.READY, timeout=60)
    broker.assign(0, layers, num_layers=layers)
    reference = load_shard(checkpoint, 0, layers)
    short, state = Seq("short"), reference.new_cache()
    ids = prompt(seed)
    reply = broker.forward([short.item(ids)], [ids_tensor(ids)])
    assert torch.equal(reply.tensor(0), run_reference(reference, state, ids))
    short.advance(ids)
    return reference, short, state, int(reply.tensor(0)[0, -1].argmax())


@pytest.mark.timeout(90)
def test_a_decode_step_is_answered_before_a_prompt_queued_ahead_of_it(
    wide_checkpoint, procs, broker
):
    """A decode step queued behind a long prompt chunk runs first in their round and is
    answered at once: it waits neither for the chunk's compute nor for its answer."""
    reference, short, state, next_id = _stage_with_a_short_request(
        procs, broker, wide_checkpoint, layers=2, seed=9
    )
    # The stage computes the first prompt for about a second; once a heartbeat says it is
    # busy, the chunk and the decode step are sent, and queue behind it in that order.
    blocker, chunk = prompt(10, 1024), prompt(11, 512)
    fids = {"blocker": 101, "chunk": 102, "decode": 103}
    broker.send(
        M.Forward(fid=fids["blocker"], epoch=EPOCH, items=(Seq("blocker").item(blocker),)),
        [ids_tensor(blocker)],
    )
    while broker.next_heartbeat().state != "busy":
        pass
    broker.send(
        M.Forward(fid=fids["chunk"], epoch=EPOCH, items=(Seq("chunk").item(chunk),)),
        [ids_tensor(chunk)],
    )
    broker.send(
        M.Forward(fid=fids["decode"], epoch=EPOCH, items=(short.item([next_id]),)),
        [ids_tensor([next_id])],
    )
    replies = [broker.expect(Cmd.RESULT, timeout=60) for _ in fids]
    order = [r.body.fid for r in replies]
    assert order.index(fids["decode"]) < order.index(fids["chunk"]), order
    decode = replies[order.index(fids["decode"])]
    assert torch.equal(decode.tensor(0), run_reference(reference, state, [next_id]))
    assert decode.body.batch == 1


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory) -> Path:
    """Four wide layers: a 1024-token prefill takes about 2 s on one core."""
    return _wide_llama(tmp_path_factory, "deep", layers=4, seed=1)


@pytest.mark.timeout(120)
def test_a_decode_step_runs_between_two_layers_of_a_long_prompt(deep_checkpoint, procs, broker):
    """A decode FORWARD that arrives while a long prompt computes runs between two of the
    prompt's layers and is answered first; both results are the exact batch-1 bits."""
    reference, short, state, next_id = _stage_with_a_short_request(
        procs, broker, deep_checkpoint, layers=4, seed=12
    )
    long = prompt(13, 1024)
    broker.send(
        M.Forward(fid=201, epoch=EPOCH, items=(Seq("long").item(long),)), [ids_tensor(long)]
    )
    while broker.next_heartbeat().state != "busy":
        pass
    broker.send(
        M.Forward(fid=202, epoch=EPOCH, items=(short.item([next_id]),)),
        [ids_tensor([next_id])],
    )
    first, second = (broker.expect(Cmd.RESULT, timeout=60) for _ in range(2))
    assert (first.body.fid, second.body.fid) == (202, 201)
    assert torch.equal(first.tensor(0), run_reference(reference, state, [next_id]))
    assert first.body.compute_s < second.body.compute_s
    expected = run_reference(reference, reference.new_cache(), long)
    assert torch.equal(second.tensor(0), expected)


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


@pytest.mark.timeout(60)
def test_lost_broker_reconnects_idle_with_a_new_identity(checkpoints, procs, broker):
    proc = procs.start(broker.url, checkpoints["llama"], "--name", "lonely")
    broker.expect(Cmd.READY, timeout=60)
    first_identity = broker.identity
    broker.assign(0, 5)
    seq = Seq("lost")
    ids = prompt(9)
    assert broker.forward([seq.item(ids)], [ids_tensor(ids)]).cmd == Cmd.RESULT

    # Silence: the stage must give up on this identity and register again.
    ready = broker.expect(Cmd.READY, timeout=10).body
    assert broker.identity != first_identity
    assert ready.name == "lonely" and ready.held == (0, 5)

    identities = {first_identity, broker.identity}
    cpu_before = _cpu_seconds(proc.pid)
    deadline = time.monotonic() + 3.0
    while (left := deadline - time.monotonic()) > 0:
        got = broker.recv(left)
        if got is not None and got[1].cmd == Cmd.READY:
            identities.add(got[0])
    used = _cpu_seconds(proc.pid) - cpu_before
    print(f"cpu while the broker was silent: {used:.3f} s")
    assert used < 0.3
    assert len(identities) >= 3, "the stage should keep retrying with fresh identities"

    # Answer the latest registration: caches and epoch were dropped with the old identity.
    broker.expect(Cmd.READY, timeout=15)
    broker.send(M.BrokerHeartbeat(epoch=EPOCH))
    hb = broker.next_heartbeat()
    assert hb.kv_requests == 0 and hb.epoch is None
    seq.advance(ids)
    reply = broker.forward([seq.item([3])], [ids_tensor([3])])
    assert reply.body.code == "stale_epoch"
    assert proc.poll() is None


@pytest.mark.timeout(60)
def test_sigterm_drains_then_exits(checkpoints, procs, broker):
    proc = procs.start(broker.url, checkpoints["llama"], "--dead-after", "30")
    broker.expect(Cmd.READY, timeout=60)
    broker.assign(0, 5)
    # A broker that forgot this stage says BYE unknown: it registers again, holding its layers.
    identity = broker.identity
    broker.send(M.Bye(reason="unknown"))
    assert broker.expect(Cmd.READY, timeout=10).body.held == (0, 5)
    assert broker.identity == identity
    broker.assign(0, 5, epoch=EPOCH + 1)

    proc.send_signal(signal.SIGTERM)
    broker.expect(Cmd.LEAVING, timeout=10)
    # Still serving while draining.
    seq = Seq("draining")
    ids = prompt(10)
    assert broker.forward([seq.item(ids)], [ids_tensor(ids)]).cmd == Cmd.RESULT
    assert proc.poll() is None
    broker.send(M.Bye(reason="drained"))
    assert proc.wait(timeout=15) == 0
    assert "drained" in procs.log(proc)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (Code.FINGERPRINT, "stage sees checkpoint 0123 but the cluster runs abcd"),
        (Code.DTYPE_MISMATCH, "stage s runs bfloat16 but the cluster runs float32"),
    ],
)
def test_checkpoint_or_dtype_refusal_exits(checkpoints, procs, broker, code, reason):
    proc = procs.start(broker.url, checkpoints["llama"])
    broker.expect(Cmd.READY, timeout=60)
    # A refusal that may pass (our old identity still holds the name) is retried on a new socket.
    first = broker.identity
    broker.send(P.error(Code.BAD_REQUEST, "name is held by a live stage"))
    broker.expect(Cmd.READY, timeout=10)
    assert broker.identity != first
    broker.send(P.error(code, reason))
    assert proc.wait(timeout=15) == 3
    assert reason in procs.log(proc)


@pytest.mark.timeout(60)
def test_bad_arguments_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cases = [
        (["--broker", "localhost:5555"], "not a ZeroMQ URL"),
        (["--broker", "tcp://127.0.0.1:99999"], "out of range"),
        (["--broker", "tcp://127.0.0.1:5555", "--dtype", "int8"], "--dtype"),
        (["--broker", "tcp://127.0.0.1:5555", "--model", str(tmp_path / "nope")], "does not exist"),
    ]
    for args, reason in cases:
        out = subprocess.run(
            [sys.executable, "-m", "stage", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0], out.stderr


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.timeout(120)
def test_a_one_thread_stage_loads_the_row_kernel_at_start_unless_told_not_to(checkpoints, procs):
    """Decode groups take the row kernel by default and BLAS with `--no-row-kernel`; either
    way a group's logits are those of an in-process shard with the same choice, and only
    the default stage maps numba's LLVM (about 130 MiB)."""
    brokers = {True: FakeBroker(), False: FakeBroker()}
    try:
        stages = {
            kernel: procs.start(
                b.url,
                checkpoints["llama"],
                "--dead-after",
                "60",
                *(() if kernel else ("--no-row-kernel",)),
            )
            for kernel, b in brokers.items()
        }
        for kernel, b in brokers.items():
            b.expect(Cmd.READY, timeout=60)
            # Mapped before the stage registers, so no ASSIGN waits for the compiler.
            assert ("llvmlite" in _maps(stages[kernel].pid)) is kernel
            b.assign(0, 5)
            shard = load_shard(checkpoints["llama"], 0, 5, row_kernel=kernel)
            seqs = [Seq(f"k{kernel}-{i}") for i in range(3)]
            states = [shard.new_cache() for _ in seqs]
            ids = [prompt(20 + i) for i in range(3)]
            with stage_threads():
                for seq, state, p in zip(seqs, states, ids, strict=True):
                    assert b.forward([seq.item(p)], [ids_tensor(p)]).cmd == Cmd.RESULT
                    shard.forward(ids_tensor(p), state)
                    seq.advance(p)
                for token in (5, 9):
                    steps = [ids_tensor([token + i]) for i in range(3)]
                    reply = b.forward([s.item([token + i]) for i, s in enumerate(seqs)], steps)
                    assert reply.cmd == Cmd.RESULT and reply.body.batch == 3, reply.body
                    want = shard.forward_batch(steps, states)
                    for i, seq in enumerate(seqs):
                        assert torch.equal(reply.tensor(i), want[i]), (kernel, token, i)
                        seq.advance([token + i])
            assert ("llvmlite" in _maps(stages[kernel].pid)) is kernel
    finally:
        for b in brokers.values():
            b.close()


def test_the_peak_restarts_from_what_the_process_holds():
    """A stage reports the peak of its loads and forwards, not that of its imports: the peak
    restarts when it registers (stage.resident.reset_peak)."""
    script = (
        "from stage.resident import reset_peak, resident\n"
        "block = bytearray(256 * 2**20); block[::4096] = b'x' * len(block[::4096]); del block\n"
        "before = resident()\n"
        "assert reset_peak()\n"
        "after = resident()\n"
        "print(before.peak, after.peak, after.rss)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    before_peak, after_peak, after_rss = map(int, out.stdout.split())
    assert before_peak > 256 * 2**20  # the freed block was resident once
    assert after_peak < 128 * 2**20 and after_peak >= after_rss - 2**20
