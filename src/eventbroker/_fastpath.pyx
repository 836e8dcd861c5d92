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
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_Resize
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc, calloc
from libc.string cimport memcmp, memcpy, memmove, memset

from eventbroker.errors import ProtocolError

cdef extern from "native.h":
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

include "_native/consts.pxi"

eb_crc32c_init()

include "_native/framing.pxi"
include "_native/ring.pxi"
include "_native/record_batch.pxi"
include "_native/flat_schema.pxi"
include "_native/splitter.pxi"
include "_native/personal.pxi"
include "_native/encoder.pxi"
include "_native/producer.pxi"
