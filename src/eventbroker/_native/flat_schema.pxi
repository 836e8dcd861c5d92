# Included by _fastpath.pyx (one extension module).
"""A native accept-path for flat, closed event schemas.

For a schema whose top level is an object with ``additionalProperties: false``
and whose fields are scalars (string with length bounds, enum, ``format``
uuid or date-time; integer or number with bounds; boolean; each optionally
nullable), ``FlatSchema.accepts`` checks one payload in C without making a
Python object. It only ever *accepts*: anything it does not handle (a key
or string with escapes or non-ASCII bytes, a float, a duplicate key, a
date-time in a form it does not know) or anything that fails goes to the
msgspec path, which decides and explains. So the set it accepts is a subset
of what the compiled msgspec type accepts; tests/unit/test_schema_keywords.py
checks both against jsonschema.
"""

DEF FK_STRING = 1
DEF FK_INTEGER = 2
DEF FK_NUMBER = 4
DEF FK_BOOLEAN = 8
DEF FK_NULL = 16

DEF FF_UUID = 1
DEF FF_DATETIME = 2

DEF MAX_FLAT_FIELDS = 64

# Byte classes: 1 ends a plain string run (quote, backslash, control,
# non-ASCII), 2 is a hex digit.
cdef unsigned char _BYTE_CLASS[256]


cdef void _init_byte_classes() noexcept:
    cdef int c
    for c in range(256):
        _BYTE_CLASS[c] = 1 if (c == 34 or c == 92 or c < 32 or c >= 128) else 0
        if (48 <= c <= 57) or (97 <= c <= 102) or (65 <= c <= 70):
            _BYTE_CLASS[c] = 2


_init_byte_classes()


cdef struct _Field:
    const unsigned char *name
    Py_ssize_t name_len
    int kinds
    int fmt
    bint required
    Py_ssize_t min_len, max_len      # -1: none
    bint has_lo, has_hi, lo_excl, hi_excl
    int64_t lo, hi                   # integer bounds, rounded inwards
    Py_ssize_t n_enum                # -1: no enum; strings only
    const unsigned char **enum_ptr
    Py_ssize_t *enum_len
    bint enum_null


@cython.final
cdef class FlatSchema:
    """Built by ``eventbroker.schema.compile.flat_schema`` from a schema tree."""
    cdef _Field *_f
    cdef Py_ssize_t _n
    cdef uint64_t _required_mask
    cdef list _keep  # the bytes the fields point into

    def __cinit__(self):
        self._f = NULL
        self._n = 0
        self._keep = []

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self._f != NULL:
            for i in range(self._n):
                free(self._f[i].enum_ptr)
                free(self._f[i].enum_len)
            free(self._f)

    def __init__(self, list fields):
        """``fields``: (name bytes, kinds, fmt, required, min_len, max_len,
        lo or None, hi or None, enum list of bytes or None, enum_null), with
        integer bounds already inclusive."""
        cdef Py_ssize_t i, j
        cdef _Field *f
        if len(fields) > MAX_FLAT_FIELDS:
            raise ValueError("too many fields for the flat path")
        self._f = <_Field *>calloc(max(1, len(fields)), sizeof(_Field))
        if self._f == NULL:
            raise MemoryError()
        self._n = len(fields)
        self._required_mask = 0
        for i in range(self._n):
            name, kinds, fmt, required, min_len, max_len, lo, hi, enum, enum_null = fields[i]
            f = &self._f[i]
            self._keep.append(name)
            f.name = <const unsigned char *>PyBytes_AS_STRING(name)
            f.name_len = PyBytes_GET_SIZE(name)
            f.kinds = kinds
            f.fmt = fmt
            f.required = required
            if required:
                self._required_mask |= (<uint64_t>1) << i
            f.min_len = min_len
            f.max_len = max_len
            f.has_lo = lo is not None
            f.has_hi = hi is not None
            f.lo = lo if lo is not None else 0
            f.hi = hi if hi is not None else 0
            f.enum_null = enum_null
            if enum is None:
                f.n_enum = -1
            else:
                f.n_enum = len(enum)
                f.enum_ptr = <const unsigned char **>calloc(max(1, f.n_enum), sizeof(void *))
                f.enum_len = <Py_ssize_t *>calloc(max(1, f.n_enum), sizeof(Py_ssize_t))
                if f.enum_ptr == NULL or f.enum_len == NULL:
                    raise MemoryError()
                for j in range(f.n_enum):
                    self._keep.append(enum[j])
                    f.enum_ptr[j] = <const unsigned char *>PyBytes_AS_STRING(enum[j])
                    f.enum_len[j] = PyBytes_GET_SIZE(enum[j])

    def accepts(self, bytes payload not None):
        """Whether the flat path accepts ``payload`` (bytes); False: ask msgspec."""
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(payload)
        return _flat_accepts(self, p, PyBytes_GET_SIZE(payload))


