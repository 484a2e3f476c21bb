"""A shard of k layers allocates only those k layers: peak RSS is its share plus a fixed overhead,
from safetensors and from GGUF files (dequantized a block of rows at a time)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.tiny_gguf import make_gguf

# Measured on a 2-core machine: loading adds about 18 MiB beyond the shard's weights from
# safetensors (the meta skeleton, safetensors handles, allocator slack), 9 MiB from GGUF. The bound leaves room for noise
# but stays far below one extra layer group of this checkpoint (6 x 16 MiB unowned layers).
FIXED_OVERHEAD_BYTES = 48 * 1024 * 1024

MEASURE = r"""
import json, sys
import torch, transformers, safetensors, gguf  # imported before the baseline is taken
import stage.kernels  # so is the row kernel: `python -m stage` imports it at start
from stage.loading import load_shard
from stage.checkpoint import open_checkpoint
ckpt = open_checkpoint(sys.argv[1])
def status(field):
    # VmHWM is this address space's peak; ru_maxrss would also count the parent's before exec.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
base = status("VmRSS")
assert status("VmHWM") - base < 8 * 2**20, "baseline must be taken at the peak so far"
shard = load_shard(ckpt, int(sys.argv[2]), int(sys.argv[3]))
# safetensors may hand out tensors over its file mapping; touching every weight makes the
# pages resident, as the first forward would.
for module in shard.modules():
    for p in module.parameters():
        p.sum()
peak = status("VmHWM")
print(json.dumps({"base": base, "peak": peak, "weights": shard.weight_bytes()}))
"""


def _layer_heavy_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def layer_heavy_checkpoints(tmp_path_factory):
    """The same layer-heavy llama as a safetensors directory and as Q8_0 and Q4_1 GGUF files."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("heavy")
    LlamaForCausalLM(_layer_heavy_config()).save_pretrained(directory, max_shard_size="40MB")
    out = {"safetensors": directory}
    for quant in ("Q8_0", "Q4_1"):
        path = tmp_path_factory.mktemp("heavy-gguf") / f"heavy-{quant}.gguf"
        out[quant] = make_gguf("llama", path, quant, config=_layer_heavy_config())
    return out


def _measure(checkpoint, start, end) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(checkpoint), str(start), str(end)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "kind,start,end",
    [
        ("safetensors", 2, 4),
        ("safetensors", 0, 2),
        ("safetensors", 6, 8),
        ("Q8_0", 2, 4),
        ("Q4_1", 0, 2),
        ("Q4_1", 6, 8),
    ],
)
def test_peak_memory_is_share_plus_fixed_overhead(layer_heavy_checkpoints, kind, start, end):
    m = _measure(layer_heavy_checkpoints[kind], start, end)
    layer_bytes = 4 * 512 * 512 * 4 + 3 * 512 * 2048 * 4  # attention + MLP, fp32
    assert m["weights"] >= 2 * layer_bytes
    grown = m["peak"] - m["base"]
    assert grown <= m["weights"] + FIXED_OVERHEAD_BYTES, (
        f"loading layers [{start},{end}) of the {kind} checkpoint grew RSS by "
        f"{grown / 2**20:.1f} MiB for {m['weights'] / 2**20:.1f} MiB of weights"
    )
