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


PACKAGES = ("pipeline", "sources", "sinks", "encoders")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 600


def _functions(path: Path):
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_every_function_fits_on_a_screen_and_every_module_under_600_lines() -> None:
    long_functions, long_modules = [], []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT)
            n = len(path.read_text().splitlines())
            if n > MAX_MODULE_LINES:
                long_modules.append(f"{rel}: {n} lines")
            long_functions += [f"{rel}:{line} {name}: {size} lines" for name, line, size in _functions(path)
                               if size > MAX_FUNCTION_LINES]
    assert not long_functions, "functions over 60 lines (split them):\n" + "\n".join(long_functions)
    assert not long_modules, "modules over 600 lines (split them):\n" + "\n".join(long_modules)