cdef inline Py_ssize_t _ws(const unsigned char *p, Py_ssize_t i, Py_ssize_t n):
    while i < n and (p[i] == 32 or p[i] == 9 or p[i] == 10 or p[i] == 13):
        i += 1
    return i


cdef inline Py_ssize_t _plain_string(const unsigned char *p, Py_ssize_t i, Py_ssize_t n):
    """``p[i]`` is the opening quote: the index of the closing one, or -1 for a
    string the flat path does not take (escapes, control or non-ASCII bytes)."""
    i += 1
    while i < n and _BYTE_CLASS[p[i]] != 1:
        i += 1
    if i < n and p[i] == 34:
        return i
    return -1


cdef inline bint _digits(const unsigned char *p, Py_ssize_t i, Py_ssize_t k):
    cdef Py_ssize_t j
    for j in range(i, i + k):
        if p[j] < 48 or p[j] > 57:
            return False
    return True


cdef inline int _num(const unsigned char *p, Py_ssize_t i, Py_ssize_t k):
    cdef int v = 0
    cdef Py_ssize_t j
    for j in range(i, i + k):
        v = v * 10 + (p[j] - 48)
    return v


cdef bint _is_datetime(const unsigned char *s, Py_ssize_t n):
    """YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM), with valid ranges."""
    cdef int y, mo, d, h, mi, se, dim
    cdef Py_ssize_t i
    if n < 20 or not (_digits(s, 0, 4) and s[4] == 45 and _digits(s, 5, 2) and s[7] == 45 and _digits(s, 8, 2)
                      and s[10] == 84 and _digits(s, 11, 2) and s[13] == 58 and _digits(s, 14, 2) and s[16] == 58
                      and _digits(s, 17, 2)):
        return False
    y = _num(s, 0, 4)
    mo = _num(s, 5, 2)
    d = _num(s, 8, 2)
    h = _num(s, 11, 2)
    mi = _num(s, 14, 2)
    se = _num(s, 17, 2)
    if y < 1 or mo < 1 or mo > 12 or d < 1 or h > 23 or mi > 59 or se > 59:
        return False
    if mo == 2:
        dim = 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    elif mo == 4 or mo == 6 or mo == 9 or mo == 11:
        dim = 30
    else:
        dim = 31
    if d > dim:
        return False
    i = 19
    if i < n and s[i] == 46:
        i += 1
        if i >= n or not (48 <= s[i] <= 57):
            return False
        while i < n and 48 <= s[i] <= 57:
            i += 1
        if i - 20 > 9:
            return False
    if i == n - 1 and s[i] == 90:
        return True
    if i == n - 6 and (s[i] == 43 or s[i] == 45) and _digits(s, i + 1, 2) and s[i + 3] == 58 \
            and _digits(s, i + 4, 2):
        return _num(s, i + 1, 2) <= 23 and _num(s, i + 4, 2) <= 59
    return False


cdef bint _is_uuid(const unsigned char *s, Py_ssize_t n):
    cdef Py_ssize_t i
    cdef unsigned char c
    if n != 36:
        return False
    if s[8] != 45 or s[13] != 45 or s[18] != 45 or s[23] != 45:
        return False
    for i in range(36):
        c = s[i]
        if _BYTE_CLASS[c] != 2 and not (i == 8 or i == 13 or i == 18 or i == 23):
            return False
    return True


