"""The bag stream type table, container by container, without Ray: each case writes a small
recording with rosbags' writers (ROS 1 with plain, bz2 and lz4 chunks; ROS 2 sqlite3 and MCAP,
with and without zstd file or message compression; plain .mcap files with zstd and lz4 chunks),
reads the stream through the replay source, and compares the samples with what was written.
"""

from __future__ import annotations

import fractions
import io
import struct
import sys
from pathlib import Path

import av
import lz4.frame
import numpy as np
import pytest
from av.video.reformatter import VideoReformatter
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin, Writer as Writer2
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode
from rosbags.typesys import get_types_from_msg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bag_files  # noqa: E402

from sources.errors import ConfigError  # noqa: E402
from sources.bagfile import Bag, zstd  # noqa: E402
from sources.bagmsgs import FrameDecoder  # noqa: E402
from sources.replay import open_source  # noqa: E402
from sources.session import load_session  # noqa: E402

pytestmark = pytest.mark.skipif(not (bag_files.REAL / "motorcycle_left.png").is_file(),
                                reason=f"real recordings not found in {bag_files.REAL} (../shared is absent)")

AUDIO_DEFS = {
    "audio_common_msgs/msg/AudioData": "uint8[] data",
    "audio_common_msgs/msg/AudioDataStamped": "std_msgs/Header header\naudio_common_msgs/AudioData audio",
    "audio_common_msgs/msg/AudioInfo": "uint8 channels\nuint32 sample_rate\nstring sample_format\nuint32 bitrate\n"
                                       "string coding_format",
}
T0_MS = 1000


def _png(name: str) -> np.ndarray:
    with av.open(str(bag_files.REAL / name)) as c:
        frame = next(c.decode(video=0))
    return frame.to_ndarray(format="gray16le" if "depth" in name else "rgb24")


RGB = np.ascontiguousarray(_png("motorcycle_left.png")[200:264, 300:396])  # 96x64: video_size 64 keeps it
DEPTH = np.ascontiguousarray(_png("motorcycle_depth_mm_u16.png")[200:264, 300:396])
GRAY = np.ascontiguousarray(RGB[..., 1])


def _msgs(kind: str) -> bag_files._Msgs:
    m = bag_files._Msgs(ros1=kind == "ros1")
    m.ts.register({k: v for name, text in AUDIO_DEFS.items() for k, v in get_types_from_msg(text, name).items()
                   if k not in m.ts.fielddefs})
    m.t = m.ts.types
    return m


def write_bag(path: Path, kind: str, build, compression: str | None = None) -> Path:
    """A recording at ``path`` of the messages ``build(msgs)`` returns as (topic, msgtype, log ns,
    message). kind: ros1 (``compression`` bz2 / lz4 chunks), sqlite or mcap (a ROS 2 folder;
    ``compression`` file / message (zstd), or storage: zstd MCAP chunks), mcap-file (the MCAP
    folder's .mcap file alone; ``compression`` storage: zstd chunks, lz4: lz4 chunks)."""
    m = _msgs(kind)
    rows = build(m)
    if kind == "ros1":
        w = Writer1(path)
        if compression:
            w.set_compression(Writer1.CompressionFormat[compression.upper()])
    else:
        folder = path.with_suffix("") if kind == "mcap-file" else path
        plugin = StoragePlugin.SQLITE3 if kind == "sqlite" else StoragePlugin.MCAP
        w = Writer2(folder, version=9, storage_plugin=plugin)
        if compression in ("file", "message", "storage"):
            w.set_compression(CompressionMode[compression.upper()], CompressionFormat.ZSTD)
    with w:
        conns = {}
        for topic, msgtype, ns, msg in rows:
            if topic not in conns:
                conns[topic] = w.add_connection(topic, msgtype, typestore=m.ts)
            w.write(conns[topic], ns, m.serialize(msg, msgtype))
    if kind == "mcap-file":
        written = folder / f"{folder.name}.mcap"
        if compression == "lz4":
            _mcap_lz4(written, path)
        else:
            written.rename(path)
    return path


