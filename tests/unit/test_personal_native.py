"""The native sealing of personal fields (personal.pxi), checked against the
``cryptography`` package: every sealed value opens there with the documented
associated data, and nothing else about the payload changes."""

from __future__ import annotations

import base64
import os

import orjson
import pytest
from aiokafka.record.default_records import DefaultRecordBatch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from eventbroker import _fastpath as fp
from eventbroker.protocol import Reason, Status

PF = fp.PersonalFields("play", "user", ["client_ip", "email"])


def _open(key: bytes, field: bytes, eid: bytes, sealed: str, type_name: bytes = b"play") -> bytes:
    assert sealed.startswith("ep1:")
    raw = base64.b64decode(sealed[4:], validate=True)
    return AESGCM(key).decrypt(raw[:12], raw[12:], fp.personal_aad(type_name, field, eid))


def test_scan_finds_user_and_personal_values():
    p = b'{"user":"u1","track":5,"client_ip":"10.0.0.1","email":null,"x":{"client_ip":[1,"}"]}}'
    st_, uid, spans = PF.scan(p)
    assert st_ == 0 and uid == b"u1"
    # email is null (nothing to protect); the nested client_ip is not a top-level field
    assert [p[a:b] for a, b in spans] == [b'"10.0.0.1"']


@pytest.mark.parametrize("payload, status", [
    (b'{"cl\\u0069ent_ip":"x","user":"a"}', 2),  # an escaped name could hide a personal field
    (b'{"client_ip":"x"}', 3),  # no user
    (b'{"user":"a","user":"b","client_ip":"x"}', 4),  # two users
    (b'{"user":"a\\"b","client_ip":"x"}', 4),  # a user id with escapes
    (b'{"user":"","client_ip":"x"}', 4),  # empty
    (b'{"user":1.5,"client_ip":"x"}', 4),  # not an integer
    (b'[1]', 1),
])
def test_scan_refuses_what_it_cannot_seal_safely(payload, status):
    assert PF.scan(payload)[0] == status


def test_integer_user_ids_are_their_digits():
    assert PF.scan(b'{"user": -42, "email": "a@b"}')[1] == b"-42"


def test_seal_value_opens_with_cryptography_and_binds_event_field_and_type():
    key, eid = os.urandom(32), os.urandom(16)
    sealed = fp.seal_value(key, b"play", b"client_ip", eid, b'"10.0.0.1"')
    text = orjson.loads(sealed)
    assert _open(key, b"client_ip", eid, text) == b'"10.0.0.1"'
    for wrong in ((b"email", eid, b"play"), (b"client_ip", os.urandom(16), b"play"), (b"client_ip", eid, b"search")):
        with pytest.raises(InvalidTag):
            _open(key, wrong[0], wrong[1], text, wrong[2])
    with pytest.raises(InvalidTag):
        _open(os.urandom(32), b"client_ip", eid, text)
    # a fresh nonce each time
    assert fp.seal_value(key, b"play", b"client_ip", eid, b'"10.0.0.1"') != sealed


# the splitter path: a ring with personal fields, a fake schema version


class _Version:
    def __init__(self, personal):
        self.number = 2
        self.header = fp.record_header(fp.HEADER_SCHEMA_VERSION, b"2")
        self.dead_letter = False
        self.flat = None
        self.personal = personal
        self.failures = None

    def check(self, buf, seps, n):
        return self.failures

    def tally(self, n_valid, rules):
        pass

    def dead_letter_headers(self, detail):
        raise AssertionError


class _Schemas:
    def __init__(self, v):
        self.v = v

    def resolve(self, number):
        return self.v


def _setup(keys: dict | None = None):
    ring = fp.TypeRing("play", capacity_bytes=1 << 22, max_event_bytes=1 << 16)
    ring.schemas = _Schemas(_Version(PF))
    asked: list[list[bytes]] = []

    def on_missing(users):
        asked.append(list(users))
        return 25

    uk = fp.UserKeys(on_missing)
    uk.keys.update(keys or {})
    ring.keys = uk
    sp = fp.BatchSplitter(max_events_per_batch=10000, max_event_bytes=1 << 16)
    sp.add(ring)
    return ring, sp, uk, asked


NOW = 1_700_000_000_000


def _batch(events):
    enc = fp.BatchEncoder()
    for eid, payload in events:
        enc.add(b"play", eid, NOW, None, payload)
    return enc.finish(1)


