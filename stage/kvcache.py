"""Per-request KV caches of one stage, bounded in bytes and evicted least-recently-used first.

Only the compute thread changes a store; the I/O thread reads `total_bytes()` and `len()` for
heartbeats, which are single attribute reads and safe under the GIL.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from stage.shard import KVState


@dataclass
class Entry:
    """One request's cache, the prefix hash of what it holds, and its size in bytes."""

    state: KVState
    hash: int
    nbytes: int = 0


class KVStore:
    """Caches by request id in LRU order; a request evicted here gets `cache_miss` and replays."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.evictions = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._bytes = 0

    def start(self, rid: str, state: KVState) -> Entry:
        """A fresh cache for a step at position 0, replacing any cache the request had."""
        self._drop(rid)
        entry = Entry(state=state, hash=0)
        self._entries[rid] = entry
        return entry

    def get(self, rid: str) -> Entry | None:
        return self._entries.get(rid)

    def commit(self, rid: str, prefix_hash: int) -> None:
        """Record a finished step: the new prefix hash, the cache's size, most recently used."""
        entry = self._entries[rid]
        entry.hash = prefix_hash
        size = entry.state.nbytes()
        self._bytes += size - entry.nbytes
        entry.nbytes = size
        self._entries.move_to_end(rid)

    def evict(self, keep: Collection[str] = ()) -> int:
        """Drop least-recently-used caches not in `keep` until the store fits; return how many."""
        dropped = 0
        if self._bytes <= self.max_bytes:
            return 0
        for rid in list(self._entries):
            if self._bytes <= self.max_bytes:
                break
            if rid in keep:
                continue
            self._drop(rid)
            dropped += 1
        self.evictions += dropped
        return dropped

    def release(self, rids: Iterable[str]) -> int:
        """Free these requests' caches; return how many existed."""
        return sum(self._drop(rid) for rid in rids)

    def clear(self) -> None:
        for entry in self._entries.values():
            entry.state.free()
        self._entries.clear()
        self._bytes = 0

    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, rid: str) -> bool:
        entry = self._entries.pop(rid, None)
        if entry is None:
            return False
        entry.state.free()
        self._bytes -= entry.nbytes
        return True
