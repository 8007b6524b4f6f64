"""Semantic triggers: prompts turned into events on the stream, in stream time.

Plain classes, no Ray, no wall clock: the clock is the stream's own (each window's ``t_end``,
the newest sample it used, session-clock seconds), so replay at any rate and any batching give
the same events.

* :class:`Hysteresis`: the state machine of one (trigger, stream). An event *starts* when a
  window's score is at or above ``on`` and the scores stay at or above ``off`` until a window
  whose ``t_end`` is ``min_duration_s`` past the first one's (``min_duration_s: 0``: at once);
  it *ends* at the first window below ``off`` (hysteresis: ``off <= on``). After an event, no
  new one starts on a window ending less than ``cooldown_s`` after the last one's end. A
  window that does not end after the previous one it saw (replayed twice, or out of order) is
  ignored and counted. :meth:`Hysteresis.close` ends an open event when the stream ends.
* :class:`TriggerEvaluator`: every trigger of a session against every embedding the session
  publishes. One machine per (trigger, stream), so windows of different streams (and
  modalities) may come interleaved in any order. Scores are ``cosine`` (the raw similarity of
  the window's embedding and the prompt's) or ``calibrated``: the softmax of that similarity
  against the similarities to a set of background prompts, at temperature ``temperature``
  (docs/triggers.md says when to use which).

An event covers stream time ``[t_start, t_end]``: from the ``t_start`` of its first window (at
or above ``on``) to the ``t_end`` of its last (at or above ``off``), the data its windows used.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["Hysteresis", "TriggerEvent", "TriggerRule", "TriggerEvaluator", "SCORES"]

SCORES = ("cosine", "calibrated")


@dataclass(frozen=True)
class TriggerRule:
    """One trigger's rule, as the config gives it (:class:`pipeline.trigger_config.TriggerConfig`)."""

    name: str
    on: float = 0.3
    off: float = 0.25
    min_duration_s: float = 0.0
    cooldown_s: float = 0.0
    modalities: tuple[str, ...] = ()  # empty: every modality
    score: str = "cosine"
    temperature: float = 0.05

    def __post_init__(self) -> None:
        if not (math.isfinite(self.on) and math.isfinite(self.off)):
            raise ValueError(f"trigger '{self.name}': on and off must be finite, got on={self.on}, off={self.off}")
        if self.on > 1.0:
            raise ValueError(f"trigger '{self.name}': on ({self.on}) is above 1, the highest {self.score} score, "
                             "so it would never fire")
        if not self.off <= self.on:
            raise ValueError(f"trigger '{self.name}': off ({self.off}) must be <= on ({self.on})")
        if self.min_duration_s < 0 or self.cooldown_s < 0:
            raise ValueError(f"trigger '{self.name}': min_duration_s and cooldown_s must be >= 0")
        if self.score not in SCORES:
            raise ValueError(f"trigger '{self.name}': score must be one of {SCORES}, got {self.score!r}")

    def watches(self, modality: str) -> bool:
        return not self.modalities or modality in self.modalities


@dataclass(frozen=True)
class TriggerEvent:
    """``start`` or ``end`` of one event of one trigger on one stream. ``score``: on ``start``
    the peak so far, on ``end`` the peak of the whole event. ``reason`` (``end`` only):
    ``below_off``, or ``stream_end`` when the stream ended while the event was on.
    ``score_kind``: the trigger's ``score`` (``cosine`` or ``calibrated``)."""

    trigger: str
    stream: str
    modality: str
    kind: str  # "start" | "end"
    window: int  # start: the event's first window; end: its last
    t_start: float
    t_end: float
    score: float
    reason: str = ""
    score_kind: str = "cosine"

    def key(self) -> tuple:
        """Everything but the score: what two runs of the same session must agree on exactly."""
        return (self.trigger, self.stream, self.modality, self.kind, self.window, self.t_start, self.t_end,
                self.reason)


