"""What the driver does for triggers: their prompts read before anything starts and embedded
once, by the run's own model; and the session timeline written at the end of the run.

:func:`load_prompts` turns each trigger's prompt into encoder payloads: a sentence as it is; an
example file as the windows a session made of it would hold (the same readers and the same
window rule as every stream, :func:`pipeline.inprocess.session_windows`), so an example clip and
a stream showing the same thing give the same embedding. A file that is missing or does not
decode is a :class:`ConfigError` naming the trigger (exit 2), raised before Ray starts.

:func:`embed_prompts` sends every payload to one encoder actor in one call at start (never per
window); a prompt with several windows (a clip longer than one window) is their mean.
:func:`prompt_setup` is the same with any encoding function (the store's model, in-process, for
triggers over a store).

:func:`write_timeline` writes each session's timeline (``timeline: FILE``; with several
sessions ``FILE`` gets ``-<session>`` before its suffix) from what its actor gathered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.inprocess import session_windows
from pipeline.session_triggers import TriggerSetup
from pipeline.trigger_config import DEFAULT_BACKGROUND, TriggerConfig
from sources.errors import ConfigError, SourceError
from sources.session import FORMAT, session_from_dict

__all__ = ["PromptInputs", "load_prompts", "embed_prompts", "prompt_setup", "write_timeline"]

log = logging.getLogger(__name__)

_EXAMPLE_MODALITIES = {"image": ("vision",), "audio": ("audio",), "video": ("vision", "audio")}


@dataclass(frozen=True)
class PromptInputs:
    """Every trigger's prompt as payloads per modality, and the background sentences."""

    triggers: tuple[TriggerConfig, ...]
    payloads: dict[str, dict[str, list[Any]]]  # trigger -> modality -> payloads
    background: tuple[str, ...]
    timeline: bool = False

    def label(self, t: TriggerConfig) -> str:
        kind, value = t.prompt
        return f'{kind}: "{value}"' if kind == "text" else f"{kind}: {Path(value).name}"


def load_prompts(cfg: Any) -> PromptInputs | None:
    """``cfg.triggers``' prompts as payloads (``None`` without triggers or a timeline)."""
    if not cfg.triggers and cfg.timeline is None:
        return None
    payloads = {}
    for t in cfg.triggers:
        kind, value = t.prompt
        payloads[t.name] = {"text": [value]} if kind == "text" else _example(t, kind, Path(value), cfg)
    background: tuple[str, ...] = ()
    if any(t.score == "calibrated" for t in cfg.triggers):
        extra = [b for t in cfg.triggers for b in t.background]
        background = tuple(dict.fromkeys(DEFAULT_BACKGROUND + tuple(extra)))
    return PromptInputs(tuple(cfg.triggers), payloads, background, timeline=cfg.timeline is not None)


def _example(t: TriggerConfig, kind: str, path: Path, cfg: Any) -> dict[str, list[Any]]:
    """The windows of example file ``path`` per modality it gives (``video``: vision, and audio
    when it has a sound track)."""
    where = f"config key 'triggers[{t.name}].{kind}'"
    if path.is_dir():
        raise ConfigError(f"{where}: {path} is a folder, expected an example {kind} file")
    if not path.is_file():
        raise ConfigError(f"{where}: example file {path} not found (paths resolve against the config file's folder)")
    modalities = [m for m in _EXAMPLE_MODALITIES[kind] if m != "audio" or _has_audio(path, where, kind)]
    streams = [{"id": m, "modality": m, "source": path.name} for m in modalities]
    try:
        spec = session_from_dict({"format": FORMAT, "name": "prompt", "streams": streams}, path.parent, origin=where)
        windows = session_windows(spec, cfg.align, video_size=int(cfg.sources.video_size),
                                  max_pixels=int(cfg.sources.max_pixels))
    except (SourceError, ValueError, OSError) as exc:
        raise ConfigError(f"{where}: {path} does not decode as {kind}: {exc}") from None
    items: dict[str, list[Any]] = {}
    for w in windows:
        for item in w.items:
            items.setdefault(item.modality, []).append(item)
    out = {m: _full_windows(found) for m, found in items.items()}
    missing = [m for m in modalities if m not in out]
    if missing:
        raise ConfigError(f"{where}: {path} gave no {' or '.join(missing)} to embed (empty or too short?)")
    return out


def _full_windows(items: list[Any]) -> list[Any]:
    """The payloads of the windows that cover (nearly) as much of the clip as the best one: the
    first windows of a clip reach back before it starts (zero-filled audio, fewer frames)."""
    longest = max(i.t_end - i.t_start for i in items)
    return [i.payload for i in items if i.t_end - i.t_start >= 0.9 * longest]


