"""Property and example tests for the pure layer scheduler (no sockets, no torch)."""

from __future__ import annotations

import itertools
import math
import re

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker import messages as M
from broker.layermap import (
    STRATEGIES,
    InsufficientMemory,
    LayerCost,
    LayerMap,
    NotEnoughStages,
    StageCapacity,
    StageRange,
    assign_balanced,
    assign_capacity,
    assign_uniform,
    check_memory,
    parallel_lanes,
    plan,
)

GiB = 1 << 30
MiB = 1 << 20

names_st = st.lists(
    st.text(alphabet="absxyz019", min_size=1, max_size=3), min_size=1, max_size=12, unique=True
)
layers_st = st.integers(1, 128)
small_cost_st = st.builds(
    LayerCost,
    layer_bytes=st.integers(1, 100),
    first_extra_bytes=st.integers(0, 300),
    last_extra_bytes=st.integers(0, 300),
    fixed_bytes=st.integers(0, 50),
)


@st.composite
def capacities(draw, max_stages=12, max_memory=10**12, min_memory=1):
    names = draw(names_st.filter(lambda n: len(n) <= max_stages))
    return [StageCapacity(n, draw(st.integers(min_memory, max_memory))) for n in names]


def counts_of(layer_map: LayerMap) -> dict[str, int]:
    return {r.name: r.end - r.start for r in layer_map.ranges}


def stage_for_layer(layer_map: LayerMap, layer: int) -> str:
    """The stage that runs `layer`, found by its range."""
    return next(r.name for r in layer_map.ranges if r.start <= layer < r.end)


def assert_valid(layer_map: LayerMap, order: list[str], num_layers: int) -> None:
    """Every layer exactly once, contiguous, non-empty, in the given stage order."""
    assert layer_map.num_layers == num_layers
    owners = [stage_for_layer(layer_map, i) for i in range(num_layers)]
    covered = [i for r in layer_map.ranges for i in range(r.start, r.end)]
    assert covered == list(range(num_layers))
    assert all(r.end > r.start for r in layer_map.ranges)
    assert all(a.end == b.start for a, b in itertools.pairwise(layer_map.ranges))
    names = [r.name for r in layer_map.ranges]
    assert names == [n for n in order if n in names]
    assert [n for n, _ in itertools.groupby(owners)] == names


def need(cost: LayerCost, start: int, end: int, num_layers: int) -> int:
    """Brute-force restatement of the cost model."""
    extras = 0
    if start == 0:
        extras += cost.first_extra_bytes
    if end == num_layers:
        extras += cost.last_extra_bytes
    return cost.layer_bytes * (end - start) + extras + cost.fixed_bytes


def compositions(total: int, parts: int, minimum: int):
    """All tuples of `parts` ints >= minimum summing to `total`."""
    if parts == 1:
        if total >= minimum:
            yield (total,)
        return
    for first in range(minimum, total - minimum * (parts - 1) + 1):
        for rest in compositions(total - first, parts - 1, minimum):
            yield (first, *rest)


def split_fits(stages, counts, num_layers, cost) -> bool:
    start = 0
    for stage, count in zip(stages, counts, strict=True):
        if count and need(cost, start, start + count, num_layers) > stage.memory_bytes:
            return False
        start += count
    return True


