"""Triggers over a store give the events the run published: configs/demo.yaml's example-clip
trigger on a demo session, run once through the real Ray graph with the store on (events caught
on a real SUB socket), then `python -m pipeline triggers STORE --config RUN.yaml` (a real child
process, the model rebuilt from the store): the same events, trigger, modality, stream and span
exactly, peak scores within 1e-6. Then `python -m pipeline timeline` draws the stored session in
Debian's Chromium: no console error, nothing fetched, a lane per stored modality, a marker per
event, captions and thumbnails from the store's tables; the screenshot goes to
tests/artifacts/store-timeline.png.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.inprocess import session_windows
from pipeline.session_triggers import jpeg_thumbnail
from sinks.store import CAPTIONS, THUMBNAILS
from sinks.store import EMBEDDINGS, EmbeddingStore
from sinks.timeline import MODALITY_ORDER
from sources.demo import write_demo_session
from sources.session import load_session
from test_pipeline_e2e import Subscriber
from test_store_triggers import CAPTIONS_SCHEMA, THUMBNAILS_SCHEMA, put_table
from test_timeline_browser import ARTIFACTS, CHROMIUM, LAUNCH_ARGS
from test_triggers_e2e import _trigger

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
SESSION = "demo-ego"


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory, ray_cluster) -> tuple[Path, Path, list[dict]]:
    """(run config, store, the evt/ payloads the run published) of a 12 s demo session (one planted event)."""
    from pipeline.run import run

    root = tmp_path_factory.mktemp("storetrig")
    demo = write_demo_session(root / "demo", seconds=12.0, size=(160, 120), fps=10)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({
        "sessions": ["demo"], "replay": {"rate": 0},
        "model": {"config": "imagebind_tiny", "checkpoint": "none", "precision": "fp32", "threads": 1},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "wait_for_subscribers": 1, "wait_timeout_s": 60},
        "progress": False, "store": {"uri": "store"}, "triggers": [_trigger(demo)]}))
    sub = Subscriber(1)
    result = run(load_config(config), on_ready=sub.start)
    sub.join()
    assert result.exit_code == 0, result.sessions
    return config, root / "store", [m.payload for m in sub.messages if m.kind == "trigger"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _live_events(payloads: list[dict]) -> list[dict]:
    """The run's events, start and end paired: the window that started each, its span and peak."""
    first, out = {}, []
    for p in payloads:
        key = (p["trigger"], p["stream"])
        if p["event"] == "start":
            first[key] = p["window"]
        else:
            out.append({**{k: p[k] for k in ("session", "trigger", "modality", "stream", "t_start", "t_end",
                                             "score", "reason")}, "window": first.pop(key)})
    return out


def _key(e: dict) -> tuple:
    return (e["session"], e["trigger"], e["modality"], e["stream"], e["window"], e["t_start"], e["t_end"], e["reason"])


def test_triggers_over_the_store_are_the_events_the_run_published(stored_run) -> None:
    config, store, payloads = stored_run
    live = sorted(_live_events(payloads), key=_key)
    assert {(e["stream"], e["t_start"]) for e in live} == {("cam", 3.0), ("mic", 3.0)}  # the planted event, seen twice

    done = _cli("triggers", str(store), "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    offline = sorted((json.loads(line) for line in done.stdout.splitlines()), key=_key)
    assert [_key(e) for e in offline] == [_key(e) for e in live]
    assert [e["score"] for e in offline] == pytest.approx([e["score"] for e in live], abs=1e-6)
    assert {e["score_kind"] for e in offline} == {"cosine"}


def _add_captions_and_thumbnails(config: Path, store: Path) -> tuple[int, int]:
    """The store's `captions` and `thumbnails` tables for the session, as a run with
    store.thumbnails on writes them (docs/store.md): the text windows' captions, and a 128 px
    JPEG of each vision window's middle frame. Returns how many of each."""
    cfg = load_config(config)
    items = [it for w in session_windows(load_session(cfg.sessions[0]), cfg.align) for it in w.items]
    base = {"model": "imagebind_tiny", "session": SESSION}
    captions = [{**base, "stream": it.stream, "modality": "text", "window": it.window, "t_start": it.t_start,
                 "t_end": it.t_end, "text": it.payload} for it in items if it.modality == "text" and it.payload]
    thumbs = []
    for it in (it for it in items if it.modality == "vision"):
        frame = it.payload[len(it.payload) // 2]
        jpeg = base64.b64decode(jpeg_thumbnail(frame, width=128))
        thumbs.append({**base, "stream": it.stream, "modality": "vision", "window": it.window, "t_start": it.t_start,
                       "t_end": it.t_end, "width": 128, "height": round(frame.shape[0] * 128 / frame.shape[1] / 2) * 2,
                       "jpeg": jpeg})
    put_table(store, CAPTIONS, CAPTIONS_SCHEMA, captions)
    put_table(store, THUMBNAILS, THUMBNAILS_SCHEMA, thumbs)
    return len(captions), len(thumbs)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium); .ci/run installs it")
def test_the_stored_sessions_timeline_opens_in_chromium_with_a_lane_per_modality_and_a_marker_per_event(
        stored_run, tmp_path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    config, store, payloads = stored_run
    n_captions, n_thumbs = _add_captions_and_thumbnails(config, store)
    assert n_captions and n_thumbs
    page_file = tmp_path / "timeline.html"
    done = _cli("timeline", str(store), "--session", SESSION, "--config", str(config), "--out", str(page_file))
    assert done.returncode == 0 and done.stdout.strip() == str(page_file), done.stderr
    stored = set(EmbeddingStore.open(str(store)).read(EMBEDDINGS, f"session = '{SESSION}'", ["modality"])
                 .column("modality").to_pylist())
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1400})
            problems: list[str] = []
            requests: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            assert problems == []
            assert [u for u in requests if not u.startswith("data:")] == [page_file.as_uri()]  # nothing fetched

            lanes = page.eval_on_selector_all("g.infolayer text[class$='title']:not(.xtitle)",
                                              "els => els.map(e => e.textContent)")
            assert lanes == [m for m in MODALITY_ORDER if m in stored]
            points = page.evaluate("""kind => document.getElementById('chart')._fullData
                .filter(t => (t.meta || {}).kind === kind)
                .flatMap(t => Array.from(document.querySelectorAll('g.trace' + t.uid + ' path.point')))
                .map(p => { const r = p.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })""",
                                   "event")
            assert len(points) == len(_live_events(payloads)) == 2
            captions = page.evaluate("""() => document.getElementById('chart')._fullData
                .filter(t => (t.meta || {}).kind === 'caption').map(t => t.x.length)""")
            assert captions == [n_captions]
            assert page.get_attribute("#thumb", "src").startswith("data:image/jpeg;base64,")

            page.mouse.click(*points[0])
            page.wait_for_function("document.getElementById('info').textContent.startsWith('event planted')",
                                   timeout=10_000)
            assert "3.00 – " in page.text_content("#info")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "store-timeline.png"), full_page=True)
        finally:
            browser.close()
