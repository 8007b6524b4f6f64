"""Real local peers for the live tests: a ZeroMQ IMU publisher with a skewed, jittered clock,
imagezmq senders fed with frames of a real video, and a UDP/MPEG-TS server, all written with
the real libraries (pyzmq, imagezmq, PyAV) and run in threads on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import msgpack
import numpy as np
import pytest
import zmq

REAL_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real" / "realshort.mp4"

__all__ = ["REAL_VIDEO", "real_frames", "free_port", "ImuPublisher", "FramePublisher", "ImageZmqFeeder",
           "UdpMpegTsServer"]


def real_frames(limit: int = 36) -> list[np.ndarray]:
    """RGB frames of realshort.mp4 (320x240), decoded with PyAV; the calling test skips where
    ../shared is absent."""
    if not REAL_VIDEO.is_file():
        pytest.skip(f"{REAL_VIDEO} is absent (../shared)")
    with av.open(str(REAL_VIDEO)) as c:
        return [f.to_ndarray(format="rgb24") for _, f in zip(range(limit), c.decode(video=0))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ImuPublisher(threading.Thread):
    """Publishes IMU samples at ``rate`` Hz with device time ``dev0 + true * (1 + skew)``, each
    sent after an exponential delay (mean ``jitter_s``). ``truth`` holds every sample's true
    session time, ``values`` its data. ``epoch`` is the consumer's session clock epoch."""

    def __init__(self, endpoint_port: int, epoch: float, *, rate: float = 200.0, skew: float = 500e-6,
                 dev0: float = 1000.0, jitter_s: float = 0.005, seed: int = 0, batch: int = 1) -> None:
        super().__init__(daemon=True)
        self.port, self.epoch, self.rate, self.skew, self.dev0 = endpoint_port, epoch, rate, skew, dev0
        self.jitter_s, self.batch = jitter_s, batch
        self.rng = np.random.default_rng(seed)
        self.truth: list[float] = []
        self.values: list[np.ndarray] = []
        self.halt = threading.Event()
        self.sent = 0
        # (after_s, t_offset): one extra sample stamped ``t + t_offset`` (a wild timestamp), sent
        # once the publisher has run ``after_s`` seconds; ``wild_sent`` counts them.
        self.wild: list[tuple[float, float]] = []
        self.wild_sent = 0

    def run(self) -> None:
        ctx = zmq.Context.instance()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(f"tcp://127.0.0.1:{self.port}")
        i = 0
        try:
            next_t = started = time.time()
            while not self.halt.is_set():
                self._send_wild(pub, time.time() - started)
                ts, rows = [], []
                for _ in range(self.batch):
                    true = time.time() - self.epoch
                    ts.append(self.dev0 + true * (1 + self.skew))
                    row = np.array([np.sin(i / 20), np.cos(i / 30), 9.8, 0.1 * np.sin(i / 7), 0.0, i % 5], np.float32)
                    self.truth.append(true)
                    self.values.append(row)
                    rows.append(row)
                    i += 1
                if self.jitter_s:
                    time.sleep(float(self.rng.exponential(self.jitter_s)))
                if self.batch == 1:
                    msg = {"t": ts[0], "shape": [6], "dtype": "float32", "data": rows[0].tobytes()}
                else:
                    msg = {"t": ts, "shape": [len(rows), 6], "dtype": "float32", "data": np.stack(rows).tobytes()}
                pub.send_multipart([b"imu", msgpack.packb(msg)])
                self.sent += len(rows)
                next_t += self.batch / self.rate
                time.sleep(max(0.0, next_t - time.time()))
        finally:
            pub.close(linger=0)

    def _send_wild(self, pub: zmq.Socket, running_s: float) -> None:
        due = [w for w in self.wild if w[0] <= running_s]
        for w in due:
            self.wild.remove(w)
            t = self.dev0 + (time.time() - self.epoch) * (1 + self.skew) + w[1]
            row = np.zeros(6, np.float32)
            pub.send_multipart([b"imu", msgpack.packb({"t": t, "shape": [6], "dtype": "float32",
                                                       "data": row.tobytes()})])
            self.wild_sent += 1


