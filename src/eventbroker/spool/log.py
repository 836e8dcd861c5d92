"""The disk spool: one append-only log per event type, on local disk.

A type with ``ack = "spool"`` writes every event here before it is
acknowledged, and a forwarder (``forwarder.py``) delivers the log to Kafka in
order, from a checkpoint that survives restarts. The format is documented in
docs/reliability.md; in short:

- ``<spool.dir>/<type>/`` holds segment files ``<20-digit number>.seg``, a
  checkpoint file ``forwarded`` and a ``lock`` file (flock: one process per
  directory).
- A segment starts with a 16-byte header: ``EBSPOOL1`` and its number (u64 BE).
- Then records: ``u32 body length | u32 CRC-32C of the body | body``, where the
  body is ``u32 event count | ring entries`` (``TypeRing.take_entries``): the
  entries are partition-independent, so batches are built for whatever
  partitions the topic has when the record is delivered.
- ``forwarded`` holds ``u64 segment | u64 offset | u32 CRC-32C`` of the first
  record not yet delivered; it is replaced atomically (write, rename).

A crash can tear only the tail of the newest segment: on open that tail is
found (short header, short body or checksum mismatch), truncated, counted and
logged. A bad record anywhere else (bit rot) is found when it is read: the
rest of that segment is skipped, counted and logged as an error.

The methods here do blocking file I/O; the lane runs them in its own threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from eventbroker import _fastpath as fp
from eventbroker.errors import SpoolError, SpoolLocked, SpoolWriteFailed

log = logging.getLogger("eventbroker.spool")

MAGIC = b"EBSPOOL1"
SEGMENT_HEADER = struct.Struct(">8sQ")
SEGMENT_HEADER_BYTES = SEGMENT_HEADER.size  # 16
RECORD_HEADER = struct.Struct(">II")  # body length, CRC-32C of the body
RECORD_HEADER_BYTES = RECORD_HEADER.size  # 8
COUNT = struct.Struct(">I")
CHECKPOINT = struct.Struct(">QQI")
MAX_RECORD_BYTES = 256 * 1024 * 1024
FSYNC_POLICIES = ("always", "interval", "never")


class Position(NamedTuple):
    segment: int
    offset: int


class Record(NamedTuple):
    n_events: int
    entries: memoryview
    end: Position  # where the next record starts


class Corrupt(NamedTuple):
    at: Position
    reason: str
    resume: Position  # where reading goes on
    skipped_bytes: int


def segment_name(number: int) -> str:
    return f"{number:020d}.seg"


def record_prefix(n_events: int, entries: bytes) -> bytes:
    """The 12 bytes that go before ``entries`` in a record (no copy of the entries)."""
    count = COUNT.pack(n_events)
    return RECORD_HEADER.pack(COUNT.size + len(entries), fp.crc32c(entries, fp.crc32c(count))) + count


def encode_record(n_events: int, entries: bytes) -> bytes:
    return record_prefix(n_events, entries) + entries


def parse_record(buf: bytes | memoryview, pos: int) -> tuple[int, memoryview, int] | str:
    """The record at ``pos``: ``(n_events, entries, end)``, or why it is not one."""
    view = memoryview(buf)
    left = len(view) - pos
    if left < RECORD_HEADER_BYTES:
        return f"short record header ({left} of {RECORD_HEADER_BYTES} bytes)"
    length, crc = RECORD_HEADER.unpack_from(view, pos)
    if length < COUNT.size or length > MAX_RECORD_BYTES:
        return f"record length {length} out of range"
    if left - RECORD_HEADER_BYTES < length:
        return f"short record body ({left - RECORD_HEADER_BYTES} of {length} bytes)"
    body = view[pos + RECORD_HEADER_BYTES : pos + RECORD_HEADER_BYTES + length]
    if fp.crc32c(body) != crc:
        return "checksum mismatch"
    (n_events,) = COUNT.unpack_from(body)
    return n_events, body[COUNT.size :], pos + RECORD_HEADER_BYTES + length


@dataclass
class SegmentScan:
    """What ``scan_segment`` found in one segment file."""

    path: Path
    number: int
    size: int
    records: int = 0
    events: int = 0
    valid_end: int = SEGMENT_HEADER_BYTES  # where parsing stopped (== size when it reached the end)
    problem: str = ""  # why parsing stopped before the end; empty: it did not
    # Whole records whose checksum failed (length plausible, next record
    # parses): skipped one by one, the records around them are kept.
    damaged: list[tuple[int, int]] = field(default_factory=list)  # (offset, bytes)


def scan_segment(path: Path, expect_number: int | None = None) -> SegmentScan:
    data = path.read_bytes()
    number = expect_number if expect_number is not None else -1
    scan = SegmentScan(path, number, len(data))
    if len(data) < SEGMENT_HEADER_BYTES:
        scan.valid_end = 0
        scan.problem = f"short segment header ({len(data)} of {SEGMENT_HEADER_BYTES} bytes)"
        return scan
    magic, num = SEGMENT_HEADER.unpack_from(data)
    if magic != MAGIC:
        scan.valid_end = 0
        scan.problem = f"not a spool segment (magic {magic!r})"
        return scan
    if expect_number is not None and num != expect_number:
        scan.valid_end = 0
        scan.problem = f"header says segment {num}, file name says {expect_number}"
        return scan
    scan.number = num
    pos = SEGMENT_HEADER_BYTES
    while pos < len(data):
        r = parse_record(data, pos)
        if isinstance(r, str):
            end = _damaged_record_end(data, pos, r)
            if end is None:  # the segment cannot be parsed past here
                scan.problem = f"{r} at byte {pos}"
                break
            scan.damaged.append((pos, end - pos))
            pos = end
            continue
        scan.records += 1
        scan.events += r[0]
        pos = r[2]
    scan.valid_end = pos
    return scan


def _damaged_record_end(data: bytes | memoryview, pos: int, why: str) -> int | None:
    """Where a record that failed its checksum ends, if reading can go on there:
    its length was plausible and a record (or the end of the data) follows."""
    if why != "checksum mismatch":
        return None
    (length, _) = RECORD_HEADER.unpack_from(data, pos)
    end = pos + RECORD_HEADER_BYTES + length
    if end == len(data):
        return None  # the last record: a torn tail, not a damaged record
    return end if not isinstance(parse_record(data, end), str) else None


def cut_segment(path: Path, number: int, valid_end: int) -> int:
    """Truncate a segment after its last good byte (rewriting its header if
    even that is bad); returns its new size."""
    if valid_end < SEGMENT_HEADER_BYTES:
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(SEGMENT_HEADER.pack(MAGIC, number))
        return SEGMENT_HEADER_BYTES
    os.truncate(path, valid_end)
    return valid_end


def list_segments(directory: Path) -> list[int]:
    out = []
    for p in directory.iterdir():
        if p.suffix == ".seg" and p.stem.isdigit() and len(p.stem) == 20:
            out.append(int(p.stem))
    return sorted(out)


def read_checkpoint(directory: Path) -> Position | None:
    """The first undelivered position, or None when there is no checkpoint.

    Raises SpoolError when the file exists but is damaged."""
    p = directory / "forwarded"
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != CHECKPOINT.size:
        raise SpoolError(f"{p}: {len(data)} bytes, expected {CHECKPOINT.size}")
    seg, off, crc = CHECKPOINT.unpack(data)
    if fp.crc32c(data[:16]) != crc:
        raise SpoolError(f"{p}: checksum mismatch")
    return Position(seg, off)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class SpoolStats:
    records_written: int = 0
    events_written: int = 0
    bytes_written: int = 0
    write_failures: int = 0
    fsyncs: int = 0
    torn_tails_truncated: int = 0
    torn_bytes_truncated: int = 0
    corrupt_records: int = 0
    corrupt_bytes_skipped: int = 0
    last_error: str = ""


class SpoolLog:
    """One type's segment log: append on one thread, read on another."""

    def __init__(self, directory: Path, *, segment_bytes: int, fsync: str, name: str = "") -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}")
        self.directory = directory
        self.name = name or directory.name
        self.segment_bytes = segment_bytes
        self.fsync_policy = fsync
        self.stats = SpoolStats()
        self.checkpoint = Position(0, SEGMENT_HEADER_BYTES)
        # Bytes written per segment. Set by the writer thread after the bytes
        # are in the file, so a reader never goes past what was written.
        self._sizes: dict[int, int] = {}
        self._active = -1
        self._fd = -1
        self._lock_fd = -1
        self._dirty = False
        self._write_lock = threading.Lock()
        self.broken = ""  # set when the log cannot be appended to safely any more

    # opening and closing

    def open(self) -> None:
        d = self.directory
        try:
            d.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SpoolError(f"{d}: cannot use spool directory: {e.strerror or e}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise SpoolLocked(f"{d}: spool directory is in use by another eventbroker process") from None
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    def _recover(self) -> None:
        d = self.directory
        segments = list_segments(d)
        try:
            cp = read_checkpoint(d)
        except SpoolError as e:
            log.error("type %s: %s; delivering the whole spool again (duplicates possible)", self.name, e)
            cp = None
        if cp is None:
            cp = Position(segments[0], SEGMENT_HEADER_BYTES) if segments else Position(0, SEGMENT_HEADER_BYTES)
        for n in segments:
            if n < cp.segment:  # delivered before the last checkpoint: deletion was cut short
                (d / segment_name(n)).unlink(missing_ok=True)
        segments = [n for n in segments if n >= cp.segment]
        if segments and cp.segment < segments[0]:
            # The checkpoint's segment is gone (deleted by hand, or a crash
            # kept the deletions but not the new checkpoint): start at the
            # oldest segment there is.
            log.warning("type %s: checkpoint %s names a missing segment; delivering from segment %d",
                        self.name, cp, segments[0])
            cp = Position(segments[0], SEGMENT_HEADER_BYTES)
        for n in segments:
            path = d / segment_name(n)
            scan = scan_segment(path, n)
            if scan.damaged:
                self.stats.corrupt_records += len(scan.damaged)
                self.stats.corrupt_bytes_skipped += sum(b for _, b in scan.damaged)
                log.error("type %s: spool segment %s has %d damaged record(s) (checksum mismatch); "
                          "they will be skipped, the records around them delivered", self.name, path,
                          len(scan.damaged))
            if scan.problem and n == segments[-1]:
                # A crash can only tear the end of the newest segment.
                lost = scan.size - scan.valid_end
                self.stats.torn_tails_truncated += 1
                self.stats.torn_bytes_truncated += lost
                log.warning("type %s: spool segment %s has a torn tail (%s); truncated %d bytes",
                            self.name, path, scan.problem, lost)
                self._sizes[n] = cut_segment(path, n, scan.valid_end)
            else:
                if scan.problem:  # an older segment: left as it is; the reader skips what is bad
                    log.error("type %s: spool segment %s is damaged (%s); the %d bytes after it will be skipped",
                              self.name, path, scan.problem, scan.size - scan.valid_end)
                self._sizes[n] = scan.size
        if cp.segment in self._sizes and cp.offset > self._sizes[cp.segment]:
            log.error("type %s: checkpoint %s is past the end of its segment; delivering from its start",
                      self.name, cp)
            cp = Position(cp.segment, SEGMENT_HEADER_BYTES)
        self.checkpoint = cp
        if segments:
            self._active = segments[-1]
            self._fd = os.open(d / segment_name(self._active), os.O_WRONLY | os.O_APPEND)
        else:
            self._new_segment(max(cp.segment, 0))
        if self.pending_bytes:
            log.info("type %s: spool %s holds %d undelivered bytes; delivering them before new events",
                     self.name, d, self.pending_bytes)

    def close(self) -> None:
        if self._fd >= 0:
            if self._dirty and self.fsync_policy != "never":
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # writing (one writer thread)

    def _new_segment(self, number: int) -> None:
        path = self.directory / segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            os.write(fd, SEGMENT_HEADER.pack(MAGIC, number))
            if self.fsync_policy != "never":
                os.fsync(fd)
                _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._active = number
        self._sizes[number] = SEGMENT_HEADER_BYTES

    def append(self, records: list[bytes], n_records: int | None = None) -> int:
        """Write records as one write; fsync per policy.

        ``records`` are encoded records (``encode_record``), or their pieces
        (``record_prefix`` and the entries) with ``n_records`` saying how many
        records they make. All or nothing: on an error the segment is cut back
        to where it was and SpoolWriteFailed is raised. Returns the bytes written."""
        data = b"".join(records)
        if n_records is None:
            n_records = len(records)
        with self._write_lock:
            if self.broken:
                raise SpoolWriteFailed(self.directory, OSError(errno.EIO, self.broken))
            path = self.directory / segment_name(self._active)
            try:
                if self._sizes[self._active] + len(data) > self.segment_bytes and \
                        self._sizes[self._active] > SEGMENT_HEADER_BYTES:
                    if self._dirty and self.fsync_policy != "never":
                        os.fsync(self._fd)
                        self._dirty = False
                    self._new_segment(self._active + 1)
                    path = self.directory / segment_name(self._active)
            except OSError as e:
                self.stats.write_failures += 1
                self.stats.last_error = str(e)
                raise SpoolWriteFailed(path, e) from None
            start = self._sizes[self._active]
            try:
                written = 0
                view = memoryview(data)
                while written < len(data):
                    n = os.write(self._fd, view[written:])
                    if n == 0:
                        raise OSError(errno.ENOSPC, "no progress writing to the spool")
                    written += n
                if self.fsync_policy == "always":
                    os.fsync(self._fd)
                    self.stats.fsyncs += 1
                else:
                    self._dirty = True
            except OSError as e:
                self.stats.write_failures += 1
                self.stats.last_error = str(e)
                try:
                    os.ftruncate(self._fd, start)
                except OSError as e2:
                    # Part of a record stays in the file: appending after it
                    # would put acknowledged records behind garbage.
                    self.broken = f"cannot cut back a failed write ({e2.strerror}); restart to recover"
                raise SpoolWriteFailed(path, e) from None
            self._sizes[self._active] = start + len(data)
            self.stats.records_written += n_records
            self.stats.bytes_written += len(data)
            return len(data)

    def sync(self) -> None:
        """fsync the active segment if anything was written since the last one."""
        with self._write_lock:
            if self._dirty and self._fd >= 0:
                os.fsync(self._fd)
                self._dirty = False
                self.stats.fsyncs += 1

    # reading (one reader thread)

    @property
    def end(self) -> Position:
        return Position(self._active, self._sizes.get(self._active, SEGMENT_HEADER_BYTES))

    @property
    def pending_bytes(self) -> int:
        """Bytes written after the checkpoint."""
        return self.bytes_after(self.checkpoint)

    def bytes_after(self, cp: Position) -> int:
        total = 0
        for n, size in list(self._sizes.items()):
            if n > cp.segment:
                total += size - SEGMENT_HEADER_BYTES
            elif n == cp.segment:
                total += max(0, size - cp.offset)
        return total

    def _next_segment(self, after: int) -> int | None:
        later = [n for n in list(self._sizes) if n > after]
        return min(later) if later else None

    def _resume_after_damage(self, segment: int, size: int) -> Position:
        nxt = self._next_segment(segment)
        return Position(nxt, SEGMENT_HEADER_BYTES) if nxt is not None else Position(segment, size)

    def read(self, pos: Position, max_bytes: int) -> tuple[list[Record], Corrupt | None]:
        """Records from ``pos`` on, about ``max_bytes`` of them, never past what was written.

        Returns the records and, when one did not parse, where and why, and
        where reading goes on: after that record when only its checksum
        failed, else at the next segment (the rest of this one cannot be
        parsed)."""
        out: list[Record] = []
        total = 0
        while total < max_bytes:
            size = self._sizes.get(pos.segment)
            if size is None or pos.offset >= size:
                nxt = self._next_segment(pos.segment)
                if nxt is not None:
                    pos = Position(nxt, SEGMENT_HEADER_BYTES)
                    continue
                break
            avail = size - pos.offset
            try:
                with open(self.directory / segment_name(pos.segment), "rb") as f:
                    f.seek(pos.offset)
                    buf = f.read(min(avail, max(max_bytes - total, 64 * 1024)))
                    if len(buf) >= RECORD_HEADER_BYTES:  # make sure the first record is whole
                        (length, _) = RECORD_HEADER.unpack_from(buf)
                        need = RECORD_HEADER_BYTES + length
                        if length <= MAX_RECORD_BYTES and len(buf) < need <= avail:
                            buf += f.read(need - len(buf))
            except FileNotFoundError:
                buf = b""
            view = memoryview(buf)
            at = 0
            while at < len(view):
                r = parse_record(view, at)
                if isinstance(r, str):
                    if at and r.startswith("short") and pos.offset + len(view) < size:
                        break  # the record goes on past this read: read again from it
                    bad = Position(pos.segment, pos.offset + at)
                    if r == "checksum mismatch":
                        (length, _) = RECORD_HEADER.unpack_from(view, at)
                        skip = RECORD_HEADER_BYTES + length
                        return out, Corrupt(bad, r, Position(pos.segment, bad.offset + skip), skip)
                    return out, Corrupt(bad, r, self._resume_after_damage(pos.segment, size), size - bad.offset)
                n_events, entries, end = r
                out.append(Record(n_events, entries, Position(pos.segment, pos.offset + end)))
                total += end - at
                at = end
            if at == 0:  # the file is shorter than what was written to it
                reason = f"segment ends at byte {pos.offset + len(view)}, expected {size}"
                return out, Corrupt(pos, reason, self._resume_after_damage(pos.segment, size), size - pos.offset)
            pos = Position(pos.segment, pos.offset + at)
        return out, None

    def commit(self, pos: Position) -> None:
        """Record that everything before ``pos`` was delivered; delete delivered segments."""
        body = struct.pack(">QQ", pos.segment, pos.offset)
        data = body + struct.pack(">I", fp.crc32c(body))
        tmp = self.directory / "forwarded.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync_policy != "never":
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.directory / "forwarded")
        if self.fsync_policy != "never":
            _fsync_dir(self.directory)  # the rename before the deletions below
        self.checkpoint = pos
        for n in sorted(self._sizes):
            if n < pos.segment:
                (self.directory / segment_name(n)).unlink(missing_ok=True)
                del self._sizes[n]


