"""A local checkpoint read without torch or transformers: its config, where each tensor lives,
its fingerprint and its context length. A Hugging Face directory (config.json and safetensors)
is read here; a GGUF file by common/gguf.py, into the same `CheckpointMeta`."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# A safetensors header is a little-endian u64 length then that many bytes of JSON; a length
# above this is a corrupt or hostile file, not a checkpoint.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

# GPT-2's config.json names four attributes its own way; transformers reads them through
# GPT2Config.attribute_map, and so does read_config.
CONFIG_ALIASES = {
    "num_hidden_layers": "n_layer",
    "hidden_size": "n_embd",
    "max_position_embeddings": "n_positions",
    "num_attention_heads": "n_head",
}
# The context of a config that declares none: positions are then bounded by memory alone, and
# this stands in for "no limit" wherever a position is compared against the context.
UNDECLARED_CONTEXT = 1 << 30

# Hashing whole weight files would take minutes for large models; the headers pin the layout
# and a sample of the bytes at both ends of each file tells two fine-tunes apart.
SAMPLE_BYTES = 64 * 1024

# A decoder layer's tensors: `model.layers.N.`, GPT-2's `h.N.`, GGUF's `blk.N.`.
_LAYER_KEY = re.compile(r"(?:^|\.)(?:layers|h|blk)\.(\d+)\.")
# Tensors of the first stage besides its layers (token and position embeddings) and of the
# last (final norm, head), in Hugging Face's names and GGUF's.
_EMBEDDING_KEYS = ("embed", "wte.weight", "wpe.weight", "token_embd.", "position_embd.")
_TIED_EMBEDDING_KEYS = ("embed_tokens", "wte.weight", "token_embd.weight")
_HEAD_KEYS = ("lm_head", "output.weight")


class CheckpointError(ValueError):
    """The checkpoint directory is missing, incomplete or corrupt."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def context_length(config: Mapping[str, Any]) -> int:
    """Positions the model attends over: max_position_embeddings (GPT-2: n_positions)."""
    for key in ("max_position_embeddings", CONFIG_ALIASES["max_position_embeddings"]):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return UNDECLARED_CONTEXT


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, with GPT-2's attributes under their usual names too."""
    try:
        config = json.loads(path.read_bytes())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"cannot read {path}: it holds no JSON object")
    aliased = {name: config[alias] for name, alias in CONFIG_ALIASES.items() if alias in config}
    return {**aliased, **config}


def _read_header(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(
                    f"{path} is truncated (no safetensors header); re-download it"
                )
            (length,) = struct.unpack("<Q", raw)
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} has a corrupt safetensors header ({length} bytes)")
            header = json.loads(f.read(length))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read safetensors header of {path}: {e}") from e
    size = path.stat().st_size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if 8 + length + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {8 + length + end} "
                f"but the file has {size}; re-download or rebuild the checkpoint"
            )
    return header


def _sample(file: Path) -> bytes:
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(SAMPLE_BYTES)
        f.seek(max(0, size - SAMPLE_BYTES))
        return head + f.read(SAMPLE_BYTES)


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint directory, validated: config readable, every weight file present."""

    path: Path
    raw_config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    fingerprint: str

    @property
    def num_layers(self) -> int:
        return int(self.raw_config["num_hidden_layers"])

    @property
    def context_length(self) -> int:
        return context_length(self.raw_config)

    def layer_of(self, key: str) -> int | None:
        m = _LAYER_KEY.search(key)
        return int(m.group(1)) if m else None

    def tensor_bytes(self, keys: Iterable[str], dtype_bytes: int | None = None) -> int:
        total = 0
        for key in keys:
            info = self.tensors[key]
            total += info.numel * (dtype_bytes or DTYPE_BYTES.get(info.dtype, 4))
        return total

    def weight_bytes(self, dtype_bytes: int | None = None) -> dict[str, int]:
        """Bytes of weights per role: 'layer' (largest layer), 'first' and 'last' extras."""
        layers, first, last = self.role_bytes(dtype_bytes)
        return {"layer": max(layers.values(), default=0), "first": first, "last": last}

    def role_bytes(self, dtype_bytes: int | None = None) -> tuple[dict[int, int], int, int]:
        """Bytes of each layer's weights, of the first stage's extras (embeddings) and of the
        last's (final norm, head; a tied head counts as a copy of the embedding), at
        `dtype_bytes` per element (None: as stored)."""
        per_layer: dict[int, int] = {}
        first = last = 0
        for key, info in self.tensors.items():
            nbytes = info.numel * (dtype_bytes or DTYPE_BYTES.get(info.dtype, 4))
            layer = self.layer_of(key)
            if layer is not None:
                per_layer[layer] = per_layer.get(layer, 0) + nbytes
            elif any(k in key for k in _EMBEDDING_KEYS):
                first += nbytes
            else:
                last += nbytes
        if self.raw_config.get("tie_word_embeddings", False) and not any(
            k.startswith(_HEAD_KEYS) for k in self.tensors
        ):
            last += max(
                (
                    info.numel * (dtype_bytes or DTYPE_BYTES.get(info.dtype, 4))
                    for k, info in self.tensors.items()
                    if any(t in k for t in _TIED_EMBEDDING_KEYS)
                ),
                default=0,
            )
        return per_layer, first, last


def gguf_file_of(path: str | Path) -> Path | None:
    """The GGUF file a `--model` names: the file itself, or the one `.gguf` of a directory
    without a config.json. None for a Hugging Face directory."""
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"GGUF file {path} does not exist")
        return path
    if not path.is_dir() or (path / CONFIG_FILE).is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise CheckpointError(f"{path} holds several GGUF files ({names}); name one with --model")
    return files[0] if files else None


def read_checkpoint(directory: str | Path) -> CheckpointMeta:
    """Validate a checkpoint (a Hugging Face directory, or a GGUF file or a directory holding
    one) and index its tensors, without reading any weight."""
    gguf = gguf_file_of(directory)
    if gguf is not None:
        from common.gguf import read_gguf_checkpoint

        return read_gguf_checkpoint(gguf)
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(
            f"{path} has no config.json and no .gguf file; is it a Hugging Face checkpoint?"
        )
    config = read_config(config_file)
    try:
        layers = int(config.get("num_hidden_layers") or 0)
    except (TypeError, ValueError):
        layers = 0
    if layers < 1:
        raise CheckpointError(f"{config_file} declares no decoder layers (num_hidden_layers < 1)")

    index_file = path / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_file.read_bytes())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file} is corrupt: {e}") from e
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise CheckpointError(
            f"{path} has no {SINGLE_FILE} or {INDEX_FILE}; layerline reads safetensors weights only"
        )

    digest = hashlib.sha256(config_file.read_bytes())
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete: weight file {name} is missing")
        header = _read_header(file)
        digest.update(name.encode())
        digest.update(json.dumps(header, sort_keys=True).encode())
        digest.update(_sample(file))
        for key, info in header.items():
            if key != "__metadata__":
                tensors[key] = TensorInfo(
                    file=name, dtype=info["dtype"], shape=tuple(info["shape"])
                )
    return CheckpointMeta(
        path=path, raw_config=config, tensors=tensors, fingerprint=digest.hexdigest()[:16]
    )
