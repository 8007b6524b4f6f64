"""Bag streams through the real Ray graph: ROS 1, ROS 2 (sqlite3 and MCAP) bags and a plain .mcap
file, written with rosbags from the real recordings in ../shared/fixtures/real, give the same
windows and embeddings as the plain sessions (video, CSV, PNG folder) holding the same samples
at the same times; import-bag's sessions replay without edits; a truncated bag fails its stream
only (exit 3) after the messages before the damage.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bag_files  # noqa: E402

from sources.errors import ConfigError  # noqa: E402
from sources.session import load_session  # noqa: E402

pytestmark = pytest.mark.skipif(not (bag_files.REAL / "realshort.mp4").is_file(),
                                reason=f"real recordings not found in {bag_files.REAL} (../shared is absent)")

TOPICS = ("/camera/image", "/imu/data", "/depth/image_raw")
# Windows every 0.25 s over the 1.2 s clip and 3 s of IMU and depth.
WINDOW = {"hop": 0.25, "spans": {"vision": {"span": 0.5}, "imu": {"span": 1.0}}}


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    root = tmp_path_factory.mktemp("bags")
    media = bag_files.Media(root)
    out = {"plain-raw": bag_files.write_plain_session(root / "plain-raw", media, "plain-raw", jpeg=False),
           "plain-jpeg": bag_files.write_plain_session(root / "plain-jpeg", media, "plain-jpeg", jpeg=True)}
    for name, source in (("ros1", "rec.bag"), ("sqlite", "rec"), ("mcap", "rec")):
        d = root / name
        d.mkdir()
        if name == "ros1":
            bag_files.write_ros1_bag(d / source, media)
        else:
            bag_files.write_ros2_bag(d / source, media, name)
        (d / "session.yaml").write_text(bag_files.bag_session_yaml(name, source, *TOPICS))
        out[name] = d
    return root, out


# Which plain session holds the same frames: the JPEG bag's is the MJPEG video of its payloads.
REFERENCE = {"ros1": "plain-raw", "sqlite": "plain-jpeg", "mcap": "plain-raw",
             "imported-ros1": "plain-raw", "imported-sqlite": "plain-jpeg", "imported-mcap": "plain-raw"}


def _by_session(messages):
    out: dict[str, dict] = {}
    for m in messages:
        if m.topic.startswith("emb/"):
            from sinks.protocol import embedding_array

            key = (m.payload["modality"], m.payload["window"])
            per = out.setdefault(m.payload["session"], {})
            assert key not in per, f"duplicate embedding {m.payload['session']} {key}"
            per[key] = embedding_array(m)
    return out


@pytest.fixture(scope="module")
def replayed(sessions, ray_cluster):
    """One run of the plain sessions, the bag sessions and import-bag's sessions of each bag
    (a .bag file, a ROS 2 sqlite3 folder, the MCAP bag's .mcap file on its own)."""
    from sources.bagimport import import_bag
    from test_pipeline_e2e import _replay

    root, dirs = sessions
    imported = {}
    for name, bag in (("ros1", dirs["ros1"] / "rec.bag"), ("sqlite", dirs["sqlite"] / "rec"),
                      ("mcap", dirs["mcap"] / "rec" / "rec.mcap")):
        yaml_path, written, _ = import_bag(bag, root / f"imported-{name}", name=f"imported-{name}")
        assert len(written) == 3
        imported[f"imported-{name}"] = yaml_path.parent
    order = ["plain-raw", "plain-jpeg", "ros1", "sqlite", "mcap", *imported]
    all_dirs = {**dirs, **imported}
    result, messages = _replay([all_dirs[n] for n in order], window=WINDOW)
    return result, _by_session(messages)


def test_bag_sessions_publish_every_window_with_the_plain_sessions_embeddings(replayed):
    result, emb = replayed
    assert result.exit_code == 0
    for name in ("ros1", "sqlite", "mcap"):
        ref = emb[REFERENCE[name]]
        assert sorted(emb[name]) == sorted(ref), name
        counts = {m: sum(1 for k in ref if k[0] == m) for m in ("vision", "imu", "depth")}
        assert min(counts.values()) >= 4, counts
        for key, vec in ref.items():
            np.testing.assert_allclose(emb[name][key], vec, atol=1e-5, err_msg=f"{name} {key}")


def test_import_bag_sessions_replay_without_edits(replayed, sessions):
    result, emb = replayed
    root, _ = sessions
    assert result.exit_code == 0
    for name in ("imported-ros1", "imported-sqlite", "imported-mcap"):
        spec = load_session(root / name)
        assert {s.modality for s in spec.streams} == {"vision", "imu", "depth"}
        assert all(s.source.resolve().is_relative_to(spec.root) for s in spec.streams)
        ref = emb[REFERENCE[name]]
        assert sorted(emb[name]) == sorted(ref), name
        for key, vec in ref.items():
            np.testing.assert_allclose(emb[name][key], vec, atol=1e-5, err_msg=f"{name} {key}")


def test_imported_session_references_the_bag_without_copying(sessions, tmp_path):
    from sources.bagimport import import_bag

    _, dirs = sessions
    bag = dirs["ros1"] / "rec.bag"
    yaml_path, _, _ = import_bag(bag, tmp_path / "s")
    linked = tmp_path / "s" / "rec.bag"
    assert linked.stat().st_ino == bag.stat().st_ino  # the same file, hard-linked
    # A bag inside the session folder is referenced by its relative path; nothing is linked.
    (tmp_path / "outer" / "rec").mkdir(parents=True)
    shutil.copy(bag, tmp_path / "outer" / "rec" / "rec.bag")
    inside, _, _ = import_bag(tmp_path / "outer" / "rec" / "rec.bag", tmp_path / "outer")
    assert 'source: "rec/rec.bag"' in inside.read_text()
    assert (tmp_path / "outer" / "rec" / "rec.bag").stat().st_nlink == 1


def test_truncated_bag_fails_its_stream_after_the_messages_before_the_damage(sessions, ray_cluster, tmp_path):
    from test_pipeline_e2e import _replay

    _, dirs = sessions
    runs = []
    for name, src in (("cut-ros1", dirs["ros1"] / "rec.bag"), ("cut-mcap", dirs["mcap"] / "rec" / "rec.mcap")):
        d = tmp_path / name
        d.mkdir()
        data = src.read_bytes()
        (d / src.name).write_bytes(data[:int(len(data) * 0.6)])
        shutil.copy(dirs["plain-raw"] / "imu.csv", d / "imu.csv")
        (d / "session.yaml").write_text(
            f"format: bindstream.session/1\nname: {name}\nstreams:\n"
            f"  - {{id: cam, modality: vision, source: {src.name}, topic: /camera/image}}\n"
            "  - {id: imu, modality: imu, source: imu.csv, columns: {t: t, ax: ax, ay: ay, az: az, gx: gx, gy: gy, gz: gz}}\n")
        runs.append(d)
    result, messages = _replay(runs, window=WINDOW)
    assert result.exit_code == 3
    emb = _by_session(messages)
    for d, s in zip(runs, result.sessions):
        errors = s["errors"]
        assert set(errors) == {"cam"}, errors
        assert "stream 'cam'" in errors["cam"] and "byte offset" in errors["cam"], errors["cam"]
        vision = [k for k in emb[d.name] if k[0] == "vision"]
        imu = [k for k in emb[d.name] if k[0] == "imu"]
        assert vision, "the frames before the damage were published"
        assert len(imu) >= 10, "the IMU stream ran to its end"


def test_missing_topic_and_unsupported_encoding_are_config_errors_naming_the_topic(sessions, tmp_path):
    _, dirs = sessions
    d = dirs["ros1"]
    (d / "bad.yaml").write_text("format: bindstream.session/1\nname: bad\nstreams:\n"
                                "  - {id: cam, modality: vision, source: rec.bag, topic: /nope}\n")
    with pytest.raises(ConfigError, match=r"no topic '/nope'.*/camera/image \(sensor_msgs/Image\)"):
        load_session(d / "bad.yaml")
    (d / "bad.yaml").write_text("format: bindstream.session/1\nname: bad\nstreams:\n"
                                "  - {id: d, modality: thermal, source: rec.bag, topic: /imu/data}\n")
    with pytest.raises(ConfigError, match=r"'/imu/data'.*sensor_msgs/Imu carries imu, not thermal"):
        load_session(d / "bad.yaml")
    (d / "bad.yaml").write_text("format: bindstream.session/1\nname: bad\nstreams:\n"
                                "  - {id: d, modality: depth, source: rec.bag, topic: /camera/image}\n")
    with pytest.raises(ConfigError, match=r"'/camera/image'.*encoding 'bgr8' is not supported for depth "
                                          r"\(supported: 16UC1, 32FC1\)"):
        load_session(d / "bad.yaml")
    (d / "bad.yaml").unlink()
