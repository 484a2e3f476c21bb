"""A client that needs only the broker's URL: the broker serves its checkpoint's tokenizer files
(TOKENIZER), in chunks, and the client caches them.

The broker runs on a checkpoint in a directory that is renamed once the cluster is ready, so
the path STATUS names does not exist for the client, as on another machine. Each client gets
a cache of its own (XDG_CACHE_HOME). Real processes and sockets throughout.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from transformers import AutoTokenizer

from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd, Code
from broker.tokenizer import TokenizerSource
from client import AsyncClient, Client
from common.checkpoint import CheckpointError, read_checkpoint
from common.models import builtin_model
from common.tokenizer_files import BundleError, cache_dir, export_dirs, failure_record, pack, unpack
from stage import tokenizer_export
from stage.demo_model import ensure_demo_model
from tests.cluster import Cluster
from tests.tiny_gguf import make_gguf

REPO = Path(__file__).resolve().parents[1]
CHUNK_KB = 16  # the demo tokenizer's bundle (125 KiB) takes 8 chunks
TEXT = "The quick brown fox jumps over the lazy dog."
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def run_cli(url: str, cache: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m client --json ...` in a process of its own, with its own cache."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "client", "--broker", url, "--json", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def served_bytes(cluster: Cluster) -> int:
    return cluster.status()["counters"]["tokenizer_bytes"]


def ask(url: str, query: M.Body) -> P.Message:
    """One request on a socket of its own, and the broker's answer."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    try:
        sock.send_multipart(P.encode(P.CLIENT_TAG, query))
        assert sock.poll(10_000), "no answer from the broker"
        return P.decode(sock.recv_multipart(), expect=P.CLIENT_TAG)
    finally:
        sock.close(linger=0)
        ctx.term()


@pytest.fixture
def hidden(tmp_path):
    """`serve(source)`: a copy of a checkpoint for a broker, and `hide()`, which renames its
    directory so that the path the broker names no longer exists."""

    class Hidden:
        def serve(self, source: Path) -> Path:
            self.dir = tmp_path / "served"
            if source.is_dir():
                shutil.copytree(source, self.dir)
                return self.dir
            self.dir.mkdir()
            return Path(shutil.copy(source, self.dir))

        def hide(self) -> Path:
            moved = self.dir.with_name("moved")
            os.rename(self.dir, moved)
            return moved

    return Hidden()


def use_cache(monkeypatch, root: Path) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    return root


