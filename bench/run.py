"""One benchmark run: every scenario asked for, the baselines in the same run, then targets.

Scenarios are measured in rounds: each round runs every configuration (threads x OpenMP
wait policy x stage count) once, with the monolithic baseline and the zmq floor of the same
round beside it, so that a ratio never compares figures taken minutes apart under other
load. Summaries take the median over rounds.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench import brokercpu, gateway, longprompt, network, pipeline, presets, weights
from bench.cluster import Cluster, bench_env, proc_status
from bench.stats import median, ratio, summary
from broker.messages import DTYPE_SIZES
from common.models import DEMO_QUESTION

SCENARIOS = (
    "pipeline",
    "monolithic",
    "zmq",
    "long-prompt",
    "broker-cpu",
    "memory",
    "curve",
    "network",
    "gateway",
    "weights",
)
DEFAULT_SCENARIOS = ("pipeline", "monolithic", "zmq")

# Targets (docs/performance.md has one table per target).
BATCH1_RATIO_TARGET = 0.95  # tokens/s of layerline / monolithic generate, batch 1
HOP_RATIO_TARGET = 1.5  # per-hop overhead / raw pyzmq one-way latency
BROKER_US_TARGET = 50.0  # broker CPU per forwarded message
# "Flat": the cost per message at the largest payload is within this factor of the smallest.
BROKER_FLAT_TARGET = 1.5
STREAMS_SPEEDUP_TARGET = 6.0  # aggregate tokens/s at 16 streams / batch 1
STREAMS_MONOLITHIC_TARGET = 0.8  # aggregate tokens/s at 8 streams / batch-8 generate
STREAMS_P99_TARGET = 3.0  # p99 time per output token at 16 streams / batch 1
LONG_TTFT_TARGET = 2.0  # long prompt's TTFT while others decode / idle
LONG_P99_TARGET = 3.0  # others' p99 time per token during a long prefill / without it
# Stage peak RSS <= 1.15 x its weight share + its fixed part: its runtime (what it held before
# its first layer: the interpreter, torch, transformers, the row kernel, the checkpoint's index;
# STATUS's `runtime_bytes`) and the library pages mapped since (see `stage_memory`).
MEMORY_FACTOR = 1.15
# Quantized weights (the weights scenario).
WEIGHTS_Q4_BYTES_TARGET = 0.2  # a tinyllama-shape q4 stage's weights / their float32 bytes
WEIGHTS_SPEEDUP_TARGET = 2.0  # batch-1 decode through q4 stages / through float32 stages
WEIGHTS_AGREEMENT_TARGET = 0.9  # SmolLM2's native Q4_1 greedy tokens equal to float32's
WEIGHTS_LLAMACPP_TARGET = 0.35  # native stages' batch 1 / llama.cpp's, same GGUF, same run
CURVE_TARGET = 0.95  # tokens/s with CURVE on / off, batch 1 and 16 streams
DELAY_TARGET = 0.8  # 16 streams' tokens/s at 5 ms one-way per hop / without added delay
GATEWAY_RATIO_TARGET = 0.95  # 16 streaming requests' tokens/s, gateway + SDK / AsyncClient
GATEWAY_TTFT_TARGET_S = 0.002  # time to first token added by the gateway, one stream


@dataclass(frozen=True)
class Options:
    preset: str = "small"
    stages: tuple[int, ...] = (3,)
    concurrency: tuple[int, ...] = (1,)
    requests: int = 8
    prompt_len: int = 32
    gen_len: int = 64
    stream: bool = False
    threads: tuple[int, ...] = (1,)
    omp_wait_policy: tuple[str, ...] = ("PASSIVE",)
    dtype: str = "float32"
    device: str = "cpu"
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    rounds: int = 1
    mono_repeats: int = 5
    zmq_iters: int = 3000
    broker_payloads: tuple[int, ...] = (4 << 10, 64 << 10, 1 << 20, 16 << 20)
    broker_seconds: float = 3.0
    broker_warmup_s: float = 1.0
    long_prompt_len: int = 1024
    long_streams: int = 8
    long_repeats: int = 3
    long_window_s: float = 4.0  # the baseline window; the load settles for as long first
    prefill_chunk: int | None = None
    memory_preset: str = "tinyllama"
    memory_stages: int = 3
    curve_concurrency: tuple[int, ...] = (1, 16)
    network_delays_ms: tuple[float, ...] = (0, 5, 20)
    network_concurrency: tuple[int, ...] = (1, 8, 16)
    network_bandwidths_mbit: tuple[float, ...] = (1000, 100, 10)
    network_bandwidth_concurrency: tuple[int, ...] = (1, 16)
    network_gen_len: int = 32
    network_requests: int = 4
    gateway_preset: str = "smollm2"  # the gateway speaks text: a checkpoint with a tokenizer
    gateway_concurrency: tuple[int, ...] = (1, 8, 16)
    gateway_gen_len: int = 32
    weights_presets: tuple[str, ...] = ("small", "tinyllama", "smollm2")
    weights_kinds: tuple[str, ...] = ("float32", "bfloat16", "int8", "q4", "native")
    weights_stages: int = 3
    weights_streams: int = 16
    weights_requests: int = 4
    weights_agreement: bool = True
    agreement_prompts: int = 32
    agreement_prompt_len: int = 64
    agreement_gen_len: int = 64
    agreement_ppl_tokens: int = 4096
    agreement_threads: int = 2
    llamacpp_python: str | None = None
    llamacpp_threads: int = 2
    smoke: bool = False


@dataclass
class Run:
    opts: Options
    out: Path
    stamp: str
    started: float = field(default_factory=time.monotonic)
    report: dict = field(default_factory=dict)

    def log(self, text: str) -> None:
        print(
            f"[bench {time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True
        )

    @property
    def logs(self) -> Path:
        return self.out / f"{self.stamp}-logs"


def machine() -> dict:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    model = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            None,
        )
    except (OSError, subprocess.SubprocessError):
        pass
    os_name = platform.platform()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = f"{line.split('=', 1)[1].strip(chr(34))} (kernel {platform.release()})"
    except OSError:
        pass
    import zmq

    return {
        "cpu_model": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "os": os_name,
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "gpu": _gpu(),
    }


def _gpu() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def stage_shares(
    model_path: Path, layer_map: list[dict], dtype: str, weights: str | None = None
) -> dict[str, int]:
    """Bytes of weights each stage of the map must hold: its layers, plus embeddings if
    first and final norm + head if last, at the run's dtype (the matrices held as `weights`:
    what the broker's memory plan counts, and the stage holds)."""
    from stage.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_path)
    layers, first, last = ckpt.role_bytes(DTYPE_SIZES[dtype], weights)
    out = {}
    for r in layer_map:
        share = sum(layers.get(i, 0) for i in range(r["start"], r["end"]))
        share += first if r["start"] == 0 else 0
        share += last if r["end"] == ckpt.num_layers else 0
        out[r["stage"]] = share
    return out


