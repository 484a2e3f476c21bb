"""A checkpoint's tokenizer as files the broker serves to clients (docs/protocol.md, TOKENIZER).

The broker packs the tokenizer files of its checkpoint into one *bundle*: a deterministic,
length-prefixed archive whose SHA-256 names it. A client on another machine fetches the
bundle in chunks, checks the digest, and unpacks it into its cache, where the next client
finds it without fetching (it packs the cached files again and compares the digest). A GGUF
checkpoint keeps its tokenizer in its metadata: `python -m stage.tokenizer_export` writes it out
as files once, beside the GGUF file (or under the user's cache), and those are packed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

# What a Hugging Face directory ships of its tokenizer: the tokenizer's own files, its chat
# template, and the two configs the client reads the end-of-sequence ids and vocabulary from.
SHIPPED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
    "generation_config.json",
)
# A bundle's bounds: the largest tokenizers in use (Gemma's tokenizer.json) take 33 MiB, and a
# bundle lives in the broker's memory while it serves; what is larger is not a tokenizer.
MAX_BUNDLE_BYTES = 64 << 20
MAX_FILES = 64
MAX_NAME_LENGTH = 128
# The chunk of a bundle one TOKENIZER reply carries: under pyzmq's zero-copy threshold times
# sixteen, so a 3.5 MiB tokenizer takes four round trips, and far under the frame limit.
CHUNK_BYTES = 1 << 20

_MAGIC = b"LLTK1\n"
_ENTRY = struct.Struct("<HI")  # name length, file size
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
# A fingerprint is 16 hex digits; anything else from the wire is not used as a path.
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class BundleError(ValueError):
    """A bundle that is not one: truncated, oversized, or naming a file it may not."""


@dataclass(frozen=True)
class Bundle:
    """A packed tokenizer: its bytes, their SHA-256 (hex), and the files it holds."""

    data: bytes
    sha256: str
    files: tuple[str, ...]


def cache_root() -> Path:
    """layerline's cache directory: $XDG_CACHE_HOME/layerline, else ~/.cache/layerline."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "layerline"


def cache_dir(fingerprint: str) -> Path:
    """Where a checkpoint's tokenizer files are kept on a client (and, for a GGUF checkpoint
    whose directory is not writable, on the broker)."""
    key = (
        fingerprint if _KEY.match(fingerprint) else hashlib.sha256(fingerprint.encode()).hexdigest()
    )
    return cache_root() / "tokenizers" / key[:64]


def pack(files: dict[str, bytes]) -> Bundle:
    """One bundle of `files` (name -> bytes), in name order: the same files give the same bytes."""
    if len(files) > MAX_FILES:
        raise BundleError(f"{len(files)} tokenizer files; a bundle holds at most {MAX_FILES}")
    parts = [_MAGIC]
    for name in sorted(files):
        if not _NAME.match(name):
            raise BundleError(f"tokenizer file name {name!r} is not a plain file name")
        raw = name.encode()
        parts += [_ENTRY.pack(len(raw), len(files[name])), raw, files[name]]
    data = b"".join(parts)
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(
            f"the tokenizer files take {len(data)} bytes; a bundle holds at most "
            f"{MAX_BUNDLE_BYTES} ({MAX_BUNDLE_BYTES >> 20} MiB)"
        )
    return Bundle(data, hashlib.sha256(data).hexdigest(), tuple(sorted(files)))


def unpack(data: bytes) -> dict[str, bytes]:
    """The files of a bundle; BundleError if it is not a whole, well-formed one."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"a bundle of {len(data)} bytes exceeds {MAX_BUNDLE_BYTES}")
    if not data.startswith(_MAGIC):
        raise BundleError("not a layerline tokenizer bundle")
    files: dict[str, bytes] = {}
    at = len(_MAGIC)
    while at < len(data):
        if at + _ENTRY.size > len(data):
            raise BundleError("the bundle is truncated")
        name_len, size = _ENTRY.unpack_from(data, at)
        at += _ENTRY.size
        name = data[at : at + name_len].decode("utf-8", "replace")
        at += name_len
        if not _NAME.match(name) or name in files or len(files) >= MAX_FILES:
            raise BundleError(f"the bundle names file {name!r}, which it may not")
        if at + size > len(data):
            raise BundleError("the bundle is truncated")
        files[name] = data[at : at + size]
        at += size
    return files


def read_directory(directory: Path, names: tuple[str, ...] | None = None) -> dict[str, bytes]:
    """The regular files of `directory` (those of `names` only, where given) by name."""
    out = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.is_symlink() and (names is None or path.name in names):
            out[path.name] = path.read_bytes()
    return out


def cached_bundle(directory: Path, sha256: str) -> bool:
    """Whether `directory` holds exactly the files of the bundle named `sha256`."""
    try:
        return directory.is_dir() and pack(read_directory(directory)).sha256 == sha256
    except (OSError, BundleError):
        return False


def install(directory: Path, files: dict[str, bytes]) -> None:
    """Write `files` as `directory`, replacing what was there: written beside it, then renamed,
    so a reader sees the old directory, none, or the whole new one."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(directory)
        try:
            os.rename(staging, directory)
        except OSError:
            # Another process installed it meanwhile: theirs stays if it is whole.
            if not cached_bundle(directory, pack(files).sha256):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_dirs(gguf: Path, fingerprint: str) -> list[Path]:
    """Where a GGUF checkpoint's exported tokenizer files may be, in the order tried: beside the
    file, then under the user's cache; named after the checkpoint's fingerprint."""
    return [
        gguf.with_name(f"{gguf.name}.layerline-tokenizer-{fingerprint}"),
        cache_dir(fingerprint),
    ]


# What an export that found no usable tokenizer leaves in place of the files: the reason and the
# transformers release that read the file, so that the next start does not export again (16 to
# 26 s for a real vocabulary) unless transformers changed or the record is deleted.
FAILED_SUFFIX = ".failed"


def _reader_version() -> str | None:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def failure_record(out: Path) -> Path:
    """The record of a failed export into `out`."""
    return out.with_name(out.name + FAILED_SUFFIX)


def record_failure(outs: list[Path], reason: str) -> Path | None:
    """Write the record beside the first of `outs` whose directory takes it; its path."""
    text = json.dumps({"reason": reason, "transformers": _reader_version()})
    for out in outs:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            failure_record(out).write_text(text)
        except OSError:
            continue
        return failure_record(out)
    return None


def recorded_failure(outs: list[Path]) -> tuple[Path, str] | None:
    """An earlier export's failure that still holds (the same transformers release read the
    file): its record and reason."""
    for out in outs:
        path = failure_record(out)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("transformers") == _reader_version():
            return path, str(record.get("reason"))
    return None