def _ingest(sp, frame):
    r = fp.FrameReader(1 << 20)
    r.feed(frame)
    assert r.next_frame()
    return sp.ingest_answering(r, NOW, None)


def _ring_payloads(ring):
    """What Kafka would get: the ring's record batch, parsed by aiokafka."""
    out = []
    unit = ring.build_unit(1 << 24, 1, 0)
    for _, buf, _ in unit[0] if unit else ():
        out += [orjson.loads(r.value) for r in DefaultRecordBatch(bytearray(buf))]
    return out


def test_part_waits_for_missing_keys_then_is_sealed():
    ring, sp, uk, asked = _setup()
    eids = [os.urandom(16) for _ in range(3)]
    events = [(eids[0], b'{"user":"a","track":1,"client_ip":"1.1.1.1"}'),
              (eids[1], b'{"user":"b","track":2,"email":"x@y","client_ip":"2.2.2.2"}'),
              (eids[2], b'{"user":"a","track":3}')]
    _, _, results, *_ = _ingest(sp, _batch(events))
    assert [(r[1], r[2], r[3]) for r in results] == [(Status.RETRY_LATER, Reason.KEY_UNAVAILABLE, 3)]
    assert uk.retry_after_ms == 25  # the cache's hint, for the ACK
    assert asked == [[b"a", b"b"]] and ring.pending_events == 0
    ka, kb = os.urandom(32), os.urandom(32)
    uk.keys.update({b"a": ka, b"b": kb})
    _, _, results, *_ = _ingest(sp, _batch(events))
    assert [(r[1], r[3]) for r in results] == [(fp.STATUS_ACCEPTED, 3)]
    got = _ring_payloads(ring)
    assert got[0]["track"] == 1 and got[0]["user"] == "a"
    assert _open(ka, b"client_ip", eids[0], got[0]["client_ip"]) == b'"1.1.1.1"'
    assert _open(kb, b"email", eids[1], got[1]["email"]) == b'"x@y"'
    assert _open(kb, b"client_ip", eids[1], got[1]["client_ip"]) == b'"2.2.2.2"'
    assert got[2] == {"user": "a", "track": 3}
    assert uk.encrypted == 3


def test_forgotten_user_values_become_the_marker():
    ring, sp, uk, _ = _setup({b"gone": None, b"here": os.urandom(32)})
    events = [(os.urandom(16), b'{"user":"gone","track":1,"client_ip":"9.9.9.9"}'),
              (os.urandom(16), b'{"user":"here","track":2,"client_ip":"8.8.8.8"}')]
    _, _, results, *_ = _ingest(sp, _batch(events))
    assert [r[3] for r in results] == [2]
    got = _ring_payloads(ring)
    assert got[0] == {"user": "gone", "track": 1, "client_ip": "ep1:forgotten"}
    assert got[1]["client_ip"].startswith("ep1:") and "8.8.8.8" not in orjson.dumps(got).decode()
    assert uk.shredded == 1


def test_events_the_scan_refuses_are_rejected_alone_with_a_reason():
    ring, sp, uk, _ = _setup({b"a": os.urandom(32)})
    events = [(os.urandom(16), b'{"user":"a","client_ip":"1"}'),
              (os.urandom(16), b'{"cl\\u0069ent_ip":"secret-value","user":"a"}'),
              (os.urandom(16), b'{"user":"a","client_ip":"3"}')]
    _, _, results, *_ = _ingest(sp, _batch(events))
    by = {r[1]: r for r in results}
    rej = by[Status.REJECTED]
    assert rej[2] == Reason.SCHEMA_VIOLATION and list(rej[4]) == [1]
    assert "escapes" in rej[6][0] and "secret" not in rej[6][0]
    assert by[fp.STATUS_ACCEPTED][3] == 2 and ring.pending_events == 2


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]),
                          st.one_of(st.none(), st.text(max_size=40), st.integers(-2**63, 2**63 - 1), st.lists(st.integers(0, 9),
                                                                                             max_size=3))),
                min_size=1, max_size=20))
def test_sealed_payloads_open_to_the_originals(rows):
    keys = {u.encode(): os.urandom(32) for u in "abc"}
    ring, sp, uk, _ = _setup(keys)
    events = []
    originals = []
    for u, v in rows:
        doc = {"user": u, "track": 1, "client_ip": v}
        originals.append(doc)
        events.append((os.urandom(16), orjson.dumps(doc)))
    _, _, results, *_ = _ingest(sp, _batch(events))
    assert [r[3] for r in results] == [len(rows)]
    for (eid, _), doc, got in zip(events, originals, _ring_payloads(ring), strict=True):
        if doc["client_ip"] is None:
            assert got == doc
            continue
        opened = orjson.loads(_open(keys[doc["user"].encode()], b"client_ip", eid, got["client_ip"]))
        assert {**got, "client_ip": opened} == doc


