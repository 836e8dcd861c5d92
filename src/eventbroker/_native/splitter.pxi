# Included by _fastpath.pyx (one extension module); see its header for the wire format.
"""The batch splitter: checks a whole EVENT_BATCH frame, then copies each accepted part into its type's ring."""


cdef struct _TypeAcc:
    int forbidden           # the connection may not send this type
    int bad_version         # names a schema version the type does not have
    int dead_letter         # schema failures go to the dead-letter topic
    Py_ssize_t hdr_len      # bytes of the schema-version record header, if validated
    PyObject *hdr           # that header (bytes, kept alive by the version object)
    unsigned char *mask     # per event that passed the per-event checks: 1 = schema failure
    Py_ssize_t seen         # pass 2: such events met so far
    PyObject *ring          # borrowed from the ``rings`` list
    unsigned char *enc      # personal fields sealed: the part's new payloads (personal.pxi)
    uint32_t *enc_at        # per event that passed the per-event checks: (offset in enc, length)
    Py_ssize_t n            # events of this type index in the batch
    Py_ssize_t n_ok         # events that pass the per-event checks
    Py_ssize_t bytes_ok     # ring bytes they need
    int status
    int reason


@cython.final
cdef class BatchSplitter:
    """Maps event type names to rings and splits batch frames into them."""
    cdef dict _rings
    cdef public Py_ssize_t max_events_per_batch
    cdef public Py_ssize_t max_event_bytes
    cdef public unsigned long long batches_in
    cdef unsigned long long _batch_token  # marks the rings a batch's type table names
    # An event whose timestamp is further ahead of (behind) the gateway's
    # clock than this is rejected invalid_timestamp; 0: no limit.
    cdef public int64_t max_timestamp_ahead_ms
    cdef public int64_t max_timestamp_behind_ms

    def __init__(self, *, Py_ssize_t max_events_per_batch, Py_ssize_t max_event_bytes,
                 int64_t max_timestamp_ahead_ms=0, int64_t max_timestamp_behind_ms=0):
        self._rings = {}
        self.max_events_per_batch = max_events_per_batch
        self.max_event_bytes = max_event_bytes
        self.max_timestamp_ahead_ms = max_timestamp_ahead_ms
        self.max_timestamp_behind_ms = max_timestamp_behind_ms

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
        ``(type_index, status, reason, count, indices, ring, details)``.
        ``indices`` lists the events (by position in the batch) a per-event
        rejection covers, else None; ``ring`` is set for C_STATUS_ACCEPTED
        parts; ``details`` (schema_violation) gives each listed event's
        failure. Nothing is written unless the whole frame is well formed.

        A type table name ``<type>@<N>`` names the schema version its events
        are written against (``type_names`` then holds ``<type>``); a type
        with schemas validates every accepted part in one call.
        """
        return self._ingest(reader, now_ms, allowed, False)[:3]

    def ingest_answering(self, FrameReader reader not None, int64_t now_ms, object allowed=None):
        """``ingest`` for the gateway: the parts of types no ring has (unknown
        names, names no gateway could have) are answered here, in C, however
        many a batch lists (up to 4096): their ACK entries come back encoded,
        and ``results`` holds only the parts of configured types.

        Returns ``(batch_seq, type_names, results, entries, n_entries,
        unknown_type_events, invalid_type_name_events)``; ``entries`` is
        ``n_entries`` ACK entries (16 bytes each, no indices) to append to the
        batch's immediate ACK.
        """
        return self._ingest(reader, now_ms, allowed, True)

    cdef tuple _ingest(self, FrameReader reader, int64_t now_ms, object allowed, bint answer_unknown):
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
        cdef bytes entries = b""
        cdef unsigned char *w = NULL
        cdef Py_ssize_t n_entries = 0, unknown_events = 0, invalid_events = 0, k
        cdef object versions, sv, ver, base, vb, bad
        cdef list dead_letters = None
        cdef bint shared = False
        cdef bytes hdr, dl
        if b == NULL or reader.frame_type != C_FRAME_EVENT_BATCH:
            raise ValueError("reader is not positioned on an EVENT_BATCH frame")
        if blen < 10:
            raise ProtocolError(C_ERR_MALFORMED_FRAME, "event batch shorter than its header")
        seq = eb_ld64(b)
        nt = eb_ld16(b + 8)
        pos = 10
        if nt == 0:
            raise ProtocolError(C_ERR_MALFORMED_FRAME, "event batch has no type table")
        self._batch_token += 1
        if nt > C_MAX_TYPES_PER_BATCH:
            raise ProtocolError(C_ERR_MALFORMED_FRAME, f"{nt} types in one batch; at most {C_MAX_TYPES_PER_BATCH}")
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
        versions = None
        try:
            for i in range(nt):
                ro = self._rings.get(names[i])
                ver = 0
                if ro is None and b"@" in names[i]:
                    base, _, vb = (<bytes>names[i]).partition(b"@")
                    ro = self._rings.get(base)
                    if ro is not None:
                        names[i] = base
                        ver = _schema_version(vb)
                if ro is not None and allowed is not None and names[i] not in allowed:
                    acc[i].forbidden = 1
                    ro = None
                if ro is not None and ((<TypeRing>ro).schemas is not None or ver):
                    sv = (<TypeRing>ro).schemas.resolve(ver) if (<TypeRing>ro).schemas is not None and ver >= 0 \
                        else None
                    if sv is None:
                        acc[i].bad_version = 1
                        ro = None
                    else:
                        if versions is None:
                            versions = [None] * nt
                        versions[i] = sv
                        hdr = sv.header
                        acc[i].hdr = <PyObject *>hdr
                        acc[i].hdr_len = PyBytes_GET_SIZE(hdr)
                        acc[i].dead_letter = sv.dead_letter
                acc[i].ring = <PyObject *>ro if ro is not None else NULL
                if ro is not None:  # a ring met twice in this table (`play`, `play@1`)?
                    if (<TypeRing>ro)._seen_in == self._batch_token:
                        shared = True
                    (<TypeRing>ro)._seen_in = self._batch_token
            start = pos
            # Pass 1: check the framing of every event, count and size parts.
            for i in range(ne):
                if pos + C_EVENT_HEADER_BYTES > blen:
                    raise ProtocolError(C_ERR_MALFORMED_FRAME, f"event {i} runs past the frame")
                ev = b + pos
                ti = eb_ld16(ev)
                klen = eb_ld16(ev + 2)
                vlen = eb_ld32(ev + 4)
                if ti >= nt:
                    raise ProtocolError(C_ERR_MALFORMED_FRAME, f"event {i} has type index {ti} of {nt}")
                need = C_EVENT_HEADER_BYTES + klen + vlen
                if pos + need > blen:
                    raise ProtocolError(C_ERR_MALFORMED_FRAME, f"event {i} runs past the frame")
                pos += need
                acc[ti].n += 1
                if acc[ti].ring == NULL:
                    continue
                ring = <TypeRing>acc[ti].ring
                reason = _event_reason(ev, klen, vlen, ring, self, now_ms)
                if reason:
                    if rejected_lists[ti] is None:
                        rejected_lists[ti] = {}
                    rejected_lists[ti].setdefault(reason, []).append(i)
                    continue
                acc[ti].n_ok += 1
                acc[ti].bytes_ok += ring._entry_bytes(klen, vlen, acc[ti].hdr_len)
            if pos != blen:
                raise ProtocolError(C_ERR_MALFORMED_FRAME, f"{blen - pos} bytes after the last event")
            # Decide each part: unknown, disabled, no room, or accepted.
            if answer_unknown:
                entries = PyBytes_FromStringAndSize(NULL, nt * ACK_ENTRY_BYTES)
                w = <unsigned char *>PyBytes_AS_STRING(entries)
            for i in range(nt):
                if acc[i].n == 0:
                    continue
                if acc[i].bad_version:
                    results.append((i, C_STATUS_REJECTED, C_REASON_UNKNOWN_SCHEMA_VERSION, acc[i].n, None, None, None))
                    continue
                if acc[i].ring == NULL:
                    if acc[i].forbidden:
                        reason = C_REASON_FORBIDDEN
                    elif _valid_type_name(names[i]) or _versioned_name(names[i]):
                        reason = C_REASON_UNKNOWN_TYPE
                    else:
                        reason = C_REASON_INVALID_TYPE_NAME  # no gateway could be configured with it
                    if answer_unknown and not acc[i].forbidden:
                        # type_index, status, reason, count, retry_after_ms 0, index_count 0
                        eb_st16(w, <uint16_t>i)
                        w[2] = C_STATUS_REJECTED
                        w[3] = <unsigned char>reason
                        eb_st32(w + 4, <uint32_t>acc[i].n)
                        eb_st32(w + 8, 0)
                        eb_st32(w + 12, 0)
                        w += ACK_ENTRY_BYTES
                        n_entries += 1
                        if reason == C_REASON_UNKNOWN_TYPE:
                            unknown_events += acc[i].n
                        else:
                            invalid_events += acc[i].n
                        continue
                    results.append((i, C_STATUS_REJECTED, reason, acc[i].n, None, None, None))
                    continue
                ring = <TypeRing>acc[i].ring
                if not ring.enabled:
                    results.append((i, C_STATUS_REJECTED, C_REASON_DISABLED, acc[i].n, None, None, None))
                    continue
                if rejected_lists[i] is not None:
                    for reason, idx_list in rejected_lists[i].items():
                        results.append((i, C_STATUS_REJECTED, reason, len(idx_list), idx_list, None, None))
                if acc[i].n_ok == 0:
                    continue
                if not ring.accepting:
                    results.append((i, C_STATUS_RETRY_LATER, ring.refuse_reason, acc[i].n_ok, None, None, None))
                    continue
                # An empty ring always takes one part, so any valid batch makes
                # progress; the bound is capacity plus one frame's worth.
                if ring.used_bytes and acc[i].bytes_ok > ring.capacity_bytes - ring.used_bytes:
                    results.append((i, C_STATUS_RETRY_LATER, C_REASON_OVERLOADED, acc[i].n_ok, None, None, None))
                    continue
                # The shared budget: each priority is admitted up to its share
                # (low types are refused first). At the top share an empty ring
                # still takes one part, so critical types always progress.
                if (ring._budget is not None and ring.admit_limit_bytes
                        and ring._budget.used_bytes + admitted + acc[i].bytes_ok > ring.admit_limit_bytes
                        and not (ring.used_bytes == 0 and ring.admit_limit_bytes >= ring._budget.limit_bytes)):
                    results.append((i, C_STATUS_RETRY_LATER, C_REASON_OVERLOADED, acc[i].n_ok, None, None, None))
                    continue
                if versions is not None and versions[i] is not None:
                    pf = versions[i].personal
                    if pf is not None and ring.keys is not None and (<UserKeys>ring.keys).cold:
                        cold_missing = _personal_missing(b, start, ne, i, ring, self, now_ms, <PersonalFields>pf)
                        if cold_missing is not None:
                            results.append(_wait_for_keys(i, acc[i].n_ok, ring, cold_missing))
                            continue
                    if dead_letters is None:
                        dead_letters = [None] * nt
                    n_checked = acc[i].n_ok  # the mask's length: every event past the per-event checks
                    bad = _validate_part(b, start, ne, i, acc, ring, self, now_ms, versions[i], dead_letters)
                    if bad is not None and acc[i].dead_letter:  # their entries also carry eb.error
                        acc[i].bytes_ok += sum(PyBytes_GET_SIZE(h) for h in (<dict>dead_letters[i]).values()) \
                            - len(bad[0]) * acc[i].hdr_len
                    if bad is not None and not acc[i].dead_letter:
                        acc[i].n_ok -= len(bad[0])
                    if pf is not None and acc[i].n_ok:
                        sealed = _personal_part(b, start, ne, i, acc, ring, self, now_ms, <PersonalFields>pf,
                                                n_checked)
                        if type(sealed) is list:  # keys not cached yet: the whole part waits
                            if bad is not None and not acc[i].dead_letter:
                                results.append((i, C_STATUS_REJECTED, C_REASON_SCHEMA_VIOLATION, len(bad[0]),
                                                bad[0], None, bad[1]))
                            results.append(_wait_for_keys(i, acc[i].n_ok, ring, sealed))
                            continue
                        if sealed is not None:  # events the scan refused join the schema's failures
                            acc[i].n_ok -= len(<dict>sealed)
                            if bad is not None:
                                for k, d in zip(bad[0], bad[1]):
                                    (<dict>sealed)[k] = d
                            bad = (sorted(sealed), [(<dict>sealed)[k] for k in sorted(sealed)])
                    if bad is not None and not acc[i].dead_letter:
                        results.append((i, C_STATUS_REJECTED, C_REASON_SCHEMA_VIOLATION, len(bad[0]), bad[0], None,
                                        bad[1]))
                        if acc[i].n_ok == 0:
                            continue
                admitted += acc[i].bytes_ok  # earlier parts of this batch count too
                acc[i].status = C_STATUS_ACCEPTED
                results.append((i, C_STATUS_ACCEPTED, C_REASON_NONE, acc[i].n_ok, None, ring, None))
            # Pass 2: copy accepted events into their rings, in batch order;
            # in type-index order when two names share a ring (`play` and
            # `play@1`), so each ring holds its parts in the order they were
            # registered with the lane (the order of ``results``).
            for k in range(nt if shared else 1):
                if shared and acc[k].status != C_STATUS_ACCEPTED:
                    continue
                pos = start
                for i in range(ne):
                    ev = b + pos
                    ti = eb_ld16(ev)
                    klen = eb_ld16(ev + 2)
                    vlen = eb_ld32(ev + 4)
                    pos += C_EVENT_HEADER_BYTES + klen + vlen
                    if acc[ti].status != C_STATUS_ACCEPTED or (shared and ti != k):
                        continue
                    _write_event(ev, klen, vlen, &acc[ti], <TypeRing>acc[ti].ring, self, now_ms,
                                 dead_letters[ti] if dead_letters is not None else None)
            self.batches_in += 1
            if answer_unknown and n_entries < nt:
                entries = entries[:n_entries * ACK_ENTRY_BYTES]
            return seq, names, results, entries, n_entries, unknown_events, invalid_events
        finally:
            for i in range(nt):
                free(acc[i].mask)
                free(acc[i].enc)
                free(acc[i].enc_at)
            free(acc)


cdef tuple _wait_for_keys(Py_ssize_t ti, Py_ssize_t count, TypeRing ring, list missing):
    """A part that names users whose keys are not cached: the cache is told which (its
    answer is the retry hint the ACK carries) and the part is answered key_unavailable."""
    if ring.keys is not None and ring.keys.on_missing is not None:
        ring.keys.retry_after_ms = ring.keys.on_missing(missing)
    return (ti, C_STATUS_RETRY_LATER, C_REASON_KEY_UNAVAILABLE, count, None, None, None)


cdef bint _valid_type_name(bytes name):
    """``TYPE_NAME_PATTERN``: 1-64 of a-z 0-9 _ . - starting with a letter or digit."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(name)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name), i
    cdef unsigned char c
    if n < 1 or n > 64:
        return False
    for i in range(n):
        c = p[i]
        if not ((c >= 97 and c <= 122) or (c >= 48 and c <= 57)
                or (i > 0 and (c == 95 or c == 46 or c == 45))):  # a-z 0-9, then also _ . -
            return False
    return True


