# Included by _fastpath.pyx (one extension module); see its header for the wire format.
"""EVENT_BATCH frames built on the producer side: ``BatchEncoder`` for the load
generators and tests, ``_batch_frame`` for it and the SDK (producer.pxi)."""


cdef bytes _batch_frame(unsigned long long seq, list types, Py_ssize_t types_bytes, Py_ssize_t count,
                        const unsigned char *events, Py_ssize_t events_len):
    """A whole EVENT_BATCH frame (header, CRC and body) around encoded events."""
    cdef Py_ssize_t body_len = 14 + types_bytes + events_len
    cdef bytes out = PyBytes_FromStringAndSize(NULL, C_FRAME_HEADER_BYTES + body_len)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    cdef unsigned char *w = p + C_FRAME_HEADER_BYTES
    cdef bytes name
    cdef uint32_t crc
    eb_st32(p, <uint32_t>body_len)
    p[4] = C_FRAME_EVENT_BATCH
    p[5] = p[6] = p[7] = 0
    eb_st64(w, seq)
    eb_st16(w + 8, <uint16_t>len(types))
    w += 10
    for name in types:
        w[0] = <unsigned char>PyBytes_GET_SIZE(name)
        memcpy(w + 1, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        w += 1 + PyBytes_GET_SIZE(name)
    eb_st32(w, <uint32_t>count)
    w += 4
    if events_len:
        memcpy(w, events, events_len)
    crc = eb_crc32c(0, p + 4, 4)
    crc = eb_crc32c(crc, p + C_FRAME_HEADER_BYTES, <size_t>body_len)
    eb_st32(p + 8, crc)
    return out



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
        return C_FRAME_HEADER_BYTES + 14 + self._types_bytes + self._len

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
            if len(self._types) >= C_MAX_TYPES_PER_BATCH:
                raise ValueError(f"more than {C_MAX_TYPES_PER_BATCH} event types in one batch")
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
            self._grow(C_EVENT_HEADER_BYTES + (kv.len if has_key else 0) + vv.len)
            p = self._buf + self._len
            eb_st16(p, <uint16_t>ti)
            eb_st16(p + 2, <uint16_t>(kv.len if has_key else 0))
            eb_st32(p + 4, <uint32_t>vv.len)
            eb_st64(p + 8, <uint64_t>timestamp_ms)
            memcpy(p + 16, iv.buf, 16)
            p += C_EVENT_HEADER_BYTES
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
        cdef bytes out = _batch_frame(batch_seq, self._types, self._types_bytes, self.count, self._buf, self._len)
        self.reset()
        return out

    def reset(self):
        self._len = 0
        self.count = 0
        self._types = []
        self._type_index = {}
        self._types_bytes = 0
