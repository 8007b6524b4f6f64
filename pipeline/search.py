"""Moment search over an embedding store: a text, image, audio or video query, encoded with the
model the rows were made with, answered as moments (docs/store.md).

A **moment** is a span of adjacent windows of one session and modality that all score within
``margin`` of its best window (:func:`merge_moments`, a plain function). :class:`Store` is the
Python API; ``python -m pipeline search`` the command (:func:`add_search_args`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pipeline.cli_types import number_type
from sinks.protocol import MODALITIES
from sinks.store import EMBEDDINGS, EmbeddingStore, StoreError, where_clause

__all__ = ["Moment", "QueryError", "Store", "add_search_args", "merge_moments"]

log = logging.getLogger(__name__)

DEFAULT_MARGIN = 0.05  # cosine similarity: a window this close to its moment's best belongs to it
MAX_MARGIN = 2.0  # cosine similarities span [-1, 1]: a margin of 2 already takes every adjacent window


class QueryError(ValueError):
    """A query that cannot be encoded (no such file, a file that does not decode, empty text)."""


@dataclass(frozen=True)
class Moment:
    """Adjacent windows of one session and modality: the span they cover, their best score
    (cosine similarity to the query) and the window that has it."""

    session: str
    modality: str
    stream: str
    t_start: float
    t_end: float
    score: float
    window: int  # the best window
    windows: tuple[int, int]  # first and last window of the span
    model: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["windows"] = list(self.windows)
        return d


def merge_moments(hits: Iterable[Mapping[str, Any]], k: int, margin: float = DEFAULT_MARGIN) -> list[Moment]:
    """The ``k`` best moments from scored rows (``session``, ``modality``, ``stream``, ``window``,
    ``t_start``, ``t_end``, ``score``, ``model``). Best row first, each moment grows over the
    adjacent windows (window +-1, same model, session and modality) among ``hits`` whose score is
    within ``margin`` of its best; a row belongs to one moment. Ranked by best score."""
    rows = sorted(hits, key=lambda h: -float(h["score"]))
    index = {(h["model"], h["session"], h["modality"], int(h["window"])): h for h in rows}
    taken: set[tuple] = set()
    out: list[Moment] = []
    for best in rows:
        key = (best["model"], best["session"], best["modality"], int(best["window"]))
        if key in taken:
            continue
        floor = float(best["score"]) - margin
        span = [best]
        taken.add(key)
        for step in (-1, 1):
            w = key[3] + step
            while (nxt := index.get(key[:3] + (w,))) is not None and (key[:3] + (w,)) not in taken \
                    and float(nxt["score"]) >= floor:
                taken.add(key[:3] + (w,))
                span.append(nxt)
                w += step
        out.append(Moment(session=best["session"], modality=best["modality"], stream=best["stream"],
                          t_start=min(float(h["t_start"]) for h in span), t_end=max(float(h["t_end"]) for h in span),
                          score=float(best["score"]), window=key[3],
                          windows=(min(int(h["window"]) for h in span), max(int(h["window"]) for h in span)),
                          model=best["model"]))
        if len(out) == k:
            break
    return out


# -- query inputs, decoded as the sources decode a session (same sizes, rates, spans) ------------

def _open_media(path: str | Path, kind: str) -> Any:
    import av

    p = Path(path)
    if p.is_dir():
        raise QueryError(f"--{kind} {p} is a folder, expected a file (the {kind} to search for)")
    if not p.is_file():
        raise QueryError(f"--{kind} {p}: no such file")
    try:
        return av.open(str(p))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise QueryError(f"--{kind} {p}: cannot be decoded as {kind}: {exc}") from None


def _frames(path: str | Path, kind: str, span_s: float, size: int) -> list[np.ndarray]:
    """RGB frames of the first ``span_s`` seconds (one for an image), short side ``size``."""
    import av
    from av.video.reformatter import VideoReformatter

    from sources.video import scaled_size

    out: list[np.ndarray] = []
    with _open_media(path, kind) as container:
        if not container.streams.video:
            raise QueryError(f"--{kind} {path}: has no {'image' if kind == 'image' else 'video'} stream")
        scaler = VideoReformatter()
        try:
            for frame in container.decode(video=0):
                t = frame.time or 0.0
                if out and t > span_s:
                    break
                w, h = scaled_size(frame.width, frame.height, size)
                out.append(scaler.reformat(frame, width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray())
                if kind == "image":
                    break
        except (av.FFmpegError, ValueError) as exc:
            raise QueryError(f"--{kind} {path}: cannot be decoded: {exc}") from None
    if not out:
        raise QueryError(f"--{kind} {path}: no frame decodes")
    return out


def _audio(path: str | Path, span_s: float) -> np.ndarray:
    """The first ``span_s`` seconds as 16 kHz mono float32, as the audio source resamples."""
    import av

    from sources.base import AUDIO_RATE

    want = int(round(span_s * AUDIO_RATE))
    parts: list[np.ndarray] = []
    with _open_media(path, "audio") as container:
        if not container.streams.audio:
            raise QueryError(f"--audio {path}: has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
        try:
            for frame in container.decode(audio=0):
                parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
                if sum(p.size for p in parts) >= want:
                    break
            parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
        except (av.FFmpegError, ValueError) as exc:
            raise QueryError(f"--audio {path}: cannot be decoded: {exc}") from None
    wave = np.concatenate(parts)[:want] if parts else np.zeros(0, np.float32)
    if wave.size == 0:
        raise QueryError(f"--audio {path}: no audio decodes")
    return np.ascontiguousarray(wave, dtype=np.float32)


def query_input(*, text: str | None = None, image: str | Path | None = None, audio: str | Path | None = None,
                video: str | Path | None = None, vision_frames: int = 2, span_s: float = 2.0,
                size: int = 224) -> tuple[str, Any]:
    """The query as ``(modality, payload)`` the encoders take (payloads as a window carries them)."""
    given = [n for n, v in (("text", text), ("image", image), ("audio", audio), ("video", video)) if v is not None]
    if len(given) != 1:
        raise QueryError("give exactly one of --text, --image, --audio, --video")
    if text is not None:
        if not text.strip():
            raise QueryError("--text: empty query")
        return "text", text
    if audio is not None:
        return "audio", _audio(audio, span_s)
    frames = _frames(image if image is not None else video, "image" if image is not None else "video", span_s, size)
    picks = np.linspace(0, len(frames) - 1, vision_frames).round().astype(int)  # first and last, as a window picks
    return "vision", np.stack([frames[i] for i in picks])


class Store:
    """An embedding store to search: ``Store(uri).search(text="a dog barking")``.

    :attr:`table` is the LanceDB table (``embeddings``) for anything else; the query model is
    built on first use from the store's ``models`` table, on ``device``."""

    def __init__(self, uri: str | Path, *, device: str = "cpu") -> None:
        if Path(uri).is_file():
            raise StoreError(f"{uri} is a file, expected a store folder (the store.uri of a run)")
        self.store = EmbeddingStore.open(str(uri))
        self.device = device
        self._models: dict[str, Any] = {}

    @property
    def table(self) -> Any:
        return self.store.table

    def model_row(self, model: str | None = None) -> dict[str, Any]:
        rows = {m["model"]: m for m in self.store.models()}
        if not rows:
            raise StoreError(f"store {self.store.uri}: no models table, so the query cannot be encoded")
        if model is None:
            if len(rows) > 1:
                raise StoreError(f"store {self.store.uri} holds rows of several models ({', '.join(sorted(rows))}): "
                                 "choose one with --model")
            return next(iter(rows.values()))
        if model not in rows:
            raise StoreError(f"store {self.store.uri}: no rows of model {model!r} (it has {', '.join(sorted(rows))})")
        return rows[model]

    def sessions(self, model: str) -> list[str]:
        """The sessions the store holds rows of, for ``model``."""
        table = self.store.read(EMBEDDINGS, where_clause({"model": [model]}), ["session"])
        return sorted(set(table.column("session").to_pylist()))

    def encode(self, modality: str, payload: Any, model: str | None = None) -> np.ndarray:
        """The unit-norm embedding of one query payload, by the store's model."""
        from encoders.preprocess import prepare

        row = self.model_row(model)
        net = self._model(row)
        vec = net.encode(modality, prepare(modality, [payload], self.device, config=net.config)).float().cpu().numpy()[0]
        if vec.size != self.store.dim:
            raise StoreError(f"store {self.store.uri}: holds vectors of dim {self.store.dim}, model {row['model']} "
                             f"as recorded in it makes dim {vec.size}")
        return vec

    def encode_many(self, groups: Mapping[str, Sequence[Any]], model: str | None = None,
                    batch: int = 32) -> dict[str, np.ndarray]:
        """Unit-norm rows ``[N, D]`` per modality for payloads as a window carries them (the
        trigger prompts of :mod:`pipeline.store_triggers`), by the store's model, ``batch`` at a
        time; bad samples are left out first, as the encoder actor does."""
        from encoders.preprocess import prepare, without_bad_values

        row = self.model_row(model)
        net = self._model(row)
        out: dict[str, np.ndarray] = {}
        for m, payloads in groups.items():
            parts = []
            for lo in range(0, len(payloads), batch):
                clean = [without_bad_values(m, p)[0] for p in payloads[lo:lo + batch]]
                if any(c is None for c in clean):
                    raise QueryError(f"a {m} prompt has nothing left to embed once its bad values are left out")
                x = prepare(m, clean, self.device, config=net.config)
                parts.append(net.encode(m, x).float().cpu().numpy())
            out[m] = np.concatenate(parts) if parts else np.zeros((0, self.store.dim), np.float32)
            if out[m].shape[1] != self.store.dim:
                raise StoreError(f"store {self.store.uri}: holds vectors of dim {self.store.dim}, model "
                                 f"{row['model']} as recorded in it makes dim {out[m].shape[1]}")
        return out

    def _model(self, row: Mapping[str, Any]) -> Any:
        from encoders.imagebind import load

        name = row["model"]
        if name not in self._models:
            config = row["config"]
            config = json.loads(config) if config.startswith("{") else config
            self._models[name] = load(config, row["checkpoint"], device=self.device, precision=row["precision"],
                                      seed=int(row["seed"]))
        return self._models[name]

    def search(self, *, text: str | None = None, image: str | Path | None = None, audio: str | Path | None = None,
               video: str | Path | None = None, vector: Sequence[float] | None = None,
               modality: Sequence[str] = (), session: Sequence[str] = (), between: tuple[float, float] | None = None,
               k: int = 10, margin: float = DEFAULT_MARGIN, model: str | None = None,
               candidates: int | None = None) -> list[Moment]:
        """The ``k`` best moments for one query (text, an image/audio/video file, or a ``vector``),
        among rows of ``modality``/``session`` (any when empty) overlapping ``between``."""
        if k < 1:
            raise QueryError(f"k must be at least 1, got {k}")
        if not 0 <= margin <= MAX_MARGIN:
            raise QueryError(f"margin must be from 0 to {MAX_MARGIN:g} (a cosine-score difference), got {margin}")
        row = self.model_row(model)
        if vector is None:
            vector = self.encode(*query_input(text=text, image=image, audio=audio, video=video), model=row["model"])
        filters = {"model": [row["model"]], "modality": list(modality), "session": list(session)}
        limit = candidates or max(100, 10 * k)
        hits = self.store.nearest(np.asarray(vector, np.float32), limit=limit, filters=filters, between=between)
        return merge_moments(hits, k, margin)


