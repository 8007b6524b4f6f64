"""A session's triggers as its session actor holds them: the evaluator, the per-trigger totals
of the summary, and (``timeline`` on) what the session timeline shows, gathered as the session
publishes: every window's score per trigger, each event, captions and small vision thumbnails.

Plain classes, no Ray: the actor hands over what it publishes, in its publish order.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipeline.triggers import TriggerEvaluator, TriggerEvent, TriggerRule

__all__ = ["TriggerSetup", "SessionTriggers", "TimelineTrace", "jpeg_image", "jpeg_thumbnail"]

THUMB_WIDTH = 96
MAX_THUMBS = 900  # per stream; a longer session keeps every 2nd, 4th, ... window's (see TimelineTrace)
_CAPTION_CHARS = 200


@dataclass(frozen=True)
class TriggerSetup:
    """What every session actor needs to evaluate the run's triggers: the rules, each prompt's
    embedding per modality (made once at start, :mod:`pipeline.prompts`), the background
    prompts' embeddings, a label per trigger (what the prompt was) and whether to keep a timeline."""

    rules: tuple[TriggerRule, ...]
    prompts: Mapping[str, Mapping[str, np.ndarray]]
    background: np.ndarray | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    timeline: bool = False


class SessionTriggers:
    """The triggers of one session: :meth:`observe` what it publishes, :meth:`close` at its end."""

    def __init__(self, session: str, setup: TriggerSetup) -> None:
        self.setup = setup
        self.evaluator = TriggerEvaluator(session, setup.rules, setup.prompts, setup.background)
        self.trace = TimelineTrace(session, setup) if setup.timeline else None
        self.events: list[TriggerEvent] = []  # every event sent, in order

    def observe(self, records: Sequence[Any], items: Sequence[Any] = ()) -> list[TriggerEvent]:
        """``records`` just published (and the window items behind them, same order); the
        events they start or end."""
        if self.trace is not None:
            self.trace.items(records, items)
        return self._keep(self.evaluator.observe(records, self.trace))

    def close(self) -> list[TriggerEvent]:
        return self._keep(self.evaluator.close())

    def _keep(self, events: list[TriggerEvent]) -> list[TriggerEvent]:
        self.events += events
        if self.trace is not None:
            self.trace.events(events)
        return events

    def summary(self) -> dict[str, dict[str, float]]:
        return self.evaluator.summary()

    def timeline(self) -> dict[str, Any] | None:
        return None if self.trace is None else self.trace.data()


