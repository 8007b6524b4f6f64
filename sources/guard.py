"""Per-stream input guard between a source and the aligner: clock jumps and non-finite data.

Pure logic (no Ray); :class:`pipeline.reader.StreamReader` runs one guard per stream on every
chunk before it is pushed. What it drops is counted by reason in :attr:`StreamGuard.dropped`
(merged into the stream's ``dropped`` counters: ``imu:jump``, ``audio:non_finite_data``) and
the first few drops of each reason are logged naming the session, the stream and the time.

The "wildly jumping timestamp" rule (also in ``docs/guarantees.md``):

* The guard keeps the stream's *accepted watermark*: the largest timestamp it let through.
* A sample whose timestamp lies more than ``max_gap_s`` from that watermark (ahead or behind)
  is a *jump*. It is dropped and counted as ``jump``, and remembered as a candidate.
* If the next jump sample lies within ``max_gap_s`` of the candidate, the clock really moved
  (a recording paused, a device re-synced): the guard re-bases on it and lets it through. So
  a single wild timestamp costs one sample, and a genuine gap costs the first sample after it.
* A sample inside ``max_gap_s`` of the watermark clears the candidate.
* ``max_gap_s = 0`` turns the rule off; text streams are exempt. Small disorder (duplicates, out-of-order samples within
  ``window.allowed_lateness``) is the aligner's business, not the guard's.

Non-finite data: an ``audio``, ``imu`` or ``thermal`` sample holding NaN or inf is dropped and
counted as ``non_finite_data`` (the aligner zero-fills audio gaps). ``depth`` keeps NaN: it
means "no reading" and preprocessing turns it into zero disparity. No NaN reaches an encoder
through the guard; the encoder refuses non-finite embeddings as a last line.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from sources.base import Chunk

__all__ = ["StreamGuard"]

log = logging.getLogger(__name__)

_MAX_WARNINGS_PER_REASON = 10
_FINITE_DATA = ("audio", "imu", "thermal")


class StreamGuard:
    """Filters the chunks of one stream; see the module docstring for the rules."""

    def __init__(self, session: str, stream: str, modality: str, *, max_gap_s: float = 0.0) -> None:
        if not (max_gap_s >= 0 and math.isfinite(max_gap_s)):
            raise ValueError(f"session '{session}' stream '{stream}': max_gap_s must be >= 0, got {max_gap_s!r}")
        self.session = session
        self.stream = stream
        self.modality = modality
        self.max_gap_s = float(max_gap_s)
        self.dropped: dict[str, int] = {}
        self._watermark: float | None = None
        self._candidate: float | None = None

    def apply(self, chunk: Chunk) -> Chunk:
        """The chunk without the samples the rules drop (possibly empty)."""
        t = np.asarray(chunk.t, dtype=np.float64)
        n = len(t)
        if n == 0:
            return chunk
        keep = np.ones(n, dtype=bool)
        if self.modality in _FINITE_DATA and not isinstance(chunk.data, list):
            data = np.asarray(chunk.data)
            if np.issubdtype(data.dtype, np.floating):
                finite = np.isfinite(data.reshape(n, -1)).all(axis=1)
                if not finite.all():
                    self._drop("non_finite_data", t[~finite])
                    keep &= finite
        if self.max_gap_s > 0 and self.modality != "text":  # utterances are sparse by nature
            keep &= self._clock(t, keep)
        if keep.all():
            return chunk
        data = chunk.data
        data = [d for d, k in zip(data, keep) if k] if isinstance(data, list) else np.asarray(data)[keep]
        return Chunk(stream=chunk.stream, modality=chunk.modality, t=t[keep], data=data,
                     t_ingest=chunk.t_ingest, meta=chunk.meta, passed=chunk.passed)

    def _clock(self, t: np.ndarray, keep: np.ndarray) -> np.ndarray:
        if self._watermark is not None and keep.all():
            # Fast path (audio: 16000 samples a second): every sample lies within the gap of the
            # running watermark, so each is accepted and the loop would change nothing else.
            wm = np.maximum.accumulate(np.concatenate([[self._watermark], t]))[:-1]
            with np.errstate(invalid="ignore"):  # inf - inf: a non-finite time, left to the loop
                fast = bool(np.all(np.abs(t - wm) <= self.max_gap_s))
            if fast:
                self._watermark = max(self._watermark, float(t.max()))
                self._candidate = None
                return np.ones(len(t), dtype=bool)
        return self._clock_each(t, keep)

    def _clock_each(self, t: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """The rule, sample by sample."""
        ok = np.ones(len(t), dtype=bool)
        gap = self.max_gap_s
        for i in np.flatnonzero(keep):
            ti = float(t[i])
            if not math.isfinite(ti):
                continue  # the aligner counts these as bad_timestamp
            if self._watermark is None or abs(ti - self._watermark) <= gap:
                self._watermark = ti if self._watermark is None else max(self._watermark, ti)
                self._candidate = None
                continue
            if self._candidate is not None and abs(ti - self._candidate) <= gap:
                log.warning("session '%s' stream '%s': clock moved from %.3f s to %.3f s; following it",
                            self.session, self.stream, self._watermark, ti)
                self._watermark = ti  # re-based: a backward re-base may make the aligner count 'late'
                self._candidate = None
                continue
            self._candidate = ti
            ok[i] = False
            self._drop("jump", t[i:i + 1], f"more than max_gap_s={gap:g} s from {self._watermark:.3f} s")
        return ok

    def _drop(self, reason: str, times: np.ndarray, why: str = "") -> None:
        k = len(times)
        before = self.dropped.get(reason, 0)
        self.dropped[reason] = before + k
        if before < _MAX_WARNINGS_PER_REASON:
            log.warning("session '%s' stream '%s': dropped %d sample(s) at t=%s s (%s%s)", self.session, self.stream,
                        k, ", ".join(f"{x:.3f}" for x in times[:3]), reason, f": {why}" if why else "")

    def merge_into(self, counts: dict[str, Any]) -> dict[str, Any]:
        """``counts`` plus this guard's drops (the source's own counters keep their names)."""
        out = dict(counts)
        for reason, n in self.dropped.items():
            out[reason] = int(out.get(reason, 0)) + n
        return out
