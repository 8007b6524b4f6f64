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


def _a_file(tmp_path: Path) -> Path:
    """A plain file: no folder can be made below it, whoever runs the test (root included)."""
    f = tmp_path / "a-file"
    f.write_text("not a folder")
    return f


def _refused(*args: str, says: list[str], cwd: Path | None = None, timeout: float = 120) -> None:
    """``python -m pipeline ARGS`` exits 2 with each of ``says`` on stderr and no traceback."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 2, proc.stderr
    assert all(s in proc.stderr for s in says) and "Traceback" not in proc.stderr, proc.stderr


def test_demo_session_into_a_folder_that_cannot_be_made_exits_2_naming_it(tmp_path):
    dest = _a_file(tmp_path) / "demo"
    _refused("demo-session", str(dest), "--seconds", "2", says=[str(dest)])


def test_run_whose_demo_session_cannot_be_written_exits_2_naming_the_key(tmp_path):
    dest = _a_file(tmp_path) / "demo-ego"
    config = tmp_path / "run.yaml"
    config.write_text(f"sessions: [{dest}]\ndemo_session: {dest}\nmodel: {{config: imagebind_tiny, checkpoint: none}}\n")
    _refused("run", str(config), says=["'demo_session'", str(dest)], cwd=tmp_path)


def test_import_bag_of_a_missing_file_exits_2_naming_it(tmp_path):
    bag = tmp_path / "missing.bag"
    _refused("import-bag", str(bag), "--out", str(tmp_path / "s"), says=[str(bag)])


def test_subscribe_to_a_malformed_endpoint_or_a_port_beyond_65535_exits_2_naming_it():
    _refused("subscribe", "not-an-endpoint", says=["not-an-endpoint"], timeout=60)
    # ZeroMQ alone would connect to port 99999 - 65536 = 34463.
    _refused("subscribe", "tcp://127.0.0.1:99999", says=["expected a port from 1 to 65535"], timeout=60)


def test_store_command_refuses_a_store_folder_it_cannot_make_and_a_bad_count_before_connecting(tmp_path):
    bad_uri = str(_a_file(tmp_path) / "store")
    endpoint = f"tcp://127.0.0.1:{_closed_port()}"  # nothing publishes there: a check after connecting would wait
    for args, says in [(["--uri", bad_uri], bad_uri),
                       (["--uri", str(tmp_path / "store"), "--sessions", "0"], "--sessions"),
                       (["--uri", str(tmp_path / "store"), "--timeout", "-1"], "--timeout")]:
        _refused("store", endpoint, *args, says=[says], timeout=60)


def test_run_joining_a_cluster_that_does_not_answer_exits_2_naming_the_key(tmp_path):
    from sources.demo import write_demo_session

    session = write_demo_session(tmp_path / "demo-ego", seconds=2.0)
    config = tmp_path / "run.yaml"
    address = f"127.0.0.1:{_closed_port()}"
    config.write_text(f"sessions: [{session}]\nmodel: {{config: imagebind_tiny, checkpoint: none}}\n"
                      f"ray: {{address: '{address}'}}\n")
    # Ray itself would retry the address for minutes; the timeout is what a user would wait.
    _refused("run", str(config), says=["'ray.address'", address], cwd=tmp_path, timeout=90)
