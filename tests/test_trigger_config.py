"""Triggers in the run config and on the wire: every mistake is a config error naming the
trigger (exit 2 from the CLI, nothing started); events encode, decode, number and print as
docs/protocol.md says."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config, parse_config
from pipeline.triggers import TriggerEvent
from sinks.memory import ListSink
from sinks.protocol import ProtocolError, decode, encode_event
from sources.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _session(tmp_path: Path) -> Path:
    folder = tmp_path / "s"
    folder.mkdir(exist_ok=True)
    (folder / "captions.jsonl").write_text('{"t": 0.5, "text": "a dog barks"}\n')
    (folder / "session.yaml").write_text(
        "format: bindstream.session/1\nname: s\nstreams:\n  - {id: t, modality: text, source: captions.jsonl}\n")
    return folder


def _parse(tmp_path: Path, *triggers: dict) -> object:
    return parse_config({"sessions": [str(_session(tmp_path))], "model": {"config": "imagebind_tiny"},
                         "triggers": list(triggers)}, base_dir=tmp_path)


@pytest.mark.parametrize("trigger, message", [
    ({"name": "bark"}, r"triggers\[bark\]'.*exactly one prompt.*got none"),
    ({"name": "bark", "text": "a dog", "image": "x.jpg"}, r"triggers\[bark\]'.*exactly one prompt.*got text and image"),
    ({"name": "bark", "text": "a dog", "on": 0.2, "off": 0.3}, r"triggers\[bark\]'.*off \(0.3\) must not be above on"),
    ({"name": "bark", "text": "a dog", "on": 1.2, "off": 0.3}, r"triggers\[bark\]'.*on \(1.2\) is above 1.*never fire"),
    ({"name": "bark", "text": "a dog", "on": 0.5, "off": float("nan")}, r"triggers\[bark\]\.off'.*expected a finite number"),
    ({"name": "bark", "text": "a dog", "modalities": ["vision", "smell"]}, r"triggers\[bark\]'.*unknown modality 'smell'"),
    ({"name": "bark", "text": "a dog", "score": "zscore"}, r"triggers\[bark\]\.score'.*cosine, calibrated"),
    ({"name": "bark", "text": "a dog", "loudness": 3}, r"unknown config key 'triggers\[bark\]\.loudness'"),
    ({"name": "a/b", "text": "a dog"}, r"triggers\[a/b\]'.*not a valid topic segment"),
    ({"text": "a dog"}, r"triggers\[0\]'.*needs a 'name'"),
])
def test_bad_triggers_are_config_errors_naming_the_trigger(tmp_path: Path, trigger: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _parse(tmp_path, trigger)


def test_two_triggers_with_one_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trigger name.*used twice: bark"):
        _parse(tmp_path, {"name": "bark", "text": "a dog"}, {"name": "bark", "text": "a cat"})


def test_yaml_on_and_off_keys_and_relative_example_paths(tmp_path: Path) -> None:
    """PyYAML reads bare ``on``/``off`` as true/false; the config still means the thresholds.
    Example files resolve against the config file's folder."""
    _session(tmp_path)
    (tmp_path / "run.yaml").write_text("sessions: [s]\nmodel: {config: imagebind_tiny}\ntimeline: out/t.html\n"
                                       "triggers:\n  - {name: door, image: ex/door.jpg, on: 0.4, off: 0.35}\n")
    cfg = load_config(tmp_path / "run.yaml")
    (t,) = cfg.triggers
    assert (t.on, t.off, t.image) == (0.4, 0.35, tmp_path / "ex" / "door.jpg")
    assert cfg.timeline == tmp_path / "out" / "t.html"


def _cli(tmp_path: Path, trigger: str) -> subprocess.CompletedProcess:
    _session(tmp_path)
    (tmp_path / "run.yaml").write_text(f"sessions: [s]\nmodel: {{config: imagebind_tiny, checkpoint: none}}\n"
                                       f"triggers:\n  - {trigger}\n")
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(tmp_path / "run.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


def test_an_example_file_that_does_not_decode_exits_2_naming_the_trigger(tmp_path: Path) -> None:
    (tmp_path / "door.jpg").write_bytes(b"this is not a picture" * 10)
    out = _cli(tmp_path, "{name: door, image: door.jpg}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "config error: config key 'triggers[door].image'" in out.stderr and "does not decode" in out.stderr
    assert "Ray" not in out.stderr  # nothing started


def test_a_missing_example_file_exits_2_naming_the_trigger_and_the_file(tmp_path: Path) -> None:
    out = _cli(tmp_path, "{name: bark, audio: sounds/bark.wav}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "triggers[bark].audio" in out.stderr and str(tmp_path / "sounds" / "bark.wav") in out.stderr


def _event(kind: str = "start", **kw) -> TriggerEvent:
    fields = dict(trigger="bark", stream="mic", modality="audio", kind=kind, window=7, t_start=5.0, t_end=7.0,
                  score=0.82, reason="below_off" if kind == "end" else "")
    return TriggerEvent(**{**fields, **kw})


def test_events_go_out_on_their_topic_numbered_per_trigger() -> None:
    sink = ListSink(model_name="m")
    sink.start_session("kitchen", {"mic": "audio"}, dim=4)
    sink.publish_events("kitchen", [_event(), _event("end"), _event(trigger="door")])
    events = [m for m in sink.messages if m.kind == "trigger"]
    assert [(m.topic, m.seq, m.event) for m in events] == [
        ("evt/kitchen/bark", 0, "start"), ("evt/kitchen/bark", 1, "end"), ("evt/kitchen/door", 0, "start")]
    end = events[1].payload
    assert (end["trigger"], end["stream"], end["modality"], end["window"], end["t_start"], end["t_end"], end["score"],
            end["reason"]) == ("bark", "mic", "audio", 7, 5.0, 7.0, 0.82, "below_off")
    assert "evt/kitchen/bark" in sink.next_seqs("kitchen")  # a restarted publisher resumes these seqs too


@pytest.mark.parametrize("mutate, match", [
    (dict(event="middle"), "unknown event"),
    (dict(t_start=9.0), "t_start <= t_end"),
    (dict(score=float("nan")), "score must be finite"),
])
def test_malformed_events_are_refused(mutate: dict, match: str) -> None:
    import msgpack

    topic, payload = encode_event(session="k", trigger="bark", event="start", seq=0, stream="mic", modality="audio",
                                  window=1, t_start=1.0, t_end=2.0, score=0.5, t_publish=0.0)
    doc = {**msgpack.unpackb(payload), **mutate}
    with pytest.raises(ProtocolError, match=match):
        decode([topic, msgpack.packb(doc)])
    with pytest.raises(ProtocolError, match="does not match the topic"):
        decode([b"evt/k/door", payload])


def test_subscribe_prints_one_line_per_event() -> None:
    from pipeline.subscribe import format_message

    sink = ListSink(model_name="m")
    sink.start_session("kitchen", {"mic": "audio"}, dim=4)
    sink.publish_events("kitchen", [_event("end")])
    line = format_message(sink.messages[-1])
    assert line == ("evt/kitchen/bark seq=0 end (below_off) trigger=bark stream=mic audio window=7 "
                    "t=[5.000,7.000] score=0.820")
    out = io.StringIO()
    out.write(format_message(sink.messages[-1], json_out=True))
    assert '"trigger":"bark"' in out.getvalue() and '"event":"end"' in out.getvalue()
