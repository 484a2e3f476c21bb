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

pytestmark = pytest.mark.skipif(
    not quant.integer_kernels(), reason="the fused step runs on the integer kernels (AVX2)"
)


def test_a_grown_cache_holds_what_concatenation_holds():
    """Through updates of 1 to 7 positions, a crop and a batch selection, a GrowingLayer's
    keys and values equal transformers' DynamicLayer's, and what it returns is what it holds;
    the bytes it reports count its room."""
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
    grown.batch_repeat_interleave(2), plain.batch_repeat_interleave(2)
    k, v = torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g)
    got, want = grown.update(k, v), plain.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


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


@pytest.mark.parametrize("kind", ["q4", "int8"])
def test_a_fused_product_gives_the_modules_bits_in_the_same_bytes(checkpoints, kind):
    """q, k and v (and gate and up) become one block matrix whose rows the modules now view:
    the product is the modules' own, bit for bit, and the shard holds the same bytes."""
    path = checkpoints["llama"]
    ckpt = open_checkpoint(path)
    plain = load_shard(ckpt, 0, 2, weights=kind)
    plain_bytes = plain.weight_bytes()
    attn = plain.layers[0].self_attn
    x = torch.randn(1, 1, attn.q_proj.in_features)
    with torch.inference_mode():
        want = torch.cat([m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], dim=-1)
    assert plain.fused is not None
    product = plain.fused[0].qkv
    assert len(product.parts) == 1  # one kernel call
    got = torch.from_numpy(product(x.reshape(-1).numpy()))
    assert torch.equal(got, want.reshape(-1))
    storage = attn.q_proj.codes.untyped_storage().data_ptr()
    assert all(m.codes.untyped_storage().data_ptr() == storage for m in (attn.k_proj, attn.v_proj))
    assert plain.weight_bytes() == plain_bytes
    with torch.inference_mode():  # the modules still compute from their views
        again = torch.cat([m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], dim=-1)
    assert torch.equal(again, want)


def test_only_llama_shaped_block_layers_are_fused(checkpoints):
    """Float stages stay on the modules (exact); so do families the fused step does not
    compute (sliding windows, per-head norms, other norms and MLPs)."""
    llama = open_checkpoint(checkpoints["llama"])
    assert load_shard(llama, 0, 2, weights="float32").fused is None
    assert load_shard(llama, 0, 2, weights="bfloat16").fused is None
    assert load_shard(llama, 0, 2, weights="q4").fused is not None
    for arch in ("mistral", "qwen3", "gemma", "phi3", "gpt2"):
        ckpt = open_checkpoint(checkpoints[arch])
        assert load_shard(ckpt, 0, ckpt.num_layers, weights="q4").fused is None, arch


def _forced(shard, sequence: list[int], prompt_len: int) -> torch.Tensor:
    """The logits `shard` gives at each continuation position of `sequence`: the prompt in
    one forward, then one decode step per token, as a stage runs a request."""
    state = shard.new_cache()
    out = []
    with torch.inference_mode():
        logits = shard.forward(torch.tensor([sequence[:prompt_len]]), state)[0, -1]
        for token in sequence[prompt_len:]:
            out.append(logits)
            logits = shard.forward(torch.tensor([[token]]), state)[0, -1]
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["q4", "int8"])
@pytest.mark.parametrize("seed", [7, 31])
def test_a_fused_decode_is_as_accurate_as_the_modules(checkpoints, kind, seed):
    """The same shard reads float32's greedy continuation of a prompt, with the fused step and
    with its modules, and each is compared with float32 at every position. Both take the same
    block products; the fused step only rounds its norms, rotary and attention in another
    order, which now and then moves one activation across an int8 rounding boundary of the
    block kernels (stage/quant.py: QUANTIZE_X), one code step among the thousands each
    product rounds. So its largest and mean logit errors must be those of the modules, to
    within a tenth; the fused step must also have run."""
    ckpt = open_checkpoint(checkpoints["llama"])
    shard = load_shard(ckpt, 0, ckpt.num_layers, weights=kind)
    reference = load_shard(ckpt, 0, ckpt.num_layers, weights="float32")
    prompt = prompt_ids(seed)
    state = reference.new_cache()
    sequence = list(prompt)
    with torch.inference_mode():
        logits = reference.forward(torch.tensor([prompt]), state)[0, -1]
        for _ in range(12):
            sequence.append(int(logits.argmax()))
            logits = reference.forward(torch.tensor([sequence[-1:]]), state)[0, -1]
        ref = _forced(reference, sequence, len(prompt))
    fused_logits = _forced(shard, sequence, len(prompt))
    assert shard.fused is not None and shard.layers[0].__dict__["_fused"] is shard.fused[0]
    kept, shard.fused = shard.fused, None
    module_logits = _forced(shard, sequence, len(prompt))
    shard.fused = kept
    fused_error, module_error = (fused_logits - ref).abs(), (module_logits - ref).abs()
    assert float(module_error.max()) > 0  # the blocks do move the logits
    assert float(fused_error.max()) <= 1.1 * float(module_error.max())
    assert float(fused_error.mean()) <= 1.1 * float(module_error.mean())
