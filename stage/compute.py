"""The compute thread of a stage: jobs off one FIFO queue, FORWARDs run in rounds, loads.

The I/O thread reaches this thread only through `Compute`'s methods under "called by the I/O
thread": it puts jobs on the queue, reads `stats` and the cache sizes for heartbeats, and may
run a FORWARD of single positions itself while this thread is idle. Replies go back, prefixed
with the generation of the connection they belong to, over an inproc PAIR socket that the I/O
thread polls, so it wakes at once. Torch releases the GIL inside its ops, so heartbeats keep
flowing during a long forward or a load.
"""

from __future__ import annotations

import collections
import gc
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import structlog
import torch
import zmq

from broker import messages as M
from broker import protocol as P
from broker.messages import Code
from broker.protocol import Message
from stage.checkpoint import Checkpoint
from stage.checks import CheckedItem, Refused, check_forward
from stage.config import StageConfig
from stage.devices import resolve_dtype
from stage.kvcache import KVStore
from stage.loading import load_shard
from stage.shard import KVState, Shard

# Sends the frames of one reply on: to the I/O thread, or straight to the broker when the I/O
# thread runs the round itself.
Send = Callable[[list], object]
# Queued jobs a round looks through, per max_batch: enough to reach decode steps behind
# deferred prompt chunks, while a long queue costs each round only O(max_batch).
ROUND_SCAN_FACTOR = 4


# --- jobs for the compute thread (one FIFO queue) -------------------------------------------


@dataclass
class ForwardJob:
    msg: Message  # its body is an M.Forward
    generation: int
    received: float


@dataclass
class LoadJob:
    epoch: int
    start: int
    end: int
    dtype: str
    generation: int


@dataclass
class ReleaseJob:
    rids: list[str]


@dataclass
class ResetJob:
    """The broker is gone or forgot us: every cache and the epoch are void."""


Job = ForwardJob | LoadJob | ReleaseJob | ResetJob


@dataclass
class Stats:
    """Counters the compute thread writes and the I/O thread reads for heartbeats."""

    progress: int = 0
    tokens: int = 0
    batches: int = 0  # batched forwards of more than one request
    batched_items: int = 0
    running: str | None = None  # "forward" or "load"
    running_since: float = 0.0


