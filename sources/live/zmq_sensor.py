"""``kind: zmq``: sensor samples a rig publishes over ZeroMQ, one msgpack map per message.

Wire schema (docs/live.md): a message is one frame, or two (``topic``, payload) from a PUB
socket; the payload is a msgpack map

=========  ===========================================================================
``t``      number, or a list of N numbers: the sample time(s) in seconds on the clock
           the stream declares (``clock: device`` | ``session`` | ``arrival``)
``shape``  list of ints: the array shape; with a list ``t`` the first dimension is N
``dtype``  numpy dtype name: uint8, uint16, int16, int32, float32, float64
``data``   bin: the C-order array bytes (little endian), exactly prod(shape) * itemsize
=========  ===========================================================================

One sample is: imu ``[6]`` (ax, ay, az in m/s^2, gx, gy, gz in rad/s); depth ``[H, W]``
(integers are millimetres, floats metres); thermal ``[H, W]`` (uint8/uint16 full range,
floats in [0, 1]); vision ``[H, W, 3]`` uint8 RGB. Other keys are ignored. Bad messages are
dropped and counted (``bad_message``); nothing from the socket is trusted: the size is bounded
by ``max_bytes`` (``too_big``), ZMQ_MAXMSGSIZE and msgpack's own length limits
(:func:`_unpack_sample`), and what waits for the reader by the stream's byte budget
(``over_budget``, :mod:`sources.live.inbox`).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import msgpack
import numpy as np
import zmq

from sources.curve import load_rig_keys
from sources.frames import _frame_values
from sources.errors import SourceError
from sources.live.base import LiveSource

__all__ = ["ZmqSensorSource", "DTYPES", "DEFAULT_MAX_BYTES"]

DTYPES = ("uint8", "uint16", "int16", "int32", "float32", "float64")
DEFAULT_MAX_BYTES = 16 << 20
_MAX_KEYS = 64  # a sample map has four keys; other keys are ignored but bounded
_MAX_TIMES = 1 << 20  # samples one message may carry


class ZmqSensorSource(LiveSource):
    """SUB socket (connects, or binds with ``bind: true``) reading the schema above."""

    def _samples(self) -> Iterator[tuple[float, Any] | None]:
        max_bytes = int(self.spec.option("max_bytes", DEFAULT_MAX_BYTES))
        bind = self.spec.option("bind", False)
        rx = self.receiver(self._open, max_bytes=max_bytes, reconnect=None if bind else self.spec.option("endpoint"))
        yield from self.drain(rx, lambda frames, arrival: self._decode(frames[-1], arrival, max_bytes))

    def _open(self, ctx: zmq.Context, rx: Any) -> zmq.Socket:
        spec = self.spec
        sock = ctx.socket(zmq.SUB)
        try:
            rx.options(sock)
            sock.subscribe(spec.option("topic", "").encode())
            if spec.option("curve_server_key"):
                server, public, secret = load_rig_keys(spec.option("curve_server_key"), spec.option("curve_client_key"))
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server, public, secret
            endpoint = spec.option("endpoint")
            try:
                sock.bind(endpoint) if spec.option("bind", False) else sock.connect(endpoint)
            except zmq.ZMQError as e:
                raise SourceError(f"{spec.label}: cannot {'bind' if spec.option('bind') else 'connect'} "
                                  f"{endpoint}: {e}") from e
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def _decode(self, payload: bytes, arrival: float, max_bytes: int) -> Iterator[tuple[float, Any]]:
        try:
            times, arr = decode_sample(payload, self.spec.modality, max_bytes)
        except (ValueError, TypeError) as e:
            self.drop("bad_message", str(e))
            return
        if self.spec.modality == "vision":
            if self.too_big(arr.shape[2], arr.shape[1]):
                return
            for t, img in zip(times, arr):
                yield self.video_time(self.clock.map(t, arrival)), self.rgb(img)
            return
        if self.spec.modality in ("depth", "thermal"):
            arr = _frame_values(self.spec, arr, "zmq message")
        else:
            arr = arr.astype(np.float32)
        for t, sample in zip(times, arr):
            yield self.clock.map(t, arrival), sample


_SAMPLE_NDIM = {"imu": 1, "depth": 2, "thermal": 2, "vision": 3}


def decode_sample(payload: bytes, modality: str, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[float], np.ndarray]:
    """(times, array ``[N, ...]``) from one message of the schema; ValueError if malformed."""
    d = _unpack_sample(payload, max_bytes)
    if not isinstance(d, dict):
        raise ValueError(f"expected a msgpack map, got {type(d).__name__}")
    missing = [k for k in ("t", "shape", "dtype", "data") if k not in d]
    if missing:
        raise ValueError(f"message lacks {', '.join(missing)}")
    t, shape, dtype, data = d["t"], d["shape"], d["dtype"], d["data"]
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(data, bytes):
        raise ValueError(f"data must be msgpack bin, got {type(data).__name__}")
    dt = np.dtype(dtype).newbyteorder("<")
    if math.prod(shape) * dt.itemsize != len(data):
        raise ValueError(f"data is {len(data)} bytes, shape {shape} of {dtype} needs {math.prod(shape) * dt.itemsize}")
    arr = np.frombuffer(data, dtype=dt).reshape(shape)
    batched = isinstance(t, list)
    times = t if batched else [t]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in times):
        raise ValueError("t must be a finite number or a list of them")
    if not batched:
        arr = arr[None]
    if arr.ndim != _SAMPLE_NDIM[modality] + 1 or arr.shape[0] != len(times):
        raise ValueError(f"{modality} expects {'[N, ' if batched else '['}{_SAMPLE_NDIM[modality]}-d sample] "
                         f"with one t per sample, got shape {shape} and {len(times)} time(s)")
    if modality == "imu" and arr.shape[1] != 6:
        raise ValueError(f"imu samples are [6] (ax, ay, az, gx, gy, gz), got {arr.shape[1:]}")
    if modality == "vision" and (arr.shape[3] != 3 or arr.dtype != np.uint8):
        raise ValueError(f"vision samples are [H, W, 3] uint8 RGB, got {arr.shape[1:]} {arr.dtype}")
    return [float(x) for x in times], arr.astype(arr.dtype.newbyteorder("="))


def _unpack_sample(payload: bytes, max_bytes: int) -> Any:
    """The message's msgpack map, every declared length checked before allocation and
    extension types refused; ValueError on anything else."""
    if len(payload) > max_bytes:
        raise ValueError(f"message is {len(payload)} bytes, over max_bytes {max_bytes}")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=max_bytes,
                               max_str_len=1024, max_array_len=_MAX_TIMES, max_map_len=_MAX_KEYS,
                               max_ext_len=0)
    except Exception as e:  # msgpack raises many types (ValueError, StackError, ...) on hostile input
        raise ValueError(f"not a bounded msgpack message: {type(e).__name__}: {e}") from None
