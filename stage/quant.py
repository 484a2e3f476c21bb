"""Weight matrices held in blocks of quantized codes (common/weights.py fixes the format), and
CPU products that read the blocks directly.

A block is BLOCK consecutive weights of a row with a float32 scale and offset: w = scale * code
+ offset. 4-bit codes are unsigned and packed as GGUF's Q4_0 packs them (byte i: element i in
the low nibble, element i + 16 in the high one); 8-bit codes are signed, one per byte.

`matmul` takes small decode batches (up to KERNEL_ROWS rows) through numba kernels that stream
each block once and build no float copy of the weight: on AVX2 they quantize x per block to
int8 and sum in integers (QUANTIZE_X), otherwise they multiply floats. Larger batches dequantize
a tile of output rows at a time into one scratch buffer and hand it to BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import llvmlite.binding
import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic
from torch import nn

from common.weights import BLOCK

# Batches of at most this many rows take the block kernels; larger ones dequantize tiles for
# BLAS, which amortizes the dequantization over the rows. Measured single-thread on 5632x2048,
# 2048x5632 and 576x1536, both bit widths: the kernels won at 2 and 4 rows on every shape, the
# tiles at 8 and 16 (e.g. q8 5632x2048: 5.4 against 7.1 ms at 4 rows, 10.2 against 8.3 at 8).
KERNEL_ROWS = 4
# Output rows dequantized per tile for BLAS: a [TILE_ROWS, in] float32 scratch stays within L2
# for in up to ~2K and keeps the per-tile `mm` large enough to run at BLAS speed.
TILE_ROWS = 256
# Small batches quantize x per block to int8 (x ~ dx * qx, dx = max|x| / 127, as llama.cpp's
# Q8_0 activations) and sum code * qx in integers: 5-8x faster than float products on SmolLM2's
# shapes (576 x 576: 0.15 against 0.025 ms). It adds at most dx / 2 per element of x to the
# error; False takes the float kernels, which are within float32 rounding of x @ w.T.
QUANTIZE_X = True
# The integer kernels are built from AVX2 instructions (vpmaddubsw, vpmaddwd); numba compiles for
# the host CPU unless NUMBA_CPU_NAME says otherwise.
_INTEGER_KERNELS = numba.config.CPU_NAME is None and llvmlite.binding.get_host_cpu_features().get(
    "avx2", False
)
# Rows quantized at a time, so `quantize` holds at most this many float32 rows of temporaries.
QUANTIZE_ROWS = 1024
_HALF = BLOCK // 2


@dataclass
class QuantWeight:
    """A [out, in] matrix in blocks: codes [out, in // BLOCK, 16 or 32], scales and offsets
    float32 [out, in // BLOCK]."""

    bits: int
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, int]

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """codes, scales and offsets as numpy views, for the kernels: `Tensor.numpy` costs ~2 us
        a call, a third of a 576 x 576 product."""
        return self.codes.numpy(), self.scales.numpy(), self.offsets.numpy()

    def nbytes(self) -> int:
        return (
            self.codes.numel() * self.codes.element_size()
            + self.scales.numel() * 4
            + self.offsets.numel() * 4
        )

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start..stop of the matrix as float32 [stop - start, in]."""
        stop = self.shape[0] if stop is None else stop
        out = torch.empty(max(stop - start, 0), self.shape[1], dtype=torch.float32)
        if out.shape[0]:
            _dequantize_into(self, start, stop, out)
        return out

    def select_rows(self, index: torch.Tensor) -> QuantWeight:
        """The matrix of rows `index` (a permutation or a selection), blocks copied unchanged."""
        return QuantWeight(
            self.bits,
            self.codes[index].contiguous(),
            self.scales[index].contiguous(),
            self.offsets[index].contiguous(),
            (int(index.numel()), self.shape[1]),
        )


def quantize(weight: torch.Tensor, bits: int) -> QuantWeight:
    """Blocks of a float [out, in] matrix: 4 bits asymmetric (min..max in 15 steps), 8 bits
    symmetric (absmax / 127, offset 0)."""
    if bits not in (4, 8):
        raise ValueError(f"quantize: bits must be 4 or 8, not {bits}")
    out_rows, width = weight.shape
    if width % BLOCK:
        raise ValueError(f"quantize: rows of {width} weights are not a multiple of {BLOCK}")
    blocks = width // BLOCK
    codes = torch.empty(
        out_rows,
        blocks,
        BLOCK * bits // 8,
        dtype=torch.uint8 if bits == 4 else torch.int8,
    )
    scales = torch.empty(out_rows, blocks, dtype=torch.float32)
    offsets = torch.empty(out_rows, blocks, dtype=torch.float32)
    for start in range(0, out_rows, QUANTIZE_ROWS):
        stop = min(start + QUANTIZE_ROWS, out_rows)
        w = weight[start:stop].detach().to(torch.float32).reshape(stop - start, blocks, BLOCK)
        if bits == 4:
            low = w.amin(dim=2)
            scale = (w.amax(dim=2) - low) / 15
            # A constant block has scale 0: its codes are 0 and its offset is the value itself.
            inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
            q = ((w - low[..., None]) * inv[..., None]).round_().clamp_(0, 15).to(torch.uint8)
            codes[start:stop] = q[..., :_HALF] | (q[..., _HALF:] << 4)
            offsets[start:stop] = low
        else:
            scale = w.abs().amax(dim=2) / 127
            inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
            codes[start:stop] = (w * inv[..., None]).round_().clamp_(-127, 127).to(torch.int8)
            offsets[start:stop] = 0
        scales[start:stop] = scale
    return QuantWeight(bits, codes, scales, offsets, (out_rows, width))


def from_gguf(raw: np.ndarray, ggml_type_name: str, shape: tuple[int, int]) -> QuantWeight | None:
    """A GGUF tensor's blocks (its bytes as stored) as a QuantWeight, without loss; None for a
    type that no block format here holds exactly."""
    convert = _FROM_GGUF.get(ggml_type_name)
    if convert is None:
        return None
    out_rows, width = shape
    if width % BLOCK:
        raise ValueError(f"from_gguf: rows of {width} weights are not a multiple of {BLOCK}")
    bits, codes, scales, offsets = convert(np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    return QuantWeight(
        bits,
        torch.from_numpy(np.ascontiguousarray(codes).reshape(out_rows, width // BLOCK, -1)),
        torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(out_rows, -1)),
        torch.from_numpy(np.ascontiguousarray(offsets, dtype=np.float32).reshape(out_rows, -1)),
        (out_rows, width),
    )


def _f16(b: np.ndarray) -> np.ndarray:
    """Two-byte columns as float16 -> float32, one value per block."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32).reshape(-1)


def _low_high(qs: np.ndarray) -> np.ndarray:
    """Nibbles of [n, 16] bytes in GGUF order: element i low nibble, i + 16 high -> [n, 32]."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits_of(qh: np.ndarray, count: int) -> np.ndarray:
    """Bit i (little-endian, i < count) of each row of bytes qh, as uint8 [n, count]."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[:, :count]


def _q8_0(raw):
    b = raw.reshape(-1, 34)
    return 8, b[:, 2:].view(np.int8), _f16(b[:, :2]), np.zeros(len(b), np.float32)


def _q4_0(raw):
    b = raw.reshape(-1, 18)
    d = _f16(b[:, :2])
    # d * (q - 8) == d * q + (-8 d) exactly: d has 11 significant bits and q 4, so both products
    # and their sum are exact in float32.
    return 4, b[:, 2:], d, -8 * d


def _q4_1(raw):
    b = raw.reshape(-1, 20)
    return 4, b[:, 4:], _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    return _low_high(qs) | (_bits_of(qh, BLOCK) << 4)


def _q5_0(raw):
    b = raw.reshape(-1, 22)
    q = _q5_codes(b[:, 2:6], b[:, 6:]).astype(np.int8) - np.int8(16)
    return 8, q, _f16(b[:, :2]), np.zeros(len(b), np.float32)


def _q5_1(raw):
    b = raw.reshape(-1, 24)
    q = _q5_codes(b[:, 4:8], b[:, 8:]).astype(np.int8)
    return 8, q, _f16(b[:, :2]), _f16(b[:, 2:4])


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block scale d * sc and offset -(dmin * m) of K-quant super-blocks [n, 8]."""
    n = len(b)
    d = _f16(b[:, :2]).reshape(n, 1)
    dmin = _f16(b[:, 2:4]).reshape(n, 1)
    s = b[:, 4:16].reshape(n, 3, 4)
    lo, mn, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
    m = np.concatenate([mn & 0x3F, (hi >> 4) | ((mn >> 2) & 0x30)], axis=-1)
    # gguf computes d * sc and d * q - dmin * m; a + (-b) is a - b exactly.
    return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """K-quant 4-bit codes [n, 128] bytes -> [n, 8, 32]: byte chunk j holds sub-block 2j in its
    low nibbles and 2j + 1 in its high ones."""
    qs = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (qs & 0x0F).reshape(-1, 8, 32)


def _q4_k(raw):
    b = raw.reshape(-1, 144)
    scales, offsets = _k_scales(b)
    q = _k_nibbles(b[:, 16:]).reshape(-1, BLOCK)
    return 4, q[:, :_HALF] | (q[:, _HALF:] << 4), scales, offsets


def _q5_k(raw):
    b = raw.reshape(-1, 176)
    scales, offsets = _k_scales(b)
    high = np.unpackbits(b[:, 16:48].reshape(-1, 32, 1), axis=-1, bitorder="little")
    q = _k_nibbles(b[:, 48:]) | (high.transpose(0, 2, 1) << 4)
    return 8, q.reshape(-1, BLOCK).astype(np.int8), scales, offsets


_FROM_GGUF = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
}


# Dequantization is compiled without fastmath: scale * code + offset must round twice, as
# gguf's numpy does, so that GGUF blocks dequantize bit for bit (a fused multiply-add would not).
# The block loops run to a length read from the array, not a literal 16 or 32: with a literal,
# LLVM unrolls them and vectorizes across blocks with scattered stores (0.37 ms against 0.23 ms
# per 256 rows of 2048 weights, 4 bits).
_DEQUANTIZE = dict(cache=True, nogil=True, boundscheck=False)


@numba.njit(
    "void(uint8[:, :, ::1], float32[:, ::1], float32[:, ::1], int64, float32[:, ::1])",
    **_DEQUANTIZE,
)
def _dequantize4(codes, scales, offsets, start, out):
    half = codes.shape[2]
    for r in range(out.shape[0]):
        j = start + r
        cj = codes[j]
        row = out[r]
        for b in range(codes.shape[1]):
            s = scales[j, b]
            o = offsets[j, b]
            cb = cj[b]
            lo = row[b * 32 : b * 32 + 16]
            hi = row[b * 32 + 16 : b * 32 + 32]
            for i in range(half):
                c = cb[i]
                lo[i] = s * np.float32(np.uint8(c & np.uint8(15))) + o
                hi[i] = s * np.float32(np.uint8(c >> np.uint8(4))) + o


@numba.njit(
    "void(int8[:, :, ::1], float32[:, ::1], float32[:, ::1], int64, float32[:, ::1])",
    **_DEQUANTIZE,
)
def _dequantize8(codes, scales, offsets, start, out):
    width = codes.shape[2]
    for r in range(out.shape[0]):
        j = start + r
        cj = codes[j]
        row = out[r]
        for b in range(codes.shape[1]):
            s = scales[j, b]
            o = offsets[j, b]
            cb = cj[b]
            block = row[b * 32 : b * 32 + 32]
            for i in range(width):
                block[i] = s * np.float32(cb[i]) + o


def _dequantize_into(w: QuantWeight, start: int, stop: int, out: torch.Tensor) -> None:
    kernel = _dequantize4 if w.bits == 4 else _dequantize8
    kernel(w.codes.numpy(), w.scales.numpy(), w.offsets.numpy(), start, out[: stop - start].numpy())


_KERNEL = dict(cache=True, nogil=True, boundscheck=False, fastmath={"reassoc", "contract"})
_WORDS_SIG = (
    "void(float32[:, ::1], float32[:, :, ::1], float32[:, ::1], uint8[:, :, ::1], int32[:, ::1],"
    " float32[:, ::1], float32[:, ::1], float32[:, ::1])"
)

# The word kernels take x transposed per block, xt[r, e, b] = x[r, b * BLOCK + e], and the
# codes as little-endian 32-bit words, so that the innermost loop runs over blocks: each SIMD
# lane holds one block, every load is contiguous, and a block's sum needs no horizontal add.
# Looping over a block's 16 bytes instead left LLVM either gathering x across blocks or
# reducing 16 lanes per block (2.0-2.8 ms against 1.7-2.0 ms for 4 bits, 5632 x 2048, batch 1).


@numba.njit("float32(uint8[::1], float32[::1], int64, int64)", **_KERNEL)
def _q4_block(cb, xr, b, half):
    """Sum of code * x over one block, along its bytes: for the last nb % 8 blocks, which the
    block-lane loop would run one scalar lane at a time (200 against 150 us at 1536 x 576)."""
    xl = xr[b * 32 : b * 32 + 16]
    xh = xr[b * 32 + 16 : b * 32 + 32]
    a = np.float32(0.0)
    for i in range(half):
        c = cb[i]
        lo = np.float32(np.uint8(c & np.uint8(15)))
        hi = np.float32(np.uint8(c >> np.uint8(4)))
        a += lo * xl[i] + hi * xh[i]
    return a


@numba.njit(_WORDS_SIG, **_KERNEL)
def _q4_one(x, xt, xsum, codes, words, scales, offsets, out):
    nb = scales.shape[1]
    main = nb - nb % 8
    half = codes.shape[2]
    x0 = xt[0]
    for j in range(words.shape[0]):
        cw = words[j]
        sj = scales[j]
        oj = offsets[j]
        t = np.float32(0.0)
        for b in range(main):
            a = np.float32(0.0)
            for k in range(4):
                w = np.int32(cw[b * 4 + k])
                for q in range(4):
                    e = k * 4 + q
                    lo = np.float32(np.int32((w >> np.int32(8 * q)) & np.int32(15)))
                    hi = np.float32(np.int32((w >> np.int32(8 * q + 4)) & np.int32(15)))
                    a += lo * x0[e, b] + hi * x0[16 + e, b]
            t += sj[b] * a + oj[b] * xsum[0, b]
        for b in range(main, nb):
            t += sj[b] * _q4_block(codes[j, b], x[0], b, half) + oj[b] * xsum[0, b]
        out[0, j] = t


# Several rows: each word is decoded once per output row and used for every batch row, with a
# per-block accumulator row per batch row (rows x blocks floats, in L1). Keeping 4 batch rows'
# sums in registers instead stopped LLVM from vectorizing (16 ms against 5.5 ms at 4 rows).
@numba.njit(_WORDS_SIG, **_KERNEL)
def _q4_rows(x, xt, xsum, codes, words, scales, offsets, out):
    rows = xt.shape[0]
    nb = scales.shape[1]
    main = nb - nb % 8
    half = codes.shape[2]
    acc = np.empty((rows, nb), np.float32)
    for j in range(words.shape[0]):
        cw = words[j]
        acc[:] = 0
        for k in range(4):
            for m in range(rows):
                xm = xt[m]
                am = acc[m]
                for b in range(main):
                    w = np.int32(cw[b * 4 + k])
                    a = am[b]
                    for q in range(4):
                        e = k * 4 + q
                        lo = np.float32(np.int32((w >> np.int32(8 * q)) & np.int32(15)))
                        hi = np.float32(np.int32((w >> np.int32(8 * q + 4)) & np.int32(15)))
                        a += lo * xm[e, b] + hi * xm[16 + e, b]
                    am[b] = a
        for m in range(rows):
            for b in range(main, nb):
                acc[m, b] = _q4_block(codes[j, b], x[m], b, half)
            t = np.float32(0.0)
            for b in range(nb):
                t += scales[j, b] * acc[m, b] + offsets[j, b] * xsum[m, b]
            out[m, j] = t


# 8 bits: bytes line up with x, so a 32-lane accumulator per output row (scaled per block)
# vectorizes along the block, with one horizontal sum per output; two batch rows share each
# decoded block. The word order above measured slower here (2.8 against 2.1-2.4 ms at batch 1;
# 20.6 against 6.8 ms at 4 rows, 5632 x 2048).
@numba.njit(
    "void(float32[:, ::1], float32[:, ::1], int8[:, :, ::1], float32[:, ::1], float32[:, ::1],"
    " float32[:, ::1])",
    **_KERNEL,
)
def _q8_rows(x, xsum, codes, scales, offsets, out):
    rows = x.shape[0]
    nb = codes.shape[1]
    acc0 = np.empty(32, np.float32)
    acc1 = np.empty(32, np.float32)
    for j in range(codes.shape[0]):
        m = 0
        while m + 2 <= rows:
            acc0[:] = 0
            acc1[:] = 0
            t0 = np.float32(0.0)
            t1 = np.float32(0.0)
            for b in range(nb):
                s = scales[j, b]
                k = b * 32
                for i in range(32):
                    c = s * np.float32(codes[j, b, i])
                    acc0[i] += c * x[m, k + i]
                    acc1[i] += c * x[m + 1, k + i]
                t0 += offsets[j, b] * xsum[m, b]
                t1 += offsets[j, b] * xsum[m + 1, b]
            for i in range(32):
                t0 += acc0[i]
                t1 += acc1[i]
            out[m, j] = t0
            out[m + 1, j] = t1
            m += 2
        if m < rows:
            acc0[:] = 0
            t0 = np.float32(0.0)
            for b in range(nb):
                s = scales[j, b]
                k = b * 32
                for i in range(32):
                    acc0[i] += s * (np.float32(codes[j, b, i]) * x[m, k + i])
                t0 += offsets[j, b] * xsum[m, b]
            for i in range(32):
                t0 += acc0[i]
            out[m, j] = t0


# --- Integer products: x quantized per block to int8 -------------------------------------------
#
# Each output is sum_b (scale_b * dx_b * isum_b + offset_b * xsum_b), where isum_b = sum of code *
# qx over block b is exact in integers and xsum_b is the float sum of x over the block. A block's
# 32 products go through vpmaddubsw (unsigned by signed bytes, pairs summed to int16) and vpmaddwd
# (pairs to int32; no pair saturates: |code| <= 128 and |qx| <= 127, and 2 * 128 * 127 < 2^15),
# into 8 float lanes scaled per block; one horizontal sum per output. numba has
# no vector types and LLVM did not find these instructions in plain loops (it widened the bytes to
# int32 or int64 and multiplied with vpmulld: slower than the float kernels), so the block loop is
# written in LLVM IR below.

_I1, _I8, _I16, _I32, _I64 = (ir.IntType(n) for n in (1, 8, 16, 32, 64))
_F32 = ir.FloatType()


def _vector(element: ir.Type, count: int) -> ir.VectorType:
    return ir.VectorType(element, count)


def _lanes(indices) -> ir.Constant:
    """A shufflevector mask."""
    indices = list(indices)
    return ir.Constant(_vector(_I32, len(indices)), [ir.Constant(_I32, i) for i in indices])


def _splat(element: ir.Type, value, count: int) -> ir.Constant:
    return ir.Constant(_vector(element, count), [ir.Constant(element, value)] * count)


def _row_dot(bits: int, rows: int):
    """An intrinsic (codes, j, qx, dx, xsum, scales, offsets, out) that writes out[m, j] for the
    `rows` rows m of qx [rows, in] int8 against output row j of the blocks."""

    @intrinsic
    def row_dot(typingctx, codes, j, qx, dx, xsum, scales, offsets, out):
        return types.void(codes, j, qx, dx, xsum, scales, offsets, out), _codegen

    def _codegen(context, builder, signature, args):
        codes, j, qx, dx, xsum, scales, offsets, out = (
            arg if isinstance(t, types.Integer) else context.make_array(t)(context, builder, arg)
            for t, arg in zip(signature.args, args, strict=True)
        )
        bytes32, pairs16 = _vector(_I8, 32), _vector(_I16, 16)
        module = builder.module
        maddubs = cgutils.get_or_insert_function(
            module, ir.FunctionType(pairs16, [bytes32, bytes32]), "llvm.x86.avx2.pmadd.ub.sw"
        )
        maddwd = cgutils.get_or_insert_function(
            module, ir.FunctionType(_vector(_I32, 8), [pairs16, pairs16]), "llvm.x86.avx2.pmadd.wd"
        )
        psign = cgutils.get_or_insert_function(
            module, ir.FunctionType(bytes32, [bytes32, bytes32]), "llvm.x86.avx2.psign.b"
        )
        absb = cgutils.get_or_insert_function(
            module, ir.FunctionType(bytes32, [bytes32, _I1]), "llvm.abs.v32i8"
        )

        def const(n: int) -> ir.Constant:
            return ir.Constant(_I64, n)

        def at(array, index, pointee=None):
            ptr = builder.gep(array.data, [index])
            return ptr if pointee is None else builder.bitcast(ptr, pointee.as_pointer())

        nb = cgutils.unpack_tuple(builder, scales.shape, 2)[1]
        width = builder.mul(nb, const(BLOCK))
        nout = cgutils.unpack_tuple(builder, out.shape, 2)[1]
        row = builder.mul(j, nb)
        code_row = builder.mul(row, const(BLOCK * bits // 8))
        zero = ir.Constant(_vector(_F32, 8), [ir.Constant(_F32, 0.0)] * 8)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(rows)]
        offset_accs = [
            cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(rows)
        ]
        fast = ("contract",)
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            if bits == 4:
                packed = builder.load(
                    at(codes, builder.add(code_row, builder.mul(b, const(16))), _vector(_I8, 16)),
                    align=1,
                )
                low = builder.and_(packed, _splat(_I8, 15, 16))
                high = builder.lshr(packed, _splat(_I8, 4, 16))
                unsigned = builder.shuffle_vector(low, high, _lanes(range(32)))
            else:
                # vpmaddubsw takes one unsigned operand: |code| against qx with code's sign.
                signed = builder.load(
                    at(codes, builder.add(code_row, builder.mul(b, const(32))), bytes32), align=1
                )
                unsigned = builder.call(absb, [signed, ir.Constant(_I1, 0)])
            scale = builder.load(at(scales, builder.add(row, b)))
            offset = builder.load(at(offsets, builder.add(row, b)))
            for m in range(rows):
                mb = builder.add(builder.mul(const(m), nb), b)
                x = builder.load(
                    at(
                        qx,
                        builder.add(builder.mul(const(m), width), builder.mul(b, const(32))),
                        bytes32,
                    ),
                    align=1,
                )
                if bits == 8:
                    x = builder.call(psign, [x, signed])
                pairs = builder.call(maddubs, [unsigned, x])
                isum = builder.call(maddwd, [pairs, _splat(_I16, 1, 16)])
                d = builder.fmul(scale, builder.load(at(dx, mb)))
                d = builder.insert_element(
                    ir.Constant(_vector(_F32, 8), ir.Undefined), d, ir.Constant(_I32, 0)
                )
                d = builder.shuffle_vector(d, d, _lanes([0] * 8))
                term = builder.fmul(builder.sitofp(isum, _vector(_F32, 8)), d, flags=fast)
                builder.store(builder.fadd(builder.load(accs[m]), term, flags=fast), accs[m])
                t = builder.fmul(offset, builder.load(at(xsum, mb)), flags=fast)
                builder.store(
                    builder.fadd(builder.load(offset_accs[m]), t, flags=fast), offset_accs[m]
                )
        for m in range(rows):
            a = builder.load(accs[m])
            a = builder.fadd(
                builder.shuffle_vector(a, a, _lanes(range(4))),
                builder.shuffle_vector(a, a, _lanes(range(4, 8))),
            )
            a = builder.fadd(
                builder.shuffle_vector(a, a, _lanes([0, 1])),
                builder.shuffle_vector(a, a, _lanes([2, 3])),
            )
            t = builder.fadd(
                builder.extract_element(a, ir.Constant(_I32, 0)),
                builder.extract_element(a, ir.Constant(_I32, 1)),
            )
            t = builder.fadd(t, builder.load(offset_accs[m]))
            builder.store(t, at(out, builder.add(builder.mul(const(m), nout), j)))
        return context.get_dummy_value()

    return row_dot


_dot4_1, _dot4_2, _dot4_3, _dot4_4 = (_row_dot(4, rows) for rows in range(1, 5))
_dot8_1, _dot8_2, _dot8_3, _dot8_4 = (_row_dot(8, rows) for rows in range(1, 5))
# 127 / max|x|: a block's largest element maps to code +-127.
_QX_MAX = 127.0


@numba.njit("void(float32[:, ::1], int8[:, ::1], float32[:, ::1], float32[:, ::1])", **_KERNEL)
def _quantize_x(x, qx, dx, xsum):
    for m in range(x.shape[0]):
        for b in range(dx.shape[1]):
            xb = x[m, b * 32 : b * 32 + 32]
            top = np.float32(0.0)
            total = np.float32(0.0)
            for i in range(32):
                top = max(top, abs(xb[i]))
                total += xb[i]
            xsum[m, b] = total
            dx[m, b] = top / np.float32(_QX_MAX)
            inv = np.float32(_QX_MAX) / top if top > 0 else np.float32(0.0)
            for i in range(32):
                qx[m, b * 32 + i] = np.int8(np.rint(xb[i] * inv))


_INT_SIG = "void(float32[:, ::1], {}[:, :, ::1], float32[:, ::1], float32[:, ::1], float32[:, ::1])"


@numba.njit(_INT_SIG.format("uint8"), **_KERNEL)
def _q4_int(x, codes, scales, offsets, out):
    rows, nb = x.shape[0], scales.shape[1]
    qx = np.empty((rows, nb * 32), np.int8)
    dx = np.empty((rows, nb), np.float32)
    xsum = np.empty((rows, nb), np.float32)
    _quantize_x(x, qx, dx, xsum)
    for j in range(codes.shape[0]):
        if rows == 1:
            _dot4_1(codes, j, qx, dx, xsum, scales, offsets, out)
        elif rows == 2:
            _dot4_2(codes, j, qx, dx, xsum, scales, offsets, out)
        elif rows == 3:
            _dot4_3(codes, j, qx, dx, xsum, scales, offsets, out)
        else:
            _dot4_4(codes, j, qx, dx, xsum, scales, offsets, out)


@numba.njit(_INT_SIG.format("int8"), **_KERNEL)
def _q8_int(x, codes, scales, offsets, out):
    rows, nb = x.shape[0], scales.shape[1]
    qx = np.empty((rows, nb * 32), np.int8)
    dx = np.empty((rows, nb), np.float32)
    xsum = np.empty((rows, nb), np.float32)
    _quantize_x(x, qx, dx, xsum)
    for j in range(codes.shape[0]):
        if rows == 1:
            _dot8_1(codes, j, qx, dx, xsum, scales, offsets, out)
        elif rows == 2:
            _dot8_2(codes, j, qx, dx, xsum, scales, offsets, out)
        elif rows == 3:
            _dot8_3(codes, j, qx, dx, xsum, scales, offsets, out)
        else:
            _dot8_4(codes, j, qx, dx, xsum, scales, offsets, out)


def integer_kernels() -> bool:
    """Whether decode rows take the integer kernels (`_q4_int`, `_q8_int`) on this CPU."""
    return bool(QUANTIZE_X and _INTEGER_KERNELS)


def integer_kernel(bits: int):
    """The integer kernel of a bit width: kernel(x, codes, scales, offsets, out)."""
    return _q4_int if bits == 4 else _q8_int


def _kernel_matmul(x: torch.Tensor, w: QuantWeight, out: torch.Tensor) -> None:
    if integer_kernels():
        integer_kernel(w.bits)(x.numpy(), *w.arrays, out.numpy())
        return
    rows = x.shape[0]
    blocks = x.view(rows, -1, BLOCK)
    xsum = blocks.sum(dim=2).numpy()
    scales, offsets = w.scales.numpy(), w.offsets.numpy()
    if w.bits == 8:
        _q8_rows(x.numpy(), xsum, w.codes.numpy(), scales, offsets, out.numpy())
        return
    xt = blocks.transpose(1, 2).contiguous().numpy()
    words = w.codes.view(torch.int32).view(w.shape[0], -1).numpy()
    kernel = _q4_one if rows == 1 else _q4_rows
    kernel(x.numpy(), xt, xsum, w.codes.numpy(), words, scales, offsets, out.numpy())


def matmul(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] float32 times the matrix transposed: float32 [rows, out]."""
    rows = x.shape[0]
    x = x.detach().to(torch.float32).contiguous()
    out = torch.empty(rows, w.shape[0], dtype=torch.float32)
    if rows == 0:
        pass
    elif rows <= KERNEL_ROWS:
        _kernel_matmul(x, w, out)
    else:
        scratch = torch.empty(min(TILE_ROWS, w.shape[0]), w.shape[1], dtype=torch.float32)
        for start in range(0, w.shape[0], TILE_ROWS):
            stop = min(start + TILE_ROWS, w.shape[0])
            tile = scratch[: stop - start]
            _dequantize_into(w, start, stop, tile)
            out[:, start:stop] = torch.mm(x, tile.t())
    if bias is not None:
        out += bias
    return out


class QuantLinear(nn.Module):
    """`nn.Linear` over a QuantWeight: y = x w^T + bias, float32."""

    # Its buffers are weights (Shard.weight_bytes counts them).
    holds_blocks = True

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.bits = weight.bits
        self.out_features, self.in_features = weight.shape
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("offsets", weight.offsets)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().to(torch.float32).contiguous()
        )

    @property
    def weight(self) -> QuantWeight:
        # Kept while the buffers are the same tensors, so that its numpy views are made once.
        held = self.__dict__.get("_held")
        if held is None or not (
            held.codes is self.codes and held.scales is self.scales and held.offsets is self.offsets
        ):
            held = QuantWeight(
                self.bits,
                self.codes,
                self.scales,
                self.offsets,
                (self.out_features, self.in_features),
            )
            self.__dict__["_held"] = held
        return held

    @classmethod
    def tied_to(cls, embedding: QuantEmbedding) -> QuantLinear:
        """The head of a model whose head is its token embedding: the same blocks."""
        return cls(embedding.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantLinear:
        return cls(quantize(linear.weight, bits), linear.bias)

    @classmethod
    def from_conv1d(cls, conv, bits: int) -> QuantLinear:
        """From transformers' `Conv1D` (gpt2), whose weight is [in, out]."""
        return cls(quantize(conv.weight.t(), bits), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if 0 < rows <= KERNEL_ROWS and flat.dtype == torch.float32 and integer_kernels():
            y = self._rows(flat.detach().contiguous(), rows)
        else:
            y = matmul(flat, self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def _rows(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """A decode group's product, what `matmul` computes for it with less around the kernel:
        a decode step of a 30-layer model makes over 200 of these calls, and `matmul`'s
        conversions and checks cost about as much as a 576 x 576 kernel does."""
        buffers = self._buffers
        held = self.__dict__.get("_args")
        now = (buffers["codes"], buffers["scales"], buffers["offsets"])
        if held is None or not all(a is b for a, b in zip(held[0], now, strict=True)):
            w = self.weight
            held = ((w.codes, w.scales, w.offsets), integer_kernel(w.bits), w.arrays)
            self.__dict__["_args"] = held
        out = np.empty((rows, self.out_features), np.float32)
        held[1](x.numpy(), *held[2], out)
        y = torch.from_numpy(out)
        bias = buffers["bias"]
        if bias is not None:
            y += bias
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class QuantEmbedding(nn.Module):
    """`nn.Embedding` over a QuantWeight [vocab, dim]: only the looked-up rows are dequantized."""

    holds_blocks = True

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.bits = weight.bits
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = None
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("offsets", weight.offsets)

    @property
    def weight(self) -> QuantWeight:
        return QuantWeight(
            self.bits,
            self.codes,
            self.scales,
            self.offsets,
            (self.num_embeddings, self.embedding_dim),
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.select_rows(ids.reshape(-1)).dequantize()
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"
