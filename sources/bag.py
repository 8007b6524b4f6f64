"""Replay of one topic of a ROS recording (a bag stream: docs/session-format.md, "Bag streams").

Messages are read one at a time in file order (:mod:`sources.bagfile`) and turned into the
modality's samples (:mod:`sources.bagmsgs`); nothing but the current chunk is held. With a
frame selector, an image message no window can pick is never decoded: each message waits for
the next one's time, as a video frame does.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import av
import numpy as np

from sources.bagfile import Bag, BagDamage
from sources.bagmsgs import AUDIO_STAMPED, IMAGE_TYPES, PCM_FORMATS, BadMessage, FrameDecoder, imu_sample, stamp_ns
from sources.base import AUDIO_RATE, DEFAULT_MAX_PIXELS, DEFAULT_VIDEO_SIZE, Chunk
from sources.errors import SourceError
from sources._common import SKIPPED, _chunk, _chunked, _Chunker, _CpuMeter, _Drops
from sources.session import StreamSpec

__all__ = ["BagSource"]

log = logging.getLogger(__name__)


class BagSource:
    """The samples of ``spec.topic`` in ``spec.source``, ``chunk_seconds`` of stream time per chunk.

    Sample time: the message's ``header.stamp`` (``timestamps: header``; the log time for a
    message without a header or with a zero stamp) or the time the recorder logged it
    (``timestamps: log``), in seconds, plus ``spec.offset``. A message that cannot become a
    sample (it does not deserialise, an image that does not decode or is over the size limits,
    a frame whose size differs from the first) is dropped and counted in ``dropped`` by reason.
    A damaged recording raises :class:`SourceError` naming the stream, the file and the byte
    offset, after every sample before the damage was emitted.
    """

    def __init__(self, spec: StreamSpec, *, chunk_seconds: float = 1.0, video_size: int = DEFAULT_VIDEO_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS, select: Any = None) -> None:
        if spec.topic is None:
            raise ValueError(f"{spec.label}: BagSource needs a bag stream (with a topic)")
        self.spec = spec
        self.chunk_seconds = chunk_seconds
        self.video_size = video_size
        self.max_pixels = max_pixels
        self.select = select if spec.modality in ("vision", "depth", "thermal") else None
        self.dropped: dict[str, int] = {}
        self.cpu = _CpuMeter()
        self._drops = _Drops(spec, self.dropped)
        self.messages = 0

    def __iter__(self) -> Iterator[Chunk]:
        if self.spec.modality == "audio":
            yield from self._audio()
            return
        pack: Any = list if self.spec.modality == "text" else (
            (lambda rows: np.asarray(rows, dtype=np.float32).reshape(-1, 6)) if self.spec.modality == "imu" else np.stack)
        try:
            yield from _chunked(_Chunker(self.spec, self.chunk_seconds, pack), self._samples(), select=self.select)
        finally:
            self._drops.summary()

    def _messages(self) -> Iterator[tuple[float, Any]]:
        """(session time, message) of the topic; :class:`SourceError` at damage."""
        spec = self.spec
        bag = Bag(spec.source)
        off_ns = round(spec.offset * 1e9)  # added in nanoseconds: epoch stamps keep their precision
        header = spec.stamp == "header"
        try:
            for log_ns, msg in bag.messages(spec.topic or ""):
                self.messages += 1
                yield (stamp_ns(msg, log_ns, header) + off_ns) / 1e9, msg
        except BagDamage as e:
            where = f" at byte offset {e.offset}" if e.offset >= 0 else ""
            raise SourceError(f"{spec.label}: {e.path} is damaged{where}: {e.what}; topic {spec.topic} ended after "
                              f"{self.messages} messages") from None
        except OSError as e:
            raise SourceError(f"{spec.label}: cannot read {spec.source}: {e}") from None
        finally:
            if bag.undecodable:
                self.dropped["undecodable"] = self.dropped.get("undecodable", 0) + bag.undecodable

    def _samples(self) -> Iterator[tuple[float, Any]]:
        modality = self.spec.modality
        if modality == "imu":
            for t, msg in self._messages():
                yield t, imu_sample(msg)
        elif modality == "text":
            for t, msg in self._messages():
                yield t, str(msg.data)
        else:
            yield from self._frames()

    def _frames(self) -> Iterator[tuple[float, Any]]:
        decoder: FrameDecoder | None = None
        shape: tuple[int, ...] | None = None
        held: tuple[float, Any] | None = None  # selection: the message waiting for the next one's time

        def convert(t: float, msg: Any) -> Iterator[tuple[float, Any]]:
            nonlocal decoder, shape
            msgtype = getattr(msg, "__msgtype__", "")
            if decoder is None or decoder.msgtype != msgtype:
                if msgtype not in IMAGE_TYPES:
                    self._drops.drop("encoding", f"a {msgtype} message at t={t:.6f}")
                    return
                decoder = FrameDecoder(self.spec.modality, msgtype, self.video_size, self.max_pixels)
            try:
                img = decoder.decode(msg)
            except BadMessage as e:
                self._drops.drop(e.reason, f"message at t={t:.6f}: {e}")
                return
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                self._drops.drop("frame_size", f"message at t={t:.6f}: {img.shape} where earlier frames are {shape}")
                return
            yield t, img

        try:
            for t, msg in self._messages():
                if self.select is None:
                    yield from convert(t, msg)
                    continue
                if held is not None:
                    if self.select.keep(held[0], t):
                        yield from convert(*held)
                    else:
                        yield held[0], SKIPPED
                held = (t, msg)
        except SourceError:
            if held is not None:  # the last good message before the damage still goes out
                self.select.keep(held[0], None)
                yield from convert(*held)
            raise
        if held is not None:  # the last frame: always kept
            self.select.keep(held[0], None)
            yield from convert(*held)

    def _audio(self) -> Iterator[Chunk]:
        """Audio as contiguous 16 kHz mono: sample ``i`` is at the first message's time
        + i / 16000 (gaps between messages are not kept, as in a media file's audio track)."""
        spec = self.spec
        pcm = _PcmDecoder(dict(spec.options), spec.label)
        per_chunk = max(1, round(self.chunk_seconds * AUDIO_RATE))
        pending: list[np.ndarray] = []
        t0: float | None = None
        emitted = 0

        def take(n: int, passed: bool) -> Chunk:
            nonlocal pending, emitted
            buf = np.concatenate(pending)
            out, rest = buf[:n], buf[n:]
            pending = [rest] if rest.size else []
            assert t0 is not None
            chunk = _chunk(spec, t0 + (emitted + np.arange(out.size, dtype=np.float64)) / AUDIO_RATE, out)
            emitted += out.size
            if passed:
                chunk.passed = t0 + emitted / AUDIO_RATE
            return chunk

        try:
            for t, msg in self._messages():
                data = bytes(msg.audio.data if getattr(msg, "__msgtype__", "") == AUDIO_STAMPED else msg.data)
                try:
                    samples = pcm.decode(data)
                except BadMessage as e:
                    self._drops.drop(e.reason, f"message at t={t:.6f}: {e}")
                    continue
                if t0 is None:
                    t0 = t
                pending.append(samples)
                while sum(p.size for p in pending) > per_chunk:
                    yield take(per_chunk, True)
            pending.append(pcm.flush())
        except SourceError:
            if t0 is not None and sum(p.size for p in pending):
                yield take(sum(p.size for p in pending), False)
            raise
        finally:
            self._drops.summary()
        while t0 is not None and sum(p.size for p in pending):
            yield take(min(per_chunk, sum(p.size for p in pending)), False)


class _PcmDecoder:
    """Audio message payloads to float32 mono at 16 kHz: PCM as the options describe it
    (channels averaged), or MP3 frames decoded by PyAV; resampled with swresample."""

    def __init__(self, options: dict[str, Any], label: str) -> None:
        self.options = options
        self.label = label
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        self.mp3 = av.CodecContext.create("mp3", "r") if options.get("coding") == "mp3" else None
        self._rest = b""

    def decode(self, data: bytes) -> np.ndarray:
        if self.mp3 is not None:
            try:
                frames = self.mp3.decode(av.Packet(data))
            except (av.FFmpegError, ValueError) as e:
                raise BadMessage("bad_audio", f"mp3 payload does not decode: {e}") from None
        else:
            frame = self._pcm_frame(data)
            frames = [frame] if frame is not None else []
        return self._resample(frames)

    def _pcm_frame(self, data: bytes) -> Any:
        dtype, full = PCM_FORMATS[self.options["sample_format"]]
        channels = int(self.options["channels"])
        data = self._rest + data
        step = np.dtype(dtype).itemsize * channels
        usable = len(data) // step * step
        self._rest = data[usable:]  # a sample split across messages
        if not usable:
            return None
        x = np.frombuffer(data[:usable], dtype=dtype).reshape(-1, channels).astype(np.float32)
        if dtype == "u1":
            x -= 128.0
        mono = (x.mean(axis=1) / np.float32(full)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(mono[None, :], format="flt", layout="mono")
        frame.sample_rate = int(self.options["sample_rate"])
        return frame

    def _resample(self, frames: list) -> np.ndarray:
        out = [o.to_ndarray().reshape(-1) for f in frames for o in self.resampler.resample(f)]
        return np.concatenate(out).astype(np.float32) if out else np.empty(0, np.float32)

    def flush(self) -> np.ndarray:
        return self._resample([None])