cdef int _schema_version(bytes v):
    """The N of a type table name ``<type>@<N>`` (1-999999, no leading zero); -1 if it is not one."""
    if 0 < len(v) <= 6 and v.isdigit() and v[0] != 48:
        return int(v)
    return -1


cdef bint _versioned_name(bytes name):
    """``<type>@<N>``: a valid type name and a schema version."""
    cdef bytes base, v
    if b"@" not in name:
        return False
    base, _, v = name.partition(b"@")
    return _valid_type_name(base) and _schema_version(v) > 0


def valid_type_name(bytes name not None):
    """Whether ``name`` is a type name a gateway can be configured with."""
    return _valid_type_name(name)


cdef inline int _write_event(const unsigned char *ev, Py_ssize_t klen, Py_ssize_t vlen, _TypeAcc *a,
                             TypeRing ring, BatchSplitter splitter, int64_t now_ms, object dead) except -1:
    """Pass 2 for one event of an accepted part: skip it if a per-event check
    or (rejecting) its schema refused it, else write it, with its schema
    version header, or as a dead letter."""
    cdef Py_ssize_t k
    cdef bytes dl
    if _event_reason(ev, klen, vlen, ring, splitter, now_ms):
        return 0
    if a.hdr_len == 0:
        return ring._write(ev, now_ms)
    k = a.seen
    a.seen += 1
    if a.mask != NULL and a.mask[k]:
        if not a.dead_letter:
            return 0
        dl = <bytes>(<dict>dead)[k]
        return ring._write(ev, now_ms, <const unsigned char *>PyBytes_AS_STRING(dl), PyBytes_GET_SIZE(dl), 2,
                           C_ENTRY_DEAD_LETTER)
    if a.enc != NULL:  # personal values sealed: the new payload
        return ring._write(ev, now_ms, <const unsigned char *>PyBytes_AS_STRING(<object>a.hdr), a.hdr_len, 1, 0,
                           a.enc + a.enc_at[2 * k], a.enc_at[2 * k + 1])
    return ring._write(ev, now_ms, <const unsigned char *>PyBytes_AS_STRING(<object>a.hdr), a.hdr_len, 1)