class Hysteresis:
    """The state machine of one (trigger, stream): see the module docstring."""

    IDLE, PENDING, ACTIVE = "idle", "pending", "active"

    def __init__(self, on: float, off: float, min_duration_s: float = 0.0, cooldown_s: float = 0.0) -> None:
        self.on, self.off = float(on), float(off)
        self.min_duration_s, self.cooldown_s = float(min_duration_s), float(cooldown_s)
        self.state = self.IDLE
        self.ignored = 0  # windows not after the previous one
        self._last_t = -math.inf  # t_end of the last window seen
        self._ready_at = -math.inf  # cooldown: the first t_end a new event may start on
        self._first: tuple[int, float, float] = (0, 0.0, 0.0)  # (window, t_start, t_end) of the event's first
        self._last: tuple[int, float] = (0, 0.0)  # (window, t_end) of its last at or above off
        self.peak = -math.inf

    def observe(self, window: int, t_start: float, t_end: float, score: float) -> list[tuple]:
        """One window's score; returns ``("start"|"end", window, t_start, t_end, score, reason)``
        tuples for the events it starts or ends (at most one of each)."""
        if not t_end > self._last_t:
            self.ignored += 1
            return []
        self._last_t = t_end
        if self.state == self.IDLE:
            if score < self.on or t_end < self._ready_at:
                return []
            self.state, self.peak = self.PENDING, score
            self._first, self._last = (window, t_start, t_end), (window, t_end)
            return self._confirm(t_end)
        if score < self.off:
            if self.state == self.PENDING:  # never held for min_duration_s: no event
                self.state = self.IDLE
                return []
            return [self._end("below_off")]
        self.peak = max(self.peak, score)
        self._last = (window, t_end)
        return self._confirm(t_end) if self.state == self.PENDING else []

    def close(self) -> list[tuple]:
        """The stream ended: an open event ends (``stream_end``); a pending one never started."""
        if self.state == self.ACTIVE:
            return [self._end("stream_end")]
        self.state = self.IDLE
        return []

    def _confirm(self, t_end: float) -> list[tuple]:
        if t_end - self._first[2] < self.min_duration_s:
            return []
        self.state = self.ACTIVE
        window, t_start, _ = self._first
        return [("start", window, t_start, t_end, self.peak, "")]

    def _end(self, reason: str) -> tuple:
        self.state = self.IDLE
        window, t_end = self._last
        self._ready_at = t_end + self.cooldown_s
        return ("end", window, self._first[1], t_end, self.peak, reason)


@dataclass
class _TriggerTotals:
    events: int = 0
    duration_s: float = 0.0


@dataclass
class _ModalityBank:
    """The triggers watching one modality: their prompt vectors as one matrix."""

    triggers: list[int]  # indices into the evaluator's rules
    prompts: np.ndarray  # [T, D] unit rows
    on: np.ndarray  # [T] each trigger's ``on``
    calibrated: np.ndarray  # [T] bool
    temperature: np.ndarray  # [T]
    busy: dict[str, np.ndarray] = field(default_factory=dict)  # stream -> [T] bool: not idle


