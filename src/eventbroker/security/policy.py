"""``Security``: TLS, producer identities and limits as one listener uses them.

Built from the [tls], [auth] and [limits] sections and shared by every
connection of a listener; a reload swaps in new producers and limits (TLS
settings need a restart), which apply at once, also to open connections.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterable

from eventbroker.config import AuthConfig, LimitsConfig, TlsConfig
from eventbroker.errors import AuthFailed
from eventbroker.protocol import ErrorCode
from eventbroker.security.limits import FailedHandshakes
from eventbroker.security.tls import certificate_cn, server_ssl_context
from eventbroker.security.tokens import Authenticator, Identity

log = logging.getLogger("eventbroker.security")


class SecurityStats:
    __slots__ = ("auth_failures", "auth_refused_addresses", "handshake_timeouts", "idle_timeouts",
                 "refused_total_limit", "refused_address_limit", "inflight_pauses", "refused_handshake_budget", "tls_refused")

    def __init__(self) -> None:
        self.auth_failures = 0
        self.auth_refused_addresses = 0
        self.handshake_timeouts = 0
        self.idle_timeouts = 0
        self.refused_total_limit = 0
        self.refused_address_limit = 0
        self.inflight_pauses = 0
        self.refused_handshake_budget = 0
        self.tls_refused: dict[str, int] = {}  # failed TLS handshakes, by reason (OpenSSL's, lower case)


class Security:
    def __init__(self, tls: TlsConfig, auth: AuthConfig, limits: LimitsConfig, type_names: Iterable[str]) -> None:
        self.tls = tls
        self.auth = auth
        self.limits = limits
        self.authenticator = Authenticator(auth.producers)
        self.type_names = sorted(type_names)
        self.stats = SecurityStats()
        self.trusted = frozenset(limits.trusted_proxies)
        self._failed = FailedHandshakes(auth.max_failures_per_minute, self.trusted)
        self._tls_logged: dict[str, float] = {}

    def replace(self, auth: AuthConfig, limits: LimitsConfig, type_names: Iterable[str]) -> None:
        """A reload: new producers, patterns and limits (TLS needs a restart)."""
        self.auth = auth
        self.limits = limits
        self.authenticator = Authenticator(auth.producers)
        self.type_names = sorted(type_names)
        self.trusted = frozenset(limits.trusted_proxies)
        self._failed.max_per_minute = auth.max_failures_per_minute
        self._failed.trusted = self.trusted
        self.warn_if_open()

    def warn_if_open(self) -> None:
        """Log it when producers are configured but anonymous ones may send anyway."""
        if self.auth.open_despite_producers:
            log.warning("auth.required = false while [auth.producers] names %d producers: anonymous producers may "
                        "send every type, and the type lists limit only those that present a token; set "
                        "auth.required = true (or leave it out) to make every producer authenticate",
                        len(self.auth.producers))

    def ssl_context(self) -> ssl.SSLContext | None:
        return server_ssl_context(self.tls, self._tls_refused) if self.tls.enabled else None

    def _tls_refused(self, reason: str) -> None:
        refused = self.stats.tls_refused
        refused[reason] = refused.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._tls_logged.get(reason, 0.0) >= 1.0:  # a flood of them must not flood the log
            self._tls_logged[reason] = now
            log.info("TLS handshake refused: %s (%d so far)", reason, refused[reason])

    # identities

    def authenticate(self, token: bytes, peercert: dict | None) -> Identity | None:
        """The producer's identity (None: anonymous, allowed when auth is not
        required). Raises AuthFailed with the reason for the log."""
        cn = certificate_cn(peercert)
        cert_id = None
        if cn:
            try:
                cert_id = self.authenticator.by_certificate(cn)
            except AuthFailed:
                # A certificate that names no producer never passes with a
                # token (a stolen token must not work with any certificate).
                if token or self.auth.must_authenticate:
                    raise
        if token:
            ident = self.authenticator.by_token(token)
            if cert_id is not None and cert_id.name != ident.name:
                raise AuthFailed(f"token of {ident.name!r} over the certificate of {cert_id.name!r}")
            if self.authenticator.producers[ident.name].require_cert and cert_id is None:
                raise AuthFailed(f"producer {ident.name!r} must present its client certificate")
            return ident
        if cert_id is not None:
            return cert_id
        if self.auth.must_authenticate:
            raise AuthFailed("no token and no known client certificate")
        return None

    def allowed(self, ident: Identity | None) -> frozenset[bytes] | None:
        """Type names (bytes) ``ident`` may send; None: every type."""
        if ident is None:
            return None
        if ident.name not in self.authenticator.producers:  # removed by a reload
            return frozenset()
        ident = self.authenticator.identity(ident.name)  # patterns as reloaded
        return frozenset(n.encode() for n in self.type_names if ident.may_send(n))

    # failed handshakes per address

    def note_failure(self, addr: str) -> None:
        self.stats.auth_failures += 1
        self._failed.note(addr)

    def locked_out(self, addr: str) -> tuple[int, str, int] | None:
        """The ERROR for an address refused for its failed handshakes, with
        its retry hint (code, message, retry_after_ms); None if it may try."""
        wait_s = self._failed.retry_after_s(addr)
        if not wait_s:
            return None
        self.stats.auth_refused_addresses += 1
        return (ErrorCode.ADDRESS_LOCKED_OUT,
                f"too many failed handshakes from this address; retry in {wait_s:.0f}s", int(wait_s * 1000) + 1)
