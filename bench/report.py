"""What a run leaves behind: a table on the terminal, a JSON file with every figure, PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

# Stage parts of the per-token latency, then the parts outside any stage, in stacking order.
STAGE_PARTS = (
    ("compute_s", "compute", "#4c72b0"),
    ("queue_s", "stage queue", "#dd8452"),
    ("transfer_s", "transfer (wire + broker + stage I/O)", "#55a868"),
)
OTHER_PARTS = (
    ("broker_queue", "broker queue", "#c44e52"),
    ("client_broker_legs", "client<->broker legs", "#8172b3"),
    ("sampling", "client sampling", "#937860"),
)


def _ms(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.2f}"


def _us(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e6:.0f}"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def text(rep: dict) -> str:
    parts = []
    m = rep["model"]
    parts.append(
        f"model {m['preset']}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['params'] / 1e6:.1f} M params; machine: {rep['machine']['cpu_model']}, "
        f"{rep['machine']['cores']} cores"
    )
    if rep["summary"]:
        rows = [
            [
                str(s["stages"]),
                str(s["threads"]),
                s["omp_wait_policy"],
                str(s["concurrency"]),
                str(s["rounds"]),
                _num(s["tokens_per_s"]),
                _num(s["monolithic_tokens_per_s"]),
                _num(s["ratio_to_monolithic"], ".3f"),
                _ms(s["ttft_p50_s"]),
                _ms(s["tpot_p50_s"]),
                _ms(s["tpot_p99_s"]),
                _us(s["transfer_p50_s"]),
                _us(s["floor_one_way_s"]),
                _us(s["broker_hop_s"]),
                _num(s["transfer_ratio"], ".2f"),
                _num(s["broker_messages_per_s"], ".0f"),
                _num(s["broker_cpu_us_per_message"], ".0f"),
            ]
            for s in rep["summary"]
        ]
        parts.append("\npipeline (medians over rounds; tok/s: C=1 median request, C>1 aggregate)")
        parts.append(
            _table(
                [
                    "stages",
                    "thr",
                    "omp",
                    "C",
                    "rnd",
                    "tok/s",
                    "mono",
                    "ratio",
                    "TTFT ms",
                    "TPOT p50",
                    "TPOT p99",
                    "hop us",
                    "floor us",
                    "fake hop us",
                    "hop/floor",
                    "brk msg/s",
                    "brk us/msg",
                ],
                rows,
            )
        )
        parts.append("\nper-token latency breakdown, decode (ms, mean; representative round)")
        for s in rep["summary"]:
            rec = rep["pipeline"][s["representative"]]
            b = rec["breakdown"]
            stages = "  ".join(
                f"{st['stage']}[{st['start']},{st['end']}) c={_ms(st['compute_s'])} "
                f"q={_ms(st['queue_s'])} t={_ms(st['transfer_s'])}"
                for st in b["stages"]
            )
            pt = b["per_token_s"]
            parts.append(
                f"  {s['stages']}st t{s['threads']} {s['omp_wait_policy']} C={s['concurrency']}: "
                f"latency {_ms(pt['latency'])} = {stages}  broker-queue={_ms(pt['broker_queue'])} "
                f"legs={_ms(pt['client_broker_legs'])}; sampling {_ms(pt['sampling'])}"
            )
        seen = set()
        for s in rep["summary"]:
            key = (s["stages"], s["threads"], s["omp_wait_policy"])
            if key in seen:
                continue
            seen.add(key)
            rec = rep["pipeline"][s["representative"]]
            peaks = " ".join(
                f"{r['stage']}={(r['peak_rss_bytes'] or 0) / 2**20:.0f}"
                for r in rec.get("stage_memory", [])
            )
            parts.append(
                f"  stage peak RSS, MiB ({s['stages']}st t{s['threads']} {s['omp_wait_policy']}): {peaks}"
            )
    bc = rep.get("broker_cpu")
    if bc:
        rows = [
            [
                f"{p['payload_bytes'] >> 10} KiB",
                _num(p["messages_per_s"], ".0f"),
                _num(p["us_per_message"]),
                _num(p["main_thread_us_per_message"]),
                _num(p["cpu_utilisation"], ".2f"),
            ]
            for p in bc["points"]
        ]
        parts.append(
            f"\nbroker CPU with {bc['stages']} fake stages, {bc['inflight']} requests in flight "
            f"(errors: {bc['error_count']})"
        )
        parts.append(_table(["payload", "msg/s", "us/msg", "main-thread us/msg", "cpu util"], rows))
    mem = rep.get("memory")
    if mem:
        rows = [
            [
                r["stage"],
                f"[{r['start']},{r['end']})",
                f"{r['share_bytes'] / 2**20:.0f}",
                f"{r.get('runtime_bytes', 0) / 2**20:.0f}",
                f"{r.get('code_bytes', 0) / 2**20:.0f}",
                f"{(r['peak_rss_bytes'] or 0) / 2**20:.0f}",
                f"{r['limit_bytes'] / 2**20:.0f}",
                "yes" if r["met"] else "NO",
            ]
            for r in mem["stages"]
        ]
        parts.append(f"\nstage memory, {mem['preset']} (MiB)")
        parts.append(
            _table(
                [
                    "stage",
                    "layers",
                    "share",
                    "runtime",
                    "code mapped since",
                    "peak RSS",
                    "limit",
                    "met",
                ],
                rows,
            )
        )
    if rep.get("long_prompt"):
        rows = [
            [
                str(r["round"] + 1),
                str(r["stages"]),
                str(r["prompt_len"]),
                str(r["streams"]),
                str(r["prefill_chunk"] or "default"),
                _ms(statistics.median(r["idle_ttft_s"])),
                _ms(statistics.median(r["loaded_ttft_s"])),
                _num(r["ttft_ratio"], ".2f"),
                _ms(r["others_tpot_s"]["baseline"]["p99"]),
                _ms(r["others_tpot_s"]["during"]["p99"]),
                _num(r["others_p99_ratio"], ".2f"),
            ]
            for r in rep["long_prompt"]
        ]
        parts.append("\nlong prompt beside decoding streams (ms; TTFT medians, others' p99)")
        parts.append(
            _table(
                [
                    "rnd",
                    "stages",
                    "prompt",
                    "streams",
                    "chunk",
                    "TTFT idle",
                    "TTFT loaded",
                    "ratio",
                    "others p99 base",
                    "during",
                    "ratio",
                ],
                rows,
            )
        )
    if rep.get("curve"):
        rows = [
            [
                str(r["round"] + 1),
                "on" if r["curve"] else "off",
                str(r["concurrency"]),
                _num(r["tokens_per_s"]),
                _ms(r["tpot_s"]["p50"]),
                _us(r["hop_s"]["p50"]),
                f"{r['foreign_cpu_share']:.0%}" if r.get("foreign_cpu_share") is not None else "-",
            ]
            for r in sorted(rep["curve"], key=lambda r: (r["round"], r["concurrency"], r["curve"]))
        ]
        parts.append("\nCURVE on and off, loopback (tokens/s; per hop: all but compute, p50)")
        parts.append(
            _table(
                ["rnd", "CURVE", "streams", "tokens/s", "TPOT p50", "per hop", "other load"], rows
            )
        )
    for net in rep.get("network", []):
        if "skipped" in net:
            parts.append(f"\nnetwork round {net['round'] + 1}: skipped ({net['skipped']})")
            continue
        rows = [
            [
                _num(r["delay_ms"], "g"),
                "-" if r["bandwidth_mbit"] is None else _num(r["bandwidth_mbit"], "g"),
                str(r["concurrency"]),
                _num(r["tokens_per_s"]),
                _ms(r["ttft_s"]["p50"]),
                _ms(r["tpot_s"]["p50"]),
                _ms(r["relay_late_p50_s"]),
            ]
            for r in net["records"]
        ]
        limited = net["limited_host"]["stage"]
        parts.append(
            f"\nnetwork round {net['round'] + 1}: {net['stages']} stage hosts, CURVE, a delaying "
            f"relay on every hop; bandwidth: {limited}'s link; same output: {net['same_output']}"
        )
        parts.append(
            _table(
                ["delay ms", "Mbit/s", "streams", "tokens/s", "TTFT p50", "TPOT p50", "relay late"],
                rows,
            )
        )
    for gw in rep.get("gateway", []):
        rows = [
            [
                str(p["concurrency"]),
                _num(p["direct"]["tokens_per_s"]),
                _num(p["gateway"]["tokens_per_s"]),
                _num(p["throughput_ratio"], ".3f"),
                _ms(p["direct"]["ttft_p50_s"]),
                _ms(p["gateway"]["ttft_p50_s"]),
                "yes" if p["same_output"] else "NO",
            ]
            for p in gw["phases"]
        ]
        parts.append(
            f"\ngateway round {gw['round'] + 1}: {gw['preset']}, streaming; the openai SDK "
            "through the gateway vs AsyncClient (tokens/s; TTFT p50 ms)"
        )
        parts.append(
            _table(
                ["streams", "direct", "gateway", "ratio", "TTFT direct", "gateway", "same"],
                rows,
            )
        )
    parts += _weights_text(rep.get("weights"))
    if rep["targets"]:
        parts.append("\ntargets")
        parts.append(
            _table(
                ["target", "config", "figure", "limit", "met"],
                [
                    [
                        t["target"],
                        t["config"],
                        _num(t["figure"], ".3f"),
                        _num(t["limit"], ".2f"),
                        "yes" if t["met"] else "NO",
                    ]
                    for t in rep["targets"]
                ],
            )
        )
    return "\n".join(parts)


def _weights_text(result: dict | None) -> list[str]:
    """One table per preset: speed and memory of each --weights kind; then its agreement."""
    parts: list[str] = []
    for entry in (result or {}).get("presets", []):
        from bench.run import decode_rate, llamacpp_decode_rate

        rows = []
        for r in entry["records"]:
            one, many = r["phases"].get(1), r["phases"].get(max(r["phases"]))
            mem = r["stage_memory"]
            rows.append(
                [
                    r["weights"],
                    _num(decode_rate(r)),
                    _ms(one["ttft_p50_s"] if one else None),
                    _num(many["tokens_per_s"] if many else None),
                    " / ".join(f"{m['share_bytes'] / 2**20:.0f}" for m in mem),
                    " / ".join(f"{m['held_ratio']:.3f}" for m in mem),
                    " / ".join(f"{(m['peak_rss_bytes'] or 0) / 2**20:.0f}" for m in mem),
                ]
            )
        anchor = entry.get("llamacpp")
        if anchor:
            ttft = statistics.median(r["ttft_s"] for r in anchor["runs"])
            rows.append(
                ["llama.cpp", _num(llamacpp_decode_rate(anchor)), _ms(ttft), "", "", "", ""]
            )
        streams = max((max(r["phases"]) for r in entry["records"]), default=1)
        parts.append(
            f"\nweights {entry['preset']}: batch-1 decode tokens/s (1 / median time per output token), TTFT p50 ms, {streams} streams "
            "tokens/s, each stage's weights (MiB), their share of float32, peak RSS (MiB)"
        )
        parts.append(
            _table(
                [
                    "weights",
                    "batch 1",
                    "TTFT",
                    f"{streams} streams",
                    "weights MiB",
                    "x float32",
                    "peak RSS",
                ],
                rows,
            )
        )
        agreement = entry.get("agreement")
        if agreement:
            ref = agreement["reference"]
            rows = [
                [
                    "float32",
                    "",
                    "",
                    "",
                    _num(ref["perplexity"], ".3f") if ref["perplexity"] else "",
                ]
            ]
            for kind, k in agreement["kinds"].items():
                rows.append(
                    [
                        kind,
                        _num(k["max_abs_logit_error"], ".4f"),
                        _num(k["mean_abs_logit_error"], ".5f"),
                        _num(k["greedy_agreement"], ".3f"),
                        _num(k["perplexity"], ".3f") if k["perplexity"] else "",
                    ]
                )
            parts.append(
                f"agreement with float32 over {agreement['prompts']} prompts of "
                f"{agreement['prompt_len']} tokens, {agreement['gen_len']} greedy positions each"
            )
            parts.append(
                _table(
                    ["weights", "max |logit err|", "mean", "greedy agreement", "perplexity"],
                    rows,
                )
            )
    return parts


def write_json(rep: dict, path: Path) -> None:
    def clean(x):
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(rep), indent=1))


def plots(rep: dict, out: Path, stamp: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, str] = {}
    if rep["summary"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines: dict[tuple, list] = {}
        for s in rep["summary"]:
            lines.setdefault((s["stages"], s["threads"], s["omp_wait_policy"]), []).append(s)
        for (stages, threads, omp), pts in lines.items():
            pts = sorted(pts, key=lambda s: s["concurrency"])
            ax.plot(
                [p["concurrency"] for p in pts],
                [p["tokens_per_s"] for p in pts],
                marker="o",
                label=f"layerline {stages} stages, {threads} thr, OMP {omp}",
            )
        mono: dict[tuple, dict[int, list[float]]] = {}
        for m in rep["monolithic"]:
            mono.setdefault((m["threads"], m["omp_wait_policy"]), {}).setdefault(
                m["batch"], []
            ).append(m["tokens_per_s"])
        for (threads, omp), by_batch in mono.items():
            xs = sorted(by_batch)
            ys = [sorted(by_batch[x])[(len(by_batch[x]) - 1) // 2] for x in xs]
            ax.plot(
                xs,
                ys,
                linestyle="--",
                marker="s",
                label=f"monolithic generate, {threads} thr, OMP {omp}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams (monolithic: batch size)")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_title(f"Throughput vs concurrency ({rep['model']['preset']})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files["throughput"] = _save(fig, out / f"{stamp}-throughput.png", plt)

        groups = [s for s in rep["summary"]]
        cols = min(3, len(groups))
        rows = math.ceil(len(groups) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
        for ax, s in zip(axes.flat, groups, strict=False):
            b = rep["pipeline"][s["representative"]]["breakdown"]
            names = [st["stage"] for st in b["stages"]] + ["outside\nstages"]
            bottom = [0.0] * len(names)
            for key, label, color in STAGE_PARTS:
                vals = [_finite(st[key]) * 1e3 for st in b["stages"]] + [0.0]
                ax.bar(names, vals, bottom=bottom, label=label, color=color)
                bottom = [a + v for a, v in zip(bottom, vals, strict=True)]
            for key, label, color in OTHER_PARTS:
                vals = [0.0] * len(b["stages"]) + [_finite(b["per_token_s"][key]) * 1e3]
                ax.bar(names, vals, bottom=bottom, label=label, color=color)
                bottom = [a + v for a, v in zip(bottom, vals, strict=True)]
            ax.set_title(
                f"{s['stages']} stages, {s['threads']} thr, OMP {s['omp_wait_policy']}, C={s['concurrency']}",
                fontsize=8,
            )
            ax.set_ylabel("ms per decode token (mean)")
        for ax in list(axes.flat)[len(groups) :]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        files["breakdown"] = _save(fig, out / f"{stamp}-breakdown.png", plt)

    bc = rep.get("broker_cpu")
    if bc and bc["points"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [p["payload_bytes"] for p in bc["points"]]
        ax.plot(
            xs,
            [p["us_per_message"] for p in bc["points"]],
            marker="o",
            label="broker process (all threads)",
        )
        ax.plot(
            xs,
            [p["main_thread_us_per_message"] for p in bc["points"]],
            marker="s",
            label="broker main thread (Python loop)",
        )
        ax.axhline(50, color="gray", linestyle=":", label="target 50 us")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("payload per message (bytes)")
        ax.set_ylabel("CPU us per forwarded message")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files["broker_cpu"] = _save(fig, out / f"{stamp}-broker-cpu.png", plt)
    nets = [n for n in rep.get("network", []) if n.get("records")]
    if nets:
        files["network"] = _network_plot(nets, out / f"{stamp}-network.png", plt)
    weights = (rep.get("weights") or {}).get("presets")
    if weights:
        files["weights"] = _weights_plot(weights, out / f"{stamp}-weights.png", plt)
    return files


def _weights_plot(entries: list[dict], path: Path, plt) -> str:
    """Per preset and --weights kind: batch-1 decode speed and the weights' bytes, each
    against float32 stages in the same run; llama.cpp's speed where it was measured."""
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    kinds = ("float32", "bfloat16", "int8", "q4", "native", "llama.cpp")
    width = 0.8 / len(entries)
    for i, entry in enumerate(entries):
        by_kind = {r["weights"]: r for r in entry["records"]}
        plain = by_kind.get("float32")
        if plain is None:
            continue
        from bench.run import decode_rate, llamacpp_decode_rate

        base = decode_rate(plain)
        base_bytes = sum(m["share_bytes"] for m in plain["stage_memory"])
        xs, ys, ms = [], [], []
        for j, kind in enumerate(kinds):
            if kind == "llama.cpp":
                anchor = entry.get("llamacpp")
                if anchor:
                    xs.append(j)
                    ys.append(llamacpp_decode_rate(anchor) / base)
                    ms.append(float("nan"))
                continue
            rec = by_kind.get(kind)
            if rec is None:
                continue
            xs.append(j)
            ys.append(decode_rate(rec) / base)
            ms.append(sum(m["share_bytes"] for m in rec["stage_memory"]) / base_bytes)
        at = [x + (i - (len(entries) - 1) / 2) * width for x in xs]
        speed.bar(at, ys, width, label=entry["preset"])
        memory.bar(at, ms, width, label=entry["preset"])
    for ax, label in (
        (speed, "batch-1 tokens/s / float32 stages'"),
        (memory, "weights held / float32's"),
    ):
        ax.set_xticks(range(len(kinds)), kinds, fontsize=8)
        ax.set_ylabel(label)
        ax.axhline(1.0, color="gray", linestyle=":")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    speed.set_title("decode speed, 3 stages (llama.cpp: one process)", fontsize=9)
    memory.set_title("memory of the weights, all stages", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, plt)


