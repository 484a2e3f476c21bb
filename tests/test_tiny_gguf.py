"""The tiny GGUF files of tests/tiny_gguf.py: transformers loads them (model and tokenizer), and
our torch-free parser sees the same tensor table as gguf-py's reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.gguf import read_gguf
from tests.tiny_gguf import GGUF_ARCHS, SUPPORTED, make_gguf, tiny_gguf_config
from tests.tiny_models import CONFIGS, VOCAB

CASES = [(arch, quant) for arch in SUPPORTED for quant in ("F32", "Q8_0")] + [("llama", "Q4_0")]
TOKEN_IDS = torch.tensor([[1, 5, 40, 77, 120, VOCAB - 1]])
# Largest logit error against the unquantized model; the tiny models' logits are about 0.5-0.8.
TOLERANCE = {"F32": 1e-5, "Q8_0": 5e-2, "Q4_0": 0.5}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    """`get(arch, quant)`: the tiny GGUF, written once per module."""
    root = tmp_path_factory.mktemp("gguf")
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, quant: str) -> Path:
        if (arch, quant) not in made:
            made[arch, quant] = make_gguf(arch, root / arch / f"tiny-{quant}.gguf", quant)
        return made[arch, quant]

    return get


@pytest.fixture(scope="module")
def reference_logits():
    """`get(arch)`: the logits of the unquantized tiny model the files hold, once per arch."""
    made: dict[str, torch.Tensor] = {}

    def get(arch: str) -> torch.Tensor:
        if arch not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(tiny_gguf_config(arch)).eval()
            with torch.no_grad():
                made[arch] = model(TOKEN_IDS).logits
        return made[arch]

    return get


def _load(path: Path):
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.mark.parametrize(("arch", "quant"), CASES)
def test_transformers_loads_the_file(gguf_files, reference_logits, arch, quant):
    path = gguf_files(arch, quant)
    model = _load(path)

    tiny = CONFIGS[arch]()
    loaded = model.config
    assert loaded.num_hidden_layers == tiny.num_hidden_layers
    assert loaded.hidden_size == tiny.hidden_size
    assert loaded.vocab_size == tiny.vocab_size == VOCAB
    assert loaded.tie_word_embeddings == bool(tiny.tie_word_embeddings)
    if loaded.tie_word_embeddings:
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        assert head.weight.data_ptr() == embed.weight.data_ptr()

    with torch.no_grad():
        logits = model(TOKEN_IDS).logits
    assert logits.shape == (1, TOKEN_IDS.shape[1], VOCAB)
    assert torch.isfinite(logits).all()

    # The file holds the seeded tiny model itself, rounded to `quant`.
    error = (logits - reference_logits(arch)).abs().max().item()
    assert error <= TOLERANCE[quant]


@pytest.mark.parametrize(("arch", "quant"), CASES)
def test_read_gguf_matches_gguf_reader(gguf_files, arch, quant):
    path = gguf_files(arch, quant)
    ours = read_gguf(path)
    theirs = {t.name: t for t in GGUFReader(path).tensors}

    assert list(ours.tensors) == list(theirs)
    for name, tensor in ours.tensors.items():
        reference = theirs[name]
        assert tensor.shape == tuple(int(d) for d in reversed(reference.shape)), name
        assert tensor.ggml_type == int(reference.tensor_type), name
        assert tensor.offset == reference.data_offset, name
        assert tensor.nbytes == reference.n_bytes, name
    assert ours.metadata["general.architecture"] == GGUF_ARCHS[arch]
    assert ("output.weight" in ours.tensors) != bool(CONFIGS[arch]().tie_word_embeddings)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_only_matrices_are_quantized(gguf_files, quant):
    kind = GGMLQuantizationType[quant]
    for tensor in GGUFReader(gguf_files("llama", quant)).tensors:
        expected = kind if len(tensor.shape) == 2 else GGMLQuantizationType.F32
        assert tensor.tensor_type == expected, tensor.name


@pytest.mark.parametrize("arch", SUPPORTED)
def test_transformers_loads_the_tokenizer(gguf_files, arch):
    path = gguf_files(arch, "F32")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert len(tokenizer) == VOCAB
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == 2
    ids = tokenizer("the cat sat on a hat")["input_ids"]
    assert ids and max(ids) < VOCAB
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "the cat sat on a hat"


def test_unsupported_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="gemma"):
        make_gguf("gemma", tmp_path / "gemma.gguf")
    with pytest.raises(ValueError, match="Q4_K"):
        make_gguf("llama", tmp_path / "llama.gguf", quant="Q4_K")


def test_seed_changes_the_weights(tmp_path):
    a = GGUFReader(make_gguf("llama", tmp_path / "a.gguf", seed=0)).get_tensor(0).data
    b = GGUFReader(make_gguf("llama", tmp_path / "b.gguf", seed=1)).get_tensor(0).data
    assert not np.array_equal(a, b)
