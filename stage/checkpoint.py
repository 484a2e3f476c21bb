"""A checkpoint as a stage opens it: the ground floor's metadata plus transformers' config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from common.checkpoint import CONFIG_FILE, CheckpointError, CheckpointMeta, read_checkpoint


@dataclass(frozen=True)
class Checkpoint(CheckpointMeta):
    """A validated checkpoint with the `PretrainedConfig` that builds its layers."""

    config: PretrainedConfig


def open_checkpoint(directory: str | Path) -> Checkpoint:
    """Validate a checkpoint directory, index its tensors and read its transformers config."""
    meta = read_checkpoint(directory)
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
