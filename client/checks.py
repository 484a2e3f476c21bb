"""Arguments checked before anything is sent: each refusal names the argument and what it takes."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

from client.errors import InvalidArgument

URL_FORMS = "tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555), ipc://PATH or inproc://NAME"


def broker_url(url: Any) -> str:
    """The broker's ZeroMQ endpoint, or InvalidArgument saying what is wrong with it."""
    if not isinstance(url, str):
        raise InvalidArgument(f"broker URL must be a string, {URL_FORMS}; got {url!r}")
    scheme, sep, rest = url.partition("://")
    why = None
    if not url.isprintable() or not _encodable(url):
        why = "it holds control or unencodable characters"
    elif not sep:
        why = "it has no scheme"
    elif scheme in ("http", "https", "ws", "wss"):
        why = f"{scheme}:// is a web address; the broker speaks ZeroMQ"
    elif scheme not in ("tcp", "ipc", "inproc"):
        why = f"the scheme {scheme}:// is not one the client connects with"
    elif not rest:
        why = "it names no address"
    elif scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host:
            why = "it has no port" if not colon else "it has no host"
        elif host == "*" or any(c.isspace() for c in host):
            why = f"{host!r} is not a host to connect to"
        elif not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            why = f"the port {port!r} is not a number in 1-65535"
    if why is not None:
        raise InvalidArgument(f"bad broker URL {url!r}: {why}; give it as {URL_FORMS}")
    return url


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text(value: str, what: str) -> str:
    """`value`, unless it holds a lone surrogate (no tokenizer can encode one)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(
            f"{what} holds a lone surrogate (U+{ord(value[e.start]):04X}) at character "
            f"{e.start}, which is not text; remove it, or fix the decoding that made it "
            "(e.g. read the file with errors='replace')"
        ) from None
    return value


def integer(value: Any, name: str, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; bools and floats are refused."""
    span = f"in [{low}, {high}]" if high is not None else f">= {low}"
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        raise InvalidArgument(f"{name} must be an integer {span}, got {value!r}")
    return number


def real(value: Any, name: str, rule: str, ok: Any) -> float:
    """`value` as a finite float for which `ok(value)` holds; `rule` says which those are."""
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = None
    if number is None or not math.isfinite(number) or not ok(number):
        raise InvalidArgument(f"{name} must be a finite number {rule}, got {value!r}")
    return number


def seconds(value: Any, name: str) -> float:
    """A duration: a finite number of seconds > 0."""
    return real(value, name, "of seconds > 0", lambda s: s > 0)


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be True or False, got {value!r}")
    return value
