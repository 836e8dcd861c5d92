/* Small native helpers for _fastpath.pyx, written for this project.
 *
 * crc32c: CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum
 *   of both our wire frames and Kafka record batches. Uses the SSE4.2 crc32
 *   instruction when the CPU has it, else a slicing-by-8 table.
 * murmur2: the 32-bit MurmurHash2 variant Kafka's default partitioner uses
 *   (seed 0x9747b28c), so keyed events land on the partition a Java or
 *   librdkafka ("murmur2" partitioner) producer would pick.
 */
#ifndef EB_NATIVE_H
#define EB_NATIVE_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

static uint32_t eb_crc_table[8][256];
static int eb_crc_hw = 0;

static void eb_crc32c_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : (c >> 1);
        eb_crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = eb_crc_table[0][n];
        for (int t = 1; t < 8; t++) {
            c = eb_crc_table[0][c & 0xff] ^ (c >> 8);
            eb_crc_table[t][n] = c;
        }
    }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    eb_crc_hw = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t eb_crc32c_sw(uint32_t crc, const unsigned char *p, size_t len) {
    crc = ~crc;
    while (len && ((uintptr_t)p & 7)) {
        crc = eb_crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
#endif
        w ^= crc;
        crc = eb_crc_table[7][w & 0xff] ^ eb_crc_table[6][(w >> 8) & 0xff] ^
              eb_crc_table[5][(w >> 16) & 0xff] ^ eb_crc_table[4][(w >> 24) & 0xff] ^
              eb_crc_table[3][(w >> 32) & 0xff] ^ eb_crc_table[2][(w >> 40) & 0xff] ^
              eb_crc_table[1][(w >> 48) & 0xff] ^ eb_crc_table[0][w >> 56];
        p += 8;
        len -= 8;
    }
    while (len--) crc = eb_crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("sse4.2")))
static uint32_t eb_crc32c_hw(uint32_t crc, const unsigned char *p, size_t len) {
    uint64_t c = (uint32_t)~crc;
    while (len && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        len -= 8;
    }
    while (len--) c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#endif

static inline uint32_t eb_crc32c(uint32_t crc, const unsigned char *p, size_t len) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (eb_crc_hw) return eb_crc32c_hw(crc, p, len);
#endif
    return eb_crc32c_sw(crc, p, len);
}

static inline int eb_crc32c_uses_hw(void) { return eb_crc_hw; }

static inline uint32_t eb_murmur2(const unsigned char *data, size_t len) {
    const uint32_t m = 0x5bd1e995u;
    const int r = 24;
    uint32_t h = 0x9747b28cu ^ (uint32_t)len;
    size_t n4 = len / 4;
    for (size_t i = 0; i < n4; i++) {
        uint32_t k = (uint32_t)data[i * 4] | ((uint32_t)data[i * 4 + 1] << 8) |
                     ((uint32_t)data[i * 4 + 2] << 16) | ((uint32_t)data[i * 4 + 3] << 24);
        k *= m;
        k ^= k >> r;
        k *= m;
        h *= m;
        h ^= k;
    }
    const unsigned char *tail = data + n4 * 4;
    switch (len & 3) {
    case 3: h ^= (uint32_t)tail[2] << 16; /* fall through */
    case 2: h ^= (uint32_t)tail[1] << 8;  /* fall through */
    case 1: h ^= (uint32_t)tail[0]; h *= m;
    }
    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    return h;
}

/* Big-endian loads and stores; the wire format and Kafka are big-endian. */
static inline uint16_t eb_ld16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t eb_ld32(const unsigned char *p) {
    uint32_t v; memcpy(&v, p, 4); return __builtin_bswap32(v);
}
static inline uint64_t eb_ld64(const unsigned char *p) {
    uint64_t v; memcpy(&v, p, 8); return __builtin_bswap64(v);
}
static inline void eb_st16(unsigned char *p, uint16_t v) { p[0] = (unsigned char)(v >> 8); p[1] = (unsigned char)v; }
static inline void eb_st32(unsigned char *p, uint32_t v) { v = __builtin_bswap32(v); memcpy(p, &v, 4); }
static inline void eb_st64(unsigned char *p, uint64_t v) { v = __builtin_bswap64(v); memcpy(p, &v, 8); }

/* Kafka varints: zigzag-encoded base-128. */
static inline size_t eb_varint_size(int64_t v) {
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    size_t n = 1;
    while (z >= 0x80) { z >>= 7; n++; }
    return n;
}
static inline unsigned char *eb_put_varint(unsigned char *p, int64_t v) {
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    while (z >= 0x80) { *p++ = (unsigned char)(z | 0x80); z >>= 7; }
    *p++ = (unsigned char)z;
    return p;
}

#endif
