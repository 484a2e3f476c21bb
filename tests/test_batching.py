"""Batched decode: several requests' steps in one forward, each with its own cache and positions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch.nn import Linear

from stage import kernels
from stage.kernels import KERNEL_ROWS
from stage.loading import load_shard
from stage.products import (
    SKINNY_ROWS,
    RowKernelLinear,
    SkinnyLinear,
    batched_head,
    skinny_linears,
)
from stage.shard import ShardError
from tests.test_parity import _reference
from tests.tiny_models import ARCHITECTURES, VOCAB

BATCHABLE = [a for a in ARCHITECTURES if a not in ("mistral", "qwen2")]  # sliding-window caches
LENGTHS = (3, 11, 6, 1, 8)
STEPS = 16


def _prompts():
    g = torch.Generator().manual_seed(42)
    return [torch.randint(3, VOCAB, (1, n), generator=g) for n in LENGTHS]


def _prefill(shards, prompt):
    states = [s.new_cache() for s in shards]
    x = prompt
    for shard, state in zip(shards, states, strict=True):
        x = shard.forward(x, state)
    return states, int(x[0, -1].argmax())


def _prefill_each(shards, prompts):
    """Each prompt prefilled alone: per request its states and its first greedy token."""
    states, tokens = [], []
    for p in prompts:
        st, tok = _prefill(shards, p)
        states.append(st)
        tokens.append([tok])
    return states, tokens


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Compute as a `--threads n` stage does: which product a decode batch takes depends on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("arch", BATCHABLE)
def test_mixed_batches_equal_generate_for_each_request_alone(checkpoints, arch, threads):
    """One thread takes the row kernel for decode groups; two take BLAS (see SkinnyLinear)."""
    with torch_threads(threads):
        _mixed_batches_equal_generate(checkpoints[arch], arch)


def _mixed_batches_equal_generate(directory, arch):
    ref = _reference(directory)
    prompts = _prompts()
    expected = [
        ref.generate(p, do_sample=False, max_new_tokens=STEPS + 1)[0, p.shape[1] :].tolist()
        for p in prompts
    ]
    shards = [load_shard(directory, 0, 2), load_shard(directory, 2, 5)]
    assert all(s.batchable for s in shards)
    states, tokens = _prefill_each(shards, prompts)
    # Batches change at every step: requests leave and rejoin, lengths all differ.
    for step in range(STEPS):
        members = [i for i in range(len(prompts)) if (i + step) % 4 != 0]
        x = [torch.tensor([[tokens[i][-1]]]) for i in members]
        for k, shard in enumerate(shards):
            x = shard.forward_batch(x, [states[i][k] for i in members])
        for i, out in zip(members, x, strict=True):
            tokens[i].append(int(out[0, -1].argmax()))
        for i in set(range(len(prompts))) - set(members):  # the others step alone
            y = torch.tensor([[tokens[i][-1]]])
            for k, shard in enumerate(shards):
                y = shard.forward(y, states[i][k])
            tokens[i].append(int(y[0, -1].argmax()))
    for i, p in enumerate(prompts):
        assert tokens[i] == expected[i], (
            f"{arch}: request {i} (prompt {p.shape[1]} tokens) diverged"
        )
        assert all(st.length == p.shape[1] + STEPS for st in states[i])


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_values_match_unbatched(checkpoints, threads):
    """Same values as batch 1 (bits may differ: batch-1 stays the exact path)."""
    with torch_threads(threads):
        _batched_values_match_unbatched(checkpoints["llama"])


def _batched_values_match_unbatched(directory):
    shard = load_shard(directory, 0, 5)
    prompts = _prompts()
    solo, batched = [], []
    for p in prompts:
        a, b = shard.new_cache(), shard.new_cache()
        shard.forward(p, a)
        shard.forward(p, b)
        solo.append((a, shard.forward(torch.tensor([[7]]), a)))
        batched.append(b)
    outs = shard.forward_batch([torch.tensor([[7]])] * len(prompts), batched)
    for (_, want), got in zip(solo, outs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_row_kernel_equals_a_float64_product_for_odd_shapes():
    g = torch.Generator().manual_seed(11)
    for rows in range(2, KERNEL_ROWS + 1):
        for width, out in [(37, 5), (64, 33), (513, 7)]:
            x = torch.randn(rows, width, generator=g)
            w = torch.randn(out, width, generator=g)
            b = torch.randn(out, generator=g)
            want = (x.double() @ w.double().t() + b.double()).float()
            got = kernels.rows_linear(x, w, b)
            assert got.shape == (rows, out) and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * width**0.5)
            torch.testing.assert_close(kernels.rows_linear(x, w, None), want - b)


def test_cpu_decode_batches_take_the_row_kernel_and_batch_one_keeps_linear(checkpoints):
    shard = load_shard(checkpoints["llama"], 0, 5)
    linears = [m for m in shard.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert shard.row_kernel and linears and all(type(m) is RowKernelLinear for m in linears)
    blas = load_shard(checkpoints["llama"], 0, 5, row_kernel=False)
    blas_linears = [m for m in blas.layers.modules() if isinstance(m, Linear)]
    assert not blas.row_kernel and all(type(m) is SkinnyLinear for m in blas_linears)
    proj, blas_proj = linears[0], blas_linears[0]
    g = torch.Generator().manual_seed(3)
    width = proj.in_features
    holder = torch.nn.Sequential(Linear(width, 8), Linear(width, 8))  # biased, like qwen2's q
    skinny_linears(holder[0], row_kernel=True)
    skinny_linears(holder[1], row_kernel=False)
    biased, blas_biased = holder
    assert type(biased) is RowKernelLinear and type(blas_biased) is SkinnyLinear
    linear = torch.nn.functional.linear
    # Batch 1, prompts, and decode groups past each product's limit keep `linear`'s bits.
    for layer, threads, limit in [
        (proj, 1, KERNEL_ROWS),
        (proj, 2, SKINNY_ROWS),
        (blas_proj, 1, SKINNY_ROWS),
    ]:
        with torch_threads(threads):
            for shape in [(1, 1, width), (1, 9, width), (3, 4, width), (limit + 1, 1, width)]:
                x = torch.randn(*shape, generator=g)
                assert torch.equal(layer(x), linear(x, layer.weight, layer.bias)), (threads, shape)
    # The row kernel on one thread, 2..KERNEL_ROWS rows.
    for layer in (proj, biased):
        with torch_threads(1):
            for rows in range(2, KERNEL_ROWS + 1):
                x = torch.randn(rows, 1, width, generator=g)
                got = layer(x)
                assert got.shape == (rows, 1, layer.out_features) and got.is_contiguous()
                flat = x.reshape(rows, width)
                assert torch.equal(got[:, 0], kernels.rows_linear(flat, layer.weight, layer.bias))
                torch.testing.assert_close(got, linear(x, layer.weight, layer.bias))
    # `weight @ x.T` for 2..SKINNY_ROWS rows: without the row kernel, or with more threads,
    # which BLAS uses and the kernel would not.
    for layer, threads in [(proj, 2), (biased, 2), (blas_proj, 1), (blas_biased, 1)]:
        with torch_threads(threads):
            for rows in range(2, SKINNY_ROWS + 1):
                x = torch.randn(rows, 1, width, generator=g)
                got = layer(x)
                assert got.shape == (rows, 1, layer.out_features) and got.is_contiguous()
                streamed = torch.mm(layer.weight, x.reshape(rows, width).t()).t()
                if layer.bias is not None:
                    streamed = streamed + layer.bias
                assert torch.equal(got[:, 0], streamed), (threads, rows)
                torch.testing.assert_close(got, linear(x, layer.weight, layer.bias))
    bf16 = load_shard(checkpoints["llama"], 0, 2, dtype="bfloat16")
    assert not bf16.row_kernel
    assert all(type(m) is Linear for m in bf16.layers.modules() if isinstance(m, Linear))


def test_a_decode_batch_takes_the_row_kernel_at_the_head(checkpoints):
    shard = load_shard(checkpoints["llama"], 4, 5)
    assert shard.row_kernel
    g = torch.Generator().manual_seed(4)
    head = shard.head
    for rows in (2, 5, KERNEL_ROWS):
        hidden = torch.randn(rows, 1, head.in_features, generator=g)
        flat = hidden.reshape(rows, -1)
        with torch_threads(1):
            got = batched_head(head, hidden, row_kernel=True)
            blas = batched_head(head, hidden, row_kernel=False)
        assert got.shape == blas.shape == (rows, 1, head.out_features)
        assert torch.equal(got[:, 0], kernels.rows_linear(flat, head.weight, head.bias))
        assert torch.equal(blas[:, 0], torch.mm(head.weight, flat.t()).t())
        torch.testing.assert_close(got, head(hidden))


def test_a_prompt_can_be_overtaken_between_layers_and_before_the_head(checkpoints):
    """Where a stage may run other requests' decode steps during a prompt: between two
    layers, and before the head on the last shard (a one-layer last stage has no other
    point). The prompt's own results keep their bits."""
    directory = checkpoints["llama"]
    g = torch.Generator().manual_seed(5)
    calls: list[int] = []
    for start, end, points in [(4, 5, 1), (2, 5, 3), (0, 2, 1)]:
        shard = load_shard(directory, start, end)
        prompts = (
            [torch.randint(3, VOCAB, (1, 6), generator=g) for _ in range(2)]
            if shard.first
            else [torch.randn(1, 6, shard.hidden_size, generator=g) for _ in range(2)]
        )
        calls.clear()
        want = shard.forward(prompts[0], shard.new_cache())
        got = shard.forward(prompts[0], shard.new_cache(), between=lambda: calls.append(1))
        assert len(calls) == points and torch.equal(got, want), (start, end)
        calls.clear()
        states = [shard.new_cache(), shard.new_cache()]
        shard.forward_batch(prompts, states, between=lambda: calls.append(1))
        assert len(calls) == points, (start, end)


