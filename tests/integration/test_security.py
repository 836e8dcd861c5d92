"""Who may send what: TLS, mutual TLS, tokens, per-type authorization, limits.

Certificates are made at test time with `cryptography`. Every attack is
tried against a real daemon (real sockets, the real broker) next to a
well-behaved producer whose events must all be persisted."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import daemon_address, read_ids
from eventbroker import _fastpath as fp
from eventbroker.client import Producer
from eventbroker.config import AuthConfig, AuthProducer, LimitsConfig, TlsConfig
from eventbroker.errors import EventRejected, ServerError
from eventbroker.protocol import ErrorCode, ErrorFrame, FrameType, Hello
from eventbroker.security.tokens import create_token

NOW = dt.datetime.now(dt.UTC)


class Pki:
    """A CA, certificates it signs, and a rogue CA."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.ca_key, self.ca = self._ca("eventbroker test CA")
        self.rogue_key, self.rogue = self._ca("rogue CA")
        self.ca_file = self._write("ca.pem", self.ca)

    def _ca(self, name: str):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def _write(self, name: str, cert, key=None) -> str:
        (self.d / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (self.d / (name + ".key")).write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return str(self.d / name)

    def issue(self, name: str, cn: str, *, server: bool, expired: bool = False, rogue: bool = False) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        ca_key, ca = (self.rogue_key, self.rogue) if rogue else (self.ca_key, self.ca)
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number()))
        if expired:
            b = b.not_valid_before(NOW - dt.timedelta(days=10)).not_valid_after(NOW - dt.timedelta(days=1))
        else:
            b = b.not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=10))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        path = self._write(name, cert, key)
        return path, path + ".key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_cfg(pki: Pki, client_auth: str = "none", expired: bool = False) -> TlsConfig:
    cert, key = pki.issue("server-expired.pem" if expired else "server.pem", "localhost", server=True,
                          expired=expired)
    return TlsConfig(cert_file=cert, key_file=key, client_ca_file=pki.ca_file if client_auth != "none" else "",
                     client_auth=client_auth)


async def good_producer(d, n: int = 300, **kw) -> list[bytes]:
    """A well-behaved producer: all its events must be persisted."""
    async with Producer(daemon_address(d), linger_ms=1, **kw) as p:
        futs = [await p.send("play", b"good-%d" % i) for i in range(n)]
        return [await f for f in futs]


