"""Live sources: devices, network streams and ZeroMQ sensor feeds (docs/live.md).

Each yields the same :class:`~sources.base.Chunk` as the replay sources, on the session clock
of :mod:`sources.clock`, and runs until :meth:`~sources.live.base.LiveSource.stop`.
"""

from __future__ import annotations

from sources.base import DEFAULT_MAX_PIXELS, DEFAULT_VIDEO_SIZE
from sources.clock import SessionClock
from sources.session import StreamSpec
from sources.live.base import LiveSource
from sources.live.inbox import DEFAULT_QUEUE_BYTES

__all__ = ["LiveSource", "open_live_source"]


def open_live_source(spec: StreamSpec, clock: SessionClock, *, chunk_seconds: float = 0.5, video_size: int = DEFAULT_VIDEO_SIZE,
                     max_pixels: int = DEFAULT_MAX_PIXELS, queue_bytes: int = DEFAULT_QUEUE_BYTES) -> LiveSource:
    """The live source for a stream declared with a ``kind``; nothing opens until iterated."""
    kw = {"chunk_seconds": chunk_seconds, "video_size": video_size, "max_pixels": max_pixels, "queue_bytes": queue_bytes}
    if spec.live == "zmq":
        from sources.live.zmq_sensor import ZmqSensorSource

        return ZmqSensorSource(spec, clock, **kw)
    if spec.live == "imagezmq":
        from sources.live.imagezmq_source import ImageZmqSource

        return ImageZmqSource(spec, clock, **kw)
    if spec.live in ("url", "device"):
        from sources.live.av_input import AvLiveSource

        return AvLiveSource(spec, clock, **kw)
    raise ValueError(f"{spec.label}: not a live stream (kind {spec.live!r})")
