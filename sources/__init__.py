"""Sources: turn recorded or live streams into :class:`sources.base.Chunk` objects.

Submodules are imported on first use: ``pipeline.session`` imports ``sources.base``, and an
eager import of the replay sources here would import ``pipeline.session`` back mid-way.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Chunk", "MODALITIES", "AUDIO_RATE", "Source", "open_source", "open_session"]

from sources.base import AUDIO_RATE, MODALITIES, Chunk


def __getattr__(name: str) -> Any:
    if name in ("Source", "open_source", "open_session"):
        from sources import replay

        return getattr(replay, name)
    raise AttributeError(f"module 'sources' has no attribute {name!r}")