def write_dead_letter(type_dir: Path, at: Position, record: bytes) -> Path:
    """Keep a record Kafka refuses for good (too large, corrupt) out of the way:
    ``dead-letter/<segment>-<offset>.rec`` holds it in the spool's record format."""
    d = type_dir / "dead-letter"
    d.mkdir(exist_ok=True)
    path = d / f"{at.segment:020d}-{at.offset:012d}.rec"
    with open(path, "wb") as f:
        f.write(record)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(d)
    return path


def check_directory(type_dir: Path, repair: bool = False) -> dict:
    """Inspect (and with ``repair``, truncate) one type's spool directory offline."""
    dead = sorted((type_dir / "dead-letter").glob("*.rec")) if (type_dir / "dead-letter").is_dir() else []
    report: dict = {"type": type_dir.name, "dir": str(type_dir), "segments": [], "problems": [],
                    "pending_events": 0, "pending_bytes": 0, "repaired": [],
                    "dead_letter_records": len(dead)}
    try:
        cp = read_checkpoint(type_dir)
    except SpoolError as e:
        report["problems"].append(str(e))
        cp = None
    report["checkpoint"] = list(cp) if cp else None
    for n in list_segments(type_dir):
        path = type_dir / segment_name(n)
        scan = scan_segment(path, n)
        delivered = cp is not None and n < cp.segment
        report["segments"].append({
            "file": path.name, "bytes": scan.size, "records": scan.records, "events": scan.events,
            "delivered": delivered, "problem": scan.problem, "damaged_records": len(scan.damaged),
        })
        for off, nbytes in scan.damaged:
            report["problems"].append(f"{path}: damaged record (checksum mismatch) at byte {off}, {nbytes} bytes; "
                                      "the daemon skips it and delivers the records around it")
        if not delivered:
            start = cp.offset if cp is not None and n == cp.segment else SEGMENT_HEADER_BYTES
            report["pending_bytes"] += max(0, scan.valid_end - start)
            if start == SEGMENT_HEADER_BYTES:
                report["pending_events"] += scan.events
            else:  # count only the records after the checkpoint
                data = path.read_bytes()
                pos = start
                while pos < scan.valid_end:
                    r = parse_record(data, pos)
                    if isinstance(r, str):
                        break
                    report["pending_events"] += r[0]
                    pos = r[2]
        if scan.problem:
            report["problems"].append(f"{path}: {scan.problem} ({scan.size - scan.valid_end} bytes after it)")
            if repair:
                report["repaired"].append(f"{path}: truncated to {cut_segment(path, n, scan.valid_end)} bytes")
    return report


def lock_for_offline_use(type_dir: Path) -> int:
    """Take the directory's lock, or raise SpoolLocked when a daemon holds it."""
    fd = os.open(type_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SpoolLocked(f"{type_dir}: in use by a running eventbroker; stop it first") from None
    return fd
