"""TLS for the producer listener, and the producer names client certificates carry."""

from __future__ import annotations

import _ssl
import ipaddress
import ssl
from collections.abc import Callable

from eventbroker.config import TlsConfig
from eventbroker.errors import AuthFailed

# TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3 suites are all fine).
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


# A fatal TLS alert (content type 21, level 2), as OpenSSL's message callback reports it.
_ALERT = 21
_FATAL_LEVEL = b"\x02"


def server_ssl_context(tls: TlsConfig, on_refusal: Callable[[str], None] | None = None) -> ssl.SSLContext:
    """The listener's context. ``on_refusal(reason)`` is told about every
    fatal TLS alert the gateway sends (``protocol_version``, ``unknown_ca``,
    ``handshake_failure``, ...) or receives (``peer:bad_certificate``): the
    only trace a refused handshake leaves, since the listener's protocol never
    sees such a connection. (A peer that does not speak TLS at all gets no
    alert and is not counted.) The hook is the ssl module's message callback,
    set below its Python wrapper (which builds three enums per call): OpenSSL
    calls it for every TLS record, so it stays two integer comparisons long."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_auth != "none":
        ctx.load_verify_locations(cafile=tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_auth == "required" else ssl.CERT_OPTIONAL
    if on_refusal is not None:
        def on_message(_conn, direction, _version, content_type, msg_type, data) -> None:
            if content_type == _ALERT and data[:1] == _FATAL_LEVEL:
                try:
                    name = ssl._TLSAlertType(msg_type).name.lower()  # type: ignore[attr-defined]
                except ValueError:
                    name = f"alert_{msg_type}"
                on_refusal(name if direction == "write" else f"peer:{name}")

        _ssl._SSLContext._msg_callback.__set__(ctx, on_message)  # type: ignore[attr-defined]
    return ctx


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def certificate_cn(peercert: dict | None) -> str:
    """The subject commonName of a verified peer certificate, or "".
    A subject with several CNs is refused: which one names the producer
    would be a guess."""
    if not peercert:
        return ""
    cns = [str(value) for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
    if len(cns) > 1:
        raise AuthFailed(f"client certificate has {len(cns)} subject CNs")
    return cns[0] if cns else ""
