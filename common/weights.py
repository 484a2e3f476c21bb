"""How a stage holds its weights (`python -m stage --weights`), and what that costs in bytes.

The broker plans memory with these figures and the stage holds exactly them, so both import
this module; it needs neither torch nor numpy.

- `float32`, `bfloat16`: every weight in that dtype; the model's own math, bit for bit in
  float32.
- `int8`, `q4`: the weight matrices of the decoder layers, the token embedding and the head
  are held in blocks of BLOCK weights along a row, each block with a float32 scale and a
  float32 offset (w = scale * code + offset), codes of 8 or 4 bits. A float checkpoint is
  quantized at load; products run on the blocks (stage/quant.py) and are not bit-exact.
- `native`: a GGUF file's own blocks where one of those two formats holds them without loss
  (Q8_0, Q5_0, Q5_1, Q5_K in 8-bit blocks; Q4_0, Q4_1, Q4_K in 4-bit ones); Q6_K and the
  8-bit K-quant are requantized to 8 bits, the types under 4 bits to 4 bits; float tensors
  stay float32. For a Hugging Face checkpoint, `native` is `float32`.

Norms, biases and vectors stay float32 in every mode.
"""

from __future__ import annotations

WEIGHT_KINDS = ("float32", "bfloat16", "int8", "q4", "native")
QUANTIZED_KINDS = ("int8", "q4", "native")
# Weights per block along a row; a matrix whose rows are not a multiple of it stays float32.
BLOCK = 32
# Bytes of a block's scale and offset (float32 each).
BLOCK_HEADER_BYTES = 8

# Codes per GGML type under `native`: the bits of the block format that holds it.
_NATIVE_BITS = {
    "Q4_0": 4,
    "Q4_1": 4,
    "Q4_K": 4,
    "Q8_0": 8,
    "Q8_1": 8,
    "Q5_0": 8,
    "Q5_1": 8,
    "Q5_K": 8,
    "Q6_K": 8,
    "Q8_K": 8,
    "Q2_K": 4,
    "Q3_K": 4,
    "IQ2_XXS": 4,
    "IQ2_XS": 4,
    "IQ2_S": 4,
    "IQ3_XXS": 4,
    "IQ3_S": 4,
    "IQ1_S": 4,
    "IQ1_M": 4,
    "IQ4_NL": 4,
    "IQ4_XS": 4,
    "TQ1_0": 4,
    "TQ2_0": 4,
}
# Of those, the types whose blocks convert without loss (the others are requantized).
LOSSLESS_NATIVE = frozenset({"Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q5_0", "Q5_1", "Q5_K"})


def block_bytes(bits: int) -> int:
    """Bytes of one block of BLOCK weights held in `bits`-bit codes."""
    return BLOCK * bits // 8 + BLOCK_HEADER_BYTES


def quantized_bytes(rows: int, columns: int, bits: int) -> int:
    """Bytes of a [rows, columns] matrix held in blocks (columns a multiple of BLOCK)."""
    return rows * (columns // BLOCK) * block_bytes(bits)


def bits_for(kind: str, stored: str | None) -> int | None:
    """The code bits a matrix takes under `kind`, given its stored type (a GGML type name for a
    GGUF tensor, a safetensors dtype otherwise); None: it stays in the float dtype."""
    if kind == "int8":
        return 8
    if kind == "q4":
        return 4
    if kind == "native":
        return _NATIVE_BITS.get(stored or "")
    return None


def matrix_bytes(shape: tuple[int, ...], kind: str, stored: str | None, float_bytes: int) -> int:
    """Bytes a stage holds for one weight matrix (or any tensor) under `kind`.

    Only 2-D tensors whose rows (the last dimension) are a multiple of BLOCK are held in
    blocks; the rest take `float_bytes` per element.
    """
    numel = 1
    for d in shape:
        numel *= d
    bits = bits_for(kind, stored) if len(shape) == 2 else None
    if bits is None or shape[-1] % BLOCK:
        return numel * float_bytes
    return quantized_bytes(shape[0], shape[1], bits)
