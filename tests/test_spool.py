"""The disk spool (``ack = "spool"``): its log format on its own, then the
daemon acknowledging from it while Kafka is away, replaying it after kill -9,
answering retry-later when the disk is full, and the offline tools."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from conftest import daemon_address, make_config, read_ids, read_topic, record_headers, serve_daemon
from eventbroker import spool as sp
from eventbroker.client import Producer
from eventbroker.daemon import Daemon
from eventbroker.embedded import free_port

MiB = 1024 * 1024


def _records(n: int, seed: int = 1) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    return [(rng.randrange(1, 50), rng.randbytes(rng.randrange(30, 40_000))) for _ in range(n)]


def _open(d: Path, **kw) -> sp.SpoolLog:
    kw.setdefault("segment_bytes", MiB)
    kw.setdefault("fsync", "interval")
    log = sp.SpoolLog(d, **kw)
    log.open()
    return log


def _read_all(log: sp.SpoolLog, pos: sp.Position | None = None):
    pos = pos or log.checkpoint
    out = []
    while True:
        recs, corrupt = log.read(pos, 256 * 1024)
        assert corrupt is None, corrupt
        if not recs:
            return out, pos
        out += [(r.n_events, bytes(r.entries)) for r in recs]
        pos = recs[-1].end


# --------------------------------------------------------------------------
# the log on its own


def test_log_round_trip_across_segments_and_checkpoint(tmp_path):
    """Records come back in order across segment files; a committed
    checkpoint survives reopening and deletes delivered segments."""
    recs = _records(200)
    log = _open(tmp_path)
    for i in range(0, 200, 7):
        log.append([sp.encode_record(n, e) for n, e in recs[i : i + 7]])
    assert len(sp.list_segments(tmp_path)) > 3
    got, end = _read_all(log)
    assert got == recs
    # Deliver the first 120 records, then reopen: the rest comes back.
    recs_read = []
    pos = log.checkpoint
    while len(recs_read) < 120:
        batch, _ = log.read(pos, 1)
        recs_read.append(batch[0])
        pos = batch[0].end
    log.commit(pos)
    assert min(sp.list_segments(tmp_path)) == pos.segment  # delivered segments are gone
    log.close()
    log = _open(tmp_path)
    assert log.checkpoint == pos
    got, _ = _read_all(log)
    assert got == recs[120:]
    assert log.pending_bytes == sum(sp.RECORD_HEADER_BYTES + 4 + len(e) for _, e in recs[120:])
    log.close()


@pytest.mark.parametrize("cut", [1, 7, 8, 11, 12, 500, -1])
def test_torn_tail_is_truncated_counted_and_appending_goes_on(tmp_path, cut, caplog):
    """A record cut short by a crash (any length) is found on open, cut off,
    counted and logged; the records before it are intact."""
    recs = _records(5, seed=cut)
    log = _open(tmp_path)
    for n, e in recs:
        log.append([sp.encode_record(n, e)])
    log.close()
    seg = tmp_path / sp.segment_name(0)
    whole = seg.stat().st_size
    last = sp.RECORD_HEADER_BYTES + 4 + len(recs[-1][1])
    keep = whole - last + (cut if cut > 0 else last - 1)
    os.truncate(seg, keep)
    log = _open(tmp_path)
    assert log.stats.torn_tails_truncated == 1
    assert log.stats.torn_bytes_truncated == keep - (whole - last)
    assert seg.stat().st_size == whole - last
    assert "torn tail" in caplog.text
    log.append([sp.encode_record(*recs[-1])])
    got, _ = _read_all(log)
    assert got == recs
    log.close()


def test_garbage_after_the_last_record_is_truncated(tmp_path):
    log = _open(tmp_path)
    log.append([sp.encode_record(3, b"x" * 100)])
    log.close()
    with open(tmp_path / sp.segment_name(0), "ab") as f:
        f.write(os.urandom(3000))
    log = _open(tmp_path)
    assert log.stats.torn_tails_truncated == 1 and log.stats.torn_bytes_truncated == 3000
    assert _read_all(log)[0] == [(3, b"x" * 100)]
    log.close()


def test_a_damaged_record_is_skipped_alone_while_reading(tmp_path):
    """Bit rot in one record's body: the reader reports where and why and goes
    on right after that record; the records around it are delivered."""
    recs = _records(60, seed=5)
    log = _open(tmp_path)
    for n, e in recs:
        log.append([sp.encode_record(n, e)])
    first = tmp_path / sp.segment_name(0)
    data = bytearray(first.read_bytes())
    second = sp.parse_record(data, sp.SEGMENT_HEADER_BYTES)[2]
    third = sp.parse_record(data, second)[2]
    data[second + 20] ^= 0x40
    first.write_bytes(bytes(data))
    got, corrupt = log.read(log.checkpoint, 100 * MiB)
    assert corrupt is not None and corrupt.reason == "checksum mismatch"
    assert corrupt.at == sp.Position(0, second)
    assert corrupt.resume == sp.Position(0, third) and corrupt.skipped_bytes == third - second
    assert [(r.n_events, bytes(r.entries)) for r in got] == recs[:1]
    rest, _ = _read_all(log, corrupt.resume)
    assert rest == recs[2:]
    log.close()
    # On the next start the damage is counted, the segment left alone.
    log = _open(tmp_path)
    assert log.stats.corrupt_records == 1 and log.stats.torn_tails_truncated == 0
    assert first.read_bytes() == bytes(data)
    log.close()


def test_an_unparseable_length_skips_to_the_next_segment(tmp_path):
    recs = _records(60, seed=6)
    log = _open(tmp_path)
    for n, e in recs:
        log.append([sp.encode_record(n, e)])
    segs = sp.list_segments(tmp_path)
    first = tmp_path / sp.segment_name(segs[0])
    n_first = sp.scan_segment(first).records
    data = bytearray(first.read_bytes())
    second = sp.parse_record(data, sp.SEGMENT_HEADER_BYTES)[2]
    data[second : second + 4] = b"\xff\xff\xff\xff"
    first.write_bytes(bytes(data))
    got, corrupt = log.read(log.checkpoint, 100 * MiB)
    assert corrupt is not None and "out of range" in corrupt.reason
    assert corrupt.resume == sp.Position(segs[1], sp.SEGMENT_HEADER_BYTES)
    assert _read_all(log, corrupt.resume)[0] == recs[n_first:]
    log.close()


def test_missing_segments_and_short_files_do_not_stop_the_reader(tmp_path):
    """A checkpoint naming a deleted segment, a gap in the numbering, a file
    shorter than what was written: reading goes on with what is there."""
    recs = _records(250, seed=8)
    log = _open(tmp_path)
    for n, e in recs:
        log.append([sp.encode_record(n, e)])
    segs = sp.list_segments(tmp_path)
    assert len(segs) >= 4
    counts = [sp.scan_segment(tmp_path / sp.segment_name(n)).records for n in segs]
    os.truncate(tmp_path / sp.segment_name(segs[2]), 100)  # shorter than written, while open
    got, corrupt = log.read(sp.Position(segs[2], sp.SEGMENT_HEADER_BYTES), 100 * MiB)
    assert corrupt is not None and corrupt.resume == sp.Position(segs[3], sp.SEGMENT_HEADER_BYTES)
    log.commit(sp.Position(segs[1], sp.SEGMENT_HEADER_BYTES))
    log.close()
    (tmp_path / sp.segment_name(segs[1])).unlink()
    (tmp_path / sp.segment_name(segs[2])).unlink()
    log = _open(tmp_path)  # the checkpoint's segment is gone
    assert log.checkpoint == sp.Position(segs[3], sp.SEGMENT_HEADER_BYTES)
    assert _read_all(log)[0] == recs[sum(counts[:3]):]
    log.close()


def test_a_spool_directory_is_used_by_one_process_at_a_time(tmp_path):
    log = _open(tmp_path)
    with pytest.raises(sp.SpoolError, match="in use by another eventbroker"):
        _open(tmp_path)
    log.close()
    _open(tmp_path).close()  # free again once closed


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    """Disk full halfway through a write: SpoolWriteFailed, the segment is cut
    back, and the next write (once there is room) lands cleanly."""
    log = _open(tmp_path)
    log.append([sp.encode_record(1, b"a" * 1000)])
    seg = tmp_path / sp.segment_name(0)
    size = seg.stat().st_size
    real_write = os.write
    calls = {"n": 0}

    def half_then_enospc(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sp.os, "write", half_then_enospc)
    with pytest.raises(sp.SpoolWriteFailed, match="No space left"):
        log.append([sp.encode_record(2, b"b" * 5000)])
    assert seg.stat().st_size == size
    assert log.stats.write_failures == 1
    monkeypatch.setattr(sp.os, "write", real_write)
    log.append([sp.encode_record(3, b"c" * 10)])
    assert _read_all(log)[0] == [(1, b"a" * 1000), (3, b"c" * 10)]
    log.close()


def test_check_directory_reports_and_repairs(tmp_path):
    log = _open(tmp_path)
    for n, e in _records(4):
        log.append([sp.encode_record(n, e)])
    log.close()
    with open(tmp_path / sp.segment_name(0), "ab") as f:
        f.write(b"\x00\x00\x10\x00partial")
    report = sp.check_directory(tmp_path)
    assert report["problems"] and "short record body" in report["problems"][0]
    assert report["pending_events"] == sum(n for n, _ in _records(4))
    report = sp.check_directory(tmp_path, repair=True)
    assert report["repaired"]
    assert not sp.check_directory(tmp_path)["problems"]


# --------------------------------------------------------------------------
# fuzzing the reader: whatever the disk holds, no crash, only clear answers

FUZZ = int(os.environ.get("EVENTBROKER_FUZZ_EXAMPLES", "0"))


def _fuzz_one(d: Path, blobs: list[bytes]) -> None:
    for f in d.glob("*"):
        f.unlink()
    for i, blob in enumerate(blobs):
        (d / sp.segment_name(i)).write_bytes(blob)
    sp.check_directory(d)
    try:
        log = _open(d)
    except sp.SpoolError:
        return
    try:
        pos = log.checkpoint
        for _ in range(10_000):
            recs, corrupt = log.read(pos, 64 * 1024)
            if corrupt is not None:
                pos = corrupt.resume
                continue
            if not recs:
                break
            for r in recs:
                assert r.end > pos
                pos = r.end
        log.append([sp.encode_record(1, b"after")])  # still writable
    finally:
        log.close()


def _valid_segment(rng: random.Random, number: int) -> bytes:
    out = sp.SEGMENT_HEADER.pack(sp.MAGIC, number)
    for n, e in _records(rng.randrange(0, 6), seed=rng.randrange(1 << 30)):
        out += sp.encode_record(n, e[:300])
    return out


def test_reader_survives_mutated_spools(tmp_path):
    """Valid segments with bytes flipped, cut, duplicated or replaced: opening,
    checking and reading never crash and never loop."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=FUZZ or 150, deadline=None, database=None)
    @given(st.integers(0, 2**32), st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "dup"]),
                                                     st.integers(0, 10**6), st.binary(max_size=40)), max_size=6),
           st.integers(1, 3))
    def check(seed, mutations, n_segments):
        rng = random.Random(seed)
        blobs = [bytearray(_valid_segment(rng, i)) for i in range(n_segments)]
        for op, at, data in mutations:
            b = blobs[at % n_segments]
            i = at % (len(b) + 1)
            if op == "flip" and b:
                b[i % len(b)] ^= 1 << (at % 8)
            elif op == "cut":
                del b[i:]
            elif op == "insert":
                b[i:i] = data
            else:
                b[i:i] = b[i : i + 40]
        _fuzz_one(tmp_path, [bytes(b) for b in blobs])

    check()


