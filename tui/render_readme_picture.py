"""Regenerate docs/tui.svg, the README's picture of the monitor, from the wide snapshot test.

    .venv/bin/python -m tui.render_readme_picture            # copy the stored snapshot
    .venv/bin/python -m tui.render_readme_picture --update   # re-take the snapshot first

The picture is the snapshot of `tests/test_tui.py::test_snapshot_wide_160x48` (a realistic fake
cluster under a frozen clock), so it shows exactly what the tests check: the test runs first, and
only a snapshot that passes (or was just re-taken) is copied.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/test_tui.py::test_snapshot_wide_160x48"
SNAPSHOT = ROOT / "tests" / "__snapshots__" / "test_tui" / "test_snapshot_wide_160x48.svg"
PICTURE = ROOT / "docs" / "tui.svg"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tui.render_readme_picture", description=__doc__)
    p.add_argument("--update", action="store_true", help="re-take the snapshot (after a UI change)")
    args = p.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        TEST,
        *(["--snapshot-update"] if args.update else []),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        print(
            "the snapshot test failed; if the UI change is intended, run with --update",
            file=sys.stderr,
        )
        return done.returncode
    shutil.copyfile(SNAPSHOT, PICTURE)
    print(f"wrote {PICTURE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
