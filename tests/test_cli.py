"""The README's commands as a user types them (no Ray started in these)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ego_offline_names_the_url_the_path_and_the_demo_config(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, BINDSTREAM_CACHE=str(cache),
               BINDSTREAM_WEIGHTS_URL=f"http://127.0.0.1:{_closed_port()}/imagebind_huge.pth")
    # A copy of the config, so that its session (relative to its folder) is written under tmp_path.
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "ego.yaml"
    config.write_text((REPO / "configs" / "ego.yaml").read_text())
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert env["BINDSTREAM_WEIGHTS_URL"] in proc.stderr
    assert str(cache / "imagebind_huge.pth") in proc.stderr
    assert "configs/demo.yaml" in proc.stderr
    assert not list(work.iterdir()), "nothing may be written into the working directory"
    # the demo session was written on first run, before the weights were looked for, where the
    # config's relative path points from the config's folder
    assert (tmp_path / "sessions" / "demo-ego" / "session.yaml").is_file()


def test_demo_session_command_writes_a_loadable_session(tmp_path):
    from sources.session import load_session

    proc = subprocess.run([sys.executable, "-m", "pipeline", "demo-session", str(tmp_path / "s"), "--seconds", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    spec = load_session(tmp_path / "s")
    assert {s.modality for s in spec.streams} == {"vision", "audio", "imu", "depth", "thermal", "text"}


def test_a_window_the_model_cannot_take_exits_2_naming_the_key_and_the_towers_value(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(REPO / "configs" / "demo.yaml"),
                           "--set", "window.spans.audio.span=3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "'window.spans.audio.span'" in proc.stderr and "at most 2 s" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "sessions").exists(), "refused before anything ran"
