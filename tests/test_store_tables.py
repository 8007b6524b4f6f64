"""The store's thumbnails, captions and events tables: trigger events paired into one row each
(also when the session ends mid-event), the writer's per-table counts and failure accounting on a
real LanceDB folder, the standalone consumer's events rows from real protocol messages, and one
run of the demo config through the real Ray graph whose tables match what it published.
"""

from __future__ import annotations

import collections
import io
from pathlib import Path

import numpy as np
import pytest

from pipeline.triggers import TriggerEvaluator, TriggerEvent, TriggerRule
from sinks.protocol import EmbeddingRecord, decode, encode_control, encode_event
from sinks.store import CAPTIONS, EMBEDDINGS, EVENTS, THUMBNAILS, StoreWriter
from sinks.store_tables import CaptionRow, EventPairer, ThumbnailRow

REPO = Path(__file__).resolve().parents[1]
MODEL = {"model": "m", "dim": 4, "config": "m", "checkpoint": "none", "seed": 0, "precision": "fp32"}


def _table(uri: str, name: str) -> list[dict]:
    import lancedb

    db = lancedb.connect(uri)
    return db.open_table(name).to_arrow().to_pylist() if name in set(db.list_tables().tables) else []


def _records(scores: list[float], stream: str = "cam") -> list[EmbeddingRecord]:
    """Windows 0.. of one second each whose embedding scores ``scores`` against the prompt e0."""
    out = []
    for w, s in enumerate(scores):
        v = np.array([s, np.sqrt(max(0.0, 1 - s * s)), 0, 0], np.float32)
        out.append(EmbeddingRecord("s", stream, "vision", w, float(w), float(w + 1), v))
    return out


def _evaluator() -> TriggerEvaluator:
    return TriggerEvaluator("s", [TriggerRule("hit", on=0.9, off=0.5, score="cosine")],
                            {"hit": {"vision": np.array([1, 0, 0, 0], np.float32)}})


# -- pairing -------------------------------------------------------------------------------------

def test_start_and_end_of_an_event_make_one_row_with_the_start_window_and_the_end_span_and_peak():
    ev = _evaluator()
    events = ev.observe(_records([0.1, 0.95, 0.99, 0.7, 0.2, 0.1]))
    assert [e.kind for e in events] == ["start", "end"]
    pairer = EventPairer("run-1")
    (row,) = pairer.add("s", "m", events[:1]) + pairer.add("s", "m", events[1:])
    assert (row.trigger, row.modality, row.window, row.t_start, row.t_end) == ("hit", "vision", 1, 1.0, 4.0)
    assert row.score == pytest.approx(0.99, abs=1e-6) and row.score_kind == "cosine" and row.run_id == "run-1"
    assert pairer.end_session("s") == []


def test_a_session_that_ends_mid_event_still_makes_its_row_from_the_end_the_session_sends():
    ev = _evaluator()
    pairer = EventPairer()
    assert pairer.add("s", "m", ev.observe(_records([0.2, 0.95, 0.97]))) == []  # started, still on
    (row,) = pairer.add("s", "m", ev.close())  # the session's end ends it: reason stream_end
    assert (row.window, row.t_start, row.t_end) == (1, 1.0, 3.0)
    assert row.score == pytest.approx(0.97, abs=1e-6)


def test_an_event_whose_end_never_came_is_written_at_the_session_end_and_an_end_alone_has_window_minus_one():
    start = TriggerEvent("hit", "cam", "vision", "start", 4, 4.0, 5.0, 0.93, score_kind="calibrated")
    end_alone = TriggerEvent("hit", "mic", "audio", "end", 9, 7.0, 10.0, 0.8, "below_off")
    pairer = EventPairer()
    (lone,) = pairer.add("s", "m", [start, end_alone])
    assert (lone.modality, lone.window, lone.t_start, lone.t_end) == ("audio", -1, 7.0, 10.0)
    assert pairer.end_session("other") == []
    (open_row,) = pairer.end_session("s")
    assert (open_row.window, open_row.t_start, open_row.t_end, open_row.score_kind) == (4, 4.0, 5.0, "calibrated")
    assert pairer.end_session("s") == []


def test_a_thumbnail_of_a_busy_frame_is_encoded_again_coarser_to_stay_under_8_kb():
    from PIL import Image

    from pipeline.store_feed import THUMB_MAX_BYTES, window_rows

    noise = np.random.default_rng(0).integers(0, 256, (200, 128, 3), dtype=np.uint8)  # about 15 KB at qscale 6
    rec = EmbeddingRecord("s", "cam", "vision", 7, 7.0, 8.0, np.zeros(4, np.float32))
    (row,) = window_rows("m", [rec], [noise])
    assert len(row.jpeg) <= THUMB_MAX_BYTES and (row.width, row.height) == (128, 200)
    assert Image.open(io.BytesIO(row.jpeg)).size == (128, 200)


# -- the writer ----------------------------------------------------------------------------------

def _jpeg(width: int = 8) -> bytes:
    from pipeline.session_triggers import jpeg_image

    return jpeg_image(np.zeros((6, 8, 3), np.uint8), width)[0]