def test_reader_survives_arbitrary_bytes(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=FUZZ or 150, deadline=None, database=None)
    @given(st.lists(st.binary(max_size=400), min_size=1, max_size=3))
    def check(blobs):
        # A valid header half the time, so the record parser sees the bytes.
        _fuzz_one(tmp_path, [(sp.SEGMENT_HEADER.pack(sp.MAGIC, i) if i % 2 == 0 else b"") + b
                             for i, b in enumerate(blobs)])

    check()


# --------------------------------------------------------------------------
# the daemon with a spooled type, real broker


def _spool_types() -> dict[str, dict]:
    return {"audit": {"ack": "spool", "priority": "high"}, "play": {"priority": "critical"}}


async def _until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_spooled_type_is_acked_while_kafka_is_cut_off_and_delivered_after(tmp_path, proxied_broker):
    """Kafka unreachable (the daemon's connections cut by a proxy): the spooled
    type keeps being acknowledged, the Kafka-acked type is handed back; once
    the network heals, the spool goes out in full, in order per key."""
    proxy, broker = proxied_broker
    cfg = make_config(f"127.0.0.1:{proxy.port}", _spool_types(), spool={"dir": str(tmp_path / "spool")},
                      kafka={"stall_timeout_ms": 800, "retry_backoff_ms": 50, "retry_backoff_max_ms": 500,
                             "request_timeout_ms": 3000})
    d = Daemon(cfg)
    await d.start()
    try:
        lane = d.router.lanes["audit"]
        async with Producer(daemon_address(d), linger_ms=2) as p:
            proxy.cut()
            t0 = time.monotonic()
            futs = [await p.send("audit", b"a-%d" % i, key=b"k%d" % (i % 5)) for i in range(20_000)]
            await p.flush(timeout_s=30)
            ids = [f.result() for f in futs]  # every one persisted while Kafka is unreachable
            acked_s = time.monotonic() - t0
            play = await p.send("play", b"p")
            await asyncio.sleep(1.5)
            assert not play.done()  # the Kafka-acked type waits (handed back, resent)
            assert lane.forwarder.backlog_bytes > 0 and lane.forwarder.stats.events_forwarded == 0
            proxy.heal()
            await _until(lambda: lane.forwarder.backlog_bytes == 0, 60, "the spool to drain")
            await asyncio.wait_for(play, 30)
        stats = (lane.spool.stats.events_written, lane.forwarder.stats.events_forwarded,
                 lane.forwarder.stats.send_failures)
        await d.stop()
        # Read while the proxy runs: the broker advertises the proxy's address.
        got = await asyncio.get_running_loop().run_in_executor(
            None, read_topic, broker.bootstrap, cfg.types["audit"].topic, len(ids), 60.0)
    finally:
        await d.stop()
    found = [record_headers(m)["eb.id"] for m in got]
    print(f"\nspooled 20000 with Kafka cut off in {acked_s:.2f}s; written {stats[0]}, forwarded {stats[1]} "
          f"after healing ({stats[2]} failed sends retried), found {len(set(found))}, "
          f"duplicates {len(found) - len(set(found))}")
    assert set(found) == set(ids)
    # Per key (= per partition), the order of sending is kept.
    order = {eid: i for i, eid in enumerate(ids)}
    by_part: dict[int, list[int]] = {}
    for m in got:
        by_part.setdefault(m.partition(), []).append(order[record_headers(m)["eb.id"]])
    for seq in by_part.values():
        assert seq == sorted(seq)


