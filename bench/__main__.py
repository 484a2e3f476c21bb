"""`python -m bench`: benchmark layerline against its baselines (docs/performance.md).

Examples:
  python -m bench --smoke --out /tmp/b                 # tiny, fast, checks the harness
  python -m bench --preset small --stages 3            # batch-1 vs monolithic generate + zmq floor
  python -m bench --concurrency 1,2,4,8,16 --rounds 3
  python -m bench --threads 1,2 --omp-wait-policy default,PASSIVE --rounds 3
  python -m bench --scenario broker-cpu,memory
  python -m bench --scenario curve,network --concurrency 1,16 --rounds 3   # network: root
  python -m bench --scenario weights --llamacpp-python /opt/llamacpp/bin/python
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.presets import PRESETS
from bench.run import DEFAULT_SCENARIOS, SCENARIOS, Options, execute
from broker.messages import COMPUTE_DTYPES

SMOKE = {
    "preset": "demo",
    "stages": (2,),
    "concurrency": (1, 2),
    "requests": 2,
    "prompt_len": 8,
    "gen_len": 8,
    "threads": (1,),
    "omp_wait_policy": ("PASSIVE",),
    "scenarios": SCENARIOS,
    "rounds": 1,
    "mono_repeats": 2,
    "zmq_iters": 300,
    "broker_payloads": (4 << 10, 64 << 10),
    "broker_seconds": 0.5,
    "broker_warmup_s": 0.3,
    "memory_preset": "demo",
    "memory_stages": 2,
    "long_prompt_len": 40,
    "long_streams": 2,
    "long_repeats": 2,
    "long_window_s": 1.5,
    "prefill_chunk": 16,
    "curve_concurrency": (1, 2),
    "network_delays_ms": (0, 5),
    "network_concurrency": (1, 2),
    "network_bandwidths_mbit": (10,),
    "network_bandwidth_concurrency": (1,),
    "network_gen_len": 8,
    "network_requests": 2,
    "gateway_preset": "demo",
    "gateway_concurrency": (1, 2),
    "gateway_gen_len": 8,
    "weights_presets": ("demo",),
    "weights_kinds": ("float32", "q4"),
    "weights_stages": 2,
    "weights_streams": 2,
    "weights_requests": 2,
    "agreement_prompts": 2,
    "agreement_prompt_len": 8,
    "agreement_gen_len": 4,
    "agreement_ppl_tokens": 64,
}


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: need positive integers")
    return values


def _delays(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ms") from None
    if not values or any(v < 0 or v > 1000 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: delays are 0 to 1000 ms")
    return values


def _policies(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in ("default", "PASSIVE", "ACTIVE")]
    if not values or bad:
        raise argparse.ArgumentTypeError("OpenMP wait policies are default, PASSIVE or ACTIVE")
    return values


def _presets(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in PRESETS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"presets are {', '.join(PRESETS)}; got {text!r}")
    return values


def _kinds(text: str) -> tuple[str, ...]:
    from common.weights import WEIGHT_KINDS

    values = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in values if v not in WEIGHT_KINDS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"--weights kinds are {', '.join(WEIGHT_KINDS)}")
    return values


def _scenarios(text: str) -> tuple[str, ...]:
    values = tuple(x.strip() for x in text.split(",") if x.strip())
    if "all" in values:
        return SCENARIOS
    bad = [v for v in values if v not in SCENARIOS]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"scenarios are {', '.join(SCENARIOS)} or all; got {', '.join(bad)}"
        )
    return values


def parse_args(argv: list[str] | None = None) -> tuple[Options, Path]:
    d = Options()
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=PRESETS, help=f"model (default {d.preset})")
    p.add_argument("--stages", type=_ints, help="stage counts, e.g. 1,2,3 (default 3)")
    p.add_argument(
        "--concurrency", type=_ints, help="concurrent streams, e.g. 1,2,4,8,16 (default 1)"
    )
    p.add_argument(
        "--requests",
        type=int,
        help=f"requests per concurrency level (default {d.requests}; "
        "at least C, and at least 2C when C > 1)",
    )
    p.add_argument("--prompt-len", type=int, help=f"prompt tokens (default {d.prompt_len})")
    p.add_argument(
        "--gen-len", type=int, help=f"generated tokens per request (default {d.gen_len})"
    )
    p.add_argument("--stream", action="store_true", default=None, help="consume tokens as a stream")
    p.add_argument(
        "--threads",
        type=_ints,
        help="torch threads per stage and for the baseline, list allowed "
        f"(default {','.join(map(str, d.threads))})",
    )
    p.add_argument(
        "--omp-wait-policy",
        type=_policies,
        help=f"OMP_WAIT_POLICY of every process, list allowed (default {','.join(d.omp_wait_policy)})",
    )
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, help="default float32")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default cpu")
    p.add_argument(
        "--scenario",
        type=_scenarios,
        dest="scenarios",
        help=f"comma list of {', '.join(SCENARIOS)}, or all (default {','.join(DEFAULT_SCENARIOS)})",
    )
    p.add_argument(
        "--rounds", type=int, help="repeat every configuration, interleaved; medians over rounds"
    )
    p.add_argument(
        "--mono-repeats", type=int, help=f"generate calls per batch size (default {d.mono_repeats})"
    )
    p.add_argument(
        "--broker-seconds",
        type=float,
        help=f"measured seconds per payload (default {d.broker_seconds})",
    )
    p.add_argument(
        "--long-prompt-len",
        type=int,
        help=f"prompt tokens of the long-prompt scenario (default {d.long_prompt_len})",
    )
    p.add_argument(
        "--long-streams",
        type=int,
        help=f"streams decoding beside the long prompt (default {d.long_streams})",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        help="the long-prompt scenario's client prefill chunk (default: the client's own)",
    )
    p.add_argument(
        "--memory-preset",
        choices=PRESETS,
        help=f"model of the memory scenario (default {d.memory_preset})",
    )
    p.add_argument(
        "--memory-stages",
        type=int,
        help=f"stages of the memory scenario (default {d.memory_stages})",
    )
    p.add_argument(
        "--curve-concurrency",
        type=_ints,
        help="streams of the curve scenario, with CURVE on and off "
        f"(default {','.join(map(str, d.curve_concurrency))})",
    )
    p.add_argument(
        "--network-delays",
        type=_delays,
        dest="network_delays_ms",
        help="one-way ms added on every hop, network scenario "
        f"(default {','.join(f'{x:g}' for x in d.network_delays_ms)})",
    )
    p.add_argument(
        "--network-concurrency",
        type=_ints,
        help=f"streams at each delay (default {','.join(map(str, d.network_concurrency))})",
    )
    p.add_argument(
        "--network-bandwidths",
        type=_ints,
        dest="network_bandwidths_mbit",
        help="Mbit/s of one stage host's link "
        f"(default {','.join(f'{x:g}' for x in d.network_bandwidths_mbit)})",
    )
    p.add_argument(
        "--network-bandwidth-concurrency",
        type=_ints,
        help="streams at each bandwidth "
        f"(default {','.join(map(str, d.network_bandwidth_concurrency))})",
    )
    p.add_argument(
        "--network-gen-len",
        type=int,
        help=f"generated tokens per request, network scenario (default {d.network_gen_len})",
    )
    p.add_argument(
        "--gateway-preset",
        choices=PRESETS,
        help=f"model of the gateway scenario, one with a tokenizer (default {d.gateway_preset})",
    )
    p.add_argument(
        "--gateway-concurrency",
        type=_ints,
        help="streaming requests at once, through the gateway and direct "
        f"(default {','.join(map(str, d.gateway_concurrency))})",
    )
    p.add_argument(
        "--gateway-gen-len",
        type=int,
        help=f"token cap per request, gateway scenario (default {d.gateway_gen_len})",
    )
    p.add_argument(
        "--weights-presets",
        type=_presets,
        help=f"models of the weights scenario (default {','.join(d.weights_presets)})",
    )
    p.add_argument(
        "--weights-kinds",
        type=_kinds,
        help="--weights of the weights scenario's stages "
        f"(default {','.join(d.weights_kinds)}; native only on a GGUF preset)",
    )
    p.add_argument(
        "--weights-streams",
        type=int,
        help=f"streams beside batch 1, weights scenario (default {d.weights_streams})",
    )
    p.add_argument(
        "--no-agreement",
        dest="weights_agreement",
        action="store_false",
        default=None,
        help="skip the agreement figures of the weights scenario",
    )
    p.add_argument(
        "--agreement-prompts",
        type=int,
        help=f"prompts of the agreement figures (default {d.agreement_prompts})",
    )
    p.add_argument(
        "--llamacpp-python",
        help="a Python with llama-cpp-python: llama.cpp on the same GGUF as the anchor",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="output directory (default %(default)s)",
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny and fast: demo preset, 2 stages, few tokens"
    )
    args = p.parse_args(argv)

    values = dict(SMOKE) if args.smoke else {}
    for key in (
        "preset",
        "stages",
        "concurrency",
        "requests",
        "prompt_len",
        "gen_len",
        "stream",
        "threads",
        "omp_wait_policy",
        "dtype",
        "device",
        "scenarios",
        "rounds",
        "mono_repeats",
        "broker_seconds",
        "long_prompt_len",
        "long_streams",
        "prefill_chunk",
        "memory_preset",
        "memory_stages",
        "curve_concurrency",
        "network_delays_ms",
        "network_concurrency",
        "network_bandwidths_mbit",
        "network_bandwidth_concurrency",
        "network_gen_len",
        "gateway_preset",
        "gateway_concurrency",
        "gateway_gen_len",
        "weights_presets",
        "weights_kinds",
        "weights_streams",
        "weights_agreement",
        "agreement_prompts",
        "llamacpp_python",
    ):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    for key in (
        "requests",
        "prompt_len",
        "gen_len",
        "rounds",
        "mono_repeats",
        "memory_stages",
        "long_prompt_len",
        "long_streams",
        "prefill_chunk",
        "network_gen_len",
        "gateway_gen_len",
        "weights_streams",
        "agreement_prompts",
    ):
        if key in values and values[key] < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if "gen_len" in values and values["gen_len"] < 2:
        p.error("--gen-len must be at least 2 (time per output token needs a decode step)")
    return Options(smoke=args.smoke, **values), args.out


def main(argv: list[str] | None = None) -> int:
    opts, out = parse_args(argv)
    from bench import report

    rep = execute(opts, out)
    stamp = rep.pop("_stamp")
    rep["plots"] = report.plots(rep, out, stamp)
    path = out / f"{stamp}.json"
    report.write_json(rep, path)
    print(report.text(rep))
    print(f"\nresults: {path}")
    for name, file in rep["plots"].items():
        print(f"plot {name}: {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
