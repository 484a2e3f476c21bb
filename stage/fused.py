"""A decoder layer's decode step in a handful of compiled calls, for CPU stages that hold their
matrices in blocks (`--weights int8|q4|native`).

Through transformers' modules a llama layer's step for one new position is about 80 torch
and Python calls: on SmolLM2 (576 wide, 30 layers) 0.8 ms a layer of which the seven block
products take about 0.3 ms, so Python and dispatch cost more than the weights. `FusedLayer`
runs the same layer as nine calls on float32 numpy arrays:

    norm -> q,k,v product -> rotary, cache write and attention -> o product, residual
         -> norm -> gate,up product -> silu(gate) * up -> down product, residual

- The q, k and v matrices, and the gate and up ones, are one block matrix each when they
  have the same bit width: their rows are concatenated once at load and each module's
  buffers become views of their part, so no byte is held twice and `Shard.weight_bytes`,
  the plan and the digests do not change.
- The products are `stage.quant`'s kernels, the same calls `QuantLinear` makes, so they give
  the same bits. Norms, rotary, attention and the activation are computed here in float32
  with another order of sums than torch's: a step agrees with the module path to float32
  rounding (tests/test_fused.py bounds it), which is far inside the blocks' own error. A
  stage holding its matrices in float32 or bfloat16 never takes this path: it stays exact.
- Keys and values go straight into the request cache's buffers (`adapters.GrowingLayer`), so
  the module path and this one continue each other's caches.

Only a single request's decode step (one row, one position) takes it: prompts and decode
batches go through the modules, whose batched products already amortize the calls.
`fused_layers` says which layers can: llama-shaped decoder layers (RMS norms, rotary,
full attention, SiLU-gated MLP) whose seven matrices are all held in blocks.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import nn

from stage import quant
from stage.quant import QuantLinear

# Decoder layers built the way `FusedLayer` computes: pre-norm (RMSNorm, `weight * x`), rotary
# on the first and second halves of each head (`rotate_half`), attention over every cached
# position with `self_attn.scaling`, and down(act(gate(x)) * up(x)) with act = SiLU. Qwen2
# adds biases to q, k and v, which the fused product adds too.
LAYERS = {
    "LlamaDecoderLayer": "LlamaRMSNorm",
    "MistralDecoderLayer": "MistralRMSNorm",
    "Qwen2DecoderLayer": "Qwen2RMSNorm",
}

_KERNEL = quant._KERNEL


@numba.njit("void(float32[::1], float32[::1], float32, float32[::1])", **_KERNEL)
def _rms_norm(x, weight, eps, out):
    total = np.float32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    scale = np.float32(1.0) / np.sqrt(total / np.float32(x.shape[0]) + eps)
    for i in range(x.shape[0]):
        out[i] = weight[i] * (x[i] * scale)


@numba.njit(
    "void(float32[::1], float32[::1], float32[::1], float32[:, :, ::1], float32[:, :, ::1],"
    " int64, int64, float32, float32[::1])",
    **_KERNEL,
)
def _attend(qkv, cos, sin, keys, values, pos, heads, scaling, out):
    """Rotary on q and k, k and v written at column `pos`, and each head's attention over
    columns [0, pos]. qkv holds heads * dim query values, then the key heads, then the value
    heads; keys and values are [kv_heads, capacity, dim]."""
    kv_heads, dim = keys.shape[0], keys.shape[2]
    half = dim // 2
    group = heads // kv_heads
    k_at = heads * dim
    v_at = k_at + kv_heads * dim
    for h in range(kv_heads):
        base = k_at + h * dim
        for i in range(half):
            a = qkv[base + i]
            b = qkv[base + half + i]
            keys[h, pos, i] = a * cos[i] - b * sin[i]
            keys[h, pos, half + i] = b * cos[half + i] + a * sin[half + i]
        for i in range(dim):
            values[h, pos, i] = qkv[v_at + h * dim + i]
    q = np.empty(dim, np.float32)
    scores = np.empty(pos + 1, np.float32)
    for h in range(heads):
        g = h // group
        base = h * dim
        for i in range(half):
            a = qkv[base + i]
            b = qkv[base + half + i]
            q[i] = a * cos[i] - b * sin[i]
            q[half + i] = b * cos[half + i] + a * sin[half + i]
        top = np.float32(-np.inf)
        for t in range(pos + 1):
            s = np.float32(0.0)
            for i in range(dim):
                s += q[i] * keys[g, t, i]
            s *= scaling
            scores[t] = s
            top = max(top, s)
        total = np.float32(0.0)
        for t in range(pos + 1):
            e = np.exp(scores[t] - top)
            scores[t] = e
            total += e
        inv = np.float32(1.0) / total
        for i in range(dim):
            out[base + i] = 0.0
        for t in range(pos + 1):
            p = scores[t] * inv
            for i in range(dim):
                out[base + i] += p * values[g, t, i]


@numba.njit("void(float32[::1], float32[::1])", **_KERNEL)
def _silu_mul(gate_up, out):
    n = out.shape[0]
    for i in range(n):
        g = gate_up[i]
        out[i] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[n + i]


class _Product:
    """Several QuantLinears of one input as one block matrix (one kernel call), or, when
    their bit widths differ, one call each."""

    def __init__(self, linears: list[QuantLinear]):
        self.bias = None
        if any(m.bias is not None for m in linears):
            self.bias = torch.cat(
                [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in linears]
            ).numpy()
        if len(linears) > 1 and len({m.bits for m in linears}) == 1:
            weights = [_share_rows(linears)]
        else:
            weights = [m.weight for m in linears]
        self.parts = [(quant.integer_kernel(w.bits), w.arrays, w.shape[0]) for w in weights]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x.reshape(1, -1)
        outs = []
        for kernel, arrays, rows in self.parts:
            out = np.empty((1, rows), np.float32)
            kernel(x, *arrays, out)
            outs.append(out)
        out = (outs[0] if len(outs) == 1 else np.concatenate(outs, axis=1)).reshape(-1)
        if self.bias is not None:
            out += self.bias
        return out


def _share_rows(linears: list[QuantLinear]) -> quant.QuantWeight:
    """The modules' blocks concatenated into one matrix, each module's buffers now views of
    its rows of it (the bytes held stay the same: the modules' own tensors are freed)."""
    whole = {}
    for name in ("codes", "scales", "offsets"):
        whole[name] = torch.cat([m._buffers[name] for m in linears])
        at = 0
        for m in linears:
            m._buffers[name] = whole[name][at : at + m.out_features]
            at += m.out_features
    for m in linears:
        m.__dict__.pop("_held", None)
        m.__dict__.pop("_args", None)
    rows = sum(m.out_features for m in linears)
    return quant.QuantWeight(
        linears[0].bits,
        whole["codes"],
        whole["scales"],
        whole["offsets"],
        (rows, linears[0].in_features),
    )


class FusedLayer:
    """One decoder layer's single-position step (see the module docstring)."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.heads = attn.config.num_attention_heads
        self.kv_heads = attn.config.num_key_value_heads
        self.dim = attn.head_dim
        self.scaling = float(attn.scaling)
        self.norms = [
            (norm.weight.detach().contiguous().numpy(), np.float32(norm.variance_epsilon))
            for norm in (layer.input_layernorm, layer.post_attention_layernorm)
        ]
        self.qkv = _Product([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = _Product([attn.o_proj])
        self.gate_up = _Product([mlp.gate_proj, mlp.up_proj])
        self.down = _Product([mlp.down_proj])
        self.intermediate = mlp.gate_proj.out_features

    def step(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, cache) -> None:
        """x [hidden] float32, updated in place; cos, sin [dim]; `cache` the layer's
        `GrowingLayer`, which gains this position."""
        h = np.empty_like(x)
        weight, eps = self.norms[0]
        _rms_norm(x, weight, eps, h)
        qkv = self.qkv(h)
        keys, values, pos = cache.room(self.kv_heads, self.dim)
        attended = np.empty(self.heads * self.dim, np.float32)
        _attend(qkv, cos, sin, keys, values, pos, self.heads, self.scaling, attended)
        cache.grown()
        x += self.o(attended)
        weight, eps = self.norms[1]
        _rms_norm(x, weight, eps, h)
        act = np.empty(self.intermediate, np.float32)
        _silu_mul(self.gate_up(h), act)
        x += self.down(act)


def fusable(layer: nn.Module, kind: str) -> bool:
    """Whether `FusedLayer` computes this layer: a listed class, full attention, SiLU, its
    seven matrices in blocks, and the integer kernels available on this CPU."""
    norm = LAYERS.get(type(layer).__name__)
    if norm is None or kind != "full_attention" or not quant.integer_kernels():
        return False
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return False
    linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(m, QuantLinear) for m in linears):
        return False
    if attn.o_proj.bias is not None or mlp.down_proj.bias is not None:
        return False
    if any(m.bias is not None for m in (mlp.gate_proj, mlp.up_proj)):
        return False
    if getattr(attn.config, "hidden_act", None) != "silu" or attn.head_dim % 2:
        return False
    # Mistral's own forward masks a window whenever its config has one, whatever `layer_types`
    # says; qwen2's names the layers that do (`kind`).
    if type(layer).__name__ == "MistralDecoderLayer" and attn.config.sliding_window is not None:
        return False
    return all(
        type(n).__name__ == norm for n in (layer.input_layernorm, layer.post_attention_layernorm)
    )


def fused_layers(layers: nn.ModuleList, kinds: tuple[str, ...]) -> list[FusedLayer] | None:
    """A FusedLayer for each layer, kept on the layer so that a reshard that keeps it keeps
    them; None unless every layer can be fused."""
    if not layers or not all(
        fusable(layer, kind) for layer, kind in zip(layers, kinds, strict=True)
    ):
        return None
    out = []
    for layer in layers:
        fused = layer.__dict__.get("_fused")
        if fused is None:
            fused = layer.__dict__["_fused"] = FusedLayer(layer)
        out.append(fused)
    return out


def active() -> bool:
    """Whether the fused step runs now: it is built on the integer kernels, and takes the
    modules' float path when activations are not quantized (`quant.QUANTIZE_X`)."""
    return quant.integer_kernels()


def run(fused: list[FusedLayer], hidden: torch.Tensor, rotary, cache) -> torch.Tensor:
    """One position through the shard's layers: hidden [1, 1, H] float32 in, a new tensor out."""
    x = hidden.detach().reshape(-1).to(torch.float32).numpy().copy()
    cos, sin = rotary
    cos = cos.reshape(-1).to(torch.float32).contiguous().numpy()
    sin = sin.reshape(-1).to(torch.float32).contiguous().numpy()
    if cos.shape[0] != fused[0].dim or sin.shape[0] != fused[0].dim:
        # The kernels index cos and sin by head dimension, unchecked (a partial rotary).
        raise ValueError(f"rotary of {cos.shape[0]} values for heads of {fused[0].dim}")
    for layer, layer_cache in zip(fused, cache.layers, strict=True):
        layer.step(x, cos, sin, layer_cache)
    return torch.from_numpy(x).view(1, 1, -1)