def _write_conf(tmp_path: Path, cfg) -> Path:
    conf = tmp_path / "eb.toml"
    conf.write_bytes(msgspec.toml.encode(cfg))
    return conf


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_kill_9_daemon_with_spool_replays_on_restart(tmp_path, kafka_bootstrap):
    """kill -9 of the daemon while its spool holds undelivered events (Kafka
    cut off): the restarted daemon delivers them before anything new, nothing
    acknowledged is lost, and the SDK finishes with everything acknowledged."""
    # The forwarder is held to one small request at a time, so the spool
    # falls behind the producer and holds a backlog when the kill comes.
    cfg = make_config(kafka_bootstrap, {"audit": {"ack": "spool"}}, spool={"dir": str(tmp_path / "spool")},
                      kafka={"max_inflight_batches_per_type": 1, "batch_max_bytes": 4096})
    conf = _write_conf(tmp_path, cfg)
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: ASYNC230, SIM115 - closed below
    first = serve_daemon(conf, port, log)
    second = None
    total = 30_000
    try:
        async with Producer(f"127.0.0.1:{port}", linger_ms=2, reconnect_backoff_ms=(20, 300)) as p:
            futs: list[asyncio.Future[bytes]] = []

            async def produce() -> None:
                for i in range(total):
                    futs.append(await p.send("audit", b"event-%d" % i))
                    if i % 500 == 0:
                        await asyncio.sleep(0.001)

            acked_before: set[bytes] = set()

            async def kill_and_restart() -> None:
                nonlocal second, acked_before
                while sum(1 for f in futs if f.done()) < 10_000:
                    await asyncio.sleep(0.001)
                acked_before = {f.result() for f in futs if f.done() and not f.exception()}
                os.kill(first.pid, signal.SIGKILL)
                first.wait()
                report = sp.check_directory(tmp_path / "spool" / "audit")
                nonlocal_pending[0] = report["pending_events"]
                second = await asyncio.get_running_loop().run_in_executor(None, serve_daemon, conf, port, log)

            nonlocal_pending = [0]
            await asyncio.gather(produce(), kill_and_restart())
            await p.flush(timeout_s=120)
            ids = [f.result() for f in futs]
        assert second is not None
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        log.close()
    got = read_topic(kafka_bootstrap, cfg.types["audit"].topic, total, timeout_s=60)
    found = {record_headers(m)["eb.id"] for m in got}
    text = (tmp_path / "serve.log").read_text()
    print(f"\nsent {total}, acked before kill {len(acked_before)}, undelivered in the spool at the kill "
          f"{nonlocal_pending[0]} events, acked in the end {len(ids)}, found {len(found)}, "
          f"duplicates {len(got) - len(found)}")
    assert nonlocal_pending[0] > 0, "the spool was empty at the kill: the replay was not tested"
    assert "delivering them before new events" in text
    assert acked_before <= found
    assert found == set(ids)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_disk_full_answers_retry_later_and_never_half_acks(tmp_path, kafka_bootstrap):
    """The daemon may not grow a file past 256 KiB (RLIMIT_FSIZE, so the spool
    write fails like a full disk): the spooled type gets retry-later
    (spool_unavailable), the daemon stays up, the other type keeps being
    persisted, no half record is left, and after a restart without the limit
    every event is delivered."""
    cfg = make_config(kafka_bootstrap, _spool_types(), spool={"dir": str(tmp_path / "spool"), "segment_bytes": MiB},
                      kafka={"retry_backoff_ms": 100, "retry_backoff_max_ms": 300, "batch_max_bytes": 16384})
    conf = _write_conf(tmp_path, cfg)
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: ASYNC230, SIM115 - closed below

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
        [sys.executable, "-m", "eventbroker.cli", "serve", "--single-process", "--config", str(conf),
         "--listen", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_file_size)
    from eventbroker.embedded import wait_for_port

    wait_for_port("127.0.0.1", port, 60, proc)
    second = None
    try:
        # Small batches, so some parts fit whole before the file is full.
        async with Producer(f"127.0.0.1:{port}", linger_ms=2, reconnect_backoff_ms=(20, 300),
                            batch_max_bytes=8192) as p:
            audit = [await p.send("audit", os.urandom(100)) for _ in range(5000)]  # ~1.3 MB: does not fit
            play = [await p.send("play", b"p-%d" % i) for i in range(2000)]
            await asyncio.wait_for(asyncio.gather(*play), 30)  # the other type is not held up
            await asyncio.sleep(2)
            assert proc.poll() is None, "the daemon died on a full disk"
            acked = {f.result() for f in audit if f.done() and not f.exception()}
            waiting = sum(1 for f in audit if not f.done())
            retried = p.stats["retried"]
            assert 0 < len(acked) < len(audit) and waiting
            assert retried > 0  # the SDK got retry-later and keeps resending
            report = sp.check_directory(tmp_path / "spool" / "audit")
            assert not report["problems"], report["problems"]  # no half record on disk
            # Restart without the limit: the SDK reconnects and resends.
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            second = serve_daemon(conf, port, log)
            await p.flush(timeout_s=60)
            ids = [f.result() for f in audit]
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        for pr in (proc, second):
            if pr is not None and pr.poll() is None:
                pr.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "cannot write the spool" in text and "File too large" in text
    found = read_ids(kafka_bootstrap, cfg.types["audit"].topic, set(ids))
    print(f"\ndisk full: {len(acked)} of {len(audit)} acked before the disk filled, {waiting} waiting, "
          f"{retried} retry-later answers resent; after the restart {len(found)} of {len(ids)} in Kafka")
    assert acked <= found and found == set(ids)