def test_sliding_window_shards_do_not_batch(checkpoints):
    shard = load_shard(checkpoints["mistral"], 0, 5)
    assert not shard.batchable


def test_a_batch_runs_one_length_of_new_positions(checkpoints):
    shard = load_shard(checkpoints["llama"], 0, 5)
    with pytest.raises(ShardError, match="same number of new positions"):
        shard.forward_batch(
            [torch.tensor([[5]]), torch.tensor([[6, 7]])], [shard.new_cache(), shard.new_cache()]
        )


@pytest.mark.parametrize("arch", BATCHABLE)
def test_batched_prompts_and_chunks_equal_generate(checkpoints, arch):
    """Prompts of one length prefilled together, fresh or continuing a chunked prompt, then
    decoded together: every request's greedy output equals generate for it alone."""
    directory = checkpoints[arch]
    ref = _reference(directory)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (1, n), generator=g) for n in (6, 6, 12, 6)]
    new = 8
    expected = [
        ref.generate(p, do_sample=False, max_new_tokens=new)[0, p.shape[1] :].tolist()
        for p in prompts
    ]
    shards = [load_shard(directory, 0, 2), load_shard(directory, 2, 5)]
    states = [[s.new_cache() for s in shards] for _ in prompts]

    def run(members: list[int], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = inputs
        for k, shard in enumerate(shards):
            x = shard.forward_batch(x, [states[i][k] for i in members])
        return x

    # Round 1: three fresh prompts and the first chunk of the long one, 6 positions each.
    out = run([0, 1, 2], [prompts[0], prompts[1], prompts[2][:, :6]])
    tokens = {0: [int(out[0][0, -1].argmax())], 1: [int(out[1][0, -1].argmax())]}
    # Round 2: the long prompt's second chunk (cache of 6) beside a fresh prompt.
    out = run([2, 3], [prompts[2][:, 6:], prompts[3]])
    tokens[2], tokens[3] = [int(out[0][0, -1].argmax())], [int(out[1][0, -1].argmax())]
    for _ in range(new - 1):
        out = run([0, 1, 2, 3], [torch.tensor([[tokens[i][-1]]]) for i in range(4)])
        for i in range(4):
            tokens[i].append(int(out[i][0, -1].argmax()))
    for i, p in enumerate(prompts):
        assert tokens[i] == expected[i], f"{arch}: request {i} diverged"
        assert all(st.length == p.shape[1] + new - 1 for st in states[i])


@pytest.mark.parametrize("arch", BATCHABLE)
def test_a_decode_batch_keeps_its_tensors_while_its_requests_decode_together(checkpoints, arch):
    """The live decode batch: kept while the same requests decode (in any order), grown when
    its room runs out, rebuilt when one leaves, joins (longer than every row), or steps alone.
    Every request's greedy output still equals generate for it alone."""
    directory = checkpoints[arch]
    ref = _reference(directory)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, VOCAB, (1, n), generator=g) for n in (3, 11, 6, 40)]
    steps = 56  # 36 steps after the last rebuild: more than its room (32), so it grows once
    expected = [
        ref.generate(p, do_sample=False, max_new_tokens=steps + 1)[0, p.shape[1] :].tolist()
        for p in prompts
    ]
    shards = [load_shard(directory, 0, 2), load_shard(directory, 2, 5)]
    states, tokens = _prefill_each(shards, prompts)

    def members_at(step: int) -> list[int]:
        if step < 12:
            return [0, 1, 2] if step % 2 else [2, 0, 1]  # same requests, order varies
        if step == 12:
            return [0, 2]  # request 1 steps alone this once
        if step < 20:
            return [0, 1, 2]
        return [3, 0, 1, 2]  # request 3 (longer than every row) joins

    batches = []
    for step in range(steps):
        members = members_at(step)
        x = [torch.tensor([[tokens[i][-1]]]) for i in members]
        for k, shard in enumerate(shards):
            x = shard.forward_batch(x, [states[i][k] for i in members])
        batches.append(states[0][0].batch)  # request 0 is in every batch
        for i, out in zip(members, x, strict=True):
            tokens[i].append(int(out[0, -1].argmax()))
        for i in set(range(len(prompts))) - set(members):
            if i == 3 and step < 20:
                continue  # request 3 waits until step 20
            y = torch.tensor([[tokens[i][-1]]])
            for k, shard in enumerate(shards):
                y = shard.forward(y, states[i][k])
            tokens[i].append(int(y[0, -1].argmax()))
    # One batch from step 0 to 11 (same members, order aside), a new one at step 12 (1 left),
    # at 13 (1 back), at 20 (3 joins), and at least once more when the room ran out.
    assert all(b is batches[0] for b in batches[:12])
    assert len({id(b) for b in batches[12:14]}) == 2 and batches[12] is not batches[11]
    assert all(b is batches[13] for b in batches[13:20])
    assert batches[20] is not batches[19]
    assert len({id(b) for b in batches[20:]}) == 2
    for i in range(len(prompts)):
        done = steps + 1 if i != 3 else steps - 20 + 1
        assert tokens[i] == expected[i][:done], f"{arch}: request {i} diverged"
    # A row's bytes are its share of the batch's tensors, room included; stepping alone
    # gives the request its own cache back, with exactly its positions.
    live = states[0][1].batch
    row = states[0][1]
    assert row.batch is live and row.nbytes() == live.row_bytes() > 0
    shards[1].forward(torch.zeros(1, 1, shards[1].hidden_size), row)
    assert row.batch is None and row.cache.get_seq_length() == row.length == 3 + steps + 1


