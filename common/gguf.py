"""A GGUF file read without torch or transformers: its metadata, where each tensor lives (and
so what its tensor digests cover: the quantized blocks), its fingerprint, and the config values
the broker plans with.

The header is parsed here, value by value, instead of with `gguf.GGUFReader`: the reader turns
every vocabulary entry into a numpy array (seconds, and tens of megabytes, for a 49k-token
vocabulary), while the broker needs a handful of numbers. Quant block sizes come from the
`gguf` package's own table.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.checkpoint import (
    SAMPLE_BYTES,
    UNDECLARED_CONTEXT,
    CheckpointError,
    CheckpointMeta,
    TensorInfo,
)

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Metadata arrays longer than this are counted, not kept: vocabularies and merges are read by
# the tokenizer, never by the broker or the stage's loader.
MAX_KEPT_ARRAY = 1024
# More tensors or keys than any real model has is a corrupt count, not a checkpoint.
MAX_COUNT = 1 << 24

_SCALARS = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: `shape` in torch order (GGUF stores dims innermost first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the file
    nbytes: int  # on disk, quantized

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def layer(self) -> int | None:
        """The decoder layer of a `blk.N.*` tensor."""
        if not self.name.startswith("blk."):
            return None
        index = self.name.split(".", 2)[1]
        return int(index) if index.isdigit() else None


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    header_bytes: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def field(self, key: str, default: Any = None) -> Any:
        """An architecture's key (`llama.block_count`) by its suffix (`block_count`)."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.at, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.buf):
            raise CheckpointError(
                f"{self.path} is truncated: its header ends at byte {len(self.buf)}; "
                "re-download the file"
            )
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.at + length > len(self.buf):
            raise CheckpointError(f"{self.path} is truncated inside its header; re-download it")
        raw = bytes(self.buf[self.at : self.at + length])
        self.at += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.path} has a corrupt header (a key is not UTF-8)"
            ) from None

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item = self.take("<I")
            count = self.take("<Q")
            if count > MAX_COUNT * 16:
                raise CheckpointError(f"{self.path} has a corrupt header (an array of {count})")
            if count > MAX_KEPT_ARRAY:
                self.skip(item, count)
                return _Skipped(count)
            return [self.value(item) for _ in range(count)]
        raise CheckpointError(f"{self.path} has a corrupt header (value type {kind})")

    def skip(self, item: int, count: int) -> None:
        if item in _SCALARS:
            self.at += struct.calcsize(_SCALARS[item]) * count
        elif item == _STRING:
            for _ in range(count):
                length = self.take("<Q")
                self.at += length
        else:
            for _ in range(count):
                self.value(item)
        if self.at > len(self.buf):
            raise CheckpointError(f"{self.path} is truncated inside its header; re-download it")


@dataclass(frozen=True)
class _Skipped:
    """A long metadata array, counted but not kept."""

    count: int

    def __len__(self) -> int:
        return self.count


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header and tensor table, and check every tensor lies in the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise CheckpointError(f"{path} is too short to be a GGUF file; re-download it")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    meta, tensors, version, data_start = _parse(view, path)
                finally:
                    view.release()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e

    table: dict[str, GGUFTensor] = {}
    for name, dims, ggml_type, rel in tensors:
        try:
            kind = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError):
            raise CheckpointError(
                f"{path}: tensor {name} has GGML type {ggml_type}, which this gguf package does "
                "not know; upgrade `gguf` or convert the file to a common quant type"
            ) from None
        numel = 1
        for d in dims:
            numel *= d
        if dims and dims[0] % block:
            raise CheckpointError(
                f"{path}: tensor {name} has {dims[0]} columns, not a multiple of "
                f"{kind.name}'s block of {block}; the file is corrupt"
            )
        nbytes = numel // block * type_size
        offset = data_start + rel
        if offset + nbytes > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {offset + nbytes} but the "
                f"file has {size}; re-download it"
            )
        table[name] = GGUFTensor(name, tuple(reversed(dims)), ggml_type, offset, nbytes)
    return GGUFFile(path, version, meta, table, data_start)


def _parse(view: memoryview, path: Path) -> tuple[dict, list, int, int]:
    cur = _Cursor(view, path)
    if bytes(view[:4]) != MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic); check the path")
    cur.at = 4
    version = cur.take("<I")
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path} is GGUF version {version}; layerline reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
        )
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
        raise CheckpointError(f"{path} has a corrupt header ({n_tensors} tensors, {n_kv} keys)")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.take("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if n_dims > 8:
            raise CheckpointError(f"{path}: tensor {name} has {n_dims} dimensions; corrupt file")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        tensors.append((name, dims, cur.take("<I"), cur.take("<Q")))
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1:
        raise CheckpointError(f"{path} has a corrupt header (alignment {alignment!r})")
    data_start = -(-cur.at // alignment) * alignment
    return meta, tensors, version, data_start


def gguf_config(gguf: GGUFFile) -> dict[str, Any]:
    """The config values the broker reads (layers, context, vocabulary, eos, tied head), under
    transformers' names. The stage builds its full config with transformers' own GGUF tables."""
    config: dict[str, Any] = {"model_type": gguf.architecture}
    layers = gguf.field("block_count")
    if isinstance(layers, int):
        config["num_hidden_layers"] = layers
    context = gguf.field("context_length")
    config["max_position_embeddings"] = (
        context if isinstance(context, int) and context > 0 else UNDECLARED_CONTEXT
    )
    vocab = gguf.field("vocab_size")
    if not isinstance(vocab, int):
        tokens = gguf.metadata.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else None
    if vocab is not None:
        config["vocab_size"] = vocab
    eos = gguf.metadata.get("tokenizer.ggml.eos_token_id")
    if isinstance(eos, int):
        config["eos_token_id"] = eos
    config["tie_word_embeddings"] = "output.weight" not in gguf.tensors
    return config


def gguf_fingerprint(gguf: GGUFFile) -> str:
    """The header (metadata and tensor table) and a sample of the data at both ends."""
    digest = hashlib.sha256()
    size = gguf.path.stat().st_size
    with gguf.path.open("rb") as f:
        digest.update(f.read(gguf.header_bytes))
        f.seek(gguf.header_bytes)
        digest.update(f.read(SAMPLE_BYTES))
        f.seek(max(gguf.header_bytes, size - SAMPLE_BYTES))
        digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class GGUFMeta(CheckpointMeta):
    """A GGUF checkpoint: `path` is the file, `tensors` are keyed by their GGUF names (the
    `blk.N.` ones are layer N's), typed by GGML type, shaped in torch order."""

    gguf: GGUFFile


def read_gguf_checkpoint(path: Path) -> GGUFMeta:
    gguf = read_gguf(path)
    config = gguf_config(gguf)
    if not isinstance(config.get("num_hidden_layers"), int) or config["num_hidden_layers"] < 1:
        raise CheckpointError(
            f"{path} declares no decoder layers ({gguf.architecture}.block_count); "
            "is it a language model?"
        )
    from gguf.constants import GGMLQuantizationType

    tensors = {
        name: TensorInfo(
            file=path.name,
            dtype=GGMLQuantizationType(t.ggml_type).name,
            shape=t.shape,
            span=(t.offset, t.offset + t.nbytes),
        )
        for name, t in gguf.tensors.items()
    }
    return GGUFMeta(
        path=path, raw_config=config, tensors=tensors, fingerprint=gguf_fingerprint(gguf), gguf=gguf
    )
