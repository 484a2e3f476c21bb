"""Who may say what: with keys, every message's role is checked against the key the CURVE
handshake proved (its frame's User-Id), and refused handshakes are logged and counted.

ZAP (pyzmq's ThreadAuthenticator, in a thread of its own) admits a connection whose key is in
any role's directory; the main ROUTER's messages are then checked one by one, so that a client
key cannot register a stage, a stage key cannot step a request, and only an admin key drains.
The monitor feed admits client and admin keys only: it carries token progress and the cluster's
state, which is a client's business, never a stage's. A key removed from its directory is
refused from its next message on, on connections already open too; new connections with it are
refused at the handshake.
"""

from __future__ import annotations

import ipaddress
import socket as socketlib

import zmq
from zmq.auth.thread import ThreadAuthenticator

from broker import protocol as P
from broker.protocol import Cmd, Code
from common.keys import ServerKeys

ZAP_DOMAIN = "layerline"
FEED_DOMAIN = "layerline-feed"
# The roles that may send each client-tag command; stage-tag commands need "stage".
CLIENT_ROLES = frozenset({"client", "admin"})
COMMAND_ROLES = {Cmd.DRAIN: frozenset({"admin"})}
FEED_ROLES = frozenset({"client", "admin"})
HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "key refused",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error in the handshake",
}
HANDSHAKE_EVENTS = 0
for _event in HANDSHAKE_FAILURES:
    HANDSHAKE_EVENTS |= _event


class _Allowed:
    """ZAP's question for one domain: is this key allowed at all?"""

    def __init__(self, keys: ServerKeys, roles: frozenset[str] | None):
        self.keys, self.roles = keys, roles

    def callback(self, domain: str, key: bytes) -> bool:
        roles = self.keys.ring.roles(key)
        return bool(roles if self.roles is None else roles & self.roles)


class Gate:
    """The broker's keys at work: ZAP for handshakes, roles for messages."""

    def __init__(self, context: zmq.Context, keys: ServerKeys):
        self.keys = keys
        self.auth = ThreadAuthenticator(context)
        self.auth.start()
        self.auth.configure_curve_callback(ZAP_DOMAIN, _Allowed(keys, None))
        self.auth.configure_curve_callback(FEED_DOMAIN, _Allowed(keys, FEED_ROLES))

    def secure(self, sock: zmq.Socket, domain: str = ZAP_DOMAIN) -> None:
        self.keys.apply(sock)
        sock.zap_domain = domain.encode()

    def refresh(self) -> bool:
        """Read the key directories again if they changed (the broker asks at every
        heartbeat: a few stat calls)."""
        return self.keys.ring.refresh()

    def check(self, frame: zmq.Frame, msg: P.Message) -> bytes:
        """The sender's key, when its roles allow the message; ProtocolError otherwise."""
        try:
            key = frame.get("User-Id").encode()
        except zmq.ZMQError:
            key = b""
        roles = self.keys.ring.roles(key)
        if msg.role == "stage":
            needed = frozenset({"stage"})
        else:
            needed = COMMAND_ROLES.get(msg.cmd, CLIENT_ROLES)
        if roles & needed:
            return key
        have = ", ".join(sorted(roles)) or "none any more (its file was removed)"
        raise P.ProtocolError(
            Code.UNAUTHORIZED,
            f"{msg.cmd.name} needs a key of the {' or '.join(sorted(needed))} role; this key's "
            f"role is {have}; ask the broker's operator to add its public key to the "
            f"{'/'.join(sorted(needed))} keys' directory",
        )

    def stop(self) -> None:
        self.auth.stop()


def is_loopback(endpoint: str) -> bool:
    """Whether a tcp:// or ipc:// endpoint is reachable only from this host."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:  # a host name: loopback only if every address it names is
        infos = socketlib.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
