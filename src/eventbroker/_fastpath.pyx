# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The native hot path: framing, checksums, event decoding, per-type rings and
Kafka record-batch building.

Wire format v1 (full specification with examples: docs/protocol.md)
-------------------------------------------------------------------
All integers are big-endian. Every frame is a 12-byte header and a body:

    offset size field
    0      4    body_length   u32, bytes of body after the header
    4      1    frame_type    1 HELLO, 2 WELCOME, 3 EVENT_BATCH, 4 ACK,
                              5 HEARTBEAT, 6 GOAWAY, 7 ERROR
    5      1    flags         0 in v1
    6      2    reserved      0 in v1
    8      4    crc32c        CRC-32C of header bytes 4..7, then the body
    12     n    body

EVENT_BATCH body:
    u64 batch_seq, u16 type_count, type_count x (u8 name_length, name),
    u32 event_count, event_count x event
    event = u16 type_index, u16 key_length, u32 payload_length,
            i64 timestamp_ms, 16-byte event_id, key, payload

Everything per event happens here, in C: a batch frame is checked, split by
type and copied into each type's ring as a ready-made Kafka record tail, and
the Kafka side later turns a run of ring entries into record batches
(magic v2, CRC-32C) without touching Python per event.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc, calloc
from libc.string cimport memcmp, memcpy, memmove

from eventbroker.errors import ProtocolError

cdef extern from "_native.h":
    void eb_crc32c_init() nogil
    uint32_t eb_crc32c(uint32_t crc, const unsigned char *p, size_t n) nogil
    int eb_crc32c_uses_hw() nogil
    uint32_t eb_murmur2(const unsigned char *data, size_t n) nogil
    uint16_t eb_ld16(const unsigned char *p) nogil
    uint32_t eb_ld32(const unsigned char *p) nogil
    uint64_t eb_ld64(const unsigned char *p) nogil
    void eb_st16(unsigned char *p, uint16_t v) nogil
    void eb_st32(unsigned char *p, uint32_t v) nogil
    void eb_st64(unsigned char *p, uint64_t v) nogil
    size_t eb_varint_size(int64_t v) nogil
    unsigned char *eb_put_varint(unsigned char *p, int64_t v) nogil

cdef enum:
    HEADER_BYTES = 12
    EVENT_HEADER_BYTES = 32
    ENTRY_HEADER_BYTES = 24
    KAFKA_BATCH_HEADER_BYTES = 61
    MAX_FRAME_TYPE = 7
    ID_HDR_BYTES = 23
    TS_HDR_BYTES = 15
    RECV_HDR_BYTES = 20
    MAX_TYPES_PER_BATCH = 4096

eb_crc32c_init()

# Frame types, error codes, ack statuses and reasons (docs/protocol.md).
cdef enum:
    C_FRAME_HELLO = 1
    C_FRAME_WELCOME = 2
    C_FRAME_EVENT_BATCH = 3
    C_FRAME_ACK = 4
    C_FRAME_HEARTBEAT = 5
    C_FRAME_GOAWAY = 6
    C_FRAME_ERROR = 7
    C_ERR_BAD_CHECKSUM = 1
    C_ERR_FRAME_TOO_LARGE = 2
    C_ERR_MALFORMED_FRAME = 3
    C_ERR_UNKNOWN_FRAME_TYPE = 4
    C_ERR_BAD_HANDSHAKE = 5
    C_ERR_UNSUPPORTED_VERSION = 6
    C_ERR_TOO_MANY_EVENTS = 8
    C_ERR_TRUNCATED_STREAM = 9
    C_STATUS_PERSISTED = 0
    C_STATUS_REJECTED = 1
    C_STATUS_RETRY_LATER = 2
    C_STATUS_ACCEPTED = 255
    C_REASON_NONE = 0
    C_REASON_UNKNOWN_TYPE = 1
    C_REASON_TOO_LARGE = 2
    C_REASON_DISABLED = 3
    C_REASON_INVALID = 4
    C_REASON_FORBIDDEN = 5
    C_REASON_OVERLOADED = 16
    C_REASON_KAFKA_UNAVAILABLE = 17
    C_REASON_SPOOL_UNAVAILABLE = 19

FRAME_HELLO = C_FRAME_HELLO
FRAME_WELCOME = C_FRAME_WELCOME
FRAME_EVENT_BATCH = C_FRAME_EVENT_BATCH
FRAME_ACK = C_FRAME_ACK
FRAME_HEARTBEAT = C_FRAME_HEARTBEAT
FRAME_GOAWAY = C_FRAME_GOAWAY
FRAME_ERROR = C_FRAME_ERROR
ERR_BAD_CHECKSUM = C_ERR_BAD_CHECKSUM
ERR_FRAME_TOO_LARGE = C_ERR_FRAME_TOO_LARGE
ERR_MALFORMED_FRAME = C_ERR_MALFORMED_FRAME
ERR_UNKNOWN_FRAME_TYPE = C_ERR_UNKNOWN_FRAME_TYPE
ERR_BAD_HANDSHAKE = C_ERR_BAD_HANDSHAKE
ERR_UNSUPPORTED_VERSION = C_ERR_UNSUPPORTED_VERSION
ERR_TOO_MANY_EVENTS = C_ERR_TOO_MANY_EVENTS
ERR_TRUNCATED_STREAM = C_ERR_TRUNCATED_STREAM
STATUS_PERSISTED = C_STATUS_PERSISTED
STATUS_REJECTED = C_STATUS_REJECTED
STATUS_RETRY_LATER = C_STATUS_RETRY_LATER
STATUS_ACCEPTED = C_STATUS_ACCEPTED
REASON_NONE = C_REASON_NONE
REASON_UNKNOWN_TYPE = C_REASON_UNKNOWN_TYPE
REASON_TOO_LARGE = C_REASON_TOO_LARGE
REASON_DISABLED = C_REASON_DISABLED
REASON_INVALID = C_REASON_INVALID
REASON_FORBIDDEN = C_REASON_FORBIDDEN
REASON_OVERLOADED = C_REASON_OVERLOADED
REASON_KAFKA_UNAVAILABLE = C_REASON_KAFKA_UNAVAILABLE
REASON_SPOOL_UNAVAILABLE = C_REASON_SPOOL_UNAVAILABLE

