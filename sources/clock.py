"""Clocks of a live session: one session clock, and per stream a map onto it.

The rule (also in ``docs/live.md``):

* The **session clock** of a live run is Unix time minus the session *epoch*, the Unix time at
  which the run started (:class:`SessionClock`). Every host that keeps Unix time (NTP/PTP) is
  on it up to that constant, so all streams of a session share it without talking.
* A stream declares how its timestamps relate to it (``clock:`` in the stream entry):

  - ``session``: the timestamps are Unix time already (a rig stamping with a synced wall
    clock); session time = t - epoch.
  - ``device``: the timestamps are the device's own clock (a sensor counter, stream pts) with
    an unknown offset and a small rate error. Each sample's *observed offset* is
    ``arrival - t`` (arrival on the session clock); it is the true offset plus a transport delay
    that is never negative. As LSL's dejittering does, the delay is filtered out: the
    estimator (:class:`OffsetEstimator`) keeps, for each ``bucket_s`` of device time over the
    last ``window_s``, the sample with the smallest observed offset (the least-delayed one) and
    fits a straight line ``offset(t) = a + b * t`` through those minima (least squares; ``b``
    absorbs the clock rate error, and is limited to +-``max_skew``, 0.5 % by default, so a
    burst of late arrivals cannot tilt it). Until the minima span ``min_fit_s`` (2 s) of
    device time the estimate is the smallest observed offset so far (``b`` = 0). Session time =
    t + offset(t).

    An observed offset more than ``max_step_s`` (1 s) below or above the current estimate is an
    *outlier* (a wild device stamp, or a device clock that was reset): it is not used for the
    fit, and the sample is mapped with the current estimate (so a wild stamp maps far from now
    and the stream guard, sources/guard.py, drops it as ``jump``). Only outliers that keep
    agreeing with each other (within ``max_step_s``) for ``confirm_s`` (2 s) of *arrival* time,
    real seconds that no sender can compress, with at least 3 samples, re-start the estimator on
    them: a device clock reset is followed, a wild stamp never.
  - ``arrival``: the sample is stamped with its arrival time (streams with no timestamps, such
    as imagezmq).

* The stream's ``offset`` key is then added, as for recorded sessions.
* Mapped times of a stream never go backwards by a little (:func:`monotone`): a sample that
  would map at most :data:`NUDGE_S` before the previous one is placed 1 microsecond after it.
  One further back is left where it is (and becomes the reference for the next): the stream
  guard judges it, and a single wild sample ahead cannot drag every later one after itself.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Callable

import numpy as np

__all__ = ["SessionClock", "OffsetEstimator", "StreamClock", "monotone", "NUDGE_S"]

NUDGE_S = 1.0  # a mapped time at most this far behind the previous one is nudged after it


def monotone(t: float, last: float, step: float = 1e-6) -> float:
    """``t``, or ``last + step`` when ``t`` is at most :data:`NUDGE_S` behind ``last`` (or equal
    to it); a time further back is returned unchanged (see the module docstring)."""
    if t <= last and last - t <= NUDGE_S:
        return last + step
    return t


class SessionClock:
    """Seconds since ``epoch`` (Unix time); ``now()`` is the current session time."""

    def __init__(self, epoch: float | None = None, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self.epoch = float(wall() if epoch is None else epoch)

    def now(self) -> float:
        return self._wall() - self.epoch

    def from_unix(self, t: float | np.ndarray) -> float | np.ndarray:
        return t - self.epoch


class OffsetEstimator:
    """Offset of a device clock from the session clock, from (device time, arrival) pairs.

    See the module docstring for the rule. ``update`` is O(1); ``offset`` fits at most
    ``window_s / bucket_s`` points.
    """

    def __init__(self, window_s: float = 10.0, bucket_s: float = 0.5, *, min_fit_s: float = 2.0,
                 max_skew: float = 0.005, max_step_s: float = 1.0, confirm_s: float = 2.0) -> None:
        if not (window_s > 0 and bucket_s > 0 and bucket_s <= window_s):
            raise ValueError(f"need 0 < bucket_s <= window_s, got bucket_s={bucket_s}, window_s={window_s}")
        self.window_s = window_s
        self.bucket_s = bucket_s
        self.min_fit_s = min_fit_s
        self.max_skew = max_skew
        self.max_step_s = max_step_s
        self.confirm_s = confirm_s
        self.outliers = 0  # samples left out of the fit as outliers
        self.resets = 0  # times the estimator re-started on a confirmed device clock change
        self._odd: tuple[float, float, int] | None = None  # outlier run: first arrival, first offset, count
        self._buckets: collections.OrderedDict[int, tuple[float, float]] = collections.OrderedDict()
        self._ref: float | None = None  # device time subtracted before fitting (precision)
        self._fit: tuple[float, float] | None = None

    def update(self, device_t: float, arrival: float) -> None:
        if not (math.isfinite(device_t) and math.isfinite(arrival)):
            return
        obs = arrival - device_t
        if self._buckets and self._outlier(device_t, arrival, obs):
            return
        if self._ref is None:
            self._ref = device_t
        key = math.floor((device_t - self._ref) / self.bucket_s)
        cur = self._buckets.get(key)
        if cur is None or obs < cur[1]:
            self._buckets[key] = (device_t - self._ref, obs)
            self._fit = None
        # Forget buckets that left the window (keys only grow for a sane clock).
        oldest = key - math.ceil(self.window_s / self.bucket_s)
        while self._buckets and next(iter(self._buckets)) < oldest:
            self._buckets.popitem(last=False)
            self._fit = None

    def _outlier(self, device_t: float, arrival: float, obs: float) -> bool:
        """True for an outlier left out of the fit; a confirmed run of them re-starts the estimator."""
        if abs(obs - self.offset(device_t)) <= self.max_step_s:
            self._odd = None
            return False
        odd = self._odd
        if odd is None or abs(obs - odd[1]) > self.max_step_s:
            self._odd = (arrival, obs, 1)
        else:
            self._odd = odd = (odd[0], odd[1], odd[2] + 1)
            if odd[2] >= 3 and arrival - odd[0] >= self.confirm_s:
                self._buckets.clear()
                self._ref, self._fit, self._odd = None, None, None
                self.resets += 1
                return False
        self.outliers += 1
        return True

    @property
    def ready(self) -> bool:
        return bool(self._buckets)

    def offset(self, device_t: float) -> float:
        """Estimated session time minus device time at ``device_t``."""
        if not self._buckets:
            raise RuntimeError("no samples yet")
        if self._fit is None:
            pts = np.array(list(self._buckets.values()), dtype=np.float64)
            x, y = pts[:, 0], pts[:, 1]
            if len(pts) >= 3 and np.ptp(x) >= self.min_fit_s:
                b, a = np.polyfit(x - x.mean(), y, 1)
                b = float(np.clip(b, -self.max_skew, self.max_skew))
                a = float(np.mean(y - b * (x - x.mean())))  # intercept for the clamped slope
                self._fit = (a - b * float(x.mean()), b)
            else:
                self._fit = (float(y.min()), 0.0)
        a, b = self._fit
        return a + b * (device_t - (self._ref or 0.0))


class StreamClock:
    """Maps one stream's timestamps onto the session clock by its ``clock`` rule."""

    def __init__(self, rule: str, session: SessionClock, *, offset: float = 0.0,
                 estimator: OffsetEstimator | None = None) -> None:
        if rule not in ("device", "session", "arrival"):
            raise ValueError(f"unknown clock rule {rule!r}")
        self.rule = rule
        self.session = session
        self.extra = offset
        self.estimator = estimator or OffsetEstimator()
        self._last = -math.inf
        self.applied: list[float] = []  # the device offsets applied (first, latest) for the record

    def map(self, device_t: float | None, arrival: float | None = None) -> float:
        """Session time of a sample stamped ``device_t`` that arrived at session time ``arrival``
        (default: now)."""
        if arrival is None:
            arrival = self.session.now()
        if self.rule == "arrival" or device_t is None:
            t = arrival
        elif self.rule == "session":
            t = float(self.session.from_unix(device_t))
        else:
            self.estimator.update(device_t, arrival)
            off = self.estimator.offset(device_t)
            if not self.applied:
                self.applied = [off, off]
            self.applied[1] = off
            t = device_t + off
        t = monotone(t + self.extra, self._last)
        self._last = t
        return t