cdef inline int _event_reason(const unsigned char *ev, Py_ssize_t klen, Py_ssize_t vlen,
                              TypeRing ring, BatchSplitter splitter, int64_t now_ms):
    cdef uint64_t id_hi, id_lo
    cdef int64_t ts
    if vlen == 0 or (ev[8] & 0x80):  # empty payload, or a negative timestamp
        return C_REASON_INVALID
    memcpy(&id_hi, ev + 16, 8)
    memcpy(&id_lo, ev + 24, 8)
    if id_hi == 0 and id_lo == 0:
        return C_REASON_INVALID
    if klen + vlen > ring.max_event_bytes or klen + vlen > splitter.max_event_bytes:
        return C_REASON_TOO_LARGE
    ts = <int64_t>eb_ld64(ev + 8)
    if (splitter.max_timestamp_ahead_ms and ts > now_ms + splitter.max_timestamp_ahead_ms) or \
            (splitter.max_timestamp_behind_ms and ts < now_ms - splitter.max_timestamp_behind_ms):
        return C_REASON_INVALID_TIMESTAMP
    return 0


DEF MAX_JSON_DEPTH = 64


cdef inline bint _one_json_value(const unsigned char *p, Py_ssize_t n):
    """Whether ``p`` can hold exactly one JSON value: not only whitespace, strings closed, brackets
    balanced, no comma or colon outside them. It lets a part's payloads be
    joined into one JSON array whose element i is payload i; the decoder
    checks the rest of the syntax."""
    cdef Py_ssize_t i, depth = 0
    cdef bint in_str = False, esc = False, some = False
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if not (c == 32 or c == 9 or c == 10 or c == 13):
            some = True  # a payload of whitespace only holds no value
        if in_str:
            if esc:
                esc = False
            elif c == 92:  # backslash
                esc = True
            elif c == 34:
                in_str = False
            elif c < 32:  # a raw control character cannot be in a JSON string
                return False
        elif c == 34:
            in_str = True
        elif c == 123 or c == 91:  # { [
            depth += 1
            if depth > MAX_JSON_DEPTH:  # deeper than any event needs; the decoder recurses
                return False
        elif c == 125 or c == 93:  # } ]
            depth -= 1
            if depth < 0:
                return False
        elif depth == 0 and (c == 44 or c == 58):  # , :
            return False
    return some and not in_str and depth == 0


