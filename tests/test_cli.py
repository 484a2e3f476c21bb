"""The `layerline` command: every role's command line under one entry point."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from layerline import cli

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("broker", "stage", "generate", "status", "jobs", "tui", "serve", "run-cluster")


def layerline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "layerline", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_subcommand():
    out = layerline("--help")
    assert out.returncode == 0, out.stderr
    for name in SUBCOMMANDS:
        assert re.search(rf"^  {re.escape(name)} +\S", out.stdout, re.MULTILINE), name


def test_status_help_is_the_client_status_help():
    out = layerline("status", "--help")
    assert out.returncode == 0, out.stderr
    assert "--broker" in out.stdout and "--json" in out.stdout


def test_the_console_script_is_cli_main(capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["layerline"].partition(":")
    main = getattr(importlib.import_module(module), name)
    assert main is cli.main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    listing = capsys.readouterr().out
    assert all(command in listing for command in SUBCOMMANDS)


def test_an_unknown_subcommand_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["launch"])
    assert exit_.value.code == 2
    assert "invalid choice: 'launch'" in capsys.readouterr().err


def test_serve_help_is_the_gateway_help_and_loads_no_torch():
    code = (
        "import sys; from layerline import cli\n"
        "try: cli.main(['serve', '--help'])\n"
        "except SystemExit: pass\n"
        "print('torch' in sys.modules, 'uvicorn' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "--api-key" in out.stdout and "--model-name" in out.stdout, out.stderr
    assert "--cert" in out.stdout and "--broker-key" in out.stdout
    assert out.stdout.strip().endswith("False False"), out.stdout


def test_help_imports_no_torch():
    code = (
        "import sys; from layerline import cli; cli.build_parser(); print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "False", out.stderr


def test_run_cluster_prints_the_gateway_command():
    from layerline.cluster import how_to_use

    shown = how_to_use("tcp://127.0.0.1:5555")
    assert "  .venv/bin/layerline serve --broker tcp://127.0.0.1:5555 --port 8000\n" in shown
    assert "http://127.0.0.1:8000/v1" in shown
