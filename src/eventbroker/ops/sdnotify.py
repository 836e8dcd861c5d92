"""systemd's notify protocol (sd_notify(3)): one datagram per message to the
unix socket named by $NOTIFY_SOCKET. It is a dozen lines, so it is written
here rather than pulled in as a dependency (the python-systemd binding needs
libsystemd headers to build)."""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send ``READY=1``-style fields; False when not run by systemd (or it failed)."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(fields).encode(), addr)
        return True
    except OSError:
        return False


def monotonic_usec() -> str:
    """The MONOTONIC_USEC field systemd wants with RELOADING=1."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval_s() -> float | None:
    """Half of $WATCHDOG_USEC when the watchdog is on for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
