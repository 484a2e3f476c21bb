"""Issue 19 through real processes: a stage with too little memory, a stage that takes a live
stage's name, a stage that reconnects while the broker still counts its old connection."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import zmq
from transformers import LlamaConfig, LlamaForCausalLM

from broker import protocol as P
from broker.protocol import Cmd, Code
from tests.cluster import Cluster
from tests.wire import raw_message


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    """A llama whose decoder layer (2.3 MiB in float32) is more than `--memory-mb 1` holds."""
    config = LlamaConfig(
        vocab_size=160,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    directory = tmp_path_factory.mktemp("wide")
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _names(status: dict) -> list[str]:
    return [r["stage"] for r in status["map"]]


def _stage(status: dict, name: str) -> dict | None:
    return next((s for s in status["stages"] if s["name"] == name), None)


@pytest.mark.timeout(240)
def test_a_stage_with_too_little_memory_stands_by(wide_model, tmp_path):
    """Issue 19: under the default balanced strategy a `--memory-mb 1` stage joins three healthy
    ones; the map stays on the three and the cluster never goes not ready. A fourth healthy
    stage joins the map; killing the small one changes nothing."""
    with Cluster(
        wide_model, 3, broker_args=("--rebalance-cooldown", "0.5"), log_dir=tmp_path
    ) as cluster:
        start = cluster.status()["epoch"]
        cluster.start_stage("s3", "--memory-mb", "1")

        def rebalanced(s: dict) -> bool:
            return s["ready"] and any(
                e["kind"] == "reshard" and e["cause"] == "rebalance" and e["epoch"] > start
                for e in s["events"]
            )

        status = cluster.wait_for(rebalanced, 60, "the rebalance after s3 joined")
        assert _names(status) == ["s0", "s1", "s2"]
        assert _stage(status, "s3")["state"] == "standby"
        assert not [e for e in status["events"] if e["kind"] == "not_ready"]

        cluster.start_stage("s4")
        status = cluster.wait_for(
            lambda s: s["ready"] and _names(s) == ["s0", "s1", "s2", "s4"], 60, "s4 in the map"
        )
        cluster.kill_stage("s3")
        status = cluster.wait_for(lambda s: _stage(s, "s3") is None, 30, "s3 declared dead")
        assert status["ready"] and _names(status) == ["s0", "s1", "s2", "s4"]
        assert not [e for e in status["events"] if e["kind"] == "not_ready"]


@pytest.mark.timeout(240)
def test_no_map_is_tried_again_on_every_membership_change(wide_model, tmp_path):
    """Two `--memory-mb 1` stages cannot hold the model: the reason says what is missing and
    how to add it. A death and a leave each make the broker try again (the reason follows the
    live stages), and a healthy stage makes the cluster ready."""
    cluster = Cluster(wide_model, 2, log_dir=tmp_path)
    try:
        cluster.start_broker()
        cluster.wait_for(lambda s: True, 30, "the broker answers")
        cluster.start_stage("s0", "--memory-mb", "1")
        cluster.start_stage("s1", "--memory-mb", "1")
        status = cluster.wait_for(
            lambda s: "2 stages offer 2.00 MiB" in (s["reason"] or ""), 60, "no map for s0 + s1"
        )
        assert not status["ready"] and status["map"] == []
        reason = status["reason"]
        assert reason.startswith("the live stages cannot hold the model: stage s")
        assert re.search(
            r"MiB missing\); add memory or a stage \(give stages more --memory-mb, "
            r"or start another stage\)$",
            reason,
        ), reason

        cluster.kill_stage("s1")
        cluster.wait_for(
            lambda s: "1 stage offers 1.00 MiB" in (s["reason"] or ""), 30, "a new try without s1"
        )
        cluster.kill_stage("s0", signal.SIGTERM)  # leaves
        status = cluster.wait_for(lambda s: not s["stages"], 30, "s0 gone")
        assert status["reason"] == (
            "the live stages cannot hold the model: no live stages; start one with "
            "`python -m stage --broker URL`"
        )
        cluster.start_stage("s2")
        status = cluster.wait_for(lambda s: s["ready"], 60, "ready on s2")
        assert _names(status) == ["s2"]
    finally:
        cluster.close()


def _raw_ready(url: str, ctx: zmq.Context, name: str, fingerprint: str, host: str, pid: int):
    """A raw DEALER that sends READY for `name`, and the broker's answer to it."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    header = {
        "name": name,
        "fingerprint": fingerprint,
        "caps": {"memory_bytes": 1 << 30, "host": host, "pid": pid},
        "credits": 4,
    }
    sock.send_multipart(raw_message(P.STAGE_TAG, Cmd.READY, header))
    assert sock.poll(10_000), "no answer to READY"
    return sock, P.decode(sock.recv_multipart(), P.DEFAULT_LIMITS)


