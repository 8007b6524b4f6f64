"""``kind: url`` and ``kind: device``: network streams and capture devices through PyAV.

``url``: anything FFmpeg opens by URL (``rtsp://``, ``rtmp://``, ``http(s)://``, ``udp://``,
``srt://``). ``timeout_s`` bounds opening and every read (PyAV's interrupt callback), so a
silent peer never hangs the source; a lost stream is reopened with exponential backoff (0.5 s
doubling up to ``max_backoff_s``), each attempt counted as ``reconnect`` in ``dropped``. An
RTSP receiver in listen mode (``options: {rtsp_flags: listen}``, a sender pushes to us) gets
``listen_timeout`` = ``timeout_s`` unless it sets one: FFmpeg's default (-1, "forever") fails
the open with ERANGE.

``device``: a camera or microphone by FFmpeg input format (``v4l2``, ``alsa``, ``pulse``,
``avfoundation``, ``dshow``, or ``lavfi`` for a synthetic one) and device name; ``size``
(``640x480``) and ``rate`` map to the format's ``video_size``/``framerate`` (video) or
``sample_rate`` (audio) options. Extra FFmpeg options go in ``options``.

Timestamps (``clock: device``, the default), per connection:

* **RTCP** when the input carries a wall-clock reference: FFmpeg's RTSP/RTP demuxer sets
  ``start_time_realtime`` (Unix microseconds) from the first RTCP sender report's NTP time,
  and frame pts are relative to it, so a frame's Unix time is
  ``start_time_realtime / 1e6 + pts * time_base``; session time = that minus the epoch. The
  sender's wall clock is trusted as the session clock (as ``clock: session`` does), so it must
  be NTP-synced; ``clock: arrival`` opts out.
* otherwise the pts are the device time, mapped onto the session clock by
  :class:`sources.clock.StreamClock` (offset estimated from arrival times).

Which one a connection uses is logged and kept in :attr:`AvLiveSource.clock_mapping`. Each
connection starts a fresh mapping (a reopened stream has new pts and a new sender clock).

Audio is resampled to 16 kHz mono; its samples are timed from the first frame's session time
plus the sample count (like the replay source). After a reconnect the first frame's session
time places the new samples on the same 16 kHz grid, the skipped sample count being the gap:
a reconnect leaves a gap in the times, never a shift, and the recorder (sources/record.py)
can store the gap as silence so a replay reproduces the times exactly.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator

import av
import numpy as np

from sources.clock import OffsetEstimator, monotone
from sources.errors import SourceError
from sources.base import AUDIO_RATE
from sources._common import media_error
from sources.live.base import POLL_S, LiveSource

__all__ = ["AvLiveSource", "RTCP", "ESTIMATED", "ARRIVAL"]

log = logging.getLogger("sources.live")

_INITIAL_BACKOFF_S = 0.5
RTCP = "rtcp"  # clock_mapping values: times from RTCP sender reports,
ESTIMATED = "estimated"  # stream pts with an offset estimated from arrival times,
ARRIVAL = "arrival"  # or arrival times (clock: arrival, or frames without pts).


class AvLiveSource(LiveSource):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.clock_mapping: str | None = None  # how the latest connection maps times
        self._connection = 0
        self._noted: tuple[int, str] | None = None  # (connection, mapping) last logged
        self._last_t = -math.inf
        # Audio sample clock, kept across reconnects: sample i is at anchor + i / AUDIO_RATE.
        self._audio_anchor: float | None = None
        self._audio_emitted = 0

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
        t = float(spec.option("timeout_s", 5.0))
        if "listen" in str(opts.get("rtsp_flags", "")):
            opts.setdefault("listen_timeout", str(max(1, math.ceil(t))))
        kw: dict[str, Any] = {"options": opts}
        if spec.option("format"):
            kw["format"] = spec.option("format")
        kw["timeout"] = (t, t)
        return target, kw

    def _wait(self, seconds: float) -> Iterator[None]:
        """Wait ``seconds`` (less when stopped), yielding ``None`` every :data:`POLL_S` so a
        chunk held from before a lost connection still goes out on time."""
        end = self.session_clock.now() + seconds
        while not self.stopped:
            left = end - self.session_clock.now()
            if left <= 0 or self._stop.wait(min(POLL_S, left)):
                return
            yield None

    def _samples(self) -> Iterator[tuple[float, Any] | None]:
        """The stream's samples, reopening a lost connection. A device that cannot be opened at
        first is a stream error at once (it is local: a wrong path or format, or busy); a url that
        has delivered nothing by the time the stream stops is a stream error then (its sender
        may legitimately start after us, so it is retried until the stop)."""
        spec = self.spec
        target, kw = self._open_args()
        backoff = _INITIAL_BACKOFF_S
        max_backoff = float(spec.option("max_backoff_s", 10.0))
        attempts = 0
        self._delivered, self._last_failure = False, ""
        t0 = self.session_clock.now()
        while not self.stopped:
            try:
                container = av.open(target, **kw)
            except (av.FFmpegError, OSError, ValueError) as e:  # ValueError: a format this FFmpeg lacks
                attempts += 1
                if spec.live == "device" and attempts == 1:
                    fmt = f" (format {spec.option('format')})" if spec.option("format") else ""
                    raise SourceError(f"{spec.label}: cannot open device {target!r}{fmt}: {media_error(e)}") from e
                self._last_failure = f"cannot open: {media_error(e)}"
                self.drop("reconnect", f"cannot open {target}: {media_error(e)}; retrying in {backoff:.1f} s")
                yield from self._wait(backoff)
                backoff = min(max_backoff, backoff * 2)
                continue
            self._new_connection()
            got_any = False
            why = "ended"
            try:
                for s in self._read(container):
                    got_any = True
                    self._delivered = self._delivered or s is not None
                    yield s
                    if self.stopped:
                        break
            except (av.FFmpegError, OSError) as e:
                why = f"failed: {media_error(e)}"
            finally:
                container.close()
            if self.stopped:
                break
            if got_any:
                backoff = _INITIAL_BACKOFF_S
            self._last_failure = why
            self.drop("reconnect", f"{target} {why}; reopening in {backoff:.1f} s")
            yield from self._wait(backoff)
            backoff = min(max_backoff, backoff * 2)
        if not self._delivered and spec.live == "url":
            raise SourceError(f"{spec.label}: url {target} delivered nothing in {self.session_clock.now() - t0:.0f} s "
                              f"of trying ({attempts} failed opens; last: {self._last_failure or 'no data'})")

    # -- time mapping ---------------------------------------------------------------------------
    def _new_connection(self) -> None:
        """A reopened stream has new pts (and maybe a new sender): forget the old mapping."""
        self._connection += 1
        if self._connection > 1:
            self.clock.estimator = OffsetEstimator()

    def _map(self, container: Any, frame_time: float | None, arrival: float) -> float:
        """Session time of a frame with pts time ``frame_time`` that arrived at ``arrival``."""
        srt = container.start_time_realtime if self.spec.clock != "arrival" else None
        if srt and frame_time is not None:  # None: AV_NOPTS_VALUE; 0: never set
            off = srt / 1e6 - self.session_clock.epoch
            if not self.clock.applied:
                self.clock.applied = [off, off]
            self.clock.applied[-1] = off
            t = frame_time + off + self.clock.extra
            self._note_mapping(RTCP, f"sender wall clock minus arrival {t - arrival - self.clock.extra:+.3f} s")
        else:
            t = self.clock.map(frame_time, arrival)
            self._note_mapping(ARRIVAL if self.spec.clock == "arrival" or frame_time is None else ESTIMATED, "")
        t = monotone(t, self._last_t)  # never backwards by a little, across mappings and connections too
        self._last_t = t
        return t

    def _note_mapping(self, mapping: str, detail: str) -> None:
        self.clock_mapping = mapping
        if self._noted == (self._connection, mapping):
            return
        self._noted = (self._connection, mapping)
        what = {RTCP: "RTCP sender reports (start_time_realtime + pts)",
                ESTIMATED: "stream pts with an offset estimated from arrival times",
                ARRIVAL: "arrival times"}[mapping]
        log.info("%s: connection %d timestamps from %s%s", self.spec.label, self._connection, what,
                 f" ({detail})" if detail else "")

    # -- reading --------------------------------------------------------------------------------
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
                t = self._map(container, frame.time, arrival)
                if spec.modality == "thermal":
                    yield t, frame.reformat(format="gray").to_ndarray()  # uint8: 255 = 1.0
                else:
                    yield self.video_time(t), self.rgb(frame)
            if self.stopped:
                return

    def _audio(self, container: Any, stream: Any) -> Iterator[tuple[Any, Any] | None]:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        placed = False
        for packet in container.demux(stream):
            for frame in packet.decode():
                if not placed:
                    self._place_audio(self._map(container, frame.time, self.session_clock.now()))
                    placed = True
                anchor = self._audio_anchor
                assert anchor is not None  # placed above
                for out in resampler.resample(frame):
                    pcm = out.to_ndarray().reshape(-1).astype(np.float32)
                    # Same arithmetic as the replay AudioSource, so a recording replays exactly.
                    t = 0.0 + (self._audio_emitted + np.arange(pcm.size, dtype=np.float64)) / AUDIO_RATE + anchor
                    self._audio_emitted += pcm.size
                    yield t, pcm
            if self.stopped:
                return

    def _place_audio(self, t: float) -> None:
        """Place a connection's first sample, at session time ``t``, on the stream's sample grid."""
        if self._audio_anchor is None:
            self._audio_anchor, self._audio_emitted = t, 0
            return
        gap = round((t - self._audio_anchor) * AUDIO_RATE) - self._audio_emitted
        if gap >= 0:
            self._audio_emitted += gap
            log.info("%s: audio resumes after a gap of %.3f s", self.spec.label, gap / AUDIO_RATE)
        else:  # the new connection's first sample maps before the last one emitted
            log.warning("%s: audio after reconnect would overlap the previous %.3f s; appended instead",
                        self.spec.label, -gap / AUDIO_RATE)
