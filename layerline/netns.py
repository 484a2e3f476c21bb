"""Hosts on one machine, for the multi-host tests and the network benchmark: one Linux network
namespace per host, each with one veth link to a bridge in a switch namespace of its own, and
the calling process as one more host on it. A host's link can be cut, and its bandwidth
limited both ways with `tc`'s token bucket filter.

Every name carries a random tag, so that runs never meet; `Net.close()` (also on errors and
from `__exit__`) kills the processes it started and deletes every namespace and link it made.
`unavailable()` says why namespaces cannot be made (not root, no `ip`), for a clear skip.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

SUBNET = "10.213"  # 10.213.N.0/24, N random per Net
LOCAL = 254  # this process's address on the bridge: SUBNET.N.254


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the suite as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"llprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*argv: str) -> None:
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip()}")


def _ip(*args: str) -> None:
    _run("ip", *args)


class Net:
    """Hosts `names` on one bridge; `addr(name)` is a host's address, `local` this process's."""

    def __init__(self, names: list[str]):
        self.tag = secrets.token_hex(2)
        self.net = f"{SUBNET}.{secrets.randbelow(200) + 20}"
        self.switch = f"ll{self.tag}sw"
        self.hosts = {name: f"ll{self.tag}{name}" for name in names}
        self.local = f"{self.net}.{LOCAL}"
        self.procs: list[subprocess.Popen] = []
        self.ports: dict[str, str] = {}  # host -> its link's end on the bridge
        self._made: list[str] = []
        self._local_link = f"ll{self.tag}lo"

    def addr(self, name: str) -> str:
        return f"{self.net}.{list(self.hosts).index(name) + 1}"

    def __enter__(self) -> Net:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for name, ns in self.hosts.items():
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            self.ports[name] = self._plug(ns, f"{self.addr(name)}/24")
        self._plug(None, f"{self.local}/24")

    def _plug(self, ns: str | None, cidr: str) -> str:
        """A veth from `ns` (None: this process's namespace) to the bridge; its bridge end."""
        inner = f"ll{self.tag}{secrets.token_hex(2)}"
        outer = f"{inner}b"
        if ns is None:
            inner = self._local_link
        _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
        _ip("link", "set", outer, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", outer, "master", "br0")
        _ip("-n", self.switch, "link", "set", outer, "up")
        if ns is not None:
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            _ip("-n", ns, "addr", "add", cidr, "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        else:
            _ip("addr", "add", cidr, "dev", inner)
            _ip("link", "set", inner, "up")
        return outer

    def spawn(self, host: str, argv: list[str], log: Path, env: dict) -> subprocess.Popen:
        """Start `argv` on `host`, its output in `log`."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[host], *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def link(self, host: str, up: bool) -> None:
        """Cut or restore `host`'s only link."""
        _ip("-n", self.hosts[host], "link", "set", "eth0", "up" if up else "down")

    def limit(self, host: str, mbit: float | None) -> None:
        """Limit `host`'s link to `mbit` Mbit/s each way (None: no limit). Each end's token
        bucket holds 10 ms at that rate (at least 16 KiB), so that a burst never exceeds it
        by much, and queues 50 ms of it before dropping."""
        for ns, dev in ((self.hosts[host], "eth0"), (self.switch, self.ports[host])):
            subprocess.run(
                ["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True
            )  # none yet is fine
            if mbit is not None:
                burst = max(16 << 10, int(mbit * 1e6 / 8 / 100))
                _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", f"{mbit}mbit", "burst", str(burst), "latency", "50ms")  # fmt: skip

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        self.procs.clear()
        with contextlib.suppress(RuntimeError):
            _ip("link", "del", self._local_link)  # its peer goes with it
        for ns in reversed(self._made):
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", ns)
        self._made.clear()
