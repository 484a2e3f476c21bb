"""What the broker shows: STATUS and JOBS replies, the feed's stats, and the Prometheus gauges."""

from __future__ import annotations

import os
import time
from pathlib import Path

from broker import protocol as P
from broker.metrics import STAGE_STATES
from broker.protocol import Cmd
from broker.records import StageRecord

# Prompt chunks advised to clients (STATUS `prefill_chunk`). Measured: on a 2-core CPU
# (`small`, 3 stages) 128-token chunks gave a 1024-token prompt its first token sooner than 64
# or 32 and kept 8 other streams' p99 within 2.4x; on an H100 (`tinyllama`, bf16) a 128-token
# chunk costs about what a decode step does, and a 1024-token prompt in 8 chunks took 221 ms.
CPU_PREFILL_CHUNK = 128
ACCELERATOR_PREFILL_CHUNK = 1024


class Views:
    """The `Broker`'s read-only views of its state, and the handlers that send them."""

    def on_status(self, ident: bytes, msg: P.Message) -> None:
        # A monitor's snapshot on connect carries the recent cluster events too.
        self.send(
            ident,
            P.encode(msg.tag, Cmd.STATUS, {**self.status(), "events": list(self.events)[-100:]}),
        )

    def on_jobs(self, ident: bytes, msg: P.Message) -> None:
        active = [
            {
                "rid": r.rid,
                "outcome": "active",
                "steps": r.steps,
                "tokens": r.tokens,
                "replays": r.replays,
                "age_s": round(time.monotonic() - r.created, 3),
            }
            for r in self.requests.values()
        ]
        self.send(ident, P.encode(msg.tag, Cmd.JOBS, {"jobs": list(self.history) + active}))

    def prefill_chunk(self) -> int:
        """The prompt chunk advised to clients: CPU_PREFILL_CHUNK while any stage of the map
        computes on a CPU, where a chunk's compute holds the decode groups waiting behind it;
        ACCELERATOR_PREFILL_CHUNK when every stage has an accelerator, where a forward is
        bound by kernel launches and costs about the same up to a thousand tokens, so small
        chunks only multiply the waits."""
        if self.config.prefill_chunk:
            return self.config.prefill_chunk
        ranges = self.layer_map.ranges if self.layer_map else ()
        devices = [self.stages[r.name].caps.get("device") for r in ranges if r.name in self.stages]
        if devices and all(isinstance(d, str) and d != "cpu" for d in devices):
            return ACCELERATOR_PREFILL_CHUNK
        return CPU_PREFILL_CHUNK

    def status(self, requests: bool = False) -> dict:
        cfg = self.checkpoint.raw_config
        view = {
            "ready": self.ready,
            "reason": None if self.ready else self.not_ready_reason,
            "epoch": self.epoch,
            "map": self.layer_map.to_json() if self.layer_map else [],
            "num_layers": self.num_layers,
            "stages": [self.stage_view(s) for s in self.stages.values()],
            "model": str(Path(self.checkpoint.path).resolve()),
            "fingerprint": self.checkpoint.fingerprint,
            "max_position_embeddings": self.max_positions,
            "eos_token_id": cfg.get("eos_token_id"),
            "vocab_size": cfg.get("vocab_size"),
            "dtype": self.config.dtype,
            "prefill_chunk": self.prefill_chunk(),
            "requests": len(self.requests),
            "counters": self.counters.__dict__,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "pid": os.getpid(),
            "ts": time.time(),
        }
        if requests:
            now = time.monotonic()
            view["active"] = [
                {
                    "rid": r.rid,
                    "tokens": r.tokens,
                    "steps": r.steps,
                    "replays": r.replays,
                    "age_s": round(now - r.created, 3),
                    "tokens_per_s": round(r.tokens / max(1e-6, now - (r.first_result_at or now)), 2)
                    if r.first_result_at
                    else 0.0,
                }
                for r in list(self.requests.values())[:200]
            ]
        return view

    def stage_view(self, stage: StageRecord) -> dict:
        now = time.monotonic()
        recent = [(t, c, n) for t, c, n in stage.step_times if now - t <= 10.0]
        tokens = sum(n for _, _, n in recent)
        times = sorted(c for _, c, _ in recent)
        return {
            "name": stage.name,
            "host": stage.caps.get("host"),
            "pid": stage.caps.get("pid"),
            "device": stage.caps.get("device"),
            "state": "busy" if stage.state == "ready" and stage.inflight else stage.state,
            "start": stage.start,
            "end": stage.end,
            "credits": stage.credits,
            "inflight": len(stage.inflight),
            "queued": len(stage.queue),
            "tokens_per_s": round(tokens / 10.0, 2),
            "p50_s": times[len(times) // 2] if times else None,
            "p99_s": times[min(len(times) - 1, int(len(times) * 0.99))] if times else None,
            "batches": stage.stats.get("batches"),
            "batched_items": stage.stats.get("batched_items"),
            "kv_bytes": stage.stats.get("kv_bytes"),
            "kv_requests": stage.stats.get("kv_requests"),
            "rss_bytes": stage.stats.get("rss_bytes"),
            "memory_bytes": stage.caps.get("memory_bytes"),
            "last_seen_s": round(now - stage.last_seen, 3),
        }

    def update_gauges(self) -> None:
        m = self.metrics
        counts = dict.fromkeys(STAGE_STATES, 0)
        for stage in self.stages.values():
            state = "busy" if stage.state == "ready" and stage.inflight else stage.state
            counts[state] = counts.get(state, 0) + 1
            m.queue_depth.labels(stage.name).set(len(stage.queue))
            m.inflight.labels(stage.name).set(len(stage.inflight))
            for gauge, key in ((m.kv_bytes, "kv_bytes"), (m.rss_bytes, "rss_bytes")):
                if isinstance(stage.stats.get(key), int):
                    gauge.labels(stage.name).set(stage.stats[key])
        for state, n in counts.items():
            m.stages.labels(state).set(n)
        m.active_requests.set(len(self.requests))
        m.ready.set(1 if self.ready else 0)
        m.epoch.set(self.epoch)
