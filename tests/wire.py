"""Hand-built messages, for input that no well-behaved peer sends: a test of refusals needs
bytes that `protocol.encode` would never produce."""

from __future__ import annotations

import msgspec
import torch

from broker.protocol import Cmd


def raw_message(tag: bytes, cmd: Cmd, header: dict, tensors=()) -> list[bytes]:
    """Frames of a message whose header is `header` as given, plus the descriptors of `tensors`."""
    frames = [t.contiguous().numpy().tobytes() for t in tensors]
    descs = [{"dtype": _name(t.dtype), "shape": list(t.shape)} for t in tensors]
    if descs:
        header = {**header, "tensors": descs}
    return [tag, bytes((cmd,)), msgspec.json.encode(header), *frames]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
