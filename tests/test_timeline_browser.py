"""The session timeline page in a real browser: Debian's Chromium, driven by Playwright.

The page is made from real data: a demo session aligned by the pipeline's own window rule,
embedded by the tiny model (seeded random weights), scored by configs/demo.yaml's
example-clip trigger, gathered as a session actor gathers it. The test asserts what a person
opening it would notice: it loads with no error and fetches nothing, shows a lane per modality
and a marker per event, and a click on an event shows its time range. A screenshot goes to
tests/artifacts/timeline.png for people to look at.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import parse_config
from pipeline.inprocess import session_windows
from pipeline.session_triggers import SessionTriggers, TriggerSetup
from pipeline.trigger_setup import load_prompts
from sinks.protocol import EmbeddingRecord
from sinks.timeline import render_timeline, write_timeline_html
from sources.demo import EVENT_CLIP, write_demo_session
from sources.session import load_session

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--no-first-run"]


def _encode(model, modality: str, payloads: list) -> np.ndarray:
    import torch

    from encoders.preprocess import prepare

    with torch.no_grad():
        return model.encode(modality, prepare(modality, payloads, "cpu", config=model.config)).float().numpy()


def _timeline_data(folder: Path) -> dict:
    """What a session actor gathers for the timeline of a 12 s demo session (one planted event)."""
    from encoders.imagebind import load

    demo = write_demo_session(folder / "demo", seconds=12.0, size=(160, 120), fps=10)
    cfg = parse_config({"sessions": [str(demo)], "model": {"config": "imagebind_tiny"}, "timeline": "t.html",
                        "triggers": [{"name": "planted", "video": str(demo / EVENT_CLIP), "modalities": ["vision", "audio"],
                                      "on": 0.97, "off": 0.96, "min_duration_s": 1.0}]}, base_dir=folder)
    model = load("imagebind_tiny", "none", device="cpu", precision="fp32", seed=0)
    prompts = load_prompts(cfg)
    vectors = {m: _encode(model, m, p).mean(0) for m, p in prompts.payloads["planted"].items()}
    setup = TriggerSetup(rules=(cfg.triggers[0].rule(),), prompts={"planted": vectors},
                         labels={"planted": prompts.label(cfg.triggers[0])}, timeline=True)
    triggers = SessionTriggers("demo-ego", setup)
    items = [it for w in session_windows(load_session(demo), cfg.align) for it in w.items]
    rows = {m: iter(_encode(model, m, [it.payload for it in items if it.modality == m]))
            for m in {it.modality for it in items}}
    records = [EmbeddingRecord(session="demo-ego", stream=it.stream, modality=it.modality, window=it.window,
                               t_start=it.t_start, t_end=it.t_end, embedding=next(rows[it.modality])) for it in items]
    triggers.observe(records, items)
    triggers.close()
    return triggers.timeline()


@pytest.fixture(scope="module")
def page_file(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("timeline")
    data = _timeline_data(folder)
    return write_timeline_html(folder / "timeline.html", data), data


def test_the_page_is_one_self_contained_file(page_file) -> None:
    path, data = page_file
    text = path.read_text()
    assert "<script src" not in text and "<link" not in text and "http://" not in text.split("<script>")[0]
    assert len(data["events"]) == 2 and {e["stream"] for e in data["events"]} == {"cam", "mic"}
    assert data["thumbs"]["cam"] and data["captions"]


def test_an_hour_at_one_window_a_second_stays_under_8_mb() -> None:
    rng = np.random.default_rng(0)
    from pipeline.session_triggers import MAX_THUMBS, jpeg_thumbnail

    noise = jpeg_thumbnail(rng.integers(0, 255, (224, 298, 3), dtype=np.uint8))  # the worst case for JPEG
    t = [float(k + 1) for k in range(3600)]
    lanes = {m: {"modality": m, "window": list(range(3600)), "t": t, "t_start": [x - 2 for x in t],
                 "scores": {n: [round(float(x), 4) for x in rng.uniform(-1, 1, 3600)] for n in ("a", "b")}}
             for m in ("vision", "audio", "imu", "depth", "thermal", "text")}
    data = {"session": "hour", "triggers": [{"name": n, "prompt": "text: x", "score": "cosine", "on": 0.3, "off": 0.2}
                                            for n in ("a", "b")],
            "lanes": lanes, "events": [], "captions": [{"t": x, "t_start": x - 1, "text": "a caption " * 8} for x in t[::3]],
            "thumbs": {"cam": [{"window": k, "t": t[k], "t_start": t[k] - 2, "jpeg": noise} for k in range(MAX_THUMBS)]}}
    assert len(render_timeline(data).encode()) < 8_000_000


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium); .ci/run installs it")
def test_the_timeline_opens_in_chromium_with_lanes_events_and_a_clickable_time_range(page_file) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    path, data = page_file
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1100})
            problems: list[str] = []
            requests: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            assert problems == []
            assert [u for u in requests if not u.startswith("data:")] == [path.as_uri()]  # nothing fetched

            lanes = page.eval_on_selector_all("g.infolayer text[class$='title']:not(.xtitle)", "els => els.map(e => e.textContent)")
            present = [m for m in ("vision", "audio", "imu", "depth", "thermal", "text")
                       if any(lane["modality"] == m for lane in data["lanes"].values())]
            assert lanes == present

            markers = page.evaluate("""() => document.getElementById('chart')._fullData
                .filter(t => (t.meta || {}).kind === 'event')
                .flatMap(t => Array.from(document.querySelectorAll('g.trace' + t.uid + ' path.point')))
                .map(p => { const r = p.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })""")
            assert len(markers) == len(data["events"])

            page.mouse.click(*markers[0])
            page.wait_for_function("document.getElementById('info').textContent.startsWith('event')", timeout=10_000)
            info = page.text_content("#info")
            shown = [e for e in data["events"] if f"{e['t_start']:.2f} – {e['t_end']:.2f} s" in info]
            assert len(shown) == 1 and shown[0]["trigger"] in info, info
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "timeline.png"), full_page=True)
        finally:
            browser.close()

