"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the one
mapping from the client's exceptions to HTTP statuses."""

from __future__ import annotations

import math

from client.errors import (
    BrokerUnreachable,
    BusyError,
    ClientError,
    InvalidArgument,
    NotReadyError,
    RequestFailed,
)


class APIError(Exception):
    """An answer other than 200: its status, OpenAI's error fields, and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    @classmethod
    def invalid(cls, message: str, param: str | None = None, code: str | None = None) -> APIError:
        return cls(400, message, "invalid_request_error", code, param)

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def from_client_error(e: Exception) -> APIError:
    """The HTTP answer for an exception of the client library (or anything else: a 500)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidArgument):
        return APIError.invalid(str(e))
    if isinstance(e, BusyError):
        # Retry-After takes whole seconds; the broker's hint rounded up, at least one.
        retry = max(1, math.ceil(e.retry_after_s or 1))
        return APIError(
            429,
            f"the cluster is busy: {e.message}",
            "rate_limit_error",
            "busy",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(e, NotReadyError):
        message = e.message
        if e.reason is not None:  # without the client library's advice, which is not HTTP's
            message = f"cluster not ready: {e.reason}; GET /health answers 200 once it is"
        return APIError(503, message, "service_unavailable", "cluster_not_ready")
    if isinstance(e, BrokerUnreachable):
        return APIError(503, str(e), "service_unavailable", "broker_unreachable")
    if isinstance(e, RequestFailed):
        return APIError(500, f"the request failed: {e}", "server_error", e.code)
    if isinstance(e, ClientError):
        return APIError(500, f"the request failed: {e}", "server_error", "client_error")
    return APIError(
        500, f"unexpected {type(e).__name__}: {e}; the gateway goes on serving", "server_error"
    )
