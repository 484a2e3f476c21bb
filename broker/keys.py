"""`python -m broker.keys DIR --stages s0 s1 --clients alice --admins ops`: a cluster's CurveZMQ
keys, in the layout `python -m broker --keys DIR` reads (common/keys.py).

The broker's pair is made once and kept; each named peer gets a pair whose public half goes
into its role's directory and whose secret half goes into DIR/private/, to be moved to the
peer's host. Adding a peer later is the same command with the new name.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from common.keys import BROKER_NAME, PRIVATE_DIR, ROLE_DIRS, generate

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m broker.keys", description=__doc__)
    p.add_argument("directory", type=Path, help="where the keys go (made if missing)")
    p.add_argument("--stages", nargs="*", default=[], metavar="NAME", help="stage keys to make")
    p.add_argument("--clients", nargs="*", default=[], metavar="NAME", help="client keys")
    p.add_argument("--admins", nargs="*", default=[], metavar="NAME", help="admin keys")
    return p.parse_args(argv)


def make_keys(directory: Path, peers: dict[str, list[str]]) -> list[str]:
    """Make the broker's pair if missing and one pair per named peer; return what was made.
    A name that already has a key in its role is left alone (its key stays valid)."""
    made = []
    private = directory / PRIVATE_DIR
    for role in ROLE_DIRS.values():
        (directory / role).mkdir(parents=True, exist_ok=True)
    private.mkdir(parents=True, exist_ok=True)
    private.chmod(0o700)
    if not (private / f"{BROKER_NAME}.key_secret").exists():
        public, secret = generate(private, BROKER_NAME)
        shutil.move(public, directory / f"{BROKER_NAME}.key")
        made.append(f"broker: {directory / f'{BROKER_NAME}.key'} (public), {secret} (secret)")
    for role, names in peers.items():
        for name in names:
            if not name or not set(name) <= NAME_CHARS or name == BROKER_NAME:
                raise ValueError(
                    f"bad key name {name!r}: use letters, digits, '-', '_' and '.', "
                    f"and not {BROKER_NAME!r}"
                )
            target = directory / ROLE_DIRS[role] / f"{name}.key"
            if target.exists():
                continue
            if (private / f"{name}.key_secret").exists():
                raise ValueError(
                    f"{private / name}.key_secret already belongs to a peer of another role; "
                    "give this one another name"
                )
            public, secret = generate(private, name)
            shutil.move(public, target)
            made.append(f"{role} {name}: {target} (public), {secret} (secret)")
    return made


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    peers = {"stage": args.stages, "client": args.clients, "admin": args.admins}
    names = [n for group in peers.values() for n in group]
    if len(set(names)) != len(names):
        print("error: a name appears twice; each peer needs its own name", file=sys.stderr)
        return 2
    try:
        made = make_keys(args.directory, peers)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in made:
        print(line)
    if not made:
        print(f"nothing to make: every key named is already in {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
