"""Wire protocol v1: constants, the per-frame (not per-event) codecs, addresses.

The byte-level specification is docs/protocol.md. Every constant comes from
the native core (``_native/consts.pxi``), its one source. Event batches are
encoded and decoded in ``_fastpath`` (``BatchEncoder``,
``BatchSplitter.ingest``); this module handles the control frames (handshake,
acks, heartbeats, goaway, errors) and carries a plain reference decoder for
batches that tests and tools use. Producers (the SDK) and the gateway both
build on it, so it imports nothing above ``errors``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

import cramjam

import eventbroker._fastpath as fp
from eventbroker.errors import ProtocolError

MAGIC: bytes = fp.MAGIC
PROTOCOL_VERSION: int = fp.PROTOCOL_VERSION
FRAME_HEADER_BYTES: int = fp.FRAME_HEADER_BYTES
EVENT_HEADER_BYTES: int = fp.EVENT_HEADER_BYTES  # per event, besides its key and payload
MAX_CLIENT_ID_BYTES: int = fp.MAX_CLIENT_ID_BYTES
MAX_TYPE_NAME_BYTES: int = fp.MAX_TYPE_NAME_BYTES
MAX_KEY_BYTES: int = fp.MAX_KEY_BYTES
MAX_TYPES_PER_BATCH: int = fp.MAX_TYPES_PER_BATCH
TYPE_NAME_PATTERN: str = fp.TYPE_NAME_PATTERN  # the names a gateway can be configured with
# A batch of one event with the longest type name, besides its key and
# payload: batch_seq, type_count, the name entry, event_count, event header.
MAX_EVENT_FRAMING_BYTES: int = 8 + 2 + 1 + MAX_TYPE_NAME_BYTES + 4 + EVENT_HEADER_BYTES
# The largest HELLO body: magic, version, flags, client_id and auth at their longest.
MAX_HELLO_BYTES: int = 4 + 2 + 2 + 2 + MAX_CLIENT_ID_BYTES + 2 + 65535
# Kafka record headers the gateway writes with every event.
HEADER_EVENT_ID: bytes = fp.HEADER_EVENT_ID
HEADER_EVENT_TYPE: bytes = fp.HEADER_EVENT_TYPE
HEADER_TIMESTAMP: bytes = fp.HEADER_TIMESTAMP
HEADER_RECEIVED: bytes = fp.HEADER_RECEIVED
HEADER_SCHEMA_VERSION: bytes = fp.HEADER_SCHEMA_VERSION
HEADER_ERROR: bytes = fp.HEADER_ERROR

# Where producers find a gateway unless told otherwise (server.listen's default too).
DEFAULT_LISTEN = "127.0.0.1:7480"

encode_frame = fp.encode_frame


class FrameType(IntEnum):
    HELLO = fp.FRAME_HELLO
    WELCOME = fp.FRAME_WELCOME
    EVENT_BATCH = fp.FRAME_EVENT_BATCH
    ACK = fp.FRAME_ACK
    HEARTBEAT = fp.FRAME_HEARTBEAT
    GOAWAY = fp.FRAME_GOAWAY
    ERROR = fp.FRAME_ERROR


class ErrorCode(IntEnum):
    """Codes of the fatal ERROR frame; the server closes the connection after it."""

    BAD_CHECKSUM = fp.ERR_BAD_CHECKSUM
    FRAME_TOO_LARGE = fp.ERR_FRAME_TOO_LARGE
    MALFORMED_FRAME = fp.ERR_MALFORMED_FRAME
    UNKNOWN_FRAME_TYPE = fp.ERR_UNKNOWN_FRAME_TYPE
    BAD_HANDSHAKE = fp.ERR_BAD_HANDSHAKE
    UNSUPPORTED_VERSION = fp.ERR_UNSUPPORTED_VERSION
    AUTH_FAILED = fp.ERR_AUTH_FAILED
    TOO_MANY_EVENTS = fp.ERR_TOO_MANY_EVENTS
    TRUNCATED_STREAM = fp.ERR_TRUNCATED_STREAM
    UNEXPECTED_FRAME = fp.ERR_UNEXPECTED_FRAME
    INTERNAL = fp.ERR_INTERNAL
    CONNECTION_LIMIT = fp.ERR_CONNECTION_LIMIT
    TIMEOUT = fp.ERR_TIMEOUT
    ADDRESS_LOCKED_OUT = fp.ERR_ADDRESS_LOCKED_OUT  # retryable: wait retry_after_ms


class Status(IntEnum):
    PERSISTED = fp.STATUS_PERSISTED
    REJECTED = fp.STATUS_REJECTED
    RETRY_LATER = fp.STATUS_RETRY_LATER


class Reason(IntEnum):
    NONE = fp.REASON_NONE
    UNKNOWN_TYPE = fp.REASON_UNKNOWN_TYPE
    TOO_LARGE = fp.REASON_TOO_LARGE
    DISABLED = fp.REASON_DISABLED
    INVALID = fp.REASON_INVALID
    FORBIDDEN = fp.REASON_FORBIDDEN
    INVALID_TYPE_NAME = fp.REASON_INVALID_TYPE_NAME
    INVALID_TIMESTAMP = fp.REASON_INVALID_TIMESTAMP
    OVERLOADED = fp.REASON_OVERLOADED
    KAFKA_UNAVAILABLE = fp.REASON_KAFKA_UNAVAILABLE
    SHUTTING_DOWN = fp.REASON_SHUTTING_DOWN
    SPOOL_UNAVAILABLE = fp.REASON_SPOOL_UNAVAILABLE
    KEY_UNAVAILABLE = fp.REASON_KEY_UNAVAILABLE
    SCHEMA_VIOLATION = fp.REASON_SCHEMA_VIOLATION
    UNKNOWN_SCHEMA_VERSION = fp.REASON_UNKNOWN_SCHEMA_VERSION


class GoawayReason(IntEnum):
    SHUTTING_DOWN = fp.GOAWAY_SHUTTING_DOWN
    REBALANCE = fp.GOAWAY_REBALANCE


def parse_host_port(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Parse ``host:port`` (``[v6]:port`` too), the form of every eventbroker
    address (listener, admin endpoint, the SDK's server list); raises
    ValueError with the reason."""
    host, sep, port_s = value.rpartition(":")
    if not sep:
        raise ValueError(f"{value!r} is not HOST:PORT")
    host = host.strip("[]") or default_host
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"{value!r}: port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r}: port out of range")
    return host, port


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return str(code)


