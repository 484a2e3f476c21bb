"""A local checkpoint read without torch or transformers: its config, where each tensor lives,
its fingerprint, its context length and the digest of every tensor's bytes. A Hugging Face
directory (config.json and safetensors) is read here; a GGUF file by common/gguf.py, into the
same `CheckpointMeta`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from common.weights import matrix_bytes

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

# The fingerprint a stage sends in READY must be cheap to compute: it hashes the headers (the
# layout) and a sample of the bytes at both ends of each file. Every byte is covered later, by
# the tensor digests a stage sends in LOADED (see `DigestTable`).
SAMPLE_BYTES = 64 * 1024

# A tensor's digest: the first 16 bytes of SHA-256 over its bytes as the file stores them
# (safetensors' raw bytes, GGUF's quantized blocks). 128 bits leave no room to forge another
# tensor with the same digest, and keep a LOADED of a thousand tensors under 30 KiB. SHA-256,
# not BLAKE2b: OpenSSL's uses the CPU's SHA instructions, 0.85 against 0.42 GiB/s on one core of
# the 2-core EPYC VM of docs/architecture.md's figures.
DIGEST = "sha256-128"
DIGEST_BYTES = 16
# The digest file of a checkpoint: beside its weights (in a Hugging Face directory, next to a
# GGUF file), else, where that is not writable, under the user's cache directory.
DIGEST_FILE = "layerline-digests.json"
DIGEST_FILE_VERSION = 1
# Bytes read per call while hashing, and tensors hashed at once: the hash and the reads release
# the GIL, so a host with idle cores hashes on several (not measured: the 2-core VM of the
# figures had no idle core, and two threads hashed there as fast as one).
HASH_CHUNK = 8 << 20
HASH_THREADS = max(1, min(8, os.cpu_count() or 1))
# A LOADED's digests: per tensor, its index in the checkpoint's sorted tensor names, then its
# digest.
_DIGEST_RECORD = struct.Struct(f"<I{DIGEST_BYTES}s")

# A decoder layer's tensors: `model.layers.N.`, GPT-2's `h.N.`, GGUF's `blk.N.`.
_LAYER_KEY = re.compile(r"(?:^|\.)(?:layers|h|blk)\.(\d+)\.")
# Tensors of the first stage besides its layers (token and position embeddings) and of the
# last (final norm, head), in Hugging Face's names and GGUF's.
_EMBEDDING_KEYS = ("embed", "wte.weight", "wpe.weight", "token_embd.", "position_embd.")
_TIED_EMBEDDING_KEYS = ("embed_tokens", "wte.weight", "token_embd.weight")
_HEAD_KEYS = ("lm_head", "output.weight")


class CheckpointError(ValueError):
    """The checkpoint directory is missing, incomplete or corrupt."""


def new_digest() -> Any:
    """A hash object for one tensor's bytes; `.digest()[:DIGEST_BYTES]` is its digest."""
    return hashlib.sha256()


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]
    # Where the tensor's bytes lie in its file: [begin, end), from the file's start.
    span: tuple[int, int] = (0, 0)

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


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header, and where its data starts."""
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
    return header, 8 + length


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

    def weight_files(self) -> dict[str, Path]:
        """Each weight file by the name its tensors give (`TensorInfo.file`): in the checkpoint's
        directory, or the checkpoint itself (a GGUF file)."""
        if self.path.is_file():
            return {self.path.name: self.path}
        return {name: self.path / name for name in sorted({t.file for t in self.tensors.values()})}

    @cached_property
    def digest_table(self) -> DigestTable:
        """Every tensor's digest: read from the checkpoint's digest file where that is current,
        else computed by reading every weight file once (and written there)."""
        return load_digests(self)

    @cached_property
    def tensor_names(self) -> tuple[str, ...]:
        """The tensors' names, sorted: a LOADED names a tensor by its index here."""
        return tuple(sorted(self.tensors))

    def pack_digests(self, digests: Mapping[str, bytes]) -> bytes:
        """Tensor digests as a LOADED carries them (`Loaded.digests`)."""
        index = {name: i for i, name in enumerate(self.tensor_names)}
        return b"".join(_DIGEST_RECORD.pack(index[name], digests[name]) for name in sorted(digests))

    def unpack_digests(self, packed: bytes) -> dict[str, bytes]:
        """`pack_digests` undone; CheckpointError if the records are not whole or name no
        tensor of this checkpoint."""
        if len(packed) % _DIGEST_RECORD.size:
            raise CheckpointError(f"{len(packed)} bytes are not whole tensor digests")
        names = self.tensor_names
        out: dict[str, bytes] = {}
        for i, digest in _DIGEST_RECORD.iter_unpack(packed):
            if i >= len(names):
                raise CheckpointError(f"tensor index {i} is beyond the {len(names)} tensors")
            out[names[i]] = digest
        return out

    def digest_problem(self, packed: bytes, start: int, end: int) -> str | None:
        """What is wrong with the digests a stage sent for layers [start, end), or None: one
        that differs from this checkpoint's (the first, by name), a layer with none at all."""
        try:
            reported = self.unpack_digests(packed)
        except CheckpointError as e:
            return f"sent malformed tensor digests ({e})"
        table = self.digest_table.digests
        for name, digest in sorted(reported.items()):
            if table[name] != digest:
                return (
                    f"loaded tensor {name} with other bytes than the broker's checkpoint "
                    f"{self.path} holds (digest {digest.hex()}, expected {table[name].hex()})"
                )
        covered = {self.layer_of(name) for name in reported}
        missing = [g for g in range(start, end) if g not in covered]
        if missing:
            return f"sent no tensor digest for layer {missing[0]} of its layers [{start},{end})"
        return None

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

    def weight_bytes(
        self, dtype_bytes: int | None = None, weights: str | None = None
    ) -> dict[str, int]:
        """Bytes of weights per role: 'layer' (largest layer), 'first' and 'last' extras."""
        layers, first, last = self.role_bytes(dtype_bytes, weights)
        return {"layer": max(layers.values(), default=0), "first": first, "last": last}

    def role_bytes(
        self, dtype_bytes: int | None = None, weights: str | None = None
    ) -> tuple[dict[int, int], int, int]:
        """Bytes of each layer's weights, of the first stage's extras (embeddings) and of the
        last's (final norm, head; a tied head counts as a copy of the embedding), at
        `dtype_bytes` per element (None: as stored), with the weight matrices held as
        `weights` asks (common/weights.py; None: in that dtype too)."""

        def held(key: str, info: TensorInfo) -> int:
            float_bytes = dtype_bytes or DTYPE_BYTES.get(info.dtype, 4)
            matrix = self.layer_of(key) is not None or any(
                k in key for k in _TIED_EMBEDDING_KEYS + _HEAD_KEYS
            )
            if weights is None or not matrix or len(info.shape) != 2:
                return info.numel * float_bytes
            if weights == "bfloat16":
                return info.numel * 2
            return matrix_bytes(info.shape, weights, info.dtype, float_bytes)

        per_layer: dict[int, int] = {}
        first = last = 0
        for key, info in self.tensors.items():
            nbytes = held(key, info)
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
                    held(k, info)
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
        header, data_start = _read_header(file)
        digest.update(name.encode())
        digest.update(json.dumps(header, sort_keys=True).encode())
        digest.update(_sample(file))
        for key, info in header.items():
            if key != "__metadata__":
                begin, end = info["data_offsets"]
                tensors[key] = TensorInfo(
                    file=name,
                    dtype=info["dtype"],
                    shape=tuple(info["shape"]),
                    span=(data_start + begin, data_start + end),
                )
    return CheckpointMeta(
        path=path, raw_config=config, tensors=tensors, fingerprint=digest.hexdigest()[:16]
    )


