"""Loading a shard: layers [start, end) of a checkpoint, holding only their own weights.

The shard is built on the meta device from transformers' own model class and filled only with
its own tensors, read straight from the checkpoint's files (safetensors, or GGUF dequantized
tensor by tensor: `Checkpoint.read_tensors`). It keeps the digest of every tensor it read
(`Shard.digests`), which the stage reports in LOADED for the broker to compare with its own.
"""

from __future__ import annotations

import copy
import ctypes
from pathlib import Path

import torch
from torch import nn

from common.checkpoint import CheckpointError
from stage.adapters import (
    adapter_for,
    build_layer,
    build_rotary,
    layer_config,
    materialize_buffer,
    meta_model,
    set_cache_slot,
)
from stage.checkpoint import Checkpoint, open_checkpoint
from stage.devices import check_device, resolve_dtype
from stage.products import load_row_kernel, skinny_linears
from stage.shard import Shard, ShardError
from stage.weights import block_matrices, held_weights, install, read_matrix, tied_head


def load_shard(
    checkpoint: str | Path | Checkpoint,
    start: int,
    end: int,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    reuse: Shard | None = None,
    row_kernel: bool = True,
    weights: str | None = None,
) -> Shard:
    """Build layers [start, end) of a checkpoint, reading only their own tensors.

    With `reuse`, layers (and embeddings or head) that shard already holds are moved over
    instead of read again: a reshard loads only what is new. With `row_kernel`, a float32
    CPU shard multiplies decode groups with stage.kernels' row kernel when it runs on one
    thread (see RowKernelLinear); it costs the process numba's runtime, once. `weights`
    (common/weights.py) holds the weight matrices in bfloat16 or in quantized blocks (None:
    in the compute dtype); the compute dtype stays `dtype`.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    num_layers = ckpt.num_layers
    if not (isinstance(start, int) and isinstance(end, int)):
        raise ShardError(f"layer range bounds must be integers, got {start!r}, {end!r}")
    if start >= end:
        raise ShardError(f"layer range [{start},{end}) is empty or inverted; need start < end")
    if start < 0 or end > num_layers:
        raise ShardError(
            f"layer range [{start},{end}) is outside the model's layers [0,{num_layers})"
        )
    torch_dtype = resolve_dtype(dtype)
    dev = check_device(device, torch_dtype)
    # The kind the stage holds, and the conversion its matrices take ("float32": none).
    weights, convert = held_weights(
        weights or str(torch_dtype).removeprefix("torch."), torch_dtype, dev
    )
    adapter = adapter_for(ckpt.config)

    # The skeleton has end - start layers: local layer i is global layer start + i, and the
    # cache is indexed locally. Layers are rebuilt with their global index (some families
    # derive their attention kind or scaling from it) and then told their local cache slot.
    skeleton = meta_model(_shard_config(ckpt.config, start, end), torch_dtype)
    shard_config = skeleton.config
    full_config = layer_config(ckpt.config, shard_config)
    layers = adapter.module(skeleton, "layers")
    layer_cls = type(layers[0])
    if reuse is not None and (
        reuse.checkpoint.fingerprint != ckpt.fingerprint
        or reuse.dtype != torch_dtype
        or reuse.device != dev
        or reuse.weights != weights
    ):
        reuse = None
    skinny = dev.type == "cpu" and torch_dtype == torch.float32
    row_kernel = row_kernel and skinny
    if row_kernel:
        load_row_kernel()  # compiled or loaded now, not at the first decode step
    if reuse is not None and reuse.row_kernel != row_kernel:
        reuse = None
    # The digest of every tensor the shard holds, by checkpoint key: read now, or kept from the
    # shard that `reuse` had read them into.
    digests: dict[str, bytes] = {}
    rebuilt = nn.ModuleList()
    for i in range(end - start):
        g = start + i
        if reuse is not None and reuse.start <= g < reuse.end:
            layer = reuse.layers[g - reuse.start]
            _keep_digests(layer, f"{adapter.layers}.{g}", ckpt, reuse, digests)
        else:
            layer = build_layer(layer_cls, full_config, g)
            layer = _fill(
                layer,
                f"layers.{i}",
                f"{adapter.layers}.{g}",
                ckpt,
                torch_dtype,
                dev,
                digests,
                weights=convert,
            )
            if skinny:
                skinny_linears(layer, row_kernel)
        rebuilt.append(layer)

    parts: dict[str, nn.Module | None] = {
        "embed": None,
        "positions": None,
        "norm": None,
        "head": None,
    }
    if start == 0:
        for role in ("embed", "positions"):
            module = adapter.module(skeleton, role)
            if reuse is not None and reuse.first and getattr(reuse, role) is not None:
                parts[role] = getattr(reuse, role)
                _keep_digests(parts[role], getattr(adapter, role), ckpt, reuse, digests)
            elif module is not None:
                parts[role] = _fill(
                    module,
                    role,
                    getattr(adapter, role),
                    ckpt,
                    torch_dtype,
                    dev,
                    digests,
                    weights=convert if role == "embed" else "float32",
                )
    tied = bool(getattr(ckpt.config, "tie_word_embeddings", False))
    fallback = {"weight": ckpt.key_for(f"{adapter.embed}.weight")} if tied else None
    if end == num_layers and reuse is not None and reuse.last:
        parts["norm"], parts["head"] = reuse.norm, reuse.head
        _keep_digests(reuse.norm, adapter.norm, ckpt, reuse, digests)
        _keep_digests(reuse.head, adapter.head, ckpt, reuse, digests, fallback)
    elif end == num_layers:
        parts["norm"] = adapter.module(skeleton, "norm")
        _fill(parts["norm"], "norm", adapter.norm, ckpt, torch_dtype, dev, digests)
        head = adapter.module(skeleton, "head")
        if tied and parts["embed"] is not None and ckpt.key_for(f"{adapter.head}.weight") is None:
            head = tied_head(head, parts["embed"])  # one matrix, as in the monolithic model
        else:
            head = _fill(
                head,
                "head",
                adapter.head,
                ckpt,
                torch_dtype,
                dev,
                digests,
                fallback,
                weights=convert,
            )
        parts["head"] = head

    # Cache slots are renumbered only now: a load that failed above leaves `reuse` intact.
    for i, layer in enumerate(rebuilt):
        set_cache_slot(layer, adapter, i)
    rotary = None
    skeleton_rotary = adapter.module(skeleton, "rotary")
    if skeleton_rotary is not None:
        rotary = build_rotary(skeleton_rotary, shard_config, dev)
    del skeleton

    shard = Shard(
        checkpoint=ckpt,
        start=start,
        end=end,
        adapter=adapter,
        shard_config=shard_config,
        layers=rebuilt,
        device=dev,
        dtype=torch_dtype,
        rotary=rotary,
        kinds=tuple(adapter.attention_kind(ckpt.config, start + i) for i in range(end - start)),
        max_positions=ckpt.context_length,
        vocab_size=int(ckpt.config.vocab_size),
        row_kernel=row_kernel,
        weights=weights,
        digests=digests,
        **parts,
    )
    for module in shard.modules():
        module.eval().requires_grad_(False)
    if dev.type == "cpu" and torch_dtype == torch.float32 and _holds_blocks(shard.layers):
        from stage.fused import fused_layers

        shard.fused = fused_layers(shard.layers, shard.kinds)
        _trim_heap()  # the matrices fused_layers concatenated were freed
    return shard


def _holds_blocks(layers: nn.ModuleList) -> bool:
    return any(getattr(m, "holds_blocks", False) for m in layers.modules())


def _shard_config(config, start: int, end: int):
    """The config a k-layer model would have: the cache and the masks are built from it."""
    shard_config = copy.deepcopy(config)
    shard_config.num_hidden_layers = end - start
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        shard_config.layer_types = list(layer_types[start:end])
    return shard_config


def _wanted(
    module: nn.Module,
    local_prefix: str,
    ckpt_prefix: str,
    checkpoint: Checkpoint,
    fallback: dict[str, str] | None = None,
) -> dict[str, str]:
    """The checkpoint key of each of the module's tensors, by its name in the module."""
    wanted: dict[str, str] = {}
    for name in module.state_dict():
        key = checkpoint.key_for(f"{ckpt_prefix}.{name}")
        if key is None and fallback is not None:
            key = fallback.get(name)
        if key is None:
            raise CheckpointError(
                f"{checkpoint.path} lacks tensor {ckpt_prefix}.{name} (needed by {local_prefix}); "
                "the checkpoint is incomplete or of another architecture"
            )
        wanted[name] = key
    return wanted


