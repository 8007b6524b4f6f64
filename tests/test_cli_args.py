"""Arguments a command cannot use are refused up front: exit 2, a message naming the flag or the
file and what is expected, no traceback. The CLI is called in-process (``pipeline.__main__.main``);
stores are written by hand (real LanceDB folders, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
    """A subscriber (or store) that got as far as connecting fails the test at once instead of waiting."""
    def connected(*args, **kwargs):
        raise AssertionError("subscribe connected instead of refusing")
    monkeypatch.setattr("pipeline.subscribe.subscribe", connected)
    monkeypatch.setattr("pipeline.storage.consume", connected)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_subscribe_refuses_a_timeout_that_is_not_a_finite_number_of_seconds(no_connect, capsys, value: str) -> None:
    _refused(capsys, "subscribe", "tcp://127.0.0.1:5555", "--timeout", value,
             says=["--timeout", f"got '{value}'", "0 or more"])


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_subscribe_refuses_a_count_below_one(no_connect, capsys, value: str) -> None:
    _refused(capsys, "subscribe", "tcp://127.0.0.1:5555", "--count", value, says=["--count", f"'{value}'"])


def test_subscribe_to_a_host_that_does_not_resolve_exits_2_naming_the_host(no_connect, monkeypatch, capsys) -> None:
    """The resolver answers 'unknown name' here without a lookup: tests send nothing beyond 127.0.0.1."""
    import socket

    def unknown(host, *args, **kwargs):
        assert host == "nosuchhost.invalid"
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr("pipeline.subscribe.socket.getaddrinfo", unknown)
    _refused(capsys, "subscribe", "tcp://nosuchhost.invalid:5555", "--count", "1",
             says=["'nosuchhost.invalid' does not resolve"])
    _refused(capsys, "store", "tcp://nosuchhost.invalid:5555", "--uri", "unused",
             says=["'nosuchhost.invalid' does not resolve"])


def test_subscribe_to_an_ipc_path_in_a_missing_folder_exits_2_naming_the_folder(no_connect, tmp_path: Path,
                                                                                  capsys) -> None:
    folder = tmp_path / "nope"
    _refused(capsys, "subscribe", f"ipc://{folder}/bs.sock", "--count", "1",
             says=[f"folder {folder} does not exist"])
    _refused(capsys, "store", f"ipc://{folder}/bs.sock", "--uri", str(tmp_path / "store"),
             says=[f"folder {folder} does not exist"])
    assert not (tmp_path / "store").exists()


def test_subscribe_with_a_folder_as_key_file_says_it_is_a_folder(no_connect, tmp_path: Path, capsys) -> None:
    (tmp_path / "me.key_secret").write_text("not read")
    _refused(capsys, "subscribe", "tcp://127.0.0.1:5555", "--server-key", str(tmp_path),
             "--client-key", str(tmp_path / "me.key_secret"),
             says=[f"--server-key {tmp_path} is a folder, expected a file"])


# -- demo-session ----------------------------------------------------------------------------------

@pytest.fixture
def no_writing(monkeypatch) -> None:
    """A demo session that got as far as being written fails the test at once (writing takes seconds)."""
    def written(*args, **kwargs):
        raise AssertionError("demo-session wrote instead of refusing")
    monkeypatch.setattr("sources.demo.write_demo_session", written)


@pytest.mark.parametrize("flag, value, says", [
    ("--seed", "-1", "from 0 to 4294967295"),
    ("--seed", str(2**32), "from 0 to 4294967295"),
    ("--name", "a b/c", "expected a session name"),
    ("--name", "", "expected a session name"),
    ("--seconds", "1e9", "at most 3600"),
    ("--seconds", "nan", "positive number of seconds"),
    ("--seconds", "inf", "positive number of seconds"),
    ("--seconds", "0", "positive number of seconds"),
])
def test_demo_session_refuses_a_flag_out_of_range(no_writing, tmp_path: Path, capsys, flag: str, value: str,
                                                  says: str) -> None:
    _refused(capsys, "demo-session", str(tmp_path / "d"), flag, value, says=[f"argument {flag}", says])
    assert not (tmp_path / "d").exists()


def test_demo_session_refuses_an_empty_folder_argument(no_writing, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    _refused(capsys, "demo-session", "", says=["DIR is an empty string"])
    assert not list(tmp_path.iterdir())


def test_demo_session_leaves_a_folder_that_holds_anything_untouched(no_writing, tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    _refused(capsys, "demo-session", str(tmp_path), says=[f"{tmp_path} exists and is not empty",
                                                          "pick a new folder or remove it"])
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_demo_session_into_a_file_says_it_is_a_file(no_writing, tmp_path: Path, capsys) -> None:
    (tmp_path / "f").write_text("mine")
    _refused(capsys, "demo-session", str(tmp_path / "f"), says=[f"{tmp_path / 'f'} is a file, expected a folder"])


def test_write_demo_session_refuses_a_seed_numpy_cannot_take_and_a_bad_name(tmp_path: Path) -> None:
    from sources.demo import write_demo_session

    with pytest.raises(ValueError, match="seed must be from 0 to 4294967295"):
        write_demo_session(tmp_path / "d", seconds=1.0, seed=-1)
    with pytest.raises(ValueError, match="name must be"):
        write_demo_session(tmp_path / "d", seconds=1.0, name="a b/c")
    assert not (tmp_path / "d").exists()


# -- search ----------------------------------------------------------------------------------------

DIM = 32
MODEL = {"model": "imagebind_tiny", "dim": DIM, "config": "imagebind_tiny", "checkpoint": "none", "seed": 0,
         "precision": "fp32"}


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> Path:
    """Sessions 's1' and 's2': 3 vision windows each."""
    from sinks.store import EmbeddingStore, StoreRow

    uri = tmp_path_factory.mktemp("search") / "store"
    vec = np.eye(DIM, dtype=np.float32)[0]
    EmbeddingStore.create(str(uri), MODEL).upsert(
        [StoreRow("imagebind_tiny", s, "cam", "vision", w, w - 1.0, w + 1.0, vec, 0.0) for s in ("s1", "s2")
         for w in range(3)])
    return uri


@pytest.fixture
def no_query(monkeypatch) -> None:
    """A search that got as far as encoding its query fails the test at once (no model is built)."""
    def encoded(*args, **kwargs):
        raise AssertionError("search encoded the query instead of refusing")
    monkeypatch.setattr("pipeline.search.Store.encode", encoded)


def test_search_refuses_between_whose_start_is_after_its_end(no_query, store_uri: Path, capsys) -> None:
    _refused(capsys, "search", str(store_uri), "--text", "a dog", "--between", "5", "1",
             says=["--between 5 1: T0 is after T1"])


def test_search_for_a_session_the_store_does_not_hold_lists_the_ones_it_holds(no_query, store_uri: Path,
                                                                               capsys) -> None:
    _refused(capsys, "search", str(store_uri), "--text", "a dog", "--session", "s1", "--session", "nope",
             says=["--session 'nope'", "its sessions: s1, s2"])


@pytest.mark.parametrize("value", ["nan", "-5", "inf", "2.5"])
def test_search_refuses_a_margin_outside_0_to_2(no_query, store_uri: Path, capsys, value: str) -> None:
    _refused(capsys, "search", str(store_uri), "--text", "a dog", "--margin", value,
             says=["argument --margin", "from 0 to 2", f"'{value}'"])


def test_store_search_refuses_a_margin_outside_0_to_2(store_uri: Path) -> None:
    from pipeline.search import QueryError, Store

    with pytest.raises(QueryError, match="margin must be from 0 to 2"):
        Store(store_uri).search(vector=np.eye(DIM, dtype=np.float32)[0], margin=float("nan"))


# -- a folder where a file is expected, and a file where a folder is --------------------------------

@pytest.mark.parametrize("command", ["search", "triggers"])
@pytest.mark.parametrize("flag", ["--image", "--audio", "--video"])
def test_a_folder_as_query_or_example_file_says_it_is_a_folder(no_query, store_uri: Path, tmp_path: Path, capsys,
                                                               command: str, flag: str) -> None:
    _refused(capsys, command, str(store_uri), flag, str(tmp_path), says=[f"{flag} {tmp_path} is a folder, expected a file"])


@pytest.mark.parametrize("command", [["search", "--text", "a dog"], ["triggers", "--text", "a dog"],
                                     ["timeline", "--session", "s1", "--out", "t.html"]])
def test_a_file_given_as_the_store_says_it_is_a_file(tmp_path: Path, monkeypatch, capsys, command: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a store")
    _refused(capsys, command[0], str(tmp_path / "notes.txt"), *command[1:],
             says=[f"{tmp_path / 'notes.txt'} is a file, expected a store folder"])


# -- import-bag ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["3\n", "rosbag2_bagfile_information: 3\n", "- a\n- b\n", "other: {}\n"])
def test_import_bag_of_a_folder_whose_metadata_is_not_a_rosbag2_mapping_names_the_file(tmp_path: Path, capsys,
                                                                                        text: str) -> None:
    bag = tmp_path / "rec"
    bag.mkdir()
    (bag / "metadata.yaml").write_text(text)
    _refused(capsys, "import-bag", str(bag), "--out", str(tmp_path / "out"),
             says=[f"{bag / 'metadata.yaml'} is not a rosbag2 metadata mapping"])
    assert not (tmp_path / "out").exists()
