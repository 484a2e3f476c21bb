"""The broker process routes frames and reads checkpoint metadata: torch and transformers are
neither imported nor mapped, whether it serves a given checkpoint or builds the demo one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.checkpoint import read_checkpoint
from layerline.cluster import broker_status, free_port
from stage.checkpoint import open_checkpoint
from tests.tiny_models import ARCHITECTURES

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers")
# `python -m broker`, which prints at exit which of HEAVY it imported.
BROKER = (
    "import atexit, runpy, sys\n"
    f"atexit.register(lambda: print(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    "runpy.run_module('broker', run_name='__main__', alter_sys=True)\n"
)


def run_idle_broker(cwd: Path, *args: str, start_s: float) -> tuple[str, str]:
    """Start a broker with no stages, wait until it answers (not ready), stop it with SIGTERM:
    its memory map while it served, and what it printed at exit."""
    url = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", BROKER, "--bind", url, "--feed", "none", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + start_s
        status = None
        while status is None and proc.poll() is None and time.monotonic() < deadline:
            status = broker_status(url, 0.5)
        assert status is not None, f"the broker did not answer (exit code {proc.poll()})"
        assert status["ready"] is False
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    return maps, out


@pytest.mark.timeout(120)
def test_broker_serves_a_checkpoint_without_torch_or_transformers(checkpoints, tmp_path):
    maps, out = run_idle_broker(tmp_path, "--model", str(checkpoints["llama"]), start_s=60)
    assert "libtorch" not in maps
    assert out.strip() == "[]"


@pytest.mark.timeout(120)
def test_broker_serves_the_builtin_gguf_model_without_torch_or_transformers(tmp_path):
    """By default the broker serves the built-in GGUF file, reading its header only."""
    maps, out = run_idle_broker(tmp_path, start_s=60)
    assert "libtorch" not in maps
    assert out.strip() == "[]"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_broker_builds_the_demo_checkpoint_in_a_subprocess(tmp_path):
    maps, out = run_idle_broker(tmp_path, "--model", ".cache/demo-model", start_s=240)
    assert (tmp_path / ".cache/demo-model/tokenizer.json").is_file()
    assert "libtorch" not in maps
    assert out.strip() == "[]"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_stage_and_the_broker_read_the_same_checkpoint(checkpoints, arch):
    """Same fingerprint, layers, weight bytes and context length on both sides of the wire."""
    meta, full = read_checkpoint(checkpoints[arch]), open_checkpoint(checkpoints[arch])
    assert meta.fingerprint == full.fingerprint
    assert meta.num_layers == full.num_layers == full.config.num_hidden_layers
    assert meta.weight_bytes(4) == full.weight_bytes(4)
    assert meta.context_length == full.context_length == full.config.max_position_embeddings


def _held_pair() -> tuple[int, socket.socket]:
    """A port P, free a moment ago, and a listening socket that holds P + 1."""
    for _ in range(20):
        port = free_port()
        holder = socket.socket()
        try:
            holder.bind(("127.0.0.1", port + 1))
        except OSError:
            holder.close()
            continue
        holder.listen()
        return port, holder
    raise RuntimeError("no free pair of ports")


def _broker_refusal(checkpoint: Path, *args: str) -> str:
    """What `python -m broker` prints to stderr as it exits with code 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "broker", "--model", str(checkpoint), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    return run.stderr


@pytest.mark.timeout(120)
def test_a_taken_feed_port_is_named_as_the_feed(checkpoints):
    """Issue 19: the feed port (--bind port + 1 by default) held by another socket is reported
    as the feed's, with the option that moves it; the --bind port is free and not blamed."""
    port, holder = _held_pair()
    with holder:
        err = _broker_refusal(checkpoints["llama"], "--bind", f"tcp://127.0.0.1:{port}")
    feed = f"tcp://127.0.0.1:{port + 1}"
    assert (
        f"cannot bind the monitor feed (--feed; by default the --bind port + 1) {feed}: "
        "Address already in use; another process holds that port (another broker?): stop it, "
        "or pass --feed with a free endpoint, or --feed none to run without a feed"
    ) in err
    assert f":{port}:" not in err and "(--bind)" not in err


@pytest.mark.timeout(120)
def test_a_taken_bind_port_is_named_as_the_brokers(checkpoints):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = _broker_refusal(
            checkpoints["llama"], "--bind", f"tcp://127.0.0.1:{port}", "--feed", "none"
        )
    assert (
        f"cannot bind the broker (--bind) tcp://127.0.0.1:{port}: Address already in use; "
        "another process holds that port (another broker?): stop it, or pass --bind with a "
        "free port"
    ) in err
    assert "feed" not in err