cdef bint _string_ok(_Field *f, const unsigned char *s, Py_ssize_t n):
    cdef Py_ssize_t j
    if f.n_enum >= 0:
        for j in range(f.n_enum):
            if f.enum_len[j] == n and memcmp(f.enum_ptr[j], s, n) == 0:
                return True
        return False
    if f.min_len >= 0 and n < f.min_len:
        return False
    if f.max_len >= 0 and n > f.max_len:
        return False
    if f.fmt == FF_UUID:
        return _is_uuid(s, n)
    if f.fmt == FF_DATETIME:
        return _is_datetime(s, n)
    return True


cdef bint _flat_accepts(FlatSchema sch, const unsigned char *p, Py_ssize_t n):
    cdef Py_ssize_t i = _ws(p, 0, n), k, e, j, nd, last = -1
    cdef uint64_t seen = 0, bit
    cdef _Field *f
    cdef int64_t v
    cdef bint neg
    if i >= n or p[i] != 123:
        return False
    i = _ws(p, i + 1, n)
    if i < n and p[i] == 125:
        return sch._required_mask == 0 and _ws(p, i + 1, n) == n
    while True:
        if i >= n or p[i] != 34:
            return False
        e = _plain_string(p, i, n)
        if e < 0:
            return False
        f = NULL
        # Fields usually come in the schema's order: try the next one first.
        k = last + 1
        if k < sch._n and sch._f[k].name_len == e - i - 1 and memcmp(sch._f[k].name, p + i + 1, e - i - 1) == 0:
            f = &sch._f[k]
        else:
            for k in range(sch._n):
                if sch._f[k].name_len == e - i - 1 and memcmp(sch._f[k].name, p + i + 1, e - i - 1) == 0:
                    f = &sch._f[k]
                    break
        if f == NULL:
            return False  # undeclared (the schema is closed): msgspec says which
        last = k
        bit = (<uint64_t>1) << k
        if seen & bit:
            return False  # a duplicate key
        seen |= bit
        i = _ws(p, e + 1, n)
        if i >= n or p[i] != 58:
            return False
        i = _ws(p, i + 1, n)
        if i >= n:
            return False
        if p[i] == 34:
            if not (f.kinds & FK_STRING):
                return False
            e = _plain_string(p, i, n)
            if e < 0 or not _string_ok(f, p + i + 1, e - i - 1):
                return False
            i = e + 1
        elif p[i] == 110:  # null
            if not (i + 4 <= n and memcmp(p + i, b"null", 4) == 0 and (f.kinds & FK_NULL or f.enum_null)):
                return False
            i += 4
        elif p[i] == 116 or p[i] == 102:  # true, false
            if not (f.kinds & FK_BOOLEAN):
                return False
            if i + 4 <= n and memcmp(p + i, b"true", 4) == 0:
                i += 4
            elif i + 5 <= n and memcmp(p + i, b"false", 5) == 0:
                i += 5
            else:
                return False
        elif p[i] == 45 or (48 <= p[i] <= 57):
            if not (f.kinds & (FK_INTEGER | FK_NUMBER)) or f.n_enum >= 0:
                return False
            neg = p[i] == 45
            j = i + 1 if neg else i
            nd = 0
            v = 0
            while j < n and 48 <= p[j] <= 57:
                if nd == 18:
                    return False  # large: msgspec decides
                v = v * 10 + (p[j] - 48)
                nd += 1
                j += 1
            if nd == 0 or (nd > 1 and p[j - nd] == 48):
                return False  # no digits, or a leading zero
            if j < n and (p[j] == 46 or p[j] == 101 or p[j] == 69):
                return False  # a fraction or exponent: msgspec decides
            if neg:
                v = -v
            if (f.has_lo and v < f.lo) or (f.has_hi and v > f.hi):
                return False
            i = j
        else:
            return False
        i = _ws(p, i, n)
        if i >= n:
            return False
        if p[i] == 44:
            i = _ws(p, i + 1, n)
            continue
        if p[i] == 125:
            return (seen & sch._required_mask) == sch._required_mask and _ws(p, i + 1, n) == n
        return False
