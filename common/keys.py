"""CurveZMQ keys: certificates in pyzmq's format, the broker's allowed keys by role, and the
socket options of each side.

A key pair is two files that `zmq.auth` writes and reads: `NAME.key` (the public key, which is
copied to whoever must know it) and `NAME.key_secret` (both keys, which never leaves its
host). `python -m broker.keys DIR` writes a cluster's set in this layout:

    DIR/broker.key              the broker's public key: every stage, client and monitor gets it
    DIR/private/NAME.key_secret each peer's secret certificate, to be moved to that peer's host
    DIR/stages/NAME.key         the public keys the broker allows as stages
    DIR/clients/NAME.key        ... as clients (and monitors)
    DIR/admins/NAME.key         ... as admins (drain; everything a client may do)

The broker takes its secret certificate and one directory per role (`--keys DIR` for this
layout). A key's role is read again whenever a directory changes, so removing a file revokes
that key without a restart, for the connections already open too: the broker checks the role
of every message from the key the CURVE handshake proved.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

ROLES = ("stage", "client", "admin")
ROLE_DIRS = {"stage": "stages", "client": "clients", "admin": "admins"}
PRIVATE_DIR = "private"
BROKER_NAME = "broker"
# A z85-encoded Curve25519 key is 40 characters.
Z85_KEY_LENGTH = 40


class KeyFileError(ValueError):
    """A key file that is missing, unreadable or of the wrong kind."""


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret in `directory`; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a NAME.key_secret file."""
    path = Path(path).expanduser()
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise KeyFileError(
            f"cannot read the secret certificate {path}: {e}; make one with "
            "`python -m broker.keys DIR` and give the NAME.key_secret file"
        ) from None
    if secret is None:
        raise KeyFileError(
            f"{path} holds only a public key; give the NAME.key_secret file that "
            "`python -m broker.keys` wrote beside it"
        )
    return public, secret


def load_public(value: str | os.PathLike) -> bytes:
    """A z85 public key, given as a NAME.key file or as the 40-character key itself."""
    text = os.fspath(value)
    if len(text) == Z85_KEY_LENGTH and not Path(text).exists():
        try:
            z85.decode(text)
        except (ValueError, KeyError):
            pass
        else:
            return text.encode("ascii")
    path = Path(text).expanduser()
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise KeyFileError(
            f"cannot read the public key {path}: {e}; give the broker's broker.key file (or "
            "its 40-character key)"
        ) from None
    return public


@dataclass(frozen=True)
class PeerKeys:
    """What a stage, client or monitor needs to reach a broker that has keys: its own
    certificate and the broker's public key."""

    public: bytes
    secret: bytes
    broker: bytes

    @classmethod
    def load(cls, cert: str | os.PathLike, broker_key: str | os.PathLike) -> PeerKeys:
        public, secret = load_secret(cert)
        return cls(public=public, secret=secret, broker=load_public(broker_key))

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the broker (before it connects)."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.broker


def peer_keys(cert: str | os.PathLike | None, broker_key: str | os.PathLike | None):
    """PeerKeys when both are given, None when neither is; KeyFileError for one alone."""
    if cert is None and broker_key is None:
        return None
    if cert is None or broker_key is None:
        missing = (
            "the broker's public key (broker_key, --broker-key)"
            if cert
            else ("this peer's secret certificate (cert, --cert)")
        )
        raise KeyFileError(f"a broker with keys needs both keys; {missing} is missing")
    return PeerKeys.load(cert, broker_key)


@dataclass
class KeyRing:
    """The public keys the broker allows, by role: one directory of NAME.key files per role.

    `roles(key)` answers from the files as they were at the last `refresh()`, which reads them
    again only when a directory changed (its mtime, or the mtime of a file in it).
    """

    dirs: dict[str, Path]
    _roles: dict[bytes, frozenset[str]] = field(default_factory=dict)
    _seen: tuple = ()

    def __post_init__(self) -> None:
        for role, directory in self.dirs.items():
            if role not in ROLES:
                raise KeyFileError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
            if not directory.is_dir():
                raise KeyFileError(
                    f"the {role} keys' directory {directory} does not exist; make it with "
                    "`python -m broker.keys DIR`, or create it and copy NAME.key files into it"
                )
        self.refresh()

    @classmethod
    def from_layout(cls, directory: Path) -> KeyRing:
        return cls({role: directory / name for role, name in ROLE_DIRS.items()})

    def _state(self) -> tuple:
        state = []
        for directory in self.dirs.values():
            try:
                entries = sorted(directory.glob("*.key"))
                state.append((str(directory), directory.stat().st_mtime_ns))
                state.extend((str(p), p.stat().st_mtime_ns) for p in entries)
            except OSError:
                state.append((str(directory), None))
        return tuple(state)

    def refresh(self) -> bool:
        """Read the directories again if they changed; return whether they did."""
        state = self._state()
        if state == self._seen:
            return False
        roles: dict[bytes, set[str]] = {}
        for role, directory in self.dirs.items():
            for path in sorted(directory.glob("*.key")):
                try:
                    public, _ = zmq.auth.load_certificate(str(path))
                except (OSError, ValueError):
                    continue  # a file half written, or not a key: skipped until it changes
                roles.setdefault(public, set()).add(role)
        self._roles = {key: frozenset(r) for key, r in roles.items()}
        self._seen = state
        return True

    def roles(self, key: bytes) -> frozenset[str]:
        return self._roles.get(key, frozenset())

    def counts(self) -> dict[str, int]:
        return {role: sum(role in r for r in self._roles.values()) for role in self.dirs}