def _has_audio(path: Path, where: str, kind: str) -> bool:
    import av

    try:
        with av.open(str(path)) as container:
            return bool(container.streams.audio) and (kind == "audio" or bool(container.streams.video))
    except (av.FFmpegError, OSError) as exc:
        raise ConfigError(f"{where}: {path} does not decode as {kind}: {exc}") from None


def embed_prompts(prompts: PromptInputs | None, encoder: Any) -> TriggerSetup | None:
    """Every prompt embedded by ``encoder`` (an encoder actor handle) in one call; the
    :class:`TriggerSetup` every session actor gets."""
    if prompts is None:
        return None
    import ray

    def encode(groups: dict[str, list[Any]]) -> dict[str, np.ndarray]:
        out = ray.get(encoder.encode_many.remote(groups)) if groups else {}
        failed = {m: r if isinstance(r, str) else "; ".join(r.errors.values()) or "bad values"
                  for m, r in out.items() if isinstance(r, str) or any(row is None for row in r.rows)}
        if failed:
            m, err = next(iter(failed.items()))
            raise RuntimeError(f"triggers: the encoder could not embed the {m} prompts: {err}")
        return {m: np.asarray(r.rows, dtype=np.float32) for m, r in out.items()}

    return prompt_setup(prompts, encode)


def prompt_setup(prompts: PromptInputs, encode: Callable[[dict[str, list[Any]]], dict[str, np.ndarray]]) -> TriggerSetup:
    """The :class:`TriggerSetup` of ``prompts``, their payloads embedded by one call of ``encode``
    (modality -> payloads in, modality -> unit rows ``[N, D]`` out, same order): the encoder
    actor in a run, the store's model in-process over a store (:mod:`pipeline.store_triggers`)."""
    groups: dict[str, list[Any]] = {}
    rows: dict[tuple[str, str], tuple[int, int]] = {}  # (trigger, modality) -> its rows in groups[modality]
    for name, by_modality in prompts.payloads.items():
        for m, payloads in by_modality.items():
            start = len(groups.setdefault(m, []))
            groups[m] += payloads
            rows[(name, m)] = (start, start + len(payloads))
    if prompts.background:
        start = len(groups.setdefault("text", []))
        groups["text"] += list(prompts.background)
        rows[("", "text")] = (start, start + len(prompts.background))
    emb = encode(groups) if groups else {}
    vectors = {name: {m: _mean_unit(emb[m][lo:hi]) for (n, m), (lo, hi) in rows.items() if n == name}
               for name in prompts.payloads}
    background = emb["text"][slice(*rows[("", "text")])] if prompts.background else None
    log.info("triggers: %d prompt(s) embedded at start (%s)", len(vectors),
             ", ".join(f"{m} {len(v)}" for m, v in groups.items()))
    return TriggerSetup(rules=tuple(t.rule() for t in prompts.triggers), prompts=vectors, background=background,
                        labels={t.name: prompts.label(t) for t in prompts.triggers}, timeline=prompts.timeline)


def _mean_unit(rows: np.ndarray) -> np.ndarray:
    v = rows.mean(axis=0)
    return (v / np.linalg.norm(v)).astype(np.float32)


def write_timeline(path: Path | None, aligners: list[Any], specs: list[Any],
                   summaries: list[dict[str, Any]] | None = None) -> list[Path]:
    """Each session's timeline page at ``path`` (none when ``path`` is ``None``); returns the files written.
    A session whose actor is gone (its process died) is skipped with a warning. A page that cannot
    be written (a folder in the way, a full disk) is logged as an error naming the file and, where
    ``summaries`` are given, is that session summary's ``timeline_error``; the run goes on."""
    if path is None:
        return []
    import ray

    from sinks.timeline import write_timeline_html

    written = []
    for al, spec in zip(aligners, specs):
        target = path if len(specs) == 1 else path.with_name(f"{path.stem}-{spec.name}{path.suffix}")
        try:
            data = ray.get(al.timeline.remote(), timeout=60)
        except Exception as exc:  # the session's process died: its summary already says so
            log.warning("session '%s': no timeline: %s", spec.name, str(exc).splitlines()[0])
            continue
        if data is None:
            continue
        try:
            written.append(write_timeline_html(target, data))
        except OSError as exc:
            _timeline_failed(spec.name, target, exc, summaries)
            continue
        log.info("session '%s': timeline written to %s", spec.name, target)
    return written


def _timeline_failed(session: str, target: Path, exc: OSError, summaries: list[dict[str, Any]] | None) -> None:
    """Log, and put in ``session``'s summary, why its timeline page could not be written."""
    why = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(target) else ""
    message = (f"config key 'timeline': the timeline page {target} cannot be written: {why}{where}; "
               "set timeline to an HTML file in a folder you can write")
    log.error("session '%s': %s", session, message)
    summary = next((s for s in summaries or [] if s.get("session") == session), None)
    if summary is not None:
        summary["timeline_error"] = message
