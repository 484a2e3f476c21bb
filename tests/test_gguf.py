"""GGUF checkpoints, checked against transformers' own GGUF loader.

- contracts: the config and the GGUF -> transformers name map that stage/gguf.py builds from
  our own parse of the header are transformers' own (`AutoConfig.from_pretrained(gguf_file=)`,
  `get_gguf_hf_weights_map`), for every tiny architecture and for the built-in SmolLM2;
- every tensor a shard loads is the tensor `from_pretrained(gguf_file=)` loads, bit for bit;
- chained shards compute the monolithic forward bit for bit, prefill and decode;
- through real processes, greedy generation equals transformers' `generate` on the same file;
- broken files, unknown architectures and mismatched stages get errors that name the file and
  say what to do.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
)

from bench.run import stage_memory
from client import Client
from common.checkpoint import CheckpointError, read_checkpoint
from common.gguf import read_gguf
from common.models import DEMO_QUESTION, builtin_model
from stage.adapters import meta_model
from stage.checkpoint import open_checkpoint
from stage.gguf import _layer_pattern_map, transformers_config
from stage.loading import load_shard
from tests.cluster import Cluster
from tests.test_e2e import prompt_ids
from tests.test_parity import SPLITS, assert_chain_equals_reference
from tests.tiny_gguf import SUPPORTED, make_gguf

# (architecture, quant) of the exactness tests: a llama-family file (Q/K permuted by the
# loader), a tied-head one (qwen2) and GPT-2 (Conv1D transposes, learned positions).
CASES = [
    ("llama", "F32"),
    ("llama", "Q8_0"),
    ("llama", "Q4_0"),
    ("qwen2", "F32"),
    ("qwen2", "Q8_0"),
    ("gpt2", "F32"),
    ("gpt2", "Q8_0"),
]
# Layer ranges of the 5-layer tiny models: whole model, first stage, a middle one, last stage.
RANGES = [(0, 5), (0, 2), (2, 4), (3, 5)]
DECODE_STEPS = 8
E2E_TOKENS = 8
# Stages that hold the file's tensors dequantized to float32, which is transformers' own math
# (a GGUF file's default is its own blocks, whose products are not bit-exact).
EXACT = ("--weights", "float32")
SMOL_TOKENS = 12


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory) -> Callable[..., Path]:
    """`get(arch, quant="F32", seed=0)`: the tiny GGUF file, written once per session."""
    root = tmp_path_factory.mktemp("gguf")
    made: dict[tuple[str, str, int], Path] = {}

    def get(arch: str, quant: str = "F32", seed: int = 0) -> Path:
        key = (arch, quant, seed)
        if key not in made:
            made[key] = make_gguf(arch, root / f"{arch}-{quant}-{seed}" / "tiny.gguf", quant, seed)
        return made[key]

    return get


@pytest.fixture(scope="session")
def reference(gguf_file) -> Callable[[str, str], torch.nn.Module]:
    """`get(arch, quant)`: transformers' float32 model of the tiny file, loaded once."""
    made: dict[tuple[str, str], torch.nn.Module] = {}

    def get(arch: str, quant: str) -> torch.nn.Module:
        if (arch, quant) not in made:
            made[arch, quant] = _from_pretrained(gguf_file(arch, quant))
        return made[arch, quant]

    return get


@pytest.fixture(scope="session")
def smollm2() -> Path:
    try:
        return builtin_model()
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_config(smollm2):
    """transformers' own config of the built-in model (parsing its GGUF takes seconds)."""
    return AutoConfig.from_pretrained(smollm2.parent, gguf_file=smollm2.name)


def _from_pretrained(path: Path, **kwargs) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs
    ).eval()
    model.generation_config.eos_token_id = None  # always generate the full length
    model.generation_config.pad_token_id = 0
    return model