class TriggerEvaluator:
    """Every trigger of session ``session`` against its embeddings, in the order it publishes them.

    ``rules``: the triggers; ``prompts``: per trigger name, the prompt's unit embedding per
    modality it was given in (a text prompt: ``{"text": v}``; an example video clip: its vision
    and audio). A window of modality ``m`` is scored against the prompt's ``m`` embedding where
    there is one, else against the mean of its embeddings. ``background``: unit embeddings
    ``[B, D]`` of the background prompts (the calibrated score's competitors).
    """

    def __init__(self, session: str, rules: Sequence[TriggerRule], prompts: Mapping[str, Mapping[str, np.ndarray]],
                 background: np.ndarray | None = None) -> None:
        self.session = session
        self.rules = list(rules)
        self._prompts = {r.name: {m: _unit(v) for m, v in prompts[r.name].items()} for r in self.rules}
        self.background = None if background is None or not len(background) else np.asarray(background, np.float32)
        self._banks: dict[str, _ModalityBank | None] = {}
        self._machines: dict[tuple[int, str], Hysteresis] = {}
        self._streams: dict[str, str] = {}  # stream -> modality, of every stream scored
        self._last_t: dict[str, float] = {}  # stream -> t_end of its last window scored
        self.totals = {r.name: _TriggerTotals() for r in self.rules}
        self.ignored: Counter[str] = Counter()  # stream -> windows not after the previous one

    # -- scoring ----------------------------------------------------------------------------
    def _bank(self, modality: str) -> _ModalityBank | None:
        if modality not in self._banks:
            idx = [i for i, r in enumerate(self.rules) if r.watches(modality)]
            if not idx:
                self._banks[modality] = None
            else:
                rows = [self._prompt_for(self.rules[i].name, modality) for i in idx]
                self._banks[modality] = _ModalityBank(
                    idx, np.stack(rows).astype(np.float32), np.array([self.rules[i].on for i in idx]),
                    np.array([self.rules[i].score == "calibrated" for i in idx]),
                    np.array([self.rules[i].temperature for i in idx], dtype=np.float64))
        return self._banks[modality]

    def _prompt_for(self, name: str, modality: str) -> np.ndarray:
        by_modality = self._prompts[name]
        if modality in by_modality:
            return by_modality[modality]
        return _unit(np.mean(np.stack(list(by_modality.values())), axis=0))

    def scores(self, modality: str, embedding: np.ndarray) -> tuple[list[str], np.ndarray]:
        """The names of the triggers watching ``modality`` and each one's score of ``embedding``."""
        bank = self._bank(modality)
        if bank is None:
            return [], np.zeros(0)
        return [self.rules[i].name for i in bank.triggers], self._score(bank, np.asarray(embedding, np.float32))

    def _score(self, bank: _ModalityBank, x: np.ndarray) -> np.ndarray:
        cos = (bank.prompts @ x).astype(np.float64)
        if self.background is None or not bank.calibrated.any():
            return cos
        bg = (self.background @ x).astype(np.float64)
        # softmax of the prompt against the background: 1 / (1 + sum_j exp((b_j - c) / T))
        z = (bg[None, :] - cos[:, None]) / bank.temperature[:, None]
        calibrated = 1.0 / (1.0 + np.exp(np.clip(z, -50.0, 50.0)).sum(axis=1))
        return np.where(bank.calibrated, calibrated, cos)

    # -- events -----------------------------------------------------------------------------
    def observe(self, records: Iterable[Any], trace: Any = None) -> list[TriggerEvent]:
        """Score ``records`` (:class:`sinks.protocol.EmbeddingRecord`, each stream's in window
        order); returns the events they start or end. ``trace``: gets ``scored(record, names,
        scores)`` for each record (the session timeline)."""
        events: list[TriggerEvent] = []
        for rec in records:
            bank = self._bank(rec.modality)
            if bank is None:
                continue
            self._streams.setdefault(rec.stream, rec.modality)
            if not rec.t_end > self._last_t.get(rec.stream, -math.inf):
                self.ignored[rec.stream] += 1  # a window the stream already passed: no event may go back
                continue
            self._last_t[rec.stream] = rec.t_end
            scores = self._score(bank, np.asarray(rec.embedding, np.float32))
            if trace is not None:
                trace.scored(rec, [self.rules[i].name for i in bank.triggers], scores)
            busy = bank.busy.setdefault(rec.stream, np.zeros(len(bank.triggers), dtype=bool))
            for j in np.flatnonzero(busy | (scores >= bank.on)):  # idle below on: nothing can happen
                machine = self._machine(bank.triggers[j], rec.stream)
                out = machine.observe(rec.window, rec.t_start, rec.t_end, float(scores[j]))
                busy[j] = machine.state != Hysteresis.IDLE
                events += self._events(bank.triggers[j], rec.stream, rec.modality, out)
        return events

    def close(self) -> list[TriggerEvent]:
        """The session ended: every open event ends (``stream_end``)."""
        events: list[TriggerEvent] = []
        for (i, stream), machine in sorted(self._machines.items()):
            events += self._events(i, stream, self._streams[stream], machine.close())
        for bank in self._banks.values():
            if bank is not None:
                bank.busy.clear()
        return events

    def _machine(self, i: int, stream: str) -> Hysteresis:
        key = (i, stream)
        if key not in self._machines:
            r = self.rules[i]
            self._machines[key] = Hysteresis(r.on, r.off, r.min_duration_s, r.cooldown_s)
        return self._machines[key]

    def _events(self, i: int, stream: str, modality: str, out: list[tuple]) -> list[TriggerEvent]:
        name = self.rules[i].name
        events = [TriggerEvent(name, stream, modality, *o, score_kind=self.rules[i].score) for o in out]
        for e in events:
            if e.kind == "end":
                self.totals[name].events += 1
                self.totals[name].duration_s += e.t_end - e.t_start
        return events

    def summary(self) -> dict[str, dict[str, float]]:
        """Per trigger: ``events`` ended so far and their total ``duration_s`` (stream seconds)."""
        return {n: {"events": t.events, "duration_s": round(t.duration_s, 6)} for n, t in self.totals.items()}


def _unit(v: Any) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    if not (n > 0 and math.isfinite(n)):
        raise ValueError("a prompt embedding is zero or not finite")
    return v / n
