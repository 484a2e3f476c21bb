"""layerline's Textual monitor (`python -m tui`): a read-only view of the broker's feed.

`LayerlineApp(source, clock)` renders what `source` (a `FeedReader`, or a fake in tests) posts.
"""

from tui.app import LayerlineApp
from tui.reader import FeedReader
from tui.records import FeedSource
from tui.state import ClusterState

__all__ = ["ClusterState", "FeedReader", "FeedSource", "LayerlineApp"]
