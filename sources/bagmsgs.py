"""ROS messages to samples: which message types and encodings each modality takes, and the
conversion of one message to the modality's sample form (``sources.base``).

The table (docs/session-format.md, "Bag streams", keeps the same one):

==================================  ==========================================================
message type                        modality: encodings
==================================  ==========================================================
``sensor_msgs/Image``               vision: rgb8, bgr8, rgba8, bgra8, mono8;
                                    thermal: mono8, mono16, 16UC1; depth: 16UC1 (mm), 32FC1 (m)
``sensor_msgs/CompressedImage``     vision, thermal: jpeg, png; depth: compressedDepth png
``sensor_msgs/Imu``                 imu
``std_msgs/String``                 text
``audio_common_msgs/AudioData``,    audio: PCM (s16le, s32le, f32le, u8; the session or an
``audio_common_msgs/AudioDataStamped``   AudioInfo topic says rate, channels, format) or mp3
==================================  ==========================================================

A payload is checked against the frame size limits (``sources.imagesize``) before it is decoded.
"""

from __future__ import annotations

import struct
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from sources.imagesize import frame_size_problem, jpeg_size, png_size

__all__ = ["SUPPORTED", "IMAGE_TYPES", "AUDIO_TYPES", "PCM_FORMATS", "BadMessage", "encoding_of",
           "encoding_problem", "supported_text", "stamp_ns", "FrameDecoder", "imu_sample", "guess_modality"]

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
IMU = "sensor_msgs/msg/Imu"
STRING = "std_msgs/msg/String"
AUDIO = "audio_common_msgs/msg/AudioData"
AUDIO_STAMPED = "audio_common_msgs/msg/AudioDataStamped"
AUDIO_INFO = "audio_common_msgs/msg/AudioInfo"
IMAGE_TYPES = (IMAGE, COMPRESSED)
AUDIO_TYPES = (AUDIO, AUDIO_STAMPED)

# Per message type, per modality: the encodings taken (None: the type has no encoding).
SUPPORTED: dict[str, dict[str, tuple[str, ...] | None]] = {
    IMAGE: {"vision": ("rgb8", "bgr8", "rgba8", "bgra8", "mono8"),
            "thermal": ("mono8", "mono16", "16UC1"),
            "depth": ("16UC1", "32FC1")},
    COMPRESSED: {"vision": ("jpeg", "png"), "thermal": ("jpeg", "png"), "depth": ("compressedDepth png",)},
    IMU: {"imu": None},
    STRING: {"text": None},
    AUDIO: {"audio": None},
    AUDIO_STAMPED: {"audio": None},
}
# PCM sample formats: numpy dtype and the value of full scale.
PCM_FORMATS: dict[str, tuple[str, float]] = {"s16le": ("<i2", 32768.0), "s32le": ("<i4", 2147483648.0),
                                             "f32le": ("<f4", 1.0), "u8": ("u1", 128.0)}
