"""The Textual monitor: a fake feed and a frozen clock drive the app; one test uses a real cluster.

Snapshots live in tests/__snapshots__/test_tui/; after an intended UI change, regenerate them with
`pytest tests/test_tui.py --snapshot-update` and look at the SVGs. `docs/tui.svg` is the wide
snapshot, copied by `python -m tui.render_readme_picture`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time

import msgspec
import pytest
import torch
import zmq

from broker import messages as M
from broker import protocol as P
from broker.protocol import Cmd
from client import Client
from tests.cluster import Cluster
from tui.app import HelpScreen, LayerlineApp
from tui.format import format_map
from tui.reader import FeedReader
from tui.records import LinkState, Notice, Snapshot, Tokens, snapshot_of
from tui.state import ClusterState
from tui.tables import RequestTable, StageTable
from tui.widgets import EventLog, MapBar, RequestText, StatusLine, ThroughputPanel

NOW = 1_700_000_000.0  # the frozen clock: 2023-11-14 22:13:20 UTC
EPOCH = 1_699_999_990_000
# What a broker bound off loopback without keys (--insecure) answers to DRAIN.
DRAIN_REFUSAL = (
    "DRAIN needs an admin key: start the broker with --keys (this broker runs --insecure)"
)


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Event times are shown in local time; pin it so snapshots do not depend on the machine."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


class FakeFeed:
    """The FeedReader interface, driven by the test."""

    def __init__(self) -> None:
        self.post = None
        self.drained: list[str] = []
        self.stopped = False

    def start(self, post) -> None:
        self.post = post

    def stop(self) -> None:
        self.stopped = True

    def drain(self, stage: str) -> None:
        self.drained.append(stage)

    def push(self, *updates) -> None:
        for update in updates:
            self.post(update)


# --- broker-shaped data -------------------------------------------------------------------------


def stage(
    name, start, end, *, tps=0.0, state="ready", host="node-a", p50=0.0031, p99=0.0094, kv=0, n_kv=0
):
    return {
        "name": name, "host": host, "device": "cpu", "state": state, "start": start, "end": end,
        "credits": 4, "inflight": 1 if state == "busy" else 0, "queued": 0, "tokens_per_s": tps,
        "p50_s": p50, "p99_s": p99, "kv_bytes": kv, "kv_requests": n_kv, "rss_bytes": 412 << 20,
        "memory_bytes": 8 << 30, "last_seen_s": 0.1,
    }  # fmt: skip


def stats(stages, *, epoch=EPOCH, active=(), ready=True, reason=None, periodic=True, layers=6):
    ranges = [
        {"stage": s["name"], "start": s["start"], "end": s["end"]}
        for s in stages
        if s["end"] > s["start"]
    ]
    header = {
        "ready": ready, "reason": reason, "epoch": epoch, "map": ranges if ready else [],
        "num_layers": layers, "stages": stages, "model": "/models/demo-model", "ts": NOW,
        "active": list(active),
    }  # fmt: skip
    return parse_snapshot(header, periodic=periodic)


def parse_snapshot(status, periodic: bool) -> Snapshot:
    """A snapshot of a STATUS body given as JSON-shaped data, validated as the wire's decoder does."""
    return snapshot_of(msgspec.convert(status, M.Status), periodic=periodic)


def request(rid, tokens, tps=41.5, replays=0, age=3.2):
    return {
        "rid": rid,
        "tokens": tokens,
        "steps": tokens + 1,
        "replays": replays,
        "age_s": age,
        "tokens_per_s": tps,
    }


def ranges(*triples):
    return [{"stage": n, "start": a, "end": b} for n, a, b in triples]


def event(kind, ts, **data):
    return msgspec.convert({"ts": ts, "kind": kind, **data}, M.ClusterEvent)


RESHARD = event(
    "reshard", NOW - 5, epoch=EPOCH + 1, cause="silent", lost="s1",
    old_map=ranges(("s0", 0, 2), ("s1", 2, 4), ("s2", 4, 6)),
    new_map=ranges(("s0", 0, 3), ("s2", 3, 6)),
)  # fmt: skip


def three_stages(tps=(30.0, 31.0, 29.5), epoch=EPOCH, **kw):
    return stats([stage("s0", 0, 2, tps=tps[0]), stage("s1", 2, 4, tps=tps[1]), stage("s2", 4, 6, tps=tps[2])],
                 epoch=epoch, **kw)  # fmt: skip


