# Included by _fastpath.pyx (one extension module); see its header for the wire format.
"""The SDK's send path: events go from ``produce()`` straight into the open
EVENT_BATCH, and each sealed batch keeps what the producer needs until every
event in it is answered, in C, with no Python object per event.

``ProducerCore`` owns the open batch, the event ids, the buffered-event count
and the limits the server announced; ``OutBatch`` is a sealed frame with its
per-type counts, and, only when something needs them (an index in an ACK, a
retry, a future), the offset of each event and which ones are answered.
Retry-later and reconnect resends copy events out of the frames they were
sent in (``ProducerCore.readd``): the frame is the only copy of an event.
"""

from cpython.bytes cimport PyBytes_Check, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.pythread cimport (PyThread_acquire_lock, PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_release_lock, PyThread_type_lock)

from eventbroker.errors import BufferFull, EventRejected, ProducerClosed, UsageError

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_REALTIME

cdef enum:
    _NAME_CACHE_MAX = 4096   # distinct (type, version) names remembered between batches
    _FRAME_SLACK = 256       # room left in a frame for the batch head


cdef inline int64_t _now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


@cython.final
cdef class OutBatch:
    """A sealed EVENT_BATCH and which of its events are still unanswered."""
    cdef readonly unsigned long long seq
    cdef readonly bytes frame
    cdef readonly Py_ssize_t count
    cdef readonly Py_ssize_t left       # events not answered yet
    cdef readonly list type_names       # bytes, by type index
    cdef public object futures          # list (a future, a callable or None per event), or None
    cdef uint32_t *_type_left           # per type index: events not answered yet
    cdef uint32_t *_offs                # per event: offset of its header in the frame (lazily)
    cdef unsigned char *_answered       # per event (lazily)
    cdef unsigned char *_type_done      # per type index: answered as a whole before _answered existed

    def __dealloc__(self):
        free(self._type_left)
        free(self._offs)
        free(self._answered)
        free(self._type_done)

    cdef int _index(self) except -1:
        """Find each event in the frame, and mark the types answered as a whole."""
        cdef const unsigned char *base
        cdef const unsigned char *p
        cdef Py_ssize_t i
        cdef uint16_t ti
        if self._offs != NULL:
            return 0
        self._answered = <unsigned char *>calloc(self.count if self.count else 1, 1)
        if self._answered == NULL:
            raise MemoryError()
        self._offs = <uint32_t *>malloc(sizeof(uint32_t) * (self.count if self.count else 1))
        if self._offs == NULL:
            free(self._answered)
            self._answered = NULL
            raise MemoryError()
        base = <const unsigned char *>PyBytes_AS_STRING(self.frame)
        p = base + C_FRAME_HEADER_BYTES + 10
        for i in range(len(self.type_names)):
            p += 1 + p[0]
        p += 4
        for i in range(self.count):
            self._offs[i] = <uint32_t>(p - base)
            ti = eb_ld16(p)
            if self._type_done[ti]:
                self._answered[i] = 1
            p += C_EVENT_HEADER_BYTES + eb_ld16(p + 2) + eb_ld32(p + 4)
        return 0

    def take(self, int type_index, indices, bint want_list):
        """Mark answered what one ACK entry covers: the events ``indices``
        lists or, when it lists none, every unanswered event of ``type_index``.
        Returns how many, or (``want_list``) the list of their indices."""
        cdef Py_ssize_t i, n = 0
        cdef list out = [] if want_list else None
        cdef const unsigned char *base
        if not 0 <= type_index < len(self.type_names):
            return out if want_list else 0
        if not indices and not want_list and self._offs == NULL:
            n = self._type_left[type_index]     # the common case: a whole part, no futures
            self._type_left[type_index] = 0
            self._type_done[type_index] = 1
            self.left -= n
            return n
        self._index()
        base = <const unsigned char *>PyBytes_AS_STRING(self.frame)
        if indices:
            for i in indices:
                if 0 <= i < self.count and not self._answered[i] and eb_ld16(base + self._offs[i]) == type_index:
                    self._answered[i] = 1
                    n += 1
                    if want_list:
                        out.append(i)
        else:
            for i in range(self.count):
                if not self._answered[i] and eb_ld16(base + self._offs[i]) == type_index:
                    self._answered[i] = 1
                    n += 1
                    if want_list:
                        out.append(i)
            self._type_done[type_index] = 1
        self._type_left[type_index] -= n
        self.left -= n
        return out if want_list else n

    def unanswered(self):
        """Indices of the events not answered yet."""
        cdef Py_ssize_t i
        self._index()
        return [i for i in range(self.count) if not self._answered[i]]

    def event_id(self, Py_ssize_t i):
        self._index()
        if not 0 <= i < self.count:
            raise IndexError(i)
        return PyBytes_FromStringAndSize(<char *>PyBytes_AS_STRING(self.frame) + self._offs[i] + 16, 16)

    def event_type(self, Py_ssize_t i):
        """The type name event ``i`` was sent under (``type@version`` when one was named)."""
        self._index()
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self.type_names[eb_ld16(<const unsigned char *>PyBytes_AS_STRING(self.frame) + self._offs[i])]


