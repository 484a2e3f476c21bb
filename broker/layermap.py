"""Layer assignment: pure functions from stage capabilities to a contiguous layer map."""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from broker import messages as M

STRATEGIES = ("balanced", "uniform", "capacity")

_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


@dataclass(frozen=True)
class StageCapacity:
    """What one stage offers; the order of a sequence of these is the pipeline order."""

    name: str
    memory_bytes: int  # budget the stage offers for weights + cache
    # What its layers cost it, where that differs from the cluster's (a stage that holds its
    # weights in 4-bit blocks takes several times as many layers in the same memory).
    cost: LayerCost | None = None

    def __post_init__(self) -> None:
        if self.memory_bytes < 0:
            raise ValueError(f"stage {self.name} offers {self.memory_bytes} bytes; must be >= 0")


@dataclass(frozen=True)
class StageRange:
    """Decoder layers [start, end) held by one stage."""

    name: str
    start: int  # inclusive
    end: int  # exclusive

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(
                f"stage {self.name} has empty or negative range [{self.start},{self.end})"
            )


@dataclass(frozen=True)
class LayerMap:
    """Which stage runs which layers: covers [0, num_layers) exactly once, in stage order."""

    num_layers: int
    ranges: tuple[StageRange, ...]
    epoch: int = 0

    def __post_init__(self) -> None:
        # Invariant 2 of the design: a complete map or none, so an incomplete one cannot exist.
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {self.epoch}")
        if not self.ranges:
            raise ValueError("a layer map needs at least one stage range")
        names = [r.name for r in self.ranges]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat in layer map: {names}")
        expected = 0
        for r in self.ranges:
            if r.start != expected:
                raise ValueError(
                    f"stage {r.name} starts at layer {r.start}, expected {expected}: "
                    "ranges must be contiguous and in stage order"
                )
            expected = r.end
        if expected != self.num_layers:
            raise ValueError(f"layer map ends at layer {expected}, expected {self.num_layers}")

    def range_of(self, name: str) -> StageRange | None:
        """The range of stage `name`, or None if it holds no layers."""
        return next((r for r in self.ranges if r.name == name), None)

    def to_ranges(self) -> tuple[M.MapRange, ...]:
        """The ranges as ASSIGN, EVENT and STATUS carry them, in stage order."""
        return tuple(M.MapRange(r.name, r.start, r.end) for r in self.ranges)

    def describe(self) -> str:
        """Compact text such as "s0[0,3) s1[3,6)"."""
        return " ".join(f"{r.name}[{r.start},{r.end})" for r in self.ranges)