cdef object _validate_part(const unsigned char *b, Py_ssize_t start, Py_ssize_t ne, Py_ssize_t ti, _TypeAcc *acc,
                           TypeRing ring, BatchSplitter splitter, int64_t now_ms, object sv, list dead_letters):
    """Validate the events of type index ``ti`` that passed the per-event
    checks against schema version ``sv``: each first by the native
    accept-path (flat closed schemas), the rest joined into one JSON array
    here, which ``sv.check`` decodes at once. Nothing is allocated while the
    native path accepts. Sets ``acc[ti].mask``; returns None when all are
    valid, else (batch indices, details) of the failures, in batch order."""
    cdef Py_ssize_t n = acc[ti].n_ok, pos = start, i, klen, vlen, total, j = 0, nbuf = 0, w = 0, k
    cdef const unsigned char *ev
    cdef const unsigned char *pl
    cdef unsigned char *out = NULL
    cdef uint32_t *elem = NULL  # per payload in the array: (position in the part, batch index)
    cdef uint32_t *seps = NULL
    cdef bytearray buf = None
    cdef bytes seps_b = None, elem_b = None
    cdef list indices, details, rules
    cdef dict why = {}  # position in the part -> (batch index, rule, detail)
    cdef FlatSchema flat = sv.flat
    if n == 0:
        return None
    acc[ti].mask = <unsigned char *>calloc(n, 1)
    if acc[ti].mask == NULL:
        raise MemoryError()
    for i in range(ne):
        ev = b + pos
        klen = eb_ld16(ev + 2)
        vlen = eb_ld32(ev + 4)
        pos += C_EVENT_HEADER_BYTES + klen + vlen
        if eb_ld16(ev) != ti or _event_reason(ev, klen, vlen, ring, splitter, now_ms):
            continue
        pl = ev + C_EVENT_HEADER_BYTES + klen
        if flat is not None and _flat_accepts(flat, pl, vlen):
            j += 1  # valid: the native path accepts it
            continue
        if not _one_json_value(pl, vlen):
            acc[ti].mask[j] = 1
            why[j] = (i, "json", "$: not valid JSON")
        else:
            if buf is None:  # the first payload for msgspec: room for the rest of the part
                total = _array_bytes(ev, ne - i, ti)
                buf = PyByteArray_FromStringAndSize(NULL, total)
                out = <unsigned char *>PyByteArray_AS_STRING(buf)
                seps_b = PyBytes_FromStringAndSize(NULL, (n + 1) * 4)
                seps = <uint32_t *>PyBytes_AS_STRING(seps_b)
                elem_b = PyBytes_FromStringAndSize(NULL, n * 8)
                elem = <uint32_t *>PyBytes_AS_STRING(elem_b)
            seps[nbuf] = <uint32_t>w
            out[w] = 91 if nbuf == 0 else 44  # [ ,
            memcpy(out + w + 1, pl, vlen)
            w += 1 + vlen
            elem[2 * nbuf] = <uint32_t>j
            elem[2 * nbuf + 1] = <uint32_t>i
            nbuf += 1
        j += 1
    if nbuf:
        seps[nbuf] = <uint32_t>w
        out[w] = 93  # ]
        if PyByteArray_Resize(buf, w + 1) < 0:
            raise MemoryError()
        failures = sv.check(buf, memoryview(seps_b).cast("I")[:nbuf + 1], nbuf)
        if failures is not None:
            for f in failures:
                k = <Py_ssize_t>f[0]
                acc[ti].mask[elem[2 * k]] = 1
                why[elem[2 * k]] = (elem[2 * k + 1], f[1], f[2])
    if not why:
        sv.tally(n, None)
        return None
    indices = []
    details = []
    rules = []
    for j in sorted(why):
        indices.append(why[j][0])
        rules.append(why[j][1])
        details.append(why[j][2])
    sv.tally(n - len(indices), rules)
    if acc[ti].dead_letter:
        dead_letters[ti] = {j: sv.dead_letter_headers(why[j][2]) for j in why}
    return indices, details


cdef Py_ssize_t _array_bytes(const unsigned char *ev, Py_ssize_t count, Py_ssize_t ti):
    """Room for a JSON array of type index ``ti``'s payloads among the
    ``count`` events from ``ev`` on: brackets and one separator each."""
    cdef Py_ssize_t total = 2, klen, vlen, i
    for i in range(count):
        klen = eb_ld16(ev + 2)
        vlen = eb_ld32(ev + 4)
        if eb_ld16(ev) == ti:
            total += vlen + 1
        ev += C_EVENT_HEADER_BYTES + klen + vlen
    return total
