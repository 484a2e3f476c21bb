"""Clients: who owns each request, which new requests are admitted (or told busy), and each
request from its first step to its end."""

from __future__ import annotations

import time

import zmq

from broker import messages as M
from broker import protocol as P
from broker.protocol import Code
from broker.records import ClientRecord, QueuedStep, Request

# Request ids whose first step was refused, remembered so that the rest of the prompt (sent
# with it) is dropped instead of answered one "replay" each; the oldest are forgotten first.
REFUSED_RIDS = 4096
# Past the client's idle_timeout, the broker waits this long more before it ends an unread
# request itself: the answer's trip to the client, whose own check comes first when it runs.
IDLE_GRACE_S = 1.0


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
        owner = P.owner_of(ident)
        request = self.requests.get(rid)
        if request is None:
            if body.pos != 0:
                if self.refused.get(rid) == owner:
                    return  # the rest of a prompt whose first step was refused: it was told
                # The broker restarted or released it: the client must replay from the start.
                event = M.Event(rid=rid, event="replay", reason="request unknown to the broker")
                self.send(ident, P.encode(P.CLIENT_TAG, event))
                return
            refusal = self.admission(owner, rid)
            if refusal is not None:
                self.refused[rid] = owner
                if len(self.refused) > REFUSED_RIDS:
                    self.refused.popitem(last=False)
                return self.busy(ident, body, refusal)
            request = self.admit(ident, owner, rid, now)
        elif request.owner != owner or request.key != self.sender_key:
            raise P.ProtocolError(Code.UNAUTHORIZED, _foreign(rid))
        request.client = ident
        request.idle_s = body.idle_s
        self.answering.pop(rid, None)
        if request.replay_pending:
            if body.pos != 0:
                return  # superseded by the replay the client was told to make
            request.replay_pending = False
        if body.pos == 0:
            self.drop_held(request)  # the request starts over: its earlier steps are void
        self.hold(request, body.n)
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
        request.held[step.id] = step
        request.held_positions += body.n
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

    # --- admission and the bound of an admitted request ---------------------------------------

    def admission(self, owner: bytes, rid: str) -> str | None:
        """Why a new request may not start now (None: it may). The limits apply here only:
        a request once admitted has its steps taken until it ends."""
        if P.reserved_by_another(rid, owner):
            raise P.ProtocolError(
                Code.UNAUTHORIZED,
                f"request id {rid} is reserved for another client (ids that start with 16 hex "
                "digits and '-' belong to the client whose secret they derive from); let "
                "client.Client name your requests, or use another prefix",
            )
        if len(self.requests) >= self.config.max_requests:
            return (
                f"{len(self.requests)} requests active (limit {self.config.max_requests}, "
                "--max-requests)"
            )
        client = self.clients.get(owner)
        mine = len(client.rids) if client is not None else 0
        if mine >= self.config.max_client_requests:
            return (
                f"this client has {mine} requests active "
                f"(limit {self.config.max_client_requests}, --max-client-requests)"
            )
        queued = self.queued_steps()
        if queued >= self.config.max_queue:
            return (
                f"{queued} steps queued for the stages (limit {self.config.max_queue}, "
                "--max-queue); running requests go on, new ones wait for the queue to drain"
            )
        return None

    def queued_steps(self) -> int:
        """Steps waiting in the broker: every stage's queue and the not-ready wait."""
        return sum(len(stage.queue) for stage in self.stages.values()) + len(self.waiting)

    def admit(self, ident: bytes, owner: bytes, rid: str, now: float) -> Request:
        request = self.requests[rid] = Request(
            rid=rid, client=ident, owner=owner, key=self.sender_key, created=now
        )
        self.client_record(owner, now).rids.add(rid)
        self.refused.pop(rid, None)
        return request

    def hold(self, request: Request, n: int) -> None:
        """Count a step of `n` positions against its request's bound: the steps the broker
        holds for one request cover at most the model's context. A client replays a request
        from position 0 (`drop_held`), so an honest one never reaches the bound."""
        if request.held_positions + n <= self.max_positions:
            return
        request.held = {i: s for i, s in request.held.items() if not s.dead}
        request.held_positions = sum(s.item.n for s in request.held.values())
        if request.held_positions + n > self.max_positions:
            raise P.ProtocolError(
                Code.CONTEXT_OVERFLOW,
                f"request {request.rid} has steps over {request.held_positions} positions "
                f"waiting or running; {n} more would pass the model's context of "
                f"{self.max_positions}: wait for their answers before sending more",
            )

    def drop_held(self, request: Request) -> None:
        """The request's steps in the broker's hands are void: none of them goes on."""
        for step in request.held.values():
            step.dead = True
        request.held.clear()
        request.held_positions = 0

    def let_go(self, step: QueuedStep) -> None:
        """A step answered or failed: it no longer counts against its request's bound."""
        request = self.requests.get(step.rid)
        if request is not None and request.held.pop(step.id, None) is not None:
            request.held_positions -= step.item.n

    def busy(self, ident: bytes, about: M.Step, reason: str) -> None:
        self.metrics.busy.inc()
        retry = self.config.busy_retry_s
        error = P.error(
            Code.BUSY, f"broker busy: {reason}; retry in {retry:g} s", about, retry_after_s=retry
        )
        self.send(ident, P.encode(P.CLIENT_TAG, error))

    # --- commands -----------------------------------------------------------------------------

    def on_end(self, ident: bytes, msg: P.Message) -> None:
        request = self.requests.get(msg.body.rid)
        if request is None:
            return
        mine = request.owner == P.owner_of(ident) and request.key == self.sender_key
        if not mine and not self.sent_by_admin():
            raise P.ProtocolError(Code.UNAUTHORIZED, _foreign(request.rid))
        self.finish_request(request, outcome=msg.body.reason)

    def sent_by_admin(self) -> bool:
        """Whether the message being handled came with an admin's key (keys only)."""
        return self.gate is not None and "admin" in self.gate.keys.ring.roles(self.sender_key)

    def on_ping(self, ident: bytes, msg: P.Message) -> None:
        # Any message from a client counts as its heartbeat (client_heard).
        self.send(ident, P.encode(msg.tag, M.Pong(ready=self.ready, epoch=self.epoch)))

    # --- liveness of clients ------------------------------------------------------------------

    def client_record(self, owner: bytes, now: float) -> ClientRecord:
        client = self.clients.get(owner)
        if client is None:
            client = self.clients[owner] = ClientRecord(owner=owner, last_seen=now)
        return client

    def client_heard(self, ident: bytes, frame, now: float) -> None:
        """A message from a client socket: its client is alive, and the connection the message
        came in on is one of its open ones."""
        client = self.client_record(P.owner_of(ident), now)
        client.last_seen = now
        fd = _connection_fd(frame)
        if client.sockets.get(ident) != fd:
            # A closed connection's descriptor may be this one's now. Its closure was reported
            # before this message arrived: read it first, so that it does not close this one.
            self.read_monitor()
            client.sockets[ident] = fd
            if fd >= 0:
                self.client_fds[fd] = ident
        client.gone_since = None

    def connection_closed(self, fd: int, now: float) -> None:
        """A connection of the ROUTER closed; a client with none left open is gone."""
        ident = self.client_fds.pop(fd, None)
        if ident is None:
            return  # a stage's, or a client's we never heard from
        client = self.clients.get(P.owner_of(ident))
        if client is not None and client.sockets.get(ident) == fd:
            del client.sockets[ident]
            if not client.sockets:
                client.gone_since = now

    def purge_clients(self, now: float) -> None:
        """End the requests of clients that are gone or silent; forget idle clients."""
        for owner, client in list(self.clients.items()):
            silent = now - client.last_seen
            if client.gone_since is not None and now - client.gone_since >= (
                self.config.client_gone_after_s
            ):
                self.abandon(
                    client,
                    "client_gone",
                    "every connection of its client closed "
                    f"{now - client.gone_since:.1f} s ago and none opened again "
                    f"(--client-gone-after {self.config.client_gone_after_s:g})",
                )
            elif silent > self.config.client_timeout_s:
                self.abandon(
                    client,
                    "client_vanished",
                    f"its client sent nothing for {silent:.1f} s "
                    f"(--client-timeout {self.config.client_timeout_s:g}); a client PINGs "
                    "while it waits for a stream, so it was stopped or read nothing that long",
                )
            else:
                continue
            del self.clients[owner]

    def expire_unread(self, now: float) -> None:
        """End the requests whose answer waited longer than their client's idle_timeout for
        the next step: a stream its consumer stopped reading, in a client with no thread that
        runs meanwhile (a sync Client), frees its caches then, not at --client-timeout."""
        for rid, answered in list(self.answering.items()):
            request = self.requests.get(rid)
            if request is None or request.idle_s is None:
                continue
            waited = now - answered
            if waited > request.idle_s + IDLE_GRACE_S:
                self.log.info("request_unread", rid=rid, waited_s=round(waited, 3))
                self.end_abandoned(
                    request,
                    f"its answer was not read for {waited:.1f} s (the client's idle_timeout "
                    f"is {request.idle_s:g} s)",
                )

    def abandon(self, client: ClientRecord, event: str, why: str) -> None:
        """End every request of a client taken for gone. Should it still be there, it is told
        why in a replay EVENT, as for any request the broker does not know: it holds the
        request's tokens, so it rebuilds the request (a slow consumer is not broken)."""
        for rid in sorted(client.rids):
            request = self.requests.get(rid)
            if request is None:
                continue
            self.log.info(event, rid=rid)
            self.end_abandoned(request, why)
        client.rids.clear()

    def end_abandoned(self, request: Request, why: str) -> None:
        """End a request its client seems to have left, and tell the client why in a replay
        EVENT: should it still be there, it holds the request's tokens and rebuilds it."""
        ended = M.Event(rid=request.rid, event="replay", reason=f"ended by the broker: {why}")
        self.send(request.client, P.encode(P.CLIENT_TAG, ended))
        self.finish_request(request, outcome="abandoned")

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

    # --- the end of a request -----------------------------------------------------------------

    def finish_request(self, request: Request, outcome: str) -> None:
        self.requests.pop(request.rid, None)
        self.answering.pop(request.rid, None)
        client = self.clients.get(request.owner)
        if client is not None:
            client.rids.discard(request.rid)
        self.kill_steps(request.rid)
        request.held.clear()
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


def _foreign(rid: str) -> str:
    return (
        f"request {rid} belongs to another client: a client may step, end or read only the "
        "requests it started; use the request ids your own client made"
    )


def _connection_fd(frame) -> int:
    """The descriptor of the connection a frame came in on (libzmq's ZMQ_SRCFD, which the
    ROUTER's monitor names when that connection closes); -1 where there is none (inproc)."""
    try:
        fd = frame.get(zmq.SRCFD)
    except (AttributeError, zmq.ZMQError):
        return -1
    return fd if isinstance(fd, int) else -1
