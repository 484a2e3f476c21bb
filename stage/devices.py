"""Dtype names and device checks: what a stage may be asked to run on, refused before loading."""

from __future__ import annotations

import torch

from broker.messages import COMPUTE_DTYPES
from stage.shard import ShardError
from tensorframes import TORCH_DTYPES

TORCH_COMPUTE_DTYPES = {name: TORCH_DTYPES[name] for name in COMPUTE_DTYPES}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return TORCH_COMPUTE_DTYPES[name]
    except KeyError:
        raise ShardError(
            f"unknown dtype {name!r}; use one of {', '.join(COMPUTE_DTYPES)}"
        ) from None


def check_device(device: str | torch.device, dtype: torch.dtype) -> torch.device:
    """Refuse a device or a dtype that cannot run here, before any weight is read."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ShardError(
            f"device {device} requested but CUDA is not available here; use --device cpu"
        )
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ShardError(f"{device} cannot run bfloat16; use --dtype float16 or float32")
    try:  # a one-element probe catches dtypes the backend has no kernels for
        probe = torch.ones(2, 2, dtype=dtype, device=device)
        (probe @ probe).sum().item()
    except (RuntimeError, TypeError) as e:
        raise ShardError(f"device {device} cannot run {dtype}: {e}") from e
    return device