def _mcap_lz4(src: Path, dst: Path) -> None:
    """``src`` with its chunks stored lz4: header, chunks, data end and a footer without summary
    (the summary is optional in MCAP; its chunk index would name the old offsets)."""
    data = src.read_bytes()
    out = io.BytesIO()
    out.write(data[:8])
    i = 8
    while True:
        op, n = data[i], struct.unpack_from("<Q", data, i + 1)[0]
        body = data[i + 9:i + 9 + n]
        i += 9 + n
        if op == 0x01:
            out.write(data[i - 9 - n:i])
        elif op == 0x06:
            start, end, size = struct.unpack_from("<QQQ", body)
            (mlen,) = struct.unpack_from("<I", body, 28)
            (clen,) = struct.unpack_from("<Q", body, 32 + mlen)
            inner = body[40 + mlen:40 + mlen + clen]
            inner = inner if mlen == 0 else zstd.decompress(inner)
            packed = lz4.frame.compress(inner)
            rec = struct.pack("<QQQI", start, end, len(inner), 0) + struct.pack("<I", 3) + b"lz4" + \
                struct.pack("<Q", len(packed)) + packed
            out.write(b"\x06" + struct.pack("<Q", len(rec)) + rec)
        elif op == 0x0F:
            break
    out.write(b"\x0f" + struct.pack("<Q", 4) + b"\0\0\0\0")
    out.write(b"\x02" + struct.pack("<Q", 20) + struct.pack("<QQI", 0, 0, 0))
    out.write(data[:8])
    dst.write_bytes(out.getvalue())


def _session(root: Path, source: str, **keys) -> Path:
    items = ", ".join(f"{k}: {v}" for k, v in {"source": source, **keys}.items())
    (root / "session.yaml").write_text(f"format: bindstream.session/1\nname: s\nstreams:\n  - {{id: s, {items}}}\n")
    return root


def read(root: Path, source: str, *, video_size: int = 64, chunk_seconds: float = 0.5, **keys):
    """Times and samples of the one stream of a session reading ``source``."""
    src = open_source(load_session(_session(root, source, **keys)).stream("s"), chunk_seconds=chunk_seconds,
                      video_size=video_size)
    chunks = list(src)
    t = np.concatenate([c.t for c in chunks])
    data = [s for c in chunks for s in c.data] if chunks and isinstance(chunks[0].data, list) else \
        np.concatenate([c.data for c in chunks])
    return t, data, src


def _encode(codec: str, arr: np.ndarray, pix_fmt: str, src_fmt: str) -> bytes:
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = arr.shape[1], arr.shape[0], pix_fmt
    if codec == "mjpeg":
        ctx.time_base = fractions.Fraction(1, 30)
    frame = av.VideoFrame.from_ndarray(arr, format=src_fmt).reformat(format=pix_fmt)
    return b"".join(bytes(p) for p in ctx.encode(frame)) + b"".join(bytes(p) for p in ctx.encode(None))


def _decode(codec: str, data: bytes):
    return av.CodecContext.create(codec, "r").decode(av.Packet(data))[0]


JPEG = _encode("mjpeg", RGB, "yuvj420p", "rgb24")
PNG_RGB = _encode("png", RGB, "rgb24", "rgb24")
PNG_GRAY = _encode("png", GRAY, "gray", "gray")
PNG_16 = bag_files.png16_bytes(DEPTH)
METRES = (DEPTH / 1000.0).astype(np.float32)
METRES[DEPTH == 0] = np.nan
METRES[:8, :8] = np.nan
# compressed_depth_image_transport's 32FC1: quantised inverse depth v = qa / d + qb, 0 = no reading.
QA, QB = 1000.0, 10.0
INV = np.where(np.isnan(METRES), 0, np.round(QA / np.nan_to_num(METRES, nan=1.0) + QB)).astype(np.uint16)
with np.errstate(divide="ignore"):
    INV_METRES = np.where(INV > 0, np.float32(QA) / (INV.astype(np.float32) - np.float32(QB)), np.nan).astype(np.float32)
JPEG_RGB = VideoReformatter().reformat(_decode("mjpeg", JPEG), width=96, height=64, format="rgb24",
                                       interpolation="AREA").to_ndarray()
JPEG_GRAY = _decode("mjpeg", JPEG).reformat(format="gray").to_ndarray()
ALPHA = np.full(RGB.shape[:2] + (1,), 77, np.uint8)


def _depth_payload(png: bytes, qa: float = 0.0, qb: float = 0.0) -> bytes:
    """compressed_depth_image_transport's payload: its header (format, quantisation a and b) then the PNG."""
    return struct.pack("<iff", 0, qa, qb) + png