def stage_memory(
    cluster: Cluster, status: dict, model_path: Path, dtype: str, weights: str | None = None
) -> list[dict]:
    shares = stage_shares(model_path, status["map"], dtype, weights)
    stage_status = {s["name"]: s for s in status["stages"]}
    rows = []
    for r in status["map"]:
        pid = cluster.stages[r["stage"]].pid
        mem = proc_status(pid)
        share = shares[r["stage"]]
        runtime = stage_status[r["stage"]]["runtime_bytes"]
        # Pages mapped from files since the runtime was measured: the code of each kernel as it
        # first runs, clean and shared by the stages of a host. They do not grow with the
        # layers, and how many a first call maps depends on the machine and its page cache
        # (fault-around, large folios), so they count in the fixed part, not in the share.
        file_now = mem.get("RssFile", 0) + mem.get("RssShmem", 0)
        code = max(0, file_now - stage_status[r["stage"]].get("runtime_file_bytes", file_now))
        limit = MEMORY_FACTOR * share + runtime + code
        hwm = mem.get("VmHWM")
        rows.append(
            {
                "stage": r["stage"],
                "start": r["start"],
                "end": r["end"],
                "pid": pid,
                "share_bytes": share,
                "runtime_bytes": runtime,
                "runtime_file_bytes": stage_status[r["stage"]].get("runtime_file_bytes"),
                # The peak before its first layer; the stage restarts its peak after it.
                "runtime_peak_bytes": stage_status[r["stage"]].get("runtime_peak_bytes"),
                "code_bytes": code,
                "peak_rss_bytes": hwm,
                "rss_bytes": mem.get("VmRSS"),
                "rss_anon_bytes": mem.get("RssAnon"),
                "rss_file_bytes": mem.get("RssFile"),
                "limit_bytes": limit,
                "overhead_bytes": hwm - share if hwm else None,
                "met": hwm is not None and hwm <= limit,
            }
        )
    return rows


# --- scenarios ---------------------------------------------------------------------------------


