"""layerline client: generate tokens from a model served by a layerline broker.

from client import Client
with Client("tcp://127.0.0.1:5555") as c:
    print(c.generate("Once upon a time", max_new_tokens=32).text)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from client.errors import (
    BrokerRefused,
    BrokerUnreachable,
    BusyError,
    ClientError,
    InvalidArgument,
    NotReadyError,
    RequestFailed,
    RequestTimeout,
    SamplingError,
    StreamAbandoned,
)

if TYPE_CHECKING:
    from client.core import AsyncClient, Client, query_broker
    from client.sampling import Sampler
    from client.session import GenerationResult

# Imported on first use: `python -m client` parses its arguments (and answers --help and
# Ctrl-C) before torch and transformers are loaded, which takes seconds.
_LAZY = {
    "AsyncClient": "client.core",
    "Client": "client.core",
    "query_broker": "client.core",
    "Sampler": "client.sampling",
    "GenerationResult": "client.session",
}

__all__ = [
    "AsyncClient",
    "BrokerRefused",
    "BrokerUnreachable",
    "BusyError",
    "Client",
    "ClientError",
    "GenerationResult",
    "InvalidArgument",
    "NotReadyError",
    "RequestFailed",
    "RequestTimeout",
    "SamplingError",
    "Sampler",
    "StreamAbandoned",
    "query_broker",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
