"""`python -m bench --smoke` runs end to end and leaves well-formed results: never a speed check."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import _streams_targets
from layerline import netns

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _positive(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, (
        f"bench --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, f"expected one JSON result in {out}, found {files}"
    return {"report": json.loads(files[0].read_text()), "stdout": proc.stdout}


@pytest.mark.timeout(480)
def test_smoke_writes_expected_keys(smoke):
    rep = smoke["report"]
    for key in (
        "machine",
        "model",
        "options",
        "pipeline",
        "summary",
        "monolithic",
        "zmq_floor",
        "broker_cpu",
        "memory",
        "long_prompt",
        "curve",
        "network",
        "gateway",
        "targets",
        "plots",
    ):
        assert key in rep, f"missing {key}"
    assert rep["options"]["smoke"] is True
    assert rep["machine"]["cores"] >= 1 and rep["machine"]["torch"]
    assert "results:" in smoke["stdout"]


@pytest.mark.timeout(480)
def test_smoke_pipeline_figures_are_sane(smoke):
    rep = smoke["report"]
    stages = rep["options"]["stages"][0]
    concurrency = rep["options"]["concurrency"]
    assert sorted(r["concurrency"] for r in rep["pipeline"]) == sorted(concurrency)
    for rec in rep["pipeline"]:
        gen = rep["options"]["gen_len"]
        assert rec["tokens"] == rec["requests"] * gen
        for key in ("tokens_per_s", "wall_s"):
            assert _positive(rec[key]), key
        for key in ("ttft_s", "tpot_s"):
            assert _positive(rec[key]["p50"]) and rec[key]["p99"] >= rec[key]["p50"], key
        assert _positive(rec["ratio_to_monolithic"]) and _positive(rec["monolithic_tokens_per_s"])
        # One breakdown entry per stage, in pipeline order, covering every layer once.
        parts = rec["breakdown"]["stages"]
        assert [p["stage"] for p in parts] == [f"s{i}" for i in range(stages)]
        assert parts[0]["start"] == 0 and parts[-1]["end"] == rep["model"]["num_layers"]
        for p in parts:
            assert _positive(p["compute_s"]) and p["queue_s"] >= 0 and p["transfer_s"] >= 0
        per_token = rec["breakdown"]["per_token_s"]
        assert _positive(per_token["latency"]) and per_token["latency"] >= per_token["compute"]
        assert _positive(rec["hop"]["transfer_ratio"]) and _positive(rec["hop"]["floor_one_way_s"])
        assert _positive(rec["broker"]["messages_per_s"])
        # Every token visits every stage: the broker forwarded one message per stage per step.
        assert rec["broker"]["forwarded"] >= rec["tokens"] * stages
        assert len(rec["stage_memory"]) == stages
        assert all(
            _positive(m["peak_rss_bytes"]) and _positive(m["share_bytes"])
            for m in rec["stage_memory"]
        )
    assert len(rep["summary"]) == len(concurrency)


@pytest.mark.timeout(480)
def test_smoke_baselines_and_scenarios(smoke):
    rep = smoke["report"]
    assert {m["batch"] for m in rep["monolithic"]} == set(rep["options"]["concurrency"])
    assert all(_positive(m["tokens_per_s"]) for m in rep["monolithic"])
    floor = rep["zmq_floor"][0]
    assert floor["payload_bytes"] == rep["model"]["hidden_size"] * 4 and _positive(
        floor["one_way_s"]
    )
    bc = rep["broker_cpu"]
    assert bc["error_count"] == 0
    assert [p["payload_bytes"] for p in bc["points"]] == rep["options"]["broker_payloads"]
    assert all(_positive(p["us_per_message"]) and p["forwarded"] > 0 for p in bc["points"])
    assert _positive(bc["flatness"])
    mem = rep["memory"]
    assert len(mem["stages"]) == rep["options"]["memory_stages"]
    assert all(
        _positive(r["peak_rss_bytes"]) and _positive(r["limit_bytes"]) for r in mem["stages"]
    )
    (long,) = rep["long_prompt"]
    assert long["prompt_len"] == rep["options"]["long_prompt_len"] > long["prefill_chunk"]
    assert len(long["idle_ttft_s"]) == len(long["loaded_ttft_s"]) == long["repeats"]
    assert all(_positive(t) for t in long["idle_ttft_s"] + long["loaded_ttft_s"])
    for window in ("baseline", "during"):
        tpot = long["others_tpot_s"][window]
        assert tpot["n"] > 0 and _positive(tpot["p50"]) and tpot["p99"] >= tpot["p50"]
    assert _positive(long["ttft_ratio"]) and _positive(long["others_p99_ratio"])
    names = {t["target"] for t in rep["targets"]}
    assert any("monolithic" in n for n in names) and any("pyzmq" in n for n in names)
    assert any("long prefill" in n for n in names) and any("long prompt" in n for n in names)
    assert all(isinstance(t["met"], bool) and _positive(t["figure"]) for t in rep["targets"])


@pytest.mark.timeout(480)
def test_smoke_curve_on_and_off_gives_the_same_tokens(smoke):
    rep = smoke["report"]
    streams = rep["options"]["curve_concurrency"]
    runs = {(r["curve"], r["concurrency"]): r for r in rep["curve"]}
    assert set(runs) == {(curve, c) for curve in (False, True) for c in streams}
    for c in streams:
        assert runs[(True, c)]["security"] == "curve"
        assert runs[(False, c)]["security"] == "loopback"
        assert runs[(True, c)]["first_token_ids"] == runs[(False, c)]["first_token_ids"]
    for r in runs.values():
        assert r["tokens"] > 0 and _positive(r["tokens_per_s"]) and _positive(r["hop_s"]["p50"])
    names = {t["target"] for t in rep["targets"]}
    assert "tokens/s with CURVE vs without, 1 stream" in names


@pytest.mark.timeout(480)
def test_smoke_network_delays_every_hop(smoke):
    rep = smoke["report"]
    o = rep["options"]
    (net,) = rep["network"]
    why_not = netns.unavailable()
    if why_not is not None:
        assert net["skipped"] == why_not
        pytest.skip(why_not)
    assert net["security"] == "curve" and net["same_output"]
    assert len(net["map"]) == net["stages"] == o["stages"][0]
    runs = {(r["delay_ms"], r["bandwidth_mbit"], r["concurrency"]): r for r in net["records"]}
    assert set(runs) == {
        (d, None, c) for d in o["network_delays_ms"] for c in o["network_concurrency"]
    } | {
        (0, b, c) for b in o["network_bandwidths_mbit"] for c in o["network_bandwidth_concurrency"]
    }
    for r in runs.values():
        assert r["tokens"] == r["requests"] * o["network_gen_len"] and _positive(r["tokens_per_s"])
    # A token's path crosses 2 x (stages + 1) links, each delayed: the delay bounds its time.
    delay = max(o["network_delays_ms"]) / 1e3
    one = runs[(max(o["network_delays_ms"]), None, 1)]
    assert one["tpot_s"]["p50"] >= 2 * (net["stages"] + 1) * delay
    assert any("ms one-way per hop" in t["target"] for t in rep["targets"])
    assert Path(rep["plots"]["network"]).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.timeout(480)
def test_smoke_gateway_and_client_give_the_same_text(smoke):
    rep = smoke["report"]
    (gw,) = rep["gateway"]
    assert gw["preset"] == rep["options"]["gateway_preset"]
    phases = {p["concurrency"]: p for p in gw["phases"]}
    assert set(phases) == set(rep["options"]["gateway_concurrency"])
    for p in phases.values():
        assert p["same_output"]
        for path in ("direct", "gateway"):
            fig = p[path]
            assert (
                fig["tokens"] > 0
                and _positive(fig["tokens_per_s"])
                and _positive(fig["ttft_p50_s"])
            )
        assert p["throughput_ratio"] == pytest.approx(
            p["gateway"]["tokens_per_s"] / p["direct"]["tokens_per_s"]
        )
    names = {t["target"] for t in rep["targets"]}
    assert "time to first token added by the gateway (ms), 1 stream" in names


@pytest.mark.timeout(480)
def test_smoke_plots_are_pngs(smoke):
    plots = smoke["report"]["plots"]
    assert {"throughput", "breakdown", "broker_cpu"} <= set(plots)
    for path in plots.values():
        data = Path(path).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, path


def test_stream_targets_pair_phases_of_the_same_round():
    """16 streams against batch 1 is a ratio within each round, then the median over rounds:
    a fast round's batch 1 is never set against a slow round's 16 streams. So is 8 streams
    against that round's batch-8 generate."""

    def phase(rnd, c, tps, p99, mono=None):
        return {
            "round": rnd,
            "concurrency": c,
            "tokens_per_s": tps,
            "tpot_s": {"p99": p99},
            "ratio_to_monolithic": mono,
            "preset": "small",
            "stages": 3,
            "threads": 1,
            "omp_wait_policy": "PASSIVE",
        }

    records = [
        phase(0, 1, 40.0, 0.030),
        phase(0, 16, 200.0, 0.100),  # 5.0x, p99 3.33x
        phase(1, 1, 30.0, 0.040),
        phase(1, 16, 210.0, 0.100),  # 7.0x, p99 2.5x
        phase(2, 1, 35.0, 0.035),
        phase(2, 16, 231.0, 0.098),  # 6.6x, p99 2.8x
        phase(0, 8, 150.0, 0.060, mono=0.75),
        phase(1, 8, 160.0, 0.060, mono=0.9),
        phase(2, 8, 155.0, 0.060, mono=0.82),
    ]
    speedup, p99, eight = _streams_targets(records)
    assert speedup["per_round"] == pytest.approx([5.0, 7.0, 6.6])
    assert speedup["figure"] == pytest.approx(6.6) and speedup["met"]
    assert p99["per_round"] == pytest.approx([0.100 / 0.030, 2.5, 2.8])
    assert p99["figure"] == pytest.approx(2.8) and p99["met"]
    assert eight["target"] == "8 streams tokens/s vs batch-8 generate"
    assert eight["per_round"] == pytest.approx([0.75, 0.9, 0.82])
    assert eight["figure"] == pytest.approx(0.82) and eight["met"]
    # The ratio of the medians would mix rounds: 210 / 35 = 6.0, 0.100 / 0.035 = 2.86.
