"""The single-machine anchor: llama.cpp (through `llama-cpp-python`) on the same GGUF file.

Not a project dependency: run it with the Python of a virtual environment that has
`llama-cpp-python` (`python -m bench --llamacpp-python PATH`; docs/performance.md says how to
build one). It imports only the standard library and `llama_cpp`, and prints one JSON object:
batch-1 greedy decode of `--gen-len` tokens after the given prompt, `--repeats` times, each
from an empty cache, timed from the call to the last token (prefill included, as the
pipeline's batch-1 figure is).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/llamacpp.py", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", required=True, help="comma-separated token ids")
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    import llama_cpp

    prompt = [int(t) for t in args.prompt.split(",")]
    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=max(512, len(prompt) + args.gen_len + 8),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    runs = []
    tokens: list[int] = []
    for _ in range(args.repeats + 1):  # the first warms the caches and is not counted
        llm.reset()
        tokens = []
        t0 = time.perf_counter()
        first = None
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            if first is None:
                first = time.perf_counter() - t0
            tokens.append(int(token))
            if len(tokens) == args.gen_len:
                break
        total = time.perf_counter() - t0
        runs.append({"total_s": total, "ttft_s": first, "tokens_per_s": len(tokens) / total})
    runs = runs[1:]
    json.dump(
        {
            "llama_cpp_version": getattr(llama_cpp, "__version__", None),
            "threads": args.threads,
            "load_s": load_s,
            "runs": runs,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "token_ids": tokens,
        },
        sys.stdout,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
