"""Clients: steps admitted, queued or refused as busy, and requests from first step to end."""

from __future__ import annotations

import re
import time

from broker import protocol as P
from broker.protocol import Cmd, Code
from broker.records import Request, Step

RID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class Clients:
    """The `Broker`'s handlers of client commands, and the lifetime of each request."""

    def on_steps(self, ident: bytes, msg: P.Message) -> None:
        """A bundle of steps: each is taken or refused on its own, as if sent alone."""
        for item in P.unbundle(msg):
            try:
                P.check_header(item.tag, item.cmd, item.header)
                self.on_step(ident, item)
            except P.ProtocolError as e:
                self.refuse(ident, item, e)

    def on_step(self, ident: bytes, msg: P.Message) -> None:
        h = msg.header
        rid, pos, n = h["rid"], h["pos"], h["n"]
        ids = echo_ids(h)
        if not RID_PATTERN.match(rid):
            raise P.ProtocolError(
                Code.BAD_REQUEST, "rid must be 1-64 characters of [A-Za-z0-9_.:-]"
            )
        if pos < 0 or n < 1:
            raise P.ProtocolError(
                Code.BAD_REQUEST, f"need pos >= 0 and n >= 1, got pos={pos} n={n}"
            )
        if len(msg.descs) != 1 or msg.descs[0].dtype != "int64" or msg.descs[0].shape != (1, n):
            raise P.ProtocolError(
                Code.BAD_REQUEST, f"STEP carries one int64 tensor of shape [1, {n}]"
            )
        if pos + n > self.max_positions:
            raise P.ProtocolError(
                Code.CONTEXT_OVERFLOW,
                f"positions up to {pos + n} exceed the model's context of {self.max_positions}",
            )
        now = time.monotonic()
        request = self.requests.get(rid)
        if request is None:
            if pos != 0:
                # The broker restarted or released it: the client must replay from the start.
                self.send(
                    ident,
                    P.encode(
                        P.CLIENT_TAG,
                        Cmd.EVENT,
                        {"rid": rid, "event": "replay", "reason": "request unknown to the broker"},
                    ),
                )
                return
            if len(self.requests) >= self.config.max_requests:
                return self.busy(
                    ident,
                    ids,
                    f"{len(self.requests)} requests active (limit {self.config.max_requests})",
                )
            mine = sum(1 for r in self.requests.values() if r.client == ident)
            if mine >= self.config.max_client_requests:
                return self.busy(
                    ident,
                    ids,
                    f"this client has {mine} requests active "
                    f"(limit {self.config.max_client_requests})",
                )
            request = self.requests[rid] = Request(
                rid=rid, client=ident, created=now, last_seen=now
            )
        request.client, request.last_seen = ident, now
        self.answering.pop(rid, None)
        if request.replay_pending:
            if pos != 0:
                return  # superseded by the replay the client was told to make
            request.replay_pending = False
        if (
            self.layer_map is not None
            and len(self.stages[self.layer_map.ranges[0].name].queue) >= self.config.max_queue
        ):
            return self.busy(ident, ids, f"stage queue full ({self.config.max_queue} steps)")
        item = {
            "rid": rid,
            "pos": pos,
            "n": n,
            "prev": h["prev"],
            "hash": h["hash"],
            "logits": bool(h.get("logits", True)),
        }
        step = Step(
            id=self.next_step_id,
            rid=rid,
            seq=h["seq"],
            client=ident,
            item=item,
            frames=msg.frames,
            descs=msg.descs,
            want_logits=item["logits"],
            created=now,
        )
        self.next_step_id += 1
        request.steps += 1
        if item["logits"] and self.feed is not None:
            # Token progress for monitors: the step's own id frame, forwarded, not decoded.
            last = self.layer_map.ranges[-1].name if self.layer_map else None
            self.send_feed(
                P.FEED_TOKEN,
                {"rid": rid, "pos": pos, "n": n, "stage": last, "ts": time.time()},
                list(zip(msg.descs, msg.frames, strict=True)),
            )
        if not self.ready:
            step.enqueued = now
            self.waiting.append(step)
            return
        self.enqueue(step, now)
        self.dispatch(self.stages[self.layer_map.ranges[0].name])

    def busy(self, ident: bytes, ids: dict, reason: str) -> None:
        self.counters.busy += 1
        self.metrics.busy.inc()
        self.send(
            ident,
            P.encode(
                P.CLIENT_TAG,
                Cmd.ERROR,
                P.error_header(
                    Code.BUSY,
                    f"broker busy: {reason}; retry later",
                    retry_after_s=self.config.busy_retry_s,
                    **ids,
                ),
            ),
        )

    def on_end(self, ident: bytes, msg: P.Message) -> None:
        request = self.requests.get(msg.header["rid"])
        if request is not None:
            self.finish_request(request, outcome=str(msg.header.get("reason", "done")))

    def on_ping(self, ident: bytes, msg: P.Message) -> None:
        for request in self.requests.values():
            if request.client == ident:
                request.last_seen = time.monotonic()
        self.send(ident, P.encode(msg.tag, Cmd.PONG, {"ready": self.ready, "epoch": self.epoch}))

    def expire_waiting(self, now: float) -> None:
        while self.waiting and now - self.waiting[0].enqueued > self.config.ready_wait_s:
            step = self.waiting.popleft()
            if not step.dead:
                self.fail_step(
                    step,
                    Code.NOT_READY,
                    f"cluster not ready after {self.config.ready_wait_s:.0f} s: "
                    f"{self.not_ready_reason}",
                )

    def purge_clients(self, now: float) -> None:
        for request in list(self.requests.values()):
            seen = max(request.last_seen, self.clients_seen.get(request.client, 0.0))
            if now - seen > self.config.client_timeout_s:
                self.log.info("client_vanished", rid=request.rid, silent_s=round(now - seen, 1))
                self.finish_request(request, outcome="abandoned")
        for ident, seen in list(self.clients_seen.items()):
            if now - seen > self.config.client_timeout_s:
                del self.clients_seen[ident]

    def finish_request(self, request: Request, outcome: str) -> None:
        self.requests.pop(request.rid, None)
        self.answering.pop(request.rid, None)
        self.kill_steps(request.rid)
        release = P.encode(P.STAGE_TAG, Cmd.RELEASE, {"rids": [request.rid]})
        for stage in self.stages.values():
            self.send(stage.ident, release)
        now = time.monotonic()
        record = {
            "rid": request.rid,
            "outcome": outcome,
            "steps": request.steps,
            "tokens": request.tokens,
            "replays": request.replays,
            "duration_s": round(now - request.created, 4),
            "ttft_s": round(request.first_result_at - request.created, 4)
            if request.first_result_at
            else None,
            "events": [
                {k: v for k, v in e.items() if k in ("event", "reason", "lost", "epoch")}
                for e in request.events
            ],
            "finished": time.time(),
        }
        self.history.append(record)
        self.metrics.requests.labels(outcome).inc()
        self.log.info(
            "request_finished",
            rid=request.rid,
            outcome=outcome,
            tokens=request.tokens,
            replays=request.replays,
            duration_s=record["duration_s"],
        )


def echo_ids(header: dict) -> dict:
    """The ids of a message that an ERROR answering it carries back."""
    return {k: header[k] for k in ("rid", "seq", "step") if isinstance(header.get(k), str | int)}
