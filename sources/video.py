"""Video replay with PyAV: RGB frames for ``vision``, gray frames for a ``thermal`` video."""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import numpy as np
from av.video.reformatter import VideoReformatter

from sources.errors import SourceError
from sources.session import StreamSpec
from sources._common import SKIPPED, _Chunker, _chunked, _CpuMeter, _demux_decode, _open_media, _thread_ids
from sources.base import DEFAULT_MAX_PIXELS, DEFAULT_VIDEO_SIZE, Chunk
from sources.imagesize import frame_size_problem

__all__ = ["VideoSource", "scaled_size"]

log = logging.getLogger(__name__)


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side ``short_side``, aspect kept, both rounded to even.

    Even sizes keep every chroma-subsampled pixel format and later re-encoding happy.
    """
    scale = short_side / min(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


class VideoSource:
    """Frames of one video track of a container, ``chunk_seconds`` of stream time per chunk.

    ``vision``: uint8 ``[N, H, W, 3]`` RGB, scaled while decoding so the short side is
    ``video_size`` (scaling in swscale at decode keeps 4K input from ever existing as full
    size RGB arrays). ``thermal``: uint8 ``[N, H, W]`` luma at native size (255 = 1.0).
    Sample time = frame pts * time_base + ``spec.offset``. ``cpu`` accumulates the CPU seconds
    spent decoding and scaling (see :class:`sources._common._CpuMeter`).

    ``select``: a :class:`pipeline.selection.FrameSelector`. Every frame is still decoded (later
    frames depend on it), but only those some window can pick are scaled and emitted; the
    decision needs the next frame's time, so each frame waits for the next one to decode.
    """

    def __init__(self, spec: StreamSpec, *, chunk_seconds: float = 1.0, video_size: int = DEFAULT_VIDEO_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS, select: Any = None) -> None:
        if spec.modality not in ("vision", "thermal"):
            raise ValueError(f"{spec.label}: VideoSource reads vision or thermal, not {spec.modality}")
        if video_size < 2:
            raise ValueError(f"{spec.label}: video_size must be >= 2, got {video_size}")
        self.spec = spec
        self.chunk_seconds = chunk_seconds
        self.video_size = video_size
        self.max_pixels = max_pixels
        self.select = select
        self.dropped: dict[str, int] = {}
        self.cpu = _CpuMeter()

    def __iter__(self) -> Iterator[Chunk]:
        spec = self.spec
        gray = spec.modality == "thermal"
        chunker = _Chunker(spec, self.chunk_seconds, np.stack)
        with _open_media(spec) as container:
            if spec.track >= len(container.streams.video):
                raise SourceError(f"{spec.label}: {spec.rel(spec.source)} has {len(container.streams.video)} video tracks, "
                                  f"track {spec.track} requested")
            stream = container.streams.video[spec.track]
            w, h = stream.codec_context.width, stream.codec_context.height
            problem = frame_size_problem(w, h, self.max_pixels)
            if problem:
                raise SourceError(f"{spec.label}: {spec.rel(spec.source)} video track {spec.track}: {problem}")
            out_w, out_h = (w, h) if gray else scaled_size(w, h, self.video_size)
            stream.thread_type = "AUTO"
            yield from _chunked(chunker, self._frames(container, stream, out_w, out_h, gray), select=self.select)

    def _refused(self, frame: Any) -> bool:
        """A frame whose size changed mid-file to one the limits refuse: dropped and counted."""
        problem = frame_size_problem(frame.width, frame.height, self.max_pixels)
        if problem:
            self.dropped["frame_size"] = self.dropped.get("frame_size", 0) + 1
            if self.dropped["frame_size"] <= 10:
                log.warning("%s: %s: dropped a frame of %s", self.spec.label, self.spec.source, problem)
        return problem is not None

    def _frames(self, container, stream, out_w: int, out_h: int, gray: bool) -> Iterator[tuple[float, Any]]:
        spec = self.spec
        rate = float(stream.average_rate) if stream.average_rate else 30.0
        last_ft: float | None = None
        # One scaler for the stream: ``frame.reformat`` builds a new swscale context and slice
        # threads for every frame, whose CPU vanishes with them; a kept one lets the CPU split
        # count its threads (same output; the same ~1.7 ms/720p frame once warm, measured).
        scaler = VideoReformatter()
        first = True

        def convert(frame: Any) -> np.ndarray:
            nonlocal first
            t0 = time.thread_time()
            before = _thread_ids() if first else None
            # Fixed output size: a mid-file resolution change is rescaled to the first size.
            if gray:
                img = scaler.reformat(frame, width=out_w, height=out_h, format="gray").to_ndarray()
            else:
                img = scaler.reformat(frame, width=out_w, height=out_h, format="rgb24",
                                      interpolation="AREA").to_ndarray()
            if before is not None:
                self.cpu.scaler_threads.adopt(before)  # swscale starts its slice threads here
                first = False
            self.cpu.resize_s += time.thread_time() - t0
            return img

        held: tuple[float, Any] | None = None  # selection: the frame waiting for the next one's time
        try:
            for frame in _demux_decode(spec, container, stream, "video", self.cpu):
                if self._refused(frame):
                    continue
                ft = frame.time
                if ft is None:
                    # Raw elementary streams carry no pts; assume the nominal rate.
                    ft = 0.0 if last_ft is None else last_ft + 1.0 / rate
                last_ft = ft
                t = ft + spec.offset
                if self.select is None:
                    yield t, convert(frame)
                    continue
                if held is not None:
                    ht, hframe = held
                    yield ht, (convert(hframe) if self.select.keep(ht, t) else SKIPPED)
                held = (t, frame)
        except SourceError:
            if held is not None:  # the last good frame before a decoding error still goes out
                self.select.keep(held[0], None)
                yield held[0], convert(held[1])
            raise
        if held is not None:  # the last frame: always kept
            self.select.keep(held[0], None)
            yield held[0], convert(held[1])