def test_a_failed_batch_leaves_no_request_usable(checkpoints):
    """A forward that fails part-way discards its rows: their positions match no later step,
    so the worker refuses the next one (cache mismatch) instead of computing on half a step."""
    shard = load_shard(checkpoints["llama"], 0, 5)
    states = [shard.new_cache() for _ in range(2)]
    for state, n in zip(states, (4, 7), strict=True):
        shard.forward(torch.arange(3, 3 + n).unsqueeze(0), state)
    shard.forward_batch([torch.tensor([[5]])] * 2, states)
    assert states[0].batch in shard.live
    with pytest.raises(IndexError):
        shard.forward_batch([torch.tensor([[5]]), torch.tensor([[VOCAB + 5]])], states)
    assert shard.live == []
    assert all(s.batch is None and s.length == -1 and s.nbytes() == 0 for s in states)


def test_groups_that_take_turns_each_keep_their_batch(checkpoints):
    """Two groups of requests decoding in turn, as a pipeline's groups reach a stage: each
    keeps its own batch, built once."""
    directory = checkpoints["llama"]
    ref = _reference(directory)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (1, n), generator=g) for n in (4, 9, 2, 7)]
    steps = 10
    expected = [
        ref.generate(p, do_sample=False, max_new_tokens=steps + 1)[0, p.shape[1] :].tolist()
        for p in prompts
    ]
    shards = [load_shard(directory, 0, 3), load_shard(directory, 3, 5)]
    states, tokens = _prefill_each(shards, prompts)
    for _step in range(steps):
        for members in ([0, 1], [2, 3]):
            x = [torch.tensor([[tokens[i][-1]]]) for i in members]
            for k, shard in enumerate(shards):
                x = shard.forward_batch(x, [states[i][k] for i in members])
            for i, out in zip(members, x, strict=True):
                tokens[i].append(int(out[0, -1].argmax()))
    assert tokens == expected
    for shard in shards:
        assert (shard.batches_built, shard.batches_kept) == (2, 2 * steps - 2)
        assert len(shard.live) == 2