def tokens(rid, pos, stage_name, *pieces, ids=None):
    ids = ids or tuple(100 + pos + i for i in range(len(pieces)))
    return Tokens(rid, pos, stage_name, NOW, tuple(ids), tuple(pieces))


# --- helpers ------------------------------------------------------------------------------------


async def settle(pilot, rounds: int = 3) -> None:
    """Let the app fold its inbox and the panels handle the views it posted."""
    app = pilot.app
    for _ in range(200):
        await pilot.pause()
        if not app.inbox and not app.wake_posted:
            break
    for _ in range(rounds):
        await pilot.pause()


async def wait_until(pilot, predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"{what}: not seen within {timeout_s} s")


def log_text(app) -> str:
    """The event log's lines as one string, wrapped lines joined back with single spaces."""
    return " ".join(" ".join(strip.text.split()) for strip in app.query_one(EventLog).lines)


def rendered(widget) -> str:
    return str(widget.render())


def make_app(feed=None, **kw) -> tuple[LayerlineApp, FakeFeed]:
    feed = feed or FakeFeed()
    return LayerlineApp(
        feed, clock=lambda: NOW, apply_interval_s=kw.pop("apply_interval_s", 0.0), **kw
    ), feed


# --- behaviour ----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_stage_rows_appear_and_update_in_place():
    app, feed = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        # The broker lists stages in join order; rows follow the pipeline.
        feed.push(
            stats([stage("s1", 2, 4, tps=31.0), stage("s2", 4, 6), stage("s0", 0, 2, tps=30.0)])
        )
        await settle(pilot)
        table = app.query_one(StageTable)
        keys = [row.key.value for row in table.ordered_rows]
        assert keys == ["s0", "s1", "s2"]
        assert str(table.get_cell("s1", "tps")) == "31.0"
        assert str(table.get_cell("s1", "layers")) == "[2,4)"

        added = []
        table.add_row = lambda *a, **k: added.append(a)  # nothing may be re-added from now on
        feed.push(stats([stage("s0", 0, 2, tps=55.0), stage("s1", 2, 4, tps=12.5, state="busy"),
                         stage("s2", 4, 6, tps=29.5)]))  # fmt: skip
        await settle(pilot)
        assert [row.key.value for row in table.ordered_rows] == keys
        assert added == []
        assert str(table.get_cell("s0", "tps")) == "55.0"
        assert str(table.get_cell("s1", "tps")) == "12.5"
        assert str(table.get_cell("s1", "state")) == "busy"
        assert str(table.get_cell("s0", "p50")) == "3.10"
        assert str(table.get_cell("s0", "memory")) == "412M/8.0G"
        # A stage that left goes; the others keep their rows.
        feed.push(stats([stage("s0", 0, 3), stage("s2", 3, 6)]))
        await settle(pilot)
        assert [row.key.value for row in table.ordered_rows] == ["s0", "s2"]
        spark = app.query_one(ThroughputPanel).rows["s0"].spark
        assert list(spark.data) == [30.0, 55.0, 0.0]


@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_reshard_changes_the_map_and_logs_old_to_new():
    app, feed = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        feed.push(three_stages())
        await settle(pilot)
        bar = app.query_one(MapBar)
        before = rendered(bar)
        assert "s1 [2,4)" in before
        feed.push(RESHARD)
        await settle(pilot)
        after = rendered(bar)
        assert after != before
        assert "s1" not in after and "s0 [0,3)" in after and "s2 [3,6)" in after
        assert bar.border_title == f"layer map · epoch {EPOCH + 1}"
        text = log_text(app)
        assert "reshard s0[0,2) s1[2,4) s2[4,6) → s0[0,3) s2[3,6) lost=s1 cause=silent" in text
        # The next stats (a newer epoch) keep the map the event announced.
        feed.push(stats([stage("s0", 0, 3), stage("s2", 3, 6)], epoch=EPOCH + 1))
        await settle(pilot)
        assert rendered(bar) == after


