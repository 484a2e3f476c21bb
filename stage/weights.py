"""A shard's weights held as `python -m stage --weights` asks (common/weights.py).

A module is filled as before, except that its weight matrices (the decoder layers' linear
layers, the token embedding, the head) are read one at a time and held at once in the chosen
form: bfloat16, or blocks of 8- or 4-bit codes (stage/quant.py). A GGUF file's own blocks are
taken as they are where a block format holds them without loss (`native`); otherwise a matrix
is read in float32, converted, and the float copy dropped, so a stage never holds a float copy
of more than one matrix.

Activations stay in the cluster's compute dtype: a bfloat16 matrix multiplies a bfloat16 copy
of the input and hands back the compute dtype; a block matrix multiplies float32.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from common.weights import BLOCK, QUANTIZED_KINDS, WEIGHT_KINDS, bits_for


def held_weights(kind: str, dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """The kind a stage holds for `--weights kind` on `dtype` and `device`, and the conversion
    its matrices take at load ("float32": none, they stay in the compute dtype).

    Block products run on CPU in float32; a CUDA stage holds blocks as bfloat16 until a GPU
    kernel is measured (docs/performance.md)."""
    from stage.shard import ShardError

    compute = str(dtype).removeprefix("torch.")
    if kind == compute:  # float16 too: in the compute dtype, whatever it is
        return kind, "float32"
    if kind not in WEIGHT_KINDS:
        raise ShardError(f"--weights {kind!r} is not one of {', '.join(WEIGHT_KINDS)}")
    if dtype != torch.float32:
        raise ShardError(
            f"--weights {kind} needs a float32 stage (this one computes in {compute}); "
            f"use --weights {compute}, or --dtype float32"
        )
    if device.type == "cuda" and kind in QUANTIZED_KINDS:
        return "bfloat16", "bfloat16"
    return kind, kind


def tied_head(head: nn.Module, embed: nn.Module) -> nn.Module:
    """The head of a model whose head is its token embedding: the same matrix, held once."""
    if isinstance(embed, HalfEmbedding):
        tied = HalfLinear.__new__(HalfLinear)
        nn.Module.__init__(tied)
        tied.weight, tied.bias = embed.weight, None
        tied.out_features, tied.in_features = embed.weight.shape
        return tied
    if getattr(embed, "holds_blocks", False):
        from stage import quant

        return quant.QuantLinear.tied_to(embed)
    head.weight = embed.weight  # an nn.Embedding, or a family's subclass of it
    return head


# Float32 bytes of a matrix read at a time when it is converted to its held form: a stage
# never holds a float copy of a whole embedding (250 MiB for TinyLlama's).
CONVERT_BYTES = 1 << 20


class HalfLinear(nn.Module):
    """A linear layer whose weight is held in bfloat16 in a float32 stage: the input is cast
    for the product and the output cast back (bfloat16 products: half the bytes read)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


