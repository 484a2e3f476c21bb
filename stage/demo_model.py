"""Build a tiny, deterministic Llama checkpoint for tests and demos, entirely offline.

The weights are random (seeded), so the text the model generates is meaningless; the
checkpoint exists to exercise layer splitting, sharded loading, tokenization and chat
templating without downloading anything. Building twice gives byte-identical files.

Usage: ``python -m stage.demo_model DIR``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from common.checkpoint import INDEX_FILE
from common.defaults import DEFAULT_DEMO_DIR

CORPUS_PATH = Path(__file__).with_name("demo_corpus.txt")
SEED = 1234
MAX_SHARD_SIZE = "2MB"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# Special tokens get ids 0..n-1 in this order, which DEMO_CONFIG's token ids rely on.
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
VOCAB_SIZE = 2048

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

DEMO_CONFIG: dict[str, object] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
    "bos_token_id": SPECIAL_TOKENS.index(BOS),
    "eos_token_id": SPECIAL_TOKENS.index(EOS),
    "pad_token_id": SPECIAL_TOKENS.index(PAD),
}


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on the shipped corpus."""
    # The trainer is multithreaded but breaks count ties by pair ids, so its output does not
    # depend on RAYON_NUM_THREADS (checked with 1..16 threads).
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").splitlines(True), trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(
            f"demo tokenizer has {tokenizer.get_vocab_size()} tokens, expected {VOCAB_SIZE}; "
            f"{CORPUS_PATH} is too small"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=DEMO_CONFIG["max_position_embeddings"],
    )


def build_model() -> LlamaForCausalLM:
    """Create the randomly initialised fp32 model from DEMO_CONFIG."""
    config = LlamaConfig(**DEMO_CONFIG)
    # fork_rng keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).to(torch.float32)
    return model.eval()


def _write_checkpoint(directory: Path) -> None:
    """Write model weights, configs and tokenizer into an existing empty directory."""
    tokenizer = train_tokenizer()
    for name, key in [(BOS, "bos_token_id"), (EOS, "eos_token_id"), (PAD, "pad_token_id")]:
        if tokenizer.convert_tokens_to_ids(name) != DEMO_CONFIG[key]:
            raise RuntimeError(f"tokenizer id of {name} does not match DEMO_CONFIG[{key!r}]")
    build_model().save_pretrained(directory, max_shard_size=MAX_SHARD_SIZE)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(directory, save_jinja_files=False)
    # safetensors writes shards with mode 0600; make every file as readable as the configs.
    for path in directory.iterdir():
        path.chmod(0o644)


def is_complete(directory: str | Path) -> bool:
    """Return True if directory holds a full checkpoint (configs, tokenizer, every shard)."""
    directory = Path(directory)
    required = ["config.json", "tokenizer.json", "tokenizer_config.json", INDEX_FILE]
    if not all((directory / name).is_file() for name in required):
        return False
    try:
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
    except (OSError, ValueError, KeyError):
        return False
    return all((directory / shard).is_file() for shard in set(weight_map.values()))


def _check_target(directory: str | Path) -> Path:
    """Resolve the target path and reject one that is an existing non-directory."""
    target = Path(directory).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"demo model path {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _build_into_sibling(target: Path) -> Path:
    """Build a checkpoint into a fresh hidden sibling of target and return its path."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _write_checkpoint(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def build_demo_model(directory: str | Path = DEFAULT_DEMO_DIR) -> Path:
    """Build the demo checkpoint into directory, replacing whatever is there; return its path."""
    target = _check_target(directory)
    tmp = _build_into_sibling(target)
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    if target.exists():
        # rename(2) cannot replace a non-empty directory, so move the old one aside first.
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def ensure_demo_model(directory: str | Path = DEFAULT_DEMO_DIR) -> Path:
    """Return directory, building the demo checkpoint first unless a complete one is there."""
    target = _check_target(directory)
    if is_complete(target):
        return target
    if target.exists() and not any(target.iterdir()):
        target.rmdir()
    if target.exists():
        return build_demo_model(target)
    tmp = _build_into_sibling(target)
    try:
        tmp.rename(target)
    except OSError:
        # Another process won the race; its checkpoint is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(target):
            raise
    return target


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: build the demo checkpoint into DIR."""
    parser = argparse.ArgumentParser(prog="python -m stage.demo_model", description=__doc__)
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DEMO_DIR)
    parser.add_argument(
        "--if-missing", action="store_true", help="skip the build when a complete one exists"
    )
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    builder = ensure_demo_model if args.if_missing else build_demo_model
    path = builder(args.directory)
    print(path, file=sys.stdout)


if __name__ == "__main__":
    main()
