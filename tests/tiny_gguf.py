"""Tiny random GGUF files that transformers itself loads, for the GGUF paths of the stages.

`make_gguf(arch, path, quant)` builds the tiny model of `tiny_gguf_config(arch)` (that is,
`tests.tiny_models.CONFIGS[arch]`, seeded like `make_checkpoint`) and writes it under llama.cpp's
tensor and metadata names, with a small fake tokenizer. The name map is transformers' own
(`get_gguf_hf_weights_map`); each tensor is written so that transformers' GGUF loader, after its
tensor processor, gets back the HF tensor: GPT-2's Conv1D weights are written transposed, and
llama's Q/K rows are permuted the way llama.cpp's converter does (the loader undoes it). So an F32
file loads into exactly the seeded tiny model, and a quantized one into that model rounded.

Like llama.cpp, 1-D tensors (norms, biases) stay F32 and only 2-D weights are quantized. A tied
model writes no `output.weight`; the loader ties the head when the tensor is absent.

    from tests.tiny_gguf import make_gguf
    path = make_gguf("llama", tmp_path / "llama-Q8_0.gguf", quant="Q8_0")
    AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

Architectures: llama, qwen2, qwen3, phi3, gpt2, and mistral (written as a `llama` GGUF, as
llama.cpp does; transformers loads it as `LlamaForCausalLM`). Gemma is refused: transformers'
GGUF loader maps gemma2/3/4, not gemma. What transformers cannot read from a GGUF differs from
the tiny config, as with real files:
- qwen3's head size: its table ignores `attention.key_length`, so a qwen3 GGUF always loads with
  Qwen3Config's default head_dim of 128; `tiny_gguf_config("qwen3")` therefore has head_dim=128
  (the tiny safetensors qwen3 has 16), and its weights differ from `make_checkpoint`'s.
- GPT-2's `n_positions`: `context_length` goes to `n_ctx`, and `n_positions` stays at its default
  of 1024, so `position_embd` is padded with zero rows to 1024 (the first 256 are the model's).
- qwen2's and mistral's sliding windows (no key for them), and mistral's model type.
Every other architecture's F32 file holds the very weights `make_checkpoint(arch, dir, seed=seed)`
writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.tiny_models import CONFIGS

# The quant types gguf-py can write. Row lengths of the tiny models (64, 96, 256) are multiples of
# these block sizes (32), so every 2-D weight is quantized; K-quants (blocks of 256) are not here.
QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

# tests.tiny_models architecture -> GGUF `general.architecture`.
GGUF_ARCHS = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gpt2": "gpt2",
}
SUPPORTED = tuple(GGUF_ARCHS)

# (tokenizer.ggml.model, tokenizer.ggml.pre) as llama.cpp writes them for each family.
_TOKENIZERS = {
    "llama": ("llama", None),
    "mistral": ("llama", None),
    "phi3": ("llama", None),
    "qwen2": ("gpt2", "qwen2"),
    "qwen3": ("gpt2", "qwen2"),
    "gpt2": ("gpt2", "gpt-2"),
}
# The only head size a qwen3 GGUF can have in transformers: Qwen3Config's default.
_QWEN3_HEAD_DIM = 128
# GPT-2 in transformers takes `n_positions` from its default, not from the GGUF.
_GPT2_POSITIONS = 1024
# GPT-2's Conv1D weights are (in, out); llama.cpp stores them (out, in) and the loader transposes.
_GPT2_TRANSPOSED = ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")


def make_gguf(
    arch: str, path: Path, quant: str = "F32", seed: int = 0, config=None, tokenizer: bool = True
) -> Path:
    """Write the tiny `arch` model (seeded with `seed`) to the GGUF file `path`, its 2-D weights
    in `quant` (one of `QUANTS`), and return `path`. `config` replaces the tiny config (a
    transformers config of the same architecture); `tokenizer=False` leaves the tokenizer out."""
    import gguf
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    if arch not in GGUF_ARCHS:
        raise ValueError(f"no tiny GGUF for {arch!r}; supported: {', '.join(SUPPORTED)}")
    if quant not in QUANTS:
        raise ValueError(f"quant {quant!r} not supported; choose one of {', '.join(QUANTS)}")
    gguf_arch = GGUF_ARCHS[arch]
    qtype = gguf.GGMLQuantizationType[quant]

    torch.manual_seed(seed)
    config = config if config is not None else tiny_gguf_config(arch)
    model = AutoModelForCausalLM.from_config(config).eval()
    processor = TENSOR_PROCESSORS.get(gguf_arch, TensorProcessor)(config=config.to_dict())
    # The map is keyed by the model's own type; mistral's llama-shaped modules map as llama's do.
    name_map = get_gguf_hf_weights_map(model, processor, model_type=_map_type(arch))
    state = model.state_dict()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, gguf_arch)
    writer.add_name(f"tiny-{arch}")  # never exactly "mistral": transformers would remap it
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, arch, config)
    if tokenizer:
        _add_tokenizer(writer, arch, config)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    for gguf_name, hf_name in name_map.items():
        if gguf_name == "output.weight" and tied:
            continue
        weights = state[hf_name].detach().to(torch.float32).numpy()
        weights = _to_gguf_layout(arch, gguf_name, weights, config)
        _add_tensor(writer, gguf_name, weights, qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf_config(arch: str):
    """The config `make_gguf(arch, ...)` writes: `CONFIGS[arch]()`, but for qwen3 with
    `head_dim=128`. Transformers' GGUF table for qwen3 reads no head size (it ignores
    `attention.key_length`), so a qwen3 GGUF always loads with Qwen3Config's default of 128."""
    config = CONFIGS[arch]()
    if arch == "qwen3":
        config.head_dim = _QWEN3_HEAD_DIM
    return config