@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_requests_and_the_selected_requests_streamed_text():
    app, feed = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        feed.push(three_stages(active=[request("a1", 3), request("b2", 1)]))
        feed.push(
            tokens("a1", 0, "s2", "Once", " upon"),
            tokens("a1", 2, "s2", " a"),
            tokens("a1", 3, "s2", " time"),
        )
        feed.push(tokens("b2", 0, "s2", "Hello"), tokens("b2", 1, "s2", " world"))
        await settle(pilot)
        table = app.query_one(RequestTable)
        assert [row.key.value for row in table.ordered_rows] == ["a1", "b2"]
        assert str(table.get_cell("a1", "tokens")) == "3"
        assert app.selected == "a1"
        body = app.query_one(RequestText).body
        assert str(body.content) == "Once upon a time"
        # Tokens are coloured by stage: the prompt dim, the rest in s2's colour.
        spans = {str(body.content)[s.start : s.end]: str(s.style) for s in body.content.spans}
        assert spans["Once upon"] == "dim" and spans[" a time"] == "#87d75f"

        table.focus()
        await pilot.press("down")
        await settle(pilot)
        assert app.selected == "b2"
        assert str(body.content) == "Hello world"
        await pilot.press("up")
        await settle(pilot)
        assert app.selected == "a1"
        # A replay re-sends from the prompt: the text is rebuilt, not doubled.
        feed.push(tokens("a1", 0, "s0", "Once", " upon"), tokens("a1", 2, "s0", " a"))
        await settle(pilot)
        assert str(body.content) == "Once upon a"
        # Finished requests stay listed with their outcome from JOBS; away from the table, the
        # selection moves on from a finished request to the newest active one.
        feed.push(
            three_stages(active=[request("b2", 2)]),
            M.Jobs(jobs=(M.Job(rid="a1", outcome="done", tokens=4),)),
        )
        await settle(pilot)
        assert str(table.get_cell("a1", "status")) == "done"
        assert app.selected == "a1"
        app.query_one(StageTable).focus()
        feed.push(three_stages(active=[request("b2", 3)]))
        await settle(pilot)
        assert app.selected == "b2"


@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_help_drain_and_quit_keys():
    app, feed = make_app()
    async with app.run_test(size=(100, 30)) as pilot:
        feed.push(three_stages())
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        assert "drain the selected stage" in str(app.screen.query_one("#help").content)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)

        # Compact (under 120 columns): r swaps the stage table and log for throughput and requests.
        side = app.query_one("#side")
        assert not side.display
        await pilot.press("r")
        await pilot.pause()
        assert side.display and not app.query_one("#main").display
        await pilot.press("r")
        await pilot.pause()
        assert not side.display

        app.query_one(StageTable).focus()
        await pilot.press("down", "d")
        await pilot.pause()
        assert feed.drained == ["s1"]
        feed.push(Notice(f"drain s1 refused: {DRAIN_REFUSAL}", error=True))
        await settle(pilot)
        assert any("refused" in str(n.message) for n in app._notifications)

        await pilot.press("q")
        await pilot.pause()
    assert feed.stopped
    assert app.return_code == 0


@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_broker_lost_is_shown_and_clears_when_stats_resume():
    app, feed = make_app()
    async with app.run_test(size=(120, 30)) as pilot:
        feed.push(LinkState("up", NOW - 30), three_stages())
        await settle(pilot)
        status = app.query_one(StatusLine)
        assert "● ready" in rendered(status)
        feed.push(LinkState("lost", NOW - 4, "no feed from tcp://127.0.0.1:5556 for 2 s"))
        await settle(pilot)
        line = rendered(status)
        assert "broker lost" in line and "reconnecting… 4 s" in line
        assert app.screen.has_class("-stale")  # the last known state stays, dimmed
        feed.push(
            LinkState("up", NOW),
            three_stages(ready=False, reason="waiting for stages to load their layers"),
        )
        await settle(pilot)
        line = rendered(status)
        assert "broker lost" not in line and not app.screen.has_class("-stale")
        assert "not ready" in line and "waiting for stages to load their layers" in line