@dataclass(frozen=True)
class LayerCost:
    """Bytes a stage needs: per decoder layer, plus extras on the first (embeddings) and last (norm + head) stage, plus a fixed per-stage overhead."""

    layer_bytes: int
    first_extra_bytes: int
    last_extra_bytes: int
    fixed_bytes: int = 0

    def __post_init__(self) -> None:
        for field in ("layer_bytes", "first_extra_bytes", "last_extra_bytes", "fixed_bytes"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")

    def stage_bytes(self, start: int, end: int, num_layers: int) -> int:
        """Bytes a stage holding layers [start, end) of a `num_layers` model needs."""
        if not 0 <= start < end <= num_layers:
            raise ValueError(f"range [{start},{end}) is not a non-empty part of [0,{num_layers})")
        return (
            (end - start) * self.layer_bytes
            + (self.first_extra_bytes if start == 0 else 0)
            + (self.last_extra_bytes if end == num_layers else 0)
            + self.fixed_bytes
        )


class SchedulerError(Exception):
    """No layer map can be made from these stages."""


class NotEnoughStages(SchedulerError):
    """There are no (or too few) stages to hold the model."""


class InsufficientMemory(SchedulerError):
    """The stages' memory budgets cannot hold the model in any contiguous split."""


def assign_uniform(names: Sequence[str], num_layers: int, epoch: int = 0) -> LayerMap:
    """Split layers evenly in the given order; the remainder goes to the earliest stages."""
    _check_inputs(names, num_layers)
    used = min(len(names), num_layers)  # surplus stages at the end get nothing
    base, extra = divmod(num_layers, used)
    counts = [base + (1 if i < extra else 0) for i in range(used)]
    return _layer_map(names[:used], counts, num_layers, epoch)


def assign_balanced(
    names: Sequence[str], num_layers: int, head_layers: float, epoch: int = 0
) -> LayerMap:
    """Split layers so that each stage's share of a token's compute is as even as it can be.

    The last stage also runs the final norm and the head, which cost `head_layers` decoder
    layers (their weights over a layer's: a decode step reads every weight once). Among the
    splits with the smallest largest share, the most even one wins, and then the one with
    more layers early. With `head_layers` 0 this is `assign_uniform`. For example, 8 layers
    with a head worth 5.5 layers go to 3 stages as 4, 3 and 1 layers instead of 3, 3 and 2.
    """
    _check_inputs(names, num_layers)
    if head_layers < 0:
        raise ValueError(f"head_layers must be >= 0, got {head_layers}")
    used = min(len(names), num_layers)
    if used == 1:
        return _layer_map(names[:1], [num_layers], num_layers, epoch)
    best: tuple | None = None
    for last in range(1, num_layers - (used - 1) + 1):
        base, extra = divmod(num_layers - last, used - 1)
        counts = [base + (1 if i < extra else 0) for i in range(used - 1)] + [last]
        costs = [*counts[:-1], last + head_layers]
        key = (max(costs), sum(c * c for c in costs), last)
        if best is None or key < best[0]:
            best = (key, counts)
    assert best is not None
    return _layer_map(names[:used], best[1], num_layers, epoch)


def assign_capacity(
    stages: Sequence[StageCapacity],
    num_layers: int,
    cost: LayerCost | None = None,
    epoch: int = 0,
) -> LayerMap:
    """Split layers in proportion to memory budgets (largest remainder), memory-safe if `cost`."""
    _check_inputs([s.name for s in stages], num_layers)
    # A stage offering nothing has a quota of zero; it is left out rather than forced a layer.
    candidates = [s for s in stages if s.memory_bytes > 0]
    if not candidates:
        listed = ", ".join(f"stage {s.name}" for s in stages)
        raise InsufficientMemory(f"no stage offers any memory ({listed}); add memory or a stage")
    primary = _largest_budgets(candidates, num_layers)
    names = [s.name for s in primary]
    counts = _apportion(
        _budgets(primary, cost),
        num_layers,
        [1] * len(primary),
        [num_layers] * len(primary),
    )
    proportional = _layer_map(names, counts, num_layers, epoch)
    if cost is None:
        return proportional
    short = _shortfalls(proportional, primary, cost)
    if not short:
        return proportional
    # Some stage overflows: cap every stage at the layers its memory holds in its position.
    counts = _fit(primary, num_layers, cost)
    if counts is not None:
        return _layer_map(names, counts, num_layers, epoch)
    # No split using every stage fits (often a small stage that cannot take the embeddings or
    # the head); leaving some stages out is better than no map at all.
    chosen = _best_subset(candidates, num_layers, cost)
    if chosen is not None:
        counts = _fit(chosen, num_layers, cost)
        assert counts is not None  # _best_subset only returns subsets that fit
        return _layer_map([s.name for s in chosen], counts, num_layers, epoch)
    raise InsufficientMemory(_capacity_shortfall(short[0], primary, num_layers, cost))


def check_memory(layer_map: LayerMap, stages: Sequence[StageCapacity], cost: LayerCost) -> None:
    """Raise InsufficientMemory for the first stage in `layer_map` that needs more than it offers."""
    short = _shortfalls(layer_map, stages, cost)
    if not short:
        return
    missing = sum(needed - offered for _, needed, offered in short)
    where = "" if len(short) == 1 else f" across {len(short)} stages"
    raise InsufficientMemory(
        f"{_stage_need(*short[0], layer_map.num_layers, cost)}; "
        f"{fmt_bytes(missing)} missing in total{where}; add memory or a stage"
    )


def plan(
    stages: Sequence[StageCapacity],
    num_layers: int,
    strategy: str,
    cost: LayerCost | None = None,
    epoch: int = 0,
) -> LayerMap:
    """Make a layer map with the named strategy, within every stage's memory if `cost` is given.

    Whenever some stages can hold the model, a map forms: a stage that cannot hold its share
    is given less, or left out (it stands by); InsufficientMemory only when no subset fits.
    """
    if strategy == "capacity":
        return assign_capacity(stages, num_layers, cost, epoch)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    head = cost.last_extra_bytes / cost.layer_bytes if cost and cost.layer_bytes else 0.0

    def split(chosen: Sequence[StageCapacity]) -> LayerMap:
        names = [s.name for s in chosen]
        if strategy == "balanced":
            return assign_balanced(names, num_layers, head, epoch)
        return assign_uniform(names, num_layers, epoch)

    layer_map = split(stages)
    if cost is None:
        return layer_map
    short = _shortfalls(layer_map, stages, cost)
    if not short:
        return layer_map
    # One stage in a bad place (a small one given the head) must not take the cluster down:
    # keep the stages that can hold a share, and split among them as evenly as memory allows.
    chosen = _best_subset(stages, num_layers, cost)
    if chosen is None:
        used = [s for s in stages if layer_map.range_of(s.name) is not None]
        raise InsufficientMemory(_capacity_shortfall(short[0], used, num_layers, cost))
    layer_map = split(chosen)
    if not _shortfalls(layer_map, chosen, cost):
        return layer_map
    offsets = [0.0] * (len(chosen) - 1) + [head if strategy == "balanced" else 0.0]
    counts = _even_fit(_caps(chosen, num_layers, cost), num_layers, offsets)
    return _layer_map([s.name for s in chosen], counts, num_layers, epoch)


def one_layer_anywhere(cost: LayerCost) -> int:
    """Bytes that hold one layer in any place of a pipeline, the first and the last included."""
    return cost.layer_bytes + max(cost.first_extra_bytes, cost.last_extra_bytes) + cost.fixed_bytes


def parallel_lanes(caps: Sequence[M.Caps]) -> int:
    """How many stages of a pipeline can compute at the same moment.

    Stages on different hosts, and stages on accelerators, run in parallel. CPU stages that
    share a host share its cores: `cores // threads` of them can run at once. The broker
    forms this many groups of requests, so that each stage that can work has a group, and
    each group is as large as it can be (a batched forward costs little more than a single
    one).
    """
    lanes = 0
    cpu_threads: dict[str, list[int]] = defaultdict(list)
    cores: dict[str, int] = {}
    for c in caps:
        if c.device != "cpu":
            lanes += 1
            continue
        cpu_threads[c.host].append(c.threads)
        cores[c.host] = max(cores.get(c.host, 1), c.cores)
    for host, threads in cpu_threads.items():
        lanes += min(len(threads), max(1, cores[host] // max(threads)))
    return max(1, lanes)


def _check_inputs(names: Sequence[str], num_layers: int) -> None:
    """Reject inputs no strategy can use."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not names:
        raise NotEnoughStages(f"no stages to hold {num_layers} layers; start a stage")
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique: {list(names)}")


def _layer_map(
    names: Sequence[str], counts: Sequence[int], num_layers: int, epoch: int
) -> LayerMap:
    """Lay `counts` layers end to end in stage order; stages with zero layers are left out."""
    ranges, start = [], 0
    for name, count in zip(names, counts, strict=True):
        if count:
            ranges.append(StageRange(name, start, start + count))
            start += count
    return LayerMap(num_layers, tuple(ranges), epoch)


def _largest_budgets(stages: Sequence[StageCapacity], keep: int) -> list[StageCapacity]:
    """The `keep` stages with the largest budgets (earlier wins ties), in their original order."""
    if len(stages) <= keep:
        return list(stages)
    ranked = sorted(range(len(stages)), key=lambda i: (-stages[i].memory_bytes, i))
    return [stages[i] for i in sorted(ranked[:keep])]


def _budgets(stages: Sequence[StageCapacity], cost: LayerCost | None) -> list[int]:
    """Each stage's memory in the cluster's layers (see `_layer_budget`), as integers."""
    return [round(_layer_budget(s, cost)) for s in stages]


def _apportion(weights: list[int], total: int, lo: list[int], hi: list[int]) -> list[int]:
    """Largest-remainder split of `total` by `weights`, each count within [lo, hi]."""
    # Quotas are lam * weight clamped to [lo, hi], with lam chosen so they sum to `total`; with
    # no bound active this is plain largest remainder (lam = total / sum of weights).
    # Fractions keep it exact, so ties really are ties and go to the earlier stage.
    assert sum(lo) <= total <= sum(hi) and all(w > 0 for w in weights)

    bounded = list(zip(weights, lo, hi, strict=True))

    def clamped(lam: Fraction) -> list[Fraction]:
        return [min(max(lam * w, Fraction(a)), Fraction(b)) for w, a, b in bounded]

    if total == sum(lo):
        return list(lo)
    if total == sum(hi):
        return list(hi)
    # The filled sum is monotone in lam and linear between breakpoints: find the segment.
    points = sorted({Fraction(b, w) for w, a, c in bounded for b in (a, c)})
    above = bisect.bisect_left(points, total, key=lambda p: sum(clamped(p)))
    prev = points[above - 1] if above else Fraction(0)
    filled_prev, filled = sum(clamped(prev)), sum(clamped(points[above]))
    lam = prev + (total - filled_prev) * (points[above] - prev) / (filled - filled_prev)
    quotas = clamped(lam)
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(counts)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _own(stage: StageCapacity, cost: LayerCost) -> LayerCost:
    """The cost of `stage`'s layers: its own, or the cluster's."""
    return stage.cost if stage.cost is not None else cost


def _layer_budget(stage: StageCapacity, cost: LayerCost | None) -> float:
    """A stage's memory in the cluster's layers: what layers are apportioned by, so a stage
    whose layers cost it less takes proportionally more of them."""
    own = stage.cost
    if cost is None or own is None or not own.layer_bytes or not cost.layer_bytes:
        return stage.memory_bytes
    return stage.memory_bytes * cost.layer_bytes / own.layer_bytes


def _max_layers(budget: int, cost: LayerCost, first: bool, last: bool, limit: int) -> int:
    """Most layers (up to `limit`) a stage can hold in the given position."""
    overhead = (
        cost.fixed_bytes
        + (cost.first_extra_bytes if first else 0)
        + (cost.last_extra_bytes if last else 0)
    )
    if budget < overhead:
        return 0
    if cost.layer_bytes == 0:
        return limit
    return min(limit, (budget - overhead) // cost.layer_bytes)


def _caps(chosen: Sequence[StageCapacity], num_layers: int, cost: LayerCost) -> list[int]:
    """Layer capacity of each chosen stage, the first holding embeddings and the last the head."""
    last = len(chosen) - 1
    return [
        _max_layers(s.memory_bytes, _own(s, cost), i == 0, i == last, num_layers)
        for i, s in enumerate(chosen)
    ]


def _fit(chosen: Sequence[StageCapacity], num_layers: int, cost: LayerCost) -> list[int] | None:
    """Counts giving every chosen stage at least one layer within its memory, or None."""
    # With every chosen stage non-empty, the first and last stages are known, so each stage's
    # need depends only on its own count: the split is a bounded apportionment.
    caps = _caps(chosen, num_layers, cost)
    if not _caps_fit(caps, num_layers):
        return None
    return _apportion(_budgets(chosen, cost), num_layers, [1] * len(chosen), caps)


def _even_fit(caps: Sequence[int], num_layers: int, offsets: Sequence[float]) -> list[int]:
    """Counts within [1, cap] summing to `num_layers`, each share (count + offset) as even as
    it can be: the largest share smallest, then the sum of squares; ties give layers early."""
    # Adding each layer where the share it makes is smallest is optimal for both: the shares
    # are increasing and convex in the counts (greedy allocation of a separable convex cost).
    counts = [1] * len(caps)
    for _ in range(num_layers - len(caps)):
        room = [i for i in range(len(caps)) if counts[i] < caps[i]]
        i = min(room, key=lambda i: (counts[i] + 1 + offsets[i], i))
        counts[i] += 1
    return counts


def _caps_fit(caps: Sequence[int], num_layers: int) -> bool:
    """Whether stages with these layer capacities can each take one layer and cover them all."""
    return len(caps) <= num_layers and min(caps) >= 1 and sum(caps) >= num_layers


def _best_subset(
    stages: Sequence[StageCapacity], num_layers: int, cost: LayerCost
) -> list[StageCapacity] | None:
    """The subset (in order) that fits with the most stages, then the most memory; or None."""
    # Try each (first, last) pair; between them, every stage that can hold one plain layer only
    # adds capacity, so keep the most capable ones that the layer count allows.
    inner_caps = [
        _max_layers(s.memory_bytes, _own(s, cost), False, False, num_layers) for s in stages
    ]
    best, best_key = None, None
    for first in range(len(stages)):
        for last in range(first, len(stages)):
            inner = [i for i in range(first + 1, last) if inner_caps[i] >= 1]
            room = num_layers - (1 if first == last else 2)
            if room < 0:
                continue
            inner = sorted(
                sorted(inner, key=lambda i: (-inner_caps[i], -stages[i].memory_bytes, i))[:room]
            )
            chosen = [stages[i] for i in dict.fromkeys([first, *inner, last])]
            if not _caps_fit(_caps(chosen, num_layers, cost), num_layers):
                continue
            key = (len(chosen), sum(s.memory_bytes for s in chosen), -first, -last)
            if best_key is None or key > best_key:
                best, best_key = chosen, key
    return best


def _shortfalls(
    layer_map: LayerMap, stages: Sequence[StageCapacity], cost: LayerCost
) -> list[tuple[StageRange, int, int]]:
    """(range, needed, offered) of every stage in the map that needs more than it offers."""
    offered = {s.name: s.memory_bytes for s in stages}
    costs = {s.name: _own(s, cost) for s in stages}
    short = []
    for r in layer_map.ranges:
        if r.name not in offered:
            raise ValueError(f"layer map names stage {r.name}, which is not among the stages")
        needed = costs[r.name].stage_bytes(r.start, r.end, layer_map.num_layers)
        if needed > offered[r.name]:
            short.append((r, needed, offered[r.name]))
    return short


def _capacity_shortfall(
    first_short: tuple[StageRange, int, int],
    chosen: Sequence[StageCapacity],
    num_layers: int,
    cost: LayerCost,
) -> str:
    """Explain why no split fits: a stage short in the proportional split, then the totals."""
    offered = sum(s.memory_bytes for s in chosen)
    total = (
        num_layers * cost.layer_bytes
        + cost.first_extra_bytes
        + cost.last_extra_bytes
        + len(chosen) * cost.fixed_bytes
    )
    who = "1 stage offers" if len(chosen) == 1 else f"{len(chosen)} stages offer"
    if total > offered:
        overall = (
            f"{who} {fmt_bytes(offered)} but the model needs "
            f"{fmt_bytes(total)} ({fmt_bytes(total - offered)} missing)"
        )
    else:
        overall = (
            f"{who} {fmt_bytes(offered)} in total, enough for "
            f"{fmt_bytes(total)}, but no contiguous split in this stage order fits"
        )
    stage = _stage_need(*first_short, num_layers, cost)
    return f"{stage}; {overall}; add memory or a stage"


def _stage_need(r: StageRange, needed: int, offered: int, num_layers: int, cost: LayerCost) -> str:
    """Text like: stage s2 needs 1.20 GiB for layers 8-14 but offers 0.90 GiB."""
    what = f"layer {r.start}" if r.end - r.start == 1 else f"layers {r.start}-{r.end - 1}"
    if r.start == 0 and cost.first_extra_bytes:
        what = f"the embeddings and {what}"
    if r.end == num_layers and cost.last_extra_bytes:
        what = f"{what} plus norm and head"
    need, have = fmt_bytes(needed), fmt_bytes(offered)
    if need == have:  # rounding would hide the difference
        need, have = f"{needed} bytes", f"{offered} bytes"
    return f"stage {r.name} needs {need} for {what} but offers {have}"


def fmt_bytes(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit, size in _UNITS:
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