def _rows(session: str = "s") -> list:
    return ([CaptionRow("m", session, "captions", "text", w, float(w), w + 1.0, f"caption {w}") for w in range(3)]
            + [ThumbnailRow("m", session, "cam", "vision", w, float(w), w + 1.0, 8, 6, _jpeg()) for w in range(2)])


def test_writer_keeps_each_table_once_per_key_and_reports_its_rows(tmp_path):
    uri = str(tmp_path / "store")
    events = [TriggerEvent("hit", "cam", "vision", "start", 1, 1.0, 2.0, 0.9),
              TriggerEvent("hit", "cam", "vision", "end", 3, 1.0, 4.0, 0.95, "below_off")]
    for attempt in range(2):  # the same rows twice (a replay): upserts, no duplicates
        w = StoreWriter(uri, MODEL, flush_s=0.05, run_id=f"r{attempt}")
        w.add(_rows())
        w.add_events("s", "m", events)
        w.close()
        rep = w.report("s")
        assert rep["tables"] == {CAPTIONS: {"rows": 3, "not_written": 0, "pending": 0},
                                 THUMBNAILS: {"rows": 2, "not_written": 0, "pending": 0},
                                 EVENTS: {"rows": 1, "not_written": 0, "pending": 0}}, rep
        assert rep["rows"] == 0 and "error" not in rep
    assert sorted(r["text"] for r in _table(uri, CAPTIONS)) == ["caption 0", "caption 1", "caption 2"]
    assert len(_table(uri, THUMBNAILS)) == 2
    (ev,) = _table(uri, EVENTS)
    assert (ev["window"], ev["t_start"], ev["t_end"], ev["score"], ev["run_id"]) == (1, 1.0, 4.0, 0.95, "r1")


def test_a_store_that_cannot_be_written_counts_every_table_s_rows_as_not_written(tmp_path):
    from pipeline.storage import store_results

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be\n")
    w = StoreWriter(str(blocker), MODEL, flush_s=0.05)
    w.add(_rows())
    w.add_events("s", "m", [TriggerEvent("hit", "cam", "vision", "start", 1, 1.0, 2.0, 0.9)])
    w.end_session("s")  # the open event's row is lost too
    w.close()
    rep = w.report("s")
    assert str(blocker) in rep["error"]
    assert {t: c["not_written"] for t, c in rep["tables"].items()} == {CAPTIONS: 3, THUMBNAILS: 2, EVENTS: 1}
    summary = {"session": "s"}
    store_results([summary], {"s": rep})
    assert summary["store_error"].endswith("0 row(s) not written; also captions 3, events 1, thumbnails 2")


# -- the standalone consumer ---------------------------------------------------------------------

def test_consumer_pairs_the_trigger_events_of_its_sessions_into_events_rows(tmp_path):
    from pipeline.storage import _Consumer

    uri = str(tmp_path / "store")
    consumer = _Consumer(uri, {"checkpoint": "none", "seed": 0, "precision": "fp32"}, topic="emb/s/")
    other = dict(session="s2", trigger="hit", stream="cam", modality="vision", t_publish=1.0)
    ev = dict(session="s", trigger="hit", stream="cam", modality="vision", t_publish=1.0, score_kind="calibrated")
    frames = [encode_control("s", "start", seq=0, streams={"cam": "vision"}, model="m", dim=4),
              encode_event(event="start", seq=0, window=2, t_start=2.0, t_end=3.0, score=0.91, **ev),
              encode_event(event="end", seq=1, window=5, t_start=2.0, t_end=6.0, score=0.97, reason="below_off", **ev),
              encode_control("s2", "start", seq=0, streams={"cam": "vision"}, model="m", dim=4),
              encode_event(event="end", seq=0, window=3, t_start=1.0, t_end=4.0, score=0.9, **other),  # not --topic's
              encode_event(event="start", seq=2, window=8, t_start=8.0, t_end=9.0, score=0.92, **ev),
              encode_control("s", "end", seq=1, counts={}, windows=10, dropped={})]
    for f in frames:
        consumer.handle(decode(list(f)))
    reports = consumer.close()
    assert reports["s"]["tables"][EVENTS]["rows"] == 2
    rows = sorted((r["session"], r["window"], r["t_start"], r["t_end"], r["score"], r["score_kind"], r["model"])
                  for r in _table(uri, EVENTS))
    assert rows == [("s", 2, 2.0, 6.0, 0.97, "calibrated", "m"), ("s", 8, 8.0, 9.0, 0.92, "calibrated", "m")]


# -- one run of the demo config through the real Ray graph ------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from sources.demo import write_demo_session

    return write_demo_session(tmp_path_factory.mktemp("tables") / "demo", seconds=8.0, size=(160, 120), fps=10)


