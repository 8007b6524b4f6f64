"""Triggers and the session timeline over a stored session, on stores written here by hand (real
LanceDB folders, no Ray): each stream's windows are scored in window order whatever order they
were written in; tables the store does not have read as empty; without a trigger the timeline
shows the events the run stored; a one-hour session at one window a second makes a page under
8 MB; bad input exits 2 with a message and no traceback. The same run live and over its store:
tests/test_store_triggers_e2e.py.
"""

from __future__ import annotations

import base64
import io

import av
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from pipeline.__main__ import main
from pipeline.search import Store
from pipeline.session_triggers import MAX_THUMBS, THUMB_WIDTH, TriggerSetup, jpeg_thumbnail
from pipeline.store_timeline import store_timeline
from sinks.store import CAPTIONS, EVENTS, THUMBNAILS
from pipeline.store_triggers import stored_events
from pipeline.triggers import TriggerRule
from sinks.store import EmbeddingStore, StoreRow
from sinks.timeline import render_timeline

DIM = 32
MODEL = {"model": "imagebind_tiny", "dim": DIM, "config": "imagebind_tiny", "checkpoint": "none", "seed": 0,
         "precision": "fp32"}

THUMBNAILS_SCHEMA = pa.schema([("model", pa.string()), ("session", pa.string()), ("stream", pa.string()),
                               ("modality", pa.string()), ("window", pa.int64()), ("t_start", pa.float64()),
                               ("t_end", pa.float64()), ("width", pa.int32()), ("height", pa.int32()),
                               ("jpeg", pa.binary())])
CAPTIONS_SCHEMA = pa.schema([("model", pa.string()), ("session", pa.string()), ("stream", pa.string()),
                             ("modality", pa.string()), ("window", pa.int64()), ("t_start", pa.float64()),
                             ("t_end", pa.float64()), ("text", pa.string())])
EVENTS_SCHEMA = pa.schema([("model", pa.string()), ("session", pa.string()), ("trigger", pa.string()),
                           ("modality", pa.string()), ("window", pa.int64()), ("t_start", pa.float64()),
                           ("t_end", pa.float64()), ("score", pa.float64()), ("score_kind", pa.string()),
                           ("run_id", pa.string())])
KEYS = {THUMBNAILS: ["model", "session", "modality", "window"], CAPTIONS: ["model", "session", "modality", "window"],
        EVENTS: ["model", "session", "trigger", "modality", "t_start"]}


def put_table(uri, name: str, schema: pa.Schema, rows: list[dict]) -> None:
    """Rows into one of the run's extra tables (layout: docs/store.md), upserted on its key as the run writes them."""
    table = lancedb.connect(str(uri)).create_table(name, schema=schema, exist_ok=True)
    table.merge_insert(KEYS[name]).when_matched_update_all().when_not_matched_insert_all().execute(
        pa.Table.from_pylist(rows, schema=schema))


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


PROMPT = _unit(np.eye(DIM)[0] + 0.0)
OTHER = _unit(np.eye(DIM)[1] + 0.0)


def _row(session: str, stream: str, modality: str, window: int, vector: np.ndarray) -> StoreRow:
    return StoreRow("imagebind_tiny", session, stream, modality, window, window - 1.0, window + 1.0, vector, 0.0)


@pytest.fixture
def store_uri(tmp_path):
    """Session 's1': vision 'cam' and audio 'mic', 12 windows each, like the prompt at windows
    3-5 (cam) and 8-11 (mic, still on at the end), written in a shuffled order."""
    uri = tmp_path / "store"
    rows = [_row("s1", s, m, w, PROMPT if w in hit else OTHER)
            for s, m, hit in (("cam", "vision", {3, 4, 5}), ("mic", "audio", {8, 9, 10, 11})) for w in range(12)]
    np.random.default_rng(0).shuffle(rows)
    store = EmbeddingStore.create(str(uri), MODEL)
    store.upsert(rows[:10])
    store.upsert(rows[10:])
    return uri


