"""Triggers over stored sessions: a run's prompts, rule and state machine (:mod:`pipeline.triggers`)
evaluated over the windows an embedding store holds, so a session stored by a run gives the events
that run published (docs/triggers.md, "Triggers over a store").

The prompts are read as a run reads them (:func:`pipeline.trigger_setup.load_prompts`: a sentence,
or an example file cut into windows by the config's window rule) and embedded in-process by the
model the store records (:meth:`pipeline.search.Store.encode_many`; no Ray). Each stream's stored
windows are scored in window order, the order its session actor published them; an event still on
after a session's last window ends there (``stream_end``), as at the end of a run.

``python -m pipeline triggers URI`` prints the events (:func:`add_triggers_args`); the trigger
flags are shared with ``python -m pipeline timeline`` (:mod:`pipeline.store_timeline`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.search import QueryError, Store
from pipeline.session_triggers import TriggerSetup
from pipeline.trigger_config import PROMPT_KEYS, build_triggers
from pipeline.trigger_setup import load_prompts, prompt_setup
from pipeline.triggers import SCORES, TriggerEvaluator, TriggerEvent
from sinks.protocol import MODALITIES, EmbeddingRecord
from sinks.store import EMBEDDINGS, EmbeddingStore, StoreError, where_clause
from sources.errors import ConfigError

__all__ = ["StoredEvent", "add_trigger_flags", "add_triggers_args", "evaluate", "run_command", "session_records",
           "sessions_of", "store_setup", "stored_events", "trigger_config", "wanted_sessions"]

DEFAULT_NAME = "query"
# Flag names for the trigger keys a config error names (one trigger given on the command line).
_FLAG_OF_KEY = {"min_duration_s": "min-duration", "cooldown_s": "cooldown", "modalities": "modality"}


@dataclass(frozen=True)
class StoredEvent:
    """One event of one trigger on one stream of a stored session (its start and end as one):
    the span ``[t_start, t_end]`` in stream time, the peak ``score``, the ``window`` whose score
    started it (as in the store's ``events`` table)."""

    session: str
    trigger: str
    modality: str
    stream: str
    window: int
    t_start: float
    t_end: float
    score: float
    score_kind: str
    reason: str  # below_off, or stream_end: still on after the session's last window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- which triggers --------------------------------------------------------------------------------

def trigger_config(args: argparse.Namespace) -> Any:
    """The run config whose ``triggers`` to evaluate: ``--config FILE``, or the defaults with the
    one trigger the prompt and rule flags give; ``None`` when neither gives one."""
    from pipeline.config import RunConfig, load_config

    prompt = [k for k in PROMPT_KEYS if getattr(args, k, None) is not None]
    rule = {"name": args.name, "on": args.on, "off": args.off, "min_duration_s": args.min_duration,
            "cooldown_s": args.cooldown, "score": args.score}
    if args.config is not None:
        given = [f"--{k}" for k in prompt] + [f"--{_FLAG_OF_KEY.get(k, k)}" for k, v in rule.items() if v is not None]
        if given:
            raise QueryError(f"--config gives the triggers, {', '.join(given)} one trigger without a config: "
                             "give one or the other")
        return load_config(args.config)
    if not prompt:
        return None
    if prompt[0] != "text" and Path(getattr(args, prompt[0])).is_dir():
        raise QueryError(f"--{prompt[0]} {getattr(args, prompt[0])} is a folder, expected a file (the example "
                         f"{prompt[0]} of the trigger)")
    if prompt[0] != "text" and not Path(getattr(args, prompt[0])).is_file():
        raise QueryError(f"--{prompt[0]} {getattr(args, prompt[0])}: no such file")
    if args.on is not None and args.off is None:
        rule["off"] = min(args.on, 0.25)  # the default off, or on where that is lower
    entry = {"name": DEFAULT_NAME, **{k: v for k, v in rule.items() if v is not None}, prompt[0]: getattr(args, prompt[0])}
    if args.modality:
        entry["modalities"] = list(args.modality)
    try:
        (trigger,) = build_triggers([entry], "triggers")
    except ConfigError as exc:
        raise QueryError(_flag_message(str(exc))) from None
    return dataclasses.replace(RunConfig(), triggers=(trigger.resolved(Path.cwd()),))


def _flag_message(text: str) -> str:
    """A config error about the command line's trigger, naming its flags instead of config keys."""
    def flag(m: re.Match) -> str:
        return f"--{_FLAG_OF_KEY.get(m.group(1), m.group(1))}" if m.group(1) else "the trigger"

    return re.sub(r"config key 'triggers\[[^\]]*\](?:\.(\w+))?'", flag, text)


def store_setup(store: Store, cfg: Any, model: str | None = None, *, flags: bool = False) -> TriggerSetup | None:
    """``cfg.triggers``' prompts embedded by ``store``'s model (``None`` without triggers). Example
    files that are missing or do not decode are a :class:`ConfigError` (a
    :class:`QueryError` naming the flag, with ``flags``)."""
    if cfg is None or not cfg.triggers:
        return None
    try:
        prompts = load_prompts(dataclasses.replace(cfg, timeline=None))
    except ConfigError as exc:
        if flags:
            raise QueryError(_flag_message(str(exc))) from None
        raise
    assert prompts is not None
    return prompt_setup(prompts, lambda groups: store.encode_many(groups, model))


# -- what the store holds --------------------------------------------------------------------------

def sessions_of(store: EmbeddingStore, model: str) -> list[str]:
    """The sessions the store holds rows of, for ``model``."""
    table = store.read(EMBEDDINGS, where_clause({"model": [model]}), ["session"])
    return sorted(set(table.column("session").to_pylist()))


def wanted_sessions(store: EmbeddingStore, model: str, wanted: Sequence[str]) -> list[str]:
    """``wanted`` (every session when empty), each checked to be in the store."""
    have = sessions_of(store, model)
    missing = [s for s in wanted if s not in have]
    if missing:
        raise StoreError(f"store {store.uri} has no session {missing[0]!r} (model {model}); its sessions: "
                         f"{', '.join(have) or 'none'}")
    if not have:
        raise StoreError(f"store {store.uri} holds no rows of model {model}")
    return list(dict.fromkeys(wanted)) or have


def session_records(store: EmbeddingStore, model: str, session: str,
                    modalities: Sequence[str] = ()) -> list[EmbeddingRecord]:
    """The stored windows of ``session`` as the records its run published: each stream's in
    window order (the streams one after another, by name)."""
    cols = ["stream", "modality", "window", "t_start", "t_end"]
    table = store.read(EMBEDDINGS, where_clause({"model": [model], "session": [session], "modality": list(modalities)}),
                       cols + ["vector"])
    n = table.num_rows
    vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(n, store.dim) if n else \
        np.zeros((0, store.dim), np.float32)
    rows = {c: table.column(c).to_pylist() for c in cols}
    order = sorted(range(n), key=lambda i: (rows["stream"][i], rows["window"][i]))
    return [EmbeddingRecord(session=session, stream=rows["stream"][i], modality=rows["modality"][i],
                            window=int(rows["window"][i]), t_start=float(rows["t_start"][i]),
                            t_end=float(rows["t_end"][i]), embedding=vectors[i]) for i in order]


# -- evaluation ------------------------------------------------------------------------------------

def evaluate(setup: TriggerSetup, session: str, records: Sequence[EmbeddingRecord], trace: Any = None) -> list[TriggerEvent]:
    """Every event ``setup``'s triggers start and end over ``records``, the open ones ended at the end."""
    evaluator = TriggerEvaluator(session, setup.rules, setup.prompts, setup.background)
    return evaluator.observe(records, trace) + evaluator.close()


def stored_events(store: Store, setup: TriggerSetup, sessions: Sequence[str], *, model: str,
                  modalities: Sequence[str] = ()) -> list[StoredEvent]:
    """The events of ``sessions`` (start and end paired), by session and stream time."""
    kinds = {r.name: r.score for r in setup.rules}
    out = []
    for s in sessions:
        first: dict[tuple[str, str], int] = {}  # (trigger, stream) -> the window that started its open event
        for e in evaluate(setup, s, session_records(store.store, model, s, modalities)):
            if e.kind == "start":
                first[(e.trigger, e.stream)] = e.window
            else:
                out.append(StoredEvent(s, e.trigger, e.modality, e.stream, first.pop((e.trigger, e.stream)),
                                       e.t_start, e.t_end, e.score, kinds[e.trigger], e.reason))
    return sorted(out, key=lambda e: (e.session, e.t_start, e.trigger, e.stream))


# -- the command -------------------------------------------------------------------------------------

def add_trigger_flags(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` or one trigger's prompt and rule, ``--modality``, ``--model``."""
    p.add_argument("--config", metavar="FILE", help="a run config: its triggers list, and its window rule for "
                                                    "example files")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--text", help="one trigger without a config: a sentence, e.g. \"a dog barking\"")
    q.add_argument("--image", metavar="FILE", help="...or an example image file")
    q.add_argument("--audio", metavar="FILE", help="...or an example audio clip")
    q.add_argument("--video", metavar="FILE", help="...or an example video clip (its frames and sound)")
    p.add_argument("--name", help=f"the trigger's name (default {DEFAULT_NAME})")
    p.add_argument("--on", type=float, help="an event starts at this score (default 0.3)")
    p.add_argument("--off", type=float, help="...and ends below this (default 0.25, or --on where lower)")
    p.add_argument("--min-duration", type=float, metavar="S", help="stream seconds the score must hold (default 0)")
    p.add_argument("--cooldown", type=float, metavar="S", help="stream seconds between events (default 0)")
    p.add_argument("--score", choices=SCORES, help="cosine (default) or calibrated (docs/triggers.md)")
    p.add_argument("--modality", action="append", default=[], choices=MODALITIES, metavar="M",
                   help=f"only windows of this modality (repeatable; one of {', '.join(MODALITIES)})")
    p.add_argument("--model", help="the model whose rows to read, where the store holds several")


def add_triggers_args(sub: Any) -> None:
    p = sub.add_parser("triggers", help="evaluate triggers over the sessions an embedding store holds",
                       description="Prints the events a run with these triggers publishes for the stored "
                                   "sessions. Exit codes: 0 events printed (maybe none), 2 bad trigger, session "
                                   "or store, 4 model weights unavailable.")
    p.add_argument("uri", help="the store (store.uri of the run)")
    add_trigger_flags(p)
    p.add_argument("--session", action="append", default=[], metavar="S", help="only this session (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.set_defaults(fn=lambda args: run_command(lambda: _cmd_triggers(args)))


def run_command(body: Callable[[], int]) -> int:
    """``body()``, with user errors as a message and exit 2 (4: weights unavailable)."""
    from encoders.weights import WeightsUnavailable

    try:
        return body()
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (QueryError, StoreError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WeightsUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4


def _cmd_triggers(args: argparse.Namespace) -> int:
    cfg = trigger_config(args)
    if cfg is None or not cfg.triggers:
        raise QueryError("no trigger: give --config FILE (a run config with a triggers list) or one of --text, "
                         "--image, --audio, --video" + (f" ({args.config} has no triggers)" if cfg is not None else ""))
    store = Store(args.uri)
    model = store.model_row(args.model)["model"]
    sessions = wanted_sessions(store.store, model, args.session)
    setup = store_setup(store, cfg, model, flags=args.config is None)
    assert setup is not None
    events = stored_events(store, setup, sessions, model=model, modalities=args.modality)
    if args.json:
        for e in events:
            print(json.dumps(e.to_dict()))
        return 0
    print(f"{'session':<16} {'trigger':<16} {'modality':<8} {'stream':<10} {'t_start':>8} {'t_end':>8} {'score':>7}")
    for e in events:
        print(f"{e.session:<16} {e.trigger:<16} {e.modality:<8} {e.stream:<10} {e.t_start:8.2f} {e.t_end:8.2f} "
              f"{e.score:7.3f}" + ("  (still on at the end)" if e.reason == "stream_end" else ""))
    return 0