@cython.final
cdef class ProducerCore:
    """The open batch of a producer, sealed into ``OutBatch`` frames.

    ``on_first()`` is called when an event lands in an empty batch (arm the
    linger timer), ``on_sealed()`` after batches were appended to ``sealed``;
    both at most once per call, after the call's change is complete and
    outside the lock.

    Thread safety: ``produce``, ``readd``, ``seal``, ``take_sealed`` and
    ``resolved`` hold the core's lock while they change it (a
    ``SyncProducer`` produces from its callers' threads while its loop thread
    seals and answers; the GIL alone is not enough, since an allocation can
    run the garbage collector and with it another thread's Python code). The
    lock is taken without waiting when it is free, and with the GIL released
    when it is not. ``OutBatch`` objects belong to the loop thread.
    """
    cdef PyThread_type_lock _lock
    cdef unsigned char *_buf
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _len
    cdef uint32_t *_tcounts
    cdef Py_ssize_t _tcap
    cdef readonly Py_ssize_t count          # events in the open batch
    cdef list _types
    cdef dict _type_index
    cdef Py_ssize_t _types_bytes
    cdef list _futs
    cdef dict _names
    cdef unsigned char _prefix[8]
    cdef uint64_t _counter
    cdef unsigned long long _seq
    cdef readonly Py_ssize_t unresolved     # produced and not answered yet
    cdef readonly unsigned long long produced
    cdef public Py_ssize_t max_buffered
    cdef public Py_ssize_t max_event_bytes
    cdef public Py_ssize_t frame_limit
    cdef public Py_ssize_t max_events
    cdef public Py_ssize_t batch_max_bytes
    cdef public bint closed
    cdef public object closed_error         # raised by produce() once closed (default ProducerClosed)
    cdef list sealed  # handed over by take_sealed
    cdef public object on_first
    cdef public object on_sealed
    cdef bint _first_due
    cdef bint _sealed_due

    def __cinit__(self, bytes id_prefix, Py_ssize_t batch_max_bytes, Py_ssize_t max_buffered):
        if len(id_prefix) != 8:
            raise ValueError("id_prefix must be 8 bytes")
        self._lock = PyThread_allocate_lock()
        if self._lock == NULL:
            raise MemoryError()
        memcpy(self._prefix, PyBytes_AS_STRING(id_prefix), 8)
        self._counter = 0
        self._seq = 0
        self._types = []
        self._type_index = {}
        self._names = {}
        self._futs = None
        self.sealed = []
        self.batch_max_bytes = batch_max_bytes
        self.max_buffered = max_buffered
        self.max_event_bytes = 512 * 1024
        self.frame_limit = 1024 * 1024
        self.max_events = 65536
        self.on_first = None
        self.on_sealed = None

    def __dealloc__(self):
        free(self._buf)
        free(self._tcounts)
        if self._lock != NULL:
            PyThread_free_lock(self._lock)

    cdef inline void _acquire(self):
        if not PyThread_acquire_lock(self._lock, 0):
            with nogil:
                PyThread_acquire_lock(self._lock, 1)

    cdef inline void _release(self):
        PyThread_release_lock(self._lock)

    cdef inline Py_ssize_t _frame_bytes(self) noexcept:
        return C_FRAME_HEADER_BYTES + 14 + self._types_bytes + self._len

    @property
    def id_prefix(self):
        return PyBytes_FromStringAndSize(<char *>self._prefix, 8)

    cdef bytes _name(self, object event_type, object schema_version):
        cdef object cache_key
        if schema_version is not None and (type(schema_version) is not int or schema_version < 1):
            raise UsageError("schema_version must be a positive integer")  # before the cache: True == 1
        cache_key = event_type if schema_version is None else (event_type, schema_version)
        cdef PyObject *hit = PyDict_GetItem(self._names, cache_key)
        cdef bytes name
        if hit != NULL:
            return <bytes>hit
        if not isinstance(event_type, str):
            raise UsageError("event type must be a str")
        if schema_version is not None:
            name = f"{event_type}@{schema_version}".encode("utf-8")
        else:
            name = (<str>event_type).encode("utf-8")
        if not 0 < len(name) <= 255:
            raise UsageError("event type name must be 1..255 bytes of UTF-8")
        if len(self._names) < _NAME_CACHE_MAX:
            self._names[cache_key] = name
        return name

    cdef int _type_slot(self, bytes name) except -1:
        cdef PyObject *hit = PyDict_GetItem(self._type_index, name)
        cdef Py_ssize_t ti, cap
        cdef uint32_t *nc
        if hit != NULL:
            return <int><object>hit
        ti = len(self._types)
        if ti >= self._tcap:
            cap = self._tcap * 2 if self._tcap else 16
            nc = <uint32_t *>realloc(self._tcounts, sizeof(uint32_t) * cap)
            if nc == NULL:
                raise MemoryError()
            self._tcounts = nc
            self._tcap = cap
        self._tcounts[ti] = 0
        self._types.append(name)
        self._type_index[name] = ti
        self._types_bytes += 1 + len(name)
        return <int>ti

    cdef int _grow(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t cap = self._cap
        cdef unsigned char *nb
        if self._len + extra <= cap:
            return 0
        if cap < 65536:
            cap = 65536
        while cap < self._len + extra:
            cap *= 2
        nb = <unsigned char *>realloc(self._buf, cap)
        if nb == NULL:
            raise MemoryError()
        self._buf = nb
        self._cap = cap
        return 0

    cdef int _append(self, bytes name, const unsigned char *eid, int64_t ts, const unsigned char *key,
                     Py_ssize_t kl, const unsigned char *val, Py_ssize_t vl,
                     object fut) except -1:
        """One event into the open batch (sealing it first when the event
        would not fit); the event's size was checked by the caller."""
        cdef Py_ssize_t size = C_EVENT_HEADER_BYTES + kl + vl
        cdef bint new_type = PyDict_GetItem(self._type_index, name) == NULL
        cdef unsigned char *p
        cdef int ti
        if self.count and (
            self._frame_bytes() + size + (1 + len(name) if new_type else 0) + _FRAME_SLACK > self.frame_limit
            or self.count >= self.max_events
            or (new_type and len(self._types) >= C_MAX_TYPES_PER_BATCH)
        ):
            self._seal()
        if fut is not None and self._futs is None:
            self._futs = [None] * self.count  # allocated before the event is written (see produce)
        ti = self._type_slot(name)
        self._grow(size)
        p = self._buf + self._len
        eb_st16(p, <uint16_t>ti)
        eb_st16(p + 2, <uint16_t>kl)
        eb_st32(p + 4, <uint32_t>vl)
        eb_st64(p + 8, <uint64_t>ts)
        memcpy(p + 16, eid, 16)
        if kl:
            memcpy(p + C_EVENT_HEADER_BYTES, key, kl)
        if vl:
            memcpy(p + C_EVENT_HEADER_BYTES + kl, val, vl)
        self._len += size
        self._tcounts[ti] += 1
        if self._futs is not None:
            self._futs.append(fut)
        self.count += 1
        if self.count == 1:
            self._first_due = True
        if self._frame_bytes() >= self.batch_max_bytes:
            self._seal()
        return 0

    cdef int _seal(self) except -1:
        cdef OutBatch b
        cdef Py_ssize_t nt = len(self._types)
        if self.count == 0:
            return 0
        self._seq += 1
        b = OutBatch.__new__(OutBatch)
        b.seq = self._seq
        b.frame = _batch_frame(self._seq, self._types, self._types_bytes, self.count, self._buf, self._len)
        b.count = self.count
        b.left = self.count
        b.type_names = self._types
        b.futures = self._futs
        b._type_left = <uint32_t *>malloc(sizeof(uint32_t) * nt)
        b._type_done = <unsigned char *>calloc(nt, 1)
        if b._type_left == NULL or b._type_done == NULL:
            raise MemoryError()
        memcpy(b._type_left, self._tcounts, sizeof(uint32_t) * nt)
        self.sealed.append(b)
        self._len = 0
        self.count = 0
        self._types = []
        self._type_index = {}
        self._types_bytes = 0
        self._futs = None
        self._first_due = False
        self._sealed_due = True
        return 0

    cdef int _due(self) noexcept:
        """Which callbacks the change just made owes (1 sealed, 2 first), cleared; under the lock."""
        cdef int due = (1 if self._sealed_due else 0) | (2 if self._first_due and self.count else 0)
        self._sealed_due = False
        self._first_due = False
        return due

    cdef int _callbacks(self, int due) except -1:
        """Called after the lock is released."""
        if due & 1 and self.on_sealed is not None:
            self.on_sealed()
        if due & 2 and self.on_first is not None:
            self.on_first()
        return 0

    def produce(self, event_type, payload, key=None, timestamp_ms=None, event_id=None, schema_version=None,
                on_delivery=None):
        """Add one event to the open batch; ``on_delivery``: a future or a
        callable to answer once the event is (or cannot be) persisted. Raises
        ``ProducerClosed`` (or the error that closed the producer),
        ``BufferFull`` (``max_buffered`` events unanswered), ``UsageError``
        (bad arguments) or ``EventRejected`` (``too_large``), adding nothing."""
        cdef Py_buffer kv, vv, iv
        cdef bint key_buf = False, val_buf = False, id_buf = False
        cdef const unsigned char *kp = NULL
        cdef const unsigned char *vp
        cdef const unsigned char *ip = NULL
        cdef Py_ssize_t kl = 0, vl, i
        cdef unsigned char gen_id[16]
        cdef int64_t ts
        cdef bytes name
        cdef int due = 0
        if self.closed:
            if self.closed_error is not None:
                raise self.closed_error.with_traceback(None)  # one instance: no traceback piling up
            raise ProducerClosed("producer is closed")
        name = self._name(event_type, schema_version)
        ts = _now_ms() if timestamp_ms is None else <int64_t>timestamp_ms
        if PyBytes_Check(payload):
            vp = <const unsigned char *>PyBytes_AS_STRING(payload)
            vl = PyBytes_GET_SIZE(payload)
        else:
            PyObject_GetBuffer(payload, &vv, PyBUF_SIMPLE)
            val_buf = True
            vp = <const unsigned char *>vv.buf
            vl = vv.len
        try:
            if key is not None:
                if PyBytes_Check(key):
                    kp = <const unsigned char *>PyBytes_AS_STRING(key)
                    kl = PyBytes_GET_SIZE(key)
                else:
                    PyObject_GetBuffer(key, &kv, PyBUF_SIMPLE)
                    key_buf = True
                    kp = <const unsigned char *>kv.buf
                    kl = kv.len
                if kl > 65535:
                    raise UsageError("key longer than 65535 bytes")
            if event_id is not None:
                PyObject_GetBuffer(event_id, &iv, PyBUF_SIMPLE)
                id_buf = True
                ip = <const unsigned char *>iv.buf
                if iv.len != 16:
                    raise UsageError("event_id must be 16 bytes, not all zero")
                for i in range(16):
                    if ip[i]:
                        break
                else:
                    raise UsageError("event_id must be 16 bytes, not all zero")
            if vl + kl > self.max_event_bytes:
                if ip == NULL:
                    memcpy(gen_id, self._prefix, 8)
                    memset(gen_id + 8, 0, 8)  # not sent: it takes no number from the counter
                    ip = gen_id
                raise EventRejected("too_large", PyBytes_FromStringAndSize(<char *>ip, 16), str(event_type))
            self._acquire()
            try:
                if self.unresolved >= self.max_buffered:
                    raise BufferFull(f"{self.unresolved} events are waiting for their acknowledgement "
                                     f"(max_buffered_events); wait for space and produce again")
                if ip == NULL:
                    self._counter += 1
                    memcpy(gen_id, self._prefix, 8)
                    eb_st64(gen_id + 8, self._counter)
                    ip = gen_id
                self._append(name, ip, ts, kp, kl, vp, vl, on_delivery)
                self.unresolved += 1
                self.produced += 1
                due = self._due()
            finally:
                self._release()
        finally:
            if val_buf:
                PyBuffer_Release(&vv)
            if key_buf:
                PyBuffer_Release(&kv)
            if id_buf:
                PyBuffer_Release(&iv)
        self._callbacks(due)

    def readd(self, OutBatch b, indices):
        """Put events of a sent batch (by index) into the open batch again,
        with their futures; they stay counted in ``unresolved``."""
        cdef const unsigned char *base = <const unsigned char *>PyBytes_AS_STRING(b.frame)
        cdef const unsigned char *p
        cdef Py_ssize_t i, kl
        cdef list futs = b.futures
        cdef int due = 0
        b._index()
        for i in indices:
            if not 0 <= i < b.count:
                raise IndexError(i)
        self._acquire()
        try:
            for i in indices:
                p = base + b._offs[i]
                kl = eb_ld16(p + 2)
                self._append(<bytes>b.type_names[eb_ld16(p)], p + 16, <int64_t>eb_ld64(p + 8),
                             p + C_EVENT_HEADER_BYTES, kl, p + C_EVENT_HEADER_BYTES + kl, eb_ld32(p + 4),
                             futs[i] if futs is not None else None)
            due = self._due()
        finally:
            self._release()
        self._callbacks(due)

    def seal(self):
        """Seal the open batch (if it holds events) into ``sealed``."""
        cdef int due = 0
        self._acquire()
        try:
            self._seal()
            due = self._due()
        finally:
            self._release()
        self._callbacks(due)

    def take_sealed(self, bint seal_open=False):
        """The sealed batches, oldest first, handed over (``sealed`` is
        emptied); ``seal_open``: the open batch too, without callbacks."""
        cdef list out
        self._acquire()
        try:
            if seal_open:
                self._seal()
                self._sealed_due = False
            out = self.sealed
            self.sealed = []
            return out
        finally:
            self._release()

    def resolved(self, Py_ssize_t n):
        """``n`` events were answered (or given up)."""
        self._acquire()
        self.unresolved -= n
        self._release()
