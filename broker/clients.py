"""Clients: steps admitted, queued or refused as busy, and requests from first step to end."""

from __future__ import annotations

import time

from broker import messages as M
from broker import protocol as P
from broker.protocol import Code
from broker.records import QueuedStep, Request


class Clients:
    """The `Broker`'s handlers of client commands, and the lifetime of each request."""

    def on_steps(self, ident: bytes, msg: P.Message) -> None:
        """A bundle of steps: each is taken or refused on its own, as if sent alone."""
        for item in P.unbundle(msg):
            if isinstance(item, P.ProtocolError):
                self.refuse(ident, msg.tag, item)
                continue
            try:
                self.on_step(ident, item)
            except P.ProtocolError as e:
                self.refuse(ident, item.tag, e, about=item.body)

    def on_step(self, ident: bytes, msg: P.Message) -> None:
        body: M.Step = msg.body
        rid = body.rid
        if body.pos + body.n > self.max_positions:
            raise P.ProtocolError(
                Code.CONTEXT_OVERFLOW,
                f"positions up to {body.pos + body.n} exceed the model's context of "
                f"{self.max_positions}",
            )
        now = time.monotonic()
        request = self.requests.get(rid)
        if request is None:
            if body.pos != 0:
                # The broker restarted or released it: the client must replay from the start.
                event = M.Event(rid=rid, event="replay", reason="request unknown to the broker")
                self.send(ident, P.encode(P.CLIENT_TAG, event))
                return
            if len(self.requests) >= self.config.max_requests:
                return self.busy(
                    ident,
                    body,
                    f"{len(self.requests)} requests active (limit {self.config.max_requests})",
                )
            mine = sum(1 for r in self.requests.values() if r.client == ident)
            if mine >= self.config.max_client_requests:
                return self.busy(
                    ident,
                    body,
                    f"this client has {mine} requests active "
                    f"(limit {self.config.max_client_requests})",
                )
            request = self.requests[rid] = Request(
                rid=rid, client=ident, created=now, last_seen=now
            )
        request.client, request.last_seen = ident, now
        self.answering.pop(rid, None)
        if request.replay_pending:
            if body.pos != 0:
                return  # superseded by the replay the client was told to make
            request.replay_pending = False
        if (
            self.layer_map is not None
            and len(self.stages[self.layer_map.ranges[0].name].queue) >= self.config.max_queue
        ):
            return self.busy(ident, body, f"stage queue full ({self.config.max_queue} steps)")
        step = QueuedStep(
            id=self.next_step_id,
            rid=rid,
            seq=body.seq,
            client=ident,
            item=body.item(),
            frames=msg.frames,
            descs=msg.descs,
            created=now,
        )
        self.next_step_id += 1
        request.steps += 1
        if body.logits and self.feed is not None:
            # Token progress for monitors: the step's own id frame, forwarded, not decoded.
            last = self.layer_map.ranges[-1].name if self.layer_map else None
            self.send_feed(
                M.TokenSeen(rid=rid, pos=body.pos, n=body.n, stage=last, ts=time.time()),
                list(zip(msg.descs, msg.frames, strict=True)),
            )
        if not self.ready:
            step.enqueued = now
            self.waiting.append(step)
            return
        self.enqueue(step, now)
        self.dispatch(self.stages[self.layer_map.ranges[0].name])

    def busy(self, ident: bytes, about: M.Step, reason: str) -> None:
        self.metrics.busy.inc()
        error = P.error(
            Code.BUSY,
            f"broker busy: {reason}; retry later",
            about,
            retry_after_s=self.config.busy_retry_s,
        )
        self.send(ident, P.encode(P.CLIENT_TAG, error))

    def on_end(self, ident: bytes, msg: P.Message) -> None:
        request = self.requests.get(msg.body.rid)
        if request is not None:
            self.finish_request(request, outcome=msg.body.reason)

    def on_ping(self, ident: bytes, msg: P.Message) -> None:
        for request in self.requests.values():
            if request.client == ident:
                request.last_seen = time.monotonic()
        self.send(ident, P.encode(msg.tag, M.Pong(ready=self.ready, epoch=self.epoch)))

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
        release = P.encode(P.STAGE_TAG, M.Release(rids=(request.rid,)))
        for stage in self.stages.values():
            self.send(stage.ident, release)
        now = time.monotonic()
        job = M.Job(
            rid=request.rid,
            outcome=outcome,
            steps=request.steps,
            tokens=request.tokens,
            replays=request.replays,
            duration_s=round(now - request.created, 4),
            ttft_s=round(request.first_result_at - request.created, 4)
            if request.first_result_at
            else None,
            events=tuple(
                M.JobEvent(event=e.event, reason=e.reason, lost=e.lost, epoch=e.epoch)
                for e in request.events
            ),
            finished=time.time(),
        )
        self.history.append(job)
        self.metrics.requests.labels(outcome).inc()
        self.log.info(
            "request_finished",
            rid=request.rid,
            outcome=outcome,
            tokens=request.tokens,
            replays=request.replays,
            duration_s=job.duration_s,
        )
