"""Sources: turn recorded or live streams into :class:`sources.base.Chunk` objects, and what
reading needs: the session format (:mod:`sources.session`), clocks and the clock guard, the
recorder and the demo-session writer."""

from __future__ import annotations

from sources.base import AUDIO_RATE, MODALITIES, Chunk
from sources.replay import Source, open_session, open_source

__all__ = ["Chunk", "MODALITIES", "AUDIO_RATE", "Source", "open_source", "open_session"]
