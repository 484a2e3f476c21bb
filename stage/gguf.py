"""A GGUF checkpoint as a stage opens it: transformers' config and names, tensors dequantized
one at a time, a block of rows at a time, from the file.

Everything model-specific is transformers' own GGUF support: the config from the file's
metadata (`AutoConfig.from_pretrained(..., gguf_file=)`), the GGUF -> transformers name map
(`get_gguf_hf_weights_map` on a meta-device model), and the per-family tensor processors
(the llama family's Q/K reverse permutation, GPT-2's transposes). A tensor read here is the
tensor `from_pretrained(..., gguf_file=)` loads, bit for bit.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, BinaryIO

import numpy as np
import torch
from transformers import PretrainedConfig

from common.checkpoint import DIGEST_BYTES, CheckpointError, new_digest
from common.gguf import GGUFFile, GGUFMeta, GGUFTensor
from common.weights import LOSSLESS_NATIVE
from stage.checkpoint import Checkpoint, check_finite
from stage.weights import row_permutation


@dataclass(frozen=True)
class GGUFCheckpoint(Checkpoint):
    """`tensors` are the file's, by GGUF name; `names` maps transformers' parameter names to
    them."""

    gguf: GGUFFile
    names: dict[str, str] = field(default_factory=dict)

    def key_for(self, name: str) -> str | None:
        key = self.names.get(name)
        return key if key in self.tensors else None

    @cached_property
    def _processor(self):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        kind = TENSOR_PROCESSORS.get(self.gguf.architecture, TensorProcessor)
        return kind(config=self.config.to_dict())

    def read_tensors(
        self,
        wanted: dict[str, str],
        dtype: torch.dtype,
        device: torch.device,
        digests: dict[str, bytes] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Dequantize exactly the named tensors (local name -> GGUF name), one at a time, and
        put the digest of each one's quantized blocks in `digests`, by GGUF name."""
        from gguf import GGMLQuantizationType, dequantize

        out: dict[str, torch.Tensor] = {}
        with open(self.path, "rb") as f:
            for local, key in wanted.items():
                info = self.gguf.tensors[key]
                blocks = new_digest()
                try:
                    kind = GGMLQuantizationType(info.ggml_type)
                    weights = _dequantize(f, info, kind, dequantize, blocks)
                except (NotImplementedError, ValueError) as e:
                    kind = GGMLQuantizationType(info.ggml_type).name
                    raise CheckpointError(
                        f"{self.path}: cannot dequantize {key} ({kind}): {e}; "
                        "convert the file to a common quant type (Q8_0, Q4_K_M, ...)"
                    ) from None
                if digests is not None:
                    digests[key] = blocks.digest()[:DIGEST_BYTES]
                out[local] = self._to_torch(key, weights, dtype, device)
        return out

    def read_rows(
        self, key: str, rows: int, digests: dict[str, bytes] | None = None
    ) -> Iterator[torch.Tensor] | None:
        """A matrix dequantized `rows` rows at a time, where transformers' processor leaves it
        as the file has it (not the llama family's Q/K, whose rows it reorders)."""
        info = self.gguf.tensors[key]
        if len(info.shape) != 2 or tuple(info.shape) != tuple(self._shapes[key]):
            return None
        order = row_permutation(self._processor, key, info.shape[0], self._mapping)
        if order is None or not np.array_equal(order, np.arange(info.shape[0])):
            return None
        return self._rows(key, info, rows, digests)

    def _rows(self, key: str, info: GGUFTensor, rows: int, digests) -> Iterator[torch.Tensor]:
        from gguf import GGMLQuantizationType, dequantize

        kind = GGMLQuantizationType(info.ggml_type)
        row_bytes = info.nbytes // info.shape[0]
        blocks = new_digest()
        with open(self.path, "rb") as f:
            for at in range(0, info.shape[0], rows):
                count = min(rows, info.shape[0] - at)
                raw = _read(f, info, at * row_bytes, count * row_bytes, blocks)
                try:
                    values = dequantize(raw.reshape(count, -1), kind)
                except (NotImplementedError, ValueError) as e:
                    raise CheckpointError(
                        f"{self.path}: cannot dequantize {key} ({kind.name}): {e}; "
                        "convert the file to a common quant type (Q8_0, Q4_K_M, ...)"
                    ) from None
                block = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
                check_finite(self.path, key, block, block)
                yield block
        if digests is not None:
            digests[key] = blocks.digest()[:DIGEST_BYTES]

    def read_blocks(self, key: str, digests: dict[str, bytes] | None = None):
        """The matrix `key` in the file's own blocks, where a block format holds its GGML type
        without loss and transformers' processor only reorders its rows (stage.weights), with
        the digest of its bytes in `digests`; None otherwise (the caller dequantizes)."""
        from gguf import GGMLQuantizationType

        from stage import quant

        info = self.gguf.tensors[key]
        kind = GGMLQuantizationType(info.ggml_type).name
        if kind not in LOSSLESS_NATIVE or len(info.shape) != 2:
            return None
        order = row_permutation(self._processor, key, info.shape[0], self._mapping)
        if order is None or tuple(info.shape) != tuple(self._shapes[key]):
            return None
        blocks = new_digest()
        with open(self.path, "rb") as f:
            raw = _read(f, info, 0, info.nbytes, blocks)
        held = quant.from_gguf(raw, kind, tuple(info.shape))
        del raw
        if held is None:
            return None
        if not np.array_equal(order, np.arange(info.shape[0])):
            held = held.select_rows(torch.from_numpy(order))
        for part in (held.scales, held.offsets):
            check_finite(self.path, key, part, part)
        if digests is not None:
            digests[key] = blocks.digest()[:DIGEST_BYTES]
        return held

    def _to_torch(
        self, key: str, weights: np.ndarray, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """One dequantized tensor through transformers' tensor processor, checked and cast."""
        parsed: dict[str, dict] = {"tensors": {}}
        result = self._processor.process(
            weights=weights,
            name=key,
            tensor_key_mapping=self._mapping,
            parsed_parameters=parsed,
        )
        if result.name is None:  # GPT-2's head: the processor stores it itself
            (tensor,) = parsed["tensors"].values()
        else:
            array = result.weights
            if not (array.flags.c_contiguous and array.flags.owndata):
                array = np.array(array)  # a processor's view (a permutation, a transpose)
            tensor = torch.from_numpy(array)
        if tuple(tensor.shape) != tuple(self._shapes[key]):
            raise CheckpointError(
                f"{self.path}: tensor {key} has shape {list(tensor.shape)} but the "
                f"metadata's model needs {list(self._shapes[key])}; the file is corrupt "
                "or was converted wrongly"
            )
        loaded = tensor.to(dtype) if tensor.is_floating_point() else tensor
        check_finite(self.path, key, tensor, loaded)
        return loaded.to(device)

    @cached_property
    def _mapping(self) -> dict[str, str]:
        return {gguf_name: name for name, gguf_name in self.names.items()}

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        """What transformers' model expects of each GGUF tensor, from a meta-device model."""
        from stage.adapters import meta_model

        params = meta_model(self.config, torch.float32).state_dict()
        return {key: tuple(params[name].shape) for name, key in self.names.items()}


# GGUF's architecture names where transformers' model_type differs (as its GGUF loader renames).
_MODEL_TYPES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}


