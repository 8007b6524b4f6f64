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
depth      float32 ``[N, H, W]``       one depth frame in metres; 0 or non-finite = no reading
thermal    float32 ``[N, H, W]``       one thermal frame scaled to [0, 1]
text       ``list[str]`` of length N   one timestamped utterance / caption
=========  ==========================  =====================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MODALITIES", "Chunk", "AUDIO_RATE"]

MODALITIES = ("vision", "audio", "imu", "depth", "thermal", "text")

AUDIO_RATE = 16_000  # Hz; every audio source resamples to this (ImageBind's rate)


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
