"""Number arguments of the CLI: an argparse ``type`` that parses, checks the range and says
what it expected, so a bad value is argparse's usage error (exit 2 naming the flag)."""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

__all__ = ["number_type"]


def number_type(parse: Callable[[str], Any], what: str, valid: Callable[[Any], bool], expected: str,
                hint: str = "") -> Callable[[str], Any]:
    """An argparse ``type``: ``parse(text)`` (else "expected ``what``"), a finite value for which
    ``valid`` holds (else "expected ``expected``", then ``hint``)."""
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and valid(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}{hint}")
        return value
    return convert
