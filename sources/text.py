"""Timestamped text (captions, transcripts) from a JSONL file: ``{"t": seconds, "text": str}``."""

from __future__ import annotations

import json
import math
from typing import Iterator

from sources.errors import SourceError
from sources.lines import MAX_LINE_CHARS, bounded_lines
from sources.session import StreamSpec
from sources._common import _chunked, _Chunker, _Drops, _file_to_session, open_file
from sources.base import Chunk

__all__ = ["TextJsonlSource", "MAX_TEXT_CHARS"]

MAX_TEXT_CHARS = 4096  # an utterance's characters; the text tower reads 77 tokens of it


class TextJsonlSource:
    """One utterance per JSONL line; ``t`` is in ``spec.time_unit`` (seconds by default).

    Other keys on a line are ignored. Lines that are not JSON objects, or whose ``t`` is not
    a finite number or ``text`` not a string, are dropped, counted by reason in ``dropped``
    and logged with their line number. Blank lines are skipped. A line longer than
    :data:`sources.lines.MAX_LINE_CHARS` (64 KiB) is read past without being held
    (``line_too_long``), and a text longer than :data:`MAX_TEXT_CHARS` (4096 characters; the
    text tower reads 77 tokens) is dropped as ``text_too_long``.
    """

    def __init__(self, spec: StreamSpec, *, chunk_seconds: float = 1.0) -> None:
        if spec.modality != "text":
            raise ValueError(f"{spec.label}: TextJsonlSource reads text, not {spec.modality}")
        self.spec = spec
        self.chunk_seconds = chunk_seconds
        self.dropped: dict[str, int] = {}

    def __iter__(self) -> Iterator[Chunk]:
        yield from _chunked(_Chunker(self.spec, self.chunk_seconds, list), self._lines())

    def _lines(self) -> Iterator[tuple[float, str]]:
        spec = self.spec
        drops = _Drops(spec, self.dropped)
        to_session = _file_to_session(spec)
        name = spec.source.name
        try:
            with open_file(spec, spec.source, "rb") as f:
                lines = bounded_lines(f, lambda n: drops.drop("line_too_long", f"line {n} of {name} "
                                                                               f"(over {MAX_LINE_CHARS} bytes)"))
                for n, raw in enumerate(lines, start=1):
                    if not raw.strip():
                        continue
                    try:
                        obj = json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, ValueError, RecursionError):
                        drops.drop("bad_json", f"line {n} of {name}")
                        continue
                    if not isinstance(obj, dict):
                        drops.drop("bad_json", f"line {n} of {name} (not an object)")
                        continue
                    t, text = obj.get("t"), obj.get("text")
                    tf = _finite_float(t)
                    if tf is None:
                        drops.drop("bad_t", f"line {n} of {name} (t={str(t)[:40]!r})")
                        continue
                    if not isinstance(text, str):
                        drops.drop("bad_text", f"line {n} of {name}")
                        continue
                    if len(text) > MAX_TEXT_CHARS:
                        drops.drop("text_too_long", f"line {n} of {name} ({len(text)} characters, "
                                                    f"limit {MAX_TEXT_CHARS})")
                        continue
                    yield to_session(tf), text
        except OSError as e:
            raise SourceError(f"{spec.label}: cannot read {spec.rel(spec.source)}: {e.strerror or e}") from e
        finally:
            drops.summary()


def _finite_float(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # JSON integers are unbounded
        return None
    return f if math.isfinite(f) else None