def reason_name(code: int) -> str:
    try:
        return Reason(code).name.lower()
    except ValueError:
        return f"reason_{code}"


# HELLO flags bit: the producer reads rejection details after an ACK's
# entries; WELCOME flags bit: the server sends them (docs/protocol.md 4.4).
FLAG_REJECTION_DETAILS = 0x0001
MAX_DETAIL_BYTES = 200

# HELLO flags bits: the producer asks to send compressed EVENT_BATCH bodies
# with this codec (one of them); WELCOME flags bit: the server accepts it.
# Such a frame has FRAME_FLAG_COMPRESSED in its header's flags byte, and its
# body is u32 body_length, then the codec's output (docs/protocol.md 4.3.1).
FLAG_COMPRESS_ZSTD = 0x0002  # a zstd frame
FLAG_COMPRESS_LZ4 = 0x0004  # an LZ4 block (no frame around it)
CONNECTION_CODECS = {"zstd": FLAG_COMPRESS_ZSTD, "lz4": FLAG_COMPRESS_LZ4}
FRAME_FLAG_COMPRESSED = fp.COMPRESSED_FRAME_FLAG
_COMPRESSED_HEAD = struct.Struct(">I")


def compress_batch_frame(frame: bytes, codec_flag: int) -> bytes:
    """An EVENT_BATCH frame as sent on a connection that negotiated
    ``codec_flag``: compressed, or ``frame`` itself when compressing would not
    make it smaller (incompressible payloads; so it never outgrows the
    server's max_frame_bytes)."""
    body = memoryview(frame)[FRAME_HEADER_BYTES:]
    if codec_flag == FLAG_COMPRESS_ZSTD:
        packed = cramjam.zstd.compress(body, level=1)
    else:
        packed = cramjam.lz4.compress_block(bytes(body), store_size=False)
    if len(packed) + _COMPRESSED_HEAD.size >= len(body):
        return frame
    return fp.encode_frame(FrameType.EVENT_BATCH, _COMPRESSED_HEAD.pack(len(body)) + bytes(packed),
                           FRAME_FLAG_COMPRESSED)


