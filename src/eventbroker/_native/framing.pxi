# Included by _fastpath.pyx (one extension module); see its header for the wire format.
"""Framing: checksums, the partitioner's hash, frame encoding and the frame splitter."""


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


def encode_frame(int frame_type, body, int flags=0):
    """Return header + body as one ``bytes``, with the checksum filled in;
    ``flags``: the header's flags byte (``COMPRESSED_FRAME_FLAG``)."""
    cdef Py_buffer view
    cdef bytes out
    cdef unsigned char *p
    cdef uint32_t crc
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        if view.len > 0xFFFFFFFF:
            raise ValueError("frame body too large")
        out = PyBytes_FromStringAndSize(NULL, C_FRAME_HEADER_BYTES + view.len)
        p = <unsigned char *>PyBytes_AS_STRING(out)
        eb_st32(p, <uint32_t>view.len)
        p[4] = <unsigned char>frame_type
        p[5] = <unsigned char>flags
        p[6] = 0
        p[7] = 0
        memcpy(p + C_FRAME_HEADER_BYTES, view.buf, view.len)
        crc = eb_crc32c(0, p + 4, 4)
        crc = eb_crc32c(crc, p + C_FRAME_HEADER_BYTES, <size_t>view.len)
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
        readonly int frame_flags  # the current frame's header flags byte
        public int allowed_flags  # flags bits EVENT_BATCH frames may carry (negotiated in the handshake)
        object _body_owner  # a body put in place by replace_body
        public Py_ssize_t max_frame_bytes  # the gateway lowers it while a connection has not said HELLO
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
        self._body_owner = None
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
        self._body_owner = None
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
        if avail < C_FRAME_HEADER_BYTES:
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
        if h[6] != 0 or h[7] != 0 or (h[5] and (h[5] & ~self.allowed_flags or ftype != C_FRAME_EVENT_BATCH)):
            raise ProtocolError(C_ERR_MALFORMED_FRAME, "reserved frame header bits are not zero")
        if avail < C_FRAME_HEADER_BYTES + body_len:
            self._stash()
            return -1
        crc = eb_crc32c(0, h + 4, 4)
        crc = eb_crc32c(crc, h + C_FRAME_HEADER_BYTES, <size_t>body_len)
        if crc != eb_ld32(h + 8):
            raise ProtocolError(C_ERR_BAD_CHECKSUM, "frame checksum mismatch")
        self._body = h + C_FRAME_HEADER_BYTES
        self._body_len = body_len
        self._body_owner = None
        self._src_pos += C_FRAME_HEADER_BYTES + body_len
        self.frame_type = ftype
        self.frame_flags = h[5]
        self.frames_read += 1
        return ftype

    def body(self):
        """A copy of the current frame's body."""
        if self._body == NULL:
            return b""
        return PyBytes_FromStringAndSize(<const char *>self._body, self._body_len)

    def replace_body(self, bytearray body):
        """Make ``body`` the current frame's body (a decompressed EVENT_BATCH),
        for ``body()`` and ``Router.ingest`` until the next frame or feed."""
        self._body_owner = body
        self._body = <const unsigned char *>PyByteArray_AS_STRING(body)
        self._body_len = len(body)
        self.frame_flags = 0

    @property
    def body_length(self):
        return self._body_len

    @property
    def buffer_capacity(self):
        """Bytes allocated for partial frames (at least 64 KiB once one was held)."""
        return self._buf_cap

    @property
    def buffered_bytes(self):
        """Bytes of an incomplete frame held back (non-zero at EOF = truncated)."""
        return (self._buf_end - self._buf_start) + (self._src_len - self._src_pos)
