"""Tensor frames as torch tensors and back, for the roles that compute: stages and clients.

The wire format (`broker.protocol`) describes frames by dtype name and shape only, so that the
broker, which forwards frames and never looks inside them, does not import torch. This
conversion lives outside the broker package for that reason.
"""

from __future__ import annotations

import warnings

import torch

from broker.protocol import DTYPE_SIZES, Code, ProtocolError, TensorDesc, frame_buffer

# Received frames are read-only and nothing writes into an input activation in place; a
# module-level filter, because catch_warnings() per call is slow and not thread-safe.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_SIZES}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def tensor_to_frame(t: torch.Tensor) -> tuple[TensorDesc, memoryview]:
    """A tensor as (descriptor, buffer). The buffer views the tensor's memory: send it copy=False
    (pyzmq copies frames under zmq.COPY_THRESHOLD itself) and keep the tensor alive until sent."""
    if t.dtype not in DTYPE_NAMES:
        raise ProtocolError(Code.BAD_REQUEST, f"cannot send tensors of {t.dtype}")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    # A uint8 view works for every dtype, bfloat16 included, which numpy cannot represent.
    buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
    return TensorDesc(DTYPE_NAMES[t.dtype], tuple(t.shape)), buf


def tensor_from_frame(frame, desc: TensorDesc) -> torch.Tensor:
    """A tensor viewing the frame's buffer without a copy. Treat it as read-only."""
    if desc.nbytes == 0:
        return torch.empty(desc.shape, dtype=TORCH_DTYPES[desc.dtype])
    flat = torch.frombuffer(frame_buffer(frame), dtype=TORCH_DTYPES[desc.dtype])
    return flat.view(desc.shape)