# Record header names written with every Kafka record.
HEADER_EVENT_ID = b"eb.id"
HEADER_EVENT_TYPE = b"eb.type"
HEADER_TIMESTAMP = b"eb.ts"
HEADER_RECEIVED = b"eb.recv_ts"

# The three fixed headers' bytes around the type header: id, ts, recv_ts.
# Each header is varint(key length) key varint(value length) value.


def crc32c(data, uint32_t crc=0):
    """CRC-32C (Castagnoli) of any buffer, continuing from ``crc``."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return eb_crc32c(crc, <const unsigned char *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)


def crc32c_uses_hardware():
    """True when the SSE4.2 crc32 instruction is used."""
    return bool(eb_crc32c_uses_hw())


def murmur2(data):
    """Kafka's murmur2 hash of ``data`` (as its default partitioner uses it)."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return eb_murmur2(<const unsigned char *>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)


def encode_frame(int frame_type, body):
    """Return header + body as one ``bytes``, with the checksum filled in."""
    cdef Py_buffer view
    cdef bytes out
    cdef unsigned char *p
    cdef uint32_t crc
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        if view.len > 0xFFFFFFFF:
            raise ValueError("frame body too large")
        out = PyBytes_FromStringAndSize(NULL, HEADER_BYTES + view.len)
        p = <unsigned char *>PyBytes_AS_STRING(out)
        eb_st32(p, <uint32_t>view.len)
        p[4] = <unsigned char>frame_type
        p[5] = 0
        p[6] = 0
        p[7] = 0
        memcpy(p + HEADER_BYTES, view.buf, view.len)
        crc = eb_crc32c(0, p + 4, 4)
        crc = eb_crc32c(crc, p + HEADER_BYTES, <size_t>view.len)
        eb_st32(p + 8, crc)
        return out
    finally:
        PyBuffer_Release(&view)


