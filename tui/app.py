"""The Textual monitor's app: the layout, the keys, and the one path from the source to the panels.

Data flows one way. The injected source (a `FeedReader`, or a fake in tests) calls
`LayerlineApp.receive` from its own thread; updates wait in an inbox and are folded into a
`ClusterState` at most every `apply_interval_s`, then one frozen `ClusterView` is posted to each
panel as a `ClusterChanged` message. Panels keep only what they need to redraw in place.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import DataTable, Footer, Static

from tui.records import FeedSource, Update
from tui.state import ClusterState
from tui.tables import RequestTable, StageTable
from tui.widgets import (
    ClusterChanged,
    EventLog,
    MapBar,
    RequestText,
    StatusLine,
    ThroughputPanel,
)

# Ten redraws a second is smooth to the eye and leaves the UI thread idle under a token flood.
APPLY_INTERVAL_S = 0.1
# Below this width the panels stack and the requests panel folds away (key r shows it).
WIDE_AT = 120
HELP = """\
[b]layerline monitor[/b]: a read-only view of the broker's feed

  [b]q[/b]          quit
  [b]?[/b]          this help (escape closes it)
  [b]d[/b]          drain the selected stage (on a broker with keys, --cert must be an admin's)
  [b]r[/b]          show or hide the throughput and requests panels
  [b]tab[/b]        move between the stage table, the event log and the requests
  [b]↑ ↓[/b]        select a stage, or a request to follow its text

Token text is coloured by the stage that held the model's head when the token was sent; the prompt is dim. Without the checkpoint's tokenizer on this machine the text shows token ids.
"""


class FeedArrived(Message):
    """Updates are waiting in the app's inbox (posted once per batch, from any thread)."""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static {
        width: 76; max-width: 100%; height: auto; padding: 1 2;
        border: round $accent; background: $surface;
    }
    """
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Close"),
        Binding("question_mark", "app.pop_screen", "Close"),
    ]

    def compose(self) -> ComposeResult:
        yield Static(HELP.strip(), id="help")


# --- the app ----------------------------------------------------------------------------------


class LayerlineApp(App[None]):
    """`LayerlineApp(source, clock)`: `source` is a FeedReader or a fake with its interface."""

    TITLE = "layerline"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-compact"), (WIDE_AT, "-wide")]
    CSS = """
    #map { height: 4; border: round $primary 60%; padding: 0 1; }
    #body { height: 1fr; }
    #main { width: 3fr; }
    #side { width: 2fr; max-width: 64; }
    #stages { height: auto; max-height: 50%; border: round $primary 60%; }
    #events {
        height: 1fr; border: round $primary 60%;
        scrollbar-size-vertical: 1; scrollbar-gutter: stable; overflow-x: hidden;
    }
    #throughput { height: auto; max-height: 40%; border: round $primary 60%; }
    #requests { height: auto; max-height: 12; border: round $primary 60%; }
    #text { height: 1fr; border: round $primary 60%; }
    DataTable:focus { border: round $accent; }
    Screen.-compact #map { height: 2; border: none; padding: 0; }
    Screen.-compact #side { display: none; }
    Screen.-compact #main { width: 1fr; }
    Screen.-compact #stages { max-height: 40%; scrollbar-size-horizontal: 0; }
    Screen.-compact.-show-side #side { display: block; width: 1fr; }
    Screen.-compact.-show-side #main { display: none; }
    Screen.-wide.-hide-side #side { display: none; }
    Screen.-stale #body, Screen.-stale #map { text-opacity: 50%; }
    """
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("d", "drain", "Drain stage"),
        Binding("r", "toggle_side", "Requests"),
    ]

    def __init__(
        self,
        source: FeedSource,
        clock: Callable[[], float] = time.time,
        *,
        apply_interval_s: float = APPLY_INTERVAL_S,
    ) -> None:
        super().__init__()
        self.source = source
        self.clock = clock
        self.apply_interval_s = apply_interval_s
        self.state = ClusterState()
        self.selected: str | None = None
        self.inbox: collections.deque[Update] = collections.deque()
        self.wake_posted = False
        self.last_apply = 0.0
        self.batches = 0  # how many times the inbox was folded in (tests check coalescing)
        self.panels: list[Widget] = []

    def compose(self) -> ComposeResult:
        yield StatusLine(classes="view")
        yield MapBar(classes="view", id="map")
        with Horizontal(id="body"):
            with Vertical(id="main"):
                yield StageTable(classes="view", id="stages")
                yield EventLog(classes="view", id="events")
            with Vertical(id="side"):
                yield ThroughputPanel(classes="view", id="throughput")
                yield RequestTable(classes="view", id="requests")
                yield RequestText(classes="view", id="text")
        yield Footer()

    def on_mount(self) -> None:
        self.panels = list(self.query(".view"))
        self.publish()
        self.set_interval(1.0, self.publish)  # the clock and "lost for N s" move on their own
        self.source.start(self.receive)

    def on_unmount(self) -> None:
        self.source.stop()

    # --- from the source (any thread) ---

    def receive(self, update: Update) -> None:
        """The source's callback; thread-safe. One wake-up message per batch of updates."""
        self.inbox.append(update)
        if not self.wake_posted:
            self.wake_posted = True
            self.post_message(FeedArrived())

    def on_feed_arrived(self, _: FeedArrived) -> None:
        wait = self.last_apply + self.apply_interval_s - time.monotonic()
        if wait > 0:
            self.set_timer(wait, self.apply_inbox)
        else:
            self.apply_inbox()

    def apply_inbox(self) -> None:
        # Clear the flag before draining: an update appended after the drain posts a new wake-up.
        self.wake_posted = False
        inbox = self.inbox
        while inbox:
            self.state.apply(inbox.popleft())
        self.last_apply = time.monotonic()
        self.batches += 1
        for notice in self.state.take_notices():
            self.notify(
                notice.message, severity="error" if notice.error else "information", timeout=8
            )
        self.publish()

    def publish(self) -> None:
        if not self.screen_stack:
            return  # shutting down: a last feed update may still arrive
        view = self.state.view(self.clock(), self.selected)
        # The last known values stay on screen, dimmed, while the broker is lost.
        self.screen_stack[0].set_class(view.link.state in ("lost", "refused"), "-stale")
        for panel in self.panels:
            panel.post_message(ClusterChanged(view))

    # --- user ---

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if isinstance(event.data_table, RequestTable) and event.row_key.value != self.selected:
            self.selected = event.row_key.value
            self.publish()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_drain(self) -> None:
        stage = self.query_one(StageTable).selected_stage()
        if stage is None:
            self.notify("no stage selected", severity="warning")
            return
        self.source.drain(stage)
        self.notify(f"asked the broker to drain {stage}…", timeout=4)

    def action_toggle_side(self) -> None:
        main = self.screen_stack[0]
        main.toggle_class("-show-side" if main.has_class("-compact") else "-hide-side")
