"""Prometheus metrics scraped over HTTP from a real broker while a stage dies."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import Client
from layerline.cluster import free_port
from tests.cluster import Cluster
from tests.test_e2e import prompt_ids


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.timeout(120)
def test_metrics_follow_a_stage_death(checkpoints):
    port = free_port()
    args = ("--metrics-port", str(port), "--rebalance-cooldown", "1")
    with (
        Cluster(checkpoints["llama"], 3, broker_args=args) as cluster,
        Client(cluster.url) as client,
    ):
        tokens = 0
        for event in client.stream(prompt_ids(5), max_new_tokens=30, ignore_eos=True):
            if event["type"] == "token":
                tokens += 1
                if tokens == 10:
                    cluster.kill_stage("s1")
        assert tokens == 30
        cluster.wait_for(lambda s: s["ready"] and len(s["map"]) == 2, 20, "resharded")
        # Gauges are refreshed with each heartbeat round: wait for the one after the reshard.
        deadline = time.monotonic() + 5
        while True:
            m = scrape(port)
            ready = value(m, "layerline_stages", state="ready") + value(
                m, "layerline_stages", state="busy"
            )
            if ready == 2:
                break
            assert time.monotonic() < deadline, f"the stage gauges show {ready} live stages, not 2"
            time.sleep(0.05)
        names = {name for name, _ in m}
        assert all(
            n.startswith("layerline_") for n in names if not n.startswith(("python_", "process_"))
        )
        assert value(m, "layerline_tokens_generated_total") >= 30
        assert value(m, "layerline_requests_total", outcome="done") == 1
        assert (
            sum(v for (n, lab), v in m.items() if n == "layerline_reshards_total") >= 2
        )  # start + death
        assert value(m, "layerline_reshards_total", cause="start") == 1
        assert value(m, "layerline_replays_total", event="reshard") >= 1
        assert value(m, "layerline_stage_forward_seconds_count", stage="s0") > 0
        assert value(m, "layerline_stage_forward_seconds_bucket", stage="s0", le="0.005") > 0
        assert value(m, "layerline_forwarded_bytes_total") > 0
        assert (
            value(m, "layerline_stages", state="ready") + value(m, "layerline_stages", state="busy")
            == 2
        )
        # The dead stage's series are gone; the survivors' remain.
        labelled = {dict(lab).get("stage") for _, lab in m if dict(lab).get("stage")}
        assert labelled == {"s0", "s2"}
        assert value(m, "layerline_cluster_ready") == 1
