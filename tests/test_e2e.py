"""End to end through real processes: broker and stages on loopback, the real client library."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
import zmq
from transformers import AutoModelForCausalLM

from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd, Code
from client import AsyncClient, Client
from tests.cluster import Cluster
from tests.tiny_models import VOCAB
from tests.wire import raw_message

NEW_TOKENS = 24


def reference_greedy(directory, prompt: list[int], n: int, eos: bool = False) -> list[int]:
    """transformers' own greedy generate, on one thread like the test stages (bits depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _generate(directory, prompt, n, eos)
    finally:
        torch.set_num_threads(threads)


def _generate(directory, prompt: list[int], n: int, eos: bool) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    if not eos:
        model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt) :].tolist()


def prompt_ids(seed: int, length: int = 7) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


def stage_caches(status: dict) -> int:
    return sum(s.get("kv_requests") or 0 for s in status["stages"])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_greedy_through_the_broker_equals_generate(request, checkpoints, arch, stages):
    directory = checkpoints[arch]
    prompt = prompt_ids(stages)
    expected = reference_greedy(directory, prompt, NEW_TOKENS)
    with contextlib.ExitStack() as stack:
        if (arch, stages) == ("llama", 3):  # the module's shared cluster is this very one
            cluster = request.getfixturevalue("llama_cluster")
        else:
            cluster = stack.enter_context(Cluster(directory, stages))
        client = stack.enter_context(Client(cluster.url, tokenizer=None))
        status = cluster.status()
        assert [(r["start"], r["end"]) for r in status["map"]][0][0] == 0 and len(
            status["map"]
        ) == stages
        result = client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert result.token_ids == expected
        assert result.finish_reason == "length"
        assert len(result.trace) == NEW_TOKENS
        assert [t["stage"] for t in result.trace[0]["stages"]] == [
            r["stage"] for r in status["map"]
        ]


@pytest.fixture(scope="module")
def llama_cluster(checkpoints):
    """Three llama stages with the default arguments, shared by the tests that change nothing
    cluster-wide (the greedy test's 3-llama case among them)."""
    with Cluster(checkpoints["llama"], 3) as cluster:
        yield cluster


@pytest.mark.timeout(180)
@pytest.mark.parametrize("streams", [8, 16])
def test_concurrent_greedy_streams_from_four_clients_equal_generate(
    checkpoints, llama_cluster, streams
):
    directory = checkpoints["llama"]
    prompts = [prompt_ids(100 + i, length=3 + i % 5) for i in range(streams)]
    expected = [reference_greedy(directory, p, 16) for p in prompts]
    before = {st["name"]: st["batched_items"] or 0 for st in llama_cluster.status()["stages"]}

    async def one_client(k: int) -> list[list[int]]:
        async with AsyncClient(llama_cluster.url) as client:
            results = await asyncio.gather(
                *(
                    client.generate(prompts[i], max_new_tokens=16, ignore_eos=True)
                    for i in range(k, streams, 4)
                )
            )
            return [r.token_ids for r in results]

    async def all_clients():
        return await asyncio.gather(*(one_client(k) for k in range(4)))

    per_client = asyncio.run(all_clients())
    for k, tokens in enumerate(per_client):
        assert tokens == [expected[i] for i in range(k, streams, 4)]
    status = llama_cluster.wait_for(lambda s: stage_caches(s) == 0, 10, "caches released")
    assert status["requests"] == 0
    # The concurrent decode steps ran as batches on every stage.
    status = llama_cluster.wait_for(
        lambda s: all((st["batched_items"] or 0) > before[st["name"]] for st in s["stages"]),
        5,
        "batches on every stage",
    )
    assert all(st["batched_items"] > st["batches"] > 0 for st in status["stages"])


@pytest.mark.timeout(120)
def test_endings_eos_stop_and_length(checkpoints, llama_cluster):
    directory = checkpoints["llama"]
    prompt = prompt_ids(7)
    free_run = reference_greedy(directory, prompt, 20)
    with Client(llama_cluster.url) as client:
        # max_new_tokens
        r = client.generate(prompt, max_new_tokens=5, ignore_eos=True)
        assert r.finish_reason == "length" and r.token_ids == free_run[:5]
        # EOS: a prompt whose greedy continuation reaches the model's eos token (id 2)
        eos_prompt = next(
            p
            for p in (prompt_ids(s) for s in range(300))
            if 2 in reference_greedy(directory, p, 20)[1:]
        )
        expected = reference_greedy(directory, eos_prompt, 20, eos=True)
        r = client.generate(eos_prompt, max_new_tokens=20)
        assert r.finish_reason == "eos"
        assert r.token_ids == expected[: expected.index(2)]


