"""Exception types shared by the pipeline, the sources and the CLI.

Both derive from built-ins so callers that only know ``ValueError`` / ``RuntimeError`` still
catch them; the CLI catches these two and prints the message without a traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "SourceError"]


class ConfigError(ValueError):
    """A configuration (session.yaml, pipeline config) is invalid.

    Raised before anything runs; the message names the file, session, stream and key.
    """


class SourceError(RuntimeError):
    """A source could not read its data (missing column, corrupt or truncated media, ...).

    Replay sources raise it only after emitting every chunk that decoded cleanly, so a
    consumer keeps the good prefix of a damaged recording. The message names the session,
    the stream and the file (and the row or frame where known).
    """
