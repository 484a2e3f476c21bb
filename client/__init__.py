"""layerline client: generate tokens from a model served by a layerline broker.

from client import Client
with Client("tcp://127.0.0.1:5555") as c:
    print(c.generate("Once upon a time", max_new_tokens=32).text)
"""

from client.core import AsyncClient, Client, query_broker
from client.sampling import Sampler
from client.session import (
    BrokerUnreachable,
    BusyError,
    ClientError,
    GenerationResult,
    NotReadyError,
    RequestFailed,
    RequestTimeout,
)

__all__ = [
    "AsyncClient",
    "BrokerUnreachable",
    "BusyError",
    "Client",
    "ClientError",
    "GenerationResult",
    "NotReadyError",
    "RequestFailed",
    "RequestTimeout",
    "Sampler",
    "query_broker",
]