@pytest.mark.timeout(30)
@pytest.mark.asyncio
async def test_fifty_stages_and_five_thousand_events_stay_responsive():
    app, feed = make_app(apply_interval_s=0.1)
    async with app.run_test(size=(200, 50)) as pilot:
        layers = 100
        stages = [stage(f"s{i}", 2 * i, 2 * i + 2, tps=float(i)) for i in range(50)]
        started = time.monotonic()
        for i in range(5000):
            feed.push(event("join", NOW - 5000 + i, stage=f"s{i % 50}", host=f"node-{i % 7}"))
        for tick in range(20):
            feed.push(
                stats(
                    [{**s, "tokens_per_s": s["tokens_per_s"] + tick} for s in stages], layers=layers
                )
            )
        for pos in range(1, 2000):
            feed.push(tokens("flood", pos, "s49", f" t{pos}"))
        await settle(pilot)
        assert app.query_one(StageTable).row_count == 50
        assert len(app.query_one(EventLog).lines) == 2000
        assert len(app.query_one(ThroughputPanel).rows) == 50
        assert app.batches < 10  # 7000 updates folded in a few batches, not one redraw each
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        assert time.monotonic() - started < 20


@pytest.mark.timeout(10)
def test_cluster_state_history_is_bounded():
    state = ClusterState()
    for i in range(3000):
        state.apply(event("join", NOW + i, stage="s0"))
    for i in range(250):
        state.apply(tokens(f"r{i}", 0, "s0", "x"))
    for pos in range(1, 5000):
        state.apply(tokens("r249", pos, "s0", "y"))
    for _ in range(100):
        state.apply(three_stages())
    view = state.view(NOW, "r249")
    assert len(view.events) == 2000 and view.event_count == 3000
    assert len(state.texts) == 200
    assert len(view.text) == 4096
    assert all(len(h) == 60 for _, h in view.throughput)


# --- snapshots ----------------------------------------------------------------------------------


TEXT_A = ["The", " river", " carries", " the", " boats", " down", " to", " the", " sea", ",", " where",
          " the", " light", " falls", " on", " the", " water", " and", " the", " gulls", " wheel", " over",
          " the", " harbour", " wall", "."]  # fmt: skip
TEXT_B = ["Tell", " me", " about", " layers", ":", " each", " stage", " holds", " a", " slice", " of",
          " the", " model", " and", " passes", " its", " hidden", " state", " on"]  # fmt: skip


def readme_state(feed: FakeFeed) -> None:
    """A realistic session: three stages, a stage lost and replaced, two requests streaming."""
    t = NOW - 40
    feed.push(LinkState("up", t - 10))
    for name, host in (("s0", "node-a"), ("s1", "node-b"), ("s2", "node-c")):
        feed.push(event("join", t, stage=name, host=host, epoch=EPOCH))
    feed.push(
        event("reshard", t + 2, epoch=EPOCH, cause="start", lost=None, old_map=[],
              new_map=ranges(("s0", 0, 2), ("s1", 2, 4), ("s2", 4, 6))),
        event("ready", t + 3, epoch=EPOCH, new_map=ranges(("s0", 0, 2), ("s1", 2, 4), ("s2", 4, 6))),
        event("dead", t + 11, epoch=EPOCH, stage="s1", cause="silent"),
        event("reshard", t + 11, epoch=EPOCH + 1, cause="silent", lost="s1",
              old_map=ranges(("s0", 0, 2), ("s1", 2, 4), ("s2", 4, 6)), new_map=ranges(("s0", 0, 3), ("s2", 3, 6))),
        event("ready", t + 12, epoch=EPOCH + 1, new_map=ranges(("s0", 0, 3), ("s2", 3, 6))),
        event("join", t + 20, epoch=EPOCH + 1, stage="s3", host="node-d"),
        event("reshard", t + 21, epoch=EPOCH + 2, cause="rebalance", lost=None,
              old_map=ranges(("s0", 0, 3), ("s2", 3, 6)), new_map=ranges(("s0", 0, 2), ("s2", 2, 4), ("s3", 4, 6))),
        event("ready", t + 22, epoch=EPOCH + 2, new_map=ranges(("s0", 0, 2), ("s2", 2, 4), ("s3", 4, 6))),
    )  # fmt: skip
    final = [("s0", 0, 2, "node-a"), ("s2", 2, 4, "node-c"), ("s3", 4, 6, "node-d")]
    for i in range(60):
        rows = [stage(n, a, b, host=h, tps=round(38 + 14 * ((i * 7 + k * 5) % 13) / 13 + 3 * k, 1),
                      state="busy" if k == 1 else "ready",
                      kv=(3 + k) << 20, n_kv=2, p50=0.0024 + 0.0007 * k, p99=0.0071 + 0.002 * k)
                for k, (n, a, b, h) in enumerate(final)]  # fmt: skip
        active = [request("req-7f3a", len(TEXT_A) - 3, tps=44.2, replays=1, age=12.4),
                  request("req-91c0", len(TEXT_B) - 2, tps=39.8, age=4.1)]  # fmt: skip
        feed.push(stats(rows, epoch=EPOCH + 2, active=active if i == 59 else active[:1]))
    feed.push(M.Jobs(jobs=(M.Job(rid="req-5d21", outcome="done", tokens=64, duration_s=1.9),)))
    feed.push(tokens("req-7f3a", 0, "s2", *TEXT_A[:3]))
    for pos, piece in enumerate(TEXT_A[3:], start=3):
        feed.push(tokens("req-7f3a", pos, "s2" if pos < 12 else "s3", piece))
    feed.push(tokens("req-91c0", 0, "s3", *TEXT_B[:4]))
    for pos, piece in enumerate(TEXT_B[4:], start=4):
        feed.push(tokens("req-91c0", pos, "s3", piece))


