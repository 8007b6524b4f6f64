"""Small ROS bags written with rosbags' writers from the real recordings in ../shared/fixtures/real,
and the plain sessions (video, CSV, PNG folder) holding the same samples at the same times.

Every time is a whole number of milliseconds: a plain file stores it as seconds (``ms / 1000``),
a bag as nanoseconds (``ms * 10**6``); both read back as the same float64. Video frames are
stored losslessly (FFV1) or as the very JPEG payloads the bag carries (MJPEG), so both sessions
decode to the same pixels.
"""

from __future__ import annotations

import csv
import fractions
import math
import struct
from pathlib import Path

import av
import numpy as np
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin, Writer as Writer2
from rosbags.typesys import Stores, get_typestore

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real"
T0_MS = 500  # the first sample of every stream, ms
LOG_DELAY_NS = 3_000_000  # the recorder logs each message 3 ms after its header stamp
G = 9.80665


class Media:
    """The samples both kinds of session hold: RGB frames, JPEG payloads, IMU rows, depth frames."""

    def __init__(self, work: Path) -> None:
        with av.open(str(REAL / "realshort.mp4")) as c:
            self.frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        self.frame_ms = [T0_MS + round(i * 1000 / 30) for i in range(len(self.frames))]
        self.jpeg_video = work / "cam_jpeg.mkv"
        _write_video(self.jpeg_video, "mjpeg", "yuvj420p", self.frames, self.frame_ms)
        with av.open(str(self.jpeg_video)) as c:
            self.jpegs = [bytes(p) for p in c.demux(video=0) if p.size]
        assert len(self.jpegs) == len(self.frames)
        self.imu_ms, self.imu = _imu_rows(seconds=3.0)
        depth = np.asarray(av.open(str(REAL / "motorcycle_depth_mm_u16.png")).decode(video=0).__next__().to_ndarray())
        self.depth_ms = [T0_MS + 200 * i for i in range(15)]
        self.depth = [np.ascontiguousarray(depth[100 + 10 * i:220 + 10 * i, 200 + 20 * i:360 + 20 * i]) for i in range(15)]


def _write_video(path: Path, codec: str, pix_fmt: str, frames: list, times_ms: list[int]) -> None:
    tb = fractions.Fraction(1, 1000)
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        s.time_base = tb
        s.codec_context.time_base = tb
        for a, ms in zip(frames, times_ms):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts, f.time_base = ms, tb
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


def _imu_rows(seconds: float) -> tuple[list[int], list[list[float]]]:
    """The x-IMU3 rows of the first ``seconds``, in m/s^2 and rad/s (as ImuCsvSource converts)."""
    times, rows = [], []
    with open(REAL / "imu_xio3_50hz.csv", newline="") as f:
        r = csv.reader(f)
        next(r)
        us0 = None
        for row in r:
            us = int(row[0])
            us0 = us if us0 is None else us0
            ms = T0_MS + round((us - us0) / 1000)
            if ms - T0_MS > seconds * 1000:
                break
            gx, gy, gz, ax, ay, az = (float(v) for v in row[1:7])
            times.append(ms)
            rows.append([ax * G, ay * G, az * G, gx * (math.pi / 180.0), gy * (math.pi / 180.0), gz * (math.pi / 180.0)])
    return times, rows


