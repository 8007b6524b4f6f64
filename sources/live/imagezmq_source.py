"""``kind: imagezmq``: the receiving end (ImageHub) of the ``imagezmq`` package, so existing
``imagezmq.ImageSender`` rigs plug in unchanged.

The wire format, as imagezmq 1.x's ``SerializingSocket`` writes it: two frames,

* frame 0: JSON. ``{"msg": ..., "dtype": "uint8", "shape": [H, W, 3]}`` for ``send_image``
  (a raw OpenCV array, BGR unless ``color: rgb``; ``[H, W]`` is gray), or ``{"msg": ...}``
  for ``send_jpg``;
* frame 1: the array bytes, or the JPEG bytes (decoded with PyAV).

``mode: reqrep`` (imagezmq's default): the hub binds a REP socket at ``endpoint``, the sender
connects a REQ socket and waits for a reply after every image; every message is answered
``b"OK"`` as soon as it is received (by the receiving thread, :mod:`sources.live.inbox`),
malformed, oversized or over-budget ones included, so a sender never hangs while the source
runs. Frames of another size than the stream's first are rescaled to it (:mod:`sources.live.base`). ``mode: pubsub``: the sender
binds a PUB socket at ``endpoint`` and this source connects a SUB socket to it.
imagezmq carries no timestamps: frames are stamped on arrival (``clock: arrival``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterator

import av
import numpy as np
import zmq

from sources.errors import SourceError
from sources.imagesize import jpeg_size
from sources.live.base import LiveSource

__all__ = ["ImageZmqSource", "decode_jpeg"]

_MAX_META = 64 * 1024
_MAX_IMAGE_BYTES = 256 << 20


def decode_jpeg(buf: bytes) -> av.VideoFrame:
    """One JPEG decoded with PyAV (FFmpeg's mjpeg decoder)."""
    codec = av.CodecContext.create("mjpeg", "r")
    frames = codec.decode(av.Packet(buf)) + codec.decode(None)
    if not frames:
        raise ValueError("JPEG decoded to no frame")
    return frames[0]


class ImageZmqSource(LiveSource):
    def _samples(self) -> Iterator[tuple[float, Any] | None]:
        reqrep = self.spec.option("mode", "reqrep") == "reqrep"
        rx = self.receiver(self._open, max_bytes=_MAX_IMAGE_BYTES, reply=b"OK" if reqrep else None,
                           reconnect=None if reqrep else self.spec.option("endpoint"))
        yield from self.drain(rx, self._frame)

    def _open(self, ctx: zmq.Context, rx: Any) -> zmq.Socket:
        spec = self.spec
        reqrep = spec.option("mode", "reqrep") == "reqrep"
        sock = ctx.socket(zmq.REP if reqrep else zmq.SUB)
        rx.options(sock)
        endpoint = spec.option("endpoint")
        try:
            if reqrep:
                sock.bind(endpoint)
            else:
                sock.subscribe(b"")
                sock.connect(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise SourceError(f"{spec.label}: cannot {'bind' if reqrep else 'connect'} {endpoint}: {e}") from e
        return sock

    def _frame(self, frames: list[bytes], arrival: float) -> Iterator[tuple[float, Any]]:
        got = self._decode(frames)
        if got is not None:
            yield self.video_time(self.clock.map(None, arrival)), got

    def _decode(self, frames: list[bytes]) -> np.ndarray | None:
        if len(frames) != 2 or len(frames[0]) > _MAX_META:
            self.drop("bad_message", f"expected 2 frames (JSON metadata, image), got {len(frames)}")
            return None
        try:
            md = json.loads(frames[0])
            if not isinstance(md, dict):
                raise ValueError("metadata is not a JSON object")
            if "dtype" in md or "shape" in md:
                img = self._array(md, frames[1])
                if img is None:
                    return None
                return self.rgb(img)
            size = jpeg_size(frames[1])
            if size is None:
                raise ValueError("not a JPEG (no frame header before the image data)")
            if self.too_big(*size):
                return None
            frame = decode_jpeg(frames[1])
        except (ValueError, TypeError, av.FFmpegError) as e:
            self.drop("bad_message", str(e))
            return None
        if self.too_big(frame.width, frame.height):
            return None
        return self.rgb(frame)

    def _array(self, md: dict, buf: bytes) -> np.ndarray | None:
        shape = md.get("shape")
        if md.get("dtype") != "uint8":
            raise ValueError(f"image dtype {md.get('dtype')!r} is not uint8")
        if not isinstance(shape, list) or len(shape) not in (2, 3) or not all(
                isinstance(s, int) and s > 0 for s in shape) or (len(shape) == 3 and shape[2] not in (1, 3)):
            raise ValueError(f"image shape {shape!r} is not [H, W], [H, W, 1] or [H, W, 3]")
        if math.prod(shape) != len(buf):
            raise ValueError(f"image is {len(buf)} bytes, shape {shape} needs {math.prod(shape)}")
        if self.too_big(shape[1], shape[0]):
            return None
        img = np.frombuffer(buf, dtype=np.uint8).reshape(shape)
        if img.ndim == 2 or img.shape[2] == 1:
            return np.repeat(img.reshape(shape[0], shape[1], 1), 3, axis=2)
        return img[..., ::-1] if self.spec.option("color", "bgr") == "bgr" else img