# -- the command ----------------------------------------------------------------------------------

def add_search_args(sub: Any) -> None:
    p = sub.add_parser("search", help="find moments in an embedding store by text, image, audio or video",
                       description="Exit codes: 0 results printed (maybe none), 2 bad query, flag (--between "
                                   "T0 after T1, a --session the store does not hold, --margin outside 0.."
                                   f"{MAX_MARGIN:g}) or store, 4 model weights unavailable. Scores are cosine "
                                   "similarities.")
    p.add_argument("uri", help="the store (store.uri of the run)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="a text query, e.g. \"a dog barking\"")
    q.add_argument("--image", metavar="FILE", help="an image file (its vision embedding)")
    q.add_argument("--audio", metavar="FILE", help="an audio file (its first 2 s)")
    q.add_argument("--video", metavar="FILE", help="a video file (frames of its first 2 s)")
    p.add_argument("--modality", action="append", default=[], choices=MODALITIES, metavar="M",
                   help=f"only rows of this modality (repeatable; one of {', '.join(MODALITIES)})")
    p.add_argument("--session", action="append", default=[], metavar="S", help="only rows of this session (repeatable)")
    p.add_argument("--between", nargs=2, type=float, metavar=("T0", "T1"),
                   help="only windows overlapping T0..T1 (session clock s, finite, T0 <= T1)")
    p.add_argument("-k", type=int, default=10, help="moments to print (default 10)")
    p.add_argument("--margin", type=_margin, default=DEFAULT_MARGIN,
                   help=f"merge adjacent windows whose cosine score is within this of the best, 0 to {MAX_MARGIN:g} "
                        f"(default {DEFAULT_MARGIN}; 0: only windows scoring as high as the best)")
    p.add_argument("--model", help="the model whose rows to search, where the store holds several")
    p.add_argument("--json", action="store_true", help="one JSON object per moment, best first")
    p.set_defaults(fn=_cmd_search)


