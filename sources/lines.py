"""Reading text files line by line with a bound on a line's length, so one huge line (a 200 MB
CSV row, a 10 MB caption) costs a bounded amount of memory and is dropped, counted, instead of
being loaded (the rule of ``docs/guarantees.md``, "Limits")."""

from __future__ import annotations

from typing import IO, AnyStr, Callable, Iterator

__all__ = ["bounded_lines", "MAX_LINE_CHARS"]

MAX_LINE_CHARS = 1 << 16  # characters (text files) or bytes (binary files) of one line, newline included

_SKIP_BLOCK = 1 << 16


def bounded_lines(f: IO[AnyStr], too_long: Callable[[int], None], limit: int = MAX_LINE_CHARS) -> Iterator[AnyStr]:
    """The lines of ``f`` (newline kept), each at most ``limit`` long: a longer line is read
    past in blocks of 64 Ki, never held whole, and reported as ``too_long(line_number)`` (1-based)."""
    n = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        n += 1
        if len(line) <= limit:
            yield line
            continue
        nl = "\n" if isinstance(line, str) else b"\n"
        while not line.endswith(nl):
            line = f.readline(_SKIP_BLOCK)
            if not line:
                break
        too_long(n)
