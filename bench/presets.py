"""Benchmark checkpoints: the built-in model (SmolLM2-135M-Instruct, GGUF), the demo model, and
Llama shapes with seeded random weights.

Random weights run exactly as fast as trained ones, and need no download. A preset is built
once into `.cache/bench-models/<preset>` and reused while its spec file matches. The weights
are streamed: the model is built on the meta device only to learn tensor names and shapes,
and each tensor is drawn on its own and written into a safetensors shard of at most
SHARD_BYTES, so building `tinyllama` (4.4 GB in fp32) never holds more than one shard.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(".cache/bench-models")
SEED = 20240611
# One shard at a time is drawn in memory; 1 GB keeps a tinyllama build under ~1.2 GB of RAM.
SHARD_BYTES = 1 << 30
INIT_STD = 0.02  # Llama's initializer_range
INDEX_FILE = "model.safetensors.index.json"
SPEC_FILE = "bench-preset.json"

COMMON = {
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

SHAPES: dict[str, dict[str, int]] = {
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
    "tinyllama": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}
# The built-in model, a real GGUF file: dequantized per stage, compared against transformers'
# own model loaded from the same file.
GGUF_PRESETS = ("smollm2",)
PRESETS = ("demo", *GGUF_PRESETS, *SHAPES)


@dataclass(frozen=True)
class Model:
    """A benchmark checkpoint on disk and the facts the harness needs about it."""

    preset: str
    path: Path
    hidden_size: int
    num_layers: int
    vocab_size: int
    params: int
    weight_bytes: int  # in float32 (dequantized, for a GGUF file)

    def to_json(self) -> dict:
        return {
            "preset": self.preset,
            "path": str(self.path),
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "vocab_size": self.vocab_size,
            "params": self.params,
            "weight_bytes": self.weight_bytes,
        }


def ensure_model(preset: str, cache_dir: Path = CACHE_DIR, log=print) -> Model:
    """The preset's checkpoint, built first if it is missing or was built from another spec."""
    if preset == "demo":
        from common.defaults import DEFAULT_DEMO_DIR
        from stage.demo_model import ensure_demo_model

        path = ensure_demo_model(DEFAULT_DEMO_DIR)
    elif preset == "smollm2":
        from common.models import builtin_model

        path = builtin_model()
    elif preset in SHAPES:
        path = Path(cache_dir) / preset
        spec = _spec(preset)
        if not _is_complete(path, spec):
            _check_disk(path.parent, preset)
            log(f"building the {preset} checkpoint in {path} (seeded random weights)")
            started = time.monotonic()
            _build(path, spec)
            log(f"built {preset} in {time.monotonic() - started:.1f} s")
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return describe(preset, path)


def describe(preset: str, path: Path) -> Model:
    from stage.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    cfg = ckpt.config
    params = sum(info.numel for info in ckpt.tensors.values())
    return Model(
        preset=preset,
        path=Path(path).resolve(),
        hidden_size=int(cfg.hidden_size),
        num_layers=int(cfg.num_hidden_layers),
        vocab_size=int(cfg.vocab_size),
        params=params,
        weight_bytes=ckpt.tensor_bytes(ckpt.tensors, 4),
    )


def _spec(preset: str) -> dict:
    return {"preset": preset, "seed": SEED, "std": INIT_STD, "config": {**COMMON, **SHAPES[preset]}}


def _is_complete(path: Path, spec: dict) -> bool:
    try:
        if json.loads((path / SPEC_FILE).read_text()) != spec:
            return False
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    except (OSError, ValueError, KeyError):
        return False
    return (path / "config.json").is_file() and all(
        (path / f).is_file() for f in set(weight_map.values())
    )


def _check_disk(parent: Path, preset: str) -> None:
    c = SHAPES[preset]
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    need = 4 * (2 * v * h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h)
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need * 1.1:
        raise OSError(
            f"building {preset} needs {need / 1e9:.1f} GB in {parent} but {free / 1e9:.1f} GB are free"
        )


def _build(path: Path, spec: dict) -> None:
    """Write config, shards and index into a sibling directory, then rename it into place."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**spec["config"])
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = [(name, tuple(t.shape)) for name, t in skeleton.state_dict().items()]
    del skeleton

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        config.save_pretrained(tmp)
        groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in shapes:
            nbytes = 4 * _numel(shape)
            if groups[-1] and size + nbytes > SHARD_BYTES:
                groups.append([])
                size = 0
            groups[-1].append((name, shape))
            size += nbytes
        weight_map: dict[str, str] = {}
        total = 0
        for k, group in enumerate(groups):
            file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            tensors = {}
            for name, shape in group:
                tensors[name] = _init(name, shape, spec, torch)
                weight_map[name] = file
                total += tensors[name].numel() * 4
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (tmp / SPEC_FILE).write_text(json.dumps(spec))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _init(name: str, shape: tuple[int, ...], spec: dict, torch):
    """Norm weights are ones (as Llama initialises them); matrices are N(0, std), seeded per name."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float32)
    gen = torch.Generator().manual_seed(spec["seed"] + _stable_hash(name))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, spec["std"], generator=gen)


def _stable_hash(name: str) -> int:
    h = 0
    for ch in name.encode():
        h = (h * 131 + ch) % 1_000_003
    return h
