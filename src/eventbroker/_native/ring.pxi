# Included by _fastpath.pyx (one extension module); see its header for the wire format.
"""Per-type rings: bounded buffers of ready-made Kafka record tails."""


cdef bytes _varint(int64_t v):
    cdef unsigned char buf[10]
    cdef unsigned char *end = eb_put_varint(buf, v)
    return PyBytes_FromStringAndSize(<const char *>buf, end - buf)


def record_header(bytes key not None, bytes value not None):
    """One Kafka record header as record batches v2 hold it: varint key
    length, key, varint value length, value (ready for ``TypeRing`` entries)."""
    return _varint(len(key)) + key + _varint(len(value)) + value


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
    # The type's schemas (eventbroker.schema.TypeSchemas) or None: the
    # splitter validates each accepted part against them.
    cdef public object schemas
    # The gateway's UserKeys (personal.pxi) when the type has personal fields, else None.
    cdef public object keys
    cdef unsigned long long _seen_in  # the splitter's batch token that last named this ring

    def __init__(self, str name, *, Py_ssize_t capacity_bytes, Py_ssize_t max_event_bytes,
                 bint by_key=True, bint enabled=True, Py_ssize_t chunk_bytes=262144):
        cdef bytes nb = name.encode("utf-8")
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
        self._type_hdr = record_header(C_HEADER_EVENT_TYPE, nb)
        self.schemas = None
        self.keys = None

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

    cdef inline Py_ssize_t _entry_bytes(self, Py_ssize_t klen, Py_ssize_t vlen, Py_ssize_t extra=0):
        cdef Py_ssize_t tail = (eb_varint_size(klen if klen else -1) + klen
                                + eb_varint_size(vlen) + vlen + 1
                                + ID_HDR_BYTES + PyBytes_GET_SIZE(self._type_hdr)
                                + TS_HDR_BYTES + RECV_HDR_BYTES + extra)
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

    cdef int _write(self, const unsigned char *ev, int64_t now_ms, const unsigned char *extra=NULL,
                    Py_ssize_t extra_len=0, int extra_count=0, uint32_t flags=0,
                    const unsigned char *value=NULL, Py_ssize_t value_len=0) except -1:
        """Append one event (pointer at its 32-byte wire header) as an entry;
        ``extra``: ``extra_count`` more record headers, already encoded;
        ``value``: a payload that replaces the event's (personal fields sealed)."""
        cdef Py_ssize_t klen = eb_ld16(ev + 2)
        cdef Py_ssize_t vlen = eb_ld32(ev + 4) if value == NULL else value_len
        cdef int64_t ts = <int64_t>eb_ld64(ev + 8)
        cdef Py_ssize_t n = self._entry_bytes(klen, vlen, extra_len)
        cdef unsigned char *e = self._reserve(n)
        cdef unsigned char *p
        cdef const unsigned char *key = ev + C_EVENT_HEADER_BYTES
        eb_st32(e, <uint32_t>(n - ENTRY_HEADER_BYTES))
        eb_st32(e + 4, eb_murmur2(key, klen) if klen and self.by_key else 0)
        eb_st32(e + 8, 1 if klen else 0)
        eb_st32(e + 12, flags)
        eb_st64(e + 16, <uint64_t>ts)
        p = e + ENTRY_HEADER_BYTES
        p = eb_put_varint(p, klen if klen else -1)
        memcpy(p, key, klen)
        p += klen
        p = eb_put_varint(p, vlen)
        memcpy(p, key + klen if value == NULL else value, vlen)
        p += vlen
        p = eb_put_varint(p, 4 + extra_count)
        p[0] = 10
        memcpy(p + 1, PyBytes_AS_STRING(C_HEADER_EVENT_ID), 5)
        p[6] = 32
        memcpy(p + 7, ev + 16, 16)
        p += ID_HDR_BYTES
        memcpy(p, PyBytes_AS_STRING(self._type_hdr), PyBytes_GET_SIZE(self._type_hdr))
        p += PyBytes_GET_SIZE(self._type_hdr)
        p[0] = 10
        memcpy(p + 1, PyBytes_AS_STRING(C_HEADER_TIMESTAMP), 5)
        p[6] = 16
        eb_st64(p + 7, <uint64_t>ts)
        p += TS_HDR_BYTES
        p[0] = 20
        memcpy(p + 1, PyBytes_AS_STRING(C_HEADER_RECEIVED), 10)
        p[11] = 16
        eb_st64(p + 12, <uint64_t>now_ms)
        if extra_len:
            memcpy(p + RECV_HDR_BYTES, extra, extra_len)
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
        return _build_unit(self, max_bytes, n_partitions, sticky_partition)

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
