"""bindstream's command line: ``bindstream COMMAND`` or ``python -m pipeline COMMAND``.

Exit codes of ``run`` and ``record``: 0 every stream ended cleanly, 2 configuration error
(nothing started), 3 some stream failed (the others ran to the end), 4 model weights unavailable
or unreadable, 5 every stream ran but an output (a recording, the embedding store, the timeline
page) could not be written, 6 no subscriber came within ``publish.wait_timeout_s`` (nothing
published), 130 interrupted (a replay stopped by Ctrl-C or SIGTERM before its end, or any run
stopped at once by a second Ctrl-C); 3 wins over 130, 130 over 5. ``import-bag``: 0 session.yaml
written, 2 the recording cannot be read, nothing in it maps, or DIR holds a session.
``demo-session`` and ``keys``: 0 written, 2 the folder cannot be written (``keys``: or key files
exist there; ``demo-session``: or it is not empty, or a flag is out of range).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pipeline.cli_types import number_type

__all__ = ["main"]


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from sources.errors import ConfigError
    from pipeline.run import EXIT_CONFIG, EXIT_NO_SUBSCRIBER, NoSubscriber, run

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        result = run(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except NoSubscriber as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_SUBSCRIBER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from encoders.weights import WeightsUnavailable

        if isinstance(exc, WeightsUnavailable):
            print(f"error: {exc}", file=sys.stderr)
            return 4
        raise
    _print_summary(result)
    return result.exit_code


def _print_summary(result) -> None:
    from pipeline.stats import SessionResult

    m = result.model
    print(f"bindstream: {len(result.sessions)} session(s) in {result.elapsed_s:.1f} s, model {m['model']} "
          f"(dim {m['dim']}, {m['device']} {m['dtype']}), published on {result.endpoint}")
    for s in result.sessions:
        print("\n".join(SessionResult.from_dict(s).lines()))
    # Live mode: messages the publisher refused at a subscriber's high-water mark, per topic.
    pub_dropped = {k: v for k, v in (getattr(result, "publisher_stats", None) or {}).get("dropped", {}).items() if v}
    if pub_dropped:
        print("  publisher dropped (hwm): " + ", ".join(f"{k} {v}" for k, v in sorted(pub_dropped.items())))


def _cmd_record(args: argparse.Namespace) -> int:
    """``record CONFIG --out DIR``: ``run`` with ``record: DIR`` (live sessions, docs/live.md).
    A config without a live session is refused: there would be nothing to record."""
    from pipeline.config import InlineSession, load_config
    from sources.errors import ConfigError

    args.set = list(args.set) + [f"record={Path(args.out).resolve()}"]
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    live = [s for s in cfg.sessions if isinstance(s, InlineSession) and _is_live(s.doc)]
    if not live:
        print(f"config error: {args.config} has no live session (an inline session whose streams have a 'kind'), "
              "so nothing would be recorded; to replay recorded sessions use: run CONFIG (docs/live.md)",
              file=sys.stderr)
        return 2
    return _cmd_run(args)


def _is_live(doc: object) -> bool:
    streams = doc.get("streams") if isinstance(doc, dict) else None
    return isinstance(streams, list) and any(isinstance(s, dict) and "kind" in s for s in streams)


def _cmd_config(args: argparse.Namespace) -> int:
    """``config``: every run-config key with its default and meaning, as YAML (or Markdown)."""
    from pipeline.config_doc import config_reference_markdown, default_config_yaml

    print(config_reference_markdown() if args.markdown else default_config_yaml(), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sources.demo import write_demo_session

    problem = _demo_folder_problem(args.dir)
    if problem is not None:
        print(f"error: demo-session: {problem}", file=sys.stderr)
        return 2
    try:
        path = write_demo_session(Path(args.dir), seconds=args.seconds, seed=args.seed, name=args.name)
    except OSError as exc:
        print(f"error: demo-session: cannot write into {args.dir}: {exc.strerror or exc}; "
              "pick a folder you can write", file=sys.stderr)
        return 2
    print(path)
    return 0


def _demo_folder_problem(text: str) -> str | None:
    """Why ``demo-session`` must not write into folder ``text``, or ``None``: the session goes
    into a new or empty folder only, so nothing already there is overwritten."""
    if not text:
        return "DIR is an empty string; give the folder to write the session into, e.g. sessions/demo-ego"
    dest = Path(text)
    if dest.is_file():
        return f"{dest} is a file, expected a folder; pick a new folder"
    try:
        occupied = dest.is_dir() and any(dest.iterdir())
    except OSError as exc:
        return f"cannot read folder {dest}: {exc.strerror or exc}; pick a folder you can write"
    if occupied:
        return f"{dest} exists and is not empty; pick a new folder or remove it (nothing was changed)"
    return None


def _cmd_import_bag(args: argparse.Namespace) -> int:
    """``import-bag BAG --out DIR``: a session.yaml mapping every topic bindstream reads
    (``sources.bagimport``); exit 2 when the recording cannot be read or nothing maps."""
    from sources.bagimport import import_bag
    from sources.errors import ConfigError

    try:
        path, written, skipped = import_bag(args.bag, args.out, name=args.name)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: import-bag: {exc.filename or args.bag}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(path)
    for line in written:
        print(f"  stream {line}")
    for line in skipped:
        print(f"  skipped {line}")
    return 0


def _demo_seconds(text: str) -> float:
    from sources.demo import MAX_SECONDS

    value = number_type(float, "a number of seconds", lambda v: v > 0, "a positive number of seconds")(text)
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_SECONDS:g} seconds, got {text!r}")
    return value


def _demo_seed(text: str) -> int:
    from sources.demo import MAX_SEED

    return number_type(int, "a whole number", lambda v: 0 <= v <= MAX_SEED, f"a seed from 0 to {MAX_SEED}")(text)


def _session_name(text: str) -> str:
    from sources.session import NAME_PATTERN

    if not NAME_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a session name of 1-128 letters, digits, '_', '.' or '-', "
                                         f"starting with a letter or digit, got {text!r}")
    return text


def _prog() -> str:
    """``bindstream`` when run as the installed command, else ``python -m pipeline``."""
    return "bindstream" if Path(sys.argv[0]).name == "bindstream" else "python -m pipeline"


def _add_demo_args(sub: Any) -> None:
    p = sub.add_parser("demo-session", help="write the deterministic synthetic demo session",
                       description="Exit codes: 0 written, 2 DIR is a file, holds anything, or cannot be written, "
                                   "or a flag is out of range.")
    p.add_argument("dir", help="a new or empty folder to write the session into (created if missing)")
    p.add_argument("--seconds", type=_demo_seconds, default=10.0,
                   help="length of the session, more than 0 and at most 3600 (default 10)")
    p.add_argument("--seed", type=_demo_seed, default=0,
                   help="seed of the shapes, sounds and motion, 0 to 2**32-1 (default 0)")
    p.add_argument("--name", type=_session_name, default="demo-ego",
                   help="session name in session.yaml: letters, digits, '_', '.', '-' (default demo-ego)")
    p.set_defaults(fn=_cmd_demo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=_prog(), description="Streaming multimodal ImageBind embeddings: sessions in, ZeroMQ out.",
        epilog="Exit codes: 0 clean, 2 configuration error, 3 a stream failed, 4 weights unavailable, "
               "5 an output (recording, store, timeline) failed, 6 no subscriber in time, 130 interrupted. "
               "Docs: README.md and docs/.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="replay the sessions of a config through the graph")
    p.add_argument("config", help="run config YAML (keys: python -m pipeline config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key, e.g. --set replay.rate=0 (repeatable)")
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("record", help="run a config with live sessions and record them as session folders")
    p.add_argument("config", help="run config YAML with live sessions (see docs/live.md)")
    p.add_argument("--out", required=True, metavar="DIR", help="recordings go to DIR/<session>/")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config key")
    p.set_defaults(fn=_cmd_record)

    p = sub.add_parser("config", help="print every run-config key with its default and meaning, as a YAML config")
    p.add_argument("--markdown", action="store_true", help="print the keys as the Markdown tables of docs/configuration.md")
    p.set_defaults(fn=_cmd_config)

    _add_demo_args(sub)

    p = sub.add_parser("import-bag", help="write a session.yaml that replays a ROS 1/2 bag or .mcap file in place")
    p.add_argument("bag", help="a .bag file, a ROS 2 bag folder (with metadata.yaml) or a .mcap file")
    p.add_argument("--out", required=True, metavar="DIR", help="session folder to write session.yaml into")
    p.add_argument("--name", default=None, help="session name (default: from the bag's file name)")
    p.set_defaults(fn=_cmd_import_bag)

    from sinks.keys import add_keys_args
    from pipeline.search import add_search_args
    from pipeline.storage import add_store_args
    from pipeline.store_timeline import add_timeline_args
    from pipeline.store_triggers import add_triggers_args
    from pipeline.subscribe import add_subscribe_args

    add_subscribe_args(sub)
    add_keys_args(sub)
    add_search_args(sub)
    add_store_args(sub)
    add_triggers_args(sub)
    add_timeline_args(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
