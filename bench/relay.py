"""`python -m bench.relay LISTEN=TARGET ...`: a TCP relay that delays every byte by a one-way
delay, each way, for the network benchmark (this kernel has no netem).

Each LISTEN address (host:port) accepts connections and joins each to a new connection to
its TARGET. What arrives is written on after `delay` seconds, in order, without holding back
what arrives meanwhile: the delay adds latency, not a bandwidth limit. Commands on stdin, one
per line, each answered with one JSON line on stdout:

    delay MS    set the one-way delay for what arrives from now on  -> {"delay_ms": MS}
    stats       how late each chunk was written against its due time -> {"chunks": N, ...}

The relay prints {"ready": true} once every address listens, and exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys

CHUNK = 1 << 16
# Lateness samples kept for `stats` (the newest).
SAMPLES = 100_000


class Relay:
    def __init__(self) -> None:
        self.delay_s = 0.0
        self.late_s: list[float] = []
        self.chunks = 0

    async def pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy `reader` to `writer`, each chunk written `delay_s` after it arrived."""
        loop = asyncio.get_running_loop()
        due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await due.get()
                if not data:
                    break
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                self.chunks += 1
                if len(self.late_s) < SAMPLES:
                    self.late_s.append(loop.time() - at)

        delivering = asyncio.create_task(deliver())
        try:
            while data := await reader.read(CHUNK):
                due.put_nowait((loop.time() + self.delay_s, data))
        except ConnectionError:
            pass
        due.put_nowait((0.0, b""))
        with contextlib.suppress(ConnectionError):
            await delivering
        writer.close()

    async def join(
        self, target: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        for w in (writer, up_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(asyncio.CancelledError):  # the relay is exiting
            await asyncio.gather(self.pipe(reader, up_writer), self.pipe(up_reader, writer))

    def command(self, line: str) -> dict:
        word, _, arg = line.strip().partition(" ")
        if word == "delay":
            self.delay_s = float(arg) / 1e3
            return {"delay_ms": float(arg)}
        if word == "stats":
            late = sorted(self.late_s)
            self.late_s.clear()
            return {
                "chunks": self.chunks,
                "late_p50_s": late[len(late) // 2] if late else None,
                "late_p99_s": late[int(len(late) * 0.99)] if late else None,
            }
        return {"error": f"unknown command {line.strip()!r}; use `delay MS` or `stats`"}


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(routes: list[str]) -> None:
    relay = Relay()
    servers = []
    for route in routes:
        listen, _, target = route.partition("=")
        to = _address(target)
        servers.append(
            await asyncio.start_server(
                lambda r, w, to=to: relay.join(to, r, w), *_address(listen), reuse_address=True
            )
        )
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    while line := await stdin.readline():
        print(json.dumps(relay.command(line.decode())), flush=True)
    for server in servers:
        server.close()


if __name__ == "__main__":
    if len(sys.argv) < 2 or any("=" not in a for a in sys.argv[1:]):
        sys.exit("usage: python -m bench.relay LISTEN_HOST:PORT=TARGET_HOST:PORT ...")
    asyncio.run(main(sys.argv[1:]))
