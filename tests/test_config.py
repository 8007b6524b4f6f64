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
        ({"sessions": ["x"], "window": {"spans": {"vision": {"frames": 4}}}}, "exactly 2 frames"),
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