def transformers_config(gguf: GGUFFile) -> PretrainedConfig:
    """The config `AutoConfig.from_pretrained(..., gguf_file=)` builds, from the metadata that
    common/gguf.py already read: transformers' own key tables, the loop of its GGUF loader.

    transformers' loader parses the whole file again, vocabulary included, which takes seconds
    and holds the GIL while the stage's I/O thread should heartbeat. `tests/test_gguf.py`
    checks this config equals transformers' own, field by field.
    """
    from transformers.integrations import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    meta = gguf.metadata
    arch = gguf.architecture
    name = meta.get("general.name")
    model_type = _MODEL_TYPES.get(arch, arch)
    if arch == "llama" and name == "mistral":  # llama.cpp writes Mistral as llama
        model_type = "mistral"
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in gguf.tensors}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}).items():
        config.setdefault(key, value)
    for key, value in meta.items():
        prefix, _, rest = key.replace(arch, model_type).partition(".")
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, model_type)
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed is not None and renamed != -1:
            config[renamed] = value
    if "vocab_size" not in config and meta.get("tokenizer.ggml.tokens") is not None:
        config["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    if config.get("model_type") not in CONFIG_MAPPING:
        raise CheckpointError(
            f"{gguf.path} holds a {arch!r} model, which transformers cannot build"
        )
    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def open_gguf(meta: GGUFMeta) -> GGUFCheckpoint:
    """Read transformers' config from the file's metadata and map its tensor names."""
    from transformers.modeling_gguf_pytorch_utils import (
        GGUF_SUPPORTED_ARCHITECTURES,
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    path = meta.path
    arch = meta.gguf.architecture
    # The keys of transformers' GGUF table are its architectures, plus two metadata sections.
    readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    if arch not in readable and _MODEL_TYPES.get(arch, arch) not in readable:
        raise CheckpointError(
            f"{path} holds a {arch!r} model, which transformers cannot load from GGUF "
            f"(it reads {', '.join(readable)}); use a Hugging Face checkpoint of it, or "
            "a GGUF file of one of those"
        )
    try:
        config = transformers_config(meta.gguf)
    except (TypeError, ValueError, KeyError) as e:  # what a config class raises for bad values
        raise CheckpointError(f"cannot build the model config of {path}: {e}") from e
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    try:
        to_hf = _layer_pattern_map(config, processor, get_gguf_hf_weights_map, arch)
    except NotImplementedError as e:  # gguf-py knows no tensor names for this architecture
        raise CheckpointError(f"cannot map the tensor names of {path}: {e}") from None
    names = {name: key for key, name in to_hf.items()}
    missing = sorted(set(meta.tensors) - set(to_hf))
    if missing:
        raise CheckpointError(
            f"{path} holds tensors a {arch} model does not have ({', '.join(missing[:4])}); "
            "the file is of another architecture than its metadata says"
        )
    return GGUFCheckpoint(
        path=path,
        raw_config=meta.raw_config,
        tensors=meta.tensors,
        fingerprint=meta.fingerprint,
        config=config,
        gguf=meta.gguf,
        names=names,
    )


def _layer_pattern_map(
    config: PretrainedConfig, processor, weights_map, architecture: str | None = None
) -> dict[str, str]:
    """transformers' GGUF -> parameter name map, built on a one-layer model and repeated for
    every layer: the names of layer N are layer 0's with N in them, and transformers' own map
    rebuilds gguf's name table for every submodule, which takes seconds per layer."""
    from stage.adapters import meta_model

    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    if getattr(config, "layer_types", None) is not None:
        one.layer_types = list(config.layer_types[:1])
    # The names are the file's: its own architecture's table (a Mistral written by llama.cpp
    # is a `llama` file, whose config transformers nonetheless builds as mistral).
    single = weights_map(meta_model(one, torch.float32), processor, model_type=architecture)
    out: dict[str, str] = {}
    for key, name in single.items():
        if not key.startswith("blk.0."):
            out[key] = name
            continue
        for i in range(config.num_hidden_layers):
            out[f"blk.{i}.{key.removeprefix('blk.0.')}"] = _LAYER_INDEX.sub(rf"\g<1>{i}.", name, 1)
    return out


_LAYER_INDEX = re.compile(r"(\.(?:layers|h)\.)0\.")


# Float32 bytes dequantized at a time. gguf's dequantizers build temporaries several times the
# size of their output, and the quantized blocks are read with plain reads, not mapped, so that
# neither a whole 49k-row embedding's temporaries nor its file pages count in the stage's memory.
DEQUANTIZE_BYTES = 1 << 20


def _dequantize(f: BinaryIO, info: GGUFTensor, kind, dequantize, blocks) -> np.ndarray:
    """`dequantize(blocks, kind)` of one tensor, read and dequantized a block of rows at a time
    into one array of its own (blocks are independent, so the values are those of one call).
    Every byte read goes through the hash object `blocks` too, in file order."""
    if len(info.shape) < 2:
        return np.array(dequantize(_read(f, info, 0, info.nbytes, blocks), kind))
    slices = info.shape[0]
    slice_bytes = info.nbytes // slices
    step = max(1, DEQUANTIZE_BYTES // (4 * math.prod(info.shape[1:])))
    out: np.ndarray | None = None
    for at in range(0, slices, step):
        count = min(step, slices - at)
        raw = _read(f, info, at * slice_bytes, count * slice_bytes, blocks)
        values = dequantize(raw.reshape(count, *info.shape[1:-1], -1), kind)
        if out is None:
            out = np.empty((slices, *values.shape[1:]), dtype=values.dtype)
        out[at : at + count] = values
        del values
    return out


def _read(f: BinaryIO, info: GGUFTensor, start: int, size: int, blocks) -> np.ndarray:
    f.seek(info.offset + start)
    data = f.read(size)
    if len(data) != size:
        raise CheckpointError(
            f"{f.name}: tensor {info.name} ends past the end of the file; the file is "
            "truncated: download or convert it again"
        )
    blocks.update(data)
    return np.frombuffer(data, dtype=np.uint8)
