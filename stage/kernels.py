"""A CPU product for decode batches: a few single-position rows against a wide weight.

A decode group of B requests multiplies every weight of a stage by a [B, H] matrix. For a
few rows BLAS's `linear` packs or re-reads the weight and streams well below what one core
can read; this kernel reads each weight row once, from memory, and multiplies it by up to
four batch rows at a time while the row sits in L1 (figures in docs/performance.md).

It is compiled once by numba's LLVM backend when this module is first imported, and cached
beside it, so only a float32 CPU stage pays the import. The sums are reassociated into
vector lanes, so the bits differ from `linear`'s as any other batched product's do; batch 1
never comes here.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

# Decode groups of at most this many rows take the kernel: the largest group at which it
# still beat `linear` (docs/performance.md).
KERNEL_ROWS = 16


@numba.njit(
    "void(float32[:, ::1], float32[:, ::1], float32[:, ::1])",
    cache=True,
    nogil=True,
    boundscheck=False,
    fastmath={"reassoc", "contract"},
)
def _rows_times_weight_t(x, w, out):
    rows, width = x.shape
    for j in range(w.shape[0]):
        m = 0
        while m + 4 <= rows:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for k in range(width):
                wk = w[j, k]
                a0 += wk * x[m, k]
                a1 += wk * x[m + 1, k]
                a2 += wk * x[m + 2, k]
                a3 += wk * x[m + 3, k]
            out[m, j] = a0
            out[m + 1, j] = a1
            out[m + 2, j] = a2
            out[m + 3, j] = a3
            m += 4
        while m < rows:
            a = np.float32(0.0)
            for k in range(width):
                a += w[j, k] * x[m, k]
            out[m, j] = a
            m += 1


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rows_linear(x, weight)` applies: float32 CPU, 2..KERNEL_ROWS rows, one thread.

    The kernel runs on the calling thread only, so a process that gave torch more than one
    thread keeps BLAS, which uses them all.
    """
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and 2 <= x.shape[0] <= KERNEL_ROWS
        and weight.is_contiguous()
        and torch.get_num_threads() == 1
    )


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear(x, weight, bias)` for x of shape [B, H], B small: returns [B, out]."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    _rows_times_weight_t(x.numpy(), weight.detach().numpy(), out.numpy())
    if bias is not None:
        out += bias
    return out
