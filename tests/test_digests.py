"""Tensor digests: every byte a stage loads is compared with the broker's checkpoint.

The fingerprint of READY samples 64 KiB at each end of each weight file; a copy that differs
only in the middle passes it. The broker hashes every tensor once (and keeps the table in a
digest file), a stage hashes what it reads, and the broker refuses a stage whose LOADED
reports other digests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from common.checkpoint import DIGEST_FILE, SAMPLE_BYTES, digest_files, read_checkpoint
from stage.loading import load_shard
from tests.cluster import Cluster
from tests.tiny_gguf import make_gguf
from tests.tiny_models import CONFIGS

FORMATS = ("safetensors", "gguf")
# A tensor of layer 2 of 5: in the middle of its file, beyond the fingerprint's samples.
MIDDLE = {
    "safetensors": "model.layers.2.mlp.down_proj.weight",
    "gguf": "blk.2.ffn_down.weight",
}

EMBEDDING = {"safetensors": "model.embed_tokens.weight", "gguf": "token_embd.weight"}


def tiny_checkpoint(fmt: str, directory: Path) -> Path:
    """The tiny Llama in one float32 file: a safetensors directory, or a GGUF file."""
    if fmt == "gguf":
        return make_gguf("llama", directory / "tiny.gguf", "F32")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(directory)
    return directory


def scale_tensor(path: Path, key: str) -> Path:
    """Multiply the float32 tensor `key` by 1.5 in place: the file keeps its size."""
    meta = read_checkpoint(path)
    file = meta.weight_files()[meta.tensors[key].file]
    begin, end = meta.tensors[key].span
    with file.open("r+b") as f:
        f.seek(begin)
        values = np.frombuffer(f.read(end - begin), dtype=np.float32) * np.float32(1.5)
        f.seek(begin)
        f.write(values.tobytes())
    return file


@pytest.fixture(params=FORMATS)
def changed_copy(request, tmp_path) -> tuple[str, Path, Path]:
    """(format, original, a copy with one middle tensor scaled by 1.5)."""
    fmt = request.param
    original = tiny_checkpoint(fmt, tmp_path / "original")
    copy_dir = tmp_path / "copy"
    if original.is_dir():
        shutil.copytree(original, copy_dir)
        copy = copy_dir
    else:
        copy_dir.mkdir()
        copy = Path(shutil.copy(original, copy_dir / original.name))
    file = scale_tensor(copy, MIDDLE[fmt])
    meta = read_checkpoint(copy)
    begin, end = meta.tensors[MIDDLE[fmt]].span
    data_start = meta.gguf.header_bytes if fmt == "gguf" else 0
    assert begin > data_start + SAMPLE_BYTES and end < file.stat().st_size - SAMPLE_BYTES
    return fmt, original, copy


def test_a_copy_changed_in_the_middle_differs_in_that_tensor_alone(changed_copy):
    fmt, original, copy = changed_copy
    theirs, ours = read_checkpoint(copy), read_checkpoint(original)
    assert theirs.fingerprint == ours.fingerprint  # what READY checks does not see it
    a, b = theirs.digest_table.digests, ours.digest_table.digests
    assert a.keys() == b.keys() == set(ours.tensors)
    assert [key for key in a if a[key] != b[key]] == [MIDDLE[fmt]]


def test_a_stage_digests_the_bytes_it_reads_as_the_broker_does(changed_copy):
    fmt, original, copy = changed_copy
    meta = read_checkpoint(original)
    table = meta.digest_table.digests
    whole = load_shard(original, 0, 5)
    assert whole.digests == table  # every tensor read, each digest the broker's
    assert meta.digest_problem(meta.pack_digests(whole.digests), 0, 5) is None
    # A reshard moves layers 2-4, the norm and the head over: their digests come with them.
    part = load_shard(original, 2, 5, reuse=whole)
    embedding = EMBEDDING[fmt]
    kept = {
        k: d for k, d in table.items() if meta.layer_of(k) in (None, 2, 3, 4) and k != embedding
    }
    assert part.digests == kept
    assert meta.digest_problem(meta.pack_digests(part.digests), 2, 5) is None

    problem = meta.digest_problem(meta.pack_digests(load_shard(copy, 0, 5).digests), 0, 5)
    assert problem.startswith(f"loaded tensor {MIDDLE[fmt]} with other bytes than")
    assert str(original) in problem
    assert meta.digest_problem(meta.pack_digests(part.digests), 0, 5) == (
        "sent no tensor digest for layer 0 of its layers [0,5)"
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_digest_file_spares_every_read_until_a_file_changes(fmt, tmp_path):
    path = tiny_checkpoint(fmt, tmp_path / "ckpt")
    meta = read_checkpoint(path)
    first = meta.digest_table
    assert first.hashed_bytes == sum(end - begin for begin, end in _spans(meta))
    assert first.file == digest_files(meta)[0] and first.file.is_file()
    again = read_checkpoint(path).digest_table
    assert (again.hashed_bytes, again.digests, again.file) == (0, first.digests, first.file)

    # Other bytes, the same size and mtime: the digest file is believed, so the table stays
    # the old one. It would not, had any tensor been read.
    key = MIDDLE[fmt]
    stat = meta.weight_files()[meta.tensors[key].file].stat()
    file = scale_tensor(path, key)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    believed = read_checkpoint(path).digest_table
    assert (believed.hashed_bytes, believed.digests) == (0, first.digests)

    # A new mtime: the file is read again, and only the scaled tensor's digest changes.
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fresh = read_checkpoint(path).digest_table
    assert fresh.hashed_bytes == first.hashed_bytes
    assert [k for k in first.digests if first.digests[k] != fresh.digests[k]] == [key]
    assert read_checkpoint(path).digest_table.hashed_bytes == 0

    # A new size (the same mtime): read again.
    with file.open("ab") as f:
        f.write(b"\0" * 64)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert read_checkpoint(path).digest_table.hashed_bytes == first.hashed_bytes


def test_only_the_weight_file_that_changed_is_read_again(checkpoints, tmp_path):
    path = tmp_path / "llama"
    shutil.copytree(checkpoints["llama"], path)  # in several files
    meta = read_checkpoint(path)
    files = meta.weight_files()
    assert len(files) > 2
    first = meta.digest_table
    name = sorted(files)[1]
    files[name].touch()
    table = read_checkpoint(path).digest_table
    assert table.digests == first.digests
    assert table.hashed_bytes == sum(
        end - begin for key, (begin, end) in _named_spans(meta) if meta.tensors[key].file == name
    )


def test_the_digest_file_goes_to_the_user_cache_where_the_checkpoint_is_not_writable(
    checkpoints, tmp_path, monkeypatch
):
    path = tmp_path / "llama"
    shutil.copytree(checkpoints["llama"], path)
    (path / DIGEST_FILE).unlink(missing_ok=True)  # the original's, if a broker served it
    (path / DIGEST_FILE).mkdir()  # not a file that can be written, even by root
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    meta = read_checkpoint(path)
    table = meta.digest_table
    assert table.hashed_bytes > 0
    assert table.file == digest_files(meta)[1] and table.file.is_file()
    assert table.file.parent == tmp_path / "cache" / "layerline"
    again = read_checkpoint(path).digest_table
    assert (again.hashed_bytes, again.digests) == (0, table.digests)


@pytest.mark.timeout(240)
def test_a_stage_with_a_copy_changed_in_the_middle_is_refused_and_never_serves(
    changed_copy, tmp_path
):
    """A real broker serving the original, a real stage reading the copy: the stage registers
    (same fingerprint), loads, is refused on LOADED and exits; the map never becomes ready
    with it. A stage with the original then serves."""
    fmt, original, copy = changed_copy
    cluster = Cluster(original, 0, broker_args=("--expect-stages", "1"), log_dir=tmp_path / "logs")
    try:
        cluster.start_broker()
        cluster.wait_for(lambda s: True, 30, "broker answering")
        intruder = cluster.start_stage("intruder", "--model", str(copy))
        assert intruder.wait(timeout=150) == 3
        output = (tmp_path / "logs" / "intruder.log").read_text()
        assert (
            f"stage intruder loaded tensor {MIDDLE[fmt]} with other bytes than the broker's "
            f"checkpoint {original} holds"
        ) in output
        assert "give every stage the same checkpoint file as the broker" in output
        status = cluster.status()
        assert not status["ready"] and status["stages"] == []
        assert "ready" not in [event["kind"] for event in status["events"]]

        cluster.start_stage("s0")
        ready = cluster.wait_ready(120, stages=1)
        assert [r["stage"] for r in ready["map"]] == ["s0"]
    finally:
        cluster.close()


def _spans(meta) -> list[tuple[int, int]]:
    return [info.span for info in meta.tensors.values()]


def _named_spans(meta) -> list[tuple[str, tuple[int, int]]]:
    return [(key, info.span) for key, info in meta.tensors.items()]