# case: (modality, message for (msgs, ms), the sample expected)
IMAGES = {
    "Image rgb8 vision": ("vision", lambda m, ms: m.image(ms, RGB, "rgb8"), RGB),
    "Image rgb8 vision, odd row padding": ("vision", lambda m, ms: m.image(ms, RGB, "rgb8", pad=5), RGB),
    "Image bgr8 vision": ("vision", lambda m, ms: m.image(ms, np.ascontiguousarray(RGB[..., ::-1]), "bgr8"), RGB),
    "Image rgba8 vision": ("vision", lambda m, ms: m.image(ms, np.dstack([RGB, ALPHA]), "rgba8"), RGB),
    "Image bgra8 vision": ("vision", lambda m, ms: m.image(ms, np.dstack([RGB[..., ::-1], ALPHA]), "bgra8"), RGB),
    "Image mono8 vision": ("vision", lambda m, ms: m.image(ms, GRAY, "mono8"), np.repeat(GRAY[..., None], 3, 2)),
    "Image mono8 thermal": ("thermal", lambda m, ms: m.image(ms, GRAY, "mono8", pad=3), GRAY),
    "Image mono16 thermal": ("thermal", lambda m, ms: m.image(ms, DEPTH, "mono16"), DEPTH),
    "Image mono16 thermal, big-endian, padded": (
        "thermal", lambda m, ms: m.image(ms, DEPTH, "mono16", pad=6, big_endian=True), DEPTH),
    "Image 16UC1 thermal": ("thermal", lambda m, ms: m.image(ms, DEPTH, "16UC1"), DEPTH),
    "Image 16UC1 depth mm": ("depth", lambda m, ms: m.image(ms, DEPTH, "16UC1"), DEPTH),
    "Image 16UC1 depth mm, big-endian": ("depth", lambda m, ms: m.image(ms, DEPTH, "16UC1", big_endian=True), DEPTH),
    "Image 32FC1 depth m with NaN": ("depth", lambda m, ms: m.image(ms, METRES, "32FC1"), METRES),
    "Image 32FC1 depth m, big-endian, padded": (
        "depth", lambda m, ms: m.image(ms, METRES, "32FC1", pad=8, big_endian=True), METRES),
    "CompressedImage jpeg vision": ("vision", lambda m, ms: m.compressed(ms, JPEG, "rgb8; jpeg compressed bgr8"),
                                    JPEG_RGB),
    "CompressedImage png vision": ("vision", lambda m, ms: m.compressed(ms, PNG_RGB, "png"), RGB),
    "CompressedImage jpeg thermal": ("thermal", lambda m, ms: m.compressed(ms, JPEG, "jpeg"), JPEG_GRAY),
    "CompressedImage png thermal 8-bit": ("thermal", lambda m, ms: m.compressed(ms, PNG_GRAY, "mono8; png"), GRAY),
    "CompressedImage png thermal 16-bit": ("thermal", lambda m, ms: m.compressed(ms, PNG_16, "mono16; png"), DEPTH),
    "CompressedImage compressedDepth 16UC1": (
        "depth", lambda m, ms: m.compressed(ms, _depth_payload(PNG_16), "16UC1; compressedDepth png"), DEPTH),
    "CompressedImage compressedDepth 32FC1": (
        "depth", lambda m, ms: m.compressed(ms, _depth_payload(bag_files.png16_bytes(INV), QA, QB),
                                            "32FC1; compressedDepth"), INV_METRES),
}


@pytest.mark.parametrize("kind", ["ros1", "mcap-file"])
@pytest.mark.parametrize("case", list(IMAGES))
def test_every_image_encoding_of_the_table_reads_back_as_written(tmp_path, case, kind):
    modality, make, expected = IMAGES[case]

    def build(m):
        return [("/img", "sensor_msgs/msg/" + type(msg).__name__.split("__")[-1], ms * 10**6 + 2_000_000, msg)
                for ms in (T0_MS, T0_MS + 100) for msg in [make(m, ms)]]

    write_bag(tmp_path / ("rec.bag" if kind == "ros1" else "rec.mcap"), kind, build)
    t, frames, src = read(tmp_path, "rec.bag" if kind == "ros1" else "rec.mcap", modality=modality, topic="/img")
    assert src.dropped == {}
    assert t.tolist() == [1.0, 1.1]  # header stamps, not the log times 2 ms later
    assert frames.dtype == expected.dtype and frames.shape == (2,) + expected.shape
    for f in frames:
        np.testing.assert_array_equal(f, expected)
    if case == "CompressedImage jpeg vision":  # and it is the picture, in RGB order
        assert np.abs(frames[0].astype(int) - RGB).mean() < 8


