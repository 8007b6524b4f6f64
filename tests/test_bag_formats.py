"""The bag stream type table, container by container, without Ray: each case writes a small
recording with rosbags' writers (ROS 1 with plain, bz2 and lz4 chunks; ROS 2 sqlite3 and MCAP,
with and without zstd file or message compression; plain .mcap files with zstd and lz4 chunks),
reads the stream through the replay source, and compares the samples with what was written.
"""

from __future__ import annotations

import fractions
import io
import struct
import subprocess
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

from sources.errors import ConfigError, SourceError  # noqa: E402
from sources.guard import StreamGuard  # noqa: E402
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
    if not (bag_files.REAL / name).is_file():  # ../shared absent: every test here skips (pytestmark)
        return np.zeros((360, 740) if "depth" in name else (360, 740, 3), np.uint16 if "depth" in name else np.uint8)
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


def _pcm(fmt: str, x: np.ndarray) -> bytes:
    """float samples in [-1, 1) as ``fmt`` bytes."""
    if fmt == "s16le":
        return np.round(x * 32768).astype("<i2").tobytes()
    if fmt == "s32le":
        return np.round(x * 2147483648).astype("<i4").tobytes()
    if fmt == "f32le":
        return x.astype("<f4").tobytes()
    return np.round(x * 128 + 128).astype("u1").tobytes()


def _audio_rows(m, data: bytes, per_msg: int, stamped: bool, topic: str = "/audio"):
    msgtype = "audio_common_msgs/msg/AudioDataStamped" if stamped else "audio_common_msgs/msg/AudioData"
    rows = []
    for k, i in enumerate(range(0, len(data), per_msg)):
        ms = T0_MS + 20 * k
        payload = m.t["audio_common_msgs/msg/AudioData"](data=np.frombuffer(data[i:i + per_msg], np.uint8))
        msg = m.t[msgtype](header=m.header(ms, "mic"), audio=payload) if stamped else payload
        rows.append((topic, msgtype, ms * 10**6 + 500_000, msg))
    return rows


# PCM described by the stream's keys: (format, channels, container), 16 kHz so no resampling.
PCM_CASES = [("s16le", 1, "ros1"), ("s32le", 2, "sqlite"), ("f32le", 1, "mcap-file"), ("u8", 2, "ros1")]


@pytest.mark.parametrize("fmt,channels,kind", PCM_CASES)
def test_pcm_audio_described_by_the_session_is_16k_mono_float(tmp_path, fmt, channels, kind):
    n = 16000
    x = (0.5 * np.sin(np.arange(n * channels) / 7.0)).reshape(n, channels).astype(np.float64)
    x[:, -1] *= 0.5  # channels differ: the sample is their mean
    data = _pcm(fmt, x.reshape(-1))
    # 20 ms messages of AudioData (no header: times are log times); a sample split across two.
    per_msg = 320 * channels * {"s16le": 2, "s32le": 4, "f32le": 4, "u8": 1}[fmt] + 1
    write_bag(tmp_path / _source_name(kind), kind, lambda m: _audio_rows(m, data, per_msg, stamped=False))
    t, samples, src = read(tmp_path, _source_name(kind), modality="audio", topic="/audio", sample_rate=16000,
                           channels=channels, sample_format=fmt)
    assert samples.dtype == np.float32 and len(samples) == n
    assert t[0] == 1.0005 and np.allclose(np.diff(t), 1 / 16000)
    full = {"s16le": 32768, "s32le": 2147483648, "f32le": 1, "u8": 128}[fmt]
    decoded = np.frombuffer(data, {"s16le": "<i2", "s32le": "<i4", "f32le": "<f4", "u8": "u1"}[fmt]).astype(np.float64)
    expected = ((decoded - (128 if fmt == "u8" else 0)) / full).reshape(n, channels).mean(axis=1)
    np.testing.assert_allclose(samples, expected, atol=1e-6)


def _speech() -> np.ndarray:
    with av.open(str(bag_files.REAL / "speech_front_center.wav")) as c:
        return np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]).astype("<i2")


def _wav_reference(tmp_path: Path) -> np.ndarray:
    """The speech WAV read by the media source: 16 kHz mono float32."""
    d = tmp_path / "wav"
    d.mkdir()
    (d / "s.wav").write_bytes((bag_files.REAL / "speech_front_center.wav").read_bytes())
    return read(d, "s.wav", modality="audio")[1]


def _info(m, rate: int, fmt: str, coding: str):
    return ("/audio/info", "audio_common_msgs/msg/AudioInfo", 10**9,
            m.t["audio_common_msgs/msg/AudioInfo"](channels=1, sample_rate=rate, sample_format=fmt, bitrate=0,
                                                   coding_format=coding))