# --------------------------------------------------------------------------
# offline tools


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eventbroker.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_spool_check_and_replay_commands(tmp_path, proxied_broker):
    """A daemon stops while Kafka is unreachable and its spool holds events;
    ``spool check`` reports them (and a torn tail, which ``--repair`` cuts),
    and ``spool replay`` delivers them without the daemon."""
    proxy, broker = proxied_broker
    spool_dir = tmp_path / "spool"
    cfg = make_config(f"127.0.0.1:{proxy.port}", {"audit": {"ack": "spool"}}, spool={"dir": str(spool_dir)},
                      server={"drain_timeout_ms": 300}, kafka={"request_timeout_ms": 2000})
    d = Daemon(cfg)
    await d.start()
    try:
        async with Producer(daemon_address(d)) as p:
            proxy.cut()
            futs = [await p.send("audit", b"offline-%d" % i) for i in range(3000)]
            await p.flush(timeout_s=30)
            ids = {f.result() for f in futs}
    finally:
        await d.stop()
    proxy.heal()
    conf = _write_conf(tmp_path, cfg)
    r = await asyncio.to_thread(_cli, "spool", "check", "--config", str(conf))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "audit: " in r.stdout and "3000 undelivered events" in r.stdout
    seg = max((spool_dir / "audit").glob("*.seg"))
    with open(seg, "ab") as f:  # noqa: ASYNC230 - a few bytes
        f.write(b"\x00\x00\x00\x40torn")
    r = await asyncio.to_thread(_cli, "spool", "check", "--dir", str(spool_dir))
    assert r.returncode == 1 and "problem:" in r.stdout and "short record body" in r.stdout
    r = await asyncio.to_thread(_cli, "spool", "check", "--dir", str(spool_dir), "--repair")
    assert r.returncode == 0 and "repaired:" in r.stdout, r.stdout
    r = await asyncio.to_thread(_cli, "spool", "replay", "--config", str(conf), "--kafka", broker.bootstrap)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "delivered 3000 events, 0 bytes left" in r.stdout
    r = await asyncio.to_thread(_cli, "spool", "check", "--config", str(conf))
    assert "0 undelivered events" in r.stdout
    found = await asyncio.to_thread(read_ids, broker.bootstrap, cfg.types["audit"].topic, ids)
    assert found == ids