@pytest.mark.timeout(120)
def test_stop_string_with_demo_tokenizer(tmp_path):
    from stage.demo_model import ensure_demo_model

    demo = ensure_demo_model(tmp_path / "demo")
    with Cluster(demo, 2) as cluster, Client(cluster.url) as client:
        free = client.generate("The river", max_new_tokens=24)
        assert free.finish_reason in ("length", "eos") and free.text
        stop = free.text[len(free.text) // 2 :][:3]
        r = client.generate("The river", max_new_tokens=24, stop=[stop])
        assert r.finish_reason == "stop"
        assert stop not in r.text and free.text.startswith(r.text)


@pytest.mark.timeout(120)
def test_cancel_mid_stream_frees_every_cache(llama_cluster):
    with Client(llama_cluster.url) as client:
        stream = client.stream(prompt_ids(9), max_new_tokens=200, ignore_eos=True)
        seen = 0
        for event in stream:
            if event["type"] == "token":
                seen += 1
                if seen == 5:
                    # One cache per stage while it runs (stage stats travel in heartbeats).
                    llama_cluster.wait_for(
                        lambda s: stage_caches(s) == 3, 5, "a cache on every stage"
                    )
                    break
        stream.close()
    status = llama_cluster.wait_for(
        lambda s: stage_caches(s) == 0, 10, "caches released after cancel"
    )
    assert status["requests"] == 0


def _raw(url: str):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    return sock


def _reply(sock, timeout_s: float = 5.0) -> P.Message:
    assert sock.poll(timeout_s * 1000), "broker did not answer"
    return P.decode(sock.recv_multipart())


@pytest.mark.timeout(120)
def test_hostile_input_gets_errors_and_the_broker_keeps_serving(checkpoints, llama_cluster):
    sock = _raw(llama_cluster.url)
    step = {
        "rid": "raw-1",
        "seq": 0,
        "pos": 0,
        "n": 3,
        "prev": 0,
        "hash": P.prefix_hash(0, [5, 6, 7]),
    }
    ids = torch.tensor([[5, 6, 7]])

    def raw_step(cmd=Cmd.STEP, header=step, tensors=(ids,)):
        return raw_message(P.CLIENT_TAG, cmd, header, tensors)

    cases = [
        ([P.CLIENT_TAG], Code.MALFORMED),
        ([P.CLIENT_TAG, b"\x7f", b"{}"], Code.UNKNOWN_COMMAND),
        ([b"LLC7", bytes((Cmd.PING,)), b"{}"], Code.BAD_VERSION),
        ([P.CLIENT_TAG, bytes((Cmd.PING,)), b"{" + b" " * 70_000 + b"}"], Code.HEADER_TOO_LARGE),
        (
            [P.CLIENT_TAG, bytes((Cmd.READY,)), b"{}"],
            Code.UNKNOWN_COMMAND,
        ),  # a stage command from a client
        (raw_step()[:3] + [b"\x00" * 23], Code.TENSOR_MISMATCH),
        (
            raw_step(header={**step, "n": 0}, tensors=[torch.zeros(1, 0, dtype=torch.int64)]),
            Code.BAD_REQUEST,
        ),
        (raw_step(header={**step, "rid": "bad rid!"}), Code.BAD_REQUEST),
        (raw_step(tensors=[ids.to(torch.int32)]), Code.BAD_REQUEST),
        (raw_step(header={**step, "pos": 255}), Code.CONTEXT_OVERFLOW),
        (raw_step(Cmd.STEPS, {"items": [step, step]}), Code.TENSOR_MISMATCH),
        (raw_step(Cmd.STEPS, {"items": []}, ()), Code.BAD_REQUEST),
        (
            raw_step(Cmd.STEPS, {"items": [step] * (P.MAX_BUNDLE + 1)}, [ids] * (P.MAX_BUNDLE + 1)),
            Code.BAD_REQUEST,
        ),
        (raw_step(Cmd.RESULTS, {"items": [step]}), Code.UNKNOWN_COMMAND),
    ]
    for frames, code in cases:
        sock.send_multipart(frames)
        reply = _reply(sock)
        assert reply.cmd == Cmd.ERROR and reply.body.code == code, (code, reply.body)
    # A wrong prefix hash reaches the first stage, which refuses it: the client is told to replay.
    sock.send_multipart(raw_step(header={**step, "hash": 12345}))
    reply = _reply(sock)
    assert reply.cmd == Cmd.EVENT and reply.body.event == "replay"
    sock.close(0)
    with Client(llama_cluster.url) as client:
        prompt = prompt_ids(11)
        assert client.generate(
            prompt, max_new_tokens=8, ignore_eos=True
        ).token_ids == reference_greedy(checkpoints["llama"], prompt, 8)
        with pytest.raises(ValueError, match="context"):
            client.generate(prompt_ids(1, length=250), max_new_tokens=20)
        with pytest.raises(ValueError, match="empty"):
            client.generate([], max_new_tokens=4)
        with pytest.raises(ValueError, match="temperature"):
            client.generate(prompt, temperature=-1.0)
        with pytest.raises(ValueError, match="top_p"):
            client.generate(prompt, top_p=1.5)
    assert llama_cluster.status()["ready"]


@pytest.mark.timeout(120)
def test_a_steps_bundle_refuses_its_bad_item_alone(checkpoints, llama_cluster):
    """Each step of a STEPS bundle is taken or refused as if it came alone."""
    sock = _raw(llama_cluster.url)
    prompts = {"bundle-1": prompt_ids(41, length=6), "bundle-2": prompt_ids(42, length=9)}
    items, tensors = [], []
    for rid, ids in [*prompts.items(), ("bad rid!", [1, 2])]:
        items.append(
            {
                "rid": rid,
                "seq": 1,
                "pos": 0,
                "n": len(ids),
                "prev": 0,
                "hash": P.prefix_hash(0, ids),
            }
        )
        tensors.append(torch.tensor([ids]))
    items[1]["prev"] = "zero"  # a field of the wrong type: refused before it reaches a stage
    sock.send_multipart(raw_message(P.CLIENT_TAG, Cmd.STEPS, {"items": items}, tensors))
    answers, errors = {}, {}
    while len(answers) + len(errors) < 3:
        reply = _reply(sock, timeout_s=20.0)
        singles = P.unbundle(reply) if reply.cmd in P.BUNDLES else [reply]
        for msg in singles:
            if msg.cmd == Cmd.ERROR:
                errors[msg.body.rid] = msg.body.code
            else:
                assert msg.cmd == Cmd.RESULT, msg
                answers[msg.body.rid] = int(msg.tensor(0).reshape(-1).argmax())
    assert errors == {"bad rid!": Code.BAD_REQUEST, "bundle-2": Code.BAD_REQUEST}
    assert answers == {
        "bundle-1": reference_greedy(checkpoints["llama"], prompts["bundle-1"], 1)[0]
    }
    sock.send_multipart(P.encode(P.CLIENT_TAG, M.End(rid="bundle-1")))
    sock.close(0)


@pytest.mark.timeout(60)
def test_unreachable_broker_is_reported_after_the_connect_timeout():
    from client import BrokerUnreachable
    from layerline.cluster import free_port

    url = f"tcp://127.0.0.1:{free_port()}"
    # The first contact's own bound ran out, and the error says where and what to start.
    with (
        pytest.raises(
            BrokerUnreachable, match=rf"{url} did not answer within 2.0 s; is .* running"
        ),
        Client(url, connect_timeout=2.0) as client,
    ):
        client.generate([1, 2, 3], max_new_tokens=2)


@pytest.mark.timeout(120)
def test_chunked_prefill_flows_through_the_pipeline(checkpoints, llama_cluster):
    directory = checkpoints["llama"]
    prompt = prompt_ids(31, length=100)
    expected = reference_greedy(directory, prompt, 12)
    with Client(llama_cluster.url, prefill_chunk=24) as client:
        result = client.generate(prompt, max_new_tokens=12, ignore_eos=True)
        assert result.token_ids == expected
        jobs = {j["rid"]: j for j in client.jobs()}
    # 5 prefill chunks (24+24+24+24+4), then one decode step per token after the first.
    assert jobs[result.rid]["steps"] == 5 + 11
    assert jobs[result.rid]["tokens"] == 12


@pytest.mark.timeout(120)
def test_clients_take_the_prefill_chunk_their_broker_advises(checkpoints, llama_cluster):
    assert llama_cluster.status()["prefill_chunk"] == 128  # every stage computes on a CPU
    directory = checkpoints["llama"]
    prompt = prompt_ids(32, length=100)
    expected = reference_greedy(directory, prompt, 12)
    with Cluster(directory, 2, broker_args=("--prefill-chunk", "24")) as cluster:
        assert cluster.status()["prefill_chunk"] == 24
        with Client(cluster.url) as client:
            assert client.prefill_chunk == 24
            result = client.generate(prompt, max_new_tokens=12, ignore_eos=True)
            assert result.token_ids == expected
            jobs = {j["rid"]: j for j in client.jobs()}
        assert jobs[result.rid]["steps"] == 5 + 11  # 24+24+24+24+4, then decode steps
        with Client(cluster.url, prefill_chunk=50) as client:  # the caller's choice wins
            assert client.prefill_chunk == 50
            result = client.generate(prompt, max_new_tokens=12, ignore_eos=True)
            assert result.token_ids == expected
            jobs = {j["rid"]: j for j in client.jobs()}
        assert jobs[result.rid]["steps"] == 2 + 11


@pytest.mark.timeout(120)
def test_stage_with_another_checkpoint_is_refused(checkpoints, llama_cluster):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stage",
            "--broker",
            llama_cluster.url,
            "--model",
            str(checkpoints["gpt2"]),
            "--name",
            "intruder",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env=llama_cluster.env,
    )
    assert proc.returncode == 3
    assert "point --model at the same checkpoint" in proc.stdout + proc.stderr
    status = llama_cluster.status()
    assert status["ready"] and all(s["name"] != "intruder" for s in status["stages"])