@dataclass(frozen=True)
class ServerKeys:
    """The broker's certificate and the keys it allows."""

    public: bytes
    secret: bytes
    ring: KeyRing

    @classmethod
    def load(cls, cert: str | os.PathLike, dirs: dict[str, Path]) -> ServerKeys:
        public, secret = load_secret(cert)
        return cls(public=public, secret=secret, ring=KeyRing(dirs))

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server (before it binds); ZAP checks each peer's key."""
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.zap_domain = b"layerline"


# The connection events of a refused CURVE handshake, on either side.
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)


def handshake_refusal(
    url: str,
    event: int,
    value: int,
    keys: PeerKeys | None,
    role: str = "client",
    sock_type: int = zmq.DEALER,
) -> str | None:
    """What a peer that connects to the broker at `url` with `keys` (None: without keys) from
    a socket of `sock_type` is told when its handshake fails (`event`, with the monitor's
    `value`), or None when the failure says nothing about keys (a peer that is not a broker, a
    connection to itself, a passing fault): then the wait goes on.

    A failure without detail is a peer that dropped the connection mid-handshake: a CURVE
    broker that could not read our hello (the wrong broker key), a broker of the other kind
    that saw our greeting first, or a proxy whose far side was not up. The mechanism in the
    broker's own greeting and, for CURVE, a second handshake with the same keys tell them
    apart."""
    with_keys = keys is not None
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"the broker at {url} refused this {role}'s key: its public key is not in the "
            f"broker's allowed {role}s (or was removed); ask the broker's operator to copy "
            f"this {role}'s NAME.key into the broker's {ROLE_DIRS.get(role, role + 's')} "
            "directory"
        )
    keyless = None
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value != zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return None
        keyless = with_keys
    elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        mechanism = peer_mechanism(url)
        if mechanism == "NULL":
            keyless = True
        elif mechanism == "CURVE":
            if keys is not None and curve_handshake(url, keys, sock_type) is not False:
                return None  # it succeeds now, or cannot be judged: a passing fault
            keyless = False
    if keyless is None or (keyless and not with_keys):
        return None  # nothing about keys, or a passing fault of a keyless link
    if keyless:
        return (
            f"the broker at {url} runs without keys, and this {role} was given keys; drop "
            "--cert and --broker-key, or start the broker with --keys"
        )
    if with_keys:
        return (
            f"the CURVE handshake with the broker at {url} failed: the broker key given "
            "(--broker-key) is not that broker's public key"
        )
    return (
        f"the broker at {url} requires keys; pass this {role}'s certificate (--cert "
        "NAME.key_secret) and the broker's public key (--broker-key broker.key)"
    )


def curve_handshake(url: str, keys: PeerKeys, sock_type: int = zmq.DEALER) -> bool | None:
    """Whether a CURVE handshake with `keys` from a socket of `sock_type` to `url` succeeds
    (None: no verdict within PROBE_S). Nothing is sent after it."""
    probe = zmq.Context.instance().socket(sock_type)
    probe.linger = 0
    keys.apply(probe)
    watch = probe.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED)
    try:
        probe.connect(url)
        if not watch.poll(PROBE_S * 1000):
            return None
        event = parse_monitor_message(watch.recv_multipart())["event"]
        return event == zmq.EVENT_HANDSHAKE_SUCCEEDED
    finally:
        probe.disable_monitor()
        watch.close(linger=0)
        probe.close(linger=0)


# How long the probe of a peer's greeting waits for it.
PROBE_S = 3.0
# The start of a ZMTP 3.0 greeting: signature and major version (rfc.zeromq.org/spec/23). A
# peer answers it with its whole greeting, mechanism included, and then waits for the rest of
# ours; sent whole, a mismatched mechanism could make it close before its own went out.
_GREETING_START = b"\xff" + bytes(8) + b"\x7f" + b"\x03"


def peer_mechanism(url: str) -> str | None:
    """The security mechanism that the ZeroMQ peer at `url` (tcp:// or ipc://) names in its
    greeting ("NULL" without keys, "CURVE" with them), or None when nothing there sends a
    greeting within PROBE_S (nothing listens, or a peer that is not ZeroMQ, or a proxy whose
    far side is down).

    A failed handshake's monitor event can be ambiguous: a peer of the other kind may drop the
    connection before this side reads its greeting, just as a CURVE broker that cannot read
    this side's hello does. The greeting itself is not: it comes before any key is used."""
    scheme, _, where = url.partition("://")
    try:
        if scheme == "tcp":
            host, _, port = where.rpartition(":")
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_S)
        elif scheme == "ipc":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(PROBE_S)
            sock.connect(where)
        else:
            return None
    except (OSError, ValueError):
        return None
    with sock:
        try:
            sock.sendall(_GREETING_START)
            greeting = b""
            while len(greeting) < 32:
                chunk = sock.recv(64 - len(greeting))
                if not chunk:
                    return None
                greeting += chunk
        except OSError:
            return None
    if greeting[0] != 0xFF or greeting[9] != 0x7F or greeting[10] < 3:
        return None
    return greeting[12:32].rstrip(b"\0").decode("ascii", "replace")