def test_daemon_refuses_a_spool_directory_in_use(tmp_path, kafka_bootstrap):
    cfg = make_config(kafka_bootstrap, {"audit": {"ack": "spool"}}, spool={"dir": str(tmp_path / "spool")})
    held = _open(tmp_path / "spool" / "audit")
    try:
        conf = _write_conf(tmp_path, cfg)
        r = _cli("serve", "--single-process", "--config", str(conf), "--listen", f"127.0.0.1:{free_port()}",
                 timeout=60)
        assert r.returncode == 1
        assert "spool directory is in use by another eventbroker process" in r.stderr
    finally:
        held.close()


# --------------------------------------------------------------------------
# the forwarder and the spool lane with fake sinks (exact failure timing)


def _tagged_entry(tag: bytes) -> bytes:
    tail = b"TAG" + tag
    return struct.pack(">IIIIQ", len(tail), 0, 0, 0, 0) + tail


class _FlakySink:
    """Records what arrives in order; fails the first send of one record."""

    builds_batches = True

    def __init__(self, fail_tag: bytes, error: Exception, times: int = 1) -> None:
        self.arrived: list[bytes] = []
        self.fail_tag, self.error, self.times = fail_tag, error, times

    async def partitions(self, topic: str) -> int:
        return 1

    async def send(self, topic, batches) -> None:
        data = batches[0][1]
        i = data.find(b"TAG")
        tag = data[i + 3 : i + 6]
        if tag == self.fail_tag and self.times:
            self.times -= 1
            await asyncio.sleep(0.05)
            raise self.error
        await asyncio.sleep(0.001)
        self.arrived.append(tag)


