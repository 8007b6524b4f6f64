"""A folder given where a file is expected, or a file where a folder is, says so: 'not found'
would send the user looking for a path that is right there."""

from __future__ import annotations

from pathlib import Path

import pytest

from encoders.weights import CheckpointMissing, resolve
from pipeline.config import parse_config
from pipeline.run import curve_server_config
from pipeline.trigger_setup import load_prompts
from sinks.keys import generate_keys
from sources.errors import ConfigError


def test_a_checkpoint_that_is_a_folder_says_to_pass_the_file_in_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointMissing, match=f"checkpoint {tmp_path} is a folder; pass the .pth/.safetensors file in it"):
        resolve(tmp_path)


def test_a_trigger_example_that_is_a_folder_is_refused_naming_the_trigger(tmp_path: Path) -> None:
    cfg = parse_config({"sessions": ["x"], "triggers": [{"name": "door", "image": str(tmp_path)}]})
    with pytest.raises(ConfigError, match=rf"config key 'triggers\[door\]\.image': {tmp_path} is a folder, "
                                          "expected an example image file"):
        load_prompts(cfg)


def test_curve_key_paths_of_the_wrong_kind_name_the_key_and_the_kind(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    written = generate_keys(keys, ["alice"])

    def refused(secret: Path, clients: Path) -> str:
        cfg = parse_config({"sessions": ["x"], "publish": {"curve": {"server_secret_key": str(secret),
                                                                     "authorized_clients": str(clients)}}})
        with pytest.raises(ConfigError, match="config key 'publish.curve'") as exc:
            curve_server_config(cfg)
        return str(exc.value)

    clients = next(p for p in keys.rglob("*.key") if "alice" in p.name)
    assert f"allowed CurveZMQ client keys directory {clients} is a file, expected the folder" in refused(
        written["server"], clients)
    assert f"CurveZMQ key file {keys} is a folder, expected a key file" in refused(keys, clients.parent)
