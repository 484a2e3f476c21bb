"""Hand-built messages, for input that no well-behaved peer sends: a test of refusals needs
bytes that `protocol.encode` would never produce; and well-formed STEPs for raw peers that
play a client by hand."""

from __future__ import annotations

import msgspec
import torch

from broker import messages as M
from broker import protocol as P
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


def step(rid: str, seq: int, tokens: list[int], pos: int, n: int) -> list:
    """A well-formed STEP for positions [pos, pos+n) of `tokens`."""
    body = M.Step(
        rid=rid,
        seq=seq,
        pos=pos,
        n=n,
        prev=P.prefix_hash(P.EMPTY_PREFIX_HASH, tokens[:pos]),
        hash=P.prefix_hash(P.EMPTY_PREFIX_HASH, tokens[: pos + n]),
    )
    return P.encode(P.CLIENT_TAG, body, [torch.tensor([tokens[pos : pos + n]])])