async def select_first_request(pilot) -> None:
    readme_state(pilot.app.source)
    await settle(pilot)
    table = pilot.app.query_one(RequestTable)
    table.move_cursor(row=table.get_row_index("req-7f3a"))
    pilot.app.query_one(StageTable).focus()
    await settle(pilot)


@pytest.mark.timeout(60)
def test_snapshot_compact_80x24(snap_compare):
    app, _ = make_app()
    assert snap_compare(app, terminal_size=(80, 24), run_before=select_first_request)


@pytest.mark.timeout(60)
def test_snapshot_wide_160x48(snap_compare):
    """Also the README's picture: `python -m tui.render_readme_picture` copies it to docs/tui.svg."""
    app, _ = make_app()
    assert snap_compare(app, terminal_size=(160, 48), run_before=select_first_request)


# --- the real reader against stand-in broker sockets -----------------------------------------


class WordTokenizer:
    """Enough of a Hugging Face tokenizer for TextAssembler: one word per id."""

    WORDS = {1: "Once", 2: " upon", 3: " a", 4: " time"}

    def decode(self, ids, **_):
        return "".join(self.WORDS[i] for i in ids)


def next_update(updates: queue.SimpleQueue, kind, timeout_s: float = 5.0, where=lambda u: True):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            update = updates.get(timeout=0.05)
        except queue.Empty:
            continue
        if isinstance(update, kind) and where(update):
            return update
    raise AssertionError(f"no {kind.__name__} within {timeout_s} s")


def next_request(router: zmq.Socket, timeout_s: float = 5.0) -> tuple[bytes, P.Message]:
    assert router.poll(timeout_s * 1000), "the reader sent nothing"
    ident, *frames = router.recv_multipart()
    return ident, P.decode(frames, inbound=True)


