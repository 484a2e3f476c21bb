"""Bad checkpoints, ranges, configs and dtypes get a clear error, and nothing is changed."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from common.checkpoint import CheckpointError, read_checkpoint
from stage.adapters import UnsupportedArchitecture
from stage.loading import load_shard
from stage.shard import ShardError
from tests.tiny_gguf import make_gguf


def _digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture
def llama(checkpoints, tmp_path):
    directory = tmp_path / "llama"
    shutil.copytree(checkpoints["llama"], directory)
    return directory


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_shard(tmp_path / "nope", 0, 1)


def test_missing_config(llama):
    (llama / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_shard(llama, 0, 1)


def test_missing_weight_file(llama):
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (llama / victim).unlink()
    with pytest.raises(CheckpointError, match=f"{victim} is missing"):
        load_shard(llama, 0, 1)


def test_no_weights_at_all(llama):
    for f in llama.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        load_shard(llama, 0, 1)


def test_truncated_weight_file(llama):
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    victim = llama / sorted(set(index["weight_map"].values()))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    before = _digest(llama)
    with pytest.raises(CheckpointError, match="truncated"):
        load_shard(llama, 0, 5)
    assert _digest(llama) == before


def test_garbage_header(llama):
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    victim = llama / sorted(set(index["weight_map"].values()))[0]
    victim.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="header"):
        load_shard(llama, 0, 1)


def test_corrupt_index(llama):
    (llama / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_shard(llama, 0, 1)


def test_tensor_missing_from_files(llama):
    # The index claims a tensor that no file holds: the shard needing it must say which.
    index_file = llama / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"]["model.layers.3.mlp.up_proj.weight"]
    index_file.write_text(json.dumps(index))
    load_shard(llama, 0, 3)  # layers it does not own are not its business
    # The tensor still exists in its file, so remove it from the files too by rewriting one.
    from safetensors.torch import load_file, save_file

    for f in llama.glob("*.safetensors"):
        tensors = load_file(f)
        if tensors.pop("model.layers.3.mlp.up_proj.weight", None) is not None:
            save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        load_shard(llama, 3, 5)


def test_wrong_shape_tensor(llama):
    from safetensors.torch import load_file, save_file

    for f in llama.glob("*.safetensors"):
        tensors = load_file(f)
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"] = torch.ones(7)
            save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_shard(llama, 4, 5)


@pytest.mark.parametrize(
    "start,end,message",
    [
        (2, 2, "empty or inverted"),
        (3, 1, "empty or inverted"),
        (-1, 2, "outside"),
        (0, 6, "outside"),
        (0.5, 2, "integers"),
    ],
)
def test_bad_layer_range(checkpoints, start, end, message):
    with pytest.raises(ShardError, match=message):
        load_shard(checkpoints["llama"], start, end)


def test_config_without_decoder_layers(llama):
    config = json.loads((llama / "config.json").read_text())
    config["num_hidden_layers"] = 0
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no decoder layers"):
        load_shard(llama, 0, 1)


def test_unreadable_config(llama):
    (llama / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_shard(llama, 0, 1)


def test_unsupported_architecture(llama):
    config = json.loads((llama / "config.json").read_text())
    config["model_type"] = "bert"
    config["architectures"] = ["BertForMaskedLM"]
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="supports: gemma, gpt2, llama"):
        load_shard(llama, 0, 1)


def test_unknown_dtype(checkpoints):
    with pytest.raises(ShardError, match="unknown dtype 'float8'"):
        load_shard(checkpoints["llama"], 0, 1, dtype="float8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable(checkpoints):
    with pytest.raises(ShardError, match="CUDA is not available"):
        load_shard(checkpoints["llama"], 0, 1, device="cuda")


def test_dtype_the_device_cannot_run(checkpoints):
    with pytest.raises(ShardError, match="cannot run"):
        load_shard(checkpoints["llama"], 0, 1, dtype=torch.complex32)


def _set_values(directory, key: str, values: list[float]) -> None:
    """Overwrite the first float32 values of tensor `key` in its file (same size)."""
    meta = read_checkpoint(directory)
    info = meta.tensors[key]
    assert info.dtype == "F32"
    with (directory / info.file).open("r+b") as f:
        f.seek(info.span[0])
        f.write(np.array(values, dtype=np.float32).tobytes())


def test_nan_weights_are_refused_naming_the_tensor(llama):
    key = "model.layers.1.mlp.down_proj.weight"
    _set_values(llama, key, [float("nan")] * 15 + [float("inf")])
    load_shard(llama, 0, 1)  # a stage without that layer loads
    with pytest.raises(CheckpointError) as info:
        load_shard(llama, 1, 3)
    assert str(info.value) == (
        f"{llama}: tensor {key} holds 16 non-finite values (NaN or infinity); the checkpoint "
        "is damaged: download or convert it again, and give every stage and the broker that file"
    )


def test_a_weight_beyond_float16_is_refused_in_float16(llama):
    key = "model.layers.0.mlp.up_proj.weight"
    _set_values(llama, key, [1e5, -7e4])
    load_shard(llama, 0, 1, dtype="bfloat16")
    with pytest.raises(CheckpointError) as info:
        load_shard(llama, 0, 1, dtype="float16")
    assert str(info.value) == (
        f"{llama}: tensor {key} does not fit torch.float16: 2 of its values become infinite; "
        "run the cluster in bfloat16 or float32 (--dtype)"
    )


def test_nan_weights_of_a_gguf_file_are_refused_naming_the_tensor(tmp_path):
    path = make_gguf("llama", tmp_path / "tiny.gguf", "F32")
    info = read_checkpoint(path).tensors["blk.3.ffn_down.weight"]
    with path.open("r+b") as f:
        f.seek(info.span[0] + 64)
        f.write(np.full(8, np.nan, dtype=np.float32).tobytes())
    load_shard(path, 0, 3)
    with pytest.raises(CheckpointError) as error:
        load_shard(path, 3, 5)
    assert str(error.value).startswith(
        f"{path}: tensor blk.3.ffn_down.weight holds 8 non-finite values (NaN or infinity)"
    )
