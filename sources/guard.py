"""Per-stream input guard between a source and the aligner: clock jumps and non-finite data.

Pure logic (no Ray); :class:`pipeline.reader.StreamReader` runs one guard per stream on every
chunk before it is pushed. What it drops is counted by reason in :attr:`StreamGuard.dropped`
(merged into the stream's ``dropped`` counters: ``imu:jump``, ``audio:non_finite_data``) and
the first few drops of each reason are logged naming the session, the stream and the time.

The "wildly jumping timestamp" rule (also in ``docs/guarantees.md``), with ``max_gap_s`` (the
run's ``sources.max_gap_s``, 60 s by default) and ``confirm_s`` (:data:`CONFIRM_S`, 2 s):

* The guard keeps the stream's *accepted watermark*: the largest timestamp it let through, and
  the stream's *own interval*: the mean spacing of the samples it accepted since the stream
  started (or since the last re-base).
* A sample whose timestamp lies more than ``max_gap_s`` from that watermark (ahead or behind)
  is a *jump*: dropped and counted as ``jump``. Consecutive jump samples that each lie within
  ``max_gap_s`` after the previous one form a *run*.
* A run **confirms** the jump (the clock really moved: a recording paused, a device re-synced)
  only when it spans at least ``confirm_s`` of its own time with at least 3 samples, and its
  mean spacing lies within a factor 4 of the stream's own interval (when that is not known yet:
  at least :data:`MIN_SPACING_S`). The guard then re-bases on the confirming sample and lets it
  through. Samples bunched together (a clock that places every later sample 1 us after a
  wild one, a burst of forged times) never confirm: the jump is only followed by samples
  spaced like the stream's own rate, over ``confirm_s``. A single wild timestamp costs one
  sample; a genuine clock move costs ``confirm_s`` of the stream's samples.
* A sample inside ``max_gap_s`` of the watermark ends the run.
* A jump while the stream has accepted fewer than 3 samples since its start or last re-base
  (every sample jumping, as when timestamps are in another unit than the stream's
  ``time_unit``) is logged with a hint to check the stream's ``time_unit`` and ``offset``.
* Live streams (``now`` given: the session clock, the clock every live sample is mapped onto)
  are also *anchored*: a sample more than ``max_gap_s`` from the session clock's present is a
  jump that is never followed, whatever follows it. A live sample's time is its arrival time
  up to transport delay and the stream's clock rule (sources/clock.py), so it cannot be far
  from now unless its stamp is wrong.
* ``max_gap_s = 0`` turns the rule off; text streams are exempt. Small disorder (duplicates,
  out-of-order samples within ``window.allowed_lateness``) is the aligner's business, not the
  guard's.

The session clock's range: a sample of any stream (text included, whatever ``max_gap_s``) whose
timestamp lies beyond :data:`MAX_ABS_TIME_S` (1e12 s, some 31 700 years) is dropped and counted
as ``bad_timestamp``, with a hint to check the stream's ``time_unit`` and ``offset`` keys. No
real session clock lives there (float64 resolves no better than 0.1 ms beyond it; epoch seconds
are 1.7e9, epoch milliseconds read as seconds 1.7e12), and one such timestamp would otherwise
set the session's end (a caption at 1e30 s: 1e30 windows, counters no message can carry).

Non-finite data: an ``audio``, ``imu`` or ``thermal`` sample holding NaN or inf is dropped and
counted as ``non_finite_data`` (the aligner zero-fills audio gaps). ``depth`` keeps NaN: it
means "no reading" and preprocessing turns it into zero disparity. No NaN reaches an encoder
through the guard; the encoder refuses non-finite embeddings as a last line.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import numpy as np

from sources.base import Chunk

__all__ = ["StreamGuard", "CONFIRM_S", "MIN_SPACING_S", "MAX_ABS_TIME_S"]

log = logging.getLogger(__name__)

CONFIRM_S = 2.0  # how much of its own time a run of jump samples must span to be followed
MIN_SPACING_S = 20e-6  # a run's least mean spacing while the stream's own interval is unknown
MAX_ABS_TIME_S = 1e12  # beyond it a timestamp is bad_timestamp (module docstring)
_UNIT_HINT = "check the stream's time_unit and offset keys in session.yaml"
_RATE_FACTOR = 4.0  # a run's mean spacing must be within this factor of the stream's interval
_MAX_WARNINGS_PER_REASON = 10
_FINITE_DATA = ("audio", "imu", "thermal")


class _Run:
    """Consecutive jump samples: first and last time, and how many."""

    __slots__ = ("first", "last", "n")

    def __init__(self, t: float) -> None:
        self.first = self.last = t
        self.n = 1


class StreamGuard:
    """Filters the chunks of one stream; see the module docstring for the rules."""

    def __init__(self, session: str, stream: str, modality: str, *, max_gap_s: float = 0.0,
                 confirm_s: float = CONFIRM_S, now: Callable[[], float] | None = None, source: str = "") -> None:
        if not (max_gap_s >= 0 and math.isfinite(max_gap_s)):
            raise ValueError(f"session '{session}' stream '{stream}': max_gap_s must be >= 0, got {max_gap_s!r}")
        self.session = session
        self.stream = stream
        self.modality = modality
        self.max_gap_s = float(max_gap_s)
        self.confirm_s = float(confirm_s)
        self.now = now  # live: the session clock's present, the anchor of every sample
        self._where = f" ({source})" if source else ""  # the stream's file, for the log
        self.dropped: dict[str, int] = {}
        self._watermark: float | None = None
        self._seg_first = 0.0  # first accepted time since the start or the last re-base
        self._seg_n = 0  # samples accepted since then (their mean spacing is the stream's interval)
        self._run: _Run | None = None

    def apply(self, chunk: Chunk) -> Chunk:
        """The chunk without the samples the rules drop (possibly empty)."""
        t = np.asarray(chunk.t, dtype=np.float64)
        n = len(t)
        if n == 0:
            return chunk
        with np.errstate(invalid="ignore"):  # NaN: left to the aligner (bad_timestamp there)
            keep = ~(np.abs(t) > MAX_ABS_TIME_S)
        if not keep.all():
            self._drop("bad_timestamp", t[~keep], f"beyond {MAX_ABS_TIME_S:g} s on the session clock; {_UNIT_HINT}")
        if self.modality in _FINITE_DATA and not isinstance(chunk.data, list):
            data = np.asarray(chunk.data)
            if np.issubdtype(data.dtype, np.floating):
                finite = np.isfinite(data.reshape(n, -1)).all(axis=1)
                if not finite[keep].all():
                    self._drop("non_finite_data", t[keep & ~finite])
                    keep &= finite
        if self.max_gap_s > 0 and self.modality != "text":  # utterances are sparse by nature
            keep &= self._clock(t, keep)
        if keep.all():
            return chunk
        data = chunk.data
        data = [d for d, k in zip(data, keep) if k] if isinstance(data, list) else np.asarray(data)[keep]
        return Chunk(stream=chunk.stream, modality=chunk.modality, t=t[keep], data=data,
                     t_ingest=chunk.t_ingest, meta=chunk.meta, passed=chunk.passed)

    @property
    def interval(self) -> float | None:
        """The stream's own mean sample spacing (s), once two samples were accepted."""
        if self._watermark is None or self._seg_n < 2:
            return None
        return (self._watermark - self._seg_first) / (self._seg_n - 1)

    def _clock(self, t: np.ndarray, keep: np.ndarray) -> np.ndarray:
        anchor = self.now() if self.now is not None else None
        if self._watermark is not None and keep.all():
            # Fast path (audio: 16000 samples a second): every sample lies within the gap of
            # the running watermark (and of now), so each is accepted and the loop would change
            # nothing else.
            wm = np.maximum.accumulate(np.concatenate([[self._watermark], t]))[:-1]
            with np.errstate(invalid="ignore"):  # inf - inf: a non-finite time, left to the loop
                fast = bool(np.all(np.abs(t - wm) <= self.max_gap_s))
                if fast and anchor is not None:
                    fast = bool(np.all(np.abs(t - anchor) <= self.max_gap_s))
            if fast:
                self._accept_many(t)
                return np.ones(len(t), dtype=bool)
        return self._clock_each(t, keep, anchor)

    def _accept_many(self, t: np.ndarray) -> None:
        top = float(t.max())
        self._seg_n += len(t)
        self._watermark = max(self._watermark, top)
        self._run = None

    def _clock_each(self, t: np.ndarray, keep: np.ndarray, anchor: float | None = None) -> np.ndarray:
        """The rule, sample by sample."""
        ok = np.ones(len(t), dtype=bool)
        gap = self.max_gap_s
        for i in np.flatnonzero(keep):
            ti = float(t[i])
            if not math.isfinite(ti):
                continue  # the aligner counts these as bad_timestamp
            if anchor is not None and abs(ti - anchor) > gap:
                ok[i] = False
                self._drop("jump", t[i:i + 1], f"more than max_gap_s={gap:g} s from the session clock's "
                                               f"present {anchor:.3f} s")
                continue
            if self._watermark is None:
                self._rebase(ti)
                continue
            if abs(ti - self._watermark) <= gap:
                self._seg_n += 1
                self._watermark = max(self._watermark, ti)
                self._run = None
                continue
            if self._confirms(ti):
                log.warning("session '%s' stream '%s': clock moved from %.3f s to %.3f s (confirmed by %.1f s of "
                            "samples at the stream's rate); following it", self.session, self.stream,
                            self._watermark, ti, ti - self._run.first if self._run else 0.0)
                self._rebase(ti)
                continue
            ok[i] = False
            # Jumps right after the stream's (re)start: its samples are far apart from the first,
            # as when the timestamps are in another unit than the stream's time_unit says.
            hint = f"; {_UNIT_HINT}" if self._seg_n < 3 else ""
            self._drop("jump", t[i:i + 1], f"more than max_gap_s={gap:g} s from {self._watermark:.3f} s{hint}")
        return ok

    def _confirms(self, ti: float) -> bool:
        """Extends (or starts) the run of jump samples with ``ti``; True when the run confirms
        the jump (module docstring)."""
        run = self._run
        if run is not None and 0 < ti - run.last <= self.max_gap_s:
            run.last, run.n = ti, run.n + 1
        else:
            self._run = run = _Run(ti)
        if run.n < 3 or run.last - run.first < self.confirm_s:
            return False
        spacing = (run.last - run.first) / (run.n - 1)
        own = self.interval
        if own is None or own <= 0:
            return spacing >= MIN_SPACING_S
        return own / _RATE_FACTOR <= spacing <= own * _RATE_FACTOR

    def _rebase(self, ti: float) -> None:
        self._watermark = ti
        self._seg_first = ti
        self._seg_n = 1
        self._run = None

    def _drop(self, reason: str, times: np.ndarray, why: str = "") -> None:
        k = len(times)
        before = self.dropped.get(reason, 0)
        self.dropped[reason] = before + k
        if before < _MAX_WARNINGS_PER_REASON:
            log.warning("session '%s' stream '%s'%s: dropped %d sample(s) at t=%s s (%s%s)", self.session, self.stream,
                        self._where, k, ", ".join(_fmt_time(x) for x in times[:3]), reason, f": {why}" if why else "")

    def merge_into(self, counts: dict[str, Any]) -> dict[str, Any]:
        """``counts`` plus this guard's drops (the source's own counters keep their names)."""
        out = dict(counts)
        for reason, n in self.dropped.items():
            out[reason] = int(out.get(reason, 0)) + n
        return out


def _fmt_time(t: float) -> str:
    return f"{t:.3f}" if abs(t) < MAX_ABS_TIME_S else f"{t:.6g}"