# --- tensor digests -------------------------------------------------------------------------


@dataclass(frozen=True)
class DigestTable:
    """Every tensor's digest, by name, and what it cost: the bytes hashed now (0: every file's
    digests came from the digest file) and the digest file read or written (None: none could
    be written)."""

    digests: dict[str, bytes]
    hashed_bytes: int
    file: Path | None


def digest_files(meta: CheckpointMeta) -> list[Path]:
    """Where a checkpoint's digest file may be, in the order they are tried: beside its weights,
    then under the user's cache directory ($XDG_CACHE_HOME, else ~/.cache), named after the
    checkpoint's resolved path."""
    path = meta.path
    beside = path / DIGEST_FILE if path.is_dir() else path.with_name(f"{path.name}.{DIGEST_FILE}")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "layerline"
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return [beside, cache / f"{path.name}-{key}.{DIGEST_FILE}"]


def load_digests(meta: CheckpointMeta) -> DigestTable:
    """Every tensor's digest. A weight file whose path, size and mtime_ns a digest file lists is
    not read at all; the others are read once, and the digest file rewritten."""
    files = meta.weight_files()
    stats = {name: _file_key(file) for name, file in files.items()}
    names_by_file: dict[str, set[str]] = {name: set() for name in files}
    for key, info in meta.tensors.items():
        names_by_file[info.file].add(key)
    candidates = digest_files(meta)
    known: dict[str, dict[str, bytes]] = {}  # weight file name -> its tensors' digests
    read_from: Path | None = None
    for candidate in candidates:
        entries = _read_digest_file(candidate)
        for name, file in files.items():
            entry = entries.get(str(file.resolve()))
            current = _current(entry, stats[name], names_by_file[name])
            if name not in known and current is not None:
                known[name] = current
                read_from = read_from or candidate
    hashed = 0
    for name, file in files.items():
        if name in known:
            continue
        spans = {key: meta.tensors[key].span for key in names_by_file[name]}
        known[name] = _hash_file(file, spans)
        if _file_key(file) != stats[name]:
            raise CheckpointError(
                f"{file} changed while its tensors were hashed; start again once it is written"
            )
        hashed += sum(end - begin for begin, end in spans.values())
    written = read_from
    if hashed:
        document = {
            "version": DIGEST_FILE_VERSION,
            "digest": DIGEST,
            "files": {
                str(files[name].resolve()): {
                    "key": list(stats[name]),
                    "tensors": {k: d.hex() for k, d in digests.items()},
                }
                for name, digests in known.items()
            },
        }
        written = next((c for c in candidates if _write_digest_file(c, document)), None)
    digests = {key: d for per_file in known.values() for key, d in per_file.items()}
    return DigestTable(digests=digests, hashed_bytes=hashed, file=written)


