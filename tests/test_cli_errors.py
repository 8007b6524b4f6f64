"""Everyday mistakes end with a documented exit code and a short message naming the cause and
the fix, never a traceback: the CLI run as a user runs it."""

from __future__ import annotations

import os
import time
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
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


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


def _main(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_demo_session_with_no_seconds_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    out = _main("demo-session", str(tmp_path / "d"), "--seconds", "0")
    _no_traceback(out)
    assert out.returncode == 2 and "expected a positive number of seconds, got '0'" in out.stderr


def test_record_with_no_live_session_says_there_is_nothing_to_record(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"sessions: [{_session(tmp_path)}]\nmodel: {{config: imagebind_tiny, checkpoint: none}}\n")
    out = _main("record", str(config), "--out", str(tmp_path / "rec"))
    _no_traceback(out)
    assert out.returncode == 2
    assert "has no live session" in out.stderr and "use: run CONFIG" in out.stderr
    assert not (tmp_path / "rec").exists()


def test_keys_into_a_folder_that_cannot_be_made_exits_2_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")  # no folder below it, for root too
    keys = tmp_path / "a-file" / "keys"
    out = _main("keys", str(keys))
    assert out.returncode == 2, out.stderr
    assert str(keys) in out.stderr and "Traceback" not in out.stderr


def test_keys_adds_a_subscriber_to_an_existing_server_and_prints_the_config_lines(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    assert _main("keys", str(keys)).returncode == 0
    server = (keys / "server.key_secret").read_bytes()
    out = _main("keys", str(keys), "--client", "laptop")
    assert out.returncode == 0, out.stderr
    assert (keys / "server.key_secret").read_bytes() == server, "the server key is kept"
    assert sorted(p.name for p in (keys / "authorized_clients").iterdir()) == ["client.key", "laptop.key"]
    assert f"    server_secret_key: {keys.resolve() / 'server.key_secret'}" in out.stdout
    assert f"    authorized_clients: {keys.resolve() / 'authorized_clients'}" in out.stdout
    assert f"--client-key {keys.resolve() / 'laptop.key_secret'}" in out.stdout
    again = _main("keys", str(keys))
    assert again.returncode == 2 and "add a subscriber with --client NAME" in again.stderr


def test_subscribe_timeout_counts_from_the_first_message_not_from_its_start(tmp_path: Path) -> None:
    import numpy as np

    from live_peers import free_port
    from sinks.protocol import EmbeddingRecord
    from sinks.zmq_publisher import Publisher

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "subscribe", endpoint, "--timeout", "1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)  # longer than --timeout: the subscriber must still be waiting for its first message
        assert proc.poll() is None, proc.communicate()
        pub = Publisher(endpoint, wait_for_subscribers=1, wait_timeout_s=30)
        pub.start_session("s", {"cam": "vision"}, model="imagebind_tiny", dim=4)
        pub.publish([EmbeddingRecord(session="s", stream="cam", modality="vision", window=0, t_start=0.0, t_end=1.0,
                                     embedding=np.full(4, 0.5, np.float32), t_ingest=time.time())])
        pub.close()
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "emb/s/vision" in stdout and "ctl/s" in stdout
    assert "received ctl/s 1, emb/s/vision 1" in stderr


def _busy_endpoint() -> tuple[object, str]:
    """A plain ZeroMQ socket bound on a free 127.0.0.1 port: another process's publisher."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.bind("tcp://127.0.0.1:*")
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def test_a_publisher_endpoint_in_use_exits_2_naming_it_and_how_to_pick_another(tmp_path: Path) -> None:
    sock, endpoint = _busy_endpoint()
    try:
        out = _cli(tmp_path, "--set", "model.checkpoint=none", "--set", f"publish.endpoint={endpoint}")
    finally:
        sock.close(linger=0)
    _no_traceback(out)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"publish.endpoint {endpoint} is in use by another process" in out.stderr
    assert "--set publish.endpoint=tcp://127.0.0.1:PORT (or tcp://127.0.0.1:* for any free port)" in out.stderr
    assert "warmed up" not in out.stderr and "Actor" not in out.stderr, "found before Ray starts"


@pytest.mark.parametrize("setting, message", [
    # ZeroMQ reads a bind host without dots as an interface name: one this machine lacks fails
    # at once (No such device), with no name lookup and nothing on the network.
    ("publish.endpoint=tcp://nosuchif0:5555", "config key 'publish.endpoint': cannot bind tcp://nosuchif0:5555 on "
                                              "this machine"),
    ("ray.encoder_resources={gpu_node: 1}", "config key 'ray.encoder_resources': custom resources (gpu_node) exist "
                                            "only on the nodes of a Ray cluster"),
    ("timeline=.", "config key 'timeline': "),
    pytest.param("model.device=cuda", "config key 'model.device': cuda asked for, but this machine has no GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_what_this_machine_cannot_do_exits_2_naming_the_key_before_ray_starts(tmp_path: Path, setting: str,
                                                                              message: str) -> None:
    """Without these checks the publisher's bind fails inside Ray, or Ray waits for ever for a
    node with the GPU or resource, or the page is lost after the whole run."""
    out = _cli(tmp_path, "--set", "model.checkpoint=none", "--set", setting)
    _no_traceback(out)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr, out.stderr[-2000:]
    assert "warmed up" not in out.stderr and "Actor" not in out.stderr, "found before Ray starts"


def test_an_endpoint_taken_between_the_check_and_the_publishers_bind_is_the_same_error(tmp_path, monkeypatch,
                                                                                        ray_cluster) -> None:
    """On a Ray cluster (``ray.address``) the driver cannot check the publisher's host: the
    publisher's failed bind gives the same error."""
    from pipeline import run as run_mod
    from pipeline.config import parse_config

    monkeypatch.setattr(run_mod, "check_endpoint_free", lambda endpoint: None)
    sock, endpoint = _busy_endpoint()
    cfg = parse_config({"sessions": [str(_session(tmp_path))], "progress": False, "publish": {"endpoint": endpoint},
                        "model": {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32"}})
    try:
        with pytest.raises(run_mod.EndpointInUse, match="is in use by another process; pick another with"):
            run_mod.run(cfg)
    finally:
        sock.close(linger=0)


def test_no_subscriber_within_wait_timeout_exits_6_saying_how_to_start_one(tmp_path: Path) -> None:
    out = _cli(tmp_path, "--set", "model.checkpoint=none", "--set", "publish.endpoint=tcp://127.0.0.1:*",
               "--set", "publish.wait_for_subscribers=1", "--set", "publish.wait_timeout_s=1")
    _no_traceback(out)
    assert out.returncode == 6, out.stderr[-2000:]
    assert "no subscriber came within publish.wait_timeout_s (1 s)" in out.stderr
    assert "nothing was published" in out.stderr and "python -m pipeline subscribe tcp://127.0.0.1:" in out.stderr
    assert "--set publish.wait_for_subscribers=0" in out.stderr


def test_an_imu_column_typo_exits_2_before_ray_starts_naming_session_stream_file_and_the_files_columns(
        tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "imu.csv").write_text("t,ax,ay,az,gyro_x,gy,gz\n0,0,0,9.8,0,0,0\n")
    (folder / "session.yaml").write_text(
        "format: bindstream.session/1\nname: kitchen\nstreams:\n  - {id: imu0, modality: imu, source: imu.csv,\n"
        "     columns: {t: t, ax: ax, ay: ay, az: az, gx: gx, gy: gy, gz: gz}}\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"sessions: [{folder}]\nmodel: {{config: imagebind_tiny, checkpoint: none}}\n")
    out = _main("run", str(config))
    _no_traceback(out)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "session 'kitchen'" in out.stderr and "stream 'imu0'" in out.stderr
    assert f"column 'gx' missing in {folder / 'imu.csv'}; the file has: t, ax, ay, az, gyro_x, gy, gz" in out.stderr
    assert "warmed up" not in out.stderr and "Actor" not in out.stderr, "found before Ray starts"


def test_output_that_is_not_a_terminal_has_no_colour_codes_and_no_ray_banner(tmp_path: Path) -> None:
    from sources.demo import write_demo_session

    session = write_demo_session(tmp_path / "demo-ego", seconds=3.0)
    config = tmp_path / "demo.yaml"
    config.write_text(f"sessions: [{session}]\nmodel: {{config: imagebind_tiny, checkpoint: none, precision: fp32}}\n"
                      "publish: {endpoint: 'tcp://127.0.0.1:*'}\nreplay: {rate: 0}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_COLOR_PREFIX")}
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    both = out.stdout + out.stderr
    assert "\x1b[" not in both, both
    assert "Token authentication" not in both and "RAY_AUTH_MODE" not in both, both
    assert "EncoderActor pid=" in both, "the actors' own warnings still reach the driver"
    assert "demo-ego: " in out.stdout


@pytest.mark.skipif("lavfi" not in __import__("av").formats_available, reason="this FFmpeg has no lavfi input device")
def test_a_device_and_a_url_that_never_open_fail_their_streams_and_the_camera_beside_them_runs(tmp_path: Path) -> None:
    from live_peers import free_port

    closed = free_port()  # nothing listens there
    config = tmp_path / "live.yaml"
    config.write_text(f"""\
sessions:
  - name: rig
    streams:
      - {{id: cam, modality: vision, kind: device, format: lavfi, device: "testsrc2=size=320x240:rate=10,realtime"}}
      - {{id: usb, modality: vision, kind: device, format: v4l2, device: {tmp_path / 'video9'}}}
      - {{id: mic, modality: audio, kind: url, url: "tcp://127.0.0.1:{closed}", timeout_s: 1}}
stop_after: 5
model: {{config: imagebind_tiny, checkpoint: none, precision: fp32}}
publish: {{endpoint: "tcp://127.0.0.1:*"}}
""")
    out = _main("run", str(config))
    _no_traceback(out)
    assert out.returncode == 3, out.stdout + out.stderr[-2000:]
    assert (f"FAILED stream 'usb': SourceError: session 'rig' stream 'usb': cannot open device "
            f"'{tmp_path / 'video9'}' (format v4l2): No such file or directory") in out.stdout
    assert f"FAILED stream 'mic': SourceError: session 'rig' stream 'mic': url tcp://127.0.0.1:{closed} delivered " \
           "nothing in" in out.stdout
    assert "Connection refused" in out.stdout
    counts = out.stdout.split("embeddings: ", 1)[1].split(";", 1)[0]
    assert counts.startswith("vision ") and int(counts.split()[1]) >= 1, out.stdout