def _keep_digests(
    module: nn.Module,
    ckpt_prefix: str,
    checkpoint: Checkpoint,
    reuse: Shard,
    digests: dict[str, bytes],
    fallback: dict[str, str] | None = None,
) -> None:
    """The digests of a module moved over from `reuse`, which read its tensors."""
    for key in _wanted(module, ckpt_prefix, ckpt_prefix, checkpoint, fallback).values():
        digests[key] = reuse.digests[key]


def _fill(
    module: nn.Module,
    local_prefix: str,
    ckpt_prefix: str,
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    digests: dict[str, bytes],
    fallback: dict[str, str] | None = None,
    *,
    weights: str = "float32",
) -> nn.Module:
    """Fill `module` from the checkpoint; with `weights`, its weight matrices are read one at a
    time into their held form (stage.weights) and put in place of their float submodules.
    Returns the module (a new one where `module` itself was such a matrix)."""
    wanted = _wanted(module, local_prefix, ckpt_prefix, checkpoint, fallback)
    matrices = block_matrices(module, weights, checkpoint, wanted)
    tensors = checkpoint.read_tensors(
        {name: key for name, key in wanted.items() if name not in matrices}, dtype, device, digests
    )
    try:
        missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
        if set(missing) != set(matrices) or unexpected:
            module.load_state_dict(tensors, strict=True, assign=True)  # raises, naming them
    except RuntimeError as e:
        raise CheckpointError(
            f"{checkpoint.path}: tensors for {ckpt_prefix} do not fit: {e}"
        ) from e
    for local, (name, role, bits) in matrices.items():
        held = read_matrix(checkpoint, wanted[local], role, bits, weights == "native", digests)
        bias = getattr(module.get_submodule(name) if name else module, "bias", None)
        module = install(module, name, role, held, bias)
        _trim_heap()
    _materialize_buffers(module, device)
    _trim_heap()
    return module


def _materialize_buffers(module: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers are not in the checkpoint; rebuild the few families that have one."""
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf.is_meta and not materialize_buffer(sub, name, device):
                raise ShardError(f"{type(sub).__name__}.{name} has no value after loading")


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc). A tensor's temporaries that
    glibc placed in its heap, not in a mapping of their own, otherwise stay resident after they
    are freed: about 20 MiB per stage of a GGUF model, whose tensors are dequantized in parts."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
