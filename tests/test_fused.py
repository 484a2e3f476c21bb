"""A single request's decode step on a CPU stage that holds blocks (stage/fused.py), and the
request caches that grow in place (adapters.GrowingLayer) that it writes into."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from stage import fused, quant
from stage.adapters import GrowingLayer, cache_nbytes
from stage.checkpoint import open_checkpoint
from stage.loading import load_shard
from tests.test_e2e import prompt_ids

needs_kernels = pytest.mark.skipif(
    not quant.integer_kernels(), reason="the fused step runs on the integer kernels (AVX2)"
)


def test_a_grown_cache_holds_what_concatenation_holds():
    """Through updates of 1 to 40 positions, crops (to no position too), transformers' batch
    methods and a reset, a GrowingLayer's keys and values equal transformers' DynamicLayer's,
    and what it returns is what it holds; the bytes it reports count its room."""
    g = torch.Generator().manual_seed(0)
    grown, plain = GrowingLayer(), DynamicLayer()
    for n in (5, 1, 1, 7, 1, 3, 1, 1, 2, 40, 1):
        k, v = torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
        got, want = grown.update(k, v), plain.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[0] is grown.keys and got[1] is grown.values
    buffers = grown._room
    assert grown.held_bytes() == sum(t.numel() * 4 for t in buffers) >= 2 * grown.keys.numel() * 4
    grown.crop(-4), plain.crop(-4)
    k, v = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
    assert torch.equal(grown.update(k, v)[0], plain.update(k, v)[0])
    assert grown._room is buffers  # a crop keeps the buffers: the next column overwrites
    grown.batch_repeat_interleave(3), plain.batch_repeat_interleave(3)
    k, v = torch.randn(3, 2, 1, 8, generator=g), torch.randn(3, 2, 1, 8, generator=g)
    got, want = grown.update(k, v), plain.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    (
        grown.batch_select_indices(torch.tensor([2, 0])),
        plain.batch_select_indices(torch.tensor([2, 0])),
    )
    k, v = torch.randn(2, 2, 2, 8, generator=g), torch.randn(2, 2, 2, 8, generator=g)
    got, want = grown.update(k, v), plain.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    length = grown.get_seq_length()
    grown.crop(-length), plain.crop(-length)  # down to no position at all
    assert grown.get_seq_length() == plain.get_seq_length() == 0
    k, v = torch.randn(2, 2, 3, 8, generator=g), torch.randn(2, 2, 3, 8, generator=g)
    got, want = grown.update(k, v), plain.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    grown.reset()
    assert grown.get_seq_length() == 0 and grown.held_bytes() == 0
    k, v = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 4, 8, generator=g)
    assert torch.equal(grown.update(k, v)[1], v)


def test_room_and_grown_add_one_position():
    """The fused step's way in: `room` gives numpy views with a free column at the length
    held, and `grown` makes that column part of the keys and values."""
    layer = GrowingLayer()
    keys, values, length = layer.room(2, 8)
    assert length == 0 and keys.shape[0] == 2 and keys.shape[2] == 8 and keys.shape[1] >= 1
    keys[:, 0], values[:, 0] = 1.0, 2.0
    layer.grown()
    assert layer.keys.shape == (1, 2, 1, 8) and bool((layer.keys == 1).all())
    for _ in range(100):  # past the first buffer's room: the layer moves to a larger one
        keys, values, length = layer.room(2, 8)
        keys[:, length], values[:, length] = float(length), -float(length)
        layer.grown()
    assert layer.keys.shape[2] == 101
    assert torch.equal(
        layer.keys[0, 1, :, 0], torch.tensor([1.0] + [float(i) for i in range(1, 101)])
    )
    assert cache_nbytes(type("C", (), {"layers": [layer]})()) == layer.held_bytes()
    layer.crop(-101)
    keys, values, length = layer.room(2, 8)
    assert length == 0
    keys[:, 0] = 5.0
    layer.grown()
    assert layer.keys.shape == (1, 2, 1, 8) and bool((layer.keys == 5).all())


@needs_kernels
def test_the_fused_kernels_compute_the_layers_float_math():
    """Norm, rotary with the cache write and attention, and the gated activation, against
    transformers' own functions in float64: float32 rounding apart, the same math."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, pos = 6, 2, 16, 9
    x = torch.randn(48, generator=g)
    norm = LlamaRMSNorm(48, eps=1e-5)
    norm.weight.data = torch.randn(48, generator=g)
    out = torch.empty(48)
    fused._rms_norm(x.numpy(), norm.weight.detach().numpy(), 1e-5, out.numpy())
    want = norm.double()(x.double())
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-6)

    gate_up = torch.randn(2 * 40, generator=g)
    act = torch.empty(40)
    fused._silu_mul(gate_up.numpy(), act.numpy())
    want = F.silu(gate_up[:40].double()) * gate_up[40:].double()
    assert torch.allclose(act.double(), want, rtol=1e-5, atol=1e-6)

    qkv = torch.randn((heads + 2 * kv_heads) * dim, generator=g)
    angles = torch.randn(dim // 2, generator=g) * 3
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)
    keys = torch.zeros(kv_heads, pos + 4, dim)
    values = torch.zeros(kv_heads, pos + 4, dim)
    keys[:, :pos], values[:, :pos] = torch.randn(2, kv_heads, pos, dim, generator=g)
    past_k, past_v = keys[:, :pos].clone(), values[:, :pos].clone()
    scaling = dim**-0.5
    out = torch.empty(heads * dim)
    fused._attend(
        qkv.numpy(),
        cos.numpy(),
        sin.numpy(),
        keys.numpy(),
        values.numpy(),
        pos,
        heads,
        scaling,
        out.numpy(),
    )

    q = qkv[: heads * dim].view(1, heads, 1, dim).double()
    k = qkv[heads * dim : (heads + kv_heads) * dim].view(1, kv_heads, 1, dim).double()
    v = qkv[(heads + kv_heads) * dim :].view(1, kv_heads, 1, dim).double()
    q, k = apply_rotary_pos_emb(q, k, cos.double()[None, None], sin.double()[None, None])
    all_k = torch.cat([past_k.double()[None], k], dim=2).repeat_interleave(heads // kv_heads, 1)
    all_v = torch.cat([past_v.double()[None], v], dim=2).repeat_interleave(heads // kv_heads, 1)
    want = F.scaled_dot_product_attention(q, all_k, all_v, scale=scaling).reshape(-1)
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)
    # The new position's key (rotated) and value were written at column `pos`, nothing after.
    assert torch.allclose(keys[:, pos].double(), k[0, :, 0], atol=1e-6)
    assert torch.equal(values[:, pos], v[0, :, 0].float())
    assert not keys[:, pos + 1 :].any() and not values[:, pos + 1 :].any()


@needs_kernels
@pytest.mark.parametrize("kind", ["q4", "int8"])
def test_a_fused_product_gives_the_modules_bits_in_the_same_bytes(checkpoints, monkeypatch, kind):
    """q, k and v (and gate and up) become one block matrix whose rows the modules now view:
    against the same shard loaded unfused, its product is the modules' own bit for bit, the
    shard holds the same bytes, and the modules compute what they computed before."""
    ckpt = open_checkpoint(checkpoints["llama"])
    shard = load_shard(ckpt, 0, 2, weights=kind)
    with monkeypatch.context() as m:
        m.setattr(fused, "fusable", lambda layer, kind: False)
        unfused = load_shard(ckpt, 0, 2, weights=kind)
    assert shard.fused is not None and unfused.fused is None
    assert shard.weight_bytes() == unfused.weight_bytes()
    x = torch.randn(1, 1, ckpt.config.hidden_size)
    groups = {
        "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
        "gate_up": ("mlp", ("gate_proj", "up_proj")),
    }
    for layer, plain in zip(shard.layers, unfused.layers, strict=True):
        for product_name, (owner, names) in groups.items():
            modules = [getattr(getattr(layer, owner), n) for n in names]
            plain_modules = [getattr(getattr(plain, owner), n) for n in names]
            with torch.inference_mode():
                want = torch.cat([mm(x) for mm in plain_modules], dim=-1).reshape(-1)
                again = torch.cat([mm(x) for mm in modules], dim=-1).reshape(-1)
            product = getattr(layer._fused, product_name)
            assert len(product.parts) == 1  # one kernel call
            assert torch.equal(torch.from_numpy(product(x.reshape(-1).numpy())), want)
            assert torch.equal(again, want)  # the modules compute from their views as before
            for name in ("codes", "scales", "offsets"):
                base = getattr(modules[0], name).untyped_storage().data_ptr()
                assert all(getattr(mm, name).untyped_storage().data_ptr() == base for mm in modules)


@needs_kernels
def test_only_llama_shaped_block_layers_are_fused(checkpoints):
    """Float stages stay on the modules (exact); so do families the fused step does not
    compute (sliding windows, per-head norms, other norms and MLPs). qwen2's full-attention
    layers are fused, its sliding ones not."""
    llama = open_checkpoint(checkpoints["llama"])
    assert load_shard(llama, 0, 2, weights="float32").fused is None
    assert load_shard(llama, 0, 2, weights="bfloat16").fused is None
    assert load_shard(llama, 0, 2, weights="q4").fused is not None
    qwen2 = open_checkpoint(checkpoints["qwen2"])  # layers 0 and 1 full, then sliding
    assert load_shard(qwen2, 0, 2, weights="q4").fused is not None
    assert load_shard(qwen2, 0, 3, weights="q4").fused is None
    for arch in ("mistral", "qwen3", "gemma", "phi3", "gpt2"):
        ckpt = open_checkpoint(checkpoints[arch])
        assert load_shard(ckpt, 0, ckpt.num_layers, weights="q4").fused is None, arch


CHUNK = 3


def _forced(shard, sequence: list[int], prompt_len: int, chunk_at: int | None = None):
    """What `shard` outputs (logits, or hidden states on a shard that is not the last) at
    each continuation position of `sequence`: the prompt in one forward, then one decode step
    per token, as a stage runs a request; from continuation position `chunk_at` on, CHUNK
    tokens in one forward (the modules' path), then single steps again."""
    state = shard.new_cache()
    out = []
    at = prompt_len
    with torch.inference_mode():
        y = shard.forward(torch.tensor([sequence[:at]]), state)[0, -1]
        while at < len(sequence):
            out.append(y)
            if at - prompt_len == chunk_at:
                ys = shard.forward(torch.tensor([sequence[at : at + CHUNK]]), state, logits="all")[
                    0
                ]
                out.extend(ys[:-1])
                y, at = ys[-1], at + CHUNK
            else:
                y = shard.forward(torch.tensor([sequence[at : at + 1]]), state)[0, -1]
                at += 1
    return torch.stack(out)


@needs_kernels
@pytest.mark.parametrize("kind", ["q4", "int8"])
@pytest.mark.parametrize(
    ("arch", "end", "seed"), [("llama", 5, 7), ("llama", 5, 31), ("qwen2", 2, 7)]
)
def test_a_fused_decode_is_as_accurate_as_the_modules(checkpoints, arch, end, seed, kind):
    """The same shard reads a sequence with the fused step and with its modules, each compared
    with float32 at every position: decode steps, then a 3-token chunk (the modules continue
    the cache the fused step wrote, and the other way round), then decode steps. Both take
    the same block products; the fused step only rounds its norms, rotary and attention in
    another order, which now and then moves one activation across an int8 rounding boundary
    of the block kernels (stage/quant.py: QUANTIZE_X), one code step among the thousands each
    product rounds. So its largest and mean errors must be those of the modules, to within a
    tenth. llama's whole model is compared by its logits, qwen2's first two layers (q, k and v
    with biases) by their hidden states."""
    ckpt = open_checkpoint(checkpoints[arch])
    shard = load_shard(ckpt, 0, end, weights=kind)
    reference = load_shard(ckpt, 0, end, weights="float32")
    prompt = prompt_ids(seed)
    sequence = list(prompt) + prompt_ids(seed + 1)[:12]
    ref = _forced(reference, sequence, len(prompt))
    fused_out = _forced(shard, sequence, len(prompt), chunk_at=4)
    assert shard.fused is not None and shard.layers[0].__dict__["_fused"] is shard.fused[0]
    kept, shard.fused = shard.fused, None
    module_out = _forced(shard, sequence, len(prompt), chunk_at=4)
    shard.fused = kept
    fused_error, module_error = (fused_out - ref).abs(), (module_out - ref).abs()
    assert float(module_error.max()) > 0  # the blocks do move the outputs
    assert float(fused_error.max()) <= 1.1 * float(module_error.max())
    assert float(fused_error.mean()) <= 1.1 * float(module_error.mean())
