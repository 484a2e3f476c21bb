"""A checkpoint as a stage opens it: the ground floor's metadata plus transformers' config, and
the one way to read named tensors from it (`Checkpoint.read_tensors`)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from common.checkpoint import CONFIG_FILE, CheckpointError, CheckpointMeta, read_checkpoint


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
        self, wanted: dict[str, str], dtype: torch.dtype, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Read exactly the named tensors (local name -> checkpoint key), grouped by file."""
        by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for local, key in wanted.items():
            by_file[self.tensors[key].file].append((local, key))
        out: dict[str, torch.Tensor] = {}
        for file, items in sorted(by_file.items()):
            path = self.path / file
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for local, key in items:
                        t = f.get_tensor(key)
                        if t.is_floating_point():
                            t = t.to(dtype)
                        out[local] = t.to(device)
            except (OSError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"cannot read tensors from {path}: {e}") from e
        return out


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
