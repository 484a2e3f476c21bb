"""The stage's resident memory: what it holds, and its peak since a point in time (Linux)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Resident:
    """Resident bytes: in all, the part mapped from files, and the peak so far."""

    rss: int
    file: int
    peak: int


def resident() -> Resident:
    """This process's resident memory, from /proc/self/status (0 where it is unknown)."""
    fields: dict[str, int] = {}
    try:
        for line in _STATUS.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssFile", "RssShmem"):
                fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = fields.get("VmRSS", 0)
    return Resident(
        rss=rss,
        file=fields.get("RssFile", 0) + fields.get("RssShmem", 0),
        peak=max(rss, fields.get("VmHWM", 0)),
    )


def reset_peak() -> bool:
    """Restart the process's peak (VmHWM) from what it holds now; False where the kernel does
    not offer it. What the stage reports as its peak is then that of its loads and forwards,
    not of its imports or of parsing the checkpoint's index, which it reports apart."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