def test_pcm_audio_described_by_an_audioinfo_topic_matches_the_wav(tmp_path):
    pcm = (_speech() / 32768.0).astype(np.float32)
    write_bag(tmp_path / "rec.bag", "ros1", lambda m: [_info(m, 48000, "F32LE", "wave")]
              + _audio_rows(m, pcm.tobytes(), 3840, stamped=True))
    t, samples, _ = read(tmp_path, "rec.bag", modality="audio", topic="/audio", info_topic="/audio/info")
    assert t[0] == 1.0  # AudioDataStamped: the header stamp
    ref = _wav_reference(tmp_path)
    assert abs(len(samples) - len(ref)) <= 64
    n = min(len(ref), len(samples))
    assert np.abs(ref[:n] - samples[:n]).max() < 1e-4


def _mp3_packets(pcm: np.ndarray) -> list[bytes]:
    ctx = av.CodecContext.create("libmp3lame", "w")
    ctx.sample_rate, ctx.layout, ctx.format = 48000, "mono", "s16p"
    frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16p", layout="mono")
    frame.sample_rate, frame.pts = 48000, 0
    return [bytes(p) for p in ctx.encode(frame)] + [bytes(p) for p in ctx.encode(None)]


@pytest.mark.parametrize("described_by", ["session", "info_topic"])
def test_mp3_audio_payloads_decode_to_the_speech(tmp_path, described_by):
    pcm = _speech()
    packets = _mp3_packets(pcm)

    def build(m):
        rows = [("/audio", "audio_common_msgs/msg/AudioData", (T0_MS + 24 * k) * 10**6,
                 m.t["audio_common_msgs/msg/AudioData"](data=np.frombuffer(p, np.uint8))) for k, p in enumerate(packets)]
        return ([_info(m, 48000, "", "mp3")] if described_by == "info_topic" else []) + rows

    write_bag(tmp_path / "rec", "mcap", build)
    keys = {"coding": "mp3"} if described_by == "session" else {"info_topic": "/audio/info"}
    t, samples, src = read(tmp_path, "rec", modality="audio", topic="/audio", **keys)
    assert src.dropped == {}
    ref = _wav_reference(tmp_path)
    # MP3 adds the encoder's delay and padding (about 1100 + 500 samples at 48 kHz) around the speech.
    assert len(ref) <= len(samples) <= len(ref) + 1200
    n = len(ref) - 1000
    corr = [np.corrcoef(samples[lag:lag + n], ref[:n])[0, 1] for lag in range(0, 801, 4)]
    assert max(corr) > 0.95, max(corr)  # the speech, shifted by the encoder's delay


def _imu_text(m):
    """IMU messages stamped 0.5 s before they were logged, one with a zero stamp; captions (no header)."""
    rows = [("/imu", "sensor_msgs/msg/Imu", (T0_MS + 500 + 20 * i) * 10**6, m.imu(T0_MS + 20 * i, IMU_ROWS[i]))
            for i in range(5)]
    rows[3][3].header.stamp.sec, rows[3][3].header.stamp.nanosec = 0, 0
    rows += [("/captions", "std_msgs/msg/String", (T0_MS + 250 * k) * 10**6, m.t["std_msgs/msg/String"](data=w))
             for k, w in enumerate(("a plant", "on a windowsill"))]
    return sorted(rows, key=lambda r: r[2])


@pytest.mark.parametrize("kind", ["ros1", "sqlite"])
def test_times_are_header_stamps_or_log_times_plus_the_offset(tmp_path, kind):
    write_bag(tmp_path / _source_name(kind), kind, _imu_text)
    src = _source_name(kind)
    t, _, _ = read(tmp_path, src, modality="imu", topic="/imu")
    assert t.tolist() == [1.0, 1.02, 1.04, 1.56, 1.08]  # the zero stamp falls back to the log time
    t, _, _ = read(tmp_path, src, modality="imu", topic="/imu", timestamps="log", offset=-0.5)
    np.testing.assert_allclose(t, [1.0, 1.02, 1.04, 1.06, 1.08], rtol=0, atol=1e-12)
    t, text, _ = read(tmp_path, src, modality="text", topic="/captions", offset=2)
    assert text == ["a plant", "on a windowsill"] and t.tolist() == [3.0, 3.25]


