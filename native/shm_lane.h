/* What the C paths over the shared-memory slot share (shm_serve.c in the worker, shm_call.c in the coordinator):
   waiting on and waking the slot's words (whose addresses are fiddler_native.h's lane_slots), and reading and
   writing the few msgpack forms protocol/wire.py writes for the messages of a layer call (ints, short strings,
   lists and maps), so the format stays the one Python decodes and checks. */

#ifndef FIDDLER_SHM_LANE_H
#define FIDDLER_SHM_LANE_H

#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "fiddler_native.h" /* lane_slots, fiddler_parked_watch, MAX_EXPERTS (per request: more is left to Python) */

static inline double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Sleep until *word != value or timeout_ns (one futex wait; the caller rechecks), with this process's OpenMP
   threads parked when `park` (parked_wait.c), this thread watching *word for watch_ns first (parked only). */
static inline void sleep_on(uint32_t *word, uint32_t value, int64_t timeout_ns, int park, int64_t watch_ns) {
    if (park) {
        fiddler_parked_watch(word, value, watch_ns, timeout_ns);
    } else {
        struct timespec t = {timeout_ns / 1000000000, timeout_ns % 1000000000};
        syscall(SYS_futex, word, FUTEX_WAIT, value, &t, NULL, 0);
    }
}

static inline void wake_all(uint32_t *word) { syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0); }

/* --- reading the msgpack header: only the forms msgpack.packb writes for ints, strings, lists and maps --- */

typedef struct {
    const uint8_t *p, *end;
} reader;

static inline int take(reader *r, size_t n, const uint8_t **out) {
    if ((size_t)(r->end - r->p) < n) return 0;
    *out = r->p;
    r->p += n;
    return 1;
}

static inline uint64_t big_endian(const uint8_t *b, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = v << 8 | b[i];
    return v;
}

static inline int read_int(reader *r, int64_t *value) {
    const uint8_t *b;
    if (!take(r, 1, &b)) return 0;
    uint8_t t = b[0];
    if (t <= 0x7f) { *value = t; return 1; }
    if (t >= 0xe0) { *value = (int8_t)t; return 1; }
    int n = t == 0xcc || t == 0xd0 ? 1 : t == 0xcd || t == 0xd1 ? 2 : t == 0xce || t == 0xd2 ? 4
            : t == 0xcf || t == 0xd3 ? 8 : 0;
    if (n == 0 || !take(r, n, &b)) return 0;
    uint64_t u = big_endian(b, n);
    if (t >= 0xd0) { /* signed: extend from n bytes */
        int shift = 64 - 8 * n;
        *value = (int64_t)(u << shift) >> shift;
    } else {
        if (u > INT64_MAX) return 0;
        *value = (int64_t)u;
    }
    return 1;
}

static inline int read_str(reader *r, const char **s, uint32_t *len) {
    const uint8_t *b;
    if (!take(r, 1, &b)) return 0;
    uint8_t t = b[0];
    if ((t & 0xe0) == 0xa0) *len = t & 0x1f;
    else if (t == 0xd9 && take(r, 1, &b)) *len = b[0];
    else return 0;
    if (!take(r, *len, &b)) return 0;
    *s = (const char *)b;
    return 1;
}

static inline int read_head(reader *r, uint8_t fix, uint8_t fix_mask, uint8_t wide16, uint32_t *count) {
    const uint8_t *b;
    if (!take(r, 1, &b)) return 0;
    if ((b[0] & fix_mask) == fix) { *count = b[0] & (uint8_t)~fix_mask; return 1; }
    if (b[0] == wide16 && take(r, 2, &b)) { *count = (uint32_t)big_endian(b, 2); return 1; }
    return 0;
}

static inline int read_map(reader *r, uint32_t *count) { return read_head(r, 0x80, 0xf0, 0xde, count); }
static inline int read_array(reader *r, uint32_t *count) { return read_head(r, 0x90, 0xf0, 0xdc, count); }

static inline int is(const char *s, uint32_t len, const char *name) {
    return strlen(name) == len && !memcmp(s, name, len);
}

static inline int read_int_list(reader *r, int64_t *values, uint32_t *count) {
    if (!read_array(r, count) || *count > MAX_EXPERTS) return 0;
    for (uint32_t i = 0; i < *count; i++)
        if (!read_int(r, &values[i])) return 0;
    return 1;
}

static inline int read_float64(reader *r, double *value) {
    const uint8_t *b;
    if (!take(r, 1, &b) || b[0] != 0xcb || !take(r, 8, &b)) return 0;
    uint64_t bits = big_endian(b, 8);
    memcpy(value, &bits, 8);
    return 1;
}

