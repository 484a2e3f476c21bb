"""Issue 19 through real processes: a stage with too little memory."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from tests.cluster import Cluster


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