def _network_plot(nets: list[dict], path: Path, plt) -> str:
    """Tokens/s against the one-way delay per hop, and against one link's bandwidth: one line
    per stream count, medians over rounds."""
    fig, (by_delay, by_rate) = plt.subplots(1, 2, figsize=(10, 4))
    points: dict[tuple, dict[float, list[float]]] = {}
    for net in nets:
        for r in net["records"]:
            kind = "delay" if r["bandwidth_mbit"] is None else "rate"
            x = r["delay_ms"] if kind == "delay" else r["bandwidth_mbit"]
            points.setdefault((kind, r["concurrency"]), {}).setdefault(x, []).append(
                r["tokens_per_s"]
            )
    for (kind, c), by_x in sorted(points.items()):
        xs = sorted(by_x)
        ax = by_delay if kind == "delay" else by_rate
        ax.plot(
            xs,
            [statistics.median(by_x[x]) for x in xs],
            marker="o",
            label=f"{c} stream{'s' if c > 1 else ''}",
        )
    by_delay.set_xlabel("one-way delay added on every hop (ms)")
    by_rate.set_xlabel(f"bandwidth of {nets[0]['limited_host']['stage']}'s link (Mbit/s)")
    by_rate.set_xscale("log")
    for ax in (by_delay, by_rate):
        ax.set_ylabel("aggregate tokens/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{nets[0]['preset']}, {nets[0]['stages']} stage hosts, CURVE")
    fig.tight_layout()
    return _save(fig, path, plt)


def _finite(x: float | None) -> float:
    return 0.0 if x is None or math.isnan(x) else x


def _save(fig, path: Path, plt) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
