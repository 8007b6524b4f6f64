"""CurveZMQ keys: generating them (``python -m pipeline keys DIR``) and loading them.

Layout written by :func:`generate_keys` (ZeroMQ certificate files, z85 text)::

    DIR/server.key                      server public key: give it to every subscriber
    DIR/server.key_secret               server key pair: only the publisher reads it
    DIR/<client>.key_secret             one key pair per subscriber: give it to that subscriber
    DIR/<client>.key                    that subscriber's public key
    DIR/authorized_clients/<client>.key the public keys the publisher accepts

Removing a file from ``authorized_clients/`` revokes that subscriber at the next publisher start.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import zmq
import zmq.auth
from zmq.utils import z85

__all__ = [
    "CurveServerConfig",
    "CurveClientConfig",
    "generate_keys",
    "add_keys_args",
    "run_keys",
]

log = logging.getLogger(__name__)

_Z85_KEY_LEN = 40  # a 32-byte Curve25519 key in z85 text


def _z85_key(value: bytes | str, what: str) -> bytes:
    key = value.encode("ascii") if isinstance(value, str) else bytes(value)
    key = key.strip()
    if len(key) != _Z85_KEY_LEN:
        raise ValueError(f"{what}: expected a {_Z85_KEY_LEN}-character z85 CurveZMQ key, got {len(key)} characters")
    try:
        z85.decode(key)
    except Exception:
        raise ValueError(f"{what}: not a valid z85 key") from None
    return key


def _load_cert(path: str | os.PathLike, *, secret: bool) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"CurveZMQ key file {path} is a folder, expected a key file")
    if not path.is_file():
        raise FileNotFoundError(f"CurveZMQ key file {path} not found")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except Exception as exc:
        raise ValueError(f"CurveZMQ key file {path}: unreadable certificate ({exc})") from None
    if secret and not secret_key:
        raise ValueError(f"CurveZMQ key file {path}: has no secret key, expected a '.key_secret' file")
    return _z85_key(public, str(path)), secret_key and _z85_key(secret_key, str(path))


@dataclass(frozen=True)
class CurveServerConfig:
    """The publisher's CurveZMQ identity and the subscriber public keys it accepts.

    Picklable (plain bytes), so a Ray actor can receive it. Build it with :meth:`from_files`.
    """

    public_key: bytes
    secret_key: bytes = field(repr=False)
    allowed_clients: frozenset[bytes] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", _z85_key(self.public_key, "server public key"))
        object.__setattr__(self, "secret_key", _z85_key(self.secret_key, "server secret key"))
        clients = frozenset(_z85_key(k, "allowed client key") for k in self.allowed_clients)
        if not clients:
            # An empty allow-list would silently refuse everyone; almost surely a wrong path.
            raise ValueError("CurveServerConfig: allowed_clients is empty, expected at least one client public key")
        object.__setattr__(self, "allowed_clients", clients)

    @classmethod
    def from_files(
        cls,
        server_secret_file: str | os.PathLike,
        allowed_clients: str | os.PathLike | Iterable[bytes | str],
    ) -> "CurveServerConfig":
        """Load the server key pair (a ``.key_secret`` file) and the allowed client keys: a
        directory of ``.key`` files (e.g. ``DIR/authorized_clients``) or z85 public keys."""
        public, secret = _load_cert(server_secret_file, secret=True)
        if isinstance(allowed_clients, (str, os.PathLike)):
            directory = Path(allowed_clients)
            if directory.is_file():
                raise NotADirectoryError(f"allowed CurveZMQ client keys directory {directory} is a file, expected "
                                         "the folder of the subscribers' '*.key' files")
            if not directory.is_dir():
                raise FileNotFoundError(f"allowed CurveZMQ client keys directory {directory} not found")
            keys = [_load_cert(p, secret=False)[0] for p in sorted(directory.glob("*.key"))]
            if not keys:
                raise ValueError(f"allowed CurveZMQ client keys directory {directory} holds no '*.key' file")
        else:
            keys = [_z85_key(k, "allowed client key") for k in allowed_clients]
        return cls(public_key=public, secret_key=secret, allowed_clients=frozenset(keys))


@dataclass(frozen=True)
class CurveClientConfig:
    """A subscriber's CurveZMQ key pair and the server public key it trusts."""

    server_public_key: bytes
    public_key: bytes
    secret_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        for name in ("server_public_key", "public_key", "secret_key"):
            object.__setattr__(self, name, _z85_key(getattr(self, name), name.replace("_", " ")))

    @classmethod
    def from_files(cls, server_key_file: str | os.PathLike, client_secret_file: str | os.PathLike) -> "CurveClientConfig":
        """Load the server public key (``server.key``) and the client key pair
        (``<client>.key_secret``)."""
        server_public, _ = _load_cert(server_key_file, secret=False)
        public, secret = _load_cert(client_secret_file, secret=True)
        return cls(server_public_key=server_public, public_key=public, secret_key=secret)

    def apply(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CurveZMQ client of the server (call before ``connect``)."""
        socket.curve_serverkey = self.server_public_key
        socket.curve_publickey = self.public_key
        socket.curve_secretkey = self.secret_key


def generate_keys(
    directory: str | os.PathLike,
    clients: Iterable[str] = ("client",),
    *,
    force: bool = False,
) -> dict[str, Path]:
    """Create the server key pair (unless ``directory`` holds one already) and one key pair per
    client in ``directory`` (layout in the module docstring). Returns name -> secret key file of
    what was written (``"server"`` included when it was). Refuses to overwrite existing keys unless
    ``force``: replacing a key locks out its current holders. An existing server key is kept, so
    a subscriber can be added to a running deployment without touching the others' keys."""
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CurveZMQ support")
    directory = Path(directory)
    clients = list(clients)
    keep_server = (directory / "server.key_secret").exists() and not force
    if keep_server and not clients:
        raise FileExistsError(f"{directory / 'server.key_secret'} exists; add a subscriber with --client NAME, "
                              "or pass --force to replace every key")
    names = ([] if keep_server else ["server"]) + clients
    if "server" in clients:
        raise ValueError("key name 'server' is the publisher's; choose another client name")
    for name in names:
        if not name or "/" in name or name.startswith(".") or name == "authorized_clients":
            raise ValueError(f"key name {name!r} invalid: expected a plain file name")
    if len(set(names)) != len(names):
        raise ValueError(f"key names must be distinct (and not 'server'), got {names}")
    existing = [directory / f"{n}.key_secret" for n in names if (directory / f"{n}.key_secret").exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists; pass force=True (--force) to replace keys")
    authorized = directory / "authorized_clients"
    authorized.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name in names:
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        out[name] = Path(secret)
        if name != "server":
            shutil.copyfile(public, authorized / f"{name}.key")
    log.info("wrote CurveZMQ keys for %s in %s", names, directory)
    return out


def add_keys_args(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``keys`` sub-command to a CLI's sub-parsers (sets ``fn=run_keys``)."""
    p = subparsers.add_parser(
        "keys",
        help="generate CurveZMQ key pairs for an encrypted, authenticated publisher",
        description="Generate a server key pair and client key pairs (ZeroMQ certificate files). Exit codes: "
                    "0 written, 2 key files exist (without --force) or the folder cannot be written.",
    )
    p.add_argument("dir", type=Path, help="directory to write the keys into (created if missing)")
    p.add_argument("--client", action="append", dest="clients", metavar="NAME",
                   help="client name; repeat for several subscribers (default: one named 'client' when the "
                        "server key is new). With an existing server key, adds these subscribers only")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(fn=run_keys)
    return p


def run_keys(args: argparse.Namespace) -> int:
    """Run ``keys``: write the files and print how to use them. Returns the exit code."""
    adding = (Path(args.dir) / "server.key_secret").exists() and not args.force
    try:
        written = generate_keys(args.dir, args.clients or ([] if adding else ["client"]), force=args.force)
    except (FileExistsError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: keys: cannot write key files into {args.dir}: {exc.strerror or exc}; pick a folder you can write",
              file=sys.stderr)
        return 2
    d = Path(args.dir).resolve()
    if "server" in written:
        print(f"server key pair:     {written['server']}  (publisher only)")
    print(f"server public key:   {d / 'server.key'}  (give to subscribers)")
    clients = {n: p for n, p in written.items() if n != "server"}
    for name, path in clients.items():
        print(f"client '{name}':     {path}  (give to that subscriber)")
    print(f"allowed clients dir: {d / 'authorized_clients'}  (a publisher reads it when it starts)")
    print("\nrun config lines:\n"
          "publish:\n"
          "  curve:\n"
          f"    server_secret_key: {d / 'server.key_secret'}\n"
          f"    authorized_clients: {d / 'authorized_clients'}\n")
    for name, path in clients.items():
        print(f"subscribe as '{name}': python -m pipeline subscribe ENDPOINT --server-key {d / 'server.key'} "
              f"--client-key {Path(path).resolve()}")
    return 0