@pytest.mark.timeout(30)
def test_feed_reader_snapshot_tokens_drain_and_broker_loss():
    ctx = zmq.Context.instance()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for sock in (router, pub):
        sock.setsockopt(zmq.LINGER, 0)
    broker = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    feed = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    status = msgspec.convert(
        {"ready": True, "epoch": 3, "map": ranges(("s0", 0, 6)), "num_layers": 6,
         "stages": [stage("s0", 0, 6)], "model": "/nowhere", "ts": NOW},
        M.Status,
    )  # fmt: skip
    updates: queue.SimpleQueue = queue.SimpleQueue()
    reader = FeedReader(broker, feed, lost_after_s=0.5,
                        tokenizer_loader=lambda model: WordTokenizer())  # fmt: skip
    reader.start(updates.put)
    try:
        # The snapshot on connect: STATUS and JOBS over the DEALER.
        for _ in range(2):
            ident, msg = next_request(router)
            reply = (
                status if msg.cmd == Cmd.STATUS else M.Jobs(jobs=(M.Job(rid="r0", outcome="done"),))
            )
            router.send_multipart([ident, *P.encode(P.MONITOR_TAG, reply)])
        assert next_update(updates, Snapshot, where=lambda u: not u.periodic).epoch == 3
        assert next_update(updates, M.Jobs).jobs == (M.Job(rid="r0", outcome="done"),)

        def publish_until(kind, where=lambda u: True):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # a SUB misses what was sent before it joined
                pub.send_multipart(P.encode_feed(status))
                with contextlib.suppress(AssertionError):
                    return next_update(updates, kind, 0.1, where)
            raise AssertionError(f"no {kind.__name__} while publishing")

        assert publish_until(LinkState, lambda u: u.state == "up")
        step = {"rid": "r1", "stage": "s0", "ts": NOW}
        pub.send_multipart(P.encode_feed(M.TokenSeen(**step, pos=0, n=2), [torch.tensor([[1, 2]])]))
        pub.send_multipart(P.encode_feed(M.TokenSeen(**step, pos=2, n=1), [torch.tensor([[3]])]))
        first, second = next_update(updates, Tokens), next_update(updates, Tokens)
        assert (first.pos, first.ids, first.pieces) == (0, (1, 2), ("Once upon", ""))
        assert (second.pos, second.ids, second.pieces, second.stage) == (2, (3,), (" a",), "s0")

        reader.drain("s0")
        ident, msg = next_request(router)
        assert msg.body == M.Drain(stage="s0")
        refusal = P.error(P.Code.UNAUTHORIZED, DRAIN_REFUSAL)
        router.send_multipart([ident, *P.encode(P.MONITOR_TAG, refusal)])
        notice = next_update(updates, Notice)
        assert notice.error and notice.message == f"drain s0 refused: {DRAIN_REFUSAL}"

        # Silence: the broker is lost; messages again: it is back and the snapshot is asked anew.
        lost = next_update(updates, LinkState, 3, lambda u: u.state == "lost")
        assert feed in lost.reason
        assert publish_until(LinkState, lambda u: u.state == "up")
        kinds = {next_request(router)[1].cmd for _ in range(2)}
        assert kinds == {Cmd.STATUS, Cmd.JOBS}
    finally:
        reader.stop()
        router.close(linger=0)
        pub.close(linger=0)


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_real_cluster_kill_stage_shows_reshard(checkpoints):
    # Bound off loopback without keys (--insecure), the broker refuses d's DRAIN.
    with Cluster(
        checkpoints["llama"],
        3,
        broker_args=("--rebalance-cooldown", "1", "--insecure"),
        bind_host="0.0.0.0",
    ) as cluster:
        app = LayerlineApp(FeedReader(cluster.url, cluster.feed_url))
        async with app.run_test(size=(160, 48)) as pilot:
            table = app.query_one(StageTable)
            await wait_until(pilot, lambda: table.row_count == 3, 15, "three stage rows")
            assert "● ready" in rendered(app.query_one(StatusLine))
            assert "⚠ insecure: no keys off loopback" in rendered(app.query_one(StatusLine))

            # Tokens stream into the requests panel (ids: the test checkpoint has no tokenizer).
            prompt = [5, 6, 7, 8]
            with Client(cluster.url) as client:
                result = await asyncio.to_thread(
                    client.generate, prompt, max_new_tokens=12, ignore_eos=True
                )
            body = app.query_one(RequestText).body
            expected = " ".join(map(str, prompt + result.token_ids[:-1]))
            await wait_until(
                pilot, lambda: str(body.content).strip() == expected, 10, "the request's text"
            )

            # DRAIN on an --insecure broker: the broker's refusal is shown.
            table.focus()
            refused = f"drain {table.selected_stage()} refused: {DRAIN_REFUSAL}"
            await pilot.press("d")
            await wait_until(
                pilot,
                lambda: any(str(n.message) == refused for n in app._notifications),
                10,
                "refusal",
            )

            old = format_map(parse_snapshot(cluster.status(), periodic=False).map)
            cluster.kill_stage("s1")
            # The broker may notice the death by silence or by an unreachable peer.
            await wait_until(pilot, lambda: "lost=s1" in log_text(app), 20, "the reshard line")
            status = await asyncio.to_thread(cluster.wait_ready, 20, 2)
            new = format_map(parse_snapshot(status, periodic=False).map)
            assert f"reshard {old} → {new} lost=s1 cause=" in log_text(app)
            await wait_until(pilot, lambda: table.row_count == 2, 10, "s1's row gone")
            await wait_until(
                pilot, lambda: "s1" not in rendered(app.query_one(MapBar)), 10, "map without s1"
            )