def decompress_batch_body(body: bytes, codec_flag: int, max_frame_bytes: int) -> bytearray:
    """The EVENT_BATCH body a compressed one stands for. Its declared length is
    checked against ``max_frame_bytes`` before anything is allocated, and it
    is decompressed into exactly that much memory, so a decompression bomb
    costs at most max_frame_bytes (``ProtocolError`` either way)."""
    if len(body) < 4:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME, "compressed EVENT_BATCH body shorter than its length field")
    (n,) = _COMPRESSED_HEAD.unpack_from(body)
    if n > max_frame_bytes:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE,
                            f"compressed EVENT_BATCH declares {n} bytes, over max_frame_bytes={max_frame_bytes}")
    out = bytearray(n)
    try:
        if codec_flag == FLAG_COMPRESS_ZSTD:
            got = cramjam.zstd.decompress_into(memoryview(body)[4:], out)
        else:
            got = cramjam.lz4.decompress_block_into(memoryview(body)[4:], out)
    except cramjam.DecompressionError:
        got = -1
    if got != n:
        raise ProtocolError(ErrorCode.MALFORMED_FRAME,
                            f"compressed EVENT_BATCH does not decompress to its declared {n} bytes")
    return out

def utf8_prefix(text: str, limit: int) -> bytes:
    """``text`` as UTF-8, cut to at most ``limit`` bytes at a character boundary."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


_U16 = struct.Struct(">H")
_HELLO_HEAD = struct.Struct(">4sHH")
_WELCOME_HEAD = struct.Struct(">HHIIII")
_ACK_HEAD = struct.Struct(">QH")
_ACK_ENTRY = struct.Struct(">HBBIII")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_GOAWAY_HEAD = struct.Struct(">HI")
_ERROR_HEAD = struct.Struct(">H")


def _pack_str(b: bytes) -> bytes:
    return _U16.pack(len(b)) + b


class _Cursor:
    """Bounds-checked reads over one frame body."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"{self.what} frame is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, s: struct.Struct) -> tuple:
        return s.unpack(self.take(s.size))

    def string(self) -> bytes:
        (n,) = self.unpack(_U16)
        return self.take(n)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, f"{self.what} frame has trailing bytes")


@dataclass(frozen=True)
class Hello:
    client_id: str
    auth: bytes = b""
    version: int = PROTOCOL_VERSION
    flags: int = 0  # FLAG_REJECTION_DETAILS

    def encode(self) -> bytes:
        cid = self.client_id.encode("utf-8")
        if len(cid) > MAX_CLIENT_ID_BYTES:
            raise ValueError("client_id longer than 255 bytes")
        body = _HELLO_HEAD.pack(MAGIC, self.version, self.flags) + _pack_str(cid) + _pack_str(self.auth)
        return encode_frame(FrameType.HELLO, body)

    @classmethod
    def decode(cls, body: bytes) -> Hello:
        c = _Cursor(body, "HELLO")
        magic, version, flags = c.unpack(_HELLO_HEAD)
        if magic != MAGIC:
            raise ProtocolError(ErrorCode.BAD_HANDSHAKE, f"bad magic {magic!r}, expected {MAGIC!r}")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {version} is not supported (server speaks {PROTOCOL_VERSION})",
            )
        raw_id = c.string()
        auth = c.string()
        c.end()
        if len(raw_id) > MAX_CLIENT_ID_BYTES:
            raise ProtocolError(ErrorCode.BAD_HANDSHAKE, "client_id longer than 255 bytes")
        try:
            client_id = raw_id.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_HANDSHAKE, "client_id is not UTF-8") from None
        return cls(client_id=client_id, auth=auth, version=version, flags=flags)