# Raw image encodings: (dtype, channels).
_RAW = {"rgb8": ("u1", 3), "bgr8": ("u1", 3), "rgba8": ("u1", 4), "bgra8": ("u1", 4), "mono8": ("u1", 1),
        "mono16": ("u2", 1), "16UC1": ("u2", 1), "32FC1": ("f4", 1)}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class BadMessage(ValueError):
    """One message that cannot become a sample (counted and dropped by the source)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def encoding_of(msgtype: str, msg: Any) -> str | None:
    """The encoding the table above names for ``msg``: an Image's ``encoding``; for a
    CompressedImage ``jpeg`` / ``png`` by the payload's signature, ``compressedDepth png`` /
    ``compressedDepth rvl`` for depth transport, else its ``format`` as given."""
    if msgtype == IMAGE:
        return str(msg.encoding)
    if msgtype != COMPRESSED:
        return None
    fmt = str(msg.format)
    data = bytes(msg.data[:16])
    if "compresseddepth" in fmt.lower():
        return "compressedDepth rvl" if "rvl" in fmt.lower() else "compressedDepth png"
    if data[:2] == b"\xff\xd8":
        return "jpeg"
    if data[:8] == _PNG_MAGIC:
        return "png"
    return fmt


def supported_text() -> str:
    """The table in one line, for error messages."""
    parts = []
    for t, mods in SUPPORTED.items():
        m = "; ".join(f"{k}" + (f" ({', '.join(v)})" if v else "") for k, v in mods.items())
        parts.append(f"{t.replace('/msg/', '/')}: {m}")
    return " | ".join(parts)


def encoding_problem(modality: str, msgtype: str, msg: Any | None) -> str | None:
    """Why a topic of ``msgtype`` (first message ``msg``, if any) cannot feed ``modality``."""
    short = msgtype.replace("/msg/", "/")
    mods = SUPPORTED.get(msgtype)
    if mods is None:
        return f"message type {short} is not supported (supported: {supported_text()})"
    if modality not in mods:
        return f"message type {short} carries {', '.join(mods)}, not {modality}"
    encodings = mods[modality]
    if encodings is None or msg is None:
        return None
    enc = encoding_of(msgtype, msg)
    if enc not in encodings:
        return f"{short} encoding {enc!r} is not supported for {modality} (supported: {', '.join(encodings)})"
    return None


def stamp_ns(msg: Any, log_ns: int, use_header: bool) -> int:
    """The sample's time: ``header.stamp`` when asked for and the message has one (and it is
    set), else the time the recorder logged it."""
    header = getattr(msg, "header", None) if use_header else None
    if header is None:
        return log_ns
    st = header.stamp
    ns = int(st.sec) * 1_000_000_000 + int(getattr(st, "nanosec", getattr(st, "nsec", 0)))
    return ns if ns > 0 else log_ns


def imu_sample(msg: Any) -> list[float]:
    """ax, ay, az (m/s^2) then gx, gy, gz (rad/s)."""
    a, g = msg.linear_acceleration, msg.angular_velocity
    return [a.x, a.y, a.z, g.x, g.y, g.z]


def guess_modality(topic: str, msgtype: str, msg: Any | None) -> str | None:
    """The modality ``import-bag`` maps a topic to, or None. Topic names tell thermal and depth
    from vision where the encoding allows several."""
    name = topic.lower()
    if msgtype not in IMAGE_TYPES:
        mods = SUPPORTED.get(msgtype)
        return next(iter(mods)) if mods else None
    if msg is None:
        return None
    enc = encoding_of(msgtype, msg)
    fits = [m for m, encs in SUPPORTED[msgtype].items() if encs and enc in encs]
    for word, modality in (("depth", "depth"), ("thermal", "thermal"), ("infra", "thermal"), ("ir", "thermal"),
                           ("flir", "thermal"), ("lwir", "thermal")):
        if modality in fits and any(word == part or (len(word) > 2 and word in part)
                                    for part in name.replace("-", "_").replace("/", "_").split("_")):
            return modality
    for modality in ("vision", "depth", "thermal"):
        if modality in fits:
            return modality
    return None


def _raw_array(msg: Any) -> np.ndarray:
    """An Image's pixels as ``[H, W, C]`` in native byte order (``step`` padding and
    ``is_bigendian`` honoured)."""
    dtype, ch = _RAW[msg.encoding]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    dt = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<")
    row = w * ch * dt.itemsize
    data = np.asarray(msg.data, dtype=np.uint8).reshape(-1)
    if step < row or data.size < step * h:
        raise BadMessage("bad_image", f"{w}x{h} {msg.encoding} needs {row} bytes per row in steps of {step}, "
                                      f"got {data.size} bytes")
    rows = data[:step * h].reshape(h, step)[:, :row]
    return np.ascontiguousarray(rows).view(dt).reshape(h, w, ch).astype(dt.newbyteorder("="), copy=False)


class FrameDecoder:
    """Image and CompressedImage messages to one stream's frames.

    vision: uint8 RGB ``[H, W, 3]`` scaled (swscale, area) so the short side is ``video_size``,
    as video is; JPEG is decoded at 1/2, 1/4 or 1/8 size (FFmpeg's ``lowres``) where that still
    leaves the short side at least ``video_size``. thermal: uint8 / uint16 at native size (colour
    JPEG/PNG to gray). depth: uint16 millimetres (16UC1) or float32 metres (32FC1, and
    compressedDepth's inverse-depth 32FC1), NaN or 0 = no reading.
    """

    def __init__(self, modality: str, msgtype: str, video_size: int, max_pixels: int) -> None:
        self.modality, self.msgtype = modality, msgtype
        self.video_size, self.max_pixels = video_size, max_pixels
        self._scaler = VideoReformatter()
        self._codecs: dict[tuple[str, int], Any] = {}

    def decode(self, msg: Any) -> np.ndarray:
        problem = encoding_problem(self.modality, self.msgtype, msg)
        if problem:
            raise BadMessage("encoding", problem)
        if self.msgtype == IMAGE:
            self._check_size(int(msg.width), int(msg.height))
            arr = _raw_array(msg)
            if self.modality == "vision":
                return self._vision_raw(arr, msg.encoding)
            return arr[..., 0]
        data = bytes(msg.data)
        if self.modality == "depth":
            return self._compressed_depth(data, str(msg.format).split(";")[0].strip())
        return self._compressed(data)

    def _check_size(self, w: int, h: int) -> None:
        problem = frame_size_problem(w, h, self.max_pixels)
        if problem:
            raise BadMessage("frame_size", f"refused before decoding: {problem}")

    def _vision_raw(self, arr: np.ndarray, enc: str) -> np.ndarray:
        if enc == "mono8":
            rgb = np.repeat(arr, 3, axis=2)
        elif enc.startswith("bgr"):
            rgb = arr[..., 2::-1]
        else:
            rgb = arr[..., :3]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        return self._scale(frame, arr.shape[1], arr.shape[0])

    def _scale(self, frame: Any, w: int, h: int) -> np.ndarray:
        scale = self.video_size / min(w, h)
        out_w, out_h = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
        return self._scaler.reformat(frame, width=out_w, height=out_h, format="rgb24",
                                     interpolation="AREA").to_ndarray()

    def _codec(self, name: str, lowres: int = 0) -> Any:
        # FFmpeg's PNG decoder keeps state between packets (APNG), which garbles a second,
        # unrelated PNG: each gets a fresh context (a few microseconds).
        ctx = self._codecs.get((name, lowres)) if name != "png" else None
        if ctx is None:
            ctx = av.CodecContext.create(name, "r")
            if lowres:
                ctx.options = {"lowres": str(lowres)}
            self._codecs[(name, lowres)] = ctx
        return ctx

    def _decode_image(self, data: bytes, codec: str, lowres: int = 0) -> Any:
        try:
            frames = self._codec(codec, lowres).decode(av.Packet(data))
        except (av.FFmpegError, ValueError) as e:
            raise BadMessage("bad_image", f"{codec} payload does not decode: {e}") from None
        if not frames:
            raise BadMessage("bad_image", f"{codec} payload decoded to no image")
        return frames[0]

    def _compressed(self, data: bytes) -> np.ndarray:
        jpeg = data[:2] == b"\xff\xd8"
        size = jpeg_size(data) if jpeg else png_size(data[:24])
        if size is None:
            raise BadMessage("bad_image", "payload is neither a complete JPEG header nor a PNG signature with IHDR")
        w, h = size
        self._check_size(w, h)
        lowres = 0
        if jpeg and self.modality == "vision":
            while lowres < 3 and min(w, h) >> (lowres + 1) >= self.video_size:
                lowres += 1
        frame = self._decode_image(data, "mjpeg" if jpeg else "png", lowres)
        if self.modality == "vision":
            return self._scale(frame, w, h)  # a reduced decode goes to the full image's output size
        fmt = frame.format.name
        if fmt in ("gray", "gray16be", "gray16le"):
            return frame.to_ndarray()
        deep = any(d in fmt for d in ("16", "48", "64"))
        return frame.reformat(format="gray16le" if deep else "gray").to_ndarray()

    def _compressed_depth(self, data: bytes, encoding: str) -> np.ndarray:
        """compressed_depth_image_transport: a small header (format, two float32 quantisation
        parameters) then a 16-bit PNG: millimetres for 16UC1, quantised inverse depth for 32FC1."""
        start = data.find(_PNG_MAGIC, 0, 32)
        if start < 0:
            raise BadMessage("bad_image", "compressedDepth payload holds no PNG (only png depth transport is supported)")
        size = png_size(data[start:start + 24])
        if size is None:
            raise BadMessage("bad_image", "compressedDepth PNG has no IHDR chunk first")
        self._check_size(*size)
        frame = self._decode_image(data[start:], "png")
        if frame.format.name not in ("gray16be", "gray16le"):
            raise BadMessage("bad_image", f"compressedDepth PNG is {frame.format.name}, expected 16-bit gray")
        values = frame.to_ndarray()
        return _inverse_depth(values, data[:start]) if encoding == "32FC1" else values


def _inverse_depth(values: np.ndarray, header: bytes) -> np.ndarray:
    if len(header) < 8:
        raise BadMessage("bad_image", "compressedDepth 32FC1 payload lacks its quantisation parameters")
    qa, qb = struct.unpack_from("<ff", header, len(header) - 8)
    v = values.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(values > 0, np.float32(qa) / (v - np.float32(qb)), np.float32("nan"))
    return out.astype(np.float32)