def test_out_of_order_messages_come_in_file_order_and_the_guard_drops_a_wild_stamp(tmp_path):
    stamps = [1000, 1020, 1010, 1030, 901_000, 1040, 1060, 1050]  # ms; 901 s is a wild stamp

    def build(m):
        return [("/imu", "sensor_msgs/msg/Imu", (T0_MS + 20 * i) * 10**6, m.imu(ms, IMU_ROWS[i]))
                for i, ms in enumerate(stamps)]

    write_bag(tmp_path / "rec.bag", "ros1", build)
    spec = load_session(_session(tmp_path, "rec.bag", modality="imu", topic="/imu")).stream("s")
    guard = StreamGuard("s", "s", "imu", max_gap_s=60.0)
    chunks = list(open_source(spec, chunk_seconds=10.0))
    assert np.concatenate([c.t for c in chunks]).tolist() == [ms / 1000 for ms in stamps]
    kept = np.concatenate([guard.apply(c).t for c in chunks])
    assert kept.tolist() == [ms / 1000 for ms in stamps if ms != 901_000]  # small disorder is the aligner's
    assert guard.dropped == {"jump": 1}


def test_a_bag_damaged_in_the_middle_yields_the_messages_before_then_names_stream_and_offset(tmp_path):
    write_bag(tmp_path / "rec.bag", "ros1", _imu_and_frames)
    data = bytearray((tmp_path / "rec.bag").read_bytes())
    second_chunk = data.index(b"op=\x05", data.index(b"op=\x05") + 4) - 4 - 4  # its header-length field
    data[second_chunk:second_chunk + 4] = b"\xff\xff\xff\x7f"
    (tmp_path / "rec.bag").write_bytes(bytes(data))
    spec = load_session(_session(tmp_path, "rec.bag", modality="vision", topic="/cam")).stream("s")
    got = []
    with pytest.raises(SourceError, match=rf"stream 's'.*rec.bag is damaged at byte offset {second_chunk}: "
                                          r"record header of \d+ bytes \(not a record\); topic /cam ended after \d+ "
                                          r"messages") as e:
        for chunk in open_source(spec, video_size=64):
            got += chunk.t.tolist()
    n = int(str(e.value).rsplit("after ", 1)[1].split()[0])
    assert 0 < n < 90 and got == [(T0_MS + round(i * 1000 / 30)) / 1000 for i in range(n)]