def _greedy_generate(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy generate on one thread, like the test stages (bits depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n)
    finally:
        torch.set_num_threads(threads)
    return out[0, len(prompt) :].tolist()


# ---- 1. contracts with transformers' GGUF internals ------------------------------------------


def _without_name(config) -> dict:
    d = config.to_dict()
    d.pop("_name_or_path", None)
    return d


def _check_contract(path: Path, theirs) -> None:
    parsed = read_gguf(path)
    ours = transformers_config(parsed)
    assert type(ours) is type(theirs)
    assert _without_name(ours) == _without_name(theirs)

    processor = TENSOR_PROCESSORS.get(parsed.architecture, TensorProcessor)(config=theirs.to_dict())
    expected = get_gguf_hf_weights_map(meta_model(theirs, torch.float32), processor)
    assert _layer_pattern_map(ours, processor, get_gguf_hf_weights_map) == expected
    # The stage's checkpoint maps every tensor of the file through that same map.
    ckpt = open_checkpoint(path)
    assert set(parsed.tensors) <= set(expected)
    assert ckpt.names == {name: key for key, name in expected.items()}


@pytest.mark.parametrize("arch", SUPPORTED)
def test_config_and_name_map_are_transformers_own(gguf_file, arch):
    path = gguf_file(arch)
    _check_contract(path, AutoConfig.from_pretrained(path.parent, gguf_file=path.name))


def _rewrite(source: Path, path: Path, **metadata) -> Path:
    """A copy of a GGUF file with some metadata values replaced (same value types)."""
    reader = GGUFReader(source)
    writer = GGUFWriter(path, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes these itself
        kind = field.types[0]
        sub = field.types[1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, metadata.get(key, field.contents()), kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def named_mistral(gguf_file, tmp_path) -> Path:
    """A llama-architecture file whose `general.name` is exactly "mistral"."""
    return _rewrite(gguf_file("mistral"), tmp_path / "mistral.gguf", **{"general.name": "mistral"})


def test_a_llama_file_named_mistral_has_transformers_config(named_mistral):
    """llama.cpp writes Mistral as `llama`; transformers' loader takes it back as mistral when
    `general.name` is exactly "mistral", and so does `transformers_config`."""
    path = named_mistral
    theirs = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert theirs.model_type == "mistral"
    assert _without_name(transformers_config(read_gguf(path))) == _without_name(theirs)


def test_a_llama_file_named_mistral_opens_with_the_files_own_tensor_names(named_mistral):
    """transformers builds its config as mistral; its tensors keep the llama file's names."""
    ckpt = open_checkpoint(named_mistral)
    assert ckpt.config.model_type == "mistral"
    assert ckpt.key_for("model.layers.0.self_attn.q_proj.weight") == "blk.0.attn_q.weight"
    assert ckpt.key_for("model.embed_tokens.weight") == "token_embd.weight"


@pytest.mark.timeout(300)
def test_config_and_name_map_are_transformers_own_for_smollm2(smollm2, smollm2_config):
    _check_contract(smollm2, smollm2_config)
    assert smollm2_config.num_hidden_layers == read_checkpoint(smollm2).num_layers == 30


# ---- 2. every loaded tensor is transformers' own -----------------------------------------------


def _shard_state(shard) -> dict[str, torch.Tensor]:
    """A shard's tensors under the whole model's names (local layer i is layer start + i)."""
    adapter = shard.adapter
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(shard.layers):
        for name, t in layer.state_dict().items():
            out[f"{adapter.layers}.{shard.start + i}.{name}"] = t
    for role in ("embed", "positions", "norm", "head"):
        module = getattr(shard, role)
        if module is not None:
            for name, t in module.state_dict().items():
                out[f"{getattr(adapter, role)}.{name}"] = t
    return out


@pytest.mark.parametrize(("start", "end"), RANGES)
@pytest.mark.parametrize(("arch", "quant"), CASES)
def test_shard_tensors_equal_from_pretrained(gguf_file, reference, arch, quant, start, end):
    path = gguf_file(arch, quant)
    expected = reference(arch, quant).state_dict()
    shard = load_shard(open_checkpoint(path), start, end)
    got = _shard_state(shard)

    layers = {f"{shard.adapter.layers}.{i}." for i in range(start, end)}
    wanted = {
        k
        for k in expected
        if any(k.startswith(p) for p in layers)
        or (start == 0 and k.startswith((shard.adapter.embed, shard.adapter.positions or "-")))
        or (end == 5 and k.startswith((shard.adapter.norm, shard.adapter.head)))
    }
    assert set(got) == wanted
    if (start, end) == (0, 5):
        assert set(got) == set(expected)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, expected[name]), f"{arch} {quant} [{start},{end}): {name}"

    tied = reference(arch, quant).config.tie_word_embeddings
    assert tied == (arch != "llama")  # qwen2's and gpt2's tiny files have no output.weight
    if tied and (start, end) == (0, 5):
        assert shard.head.weight is shard.embed.weight  # one matrix, as in the monolithic model


# ---- 3. chained shards compute the monolithic forward ------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("arch", "quant"), CASES)
def test_prefill_and_decode_bit_exact(gguf_file, reference, arch, quant, split):
    ckpt = open_checkpoint(gguf_file(arch, quant))
    shards = [load_shard(ckpt, a, b) for a, b in SPLITS[split]]
    label = f"{arch} {quant} split {split}"
    assert_chain_equals_reference(reference(arch, quant), shards, label, DECODE_STEPS)


# ---- 4. end to end through real processes -----------------------------------------------------


@pytest.fixture(scope="module")
def llama_q8_cluster(gguf_file):
    with Cluster(gguf_file("llama", "Q8_0"), 3, stage_args=EXACT) as cluster:
        yield cluster


def _check_greedy(cluster: Cluster, model: torch.nn.Module, prompt: list[int]) -> None:
    expected = _greedy_generate(model, prompt, E2E_TOKENS)
    status = cluster.status()
    assert len(status["map"]) == 3 and status["num_layers"] == 5
    with Client(cluster.url) as client:
        result = client.generate(prompt, max_new_tokens=E2E_TOKENS, ignore_eos=True)
    assert result.token_ids == expected
    assert result.finish_reason == "length"


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("arch", "quant", "seed"), [("gpt2", "F32", 22), ("qwen2", "Q4_0", 23)])
def test_greedy_through_three_stages(gguf_file, reference, arch, quant, seed):
    """A third architecture and a second quant type through real stage processes (llama Q8_0
    has its own cluster, below): learned positions and fused qkv; biases and a tied head."""
    with Cluster(gguf_file(arch, quant), 3, stage_args=EXACT) as cluster:
        _check_greedy(cluster, reference(arch, quant), prompt_ids(seed))


@pytest.mark.timeout(600)
def test_smollm2_answers_the_demo_question_like_transformers(smollm2, smollm2_config):
    tokenizer = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": DEMO_QUESTION}], add_generation_prompt=True, tokenize=False
    )
    prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    model = _from_pretrained(smollm2, config=smollm2_config)
    expected = _greedy_generate(model, prompt, SMOL_TOKENS)
    del model

    cluster = Cluster(smollm2, 3, stage_args=EXACT)
    cluster.ready_timeout_s = 300  # three processes load a real model on a shared machine
    with cluster, Client(cluster.url, tokenizer=tokenizer) as client:
        assert len(cluster.status()["map"]) == 3
        result = client.generate(
            DEMO_QUESTION, chat=True, max_new_tokens=SMOL_TOKENS, ignore_eos=True
        )
        memory = stage_memory(cluster, cluster.status(), smollm2, "float32")
    assert result.token_ids == expected
    assert "Paris" in result.text
    assert "Paris" in tokenizer.decode(expected)
    # Each stage's peak is its fixed part (its runtime, held before its first layer, and the
    # library code mapped since) plus at most 1.15 times its dequantized share: it never holds
    # another stage's tensors or a whole tensor's dequantization temporaries.
    assert len(memory) == 3
    for row in memory:
        assert row["met"], (
            f"{row['stage']}: peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB for a share of "
            f"{row['share_bytes'] / 2**20:.0f} MiB, a runtime of "
            f"{row['runtime_bytes'] / 2**20:.0f} MiB and {row['code_bytes'] / 2**20:.0f} MiB "
            f"of code mapped since (limit {row['limit_bytes'] / 2**20:.0f} MiB); now "
            f"{row['rss_anon_bytes'] / 2**20:.0f} MiB anonymous and "
            f"{row['rss_file_bytes'] / 2**20:.0f} MiB from files, against "
            f"{row['runtime_file_bytes'] / 2**20:.0f} MiB from files and a peak of "
            f"{row['runtime_peak_bytes'] / 2**20:.0f} MiB before the first layer"
        )


