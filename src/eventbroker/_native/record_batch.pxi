# Included by _fastpath.pyx (one extension module); see its header for the wire format.
"""Kafka record batches (magic v2) built from a run of ring entries."""


cdef struct _PartState:
    Py_ssize_t count
    Py_ssize_t size
    int64_t base_ts
    int64_t max_ts
    unsigned char *out
    unsigned char *start




cdef object _build_unit(TypeRing ring, Py_ssize_t max_bytes, int n_partitions, int sticky_partition):
    """``TypeRing.build_unit``: one record batch per partition the run touches,
    CRC-32C filled in, in two passes over the entries (size, then write).
    Dead-letter entries (schema failures of a type that keeps them) make one
    more batch, for the dead-letter topic's partition 0, under partition
    ``C_DEAD_LETTER_PARTITION``."""
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
    if ring.pending_events == 0:
        return None
    if np_ < 1:
        raise ValueError("n_partitions must be >= 1")
    if not 0 <= sticky_partition < np_:
        raise ValueError("sticky_partition out of range")
    parts = <_PartState *>calloc(np_ + 1, sizeof(_PartState))
    if parts == NULL:
        raise MemoryError()
    try:
        # Pass 1: choose the entries and size each partition's batch.
        idx = ring._read_idx
        off = ring._read_off
        while n_events < ring.pending_events:
            c = <_Chunk>ring._chunks[idx]
            if off >= c.used:
                idx += 1
                off = 0
                continue
            e = c.data + off
            tail_len = eb_ld32(e)
            if eb_ld32(e + 12) & C_ENTRY_DEAD_LETTER:
                p = np_
            elif ring.by_key and eb_ld32(e + 8):
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
        end_seq = (<_Chunk>ring._chunks[idx]).seq
        end_off = off
        # Pass 2: write the batches.
        batches = []
        for i in range(np_ + 1):
            if parts[i].count:
                out = PyBytes_FromStringAndSize(NULL, KAFKA_BATCH_HEADER_BYTES + parts[i].size)
                batches.append((i if i < np_ else C_DEAD_LETTER_PARTITION, out, parts[i].count))
                parts[i].start = <unsigned char *>PyBytes_AS_STRING(out)
                parts[i].out = parts[i].start + KAFKA_BATCH_HEADER_BYTES
                parts[i].count = 0              # becomes the offset delta
        idx = ring._read_idx
        off = ring._read_off
        k = 0
        while k < n_events:
            c = <_Chunk>ring._chunks[idx]
            if off >= c.used:
                idx += 1
                off = 0
                continue
            e = c.data + off
            tail_len = eb_ld32(e)
            if eb_ld32(e + 12) & C_ENTRY_DEAD_LETTER:
                p = np_
            elif ring.by_key and eb_ld32(e + 8):
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
        for i in range(np_ + 1):
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
        ring._read_idx = end_idx
        ring._read_off = end_off
        ring.pending_events -= n_events
        ring.pending_bytes -= n_bytes
        return batches, n_events, n_bytes, end_seq, end_off
    finally:
        free(parts)


def compressed_record_batch(bytes batch, int codec, compressed):
    """The record batch ``batch`` (uncompressed, as ``build_unit`` made it)
    with its records replaced by ``compressed`` (what the codec made of
    them): attributes carry the codec (1 gzip, 2 snappy, 3 lz4, 4 zstd), the
    batch length and the CRC-32C are recomputed. One copy, no per-record work."""
    cdef Py_buffer cv
    cdef bytes out
    cdef unsigned char *w
    cdef const unsigned char *src = <const unsigned char *>PyBytes_AS_STRING(batch)
    if PyBytes_GET_SIZE(batch) < KAFKA_BATCH_HEADER_BYTES or src[16] != 2:
        raise ValueError("not a magic v2 record batch")
    if not 1 <= codec <= 4:
        raise ValueError("codec must be 1..4")
    PyObject_GetBuffer(compressed, &cv, PyBUF_SIMPLE)
    try:
        out = PyBytes_FromStringAndSize(NULL, KAFKA_BATCH_HEADER_BYTES + cv.len)
        w = <unsigned char *>PyBytes_AS_STRING(out)
        memcpy(w, src, KAFKA_BATCH_HEADER_BYTES)
        memcpy(w + KAFKA_BATCH_HEADER_BYTES, cv.buf, cv.len)
        eb_st32(w + 8, <uint32_t>(KAFKA_BATCH_HEADER_BYTES - 12 + cv.len))
        eb_st16(w + 21, <uint16_t>((eb_ld16(src + 21) & ~7) | codec))
        eb_st32(w + 17, eb_crc32c(0, w + 21, <size_t>(KAFKA_BATCH_HEADER_BYTES - 21 + cv.len)))
        return out
    finally:
        PyBuffer_Release(&cv)