def _forward(tmp_path: Path, sink, n: int = 6):
    from eventbroker.config import EventType, KafkaConfig
    from eventbroker.spool_lane import Forwarder

    async def go():
        log = _open(tmp_path, fsync="never")
        for i in range(n):
            log.append([sp.encode_record(1, _tagged_entry(b"%03d" % i))])
        et = EventType(name="t", topic="t", priority="normal", max_event_bytes=MiB, partitioning="spread",
                       ring_bytes=MiB, enabled=True, ack="spool")
        f = Forwarder(log, et, sink, KafkaConfig(retry_backoff_ms=10, max_inflight_batches_per_type=4))
        f.start()
        await f.stop(time.monotonic() + 5)
        log.close()
        return f

    return asyncio.run(go())


def test_forwarder_keeps_log_order_through_a_failed_send(tmp_path):
    sink = _FlakySink(b"000", RuntimeError("broker gone"))
    f = _forward(tmp_path, sink)
    assert sink.arrived == [b"%03d" % i for i in range(6)]
    assert f.stats.send_failures == 1 and f.stats.events_forwarded == 6
    assert sp.read_checkpoint(tmp_path) == f.delivered and f.backlog_bytes == 0


def test_a_record_kafka_refuses_for_good_goes_to_dead_letter(tmp_path):
    """MESSAGE_TOO_LARGE for one record: it is kept in dead-letter/ in the
    spool's record format, and the records behind it are delivered."""
    from eventbroker.sinks import ProduceFailed

    sink = _FlakySink(b"002", ProduceFailed("t", {0: "too large"}, {0: 10}), times=99)
    f = _forward(tmp_path, sink)
    assert sink.arrived == [b"000", b"001", b"003", b"004", b"005"]
    assert f.stats.dead_lettered_events == 1 and f.stats.events_forwarded == 5
    dead = list((tmp_path / "dead-letter").glob("*.rec"))
    assert len(dead) == 1
    n, entries, end = sp.parse_record(dead[0].read_bytes(), 0)
    assert n == 1 and bytes(entries) == _tagged_entry(b"002")
    assert sp.check_directory(tmp_path)["dead_letter_records"] == 1


