"""Arguments a command cannot use are refused up front: exit 2, a message naming the flag or the
file and what is expected, no traceback. The CLI is called in-process (``pipeline.__main__.main``);
stores are written by hand (real LanceDB folders, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.__main__ import main


def _refused(capsys, *argv: str, says: list[str]) -> str:
    """Run the CLI; assert exit 2, every text of ``says`` on stderr, and no traceback."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    for text in says:
        assert text in err, err
    return err


# -- subscribe -------------------------------------------------------------------------------------

@pytest.fixture
def no_connect(monkeypatch) -> None:
    """A subscriber that got as far as connecting fails the test at once instead of waiting."""
    def connected(*args, **kwargs):
        raise AssertionError("subscribe connected instead of refusing")
    monkeypatch.setattr("pipeline.subscribe.subscribe", connected)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_subscribe_refuses_a_timeout_that_is_not_a_finite_number_of_seconds(no_connect, capsys, value: str) -> None:
    _refused(capsys, "subscribe", "tcp://127.0.0.1:5555", "--timeout", value,
             says=["--timeout", f"got '{value}'", "0 or more"])


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_subscribe_refuses_a_count_below_one(no_connect, capsys, value: str) -> None:
    _refused(capsys, "subscribe", "tcp://127.0.0.1:5555", "--count", value, says=["--count", f"'{value}'"])


def test_subscribe_to_a_host_that_does_not_resolve_exits_2_naming_the_host(no_connect, capsys) -> None:
    _refused(capsys, "subscribe", "tcp://nosuchhost.invalid:5555", "--count", "1",
             says=["'nosuchhost.invalid' does not resolve"])


def test_subscribe_to_an_ipc_path_in_a_missing_folder_exits_2_naming_the_folder(no_connect, tmp_path: Path,
                                                                                  capsys) -> None:
    folder = tmp_path / "nope"
    _refused(capsys, "subscribe", f"ipc://{folder}/bs.sock", "--count", "1",
             says=[f"folder {folder} does not exist"])


def test_subscribe_with_a_folder_as_key_file_says_it_is_a_folder(no_connect, tmp_path: Path, capsys) -> None:
    (tmp_path / "me.key_secret").write_text("not read")
    _refused(capsys, "subscribe", "tcp://127.0.0.1:5555", "--server-key", str(tmp_path),
             "--client-key", str(tmp_path / "me.key_secret"),
             says=[f"--server-key {tmp_path} is a folder, expected a file"])