def _demo_config(demo: Path, uri: str, subscribers: int):
    """configs/demo.yaml (its model, store and trigger) on this session, the store in ``uri``."""
    import yaml

    from pipeline.config import parse_config
    from test_triggers_e2e import _trigger

    doc = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert doc["store"]["thumbnails"] is True
    return parse_config({
        "sessions": [str(demo)], "model": {**doc["model"], "threads": 1}, "store": {**doc["store"], "uri": uri},
        "triggers": [_trigger(demo)], "replay": {"rate": 0}, "progress": False,
        "publish": {"endpoint": "tcp://127.0.0.1:*", "wait_for_subscribers": subscribers, "wait_timeout_s": 60},
    })


def _keys(rows: list[dict], key: tuple[str, ...]) -> set[tuple]:
    keys = [tuple(r[k] for k in key) for r in rows]
    assert len(keys) == len(set(keys)), "a key stored twice"
    return set(keys)


def _published_events(messages) -> set[tuple]:
    """(trigger, modality, start window, t_start, t_end, peak score) of each event on the wire."""
    starts, out = {}, set()
    for m in messages:
        if m.kind == "trigger":
            p = m.payload
            if p["event"] == "start":
                starts[p["trigger"], p["stream"]] = p
            else:
                start = starts.pop((p["trigger"], p["stream"]))
                out.add((p["trigger"], p["modality"], start["window"], p["t_start"], p["t_end"], p["score"]))
    assert not starts, f"events started and never ended on the wire: {starts}"
    return out


def _captions(demo: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (demo / "captions.jsonl").read_text().splitlines() if line.strip()]


def test_demo_run_stores_thumbnails_captions_and_events_of_what_it_published_once_per_key(demo, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from pipeline.run import run
    from test_pipeline_e2e import Subscriber

    own, other = str(tmp_path / "store"), str(tmp_path / "consumer")
    sub, procs = Subscriber(1), []

    def on_ready(endpoint):  # the run waits for both: the consumer's 3 subscriptions and the subscriber's one
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pipeline", "store", endpoint, "--uri", other, "--sessions", "1", "--checkpoint", "none"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        sub.start(endpoint)

    result = run(_demo_config(demo, own, subscribers=4), on_ready=on_ready)
    sub.join()
    out, err = procs[0].communicate(timeout=120)
    assert result.exit_code == 0 and procs[0].returncode == 0, (result.sessions, err)

    emb = _table(own, EMBEDDINGS)
    by_modality = collections.defaultdict(set)
    for r in emb:
        by_modality[r["modality"]].add((r["model"], r["session"], r["modality"], r["window"]))
    thumbs, caps, events = _table(own, THUMBNAILS), _table(own, CAPTIONS), _table(own, EVENTS)
    key = ("model", "session", "modality", "window")
    assert by_modality["vision"] and _keys(thumbs, key) == by_modality["vision"], "a thumbnail per vision window"
    for t in thumbs:
        img = Image.open(io.BytesIO(t["jpeg"]))
        assert img.format == "JPEG" and img.size == (t["width"], t["height"]) == (128, 96) and len(t["jpeg"]) <= 8192
    assert by_modality["text"] and _keys(caps, key) == by_modality["text"], "a caption row per text window"
    lines = _captions(demo)
    for c in caps:  # each row: the session's captions in its window's span, as the window joined them
        assert c["text"] == " ".join(x["text"] for x in lines if c["t_start"] <= x["t"] <= c["t_end"]), c
    assert all(any(c["t_start"] <= x["t"] <= c["t_end"] for c in caps) for x in lines), "a caption not stored"

    published = _published_events(sub.messages)
    assert published, "the planted event was not found; the test proved nothing about events"
    assert {(e["trigger"], e["modality"], e["window"], e["t_start"], e["t_end"], e["score"]) for e in events} == published
    assert {(e["model"], e["score_kind"]) for e in events} == {("imagebind_tiny", "cosine")}
    assert {e["run_id"] for e in events} == {r["run_id"] for r in emb}
    consumer_events = _table(other, EVENTS)
    assert sorted((e["trigger"], e["modality"], e["window"], e["t_start"], e["t_end"], e["score"], e["score_kind"])
                  for e in consumer_events) == sorted(
        (e["trigger"], e["modality"], e["window"], e["t_start"], e["t_end"], e["score"], e["score_kind"]) for e in events)

    (summary,) = result.sessions
    tables = {THUMBNAILS: len(thumbs), CAPTIONS: len(caps), EVENTS: len(events)}
    assert {t: c["rows"] for t, c in summary["store"]["tables"].items()} == tables
    (end,) = [m.payload for m in sub.messages if m.topic.startswith("ctl/") and m.payload["event"] == "end"]
    assert {t: (c["rows"], c["not_written"]) for t, c in end["store"]["tables"].items()} == {
        t: (n, 0) for t, n in tables.items()}

    counts = {t: len(_table(own, t)) for t in (EMBEDDINGS, THUMBNAILS, CAPTIONS, EVENTS)}
    sub2 = Subscriber(1)
    result2 = run(_demo_config(demo, own, subscribers=1), on_ready=sub2.start)
    sub2.join()
    assert result2.exit_code == 0, result2.sessions
    assert {t: len(_table(own, t)) for t in counts} == counts, "a second replay changed a table's row count"
