"""Bag streams through the real Ray graph: ROS 1, ROS 2 (sqlite3 and MCAP) bags and a plain .mcap
file, written with rosbags from the real recordings in ../shared/fixtures/real, give the same
windows and embeddings as the plain sessions (video, CSV, PNG folder) holding the same samples
at the same times; import-bag's sessions replay without edits; a truncated bag fails its stream
only (exit 3) after the messages before the damage.
"""

from __future__ import annotations

import re
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
WINDOW = {"hop": 0.25, "spans": {"vision": {"span": 0.5}}}


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


def _cut_sessions(root: Path, dirs: dict) -> dict[str, Path]:
    """Sessions reading a ROS 1 bag and an .mcap file cut at 60 % (a recorder killed mid-way),
    each with an IMU CSV stream beside the bag stream."""
    out = {}
    for name, src in (("cut-ros1", dirs["ros1"] / "rec.bag"), ("cut-mcap", dirs["mcap"] / "rec" / "rec.mcap")):
        d = root / name
        d.mkdir()
        data = src.read_bytes()
        (d / src.name).write_bytes(data[:int(len(data) * 0.6)])
        shutil.copy(dirs["plain-raw"] / "imu.csv", d / "imu.csv")
        (d / "session.yaml").write_text(
            f"format: bindstream.session/1\nname: {name}\nstreams:\n"
            f"  - {{id: cam, modality: vision, source: {src.name}, topic: /camera/image}}\n"
            "  - {id: imu, modality: imu, source: imu.csv, columns: {t: t, ax: ax, ay: ay, az: az, gx: gx, gy: gy, gz: gz}}\n")
        out[name] = d
    return out


@pytest.fixture(scope="module")
def replayed(sessions, ray_cluster):
    """One run (one Ray start) of the plain sessions, the bag sessions, import-bag's sessions of
    each bag (a .bag file, a ROS 2 sqlite3 folder, the MCAP bag's .mcap file on its own) and the
    sessions of truncated bags. Returns the run's result, its sessions' results by name and the
    embeddings by session."""
    from sources.bagimport import import_bag
    from test_pipeline_e2e import _replay

    root, dirs = sessions
    imported = {}
    for name, bag in (("ros1", dirs["ros1"] / "rec.bag"), ("sqlite", dirs["sqlite"] / "rec"),
                      ("mcap", dirs["mcap"] / "rec" / "rec.mcap")):
        yaml_path, written, _ = import_bag(bag, root / f"imported-{name}", name=f"imported-{name}")
        assert len(written) == 3
        imported[f"imported-{name}"] = yaml_path.parent
    cut = _cut_sessions(root, dirs)
    order = ["plain-raw", "plain-jpeg", "ros1", "sqlite", "mcap", *imported, *cut]
    all_dirs = {**dirs, **imported, **cut}
    result, messages = _replay([all_dirs[n] for n in order], window=WINDOW)
    return result, dict(zip(order, result.sessions)), _by_session(messages)


def _clean(by_name: dict, names) -> None:
    for name in names:
        assert not by_name[name]["errors"], (name, by_name[name]["errors"])


def test_bag_sessions_publish_every_window_with_the_plain_sessions_embeddings(replayed):
    _, by_name, emb = replayed
    _clean(by_name, ["plain-raw", "plain-jpeg", "ros1", "sqlite", "mcap"])
    for name in ("ros1", "sqlite", "mcap"):
        ref = emb[REFERENCE[name]]
        assert sorted(emb[name]) == sorted(ref), name
        counts = {m: sum(1 for k in ref if k[0] == m) for m in ("vision", "imu", "depth")}
        assert min(counts.values()) >= 4, counts
        for key, vec in ref.items():
            np.testing.assert_allclose(emb[name][key], vec, atol=1e-5, err_msg=f"{name} {key}")


def test_import_bag_sessions_replay_without_edits(replayed, sessions):
    _, by_name, emb = replayed
    root, _ = sessions
    _clean(by_name, ["imported-ros1", "imported-sqlite", "imported-mcap"])
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


def test_truncated_bag_fails_its_stream_after_the_messages_before_the_damage(replayed):
    result, by_name, emb = replayed
    assert result.exit_code == 3  # the cut sessions' bag streams failed; everything else ran clean
    for name in ("cut-ros1", "cut-mcap"):
        errors = by_name[name]["errors"]
        assert set(errors) == {"cam"}, errors
        assert "stream 'cam'" in errors["cam"] and "byte offset" in errors["cam"], errors["cam"]
        vision = [k for k in emb[name] if k[0] == "vision"]
        imu = sorted(k for k in emb[name] if k[0] == "imu")
        assert vision, "the frames before the damage were published"
        # Windows that end before the last frame read hold the same frames as the plain session's.
        read = int(re.search(r"ended after (\d+) messages", errors["cam"]).group(1))
        t_last = (bag_files.T0_MS + round((read - 1) * 1000 / 30)) / 1000
        whole = [k for k in vision if bag_files.T0_MS / 1000 + (k[1] + 1) * WINDOW["hop"] <= t_last]
        assert len(whole) >= 2, (vision, t_last)
        for key in whole:
            np.testing.assert_allclose(emb[name][key], emb["plain-raw"][key], atol=1e-5, err_msg=f"{name} {key}")
        assert imu == sorted(k for k in emb["plain-raw"] if k[0] == "imu"), "the IMU stream ran to its end"


