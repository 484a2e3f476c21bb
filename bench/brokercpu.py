"""Broker CPU per forwarded message, and whether it stays flat as the payload grows.

The real broker (`python -m broker`) serves synthetic peers that speak the protocol through
`broker/protocol.py`: fake stages register with the checkpoint's fingerprint, answer ASSIGN
with LOADED and every FORWARD with a RESULT at once (no compute), and a fake client keeps
several requests stepping. The first fake stage answers with an activation of the chosen
payload size; the later ones echo the frames they were given, so every hop carries it.
The broker's CPU time (psutil, user + system) over the measured window, divided by the
messages it forwarded (`counters.forwarded`), is the cost per message; the broker's main
thread (its Python loop) is reported apart from libzmq's I/O threads, which do the kernel
socket reads and writes.
"""

from __future__ import annotations

import os
import socket as pysocket
import subprocess
import threading
import time
from pathlib import Path

import msgspec
import psutil
import zmq

from bench.cluster import bench_env
from bench.stats import summary
from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd
from layerline.cluster import PY, broker_status, free_port

# Fake requests restart well before the demo model's 2048 positions.
MAX_POS = 1500
HEARTBEAT_S = 0.2


class FakePeers:
    """Fake stages and one fake client on DEALER sockets, served by one thread."""

    def __init__(
        self, url: str, checkpoint, dtype: str, stages: int, inflight: int, credits: int = 4
    ):
        self.url = url
        self.checkpoint = checkpoint
        self.fingerprint = checkpoint.fingerprint
        self.dtype = dtype
        self.n_stages = stages
        self.inflight = inflight
        self.credits = credits
        self.payload = 4096
        self.errors: list[dict] = []
        self.results = 0
        self.rtts: list[float] = []  # client step round trips (send STEP -> RESULT), seconds
        self._go = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-peers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def start_client(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        ctx = zmq.Context()
        stages = []
        for i in range(self.n_stages):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, os.urandom(8))
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.url)
            stages.append({"sock": sock, "name": f"fake{i}", "first": False, "progress": 0})
        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.IDENTITY, b"fakeclient." + os.urandom(4).hex().encode())
        client.setsockopt(zmq.LINGER, 0)
        client.connect(self.url)
        poller = zmq.Poller()
        for st in stages:
            poller.register(st["sock"], zmq.POLLIN)
            self._send_ready(st)
        poller.register(client, zmq.POLLIN)
        streams: dict[str, dict] = {}
        payload_size, payload = 0, None
        next_beat = 0.0
        try:
            while not self._stop.is_set():
                if self.payload != payload_size:
                    payload_size = self.payload
                    # Never modified after it is sent with copy=False; reused for every reply.
                    payload = memoryview(bytearray(payload_size))
                now = time.monotonic()
                if now >= next_beat:
                    for st in stages:
                        beat = M.StageHeartbeat(progress=st["progress"])
                        st["sock"].send_multipart(P.encode(P.STAGE_TAG, beat))
                    client.send_multipart(P.encode(P.CLIENT_TAG, M.Ping()))
                    next_beat = now + HEARTBEAT_S
                if self._go.is_set() and not streams:
                    for k in range(self.inflight):
                        rid = f"fake-{os.getpid()}-{k}.0"
                        streams[rid] = {
                            "pos": 0,
                            "seq": 0,
                            "base": f"fake-{os.getpid()}-{k}",
                            "gen": 0,
                        }
                        streams[rid]["sent"] = time.perf_counter()
                        client.send_multipart(self._step(rid, streams[rid]))
                for sock, _ in poller.poll(50):
                    while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        frames = sock.recv_multipart(copy=False)
                        if sock is client:
                            self._on_client(client, frames, streams)
                        else:
                            st = next(s for s in stages if s["sock"] is sock)
                            self._on_stage(st, frames, payload_size, payload)
        finally:
            for st in stages:
                st["sock"].close(linger=0)
            client.close(linger=0)
            ctx.term()

    def _send_ready(self, st: dict) -> None:
        caps = M.Caps(
            device="cpu",
            dtype=self.dtype,
            memory_bytes=64 << 30,
            host=pysocket.gethostname(),
            pid=os.getpid(),
        )
        ready = M.Ready(
            name=st["name"], fingerprint=self.fingerprint, caps=caps, credits=self.credits
        )
        st["sock"].send_multipart(P.encode(P.STAGE_TAG, ready))

    def _on_stage(self, st: dict, frames: list, payload_size: int, payload) -> None:
        msg = P.decode(frames, expect=P.STAGE_TAG)
        body = msg.body
        sock = st["sock"]
        if msg.cmd == Cmd.ASSIGN:
            st["first"] = body.start == 0 and body.end > 0
            # The digests of its layers' tensors, as a stage that read them reports.
            ckpt = self.checkpoint
            digests = {
                key: digest
                for key, digest in ckpt.digest_table.digests.items()
                if ckpt.layer_of(key) in range(body.start, body.end)
            }
            loaded = M.Loaded(
                epoch=body.epoch,
                start=body.start,
                end=body.end,
                digests=ckpt.pack_digests(digests),
            )
            sock.send_multipart(P.encode(P.STAGE_TAG, loaded))
        elif msg.cmd == Cmd.FORWARD:
            if st["first"]:
                desc = P.TensorDesc("float32", (1, 1, payload_size // 4))
                tensors = [(desc, payload) for _ in body.items]
            else:
                tensors = list(zip(msg.descs, msg.frames, strict=True))
            reply = M.ForwardResult(fid=body.fid, epoch=body.epoch, batch=len(body.items))
            sock.send_multipart(P.encode(P.STAGE_TAG, reply, tensors), copy=False)
            st["progress"] += len(body.items)
        elif msg.cmd == Cmd.ERROR:
            self.errors.append(msgspec.to_builtins(body))
        elif msg.cmd == Cmd.BYE:
            self._send_ready(st)

    def _step(self, rid: str, stream: dict) -> list:
        ids = P.TensorDesc("int64", (1, 1)), (stream["pos"] % 1000 + 3).to_bytes(8, "little")
        step = M.Step(rid=rid, seq=stream["seq"], pos=stream["pos"], n=1, prev=0, hash=0)
        return P.encode(P.CLIENT_TAG, step, [ids])

    def _on_client(self, client: zmq.Socket, frames: list, streams: dict) -> None:
        msg = P.decode(frames, expect=P.CLIENT_TAG)
        if msg.cmd == Cmd.ERROR:
            self.errors.append(msgspec.to_builtins(msg.body))
        # Steps that finish together come back as one RESULTS: each answers its own stream.
        for single in P.unbundle(msg) if msg.cmd == Cmd.RESULTS else [msg]:
            self._answer(client, single, streams)

    def _answer(self, client: zmq.Socket, msg: P.Message, streams: dict) -> None:
        rid = getattr(msg.body, "rid", None)
        if rid not in streams or msg.cmd not in (Cmd.RESULT, Cmd.EVENT):
            return
        stream = streams[rid]
        if msg.cmd == Cmd.RESULT:
            self.results += 1
            self.rtts.append(time.perf_counter() - stream["sent"])
            stream["pos"] += 1
        else:  # reshard or replay: start the request again
            stream["pos"] = 0
        stream["seq"] += 1
        if stream["pos"] >= MAX_POS:
            client.send_multipart(P.encode(P.CLIENT_TAG, M.End(rid=rid)))
            del streams[rid]
            stream = {**stream, "pos": 0, "seq": 0, "gen": stream["gen"] + 1}
            rid = f"{stream['base']}.{stream['gen']}"
            streams[rid] = stream
        stream["sent"] = time.perf_counter()
        client.send_multipart(self._step(rid, stream))


def _cpu(proc: psutil.Process) -> tuple[float, float]:
    """(whole process, main thread) CPU seconds, user + system."""
    t = proc.cpu_times()
    main = next((th for th in proc.threads() if th.id == proc.pid), None)
    return t.user + t.system, (main.user_time + main.system_time) if main else float("nan")


def _start_broker(
    url: str, model_dir: Path, dtype: str, stages: int, max_mb: int, out
) -> subprocess.Popen:
    return subprocess.Popen(
        [
            PY,
            "-m",
            "broker",
            "--bind",
            url,
            "--feed",
            "none",
            "--model",
            str(model_dir),
            "--dtype",
            dtype,
            "--expect-stages",
            str(stages),
            "--max-frame-mb",
            str(max_mb),
            "--log-level",
            "warning",
        ],
        env=bench_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def _wait_ready(url: str, broker: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while True:
        status = broker_status(url, 1.0)
        if status is not None and status["ready"]:
            return
        if broker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"broker-cpu: the broker never became ready with fake stages: {status}"
            )
        time.sleep(0.1)  # polling another process


def measure_hop(
    model_dir: Path,
    payload: int,
    seconds: float,
    *,
    stages: int = 3,
    dtype: str = "float32",
    log_dir: Path | None = None,
) -> dict:
    """One step in flight through the real broker and instant fake stages: the latency of a hop
    with the broker in it but no stage internals (no compute thread, no shard)."""
    from stage.checkpoint import open_checkpoint

    url = f"tcp://127.0.0.1:{free_port()}"
    out = open(log_dir / "broker-hop.log" if log_dir else os.devnull, "ab")  # noqa: SIM115
    broker = _start_broker(url, model_dir, dtype, stages, 64, out)
    peers = FakePeers(url, open_checkpoint(model_dir), dtype, stages, inflight=1)
    peers.payload = payload
    try:
        peers.start()
        _wait_ready(url, broker)
        peers.start_client()
        time.sleep(min(1.0, seconds / 3))
        peers.rtts.clear()
        time.sleep(seconds)
        rtts = list(peers.rtts)
    finally:
        peers.stop()
        broker.kill()
        broker.wait(timeout=10)
        out.close()
    rtt = summary(rtts)
    return {
        "stages": stages,
        "payload_bytes": payload,
        "step_rtt_s": rtt,
        "hops_per_step": stages + 1,
        "per_hop_s": rtt["p50"] / (stages + 1),
        "errors": peers.errors[:10],
    }


def measure(
    model_dir: Path,
    payloads: list[int],
    seconds: float,
    warmup_s: float,
    *,
    stages: int = 3,
    inflight: int = 8,
    dtype: str = "float32",
    log_dir: Path | None = None,
    log=print,
) -> dict:
    """Run the broker with fake peers at each payload size; CPU per forwarded message."""
    from stage.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(model_dir)
    url = f"tcp://127.0.0.1:{free_port()}"
    max_mb = max(64, 4 * max(payloads) >> 20)
    out = open(log_dir / "broker-cpu.log" if log_dir else os.devnull, "ab")  # noqa: SIM115
    broker = _start_broker(url, model_dir, dtype, stages, max_mb, out)
    peers = FakePeers(url, checkpoint, dtype, stages, inflight)
    try:
        proc = psutil.Process(broker.pid)
        peers.start()
        _wait_ready(url, broker)
        peers.start_client()
        points = []
        for size in payloads:
            peers.payload = size
            time.sleep(warmup_s)
            s0, (c0, m0), t0 = broker_status(url, 5.0), _cpu(proc), time.monotonic()
            time.sleep(seconds)
            s1, (c1, m1), t1 = broker_status(url, 5.0), _cpu(proc), time.monotonic()
            if s0 is None or s1 is None:
                raise RuntimeError("broker-cpu: the broker stopped answering STATUS")
            forwarded = s1["counters"]["forwarded"] - s0["counters"]["forwarded"]
            fbytes = s1["counters"]["forwarded_bytes"] - s0["counters"]["forwarded_bytes"]
            point = {
                "payload_bytes": size,
                "seconds": t1 - t0,
                "forwarded": forwarded,
                "forwarded_bytes": fbytes,
                "messages_per_s": forwarded / (t1 - t0),
                "cpu_s": c1 - c0,
                "main_thread_cpu_s": m1 - m0,
                "us_per_message": 1e6 * (c1 - c0) / forwarded if forwarded else None,
                "main_thread_us_per_message": 1e6 * (m1 - m0) / forwarded if forwarded else None,
                "cpu_utilisation": (c1 - c0) / (t1 - t0),
            }
            points.append(point)
            log(
                f"  broker-cpu {size >> 10:>6} KiB: {point['messages_per_s']:,.0f} msg/s, "
                f"{point['us_per_message'] or float('nan'):.1f} us/msg (main thread "
                f"{point['main_thread_us_per_message'] or float('nan'):.1f})"
            )
    finally:
        peers.stop()
        broker.kill()
        broker.wait(timeout=10)
        out.close()
    return {
        "stages": stages,
        "inflight": inflight,
        "points": points,
        "errors": peers.errors[:10],
        "error_count": len(peers.errors),
    }
