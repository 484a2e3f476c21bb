"""The install is the one that was tested: the lock, the ranges and this environment agree."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"requirements.txt line {line!r} is not an exact pin"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _ranges() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


def _next_minor(v: Version) -> Version:
    major, minor = (v.release + (0, 0))[:2]
    return Version(f"{major}.{minor + 1}")


@pytest.mark.parametrize("req", _ranges(), ids=lambda r: r.name)
def test_each_range_admits_its_locked_version_and_nothing_newer_than_its_minor(req):
    """Upper bounds are honest: the locked version lies in the range, and the next minor
    release, which nobody has tested yet, does not."""
    locked = _lock().get(canonicalize_name(req.name))
    assert locked is not None, f"{req.name} is in pyproject.toml but not in requirements.txt"
    assert req.specifier.contains(locked, prereleases=True), (
        f"requirements.txt has {req.name}=={locked}, outside pyproject.toml's {req.specifier}"
    )
    assert not req.specifier.contains(_next_minor(locked), prereleases=True), (
        f"{req.name}{req.specifier} admits {_next_minor(locked)}, newer than the tested "
        f"{locked}; set its upper bound to <{_next_minor(locked)}"
    )


def test_this_environment_holds_exactly_the_locked_versions():
    """`make install` gave every locked package its locked version (what a fresh clone gets)."""
    wrong = {}
    for name, version in _lock().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (str(version), str(installed))
    assert not wrong, (
        f"installed versions differ from requirements.txt (locked, installed): {wrong}"
    )


def test_torch_is_locked_to_the_cpu_build():
    assert _lock()[canonicalize_name("torch")] == Version("2.13.0+cpu")
