"""The `weights` scenario: each way a stage can hold its weights (`--weights`), on each preset.

For every preset and kind, in one run: a cluster of `--weights-stages` stages, all holding
that kind, decodes batch 1 and `--weights-streams` streams (the pipeline scenario's phases),
and each stage's peak RSS is read with what its weights take. Per preset, one process
(`bench.agreement`) measures how far each kind strays from float32. On a GGUF preset,
llama.cpp decodes the same file in the same run when `--llamacpp-python` names a Python that
has `llama-cpp-python` (bench/llamacpp.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import pipeline, presets
from bench.cluster import Cluster, bench_env
from bench.workload import prompt

LLAMACPP = Path(__file__).resolve().parent / "llamacpp.py"
RANDOM_PROMPTS = 8
RANDOM_GEN_LEN = 32


def run_weights(run, threads: int, omp: str) -> dict:
    o = run.opts
    out: dict = {"presets": []}
    for preset in o.weights_presets:
        model = presets.ensure_model(preset, log=run.log)
        gguf = model.path.suffix == ".gguf"
        kinds = [k for k in o.weights_kinds if k != "native" or gguf]
        entry: dict = {"preset": preset, "model": model.to_json(), "records": []}
        for kind in kinds:
            entry["records"].append(_cluster_run(run, model, kind, threads, omp))
        _memory_limits(entry["records"])
        if o.weights_agreement:
            entry["agreement"] = _agreement(run, model, [k for k in kinds if k != "float32"])
        if gguf and o.llamacpp_python:
            entry["llamacpp"] = _llamacpp(run, model)
        out["presets"].append(entry)
    return out


def _cluster_run(run, model: presets.Model, kind: str, threads: int, omp: str) -> dict:
    from bench.run import stage_memory

    o = run.opts
    name = f"weights-{model.preset}-{kind}"
    run.log(f"weights {model.preset} {kind}: {o.weights_stages} stages")
    with Cluster(
        model.path,
        o.weights_stages,
        threads=threads,
        dtype=o.dtype,
        device=o.device,
        omp_wait_policy=omp,
        log_dir=run.logs / name,
        stage_args=("--weights", kind),
    ) as cluster:
        status = cluster.status(5.0)
        names = [r["stage"] for r in status["map"]]
        pipeline.warm_up(cluster.url, model.vocab_size, o.prompt_len)
        phases = {}
        for c in sorted({1, o.weights_streams}):
            phase = pipeline.run_phase(
                cluster.url,
                cluster.broker.pid,
                concurrency=c,
                requests=max(o.weights_requests, c),
                prompt_len=o.prompt_len,
                gen_len=o.gen_len,
                vocab=model.vocab_size,
                stream=False,
                pids=cluster.pids(),
            )
            fig = pipeline.analyse(phase, names)
            phases[c] = {
                "tokens_per_s": fig["tokens_per_s"],
                "request_tokens_per_s": fig["request_tokens_per_s"]["p50"],
                "ttft_p50_s": fig["ttft_s"]["p50"],
                "tpot_p50_s": fig["tpot_s"]["p50"],
                "foreign_cpu_share": fig["foreign_cpu_share"],
                "first_token_ids": fig["first_token_ids"],
            }
            run.log(
                f"  {name} C={c}: {fig['tokens_per_s']:.1f} tokens/s (request p50 "
                f"{fig['request_tokens_per_s']['p50']:.1f}), other load "
                f"{fig['foreign_cpu_share']:.0%}"
            )
        status = cluster.status(5.0)
        memory = stage_memory(cluster, status, model.path, o.dtype, kind)
        float_shares = stage_memory(cluster, status, model.path, o.dtype, "float32")
    for row, plain in zip(memory, float_shares, strict=True):
        row["float32_share_bytes"] = plain["share_bytes"]
        row["held_ratio"] = row["share_bytes"] / plain["share_bytes"]
        run.log(
            f"  {row['stage']} [{row['start']},{row['end']}): holds {row['share_bytes'] / 2**20:.0f} "
            f"MiB ({row['held_ratio']:.3f} x float32), peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
    weights = {s["name"]: s.get("weights") for s in status["stages"]}
    return {
        "weights": kind,
        "stages_hold": weights,
        "map": status["map"],
        "phases": phases,
        "stage_memory": memory,
    }


def _memory_limits(records: list[dict]) -> None:
    """The bound on a compact stage's peak: 0.35 x its layers' float32 bytes + the fixed part.

    The fixed part is what the float32 stage of the same layers held beyond its weights at its
    peak, in the same run and workload (`fixed_bytes`): the runtime, and what loading and
    serving add that does not grow with the weights (module objects, 16 streams' keys and
    values, activations, allocator slack). The runtime a stage reports at READY is measured
    before any of that: on `small`, loading and 16 streams add 30-50 MiB to it, more than
    0.35 x a 34 MiB share, for float32 and q4 alike. Without a float32 record of the same
    layers the runtime and code mapped since stand in for it (`fixed_from`).
    """
    plain = next((r for r in records if r["weights"] == "float32"), None)
    fixed: dict[tuple, int] = {}
    if plain is not None:
        for m in plain["stage_memory"]:
            if m["peak_rss_bytes"]:
                fixed[(m["stage"], m["start"], m["end"])] = m["peak_rss_bytes"] - m["share_bytes"]
    for record in records:
        for m in record["stage_memory"]:
            own = fixed.get((m["stage"], m["start"], m["end"]))
            if own is None:
                m["fixed_bytes"], m["fixed_from"] = m["runtime_bytes"] + m["code_bytes"], "runtime"
            else:
                m["fixed_bytes"], m["fixed_from"] = own, "float32 peak - share"
            m["quantized_limit_bytes"] = 0.35 * m["float32_share_bytes"] + m["fixed_bytes"]


def _agreement(run, model: presets.Model, kinds: list[str]) -> dict | None:
    """bench.agreement on the preset. A preset of random weights (no tokenizer, no text) says
    only how the numbers move, so it takes at most RANDOM_PROMPTS prompts and RANDOM_GEN_LEN
    positions each: TinyLlama's float32 reference decodes about 2 tokens/s here."""
    o = run.opts
    trained = model.preset == "smollm2"
    prompts = o.agreement_prompts if trained else min(o.agreement_prompts, RANDOM_PROMPTS)
    gen_len = o.agreement_gen_len if trained else min(o.agreement_gen_len, RANDOM_GEN_LEN)
    cmd = [
        sys.executable,
        "-m",
        "bench.agreement",
        "--model",
        str(model.path),
        "--weights",
        ",".join(kinds),
        "--prompts",
        str(prompts),
        "--prompt-len",
        str(o.agreement_prompt_len),
        "--gen-len",
        str(gen_len),
        "--ppl-tokens",
        str(o.agreement_ppl_tokens),
        "--threads",
        str(o.agreement_threads),
    ]
    run.log(f"agreement {model.preset}: {', '.join(kinds)} against float32")
    done = subprocess.run(cmd, capture_output=True, text=True, env=bench_env(), timeout=3600)
    if done.returncode != 0:
        run.log(f"  agreement failed: {done.stderr[-2000:]}")
        return None
    fig = json.loads(done.stdout.strip().splitlines()[-1])
    for kind, k in fig["kinds"].items():
        ppl = k["perplexity"]
        run.log(
            f"  {kind}: greedy agreement {k['greedy_agreement']:.3f}, logit error max "
            f"{k['max_abs_logit_error']:.3g} mean {k['mean_abs_logit_error']:.3g}"
            + (f", perplexity {ppl:.3f}" if ppl else "")
        )
    return fig


def _llamacpp(run, model: presets.Model) -> dict | None:
    o = run.opts
    ids = prompt(10_000, o.prompt_len, model.vocab_size)
    cmd = [
        str(o.llamacpp_python),
        str(LLAMACPP),
        "--model",
        str(model.path),
        "--threads",
        str(o.llamacpp_threads),
        "--prompt",
        ",".join(map(str, ids)),
        "--gen-len",
        str(o.gen_len),
    ]
    run.log(f"llama.cpp {model.preset}: {o.llamacpp_threads} threads, batch 1")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=bench_env(), timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        run.log(f"  llama.cpp did not run: {e}")
        return None
    if done.returncode != 0:
        run.log(f"  llama.cpp failed: {done.stderr[-2000:]}")
        return None
    fig = json.loads(done.stdout.strip().splitlines()[-1])
    run.log(f"  llama.cpp: {fig['tokens_per_s']:.1f} tokens/s (median of {len(fig['runs'])})")
    return fig