@pytest.mark.timeout(300)
def test_a_live_stage_keeps_its_name_and_a_restarted_one_gets_it_back(checkpoints, tmp_path):
    """Issue 19: READY under a live stage's name from another identity, with the fingerprint
    copied from STATUS, is refused and the live stage keeps serving; a stage process started
    under a live name exits with the reason; a killed stage restarted under its name, and a
    stage that reconnects while the broker still counts its old connection, get back in."""
    with Cluster(
        checkpoints["llama"],
        2,
        # The stages beat five times per broker heartbeat, so that a live stage never looks
        # like one that missed a beat; they give the broker up after 1.5 s of its silence.
        broker_args=("--heartbeat", "0.5", "--dead-after", "3"),
        stage_args=("--heartbeat", "0.1", "--dead-after", "1.5"),
        log_dir=tmp_path,
    ) as cluster:
        status = cluster.status()
        s0 = _stage(status, "s0")
        assert s0["pid"] == cluster.stages["s0"].pid
        ctx = zmq.Context()
        try:
            sock, reply = _raw_ready(
                cluster.url, ctx, "s0", status["fingerprint"], "elsewhere", 4242
            )
            sock.close()
            assert reply.cmd == Cmd.ERROR and reply.body.code == Code.NAME_IN_USE
            assert reply.body.message == (
                f"stage name s0 is in use by a live stage (host {s0['host']}, pid {s0['pid']}); "
                "start this one with a different --name, or stop the other one first"
            )
            # Claiming to be s0's own process earns a retry, never the name.
            sock, reply = _raw_ready(
                cluster.url, ctx, "s0", status["fingerprint"], s0["host"], s0["pid"]
            )
            sock.close()
            assert reply.cmd == Cmd.ERROR and reply.body.code == Code.BUSY
        finally:
            ctx.term()
        after = cluster.status()
        assert after["ready"] and after["map"] == status["map"]
        assert _stage(after, "s0")["pid"] == s0["pid"]

        # A second stage process named s0 is refused and exits (code 3) with the reason.
        original = cluster.stages["s0"]
        duplicate = cluster.start_stage("s0")
        cluster.stages["s0"], cluster.stages["s0-duplicate"] = original, duplicate
        assert duplicate.wait(timeout=120) == 3
        log = (tmp_path / "s0.log").read_text()
        assert (
            f"stage name s0 is in use by a live stage (host {s0['host']}, pid {s0['pid']})" in log
        )
        after = cluster.status()
        assert after["ready"] and _stage(after, "s0")["pid"] == s0["pid"]

        # Killed and restarted under its name: back in the map.
        cluster.kill_stage("s1")
        restarted = cluster.start_stage("s1")
        cluster.wait_for(
            lambda s: s["ready"] and (_stage(s, "s1") or {}).get("pid") == restarted.pid,
            120,
            "the restarted s1 in the map",
        )

        # The broker freezes until both stages give it up and reconnect on new sockets.
        lost = {name: _count(tmp_path / f"{name}.log", "broker lost") for name in ("s0", "s1")}
        cluster.broker.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            while any(_count(tmp_path / f"{n}.log", "broker lost") <= k for n, k in lost.items()):
                assert time.monotonic() < deadline, "the stages did not notice the frozen broker"
                time.sleep(0.05)  # reading other processes' logs; there is nothing to wait on
        finally:
            cluster.broker.send_signal(signal.SIGCONT)
        pids = {"s0": s0["pid"], "s1": restarted.pid}
        status = cluster.wait_for(
            lambda s: (
                s["ready"]
                and len(s["map"]) == 2
                and {n: (_stage(s, n) or {}).get("pid") for n in pids} == pids
            ),
            60,
            "both stages back after the freeze",
        )
        assert all(cluster.stages[n].poll() is None for n in pids)


def _count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text) if path.exists() else 0
