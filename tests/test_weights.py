"""`--weights`: a stage holds its weight matrices in float32, bfloat16, or 8- or 4-bit blocks
(a GGUF file's own, `native`), the broker's memory plan counts those bytes, and stages holding
different kinds serve one model through real processes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from broker.layermap import LayerCost, StageCapacity, plan
from client import Client
from common.checkpoint import read_checkpoint
from common.weights import block_bytes
from stage.checkpoint import open_checkpoint
from stage.loading import load_shard
from tests.cluster import Cluster
from tests.test_e2e import prompt_ids
from tests.tiny_gguf import make_gguf

KINDS = ("float32", "bfloat16", "int8", "q4")
TOKENS = 8


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory) -> Path:
    """A tiny llama GGUF whose matrices are Q4_0 blocks (its embedding too)."""
    return make_gguf("llama", tmp_path_factory.mktemp("w") / "tiny-q4.gguf", "Q4_0", seed=3)


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory) -> Path:
    return make_gguf("llama", tmp_path_factory.mktemp("w") / "tiny-q8.gguf", "Q8_0", seed=4)


def _plan_bytes(path: Path, start: int, end: int, kind: str) -> int:
    """What the broker's plan counts for layers [start, end) held as `kind`."""
    meta = read_checkpoint(path)
    layers, first, last = meta.role_bytes(4, kind)
    n = meta.num_layers
    total = sum(layers[i] for i in range(start, end))
    return total + (first if start == 0 else 0) + (last if end == n else 0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("span", [(0, 2), (1, 3), (2, 5)])
def test_the_plan_counts_the_bytes_a_float_checkpoint_stage_holds(checkpoints, kind, span):
    """The broker plans with the bytes the stage will hold: the loaded shard's weights are
    exactly what `role_bytes` counts for its range, in every kind."""
    start, end = span
    shard = load_shard(checkpoints["llama"], start, end, weights=kind)
    assert shard.weights == kind
    assert shard.weight_bytes() == _plan_bytes(checkpoints["llama"], start, end, kind)


@pytest.mark.parametrize("kind", ("float32", "int8", "q4", "native"))
@pytest.mark.parametrize("fixture", ["tiny_q4", "tiny_q8"])
def test_the_plan_counts_the_bytes_a_gguf_stage_holds(request, fixture, kind):
    path = request.getfixturevalue(fixture)
    n = read_checkpoint(path).num_layers
    for start, end in ((0, 2), (2, n), (0, n)):
        shard = load_shard(path, start, end, weights=kind)
        assert shard.weight_bytes() == _plan_bytes(path, start, end, kind), (start, end)


def test_block_kinds_hold_a_fraction_of_float32(checkpoints):
    """4-bit blocks of 32 weights take 16 bytes of codes and 8 of scale and offset: 24 bytes
    for 128 of float32 (0.1875); 8-bit ones 40 (0.3125). Norms and biases stay float32, so
    a layer's share is a little above those ratios."""
    assert block_bytes(4) == 24 and block_bytes(8) == 40
    path = checkpoints["llama"]
    f32 = _plan_bytes(path, 1, 3, "float32")
    assert 0.1875 < _plan_bytes(path, 1, 3, "q4") / f32 < 0.2
    assert 0.3125 < _plan_bytes(path, 1, 3, "int8") / f32 < 0.33
    assert _plan_bytes(path, 1, 3, "bfloat16") / f32 < 0.51


def test_native_keeps_the_files_blocks_and_their_values(tiny_q4):
    """`native` holds the GGUF's Q4_0 blocks as they are: every weight the same value as the
    file's dequantized float32, so the products differ from float32's only in their order of
    summation (no requantization error)."""
    native = load_shard(tiny_q4, 0, 2, weights="native")
    plain = load_shard(tiny_q4, 0, 2, weights="float32")
    q = native.layers[0].self_attn.q_proj
    assert torch.equal(q.weight.dequantize(), plain.layers[0].self_attn.q_proj.weight)
    assert torch.equal(native.embed.weight.dequantize(), plain.embed.weight)
    # The same digests as a float32 stage: the bytes read are the file's either way.
    assert native.digests == plain.digests


def test_a_stage_holding_blocks_takes_more_layers():
    """Two stages offering the same memory: the one holding 4-bit blocks takes as many more
    layers as its layers cost it less."""
    dense = LayerCost(layer_bytes=100, first_extra_bytes=50, last_extra_bytes=50)
    small = LayerCost(layer_bytes=20, first_extra_bytes=10, last_extra_bytes=10)
    stages = [StageCapacity("a", 1000), StageCapacity("b", 1000, small)]
    layer_map = plan(stages, 24, "capacity", dense)
    a, b = layer_map.range_of("a"), layer_map.range_of("b")
    assert (a.end - a.start, b.end - b.start) == (4, 20)
    # With the float32 cost for both, the same memory takes the same layers.
    counts = plan([StageCapacity("a", 1000), StageCapacity("b", 1000)], 18, "capacity", dense)
    assert [r.end - r.start for r in counts.ranges] == [9, 9]


def _in_process(path: Path, spans, kinds, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of shards held as `kinds`, one after the other in this process."""
    ckpt = open_checkpoint(path)
    shards = [
        load_shard(ckpt, start, end, weights=kind)
        for (start, end), kind in zip(spans, kinds, strict=True)
    ]
    states = [s.new_cache() for s in shards]
    ids, out = torch.tensor([prompt]), []
    for _ in range(n):
        x = ids
        for shard, state in zip(shards, states, strict=True):
            x = shard.forward(x, state)
        token = int(x[0, -1].argmax())
        out.append(token)
        ids = torch.tensor([[token]])
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("source", "kinds"),
    [
        ("tiny_q4", {"s0": "native", "s1": "q4", "s2": "int8"}),
        ("llama", {"s0": "bfloat16", "s1": "float32"}),
    ],
)
def test_stages_of_different_kinds_serve_one_model(request, checkpoints, source, kinds):
    """Stage processes, each holding its weights its own way, generate what the same shards
    generate in one process: the block products are deterministic, and the held form crosses
    no process boundary. STATUS shows each stage's kind."""
    path = checkpoints["llama"] if source == "llama" else request.getfixturevalue(source)
    prompt = prompt_ids(31)
    with _mixed_cluster(path, kinds) as (cluster, status):
        spans = [(r["start"], r["end"]) for r in status["map"]]
        order = [kinds[r["stage"]] for r in status["map"]]
        with Client(cluster.url) as client:
            result = client.generate(prompt, max_new_tokens=TOKENS, ignore_eos=True)
    assert result.token_ids == _in_process(path, spans, order, prompt, TOKENS)


@contextlib.contextmanager
def _mixed_cluster(path: Path, kinds: dict[str, str], broker_args=(), stage_args=()):
    """A broker and one stage per name, each started with its own --weights; the first
    ready STATUS, after checking it shows each stage's kind."""
    cluster = Cluster(path, 0, broker_args=("--expect-stages", str(len(kinds)), *broker_args))
    try:
        cluster.start_broker()
        for name, kind in kinds.items():
            cluster.start_stage(name, "--weights", kind, *stage_args)
        status = cluster.wait_ready(stages=len(kinds))
        assert {s["name"]: s["weights"] for s in status["stages"]} == kinds
        yield cluster, status
    finally:
        cluster.close()


@pytest.mark.timeout(240)
def test_the_broker_gives_a_block_stage_more_layers(checkpoints):
    """Two stage processes offer the same memory; the broker's capacity plan counts each at
    the bytes of its own kind, so the one holding 4-bit blocks (0.19 of float32's bytes per
    layer) takes four of the five layers."""
    kinds = {"s0": "float32", "s1": "q4"}
    with _mixed_cluster(
        checkpoints["llama"], kinds, ("--strategy", "capacity"), ("--memory-mb", "1")
    ) as (_, status):
        assert [(r["stage"], r["start"], r["end"]) for r in status["map"]] == [
            ("s0", 0, 1),
            ("s1", 1, 5),
        ]


def test_blocks_need_a_float32_stage(checkpoints):
    """Block products compute in float32: a bfloat16 stage asked for blocks says what to do,
    before it loads anything."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stage",
            "--broker",
            "tcp://127.0.0.1:9",
            "--model",
            str(checkpoints["llama"]),
            "--dtype",
            "bfloat16",
            "--weights",
            "q4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--weights q4 needs a float32 stage" in done.stderr
    assert "--weights bfloat16, or --dtype float32" in done.stderr


@pytest.mark.parametrize("kind", ("bfloat16", "int8", "q4", "native"))
@pytest.mark.parametrize("source", ["llama", "tiny_q8"])
def test_a_converted_stage_reports_the_files_digests(request, checkpoints, source, kind):
    """Matrices converted a block of rows at a time are digested over the same bytes, in the
    same order, as a float32 stage reads them: the broker checks them against its own."""
    path = checkpoints["llama"] if source == "llama" else request.getfixturevalue(source)
    n = read_checkpoint(path).num_layers
    converted = load_shard(path, 0, n, weights=kind)
    assert converted.digests == load_shard(path, 0, n, weights="float32").digests


def test_a_matrix_is_converted_without_its_float_copy(tmp_path):
    """A float32 embedding of 64 MiB, held as 4-bit blocks, is read in blocks of rows: the
    load's peak stays far below the float copy it never makes."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import CONFIGS

    config = CONFIGS["llama"]()
    config.vocab_size = 1 << 18
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wide")
    script = f"""
from stage.loading import load_shard
from stage.resident import reset_peak, resident
load_shard({str(tmp_path / "wide")!r}, 1, 2, weights="q4")  # imports the model's code
before = resident()
assert reset_peak()
shard = load_shard({str(tmp_path / "wide")!r}, 0, 1, weights="q4")
print(resident().peak - before.rss, shard.embed.weight.nbytes())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    grown, held = map(int, done.stdout.split())
    dense = (1 << 18) * config.hidden_size * 4
    assert dense == 64 << 20
    assert held < dense / 5
    # The embedding's blocks, one 1 MiB block of float rows at a time and its blocks, and the
    # layer's few tensors: well under a quarter of the float copy on top of what it holds.
    assert grown < held + dense / 4, (grown, held, dense)


@pytest.fixture(scope="module")
def smollm2_decode():
    """SmolLM2 as float32 and as its own blocks, and three prompts from the shipped text each
    continued greedily by float32 for 24 tokens, with the logits that chose each token."""
    from transformers import AutoTokenizer

    from bench.agreement import forced, greedy
    from common.models import builtin_model

    try:
        path = builtin_model()
    except ValueError as e:
        pytest.skip(str(e))
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = (Path(__file__).parent.parent / "stage" / "demo_corpus.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompts = [ids[at : at + 48] for at in (0, 1500, 3000)]
    plain = load_shard(path, 0, 30, weights="float32")
    runs = [greedy(plain, prompt, 24) for prompt in prompts]
    del plain
    native = load_shard(path, 0, 30, weights="native")
    return native, runs, lambda seq: forced(native, seq, 48)


@pytest.mark.timeout(300)
def test_smollm2_native_blocks_hold_float32s_values(smollm2_decode, monkeypatch):
    """SmolLM2's own Q4_1 blocks (`native`) hold exactly the values float32 dequantizes
    (checked above for Q4_0). With float activations, its decode logits then differ from
    float32's only by the order of summation: at most 7.2e-5 over 512 positions in
    bench.agreement. The bound is 14 times that, and far under what one quantization step of
    the weights moves (the same weights requantized to q4 blocks: mean 0.44, max 5.3)."""
    from stage import quant

    monkeypatch.setattr(quant, "QUANTIZE_X", False)
    _, runs, forced = smollm2_decode
    for seq, ref in runs:
        assert float((forced(seq) - ref).abs().max()) <= 1e-3


@pytest.mark.timeout(300)
def test_smollm2_native_decoding_agrees_with_float32(smollm2_decode):
    """By default the block kernels also round each block of 32 activations to 8 bits, as
    llama.cpp does for Q4_1 (its Q8_1 activations): each product moves by at most half an
    activation step times the block's weights (tests/test_quant.py). The greedy choices must
    still agree with float32's at 90 % of the positions or more, the agreement the product
    asks of SmolLM2's own weights, and the mean logit error stay under half a logit
    (bench.agreement measured 94 % and 0.27 over 256 positions)."""
    _, runs, forced = smollm2_decode
    agree = count = 0
    errors = []
    for seq, ref in runs:
        logits = forced(seq)
        agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        count += len(ref)
        errors.append((logits - ref).abs().mean())
    assert agree >= 0.9 * count
    assert float(torch.stack(errors).mean()) < 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_hands_on_the_compute_dtype(checkpoints, kind):
    """Whatever a stage holds, the hidden states it hands on, for one request or a decode
    batch, are float32 like a float32 stage's: the next stage, and the batch's masks, are
    built for them."""
    path = checkpoints["llama"]
    first = load_shard(path, 0, 2, weights=kind)
    states = [first.new_cache() for _ in range(3)]
    prompts = [torch.tensor([prompt_ids(40 + i)]) for i in range(3)]
    for x, state in zip(prompts, states, strict=True):
        assert first.forward(x, state).dtype == torch.float32
    steps = [torch.tensor([[5 + i]]) for i in range(3)]
    for _ in range(2):  # a new batch, then the kept one
        out = first.forward_batch(steps, states)
        assert [o.dtype for o in out] == [torch.float32] * 3
