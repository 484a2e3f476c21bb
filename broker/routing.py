"""Routing of steps: queued for a stage, sent in FORWARDs, answered, passed on or delivered."""

from __future__ import annotations

import time

from broker import batching
from broker import messages as M
from broker import protocol as P
from broker.protocol import Code
from broker.records import QueuedStep, StageRecord


class Routing:
    """The `Broker`'s path of a step from stage to stage and back to its client."""

    def enqueue(self, step: QueuedStep, now: float) -> StageRecord:
        step.epoch = self.epoch
        step.enqueued = now
        step.passed = False
        stage = self.stages[self.layer_map.ranges[step.hop].name]
        stage.queue.append(step)
        return stage

    def dispatch(self, stage: StageRecord) -> None:
        """Send a stage its queued steps, batched into FORWARDs, while it has room."""
        if self.in_burst:
            self.dirty[stage.name] = stage
            return
        if self.lingering(stage):
            return
        while (
            stage.queue
            and len(stage.inflight) < stage.credits
            and stage.state in ("ready", "draining")
        ):
            cap = batching.forward_cap(stage, self.batch_cap())
            if len(stage.forwards) < self.config.stage_window:
                steps = self.next_batch(stage, cap)
            elif self.overtaking(stage):
                steps = batching.take(
                    stage.queue,
                    cap,
                    batching.scan_window(cap),
                    self.config.forward_tokens,
                    decode=True,
                )
            else:
                return
            if not steps:
                return
            now = time.monotonic()
            fid = self.next_fid
            self.next_fid += 1
            items, tensors = [], []
            for step in steps:
                step.broker_queue_s += now - step.enqueued
                step.sent = now
                stage.inflight[step.id] = step
                items.append(step.item)
                tensors.extend(zip(step.descs, step.frames, strict=True))
            stage.forwards[fid] = steps
            self.metrics.batch_items.labels(stage.name).observe(len(steps))
            forward = M.Forward(fid=fid, epoch=self.epoch, items=tuple(items))
            if not self.send(stage.ident, P.encode(P.STAGE_TAG, forward, tensors)):
                return

    # The batching policy (broker/batching.py), bound to this broker's state and config.

    def lingering(self, stage: StageRecord) -> bool:
        """Hold the first stage's next FORWARD a moment for requests about to answer."""
        if self.layer_map is None or self.layer_map.ranges[0].name != stage.name:
            return False
        due = batching.linger_deadline(
            stage, self.answering, time.monotonic(), self.config.batch_linger_s, self.batch_cap()
        )
        if due is None:
            return False
        self.linger_until = due if self.linger_until is None else min(self.linger_until, due)
        return True

    def batch_cap(self) -> int:
        """Requests per FORWARD that leave a group for every lane of the pipeline."""
        return batching.batch_cap(len(self.requests), self.lanes)

    def next_batch(self, stage: StageRecord, cap: int) -> list[QueuedStep]:
        """Take the steps of the stage's next FORWARD from its queue (`batching.next_batch`)."""
        return batching.next_batch(stage.queue, cap, self.config.forward_tokens)

    def overtaking(self, stage: StageRecord) -> bool:
        """Whether a decode FORWARD may go to the stage beyond its window."""
        return batching.overtaking(stage.forwards.values())

    # Answers of the stages.

    def on_result(self, ident: bytes, msg: P.Message) -> None:
        stage = self.stage_of(ident)
        body: M.ForwardResult = msg.body
        steps = self.take_forward(stage, body.fid)
        now = time.monotonic()
        if steps is None or body.epoch != self.epoch:
            self.metrics.stale.inc()
            self.dispatch(stage)
            return
        refused = _refusals(body.refused, len(steps))
        if refused is None or len(msg.frames) != len(steps) - len(refused):
            self.log.warning("bad_result", stage=stage.name, frames=len(msg.frames))
            for step in steps:
                if not step.dead and step.epoch == self.epoch:
                    self.fail_step(
                        step,
                        Code.INTERNAL,
                        f"stage {stage.name} returned {len(msg.frames)} outputs for "
                        f"{len(steps)} items",
                    )
            self.dispatch(stage)
            return
        compute, queued = body.compute_s, body.queue_s
        computed = [s for i, s in enumerate(steps) if i not in refused]
        tokens = sum(s.item.n for s in computed)
        self.metrics.forward_seconds.labels(stage.name).observe(compute)
        self.metrics.hop_seconds.labels(stage.name).observe(now - steps[0].sent)
        if tokens:
            stage.tokens += tokens
            stage.step_times.append((now, compute, tokens))
            per_token = compute / tokens
            stage.per_token_s = (
                per_token if stage.per_token_s == 0 else 0.9 * stage.per_token_s + 0.1 * per_token
            )
        stage.progress_at = now
        outputs = iter(zip(msg.frames, msg.descs, strict=True))
        following = None
        answers: dict[bytes, list[QueuedStep]] = {}
        for i, step in enumerate(steps):
            live = not step.dead and step.epoch == self.epoch
            if i in refused:
                if live:
                    self.step_refused(stage, step, refused[i].code, refused[i].message)
                continue
            frame, desc = next(outputs)
            if not live:
                self.metrics.stale.inc()
                continue
            step.trace.append(
                M.Hop(
                    stage=stage.name,
                    start=stage.start,
                    end=stage.end,
                    compute_s=compute,
                    queue_s=queued,
                    transfer_s=max(0.0, now - step.sent - compute - queued),
                )
            )
            step.frames, step.descs = [frame], [desc]
            step.hop += 1
            self.metrics.forwarded.inc()
            self.metrics.forwarded_bytes.inc(desc.nbytes)
            if step.hop < len(self.layer_map.ranges):
                following = self.enqueue(step, now)
            else:
                answers.setdefault(step.client, []).append(step)
        for client, done in answers.items():
            self.deliver(client, done, now)
        if following is not None:
            self.dispatch(following)
        self.dispatch(stage)

    def on_error(self, ident: bytes, msg: P.Message) -> None:
        """A FORWARD refused or failed as a whole: every step in it shares the outcome."""
        stage = self.stage_of(ident)
        error: M.Error = msg.body
        steps = self.take_forward(stage, error.fid)
        if steps is None:
            self.log.warning(
                "stage_error", stage=stage.name, code=str(error.code), reason=error.message
            )
            if error.fid is None and error.epoch == self.epoch and not self.ready:
                # A load of this epoch's layers failed: the map cannot become ready, and the
                # reason a client is told says why, not "waiting for stages to load".
                self.not_ready_reason = (
                    f"stage {stage.name} could not load its layers: {error.message}"
                )
                self.publish("not_ready", reason=self.not_ready_reason)
            return
        if error.epoch == self.epoch:
            for step in steps:
                if not step.dead and step.epoch == self.epoch:
                    self.step_refused(stage, step, error.code, error.message)
        self.dispatch(stage)

    def take_forward(self, stage: StageRecord, fid: int | None) -> list[QueuedStep] | None:
        """The steps of an answered FORWARD, no longer outstanding at the stage."""
        steps = stage.forwards.pop(fid, None)
        for step in steps or ():
            stage.inflight.pop(step.id, None)
        return steps

    def step_refused(self, stage: StageRecord, step: QueuedStep, code: Code, message: str) -> None:
        """A lost or stale cache asks for a replay; any other refusal fails the step."""
        if code in P.REPLAY_CODES:
            self.replay(step.rid, event="replay", reason=f"stage {stage.name}: {message}")
        else:
            self.fail_step(step, code, f"stage {stage.name}: {message}")

    def fail_step(self, step: QueuedStep, code: Code, message: str) -> None:
        self.let_go(step)
        step.dead = True
        error = P.error(code, message, rid=step.rid, seq=step.seq)
        self.send(step.client, P.encode(P.CLIENT_TAG, error))

    def deliver(self, client: bytes, steps: list[QueuedStep], now: float) -> None:
        """Send one client the logits of its finished steps: one RESULTS for a whole group, so
        the client answers them together and their next steps arrive together."""
        entries = []
        for step in steps:
            self.let_go(step)
            request = self.requests.get(step.rid)
            if request is not None and step.item.logits:
                self.answering[step.rid] = now
                request.tokens += 1
                self.metrics.tokens.inc()
                if request.first_result_at is None:
                    request.first_result_at = now
            result = M.StepResult(
                rid=step.rid,
                seq=step.seq,
                pos=step.item.pos,
                n=step.item.n,
                epoch=step.epoch,
                trace=tuple(step.trace),
                broker_queue_s=step.broker_queue_s,
            )
            entries.append((result, (step.descs[0], step.frames[0])))
        for frames in P.encode_bundled(P.CLIENT_TAG, entries):
            self.send(client, frames)


def _refusals(refused: tuple[M.Refusal, ...], items: int) -> dict[int, M.Refusal] | None:
    """A RESULT's refusals by item index, or None when one names no item of the FORWARD or
    an item twice."""
    out: dict[int, M.Refusal] = {}
    for refusal in refused:
        if refusal.i >= items or refusal.i in out:
            return None
        out[refusal.i] = refusal
    return out
