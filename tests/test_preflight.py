"""What a Ray started on this machine could never place (a GPU it lacks, a cluster's custom
resources) and a timeline page that could never be written are config errors naming the key,
found before Ray starts: otherwise Ray waits for a node that never comes and the run hangs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import parse_config
from pipeline.preflight import check_local_placement, check_timeline_path
from sources.errors import ConfigError


def _cfg(**sections):
    return parse_config({"sessions": ["x"], **sections})


@pytest.mark.parametrize("sections, device, gpus, message", [
    ({"model": {"device": "cuda"}}, "cuda", 0,
     "'model.device': cuda asked for, but this machine has no GPU that torch can use; use model.device: auto"),
    ({"model": {"device": "cuda:1"}}, "cuda:1", 1,
     "'model.device': cuda:1 asked for, but this machine has 1 GPU(s) (cuda:0 to cuda:0)"),
    ({"encoders": {"num_gpus": 1}}, "cpu", 0, "'encoders.num_gpus': 1 encoder(s) x 1 GPU(s) need 1 GPU(s), this machine has 0"),
    ({"encoders": {"num_gpus": "auto", "replicas": 3}}, "cuda", 2,
     "'encoders.num_gpus': 3 encoder(s) x 1 GPU(s) need 3 GPU(s), this machine has 2; lower encoders.num_gpus"),
    ({"ray": {"encoder_resources": {"gpu_node": 1, "big": 2}}}, "cpu", 0,
     "'ray.encoder_resources': custom resources (big, gpu_node) exist only on the nodes of a Ray cluster"),
    ({"ray": {"source_resources": {"camera_node": 0.5}}}, "cpu", 0, "'ray.source_resources': custom resources (camera_node)"),
])
def test_what_the_ray_started_here_cannot_place_is_refused_naming_the_key(sections, device, gpus, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        check_local_placement(_cfg(**sections), device, gpus)


@pytest.mark.parametrize("sections, device, gpus", [
    ({}, "cpu", 0),
    ({"model": {"device": "cuda"}}, "cuda", 1),
    ({"encoders": {"num_gpus": 0.5, "replicas": 2}}, "cuda:0", 1),
    ({"model": {"device": "cuda:3"}, "encoders": {"num_gpus": 0}}, "cuda:3", 4),
    ({"ray": {"publisher_resources": {"edge": 0}}}, "cpu", 0),
])
def test_what_this_machine_offers_is_accepted(sections, device, gpus) -> None:
    check_local_placement(_cfg(**sections), device, gpus)


def test_a_timeline_that_is_a_folder_or_below_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=f"config key 'timeline': {tmp_path} is a folder, expected the HTML file"):
        check_timeline_path(_cfg(timeline=str(tmp_path)))
    with pytest.raises(ConfigError, match=f"config key 'timeline': .* {tmp_path / 'a-file'} is a file"):
        check_timeline_path(_cfg(timeline=str(tmp_path / "a-file" / "t.html")))
    check_timeline_path(_cfg(timeline=str(tmp_path / "new" / "t.html")))
    check_timeline_path(_cfg())
