"""Checkpoint resolution, download and loading against a real local HTTP server."""

from __future__ import annotations

import http.server
import pickle
import socket
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from encoders import weights
from encoders.weights import WeightsUnavailable, load_state_dict, resolve

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, so the copy loop runs more than once


class _Handler(http.server.BaseHTTPRequestHandler):
    truncate = False

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        # A truncating server promises the full length but hangs up halfway.
        self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2] if self.truncate else PAYLOAD)

    def log_message(self, *args: object) -> None:
        pass


class _TruncatingHandler(_Handler):
    truncate = True


def _serve(handler: type[http.server.BaseHTTPRequestHandler]):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/imagebind_huge.pth"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("BINDSTREAM_CACHE", str(root))
    # Any write into the working directory would land here and fail the test below.
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return root


def test_auto_downloads_into_cache_and_reuses_it(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server, url = _serve(_Handler)
    try:
        monkeypatch.setenv("BINDSTREAM_WEIGHTS_URL", url)
        path = resolve("auto")
    finally:
        server.shutdown()
        server.server_close()
    assert path == cache / "imagebind_huge.pth"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in cache.iterdir()) == ["imagebind_huge.pth"]  # no .part left
    assert list(Path.cwd().iterdir()) == []
    # Server gone: the second call must be served from the cache.
    assert resolve("auto") == path


def test_truncated_download_leaves_no_file_at_final_path(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server, url = _serve(_TruncatingHandler)
    try:
        monkeypatch.setenv("BINDSTREAM_WEIGHTS_URL", url)
        with pytest.raises(WeightsUnavailable) as info:
            resolve("auto")
    finally:
        server.shutdown()
        server.server_close()
    assert not (cache / "imagebind_huge.pth").exists()
    assert list(cache.iterdir()) == []
    assert url in str(info.value)


def test_offline_error_names_url_target_and_demo_config(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The port is closed now: the connection is refused, as when offline.
    url = f"http://127.0.0.1:{port}/imagebind_huge.pth"
    monkeypatch.setenv("BINDSTREAM_WEIGHTS_URL", url)
    with pytest.raises(WeightsUnavailable) as info:
        resolve("auto")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert url in message
    assert str(cache / "imagebind_huge.pth") in message
    assert "configs/demo.yaml" in message
    assert not (cache / "imagebind_huge.pth").exists()


def test_official_url_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BINDSTREAM_WEIGHTS_URL", raising=False)
    assert weights.weights_url() == "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"


def test_default_cache_is_under_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BINDSTREAM_CACHE", raising=False)
    assert weights.cache_dir() == Path.home() / ".cache" / "bindstream"


def test_local_path_wins_and_missing_path_is_reported(cache: Path, tmp_path: Path) -> None:
    local = tmp_path / "mine.pth"
    torch.save({"w": torch.ones(2)}, local)
    assert resolve(local) == local
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve(tmp_path / "nope.pth")


def test_load_state_dict_pth_unwraps_model_key(tmp_path: Path) -> None:
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(1)}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state, "epoch": 3}, path)
    loaded = load_state_dict(path)
    assert set(loaded) == {"a.weight", "b"}
    assert torch.equal(loaded["a.weight"], state["a.weight"])


def test_load_state_dict_plain_pt_and_safetensors(tmp_path: Path) -> None:
    state = {"x": torch.randn(3, 4)}
    torch.save({"state_dict": state}, tmp_path / "c.pt")
    save_file(state, str(tmp_path / "c.safetensors"))
    assert torch.equal(load_state_dict(tmp_path / "c.pt")["x"], state["x"])
    assert torch.equal(load_state_dict(tmp_path / "c.safetensors")["x"], state["x"])


def test_load_state_dict_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(1), "obj": _Handler}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict(path)


def test_tiny_fixture_checkpoint_loads() -> None:
    shared = Path(__file__).resolve().parents[2] / "shared"
    path = shared / "fixtures" / "imagebind" / "tiny_model.safetensors"
    if not path.is_file():
        pytest.skip(f"shared fixtures not found at {path}")
    state = load_state_dict(path)
    assert len(state) == 211
    assert all(v.dtype == torch.float32 for v in state.values())