def test_jpeg_is_decoded_at_reduced_size_where_the_short_side_allows(tmp_path):
    """A 740x500 JPEG for a 224 short side: decoded at half size (FFmpeg lowres), then scaled,
    close to the full decode scaled to the same size."""
    from sources.bagmsgs import COMPRESSED

    big = np.ascontiguousarray(_png("motorcycle_left.png")[:, :740])
    jpeg = _encode("mjpeg", big, "yuvj420p", "rgb24")
    write_bag(tmp_path / "rec.bag", "ros1", lambda m: [("/img", COMPRESSED, 10**9, m.compressed(1000, jpeg, "jpeg"))])
    decoder = FrameDecoder("vision", COMPRESSED, 224, 10**8)
    frame = decoder.decode(Bag(tmp_path / "rec.bag").first("/img"))
    assert list(decoder._codecs) == [("mjpeg", 1)]
    full = VideoReformatter().reformat(_decode("mjpeg", jpeg), width=332, height=224, format="rgb24",
                                       interpolation="AREA").to_ndarray()
    assert frame.shape == full.shape == (224, 332, 3)
    assert np.abs(frame.astype(int) - full).mean() < 3


# (kind, compression): every container and compression bindstream reads.
CONTAINERS = [("ros1", None), ("ros1", "bz2"), ("ros1", "lz4"), ("sqlite", None), ("sqlite", "message"),
              ("sqlite", "file"), ("mcap", None), ("mcap", "storage"), ("mcap", "message"), ("mcap", "file"),
              ("mcap-file", None), ("mcap-file", "storage"), ("mcap-file", "lz4")]
IMU_ROWS = [[0.1 * i, -0.2, 9.8, 0.01, 0.02 * i, -0.03] for i in range(60)]


def _imu_and_frames(m):
    """60 IMU messages at 50 Hz and 90 rgb8 frames (1.6 MB: more than one chunk) at 30 fps."""
    rows = [("/imu", "sensor_msgs/msg/Imu", (T0_MS + 20 * i) * 10**6 + 1000, m.imu(T0_MS + 20 * i, r))
            for i, r in enumerate(IMU_ROWS)]
    rows += [("/cam", "sensor_msgs/msg/Image", (T0_MS + round(i * 1000 / 30)) * 10**6 + 1000,
              m.image(T0_MS + round(i * 1000 / 30), np.roll(RGB, i, axis=1), "rgb8")) for i in range(90)]
    return sorted(rows, key=lambda r: r[2])


def _source_name(kind: str) -> str:
    return {"ros1": "rec.bag", "mcap-file": "rec.mcap"}.get(kind, "rec")


@pytest.mark.parametrize("kind,compression", CONTAINERS, ids=[f"{k}-{c or 'plain'}" for k, c in CONTAINERS])
def test_every_container_and_compression_reads_every_message(tmp_path, kind, compression):
    write_bag(tmp_path / _source_name(kind), kind, _imu_and_frames, compression)
    t, imu, _ = read(tmp_path, _source_name(kind), modality="imu", topic="/imu")
    np.testing.assert_allclose(t, [(T0_MS + 20 * i) / 1000 for i in range(60)], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(imu, np.asarray(IMU_ROWS, np.float32))  # accelerations, then angular velocity
    t, frames, src = read(tmp_path, _source_name(kind), modality="vision", topic="/cam")
    assert len(t) == 90 and src.dropped == {}
    for i in (0, 45, 89):
        np.testing.assert_array_equal(frames[i], np.roll(RGB, i, axis=1))


@pytest.mark.parametrize("mode,fmt", [("message", "lz4"), ("file", "bz2"), ("storage", "zstd")])
def test_unsupported_ros2_bag_compression_is_a_config_error_naming_the_bag(tmp_path, mode, fmt):
    from sources.bagimport import import_bag

    write_bag(tmp_path / "rec", "mcap", _imu_and_frames)
    meta = tmp_path / "rec" / "metadata.yaml"
    text = meta.read_text()
    assert "compression_mode: ''" in text and "compression_format: ''" in text
    meta.write_text(text.replace("compression_mode: ''", f"compression_mode: {mode}")
                    .replace("compression_format: ''", f"compression_format: {fmt}"))
    expected = (rf"{tmp_path / 'rec'}: metadata.yaml says compression_mode '{mode}' with compression_format "
                rf"'{fmt}', which is not supported \(supported: no compression, or compression_format zstd with "
                r"compression_mode file or message\)")
    with pytest.raises(ConfigError, match=rf"stream 's'.*key 'source': {expected}"):
        load_session(_session(tmp_path, "rec", modality="imu", topic="/imu"))
    with pytest.raises(ConfigError, match=expected):
        import_bag(tmp_path / "rec", tmp_path / "out")