@dataclass(frozen=True)
class Welcome:
    max_frame_bytes: int
    max_event_bytes: int
    max_events_per_batch: int
    heartbeat_interval_ms: int
    server_id: str
    version: int = PROTOCOL_VERSION
    flags: int = 0  # FLAG_REJECTION_DETAILS: this connection's ACKs carry them

    def encode(self) -> bytes:
        body = _WELCOME_HEAD.pack(
            self.version,
            self.flags,
            self.max_frame_bytes,
            self.max_event_bytes,
            self.max_events_per_batch,
            self.heartbeat_interval_ms,
        ) + _pack_str(self.server_id.encode("utf-8"))
        return encode_frame(FrameType.WELCOME, body)

    @classmethod
    def decode(cls, body: bytes) -> Welcome:
        c = _Cursor(body, "WELCOME")
        version, flags, mf, me, mb, hb = c.unpack(_WELCOME_HEAD)
        server_id = c.string().decode("utf-8", "replace")
        c.end()
        return cls(mf, me, mb, hb, server_id, version, flags)


@dataclass(frozen=True)
class AckEntry:
    """The answer for some events of one type in one batch.

    ``indices`` empty means: every event of ``type_index`` in the batch that no
    other entry of the same batch lists by index.
    """

    type_index: int
    status: int
    reason: int
    count: int
    retry_after_ms: int = 0
    indices: tuple[int, ...] = ()
    # schema_violation: one short text per listed event (JSON path and rule),
    # sent to producers that asked for details.
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ack:
    batch_seq: int
    entries: tuple[AckEntry, ...] = field(default_factory=tuple)
    details: dict[int, str] = field(default_factory=dict)  # event index -> rejection detail

    def encode(self, with_details: bool = False) -> bytes:
        return encode_frame(FrameType.ACK, encode_ack_body(self.batch_seq, self.entries, with_details=with_details))

    @classmethod
    def decode(cls, body: bytes) -> Ack:
        c = _Cursor(body, "ACK")
        seq, n = c.unpack(_ACK_HEAD)
        entries = []
        for _ in range(n):
            ti, status, reason, count, retry_ms, n_idx = c.unpack(_ACK_ENTRY)
            raw = c.take(4 * n_idx)
            indices = struct.unpack(f">{n_idx}I", raw) if n_idx else ()
            entries.append(AckEntry(ti, status, reason, count, retry_ms, tuple(indices)))
        details: dict[int, str] = {}
        if c.pos < len(c.data):  # the details section (FLAG_REJECTION_DETAILS)
            (n_details,) = c.unpack(_U16)
            for _ in range(n_details):
                (idx,) = c.unpack(_U32)
                details[idx] = c.string().decode("utf-8", "replace")
        c.end()
        return cls(seq, tuple(entries), details)


