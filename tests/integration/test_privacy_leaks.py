"""No plaintext leaks: personal values carrying a unique marker are sent, valid
and invalid, to a gateway process logging at debug level, with one type acked
from the disk spool; then every byte the system wrote is searched for the
marker: the Kafka topics read raw (keys, values, headers), the spool's files,
the key store, the log, the metrics and the ACKs' rejection details."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import orjson
import pytest
from test_privacy import write_play_schema

from conftest import make_config, read_topic
from eventbroker.client import EventRejected, Producer
from eventbroker.config import PrivacyConfig, SpoolConfig
from eventbroker.kafka.embedded import free_port, wait_for_port
from eventbroker.ops.admin_http import http_request
from eventbroker.privacy import Decryptor, open_store


def _serve_verbose(conf: Path, port: int, log) -> subprocess.Popen:
    """``eventbroker -v serve``: every log line a gateway can write at debug level."""
    return subprocess.Popen([sys.executable, "-m", "eventbroker.cli", "-v", "--log-format", "json", "serve",
                             "--single-process", "--config", str(conf), "--listen", f"127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)


def _all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_personal_values_appear_nowhere_the_system_wrote(kafka_bootstrap, tmp_path):
    marker = "LEAK" + uuid.uuid4().hex
    state = tmp_path / "state"
    privacy = PrivacyConfig(key_store=f"sqlite:///{state}/keys/keys.db", kek_file=str(state / "keys" / "kek"),
                            forget_poll_ms=100)
    cfg = make_config(kafka_bootstrap, {"play": {"schema": "play"}, "played": {"schema": "play", "ack": "spool"},
                                        "client_log": {}},
                      schemas=write_play_schema(tmp_path / "schemas"), privacy=privacy,
                      spool=dict(dir=str(state / "spool")))
    admin_port, port = free_port(), free_port()
    cfg = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server,
                                                                      admin_listen=f"127.0.0.1:{admin_port}"))
    assert isinstance(cfg.spool, SpoolConfig)
    conf = tmp_path / "eb.toml"
    conf.write_bytes(msgspec.toml.encode(cfg))
    with open_store(privacy) as store:  # made before the gateway starts: the user was forgotten first
        store.forget("gone")
    log_path = tmp_path / "serve.log"
    details: list[str] = []
    with log_path.open("wb") as log:
        proc = await asyncio.to_thread(_serve_verbose, conf, port, log)
        try:
            wait_for_port("127.0.0.1", port, 60, proc)
            wait_for_port("127.0.0.1", admin_port, 30, proc)
            good = []
            async with Producer(f"127.0.0.1:{port}", linger_ms=2) as p:
                for t in ("play", "played"):
                    for i in range(100):
                        doc = {"user": f"u{i % 7}" if i % 10 else "gone", "track": i,
                               "client_ip": f"{marker}-{i}", "email": f"{marker}@example.org"}
                        good.append(await p.send(t, orjson.dumps(doc)))
                    bad = [
                        {"user": "u1", "track": "not a number", "client_ip": marker},  # schema: another field
                        {"user": "u1", "track": 1, "client_ip": marker * 3},  # schema: the personal field itself
                        {"user": "u1", "track": -1, "email": marker},
                    ]
                    futs = [await p.send(t, orjson.dumps(doc)) for doc in bad]
                    # a personal field spelt with an escape: valid JSON Schema-wise, refused by the scan
                    futs.append(await p.send(t, b'{"user":"u2","track":1,"cl\\u0069ent_ip":"' + marker.encode() + b'"}'))
                    futs.append(await p.send(t, b'{"user":"u2","track":1,"client_ip":"%s' % marker.encode()))
                    await p.flush()
                    for f in futs:
                        exc = f.exception()
                        assert isinstance(exc, EventRejected), exc
                        details.append(f"{exc} {exc.reason} {exc.detail}")
                # the control: a free-form type's payload is stored as sent, so the search can find it
                control = await p.send("client_log", f"not personal by declaration: {marker}".encode())
                await p.flush()
            assert all(f.result() for f in good) and control.result()
            status, body = await http_request(f"127.0.0.1:{admin_port}", "GET", "/metrics")
            assert status == 200
            # The spool's files hold the sealed events (checked before the gateway stops and tidies up).
            spool_files = _all_bytes(state / "spool")
            assert any(b"ep1:" in data for _, data in spool_files), "the spooled type left nothing to search"
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
    written = {"log": log_path.read_bytes(), "metrics": body, "acks": "\n".join(details).encode()}
    for path, data in [*spool_files, *_all_bytes(state)]:
        written[str(path)] = data
    n = 0
    for t in ("play", "played"):
        for r in read_topic(kafka_bootstrap, cfg.types[t].topic, 100):
            n += 1
            written[f"{t}@{r.partition()}:{r.offset()}"] = b"".join(
                [r.key() or b"", r.value() or b"", *(k.encode() + (v or b"") for k, v in r.headers() or ())])
    assert n == 200
    (ctl,) = read_topic(kafka_bootstrap, cfg.types["client_log"].topic, 1)
    written["control"] = ctl.value()
    assert b"eventbroker ready" in written["log"]
    assert all(b"ep1:" in v for k, v in written.items() if "@" in k)  # what is searched holds the sealed values
    leaks = [where for where, data in written.items() if marker.encode() in data]
    assert leaks == ["control"], f"the marker is in {leaks}"
    assert not any(marker.encode() in json.dumps(d).encode() for d in details)
    # ...and yet the values are there for those allowed
    dec = Decryptor.from_config(privacy)
    try:
        recs = read_topic(kafka_bootstrap, cfg.types["play"].topic, 100)
        opened = dec.open_events("play", "user", ["client_ip", "email"],
                                 [(dict(r.headers())["eb.id"], r.value()) for r in recs])
    finally:
        dec.close()
    assert sum(o.payload["client_ip"].startswith(marker) for o in opened if not o.forgotten) == 90
    assert sum(o.forgotten for o in opened) == 10