class FramePublisher(threading.Thread):
    """Publishes ``frames`` (cycled) as ``kind: zmq`` messages at ``fps`` on a PUB socket bound at
    127.0.0.1:port, stamped with device time ``dev0 + (now - epoch)``: a depth camera, or a
    flood of large frames. ``sent`` counts the frames, ``sent_bytes`` their payload bytes."""

    def __init__(self, port: int, epoch: float, frames: list[np.ndarray], *, fps: float = 10.0,
                 dev0: float = 100.0, sndhwm: int = 1000) -> None:
        super().__init__(daemon=True)
        self.port, self.epoch, self.frames, self.fps, self.dev0, self.sndhwm = port, epoch, frames, fps, dev0, sndhwm
        self.halt = threading.Event()
        self.sent = 0
        self.sent_bytes = 0

    def run(self) -> None:
        pub = zmq.Context.instance().socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, self.sndhwm)
        pub.bind(f"tcp://127.0.0.1:{self.port}")
        msgs = [(f.shape, str(f.dtype), f.tobytes()) for f in self.frames]
        try:
            next_t = time.time()
            while not self.halt.is_set():
                shape, dtype, data = msgs[self.sent % len(msgs)]
                t = self.dev0 + time.time() - self.epoch
                pub.send_multipart([b"f", msgpack.packb({"t": t, "shape": list(shape), "dtype": dtype, "data": data})])
                self.sent += 1
                self.sent_bytes += len(data)
                next_t += 1.0 / self.fps
                time.sleep(max(0.0, next_t - time.time()))
        finally:
            pub.close(linger=0)


class ImageZmqFeeder(threading.Thread):
    """An ``imagezmq.ImageSender`` sending ``frames`` in a loop at ``fps`` (``jpeg``: as JPEG
    encoded with PyAV; otherwise raw BGR arrays, as OpenCV senders do)."""

    def __init__(self, endpoint: str, frames: list[np.ndarray], *, reqrep: bool, jpeg: bool = False,
                 fps: float = 15.0, limit: int | None = None) -> None:
        super().__init__(daemon=True)
        self.endpoint, self.frames, self.reqrep, self.jpeg, self.fps, self.limit = endpoint, frames, reqrep, jpeg, fps, limit
        self.halt = threading.Event()
        self.sent: list[int] = []
        self.replies: list[bytes] = []
        self.ready = threading.Event()

    def run(self) -> None:
        import imagezmq

        def connect():
            sender = imagezmq.ImageSender(connect_to=self.endpoint, REQ_REP=self.reqrep)
            sender.zmq_socket.setsockopt(zmq.LINGER, 0)
            sender.zmq_socket.setsockopt(zmq.RCVTIMEO, 1000)
            return sender

        sender = connect()
        self.ready.set()
        jpgs = [_jpeg(f) for f in self.frames] if self.jpeg else None
        i = 0
        try:
            while not self.halt.is_set() and (self.limit is None or i < self.limit):
                k = i % len(self.frames)
                try:
                    if self.jpeg:
                        reply = sender.send_jpg(f"frame {i}", jpgs[k])
                    else:
                        reply = sender.send_image(f"frame {i}", np.ascontiguousarray(self.frames[k][..., ::-1]))
                except zmq.Again:
                    # No hub yet (or it went away): a REQ socket must be remade after a lost reply,
                    # which is what imagezmq users do too.
                    sender.zmq_socket.close(linger=0)
                    sender = connect()
                    continue
                if self.reqrep:
                    self.replies.append(reply)
                self.sent.append(k)
                i += 1
                time.sleep(1.0 / self.fps)
        finally:
            sender.zmq_socket.close(linger=0)


def _jpeg(rgb: np.ndarray) -> bytes:
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height, ctx.pix_fmt = rgb.shape[1], rgb.shape[0], "yuvj420p"
    ctx.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in ctx.encode(frame) + ctx.encode(None))


class UdpMpegTsServer(threading.Thread):
    """Streams ``frames`` (looped) as MPEG-TS over UDP to 127.0.0.1:port with PyAV, paced at
    ``fps``; a short GOP so a receiver that joins late decodes quickly."""

    def __init__(self, port: int, frames: list[np.ndarray], fps: int = 15) -> None:
        super().__init__(daemon=True)
        self.port, self.frames, self.fps = port, frames, fps
        self.halt = threading.Event()
        self.sent = 0

    def run(self) -> None:
        out = av.open(f"udp://127.0.0.1:{self.port}?pkt_size=1316", "w", format="mpegts")
        s = out.add_stream("mpeg2video", rate=self.fps)
        s.width, s.height, s.pix_fmt = self.frames[0].shape[1], self.frames[0].shape[0], "yuv420p"
        s.codec_context.gop_size = 5
        s.codec_context.bit_rate = 2_000_000
        t0 = time.time()
        try:
            while not self.halt.is_set():
                f = av.VideoFrame.from_ndarray(self.frames[self.sent % len(self.frames)], format="rgb24")
                f.pts = self.sent
                for p in s.encode(f):
                    out.mux(p)
                self.sent += 1
                time.sleep(max(0.0, t0 + self.sent / self.fps - time.time()))
        finally:
            try:
                for p in s.encode():
                    out.mux(p)
            finally:
                out.close()
