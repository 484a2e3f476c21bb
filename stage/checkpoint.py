"""A checkpoint as a stage opens it: the ground floor's metadata plus transformers' config, and
the one way to read named tensors from it (`Checkpoint.read_tensors`), which digests the bytes
it reads and refuses weights that are not finite."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from common.checkpoint import (
    CONFIG_FILE,
    DIGEST_BYTES,
    CheckpointError,
    CheckpointMeta,
    new_digest,
    read_checkpoint,
)

# Safetensors dtypes a matrix may be converted from, read a block of rows at a time.
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# Elements summed at a time by the check for NaN and infinity (`_all_finite`).
FINITE_CHUNK = 1 << 22


@dataclass(frozen=True)
class Checkpoint(CheckpointMeta):
    """A validated Hugging Face checkpoint with the `PretrainedConfig` that builds its layers."""

    config: PretrainedConfig

    def key_for(self, name: str) -> str | None:
        """The checkpoint's key for transformers' parameter `name`, or None if it has none."""
        if name in self.tensors:
            return name
        # Original GPT-2 checkpoints store the transformer's tensors without the prefix.
        bare = name.removeprefix("transformer.")
        return bare if bare in self.tensors else None

    def read_tensors(
        self,
        wanted: dict[str, str],
        dtype: torch.dtype,
        device: torch.device,
        digests: dict[str, bytes] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read exactly the named tensors (local name -> checkpoint key), grouped by file, and
        put the digest of each one's stored bytes in `digests`, by key."""
        by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for local, key in wanted.items():
            by_file[self.tensors[key].file].append((local, key))
        out: dict[str, torch.Tensor] = {}
        for file, items in sorted(by_file.items()):
            path = self.path / file
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for local, key in items:
                        stored = f.get_tensor(key)
                        if digests is not None:
                            digests[key] = tensor_digest(stored)
                        t = stored.to(dtype) if stored.is_floating_point() else stored
                        check_finite(self.path, key, stored, t)
                        out[local] = t.to(device)
            except CheckpointError:
                raise
            except (OSError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"cannot read tensors from {path}: {e}") from e
        return out

    def read_rows(
        self, key: str, rows: int, digests: dict[str, bytes] | None = None
    ) -> Iterator[torch.Tensor] | None:
        """A 2-D tensor as float32 blocks of `rows` rows, read one block at a time (the digest
        of its stored bytes goes into `digests` once the last block is read), so that it can
        be converted without a float copy of the whole; None where it cannot be read so."""
        info = self.tensors[key]
        if len(info.shape) != 2 or info.dtype not in _SAFETENSORS_DTYPES:
            return None
        return self._rows(key, rows, digests)

    def _rows(
        self, key: str, rows: int, digests: dict[str, bytes] | None
    ) -> Iterator[torch.Tensor]:
        """Plain reads of the tensor's bytes (a memory map's pages would count in the stage's
        memory while mapped), `rows` rows at a time."""
        info = self.tensors[key]
        dtype = _SAFETENSORS_DTYPES[info.dtype]
        path = self.path / info.file
        begin, end = info.span
        row_bytes = (end - begin) // info.shape[0]
        digest = new_digest()
        try:
            with open(path, "rb") as f:
                f.seek(begin)
                for at in range(0, info.shape[0], rows):
                    count = min(rows, info.shape[0] - at)
                    data = f.read(count * row_bytes)
                    if len(data) != count * row_bytes:
                        raise CheckpointError(
                            f"{path} ends inside tensor {key}; the file is truncated: "
                            "download or convert it again"
                        )
                    digest.update(data)
                    stored = torch.frombuffer(bytearray(data), dtype=dtype).view(count, -1)
                    block = stored.to(torch.float32)
                    check_finite(self.path, key, stored, block)
                    yield block
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {key} from {path}: {e}") from e
        if digests is not None:
            digests[key] = digest.digest()[:DIGEST_BYTES]

    def read_blocks(self, key: str, digests: dict[str, bytes] | None = None):
        """A matrix in the file's own quantized blocks (a stage/quant.QuantWeight), or None
        where the file holds it otherwise: only GGUF files have blocks."""
        return None


def tensor_digest(stored: torch.Tensor) -> bytes:
    """The digest of a tensor's bytes as the file stores them (safetensors: little-endian, in
    the file's dtype), the broker's `DigestTable` entry for it."""
    h = new_digest()
    h.update(stored.reshape(-1).view(torch.uint8).numpy())
    return h.digest()[:DIGEST_BYTES]


def check_finite(path: Path, key: str, stored: torch.Tensor, loaded: torch.Tensor) -> None:
    """Refuse a weight that holds NaN or infinity (`loaded`, in the compute dtype): one such
    value makes every output of the model NaN. `stored` (as read) tells a damaged file from a
    value that overflows the compute dtype."""
    if not loaded.is_floating_point() or _all_finite(loaded):
        return
    bad = int((~torch.isfinite(loaded)).sum())
    if stored.is_floating_point() and _all_finite(stored):
        raise CheckpointError(
            f"{path}: tensor {key} does not fit {loaded.dtype}: {bad} of its values become "
            "infinite; run the cluster in bfloat16 or float32 (--dtype)"
        )
    raise CheckpointError(
        f"{path}: tensor {key} holds {bad} non-finite values (NaN or infinity); the checkpoint "
        "is damaged: download or convert it again, and give every stage and the broker that file"
    )


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite. A NaN or an infinity makes a sum non-finite, so a
    finite sum clears a part in one pass (9.6 GiB/s on one core, where `isfinite(x).all()`
    writes a bool per element and does 0.44); a sum that overflows is checked exactly."""
    for part in t.reshape(-1).split(FINITE_CHUNK):
        if not torch.isfinite(part.sum(dtype=torch.float32)) and not torch.isfinite(part).all():
            return False
    return True


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a checkpoint (a Hugging Face directory, or a GGUF file or a directory holding
    one), index its tensors and read its transformers config."""
    meta = read_checkpoint(path)
    if meta.path.suffix == ".gguf":
        from stage.gguf import open_gguf

        return open_gguf(meta)
    try:
        config = AutoConfig.from_pretrained(meta.path, local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config
        raise CheckpointError(f"cannot read {meta.path / CONFIG_FILE}: {e}") from e
    return Checkpoint(
        path=meta.path,
        raw_config=meta.raw_config,
        tensors=meta.tensors,
        fingerprint=meta.fingerprint,
        config=config,
    )