class HalfEmbedding(nn.Module):
    """A token embedding held in bfloat16 in a float32 stage: looked-up rows are float32."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).to(torch.float32)


def block_matrices(module: nn.Module, kind: str, checkpoint, wanted: dict[str, str]) -> dict:
    """The matrices of `module` to hold apart from its float tensors under `kind`: by local
    parameter name, (submodule name, its class's role, bits or None for bfloat16).

    Linear layers (and GPT-2's Conv1D) and embeddings whose rows are a multiple of BLOCK
    qualify (the caller leaves learned positions out); norms and biases stay in the compute
    dtype."""
    if kind == "float32":
        return {}
    out: dict[str, tuple[str, str, int | None]] = {}
    for name, sub in module.named_modules():
        if type(sub) is nn.Linear or isinstance(sub, Conv1D):
            role = "conv1d" if isinstance(sub, Conv1D) else "linear"
            rows = sub.weight.shape[0] if role == "conv1d" else sub.weight.shape[1]
        elif type(sub) is nn.Embedding:
            role, rows = "embedding", sub.weight.shape[1]
        else:
            continue
        local = f"{name}.weight" if name else "weight"
        if local not in wanted:
            continue
        if kind == "bfloat16":
            out[local] = (name, role, None)
            continue
        if rows % BLOCK:
            continue
        bits = bits_for(kind, checkpoint.tensors[wanted[local]].dtype)
        if bits is not None:
            out[local] = (name, role, bits)
    return out


def read_matrix(checkpoint, key: str, role: str, bits: int | None, native: bool, digests):
    """One matrix in its held form: a QuantWeight, or a bfloat16 tensor (bits None)."""
    if bits is not None and native:
        blocks = checkpoint.read_blocks(key, digests)
        if blocks is not None:
            return blocks
    if role != "conv1d":
        shape = tuple(checkpoint.tensors[key].shape)
        rows = max(1, CONVERT_BYTES // (4 * shape[-1]))
        chunks = checkpoint.read_rows(key, rows, digests)
        if chunks is not None:
            return _convert_rows(chunks, shape, bits)
    dense = checkpoint.read_tensors({"w": key}, torch.float32, torch.device("cpu"), digests)["w"]
    if role == "conv1d":
        dense = dense.t()
    if bits is None:
        return dense.contiguous().to(torch.bfloat16)
    from stage import quant

    held = quant.quantize(dense.contiguous(), bits)
    del dense
    return held


def _convert_rows(chunks, shape: tuple[int, ...], bits: int | None):
    """A matrix converted block of rows by block of rows into its held form."""
    if bits is None:
        out = torch.empty(shape, dtype=torch.bfloat16)
        at = 0
        for chunk in chunks:
            out[at : at + chunk.shape[0]] = chunk
            at += chunk.shape[0]
        return out
    from stage import quant

    # Every chunk is taken, the last included: the reader records the digest after it.
    held = None
    at = 0
    for chunk in chunks:
        part = quant.quantize(chunk, bits)
        if held is None and part.shape[0] == shape[0]:
            held, at = part, shape[0]
            continue
        if held is None:
            held = quant.QuantWeight(
                bits,
                part.codes.new_empty((shape[0], *part.codes.shape[1:])),
                part.scales.new_empty((shape[0], *part.scales.shape[1:])),
                part.offsets.new_empty((shape[0], *part.offsets.shape[1:])),
                (shape[0], shape[1]),
            )
        rows = part.shape[0]
        held.codes[at : at + rows] = part.codes
        held.scales[at : at + rows] = part.scales
        held.offsets[at : at + rows] = part.offsets
        at += rows
    return held


def install(module: nn.Module, name: str, role: str, held, bias: torch.Tensor | None) -> nn.Module:
    """Put the held matrix in place of submodule `name` (its float weight never loaded)."""
    if isinstance(held, torch.Tensor):
        new = HalfEmbedding(held) if role == "embedding" else HalfLinear(held, bias)
    else:
        from stage import quant

        new = quant.QuantEmbedding(held) if role == "embedding" else quant.QuantLinear(held, bias)
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)
    return module


def row_permutation(processor, key: str, rows: int, mapping: dict[str, str]) -> np.ndarray | None:
    """The row order transformers' GGUF tensor processor gives a [rows, ...] matrix (the
    llama family's Q/K reverse permutation), found by running it on the row indices; None when
    it does more than reorder rows (GPT-2's transposes), so the blocks cannot be kept."""
    probe = np.arange(rows, dtype=np.float32).reshape(rows, 1) * np.ones((1, BLOCK), np.float32)
    parsed: dict[str, dict] = {"tensors": {}}
    try:
        result = processor.process(
            weights=probe, name=key, tensor_key_mapping=mapping, parsed_parameters=parsed
        )
    except Exception:  # a processor that needs a real tensor's shape
        return None
    if result.name is None:
        return None
    order = np.asarray(result.weights)
    if order.shape != probe.shape or not (order == order[:, :1]).all():
        return None
    index = order[:, 0].astype(np.int64)
    if not np.array_equal(np.sort(index), np.arange(rows)):
        return None
    return index
