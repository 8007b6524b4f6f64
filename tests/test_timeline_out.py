"""Where the timeline page goes: ``timeline --out`` that is empty, a folder or below a file is
refused before the store is read (exit 2, naming --out); a page that cannot be written leaves no
temporary file behind, whoever writes it (the ``timeline`` command, or a run's ``timeline: FILE``).
Stores are written here by hand (real LanceDB folders, no Ray)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.__main__ import main
from sinks.store import EmbeddingStore, StoreRow
from sinks.timeline import write_timeline_html

DIM = 32
MODEL = {"model": "imagebind_tiny", "dim": DIM, "config": "imagebind_tiny", "checkpoint": "none", "seed": 0,
         "precision": "fp32"}
DATA = {"session": "s1", "lanes": {}, "triggers": [], "events": [], "captions": [], "thumbs": {}}


@pytest.fixture
def store_uri(tmp_path: Path) -> Path:
    """Session 's1': 4 vision windows."""
    uri = tmp_path / "store"
    vec = np.eye(DIM, dtype=np.float32)[0]
    EmbeddingStore.create(str(uri), MODEL).upsert(
        [StoreRow("imagebind_tiny", "s1", "cam", "vision", w, w - 1.0, w + 1.0, vec, 0.0) for w in range(4)])
    return uri


def _timeline(store_uri: Path, out: str, capsys) -> tuple[int, str]:
    code = main(["timeline", str(store_uri), "--session", "s1", "--out", out])
    return code, capsys.readouterr().err


def test_the_timeline_command_writes_the_page(store_uri, tmp_path, capsys) -> None:
    code, err = _timeline(store_uri, str(tmp_path / "pages" / "t.html"), capsys)
    assert code == 0, err
    assert (tmp_path / "pages" / "t.html").read_text().startswith("<!doctype html>")
    assert [p.name for p in (tmp_path / "pages").iterdir()] == ["t.html"]


def test_an_empty_out_exits_2_naming_the_flag(store_uri, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    code, err = _timeline(store_uri, "", capsys)
    assert code == 2 and "--out '': empty" in err and "Traceback" not in err, err


def test_a_folder_as_out_exits_2_and_writes_nothing(store_uri, tmp_path, capsys) -> None:
    folder = tmp_path / "pages"
    folder.mkdir()
    code, err = _timeline(store_uri, str(folder), capsys)
    assert code == 2 and f"--out '{folder}': is a folder, expected the HTML file to write" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pages", "store"] and not list(folder.iterdir())


def test_an_out_below_a_file_exits_2_naming_the_file(store_uri, tmp_path, capsys) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    code, err = _timeline(store_uri, str(tmp_path / "a-file" / "t.html"), capsys)
    assert code == 2 and f"{tmp_path / 'a-file'} is a file" in err, err


def test_a_page_that_cannot_be_written_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    real_write = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real_write(self, text[:1000], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_timeline_html(tmp_path / "t.html", DATA)
    assert not list(tmp_path.iterdir())


def test_a_folder_as_the_page_is_refused_and_nothing_is_written(tmp_path) -> None:
    with pytest.raises(IsADirectoryError, match="is a folder, expected the HTML file to write"):
        write_timeline_html(tmp_path, DATA)
    assert not list(tmp_path.iterdir())


def _aligner(data: dict) -> SimpleNamespace:
    """A stand-in for a session actor: ``al.timeline.remote()`` gives its timeline data."""
    return SimpleNamespace(timeline=SimpleNamespace(remote=lambda: data))


def test_a_run_whose_timeline_cannot_be_written_reports_it_in_the_summary(tmp_path, monkeypatch, caplog) -> None:
    import ray

    from pipeline.trigger_setup import write_timeline

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    (tmp_path / "a-file").write_text("not a folder")
    specs = [SimpleNamespace(name="s1"), SimpleNamespace(name="s2")]
    summaries: list[dict] = [{"session": "s1"}, {"session": "s2"}]
    target = tmp_path / "a-file" / "t.html"
    with caplog.at_level(logging.ERROR):
        written = write_timeline(target, [_aligner(DATA), _aligner(DATA)], specs, summaries)
    assert written == []
    for s in summaries:
        assert "config key 'timeline'" in s["timeline_error"] and str(tmp_path / "a-file") in s["timeline_error"]
    assert "timeline" in caplog.text and "a-file" in caplog.text
    summaries = [{"session": "s1"}, {"session": "s2"}]
    written = write_timeline(tmp_path / "t.html", [_aligner(DATA), _aligner(DATA)], specs, summaries)
    assert [p.name for p in written] == ["t-s1.html", "t-s2.html"] and all("timeline_error" not in s for s in summaries)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "t-s1.html", "t-s2.html"]