@pytest.mark.timeout(240)
def test_client_fetches_caches_and_refetches_a_corrupt_copy(tmp_path, hidden, monkeypatch):
    demo = ensure_demo_model(tmp_path / "demo")
    served = hidden.serve(demo)
    args = ("--tokenizer-chunk-kb", str(CHUNK_KB))
    with Cluster(served, 1, broker_args=args) as cluster:
        status = cluster.wait_ready()
        info = status["tokenizer"]
        size = info["size"]
        assert size > 4 * CHUNK_KB << 10 and "tokenizer.json" in info["files"]
        assert served_bytes(cluster) == 0
        moved = hidden.hide()
        local = AutoTokenizer.from_pretrained(moved, local_files_only=True)

        # One chunk per reply, of at most --tokenizer-chunk-kb, naming the bundle.
        first = ask(cluster.url, M.TokenizerQuery(offset=0))
        assert first.cmd == Cmd.TOKENIZER
        assert (first.body.sha256, first.body.size, first.body.offset) == (info["sha256"], size, 0)
        assert len(first.frames[0]) == CHUNK_KB << 10
        last = ask(cluster.url, M.TokenizerQuery(offset=size - 5))
        assert len(last.frames[0]) == 5
        past = ask(cluster.url, M.TokenizerQuery(offset=size + 1))
        assert past.cmd == Cmd.ERROR and past.body.code == Code.BAD_REQUEST
        asked = served_bytes(cluster)
        assert asked == (CHUNK_KB << 10) + 5

        use_cache(monkeypatch, tmp_path / "cache-a")
        with Client(cluster.url) as client:
            assert served_bytes(cluster) == asked + size  # fetched once, chunk by chunk
            assert client.tokenizer(TEXT)["input_ids"] == local(TEXT)["input_ids"]
            ids = client.generate(CHAT, max_new_tokens=2).prompt_ids
            rendered = local.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
            assert ids == local(rendered, add_special_tokens=False)["input_ids"]
            assert client.model.eos_ids == {local.eos_token_id}
        cached = cache_dir(status["fingerprint"])
        assert cached.parent.parent == tmp_path / "cache-a" / "layerline"
        assert sorted(p.name for p in cached.iterdir()) == info["files"]

        # A second client, sync or async, uses the cache: nothing is fetched.
        with Client(cluster.url) as client:
            assert client.tokenizer(TEXT)["input_ids"] == local(TEXT)["input_ids"]

        async def async_ids() -> list[int]:
            async with AsyncClient(cluster.url) as client:
                return client.tokenizer(TEXT)["input_ids"]

        assert asyncio.run(async_ids()) == local(TEXT)["input_ids"]
        assert served_bytes(cluster) == asked + size

        # A cached copy that changed is fetched again, and replaced.
        tokenizer_json = cached / "tokenizer.json"
        good = tokenizer_json.read_bytes()
        tokenizer_json.write_bytes(good.replace(b'"<|eos|>"', b'"<|EOS|>"', 1))
        with Client(cluster.url) as client:
            assert client.tokenizer(TEXT)["input_ids"] == local(TEXT)["input_ids"]
        assert served_bytes(cluster) == asked + 2 * size
        assert tokenizer_json.read_bytes() == good

        # The async client fetches too, into a cache of its own.
        use_cache(monkeypatch, tmp_path / "cache-b")
        assert asyncio.run(async_ids()) == local(TEXT)["input_ids"]
        assert served_bytes(cluster) == asked + 3 * size

        # The command line fetches too; a cache it cannot write is one line of error.
        cli = run_cli(
            cluster.url, tmp_path / "cache-cli", "--prompt", TEXT, "--max-new-tokens", "1"
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["prompt_tokens"] == len(local(TEXT)["input_ids"])
        assert served_bytes(cluster) == asked + 4 * size
        (tmp_path / "not-a-dir").write_text("")
        cli = run_cli(cluster.url, tmp_path / "not-a-dir", "--prompt", TEXT)
        assert cli.returncode == 1 and cli.stdout == ""
        assert cli.stderr.startswith("error: cannot cache the broker's tokenizer in ")
        assert "set XDG_CACHE_HOME to a writable directory" in cli.stderr
        assert len(cli.stderr.splitlines()) == 1
        # It found so before it fetched anything.
        assert served_bytes(cluster) == asked + 4 * size
        asked = served_bytes(cluster)

        # --tokenizer stays an override: nothing fetched, the given files used.
        use_cache(monkeypatch, tmp_path / "cache-c")
        with Client(cluster.url, tokenizer=str(moved)) as client:
            assert client.tokenizer(TEXT)["input_ids"] == local(TEXT)["input_ids"]
        assert served_bytes(cluster) == asked
        assert not (tmp_path / "cache-c").exists()


@pytest.mark.timeout(240)
def test_gguf_tokenizer_is_exported_once_and_served(tmp_path, hidden, monkeypatch):
    """A GGUF checkpoint's tokenizer is exported as files beside it, by a subprocess that runs
    while the broker already serves, at its first start on the file (the GGUF file itself is
    never shipped); reused at the next start; fetched by the client."""
    gguf = hidden.serve(make_gguf("llama", tmp_path / "tiny.gguf"))
    use_cache(monkeypatch, tmp_path / "broker-cache")
    with Cluster(gguf, 1) as cluster:
        # Until the export is done, TOKENIZER is answered busy, and STATUS says preparing.
        answer = ask(cluster.url, M.TokenizerQuery())
        if answer.cmd == Cmd.ERROR:
            assert answer.body.code == Code.BUSY and answer.body.retry_after_s == 1.0
            assert "exporting the tokenizer of tiny.gguf" in answer.body.message
        else:
            assert cluster.status()["tokenizer"]["state"] == "ready"
        exported = lambda s: s["tokenizer"] is None or s["tokenizer"]["state"] == "ready"  # noqa: E731
        info = cluster.wait_for(exported, 120, "the tokenizer's export")["tokenizer"]
        assert info is not None
    exported = [p for p in gguf.parent.iterdir() if p.is_dir()]
    fingerprint = read_checkpoint(gguf).fingerprint
    assert [p.name for p in exported] == [f"{gguf.name}.layerline-tokenizer-{fingerprint}"]
    assert info["size"] < gguf.stat().st_size and "tokenizer.json" in info["files"]
    stamp = exported[0].stat().st_mtime_ns
    with Cluster(gguf, 1) as cluster:
        assert cluster.status()["tokenizer"] == info  # at once: not exported again
        assert exported[0].stat().st_mtime_ns == stamp
        moved = hidden.hide()
        local = AutoTokenizer.from_pretrained(moved, gguf_file=gguf.name, local_files_only=True)
        use_cache(monkeypatch, tmp_path / "client-cache")
        with Client(cluster.url) as client:
            assert served_bytes(cluster) == info["size"]
            assert client.tokenizer(TEXT)["input_ids"] == local(TEXT)["input_ids"]
            assert client.tokenizer.decode([5, 6, 7]) == local.decode([5, 6, 7])


@pytest.mark.timeout(120)
def test_bare_checkpoint_elsewhere_serves_token_ids(checkpoints, tmp_path, hidden, monkeypatch):
    """A checkpoint without a tokenizer: STATUS says none, TOKENIZER is refused with why, and
    a client elsewhere works with token ids."""
    served = hidden.serve(checkpoints["llama"])
    use_cache(monkeypatch, tmp_path / "cache")
    with Cluster(served, 1) as cluster:
        assert cluster.wait_ready()["tokenizer"] is None
        hidden.hide()
        refusal = ask(cluster.url, M.TokenizerQuery())
        assert refusal.cmd == Cmd.ERROR and refusal.body.code == Code.NO_TOKENIZER
        assert "no tokenizer" in refusal.body.message
        with Client(cluster.url) as client:
            assert client.tokenizer is None
            assert len(client.generate([3, 4, 5], max_new_tokens=3).token_ids) == 3
    assert not (tmp_path / "cache").exists()


def test_bundles_are_deterministic_and_checked():
    files = {"b.json": b"{}", "a.txt": b"x" * 10}
    bundle = pack(files)
    assert bundle == pack(dict(reversed(files.items())))
    assert bundle.files == ("a.txt", "b.json") and unpack(bundle.data) == files
    for broken in (bundle.data[:-1], b"nope" + bundle.data, bundle.data + b"\x00"):
        with pytest.raises(BundleError):
            unpack(broken)
    for name in ("../x", "a/b", ""):
        with pytest.raises(BundleError, match="plain file name"):
            pack({name: b""})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_builtin_model_tokenizer_and_chat_template_are_served(tmp_path, hidden, monkeypatch):
    """SmolLM2's GGUF file (a copy, so that nothing is written beside the installed one): its
    tokenizer and chat template reach a client that cannot see the file, as they load from it.
    A broker with no stage serves them."""
    try:
        builtin = builtin_model()
    except CheckpointError as e:
        pytest.skip(str(e))
    gguf = hidden.serve(builtin)
    use_cache(monkeypatch, tmp_path / "broker-cache")
    cluster = Cluster(gguf, 0)
    try:
        cluster.start_broker()
        exported = lambda s: s["tokenizer"] is None or s["tokenizer"]["state"] == "ready"  # noqa: E731
        info = cluster.wait_for(exported, 240, "the tokenizer's export")["tokenizer"]
        assert info is not None and info["size"] < 8 << 20
        moved = hidden.hide()
        local = AutoTokenizer.from_pretrained(moved, gguf_file=gguf.name, local_files_only=True)
        use_cache(monkeypatch, tmp_path / "client-cache")
        with Client(cluster.url) as client:
            assert served_bytes(cluster) == info["size"]
            assert client.tokenizer(TEXT)["input_ids"] == local(TEXT)["input_ids"]
            rendered = client.tokenizer.apply_chat_template(
                CHAT, add_generation_prompt=True, tokenize=False
            )
            assert rendered == local.apply_chat_template(
                CHAT, add_generation_prompt=True, tokenize=False
            )
            assert client.model.eos_ids == {local.eos_token_id, *_ids(cluster)}
    finally:
        cluster.close()


def _ids(cluster: Cluster) -> set[int]:
    eos = cluster.status()["eos_token_id"]
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def test_a_gguf_without_a_tokenizer_is_exported_once(tmp_path, monkeypatch):
    """An export that finds no tokenizer in the file says so and records it; the next broker
    start reads the record instead of exporting again, until transformers changes."""
    gguf = make_gguf("llama", tmp_path / "bare.gguf", tokenizer=False)
    use_cache(monkeypatch, tmp_path / "cache")
    candidates = export_dirs(gguf, read_checkpoint(gguf).fingerprint)
    export = subprocess.run(
        [sys.executable, "-m", "stage.tokenizer_export", str(gguf), *map(str, candidates)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert export.returncode == tokenizer_export.NO_TOKENIZER, export.stderr
    assert "bare.gguf holds no usable tokenizer" in export.stderr
    record = failure_record(candidates[0])
    assert "holds no usable tokenizer" in json.loads(record.read_text())["reason"]

    source = TokenizerSource(read_checkpoint(gguf))
    assert source.export is None and source.info() is None  # not exported again

    stale = json.loads(record.read_text()) | {"transformers": "0.0.0"}
    record.write_text(json.dumps(stale))
    source = TokenizerSource(read_checkpoint(gguf))  # another reader: exported again
    try:
        assert source.preparing
    finally:
        source.close()
