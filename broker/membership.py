"""Membership: stages join, load their layers, beat, leave or are drained, and fall silent."""

from __future__ import annotations

import time

from broker import protocol as P
from broker.protocol import Cmd, Code
from broker.records import StageRecord


class Membership:
    """The `Broker`'s handlers of what stages say about themselves, and its liveness checks."""

    def stage_of(self, ident: bytes) -> StageRecord | None:
        name = self.by_ident.get(ident)
        return self.stages.get(name) if name is not None else None

    def on_ready(self, ident: bytes, msg: P.Message) -> None:
        h = msg.header
        name = h["name"]
        if h["fingerprint"] != self.checkpoint.fingerprint:
            self.log.warning("stage_refused", stage=name, reason="fingerprint")
            return self.refuse_stage(
                ident,
                f"stage {name} sees checkpoint {h['fingerprint']} but the broker serves "
                f"{self.checkpoint.fingerprint} ({self.checkpoint.path}); point --model at the same checkpoint",
            )
        dtype = h["caps"].get("dtype", "float32")
        if dtype != self.config.dtype:
            return self.refuse_stage(
                ident,
                f"stage {name} runs {dtype} but the cluster runs {self.config.dtype}; "
                f"start it with --dtype {self.config.dtype}",
            )
        if not 1 <= h["credits"] <= 1024:
            raise P.ProtocolError(Code.BAD_REQUEST, "credits must be in [1, 1024]")
        max_batch = h["caps"].get("max_batch", 1)
        if not isinstance(max_batch, int) or not 1 <= max_batch <= 1024:
            raise P.ProtocolError(Code.BAD_REQUEST, "caps.max_batch must be in [1, 1024]")
        now = time.monotonic()
        old = self.stages.get(name)
        held = h.get("held")
        stage = StageRecord(
            name=name,
            ident=ident,
            caps=h["caps"],
            credits=h["credits"],
            max_batch=max_batch,
            joined=now,
            held=tuple(held) if isinstance(held, list) and len(held) == 2 else None,
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
            host=stage.caps.get("host"),
            device=stage.caps.get("device"),
            memory_mb=int(stage.caps.get("memory_bytes", 0)) >> 20,
            credits=stage.credits,
        )
        self.publish("join", stage=name, host=stage.caps.get("host"))
        # Answered at once: a stage that hears nothing for its dead-after time reconnects under
        # a new identity, and the map may form only later (expect_stages, settle_s).
        self.send(ident, P.encode(P.STAGE_TAG, Cmd.HEARTBEAT, {"epoch": self.epoch}))
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
        self.send(
            stage.ident,
            P.encode(
                P.STAGE_TAG,
                Cmd.ASSIGN,
                {
                    "epoch": self.epoch,
                    "start": stage.start,
                    "end": stage.end,
                    "num_layers": self.num_layers,
                    "dtype": self.config.dtype,
                    "map": self.layer_map.to_json(),
                },
            ),
        )
        for rid in lost:
            self.replay(rid, event="replay", reason=f"stage {stage.name} restarted")

    def refuse_stage(self, ident: bytes, reason: str) -> None:
        """A stage that must not join this cluster: it exits with the reason."""
        self.send(ident, P.encode(P.STAGE_TAG, Cmd.ERROR, P.error_header(Code.FINGERPRINT, reason)))

    def on_loaded(self, ident: bytes, msg: P.Message) -> None:
        stage = self.stage_of(ident)
        h = msg.header
        if h["epoch"] != self.epoch:
            self.counters.stale += 1
            return
        stage.loaded_epoch = h["epoch"]
        if stage.state in ("loading", "joining"):
            stage.state = "ready" if stage.end > stage.start else "standby"
        self.log.info(
            "stage_loaded",
            stage=stage.name,
            start=h["start"],
            end=h["end"],
            epoch=h["epoch"],
            load_s=h.get("load_s"),
            weight_mb=int(h.get("weight_bytes", 0)) >> 20,
        )
        if self.ready:
            self.on_map_ready()

    def on_heartbeat(self, ident: bytes, msg: P.Message) -> None:
        stage = self.stage_of(ident)
        progress = msg.header.get("progress")
        if isinstance(progress, int) and progress != stage.progress:
            stage.progress = progress
            stage.progress_at = time.monotonic()
        stage.stats = msg.header

    def on_leaving(self, ident: bytes, msg: P.Message) -> None:
        self.drain_stage(self.stage_of(ident), cause="leave")

    def on_drain(self, ident: bytes, msg: P.Message) -> None:
        h = msg.header
        if self.config.admin_token is None or h["token"] != self.config.admin_token:
            raise P.ProtocolError(
                Code.UNAUTHORIZED, "DRAIN needs the broker's admin token (--admin-token)"
            )
        stage = self.stages.get(h["stage"])
        if stage is None:
            raise P.ProtocolError(Code.BAD_REQUEST, f"no stage named {h['stage']!r}")
        self.drain_stage(stage, cause="drain")
        self.send(ident, P.encode(msg.tag, Cmd.PONG, {"ready": self.ready, "epoch": self.epoch}))

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

    def purge_stages(self, now: float) -> None:
        for stage in list(self.stages.values()):
            if now - stage.last_seen > self.config.dead_after_s:
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
        tokens = sum(s.item["n"] for s in live)
        expected = stage.per_token_s * tokens
        deadline = (
            max(self.config.stall_floor_s, self.config.stall_factor * expected)
            if stage.per_token_s > 0
            else self.config.stall_first_s
        )
        oldest = min(s.sent for s in live)
        return now - max(oldest, stage.progress_at) > deadline
