"""``kind: url`` and ``kind: device``: network streams and capture devices through PyAV.

``url``: anything FFmpeg opens by URL (``rtsp://``, ``rtmp://``, ``http(s)://``, ``udp://``,
``srt://``). ``timeout_s`` bounds opening and every read (PyAV's interrupt callback), so a
silent peer never hangs the source; a lost stream is reopened with exponential backoff (0.5 s
doubling up to ``max_backoff_s``), each attempt counted as ``reconnect`` in ``dropped``.

``device``: a camera or microphone by FFmpeg input format (``v4l2``, ``alsa``, ``pulse``,
``avfoundation``, ``dshow``, or ``lavfi`` for a synthetic one) and device name; ``size``
(``640x480``) and ``rate`` map to the format's ``video_size``/``framerate`` (video) or
``sample_rate`` (audio) options. Extra FFmpeg options go in ``options``.

Timestamps: with ``clock: device`` (default) a frame's pts time is the device time, mapped onto
the session clock by :class:`pipeline.clock.StreamClock`; ``clock: arrival`` stamps frames on
arrival. Audio is resampled to 16 kHz mono; its samples are timed from the first frame's
session time plus the sample count (like the replay source), restarted on each reconnect.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import av
import numpy as np

from pipeline.errors import SourceError
from sources.base import AUDIO_RATE
from sources.live.base import LiveSource

__all__ = ["AvLiveSource"]

log = logging.getLogger("sources.live")

_INITIAL_BACKOFF_S = 0.5


class AvLiveSource(LiveSource):
    def _open_args(self) -> tuple[str, dict[str, Any]]:
        spec = self.spec
        opts = dict(spec.option("options", ()))
        if spec.live == "device":
            target = spec.option("device")
            if spec.option("size"):
                opts.setdefault("video_size", spec.option("size"))
            if spec.option("rate") is not None:
                key = "sample_rate" if spec.modality == "audio" else "framerate"
                opts.setdefault(key, str(spec.option("rate")))
        else:
            target = spec.option("url")
        kw: dict[str, Any] = {"options": opts}
        if spec.option("format"):
            kw["format"] = spec.option("format")
        t = float(spec.option("timeout_s", 5.0))
        kw["timeout"] = (t, t)
        return target, kw

    def _samples(self) -> Iterator[tuple[float, Any] | None]:
        spec = self.spec
        target, kw = self._open_args()
        backoff = _INITIAL_BACKOFF_S
        max_backoff = float(spec.option("max_backoff_s", 10.0))
        attempts = 0
        while not self.stopped:
            try:
                container = av.open(target, **kw)
            except (av.FFmpegError, OSError) as e:
                attempts += 1
                if spec.live == "device" and attempts == 1 and isinstance(e, (FileNotFoundError,)):
                    raise SourceError(f"{spec.label}: cannot open device {target!r}: {e}") from e
                self.drop("reconnect", f"cannot open {target}: {e}; retrying in {backoff:.1f} s")
                if self._stop.wait(backoff):
                    return
                backoff = min(max_backoff, backoff * 2)
                continue
            got_any = False
            try:
                for s in self._read(container):
                    got_any = True
                    yield s
                    if self.stopped:
                        return
            except (av.FFmpegError, OSError) as e:
                self.drop("reconnect", f"{target} failed: {e}")
            finally:
                container.close()
            if self.stopped:
                return
            if got_any:
                backoff = _INITIAL_BACKOFF_S
            else:
                self.drop("reconnect", f"{target} ended; reopening in {backoff:.1f} s")
            if self._stop.wait(backoff):
                return
            backoff = min(max_backoff, backoff * 2)

    def _read(self, container: Any) -> Iterator[tuple[float, Any] | None]:
        spec = self.spec
        track = int(spec.option("track", 0))
        kind = "audio" if spec.modality == "audio" else "video"
        streams = container.streams.audio if kind == "audio" else container.streams.video
        if track >= len(streams):
            raise SourceError(f"{spec.label}: {spec.option('url') or spec.option('device')} has {len(streams)} "
                              f"{kind} streams, track {track} requested")
        stream = streams[track]
        if kind == "audio":
            yield from self._audio(container, stream)
            return
        for packet in container.demux(stream):
            for frame in packet.decode():
                arrival = self.session_clock.now()
                if self.too_big(frame.width, frame.height):
                    continue
                t = self.clock.map(frame.time, arrival)
                if spec.modality == "thermal":
                    img = frame.reformat(format="gray").to_ndarray().astype(np.float32) / np.float32(255.0)
                    yield t, img
                else:
                    yield self.video_time(t), self.rgb(frame)
            if self.stopped:
                return

    def _audio(self, container: Any, stream: Any) -> Iterator[tuple[Any, Any] | None]:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        anchor: float | None = None
        emitted = 0
        for packet in container.demux(stream):
            for frame in packet.decode():
                arrival = self.session_clock.now()
                if anchor is None:
                    anchor = self.clock.map(frame.time, arrival)
                for out in resampler.resample(frame):
                    pcm = out.to_ndarray().reshape(-1).astype(np.float32)
                    # Same arithmetic as the replay AudioSource, so a recording replays exactly.
                    t = 0.0 + (emitted + np.arange(pcm.size, dtype=np.float64)) / AUDIO_RATE + anchor
                    emitted += pcm.size
                    yield t, pcm
            if self.stopped:
                return