def _current(entry: Any, key: tuple[int, int], names: set[str]) -> dict[str, bytes] | None:
    """A digest file's entry for a weight file, if it is of the file as it is now (the same size
    and mtime_ns) and whole (a well-formed digest for each of its tensors); else None."""
    if not isinstance(entry, dict) or entry.get("key") != list(key):
        return None
    tensors = entry.get("tensors")
    if not isinstance(tensors, dict) or set(tensors) != names:
        return None
    try:
        digests = {name: bytes.fromhex(value) for name, value in tensors.items()}
    except (TypeError, ValueError):
        return None
    return digests if all(len(d) == DIGEST_BYTES for d in digests.values()) else None


def _file_key(file: Path) -> tuple[int, int]:
    """What says a file is the one that was hashed: its size and modification time (ns)."""
    st = file.stat()
    return st.st_size, st.st_mtime_ns


def _read_digest_file(path: Path) -> dict[str, dict]:
    """The entries of a digest file by weight file path; none if it is missing, unreadable,
    of another version or of another digest."""
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(document, dict)
        or document.get("version") != DIGEST_FILE_VERSION
        or document.get("digest") != DIGEST
        or not isinstance(document.get("files"), dict)
    ):
        return {}
    return {k: v for k, v in document["files"].items() if isinstance(v, dict)}


def _write_digest_file(path: Path, document: dict) -> bool:
    """Write atomically (a reader sees the old file or the new one); False if not writable."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False


def _hash_file(file: Path, spans: Mapping[str, tuple[int, int]]) -> dict[str, bytes]:
    """The digest of each tensor's bytes [begin, end) of `file`, several tensors at once."""

    def digest(span: tuple[int, int]) -> bytes:
        h = new_digest()
        at, end = span
        while at < end:
            data = os.pread(fd, min(HASH_CHUNK, end - at), at)
            if not data:
                raise CheckpointError(f"{file} is truncated: re-download or rebuild the checkpoint")
            h.update(data)
            at += len(data)
        return h.digest()[:DIGEST_BYTES]

    names = sorted(spans, key=lambda name: spans[name])
    try:
        with open(file, "rb", buffering=0) as f:
            fd = f.fileno()
            with ThreadPoolExecutor(HASH_THREADS) as pool:
                digests = list(pool.map(digest, (spans[name] for name in names)))
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e}") from e
    return dict(zip(names, digests, strict=True))