def write_plain_session(root: Path, media: Media, name: str, jpeg: bool) -> Path:
    """A plain session: the frames as a lossless FFV1 video (or the MJPEG one), IMU CSV, depth PNGs."""
    root.mkdir(parents=True)
    if jpeg:
        (root / "cam.mkv").write_bytes(media.jpeg_video.read_bytes())
    else:
        _write_video(root / "cam.mkv", "ffv1", "bgr0", media.frames, media.frame_ms)
    with open(root / "imu.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "ax", "ay", "az", "gx", "gy", "gz"])
        for ms, row in zip(media.imu_ms, media.imu):
            w.writerow([repr(ms / 1000)] + [repr(v) for v in row])
    (root / "depth").mkdir()
    for i, d in enumerate(media.depth):
        _write_png16(root / "depth" / f"{i:04d}.png", d)
    (root / "depth_t.csv").write_text("t\n" + "".join(f"{ms / 1000!r}\n" for ms in media.depth_ms))
    (root / "session.yaml").write_text(
        f"format: bindstream.session/1\nname: {name}\nstreams:\n"
        "  - {id: cam, modality: vision, source: cam.mkv}\n"
        "  - {id: imu, modality: imu, source: imu.csv, columns: {t: t, ax: ax, ay: ay, az: az, gx: gx, gy: gy, gz: gz}}\n"
        "  - {id: depth, modality: depth, source: depth/, timestamps: depth_t.csv}\n")
    return root


def _write_png16(path: Path, arr: np.ndarray) -> None:
    path.write_bytes(png16_bytes(arr))


def png16_bytes(arr: np.ndarray) -> bytes:
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = arr.shape[1], arr.shape[0], "gray16be"
    frame = av.VideoFrame.from_ndarray(arr.astype(np.uint16), format="gray16le")
    return b"".join(bytes(p) for p in ctx.encode(frame.reformat(format="gray16be")))


def bag_session_yaml(name: str, source: str, cam: str, imu: str, depth: str) -> str:
    return (f"format: bindstream.session/1\nname: {name}\nstreams:\n"
            f"  - {{id: cam, modality: vision, source: {source}, topic: {cam}}}\n"
            f"  - {{id: imu, modality: imu, source: {source}, topic: {imu}}}\n"
            f"  - {{id: depth, modality: depth, source: {source}, topic: {depth}}}\n")


class _Msgs:
    """Message builders for one type store (ROS 1 headers have ``seq``)."""

    def __init__(self, ros1: bool) -> None:
        self.ros1 = ros1
        self.ts = get_typestore(Stores.ROS1_NOETIC if ros1 else Stores.ROS2_HUMBLE)
        self.t = self.ts.types

    def header(self, ms: int, frame_id: str):
        stamp = self.t["builtin_interfaces/msg/Time"](sec=ms // 1000, nanosec=(ms % 1000) * 1_000_000)
        kw = {"seq": 0} if self.ros1 else {}
        return self.t["std_msgs/msg/Header"](**kw, stamp=stamp, frame_id=frame_id)

    def image(self, ms: int, arr: np.ndarray, encoding: str, pad: int = 0, big_endian: bool = False):
        h, w = arr.shape[:2]
        if big_endian:
            arr = arr.astype(arr.dtype.newbyteorder(">"))
        rows = arr.reshape(h, -1).view(np.uint8)
        if pad:
            rows = np.concatenate([rows, np.zeros((h, pad), np.uint8)], axis=1)
        return self.t["sensor_msgs/msg/Image"](header=self.header(ms, "cam"), height=h, width=w, encoding=encoding,
                                              is_bigendian=int(big_endian), step=rows.shape[1],
                                              data=np.ascontiguousarray(rows).reshape(-1))

    def compressed(self, ms: int, data: bytes, fmt: str):
        return self.t["sensor_msgs/msg/CompressedImage"](header=self.header(ms, "cam"), format=fmt,
                                                        data=np.frombuffer(data, np.uint8))

    def imu(self, ms: int, row: list[float]):
        v3 = self.t["geometry_msgs/msg/Vector3"]
        q = self.t["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0)
        cov = np.zeros(9, np.float64)
        return self.t["sensor_msgs/msg/Imu"](header=self.header(ms, "imu"), orientation=q, orientation_covariance=cov,
                                            angular_velocity=v3(x=row[3], y=row[4], z=row[5]),
                                            angular_velocity_covariance=cov,
                                            linear_acceleration=v3(x=row[0], y=row[1], z=row[2]),
                                            linear_acceleration_covariance=cov)

    def serialize(self, msg, msgtype: str) -> bytes:
        return bytes(self.ts.serialize_ros1(msg, msgtype) if self.ros1 else self.ts.serialize_cdr(msg, msgtype))


def _timeline(media: Media, m: _Msgs, kind: str) -> list[tuple[int, str, object]]:
    """(log ns, topic, message) of every message, in log order. ``kind`` picks the encodings:
    ros1: bgr8 frames, 16UC1 depth; sqlite: JPEG frames, big-endian 16UC1 depth; mcap: rgb8
    frames with row padding, compressedDepth PNG depth."""
    out = []
    for i, (ms, rgb) in enumerate(zip(media.frame_ms, media.frames)):
        if kind == "ros1":
            msg = m.image(ms, np.ascontiguousarray(rgb[..., ::-1]), "bgr8")
        elif kind == "sqlite":
            msg = m.compressed(ms, media.jpegs[i], "rgb8; jpeg compressed bgr8")
        else:
            msg = m.image(ms, rgb, "rgb8", pad=64)
        out.append((ms, "/camera/image", msg, "sensor_msgs/msg/" + type(msg).__name__.split("__")[-1]))
    for ms, row in zip(media.imu_ms, media.imu):
        out.append((ms, "/imu/data", m.imu(ms, row), "sensor_msgs/msg/Imu"))
    for ms, d in zip(media.depth_ms, media.depth):
        if kind == "mcap":
            payload = struct.pack("<iff", 0, 0.0, 0.0) + png16_bytes(d)
            msg = m.compressed(ms, payload, "16UC1; compressedDepth png")
        else:
            msg = m.image(ms, d, "16UC1", big_endian=kind == "sqlite")
        out.append((ms, "/depth/image_raw", msg, "sensor_msgs/msg/" + type(msg).__name__.split("__")[-1]))
    out.sort(key=lambda x: x[0])
    return [(ms * 1_000_000 + LOG_DELAY_NS, topic, msg, msgtype) for ms, topic, msg, msgtype in out]


def write_ros1_bag(path: Path, media: Media) -> Path:
    m = _Msgs(ros1=True)
    with Writer1(path) as w:
        conns = {}
        for ns, topic, msg, msgtype in _timeline(media, m, "ros1"):
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msgtype, typestore=m.ts)
            w.write(conns[topic], ns, m.serialize(msg, msgtype))
    return path


def write_ros2_bag(path: Path, media: Media, storage: str) -> Path:
    m = _Msgs(ros1=False)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer2(path, version=9, storage_plugin=plugin) as w:
        conns = {}
        for ns, topic, msg, msgtype in _timeline(media, m, storage):
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msgtype, typestore=m.ts)
            w.write(conns[topic], ns, m.serialize(msg, msgtype))
    return path
