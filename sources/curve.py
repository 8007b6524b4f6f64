"""CurveZMQ keys of a rig that a live ``zmq`` stream connects to as a client (docs/live.md)."""

from __future__ import annotations

import zmq.auth

from sources.errors import ConfigError

__all__ = ["load_rig_keys"]


def load_rig_keys(server_key_file: str, client_secret_file: str) -> tuple[bytes, bytes, bytes]:
    """(rig's public key, our public key, our secret key) from ZeroMQ certificate files:
    the rig's ``server.key`` and this pipeline's ``<name>.key_secret``. ConfigError names the
    file that is missing or unreadable."""
    keys: list[bytes] = []
    for path, secret in ((server_key_file, False), (client_secret_file, True)):
        try:
            public, secret_key = zmq.auth.load_certificate(path)
        except OSError as e:
            raise ConfigError(f"CurveZMQ key file {path}: {e.strerror or e}") from None
        except Exception as e:
            raise ConfigError(f"CurveZMQ key file {path}: unreadable certificate ({e})") from None
        if secret and not secret_key:
            raise ConfigError(f"CurveZMQ key file {path}: has no secret key, expected a '.key_secret' file")
        keys += [public, secret_key] if secret else [public]
    return keys[0], keys[1], keys[2]
