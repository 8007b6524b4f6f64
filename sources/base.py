"""The one data type every source emits, and the modality names.

A source turns a stream (a file, a device, a socket) into :class:`Chunk` objects on the
session clock. Everything downstream (the aligner, the encoders, the recorder) consumes only
chunks, so a replay source and a live source are interchangeable.

Per-modality ``data`` layout (N = number of samples in the chunk, ``t`` has length N):

=========  ==========================  =====================================================
modality   ``data``                    meaning of one sample
=========  ==========================  =====================================================
vision     uint8 ``[N, H, W, 3]``      one RGB frame, already downscaled at decode
audio      float32 ``[N]``             one mono PCM sample at 16 kHz, in [-1, 1]
imu        float32 ``[N, 6]``          ax, ay, az (m/s^2), gx, gy, gz (rad/s)
depth      uint16 or float32           one depth frame: uint16 in millimetres, or float32 in metres;
           ``[N, H, W]``               0 or non-finite = no reading
thermal    uint8, uint16 or float32    one thermal frame: integers over their full range, or float32,
           ``[N, H, W]``               meaning [0, 1]
text       ``list[str]`` of length N   one timestamped utterance / caption
=========  ==========================  =====================================================

Depth and thermal frames travel in the integer type a PNG stores where they have one (a 16-bit
depth frame is half the bytes of float32, an 8-bit thermal frame a quarter); the encoder
converts them on its device (``encoders.preprocess.prepare``); :func:`frame_values` gives
the float meaning on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MODALITIES", "Chunk", "AUDIO_RATE", "DEFAULT_MAX_PIXELS", "DEFAULT_VIDEO_SIZE", "frame_values"]

MODALITIES = ("vision", "audio", "imu", "depth", "thermal", "text")

AUDIO_RATE = 16_000  # Hz; every audio source resamples to this (ImageBind's rate)
DEFAULT_VIDEO_SIZE = 224  # short side (pixels) video frames are decoded to (ImageBind's input size)
DEFAULT_MAX_PIXELS = 8192 * 8192  # larger video / image frames are refused before decoding


@dataclass
class Chunk:
    """A run of consecutive samples of one stream.

    ``t`` holds the session-clock time in seconds (float64) of every sample. Samples inside a
    chunk are in the order the source read them; the aligner re-sorts within its allowed
    lateness and counts what it cannot place.
    """

    stream: str
    modality: str
    t: np.ndarray  # float64 [N], session clock seconds
    data: Any  # np.ndarray [N, ...] or list[str] for text, see module docstring
    # Wall-clock (time.time()) at which the newest sample of this chunk entered the pipeline;
    # publish latency is measured from here.
    t_ingest: float = 0.0
    meta: dict = field(default_factory=dict)
    # Session-clock time before which the stream has no more samples, when the source knows it
    # (the next sample's time: a file reader has read it; contiguous audio). It lets the aligner
    # release a window as soon as its end is covered instead of one chunk later; ``None`` when
    # unknown (live sources). See docs/alignment.md.
    passed: float | None = None

    def __len__(self) -> int:
        return len(self.t)

    def known_at(self) -> float:
        """Session time at which a live source could have sent this chunk: when the sample
        after it existed (``passed``), else its newest sample. Paced replay sends the chunk then,
        or a chunk length after its newest sample if that is earlier (``ReplayPacer``)."""
        newest = float(np.nanmax(self.t))
        return newest if self.passed is None else max(newest, float(self.passed))


def frame_values(modality: str, data: Any) -> np.ndarray:
    """Depth or thermal frames (one, or a stack) as float32 in their meaning: depth in metres
    (uint16 = millimetres), thermal in [0, 1] (uint8 / uint16 over their full range). The same
    arithmetic as the encoder's (``encoders.preprocess``), so both give identical values."""
    arr = np.asarray(data)
    if modality == "depth" and arr.dtype == np.uint16:
        return arr.astype(np.float32) / np.float32(1000.0)
    if modality == "thermal" and arr.dtype in (np.uint8, np.uint16):
        return arr.astype(np.float32) / np.float32(255.0 if arr.dtype == np.uint8 else 65535.0)
    return arr.astype(np.float32, copy=False)
