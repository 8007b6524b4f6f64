"""Session files and run configs that would hang, exhaust memory or silently mean something
else are refused with a ConfigError that names the file and the line and quotes little."""

from __future__ import annotations

from pathlib import Path

import pytest

from sources.errors import ConfigError
from sources.session import load_session
from sources.yamlfile import MAX_YAML_BYTES, load_yaml

GOOD = """format: bindstream.session/1
name: s1
streams:
  - {id: t, modality: text, source: captions.jsonl}
"""


def _session(tmp_path: Path, text: str | bytes) -> Path:
    (tmp_path / "captions.jsonl").write_text('{"t": 0.5, "text": "hi"}\n')
    data = text.encode() if isinstance(text, str) else text
    (tmp_path / "session.yaml").write_bytes(data)
    return tmp_path


def _refused(tmp_path: Path, text: str | bytes) -> str:
    with pytest.raises(ConfigError) as exc:
        load_session(_session(tmp_path, text))
    msg = str(exc.value)
    assert str(tmp_path / "session.yaml") in msg
    assert len(msg) < 400, "the message must not quote the document"
    return msg


def test_a_good_session_still_loads(tmp_path: Path) -> None:
    spec = load_session(_session(tmp_path, GOOD))
    assert spec.name == "s1" and [s.id for s in spec.streams] == ["t"]


def test_an_alias_bomb_in_the_description_is_refused_at_once(tmp_path: Path) -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = "\n".join(levels) + "\n"
    msg = _refused(tmp_path, bomb + GOOD.replace("name: s1", "name: s1\ndescription: *a8"))
    assert "aliases" in msg and "line 2" in msg


def test_a_key_given_twice_is_refused_naming_the_key_and_line(tmp_path: Path) -> None:
    msg = _refused(tmp_path, GOOD + "name: s2\n")
    assert "'name' is given twice" in msg and "line 5" in msg


def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path: Path) -> None:
    msg = _refused(tmp_path, GOOD + "description: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert "nested deeper than 32 levels" in msg


def test_bytes_that_are_not_utf8_are_refused_naming_the_byte(tmp_path: Path) -> None:
    msg = _refused(tmp_path, GOOD.encode() + b"description: caf\xe9\n")
    assert "not UTF-8" in msg and "0xe9" in msg


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    msg = _refused(tmp_path, GOOD + "description: " + "x" * (MAX_YAML_BYTES + 10) + "\n")
    assert "over the limit" in msg


def test_a_long_value_is_quoted_as_a_short_prefix(tmp_path: Path) -> None:
    msg = _refused(tmp_path, GOOD.replace("name: s1", "name: " + "y" * 5000))
    assert "yyy..." in msg and "y" * 100 not in msg


@pytest.mark.parametrize("name", ["..", ".hidden", "-x", "n" * 129])
def test_session_names_that_cannot_be_topics_or_folders_are_refused(tmp_path: Path, name: str) -> None:
    msg = _refused(tmp_path, GOOD.replace("name: s1", f"name: '{name}'"))
    assert "key 'name'" in msg and "starting with a letter or digit" in msg


@pytest.mark.parametrize("sid", ["..", "s" * 4097])
def test_stream_ids_that_cannot_be_folders_are_refused(tmp_path: Path, sid: str) -> None:
    msg = _refused(tmp_path, GOOD.replace("id: t,", f"id: '{sid}',"))
    assert "key 'id'" in msg


def test_malformed_yaml_names_the_line_without_quoting_it() -> None:
    with pytest.raises(ConfigError) as exc:
        load_yaml("a: [1, 2\nb: " + "z" * 10_000, "cfg.yaml")
    assert str(exc.value).startswith("cfg.yaml: malformed YAML: line") and len(str(exc.value)) < 300


def _run_config(tmp_path: Path, text: str | bytes) -> str:
    from pipeline.config import load_config

    path = tmp_path / "run.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value) and len(str(exc.value)) < 400
    return str(exc.value)


def test_a_second_model_key_in_a_run_config_is_refused(tmp_path: Path) -> None:
    msg = _run_config(tmp_path, "sessions: [s]\nmodel: {config: imagebind_tiny, checkpoint: none}\n"
                                "model: {config: imagebind_huge}\n")
    assert "'model' is given twice" in msg and "line 3" in msg


def test_an_alias_bomb_in_replay_rate_is_refused_at_once(tmp_path: Path) -> None:
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    msg = _run_config(tmp_path, "\n".join(levels) + "\nsessions: [s]\nreplay: {rate: *a8}\n")
    assert "aliases" in msg


def test_a_run_config_that_is_not_utf8_or_too_deep_is_refused(tmp_path: Path) -> None:
    assert "not UTF-8" in _run_config(tmp_path, b"sessions: [s\xff]\n")
    assert "nested deeper" in _run_config(tmp_path, "sessions: " + "[" * 100_000 + "]" * 100_000 + "\n")


def test_a_named_pipe_or_a_folder_as_the_config_is_refused_at_once(tmp_path: Path) -> None:
    """Opening a named pipe for reading waits for a writer: the run would hang before it starts.
    (Should it wait, a writer comes after 10 s, so this test fails instead of hanging.)"""
    import os
    import threading

    from pipeline.config import load_config

    fifo = tmp_path / "run.yaml"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock() -> None:
        if not done.wait(10):
            os.close(os.open(fifo, os.O_WRONLY))

    threading.Thread(target=unblock, daemon=True).start()
    try:
        with pytest.raises(ConfigError, match="not a regular file") as exc:
            load_config(fifo)
    finally:
        done.set()
    assert str(fifo) in str(exc.value)
    with pytest.raises(ConfigError, match="not a regular file|Is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize("text, value", [("1e-9", 1e-9), ("2E3", 2000.0), ("-1.5e+2", -150.0), ("1.0e-9", 1e-9),
                                         ("'1e-9'", "1e-9"), ("1e", "1e")])
def test_numbers_in_scientific_notation_are_numbers(text: str, value: object) -> None:
    """PyYAML's YAML 1.1 reads 1e-9 as a string, which a numeric key then refuses; YAML 1.2 and
    JSON read it as a number, as a user writing a tolerance expects."""
    assert load_yaml(f"x: {text}\n", "cfg.yaml") == {"x": value}


def test_a_duration_in_scientific_notation_configures_the_run(tmp_path: Path) -> None:
    from pipeline.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("sessions: [s]\nstop_after: 3e2\nencoders: {max_wait_ms: 5e0}\n")
    cfg = load_config(path)
    assert cfg.stop_after == 300.0 and cfg.encoders.max_wait_ms == 5.0