@pytest.mark.timeout(240)
def test_greedy_through_three_stages_llama_q8_0(reference, llama_q8_cluster):
    _check_greedy(llama_q8_cluster, reference("llama", "Q8_0"), prompt_ids(21))


# ---- 5. errors name the file and say what to do -----------------------------------------------


def test_truncated_file_is_refused(gguf_file, tmp_path):
    source = gguf_file("llama", "Q8_0")
    header = read_gguf(source).header_bytes
    data = source.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: header + (len(data) - header) // 2])  # mid tensor data
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(cut)
    message = str(e.value)
    assert str(cut) in message and "truncated" in message and "re-download" in message
    # Through the directory that holds it, too.
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(tmp_path)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04" + bytes(200))  # a zip file, named .gguf
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(fake)
    assert str(fake) in str(e.value) and "not a GGUF file" in str(e.value)
    assert "check the path" in str(e.value)
    stub = tmp_path / "stub.gguf"
    stub.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(stub)
    assert str(stub) in str(e.value) and "re-download" in str(e.value)


def test_a_directory_with_two_gguf_files_is_refused(gguf_file, tmp_path):
    shutil.copy(gguf_file("llama"), tmp_path / "a.gguf")
    shutil.copy(gguf_file("gpt2"), tmp_path / "b.gguf")
    for reader in (read_checkpoint, open_checkpoint):
        with pytest.raises(CheckpointError) as e:
            reader(tmp_path)
        message = str(e.value)
        assert str(tmp_path) in message and "a.gguf, b.gguf" in message
        assert "name one with --model" in message
    # Naming one of them works.
    assert open_checkpoint(tmp_path / "b.gguf").config.model_type == "gpt2"