class TimelineTrace:
    """What the session timeline (:mod:`sinks.timeline`) draws, as plain JSON-able data.

    Thumbnails: at most ``max_thumbs`` per stream. Windows are kept when their index is a
    multiple of ``stride``; when that would pass the cap, ``stride`` doubles and the kept ones
    thin out the same way, so a session of any length stays under the page's size budget and
    the same session always keeps the same windows."""

    def __init__(self, session: str, setup: TriggerSetup, max_thumbs: int = MAX_THUMBS) -> None:
        self.session = session
        self.triggers = [{"name": r.name, "prompt": setup.labels.get(r.name, ""), "score": r.score, "on": r.on,
                          "off": r.off} for r in setup.rules]
        self.lanes: dict[str, dict[str, Any]] = {}  # stream -> its windows and scores
        self._row: dict[tuple[str, int], int] = {}  # (stream, window) -> its place in the lane's lists
        self.spans: list[dict[str, Any]] = []
        self.captions: list[dict[str, Any]] = []
        self.thumbs: dict[str, list[dict[str, Any]]] = {}
        self.stride: dict[str, int] = {}
        self.max_thumbs = max_thumbs

    def scored(self, rec: Any, names: list[str], scores: np.ndarray) -> None:
        lane = self._lane(rec)
        row = self._row.get((rec.stream, rec.window))
        if row is None:
            return
        for name, s in zip(names, scores):
            values = lane["scores"].setdefault(name, [])
            values.extend([None] * (len(lane["t"]) - len(values)))  # a window not scored leaves a gap
            values[row] = round(float(s), 4)

    def items(self, records: Sequence[Any], items: Sequence[Any]) -> None:
        for rec, item in zip(records, items):
            self.window(rec)
            if rec.modality == "text" and isinstance(item.payload, str):
                self.caption(rec.stream, rec.t_start, rec.t_end, item.payload)
            elif rec.modality == "vision":
                self.thumb(rec.stream, rec.window, rec.t_start, rec.t_end,
                           functools.partial(_last_frame_jpeg, item.payload))

    def window(self, rec: Any) -> None:
        """A row of ``rec``'s lane (before its scores): its window and time span."""
        lane = self._lane(rec)
        self._row[(rec.stream, rec.window)] = len(lane["t"])
        lane["window"].append(rec.window)
        lane["t"].append(round(rec.t_end, 4))
        lane["t_start"].append(round(rec.t_start, 4))

    def caption(self, stream: str, t_start: float, t_end: float, text: str) -> None:
        self.captions.append({"t": round(t_end, 4), "t_start": round(t_start, 4), "stream": stream,
                              "text": text[:_CAPTION_CHARS]})

    def _lane(self, rec: Any) -> dict[str, Any]:
        return self.lanes.setdefault(rec.stream, {"modality": rec.modality, "window": [], "t": [], "t_start": [],
                                                  "scores": {}})

    def thumb(self, stream: str, window: int, t_start: float, t_end: float, jpeg: Callable[[], str | None]) -> None:
        """A vision window's thumbnail, where the stride keeps it; ``jpeg()`` makes it (a base64
        JPEG, or ``None`` for none), called only for the windows kept. Windows in order."""
        stride = self.stride.setdefault(stream, 1)
        if window % stride:
            return
        kept = self.thumbs.setdefault(stream, [])
        if len(kept) >= self.max_thumbs:
            stride = self.stride[stream] = stride * 2
            kept[:] = [k for k in kept if k["window"] % stride == 0]
            if window % stride:
                return
        data = jpeg()
        if data is not None:
            kept.append({"window": window, "t": round(t_end, 4), "t_start": round(t_start, 4), "jpeg": data})

    def events(self, events: list[TriggerEvent]) -> None:
        self.spans += [{"trigger": e.trigger, "stream": e.stream, "modality": e.modality, "t_start": e.t_start,
                        "t_end": e.t_end, "score": round(e.score, 4), "window": e.window, "reason": e.reason}
                       for e in events if e.kind == "end"]

    def data(self) -> dict[str, Any]:
        for lane in self.lanes.values():
            for values in lane["scores"].values():
                values.extend([None] * (len(lane["t"]) - len(values)))
        return {"session": self.session, "triggers": self.triggers, "lanes": self.lanes, "events": self.spans,
                "captions": self.captions, "thumbs": self.thumbs}


def _last_frame_jpeg(frames: Any) -> str:
    return jpeg_thumbnail(np.asarray(frames)[-1])


def jpeg_thumbnail(frame: np.ndarray, width: int = THUMB_WIDTH, quality: int = 6, max_chars: int | None = None) -> str:
    """An RGB frame ``[H, W, 3]`` as a small base64 JPEG (``quality``: the MJPEG qscale, 2-31,
    lower is better). ``max_chars``: where the base64 text would come out longer, the JPEG is
    made again coarser (:func:`jpeg_image`'s ``max_bytes``)."""
    max_bytes = None if max_chars is None else max_chars // 4 * 3
    return base64.b64encode(jpeg_image(frame, width, quality, max_bytes)[0]).decode("ascii")


def jpeg_image(frame: np.ndarray, width: int = THUMB_WIDTH, quality: int = 6,
               max_bytes: int | None = None) -> tuple[bytes, int, int]:
    """An RGB frame ``[H, W, 3]`` as a JPEG ``width`` pixels wide, aspect kept (the height
    rounded to even): ``(jpeg, width, height)``. ``quality``: the MJPEG qscale, 2-31, lower is
    better; with ``max_bytes``, a JPEG over it is encoded again coarser (down to qscale 31; a
    noisy frame at 96 px and qscale 31 is about 1,000 bytes)."""
    import av

    h, w = frame.shape[:2]
    height = max(2, round(h * width / w / 2) * 2)
    img = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
    img = img.reformat(width=width, height=height, format="yuvj420p")
    while True:
        cc = av.CodecContext.create("mjpeg", "w")
        cc.width, cc.height, cc.pix_fmt = width, height, "yuvj420p"
        cc.qmin = cc.qmax = quality
        data = b"".join(bytes(p) for p in cc.encode(img) + cc.encode(None))
        if max_bytes is None or len(data) <= max_bytes or quality >= 31:
            return data, width, height
        quality = min(31, quality * 2)