def test_a_hung_spool_write_hands_events_back_as_spool_unavailable(tmp_path):
    """A write stuck longer than stall_timeout_ms: the type's producers are
    answered retry-later spool_unavailable, not kafka_unavailable."""
    from eventbroker.config import KafkaConfig, ServerConfig, SpoolConfig
    from eventbroker.protocol import Reason
    from eventbroker.router import Router
    from eventbroker.sinks import NullSink

    answers: list[tuple[str, int]] = []

    class Target:
        closed = False

        def part_persisted(self, seq, ti, count):
            answers.append(("persisted", 0))

        def part_retry(self, seq, ti, count, reason, retry_ms):
            answers.append(("retry", reason))

    async def go():
        from conftest import make_config

        cfg = make_config("unused:1", {"audit": {"ack": "spool"}})
        from eventbroker.config import resolve_types

        router = Router(resolve_types(cfg), NullSink(), KafkaConfig(stall_timeout_ms=200), ServerConfig(),
                        SpoolConfig(dir=str(tmp_path)))
        lane = router.lanes["audit"]
        real_append = lane.spool.append

        def slow_append(*a):
            time.sleep(0.8)
            return real_append(*a)

        lane.spool.append = slow_append
        router.start()
        import test_fastpath as tf

        tf.ingest_events(router.core, [("audit", b"i" * 16, 1, None, b"payload")], now_ms=2)
        lane.add_segment(Target(), 1, 0, 1)
        await asyncio.sleep(1.2)
        await router.stop(time.monotonic() + 1)
        return lane

    lane = asyncio.run(go())
    assert answers == [("retry", Reason.SPOOL_UNAVAILABLE)]
    assert lane.stats.sheds == 1


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_a_spooled_type_removed_and_added_back_keeps_its_spool(tmp_path, proxied_broker):
    """Kafka cut off; the spooled type is removed by a reload while its spool
    holds acknowledged events (it keeps them), then added back by another
    reload before they were delivered: the same lane returns, takes events
    again, and everything reaches Kafka once the network heals."""
    proxy, broker = proxied_broker
    prefix = "a" + os.urandom(4).hex()
    with_audit = make_config(f"127.0.0.1:{proxy.port}", {"play": {}, "audit": {"ack": "spool"}}, prefix=prefix,
                             spool={"dir": str(tmp_path / "spool")}, kafka={"request_timeout_ms": 2000})
    without = make_config(f"127.0.0.1:{proxy.port}", {"play": {}}, prefix=prefix,
                          spool={"dir": str(tmp_path / "spool")}, kafka={"request_timeout_ms": 2000})
    conf = _write_conf(tmp_path, with_audit)
    d = Daemon(with_audit, config_path=str(conf))
    await d.start()
    try:
        async with Producer(daemon_address(d), linger_ms=1) as p:
            proxy.cut()
            ids = {await f for f in [await p.send("audit", b"before-%d" % i) for i in range(1000)]}
            lane = d.router.lanes["audit"]
            _write_conf(tmp_path, without)
            ok, msg = await d.reload()
            assert ok and "removed type audit" in msg
            with pytest.raises(Exception, match="unknown_type"):
                await (await p.send("audit", b"while removed"))
            assert lane.forwarder.backlog_bytes > 0  # still holds what it acknowledged
            _write_conf(tmp_path, with_audit)
            ok, msg = await d.reload()
            assert ok and "back before its spool was delivered" in msg, msg
            assert d.router.lanes["audit"] is lane
            ids |= {await f for f in [await p.send("audit", b"after-%d" % i) for i in range(1000)]}
            proxy.heal()
            await _until(lambda: lane.forwarder.backlog_bytes == 0, 60, "the spool to drain")
        await d.stop()
        found = await asyncio.to_thread(read_ids, broker.bootstrap, with_audit.types["audit"].topic, ids, 60)
    finally:
        await d.stop()
    assert found == ids and len(ids) == 2000