_margin = number_type(float, "a cosine-score margin", lambda v: 0 <= v <= MAX_MARGIN,
                      f"a cosine-score margin from 0 to {MAX_MARGIN:g}")


def _check_between(between: Sequence[float] | None) -> None:
    if between is None:
        return
    if not all(math.isfinite(t) for t in between):
        raise QueryError("--between: expected two finite times in seconds")
    if between[0] > between[1]:
        raise QueryError(f"--between {between[0]:g} {between[1]:g}: T0 is after T1; give the start first")


def _check_sessions(store: Store, model: str | None, wanted: Sequence[str]) -> None:
    if not wanted:
        return
    name = store.model_row(model)["model"]
    have = store.sessions(name)
    missing = [s for s in wanted if s not in have]
    if missing:
        raise QueryError(f"--session {missing[0]!r}: store {store.store.uri} has no such session (model {name}); "
                         f"its sessions: {', '.join(have) or 'none'}")


def _cmd_search(args: argparse.Namespace) -> int:
    from encoders.weights import WeightsUnavailable

    try:
        _check_between(args.between)
        store = Store(args.uri)
        _check_sessions(store, args.model, args.session)
        moments = store.search(text=args.text, image=args.image, audio=args.audio, video=args.video,
                               modality=args.modality, session=args.session,
                               between=tuple(args.between) if args.between else None,
                               k=args.k, margin=args.margin, model=args.model)
    except (QueryError, StoreError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WeightsUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    if args.json:
        for m in moments:
            print(json.dumps(m.to_dict()))
        return 0
    print(f"{'score':>6}  {'session':<16} {'modality':<8} {'t_start':>8} {'t_end':>8}  windows")
    for m in moments:
        w = f"{m.windows[0]}" if m.windows[0] == m.windows[1] else f"{m.windows[0]}-{m.windows[1]}"
        print(f"{m.score:6.3f}  {m.session:<16} {m.modality:<8} {m.t_start:8.2f} {m.t_end:8.2f}  {w}")
    return 0
