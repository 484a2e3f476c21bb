"""Dtype names and device checks: what a stage may be asked to run on, refused before loading."""

from __future__ import annotations

import torch

from stage.shard import ShardError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ShardError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


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
