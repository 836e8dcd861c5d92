"""The addresses a gateway serves: one gateway per producer port, and bind
failures that say what the address is for and how to move it.

Workers of ``serve --workers`` bind the producer port with SO_REUSEPORT, so
that the kernel spreads connections over them; a second gateway started on
the same port by mistake would bind it too, and producers would be split at
random between two gateways with different configs. So the process that
serves a port (the supervisor, or a ``--single-process`` daemon) holds a lock
on it for its lifetime, taken before anything binds.

The lock is a Linux abstract unix socket named after the port, not a lock
file: the kernel releases it when the process dies however it dies (no stale
lock to clean up after a ``kill -9``), it needs no writable directory, and
its peer credentials (SO_PEERCRED) tell a second gateway which process holds
the port. Handing the listening socket from the old process to the new one,
as nginx does on upgrade, is not needed: a SIGUSR2 replacement keeps the
supervisor, and with it the lock, while new workers bind beside the old ones.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from pathlib import Path

from eventbroker.errors import UsageError

log = logging.getLogger("eventbroker")

# What each address is for, the config key and the flag that move it.
PRODUCERS = ("accept producers", "server.listen", "--listen")
ADMIN = ("serve the admin endpoint (/metrics, /healthz, /readyz)", "server.admin_listen", "--admin-listen")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def bind_failed(what: tuple[str, str, str], address: str, err: OSError) -> UsageError:
    """The error for a failed bind: what the address is for, why, and what moves it."""
    purpose, key, flag = what
    why = "the address is already in use by another process" if err.errno == errno.EADDRINUSE else \
        (err.strerror or str(err))
    return UsageError(f"cannot {purpose} on {address}: {why}; set {key} in the config or {flag} to use another")


def _holder(name: bytes) -> str:
    """Which process holds the lock ``name``: "pid N (command line)"."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(name)
            pid, _, _ = _PEERCRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return "another process"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return f"pid {pid}" + (f" ({cmd})" if cmd else "")


class PortLock:
    """Held by the one process that serves a producer port (see the module doc)."""

    def __init__(self, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self._name = f"\0eventbroker-producer-port-{port}".encode()
        self._sock: socket.socket | None = None

    def acquire(self) -> None:
        """Take the lock, or raise UsageError naming the gateway that holds the port."""
        if self.port == 0:  # an ephemeral port is never shared
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self._name)
            sock.listen(8)  # a second gateway connects only to read our credentials
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE:  # no abstract sockets here: serve without the check
                log.debug("cannot take the lock on port %d (%s); not checking for a second gateway", self.port, e)
                return
            purpose, key, flag = PRODUCERS
            raise UsageError(f"cannot {purpose} on {self.address}: port {self.port} is already served by another "
                             f"eventbroker, {_holder(self._name)}; stop that one first, or set {key} in the config "
                             f"or {flag} to serve another port") from None
        os.set_inheritable(sock.fileno(), False)
        self._sock = sock

    def release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def check_bindable(host: str, port: int, address: str) -> None:
    """Fail now, with a clear message, if the producer port cannot be bound
    by workers sharing it (SO_REUSEPORT): a process that holds it without
    SO_REUSEPORT would make every worker fail and be restarted in a loop."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise bind_failed(PRODUCERS, address, e) from None