def _map_type(arch: str) -> str | None:
    return "llama" if arch == "mistral" else None


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType

    return LlamaFileType.ALL_F32 if quant == "F32" else LlamaFileType[f"MOSTLY_{quant}"]


def _add_hparams(writer, arch: str, config) -> None:
    if arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_vocab_size(config.vocab_size)
        return
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    rotary = int(head_dim * (getattr(config, "partial_rotary_factor", None) or 1.0))
    writer.add_rope_dimension_count(rotary)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return theta if theta is not None else getattr(config, "rope_theta", 10000.0)


def _vocabulary(size: int, space: str) -> tuple[list[str], list[str]]:
    """The `size - 3` tokens after the three specials: `space` and printable ASCII, then a space
    and a letter, then letter pairs; and the merges ("a b") that build the two-piece ones."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    singles = [space] + [chr(c) for c in range(33, 127)]
    pairs = [(space, a) for a in letters] + [(a, b) for a in letters for b in letters]
    base = 3 + len(singles)
    if not base <= size <= base + len(pairs):
        raise ValueError(f"a tiny vocabulary has {base} to {base + len(pairs)} tokens, not {size}")
    chosen = pairs[: size - base]
    return singles + [a + b for a, b in chosen], [f"{a} {b}" for a, b in chosen]


def _add_tokenizer(writer, arch: str, config) -> None:
    """A small fake tokenizer of `config.vocab_size` tokens: byte-level BPE ("gpt2") for the
    families llama.cpp writes that way, sentencepiece ("llama") for the others."""
    from gguf import TokenType

    model, pre = _TOKENIZERS[arch]
    bos, eos = config.bos_token_id, config.eos_token_id
    pad = getattr(config, "pad_token_id", None)
    if (bos, eos) != (1, 2) or pad not in (None, 0):
        raise ValueError(f"the tiny tokenizer has pad=0, bos=1, eos=2, not {pad}, {bos}, {eos}")
    if model == "gpt2":
        pieces, merges = _vocabulary(config.vocab_size, "\u0120")  # "Ġ", GPT-2's space
        # GPT2Tokenizer and Qwen2Tokenizer add "<|endoftext|>" unless the vocabulary has it.
        specials = ["<pad>", "<s>", "<|endoftext|>"]
        special_types = [TokenType.CONTROL] * 3
    else:
        pieces, merges = _vocabulary(config.vocab_size, "\u2581")  # "▁", sentencepiece's
        specials = ["<unk>", "<s>", "</s>"]
        special_types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens = specials + pieces
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(special_types + [TokenType.NORMAL] * len(pieces))
    if model == "gpt2":
        writer.add_token_merges(merges)
    else:
        # Sentencepiece files carry scores, not merges; transformers derives the merges from them.
        writer.add_token_scores([0.0] * 3 + [-float(i) for i in range(len(pieces))])
        writer.add_unk_token_id(0)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if pad is not None:
        writer.add_pad_token_id(pad)
    writer.add_add_bos_token(model == "llama")


def _to_gguf_layout(arch: str, gguf_name: str, weights: np.ndarray, config) -> np.ndarray:
    """The tensor as llama.cpp stores it: what transformers' tensor processor turns back into
    `weights`."""
    if arch == "gpt2":
        if gguf_name.endswith(_GPT2_TRANSPOSED):
            return np.ascontiguousarray(weights.T)
        if gguf_name == "position_embd.weight" and weights.shape[0] < _GPT2_POSITIONS:
            pad = np.zeros((_GPT2_POSITIONS - weights.shape[0], weights.shape[1]), np.float32)
            return np.concatenate([weights, pad])
        return weights
    if GGUF_ARCHS[arch] == "llama":
        if gguf_name.endswith("attn_q.weight"):
            return _permute(weights, config.num_attention_heads)
        if gguf_name.endswith("attn_k.weight"):
            return _permute(weights, config.num_key_value_heads)
    return weights


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (interleaved rotary halves); transformers reverses it on load."""
    rows = weights.shape[0]
    w = weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
    return np.ascontiguousarray(w.swapaxes(1, 2).reshape(weights.shape))


def _add_tensor(writer, name: str, weights: np.ndarray, qtype) -> None:
    import gguf
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block = GGML_QUANT_SIZES[qtype][0]
    if weights.ndim != 2 or qtype == GGMLQuantizationType.F32 or weights.shape[-1] % block:
        writer.add_tensor(name, weights.astype(np.float32))
    elif qtype == GGMLQuantizationType.F16:
        writer.add_tensor(name, weights.astype(np.float16))
    else:
        data = gguf.quants.quantize(weights, qtype)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