def run_monolithic(run: Run, model: presets.Model, threads: int, omp: str) -> dict:
    o = run.opts
    batches = ",".join(str(c) for c in sorted(set(o.concurrency)))
    cmd = [
        sys.executable,
        "-m",
        "bench.monolithic",
        "--model",
        str(model.path),
        "--threads",
        str(threads),
        "--dtype",
        o.dtype,
        "--device",
        o.device,
        "--prompt-len",
        str(o.prompt_len),
        "--gen-len",
        str(o.gen_len),
        "--batch",
        batches,
        "--repeats",
        str(o.mono_repeats),
    ]
    busy0, kids0, t0 = pipeline.busy_cpu_s(), _children_cpu_s(), time.monotonic()
    with open(run.logs / "monolithic.log", "ab") as err:
        out = subprocess.run(
            cmd, env=bench_env(omp), stdout=subprocess.PIPE, stderr=err, check=False
        )
    if out.returncode != 0:
        raise RuntimeError(
            f"monolithic baseline failed (code {out.returncode}); see {run.logs}/monolithic.log"
        )
    result = json.loads(out.stdout.decode().strip().splitlines()[-1])
    foreign = max(0.0, pipeline.busy_cpu_s() - busy0 - (_children_cpu_s() - kids0))
    result["foreign_cpu_share"] = foreign / ((time.monotonic() - t0) * (os.cpu_count() or 1))
    return result


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_zmq(run: Run, payload: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bench.zmqfloor",
        "--payload",
        str(payload),
        "--iters",
        str(run.opts.zmq_iters),
        "--warmup",
        str(max(50, run.opts.zmq_iters // 10)),
    ]
    out = subprocess.run(cmd, env=bench_env(), capture_output=True, check=True, timeout=300)
    raw = json.loads(out.stdout.decode().strip().splitlines()[-1])
    rtt = summary(raw["rtt_s"])
    return {"payload_bytes": payload, "rtt_s": rtt, "one_way_s": rtt["p50"] / 2}


def _cluster(
    run: Run,
    model: presets.Model,
    stages: int,
    threads: int,
    omp: str,
    name: str,
    keys: Path | None = None,
) -> Cluster:
    """A broker and `stages` stages on the run's dtype and device, logging under `name`; with
    CURVE where `keys` names a key layout."""
    o = run.opts
    return Cluster(
        model.path,
        stages,
        threads=threads,
        dtype=o.dtype,
        device=o.device,
        omp_wait_policy=omp,
        log_dir=run.logs / name,
        keys=keys,
    )


def run_pipeline(run: Run, model: presets.Model, stages: int, threads: int, omp: str) -> list[dict]:
    o = run.opts
    name = f"{model.preset}-{stages}st-t{threads}-{omp}"
    run.log(f"pipeline {name}: starting broker + {stages} stages")
    records = []
    with _cluster(run, model, stages, threads, omp, name) as cluster:
        status = cluster.status(5.0)
        pipeline.warm_up(cluster.url, model.vocab_size, o.prompt_len)
        names = [r["stage"] for r in status["map"]]
        # How long each stage took to load its share, as its LOADED said.
        load_s = {s["name"]: s["load_s"] for s in status["stages"]}
        run.log(f"  {name} stage load: " + ", ".join(f"{k} {v:.1f} s" for k, v in load_s.items()))
        chat = pipeline.chat_ttft(cluster.url, DEMO_QUESTION)
        if chat is not None:
            run.log(
                f"  {name} chat question ({chat['prompt_tokens']} tokens): "
                f"TTFT {chat['ttft_s'] * 1e3:.0f} ms"
            )
        for c in o.concurrency:
            n = max(o.requests, c) if c == 1 else max(o.requests, 2 * c)
            phase = pipeline.run_phase(
                cluster.url,
                cluster.broker.pid,
                concurrency=c,
                requests=n,
                prompt_len=o.prompt_len,
                gen_len=o.gen_len,
                vocab=model.vocab_size,
                stream=o.stream,
                pids=cluster.pids(),
            )
            fig = pipeline.analyse(phase, names)
            run.log(
                f"  {name} C={c}: {fig['tokens_per_s']:.1f} tokens/s, TTFT p50 {fig['ttft_s']['p50'] * 1e3:.1f} ms, "
                f"TPOT p50 {fig['tpot_s']['p50'] * 1e3:.2f} ms, other load {fig['foreign_cpu_share']:.0%} of the cores"
            )
            run.log(
                "    cores used: "
                + ", ".join(f"{k} {v:.2f}" for k, v in fig["process_cores"].items())
            )
            records.append(
                {
                    "preset": model.preset,
                    "stages": stages,
                    "threads": threads,
                    "omp_wait_policy": omp,
                    "map": status["map"],
                    "stage_load_s": load_s,
                    "chat": chat,
                    **fig,
                }
            )
        memory = stage_memory(cluster, status, model.path, o.dtype)
    for rec in records:
        rec["stage_memory"] = memory
    return records


def run_long_prompt(run: Run, model: presets.Model, stages: int, threads: int, omp: str) -> dict:
    o = run.opts
    load = longprompt.LongPromptLoad(
        prompt_len=o.long_prompt_len,
        streams=o.long_streams,
        repeats=o.long_repeats,
        settle_s=o.long_window_s,
        baseline_s=o.long_window_s,
        gap_s=o.long_window_s / 4,
        prefill_chunk=o.prefill_chunk,
    )
    name = f"{model.preset}-{stages}st-t{threads}-{omp}-long"
    run.log(f"long prompt {name}: {load.prompt_len} tokens, idle and beside {load.streams} streams")
    with _cluster(run, model, stages, threads, omp, name) as cluster:
        cluster.status(5.0)
        pipeline.warm_up(cluster.url, model.vocab_size, o.prompt_len)
        fig = longprompt.measure(cluster.url, model.vocab_size, load)
    run.log(
        f"  TTFT idle {statistics.median(fig['idle_ttft_s']) * 1e3:.0f} ms, loaded "
        f"{statistics.median(fig['loaded_ttft_s']) * 1e3:.0f} ms ({fig['ttft_ratio']:.2f}x); "
        f"others' p99 per token {fig['others_tpot_s']['baseline']['p99'] * 1e3:.1f} -> "
        f"{fig['others_tpot_s']['during']['p99'] * 1e3:.1f} ms ({fig['others_p99_ratio']:.2f}x)"
    )
    return {
        "preset": model.preset,
        "stages": stages,
        "threads": threads,
        "omp_wait_policy": omp,
        **fig,
    }


def run_memory(run: Run, threads: int, omp: str) -> dict:
    o = run.opts
    model = presets.ensure_model(o.memory_preset, log=run.log)
    run.log(f"memory: {o.memory_preset} in {o.memory_stages} stages")
    name = f"memory-{o.memory_preset}-{o.memory_stages}st"
    with Cluster(
        model.path,
        o.memory_stages,
        threads=threads,
        dtype=o.dtype,
        device=o.device,
        omp_wait_policy=omp,
        log_dir=run.logs / name,
    ) as cluster:
        status = cluster.status(5.0)
        t0 = time.perf_counter()
        phase = pipeline.run_phase(
            cluster.url,
            cluster.broker.pid,
            concurrency=1,
            requests=1,
            prompt_len=o.prompt_len,
            gen_len=min(8, o.gen_len),
            vocab=model.vocab_size,
            stream=False,
        )
        rows = stage_memory(cluster, status, model.path, o.dtype)
        tokens_per_s = phase.records[0]["tokens"] / phase.records[0]["total_s"]
    for row in rows:
        run.log(
            f"  {row['stage']} [{row['start']},{row['end']}): peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB, "
            f"share {row['share_bytes'] / 2**20:.0f} MiB, limit {row['limit_bytes'] / 2**20:.0f} MiB"
        )
    return {
        "preset": o.memory_preset,
        "model": model.to_json(),
        "stages": rows,
        "threads": threads,
        "omp_wait_policy": omp,
        "tokens_per_s": tokens_per_s,
        "elapsed_s": time.perf_counter() - t0,
    }


def run_curve(
    run: Run, model: presets.Model, stages: int, threads: int, omp: str, rnd: int
) -> list[dict]:
    """The same load on a loopback cluster without keys and on one with CURVE on. Both run
    at once (an idle cluster costs a few heartbeats) and their phases alternate, the order
    changing by round and by stream count, so that seconds, not minutes, separate the two
    figures of a ratio and a drift of the machine favours neither."""
    o = run.opts
    records = []
    with contextlib.ExitStack() as stack:
        clusters = {}
        for curve in (False, True):
            name = f"{model.preset}-{stages}st-t{threads}-{omp}-curve-{'on' if curve else 'off'}-r{rnd}"
            keys = run.logs / f"keys-r{rnd}" if curve else None
            run.log(f"curve {'on' if curve else 'off'}: starting {name}")
            cluster = stack.enter_context(_cluster(run, model, stages, threads, omp, name, keys))
            status = cluster.status(5.0)
            pipeline.warm_up(cluster.url, model.vocab_size, o.prompt_len, keys)
            clusters[curve] = (cluster, keys, status)
        for i, c in enumerate(o.curve_concurrency):
            for curve in (False, True) if (rnd + i) % 2 == 0 else (True, False):
                cluster, keys, status = clusters[curve]
                phase = pipeline.run_phase(
                    cluster.url,
                    cluster.broker.pid,
                    concurrency=c,
                    requests=max(o.requests, c) if c == 1 else max(o.requests, 2 * c),
                    prompt_len=o.prompt_len,
                    gen_len=o.gen_len,
                    vocab=model.vocab_size,
                    stream=False,
                    pids=cluster.pids(),
                    keys=keys,
                )
                fig = pipeline.analyse(phase, [r["stage"] for r in status["map"]])
                records.append(
                    {
                        "round": rnd,
                        "curve": curve,
                        "security": status.get("security"),
                        "preset": model.preset,
                        "stages": stages,
                        "threads": threads,
                        "omp_wait_policy": omp,
                        "concurrency": c,
                        "tokens": fig["tokens"],
                        "tokens_per_s": fig["tokens_per_s"],
                        "request_tokens_per_s": fig["request_tokens_per_s"],
                        "tpot_s": fig["tpot_s"],
                        "hop_s": fig["hop"]["non_compute_per_hop_s"],
                        "process_cores": fig["process_cores"],
                        "foreign_cpu_share": fig["foreign_cpu_share"],
                        "first_token_ids": fig["first_token_ids"],
                    }
                )
                run.log(
                    f"  CURVE {'on' if curve else 'off'}, C={c}: {fig['tokens_per_s']:.1f} "
                    f"tokens/s, per hop {fig['hop']['non_compute_per_hop_s']['p50'] * 1e6:.0f} us, "
                    f"other load {fig['foreign_cpu_share']:.0%} of the cores"
                )
    return records


def run_network(run: Run, model: presets.Model, threads: int, omp: str, rnd: int) -> dict:
    o = run.opts
    load = network.NetworkLoad(
        stages=o.stages[0],
        delays_ms=o.network_delays_ms,
        concurrency=o.network_concurrency,
        bandwidths_mbit=o.network_bandwidths_mbit,
        bandwidth_concurrency=o.network_bandwidth_concurrency,
        prompt_len=o.prompt_len,
        gen_len=o.network_gen_len,
        requests=o.network_requests,
        threads=threads,
        omp_wait_policy=omp,
    )
    run.log(
        f"network round {rnd + 1}: {load.stages} stage hosts, delays {load.delays_ms} ms, "
        f"bandwidths {load.bandwidths_mbit} Mbit/s"
    )
    fig = network.run(model.path, model.vocab_size, load, run.logs / f"network-r{rnd}", run.log)
    return {"round": rnd, "preset": model.preset, **fig}


def run_gateway(run: Run, threads: int, omp: str, rnd: int) -> dict:
    o = run.opts
    model = presets.ensure_model(o.gateway_preset, log=run.log)
    stages = o.stages[0]
    name = f"gateway-{model.preset}-{stages}st-r{rnd}"
    run.log(f"gateway round {rnd + 1}: {model.preset} in {stages} stages")
    with _cluster(run, model, stages, threads, omp, name) as cluster:
        cluster.status(5.0)
        fig = gateway.run(
            cluster.url,
            model.vocab_size,
            concurrency=o.gateway_concurrency,
            requests=o.requests,
            prompt_len=o.prompt_len,
            gen_len=o.gateway_gen_len,
            log_dir=run.logs,
            rnd=rnd,
            log=run.log,
        )
    return {"round": rnd, "preset": model.preset, "stages": stages, **fig}


# --- the run -----------------------------------------------------------------------------------


def execute(opts: Options, out: Path) -> dict:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    run = Run(opts=opts, out=out, stamp=stamp)
    run.logs.mkdir(parents=True, exist_ok=True)
    rep = run.report
    rep.update(
        {
            "schema": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": [Path(sys.executable).name, "-m", "bench", *sys.argv[1:]],
            "options": {
                k: list(v) if isinstance(v, tuple) else v for k, v in opts.__dict__.items()
            },
            "machine": machine(),
            "load_average_start": os.getloadavg(),
        }
    )
    model = presets.ensure_model(opts.preset, log=run.log)
    rep["model"] = model.to_json()
    rep["pipeline"], rep["monolithic"], rep["zmq_floor"] = [], [], []
    rep["long_prompt"] = []
    rep["curve"], rep["network"], rep["gateway"] = [], [], []
    configs = list(itertools.product(opts.threads, opts.omp_wait_policy))
    payload = model.hidden_size * DTYPE_SIZES[opts.dtype]
    for rnd in range(opts.rounds):
        if "zmq" in opts.scenarios:
            run.log(f"round {rnd + 1}/{opts.rounds}: raw pyzmq round trip, {payload} B frames")
            floor = run_zmq(run, payload)
            demo = presets.ensure_model("demo", log=run.log)
            floor["broker_hop"] = brokercpu.measure_hop(
                demo.path, payload, opts.broker_seconds, dtype=opts.dtype, log_dir=run.logs
            )
            run.log(
                f"  one-way floor {floor['one_way_s'] * 1e6:.0f} us; through the real broker with instant "
                f"fake stages {floor['broker_hop']['per_hop_s'] * 1e6:.0f} us per hop"
            )
            rep["zmq_floor"].append({"round": rnd, **floor})
        for threads, omp in configs:
            if "monolithic" in opts.scenarios:
                run.log(
                    f"round {rnd + 1}/{opts.rounds}: monolithic generate, threads={threads} omp={omp}"
                )
                mono = run_monolithic(run, model, threads, omp)
                for r in mono["results"]:
                    rep["monolithic"].append(
                        {
                            "round": rnd,
                            "threads": threads,
                            "omp_wait_policy": omp,
                            "load_s": mono["load_s"],
                            "foreign_cpu_share": mono["foreign_cpu_share"],
                            **r,
                        }
                    )
            if "pipeline" in opts.scenarios:
                for stages in opts.stages:
                    for rec in run_pipeline(run, model, stages, threads, omp):
                        rep["pipeline"].append({"round": rnd, **rec})
            if "long-prompt" in opts.scenarios:
                for stages in opts.stages:
                    rec = run_long_prompt(run, model, stages, threads, omp)
                    rep["long_prompt"].append({"round": rnd, **rec})
            if "curve" in opts.scenarios:
                for stages in opts.stages:
                    rep["curve"] += run_curve(run, model, stages, threads, omp, rnd)
        if "network" in opts.scenarios:
            threads, omp = configs[0]
            rep["network"].append(run_network(run, model, threads, omp, rnd))
        if "gateway" in opts.scenarios:
            threads, omp = configs[0]
            rep["gateway"].append(run_gateway(run, threads, omp, rnd))
    if "broker-cpu" in opts.scenarios:
        run.log("broker CPU per forwarded message with fake stages")
        ckpt = presets.ensure_model("demo", log=run.log)
        rep["broker_cpu"] = brokercpu.measure(
            ckpt.path,
            list(opts.broker_payloads),
            opts.broker_seconds,
            opts.broker_warmup_s,
            dtype=opts.dtype,
            log_dir=run.logs,
            log=run.log,
        )
    if "memory" in opts.scenarios:
        rep["memory"] = run_memory(run, opts.threads[0], opts.omp_wait_policy[0])
    if "weights" in opts.scenarios:
        rep["weights"] = weights.run_weights(run, opts.threads[0], opts.omp_wait_policy[0])
    rep["load_average_end"] = os.getloadavg()
    rep["elapsed_s"] = time.monotonic() - run.started
    derive(rep)
    rep["targets"] = targets(rep)
    return rep | {"_stamp": stamp}


def derive(rep: dict) -> None:
    """Ratios against the same round's baselines, then medians over rounds per configuration."""
    floors = {z["round"]: z for z in rep["zmq_floor"]}
    for rec in rep["pipeline"]:
        mono = next(
            (
                m
                for m in rep["monolithic"]
                if m["round"] == rec["round"]
                and m["threads"] == rec["threads"]
                and m["omp_wait_policy"] == rec["omp_wait_policy"]
                and m["batch"] == rec["concurrency"]
            ),
            None,
        )
        rec["monolithic_tokens_per_s"] = mono["tokens_per_s"] if mono else None
        # Batch 1: the median request against the median generate; both include the prefill.
        ours = (
            rec["request_tokens_per_s"]["p50"] if rec["concurrency"] == 1 else rec["tokens_per_s"]
        )
        rec["ratio_to_monolithic"] = ratio(ours, rec["monolithic_tokens_per_s"])
        rec["tokens_match_monolithic"] = (
            (mono["token_ids"] == rec["first_token_ids"]) if mono else None
        )
        floor = floors.get(rec["round"])
        one_way = floor["one_way_s"] if floor else None
        rec["hop"]["floor_one_way_s"] = one_way
        rec["hop"]["broker_hop_s"] = floor["broker_hop"]["per_hop_s"] if floor else None
        rec["hop"]["transfer_ratio"] = ratio(rec["hop"]["transfer_s"]["p50"], one_way)
        rec["hop"]["non_compute_ratio"] = ratio(rec["hop"]["non_compute_per_hop_s"]["p50"], one_way)

    groups: dict[tuple, list[dict]] = {}
    for rec in rep["pipeline"]:
        key = (
            rec["preset"],
            rec["stages"],
            rec["threads"],
            rec["omp_wait_policy"],
            rec["concurrency"],
        )
        groups.setdefault(key, []).append(rec)
    rep["summary"] = []
    for (preset, stages, threads, omp, c), recs in groups.items():
        tps = [r["tokens_per_s"] for r in recs]
        rep["summary"].append(
            {
                "preset": preset,
                "stages": stages,
                "threads": threads,
                "omp_wait_policy": omp,
                "concurrency": c,
                "rounds": len(recs),
                "tokens_per_s": median(tps),
                "request_tokens_per_s": median(r["request_tokens_per_s"]["p50"] for r in recs),
                "monolithic_tokens_per_s": median(
                    r["monolithic_tokens_per_s"]
                    for r in recs
                    if r["monolithic_tokens_per_s"] is not None
                ),
                "ratio_to_monolithic": _median_or_none(r["ratio_to_monolithic"] for r in recs),
                "ttft_p50_s": median(r["ttft_s"]["p50"] for r in recs),
                "tpot_p50_s": median(r["tpot_s"]["p50"] for r in recs),
                "tpot_p99_s": median(r["tpot_s"]["p99"] for r in recs),
                "transfer_p50_s": median(r["hop"]["transfer_s"]["p50"] for r in recs),
                "non_compute_per_hop_p50_s": median(
                    r["hop"]["non_compute_per_hop_s"]["p50"] for r in recs
                ),
                "floor_one_way_s": _median_or_none(r["hop"]["floor_one_way_s"] for r in recs),
                "broker_hop_s": _median_or_none(r["hop"]["broker_hop_s"] for r in recs),
                "transfer_ratio": _median_or_none(r["hop"]["transfer_ratio"] for r in recs),
                "non_compute_ratio": _median_or_none(r["hop"]["non_compute_ratio"] for r in recs),
                "broker_messages_per_s": _median_or_none(
                    r["broker"]["messages_per_s"] for r in recs
                ),
                "broker_cpu_us_per_message": _median_or_none(
                    r["broker"]["cpu_us_per_message"] for r in recs
                ),
                "foreign_cpu_share": _median_or_none(r["foreign_cpu_share"] for r in recs),
                # The record whose throughput is the median one stands for the group in the plots.
                "representative": rep["pipeline"].index(
                    sorted(recs, key=lambda r: r["tokens_per_s"])[(len(recs) - 1) // 2]
                ),
            }
        )
    bc = rep.get("broker_cpu")
    if bc and bc["points"]:
        us = [p["us_per_message"] for p in bc["points"] if p["us_per_message"]]
        main = [
            p["main_thread_us_per_message"] for p in bc["points"] if p["main_thread_us_per_message"]
        ]
        bc["max_us_per_message"] = max(us) if us else None
        bc["flatness"] = ratio(
            bc["points"][-1]["us_per_message"], bc["points"][0]["us_per_message"]
        )
        bc["main_thread_max_us_per_message"] = max(main) if main else None
        bc["main_thread_flatness"] = ratio(
            bc["points"][-1]["main_thread_us_per_message"],
            bc["points"][0]["main_thread_us_per_message"],
        )


def _median_or_none(values) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def targets(rep: dict) -> list[dict]:
    """Each target with its figure from this run; `met` is None where the run lacks the data."""
    out = []
    for s in rep["summary"]:
        if s["concurrency"] == 1 and s["ratio_to_monolithic"] is not None:
            out.append(
                {
                    "target": "batch-1 tokens/s vs monolithic generate",
                    "config": _config(s),
                    "figure": s["ratio_to_monolithic"],
                    "limit": BATCH1_RATIO_TARGET,
                    "met": s["ratio_to_monolithic"] >= BATCH1_RATIO_TARGET,
                }
            )
        if s["concurrency"] == 1 and s["transfer_ratio"] is not None:
            out.append(
                {
                    "target": "per-hop overhead vs raw pyzmq one-way",
                    "config": _config(s),
                    "figure": s["transfer_ratio"],
                    "limit": HOP_RATIO_TARGET,
                    "met": s["transfer_ratio"] <= HOP_RATIO_TARGET,
                }
            )
    out += _streams_targets(rep["pipeline"])
    out += _long_prompt_targets(rep.get("long_prompt", []))
    out += _curve_targets(rep.get("curve", []))
    out += _network_targets(rep.get("network", []))
    out += _gateway_targets(rep.get("gateway", []))
    bc = rep.get("broker_cpu")
    if bc and bc.get("max_us_per_message") is not None:
        out.append(
            {
                "target": "broker CPU per forwarded message (us, worst payload)",
                "config": "fake stages",
                "figure": bc["max_us_per_message"],
                "limit": BROKER_US_TARGET,
                "met": bc["max_us_per_message"] <= BROKER_US_TARGET,
            }
        )
        if bc.get("flatness") is not None:
            out.append(
                {
                    "target": "broker CPU flat in payload (largest / smallest)",
                    "config": "fake stages",
                    "figure": bc["flatness"],
                    "limit": BROKER_FLAT_TARGET,
                    "met": bc["flatness"] <= BROKER_FLAT_TARGET,
                }
            )
    out += _weights_targets(rep.get("weights"))
    mem = rep.get("memory")
    if mem:
        worst = max(mem["stages"], key=lambda r: (r["peak_rss_bytes"] or 0) / r["limit_bytes"])
        out.append(
            {
                "target": "stage peak RSS / (1.15 x share + runtime + code mapped since), worst stage",
                "config": f"{mem['preset']}, {len(mem['stages'])} stages",
                "figure": (worst["peak_rss_bytes"] or 0) / worst["limit_bytes"],
                "limit": 1.0,
                "met": all(r["met"] for r in mem["stages"]),
            }
        )
    return out


def _streams_targets(records: list[dict]) -> list[dict]:
    """Concurrency targets: 16 streams against batch 1 (throughput and p99 time per token),
    8 streams against batch-8 generate. Each ratio is taken within a round (the 8-stream one
    against that round's monolithic run), and the figure is the median over rounds
    (`per_round` lists them)."""
    out = []
    rounds: dict[str, dict[int, dict[int, dict]]] = {}
    for r in records:
        rounds.setdefault(_config(r), {}).setdefault(r["round"], {})[r["concurrency"]] = r
    for config, by_round in rounds.items():
        pairs = [(c[16], c[1]) for c in by_round.values() if 1 in c and 16 in c]
        speedups = [ratio(many["tokens_per_s"], one["tokens_per_s"]) for many, one in pairs]
        p99s = [ratio(many["tpot_s"]["p99"], one["tpot_s"]["p99"]) for many, one in pairs]
        eights = [
            c[8]["ratio_to_monolithic"]
            for c in by_round.values()
            if 8 in c and c[8].get("ratio_to_monolithic") is not None
        ]
        rows = [
            ("16 streams tokens/s vs batch 1", speedups, STREAMS_SPEEDUP_TARGET, 1),
            ("p99 time per token, 16 streams vs batch 1", p99s, STREAMS_P99_TARGET, -1),
            ("8 streams tokens/s vs batch-8 generate", eights, STREAMS_MONOLITHIC_TARGET, 1),
        ]
        for target, per_round, limit, sign in rows:
            figure = _median_or_none(per_round)
            if figure is None:
                continue
            out.append(
                {
                    "target": target,
                    "config": config,
                    "figure": figure,
                    "per_round": per_round,
                    "limit": limit,
                    "met": sign * figure >= sign * limit,
                }
            )
    return out


def _long_prompt_targets(records: list[dict]) -> list[dict]:
    """Medians over rounds of the long-prompt figures, per configuration."""
    by_config: dict[str, list[dict]] = {}
    for r in records:
        by_config.setdefault(_config(r), []).append(r)
    out = []
    for config, recs in by_config.items():
        first = recs[0]
        config = f"{config}, {first['prompt_len']} tokens beside {first['streams']} streams"
        for target, key, limit in (
            ("long prompt TTFT under load vs idle", "ttft_ratio", LONG_TTFT_TARGET),
            ("others' p99 per token during a long prefill", "others_p99_ratio", LONG_P99_TARGET),
        ):
            figure = _median_or_none(r[key] for r in recs)
            out.append(
                {
                    "target": target,
                    "config": config,
                    "figure": figure,
                    "limit": limit,
                    "met": figure is not None and figure <= limit,
                }
            )
    return out


def _curve_targets(records: list[dict]) -> list[dict]:
    """Tokens/s with CURVE on against off, within each round, at batch 1 and 16 streams (the
    largest concurrency measured stands in for 16 when 16 was not); median over rounds."""
    out = []
    by_config: dict[str, dict[int, dict[tuple[int, bool], dict]]] = {}
    for r in records:
        by_config.setdefault(_config(r), {}).setdefault(r["concurrency"], {})[
            (r["round"], r["curve"])
        ] = r
    for config, by_c in by_config.items():
        for c in sorted({1, max(by_c)}):
            runs = by_c.get(c, {})
            rounds = sorted({rnd for rnd, _ in runs})
            per_round = [
                ratio(runs[(rnd, True)]["tokens_per_s"], runs[(rnd, False)]["tokens_per_s"])
                for rnd in rounds
                if (rnd, True) in runs and (rnd, False) in runs
            ]
            figure = _median_or_none(per_round)
            if figure is None:
                continue
            out.append(
                {
                    "target": f"tokens/s with CURVE vs without, {c} stream{'s' if c > 1 else ''}",
                    "config": config,
                    "figure": figure,
                    "per_round": per_round,
                    "limit": CURVE_TARGET,
                    "met": figure >= CURVE_TARGET,
                }
            )
    return out


def _network_targets(runs: list[dict]) -> list[dict]:
    """The most streams measured, at 5 ms one-way per hop against no added delay, within each
    round's run; median over rounds."""
    per_round = []
    streams = None
    for run_ in runs:
        records = [r for r in run_.get("records", []) if r["bandwidth_mbit"] is None]
        if not records:
            continue
        streams = max(r["concurrency"] for r in records)
        at = {r["delay_ms"]: r for r in records if r["concurrency"] == streams}
        if 0 in at and 5 in at:
            per_round.append(ratio(at[5]["tokens_per_s"], at[0]["tokens_per_s"]))
    figure = _median_or_none(per_round)
    if figure is None:
        return []
    first = runs[0]
    return [
        {
            "target": f"{streams} streams' tokens/s at 5 ms one-way per hop vs no delay",
            "config": f"{first['preset']}, {first['stages']} stage hosts, CURVE, delaying relay",
            "figure": figure,
            "per_round": per_round,
            "limit": DELAY_TARGET,
            "met": figure >= DELAY_TARGET,
        }
    ]


def _gateway_targets(runs: list[dict]) -> list[dict]:
    """The gateway's throughput at the most streams measured and its added time to first token
    at one stream, each against AsyncClient in the same round; medians over rounds."""
    phases = [p for r in runs for p in r["phases"]]
    if not phases:
        return []
    most = max(p["concurrency"] for p in phases)
    config = f"{runs[0]['preset']}, {runs[0]['stages']} stages, streaming, openai SDK"
    out = []
    ratios = [p["throughput_ratio"] for p in phases if p["concurrency"] == most]
    figure = _median_or_none(ratios)
    out.append(
        {
            "target": f"tokens/s through the gateway vs AsyncClient, {most} streams",
            "config": config,
            "figure": figure,
            "per_round": ratios,
            "limit": GATEWAY_RATIO_TARGET,
            "met": figure is not None and figure >= GATEWAY_RATIO_TARGET,
        }
    )
    added = [p["ttft_overhead_s"] * 1e3 for p in phases if p["concurrency"] == 1]
    figure = _median_or_none(added)
    if figure is not None:
        out.append(
            {
                "target": "time to first token added by the gateway (ms), 1 stream",
                "config": config,
                "figure": figure,
                "per_round": added,
                "limit": GATEWAY_TTFT_TARGET_S * 1e3,
                "met": figure <= GATEWAY_TTFT_TARGET_S * 1e3,
            }
        )
    return out


def _config(s: dict) -> str:
    return (
        f"{s['preset']}, {s['stages']} stages, threads {s['threads']}, OMP {s['omp_wait_policy']}"
    )


def _weights_targets(result: dict | None) -> list[dict]:
    """The quantized-weights targets, from one run of the weights scenario."""
    if not result:
        return []
    out = []
    for entry in result["presets"]:
        by_kind = {r["weights"]: r for r in entry["records"]}
        preset = entry["preset"]
        q4 = by_kind.get("q4")
        if q4 and preset == "tinyllama":
            worst = max(r["held_ratio"] for r in q4["stage_memory"])
            out.append(
                {
                    "target": "q4 stage weights / float32 bytes, worst stage",
                    "config": preset,
                    "figure": worst,
                    "limit": WEIGHTS_Q4_BYTES_TARGET,
                    "met": worst <= WEIGHTS_Q4_BYTES_TARGET,
                }
            )
        for kind in ("q4", "native"):
            rec = by_kind.get(kind)
            if rec is None:
                continue
            worst = max(
                (r["peak_rss_bytes"] or 0) / r["quantized_limit_bytes"] for r in rec["stage_memory"]
            )
            out.append(
                {
                    "target": f"{kind} stage peak RSS / (0.35 x float32 share + fixed part)",
                    "config": preset,
                    "figure": worst,
                    "limit": 1.0,
                    "met": worst <= 1.0,
                }
            )
        plain = by_kind.get("float32")
        for kind in ("q4", "native"):
            rec = by_kind.get(kind)
            if rec is None or plain is None:
                continue
            figure = ratio(decode_rate(rec), decode_rate(plain))
            out.append(
                {
                    "target": f"batch-1 decode, {kind} vs float32 stages",
                    "config": preset,
                    "figure": figure,
                    "limit": WEIGHTS_SPEEDUP_TARGET,
                    "met": figure is not None and figure >= WEIGHTS_SPEEDUP_TARGET,
                }
            )
        agreement = (entry.get("agreement") or {}).get("kinds", {})
        if preset == "smollm2" and "native" in agreement:
            figure = agreement["native"]["greedy_agreement"]
            out.append(
                {
                    "target": "greedy agreement with float32, native Q4_1 weights",
                    "config": preset,
                    "figure": figure,
                    "limit": WEIGHTS_AGREEMENT_TARGET,
                    "met": figure >= WEIGHTS_AGREEMENT_TARGET,
                }
            )
        anchor = entry.get("llamacpp")
        native = by_kind.get("native")
        if anchor and native:
            figure = ratio(decode_rate(native), llamacpp_decode_rate(anchor))
            out.append(
                {
                    "target": "batch-1 decode, native stages vs llama.cpp in one process",
                    "config": preset,
                    "figure": figure,
                    "limit": WEIGHTS_LLAMACPP_TARGET,
                    "met": figure is not None and figure >= WEIGHTS_LLAMACPP_TARGET,
                }
            )
    return out


def decode_rate(record: dict) -> float | None:
    """Batch-1 decode tokens/s of a weights-scenario record: one over the median time per
    output token (the prompt's prefill apart; TTFT is reported on its own)."""
    tpot = record["phases"][1]["tpot_p50_s"]
    return 1.0 / tpot if tpot else None


def llamacpp_decode_rate(anchor: dict) -> float | None:
    """llama.cpp's batch-1 decode tokens/s, as `decode_rate` counts it: the tokens after the
    first over the time after the first, median over its runs."""
    n = len(anchor["token_ids"])
    rates = [
        (n - 1) / (r["total_s"] - r["ttft_s"]) for r in anchor["runs"] if r["total_s"] > r["ttft_s"]
    ]
    return statistics.median(rates) if rates else None