def _write_minimal(path: Path, arch: str) -> Path:
    writer = GGUFWriter(path, arch)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_context_length(128)
    writer.add_tensor("token_embd.weight", np.zeros((16, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["gemma", "zorblax"])
def test_an_architecture_transformers_cannot_load_is_refused(tmp_path, arch):
    path = _write_minimal(tmp_path / f"{arch}.gguf", arch)
    assert read_checkpoint(path).num_layers == 2  # the broker can plan with it
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    message = str(e.value)
    assert str(path) in message
    assert f"holds a {arch!r} model, which transformers cannot load from GGUF" in message
    assert "llama" in message and "qwen2" in message  # what it can load instead


def test_the_refusal_lists_only_architectures(tmp_path):
    path = _write_minimal(tmp_path / "gemma.gguf", "gemma")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    listed = re.search(r"\(it reads ([^)]*)\)", str(e.value)).group(1).split(", ")
    assert "general" not in listed and "tokenizer" not in listed
    assert {"llama", "qwen2", "gpt2"} <= set(listed)
    assert "use a Hugging Face checkpoint of it" in str(e.value)


def _set_metadata(path: Path, key: str, value: int) -> None:
    """Overwrite one integer metadata value of a GGUF file in place."""
    reader = GGUFReader(path, "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader


@pytest.mark.parametrize(
    ("key", "value", "tensor"),
    [
        ("llama.embedding_length", 32, "attn_q.weight"),
        ("llama.feed_forward_length", 64, "ffn_gate.weight"),
    ],
)
def test_tensor_shape_against_metadata_is_checked(gguf_file, tmp_path, key, value, tensor):
    path = tmp_path / "bent.gguf"
    shutil.copy(gguf_file("llama"), path)
    _set_metadata(path, key, value)
    ckpt = open_checkpoint(path)  # the header alone is consistent
    for start, end in [(0, 5), (3, 5)]:
        with pytest.raises(CheckpointError) as e:
            load_shard(ckpt, start, end)
        message = str(e.value)
        assert str(path) in message
        assert f"tensor blk.{start}.{tensor} has shape" in message
        assert "the file is corrupt or was converted wrongly" in message


@pytest.mark.timeout(240)
def test_a_stage_with_another_gguf_file_is_refused(gguf_file, llama_q8_cluster):
    other = gguf_file("llama", "Q8_0", seed=1)
    served = llama_q8_cluster.model
    theirs, ours = read_checkpoint(other).fingerprint, read_checkpoint(served).fingerprint
    assert theirs != ours
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stage",
            "--broker",
            llama_q8_cluster.url,
            "--model",
            str(other),
            "--name",
            "intruder",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=llama_q8_cluster.env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    assert f"sees checkpoint {theirs} but the broker serves {ours} ({served})" in output
    assert "point --model at the same checkpoint" in output
    status = llama_q8_cluster.status()
    assert status["ready"] and all(s["name"] != "intruder" for s in status["stages"])
