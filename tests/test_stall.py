"""Stall detection: a stage that heartbeats but makes no progress is failed; a slow one is not.

The stage here is played by the test over a real DEALER socket, so it can keep heartbeating
while it withholds results, which no healthy stage process does.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import zmq

from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd
from stage.checkpoint import open_checkpoint
from tests.cluster import Cluster


class FakeStage:
    def __init__(self, url: str, directory, name: str = "f0"):
        self.ckpt = open_checkpoint(directory)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, os.urandom(8))
        self.sock.connect(url)
        self.name = name
        self.progress = 0
        self.epoch = None

    def send(self, body, tensors=()):
        self.sock.send_multipart(P.encode(P.STAGE_TAG, body, tensors))

    def register(self):
        self.send(
            M.Ready(
                name=self.name,
                fingerprint=self.ckpt.fingerprint,
                credits=4,
                caps=M.Caps(device="cpu", dtype="float32", memory_bytes=1 << 30),
            )
        )

    def heartbeat(self):
        self.send(M.StageHeartbeat(state=M.StageState.BUSY, progress=self.progress))

    def serve(self, seconds: float, answer_after: float | None):
        """Heartbeat every 0.2 s for `seconds`; answer each FORWARD after `answer_after` s (None: never)."""
        pending = []
        end = time.monotonic() + seconds
        next_hb = 0.0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_hb:
                self.heartbeat()
                next_hb = now + 0.2
            for due, msg in [p for p in pending if p[0] <= now]:
                pending.remove((due, msg))
                self.progress += 1
                logits = torch.zeros(1, 1, self.ckpt.config.vocab_size)
                result = M.ForwardResult(
                    fid=msg.body.fid, epoch=msg.body.epoch, compute_s=answer_after
                )
                self.send(result, [logits])
            if self.sock.poll(50):
                msg = P.decode(self.sock.recv_multipart())
                if msg.cmd == Cmd.ASSIGN:
                    self.epoch = msg.body.epoch
                    start, end = msg.body.start, msg.body.end
                    # The digests of its layers' tensors, as a stage that read them reports.
                    digests = {
                        key: digest
                        for key, digest in self.ckpt.digest_table.digests.items()
                        if self.ckpt.layer_of(key) in range(start, end)
                    }
                    loaded = M.Loaded(
                        epoch=self.epoch,
                        start=start,
                        end=end,
                        digests=self.ckpt.pack_digests(digests),
                    )
                    self.send(loaded)
                elif msg.cmd == Cmd.FORWARD and answer_after is not None:
                    pending.append((time.monotonic() + answer_after, msg))

    def close(self):
        self.sock.close(0)


def _step(sock, seq, pos):
    step = M.Step(rid="stall-1", seq=seq, pos=pos, n=1, prev=0, hash=0)
    sock.send_multipart(P.encode(P.CLIENT_TAG, step, [torch.tensor([[5]])]))


@pytest.mark.timeout(120)
def test_stalled_stage_is_failed_and_slow_stage_is_not(checkpoints):
    directory = checkpoints["llama"]
    args = ("--stall-floor", "1.5", "--expect-stages", "1")
    cluster = Cluster(directory, 0, broker_args=args)
    cluster.start_broker()
    stage = FakeStage(cluster.url, directory)
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(cluster.url)
    try:
        cluster.wait_for(lambda s: True, 30, "broker answering")
        stage.register()
        stage.serve(1.0, answer_after=0.05)
        assert cluster.status()["ready"]
        # Slow but working: each step takes 0.4 s, 8x its usual time, and completes.
        for seq in range(3):
            _step(client, seq, 0)
            stage.serve(0.6, answer_after=0.4 if seq else 0.05)
            assert client.poll(2000), "a slow step must still be answered"
            assert P.decode(client.recv_multipart()).cmd == Cmd.RESULT
        assert cluster.status()["stages"][0]["name"] == "f0"
        # Stalled: heartbeats keep coming, the step never completes.
        _step(client, 10, 0)
        stage.serve(4.0, answer_after=None)
        status = cluster.status()
        assert status["stages"] == [] and not status["ready"], status
        assert status["counters"]["reshards"] >= 2
        # Failed as stalled, while it still heartbeat: not as silent, and not for its slow steps.
        deaths = [(e["kind"], e.get("stage"), e.get("cause")) for e in status["events"]]
        assert ("stalled", "f0", None) in deaths, deaths
        assert [d for d in deaths if d[0] == "dead"] == [("dead", "f0", "stalled")], deaths
        # Its request is told to replay on the new (empty) map.
        assert client.poll(2000), "the stalled step's client must hear of the reshard"
        event = P.decode(client.recv_multipart())
        assert event.cmd == Cmd.EVENT and (event.body.rid, event.body.event) == (
            "stall-1",
            "reshard",
        )
    finally:
        stage.close()
        client.close(0)
        cluster.close()
