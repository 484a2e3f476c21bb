"""The client's exceptions: everything it raises on purpose is a `ClientError`, with a message
that says what to do."""

from __future__ import annotations

from broker.protocol import Code


class ClientError(Exception):
    """Base of every error the client raises on purpose."""


class InvalidArgument(ClientError, ValueError):
    """An argument refused before anything is sent; the message names it and what it takes."""


class BrokerUnreachable(ClientError):
    """The broker did not answer in time (first contact, or after a reconnect)."""


class BrokerRefused(BrokerUnreachable):
    """The CURVE handshake with the broker failed: this client's key is not allowed there, the
    broker key given is not that broker's, or one side has keys and the other has none."""


class RequestFailed(ClientError):
    """The broker or a stage refused the request; `code` is the protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BusyError(RequestFailed):
    """A bounded queue of the broker is full; try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float | None):
        super().__init__(str(Code.BUSY), message)
        self.retry_after_s = retry_after_s


class NotReadyError(RequestFailed):
    """The live stages cannot cover the model; the message says what is missing (`reason`: the
    broker's own words, where the client knows them apart from its advice)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(str(Code.NOT_READY), message)
        self.reason = reason


class RequestTimeout(ClientError, TimeoutError):
    """The request's `timeout=` ran out; it was cancelled on the broker."""


class SamplingError(ClientError):
    """The logits of a step hold nan or inf, so no token can be chosen; the request was ended."""


class StreamAbandoned(ClientError):
    """A stream was not read for the client's `idle_timeout`; its request was ended."""
