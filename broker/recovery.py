"""Recovery: a stage lost, a new layer map over the live stages, and every request replayed.

The client holds the truth of every request, so each failure has the same cure: bump the
epoch, drop the steps in flight and have the clients re-send from their sequences.
"""

from __future__ import annotations

import collections
import time

from broker import messages as M
from broker import protocol as P
from broker.layermap import (
    InsufficientMemory,
    SchedulerError,
    StageCapacity,
    fmt_bytes,
    one_layer_anywhere,
    parallel_lanes,
    plan,
)
from broker.protocol import Code
from broker.records import StageRecord


class Recovery:
    """The `Broker`'s path from a lost stage (or a join, or a leave) to a ready map."""

    def stage_dead(self, stage: StageRecord, cause: str) -> None:
        if stage.name not in self.stages or self.stages[stage.name] is not stage:
            return
        self.log.warning(
            "stage_dead", stage=stage.name, cause=cause, layers=f"[{stage.start},{stage.end})"
        )
        self.publish("dead", stage=stage.name, cause=cause)
        had_layers = self.layer_map is not None and self.layer_map.range_of(stage.name) is not None
        self.remove_stage(stage)
        if had_layers:
            self.reshard(cause=cause, lost=stage.name)
        else:
            self.retry_map(cause)

    def retry_map(self, cause: str) -> None:
        """Membership changed while no map stands: try again, and refresh the not-ready reason
        (it may name the stage that just went)."""
        if self.map_formed and self.layer_map is None:
            self.reshard(cause=cause)

    def remove_stage(self, stage: StageRecord) -> None:
        stage.state = "dead"
        for step in list(stage.queue) + list(stage.inflight.values()):
            step.dead = True
        self.stages.pop(stage.name, None)
        self.by_ident.pop(stage.ident, None)
        if stage.name not in self.stages:
            self.metrics.forget_stage(stage.name)

    def reshard(self, cause: str, lost: str | None = None) -> None:
        """Compute a new map over the live stages, bump the epoch, and replay every request."""
        old = self.layer_map
        order = self.pipeline_order()
        self.epoch += 1
        self.last_reshard = time.monotonic()
        self.rebalance_at = None
        self.metrics.reshards.labels(cause).inc()
        caps = [
            StageCapacity(s.name, s.caps.memory_bytes, self.cost_of(s.caps.weights)) for s in order
        ]
        try:
            if not caps:
                raise SchedulerError(
                    "no live stages; start one with `python -m stage --broker URL`"
                )
            new = plan(caps, self.num_layers, self.config.strategy, self.cost, epoch=self.epoch)
            self.not_ready_reason = "waiting for stages to load their layers"
        except SchedulerError as e:
            new = None
            how = " (give stages more --memory-mb, or start another stage)"
            self.not_ready_reason = (
                f"the live stages cannot hold the model: {e}"
                f"{how if isinstance(e, InsufficientMemory) else ''}"
            )
            self.log.warning("not_ready", reason=self.not_ready_reason)
            self.publish("not_ready", reason=self.not_ready_reason)
        for c in caps:
            useful = one_layer_anywhere(c.cost or self.cost)
            if c.memory_bytes < useful and (new is None or new.range_of(c.name) is None):
                self.log.warning(
                    "stage_too_small",
                    stage=c.name,
                    advice=f"stage {c.name} offers {fmt_bytes(c.memory_bytes)}, too little for "
                    f"its share; restart it with --memory-mb {-(-useful // (1 << 20))} or more "
                    "(one layer with the embeddings or the head)",
                )
        self.layer_map = new
        self.lanes = parallel_lanes([self.stages[r.name].caps for r in new.ranges]) if new else 1
        for stage in order:
            r = new.range_of(stage.name) if new is not None else None
            stage.start, stage.end = (r.start, r.end) if r is not None else (0, 0)
            stage.state = "loading"
            stage.loaded_epoch = -1
            self.send_assign(stage)
        old_ranges = old.to_ranges() if old is not None else ()
        new_ranges = new.to_ranges() if new is not None else ()
        self.log.info(
            "reshard",
            cause=cause,
            lost=lost,
            epoch=self.epoch,
            old=old.describe() if old else None,
            new=new.describe() if new else None,
        )
        self.publish("reshard", cause=cause, lost=lost, old_map=old_ranges, new_map=new_ranges)
        self.kill_steps()
        for rid in list(self.requests):
            self.replay(
                rid,
                event="reshard",
                reason=cause,
                epoch=self.epoch,
                lost=lost,
                cause=cause,
                old_map=old_ranges,
                new_map=new_ranges,
            )

    def send_assign(self, stage: StageRecord) -> None:
        """Tell a stage its range of the current map (none: standby) and the map's epoch."""
        assign = M.Assign(
            epoch=self.epoch,
            start=stage.start,
            end=stage.end,
            num_layers=self.num_layers,
            dtype=self.config.dtype,
            map=self.layer_map.to_ranges() if self.layer_map is not None else (),
        )
        self.send(stage.ident, P.encode(P.STAGE_TAG, assign))

    def pipeline_order(self) -> list[StageRecord]:
        """Survivors keep their places; newcomers go after them, by held range, then name."""
        live = [s for s in self.stages.values() if s.state not in ("dead", "draining")]
        rank = {r.name: i for i, r in enumerate(self.layer_map.ranges)} if self.layer_map else {}
        return sorted(
            live,
            key=lambda s: (rank.get(s.name, len(rank)), s.held[0] if s.held else 1 << 30, s.name),
        )

    def kill_steps(self, rid: str | None = None) -> None:
        """Drop queued and in-flight steps (of one request, or all); credits return on reply."""
        for stage in self.stages.values():
            for step in list(stage.queue) + list(stage.inflight.values()):
                if rid is None or step.rid == rid:
                    step.dead = True
            stage.queue = collections.deque(s for s in stage.queue if not s.dead)
        self.waiting = collections.deque(
            s for s in self.waiting if not (rid is None or s.rid == rid)
        )

    def replay(self, rid: str, event: str, reason: str = "", **fields) -> None:
        """Tell a request's client to re-send its steps; its old steps are dropped."""
        request = self.requests.get(rid)
        if request is None:
            return
        self.kill_steps(rid)
        request.replays += 1
        if request.replays > self.config.max_replays:
            error = P.error(
                Code.REPLAY_LIMIT,
                f"request {rid} was replayed {request.replays - 1} times "
                f"(limit {self.config.max_replays}); the cluster is unstable",
                rid=rid,
            )
            self.send(request.client, P.encode(P.CLIENT_TAG, error))
            self.finish_request(request, outcome="failed")
            return
        request.replay_pending = True
        self.metrics.replays.labels(event).inc()
        body = M.Event(rid=rid, event=event, reason=reason, **fields)
        request.events.append(body)
        self.send(request.client, P.encode(P.CLIENT_TAG, body))

    @property
    def ready(self) -> bool:
        if self.layer_map is None:
            return False
        return all(
            (s := self.stages.get(r.name)) is not None and s.loaded_epoch == self.epoch
            for r in self.layer_map.ranges
        )

    def on_map_ready(self) -> None:
        self.log.info("cluster_ready", epoch=self.epoch, map=self.layer_map.describe())
        self.publish("ready", new_map=self.layer_map.to_ranges())
        self.finish_drains()
        now = time.monotonic()
        waiting, self.waiting = self.waiting, collections.deque()
        for step in waiting:
            if not step.dead:
                self.enqueue(step, now)
        for stage in self.stages.values():
            self.dispatch(stage)

    def finish_drains(self) -> None:
        """A draining stage goes once the map no longer needs it."""
        for stage in list(self.stages.values()):
            if (
                stage.state == "draining"
                and (self.layer_map is None or self.layer_map.range_of(stage.name) is None)
                and (self.ready or self.layer_map is None)
            ):
                self.send(stage.ident, P.encode(P.STAGE_TAG, M.Bye(reason="drained")))
                self.log.info("stage_left", stage=stage.name)
                self.remove_stage(stage)

    def schedule_rebalance(self, cause: str, now: float, immediate: bool) -> None:
        if immediate:
            self.reshard(cause=cause)
            return
        due = max(now, self.last_reshard + self.config.rebalance_cooldown_s)
        self.rebalance_at = due if self.rebalance_at is None else min(self.rebalance_at, due)

    def form_map_if_due(self, now: float) -> None:
        if not self.map_formed:
            if not self.stages:
                return
            quiet = now - max(s.joined for s in self.stages.values()) >= self.config.settle_s
            if len(self.stages) >= self.config.expect_stages or quiet:
                self.map_formed = True
                self.reshard(cause="start")
        elif self.rebalance_at is not None and now >= self.rebalance_at:
            self.rebalance_at = None
            self.reshard(cause="rebalance")
