"""What the broker shows: STATUS and JOBS replies, the feed's stats, and the Prometheus gauges."""

from __future__ import annotations

import os
import time
from pathlib import Path

from broker import messages as M
from broker import protocol as P
from broker.metrics import STAGE_STATES
from broker.records import Request, StageRecord
from common.defaults import ACCELERATOR_PREFILL_CHUNK, CPU_PREFILL_CHUNK


def shown_state(stage: StageRecord) -> str:
    """A stage's state as STATUS and the gauges show it: a ready stage with steps in flight
    is "busy"."""
    return "busy" if stage.state == "ready" and stage.inflight else stage.state


class Views:
    """The `Broker`'s read-only views of its state, and the handlers that send them."""

    def on_status(self, ident: bytes, msg: P.Message) -> None:
        # A monitor's snapshot on connect carries the recent cluster events too.
        self.send(ident, P.encode(msg.tag, self.status(events=True)))

    def on_jobs(self, ident: bytes, msg: P.Message) -> None:
        now = time.monotonic()
        active = (
            M.Job(
                rid=r.rid,
                outcome="active",
                steps=r.steps,
                tokens=r.tokens,
                replays=r.replays,
                age_s=round(now - r.created, 3),
            )
            for r in self.requests.values()
        )
        self.send(ident, P.encode(msg.tag, M.Jobs(jobs=(*self.history, *active))))

    def prefill_chunk(self) -> int:
        """The prompt chunk advised to clients: CPU_PREFILL_CHUNK while any stage of the map
        computes on a CPU, where a chunk's compute holds the decode groups waiting behind it;
        ACCELERATOR_PREFILL_CHUNK when every stage has an accelerator, where a forward is
        bound by kernel launches and costs about the same up to a thousand tokens, so small
        chunks only multiply the waits."""
        if self.config.prefill_chunk:
            return self.config.prefill_chunk
        ranges = self.layer_map.ranges if self.layer_map else ()
        devices = [self.stages[r.name].caps.device for r in ranges if r.name in self.stages]
        if devices and all(d != "cpu" for d in devices):
            return ACCELERATOR_PREFILL_CHUNK
        return CPU_PREFILL_CHUNK

    def status(self, *, events: bool = False, active: bool = False) -> M.Status:
        """The cluster as STATUS shows it; with the latest cluster `events` (a STATUS reply)
        or the `active` requests (the feed's stats)."""
        cfg = self.checkpoint.raw_config
        now = time.monotonic()
        return M.Status(
            ready=self.ready,
            reason=None if self.ready else self.not_ready_reason,
            epoch=self.epoch,
            map=self.layer_map.to_ranges() if self.layer_map else (),
            num_layers=self.num_layers,
            stages=tuple(self.stage_status(s, now) for s in self.stages.values()),
            model=str(Path(self.checkpoint.path).resolve()),
            fingerprint=self.checkpoint.fingerprint,
            tokenizer=self.tokenizer.info() if self.tokenizer is not None else None,
            max_position_embeddings=self.max_positions,
            eos_token_id=cfg.get("eos_token_id"),
            vocab_size=cfg.get("vocab_size"),
            dtype=self.config.dtype,
            prefill_chunk=self.prefill_chunk(),
            security="curve"
            if self.gate is not None
            else ("insecure" if self.config.insecure else "loopback"),
            requests=len(self.requests),
            counters=self.metrics.totals(),
            uptime_s=round(now - self.started, 3),
            pid=os.getpid(),
            ts=time.time(),
            events=tuple(self.events)[-100:] if events else (),
            active=tuple(self.active_request(r, now) for r in list(self.requests.values())[:200])
            if active
            else (),
        )

    def active_request(self, r: Request, now: float) -> M.ActiveRequest:
        return M.ActiveRequest(
            rid=r.rid,
            tokens=r.tokens,
            steps=r.steps,
            replays=r.replays,
            age_s=round(now - r.created, 3),
            tokens_per_s=round(r.tokens / max(1e-6, now - r.first_result_at), 2)
            if r.first_result_at
            else 0.0,
        )

    def stage_status(self, stage: StageRecord, now: float) -> M.StageStatus:
        recent = [(t, c, n) for t, c, n in stage.step_times if now - t <= 10.0]
        tokens = sum(n for _, _, n in recent)
        times = sorted(c for _, c, _ in recent)
        stats = stage.stats
        return M.StageStatus(
            name=stage.name,
            host=stage.caps.host,
            pid=stage.caps.pid,
            device=stage.caps.device,
            weights=stage.caps.weights,
            state=shown_state(stage),
            start=stage.start,
            end=stage.end,
            credits=stage.credits,
            inflight=len(stage.inflight),
            queued=len(stage.queue),
            tokens_per_s=round(tokens / 10.0, 2),
            p50_s=times[len(times) // 2] if times else None,
            p99_s=times[min(len(times) - 1, int(len(times) * 0.99))] if times else None,
            batches=stats.batches if stats else None,
            batched_items=stats.batched_items if stats else None,
            kv_bytes=stats.kv_bytes if stats else None,
            kv_requests=stats.kv_requests if stats else None,
            rss_bytes=stats.rss_bytes if stats else None,
            memory_bytes=stage.caps.memory_bytes,
            runtime_bytes=stage.caps.runtime_bytes,
            runtime_file_bytes=stage.caps.runtime_file_bytes,
            runtime_peak_bytes=stage.caps.runtime_peak_bytes,
            last_seen_s=round(now - stage.last_seen, 3),
            load_s=stage.load_s,
        )

    def update_gauges(self) -> None:
        m = self.metrics
        counts = dict.fromkeys(STAGE_STATES, 0)
        for stage in self.stages.values():
            state = shown_state(stage)
            counts[state] = counts.get(state, 0) + 1
            m.queue_depth.labels(stage.name).set(len(stage.queue))
            m.inflight.labels(stage.name).set(len(stage.inflight))
            if stage.stats is not None:
                m.kv_bytes.labels(stage.name).set(stage.stats.kv_bytes)
                m.rss_bytes.labels(stage.name).set(stage.stats.rss_bytes)
        for state, n in counts.items():
            m.stages.labels(state).set(n)
        m.active_requests.set(len(self.requests))
        m.ready.set(1 if self.ready else 0)
        m.epoch.set(self.epoch)
