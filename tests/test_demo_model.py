"""Tests for the deterministic offline demo checkpoint builder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.checkpoint import INDEX_FILE
from stage.demo_model import DEMO_CONFIG, build_demo_model, ensure_demo_model

REPO_ROOT = Path(__file__).resolve().parent.parent


def digests(directory: Path) -> dict[str, str]:
    """Map every file name in directory to its sha256."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.iterdir())
    }


def mtimes(directory: Path) -> dict[str, int]:
    """Map every file name in directory to its mtime in nanoseconds."""
    return {path.name: path.stat().st_mtime_ns for path in directory.iterdir()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One in-process build shared by the read-only tests."""
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model")


def test_build_is_byte_identical_across_processes(built: Path, tmp_path: Path) -> None:
    other = tmp_path / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-m", "stage.demo_model", str(other)],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert digests(other) == digests(built)


def test_checkpoint_files_and_sharded_index(built: Path) -> None:
    names = {path.name for path in built.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", INDEX_FILE} <= names
    shards = set(json.loads((built / INDEX_FILE).read_text())["weight_map"].values())
    assert len(shards) >= 2
    assert shards <= names
    assert shards == {name for name in names if name.endswith(".safetensors")}


def test_model_loads_as_small_gqa_llama(built: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built)
    config = model.config
    assert config.model_type == "llama"
    assert config.num_hidden_layers >= 6
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.vocab_size == DEMO_CONFIG["vocab_size"]
    assert config.tie_word_embeddings is False


def test_tokenizer_round_trips_and_has_chat_template(built: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built)
    text = "Water runs downhill, and every stage of the pipeline stays busy."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer) == DEMO_CONFIG["vocab_size"]
    assert tokenizer.eos_token_id == DEMO_CONFIG["eos_token_id"]
    assert tokenizer.chat_template
    assert "chat_template" in json.loads((built / "tokenizer_config.json").read_text())
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False
    )
    assert "Hello" in prompt
    assert prompt.endswith("<|assistant|>\n")


def test_ensure_skips_complete_and_rebuilds_incomplete(built: Path, tmp_path: Path) -> None:
    target = tmp_path / "model"
    shutil.copytree(built, target)
    before = mtimes(target)
    assert ensure_demo_model(target) == target.absolute()
    assert mtimes(target) == before

    shard = next(target.glob("*.safetensors"))
    shard.unlink()
    ensure_demo_model(target)
    assert digests(target) == digests(built)
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_ensure_replaces_half_written_directory(built: Path, tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    ensure_demo_model(target)
    assert digests(target) == digests(built)


def test_file_in_the_way_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        ensure_demo_model(target)
