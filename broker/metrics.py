"""Prometheus metrics of the broker: `layerline_` names, base units, labels bounded by stage name."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Decode steps take from a fraction of a millisecond (a tiny model) to seconds (a long prefill
# of a large one): millisecond-resolution buckets up to 10 s.
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
# Requests per FORWARD: 1 is no batching; the stages' --max-batch defaults to 32.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
STAGE_STATES = ("joining", "loading", "ready", "busy", "standby", "draining")


class Metrics:
    """All broker metrics in one private registry; `serve(port)` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.forward_seconds = Histogram(
            "layerline_stage_forward_seconds",
            "Stage compute time per FORWARD (one batch of steps), as the stage reports it",
            ["stage"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.hop_seconds = Histogram(
            "layerline_stage_hop_seconds",
            "Broker-to-broker time of one hop (queue, compute and transfer)",
            ["stage"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_items = Histogram(
            "layerline_stage_batch_items",
            "Requests carried by one FORWARD to a stage",
            ["stage"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "layerline_tokens_generated_total", "Tokens whose logits reached a client", registry=r
        )
        self.requests = Counter(
            "layerline_requests_total", "Finished requests by outcome", ["outcome"], registry=r
        )
        self.reshards = Counter(
            "layerline_reshards_total", "Layer-map changes by cause", ["cause"], registry=r
        )
        self.replays = Counter(
            "layerline_replays_total", "Replays asked of clients", ["event"], registry=r
        )
        self.queue_depth = Gauge(
            "layerline_stage_queue_depth",
            "Steps waiting in the broker for a stage",
            ["stage"],
            registry=r,
        )
        self.inflight = Gauge(
            "layerline_stage_inflight", "Steps outstanding at a stage", ["stage"], registry=r
        )
        self.forwarded = Counter(
            "layerline_forwarded_messages_total", "Tensor messages forwarded", registry=r
        )
        self.forwarded_bytes = Counter(
            "layerline_forwarded_bytes_total", "Tensor bytes forwarded", registry=r
        )
        self.heartbeat_misses = Counter(
            "layerline_heartbeat_misses_total",
            "Heartbeat periods a stage was silent",
            ["stage"],
            registry=r,
        )
        self.stages = Gauge("layerline_stages", "Stages by state", ["state"], registry=r)
        self.kv_bytes = Gauge(
            "layerline_stage_kv_cache_bytes", "KV cache held by a stage", ["stage"], registry=r
        )
        self.rss_bytes = Gauge(
            "layerline_stage_resident_memory_bytes",
            "Resident memory of a stage",
            ["stage"],
            registry=r,
        )
        self.handshake_refusals = Counter(
            "layerline_handshake_refusals_total",
            "CURVE handshakes the broker refused (an unknown key, or a wrong broker key)",
            ["reason"],
            registry=r,
        )
        self.role_refusals = Counter(
            "layerline_role_refusals_total",
            "Messages refused because the sender's key lacks the command's role",
            ["cmd"],
            registry=r,
        )
        self.malformed = Counter(
            "layerline_malformed_messages_total", "Messages refused as malformed", registry=r
        )
        self.busy = Counter(
            "layerline_busy_refusals_total", "Steps refused because a limit was reached", registry=r
        )
        self.stale = Counter(
            "layerline_stale_answers_total",
            "Stage answers for an older epoch or a dropped step, ignored",
            registry=r,
        )
        self.send_failures = Counter(
            "layerline_send_failures_total",
            "Messages the broker could not send (peer gone or its queue full)",
            registry=r,
        )
        self.tokenizer_bytes = Counter(
            "layerline_tokenizer_bytes_total",
            "Bytes of the tokenizer bundle sent to clients (TOKENIZER)",
            registry=r,
        )
        self.active_requests = Gauge(
            "layerline_active_requests", "Requests in progress", registry=r
        )
        self.ready = Gauge(
            "layerline_cluster_ready", "1 when the layer map is complete and loaded", registry=r
        )
        self.epoch = Gauge("layerline_epoch", "Current layer-map epoch", registry=r)
        self._per_stage = (
            self.forward_seconds,
            self.hop_seconds,
            self.batch_items,
            self.queue_depth,
            self.inflight,
            self.heartbeat_misses,
            self.kv_bytes,
            self.rss_bytes,
        )
        # STATUS `counters`, read from the counters above: one count, seen the same both ways.
        self._totals = {
            "forwarded": self.forwarded,
            "forwarded_bytes": self.forwarded_bytes,
            "malformed": self.malformed,
            "stale": self.stale,
            "send_failures": self.send_failures,
            "reshards": self.reshards,
            "busy": self.busy,
            "handshake_refusals": self.handshake_refusals,
            "role_refusals": self.role_refusals,
            "tokenizer_bytes": self.tokenizer_bytes,
        }

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def totals(self) -> dict[str, int]:
        """Totals since the broker started, as STATUS shows them (a labelled counter summed)."""
        return {
            key: int(
                sum(
                    sample.value
                    for family in counter.collect()
                    for sample in family.samples
                    if sample.name.endswith("_total")
                )
            )
            for key, counter in self._totals.items()
        }

    def forget_stage(self, name: str) -> None:
        """A departed stage's series go with it, so dashboards show no ghosts."""
        for metric in self._per_stage:
            with contextlib.suppress(KeyError):
                metric.remove(name)
