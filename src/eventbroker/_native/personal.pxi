# Included by _fastpath.pyx (one extension module).
"""Personal fields encrypted at the edge, before an event enters a ring.

A schema version that declares personal fields (``x-personal``, top level)
and a user field (``x-user``) gets a ``PersonalFields``; the type's ring gets
the gateway's ``UserKeys`` (user id -> 32-byte data key, or None for a user
who was forgotten). For each accepted part the splitter calls
``_personal_part``: every event's top-level object is scanned in C, the user
id found and its key looked up; if a key is not cached the part is answered
``RETRY_LATER key_unavailable`` and ``UserKeys.on_missing`` is told which
users to load. Otherwise each personal value (its JSON text, whatever its
type; ``null`` stays ``null``) is replaced by the JSON string

    "ep1:" base64(nonce[12] || AES-256-GCM ciphertext || tag[16])

under the user's key, with associated data (``personal_aad``)

    "ep1" || u8 len(type) || type || u8 len(field) || field || event_id[16]

so a ciphertext cannot be moved to another event, field or type. A
forgotten user's personal values become the string ``"ep1:forgotten"``.
Nonces are random (OpenSSL ``RAND_bytes``, once per part). The layout is
documented in docs/privacy.md; ``eventbroker.privacy.crypto`` decrypts it
with the ``cryptography`` package, an independent implementation.
"""

cdef extern from "openssl/evp.h":
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass
    ctypedef struct ENGINE:
        pass
    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new() nogil
    const EVP_CIPHER *EVP_aes_256_gcm() nogil
    int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, ENGINE *impl,
                           const unsigned char *key, const unsigned char *iv) nogil
    int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                          const unsigned char *inp, int inl) nogil
    int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl) nogil
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr) nogil
    int EVP_EncodeBlock(unsigned char *t, const unsigned char *f, int n) nogil
    int EVP_Cipher(EVP_CIPHER_CTX *ctx, unsigned char *out, const unsigned char *inp, unsigned int inl) nogil
    int EVP_CTRL_GCM_GET_TAG

cdef extern from "openssl/rand.h":
    int RAND_bytes(unsigned char *buf, int num) nogil

from cpython.dict cimport PyDict_GetItem
from libc.string cimport memchr
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.unicode cimport PyUnicode_DecodeUTF8

DEF NONCE_BYTES = 12
DEF TAG_BYTES = 16
DEF DATA_KEY_BYTES = 32
DEF MAX_PERSONAL_FIELDS = 32
DEF MAX_USER_BYTES = 256  # the key store's limit
DEF MAX_SPANS = 64  # personal values in one event (a name given twice counts twice)

CIPHER_PREFIX = b"ep1:"
FORGOTTEN_VALUE = b"ep1:forgotten"
PERSONAL_NONCE_BYTES = NONCE_BYTES
PERSONAL_TAG_BYTES = TAG_BYTES
PERSONAL_KEY_BYTES = DATA_KEY_BYTES

# Why an event of a type with personal fields is refused (schema_violation
# details: they name the field, never a value).
cdef enum:
    PS_OK = 0
    PS_NOT_OBJECT = 1
    PS_ESCAPED_NAME = 2
    PS_NO_USER = 3
    PS_BAD_USER = 4
    PS_TOO_MANY = 5
    PS_MALFORMED = 6