def encode_ack_body(batch_seq: int, entries, encoded: bytes = b"", n_encoded: int = 0,
                    with_details: bool = False) -> bytes:
    """An ACK body: ``entries`` (AckEntry), then ``n_encoded`` entries already
    encoded (``encoded``, without indices: they go last), then, when
    ``with_details`` and some entry has them, the details section."""
    parts = [_ACK_HEAD.pack(batch_seq, len(entries) + n_encoded)]
    details: list[bytes] = []
    for e in entries:
        parts.append(_ACK_ENTRY.pack(e.type_index, e.status, e.reason, e.count, e.retry_after_ms, len(e.indices)))
        if e.indices:
            parts.append(struct.pack(f">{len(e.indices)}I", *e.indices))
            if with_details and e.details:
                for i, text in zip(e.indices, e.details, strict=True):
                    details.append(_U32.pack(i) + _pack_str(utf8_prefix(text, MAX_DETAIL_BYTES)))
    parts.append(encoded)
    if details:
        del details[0xFFFF:]  # the count is a u16; later events go without a detail
        parts.append(_U16.pack(len(details)))
        parts.extend(details)
    return b"".join(parts)


def encode_heartbeat(token: int) -> bytes:
    return encode_frame(FrameType.HEARTBEAT, _U64.pack(token))


def decode_heartbeat(body: bytes) -> int:
    c = _Cursor(body, "HEARTBEAT")
    (token,) = c.unpack(_U64)
    c.end()
    return int(token)


@dataclass(frozen=True)
class Goaway:
    reason: int
    reconnect_after_ms: int
    message: str

    def encode(self) -> bytes:
        body = _GOAWAY_HEAD.pack(self.reason, self.reconnect_after_ms) + _pack_str(self.message.encode("utf-8"))
        return encode_frame(FrameType.GOAWAY, body)

    @classmethod
    def decode(cls, body: bytes) -> Goaway:
        c = _Cursor(body, "GOAWAY")
        reason, after = c.unpack(_GOAWAY_HEAD)
        msg = c.string().decode("utf-8", "replace")
        c.end()
        return cls(reason, after, msg)


@dataclass(frozen=True)
class ErrorFrame:
    """``retry_after_ms``: when the producer may connect again (0: no hint). It
    follows the message as an optional u32 (ADDRESS_LOCKED_OUT sends it);
    receivers ignore bytes after the message they do not know."""

    code: int
    message: str
    retry_after_ms: int = 0

    def encode(self) -> bytes:
        msg = self.message.encode("utf-8")[:4096]
        tail = _U32.pack(self.retry_after_ms) if self.retry_after_ms else b""
        return encode_frame(FrameType.ERROR, _ERROR_HEAD.pack(self.code) + _pack_str(msg) + tail)

    @classmethod
    def decode(cls, body: bytes) -> ErrorFrame:
        c = _Cursor(body, "ERROR")
        (code,) = c.unpack(_ERROR_HEAD)
        msg = c.string().decode("utf-8", "replace")
        retry_ms = 0
        if len(c.data) - c.pos >= _U32.size:
            (retry_ms,) = c.unpack(_U32)
        return cls(code, msg, retry_ms)


@dataclass(frozen=True)
class Event:
    """One decoded event (reference decoder output; not used on the hot path)."""

    type: str
    event_id: bytes
    timestamp_ms: int
    key: bytes | None
    payload: bytes


_EVENT_HEAD = struct.Struct(">HHIq16s")


def decode_batch(body: bytes) -> tuple[int, list[Event]]:
    """Decode an EVENT_BATCH body in plain Python (for tests and tools)."""
    c = _Cursor(body, "EVENT_BATCH")
    seq, n_types = c.unpack(_ACK_HEAD)
    names = []
    for _ in range(n_types):
        n = c.take(1)[0]
        names.append(c.take(n).decode("utf-8", "replace"))
    (n_events,) = c.unpack(_U32)
    events = []
    for _ in range(n_events):
        ti, klen, vlen, ts, eid = c.unpack(_EVENT_HEAD)
        if ti >= len(names):
            raise ProtocolError(ErrorCode.MALFORMED_FRAME, "type index out of range")
        key = c.take(klen) if klen else None
        events.append(Event(names[ti], eid, ts, key, c.take(vlen)))
    c.end()
    return seq, events
