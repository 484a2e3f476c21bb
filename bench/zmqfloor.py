"""Baseline: the raw pyzmq floor of one hop, DEALER -> ROUTER -> DEALER, in three processes.

A driver DEALER sends one frame to a ROUTER that forwards it to an echo DEALER, which sends
it back the same way: a round trip is two hops of layerline's shape (sender, broker,
receiver), so the one-way floor of a hop is RTT/2. The ROUTER is the least a Python broker
can be: blocking receive, re-send of the same frame objects, nothing decoded.

`python -m bench.zmqfloor --payload BYTES --iters N` prints one JSON object; the router and
echo roles run as its own subprocesses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import zmq

DRIVER = b"driver"
ECHO = b"echo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_router(url: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(url)
    while True:
        frames = sock.recv_multipart(copy=False)
        src = frames[0].bytes
        if frames[1].bytes == b"stop":
            sock.send_multipart([ECHO, b"stop"])
            break
        # EHOSTUNREACH: the echo has not connected yet; the driver pings again.
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart([ECHO if src == DRIVER else DRIVER, *frames[1:]], copy=False)
    sock.close(linger=0)
    ctx.term()


def run_echo(url: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, ECHO)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[0].bytes == b"stop":
            break
        sock.send_multipart(frames, copy=False)
    sock.close(linger=0)
    ctx.term()


def measure(payload: int, iters: int, warmup: int) -> dict:
    url = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    me = [sys.executable, "-m", "bench.zmqfloor"]
    router = subprocess.Popen([*me, "--role", "router", "--url", url], env=env)
    echo = subprocess.Popen([*me, "--role", "echo", "--url", url], env=env)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, DRIVER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(url)
        frame = os.urandom(payload)
        # Ping until a reply comes back through the echo (the router drops frames for a peer
        # that has not connected yet), then swallow the replies to the extra pings.
        deadline = time.monotonic() + 30
        while not sock.poll(100):
            if time.monotonic() > deadline:
                raise RuntimeError("zmq floor: no echo through the router within 30 s")
            sock.send(b"ping")
        while sock.poll(300):
            sock.recv()
        rtts = []
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            sock.send(frame, copy=payload < zmq.COPY_THRESHOLD)
            sock.recv(copy=False)
            if i >= warmup:
                rtts.append(time.perf_counter() - t0)
        sock.send(b"stop")
    finally:
        sock.close(linger=0)
        ctx.term()
        for proc in (router, echo):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"payload_bytes": payload, "iters": iters, "rtt_s": rtts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.zmqfloor", description=__doc__)
    p.add_argument("--role", choices=("driver", "router", "echo"), default="driver")
    p.add_argument("--url")
    p.add_argument("--payload", type=int, default=2048)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    args = p.parse_args(argv)
    if args.role == "router":
        run_router(args.url)
    elif args.role == "echo":
        run_echo(args.url)
    else:
        print(json.dumps(measure(args.payload, args.iters, args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
