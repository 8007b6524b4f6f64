"""Audio replay with PyAV: one audio track resampled to 16 kHz mono float32."""

from __future__ import annotations

import time
from typing import Iterator

import av
import numpy as np

from sources.errors import SourceError
from sources.session import StreamSpec
from sources._common import _chunk, _CpuMeter, _demux_decode, _open_media, media_error
from sources.base import AUDIO_RATE, Chunk

__all__ = ["AudioSource"]


class AudioSource:
    """PCM of one audio track, ``chunk_seconds`` of samples per chunk (the last may be short).

    Sample ``i`` (counted from the first decoded sample) is at
    ``first frame pts time + i / 16000 + spec.offset``: the resampler's output is a
    continuous sample stream, so per-sample times are derived from the count rather than
    from resampled frame pts, which drift by rounding. ``cpu`` accumulates the CPU seconds spent
    decoding and resampling (resampling is the audio source's ``resize_s``).
    """

    def __init__(self, spec: StreamSpec, *, chunk_seconds: float = 1.0) -> None:
        if spec.modality != "audio":
            raise ValueError(f"{spec.label}: AudioSource reads audio, not {spec.modality}")
        if not chunk_seconds > 0:
            raise ValueError(f"{spec.label}: chunk_seconds must be > 0, got {chunk_seconds!r}")
        self.spec = spec
        self.chunk_seconds = chunk_seconds
        self.dropped: dict[str, int] = {}
        self.cpu = _CpuMeter()

    def __iter__(self) -> Iterator[Chunk]:
        spec = self.spec
        per_chunk = max(1, round(self.chunk_seconds * AUDIO_RATE))
        with _open_media(spec) as container:
            if spec.track >= len(container.streams.audio):
                raise SourceError(f"{spec.label}: {spec.rel(spec.source)} has {len(container.streams.audio)} audio tracks, "
                                  f"track {spec.track} requested")
            stream = container.streams.audio[spec.track]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
            pending: list[np.ndarray] = []
            n_pending = 0
            emitted = 0  # samples already sent
            t0: float | None = None

            def take(n: int) -> Chunk:
                nonlocal pending, n_pending, emitted
                buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
                out, rest = buf[:n], buf[n:]
                pending = [rest] if rest.size else []
                n_pending -= out.size
                t = t0 + (emitted + np.arange(out.size, dtype=np.float64)) / AUDIO_RATE + spec.offset
                emitted += out.size
                chunk = _chunk(spec, t, np.ascontiguousarray(out, dtype=np.float32))
                chunk.passed = t0 + emitted / AUDIO_RATE + spec.offset  # contiguous: the next sample's time
                return chunk

            try:
                for frame in _demux_decode(spec, container, stream, "audio", self.cpu):
                    if t0 is None:
                        t0 = frame.time if frame.time is not None else 0.0
                    for out in self._resample(resampler, frame):
                        pending.append(self._pcm(out))
                        n_pending += out.samples
                    while n_pending >= per_chunk:
                        yield take(per_chunk)
                # Flush: the resampler holds back its filter delay until told the input ended.
                for out in self._resample(resampler, None):
                    pending.append(self._pcm(out))
                    n_pending += out.samples
            except SourceError:
                while n_pending > 0:
                    yield take(min(per_chunk, n_pending))
                raise
            while n_pending > 0:
                yield take(min(per_chunk, n_pending))

    def _resample(self, resampler: av.AudioResampler, frame: av.AudioFrame | None) -> list[av.AudioFrame]:
        t0 = time.thread_time()
        try:
            return resampler.resample(frame)
        except (av.FFmpegError, ValueError) as e:  # e.g. the track changes layout mid-file
            raise SourceError(f"{self.spec.label}: resampling audio from {self.spec.rel(self.spec.source)} failed: {media_error(e)}") from e
        finally:
            self.cpu.resize_s += time.thread_time() - t0

    def _pcm(self, frame: av.AudioFrame) -> np.ndarray:
        t0 = time.thread_time()
        out = frame.to_ndarray().reshape(-1)
        self.cpu.resize_s += time.thread_time() - t0
        return out
