"""A deterministic synthetic "egocentric" session for demos, tests and first runs.

The scene: three coloured shapes move on Lissajous paths over a striped background that
pans as the (virtual) head turns. Every stream is derived from the same motion so they agree:

* ``video.mp4``: H.264 (or MPEG-4 Part 2) of the scene, plus an AAC track: one tone per
  shape whose pitch rises as the shape goes up the frame (48 kHz, so replay resamples);
* ``imu.csv`` (200 Hz): the head's yaw rate (gyro z) and the matching centripetal /
  tangential acceleration, written in device units (ms on a device clock, g, deg/s) with
  interleaved ``temp`` rows, so replay exercises ``columns``, units, ``offset`` and ``where``;
* ``depth/`` (10 Hz): 16-bit PNG depth in mm, shapes in front of a tilted back wall,
  ``frame,t`` timestamps;
* ``thermal/`` (10 Hz): 16-bit PNG, the shapes warm, one-column timestamps in ms;
* ``captions.jsonl``: a caption every 2.5 s naming the highest shape.

A distinctive event is planted at known times (:func:`planted_events`: 3 s every 8 s from
t = 3 s, while it fits): the whole frame turns into a magenta and yellow checkerboard and the
sound into a loud two-tone alarm. ``event.mp4`` is an example clip of it alone (3 s, the same
picture and sound), for an example-clip trigger (configs/demo.yaml) to find it.

Same arguments give byte-identical files (encoders run single-threaded with bit-exact flags).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
import yaml

from sources.session import NAME_PATTERN

__all__ = ["write_demo_session", "ensure_demo_session", "planted_events", "DEMO_DEVICE_EPOCH_MS", "EVENT_CLIP",
           "MAX_SECONDS", "MAX_SEED"]

logger = logging.getLogger(__name__)

# Where the IMU's own clock stands at session time 0: replay must add offset = -this / 1000.
DEMO_DEVICE_EPOCH_MS = 1_700_000_000_000
_AUDIO_RATE = 48_000
_IMU_RATE = 200
_FRAME_RATE = 10  # depth and thermal
_G = 9.80665
_COLOURS = ("red", "green", "blue")
_RGB = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 235]], dtype=np.uint8)
EVENT_CLIP = "event.mp4"  # the example clip of the planted event, in the session folder
# The longest session written: an hour is about 200 MB at the default size and takes minutes.
MAX_SECONDS = 3600.0
MAX_SEED = 2**32 - 1  # numpy's seeds run from 0 to 2**32 - 1
_EVENT_S, _EVENT_EVERY_S, _EVENT_FIRST_S = 3.0, 8.0, 3.0


def planted_events(seconds: float) -> list[tuple[float, float]]:
    """The ``[start, end)`` session times of the planted events of a demo session of ``seconds``:
    3 s long, every 8 s from t = 3 s, each ending at least 0.5 s before the session does."""
    out, t = [], _EVENT_FIRST_S
    while t + _EVENT_S <= seconds - 0.5:
        out.append((t, t + _EVENT_S))
        t += _EVENT_EVERY_S
    return out


def _in_event(t: np.ndarray | float, events: list[tuple[float, float]]) -> np.ndarray:
    t = np.asarray(t, dtype=np.float64)
    return np.any([(t >= a) & (t < b) for a, b in events], axis=0) if events else np.zeros(t.shape, dtype=bool)


def _event_rgb(w: int, h: int) -> np.ndarray:
    """The planted event's picture: a magenta and yellow checkerboard over the whole frame."""
    cell = max(2, min(w, h) // 6)
    yy, xx = np.mgrid[0:h, 0:w]
    on = ((yy // cell) + (xx // cell)) % 2 == 0
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[on], img[~on] = (235, 30, 200), (250, 230, 20)
    return img


def _event_sound(t: np.ndarray) -> np.ndarray:
    """The planted event's sound: loud hiss (seeded white noise), the same at every event."""
    noise = np.random.default_rng(12345).uniform(-0.6, 0.6, round(_EVENT_S * _AUDIO_RATE) + 1)
    return noise[np.clip(np.round(t * _AUDIO_RATE).astype(np.int64), 0, len(noise) - 1)]


@dataclass(frozen=True)
class _Scene:
    """Closed-form motion, so every stream can sample it at its own times."""

    w: int
    h: int
    fx: np.ndarray  # [3] Hz, x frequency of each shape
    fy: np.ndarray  # [3] Hz
    ph: np.ndarray  # [3] rad, phase
    radius: np.ndarray  # [3] px
    yaw_amp: float  # rad, head yaw amplitude
    yaw_freq: float  # Hz

    @classmethod
    def make(cls, w: int, h: int, seed: int) -> "_Scene":
        rng = np.random.default_rng(seed)
        return cls(w=w, h=h, fx=rng.uniform(0.08, 0.25, 3), fy=rng.uniform(0.1, 0.3, 3),
                   ph=rng.uniform(0, 2 * math.pi, 3), radius=rng.uniform(0.08, 0.14, 3) * min(w, h),
                   yaw_amp=float(rng.uniform(0.2, 0.4)), yaw_freq=float(rng.uniform(0.1, 0.2)))

    def centres(self, t: float) -> np.ndarray:
        """[3, 2] shape centres (x, y) in pixels at time t."""
        x = 0.5 + 0.35 * np.sin(2 * math.pi * self.fx * t + self.ph)
        y = 0.5 + 0.35 * np.sin(2 * math.pi * self.fy * t + 1.7 * self.ph)
        return np.stack([x * self.w, y * self.h], axis=1)

    def yaw(self, t: np.ndarray | float) -> np.ndarray | float:
        return self.yaw_amp * np.sin(2 * math.pi * self.yaw_freq * t)

    def yaw_rate(self, t: np.ndarray) -> np.ndarray:
        return self.yaw_amp * 2 * math.pi * self.yaw_freq * np.cos(2 * math.pi * self.yaw_freq * t)

    def yaw_accel(self, t: np.ndarray) -> np.ndarray:
        return -self.yaw_amp * (2 * math.pi * self.yaw_freq) ** 2 * np.sin(2 * math.pi * self.yaw_freq * t)

    def masks(self, t: float, w: int, h: int) -> list[np.ndarray]:
        """Boolean [h, w] masks of the shapes at time t on a w x h grid: circle, square, diamond."""
        sx, sy = w / self.w, h / self.h
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        out = []
        for i, (cx, cy) in enumerate(self.centres(t)):
            dx, dy = xx - cx * sx, yy - cy * sy
            r = self.radius[i] * min(sx, sy)
            if i == 0:
                m = dx * dx + dy * dy <= r * r
            elif i == 1:
                m = (np.abs(dx) <= r) & (np.abs(dy) <= r)
            else:
                m = np.abs(dx) + np.abs(dy) <= 1.3 * r
            out.append(m)
        return out

    def rgb(self, t: float) -> np.ndarray:
        # Background stripes scroll with yaw: a head turning right moves the world left.
        shift = float(self.yaw(t)) * self.w
        xs = np.arange(self.w, dtype=np.float32) + shift
        stripes = (96 + 40 * np.sin(xs * (2 * math.pi / 40.0))).astype(np.uint8)
        img = np.empty((self.h, self.w, 3), dtype=np.uint8)
        img[:] = stripes[None, :, None]
        img[: self.h // 3] = np.array([150, 180, 210], dtype=np.uint8)  # sky band
        for m, c in zip(self.masks(t, self.w, self.h), _RGB):
            img[m] = c
        return img


def write_demo_session(dir: Path, *, seconds: float = 10.0, size: tuple[int, int] = (320, 240), fps: int = 15,
                       seed: int = 0, name: str = "demo-ego", bitrate: int | None = None) -> Path:
    """Write the demo session into folder ``dir`` (created; existing demo files replaced).

    ``size`` is the video (width, height). ``bitrate`` (bits/s) switches the video encoder from
    constant quality (CRF 23, small files for flat synthetic frames) to that average bitrate, so
    benchmarks can decode streams as heavy as a real camera's. Returns ``dir``. Files are written to a temporary
    sibling folder first and moved in at the end, so an interrupted run leaves no half session.
    """
    w, h = size
    _check_args(size, seconds, fps, seed, name, bitrate)
    dest = Path(dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    scene = _Scene.make(w, h, seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _write_videos(tmp, scene, seconds, fps, bitrate)
        _write_imu(tmp / "imu.csv", scene, seconds)
        _write_frames(tmp / "depth", scene, seconds, depth=True)
        _write_frames(tmp / "thermal", scene, seconds, depth=False)
        _write_captions(tmp / "captions.jsonl", scene, seconds)
        (tmp / "session.yaml").write_text(_session_yaml(name), encoding="utf-8")
        dest.mkdir(exist_ok=True)
        for item in sorted(tmp.iterdir()):
            target = dest / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            # session.yaml sorts last among these names, so it lands after the data it names.
            item.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote demo session %r (%.1f s) to %s", name, seconds, dest)
    return dest


def _check_args(size: tuple[int, int], seconds: float, fps: int, seed: int, name: str, bitrate: int | None) -> None:
    w, h = size
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise ValueError(f"demo session: size must be even and at least 16x16, got {size}")
    if not 0 < seconds <= MAX_SECONDS or fps < 1:
        raise ValueError(f"demo session: need 0 < seconds <= {MAX_SECONDS:g} and fps >= 1, got seconds={seconds}, fps={fps}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"demo session: seed must be from 0 to {MAX_SEED}, got {seed}")
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"demo session: name must be 1-128 letters, digits, '_', '.' or '-', starting with a letter "
                         f"or digit, got {name!r}")
    if bitrate is not None and bitrate < 10_000:
        raise ValueError(f"demo session: bitrate is in bits/s and must be >= 10000, got {bitrate}")


def ensure_demo_session(dir: Path, **kwargs) -> Path:
    """``dir`` if it already holds a ``session.yaml``; otherwise write the demo session there."""
    dest = Path(dir)
    if (dest / "session.yaml").is_file():
        return dest
    return write_demo_session(dest, **kwargs)


def _session_yaml(name: str) -> str:
    doc = {
        "format": "bindstream.session/1",
        "name": name,
        "description": "synthetic demo session written by sources.demo.write_demo_session",
        "streams": [
            {"id": "cam", "modality": "vision", "source": "video.mp4"},
            {"id": "mic", "modality": "audio", "source": "video.mp4"},
            {"id": "imu", "modality": "imu", "source": "imu.csv",
             "columns": {"t": "device_ms", "ax": "acc_x_g", "ay": "acc_y_g", "az": "acc_z_g",
                         "gx": "gyr_x_dps", "gy": "gyr_y_dps", "gz": "gyr_z_dps"},
             "where": {"kind": "imu"},
             "time_unit": "ms", "accel_unit": "g", "gyro_unit": "deg/s",
             "offset": -DEMO_DEVICE_EPOCH_MS / 1000.0},
            {"id": "depth", "modality": "depth", "source": "depth", "timestamps": "depth/timestamps.csv",
             "depth_unit": "mm"},
            {"id": "thermal", "modality": "thermal", "source": "thermal", "timestamps": "thermal/timestamps.csv",
             "time_unit": "ms"},
            {"id": "captions", "modality": "text", "source": "captions.jsonl"},
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _video_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _write_av(path: Path, size: tuple[int, int], seconds: float, fps: int, frame_at: Callable[[float], np.ndarray],
              pcm: np.ndarray, bitrate: int | None = None) -> None:
    """An MP4 of ``frame_at(t)`` at ``fps`` for ``seconds`` and the mono ``pcm`` at 48 kHz."""
    n_frames = max(1, round(seconds * fps))
    # bitexact keeps version strings and other build-dependent bytes out of the file.
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as out:
        codec = _video_codec()
        v = out.add_stream(codec, rate=fps)
        v.width, v.height, v.pix_fmt = size[0], size[1], "yuv420p"
        v.codec_context.thread_count = 1  # threaded encoders are not byte-reproducible
        v.codec_context.flags |= av.codec.context.Flags.bitexact
        if bitrate is not None:
            v.bit_rate = int(bitrate)
        if codec == "libx264":
            rc = {"b": str(int(bitrate))} if bitrate is not None else {"crf": "23"}
            v.codec_context.options = {"preset": "veryfast", **rc, "x264-params": "threads=1"}
        a = out.add_stream("aac", rate=_AUDIO_RATE, layout="mono")
        a.codec_context.flags |= av.codec.context.Flags.bitexact
        a.codec_context.thread_count = 1

        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_at(i / fps), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for pkt in v.encode(frame.reformat(format="yuv420p")):
                out.mux(pkt)
        for pkt in v.encode(None):
            out.mux(pkt)

        step = a.codec_context.frame_size or 1024
        for start in range(0, len(pcm), step):
            block = pcm[start:start + step]
            af = av.AudioFrame.from_ndarray(block[None, :], format="fltp", layout="mono")
            af.sample_rate = _AUDIO_RATE
            af.pts = start
            af.time_base = Fraction(1, _AUDIO_RATE)
            for pkt in a.encode(af):
                out.mux(pkt)
        for pkt in a.encode(None):
            out.mux(pkt)


def _write_videos(folder: Path, scene: _Scene, seconds: float, fps: int, bitrate: int | None) -> None:
    """``video.mp4`` (the scene, with the planted events) and ``event.mp4`` (an event alone)."""
    events, size = planted_events(seconds), (scene.w, scene.h)
    event_img = _event_rgb(scene.w, scene.h)
    _write_av(folder / "video.mp4", size, seconds, fps,
              lambda t: event_img if _in_event(t, events) else scene.rgb(t), _soundtrack(scene, seconds, events), bitrate)
    t = np.arange(round(_EVENT_S * _AUDIO_RATE), dtype=np.float64) / _AUDIO_RATE
    _write_av(folder / EVENT_CLIP, size, _EVENT_S, fps, lambda _: event_img,
              (_event_sound(t) * _fade(t, _EVENT_S)).astype(np.float32), bitrate)


def _fade(t: np.ndarray, seconds: float) -> np.ndarray:
    """No click at either end."""
    return np.clip(np.minimum(1.0, np.minimum(t, seconds - t) / 0.05), 0.0, 1.0)


def _soundtrack(scene: _Scene, seconds: float, events: list[tuple[float, float]] = ()) -> np.ndarray:
    n = round(seconds * _AUDIO_RATE)
    t = np.arange(n, dtype=np.float64) / _AUDIO_RATE
    # Shape heights sampled at 100 Hz then interpolated: cheap and smooth enough for pitch.
    tc = np.arange(0, seconds + 0.01, 0.01)
    ys = np.stack([scene.centres(x)[:, 1] for x in tc])  # (T, 3) pixels, 0 = top
    pcm = np.zeros(n, dtype=np.float64)
    for i, base in enumerate((220.0, 330.0, 440.0)):
        height = 1.0 - np.interp(t, tc, ys[:, i]) / scene.h  # 0 bottom .. 1 top
        freq = base * (1.0 + height)  # up to one octave higher at the top
        phase = 2 * math.pi * np.cumsum(freq) / _AUDIO_RATE  # integrate: no clicks when pitch moves
        pcm += 0.2 * np.sin(phase)
    for a, b in events:  # the planted event's alarm replaces the scene's tones
        inside = (t >= a) & (t < b)
        pcm[inside] = _event_sound(t[inside] - a)
    return (pcm * _fade(t, seconds)).astype(np.float32)


def _write_imu(path: Path, scene: _Scene, seconds: float) -> None:
    t = np.arange(round(seconds * _IMU_RATE)) / _IMU_RATE
    rate = scene.yaw_rate(t)  # rad/s about the vertical (device z) axis
    lever = 0.1  # m, IMU ahead of the neck's rotation axis
    acc_x = -lever * rate**2  # centripetal, towards the axis
    acc_y = lever * scene.yaw_accel(t)  # tangential
    acc_z = np.full_like(t, _G)  # gravity, device z up
    dps = 180.0 / math.pi
    lines = ["device_ms,kind,acc_x_g,acc_y_g,acc_z_g,gyr_x_dps,gyr_y_dps,gyr_z_dps,temp_c"]
    for k in range(len(t)):
        ms = DEMO_DEVICE_EPOCH_MS + k * (1000 // _IMU_RATE)
        lines.append(f"{ms},imu,{acc_x[k] / _G:.6f},{acc_y[k] / _G:.6f},{acc_z[k] / _G:.6f},"
                     f"0.000000,0.000000,{rate[k] * dps:.6f},")
        if k % _IMU_RATE == 0:  # a temperature row each second, as many IMUs interleave
            lines.append(f"{ms},temp,,,,,,,{31.5 + 0.01 * (k // _IMU_RATE):.2f}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _png_bytes(img: np.ndarray, fmt: str) -> bytes:
    frame = av.VideoFrame.from_ndarray(img, format=fmt)
    cc = av.CodecContext.create("png", "w")
    cc.width, cc.height, cc.pix_fmt = img.shape[1], img.shape[0], fmt
    cc.flags |= av.codec.context.Flags.bitexact
    return b"".join(bytes(p) for p in cc.encode(frame) + cc.encode(None))


def _write_frames(folder: Path, scene: _Scene, seconds: float, *, depth: bool) -> None:
    folder.mkdir()
    fw, fh = scene.w // 2, scene.h // 2
    yy = np.mgrid[0:fh, 0:fw][0].astype(np.float32)
    n = max(1, round(seconds * _FRAME_RATE))
    rows = ["frame,t"] if depth else ["t_ms"]
    for k in range(n):
        t = k / _FRAME_RATE
        masks = scene.masks(t, fw, fh)
        if depth:
            img = (3000.0 - 1200.0 * yy / fh).astype(np.float32)  # back wall leaning towards the floor
            for i, m in enumerate(masks):
                img[m] = 900.0 + 250.0 * i + 150.0 * math.sin(2 * math.pi * 0.2 * t + i)
            img[:2, :2] = 0.0  # a few invalid pixels, as real sensors have
            data = np.round(img).astype(np.uint16)
        else:
            img = np.full((fh, fw), 0.25, dtype=np.float32) + 0.05 * yy / fh  # cool room, warmer floor
            for i, m in enumerate(masks):
                img[m] = 0.6 + 0.1 * i
            data = np.round(img * 65535.0).astype(np.uint16)
        name = f"{k:06d}.png"
        (folder / name).write_bytes(_png_bytes(data, "gray16be"))
        rows.append(f"{name},{t:.6f}" if depth else f"{round(t * 1000)}")
    (folder / "timestamps.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def _write_captions(path: Path, scene: _Scene, seconds: float) -> None:
    lines = []
    t = 0.5
    events = planted_events(seconds)
    while t < seconds:
        if _in_event(t, events):
            lines.append(json.dumps({"t": round(t, 3), "text": "the screen flashes magenta and yellow, an alarm sounds"}))
            t += 2.5
            continue
        c = scene.centres(t)
        top = int(np.argmin(c[:, 1]))
        side = "left" if c[top, 0] < scene.w / 2 else "right"
        shape = ("circle", "square", "diamond")[top]
        lines.append(json.dumps({"t": round(t, 3), "text": f"the {_COLOURS[top]} {shape} is highest, on the {side}"}))
        t += 2.5
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