@cython.final
cdef class FrameReader:
    """Splits whole, checksum-verified frames out of a byte stream.

    ``feed(data)`` then ``next_frame()`` until it returns -1. While no partial
    frame is pending, complete frames are parsed straight out of ``data``
    without copying and only a trailing partial frame is copied into the
    reader's own buffer; while one is pending, the next chunk is appended to
    that buffer (so the buffer holds at most one frame plus one chunk). A bad
    frame raises ``ProtocolError`` with its code.
    """
    cdef:
        unsigned char *_buf
        Py_ssize_t _buf_cap
        Py_ssize_t _buf_start
        Py_ssize_t _buf_end
        Py_buffer _view
        bint _has_view
        const unsigned char *_src
        Py_ssize_t _src_len
        Py_ssize_t _src_pos
        bint _src_is_buf
        const unsigned char *_body
        Py_ssize_t _body_len
        readonly int frame_type
        readonly Py_ssize_t max_frame_bytes
        readonly unsigned long long frames_read

    def __cinit__(self, Py_ssize_t max_frame_bytes):
        self._buf = NULL
        self._has_view = False
        self._src = NULL
        self.max_frame_bytes = max_frame_bytes

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)
        free(self._buf)

    cdef int _ensure_buf(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t live = self._buf_end - self._buf_start
        cdef Py_ssize_t need = live + extra
        cdef unsigned char *nb
        if self._buf_start > 0:
            if live:
                memmove(self._buf, self._buf + self._buf_start, live)
            self._buf_start = 0
            self._buf_end = live
        if need > self._buf_cap:
            if need < 65536:
                need = 65536
            elif need < self._buf_cap * 2:
                need = self._buf_cap * 2
            nb = <unsigned char *>realloc(self._buf, need)
            if nb == NULL:
                raise MemoryError()
            self._buf = nb
            self._buf_cap = need
        return 0

    cdef void _drop_view(self):
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False

    def feed(self, data):
        """Add bytes received from the socket (any buffer object)."""
        if self._src != NULL:
            self._stash()  # frames not yet taken from the previous feed stay
        self._drop_view()
        self._body = NULL
        self._body_len = 0
        if self._buf_end > self._buf_start:
            PyObject_GetBuffer(data, &self._view, PyBUF_SIMPLE)
            try:
                self._ensure_buf(self._view.len)
                memcpy(self._buf + self._buf_end, self._view.buf, self._view.len)
                self._buf_end += self._view.len
            finally:
                PyBuffer_Release(&self._view)
            self._src = self._buf + self._buf_start
            self._src_len = self._buf_end - self._buf_start
            self._src_pos = 0
            self._src_is_buf = True
        else:
            PyObject_GetBuffer(data, &self._view, PyBUF_SIMPLE)
            self._has_view = True
            self._buf_start = self._buf_end = 0
            self._src = <const unsigned char *>self._view.buf
            self._src_len = self._view.len
            self._src_pos = 0
            self._src_is_buf = False

    cdef int _stash(self) except -1:
        """Keep the unparsed rest of the source for the next feed."""
        cdef Py_ssize_t rest = self._src_len - self._src_pos
        if self._src_is_buf:
            self._buf_start += self._src_pos
            if self._buf_start == self._buf_end:
                self._buf_start = self._buf_end = 0
        else:
            self._buf_start = self._buf_end = 0
            if rest:
                self._ensure_buf(rest)
                memcpy(self._buf, self._src + self._src_pos, rest)
                self._buf_end = rest
            self._drop_view()
        self._src = NULL
        self._src_len = self._src_pos = 0
        self._body = NULL
        self._body_len = 0
        return 0

    def next_frame(self):
        """Return the next complete frame's type, or -1 when more bytes are needed.

        After a frame is returned its body is available through ``body()`` and
        to ``Router.ingest`` until the next call of ``next_frame`` or ``feed``.
        """
        cdef const unsigned char *h
        cdef Py_ssize_t avail, body_len
        cdef uint32_t crc
        cdef int ftype
        if self._src == NULL:
            return -1
        avail = self._src_len - self._src_pos
        if avail < HEADER_BYTES:
            self._stash()
            return -1
        h = self._src + self._src_pos
        body_len = <Py_ssize_t>eb_ld32(h)
        ftype = h[4]
        if body_len > self.max_frame_bytes:
            raise ProtocolError(
                C_ERR_FRAME_TOO_LARGE,
                f"frame body of {body_len} bytes exceeds max_frame_bytes={self.max_frame_bytes}",
            )
        if ftype == 0 or ftype > MAX_FRAME_TYPE:
            raise ProtocolError(C_ERR_UNKNOWN_FRAME_TYPE, f"unknown frame type {ftype}")
        if h[5] != 0 or h[6] != 0 or h[7] != 0:
            raise ProtocolError(C_ERR_MALFORMED_FRAME, "reserved frame header bits are not zero")
        if avail < HEADER_BYTES + body_len:
            self._stash()
            return -1
        crc = eb_crc32c(0, h + 4, 4)
        crc = eb_crc32c(crc, h + HEADER_BYTES, <size_t>body_len)
        if crc != eb_ld32(h + 8):
            raise ProtocolError(C_ERR_BAD_CHECKSUM, "frame checksum mismatch")
        self._body = h + HEADER_BYTES
        self._body_len = body_len
        self._src_pos += HEADER_BYTES + body_len
        self.frame_type = ftype
        self.frames_read += 1
        return ftype

    def body(self):
        """A copy of the current frame's body."""
        if self._body == NULL:
            return b""
        return PyBytes_FromStringAndSize(<const char *>self._body, self._body_len)

    @property
    def body_length(self):
        return self._body_len

    @property
    def buffered_bytes(self):
        """Bytes of an incomplete frame held back (non-zero at EOF = truncated)."""
        return (self._buf_end - self._buf_start) + (self._src_len - self._src_pos)


@cython.final
cdef class _Chunk:
    cdef unsigned char *data
    cdef Py_ssize_t cap
    cdef Py_ssize_t used
    cdef long long seq

    def __dealloc__(self):
        free(self.data)


cdef _Chunk _new_chunk(Py_ssize_t cap, long long seq):
    cdef _Chunk c = _Chunk.__new__(_Chunk)
    c.data = <unsigned char *>malloc(cap)
    if c.data == NULL:
        raise MemoryError()
    c.cap = cap
    c.used = 0
    c.seq = seq
    return c


cdef struct _PartState:
    Py_ssize_t count
    Py_ssize_t size
    int64_t base_ts
    int64_t max_ts
    unsigned char *out
    unsigned char *start


@cython.final
cdef class MemoryBudget:
    """Bytes held by all rings together, against one limit (server.memory_budget_bytes)."""
    cdef readonly Py_ssize_t used_bytes
    cdef public Py_ssize_t limit_bytes

    def __init__(self, Py_ssize_t limit_bytes):
        self.limit_bytes = limit_bytes
        self.used_bytes = 0


@cython.final
cdef class TypeRing:
    """One event type's buffer, bounded in bytes, drained in whole runs.

    Entries are Kafka record tails (key, value, headers) with a 24-byte
    header (tail length, key hash, flags, timestamp). Entries are taken into
    *units* in order by ``build_unit``; a unit's bytes stay counted until
    ``release`` is called for it after Kafka acknowledged it, so the bound
    covers both waiting and in-flight events.
    """
    cdef readonly str name
    cdef readonly bytes name_bytes
    cdef public bint enabled
    cdef public bint accepting   # False while the type cannot be delivered
    cdef public int refuse_reason  # the RETRY_LATER reason while not accepting
    cdef public bint by_key
    cdef public Py_ssize_t max_event_bytes
    cdef public Py_ssize_t capacity_bytes
    cdef readonly Py_ssize_t used_bytes
    cdef readonly Py_ssize_t pending_events
    cdef readonly Py_ssize_t pending_bytes
    cdef readonly unsigned long long events_in
    cdef readonly unsigned long long bytes_in
    cdef public object lane
    # Parts are admitted while the shared budget stays under this many bytes
    # (a priority's share of the budget); 0: no shared budget.
    cdef public Py_ssize_t admit_limit_bytes
    cdef MemoryBudget _budget
    cdef list _chunks
    cdef Py_ssize_t _read_idx
    cdef Py_ssize_t _read_off
    cdef long long _next_seq
    cdef Py_ssize_t _chunk_bytes
    cdef bytes _type_hdr

    def __init__(self, str name, *, Py_ssize_t capacity_bytes, Py_ssize_t max_event_bytes,
                 bint by_key=True, bint enabled=True, Py_ssize_t chunk_bytes=262144):
        cdef bytes nb = name.encode("utf-8")
        cdef bytearray hdr = bytearray()
        if not 0 < len(nb) <= 255:
            raise ValueError("event type name must be 1..255 bytes")
        self.name = name
        self.name_bytes = nb
        self.enabled = enabled
        self.accepting = True
        self.refuse_reason = C_REASON_KAFKA_UNAVAILABLE
        self.by_key = by_key
        self.max_event_bytes = max_event_bytes
        self.capacity_bytes = capacity_bytes
        self._chunks = []
        self._chunk_bytes = chunk_bytes
        self._next_seq = 0
        self._read_idx = 0
        self._read_off = 0
        # varint(len("eb.type")) "eb.type" varint(len(name)) name
        hdr += _varint(len(HEADER_EVENT_TYPE))
        hdr += HEADER_EVENT_TYPE
        hdr += _varint(len(nb))
        hdr += nb
        self._type_hdr = bytes(hdr)

    @property
    def free_bytes(self):
        return self.capacity_bytes - self.used_bytes

    def attach_budget(self, MemoryBudget budget not None, Py_ssize_t admit_limit_bytes):
        """Count this ring's bytes in ``budget``; admit parts while it stays under the limit."""
        if self._budget is not None:
            self._budget.used_bytes -= self.used_bytes
        self._budget = budget
        budget.used_bytes += self.used_bytes
        self.admit_limit_bytes = admit_limit_bytes

    cdef inline Py_ssize_t _entry_bytes(self, Py_ssize_t klen, Py_ssize_t vlen):
        cdef Py_ssize_t tail = (eb_varint_size(klen if klen else -1) + klen
                                + eb_varint_size(vlen) + vlen + 1
                                + ID_HDR_BYTES + PyBytes_GET_SIZE(self._type_hdr)
                                + TS_HDR_BYTES + RECV_HDR_BYTES)
        return ENTRY_HEADER_BYTES + tail

    cdef unsigned char *_reserve(self, Py_ssize_t n) except NULL:
        cdef _Chunk c
        cdef Py_ssize_t cap
        if self._chunks:
            c = <_Chunk>self._chunks[len(self._chunks) - 1]
            if c.cap - c.used >= n:
                c.used += n
                return c.data + c.used - n
        cap = self._chunk_bytes if n <= self._chunk_bytes else n
        c = _new_chunk(cap, self._next_seq)
        self._next_seq += 1
        self._chunks.append(c)
        c.used = n
        return c.data

    cdef int _write(self, const unsigned char *ev, int64_t now_ms) except -1:
        """Append one event (pointer at its 32-byte wire header) as an entry."""
        cdef Py_ssize_t klen = eb_ld16(ev + 2)
        cdef Py_ssize_t vlen = eb_ld32(ev + 4)
        cdef int64_t ts = <int64_t>eb_ld64(ev + 8)
        cdef Py_ssize_t n = self._entry_bytes(klen, vlen)
        cdef unsigned char *e = self._reserve(n)
        cdef unsigned char *p
        cdef const unsigned char *key = ev + EVENT_HEADER_BYTES
        eb_st32(e, <uint32_t>(n - ENTRY_HEADER_BYTES))
        eb_st32(e + 4, eb_murmur2(key, klen) if klen and self.by_key else 0)
        eb_st32(e + 8, 1 if klen else 0)
        eb_st32(e + 12, 0)
        eb_st64(e + 16, <uint64_t>ts)
        p = e + ENTRY_HEADER_BYTES
        p = eb_put_varint(p, klen if klen else -1)
        memcpy(p, key, klen)
        p += klen
        p = eb_put_varint(p, vlen)
        memcpy(p, key + klen, vlen)
        p += vlen
        p = eb_put_varint(p, 4)
        p[0] = 10
        memcpy(p + 1, b"eb.id", 5)
        p[6] = 32
        memcpy(p + 7, ev + 16, 16)
        p += ID_HDR_BYTES
        memcpy(p, PyBytes_AS_STRING(self._type_hdr), PyBytes_GET_SIZE(self._type_hdr))
        p += PyBytes_GET_SIZE(self._type_hdr)
        p[0] = 10
        memcpy(p + 1, b"eb.ts", 5)
        p[6] = 16
        eb_st64(p + 7, <uint64_t>ts)
        p += TS_HDR_BYTES
        p[0] = 20
        memcpy(p + 1, b"eb.recv_ts", 10)
        p[11] = 16
        eb_st64(p + 12, <uint64_t>now_ms)
        self.used_bytes += n
        if self._budget is not None:
            self._budget.used_bytes += n
        self.pending_bytes += n
        self.pending_events += 1
        self.events_in += 1
        self.bytes_in += n
        return 0

    def build_unit(self, Py_ssize_t max_bytes, int n_partitions, int sticky_partition):
        """Take the next run of waiting entries and build Kafka record batches.

        Returns ``(batches, n_events, n_bytes, end_seq, end_off)`` where
        ``batches`` is a list of ``(partition, record_batch_bytes, count)``,
        or None when nothing is waiting. Keyed events of a ``by_key`` type go
        to murmur2(key) % n_partitions, the rest to ``sticky_partition``.
        """
        cdef _PartState *parts
        cdef Py_ssize_t idx, off, n_events = 0, n_bytes = 0, total = 0, tail_len, body, rec
        cdef _Chunk c
        cdef const unsigned char *e
        cdef int p, np_ = n_partitions
        cdef int64_t ts, delta
        cdef list batches
        cdef bytes out
        cdef unsigned char *w
        cdef uint32_t crc
        cdef long long end_seq
        cdef Py_ssize_t end_off, end_idx, i, k
        if self.pending_events == 0:
            return None
        if np_ < 1:
            raise ValueError("n_partitions must be >= 1")
        if not 0 <= sticky_partition < np_:
            raise ValueError("sticky_partition out of range")
        parts = <_PartState *>calloc(np_, sizeof(_PartState))
        if parts == NULL:
            raise MemoryError()
        try:
            # Pass 1: choose the entries and size each partition's batch.
            idx = self._read_idx
            off = self._read_off
            while n_events < self.pending_events:
                c = <_Chunk>self._chunks[idx]
                if off >= c.used:
                    idx += 1
                    off = 0
                    continue
                e = c.data + off
                tail_len = eb_ld32(e)
                if self.by_key and eb_ld32(e + 8):
                    p = <int>((eb_ld32(e + 4) & 0x7fffffff) % <uint32_t>np_)
                else:
                    p = sticky_partition
                ts = <int64_t>eb_ld64(e + 16)
                delta = ts - parts[p].base_ts if parts[p].count else 0
                body = 1 + eb_varint_size(delta) + eb_varint_size(parts[p].count) + tail_len
                rec = eb_varint_size(body) + body
                if n_events and total + rec > max_bytes:
                    break
                # Only an entry taken into this unit may set the batch timestamps.
                if parts[p].count == 0:
                    parts[p].base_ts = ts
                    parts[p].max_ts = ts
                elif ts > parts[p].max_ts:
                    parts[p].max_ts = ts
                total += rec
                parts[p].size += rec
                parts[p].count += 1
                n_events += 1
                n_bytes += ENTRY_HEADER_BYTES + tail_len
                off += ENTRY_HEADER_BYTES + tail_len
            end_idx = idx
            end_seq = (<_Chunk>self._chunks[idx]).seq
            end_off = off
            # Pass 2: write the batches.
            batches = []
            for i in range(np_):
                if parts[i].count:
                    out = PyBytes_FromStringAndSize(NULL, KAFKA_BATCH_HEADER_BYTES + parts[i].size)
                    batches.append((i, out, parts[i].count))
                    parts[i].start = <unsigned char *>PyBytes_AS_STRING(out)
                    parts[i].out = parts[i].start + KAFKA_BATCH_HEADER_BYTES
                    parts[i].count = 0              # becomes the offset delta
            idx = self._read_idx
            off = self._read_off
            k = 0
            while k < n_events:
                c = <_Chunk>self._chunks[idx]
                if off >= c.used:
                    idx += 1
                    off = 0
                    continue
                e = c.data + off
                tail_len = eb_ld32(e)
                if self.by_key and eb_ld32(e + 8):
                    p = <int>((eb_ld32(e + 4) & 0x7fffffff) % <uint32_t>np_)
                else:
                    p = sticky_partition
                delta = <int64_t>eb_ld64(e + 16) - parts[p].base_ts
                body = 1 + eb_varint_size(delta) + eb_varint_size(parts[p].count) + tail_len
                w = eb_put_varint(parts[p].out, body)
                w[0] = 0  # record attributes
                w = eb_put_varint(w + 1, delta)
                w = eb_put_varint(w, parts[p].count)
                memcpy(w, e + ENTRY_HEADER_BYTES, tail_len)
                parts[p].out = w + tail_len
                parts[p].count += 1
                off += ENTRY_HEADER_BYTES + tail_len
                k += 1
            for i in range(np_):
                if parts[i].count:
                    w = parts[i].start
                    eb_st64(w, 0)                                   # base offset
                    eb_st32(w + 8, <uint32_t>(parts[i].out - w - 12))  # batch length
                    eb_st32(w + 12, 0xFFFFFFFF)                     # partition leader epoch
                    w[16] = 2                                       # magic
                    eb_st16(w + 21, 0)                              # attributes
                    eb_st32(w + 23, <uint32_t>(parts[i].count - 1))  # last offset delta
                    eb_st64(w + 27, <uint64_t>parts[i].base_ts)
                    eb_st64(w + 35, <uint64_t>parts[i].max_ts)
                    eb_st64(w + 43, 0xFFFFFFFFFFFFFFFF)             # producer id -1
                    eb_st16(w + 51, 0xFFFF)                         # producer epoch -1
                    eb_st32(w + 53, 0xFFFFFFFF)                     # base sequence -1
                    eb_st32(w + 57, <uint32_t>parts[i].count)
                    crc = eb_crc32c(0, w + 21, <size_t>(parts[i].out - w - 21))
                    eb_st32(w + 17, crc)
            # Resume where pass 1 stopped (it may have stepped into the next
            # chunk), so the read position agrees with (end_seq, end_off).
            self._read_idx = end_idx
            self._read_off = end_off
            self.pending_events -= n_events
            self.pending_bytes -= n_bytes
            return batches, n_events, n_bytes, end_seq, end_off
        finally:
            free(parts)

    def skip_unit(self, Py_ssize_t max_bytes):
        """Take the next run of entries without building anything (null sink).

        Returns ``(n_events, n_bytes, end_seq, end_off)`` or None.
        """
        cdef Py_ssize_t idx = self._read_idx, off = self._read_off
        cdef Py_ssize_t n_events = 0, n_bytes = 0, entry
        cdef _Chunk c
        if self.pending_events == 0:
            return None
        while n_events < self.pending_events:
            c = <_Chunk>self._chunks[idx]
            if off >= c.used:
                idx += 1
                off = 0
                continue
            entry = ENTRY_HEADER_BYTES + eb_ld32(c.data + off)
            if n_events and n_bytes + entry > max_bytes:
                break
            n_bytes += entry
            n_events += 1
            off += entry
        self._read_idx = idx
        self._read_off = off
        self.pending_events -= n_events
        self.pending_bytes -= n_bytes
        return n_events, n_bytes, (<_Chunk>self._chunks[idx]).seq, off

    def take_entries(self, Py_ssize_t max_bytes):
        """Take the next run of entries as one bytes object (the disk spool's record).

        Like ``skip_unit`` but returns ``(entries, n_events, n_bytes, end_seq,
        end_off)``: the entries exactly as the ring holds them (24-byte header
        plus Kafka record tail each), partition-independent, so the spool's
        forwarder can build record batches for whatever partitions the topic
        has when it is delivered. None when nothing is waiting.
        """
        cdef Py_ssize_t idx = self._read_idx, off = self._read_off, start_off
        cdef Py_ssize_t n_events, n_bytes, span, copied = 0
        cdef _Chunk c
        cdef bytes out
        cdef unsigned char *w
        r = self.skip_unit(max_bytes)
        if r is None:
            return None
        n_events, n_bytes, end_seq, end_off = r
        out = PyBytes_FromStringAndSize(NULL, n_bytes)
        w = <unsigned char *>PyBytes_AS_STRING(out)
        # Entries never straddle chunks: copy each chunk's part of the run.
        while copied < n_bytes:
            c = <_Chunk>self._chunks[idx]
            if off >= c.used:
                idx += 1
                off = 0
                continue
            start_off = off
            span = c.used - off
            if span > n_bytes - copied:
                span = n_bytes - copied
            memcpy(w + copied, c.data + start_off, span)
            copied += span
            off += span
        return out, n_events, n_bytes, end_seq, end_off

    def append_entries(self, data):
        """Append entries taken by ``take_entries`` (read back from the spool).

        Every entry's length is checked against the buffer first; a buffer
        that does not parse exactly into entries raises ValueError and
        appends nothing. Returns the number of entries appended. Ignores the
        budget, the capacity and ``accepting``: the spool's forwarder bounds
        what it holds itself.
        """
        cdef Py_buffer view
        cdef const unsigned char *b
        cdef Py_ssize_t n, pos = 0, count = 0, tail_len
        cdef unsigned char *dst
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            b = <const unsigned char *>view.buf
            n = view.len
            while pos < n:
                if n - pos < ENTRY_HEADER_BYTES:
                    raise ValueError(f"truncated entry header at byte {pos}")
                tail_len = eb_ld32(b + pos)
                if tail_len < 3 or tail_len > n - pos - ENTRY_HEADER_BYTES:
                    raise ValueError(f"entry at byte {pos} claims {tail_len} bytes, {n - pos - ENTRY_HEADER_BYTES} left")
                pos += ENTRY_HEADER_BYTES + tail_len
                count += 1
            if n == 0:
                return 0
            dst = self._reserve(n)
            memcpy(dst, b, n)
        finally:
            PyBuffer_Release(&view)
        self.used_bytes += n
        if self._budget is not None:
            self._budget.used_bytes += n
        self.pending_bytes += n
        self.pending_events += count
        self.events_in += count
        return count

    def discard_all(self):
        """Drop every entry, waiting or in flight (the lane answered them retry-later)."""
        cdef _Chunk c
        if self._chunks:
            c = <_Chunk>self._chunks[len(self._chunks) - 1]
            c.used = 0
            self._chunks = [c]
        self._read_idx = 0
        self._read_off = 0
        if self._budget is not None:
            self._budget.used_bytes -= self.used_bytes
        self.used_bytes = 0
        self.pending_bytes = 0
        self.pending_events = 0

    def release(self, Py_ssize_t n_bytes, long long end_seq, Py_ssize_t end_off):
        """Free a unit's bytes once it is done; units are released in order."""
        cdef Py_ssize_t drop = 0
        cdef _Chunk c
        self.used_bytes -= n_bytes
        if self._budget is not None:
            self._budget.used_bytes -= n_bytes
        while drop < len(self._chunks) - 1 and (<_Chunk>self._chunks[drop]).seq < end_seq:
            drop += 1
        if drop:
            del self._chunks[:drop]
            self._read_idx -= drop
        if self.used_bytes == 0 and len(self._chunks) == 1:
            c = <_Chunk>self._chunks[0]
            if c.seq == end_seq and end_off == c.used:
                # Empty again: rewind the last chunk instead of allocating.
                c.used = 0
                self._read_idx = 0
                self._read_off = 0


cdef bytes _varint(int64_t v):
    cdef unsigned char buf[10]
    cdef unsigned char *end = eb_put_varint(buf, v)
    return PyBytes_FromStringAndSize(<const char *>buf, end - buf)


cdef struct _TypeAcc:
    int forbidden           # the connection may not send this type
    PyObject *ring          # borrowed from the ``rings`` list
    Py_ssize_t n            # events of this type index in the batch
    Py_ssize_t n_ok         # events that pass the per-event checks
    Py_ssize_t bytes_ok     # ring bytes they need
    int status
    int reason


@cython.final
cdef class Router:
    """Maps event type names to rings and splits batch frames into them."""
    cdef dict _rings
    cdef public Py_ssize_t max_events_per_batch
    cdef public Py_ssize_t max_event_bytes
    cdef public unsigned long long batches_in

    def __init__(self, *, Py_ssize_t max_events_per_batch, Py_ssize_t max_event_bytes):
        self._rings = {}
        self.max_events_per_batch = max_events_per_batch
        self.max_event_bytes = max_event_bytes

    def add(self, TypeRing ring not None):
        self._rings[ring.name_bytes] = ring

    def remove(self, str name):
        self._rings.pop(name.encode("utf-8"), None)

    def get(self, str name):
        return self._rings.get(name.encode("utf-8"))

    def rings(self):
        return list(self._rings.values())

    def ingest(self, FrameReader reader not None, int64_t now_ms, object allowed=None):
        """Split the reader's current EVENT_BATCH frame into the rings.

        ``allowed``: None, or the set of type names (bytes) this connection's
        producer may send; parts of other configured types are rejected
        ``forbidden`` (one set lookup per type in the batch, not per event).

        Returns ``(batch_seq, type_names, results)``; ``results`` is a list of
        ``(type_index, status, reason, count, indices, ring)``. ``indices``
        lists the events (by position in the batch) a per-event rejection
        covers, else None; ``ring`` is set for C_STATUS_ACCEPTED parts. Nothing
        is written unless the whole frame is well formed.
        """
        cdef const unsigned char *b = reader._body
        cdef Py_ssize_t blen = reader._body_len
        cdef Py_ssize_t pos, i, nt, ne, klen, vlen, need, ti
        cdef unsigned long long seq
        cdef _TypeAcc *acc = NULL
        cdef list names = []
        cdef list results = []
        cdef list rejected_lists
        cdef TypeRing ring
        cdef object ro
        cdef const unsigned char *ev
        cdef Py_ssize_t start
        cdef Py_ssize_t admitted = 0
        cdef int reason
        if b == NULL or reader.frame_type != C_FRAME_EVENT_BATCH:
            raise ValueError("reader is not positioned on an EVENT_BATCH frame")
        if blen < 10:
            raise ProtocolError(C_ERR_MALFORMED_FRAME, "event batch shorter than its header")
        seq = eb_ld64(b)
        nt = eb_ld16(b + 8)
        pos = 10
        if nt == 0:
            raise ProtocolError(C_ERR_MALFORMED_FRAME, "event batch has no type table")
        if nt > MAX_TYPES_PER_BATCH:
            raise ProtocolError(C_ERR_MALFORMED_FRAME, f"{nt} types in one batch; at most {MAX_TYPES_PER_BATCH}")
        for i in range(nt):
            if pos >= blen or pos + 1 + b[pos] > blen:
                raise ProtocolError(C_ERR_MALFORMED_FRAME, "type table runs past the frame")
            if b[pos] == 0:
                raise ProtocolError(C_ERR_MALFORMED_FRAME, "empty event type name")
            names.append(PyBytes_FromStringAndSize(<const char *>b + pos + 1, b[pos]))
            pos += 1 + b[pos]
        if len(set(names)) != nt:
            raise ProtocolError(C_ERR_MALFORMED_FRAME, "a type name is listed twice in the type table")
        if pos + 4 > blen:
            raise ProtocolError(C_ERR_MALFORMED_FRAME, "event batch ends before its event count")
        ne = eb_ld32(b + pos)
        pos += 4
        if ne > self.max_events_per_batch:
            raise ProtocolError(
                C_ERR_TOO_MANY_EVENTS,
                f"batch of {ne} events exceeds max_events_per_batch={self.max_events_per_batch}",
            )
        acc = <_TypeAcc *>calloc(nt, sizeof(_TypeAcc))
        if acc == NULL:
            raise MemoryError()
        rejected_lists = [None] * nt
        try:
            for i in range(nt):
                ro = self._rings.get(names[i])
                if ro is not None and allowed is not None and names[i] not in allowed:
                    acc[i].forbidden = 1
                    ro = None
                acc[i].ring = <PyObject *>ro if ro is not None else NULL
            start = pos
            # Pass 1: check the framing of every event, count and size parts.
            for i in range(ne):
                if pos + EVENT_HEADER_BYTES > blen:
                    raise ProtocolError(C_ERR_MALFORMED_FRAME, f"event {i} runs past the frame")
                ev = b + pos
                ti = eb_ld16(ev)
                klen = eb_ld16(ev + 2)
                vlen = eb_ld32(ev + 4)
                if ti >= nt:
                    raise ProtocolError(C_ERR_MALFORMED_FRAME, f"event {i} has type index {ti} of {nt}")
                need = EVENT_HEADER_BYTES + klen + vlen
                if pos + need > blen:
                    raise ProtocolError(C_ERR_MALFORMED_FRAME, f"event {i} runs past the frame")
                pos += need
                acc[ti].n += 1
                if acc[ti].ring == NULL:
                    continue
                ring = <TypeRing>acc[ti].ring
                reason = _event_reason(ev, klen, vlen, ring, self.max_event_bytes)
                if reason:
                    if rejected_lists[ti] is None:
                        rejected_lists[ti] = {}
                    rejected_lists[ti].setdefault(reason, []).append(i)
                    continue
                acc[ti].n_ok += 1
                acc[ti].bytes_ok += ring._entry_bytes(klen, vlen)
            if pos != blen:
                raise ProtocolError(C_ERR_MALFORMED_FRAME, f"{blen - pos} bytes after the last event")
            # Decide each part: unknown, disabled, no room, or accepted.
            for i in range(nt):
                if acc[i].n == 0:
                    continue
                if acc[i].ring == NULL:
                    results.append((i, C_STATUS_REJECTED,
                                    C_REASON_FORBIDDEN if acc[i].forbidden else C_REASON_UNKNOWN_TYPE,
                                    acc[i].n, None, None))
                    continue
                ring = <TypeRing>acc[i].ring
                if not ring.enabled:
                    results.append((i, C_STATUS_REJECTED, C_REASON_DISABLED, acc[i].n, None, None))
                    continue
                if rejected_lists[i] is not None:
                    for reason, idx_list in rejected_lists[i].items():
                        results.append((i, C_STATUS_REJECTED, reason, len(idx_list), idx_list, None))
                if acc[i].n_ok == 0:
                    continue
                if not ring.accepting:
                    results.append((i, C_STATUS_RETRY_LATER, ring.refuse_reason, acc[i].n_ok, None, None))
                    continue
                # An empty ring always takes one part, so any valid batch makes
                # progress; the bound is capacity plus one frame's worth.
                if ring.used_bytes and acc[i].bytes_ok > ring.capacity_bytes - ring.used_bytes:
                    results.append((i, C_STATUS_RETRY_LATER, C_REASON_OVERLOADED, acc[i].n_ok, None, None))
                    continue
                # The shared budget: each priority is admitted up to its share
                # (low types are refused first). At the top share an empty ring
                # still takes one part, so critical types always progress.
                if (ring._budget is not None and ring.admit_limit_bytes
                        and ring._budget.used_bytes + admitted + acc[i].bytes_ok > ring.admit_limit_bytes
                        and not (ring.used_bytes == 0 and ring.admit_limit_bytes >= ring._budget.limit_bytes)):
                    results.append((i, C_STATUS_RETRY_LATER, C_REASON_OVERLOADED, acc[i].n_ok, None, None))
                    continue
                admitted += acc[i].bytes_ok  # earlier parts of this batch count too
                acc[i].status = C_STATUS_ACCEPTED
                results.append((i, C_STATUS_ACCEPTED, C_REASON_NONE, acc[i].n_ok, None, ring))
            # Pass 2: copy accepted events into their rings.
            pos = start
            for i in range(ne):
                ev = b + pos
                ti = eb_ld16(ev)
                klen = eb_ld16(ev + 2)
                vlen = eb_ld32(ev + 4)
                pos += EVENT_HEADER_BYTES + klen + vlen
                if acc[ti].status != C_STATUS_ACCEPTED:
                    continue
                ring = <TypeRing>acc[ti].ring
                if _event_reason(ev, klen, vlen, ring, self.max_event_bytes):
                    continue
                ring._write(ev, now_ms)
            self.batches_in += 1
            return seq, names, results
        finally:
            free(acc)


cdef inline int _event_reason(const unsigned char *ev, Py_ssize_t klen, Py_ssize_t vlen,
                              TypeRing ring, Py_ssize_t global_max):
    cdef uint64_t id_hi, id_lo
    if vlen == 0 or (ev[8] & 0x80):  # empty payload, or a negative timestamp
        return C_REASON_INVALID
    memcpy(&id_hi, ev + 16, 8)
    memcpy(&id_lo, ev + 24, 8)
    if id_hi == 0 and id_lo == 0:
        return C_REASON_INVALID
    if klen + vlen > ring.max_event_bytes or klen + vlen > global_max:
        return C_REASON_TOO_LARGE
    return 0


@cython.final
cdef class BatchEncoder:
    """Builds EVENT_BATCH frames for producers (the SDK and load generators)."""
    cdef unsigned char *_buf
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _len
    cdef readonly Py_ssize_t count
    cdef list _types
    cdef dict _type_index
    cdef Py_ssize_t _types_bytes

    def __cinit__(self):
        self._buf = NULL
        self._cap = 0
        self._len = 0
        self._types = []
        self._type_index = {}
        self._types_bytes = 0

    def __dealloc__(self):
        free(self._buf)

    @property
    def frame_bytes(self):
        """Size of the frame ``finish`` would return now."""
        return HEADER_BYTES + 14 + self._types_bytes + self._len

    @property
    def type_names(self):
        return list(self._types)

    @property
    def type_count(self):
        return len(self._types)

    cdef int _grow(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t cap = self._cap
        cdef unsigned char *nb
        if self._len + extra <= cap:
            return 0
        if cap < 4096:
            cap = 4096
        while cap < self._len + extra:
            cap *= 2
        nb = <unsigned char *>realloc(self._buf, cap)
        if nb == NULL:
            raise MemoryError()
        self._buf = nb
        self._cap = cap
        return 0

    def type_index(self, bytes type_name):
        """Index of ``type_name`` in this batch's type table (added if new)."""
        cdef object ti = self._type_index.get(type_name)
        if ti is None:
            if not 0 < len(type_name) <= 255:
                raise ValueError("event type name must be 1..255 bytes")
            if len(self._types) >= MAX_TYPES_PER_BATCH:
                raise ValueError(f"more than {MAX_TYPES_PER_BATCH} event types in one batch")
            ti = len(self._types)
            self._types.append(type_name)
            self._type_index[type_name] = ti
            self._types_bytes += 1 + len(type_name)
        return ti

    def add(self, bytes type_name, event_id, int64_t timestamp_ms, key, value):
        """Append one event; returns its type index."""
        cdef Py_buffer kv, vv, iv
        cdef unsigned char *p
        cdef int ti = self.type_index(type_name)
        cdef bint has_key = key is not None
        PyObject_GetBuffer(event_id, &iv, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(value, &vv, PyBUF_SIMPLE)
        except BaseException:
            PyBuffer_Release(&iv)
            raise
        if has_key:
            try:
                PyObject_GetBuffer(key, &kv, PyBUF_SIMPLE)
            except BaseException:
                PyBuffer_Release(&iv)
                PyBuffer_Release(&vv)
                raise
        try:
            if iv.len != 16:
                raise ValueError("event_id must be 16 bytes")
            if has_key and kv.len > 65535:
                raise ValueError("key longer than 65535 bytes")
            if vv.len > 0xFFFFFFFF:
                raise ValueError("payload too large")
            self._grow(EVENT_HEADER_BYTES + (kv.len if has_key else 0) + vv.len)
            p = self._buf + self._len
            eb_st16(p, <uint16_t>ti)
            eb_st16(p + 2, <uint16_t>(kv.len if has_key else 0))
            eb_st32(p + 4, <uint32_t>vv.len)
            eb_st64(p + 8, <uint64_t>timestamp_ms)
            memcpy(p + 16, iv.buf, 16)
            p += EVENT_HEADER_BYTES
            if has_key:
                memcpy(p, kv.buf, kv.len)
                p += kv.len
            memcpy(p, vv.buf, vv.len)
            self._len = (p + vv.len) - self._buf
            self.count += 1
            return ti
        finally:
            PyBuffer_Release(&iv)
            PyBuffer_Release(&vv)
            if has_key:
                PyBuffer_Release(&kv)

    def finish(self, unsigned long long batch_seq):
        """Return the whole EVENT_BATCH frame (header included) and reset."""
        cdef Py_ssize_t body_len = 14 + self._types_bytes + self._len
        cdef bytes out = PyBytes_FromStringAndSize(NULL, HEADER_BYTES + body_len)
        cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
        cdef unsigned char *w = p + HEADER_BYTES
        cdef bytes name
        cdef uint32_t crc
        eb_st32(p, <uint32_t>body_len)
        p[4] = C_FRAME_EVENT_BATCH
        p[5] = p[6] = p[7] = 0
        eb_st64(w, batch_seq)
        eb_st16(w + 8, <uint16_t>len(self._types))
        w += 10
        for name in self._types:
            w[0] = <unsigned char>len(name)
            memcpy(w + 1, PyBytes_AS_STRING(name), len(name))
            w += 1 + len(name)
        eb_st32(w, <uint32_t>self.count)
        w += 4
        if self._len:
            memcpy(w, self._buf, self._len)
        crc = eb_crc32c(0, p + 4, 4)
        crc = eb_crc32c(crc, p + HEADER_BYTES, <size_t>body_len)
        eb_st32(p + 8, crc)
        self.reset()
        return out

    def reset(self):
        self._len = 0
        self.count = 0
        self._types = []
        self._type_index = {}
        self._types_bytes = 0
