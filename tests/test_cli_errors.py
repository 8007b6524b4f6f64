"""Everyday mistakes end with a documented exit code and a short message naming the cause and
the fix, never a traceback: the CLI run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _session(tmp_path: Path) -> Path:
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "captions.jsonl").write_text('{"t": 0.5, "text": "a dog barks"}\n')
    (folder / "session.yaml").write_text(
        "format: bindstream.session/1\nname: s\nstreams:\n  - {id: t, modality: text, source: captions.jsonl}\n")
    return folder


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    config = tmp_path / "run.yaml"
    config.write_text(f"sessions: [{_session(tmp_path)}]\nmodel: {{config: imagebind_tiny, precision: fp32}}\n")
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def _no_traceback(out: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]


def test_a_checkpoint_path_that_does_not_exist_exits_4_naming_the_path(tmp_path: Path) -> None:
    out = _cli(tmp_path, "--set", f"model.checkpoint={tmp_path / 'nope.pth'}")
    _no_traceback(out)
    assert out.returncode == 4
    assert f"{tmp_path / 'nope.pth'} does not exist" in out.stderr


def test_a_truncated_checkpoint_in_the_cache_exits_4_saying_to_delete_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    good = cache / "full.pth"
    torch.save({"w": torch.zeros(4096)}, good)
    data = good.read_bytes()
    (cache / "imagebind_tiny.pth").write_bytes(data[: len(data) // 2])
    out = _cli(tmp_path, "--set", "model.checkpoint=auto", env={"BINDSTREAM_CACHE": str(cache)})
    _no_traceback(out)
    assert out.returncode == 4
    assert "truncated or corrupt" in out.stderr
    assert f"delete {cache / 'imagebind_tiny.pth'} and run again" in out.stderr


@pytest.mark.parametrize("suffix", [".safetensors"])
def test_a_truncated_safetensors_checkpoint_is_refused_before_any_actor_starts(tmp_path: Path, suffix: str) -> None:
    from safetensors.torch import save_file

    path = tmp_path / f"model{suffix}"
    save_file({"w": torch.zeros(4096)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    out = _cli(tmp_path, "--set", f"model.checkpoint={path}")
    _no_traceback(out)
    assert out.returncode == 4 and "truncated or corrupt" in out.stderr and "model.checkpoint" in out.stderr
