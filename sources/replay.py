"""Pick the replay source for a validated stream of a recorded session."""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

from pipeline.session import SessionSpec, StreamSpec
from sources.audio import AudioSource
from sources.base import Chunk
from sources.frames import FrameFolderSource, NpyFramesSource
from sources.imu import ImuCsvSource
from sources.text import TextJsonlSource
from sources.video import DEFAULT_MAX_PIXELS, VideoSource

__all__ = ["Source", "open_source", "open_session"]


@runtime_checkable
class Source(Protocol):
    """What every source offers: its stream, drop counters by reason, and chunks."""

    spec: StreamSpec
    dropped: dict[str, int]

    def __iter__(self) -> Iterator[Chunk]: ...


def open_source(spec: StreamSpec, *, chunk_seconds: float = 1.0, video_size: int = 224,
                max_pixels: int = DEFAULT_MAX_PIXELS, select: Any = None) -> Source:
    """The replay source for ``spec``. Nothing is decoded until it is iterated, except that
    frame folders and ``.npy`` arrays check their timestamps file here (``SourceError``).
    ``select``: a :class:`pipeline.align.FrameSelector` for the stream (video and PNG-folder
    frames only; see :func:`pipeline.align.frame_selector`), or ``None`` for every frame."""
    kind = spec.kind
    if kind == "media":
        if spec.modality == "audio":
            return AudioSource(spec, chunk_seconds=chunk_seconds)
        return VideoSource(spec, chunk_seconds=chunk_seconds, video_size=video_size, max_pixels=max_pixels,
                           select=select)
    if kind == "csv":
        return ImuCsvSource(spec, chunk_seconds=chunk_seconds)
    if kind == "jsonl":
        return TextJsonlSource(spec, chunk_seconds=chunk_seconds)
    if kind == "png_dir":
        return FrameFolderSource(spec, chunk_seconds=chunk_seconds, max_pixels=max_pixels, select=select)
    return NpyFramesSource(spec, chunk_seconds=chunk_seconds)


def open_session(session: SessionSpec, *, chunk_seconds: float = 1.0, video_size: int = 224,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Source]:
    """One replay source per stream of ``session``, keyed by stream id, in file order."""
    return {s.id: open_source(s, chunk_seconds=chunk_seconds, video_size=video_size, max_pixels=max_pixels)
            for s in session.streams}