# One context for the process (the splitter runs under the GIL), bound to
# AES-256-GCM once: each value then only sets its key and nonce (passing the
# cipher again would make OpenSSL 3 rebuild the context, about 1 us a value).
cdef EVP_CIPHER_CTX *_gcm = EVP_CIPHER_CTX_new()
if _gcm == NULL or EVP_EncryptInit_ex(_gcm, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1:
    raise MemoryError("EVP_CIPHER_CTX_new / AES-256-GCM")


@cython.final
cdef class PersonalFields:
    """A schema version's personal fields (top-level names) and user field."""
    cdef readonly bytes type_name
    cdef readonly bytes user_field
    cdef readonly tuple fields
    cdef Py_ssize_t _n
    cdef const char *_names[MAX_PERSONAL_FIELDS]  # into ``fields``, which keeps them alive
    cdef Py_ssize_t _lens[MAX_PERSONAL_FIELDS]
    cdef const char *_user
    cdef Py_ssize_t _user_len

    def __init__(self, str type_name not None, str user_field not None, fields):
        cdef Py_ssize_t k
        self.type_name = type_name.encode("utf-8")
        self.user_field = user_field.encode("utf-8")
        self.fields = tuple(f.encode("utf-8") for f in fields)
        self._n = len(self.fields)
        if not 0 < self._n <= MAX_PERSONAL_FIELDS:
            raise ValueError(f"1 to {MAX_PERSONAL_FIELDS} personal fields, not {self._n}")
        for k in range(self._n):
            self._names[k] = PyBytes_AS_STRING(self.fields[k])
            self._lens[k] = PyBytes_GET_SIZE(self.fields[k])
        self._user = PyBytes_AS_STRING(self.user_field)
        self._user_len = PyBytes_GET_SIZE(self.user_field)
        if len(self.type_name) > 255 or any(len(f) > 255 or not f for f in self.fields) or not self.user_field:
            raise ValueError("type and field names are 1 to 255 bytes")
        if self.user_field in self.fields:
            raise ValueError("the user field cannot be personal (it names the key)")

    def scan(self, bytes payload not None):
        """(status, user id or None, [(start, end) of each personal value]): what the splitter sees."""
        cdef uint32_t spans[3 * MAX_SPANS]
        cdef Py_ssize_t us = 0, ue = 0, ns = 0, i
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(payload)
        st = _scan_personal(self, p, PyBytes_GET_SIZE(payload), spans, &ns, &us, &ue)
        return st, (payload[us:ue] if st == PS_OK else None), [(spans[3 * i], spans[3 * i + 1]) for i in range(ns)]


@cython.final
cdef class UserKeys:
    """The gateway's cache of unwrapped data keys, shared by every ring with personal fields.

    ``keys``: user id (bytes, as it appears in the payload) -> 32-byte key, or
    None for a forgotten user. Filled and bounded by
    ``eventbroker.privacy.cache.KeyCache``; ``on_missing(list of user ids)``
    is called once per part that needs keys not in it and returns the
    retry-after hint in ms, kept in ``retry_after_ms`` for that part's ACK."""
    cdef public dict keys
    cdef public object on_missing
    cdef public int retry_after_ms
    cdef readonly unsigned long long encrypted   # personal values encrypted
    cdef readonly unsigned long long shredded    # values of forgotten users written as the marker
    cdef readonly unsigned long long parts_waiting  # parts answered key_unavailable
    # A part lacked keys lately: look keys up before validating the next parts,
    # so a cold cache's retried parts cost a scan, not a validation too.
    cdef public bint cold

    def __init__(self, on_missing=None):
        self.keys = {}
        self.on_missing = on_missing
        self.retry_after_ms = 1000
        self.cold = False


cdef inline Py_ssize_t _skip_string(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, bint *escaped):
    """``p[i]`` is an opening quote: the index after the closing one, or -1;
    ``escaped`` is set when the string holds a backslash."""
    cdef const unsigned char *q
    cdef Py_ssize_t start = i + 1, j, k
    i = start
    while True:
        q = <const unsigned char *>memchr(p + i, 34, n - i)
        if q == NULL:
            return -1
        j = q - p
        k = j
        while k > start and p[k - 1] == 92:  # a quote after an odd run of backslashes is escaped
            k -= 1
        if (j - k) % 2 == 0:
            break
        i = j + 1
    if memchr(p + start, 92, j - start) != NULL:
        escaped[0] = True
    return j + 1


cdef Py_ssize_t _skip_value(const unsigned char *p, Py_ssize_t i, Py_ssize_t n):
    """The index after the JSON value at ``p[i]`` (already valid JSON), or -1."""
    cdef Py_ssize_t depth = 0
    cdef bint esc = False
    cdef unsigned char c
    if i >= n:
        return -1
    c = p[i]
    if c == 34:
        return _skip_string(p, i, n, &esc)
    if c != 123 and c != 91:  # a number or a literal: up to a delimiter
        while i < n and not (p[i] == 44 or p[i] == 125 or p[i] == 93 or p[i] == 32 or p[i] == 9
                             or p[i] == 10 or p[i] == 13):
            i += 1
        return i
    while i < n:
        c = p[i]
        if c == 34:
            i = _skip_string(p, i, n, &esc)
            if i < 0:
                return -1
            continue
        if c == 123 or c == 91:
            depth += 1
        elif c == 125 or c == 93:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


cdef int _scan_personal(PersonalFields pf, const unsigned char *p, Py_ssize_t n, uint32_t *spans,
                        Py_ssize_t *n_spans, Py_ssize_t *user_s, Py_ssize_t *user_e) noexcept:
    """Find the user id and every personal value of the top-level object ``p``."""
    cdef Py_ssize_t i = _ws(p, 0, n), ks, ke, vs, ve, k, ns = 0, flen
    cdef bint esc = False, have_user = False, is_personal
    if i >= n or p[i] != 123:
        return PS_NOT_OBJECT
    i = _ws(p, i + 1, n)
    if i < n and p[i] == 125:
        return PS_NO_USER
    while True:
        if i >= n or p[i] != 34:
            return PS_MALFORMED
        ks = i + 1
        i = _skip_string(p, i, n, &esc)
        if i < 0:
            return PS_MALFORMED
        if esc:  # a name spelt with escapes could hide a personal field from this scan
            return PS_ESCAPED_NAME
        ke = i - 1
        i = _ws(p, i, n)
        if i >= n or p[i] != 58:
            return PS_MALFORMED
        vs = _ws(p, i + 1, n)
        ve = _skip_value(p, vs, n)
        if ve < 0:
            return PS_MALFORMED
        flen = ke - ks
        if flen == pf._user_len and memcmp(p + ks, pf._user, flen) == 0:
            if have_user:
                return PS_BAD_USER  # twice: which one names the key?
            have_user = True
            if p[vs] == 34:  # a string without escapes: its bytes between the quotes
                esc = False
                if _skip_string(p, vs, n, &esc) != ve or esc or ve - vs < 3 or ve - vs - 2 > MAX_USER_BYTES:
                    return PS_BAD_USER
                user_s[0] = vs + 1
                user_e[0] = ve - 1
            elif (p[vs] >= 48 and p[vs] <= 57) or p[vs] == 45:  # an integer: its digits, as JSON writes it
                k = vs + 1 if p[vs] == 45 else vs
                if k >= ve or ve - vs > 20 or (p[k] == 48 and (ve - k > 1 or k > vs)):  # "-", "01", "-0"
                    return PS_BAD_USER
                for k in range(k, ve):
                    if p[k] < 48 or p[k] > 57:
                        return PS_BAD_USER
                user_s[0] = vs
                user_e[0] = ve
            else:
                return PS_BAD_USER
        else:
            is_personal = False
            for k in range(pf._n):
                if flen == pf._lens[k] and memcmp(p + ks, pf._names[k], flen) == 0:
                    is_personal = True
                    break
            if is_personal and not (ve - vs == 4 and memcmp(p + vs, b"null", 4) == 0):
                if ns == MAX_SPANS:
                    return PS_TOO_MANY
                spans[3 * ns] = <uint32_t>vs
                spans[3 * ns + 1] = <uint32_t>ve
                spans[3 * ns + 2] = <uint32_t>k
                ns += 1
        i = _ws(p, ve, n)
        if i < n and p[i] == 44:
            i = _ws(p, i + 1, n)
            continue
        if i < n and p[i] == 125:
            break
        return PS_MALFORMED
    n_spans[0] = ns
    return PS_OK if have_user else PS_NO_USER


cdef inline Py_ssize_t _sealed_bytes(Py_ssize_t v):
    """The JSON string replacing a personal value of ``v`` bytes."""
    return 2 + 4 + 4 * ((NONCE_BYTES + v + TAG_BYTES + 2) // 3)


cdef Py_ssize_t _aad(unsigned char *out, bytes type_name, const unsigned char *field, Py_ssize_t flen,
                     const unsigned char *event_id) noexcept:
    cdef Py_ssize_t tl = PyBytes_GET_SIZE(type_name)
    memcpy(out, b"ep1", 3)
    out[3] = <unsigned char>tl
    memcpy(out + 4, PyBytes_AS_STRING(type_name), tl)
    out[4 + tl] = <unsigned char>flen
    memcpy(out + 5 + tl, field, flen)
    memcpy(out + 5 + tl + flen, event_id, 16)
    return 21 + tl + flen


def personal_aad(bytes type_name not None, bytes field not None, bytes event_id not None):
    """The associated data of one personal value (docs/privacy.md)."""
    cdef unsigned char buf[600]
    if len(type_name) > 255 or len(field) > 255 or len(event_id) != 16:
        raise ValueError("type and field names up to 255 bytes, a 16-byte event id")
    return PyBytes_FromStringAndSize(<char *>buf, _aad(buf, type_name, <const unsigned char *>field, len(field),
                                                      <const unsigned char *>event_id))


# The key _gcm holds now: set again only when the next value's differs (the
# values of one event share their user's key). Only valid within one part
# (the cache's bytes objects are not freed while it is sealed): reset first.
cdef const unsigned char *_gcm_key = NULL


cdef int _seal(const unsigned char *key, const unsigned char *nonce, const unsigned char *aad, Py_ssize_t aad_len,
               const unsigned char *pt, Py_ssize_t pt_len, unsigned char *scratch, unsigned char *out) except -1:
    """Write ``"ep1:<base64>"`` for one value at ``out``; ``scratch`` holds pt_len + 28 bytes."""
    global _gcm_key
    cdef int b64
    memcpy(scratch, nonce, NONCE_BYTES)
    if EVP_EncryptInit_ex(_gcm, NULL, NULL, key if key != _gcm_key else NULL, nonce) != 1:
        _gcm_key = NULL
        raise RuntimeError("AES-256-GCM key or nonce refused (OpenSSL)")
    _gcm_key = key
    # EVP_Cipher on an AEAD context: NULL out = associated data, NULL in = finish (computes the tag).
    if (EVP_Cipher(_gcm, NULL, aad, <unsigned int>aad_len) < 0
            or EVP_Cipher(_gcm, scratch + NONCE_BYTES, pt, <unsigned int>pt_len) < 0
            or EVP_Cipher(_gcm, NULL, NULL, 0) < 0
            or EVP_CIPHER_CTX_ctrl(_gcm, EVP_CTRL_GCM_GET_TAG, TAG_BYTES, scratch + NONCE_BYTES + pt_len) != 1):
        raise RuntimeError("AES-256-GCM encryption failed (OpenSSL)")
    out[0] = 34
    memcpy(out + 1, b"ep1:", 4)
    b64 = EVP_EncodeBlock(out + 5, scratch, <int>(NONCE_BYTES + pt_len + TAG_BYTES))  # writes a NUL after
    out[5 + b64] = 34
    return 0


def seal_value(bytes key not None, bytes type_name not None, bytes field not None, bytes event_id not None,
               bytes value not None):
    """One personal value sealed as the splitter seals it (tests, tools): the JSON string, quotes included."""
    cdef unsigned char nonce[NONCE_BYTES]
    cdef unsigned char aad[600]
    cdef Py_ssize_t alen
    if len(key) != DATA_KEY_BYTES:
        raise ValueError("a data key is 32 bytes")
    if len(type_name) > 255 or len(field) > 255 or len(event_id) != 16:
        raise ValueError("type and field names up to 255 bytes, a 16-byte event id")
    alen = _aad(aad, type_name, <const unsigned char *>field, len(field), <const unsigned char *>event_id)
    if RAND_bytes(nonce, NONCE_BYTES) != 1:
        raise RuntimeError("RAND_bytes failed")
    global _gcm_key
    _gcm_key = NULL
    out = bytearray(_sealed_bytes(len(value)) + 1)
    scratch = bytearray(len(value) + NONCE_BYTES + TAG_BYTES)
    _seal(<const unsigned char *>PyBytes_AS_STRING(key), nonce, aad, alen,
          <const unsigned char *>PyBytes_AS_STRING(value), len(value),
          <unsigned char *>PyByteArray_AS_STRING(scratch), <unsigned char *>PyByteArray_AS_STRING(out))
    return bytes(out[:len(out) - 1])


cdef str _personal_detail(int st, PersonalFields pf):
    user = pf.user_field.decode("utf-8", "replace")[:64]
    if st == PS_NO_USER:
        return f"$.{user}: missing; events with personal fields name their user"
    if st == PS_BAD_USER:
        return f"$.{user}: a user id is one string of 1-256 bytes without escapes, or an integer, given once"
    if st == PS_ESCAPED_NAME:
        return "$: field names with escapes are not accepted in a type with personal fields"
    if st == PS_TOO_MANY:
        return f"$: more than {MAX_SPANS} personal values"
    return "$: not a JSON object"


cdef object _personal_part(const unsigned char *b, Py_ssize_t start, Py_ssize_t ne, Py_ssize_t ti, _TypeAcc *acc,
                           TypeRing ring, BatchSplitter splitter, int64_t now_ms, PersonalFields pf,
                           Py_ssize_t n):
    """Seal the personal values of type index ``ti``'s accepted events.

    Returns None when every event was sealed (``acc[ti].enc``/``enc_at``
    hold the new payloads, ``bytes_ok`` is adjusted); a list of missing user
    ids (bytes) when a key is not cached (nothing sealed); or a dict
    {batch index: detail} of events refused (marked in ``acc[ti].mask``).
    ``n``: the events past the per-event checks (the mask's length, schema
    failures included: ``j`` and pass 2's ``seen`` count them all).
    Each payload is scanned once: phase 1 keeps its spans for phase 2. An
    event with no personal value needs no key (nor a user field)."""
    global _gcm_key
    cdef UserKeys uk = ring.keys
    cdef Py_ssize_t pos = start, i, j = 0, klen, vlen, ns, us, ue, s, total = 0, biggest = 0, w, src, m
    cdef Py_ssize_t n_values = 0, alen, sp_used = 0, sp_cap, n_left = acc[ti].n_ok
    cdef const unsigned char *ev
    cdef const unsigned char *pl
    cdef uint32_t spans[3 * MAX_SPANS]
    cdef uint32_t *sp = NULL      # every event's spans, 3 per value
    cdef uint32_t *sp_at = NULL   # per event: (first span, count)
    cdef uint32_t *grown
    cdef PyObject *kp
    cdef PyObject *last_kp = NULL
    cdef const unsigned char *last_user = NULL
    cdef Py_ssize_t last_len = -1
    cdef PyObject **keyp = NULL
    cdef unsigned char *nonces = NULL
    cdef unsigned char *scratch = NULL
    cdef unsigned char aad[600]
    cdef dict refused = None
    cdef list missing = None
    cdef set missing_set
    cdef bytes uid, f
    cdef int st
    cdef unsigned char *out
    if uk is None:
        return []  # no key cache on this gateway: nothing can be sealed
    sp_cap = 6 * (n if n else 1)
    keyp = <PyObject **>calloc(n if n else 1, sizeof(PyObject *))
    sp_at = <uint32_t *>malloc((n if n else 1) * 2 * sizeof(uint32_t))
    sp = <uint32_t *>malloc(sp_cap * sizeof(uint32_t))
    try:
        if keyp == NULL or sp_at == NULL or sp == NULL:
            raise MemoryError()
        # Phase 1: find each event's user and key, its personal values, and the room they need sealed.
        for i in range(ne):
            ev = b + pos
            klen = eb_ld16(ev + 2)
            vlen = eb_ld32(ev + 4)
            pos += C_EVENT_HEADER_BYTES + klen + vlen
            if eb_ld16(ev) != ti or _event_reason(ev, klen, vlen, ring, splitter, now_ms):
                continue
            if acc[ti].mask[j]:
                j += 1
                continue
            pl = ev + C_EVENT_HEADER_BYTES + klen
            ns = 0
            st = _scan_personal(pf, pl, vlen, spans, &ns, &us, &ue)
            if st == PS_NO_USER and ns == 0:
                st = PS_OK  # nothing to seal: no key needed
            if st != PS_OK:
                if refused is None:
                    refused = {}
                refused[i] = _personal_detail(st, pf)
                acc[ti].mask[j] = 1
                j += 1
                continue
            if ns == 0:
                kp = NULL
            elif ue - us == last_len and memcmp(pl + us, last_user, last_len) == 0:
                kp = last_kp
            else:
                uid = PyBytes_FromStringAndSize(<const char *>pl + us, ue - us)
                kp = PyDict_GetItem(uk.keys, uid)
                if kp == NULL:
                    if missing is None:
                        missing = []
                        missing_set = set()
                    if uid not in missing_set:
                        missing_set.add(uid)
                        missing.append(uid)
                elif kp != <PyObject *>None and not (
                        type(<object>kp) is bytes and PyBytes_GET_SIZE(<object>kp) == DATA_KEY_BYTES):
                    raise TypeError("UserKeys.keys values are 32-byte keys or None")
                last_kp, last_user, last_len = kp, pl + us, ue - us
            keyp[j] = kp
            if sp_used + 3 * ns > sp_cap:
                sp_cap = 2 * sp_cap + 3 * ns
                grown = <uint32_t *>realloc(sp, sp_cap * sizeof(uint32_t))
                if grown == NULL:
                    raise MemoryError()
                sp = grown
            memcpy(sp + sp_used, spans, 3 * ns * sizeof(uint32_t))
            sp_at[2 * j] = <uint32_t>sp_used
            sp_at[2 * j + 1] = <uint32_t>ns
            sp_used += 3 * ns
            total += vlen
            for s in range(ns):
                m = spans[3 * s + 1] - spans[3 * s]
                total += (_sealed_bytes(m) if kp != <PyObject *>None else 15) - m
                if m > biggest:
                    biggest = m
                n_values += 1
            j += 1
        if missing is not None:
            uk.parts_waiting += 1
            uk.cold = True
            return missing
        uk.cold = False
        if refused is not None and n_left - len(refused) == 0:
            return refused
        # Phase 2: write each event's payload with its personal values sealed.
        acc[ti].enc = <unsigned char *>malloc(total + 1)
        acc[ti].enc_at = <uint32_t *>malloc((n if n else 1) * 2 * sizeof(uint32_t))
        nonces = <unsigned char *>malloc(n_values * NONCE_BYTES + 1)
        scratch = <unsigned char *>malloc(biggest + NONCE_BYTES + TAG_BYTES)
        if acc[ti].enc == NULL or acc[ti].enc_at == NULL or nonces == NULL or scratch == NULL:
            raise MemoryError()
        if n_values and RAND_bytes(nonces, <int>(n_values * NONCE_BYTES)) != 1:
            raise RuntimeError("RAND_bytes failed (OpenSSL)")
        _gcm_key = NULL
        out = acc[ti].enc
        w = 0
        n_values = 0
        pos = start
        j = 0
        for i in range(ne):
            ev = b + pos
            klen = eb_ld16(ev + 2)
            vlen = eb_ld32(ev + 4)
            pos += C_EVENT_HEADER_BYTES + klen + vlen
            if eb_ld16(ev) != ti or _event_reason(ev, klen, vlen, ring, splitter, now_ms):
                continue
            if acc[ti].mask[j]:
                j += 1
                continue
            pl = ev + C_EVENT_HEADER_BYTES + klen
            kp = keyp[j]
            acc[ti].enc_at[2 * j] = <uint32_t>w
            src = 0
            for s in range(sp_at[2 * j], sp_at[2 * j] + 3 * sp_at[2 * j + 1], 3):
                memcpy(out + w, pl + src, sp[s] - src)
                w += sp[s] - src
                m = sp[s + 1] - sp[s]
                if kp == <PyObject *>None:
                    memcpy(out + w, b'"ep1:forgotten"', 15)
                    w += 15
                    uk.shredded += 1
                else:
                    f = <bytes>PyTuple_GET_ITEM(pf.fields, sp[s + 2])
                    alen = _aad(aad, pf.type_name, <const unsigned char *>PyBytes_AS_STRING(f),
                                PyBytes_GET_SIZE(f), ev + 16)
                    _seal(<const unsigned char *>PyBytes_AS_STRING(<bytes>kp), nonces + n_values * NONCE_BYTES,
                          aad, alen, pl + sp[s], m, scratch, out + w)
                    w += _sealed_bytes(m)
                    uk.encrypted += 1
                n_values += 1
                src = sp[s + 1]
            memcpy(out + w, pl + src, vlen - src)
            w += vlen - src
            acc[ti].enc_at[2 * j + 1] = <uint32_t>(w - acc[ti].enc_at[2 * j])
            acc[ti].bytes_ok += acc[ti].enc_at[2 * j + 1] - vlen
            j += 1
        return refused
    finally:
        _gcm_key = NULL
        free(keyp)
        free(sp)
        free(sp_at)
        free(nonces)
        free(scratch)


cdef bint _plausible_user(const unsigned char *p, Py_ssize_t n):
    """No control bytes, and valid UTF-8: what a validated JSON string without escapes holds."""
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] < 32:
            return False
    try:
        PyUnicode_DecodeUTF8(<const char *>p, n, NULL)
    except UnicodeDecodeError:
        return False
    return True


cdef list _personal_missing(const unsigned char *b, Py_ssize_t start, Py_ssize_t ne, Py_ssize_t ti, TypeRing ring,
                            BatchSplitter splitter, int64_t now_ms, PersonalFields pf):
    """While the cache is cold: the users of type index ``ti``'s events whose
    keys are not cached (None when all are), found by a scan alone, before the
    part is validated. Events the scan cannot read are left to validation."""
    cdef UserKeys uk = ring.keys
    cdef Py_ssize_t pos = start, i, klen, vlen, ns, us, ue
    cdef const unsigned char *ev
    cdef const unsigned char *pl
    cdef uint32_t spans[3 * MAX_SPANS]
    cdef list missing = None
    cdef set seen = set()
    cdef bytes uid
    for i in range(ne):
        ev = b + pos
        klen = eb_ld16(ev + 2)
        vlen = eb_ld32(ev + 4)
        pos += C_EVENT_HEADER_BYTES + klen + vlen
        if eb_ld16(ev) != ti or _event_reason(ev, klen, vlen, ring, splitter, now_ms):
            continue
        pl = ev + C_EVENT_HEADER_BYTES + klen
        ns = 0
        if _scan_personal(pf, pl, vlen, spans, &ns, &us, &ue) != PS_OK or ns == 0:
            continue  # unreadable (left to validation), or nothing to seal (no key needed)
        uid = PyBytes_FromStringAndSize(<const char *>pl + us, ue - us)
        if uid in seen:
            continue
        seen.add(uid)
        if not _plausible_user(pl + us, ue - us):
            continue  # not validated yet: an id the schema may refuse is not worth a key-store call
        if PyDict_GetItem(uk.keys, uid) == NULL:
            if missing is None:
                missing = []
            missing.append(uid)
    if missing is not None:
        uk.parts_waiting += 1
    return missing
