"""Failed handshakes per address: an address that fails too many in a minute
is refused for the rest of it (``auth.max_failures_per_minute``)."""

from __future__ import annotations

import time
from collections import deque

# Addresses remembered at most: bounds the table under a spread-out attack.
_MAX_ADDRESSES = 100_000


class FailedHandshakes:
    def __init__(self, max_per_minute: int, trusted: frozenset[str]) -> None:
        self.max_per_minute = max_per_minute
        self.trusted = trusted  # load balancers: every producer behind one shares its address
        self.window_s = 60.0
        self._failures: dict[str, deque[float]] = {}

    def note(self, addr: str) -> None:
        if addr in self.trusted:
            return
        q = self._failures.setdefault(addr, deque())
        q.append(time.monotonic())
        if len(self._failures) > _MAX_ADDRESSES:
            self._failures.pop(next(iter(self._failures)))

    def retry_after_s(self, addr: str) -> float:
        """How long until ``addr`` is let in again (0: it is not refused)."""
        if not self.refused(addr):
            return 0.0
        q = self._failures[addr]
        return max(0.0, q[len(q) - self.max_per_minute] + self.window_s - time.monotonic())

    def refused(self, addr: str) -> bool:
        q = self._failures.get(addr)
        if not q:
            return False
        cutoff = time.monotonic() - self.window_s
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self._failures[addr]
            return False
        return len(q) >= self.max_per_minute
