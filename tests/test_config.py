"""Run config validation: every mistake is a ConfigError naming the key, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config, parse_config
from sources.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "ego.yaml"])
def test_bundled_configs_are_valid(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.sessions == ["sessions/demo-ego"]
    assert cfg.publish["endpoint"] == "tcp://127.0.0.1:5555"


def test_bundled_configs_document_every_key():
    from pipeline.config import DEFAULTS

    text = (REPO / "configs" / "demo.yaml").read_text()

    def keys(d, prefix=""):
        for k, v in d.items():
            yield k
            if isinstance(v, dict):
                yield from keys(v)

    for k in keys(DEFAULTS):
        assert f"{k}:" in text, f"configs/demo.yaml does not document '{k}'"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"sessions": ["x"], "encoders": {"max_bach": 3}}, "unknown config key 'encoders.max_bach'"),
        ({"sessions": ["x"], "encoders": {"max_batch": "big"}}, "'encoders.max_batch': expected a number"),
        ({"sessions": ["x"], "encoders": {"max_batch": 0}}, "'encoders.max_batch': expected a positive"),
        ({"sessions": ["x"], "encoders": {"replicas": 1.5}}, "'encoders.replicas': expected an integer"),
        ({"sessions": ["x"], "encoders": {"prepare_ahead": "yes"}}, "'encoders.prepare_ahead': expected auto, true or false"),
        ({"sessions": ["x"], "sources": {"process": "thread"}}, "'sources.process': expected 'stream' or 'session'"),
        ({"sessions": ["x"], "window": {"hop": -1}}, "'window.hop'"),
        ({"sessions": ["x"], "window": {"spans": {"depth": {"span": 2}}}}, "window.spans.depth"),
        ({"sessions": ["x"], "window": {"release": "all"}}, "'window.release': expected 'stream' or 'window'"),
        ({"sessions": ["x"], "model": {"precision": "int4"}}, "'model.precision'"),
        ({"sessions": ["x"], "model": {"device": "tpu"}}, "'model.device'"),
        ({"sessions": ["x"], "publish": {"endpoint": "localhost"}}, "'publish.endpoint'"),
        ({"sessions": ["x"], "replay": {"rate": True}}, "'replay.rate'"),
        ({"sessions": []}, "at least one session"),
        ({"sessions": ["x"], "bogus": 1}, "unknown config key 'bogus'"),
        ({"sessions": "x"}, "'sessions': expected a list"),
        ({"sessions": ["x"], "ray": {"max_inline_bytes": 0}}, "'ray.max_inline_bytes': expected a positive"),
    ],
)
def test_bad_config_is_refused_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_config(data)


@pytest.mark.parametrize(
    "model, over, message",
    [
        ("imagebind_huge", {"window": {"spans": {"vision": {"frames": 4}}}},
         "'window.spans.vision.frames': the vision tower of imagebind_huge takes exactly 2 frames, got 4"),
        ("imagebind_tiny", {"window": {"spans": {"audio": {"span": 3.0}}}},
         "'window.spans.audio.span': the audio tower of imagebind_tiny takes clips of at most 2 s (204 frames), got 3"),
        ("imagebind_huge", {"sources": {"video_size": 112}},
         "'sources.video_size': the vision tower of imagebind_huge takes 224x224 crops, got 112"),
        ("imagebind_gigantic", {}, "'model.config': unknown model config 'imagebind_gigantic'"),
    ],
)
def test_windows_and_sources_the_tower_cannot_take_are_refused_naming_the_key_and_the_towers_value(model, over, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_config({"sessions": ["x"], "model": {"config": model}, **over})


def test_the_span_checks_read_the_configured_models_towers(tmp_path):
    """A model whose vision tower takes 4-frame clips (reference kwarg video_frames) wants 4
    frames per window, and refuses the 2 that suit the registry models."""
    model = tmp_path / "four_frames.json"
    model.write_text('{"video_frames": 4}')
    cfg = parse_config({"sessions": ["x"], "model": {"config": str(model)}, "window": {"spans": {"vision": {"frames": 4}}}})
    assert cfg.align.spans["vision"].frames == 4
    with pytest.raises(ConfigError, match=r"'window\.spans\.vision\.frames': the vision tower of four_frames takes exactly 4"):
        parse_config({"sessions": ["x"], "model": {"config": str(model)}})


def test_what_the_towers_can_take_is_accepted(caplog):
    """Shorter audio windows are zero padded (as the reference pads short clips), larger frames
    are scaled down, and an IMU window of any span is resampled over that span (with a warning
    that the tower was trained on 5 s)."""
    cfg = parse_config({"sessions": ["x"], "model": {"config": "imagebind_tiny"}, "sources": {"video_size": 448},
                        "window": {"spans": {"audio": {"span": 1.0}, "imu": {"span": 3.0}}}})
    assert cfg.align.spans["audio"].span == 1.0 and cfg.align.spans["imu"].span == 3.0
    assert "window.spans.imu.span is 3 s" in caplog.text and "as 5 s" in caplog.text


def test_malformed_yaml_and_non_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sessions: [a\n  b: :")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(p)


def test_set_overrides_apply_and_are_validated():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["replay.rate=0", "encoders.max_batch=8", "window.spans.imu.span=4"])
    assert cfg.rate == 0 and cfg.encoders["max_batch"] == 8 and cfg.align.spans["imu"].span == 4
    with pytest.raises(ConfigError, match="unknown config key 'replay.speed'"):
        load_config(REPO / "configs" / "demo.yaml", ["replay.speed=2"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(REPO / "configs" / "demo.yaml", ["replay.rate"])


@pytest.mark.parametrize("section, key", [("encoders", "max_batch"), ("replay", "rate"), ("sources", "select_frames"),
                                          ("model", "precision"), ("live", "subsample")])
def test_null_for_a_key_with_a_value_of_its_own_names_the_key(section, key):
    """`max_batch:` with nothing after it is null in YAML: the error names the key and says null,
    where the numeric check alone would fail with a TypeError (test_bad_input.py fuzzes this)."""
    with pytest.raises(ConfigError, match=rf"'{section}\.{key}': expected .*, got null"):
        parse_config({section: {key: None}})


def test_ray_started_here_inlines_call_arguments_up_to_the_configured_size():
    from pipeline.run import ray_init_kwargs

    here = ray_init_kwargs(parse_config({"sessions": ["x"], "ray": {"num_cpus": 2, "max_inline_bytes": 2_000_000}}))
    assert here["num_cpus"] == 2
    assert here["_system_config"] == {"max_direct_call_object_size": 2_000_000}
    assert ray_init_kwargs(parse_config({"sessions": ["x"]}))["_system_config"] == {
        "max_direct_call_object_size": 4 * 1024 * 1024}
    # Joining a cluster: its nodes' own settings apply (Ray refuses _system_config there).
    joined = ray_init_kwargs(parse_config({"sessions": ["x"], "ray": {"address": "auto"}}))
    assert joined["address"] == "auto" and "_system_config" not in joined


@pytest.mark.parametrize("setting, device, expected", [("auto", "cpu", False), ("auto", "cuda:0", True),
                                                        (True, "cpu", True), (False, "cuda", False)])
def test_prepare_ahead_auto_means_on_a_gpu(setting, device, expected):
    from pipeline.run import _prepare_ahead

    cfg = parse_config({"sessions": ["x"], "encoders": {"prepare_ahead": setting}})
    assert cfg.encoders["prepare_ahead"] == setting
    assert _prepare_ahead(cfg.encoders["prepare_ahead"], device) is expected
