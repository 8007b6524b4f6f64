"""A run whose timeline page cannot be written, through ``python -m pipeline run``'s own code
(``main``), real Ray actors and the tiny model: a folder appears at ``timeline: FILE`` once the
config has been checked, so the page's write fails as it would on a full disk. The run still
publishes every embedding, its summary says TIMELINE FAILED naming the file and the key, and it
exits 5."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.__main__ import main
from sources.demo import write_demo_session

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_a_run_whose_timeline_page_cannot_be_written_exits_5_naming_it_and_keeps_its_embeddings(
        tmp_path: Path, monkeypatch, capsys, caplog) -> None:
    import pipeline.run

    session = write_demo_session(tmp_path / "demo-ego", seconds=3.0, size=(160, 120), fps=5)
    page = tmp_path / "pages" / "t.html"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "sessions": [str(session)], "replay": {"rate": 0}, "timeline": str(page), "progress": False,
        "model": {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32", "threads": 1},
        "publish": {"endpoint": "tcp://127.0.0.1:*"},
        "triggers": [{"name": "red", "text": "a red circle"}],
    }))
    real_run = pipeline.run.run

    def run_with_a_folder_at_the_page(cfg, **kwargs):
        return real_run(cfg, on_ready=lambda endpoint: page.mkdir(parents=True), **kwargs)

    monkeypatch.setattr(pipeline.run, "run", run_with_a_folder_at_the_page)
    code = main(["run", str(config)])
    out, err = capsys.readouterr()

    assert code == 5, out + err
    (failed,) = [line for line in out.splitlines() if "TIMELINE FAILED" in line]
    assert f"config key 'timeline': the timeline page {page} cannot be written" in failed, out
    assert "is a folder" in failed, failed
    counts = dict(pair.rsplit(" ", 1) for pair in out.split("embeddings: ")[1].split(";")[0].split(", "))
    assert set(counts) == {"vision", "audio", "imu", "depth", "thermal", "text"}, out
    assert all(int(n) > 0 for n in counts.values()), out
    assert "triggers: red " in out and "FAILED stream" not in out, out
    assert "config key 'timeline'" in caplog.text and str(page) in caplog.text
    assert not list(page.iterdir()) and [p.name for p in page.parent.iterdir()] == ["t.html"], "no temporary file"
    assert "Traceback" not in out + err + caplog.text
