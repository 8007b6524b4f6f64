"""The code's shape, checked as tests so that CI's test command enforces it: the one-way
layering contract in pyproject.toml (import-linter) and the lint rules there (ruff)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    found = str(exe) if exe.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' installs it")
    return found


def test_packages_import_only_down_the_layers() -> None:
    """pipeline/ may import sources/, sinks/ and encoders/; those three import none of each other."""
    out = subprocess.run([_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_ruff_finds_nothing() -> None:
    out = subprocess.run([_tool("ruff"), "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_the_wire_and_the_sources_name_the_same_modalities_in_the_same_order() -> None:
    from sinks.protocol import MODALITIES as WIRE
    from sources.base import MODALITIES

    assert WIRE == MODALITIES
