"""TLS for the producer listener, and the producer names client certificates carry."""

from __future__ import annotations

import ipaddress
import ssl

from eventbroker.config import TlsConfig
from eventbroker.errors import AuthFailed

# TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3 suites are all fine).
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_auth != "none":
        ctx.load_verify_locations(cafile=tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_auth == "required" else ssl.CERT_OPTIONAL
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