def reference_capacity(budgets: list[int], num_layers: int) -> list[int]:
    """Largest remainder where stages with a quota below one are pinned to one layer."""
    pinned: set[int] = set()
    while True:
        rest = [i for i in range(len(budgets)) if i not in pinned]
        total, weight = num_layers - len(pinned), sum(budgets[i] for i in rest)
        small = {i for i in rest if total * budgets[i] < weight}
        if not small:
            break
        pinned |= small
    counts = [1 if i in pinned else total * budgets[i] // weight for i in range(len(budgets))]
    rems = sorted(rest, key=lambda i: (-(total * budgets[i] % weight), i))
    for i in rems[: num_layers - sum(counts)]:
        counts[i] += 1
    return counts


# --- uniform -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(names=names_st, num_layers=layers_st)
def test_uniform_covers_all_layers_and_front_loads_remainder(names, num_layers):
    layer_map = assign_uniform(names, num_layers, epoch=3)
    assert_valid(layer_map, names, num_layers)
    assert layer_map.epoch == 3
    assert [r.name for r in layer_map.ranges] == names[: min(len(names), num_layers)]
    sizes = [r.end - r.start for r in layer_map.ranges]
    assert sizes == sorted(sizes, reverse=True)
    assert max(sizes) - min(sizes) <= 1
    assert assign_uniform(names, num_layers, epoch=3) == layer_map


# --- balanced ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(names=names_st, num_layers=layers_st)
def test_balanced_without_a_head_is_uniform(names, num_layers):
    assert assign_balanced(names, num_layers, 0.0, epoch=2) == assign_uniform(
        names, num_layers, epoch=2
    )


@settings(max_examples=200, deadline=None)
@given(
    stages=st.integers(1, 4),
    num_layers=st.integers(1, 12),
    head=st.floats(0, 12, allow_nan=False),
)
def test_balanced_is_the_most_even_of_all_splits(stages, num_layers, head):
    """Against every split into the same stages: none has a smaller largest share, and none
    with the same largest share is more even (smaller sum of squared shares)."""
    names = [f"s{i}" for i in range(stages)]
    layer_map = assign_balanced(names, num_layers, head)
    assert_valid(layer_map, names, num_layers)
    counts = [r.end - r.start for r in layer_map.ranges]
    k = len(counts)

    def shares(split):
        return [*split[:-1], split[-1] + head]

    mine = shares(counts)
    for cuts in itertools.combinations(range(1, num_layers), k - 1):
        split = [b - a for a, b in itertools.pairwise((0, *cuts, num_layers))]
        other = shares(split)
        assert max(mine) <= max(other) + 1e-9, (counts, split)
        if abs(max(mine) - max(other)) < 1e-9:
            assert sum(c * c for c in mine) <= sum(c * c for c in other) + 1e-6, (counts, split)


def test_balanced_gives_the_head_stage_fewer_layers():
    """The bench models: `small` (8 layers, head = 5.55 layers) and `tinyllama` (22 layers,
    head = 1.49 layers)."""
    sizes = lambda m: [r.end - r.start for r in m.ranges]  # noqa: E731
    assert sizes(assign_balanced(["a", "b", "c"], 8, 5.55)) == [4, 3, 1]
    assert sizes(assign_balanced(["a", "b"], 22, 1.49)) == [12, 10]
    assert sizes(assign_balanced(["a", "b", "c"], 22, 1.49)) == [8, 8, 6]
    cost = LayerCost(layer_bytes=100, first_extra_bytes=555, last_extra_bytes=555)
    stages = [StageCapacity(n, 10_000) for n in "abc"]
    assert sizes(plan(stages, 8, "balanced", cost)) == [4, 3, 1]
    with pytest.raises(InsufficientMemory):
        plan([StageCapacity(n, 600) for n in "abc"], 8, "balanced", cost)


# --- capacity ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(stages=capacities(), num_layers=layers_st)
def test_capacity_is_largest_remainder_with_one_layer_minimum(stages, num_layers):
    layer_map = assign_capacity(stages, num_layers)
    order = [s.name for s in stages]
    assert_valid(layer_map, order, num_layers)
    assert assign_capacity(stages, num_layers) == layer_map
    counts = counts_of(layer_map)
    if len(stages) > num_layers:
        ranked = sorted(range(len(stages)), key=lambda i: (-stages[i].memory_bytes, i))
        kept = [stages[i].name for i in sorted(ranked[:num_layers])]
        assert list(counts) == kept and set(counts.values()) == {1}
        return
    assert list(counts) == order  # every stage gets at least one layer
    budgets = [s.memory_bytes for s in stages]
    total = sum(budgets)
    got = [counts[s.name] for s in stages]
    assert got == reference_capacity(budgets, num_layers)
    for s, count in zip(stages, got, strict=True):
        quota = num_layers * s.memory_bytes / total
        # The one-layer minimum can only take layers away from large stages, never add.
        assert 1 <= count <= max(1, math.ceil(num_layers * s.memory_bytes / total))
        if all(num_layers * b >= total for b in budgets):  # the minimum binds nowhere
            lo, hi = (
                (num_layers * s.memory_bytes) // total,
                -(-num_layers * s.memory_bytes // total),
            )
            assert lo <= count <= hi, (quota, count)
    # More memory never means fewer layers; equal memory: earlier stage first, within one.
    for (a, ca), (b, cb) in itertools.combinations(zip(stages, got, strict=True), 2):
        if a.memory_bytes > b.memory_bytes:
            assert ca >= cb
        elif a.memory_bytes == b.memory_bytes:
            assert ca - cb in (0, 1)
        else:
            assert ca <= cb


# --- memory --------------------------------------------------------------------------------


@st.composite
def map_and_stages(draw):
    names = draw(names_st)
    num_layers = draw(st.integers(len(names), 40))
    inner = st.integers(1, max(1, num_layers - 1))  # unused when there is one layer
    cuts = draw(st.sets(inner, min_size=len(names) - 1, max_size=len(names) - 1))
    bounds = [0, *sorted(cuts), num_layers]
    ranges = tuple(
        StageRange(n, a, b) for n, a, b in zip(names, bounds[:-1], bounds[1:], strict=True)
    )
    stages = [StageCapacity(n, draw(st.integers(0, 2000))) for n in names]
    return LayerMap(num_layers, ranges), stages


@settings(max_examples=300, deadline=None)
@given(case=map_and_stages(), cost=small_cost_st)
def test_check_memory_raises_exactly_when_a_stage_is_short(case, cost):
    layer_map, stages = case
    budget = {s.name: s.memory_bytes for s in stages}
    short = [
        r.name
        for r in layer_map.ranges
        if need(cost, r.start, r.end, layer_map.num_layers) > budget[r.name]
    ]
    if not short:
        check_memory(layer_map, stages, cost)
        return
    with pytest.raises(InsufficientMemory) as err:
        check_memory(layer_map, stages, cost)
    assert str(err.value).startswith(f"stage {short[0]} needs ")
    assert "add memory or a stage" in str(err.value)


@settings(max_examples=400, deadline=None)
@given(
    stages=capacities(max_stages=4, max_memory=1500, min_memory=0),
    num_layers=st.integers(1, 12),
    cost=small_cost_st,
)
@example(  # proportional 2/2/8 fits although stage 1's exact quota (2.03) exceeds its room (2)
    stages=[StageCapacity("a", 50), StageCapacity("b", 68), StageCapacity("c", 284)],
    num_layers=12,
    cost=LayerCost(layer_bytes=23, first_extra_bytes=0, last_extra_bytes=0),
)
def test_memory_aware_capacity_fits_whenever_any_split_fits(stages, num_layers, cost):
    n = len(stages)
    fits_any = any(split_fits(stages, c, num_layers, cost) for c in compositions(num_layers, n, 0))
    fits_all = n <= num_layers and any(
        split_fits(stages, c, num_layers, cost) for c in compositions(num_layers, n, 1)
    )
    if not fits_any:
        with pytest.raises(InsufficientMemory) as err:
            assign_capacity(stages, num_layers, cost)
        assert any(re.search(rf"stage {s.name}\b", str(err.value)) for s in stages)
        assert "add memory or a stage" in str(err.value)
        return
    layer_map = assign_capacity(stages, num_layers, cost, epoch=1)
    assert_valid(layer_map, [s.name for s in stages], num_layers)
    check_memory(layer_map, stages, cost)
    assert assign_capacity(stages, num_layers, cost, epoch=1) == layer_map
    if fits_all:  # nobody is left out when everybody can take part
        assert [r.name for r in layer_map.ranges] == [s.name for s in stages]
    if all(s.memory_bytes > 0 for s in stages):
        proportional = assign_capacity(stages, num_layers, epoch=1)
        try:
            check_memory(proportional, stages, cost)
        except InsufficientMemory:
            pass
        else:  # cost only changes the answer when the proportional one does not fit
            assert layer_map == proportional


# --- every strategy, small stages ----------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(
    stages=capacities(max_stages=5, max_memory=1500, min_memory=0),
    num_layers=st.integers(1, 10),
    cost=small_cost_st,
    strategy=st.sampled_from(STRATEGIES),
)
@example(  # issue 19: a 1-byte stage joins three healthy ones and gets the head
    stages=[StageCapacity(n, 1200) for n in ("s0", "s1", "s2")] + [StageCapacity("s3", 1)],
    num_layers=9,
    cost=LayerCost(layer_bytes=100, first_extra_bytes=150, last_extra_bytes=300),
    strategy="balanced",
)
@example(  # the small stage first: it cannot take the embeddings
    stages=[StageCapacity("tiny", 1)] + [StageCapacity(n, 1200) for n in ("a", "b")],
    num_layers=9,
    cost=LayerCost(layer_bytes=100, first_extra_bytes=150, last_extra_bytes=300),
    strategy="uniform",
)
def test_every_strategy_forms_a_map_whenever_some_stages_hold_the_model(
    stages, num_layers, cost, strategy
):
    """If some stages, in pipeline order, can hold the model with a layer or more each, every
    strategy makes a map within every stage's memory; else it raises InsufficientMemory
    naming a stage. Where the strategy's own split fits, memory changes nothing."""
    n = len(stages)
    fits_any = any(split_fits(stages, c, num_layers, cost) for c in compositions(num_layers, n, 0))
    if not fits_any:
        with pytest.raises(InsufficientMemory) as err:
            plan(stages, num_layers, strategy, cost)
        assert any(re.search(rf"stage {s.name}\b", str(err.value)) for s in stages)
        assert "add memory or a stage" in str(err.value)
        return
    layer_map = plan(stages, num_layers, strategy, cost, epoch=4)
    assert_valid(layer_map, [s.name for s in stages], num_layers)
    assert layer_map.epoch == 4
    check_memory(layer_map, stages, cost)
    assert plan(stages, num_layers, strategy, cost, epoch=4) == layer_map
    names = [s.name for s in stages]
    own = {  # the strategy's split when memory does not bind
        "uniform": lambda: assign_uniform(names, num_layers, 4),
        "balanced": lambda: assign_balanced(
            names, num_layers, cost.last_extra_bytes / cost.layer_bytes, 4
        ),
        "capacity": lambda: assign_capacity(stages, num_layers, epoch=4),
    }[strategy]()
    try:
        check_memory(own, stages, cost)
    except InsufficientMemory:
        return
    assert layer_map == own


@settings(max_examples=300, deadline=None)
@given(
    stages=capacities(max_stages=4, max_memory=1500, min_memory=0),
    num_layers=st.integers(1, 10),
    cost=small_cost_st,
    strategy=st.sampled_from(["balanced", "uniform"]),
)
def test_a_memory_bound_split_is_as_even_as_memory_allows(stages, num_layers, cost, strategy):
    """Where memory binds, no other split of the chosen stages within their memory has a
    smaller largest share (the head counted under balanced), nor, with the same largest
    share, a smaller sum of squared shares."""
    try:
        layer_map = plan(stages, num_layers, strategy, cost)
    except InsufficientMemory:
        return
    chosen = [s for s in stages if layer_map.range_of(s.name) is not None]
    head = cost.last_extra_bytes / cost.layer_bytes if strategy == "balanced" else 0.0

    def shares(split):
        return [*split[:-1], split[-1] + head]

    mine = shares([r.end - r.start for r in layer_map.ranges])
    for split in compositions(num_layers, len(chosen), 1):
        if not split_fits(chosen, split, num_layers, cost):
            continue
        other = shares(split)
        assert max(mine) <= max(other) + 1e-9, (mine, other)
        if abs(max(mine) - max(other)) < 1e-9:
            assert sum(c * c for c in mine) <= sum(c * c for c in other) + 1e-6, (mine, other)


def test_a_stage_too_small_for_a_layer_stands_by_under_every_strategy():
    """Issue 19: a stage started with --memory-mb 1 joins three healthy ones (SmolLM2-like
    sizes); the three keep the map they had, under every strategy."""
    cost = LayerCost(layer_bytes=14 * MiB, first_extra_bytes=113 * MiB, last_extra_bytes=113 * MiB)
    healthy = [StageCapacity(n, 2 * GiB) for n in ("s0", "s1", "s2")]
    for strategy in STRATEGIES:
        alone = plan(healthy, 30, strategy, cost)
        for tiny_first in (False, True):
            tiny = [StageCapacity("s3", MiB)]
            stages = tiny + healthy if tiny_first else healthy + tiny
            assert plan(stages, 30, strategy, cost) == alone, strategy
    # No stage big enough for the head: the reason names a stage and what is missing.
    with pytest.raises(InsufficientMemory, match=r"stage s\d needs .* missing\); add memory"):
        plan([StageCapacity(n, 100 * MiB) for n in ("s0", "s1")], 30, "balanced", cost)


# --- maps on the wire ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(names=names_st, num_layers=layers_st, epoch=st.integers(0, 10**6))
def test_ranges_round_trip(names, num_layers, epoch):
    """The ranges a map travels as (ASSIGN, EVENT, STATUS) rebuild the same map."""
    layer_map = assign_uniform(names, num_layers, epoch)
    wire = msgspec.json.encode(layer_map.to_ranges())
    ranges = msgspec.json.decode(wire, type=tuple[M.MapRange, ...])
    rebuilt = tuple(StageRange(r.stage, r.start, r.end) for r in ranges)
    assert LayerMap(num_layers, rebuilt, epoch) == layer_map


# --- examples ------------------------------------------------------------------------------


def test_uniform_example():
    layer_map = assign_uniform(["s0", "s1", "s2"], 10)
    assert layer_map.describe() == "s0[0,4) s1[4,7) s2[7,10)"
    assert layer_map.to_ranges()[1] == M.MapRange("s1", 4, 7)
    assert stage_for_layer(layer_map, 6) == "s1"
    assert layer_map.range_of("s2") == StageRange("s2", 7, 10)
    assert layer_map.range_of("s9") is None


def test_uniform_more_stages_than_layers_uses_the_first():
    assert assign_uniform(["a", "b", "c", "d"], 2).describe() == "a[0,1) b[1,2)"


def test_capacity_example():
    stages = [
        StageCapacity("big", 8 * GiB),
        StageCapacity("mid", 4 * GiB),
        StageCapacity("sm", GiB),
    ]
    assert assign_capacity(stages, 26).describe() == "big[0,16) mid[16,24) sm[24,26)"
    # Surplus stages: the two largest budgets stay, in pipeline order.
    assert assign_capacity(stages, 2).describe() == "big[0,1) mid[1,2)"


def test_capacity_tie_goes_to_the_earlier_stage():
    stages = [StageCapacity(n, GiB) for n in ("a", "b", "c")]
    assert assign_capacity(stages, 5).describe() == "a[0,2) b[2,4) c[4,5)"


def test_memory_aware_moves_layers_away_from_embeddings_and_head():
    stages = [StageCapacity(n, 1000) for n in ("s0", "s1", "s2")]
    cost = LayerCost(layer_bytes=100, first_extra_bytes=700, last_extra_bytes=700)
    # Proportional would be 4/3/3, but the ends only have room for 3 layers besides the extras.
    layer_map = assign_capacity(stages, 10, cost)
    check_memory(layer_map, stages, cost)
    assert layer_map.describe() == "s0[0,3) s1[3,7) s2[7,10)"
    # Uniform's 4/4/4 does not fit either: the ends get what they hold, the middle the rest.
    assert plan(stages, 12, "uniform", cost).describe() == "s0[0,3) s1[3,9) s2[9,12)"
    with pytest.raises(InsufficientMemory, match="stage s0 needs"):
        plan(stages, 17, "uniform", cost)


def test_memory_aware_leaves_out_a_stage_that_cannot_help():
    stages = [StageCapacity("tiny", 50), StageCapacity("a", 1000), StageCapacity("b", 1000)]
    cost = LayerCost(layer_bytes=100, first_extra_bytes=200, last_extra_bytes=200)
    assert assign_capacity(stages, 12, cost).describe() == "a[0,6) b[6,12)"


def test_insufficient_memory_message_says_who_and_how_much():
    stages = [StageCapacity("s0", 2 * GiB), StageCapacity("s1", GiB)]
    cost = LayerCost(layer_bytes=200 * MiB, first_extra_bytes=0, last_extra_bytes=0)
    with pytest.raises(InsufficientMemory) as err:
        assign_capacity(stages, 16, cost)
    message = str(err.value)
    assert message.startswith("stage s0 needs 2.15 GiB for layers 0-10 but offers 2.00 GiB;")
    assert "(128.00 MiB missing)" in message
    assert message.endswith("add memory or a stage")
    with pytest.raises(InsufficientMemory, match=r"stage s1 needs 1\.56 GiB for layers 8-15"):
        check_memory(assign_uniform(["s0", "s1"], 16), stages, cost)


def test_errors_for_bad_input():
    with pytest.raises(NotEnoughStages):
        assign_uniform([], 4)
    with pytest.raises(NotEnoughStages):
        assign_capacity([], 4)
    with pytest.raises(ValueError):
        assign_uniform(["a"], 0)
    with pytest.raises(ValueError, match="unique"):
        assign_uniform(["a", "a"], 4)
    with pytest.raises(ValueError, match="uniform, capacity"):
        plan([StageCapacity("a", 1)], 4, "fastest")
    with pytest.raises(InsufficientMemory, match="no stage offers any memory"):
        assign_capacity([StageCapacity("a", 0)], 4)


def test_layer_maps_reject_incomplete_or_malformed_ranges():
    good = (StageRange("a", 0, 2), StageRange("b", 2, 4))
    assert LayerMap(4, good).describe() == "a[0,2) b[2,4)"
    bad = [
        good[:1],  # layers 2-3 missing
        (good[0], StageRange("b", 1, 4)),  # overlap
        (good[1], good[0]),  # out of order
        (good[0], StageRange("a", 2, 4)),  # name twice
        (),
    ]
    for ranges in bad:
        with pytest.raises(ValueError):
            LayerMap(4, ranges)
    # A range that is not one on the wire is refused where it is decoded.
    for item in ({"stage": "b", "start": 2, "end": True}, {"stage": "b", "start": 2}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(msgspec.json.encode([item]), type=tuple[M.MapRange, ...])


def _cpu(host: str, cores: int, threads: int) -> M.Caps:
    return M.Caps(device="cpu", host=host, cores=cores, threads=threads)


@pytest.mark.parametrize(
    ("caps", "lanes"),
    [
        ([], 1),
        ([_cpu("a", 2, 1)] * 3, 2),  # three stages on two cores: two compute at once
        ([_cpu("a", 16, 1)] * 3, 3),
        ([_cpu("a", 16, 8)] * 3, 2),
        ([_cpu("a", 16, 16)] * 2, 1),
        ([_cpu("a", 2, 1), _cpu("b", 2, 1), _cpu("c", 2, 1)], 3),  # one per host
        ([_cpu("a", 2, 1)] * 3 + [_cpu("b", 4, 1)], 3),
        ([M.Caps(device="cuda", host="a")] * 2 + [_cpu("a", 2, 1)], 3),
        ([M.Caps(host="a")], 1),  # a stage that reports nothing: the defaults
    ],
)
def test_parallel_lanes(caps, lanes):
    assert parallel_lanes(caps) == lanes