def test_a_cold_cache_answers_retried_parts_before_validating_them():
    ring, sp, uk, asked = _setup()
    events = [(os.urandom(16), b'{"user":"a","track":1,"client_ip":"1.1.1.1"}')]
    _ingest(sp, _batch(events))
    assert uk.cold and asked == [[b"a"]]
    ring.schemas.v.failures = [(0, "type", "x")]  # would refuse the event, if it were asked
    _, _, results, *_ = _ingest(sp, _batch(events))  # still missing: answered by the scan alone
    assert [(r[1], r[2]) for r in results] == [(Status.RETRY_LATER, Reason.KEY_UNAVAILABLE)]
    assert asked == [[b"a"], [b"a"]] and uk.parts_waiting == 2
    ring.schemas.v.failures = None
    uk.keys[b"a"] = os.urandom(32)
    _, _, results, *_ = _ingest(sp, _batch(events))
    assert [r[1] for r in results] == [fp.STATUS_ACCEPTED] and not uk.cold


def test_schema_failures_before_valid_events_leave_the_rest_sealed_in_place():
    """Refused events count in the mask and in pass 2's index: the sealed
    payloads must be found by that index (a review found them sized by the
    count left after the refusals)."""
    ring, sp, uk, _ = _setup({b"a": os.urandom(32)})
    n_bad, n_good = 900, 10
    events = [(os.urandom(16), b'{"user":"a","track":"bad","client_ip":"x"}') for _ in range(n_bad)]
    events += [(os.urandom(16), b'{"user":"a","track":%d,"client_ip":"10.0.0.%d"}' % (i, i)) for i in range(n_good)]
    ring.schemas.v.failures = [(k, "type", "$.track: expected integer") for k in range(n_bad)]
    _, _, results, *_ = _ingest(sp, _batch(events))
    by = {r[1]: r for r in results}
    assert by[Status.REJECTED][3] == n_bad and by[fp.STATUS_ACCEPTED][3] == n_good
    got = _ring_payloads(ring)
    assert [g["track"] for g in got] == list(range(n_good))
    key = uk.keys[b"a"]
    for (eid, _), g, i in zip(events[n_bad:], got, range(n_good), strict=True):
        assert _open(key, b"client_ip", eid, g["client_ip"]) == b'"10.0.0.%d"' % i


def test_events_without_personal_values_need_no_key():
    ring, sp, uk, asked = _setup()
    events = [(os.urandom(16), b'{"user":"new","track":1}'), (os.urandom(16), b'{"track":2}')]
    _, _, results, *_ = _ingest(sp, _batch(events))
    assert [(r[1], r[3]) for r in results] == [(fp.STATUS_ACCEPTED, 2)] and asked == []
    assert _ring_payloads(ring) == [{"user": "new", "track": 1}, {"track": 2}]


def test_a_cold_cache_does_not_ask_the_store_for_ids_no_schema_would_pass():
    ring, sp, uk, asked = _setup()
    _ingest(sp, _batch([(os.urandom(16), b'{"user":"alice","track":1,"client_ip":"x"}')]))
    assert uk.cold
    poison = [(os.urandom(16), b'{"user":"\xff\xfe","track":1,"client_ip":"x"}'),
              (os.urandom(16), b'{"user":"bo\x01b","track":1,"client_ip":"x"}'),
              (os.urandom(16), b'{"user":"alice","track":2,"client_ip":"y"}')]
    _ingest(sp, _batch(poison))
    assert asked == [[b"alice"], [b"alice"]]


def test_a_cold_cache_lets_events_with_nothing_to_seal_through():
    ring, sp, uk, asked = _setup()
    _ingest(sp, _batch([(os.urandom(16), b'{"user":"alice","track":1,"client_ip":"x"}')]))
    assert uk.cold
    _, _, results, *_ = _ingest(sp, _batch([(os.urandom(16), b'{"user":"bob","track":2}')]))
    assert [r[1] for r in results] == [fp.STATUS_ACCEPTED] and asked == [[b"alice"]]
