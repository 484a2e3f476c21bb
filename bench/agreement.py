"""How far a model whose weights are held in another form (`--weights`) strays from the same
weights in float32: logit errors, greedy agreement, and perplexity on a shipped text.

Run as a subprocess (`python -m bench.agreement --model M --weights q4,int8 ...`), so that its
memory is its own; prints one JSON object. Each model is one whole-model shard built by
`stage.loading.load_shard`, the code a stage runs, in one process:

- prompts: `--prompts` windows of `--prompt-len` tokens of the shipped text (token ids drawn
  from the vocabulary for a model without a tokenizer);
- the float32 reference continues each prompt greedily for `--gen-len` tokens;
- each held form then reads the same prompt, and the continuation one decode step at a time
  (teacher forcing, on the path a stage decodes with: the block kernels quantize activations
  too), and at each continuation position its logits are compared with the reference's: the
  largest and the mean absolute error, and whether its greedy choice is the reference's
  (greedy agreement: the share of positions where it is);
- perplexity: the mean negative log-likelihood of the shipped text, in windows of
  `--window` tokens (prompt forwards: float activations against the held weights), up to
  `--ppl-tokens` tokens, exponentiated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

TEXT = Path(__file__).resolve().parent.parent / "stage" / "demo_corpus.txt"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.agreement", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default="bfloat16,int8,q4", help="comma-separated kinds")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from stage.checkpoint import open_checkpoint

    ckpt = open_checkpoint(args.model)
    text_ids = _text_ids(ckpt, args.model)
    prompts = _prompts(text_ids, int(ckpt.config.vocab_size), args.prompts, args.prompt_len)
    started = time.perf_counter()
    reference = _load(ckpt, "float32")
    sequences, ref_logits = [], []
    for prompt in prompts:
        seq, logits = greedy(reference, prompt, args.gen_len)
        sequences.append(seq)
        ref_logits.append(logits)
    out = {
        "model": str(args.model),
        "prompts": len(prompts),
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "text": TEXT.name,
        "text_tokens": len(text_ids),
        "reference": {
            "weights": "float32",
            "weight_bytes": reference.weight_bytes(),
            "perplexity": _perplexity(reference, text_ids, args.window, args.ppl_tokens),
        },
        "kinds": {},
    }
    del reference
    for kind in [k for k in args.weights.split(",") if k]:
        shard = _load(ckpt, kind)
        max_err = 0.0
        err_sum = 0.0
        count = agree = 0
        for seq, ref in zip(sequences, ref_logits, strict=True):
            logits = forced(shard, seq, args.prompt_len)
            diff = (logits - ref).abs()
            max_err = max(max_err, float(diff.max()))
            err_sum += float(diff.mean()) * diff.shape[0]
            agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            count += diff.shape[0]
        out["kinds"][kind] = {
            "weight_bytes": shard.weight_bytes(),
            "max_abs_logit_error": max_err,
            "mean_abs_logit_error": err_sum / count,
            "greedy_agreement": agree / count,
            "positions": count,
            "perplexity": _perplexity(shard, text_ids, args.window, args.ppl_tokens),
        }
        del shard
    out["elapsed_s"] = time.perf_counter() - started
    json.dump(out, sys.stdout)
    print()
    return 0


def _load(ckpt, kind: str):
    from stage.loading import load_shard

    return load_shard(ckpt, 0, ckpt.num_layers, weights=kind, row_kernel=False)


def _text_ids(ckpt, model: str) -> list[int]:
    """The shipped text in the model's tokens; [] for a model without a tokenizer."""
    text = TEXT.read_text()
    try:
        from transformers import AutoTokenizer

        source = Path(model)
        if source.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        else:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return []
    ids = tok(text, add_special_tokens=False)["input_ids"]
    vocab = int(ckpt.config.vocab_size)
    return [i for i in ids if i < vocab]


def _prompts(text_ids: list[int], vocab: int, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens: windows spread over the text, or seeded random ids."""
    if len(text_ids) >= length + count:
        stride = (len(text_ids) - length) // count
        return [text_ids[i * stride : i * stride + length] for i in range(count)]
    import torch

    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(count)]


def _all_logits(shard, ids: list[int]):
    import torch

    state = shard.new_cache()
    with torch.inference_mode():
        return shard.forward(torch.tensor([ids]), state, logits="all")[0].float()


def forced(shard, seq: list[int], prompt_len: int):
    """The logits `shard` gives at each continuation position of `seq`, run as a stage runs a
    request: the prompt in one forward, then one decode step per token (the block kernels'
    path, where activations are quantized too)."""
    import torch

    state = shard.new_cache()
    out = []
    with torch.inference_mode():
        logits = shard.forward(torch.tensor([seq[:prompt_len]]), state)[0, -1].float()
        for token in seq[prompt_len:]:
            out.append(logits)
            logits = shard.forward(torch.tensor([[token]]), state)[0, -1].float()
    return torch.stack(out)


def greedy(shard, prompt: list[int], gen_len: int):
    """The prompt continued greedily by `shard` (one position at a time, as a stage decodes),
    and the logits that chose each continuation token."""
    import torch

    state = shard.new_cache()
    seq = list(prompt)
    chosen = []
    with torch.inference_mode():
        logits = shard.forward(torch.tensor([seq]), state)[0, -1].float()
        for _ in range(gen_len):
            chosen.append(logits)
            token = int(logits.argmax())
            seq.append(token)
            logits = shard.forward(torch.tensor([[token]]), state)[0, -1].float()
    return seq, torch.stack(chosen)


def _perplexity(shard, ids: list[int], window: int, limit: int) -> float | None:
    """exp(mean negative log-likelihood) of the text, in windows; None without a tokenizer."""
    import torch

    ids = ids[:limit]
    if len(ids) < 2:
        return None
    nll, count = 0.0, 0
    for at in range(0, len(ids) - 1, window):
        chunk = ids[at : at + window + 1]
        if len(chunk) < 2:
            break
        logits = _all_logits(shard, chunk[:-1])
        target = torch.tensor(chunk[1:])
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        count += len(chunk) - 1
    return math.exp(nll / count)


if __name__ == "__main__":
    sys.exit(main())