async def raw_hello(port: int, auth: bytes = b"", source: str | None = None) -> tuple[int, str] | str:
    """HELLO over a raw socket: (error code, message) of an ERROR frame, or "welcome"."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0) if source else None)
    try:
        writer.write(Hello("raw", auth=auth).encode())
        return await read_answer(reader)
    finally:
        writer.close()


async def read_answer(reader: asyncio.StreamReader, timeout_s: float = 10) -> tuple[int, str] | str:
    head = await asyncio.wait_for(reader.readexactly(12), timeout_s)
    (length,) = struct.unpack(">I", head[:4])
    body = await asyncio.wait_for(reader.readexactly(length), timeout_s)
    if head[4] == FrameType.ERROR:
        e = ErrorFrame.decode(body)
        return e.code, e.message
    return "welcome" if head[4] == FrameType.WELCOME else f"frame {head[4]}"


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_tls_listener_with_a_verified_server_certificate(daemon_factory, pki, kafka_bootstrap):
    async with daemon_factory({"play": {}}, tls=tls_cfg(pki)) as d:
        ids = await good_producer(d, ca_file=pki.ca_file)
        assert len(ids) == 300
        # The producer refuses a server whose certificate its CA did not sign.
        async with Producer(daemon_address(d), tls=True, connect_timeout_s=2) as p:  # system CAs only
            with pytest.raises(ConnectionError, match="certificate verify failed"):
                await p.wait_connected(3)
        # Plaintext to the TLS port: the TLS layer drops it; the SDK says why it may be.
        async with Producer(daemon_address(d), connect_timeout_s=2, reconnect_backoff_ms=(50, 100)) as p:
            with pytest.raises((ConnectionError, ServerError), match="TLS"):
                await p.wait_connected(3)
        ids += await good_producer(d, ca_file=pki.ca_file)
    assert read_ids(kafka_bootstrap, d.cfg.types["play"].topic, set(ids)) == set(ids)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_expired_server_certificate_is_refused_by_the_sdk(daemon_factory, pki):
    async with daemon_factory({"play": {}}, tls=tls_cfg(pki, expired=True)) as d:
        async with Producer(daemon_address(d), ca_file=pki.ca_file, connect_timeout_s=2) as p:
            with pytest.raises(ConnectionError, match="certificate has expired"):
                await p.wait_connected(3)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_mutual_tls_names_the_producer(daemon_factory, pki):
    """client_auth = required: a certificate from the CA whose CN is a
    configured producer is that producer (its type list applies); no
    certificate, an expired one or one from another CA cannot connect."""
    auth = AuthConfig(required=True, producers={"checkout": AuthProducer(cert_subject="checkout", types=["play"])})
    good_cert = pki.issue("client.pem", "checkout", server=False)
    expired = pki.issue("client-expired.pem", "checkout", server=False, expired=True)
    rogue = pki.issue("client-rogue.pem", "checkout", server=False, rogue=True)
    async with daemon_factory({"play": {}, "search": {}}, tls=tls_cfg(pki, "required"), auth=auth) as d:
        async with Producer(daemon_address(d), ca_file=pki.ca_file, cert_file=good_cert[0], key_file=good_cert[1],
                            linger_ms=1) as p:
            assert await (await p.send("play", b"mtls"))
            with pytest.raises(EventRejected, match="forbidden"):
                await (await p.send("search", b"not mine"))
        for name, (cert, key) in (("none", (None, None)), ("expired", expired), ("rogue CA", rogue)):
            async with Producer(daemon_address(d), ca_file=pki.ca_file, cert_file=cert, key_file=key,
                                connect_timeout_s=2, reconnect_backoff_ms=(50, 100)) as p:
                with pytest.raises((ConnectionError, ServerError)):
                    await p.wait_connected(2)
                print(f"\nclient certificate {name}: refused ({p._last_conn_error or 'handshake failed'})")
        await good_producer(d, ca_file=pki.ca_file, cert_file=good_cert[0], key_file=good_cert[1])


def _auth(types: list[str], required: bool = True, **kw) -> tuple[AuthConfig, str]:
    token, digest = create_token("checkout")
    return AuthConfig(required=required, producers={"checkout": AuthProducer(token_hashes=[digest], types=types)},
                      **kw), token


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_tokens_wrong_and_missing_get_the_same_answer(daemon_factory, caplog):
    auth, token = _auth(["play"])
    async with daemon_factory({"play": {}}, auth=auth) as d:
        port = d.server.port
        good = await raw_hello(port, token.encode())
        answers = {
            "missing": await raw_hello(port, b""),
            "wrong secret": await raw_hello(port, (token[:-4] + "AAAA").encode()),
            "unknown producer": await raw_hello(port, token.replace("checkout", "billing").encode()),
            "garbage": await raw_hello(port, b"\xff\x00 not a token"),
        }
        assert good == "welcome"
        for what, answer in answers.items():
            assert answer == (ErrorCode.AUTH_FAILED, "authentication failed"), what  # reveals nothing
        ids = await good_producer(d, token=token)
        assert len(ids) == 300
        assert d.security.stats.auth_failures == 4
    # The log says what was wrong, for the operator.
    assert "wrong secret for producer 'checkout'" in caplog.text and "unknown producer 'billing'" in caplog.text


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_type_the_producer_does_not_own_is_forbidden_and_never_reaches_kafka(daemon_factory, kafka_bootstrap):
    """The same batch holds an owned and a foreign type: the owned part is
    persisted, the foreign part rejected `forbidden`; a reload that grants
    the type applies to the open connection."""
    auth, token = _auth(["pl*"])
    async with daemon_factory({"play": {}, "search": {}}, auth=auth) as d:
        async with Producer(daemon_address(d), token=token, linger_ms=50) as p:
            play = [await p.send("play", b"mine-%d" % i) for i in range(50)]
            search = [await p.send("search", b"not mine-%d" % i) for i in range(50)]  # same batches
            ids = [await f for f in play]
            for f in search:
                with pytest.raises(EventRejected, match="forbidden"):
                    await f
            from conftest import metrics, total

            m = await metrics(d.admin.address)
            assert total(m, "eventbroker_events_rejected_total", type="search", reason="forbidden") == 50
            assert total(m, "eventbroker_events_received_total", type="search") == 0
            # Grant it by reload: the open connection may now send it.
            d.security.replace(AuthConfig(required=True, producers={"checkout": AuthProducer(
                token_hashes=auth.producers["checkout"].token_hashes, types=["play", "search"])}),
                d.cfg.limits, d.types)
            d.server.reconfigured()
            granted = await (await p.send("search", b"granted"))
    assert read_ids(kafka_bootstrap, d.cfg.types["play"].topic, set(ids)) == set(ids)
    found = read_ids(kafka_bootstrap, d.cfg.types["search"].topic, {granted}, timeout_s=10)
    assert found == {granted}  # the only search event in Kafka is the one sent after the grant


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_repeated_failures_from_one_address_are_rate_limited(daemon_factory):
    auth, token = _auth(["play"], max_failures_per_minute=3)
    async with daemon_factory({"play": {}}, auth=auth) as d:
        port = d.server.port
        # A producer already connected from that address keeps working.
        async with Producer(daemon_address(d), token=token, linger_ms=1) as p:
            await p.wait_connected(5)
            for _ in range(3):
                assert (await raw_hello(port, b"ebt1.checkout.bad"))[0] == ErrorCode.AUTH_FAILED
            refused = await raw_hello(port, token.encode())  # even a good token, for now
            assert refused[0] == ErrorCode.ADDRESS_LOCKED_OUT  # its own code: retryable, not bad credentials
            assert refused[1].startswith("too many failed handshakes from this address; retry in ")
            assert await raw_hello(port, token.encode(), source="127.0.0.2") == "welcome"  # other addresses fine
            assert await (await p.send("play", b"still here"))
        assert d.security.stats.auth_refused_addresses == 1


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_slowloris_handshakes_are_cut_off(daemon_factory):
    """A connection that sends nothing, and one that sends HELLO a byte at a
    time, are closed at the handshake timeout; producers are unaffected."""
    async with daemon_factory({"play": {}}, limits=LimitsConfig(handshake_timeout_ms=400)) as d:
        port = d.server.port
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        hello = Hello("slow").encode()

        async def dribble() -> None:
            for b in hello[:-1]:
                w2.write(bytes([b]))
                await asyncio.sleep(0.05)

        t0 = time.monotonic()
        dribbler = asyncio.create_task(dribble())
        ids = await good_producer(d)
        a1, a2 = await read_answer(r1), await read_answer(r2)
        took = time.monotonic() - t0
        dribbler.cancel()
        w1.close()
        w2.close()
        assert a1 == a2 == (ErrorCode.TIMEOUT, "no HELLO within the handshake timeout")
        assert took < 3 and len(ids) == 300
        assert d.security.stats.handshake_timeouts == 2


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_connection_flood_over_the_per_address_limit(daemon_factory):
    limits = LimitsConfig(max_connections_per_address=20)
    async with daemon_factory({"play": {}}, limits=limits) as d:
        port = d.server.port
        flood = []
        for _ in range(25):
            s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
            flood.append(s)
        await asyncio.sleep(0.3)
        refused = 0
        for s in flood:
            s.settimeout(0.05)
            try:
                data = s.recv(4096)
            except TimeoutError:
                continue
            if data[4:5] == bytes([FrameType.ERROR]):
                msg = ErrorFrame.decode(data[12:]).message
                assert msg == "too many connections from this address (limit 20)"
                refused += 1
        ids = await good_producer(d)  # from 127.0.0.1: not affected
        for s in flood:
            s.close()
        assert refused == 5 and len(ids) == 300
        assert d.security.stats.refused_address_limit == 5


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_idle_connections_are_closed_but_heartbeating_producers_stay(daemon_factory):
    limits = LimitsConfig(idle_timeout_ms=1000)
    async with daemon_factory({"play": {}}, limits=limits, server={"heartbeat_interval_ms": 200}) as d:
        port = d.server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(Hello("idle").encode())
        assert await read_answer(reader) == "welcome"
        async with Producer(daemon_address(d), linger_ms=1) as p:
            await p.wait_connected(5)
            answer = await read_answer(reader, timeout_s=5)
            assert answer == (ErrorCode.TIMEOUT, "nothing received for 1s (idle timeout)")
            await asyncio.sleep(1.5)
            assert await (await p.send("play", b"alive")) and p.reconnects == 0
        writer.close()
        assert d.security.stats.idle_timeouts == 1


def test_token_create_prints_a_token_and_a_hash_only(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "eventbroker.cli", "token", "create", "checkout", "--types",
                        "play,search.*"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    token = r.stdout.strip()
    assert token.startswith("ebt1.checkout.") and token not in r.stderr
    conf = tmp_path / "eb.toml"
    conf.write_text("\n".join(x for x in r.stderr.splitlines() if not x.startswith("#")) + "\n")
    from eventbroker.config import load_config
    from eventbroker.security.tokens import Authenticator

    cfg = load_config(conf)
    ident = Authenticator(cfg.auth.producers).by_token(token.encode())
    assert ident.name == "checkout" and ident.may_send("search.web") and not ident.may_send("billing")
    assert token.split(".")[2] not in conf.read_text()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_reload_closes_connections_that_no_longer_pass(daemon_factory):
    """Removing a token's hash, or requiring authentication, closes the open
    connections that relied on it; the others keep working."""
    auth, token = _auth(["play"], required=False)
    async with daemon_factory({"play": {}}, auth=auth) as d:
        async with Producer(daemon_address(d), token=token, linger_ms=1, reconnect_backoff_ms=(5000, 5000)) as tp, \
                Producer(daemon_address(d), linger_ms=1, reconnect_backoff_ms=(5000, 5000)) as anon:
            assert await (await tp.send("play", b"t")) and await (await anon.send("play", b"a"))
            other_token, other_hash = create_token("checkout")
            d.security.replace(AuthConfig(required=True, producers={"checkout": AuthProducer(
                token_hashes=[other_hash], types=["play"])}), d.cfg.limits, d.types)
            d.server.reconfigured()
            await asyncio.sleep(0.2)
            assert tp._conn is None and anon._conn is None  # both closed by the server
            assert d.server.stats.errors_by_code.get(ErrorCode.AUTH_FAILED, 0) >= 2
        async with Producer(daemon_address(d), token=other_token, linger_ms=1) as p:
            assert await (await p.send("play", b"new token"))


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_failures_on_connections_opened_in_parallel_are_limited_too(daemon_factory):
    """Opening many connections first and failing on all of them afterwards
    does not get around max_failures_per_minute."""
    auth, token = _auth(["play"], max_failures_per_minute=3)
    async with daemon_factory({"play": {}}, auth=auth) as d:
        port = d.server.port
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        answers = []
        for reader, writer in conns:
            writer.write(Hello("guess", auth=b"ebt1.checkout." + b"A" * 43).encode())
            answers.append(await read_answer(reader))
            writer.close()
        assert answers[:3] == [(ErrorCode.AUTH_FAILED, "authentication failed")] * 3
        assert all(a[0] == ErrorCode.ADDRESS_LOCKED_OUT for a in answers[3:]), answers
        assert d.security.stats.auth_failures == 3  # the rest were refused before any check


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_token_does_not_pass_with_a_foreign_certificate(daemon_factory, pki):
    """With client certificates: a token over a certificate that names no
    producer is refused, and require_cert makes the certificate mandatory."""
    token, digest = create_token("checkout")
    auth = AuthConfig(required=True, producers={"checkout": AuthProducer(
        token_hashes=[digest], cert_subject="checkout", require_cert=True, types=["play"])})
    own = pki.issue("own.pem", "checkout", server=False)
    foreign = pki.issue("foreign.pem", "someone-else", server=False)
    async with daemon_factory({"play": {}}, tls=tls_cfg(pki, "optional"), auth=auth) as d:
        for cert in (None, foreign):
            async with Producer(daemon_address(d), ca_file=pki.ca_file, token=token,
                                cert_file=cert[0] if cert else None, key_file=cert[1] if cert else None,
                                connect_timeout_s=2) as p:
                with pytest.raises((ServerError, ConnectionError)):
                    await p.wait_connected(3)
        await good_producer(d, ca_file=pki.ca_file, token=token, cert_file=own[0], key_file=own[1])


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_trickled_bytes_do_not_keep_a_connection_alive(daemon_factory):
    """The idle timeout counts whole frames: a byte a second of a frame that
    never completes does not hold the connection (or its buffer) open."""
    async with daemon_factory({"play": {}}, limits=LimitsConfig(idle_timeout_ms=1000)) as d:
        reader, writer = await asyncio.open_connection("127.0.0.1", d.server.port)
        writer.write(Hello("trickle").encode())
        assert await read_answer(reader) == "welcome"
        frame = fp.encode_frame(fp.FRAME_HEARTBEAT, b"\0" * 8)
        answer_task = asyncio.create_task(read_answer(reader, timeout_s=10))
        for b in frame[:-1]:
            if answer_task.done():
                break
            writer.write(bytes([b]))
            await asyncio.sleep(0.25)
        answer = await answer_task
        writer.close()
        assert answer == (ErrorCode.TIMEOUT, "nothing received for 1s (idle timeout)")


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_producer_that_never_reads_its_acks_is_dropped_after_the_idle_timeout(daemon_factory):
    """It fills its socket with unread acks; the server stops reading it and,
    once that has lasted idle_timeout_ms, closes it (freeing its slot)."""
    async with daemon_factory({"play": {}}, limits=LimitsConfig(idle_timeout_ms=1000)) as d:
        reader, writer = await asyncio.open_connection("127.0.0.1", d.server.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(Hello("deaf").encode())
        writer.transport.pause_reading()  # never read again
        enc = fp.BatchEncoder()
        frames = []
        for i in range(60_000):
            enc.add(b"play", struct.pack(">QQ", 1, i + 1), 1, None, b"x")
            frames.append(enc.finish(i + 1))
            enc.reset()
        blob = b"".join(frames)
        t0 = time.monotonic()
        try:
            for i in range(0, len(blob), 1 << 16):
                writer.write(blob[i : i + (1 << 16)])
                await asyncio.sleep(0)
            await asyncio.wait_for(writer.drain(), 30)
        except (ConnectionError, TimeoutError, RuntimeError):  # dropped by the server meanwhile
            pass
        deadline = time.monotonic() + 20
        while d.server.stats.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        took = time.monotonic() - t0
        writer.transport.abort()
        assert d.server.stats.connections == 0, "the deaf producer is still connected"
        assert d.security.stats.idle_timeouts >= 1
        print(f"\ndeaf producer dropped {took:.1f}s after it started sending")
        ids = await good_producer(d)
        assert len(ids) == 300


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_neighbours_failures_make_the_sdk_wait_not_fail(daemon_factory):
    """Bad HELLOs from one address lock it out for a while: a legitimate SDK
    producer connecting from that address is told ADDRESS_LOCKED_OUT with a
    retry hint, waits it out instead of failing its events for good, and gets
    through once the lock-out ends (here a 2 s window instead of a minute)."""
    auth, token = _auth(["play"], max_failures_per_minute=3)
    async with daemon_factory({"play": {}}, auth=auth) as d:
        d.security._failed.window_s = 2.0
        port = d.server.port
        for _ in range(3):
            assert (await raw_hello(port, b"ebt1.checkout.bad"))[0] == ErrorCode.AUTH_FAILED
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = await asyncio.wait_for(reader.readexactly(12), 10)
        frame = ErrorFrame.decode(await reader.readexactly(struct.unpack(">I", head[:4])[0]))
        writer.close()
        assert frame.code == ErrorCode.ADDRESS_LOCKED_OUT and 0 < frame.retry_after_ms <= 2001
        t0 = time.monotonic()
        async with Producer(daemon_address(d), token=token, linger_ms=1) as p:
            eid = await asyncio.wait_for(await p.send("play", b"after the lock-out"), 15)
        assert eid and time.monotonic() - t0 >= 0.5  # it waited for the hint
        assert p.stats["connect_failures"] >= 1


# --------------------------------------------------------------------------
# from the independent attack test (issue 16)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_refused_tls_handshakes_are_counted_by_reason(daemon_factory, pki):
    """An old protocol and a missing client certificate never reach the
    listener's protocol; their TLS alerts are counted by reason (metrics)."""
    import msgspec

    tls = msgspec.structs.replace(tls_cfg(pki, "required"), min_version="1.3")
    async with daemon_factory({"play": {}}, tls=tls) as d:
        port = d.server.port
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(pki.ca_file)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("localhost", port, ssl=old)
        no_cert = ssl.create_default_context(cafile=pki.ca_file)
        reader, writer = await asyncio.open_connection("localhost", port, ssl=no_cert)  # TLS 1.3: refused after
        writer.write(Hello("no-cert").encode())
        with contextlib.suppress(ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            await asyncio.wait_for(reader.read(100), 5)
        writer.close()
        refused = d.security.stats.tls_refused
        for _ in range(50):
            if "protocol_version" in refused and "certificate_required" in refused:
                break
            await asyncio.sleep(0.05)
        assert refused.get("protocol_version", 0) >= 1 and refused.get("certificate_required", 0) >= 1, refused
        text = d.metrics.render().decode()
        assert 'eventbroker_tls_handshakes_refused_total{reason="protocol_version"}' in text


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_token_passes_only_in_its_canonical_spelling(daemon_factory):
    auth, token = _auth(["play"])
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = token[:-1] + alphabet[alphabet.index(token[-1]) | 1]  # the same secret bytes, another spelling
    async with daemon_factory({"play": {}}, auth=auth) as d:
        assert await raw_hello(d.server.port, twin.encode()) == (ErrorCode.AUTH_FAILED, "authentication failed")
        assert await raw_hello(d.server.port, token.encode()) == "welcome"


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_configured_producers_make_authentication_required_unless_said_otherwise(daemon_factory, caplog):
    """Producers with tokens and no auth.required: every producer must
    authenticate (the secure choice). auth.required = false on purpose: the
    gateway warns at start, and the metric eventbroker status reads says so."""
    token, digest = create_token("checkout")
    producers = {"checkout": AuthProducer(token_hashes=[digest], types=["play"])}
    async with daemon_factory({"play": {}}, auth=AuthConfig(producers=producers)) as d:
        assert await raw_hello(d.server.port) == (ErrorCode.AUTH_FAILED, "authentication failed")  # anonymous
        assert await raw_hello(d.server.port, token.encode()) == "welcome"
        assert "eventbroker_auth_open_despite_producers 0.0" in d.metrics.render().decode()
    with caplog.at_level("WARNING"):
        async with daemon_factory({"play": {}}, auth=AuthConfig(required=False, producers=producers)) as d:
            assert await raw_hello(d.server.port) == "welcome"
            assert "eventbroker_auth_open_despite_producers 1.0" in d.metrics.render().decode()
    assert any("anonymous producers may send every type" in r.getMessage() for r in caplog.records)
