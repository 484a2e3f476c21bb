"""Baseline: transformers' own greedy `generate` of the whole model in one process.

Run as a subprocess (`python -m bench.monolithic ...`) so that its torch thread pool, its
OpenMP wait policy and its memory are its own, like one stage's. Prints one JSON object.
For batch size B it generates for prompts 0..B-1 at once, left-padded (the prompts have
equal lengths, so the padding is empty, but the mask is built as for ragged prompts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.monolithic", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--gen-len", type=int, required=True)
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import torch

    # Same budget as a stage process (stage/__main__.py does the same two calls).
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from bench.workload import prompt
    from tensorframes import TORCH_DTYPES

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dtype = TORCH_DTYPES[args.dtype]
    started = time.perf_counter()
    # A GGUF file loads through transformers' own GGUF loader, dequantized as a stage does.
    source = Path(args.model)
    where = {"gguf_file": source.name} if source.suffix == ".gguf" else {}
    directory = source.parent if where else source
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **where)
    model = model.to(args.device).eval()
    load_s = time.perf_counter() - started
    model.generation_config.eos_token_id = None  # exactly gen-len tokens, as the pipeline runs
    model.generation_config.pad_token_id = 0
    vocab = int(model.config.vocab_size)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def batch_inputs(b: int) -> dict:
        prompts = [prompt(i, args.prompt_len, vocab) for i in range(b)]
        width = max(len(x) for x in prompts)
        ids = torch.zeros((b, width), dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for row, x in enumerate(prompts):  # left padding: the newest token is last in every row
            ids[row, width - len(x) :] = torch.tensor(x)
            mask[row, width - len(x) :] = 1
        return {"input_ids": ids.to(args.device), "attention_mask": mask.to(args.device)}

    def timed(inputs: dict, new: int) -> tuple[float, torch.Tensor]:
        sync()
        t0 = time.perf_counter()
        out = model.generate(**inputs, do_sample=False, max_new_tokens=new, min_new_tokens=new)
        sync()
        return time.perf_counter() - t0, out

    results = []
    with torch.inference_mode():
        for b in [int(x) for x in args.batch.split(",")]:
            inputs = batch_inputs(b)
            timed(inputs, min(4, args.gen_len))  # warm-up: first-call allocations and dispatch
            ttft = [timed(inputs, 1)[0] for _ in range(args.repeats)]
            walls, tokens = [], None
            for _ in range(args.repeats):
                wall, out = timed(inputs, args.gen_len)
                walls.append(wall)
                tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
            wall = statistics.median(walls)
            results.append(
                {
                    "batch": b,
                    "wall_s": walls,
                    "ttft_s": statistics.median(ttft),
                    "tokens_per_s": b * args.gen_len / wall,
                    "tokens_per_s_runs": [b * args.gen_len / w for w in walls],
                    "time_per_token_s": (wall - statistics.median(ttft)) / max(1, args.gen_len - 1),
                    "token_ids": tokens,
                }
            )
    print(
        json.dumps(
            {
                "threads": args.threads,
                "dtype": args.dtype,
                "device": args.device,
                "load_s": load_s,
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
