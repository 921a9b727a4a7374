"""CurveZMQ keys: the ``keygen`` layout, loading with permission checks, and
setting up sockets.  All cryptography is libzmq's own, reached through pyzmq.

::

    DIR/broker.key, DIR/broker.key_secret          the broker's pair
    DIR/clients/NAME.key, NAME.key_secret          client pairs ("default" first)
    DIR/workers/NAME.key, NAME.key_secret          worker (agent) pairs

The broker reads its secret and every public key in ``clients/`` and ``workers/``: the
folder a key is in decides what its holder may be, so a client's key cannot register as a
worker.  A client or worker reads ``broker.key`` and its own pair.  Secrets are 0600 and
folders 0700; anything looser is refused with the ``chmod`` that fixes it.
"""
from __future__ import annotations

import os
import stat
from typing import Any, Dict, List, Optional, Sequence, Tuple

import zmq
import zmq.auth

ROLE_DIRS = {"client": "clients", "worker": "workers"}


class KeysError(ValueError):
    """A key directory that is missing a file, or too open; the message says the fix."""


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    _check_mode(path, 0o700)


def _check_mode(path: str, most: int) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raise KeysError(f"{path} does not exist: make keys with 'zmqexec keygen DIR'"
                        ) from None
    if mode & ~most:
        raise KeysError(f"{path} is too open (mode {mode:o}): run 'chmod {most:o} {path}'")


def keygen(directory: str, clients: Sequence[str] = (), workers: Sequence[str] = ()
           ) -> Tuple[List[str], List[str]]:
    """Make the broker's pair and the named client and worker pairs (``default`` always),
    never overwriting one; returns (pairs written, pairs kept), as paths of secrets."""
    written: List[str] = []
    kept: List[str] = []
    directory = os.path.expanduser(directory)
    _private_dir(directory)
    wanted = [(directory, "broker")]
    for role, names in (("client", clients), ("worker", workers)):
        folder = os.path.join(directory, ROLE_DIRS[role])
        _private_dir(folder)
        wanted += [(folder, name) for name in ("default", *names)]
    for folder, name in wanted:
        if not name or os.sep in name or name.startswith("."):
            raise KeysError(f"{name!r} is not a key name: use letters, digits, - and _")
        secret = os.path.join(folder, f"{name}.key_secret")
        if os.path.exists(secret) or os.path.exists(os.path.join(folder, f"{name}.key")):
            kept.append(secret)
            continue
        _, secret = zmq.auth.create_certificates(folder, name)
        os.chmod(secret, 0o600)
        written.append(secret)
    return written, kept


def _load_secret(path: str) -> Tuple[bytes, bytes]:
    _check_mode(os.path.dirname(path) or ".", 0o700)
    _check_mode(path, 0o600)
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise KeysError(f"{path} holds no secret key")
    return public, secret


def _load_public(path: str) -> bytes:
    if not os.path.exists(path):
        raise KeysError(f"{path} does not exist: make keys with 'zmqexec keygen DIR'")
    return zmq.auth.load_certificate(path)[0]


def peer_keys(directory: str, role: str, name: Optional[str] = None
              ) -> Tuple[bytes, bytes, bytes]:
    """(broker public key, our public key, our secret key) for a client or worker."""
    directory = os.path.expanduser(directory)
    folder = os.path.join(directory, ROLE_DIRS[role])
    public, secret = _load_secret(os.path.join(folder, f"{name or 'default'}.key_secret"))
    return _load_public(os.path.join(directory, "broker.key")), public, secret


def apply_client(sock: "zmq.Socket[Any]", keys: Tuple[bytes, bytes, bytes]) -> None:
    """Make ``sock`` a CurveZMQ client of the broker (before it connects)."""
    server, public, secret = keys
    sock.curve_serverkey = server
    sock.curve_publickey = public
    sock.curve_secretkey = secret


class BrokerKeys:
    """The broker's pair and allowlist; ``role_of(user_id)`` is the folder of a key."""

    def __init__(self, directory: str) -> None:
        directory = os.path.expanduser(directory)
        self.public, self.secret = _load_secret(os.path.join(directory, "broker.key_secret"))
        self.roles: Dict[str, str] = {}
        for role, sub in ROLE_DIRS.items():
            folder = os.path.join(directory, sub)
            _check_mode(folder, 0o700)
            for key in zmq.auth.load_certificates(folder):
                self.roles[key.decode()] = role
        if not self.roles:
            raise KeysError(f"no client or worker keys in {directory}: run "
                            f"'zmqexec keygen {directory}'")
        self.auth: Any = None

    def apply(self, ctx: "zmq.Context[Any]", sock: "zmq.Socket[Any]") -> None:
        """CurveZMQ server on ``sock``, with a ZAP handler that admits allowlisted keys."""
        from zmq.auth.thread import ThreadAuthenticator

        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve_callback("*", credentials_provider=self)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: is this client public key (z85) in ``clients/`` or ``workers/``?"""
        return key.decode() in self.roles

    def role_of(self, user_id: Optional[str]) -> Optional[str]:
        return self.roles.get(user_id or "")

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()