class Compute:
    """The shard of a stage, its KV caches, and the thread that runs every job on them."""

    def __init__(
        self,
        config: StageConfig,
        checkpoint: Checkpoint,
        ctx: zmq.Context,
        results_addr: str,
        log: structlog.typing.FilteringBoundLogger,
    ):
        self.config = config
        self.checkpoint = checkpoint
        self.device = torch.device(config.device)
        self.log = log
        self.stats = Stats()
        self.store = KVStore(config.kv_bytes)
        self._ctx = ctx
        self._results_addr = results_addr
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        # Held by whichever thread runs a job: the compute thread, or the I/O thread taking
        # the inline fast path (`run_inline`) while the compute thread has nothing to do.
        self._lock = threading.Lock()
        # Owned by the compute thread; the I/O thread reads them only for READY and heartbeats.
        self._shard: Shard | None = None
        self._epoch: int | None = None
        # Bumped by the I/O thread when a connection's work becomes void; jobs and results
        # carry the generation they belong to, and stale ones are dropped unseen.
        self._generation = 0
        # Compute thread only: jobs taken off the queue but not run yet, in arrival order
        # (see _gather_round and _overtake), and the requests of the rounds now computing,
        # whose caches an eviction must not take.
        self._pending: collections.deque[Job | None] = collections.deque()
        self._busy: frozenset[str] = frozenset()
        self._closing = False
        self._thread: threading.Thread | None = None
        # Seconds per item of the last round of single positions, on either thread (None:
        # none yet): what `can_run_inline` expects a step to hold up the I/O thread for.
        self._item_s: float | None = None

    # --- called by the I/O thread -----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="compute", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop after the job now running; wait for it a little, not for a long forward."""
        self._closing = True
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def epoch(self) -> int | None:
        return self._epoch

    @property
    def held(self) -> tuple[int, int] | None:
        """The layer range this stage holds, as READY reports it; None on standby."""
        shard = self._shard
        return (shard.start, shard.end) if shard is not None else None

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def void(self) -> None:
        """Forget work of the current connection: queued steps and every KV cache."""
        self._generation += 1
        self._jobs.put(ResetJob())

    def can_run_inline(self, job: ForwardJob) -> bool:
        """Whether every item of `job` is one position and no job is queued or running here."""
        # One position, not `Item.is_decode`: the cost matters here, and a one-token prompt
        # costs what a decode step does.
        items = job.msg.body.items
        if not all(item.n == 1 for item in items) or self._jobs.unfinished_tasks:
            return False
        # The I/O thread sends no heartbeat while it computes, and the broker takes a stage
        # silent for four beats as dead: only a step expected to end within half a beat runs
        # here (a batch of 16 tinyllama decode rows in bfloat16 takes seconds). Until a step
        # has been timed, one item is taken for short enough.
        if self._item_s is None:
            return len(items) == 1
        return self._item_s * len(items) <= self.config.heartbeat / 2

    def run_inline(self, job: ForwardJob, send: Send) -> bool:
        """Run `job` on the calling thread, unless the compute thread holds a job meanwhile."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            stats = self.stats
            stats.running, stats.running_since = "forward", time.monotonic()
            try:
                self._answer_round([job], send)
            finally:
                stats.running = None
                self._time_items([job], stats.running_since)
        finally:
            self._lock.release()
        return True

    def _time_items(self, jobs: list[ForwardJob], started: float) -> None:
        """After a round: its time per item, if every item was a single position."""
        items = [item for job in jobs for item in job.msg.body.items]
        if items and all(item.n == 1 for item in items):
            self._item_s = (time.monotonic() - started) / len(items)

    # --- the compute thread -----------------------------------------------------------------

    def _loop(self) -> None:
        out = self._ctx.socket(zmq.PAIR)
        out.setsockopt(zmq.LINGER, 0)
        out.connect(self._results_addr)
        stats = self.stats
        pending = self._pending
        try:
            with torch.inference_mode():
                while True:
                    job = pending.popleft() if pending else self._jobs.get()
                    if job is None or self._closing:
                        return
                    generation = getattr(job, "generation", self._generation)
                    if generation != self._generation:
                        self._jobs.task_done()
                        continue  # its connection is gone; nobody waits for the answer
                    jobs = [job]
                    if isinstance(job, ForwardJob):
                        jobs = self._gather_round(job, pending)
                    prefix = generation.to_bytes(8, "little")

                    def send(frames: list | None, prefix: bytes = prefix) -> None:
                        if frames is not None:
                            out.send_multipart([prefix, *frames], copy=False)

                    with self._lock:
                        stats.running = "load" if isinstance(job, LoadJob) else "forward"
                        stats.running_since = time.monotonic()
                        try:
                            if isinstance(job, ForwardJob):
                                self._answer_round(jobs, send)
                                self._time_items(jobs, stats.running_since)
                            else:
                                try:
                                    send(self._run_job(job))
                                except Exception as e:  # answer, go on
                                    send(self._internal_error(job, e))
                        finally:
                            stats.running = None
                            # Counted done only now: the inline path waits for an idle queue.
                            for _ in jobs:
                                self._jobs.task_done()
        finally:
            out.close(linger=0)

    def _gather_round(self, first: ForwardJob, pending: collections.deque) -> list[ForwardJob]:
        """The FORWARDs waiting behind `first` that can run with it as one round.

        A round holds each request at most once, so every check can be made before anything
        runs. A step of a request already in the round (the next chunk of a long prompt) is
        left for a later round, and so is everything after it for that request; steps of
        other requests behind it may still join: decode steps overtake queued prefill chunks
        of other requests, never one of their own. A load, release or reset is a barrier.
        """
        jobs = [first]
        rids = _rids(first)
        deferred_rids: set[str] = set()
        items = len(rids)
        kept: collections.deque = collections.deque()
        scanned = 0
        while items < self.config.max_batch and scanned < ROUND_SCAN_FACTOR * self.config.max_batch:
            if pending:
                job = pending.popleft()
            else:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
            scanned += 1
            if not isinstance(job, ForwardJob) or job.generation != first.generation:
                kept.append(job)
                break
            more = _rids(job)
            if items + len(more) > self.config.max_batch:
                kept.append(job)
                break
            if more & (rids | deferred_rids):
                deferred_rids |= more
                kept.append(job)
                continue
            jobs.append(job)
            rids |= more
            items += len(more)
        pending.extendleft(reversed(kept))
        return jobs

    # --- a round of FORWARDs ----------------------------------------------------------------

    def _answer_round(self, jobs: list[ForwardJob], send: Send) -> None:
        """Run a round and send each FORWARD's answer as soon as it is ready. If the round
        fails, the FORWARDs not answered yet get an internal ERROR."""
        answered: set[int] = set()
        try:
            for job, frames in self._forward_round(jobs, send):
                answered.add(id(job))
                send(frames)
        except Exception as e:  # a bug or an exhausted resource: answer, go on
            for job in jobs:
                if id(job) not in answered:
                    send(self._internal_error(job, e))

    def _forward_round(
        self, jobs: list[ForwardJob], send: Send
    ) -> Iterator[tuple[ForwardJob, list]]:
        """Check every item of a round, run items of one length as one batch, and yield each
        FORWARD's answer as soon as all its items are computed.

        Batches run shortest first: decode steps gathered into a round with a prompt or a
        chunk are answered before the prompt is computed, not after it. A FORWARD-wide
        problem (stale epoch, malformed) refuses the whole FORWARD with an ERROR; a refused
        item (lost cache, bad position) is listed in its FORWARD's RESULT under `refused` and
        the other items are computed as if it were not there.

        Between two layers of a prompt or chunk, and on the last stage before its head,
        decode FORWARDs of other requests that have arrived meanwhile run to their answers
        (`_overtake`): a decode group waits for one layer of a long prompt at a stage, not
        for all of its layers.
        """
        started = time.perf_counter()
        shard, store = self._shard, self.store
        outer = self._busy
        self._busy = outer.union(*(_rids(job) for job in jobs))
        try:
            yield from self._compute_round(jobs, send, started, shard, store)
        finally:
            self._busy = outer

    def _compute_round(
        self,
        jobs: list[ForwardJob],
        send: Send,
        started: float,
        shard: Shard,
        store: KVStore,
    ) -> Iterator[tuple[ForwardJob, list]]:
        """`_forward_round` for its jobs, while their requests count as busy."""
        checked: list[list[CheckedItem | M.Refusal] | Refused] = []
        for job in jobs:
            try:
                checked.append(check_forward(job.msg, self._shard, self._epoch, store))
            except Refused as r:
                checked.append(r)
        # Items with the same number of new positions run as one batch (decode steps
        # together, prompts or chunks of one length together); a lone item, and every item
        # of a shard that cannot batch, takes the exact batch-1 path.
        groups: dict[int, list[tuple[int, int]]] = {}
        solo: list[tuple[int, int]] = []
        inputs: dict[tuple[int, int], tuple[torch.Tensor, KVState]] = {}
        unfinished: dict[int, int] = {}
        for j, plan in enumerate(checked):
            if isinstance(plan, Refused):
                yield jobs[j], self._refuse_forward(jobs[j], plan)
                continue
            for i, entry in enumerate(plan):
                if isinstance(entry, M.Refusal):
                    continue
                item, x = entry.item, entry.x
                cache = (
                    store.start(item.rid, entry.fresh)
                    if entry.fresh is not None
                    else store.get(item.rid)
                )
                if x.device != shard.device:
                    x = x.to(shard.device)
                inputs[(j, i)] = (x, cache.state)
                unfinished[j] = unfinished.get(j, 0) + 1
                if shard.batchable:
                    groups.setdefault(item.n, []).append((j, i))
                else:
                    solo.append((j, i))
        for j, plan in enumerate(checked):
            if not isinstance(plan, Refused) and j not in unfinished:
                yield jobs[j], self._result(jobs[j], j, plan, {}, started, 0)  # all refused
        batches = [groups[n] for n in sorted(groups)] + [[key] for key in solo]
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        widths: dict[int, int] = {}
        for batch in batches:
            # Only items of several positions (prompts, chunks) are long enough to let
            # decode steps run between two of their layers.
            several = inputs[batch[0]][0].shape[1] > 1
            between = (lambda: self._overtake(send)) if several else None
            try:
                if len(batch) == 1:
                    x, state = inputs[batch[0]]
                    outputs[batch[0]] = shard.forward(x, state, logits="last", between=between)
                else:
                    xs, states = zip(*(inputs[key] for key in batch), strict=True)
                    results = shard.forward_batch(list(xs), list(states), between=between)
                    outputs.update(zip(batch, results, strict=True))
                    self.stats.batches += 1
                    self.stats.batched_items += len(batch)
            except Exception:
                # A cache of an unanswered FORWARD may hold some of its layers or steps but not
                # all: never reuse it.
                store.release(checked[j][i].item.rid for j, i in inputs if j in unfinished)
                raise
            for j, _ in batch:
                widths[j] = max(widths.get(j, 0), len(batch))
                unfinished[j] -= 1
                if not unfinished[j]:
                    del unfinished[j]
                    yield jobs[j], self._result(jobs[j], j, checked[j], outputs, started, widths[j])
        store.evict(keep=self._busy)

    def _overtake(self, send: Send) -> None:
        """Run the decode FORWARDs waiting in the queue, between two layers of a prompt (or
        before the head).

        Only FORWARDs whose every item is one decode position, of requests not in a round now
        computing and not in an earlier waiting FORWARD, and only up to the first load,
        release or reset (a barrier), in arrival order.
        """
        pending = self._pending
        while True:
            try:
                pending.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        taken, seen = [], set(self._busy)
        for job in pending:
            if not isinstance(job, ForwardJob):
                break
            if job.generation != self._generation:
                continue
            rids = _decode_rids(job)
            if rids is not None and not rids & seen:
                taken.append(job)
            seen |= rids if rids is not None else _rids(job)
        if not taken:
            return
        for job in taken:
            pending.remove(job)
        try:
            self._answer_round(taken, send)
        finally:
            for _ in taken:
                self._jobs.task_done()

    # --- answers ----------------------------------------------------------------------------

    def _refuse_forward(self, job: ForwardJob, refused: Refused) -> list:
        body = P.error(refused.code, refused.message, about=job.msg.body, rid=refused.rid)
        return P.encode(P.STAGE_TAG, body)

    def _result(
        self,
        job: ForwardJob,
        j: int,
        plan: list[CheckedItem | M.Refusal],
        outputs: dict[tuple[int, int], torch.Tensor],
        started: float,
        width: int,
    ) -> list:
        """A FORWARD's RESULT: its items' outputs in order, and the items it refused.

        `compute_s` runs from the round's start to this answer; `batch` is the width of the
        widest forward its items ran in (1: alone)."""
        shard, store = self._shard, self.store
        done = time.perf_counter()
        tensors = []
        refused = [entry for entry in plan if isinstance(entry, M.Refusal)]
        for i, entry in enumerate(plan):
            if isinstance(entry, M.Refusal):
                continue
            item = entry.item
            out = outputs[(j, i)]
            self.stats.tokens += item.n
            self.stats.progress += 1
            if not bool(torch.isfinite(out).all()):
                # Never sent on as a token or a hidden state; the cache it left is void.
                store.release([item.rid])
                refused.append(self._non_finite(i, item, shard))
                continue
            if shard.last and not item.logits:
                out = out[:, :0]
            store.commit(item.rid, item.hash)
            tensors.append(out)
        forward: M.Forward = job.msg.body
        result = M.ForwardResult(
            fid=forward.fid,
            epoch=forward.epoch,
            compute_s=done - started,
            queue_s=started - job.received,
            batch=width,
            refused=tuple(sorted(refused, key=lambda r: r.i)),
        )
        return P.encode(P.STAGE_TAG, result, tensors)

    def _non_finite(self, i: int, item: M.Item, shard: Shard) -> M.Refusal:
        """The refusal of an item whose output holds NaN or infinity."""
        what = "logits" if shard.last else "hidden states"
        if shard.dtype == torch.float16:
            advice = (
                "float16 overflowed on this input: run the cluster in bfloat16 or float32 (--dtype)"
            )
        else:
            advice = (
                "the weights overflow on this input, which a sound checkpoint does not do: "
                "check the checkpoint against its original, or download it again"
            )
        self.log.warning(
            "non-finite output",
            rid=item.rid,
            pos=item.pos,
            n=item.n,
            start=shard.start,
            end=shard.end,
        )
        return M.Refusal(
            i=i,
            rid=item.rid,
            code=Code.NON_FINITE,
            message=(
                f"layers [{shard.start},{shard.end}) of {shard.checkpoint.path} computed "
                f"non-finite {what} (NaN or infinity) for request {item.rid} at positions "
                f"[{item.pos},{item.pos + item.n}); {advice}"
            ),
        )

    def _internal_error(self, job: Job, e: Exception) -> list | None:
        self.log.exception("job failed", job=type(job).__name__)
        message = f"{type(job).__name__} failed: {type(e).__name__}: {e}"
        if isinstance(job, ForwardJob):
            body = P.error(Code.INTERNAL, message, about=job.msg.body)
        elif isinstance(job, LoadJob):
            body = P.error(Code.INTERNAL, message, epoch=job.epoch)
        else:
            return None
        return P.encode(P.STAGE_TAG, body)

    # --- loads, releases, resets ------------------------------------------------------------

    def _run_job(self, job: Job) -> list | None:
        if isinstance(job, LoadJob):
            return self._load(job)
        if isinstance(job, ReleaseJob):
            self.store.release(job.rids)
            return None
        if isinstance(job, ResetJob):
            self.store.clear()
            self._epoch = None
            return None
        raise TypeError(f"unknown job {job!r}")

    def _load(self, job: LoadJob) -> list:
        started = time.perf_counter()
        self.store.clear()
        self._epoch = None
        old, self._shard = self._shard, None
        dtype = resolve_dtype(job.dtype)
        if old is not None and (
            job.start == job.end
            or old.dtype != dtype
            or old.device != self.device
            or old.end <= job.start
            or job.end <= old.start
        ):
            old = None  # nothing to reuse: free it before reading the new layers
            gc.collect()
        if job.start == job.end:
            weight_bytes = 0
        else:
            try:
                shard = load_shard(
                    self.checkpoint,
                    job.start,
                    job.end,
                    dtype=dtype,
                    device=self.device,
                    reuse=old,
                    row_kernel=self.config.row_kernel,
                    weights=self.config.weights,
                )
            except Exception as e:
                # A reused layer may already have been renumbered for the new shard: the old
                # one is not safe to keep. Standby until the broker assigns again.
                del old
                gc.collect()
                self.log.error(
                    "load failed", epoch=job.epoch, start=job.start, end=job.end, error=str(e)
                )
                message = f"cannot load layers [{job.start},{job.end}): {e}"
                return P.encode(P.STAGE_TAG, P.error(Code.INTERNAL, message, epoch=job.epoch))
            del old
            gc.collect()
            self._shard = shard
            weight_bytes = shard.weight_bytes()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._epoch = job.epoch
        load_s = time.perf_counter() - started
        self.log.info(
            "loaded",
            epoch=job.epoch,
            start=job.start,
            end=job.end,
            weight_bytes=weight_bytes,
            load_s=round(load_s, 3),
        )
        loaded = M.Loaded(
            epoch=job.epoch,
            start=job.start,
            end=job.end,
            weight_bytes=weight_bytes,
            load_s=load_s,
            digests=self.checkpoint.pack_digests(self._shard.digests) if self._shard else b"",
        )
        return P.encode(P.STAGE_TAG, loaded)


def _rids(job: ForwardJob) -> set[str]:
    return {item.rid for item in job.msg.body.items}


def _decode_rids(job: ForwardJob) -> set[str] | None:
    """A FORWARD's request ids if every item is a decode step, else None."""
    items = job.msg.body.items
    if not items or not all(item.is_decode for item in items):
        return None
    return _rids(job)