def _setup() -> TriggerSetup:
    return TriggerSetup(rules=(TriggerRule("red", on=0.9, off=0.8),), prompts={"red": {"vision": PROMPT}},
                        labels={"red": "image: red.png"})


def test_each_stream_is_scored_in_window_order_whatever_order_it_was_stored_in(store_uri) -> None:
    events = stored_events(Store(store_uri), _setup(), ["s1"], model="imagebind_tiny")
    assert [(e.stream, e.modality, e.window, e.t_start, e.t_end, e.reason) for e in events] == [
        ("cam", "vision", 3, 2.0, 6.0, "below_off"), ("mic", "audio", 8, 7.0, 12.0, "stream_end")]
    assert all(e.score == pytest.approx(1.0) and e.score_kind == "cosine" for e in events)


def test_tables_the_store_does_not_have_read_as_empty(store_uri) -> None:
    store = EmbeddingStore.open(str(store_uri))
    assert store.read(THUMBNAILS, "session = 's1'", ["jpeg"]).num_rows == 0
    data = store_timeline(store, "imagebind_tiny", "s1", _setup())
    assert data["captions"] == [] and data["thumbs"] == {}
    assert {s: lane["modality"] for s, lane in data["lanes"].items()} == {"cam": "vision", "mic": "audio"}
    assert data["lanes"]["cam"]["window"] == list(range(12)) and len(data["lanes"]["cam"]["scores"]["red"]) == 12
    assert [(e["stream"], e["t_start"], e["t_end"]) for e in data["events"]] == [("cam", 2.0, 6.0), ("mic", 7.0, 12.0)]


def test_without_a_trigger_the_timeline_shows_the_events_the_run_stored(store_uri) -> None:
    put_table(store_uri, EVENTS, EVENTS_SCHEMA, [
        {"model": "imagebind_tiny", "session": "s1", "trigger": "planted", "modality": "audio", "window": 8,
         "t_start": 7.0, "t_end": 12.0, "score": 0.99, "score_kind": "calibrated", "run_id": "r"},
        {"model": "imagebind_tiny", "session": "other", "trigger": "planted", "modality": "audio", "window": 1,
         "t_start": 0.0, "t_end": 2.0, "score": 0.9, "score_kind": "calibrated", "run_id": "r"}])
    data = store_timeline(EmbeddingStore.open(str(store_uri)), "imagebind_tiny", "s1")
    assert [(e["trigger"], e["stream"], e["t_start"], e["t_end"]) for e in data["events"]] == [
        ("planted", "mic", 7.0, 12.0)]
    assert "<b>planted</b> (stored events, calibrated)" in render_timeline(data)


def test_a_table_not_in_the_agreed_layout_is_left_out_of_the_timeline(store_uri, caplog) -> None:
    lancedb.connect(str(store_uri)).create_table(CAPTIONS, pa.table({"session": ["s1"], "words": ["hello"]}))
    data = store_timeline(EmbeddingStore.open(str(store_uri)), "imagebind_tiny", "s1", _setup())
    assert data["captions"] == [] and len(data["events"]) == 2
    assert "table 'captions' cannot be read" in caplog.text


