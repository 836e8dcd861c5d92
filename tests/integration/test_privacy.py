"""Personal data through real sockets, the real broker and a real key store:
sealed at the edge, read back by those allowed, forgotten everywhere."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time

import msgspec
import orjson
import pyarrow as pa
import pytest

from conftest import daemon_address, make_config, metrics, read_topic, record_headers, serve_daemon, total
from eventbroker.client import Producer
from eventbroker.config import PrivacyConfig, SchemasConfig
from eventbroker.errors import KeyStoreError
from eventbroker.kafka.embedded import free_port, wait_for_port
from eventbroker.privacy import Decryptor, forget
from eventbroker.privacy.crypto import open_value
from pgserver import postgres_server

PLAY = {
    "type": "object",
    "properties": {
        "user": {"type": "string", "minLength": 1, "x-user": True},
        "track": {"type": "integer", "minimum": 0},
        "client_ip": {"type": "string", "maxLength": 64, "x-personal": True},
        "email": {"type": "string", "x-personal": True},
    },
    "required": ["user", "track"],
    "additionalProperties": False,
}


def write_play_schema(root) -> SchemasConfig:
    (root / "play").mkdir(parents=True, exist_ok=True)
    (root / "play" / "1.json").write_text(json.dumps(PLAY))
    return SchemasConfig(dir=str(root))


def _privacy(tmp_path, **kw) -> PrivacyConfig:
    kw.setdefault("key_store", f"sqlite:///{tmp_path}/keys/keys.db")
    return PrivacyConfig(kek_file=str(tmp_path / "keys" / "kek"), **kw)


def _events(n_users: int, per_user: int, tag: str = "") -> list[dict]:
    return [{"user": f"user-{u}", "track": i, "client_ip": f"10.{u}.0.{i}{tag}", "email": f"u{u}.{i}@example.org"}
            for i in range(per_user) for u in range(n_users)]


def _by_id(records) -> dict[bytes, object]:
    return {record_headers(r)["eb.id"]: r for r in records}


async def test_personal_fields_are_sealed_in_kafka_and_open_for_those_allowed(daemon_factory, kafka_bootstrap,
                                                                              tmp_path):
    schemas = write_play_schema(tmp_path / "schemas")
    privacy = _privacy(tmp_path)
    sent = _events(40, 5)
    async with daemon_factory({"play": {"schema": "play"}}, schemas=schemas, privacy=privacy) as d, \
            Producer(daemon_address(d), linger_ms=5) as p:
        # Every user is new: the first parts wait for their keys (retry-later), the SDK resends.
        futs = [await p.send("play", orjson.dumps(e)) for e in sent]
        await p.flush()
        m = await metrics(d.admin.address)
        topic = d.router.lanes["play"].etype.topic
    ids = [f.result() for f in futs]
    assert total(m, "eventbroker_privacy_values_sealed_total") == 2 * len(sent)
    assert total(m, "eventbroker_privacy_users_loaded_total") == 40
    assert total(m, "eventbroker_privacy_parts_waiting_for_keys_total") >= 1
    assert total(m, "eventbroker_events_retry_later_total", reason="key_unavailable") >= 1
    records = _by_id(read_topic(kafka_bootstrap, topic, len(sent)))
    assert set(records) == set(ids)
    dec = Decryptor.from_config(privacy)
    try:
        events = []
        for eid, want in zip(ids, sent, strict=True):
            value = records[eid].value()
            got = orjson.loads(value)
            # the user, the event id and the other fields stay readable; personal values are sealed
            assert got["user"] == want["user"] and got["track"] == want["track"]
            assert got["client_ip"].startswith("ep1:") and got["email"].startswith("ep1:")
            assert want["client_ip"].encode() not in value and want["email"].encode() not in value
            events.append((eid, value))
        opened = dec.open_events("play", "user", ["client_ip", "email"], events)
        assert [o.payload for o in opened] == sent and not any(o.forgotten for o in opened)
        # A PyArrow table, as a lake returns it: opened column by column, the key store asked once.
        rows = [orjson.loads(v) for _, v in events]
        table = pa.table({"event_id": [e for e, _ in events], "user": [r["user"] for r in rows],
                          "client_ip": [r["client_ip"] for r in rows], "track": [r["track"] for r in rows]})
        # a sealed value moved to another event does not open
        with pytest.raises(KeyStoreError, match="does not open"):
            open_value(dec.keys_for(["user-0"])["user-0"], "play", "client_ip", ids[1], rows[0]["client_ip"])
        forget(msgspec.structs.replace(make_config(kafka_bootstrap), privacy=privacy), "user-3")
        out = dec.open_table(table, "play", ["client_ip"], user_column="user")
        assert out.column("track").to_pylist() == [e["track"] for e in sent]
        want_ips = [None if e["user"] == "user-3" else e["client_ip"] for e in sent]
        assert out.column("client_ip").to_pylist() == want_ips
        assert out.column("eb_forgotten").to_pylist() == [e["user"] == "user-3" for e in sent]
    finally:
        dec.close()


# two gateway processes, one key store


class _Gateway:
    def __init__(self, tmp_path, name: str, cfg) -> None:
        self.port, self.admin_port = free_port(), free_port()
        cfg = msgspec.structs.replace(cfg, server=msgspec.structs.replace(
            cfg.server, admin_listen=f"127.0.0.1:{self.admin_port}"))
        self.conf = tmp_path / f"{name}.toml"
        self.conf.write_bytes(msgspec.toml.encode(cfg))
        self.log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = serve_daemon(self.conf, self.port, self.log)
        wait_for_port("127.0.0.1", self.admin_port, 30, self.proc)

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


async def _send(gw: _Gateway, docs: list[dict]) -> list[bytes]:
    async with Producer(f"127.0.0.1:{gw.port}", linger_ms=2) as p:
        futs = [await p.send("play", orjson.dumps(doc)) for doc in docs]
        await p.flush()
    return [f.result() for f in futs]


@pytest.fixture(scope="module")
def pg():
    with postgres_server() as server:
        yield server


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_forget_reaches_every_gateway_and_shreds_what_they_wrote(kafka_bootstrap, tmp_path, store, request):
    key_store = (f"sqlite:///{tmp_path}/keys/keys.db" if store == "sqlite"
                 else request.getfixturevalue("pg").new_database())
    privacy = _privacy(tmp_path, key_store=key_store, forget_poll_ms=200)
    cfg = make_config(kafka_bootstrap, {"play": {"schema": "play"}},
                      schemas=write_play_schema(tmp_path / "schemas"), privacy=privacy)
    env_cfg = cfg
    if store == "postgresql":  # a fleet's KEK comes from its config, never made by a gateway
        os.makedirs(tmp_path / "keys", mode=0o700)
        (tmp_path / "keys" / "kek").write_text("k1 " + base64.b64encode(os.urandom(32)).decode())
        os.chmod(tmp_path / "keys" / "kek", 0o600)
    gws = [_Gateway(tmp_path, "a", cfg), _Gateway(tmp_path, "b", cfg)]
    try:
        before = {}
        for i, gw in enumerate(gws):  # each gateway caches both users' keys
            docs = [{"user": u, "track": i, "client_ip": f"192.0.2.{i}", "email": f"{u}@example.org"}
                    for u in ("erin", "frank")]
            before.update(zip(await _send(gw, docs), docs, strict=True))
        t0 = time.monotonic()
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "eventbroker.cli", "forget", "erin",
                                                       "--json", "--config", str(gws[0].conf)],
                                      capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)[0]["had_key"] is True
        took = {}
        while len(took) < len(gws):
            assert time.monotonic() - t0 < 5, f"a gateway did not drop the key within 5 s: {took}"
            for i, gw in enumerate(gws):
                if i not in took and total(await metrics(gw.admin), "eventbroker_privacy_forgets_applied_total"):
                    took[i] = time.monotonic() - t0
            await asyncio.sleep(0.02)
        print(f"forget reached both gateways in {max(took.values()) * 1000:.0f} ms ({store}, poll 200 ms)")
        after = {}
        for i, gw in enumerate(gws):
            docs = [{"user": u, "track": 10 + i, "client_ip": f"198.51.100.{i}"} for u in ("erin", "frank")]
            after.update(zip(await _send(gw, docs), docs, strict=True))
    finally:
        for gw in gws:
            gw.stop()
    records = _by_id(read_topic(kafka_bootstrap, cfg.types["play"].topic, len(before) + len(after)))
    dec = Decryptor.from_config(env_cfg)
    try:
        events = [(eid, records[eid].value()) for eid in [*before, *after]]
        opened = dec.open_events("play", "user", ["client_ip", "email"], events)
    finally:
        dec.close()
    for (eid, value), o in zip(events, opened, strict=True):
        doc = {**before, **after}[eid]
        if doc["user"] == "erin":
            # before the forget: sealed under a key that no longer exists; after: never sealed at all
            assert o.forgotten and o.payload["client_ip"] is None and o.payload["track"] == doc["track"]
            if eid in after:
                assert orjson.loads(value)["client_ip"] == "ep1:forgotten"
        else:
            assert o.payload == doc and not o.forgotten


async def test_kek_rotation_rewraps_every_key_and_touches_no_event(daemon_factory, kafka_bootstrap, tmp_path):
    kek = tmp_path / "keys" / "kek"
    privacy = _privacy(tmp_path)
    schemas = write_play_schema(tmp_path / "schemas")
    cli = [sys.executable, "-m", "eventbroker.cli"]

    def run(*args: str) -> str:
        out = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    async with daemon_factory({"play": {"schema": "play"}}, schemas=schemas, privacy=privacy) as d:
        conf = tmp_path / "eb.toml"
        conf.write_bytes(msgspec.toml.encode(d.cfg))
        first = kek.read_text()  # the gateway made it on first start
        async with Producer(daemon_address(d), linger_ms=2) as p:
            futs = [await p.send("play", orjson.dumps(e)) for e in _events(20, 2)]
            await p.flush()
        new = (await asyncio.to_thread(run, "keys", "new-kek", "--id", "k2")).strip()
        kek.write_text(new + "\n" + first)  # k2 wraps from now on, the old one still unwraps
        assert (await d.reload(str(conf)))[0]
        out = await asyncio.to_thread(run, "keys", "rotate", "--config", str(conf))
        assert "rewrapped 20 data key(s) with key-encryption key k2" in out
        status = json.loads(await asyncio.to_thread(run, "keys", "status", "--json", "--config", str(conf)))
        assert status["users"] == 20 and status["by_kek"] == {"k2": 20}
        kek.write_text(new + "\n")  # the old KEK retired
        assert (await d.reload(str(conf)))[0]
        async with Producer(daemon_address(d), linger_ms=2) as p:  # new users get keys wrapped by k2
            futs += [await p.send("play", orjson.dumps(e)) for e in _events(25, 1)]
            await p.flush()
        topic = d.router.lanes["play"].etype.topic
    ids = [f.result() for f in futs]
    records = _by_id(read_topic(kafka_bootstrap, topic, len(ids)))
    dec = Decryptor.from_config(privacy)  # holds k2 alone
    try:
        opened = dec.open_events("play", "user", ["client_ip", "email"], [(i, records[i].value()) for i in ids])
    finally:
        dec.close()
    assert [o.payload for o in opened] == _events(20, 2) + _events(25, 1)
    # `eventbroker tail` shows the sealed values; with --decrypt, the values for those holding the KEK
    sealed = await asyncio.to_thread(run, "tail", "--type", "play", "--config", str(conf), "--max-events",
                                     str(len(ids)), "--idle-exit-ms", "5000", "--payload-only")
    plain = await asyncio.to_thread(run, "tail", "--type", "play", "--config", str(conf), "--max-events",
                                    str(len(ids)), "--idle-exit-ms", "5000", "--decrypt")
    assert "10.0.0.0" not in sealed and sealed.count('"ep1:') == 2 * len(ids)
    shown = [json.loads(line) for line in plain.splitlines()]
    assert sorted((r["payload"]["user"], r["payload"]["track"], r["payload"]["client_ip"]) for r in shown) == \
        sorted((e["user"], e["track"], e["client_ip"]) for e in _events(20, 2) + _events(25, 1))


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("down", ["while running", "at start"])
async def test_a_key_store_outage_holds_back_only_new_users_of_personal_types(daemon_factory, tmp_path, pg, down):
    privacy = _privacy(tmp_path, key_store=pg.new_database())
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "keys" / "kek").write_text("k1 " + base64.b64encode(os.urandom(32)).decode() + "\n")
    (tmp_path / "keys" / "kek").chmod(0o600)
    types = {"play": {"schema": "play"}, "client_log": {}}
    if down == "at start":
        await asyncio.to_thread(pg.stop, "fast")
    try:
        async with daemon_factory(types, schemas=write_play_schema(tmp_path / "schemas"), privacy=privacy) as d, \
                Producer(daemon_address(d), linger_ms=2) as p:
            if down == "while running":
                await (await p.send("play", b'{"user":"known","track":1,"client_ip":"x"}'))
                await asyncio.to_thread(pg.stop, "fast")
            new_user = await p.send("play", b'{"user":"newcomer","track":2,"client_ip":"y"}')
            # The other type, a user whose key is cached, and an event with nothing to seal are not held
            # back (sent by another producer: a batch's part of one type is answered as a whole).
            async with Producer(daemon_address(d), linger_ms=2) as other:
                await asyncio.wait_for(await other.send("client_log", b"free-form"), 10)
                await asyncio.wait_for(await other.send("play", b'{"user":"nobody-new","track":4}'), 10)
                if down == "while running":
                    await asyncio.wait_for(await other.send("play", b'{"user":"known","track":3,"client_ip":"z"}'),
                                           10)
            await asyncio.sleep(1.0)
            assert not new_user.done()
            assert p.stats["retried"] < 20  # the gateway's hint backs the retries off while the store is down
            await asyncio.to_thread(pg.start_again)
            await asyncio.wait_for(new_user, 30)  # the store is back: the SDK's resend finds the key
            assert total(await metrics(d.admin.address), "eventbroker_privacy_key_load_errors_total") >= 1
    finally:
        if not (pg.data / "postmaster.pid").exists():
            await asyncio.to_thread(pg.start_again)