@pytest.mark.parametrize("name", ["ros1", "sqlite", "mcap"])
def test_frame_selection_decodes_only_the_frames_windows_pick_as_video_does(sessions, name):
    from pipeline.align import AlignConfig
    from pipeline.selection import frame_selector
    from sources.replay import open_source

    _, dirs = sessions
    config = AlignConfig(hop=0.25, origin=0.5)
    kept = {}
    for which in (name, REFERENCE[name]):
        for stream in ("cam", "depth"):
            select = frame_selector("vision" if stream == "cam" else "depth", config)
            chunks = list(open_source(load_session(dirs[which]).stream(stream), chunk_seconds=0.5, select=select))
            kept[which, stream] = (np.concatenate([c.t for c in chunks]), np.concatenate([c.data for c in chunks]),
                                   select.skipped)
    for stream in ("cam", "depth"):
        t, data, skipped = kept[name, stream]
        t_ref, data_ref, skipped_ref = kept[REFERENCE[name], stream]
        assert skipped == skipped_ref and skipped >= (10 if stream == "cam" else 2), (stream, skipped)
        np.testing.assert_array_equal(t, t_ref)
        np.testing.assert_array_equal(data, data_ref)


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


AUDIO_DEFS = {
    "audio_common_msgs/msg/AudioData": "uint8[] data",
    "audio_common_msgs/msg/AudioDataStamped": "std_msgs/Header header\naudio_common_msgs/AudioData audio",
    "audio_common_msgs/msg/AudioInfo": "uint8 channels\nuint32 sample_rate\nstring sample_format\nuint32 bitrate\n"
                                       "string coding_format",
}


def _speech_bag(path: Path) -> np.ndarray:
    """A ROS 2 MCAP bag of the real speech recording as 20 ms AudioDataStamped messages (PCM
    s16le 48 kHz mono), its AudioInfo, and two captions; returns the PCM."""
    import av
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    with av.open(str(bag_files.REAL / "speech_front_center.wav")) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]).astype("<i2")
    ts = get_typestore(Stores.ROS2_HUMBLE)
    for name, text in AUDIO_DEFS.items():
        ts.register(get_types_from_msg(text, name))
    T = ts.types
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        info = w.add_connection("/audio/info", "audio_common_msgs/msg/AudioInfo", typestore=ts)
        audio = w.add_connection("/audio/audio", "audio_common_msgs/msg/AudioDataStamped", typestore=ts)
        text = w.add_connection("/captions", "std_msgs/msg/String", typestore=ts)
        w.write(info, 10**9, bytes(ts.serialize_cdr(T["audio_common_msgs/msg/AudioInfo"](
            channels=1, sample_rate=48000, sample_format="S16LE", bitrate=0, coding_format="wave"),
            "audio_common_msgs/msg/AudioInfo")))
        for i in range(0, len(pcm), 960):
            ns = 10**9 + i * 10**9 // 48000
            stamp = T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)
            msg = T["audio_common_msgs/msg/AudioDataStamped"](
                header=T["std_msgs/msg/Header"](stamp=stamp, frame_id="mic"),
                audio=T["audio_common_msgs/msg/AudioData"](data=np.frombuffer(pcm[i:i + 960].tobytes(), np.uint8)))
            w.write(audio, ns + 2_000_000, bytes(ts.serialize_cdr(msg, "audio_common_msgs/msg/AudioDataStamped")))
        for k, caption in enumerate(("front", "center")):
            w.write(text, 10**9 + k * 5 * 10**8, bytes(ts.serialize_cdr(T["std_msgs/msg/String"](data=caption),
                                                                        "std_msgs/msg/String")))
    return pcm


def test_audio_and_text_topics_become_16k_mono_and_strings(tmp_path):
    from sources.replay import open_source

    pcm = _speech_bag(tmp_path / "rec")
    from sources.bagimport import import_bag

    yaml_path, written, skipped = import_bag(tmp_path / "rec", tmp_path)
    assert sorted(written) == ["/audio/audio -> audio_audio (audio)", "/captions -> captions (text)"]
    assert skipped == ["/audio/info (audio_common_msgs/AudioInfo): read as the audio streams' info_topic"]
    spec = load_session(yaml_path)
    audio = list(open_source(spec.stream("audio_audio"), chunk_seconds=0.5))
    t = np.concatenate([c.t for c in audio])
    x = np.concatenate([c.data for c in audio])
    assert x.dtype == np.float32 and abs(len(x) - len(pcm) / 3) <= 64
    assert t[0] == 1.0 and np.allclose(np.diff(t), 1 / 16000)
    # The same PCM read from the WAV file by the media source: the same samples.
    (tmp_path / "wav").mkdir()
    (tmp_path / "wav" / "s.wav").write_bytes((bag_files.REAL / "speech_front_center.wav").read_bytes())
    (tmp_path / "wav" / "session.yaml").write_text("format: bindstream.session/1\nname: w\nstreams:\n"
                                                   "  - {id: mic, modality: audio, source: s.wav}\n")
    ref = np.concatenate([c.data for c in open_source(load_session(tmp_path / "wav").streams[0])])
    n = min(len(ref), len(x))
    assert np.abs(ref[:n] - x[:n]).max() < 1e-4
    text = list(open_source(spec.stream("captions")))
    assert [s for c in text for s in c.data] == ["front", "center"]
    assert [float(v) for c in text for v in c.t] == [1.0, 1.5]
