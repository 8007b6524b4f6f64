"""Which samples a window needs, known before they are decoded: the frame selector (video
frames scaled, PNG frames decoded only where a window picks them) and the times up to which a
window waits for a stream (paced replay sends its watermarks then). docs/alignment.md, "Frames
no window picks"; the grid is :mod:`pipeline.align`'s.
"""

from __future__ import annotations

import math

from pipeline.align import AlignConfig, window_end

__all__ = ["FrameSelector", "frame_selector", "next_need"]

# Gaps between neighbouring frames above this are left alone: frames next to a gap are always
# kept, so the source guard's clock-jump rule (which drops the first sample after a jump) sees
# what it would without selection.
_SELECT_MAX_GAP_S = 1.0


class FrameSelector:
    """Tells a frame source which frames some window can pick, before it converts or decodes them.

    Vision with ``frames <= 2`` takes the first and the last frame of each span
    ``[e_k - span, e_k)``; depth and thermal take the frame nearest to ``e_k``. Every other
    frame is never used, yet a 30 fps camera at a 1 s hop would have all of them scaled to RGB,
    shipped and buffered. :meth:`keep` decides one frame from its neighbours' times with the
    aligner's own expressions, so the windows made from the kept frames are the same as from
    all of them, for streams whose times do not go back (tested on random timelines). It keeps
    a frame whenever it cannot be sure: before the origin is known, at the first and last
    frame, next to equal times or a jump of more than 1 s, and every frame after the stream's
    times first go back (out-of-order samples are judged late per chunk, so what the aligner
    keeps of them depends on where chunks end, with or without selection).

    ``origin`` is set by the owner once the session's aligner has fixed it.
    """

    def __init__(self, modality: str, config: AlignConfig, origin: float | None = None) -> None:
        self.spec = config.spans[modality]
        self.hop = config.hop
        self.origin = origin if origin is not None else config.origin
        self.kept = 0
        self.skipped = 0
        self._prev: tuple[float, float] | None = None  # (t of the frame before the last, t of the last)
        self._disorder = False  # the times went back once: keep everything from then on

    def keep(self, t: float, t_next: float | None) -> bool:
        """Whether the frame at ``t`` (frames fed in arrival order) can be picked by a window.
        ``t_next``: the next frame's time, ``None`` when unknown (end of stream)."""
        prev = self._prev
        if prev is not None and not t >= prev[1]:
            self._disorder = True
        ok = self._disorder or self._decide(prev, t, t_next)
        self._prev = (prev[1] if prev is not None else -math.inf, t)
        if ok:
            self.kept += 1
        else:
            self.skipped += 1
        return ok

    def _decide(self, prev: tuple[float, float] | None, t: float, tn: float | None) -> bool:
        o = self.origin
        if o is None or prev is None or tn is None:
            return True
        tpp, tp = prev
        gap = _SELECT_MAX_GAP_S
        # Strictly increasing and no jump: then the aligner holds tp and tn as this frame's
        # neighbours (neither dropped as late or duplicate, nor by the clock-jump guard).
        if not (tpp < tp < t < tn and tp - tpp <= gap and t - tp <= gap and tn - t <= gap):
            return True
        spec, h = self.spec, self.hop
        if spec.nearest:
            # argmin |t_i - e| picks this frame for e in about ((tp+t)/2, (t+tn)/2].
            for k in _ks(o, h, tp, tn):
                e = window_end(o, h, k)
                if abs(t - e) < abs(tp - e) and abs(t - e) <= abs(tn - e):
                    return True
            return False
        # Vision: the first frame with time >= e - span and the last before e (the payload with
        # frames == 2; with frames == 1 the last still gives the published t_end).
        for k in _ks(o, h, tp + spec.span, t + spec.span):
            start = window_end(o, h, k) - spec.span
            if tp < start <= t:
                return True
        for k in _ks(o, h, t, tn):
            e = window_end(o, h, k)
            if t < e <= tn:
                return True
        return False


def _ks(origin: float, hop: float, lo: float, hi: float) -> range:
    """Window indices whose end may lie in ``[lo, hi]``, padded by one each side for rounding."""
    first = math.floor((lo - origin) / hop) - 2
    last = math.ceil((hi - origin) / hop)
    return range(max(first, 0), max(last + 1, 0))


def frame_selector(modality: str, config: AlignConfig) -> FrameSelector | None:
    """A :class:`FrameSelector` where the modality takes only some frames (nearest-frame depth
    and thermal, vision with ``frames`` 1 or 2); ``None`` where every sample can matter."""
    spec = config.spans.get(modality)
    if spec is None or modality not in ("vision", "depth", "thermal"):
        return None
    if spec.nearest or (modality == "vision" and 1 <= spec.frames <= 2):
        return FrameSelector(modality, config)
    return None


def next_need(config: AlignConfig, modality: str, origin: float, x: float) -> float:
    """The first stream time after ``x`` up to which a window waits for a stream of ``modality``
    to have passed: ``e_k + lookahead`` (docs/alignment.md). Paced replay sends its watermarks then."""
    la = config.spans[modality].lookahead()
    k = max(0, math.floor((x - la - origin) / config.hop) - 1)
    while window_end(origin, config.hop, k) + la <= x:
        k += 1
    return window_end(origin, config.hop, k) + la
