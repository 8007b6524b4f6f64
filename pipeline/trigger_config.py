"""The ``triggers`` list of the run config: one :class:`TriggerConfig` per entry (docs/triggers.md).

Errors name the trigger (``config key 'triggers[dog-bark].on'``); the CLI turns them into exit 2.
Example files (``image``, ``audio``, ``video``) resolve against the config file's folder; whether
they decode is checked before anything starts (:mod:`pipeline.prompts`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config_base import _build, _key, _Section
from pipeline.triggers import SCORES, TriggerRule
from sinks.protocol import evt_topic
from sources.base import MODALITIES
from sources.errors import ConfigError
from sources.yamlfile import short

__all__ = ["TriggerConfig", "build_triggers", "DEFAULT_BACKGROUND", "PROMPT_KEYS"]

PROMPT_KEYS = ("text", "image", "audio", "video")
# The calibrated score's competitors: prompts about nothing in particular, in the modalities a
# window can be (docs/triggers.md). A trigger's ``background`` adds its own.
DEFAULT_BACKGROUND = ("a photo of something", "an everyday scene", "a room", "outdoors", "people",
                      "background noise", "silence", "people talking", "music", "a sound")


@dataclass(frozen=True)
class TriggerConfig(_Section):
    """One trigger: a prompt (exactly one of ``text``, ``image``, ``audio``, ``video``) and its rule."""

    name: str = _key("", "required: the trigger's name; its events go out on evt/<session>/<name>")
    text: str | None = _key(None, "a sentence, e.g. \"a dog barking\"", types=(str,))
    image: Path | None = _key(None, "an example image file (JPEG, PNG), relative to the config file", types=(str, Path))
    audio: Path | None = _key(None, "an example audio clip (any format PyAV reads)", types=(str, Path))
    video: Path | None = _key(None, "an example video clip: its frames for vision, its sound (if any) for audio",
                              types=(str, Path))
    modalities: tuple[str, ...] = _key((), "the modalities it watches; empty = every modality of the session")
    on: float = _key(0.3, "an event starts when a window's score reaches this...")
    off: float = _key(0.25, "...and ends at the first window below this (hysteresis: off <= on)")
    min_duration_s: float = _key(0.0, "stream seconds the score must hold (>= off) before the event starts",
                                 minimum="non-negative")
    cooldown_s: float = _key(0.0, "stream seconds after an event's end before the next may start", minimum="non-negative")
    score: str = _key("cosine", "cosine: raw similarity | calibrated: softmax against background prompts (0..1)",
                      choices=SCORES, expected=f"one of {', '.join(SCORES)}")
    temperature: float = _key(0.05, "calibrated: the softmax temperature (smaller = sharper)", minimum="positive")
    background: tuple[str, ...] = _key((), "calibrated: background prompts added to the built-in ones")

    def _key(self, name: str) -> str:
        return f"triggers[{self.name or '?'}].{name}"

    def _check(self) -> None:
        where = f"config key 'triggers[{self.name or '?'}]'"
        if not self.name:
            raise ConfigError(f"{where}: every trigger needs a 'name'")
        try:
            evt_topic("session", self.name)
        except ValueError as exc:
            raise ConfigError(f"{where}: name: {exc}") from None
        given = [k for k in PROMPT_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ConfigError(f"{where}: expected exactly one prompt ({', '.join(PROMPT_KEYS)}), got {what}")
        if self.text is not None and not self.text.strip():
            raise ConfigError(f"{where}: text: expected a sentence, got an empty string")
        if self.on > 1.0:
            raise ConfigError(f"{where}: on ({self.on:g}) is above 1, the highest {self.score} score: "
                              "the trigger would never fire")
        if self.off > self.on:
            raise ConfigError(f"{where}: off ({self.off:g}) must not be above on ({self.on:g}): "
                              "an event ends below off, so off <= on")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad:
            raise ConfigError(f"{where}: modalities: unknown modality {short(bad[0])}, expected some of "
                              f"{', '.join(MODALITIES)}")
        if any(not isinstance(b, str) or not b.strip() for b in self.background):
            raise ConfigError(f"{where}: background: expected a list of sentences")
        for k in ("image", "audio", "video"):
            if isinstance(getattr(self, k), str):
                object.__setattr__(self, k, Path(getattr(self, k)))

    @property
    def prompt(self) -> tuple[str, Any]:
        """``(kind, value)``: ``("text", sentence)`` or ``("image"|"audio"|"video", path)``."""
        return next((k, getattr(self, k)) for k in PROMPT_KEYS if getattr(self, k) is not None)

    def rule(self) -> TriggerRule:
        return TriggerRule(self.name, on=self.on, off=self.off, min_duration_s=self.min_duration_s,
                           cooldown_s=self.cooldown_s, modalities=tuple(self.modalities), score=self.score,
                           temperature=self.temperature)

    def resolved(self, base: Path) -> "TriggerConfig":
        """Example file paths against ``base`` (the config file's folder)."""
        paths = {k: Path(base) / getattr(self, k) for k in ("image", "audio", "video") if getattr(self, k) is not None}
        return dataclasses.replace(self, **paths)


def build_triggers(given: Any, key: str) -> tuple[TriggerConfig, ...]:
    """The ``triggers`` list: mappings, names unique."""
    if given is None:
        return ()
    if not isinstance(given, (list, tuple)):
        raise ConfigError(f"config key '{key}': expected a list of triggers, got {short(given)}")
    out = []
    for i, entry in enumerate(given):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"config key '{key}[{i}]': expected a mapping (name, a prompt, on, off...), "
                              f"got {short(entry)}")
        # YAML 1.1 (PyYAML) reads the bare keys on and off as true and false.
        entry = {{True: "on", False: "off"}.get(k, k) if isinstance(k, bool) else k: v for k, v in entry.items()}
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"config key '{key}[{i}]': every trigger needs a 'name' (a string), got {short(name)}")
        out.append(_build(TriggerConfig, entry, f"{key}[{name}]"))
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"config key '{key}': trigger name(s) used twice: {', '.join(dup)}")
    return tuple(out)