def test_an_hour_at_one_window_a_second_from_a_store_stays_under_8_mb(tmp_path) -> None:
    """The worst case: noise thumbnails of every vision window at the stored size, six lanes
    scored by two triggers, a caption every 3 s (and events now and then: each adds ~130 bytes)."""
    rng = np.random.default_rng(0)
    uri, n = tmp_path / "hour", 3600
    store = EmbeddingStore.create(str(uri), MODEL)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.upsert([_row("hour", m, m, w, vectors[w]) for m in ("vision", "audio", "imu", "depth", "thermal", "text")
                  for w in range(n)])
    noise = [base64.b64decode(jpeg_thumbnail(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), width=128, quality=3))
             for _ in range(16)]
    assert min(len(j) for j in noise) > 8_000  # larger than a stored thumbnail gets (~8 KB)
    base = {"model": "imagebind_tiny", "session": "hour"}
    put_table(uri, THUMBNAILS, THUMBNAILS_SCHEMA, [
        {**base, "stream": "vision", "modality": "vision", "window": w, "t_start": w - 1.0, "t_end": w + 1.0,
         "width": 128, "height": 96, "jpeg": noise[w % 16]} for w in range(n)])
    put_table(uri, CAPTIONS, CAPTIONS_SCHEMA, [
        {**base, "stream": "text", "modality": "text", "window": w, "t_start": w - 1.0, "t_end": w + 1.0,
         "text": "a caption of forty characters, or more " * 5} for w in range(0, n, 3)])
    setup = TriggerSetup(rules=(TriggerRule("a", on=0.4, off=0.3), TriggerRule("b", on=0.4, off=0.3)),
                         prompts={"a": {"text": PROMPT}, "b": {"vision": OTHER}})
    data = store_timeline(EmbeddingStore.open(str(uri)), "imagebind_tiny", "hour", setup)
    size = len(render_timeline(data).encode())
    print(f"one hour at 1 Hz from a store: {size / 1e6:.2f} MB")
    assert size < 8_000_000
    assert 0 < len(data["events"]) < 1000
    kept = data["thumbs"]["vision"]
    assert MAX_THUMBS // 2 < len(kept) <= MAX_THUMBS and len(data["captions"]) == n // 3
    with av.open(io.BytesIO(base64.b64decode(kept[0]["jpeg"]))) as c:
        assert next(c.decode(video=0)).width == THUMB_WIDTH  # re-encoded at the timeline's size


NO_TRIGGER = "no trigger"  # the timeline draws a session without one; `triggers` needs one


@pytest.mark.parametrize("args, says", [
    (["--text", "a red ball", "--session", "nope"], "has no session 'nope' (model imagebind_tiny); its sessions: s1"),
    ([], NO_TRIGGER + ": give --config FILE"),
    (["--video", "junk.mp4"], "--video: "),
    (["--text", "x", "--on", "0.2", "--off", "0.5"], "off (0.5) must not be above on (0.2)"),
    (["--config", "run.yaml"], NO_TRIGGER + ": give --config FILE (a run config with a triggers list) or one of "
                                            "--text, --image, --audio, --video (run.yaml has no triggers)"),
    (["--config", "run.yaml", "--text", "x"], "--config gives the triggers, --text one trigger"),
    (["--config", "bad.yaml"], "config key 'triggers[clip].video': "),
])
def test_bad_input_exits_2_with_a_message(store_uri, tmp_path, monkeypatch, capsys, args, says) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 100)
    (tmp_path / "run.yaml").write_text("sessions: [s]\nmodel: {config: imagebind_tiny}\n")
    (tmp_path / "bad.yaml").write_text("sessions: [s]\nmodel: {config: imagebind_tiny}\n"
                                       "triggers: [{name: clip, video: junk.mp4}]\n")
    for command in (["triggers", str(store_uri)], ["timeline", str(store_uri), "--out", "t.html"]):
        if command[0] == "timeline" and "--session" not in args:
            command += ["--session", "s1"]
        if command[0] == "timeline" and says.startswith(NO_TRIGGER):
            continue
        assert main(command + args) == 2, (command, args)
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
        if "junk" in str(args) or "bad" in str(args):
            assert "does not decode as video" in err


def test_a_folder_that_is_not_a_store_exits_2(tmp_path, capsys) -> None:
    assert main(["triggers", str(tmp_path), "--text", "x"]) == 2
    assert "not a bindstream store" in capsys.readouterr().err
    assert main(["timeline", str(tmp_path), "--session", "s", "--out", str(tmp_path / "t.html")]) == 2
    assert "not a bindstream store" in capsys.readouterr().err
    assert not (tmp_path / "t.html").exists()
