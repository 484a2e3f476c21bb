"""The matrix products of a float32 CPU shard's decode batches: a few rows against wide weights.

For a few rows BLAS's `linear` packs or re-reads the weight; these products stream it once
instead. Batch 1 and prompts keep `linear`, so batch 1 keeps the monolithic model's bits.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

# Decode batches of at most this many rows multiply a float32 CPU layer's weights as
# `weight @ x.T` (see SkinnyLinear); beyond it, in a running cluster, `linear` caught up
# (docs/performance.md).
# On one thread the row kernel takes batches of up to its KERNEL_ROWS (RowKernelLinear).
SKINNY_ROWS = 6


def load_row_kernel() -> ModuleType:
    """stage.kernels, imported (and its kernel compiled or loaded from its cache) on first use.

    Only float32 CPU shards with the row kernel import it, so an accelerator host never
    imports numba; `python -m stage` imports it at start, before it registers.
    """
    from stage import kernels

    return kernels


def batched_head(head: nn.Module, hidden: torch.Tensor, row_kernel: bool) -> torch.Tensor:
    """The vocabulary projection of a batch of single positions, [B, 1, H] -> [B, 1, V].

    On CPU the rows take stage.kernels' product with `row_kernel` on one thread, otherwise
    `weight @ hidden.T`: both stream the wide weight once where `linear` packs it first.
    Same values, other rounding, as any batched product.
    """
    weight = getattr(head, "weight", None)
    if (
        not isinstance(head, nn.Linear)
        or weight is None
        or weight.device.type != "cpu"
        or hidden.shape[1] != 1
    ):
        return head(hidden)
    rows = hidden.reshape(hidden.shape[0], hidden.shape[2])
    if row_kernel:
        kernels = load_row_kernel()
        if kernels.takes(rows, weight):
            return kernels.rows_linear(rows, weight, head.bias).unsqueeze(1)
    logits = torch.mm(weight, rows.t()).t()
    if head.bias is not None:
        logits = logits + head.bias
    return logits.unsqueeze(1)


class SkinnyLinear(nn.Linear):
    """A float32 CPU linear layer that multiplies a decode batch of 2 to SKINNY_ROWS rows as
    `weight @ x.T`, which streams the weight once where `linear` packs it.

    Batch 1 ([1, n, H]) and prompts ([B, n > 1, H]) take `F.linear`, the call `nn.Linear`
    makes, so the batch-1 path keeps the monolithic model's bits. Batched results are
    equal in value, not always in every bit, as for any batched product.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dim() != 3 or x.shape[1] != 1 or not 2 <= rows <= SKINNY_ROWS:
            return nn.functional.linear(x, self.weight, self.bias)
        y = torch.mm(self.weight, x.reshape(rows, -1).t()).t().contiguous()
        if self.bias is not None:
            y += self.bias
        return y.unsqueeze(1)


class RowKernelLinear(SkinnyLinear):
    """A SkinnyLinear whose decode batches of 2 to KERNEL_ROWS rows, on one thread, take
    stage.kernels' row kernel, which reads each weight row once.

    With more torch threads the kernel, which runs on the calling thread only, gives way to
    SkinnyLinear's BLAS products, which use them all. Batch 1 and prompts still take `F.linear`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dim() == 3 and x.shape[1] == 1 and rows >= 2:
            kernels = load_row_kernel()
            flat = x.reshape(rows, -1)
            if kernels.takes(flat, self.weight):
                return kernels.rows_linear(flat, self.weight, self.bias).unsqueeze(1)
        return super().forward(x)


def skinny_linears(layer: nn.Module, row_kernel: bool) -> None:
    """Give a CPU layer's plain linear sublayers the decode-batch products of SkinnyLinear,
    or of RowKernelLinear with `row_kernel`.

    Only the class changes: the parameters, their names and the module tree stay. Only
    float32 layers get them: that is the dtype they were measured in.
    """
    cls = RowKernelLinear if row_kernel else SkinnyLinear
    for module in layer.modules():
        if type(module) is nn.Linear:
            module.__class__ = cls