def test_a_truncated_file_compressed_ros2_bag_names_the_damage(tmp_path):
    write_bag(tmp_path / "rec", "mcap", _imu_and_frames, "file")
    f = tmp_path / "rec" / "rec.mcap.zstd"
    f.write_bytes(f.read_bytes()[:f.stat().st_size * 19 // 20])  # the frames compress well: 95 % ends in chunk 2
    spec = load_session(_session(tmp_path, "rec", modality="vision", topic="/cam")).stream("s")
    got = []
    with pytest.raises(SourceError, match=r"stream 's'.*rec.mcap.zstd is damaged at byte offset \d+: "
                                          r"zstd-compressed file ends early.*offset counts decompressed bytes"):
        for chunk in open_source(spec, video_size=64):
            got += chunk.t.tolist()
    assert 0 < len(got) < 90 and got == [(T0_MS + round(i * 1000 / 30)) / 1000 for i in range(len(got))]


def test_unsupported_types_and_encodings_are_config_errors_naming_topic_type_and_what_is_supported(tmp_path):
    def build(m):
        info = m.t["sensor_msgs/msg/CameraInfo"]
        cam = m.t["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
        z = np.zeros(9, np.float64)
        return [("/info", "sensor_msgs/msg/CameraInfo", 10**9,
                 info(header=m.header(1000, "c"), height=1, width=1, distortion_model="", d=np.zeros(0), k=z, r=z,
                      p=np.zeros(12), binning_x=0, binning_y=0, roi=cam)),
                ("/bayer", "sensor_msgs/msg/Image", 10**9, m.image(1000, GRAY, "bayer_rggb8"))]

    write_bag(tmp_path / "rec.mcap", "mcap-file", build)
    with pytest.raises(ConfigError, match=r"topic '/info': message type sensor_msgs/CameraInfo is not supported "
                                          r"\(supported: sensor_msgs/Image: vision \(rgb8.*std_msgs/String: text"):
        load_session(_session(tmp_path, "rec.mcap", modality="vision", topic="/info"))
    with pytest.raises(ConfigError, match=r"topic '/bayer': sensor_msgs/Image encoding 'bayer_rggb8' is not "
                                          r"supported for vision \(supported: rgb8, bgr8, rgba8, bgra8, mono8\)"):
        load_session(_session(tmp_path, "rec.mcap", modality="vision", topic="/bayer"))
    with pytest.raises(ConfigError, match=r"key 'topic': rec.mcap has no topic '/cam'; its topics: "
                                          r"/bayer \(sensor_msgs/Image\), /info \(sensor_msgs/CameraInfo\)"):
        load_session(_session(tmp_path, "rec.mcap", modality="vision", topic="/cam"))


def test_bag_sources_keep_to_the_session_folder(tmp_path):
    write_bag(tmp_path / "rec.bag", "ros1", _imu_text)
    (tmp_path / "s").mkdir()
    with pytest.raises(ConfigError, match=r"key 'source': .*/s/\.\./rec\.bag resolves to .*outside the session folder"):
        load_session(_session(tmp_path / "s", "../rec.bag", modality="imu", topic="/imu"))
    (tmp_path / "s" / "link.bag").symlink_to(tmp_path / "rec.bag")
    with pytest.raises(ConfigError, match=r"key 'source': .*/s/link\.bag resolves to .*outside the session folder"):
        load_session(_session(tmp_path / "s", "link.bag", modality="imu", topic="/imu"))
    # A ROS 2 bag folder whose metadata.yaml names a file outside it.
    write_bag(tmp_path / "s" / "rec", "mcap", _imu_text)
    meta = tmp_path / "s" / "rec" / "metadata.yaml"
    meta.write_text(meta.read_text().replace("- rec.mcap", "- ../../rec.bag"))
    with pytest.raises(ConfigError, match=r"metadata.yaml names rec.bag, not a file inside the bag folder"):
        load_session(_session(tmp_path / "s", "rec", modality="imu", topic="/imu"))


def test_import_bag_command_writes_a_session_that_loads_and_lists_skipped_topics(tmp_path):
    def build(m):
        return _imu_text(m) + [("/thermal/image", "sensor_msgs/msg/Image", 10**9, m.image(1000, GRAY, "mono8")),
                               ("/bayer", "sensor_msgs/msg/Image", 10**9, m.image(1000, GRAY, "bayer_rggb8")),
                               ("/depth", "sensor_msgs/msg/Image", 10**9, m.image(1000, METRES, "32FC1"))]

    write_bag(tmp_path / "rec.bag", "ros1", build)
    cmd = [sys.executable, "-m", "pipeline", "import-bag", str(tmp_path / "rec.bag"), "--out", str(tmp_path / "s")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == str(tmp_path / "s" / "session.yaml")
    text = (tmp_path / "s" / "session.yaml").read_text()
    assert "#   /bayer (sensor_msgs/Image): encoding 'bayer_rggb8' not supported" in text
    spec = load_session(tmp_path / "s")
    assert {(s.topic, s.modality) for s in spec.streams} == {
        ("/imu", "imu"), ("/captions", "text"), ("/thermal/image", "thermal"), ("/depth", "depth")}
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert again.returncode == 2 and "session.yaml exists" in again.stderr and "Traceback" not in again.stderr


def test_messages_that_cannot_become_frames_are_dropped_and_counted_by_reason(tmp_path):
    """Undecodable bytes, a cut JPEG, an encoding the topic did not start with, a frame of another
    size: each is dropped and counted; the good frames around them come through."""
    m = _msgs("mcap-file")
    good = [m.serialize(m.compressed(T0_MS + 100 * i, JPEG, "jpeg"), "sensor_msgs/msg/CompressedImage")
            for i in range(5)]
    bad = {1: b"\x00\x01", 2: m.serialize(m.compressed(T0_MS + 200, JPEG[:200], "jpeg"), "sensor_msgs/msg/CompressedImage"),
           3: m.serialize(m.compressed(T0_MS + 300, b"BM" + bytes(60), "bmp"), "sensor_msgs/msg/CompressedImage")}
    square = _encode("mjpeg", np.ascontiguousarray(RGB[:, :64]), "yuvj420p", "rgb24")
    bad[4] = m.serialize(m.compressed(T0_MS + 400, square, "jpeg"), "sensor_msgs/msg/CompressedImage")
    folder = tmp_path / "rec"
    with Writer2(folder, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conn = w.add_connection("/img", "sensor_msgs/msg/CompressedImage", typestore=m.ts)
        for i in range(5):
            w.write(conn, (T0_MS + 100 * i) * 10**6, bad.get(i, good[i]))
    t, frames, src = read(tmp_path, "rec", modality="vision", topic="/img")
    assert t.tolist() == [1.0] and len(frames) == 1
    assert src.dropped == {"undecodable": 1, "bad_image": 1, "encoding": 1, "frame_size": 1}, src.dropped


def test_a_truncated_sqlite3_bag_is_a_config_error_at_load(tmp_path):
    write_bag(tmp_path / "rec", "sqlite", _imu_and_frames)
    db = tmp_path / "rec" / "rec.db3"
    db.write_bytes(db.read_bytes()[:db.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"stream 's': key 'source': .*rec: cannot open: .*rec.db3"):
        load_session(_session(tmp_path, "rec", modality="vision", topic="/cam"))