/* The one tensor spec of a layer-call message: [{field: <field>, dtype: "bfloat16", shape: [rows, cols]}]. */
static inline int read_tensors(reader *r, const char *field, int64_t *rows, int64_t *cols) {
    uint32_t n, len, seen = 0;
    const char *s;
    if (!read_array(r, &n) || n != 1 || !read_map(r, &n) || n != 3) return 0;
    for (uint32_t i = 0; i < 3; i++) {
        if (!read_str(r, &s, &len)) return 0;
        int bit = is(s, len, "field") ? 1 : is(s, len, "dtype") ? 2 : is(s, len, "shape") ? 4 : 0;
        if (bit == 0 || (seen & bit)) return 0;
        seen |= bit;
        if (bit == 4) {
            if (!read_array(r, &n) || n != 2 || !read_int(r, rows) || !read_int(r, cols)) return 0;
        } else if (!read_str(r, &s, &len) || !is(s, len, bit == 1 ? field : "bfloat16")) {
            return 0;
        }
    }
    return seen == 7;
}

typedef int (*body_reader)(reader *r, void *body);

/* A whole layer-call header {v: version, kind: <kind>, body, tensors}, each key once and nothing after it; the
   body map is read by read_body into `body`, the tensor's shape into rows and cols. */
static inline int read_message(const uint8_t *meta, uint32_t meta_len, int64_t version, const char *kind,
                               body_reader read_body, void *body, const char *field, int64_t *rows, int64_t *cols) {
    reader r = {meta, meta + meta_len};
    uint32_t n, len, seen = 0;
    const char *key, *s;
    int64_t v;
    if (!read_map(&r, &n) || n != 4) return 0;
    for (uint32_t i = 0; i < 4; i++) {
        if (!read_str(&r, &key, &len)) return 0;
        int bit = is(key, len, "v") ? 1 : is(key, len, "kind") ? 2 : is(key, len, "body") ? 4
                  : is(key, len, "tensors") ? 8 : 0;
        if (bit == 0 || (seen & bit)) return 0;
        seen |= bit;
        int ok = bit == 1 ? read_int(&r, &v) && v == version
                 : bit == 2 ? read_str(&r, &s, &len) && is(s, len, kind)
                 : bit == 4 ? read_body(&r, body) : read_tensors(&r, field, rows, cols);
        if (!ok) return 0;
    }
    return seen == 15 && r.p == r.end;
}

/* --- writing headers as msgpack.packb writes them --- */

static inline uint8_t *put_int(uint8_t *p, int64_t v) {
    if (v >= 0 && v <= 0x7f) { *p++ = (uint8_t)v; return p; }
    if (v < 0 && v >= -32) { *p++ = (uint8_t)(int8_t)v; return p; }
    int n;
    uint8_t t;
    if (v >= 0) {
        n = v <= 0xff ? 1 : v <= 0xffff ? 2 : v <= 0xffffffffLL ? 4 : 8;
        t = n == 1 ? 0xcc : n == 2 ? 0xcd : n == 4 ? 0xce : 0xcf;
    } else {
        n = v >= -128 ? 1 : v >= -32768 ? 2 : v >= INT32_MIN ? 4 : 8;
        t = n == 1 ? 0xd0 : n == 2 ? 0xd1 : n == 4 ? 0xd2 : 0xd3;
    }
    *p++ = t;
    for (int i = n - 1; i >= 0; i--) *p++ = (uint8_t)((uint64_t)v >> (8 * i));
    return p;
}

static inline uint8_t *put_str(uint8_t *p, const char *s) {
    size_t n = strlen(s); /* every string here is under 32 bytes: fixstr */
    *p++ = (uint8_t)(0xa0 | n);
    memcpy(p, s, n);
    return p + n;
}

static inline uint8_t *put_float64(uint8_t *p, double v) {
    uint64_t bits;
    memcpy(&bits, &v, 8);
    *p++ = 0xcb;
    for (int i = 7; i >= 0; i--) *p++ = (uint8_t)(bits >> (8 * i));
    return p;
}

/* {v: version, kind: <kind>, body: then the body map's own bytes (the caller writes them). */
static inline uint8_t *put_message_start(uint8_t *p, int64_t version, const char *kind) {
    *p++ = 0x84;
    p = put_str(p, "v"), p = put_int(p, version);
    p = put_str(p, "kind"), p = put_str(p, kind);
    return put_str(p, "body");
}

/* tensors: [{field: <field>, dtype: "bfloat16", shape: [rows, cols]}], the end of a layer-call header. */
static inline uint8_t *put_tensors(uint8_t *p, const char *field, int64_t rows, int64_t cols) {
    p = put_str(p, "tensors"), *p++ = 0x91, *p++ = 0x83;
    p = put_str(p, "field"), p = put_str(p, field);
    p = put_str(p, "dtype"), p = put_str(p, "bfloat16");
    p = put_str(p, "shape"), *p++ = 0x92, p = put_int(p, rows);
    return put_int(p, cols);
}

#endif
