"""Membership: stages join, load their layers, beat, leave or are drained, and fall silent."""

from __future__ import annotations

import time

from broker import messages as M
from broker import protocol as P
from broker.protocol import Code
from broker.records import StageRecord

# A stage keeps its name against a READY from another identity while the gaps between what
# it sends stay under this many heartbeat intervals: a stage that missed a beat (dead, frozen,
# cut off) may be replaced under its name without waiting for its dead-after time.
NAME_HOLD_BEATS = 2


class Membership:
    """The `Broker`'s handlers of what stages say about themselves, and its liveness checks."""

    def stage_of(self, ident: bytes) -> StageRecord | None:
        name = self.by_ident.get(ident)
        return self.stages.get(name) if name is not None else None

    def on_ready(self, ident: bytes, msg: P.Message) -> None:
        body: M.Ready = msg.body
        name = body.name
        if body.fingerprint != self.checkpoint.fingerprint:
            self.log.warning("stage_refused", stage=name, reason="fingerprint")
            return self.refuse_stage(
                ident,
                Code.FINGERPRINT,
                f"stage {name} sees checkpoint {body.fingerprint} but the broker serves "
                f"{self.checkpoint.fingerprint} ({self.checkpoint.path}); point --model at the same checkpoint",
            )
        if body.caps.dtype != self.config.dtype:
            self.log.warning("stage_refused", stage=name, reason="dtype")
            return self.refuse_stage(
                ident,
                Code.DTYPE_MISMATCH,
                f"stage {name} runs {body.caps.dtype} but the cluster runs {self.config.dtype}; "
                f"start it with --dtype {self.config.dtype}",
            )
        now = time.monotonic()
        old = self.stages.get(name)
        if old is not None and old.ident != ident and self.holds_name(old, now):
            return self.refuse_name(ident, body, old)
        stage = StageRecord(
            name=name,
            ident=ident,
            caps=body.caps,
            credits=body.credits,
            joined=now,
            held=body.held,
            last_seen=now,
            progress_at=now,
        )
        if old is not None:
            # The same name from a new identity is that stage restarted or reconnected.
            lost = {s.rid for s in [*old.queue, *old.inflight.values()] if not s.dead}
            self.remove_stage(old)
            if (
                old.state != "draining"
                and self.layer_map is not None
                and self.layer_map.range_of(name)
            ):
                self.restart_in_place(stage, old, lost)
                return
        self.stages[name] = stage
        self.by_ident[ident] = name
        self.log.info(
            "stage_joined",
            stage=name,
            host=stage.caps.host,
            device=stage.caps.device,
            memory_mb=stage.caps.memory_bytes >> 20,
            credits=stage.credits,
        )
        self.publish("join", stage=name, host=stage.caps.host or None)
        # Answered at once: a stage that hears nothing for its dead-after time reconnects under
        # a new identity, and the map may form only later (expect_stages, settle_s).
        self.send(ident, P.encode(P.STAGE_TAG, M.BrokerHeartbeat(epoch=self.epoch)))
        if self.map_formed:
            self.schedule_rebalance(cause="join", now=now, immediate=not self.ready)

    def restart_in_place(self, stage: StageRecord, old: StageRecord, lost: set[str]) -> None:
        """A stage came back before it was declared dead: same range, same epoch, empty caches.

        Its requests replay when it refuses their next step (`cache_miss`); the ones that had a
        step inside the old process are told at once.
        """
        self.stages[stage.name] = stage
        self.by_ident[stage.ident] = stage.name
        stage.start, stage.end, stage.state = old.start, old.end, "loading"
        self.log.info("stage_restarted", stage=stage.name, layers=f"[{stage.start},{stage.end})")
        self.publish("rejoin", stage=stage.name)
        self.send_assign(stage)
        for rid in lost:
            self.replay(rid, event="replay", reason=f"stage {stage.name} restarted")

    def holds_name(self, stage: StageRecord, now: float) -> bool:
        """Whether `stage` keeps its name against a READY for it from another identity."""
        # Names are not authenticated (until keys exist), so a stage that beats is never
        # displaced: it keeps its name while its connection is open and it has missed no beat.
        # A stage replaced under its name is dead, frozen or cut off, so one of the two fails;
        # one that lost us closes its old socket before it registers again, so the probe fails.
        if now - stage.last_seen > NAME_HOLD_BEATS * self.config.heartbeat_s:
            return False
        self.send(stage.ident, P.encode(P.STAGE_TAG, M.BrokerHeartbeat(epoch=self.epoch)))
        return stage.ident not in self.unreachable

    def refuse_name(self, ident: bytes, body: M.Ready, old: StageRecord) -> None:
        """A READY for the name of a live stage: the same process retries, another exits."""
        name, caps = body.name, body.caps
        if old.caps.pid and (caps.host, caps.pid) == (old.caps.host, old.caps.pid):
            # The stage itself on a new socket (it lost us and reconnected) before we see its
            # old connection close: asked to retry, it gets in once that one is gone. What a
            # READY claims picks only the answer: neither answer displaces the live stage.
            self.log.info("stage_refused", stage=name, reason="previous_connection_open")
            error = P.error(
                Code.BUSY,
                f"stage {name}'s previous connection to the broker is still open; "
                "registering again once it closes",
                retry_after_s=self.config.heartbeat_s,
            )
            self.send(ident, P.encode(P.STAGE_TAG, error))
            return
        self.log.warning(
            "stage_refused", stage=name, reason="name_in_use", host=caps.host, pid=caps.pid
        )
        self.refuse_stage(
            ident,
            Code.NAME_IN_USE,
            f"stage name {name} is in use by a live stage (host {old.caps.host or '?'}, "
            f"pid {old.caps.pid}); start this one with a different --name, or stop the other "
            "one first",
        )

    def refuse_stage(self, ident: bytes, code: Code, reason: str) -> None:
        """A stage that must not join this cluster (`code` says why): it exits with the reason."""
        self.send(ident, P.encode(P.STAGE_TAG, P.error(code, reason)))

    def on_loaded(self, ident: bytes, msg: P.Message) -> None:
        stage = self.stage_of(ident)
        body: M.Loaded = msg.body
        if body.epoch != self.epoch:
            self.metrics.stale.inc()
            return
        # The fingerprint of READY samples the weight files; the digests cover every byte the
        # stage read. A stage that read other bytes never serves: it is refused and its layers
        # go to the others.
        problem = (
            self.checkpoint.digest_problem(body.digests, body.start, body.end)
            if body.end > body.start
            else None
        )
        if problem is not None:
            self.log.warning("stage_refused", stage=stage.name, reason="tensors", problem=problem)
            self.refuse_stage(
                ident,
                Code.FINGERPRINT,
                f"stage {stage.name} {problem}; give every stage the same checkpoint file as "
                "the broker",
            )
            self.stage_dead(stage, cause="refused")
            return
        stage.loaded_epoch = body.epoch
        stage.load_s = body.load_s
        if stage.state in ("loading", "joining"):
            stage.state = "ready" if stage.end > stage.start else "standby"
        self.log.info(
            "stage_loaded",
            stage=stage.name,
            start=body.start,
            end=body.end,
            epoch=body.epoch,
            load_s=body.load_s,
            weight_mb=body.weight_bytes >> 20,
        )
        if self.ready:
            self.on_map_ready()

    def on_heartbeat(self, ident: bytes, msg: P.Message) -> None:
        stage = self.stage_of(ident)
        beat: M.StageHeartbeat = msg.body
        if beat.progress != stage.progress:
            stage.progress = beat.progress
            stage.progress_at = time.monotonic()
        stage.stats = beat

    def on_leaving(self, ident: bytes, msg: P.Message) -> None:
        self.drain_stage(self.stage_of(ident), cause="leave")

    def on_drain(self, ident: bytes, msg: P.Message) -> None:
        body: M.Drain = msg.body
        # With keys, the sender's admin key was checked already (auth.Gate). Without keys on
        # loopback any peer may drain: every local process can already register a stage and
        # read hidden states, so the host is the trust boundary. Off loopback without keys
        # (--insecure) anyone who reaches the port would, so nobody may.
        if self.config.insecure:
            raise P.ProtocolError(
                Code.UNAUTHORIZED,
                "DRAIN needs an admin key: start the broker with --keys (this broker runs "
                "--insecure)",
            )
        stage = self.stages.get(body.stage)
        if stage is None:
            raise P.ProtocolError(Code.BAD_REQUEST, f"no stage named {body.stage!r}")
        self.drain_stage(stage, cause="drain")
        self.send(ident, P.encode(msg.tag, M.Pong(ready=self.ready, epoch=self.epoch)))

    def drain_stage(self, stage: StageRecord, cause: str) -> None:
        if stage.state == "draining":
            return
        self.log.info("stage_draining", stage=stage.name, cause=cause)
        stage.state = "draining"
        self.publish("leave", stage=stage.name, cause=cause)
        if stage.end > stage.start:
            self.reshard(cause=cause, lost=stage.name)
        else:
            self.finish_drains()
            self.retry_map(cause)

    def purge_stages(self, now: float) -> None:
        for stage in list(self.stages.values()):
            silence = self.config.dead_after_s
            if stage.state == "loading":
                silence = max(silence, self.config.load_grace_s)
            if now - stage.last_seen > silence:
                self.stage_dead(stage, cause="silent")
            elif self.is_stalled(stage, now):
                self.log.warning(
                    "stage_stalled", stage=stage.name, since_s=round(now - stage.progress_at, 3)
                )
                self.publish("stalled", stage=stage.name)
                self.stage_dead(stage, cause="stalled")

    def is_stalled(self, stage: StageRecord, now: float) -> bool:
        live = [s for s in stage.inflight.values() if not s.dead]
        if not live:
            return False
        tokens = sum(s.item.n for s in live)
        expected = stage.per_token_s * tokens
        deadline = (
            max(self.config.stall_floor_s, self.config.stall_factor * expected)
            if stage.per_token_s > 0
            else self.config.stall_first_s
        )
        oldest = min(s.sent for s in live)
        return now - max(oldest, stage.progress_at) > deadline
