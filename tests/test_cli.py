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


def test_demo_session_into_a_folder_that_cannot_be_made_exits_2_naming_it(tmp_path):
    dest = _a_file(tmp_path) / "demo"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "demo-session", str(dest), "--seconds", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert str(dest) in proc.stderr and "Traceback" not in proc.stderr


def test_run_whose_demo_session_cannot_be_written_exits_2_naming_the_key(tmp_path):
    dest = _a_file(tmp_path) / "demo-ego"
    config = tmp_path / "run.yaml"
    config.write_text(f"sessions: [{dest}]\ndemo_session: {dest}\nmodel: {{config: imagebind_tiny, checkpoint: none}}\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "'demo_session'" in proc.stderr and str(dest) in proc.stderr and "Traceback" not in proc.stderr


def test_import_bag_of_a_missing_file_exits_2_naming_it(tmp_path):
    bag = tmp_path / "missing.bag"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "import-bag", str(bag), "--out", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert str(bag) in proc.stderr and "Traceback" not in proc.stderr


def test_subscribe_to_a_malformed_endpoint_exits_2_naming_it():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "subscribe", "not-an-endpoint"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "not-an-endpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_store_command_refuses_a_store_folder_it_cannot_make_and_a_bad_count_before_connecting(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    endpoint = f"tcp://127.0.0.1:{_closed_port()}"  # nothing publishes there: a check after connecting would wait
    for args, says in [(["--uri", str(tmp_path / "a-file" / "store")], str(tmp_path / "a-file" / "store")),
                       (["--uri", str(tmp_path / "store"), "--sessions", "0"], "--sessions"),
                       (["--uri", str(tmp_path / "store"), "--timeout", "-1"], "--timeout")]:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "store", endpoint, *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert says in proc.stderr and "Traceback" not in proc.stderr


def test_subscribe_to_a_port_beyond_65535_exits_2_instead_of_connecting_to_it_modulo_65536():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "subscribe", "tcp://127.0.0.1:99999"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "expected a port from 1 to 65535" in proc.stderr and "Traceback" not in proc.stderr


def test_run_joining_a_cluster_that_does_not_answer_exits_2_naming_the_key(tmp_path):
    from sources.demo import write_demo_session

    session = write_demo_session(tmp_path / "demo-ego", seconds=2.0)
    config = tmp_path / "run.yaml"
    address = f"127.0.0.1:{_closed_port()}"
    config.write_text(f"sessions: [{session}]\nmodel: {{config: imagebind_tiny, checkpoint: none}}\n"
                      f"ray: {{address: '{address}'}}\n")
    # Ray itself would retry the address for minutes; the timeout is what a user would wait.
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert "'ray.address'" in proc.stderr and address in proc.stderr and "Traceback" not in proc.stderr
