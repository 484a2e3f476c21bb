"""stage/quant.py: the block format, lossless GGUF conversion, and the products on blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from torch import nn
from transformers.pytorch_utils import Conv1D

from common.weights import BLOCK, quantized_bytes
from stage import quant
from stage.quant import (
    KERNEL_ROWS,
    QuantEmbedding,
    QuantLinear,
    QuantWeight,
    from_gguf,
    matmul,
    quantize,
)

# float32 unit roundoff.
U = 2.0**-24


def _random(out: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, width, generator=torch.Generator().manual_seed(seed))


# --- GGUF blocks, bit for bit ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_blocks_that_gguf_writes_convert_bit_exact(name):
    kind = GGMLQuantizationType[name]
    weights = np.random.default_rng(1).standard_normal((48, 320)).astype(np.float32)
    weights[3] = 0.25  # a constant row: scale 0 in every format with one
    raw = gguf_quantize(weights, kind)
    got = from_gguf(raw, name, (48, 320))
    assert got is not None
    assert got.bits == (4 if name in ("Q4_0", "Q4_1") else 8)
    assert torch.equal(got.dequantize(), torch.from_numpy(gguf_dequantize(raw, kind)))


def _random_k_blocks(kind: GGMLQuantizationType, count: int) -> np.ndarray:
    """Random K-quant super-blocks: every byte random except d and dmin, which get finite
    float16 values (any bytes there may be inf or NaN, which no file holds)."""
    size = {"Q4_K": 144, "Q5_K": 176}[kind.name]
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (count, size), dtype=np.uint8)
    scales = (rng.standard_normal((count, 2)) * 0.01).astype(np.float16)
    raw[:, :4] = scales.view(np.uint8)
    return raw


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
def test_gguf_k_quant_blocks_convert_bit_exact(name):
    # gguf-py cannot quantize K-quants, so the blocks are random bytes read by its dequantizer.
    kind = GGMLQuantizationType[name]
    out, width = 6, 512
    raw = _random_k_blocks(kind, out * width // 256).reshape(out, -1)
    got = from_gguf(raw, name, (out, width))
    assert got is not None
    assert got.bits == (4 if name == "Q4_K" else 8)
    assert torch.equal(got.dequantize(), torch.from_numpy(gguf_dequantize(raw, kind)))


def test_gguf_types_without_an_exact_block_format_are_declined():
    raw = np.zeros(210 * 2, dtype=np.uint8)
    assert from_gguf(raw, "Q6_K", (2, 256)) is None


def test_dequantize_of_a_row_range_is_those_rows():
    w = quantize(_random(40, 64), 4)
    assert torch.equal(w.dequantize(7, 19), w.dequantize()[7:19])


def test_select_rows_permutes_the_blocks_with_the_rows():
    for bits in (4, 8):
        w = quantize(_random(24, 96), bits)
        index = torch.randperm(24, generator=torch.Generator().manual_seed(3))
        picked = w.select_rows(index)
        assert picked.shape == (24, 96)
        assert torch.equal(picked.dequantize(), w.dequantize()[index])


# --- quantize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_error_is_half_a_step(bits):
    # Rounding to the nearest code leaves at most half a step (scale / 2) per weight: 4 bits
    # span min..max in 15 steps; 8 bits span -absmax..absmax in steps of absmax / 127 with no
    # clipping. On top of that come a few float32 roundings, of (w - min) / scale and of
    # scale * code + offset, each at most U times the largest magnitude in the block.
    w = _random(300, 256) * torch.logspace(-3, 2, 300)[:, None]
    q = quantize(w, bits)
    err = (q.dequantize() - w).abs().view(300, -1, BLOCK)
    magnitude = w.abs().view(300, -1, BLOCK).amax(dim=2)
    bound = q.scales / 2 + 8 * U * magnitude
    assert (err.amax(dim=2) <= bound).all()
    if bits == 8:
        assert (q.offsets == 0).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_constant_and_zero_blocks_come_back_exactly(bits):
    w = torch.zeros(3, 64)
    w[0] = 0.3
    w[1, :32] = -7.5
    q = quantize(w, bits)
    if bits == 4:
        assert torch.equal(q.dequantize(), w)
    else:
        # Symmetric 8 bits holds a constant c as 127 * (c / 127), exact only up to a rounding.
        assert torch.allclose(q.dequantize(), w, rtol=4 * U, atol=0)
        assert torch.equal(q.dequantize()[2], w[2])


@pytest.mark.parametrize("bits", [4, 8])
def test_nbytes_is_what_the_broker_plans(bits):
    q = quantize(_random(50, 160), bits)
    assert q.nbytes() == quantized_bytes(50, 160, bits)
    assert q.codes.shape == (50, 5, 16 if bits == 4 else 32)
    assert q.codes.dtype == (torch.uint8 if bits == 4 else torch.int8)


# --- matmul ------------------------------------------------------------------------------------


@pytest.fixture
def float_x(monkeypatch):
    """Products on x as given (float kernels), not on x quantized per block to int8."""
    monkeypatch.setattr(quant, "QUANTIZE_X", False)


def _summation_bound(x: torch.Tensor, q: QuantWeight) -> torch.Tensor:
    """Worst-case float32 error between matmul and x @ dequantize().T, per output.

    The kernel sums n = in products scale * code * x and n products offset * x per output
    (grouped per block); the reference sums n products of w = scale * code + offset, rounded
    once. Any order of a float32 sum of n products is within (n + 2) U of the exact sum times
    the sum of the terms' magnitudes (Higham, Accuracy and Stability, 3.1), and the rounding of
    w adds U |w| |x| per term. Terms are bounded by (|scale * code| + |offset|) |x|, so both
    sides are within (n + 3) U * sum of that, and their difference within twice it.
    """
    width = q.shape[1]
    codes = q.dequantize().double()  # only to recover |scale * code| below
    offsets = q.offsets.double().repeat_interleave(BLOCK, dim=1)
    magnitude = (codes - offsets).abs() + offsets.abs()
    return 2 * (width + 3) * U * (x.double().abs() @ magnitude.T)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 17, 64])
@pytest.mark.parametrize("shape", [(96, 256), (7, 32), (130, 96)])
@pytest.mark.parametrize("kernel_rows", [quant.KERNEL_ROWS, 64])
def test_matmul_matches_the_dequantized_product(
    bits, rows, shape, kernel_rows, monkeypatch, float_x
):
    # kernel_rows 64 sends every batch through the block kernels, tiles never.
    monkeypatch.setattr(quant, "KERNEL_ROWS", kernel_rows)
    out, width = shape
    q = quantize(_random(out, width, seed=rows), bits)
    x = _random(rows, width, seed=100 + rows)
    bias = _random(1, out, seed=7)[0]
    got = matmul(x, q, bias)
    want = x @ q.dequantize().T + bias
    assert got.shape == (rows, out) and got.dtype == torch.float32
    bound = _summation_bound(x, q) + 2 * U * bias.abs().double()
    assert ((got.double() - want.double()).abs() <= bound).all()


def test_matmul_on_gguf_blocks_matches_gguf(float_x):
    raw = _random_k_blocks(GGMLQuantizationType.Q4_K, 10 * 2).reshape(10, -1)
    q = from_gguf(raw, "Q4_K", (10, 512))
    x = _random(1, 512)
    want = x @ torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType.Q4_K)).T
    assert ((matmul(x, q) - want).double().abs() <= _summation_bound(x, q)).all()


def _x_quantization_bound(x: torch.Tensor, q: QuantWeight) -> torch.Tensor:
    """What quantizing x per block to int8 adds to the error of matmul, per output.

    x_e is replaced by dx * qx_e with dx = fl(top / 127), qx_e = rint(fl(x_e * fl(127 / top))),
    top = max |x| over the block. The two roundings inside rint move x_e * 127 / top by at most
    2.01 U * 127, and that of dx moves dx * qx_e by at most U * 128 * top / 127, so
    |x_e - dx * qx_e| <= dx (1/2 + 400 U). Only scale * code meets qx (the offsets meet the
    float block sums of x), so the product moves by at most sum_e |scale * code_e| dx (1/2 + 400 U)
    = Q. The float sum of the quantized terms is larger by at most Q than the one
    _summation_bound counts, which adds (n + 3) U Q.
    """
    width = q.shape[1]
    top = x.double().abs().view(x.shape[0], -1, BLOCK).amax(dim=2)
    dx = (top / 127).repeat_interleave(BLOCK, dim=1)
    offsets = q.offsets.double().repeat_interleave(BLOCK, dim=1)
    scaled_codes = (q.dequantize().double() - offsets).abs()
    return (dx * (0.5 + 400 * U)) @ scaled_codes.T * (1 + (width + 3) * U)


@pytest.mark.skipif(not quant._INTEGER_KERNELS, reason="integer kernels need AVX2")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(96, 256), (7, 32), (130, 96)])
def test_matmul_on_quantized_x_is_within_the_derived_bound(bits, rows, shape):
    out, width = shape
    q = quantize(_random(out, width, seed=rows), bits)
    # Blocks of x from 1e-3 to 1e2, and one block of zeros (dx 0).
    x = _random(rows, width, seed=200 + rows) * torch.logspace(-3, 2, width)
    x[:, BLOCK : 2 * BLOCK] = 0
    bias = _random(1, out, seed=7)[0]
    got = matmul(x, q, bias)
    want = x @ q.dequantize().T + bias
    bound = _summation_bound(x, q) + _x_quantization_bound(x, q) + 2 * U * bias.abs().double()
    assert ((got.double() - want.double()).abs() <= bound).all()


@pytest.mark.skipif(not quant._INTEGER_KERNELS, reason="integer kernels need AVX2")
@pytest.mark.parametrize("name", ["Q4_0", "Q8_0"])
def test_matmul_on_quantized_x_and_gguf_blocks(name, monkeypatch):
    kind = GGMLQuantizationType[name]
    raw = gguf_quantize(_random(40, 512).numpy(), kind)
    q = from_gguf(raw, name, (40, 512))
    x = _random(2, 512, seed=9)
    got = matmul(x, q)
    want = x @ torch.from_numpy(gguf_dequantize(raw, kind)).T
    bound = _summation_bound(x, q) + _x_quantization_bound(x, q)
    assert ((got - want).double().abs() <= bound).all()
    # The bound is not met by accident: the float kernels give another result.
    monkeypatch.setattr(quant, "QUANTIZE_X", False)
    assert not torch.equal(got, matmul(x, q))


def _peak_rss_growth(fn) -> int:
    """Bytes the process's peak resident set grows by while fn runs (Linux: clear_refs 5
    resets the peak)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    def hwm() -> int:
        with open("/proc/self/status") as f:
            line = next(s for s in f if s.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    before = hwm()
    fn()
    return hwm() - before


@pytest.mark.parametrize("bits", [4, 8])
def test_products_build_no_float_copy_of_the_weight(bits):
    # A [4096, 8192] float32 copy is 128 MiB; the blocks are 25 or 41 MiB. Built from random
    # codes, so no float matrix ever exists in this test.
    out, width = 4096, 8192
    g = torch.Generator().manual_seed(5)
    nb = width // BLOCK
    if bits == 4:
        codes = torch.randint(0, 256, (out, nb, 16), dtype=torch.uint8, generator=g)
    else:
        codes = torch.randint(-127, 128, (out, nb, 32), dtype=torch.int8, generator=g)
    q = QuantWeight(
        bits, codes, torch.rand(out, nb, generator=g), torch.zeros(out, nb), (out, width)
    )
    copy = out * width * 4
    # The measure can fail: dequantizing the matrix shows up as the copy it is.
    assert _peak_rss_growth(q.dequantize) > copy * 0.9
    # Beyond KERNEL_ROWS, one tile of rows is dequantized at a time.
    for rows in (1, 2, KERNEL_ROWS, KERNEL_ROWS + 1, 64):
        x = _random(rows, width)
        assert _peak_rss_growth(lambda x=x: matmul(x, q)) < copy / 8


# --- modules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_takes_batched_sequences(bits):
    linear = nn.Linear(64, 48)
    layer = QuantLinear.from_linear(linear, bits)
    assert (layer.in_features, layer.out_features) == (64, 48)
    assert {"codes", "scales", "offsets", "bias"} <= set(layer.state_dict())
    for n in (1, 9):
        x = _random(2 * n, 64).view(2, n, 64)
        got = layer(x)
        assert got.shape == (2, n, 48)
        want = matmul(x.reshape(-1, 64), layer.weight, linear.bias.detach()).view(2, n, 48)
        assert torch.equal(got, want)


def test_quant_linear_from_gpt2_conv1d_transposes(float_x):
    conv = Conv1D(48, 64)  # nf=out, nx=in; weight is [in, out]
    nn.init.normal_(conv.weight)
    layer = QuantLinear.from_conv1d(conv, 8)
    assert (layer.in_features, layer.out_features) == (64, 48)
    x = _random(3, 64)
    want = conv(x)
    got = layer(x)
    # Only the 8-bit rounding separates them: |err| <= sum_k (scale_k / 2) |x_k| per output.
    step = layer.scales.repeat_interleave(BLOCK, dim=1) / 2
    assert ((got - want).abs() <= x.abs() @ step.T + 1e-4).all()
    assert layer.to(torch.float32) is layer


@pytest.mark.parametrize("bits", [4, 8])
def test_quant_embedding_dequantizes_exactly_the_rows(bits):
    q = quantize(_random(100, 64), bits)
    emb = QuantEmbedding(q)
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (100, 64, None)
    ids = torch.tensor([[3, 99, 0], [3, 3, 42]])
    got = emb(ids)
    assert got.shape == (2, 3, 64)
    assert torch.equal(got, q.dequantize()[ids])
