/*
 * _fastdecode: serialized OTLP ExportTraceServiceRequest -> SpanBatch columns, without the protobuf object model.
 *
 * The result must equal decode_request(ExportTraceServiceRequest.FromString(data), prefixes) exactly
 * (evaluator/receiver/decode.py is the reference). Two phases:
 *
 *  1. validate(): walks the whole message with the OTLP schema (SCHEMA below) and accepts exactly what upb
 *     accepts: tags of at most 5 bytes, varints of at most 10 bytes, lengths below INT32_MAX and inside the
 *     enclosing message, no field number 0 (except inside unknown groups), no wire types 6/7, no stray
 *     end-group, unknown groups well nested, at most 100 levels of nesting, valid UTF-8 in every `string` field
 *     (also in the parts that are not decoded: events, links, scope, entity refs, unknown-type nesting).
 *  2. extraction: walks the (now valid) bytes again with the protobuf merge rules: a known field with the wrong
 *     wire type is an unknown field; a scalar that occurs twice takes the last value; an embedded message that
 *     occurs twice is merged (for the AnyValue oneof, the last member set wins and only the trailing run of
 *     occurrences of a message member is merged); repeated fields keep wire order.
 *
 * Rare values (kvlist values, string_value_strindex, arrays that are neither all-numeric nor all-string, and the
 * resource) are handed back to Python as the raw (merged) sub-message bytes through two callables, so their
 * JSON text comes from the same Python helpers the reference uses.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define HOT static inline __attribute__((always_inline))
#else
#define HOT static inline
#endif

#define MAX_DEPTH 100  /* python-protobuf (upb) default recursion limit: nested messages/groups below the top */
#define MAX_REASONS 5  /* decode._MAX_REASONS */

static PyObject *DecodeError; /* evaluator.receiver.decode.DecodeError */

/* ---------------------------------------------------------------------------------------------------------- */
/* Schema                                                                                                      */
/* ---------------------------------------------------------------------------------------------------------- */

enum {
    M_REQ, M_RS, M_RES, M_KV, M_ANY, M_ARR, M_KVL, M_ENT, M_SS, M_SCOPE, M_SPAN, M_EVENT, M_LINK, M_STATUS,
    M_COUNT
};
enum { K_NONE, K_VARINT, K_I64, K_I32, K_STR, K_BYTES, K_MSG };
#define MAX_FIELD 16

typedef struct {
    unsigned char kind, sub;
} FieldDef;

static const FieldDef SCHEMA[M_COUNT][MAX_FIELD + 1] = {
    [M_REQ] = {[1] = {K_MSG, M_RS}},
    [M_RS] = {[1] = {K_MSG, M_RES}, [2] = {K_MSG, M_SS}, [3] = {K_STR, 0}},
    [M_RES] = {[1] = {K_MSG, M_KV}, [2] = {K_VARINT, 0}, [3] = {K_MSG, M_ENT}},
    [M_KV] = {[1] = {K_STR, 0}, [2] = {K_MSG, M_ANY}, [3] = {K_VARINT, 0}},
    [M_ANY] = {[1] = {K_STR, 0}, [2] = {K_VARINT, 0}, [3] = {K_VARINT, 0}, [4] = {K_I64, 0},
               [5] = {K_MSG, M_ARR}, [6] = {K_MSG, M_KVL}, [7] = {K_BYTES, 0}, [8] = {K_VARINT, 0}},
    [M_ARR] = {[1] = {K_MSG, M_ANY}},
    [M_KVL] = {[1] = {K_MSG, M_KV}},
    [M_ENT] = {[1] = {K_STR, 0}, [2] = {K_STR, 0}, [3] = {K_STR, 0}, [4] = {K_STR, 0}},
    [M_SS] = {[1] = {K_MSG, M_SCOPE}, [2] = {K_MSG, M_SPAN}, [3] = {K_STR, 0}},
    [M_SCOPE] = {[1] = {K_STR, 0}, [2] = {K_STR, 0}, [3] = {K_MSG, M_KV}, [4] = {K_VARINT, 0}},
    [M_SPAN] = {[1] = {K_BYTES, 0}, [2] = {K_BYTES, 0}, [3] = {K_STR, 0}, [4] = {K_BYTES, 0},
                [5] = {K_STR, 0}, [6] = {K_VARINT, 0}, [7] = {K_I64, 0}, [8] = {K_I64, 0},
                [9] = {K_MSG, M_KV}, [10] = {K_VARINT, 0}, [11] = {K_MSG, M_EVENT}, [12] = {K_VARINT, 0},
                [13] = {K_MSG, M_LINK}, [14] = {K_VARINT, 0}, [15] = {K_MSG, M_STATUS}, [16] = {K_I32, 0}},
    [M_EVENT] = {[1] = {K_I64, 0}, [2] = {K_STR, 0}, [3] = {K_MSG, M_KV}, [4] = {K_VARINT, 0}},
    [M_LINK] = {[1] = {K_BYTES, 0}, [2] = {K_BYTES, 0}, [3] = {K_STR, 0}, [4] = {K_MSG, M_KV},
                [5] = {K_VARINT, 0}, [6] = {K_I32, 0}},
    [M_STATUS] = {[2] = {K_STR, 0}, [3] = {K_VARINT, 0}},
};

static const char *const MSG_NAMES[M_COUNT] = {
    [M_REQ] = "opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest",
    [M_RS] = "opentelemetry.proto.trace.v1.ResourceSpans",
    [M_RES] = "opentelemetry.proto.resource.v1.Resource",
    [M_KV] = "opentelemetry.proto.common.v1.KeyValue",
    [M_ANY] = "opentelemetry.proto.common.v1.AnyValue",
    [M_ARR] = "opentelemetry.proto.common.v1.ArrayValue",
    [M_KVL] = "opentelemetry.proto.common.v1.KeyValueList",
    [M_ENT] = "opentelemetry.proto.common.v1.EntityRef",
    [M_SS] = "opentelemetry.proto.trace.v1.ScopeSpans",
    [M_SCOPE] = "opentelemetry.proto.common.v1.InstrumentationScope",
    [M_SPAN] = "opentelemetry.proto.trace.v1.Span",
    [M_EVENT] = "opentelemetry.proto.trace.v1.Span.Event",
    [M_LINK] = "opentelemetry.proto.trace.v1.Span.Link",
    [M_STATUS] = "opentelemetry.proto.trace.v1.Status",
};

static const char *const KIND_NAMES[] = {
    [K_NONE] = "none", [K_VARINT] = "varint", [K_I64] = "i64", [K_I32] = "i32",
    [K_STR] = "string", [K_BYTES] = "bytes", [K_MSG] = "message",
};

/* ---------------------------------------------------------------------------------------------------------- */
/* Wire primitives (every read is bounds-checked)                                                             */
/* ---------------------------------------------------------------------------------------------------------- */

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_SGROUP = 3, WT_EGROUP = 4, WT_I32 = 5 };
enum { E_MALFORMED = -1, E_UTF8 = -2, E_DEPTH = -3 };

HOT int
rd_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    const uint8_t *p = *pp;
    if (p >= end) return E_MALFORMED;
    uint64_t b = *p++;
    if (!(b & 0x80)) {
        *out = b;
        *pp = p;
        return 0;
    }
    uint64_t v = b & 0x7f;
    for (int i = 1; i < 10; i++) {
        if (p >= end) return E_MALFORMED;
        b = *p++;
        v |= (b & 0x7f) << (7 * i); /* bits past 64 are dropped, like upb */
        if (!(b & 0x80)) {
            *out = v;
            *pp = p;
            return 0;
        }
    }
    return E_MALFORMED; /* more than 10 bytes */
}

HOT int
rd_tag(const uint8_t **pp, const uint8_t *end, uint32_t *fn, int *wt)
{
    const uint8_t *p = *pp;
    uint64_t v;
    if (p < end && !(*p & 0x80)) { /* one-byte tag */
        v = *p++;
    }
    else {
        if (rd_varint(&p, end, &v) < 0) return E_MALFORMED;
        if (p - *pp > 5 || v > 0xFFFFFFFFu) return E_MALFORMED;
    }
    *pp = p;
    *fn = (uint32_t)(v >> 3);
    *wt = (int)(v & 7);
    return 0;
}

HOT int
rd_len(const uint8_t **pp, const uint8_t *end, size_t *out)
{
    uint64_t n;
    const uint8_t *p = *pp;
    if (p < end && !(*p & 0x80)) {
        n = *p++;
    }
    else if (rd_varint(&p, end, &n) < 0) {
        return E_MALFORMED;
    }
    if (n >= INT32_MAX || n > (uint64_t)(end - p)) return E_MALFORMED;
    *pp = p;
    *out = (size_t)n;
    return 0;
}

static inline uint64_t
le64(const uint8_t *p)
{
    return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24 |
           (uint64_t)p[4] << 32 | (uint64_t)p[5] << 40 | (uint64_t)p[6] << 48 | (uint64_t)p[7] << 56;
}

/* An unknown group: fields until the matching end-group tag. Field number 0 is allowed inside (as in upb). */
static int
skip_group(const uint8_t **pp, const uint8_t *end, uint32_t number, int depth)
{
    const uint8_t *p = *pp;
    if (--depth < 0) return E_DEPTH;
    for (;;) {
        uint32_t fn;
        int wt, r;
        uint64_t v;
        size_t n;
        if (p >= end) return E_MALFORMED; /* no end-group before the end of the enclosing message */
        if (rd_tag(&p, end, &fn, &wt) < 0) return E_MALFORMED;
        switch (wt) {
        case WT_VARINT:
            if (rd_varint(&p, end, &v) < 0) return E_MALFORMED;
            break;
        case WT_I64:
            if (end - p < 8) return E_MALFORMED;
            p += 8;
            break;
        case WT_I32:
            if (end - p < 4) return E_MALFORMED;
            p += 4;
            break;
        case WT_LEN:
            if (rd_len(&p, end, &n) < 0) return E_MALFORMED;
            p += n;
            break;
        case WT_SGROUP:
            if ((r = skip_group(&p, end, fn, depth)) < 0) return r;
            break;
        case WT_EGROUP:
            if (fn != number) return E_MALFORMED;
            *pp = p;
            return 0;
        default:
            return E_MALFORMED;
        }
    }
}

typedef struct {
    uint32_t fn;
    int wt;
    uint64_t v;          /* varint / fixed value */
    const uint8_t *data; /* length-delimited payload */
    size_t len;
} Fld;

/* One field at *pp of a message (not a group); advances past it. */
HOT int
next_field(const uint8_t **pp, const uint8_t *end, Fld *f)
{
    f->v = 0;
    f->data = NULL;
    f->len = 0;
    if (rd_tag(pp, end, &f->fn, &f->wt) < 0 || f->fn == 0) return E_MALFORMED;
    switch (f->wt) {
    case WT_VARINT:
        return rd_varint(pp, end, &f->v);
    case WT_I64:
        if (end - *pp < 8) return E_MALFORMED;
        f->v = le64(*pp);
        *pp += 8;
        return 0;
    case WT_I32:
        if (end - *pp < 4) return E_MALFORMED;
        f->v = (uint64_t)(*pp)[0] | (uint64_t)(*pp)[1] << 8 | (uint64_t)(*pp)[2] << 16 |
               (uint64_t)(*pp)[3] << 24;
        *pp += 4;
        return 0;
    case WT_LEN:
        if (rd_len(pp, end, &f->len) < 0) return E_MALFORMED;
        f->data = *pp;
        *pp += f->len;
        return 0;
    case WT_SGROUP:
        return skip_group(pp, end, f->fn, MAX_DEPTH);
    default: /* end-group outside a group, 6, 7 */
        return E_MALFORMED;
    }
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Phase 1: validation                                                                                         */
/* ---------------------------------------------------------------------------------------------------------- */

/* Strict UTF-8 (no overlongs, no surrogates, nothing above U+10FFFF), like upb's utf8_range and Python. */
static int
utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (n - i >= 8) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
        }
        else if (c < 0xC2) {
            return 0;
        }
        else if (c < 0xE0) {
            if (n - i < 2 || (s[i + 1] & 0xC0) != 0x80) return 0;
            i += 2;
        }
        else if (c < 0xF0) {
            if (n - i < 3) return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80) return 0;
            if (c == 0xE0 && c1 < 0xA0) return 0;  /* overlong */
            if (c == 0xED && c1 >= 0xA0) return 0; /* surrogate */
            i += 3;
        }
        else if (c < 0xF5) {
            if (n - i < 4) return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2], c3 = s[i + 3];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80 || (c3 & 0xC0) != 0x80) return 0;
            if (c == 0xF0 && c1 < 0x90) return 0;  /* overlong */
            if (c == 0xF4 && c1 >= 0x90) return 0; /* above U+10FFFF */
            i += 4;
        }
        else {
            return 0;
        }
    }
    return 1;
}

/* depth: how many more levels of nesting are allowed below this message; counts[type] += 1 per message. */
static int
validate_msg(int type, const uint8_t *p, const uint8_t *end, int depth, Py_ssize_t *counts)
{
    static const FieldDef unknown = {K_NONE, 0};
    counts[type]++;
    while (p < end) {
        uint32_t fn;
        int wt, r;
        uint64_t v;
        size_t n;
        if (rd_tag(&p, end, &fn, &wt) < 0) return E_MALFORMED;
        if (fn == 0) return E_MALFORMED;
        const FieldDef *fd = fn <= MAX_FIELD ? &SCHEMA[type][fn] : &unknown;
        switch (wt) {
        case WT_VARINT:
            if (rd_varint(&p, end, &v) < 0) return E_MALFORMED;
            break;
        case WT_I64:
            if (end - p < 8) return E_MALFORMED;
            p += 8;
            break;
        case WT_I32:
            if (end - p < 4) return E_MALFORMED;
            p += 4;
            break;
        case WT_LEN:
            if (rd_len(&p, end, &n) < 0) return E_MALFORMED;
            if (fd->kind == K_STR) {
                if (!utf8_valid(p, n)) return E_UTF8;
            }
            else if (fd->kind == K_MSG) {
                if (depth < 1) return E_DEPTH;
                if ((r = validate_msg(fd->sub, p, p + n, depth - 1, counts)) < 0) return r;
            }
            p += n;
            break;
        case WT_SGROUP: /* never a known field here (no group-typed fields in OTLP): an unknown group */
            if ((r = skip_group(&p, end, fn, depth)) < 0) return r;
            break;
        default: /* end-group at message level, wire types 6 and 7 */
            return E_MALFORMED;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Phase 2: extraction                                                                                         */
/* ---------------------------------------------------------------------------------------------------------- */

enum {
    C_TRACE, C_SPAN, C_PARENT, C_NAME, C_KIND, C_START, C_END, C_SCODE, C_SMSG, C_SERVICE, C_SCOPE, C_RES,
    C_NUM_SPAN, C_NUM_KEY, C_NUM_VAL, C_STR_SPAN, C_STR_KEY, C_STR_VAL,
    C_ARR_SPAN, C_ARR_KEY, C_ARR_NUMS, C_ARR_STRS,
    NCOLS
};

/* Short strings repeat a lot (attribute keys, span names, enum-like values): a small direct-mapped cache of
 * their str objects per call. Entries copy the bytes, so nothing points into the input. */
#define CACHE_SLOTS 512
#define CACHE_MAXLEN 48
typedef struct {
    PyObject *s;
    uint64_t h;
    uint32_t n;
    uint8_t b[CACHE_MAXLEN];
} CacheEnt;

/* A column being built: owned references, turned into a list at the end (cheaper than growing lists). */
typedef struct {
    PyObject **items;
    Py_ssize_t n, cap, max; /* max: upper bound from the validation pass (for the first allocation) */
} Vec;

typedef struct {
    Vec col[NCOLS];
    PyObject *reasons;
    Py_ssize_t received, dropped, rejected;
    int keep_all;
    Py_ssize_t npfx;
    const char **pfx;
    Py_ssize_t *pfxlen; /* -1: the prefix cannot match (not encodable as UTF-8) */
    PyObject *resource_fn, *value_fn;
    CacheEnt *cache;
    uint8_t tid[16];
    PyObject *tid_str; /* hex of tid (trace ids repeat within a request) */
} St;

typedef struct {
    const uint8_t *p, *end; /* the ResourceSpans */
    int done;
    PyObject *service, *res_json;
} Rs;

static int
malformed(void)
{
    PyErr_SetString(DecodeError, "invalid ExportTraceServiceRequest: wire format is corrupt");
    return -1;
}

static inline uint64_t
hash_bytes(const uint8_t *p, size_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t w = 0;
        memcpy(&w, p, n);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
    }
    return h ^ (h >> 29);
}

/* New reference to the str of UTF-8 bytes (already validated). */
static PyObject *
get_str(St *st, const uint8_t *p, size_t n)
{
    if (n > CACHE_MAXLEN) return PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, NULL);
    uint64_t h = hash_bytes(p, n);
    CacheEnt *e = &st->cache[h & (CACHE_SLOTS - 1)];
    if (e->h == h && e->n == n && e->s && memcmp(e->b, p, n) == 0) {
        Py_INCREF(e->s);
        return e->s;
    }
    PyObject *s = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, NULL);
    if (!s) return NULL;
    Py_XSETREF(e->s, s);
    Py_INCREF(s);
    e->h = h;
    e->n = (uint32_t)n;
    if (n) memcpy(e->b, p, n);
    return s;
}

static PyObject *
hex_str(const uint8_t *p, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    PyObject *s = PyUnicode_New((Py_ssize_t)(2 * n), 127);
    if (!s) return NULL;
    Py_UCS1 *d = PyUnicode_1BYTE_DATA(s);
    for (size_t i = 0; i < n; i++) {
        d[2 * i] = (Py_UCS1)digits[p[i] >> 4];
        d[2 * i + 1] = (Py_UCS1)digits[p[i] & 15];
    }
    return s;
}

static int
vec_grow(Vec *v)
{
    Py_ssize_t cap = v->cap ? v->cap * 2 : (v->max < 256 ? 256 : (v->max < 4096 ? v->max : 4096));
    if (cap > PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(PyObject *)) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject **items = PyMem_Realloc(v->items, (size_t)cap * sizeof(PyObject *));
    if (!items) {
        PyErr_NoMemory();
        return -1;
    }
    v->items = items;
    v->cap = cap;
    return 0;
}

/* Appends obj (a new reference, may be NULL after a failed call); always consumes obj. */
HOT int
push(Vec *v, PyObject *obj)
{
    if (!obj) return -1;
    if (v->n == v->cap && vec_grow(v) < 0) {
        Py_DECREF(obj);
        return -1;
    }
    v->items[v->n++] = obj;
    return 0;
}

/* Appends a borrowed reference. */
HOT int
push_ref(Vec *v, PyObject *obj)
{
    Py_INCREF(obj);
    return push(v, obj);
}

static void
vec_truncate(Vec *v, Py_ssize_t n)
{
    while (v->n > n) {
        v->n--;
        Py_DECREF(v->items[v->n]);
    }
}

/* The list of the items (moved out of v). */
static PyObject *
vec_to_list(Vec *v)
{
    PyObject *list = PyList_New(v->n);
    if (!list) return NULL;
    for (Py_ssize_t i = 0; i < v->n; i++) PyList_SET_ITEM(list, i, v->items[i]);
    v->n = 0;
    return list;
}

static void
vec_free(Vec *v)
{
    vec_truncate(v, 0);
    PyMem_Free(v->items);
    v->items = NULL;
    v->cap = 0;
}

static inline int
is_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i]) return 0;
    return 1;
}

typedef struct {
    const uint8_t *p;
    size_t n;
} Bytes;

static int
prefix_match(const St *st, const uint8_t *k, size_t n)
{
    for (Py_ssize_t i = 0; i < st->npfx; i++) {
        Py_ssize_t m = st->pfxlen[i];
        if (m >= 0 && (size_t)m <= n && memcmp(k, st->pfx[i], (size_t)m) == 0) return 1;
    }
    return 0;
}

/* The key of a KeyValue: the last occurrence of field 1. */
static int
kv_key(const uint8_t *p, const uint8_t *end, Bytes *key)
{
    Fld f;
    key->p = (const uint8_t *)"";
    key->n = 0;
    while (p < end) {
        if (next_field(&p, end, &f) < 0) return malformed();
        if (f.fn == 1 && f.wt == WT_LEN) {
            key->p = f.data;
            key->n = f.len;
        }
    }
    return 0;
}

/* The oneof member of an AnyValue field, or 0 for a field that is not a member (or has the wrong wire type). */
static inline int
any_member(const Fld *f)
{
    switch (f->fn) {
    case 1: case 5: case 6: case 7:
        return f->wt == WT_LEN ? (int)f->fn : 0;
    case 2: case 3: case 8:
        return f->wt == WT_VARINT ? (int)f->fn : 0;
    case 4:
        return f->wt == WT_I64 ? 4 : 0;
    default:
        return 0;
    }
}

/* The set member of one AnyValue occurrence: the last member field wins. */
static int
any_last(const uint8_t *p, const uint8_t *end, int *member, Fld *last)
{
    Fld f;
    *member = 0;
    while (p < end) {
        if (next_field(&p, end, &f) < 0) return malformed();
        int m = any_member(&f);
        if (m) {
            *member = m;
            *last = f;
        }
    }
    return 0;
}

static inline double
num_of(int member, uint64_t v)
{
    double d;
    switch (member) {
    case 2:
        return v ? 1.0 : 0.0;
    case 3:
        return (double)(int64_t)v;
    default:
        memcpy(&d, &v, 8);
        return d;
    }
}

/* Calls value_fn(raw AnyValue bytes); returns a new reference checked to be `want` (str or list). */
static PyObject *
call_value_fn(St *st, const uint8_t *p, size_t n, PyTypeObject *want)
{
    PyObject *raw = PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
    if (!raw) return NULL;
    PyObject *r = PyObject_CallOneArg(st->value_fn, raw);
    Py_DECREF(raw);
    if (r && Py_TYPE(r) != want) {
        PyErr_Format(PyExc_TypeError, "value helper returned %.100s, expected %.100s", Py_TYPE(r)->tp_name,
                     want->tp_name);
        Py_CLEAR(r);
    }
    return r;
}

static inline void
set_bad(PyObject **bad, PyObject *reason)
{
    Py_XSETREF(*bad, reason);
}

/* The elements of an all-numeric (floats) or all-string (str) array, in wire order. */
static PyObject *
array_list(St *st, const uint8_t *run, const uint8_t *vend, Py_ssize_t count, int numeric, int *finite)
{
    Fld f, e, last = {0};
    int member;
    Py_ssize_t i = 0;
    PyObject *list = PyList_New(count);
    if (!list) return NULL;
    const uint8_t *q = run;
    while (q < vend) {
        if (next_field(&q, vend, &f) < 0) goto malformed;
        if (f.fn != 5 || f.wt != WT_LEN) continue;
        const uint8_t *a = f.data, *aend = f.data + f.len;
        while (a < aend) {
            if (next_field(&a, aend, &e) < 0) goto malformed;
            if (e.fn != 1 || e.wt != WT_LEN) continue;
            if (any_last(e.data, e.data + e.len, &member, &last) < 0) goto fail;
            if (i >= count) goto malformed;
            PyObject *item;
            if (numeric) {
                double d = num_of(member, last.v);
                if (!isfinite(d)) *finite = 0;
                item = PyFloat_FromDouble(d);
            }
            else {
                item = get_str(st, last.data, last.len);
            }
            if (!item) goto fail;
            PyList_SET_ITEM(list, i, item);
            i++;
        }
    }
    if (i == count) return list;
malformed:
    malformed();
fail:
    Py_DECREF(list); /* unset items are NULL, which list_dealloc skips */
    return NULL;
}

/* An array value: the elements of the trailing run of array_value occurrences (from `run`). */
static int
add_array(St *st, Bytes key, PyObject *idx, const uint8_t *run, const uint8_t *vstart, const uint8_t *vend,
          PyObject **bad)
{
    Fld f, e, last = {0};
    Py_ssize_t count = 0;
    int all_num = 1, all_str = 1, member, finite = 1;
    const uint8_t *q = run;
    while (q < vend) {
        if (next_field(&q, vend, &f) < 0) return malformed();
        if (f.fn != 5 || f.wt != WT_LEN) continue;
        const uint8_t *a = f.data, *aend = f.data + f.len;
        while (a < aend) {
            if (next_field(&a, aend, &e) < 0) return malformed();
            if (e.fn != 1 || e.wt != WT_LEN) continue;
            if (any_last(e.data, e.data + e.len, &member, &last) < 0) return -1;
            count++;
            if (member < 2 || member > 4) all_num = 0;
            if (member != 1) all_str = 0;
        }
    }
    PyObject *nums = NULL, *strs = NULL;
    if (all_num) { /* also the empty array, like the reference (the set of kinds is a subset) */
        if (!(nums = array_list(st, run, vend, count, 1, &finite))) return -1;
    }
    else if (all_str) {
        if (!(strs = array_list(st, run, vend, count, 0, &finite))) return -1;
    }
    else {
        if (!(strs = call_value_fn(st, vstart, (size_t)(vend - vstart), &PyList_Type))) return -1;
    }
    PyObject *keyobj = get_str(st, key.p, key.n);
    if (!keyobj) {
        Py_XDECREF(nums);
        Py_XDECREF(strs);
        return -1;
    }
    if (!nums) nums = Py_NewRef(Py_None);
    if (!strs) strs = Py_NewRef(Py_None);
    int r = 0;
    if (push_ref(&st->col[C_ARR_SPAN], idx) < 0 || push_ref(&st->col[C_ARR_KEY], keyobj) < 0 ||
        push_ref(&st->col[C_ARR_NUMS], nums) < 0 || push_ref(&st->col[C_ARR_STRS], strs) < 0) {
        r = -1;
    }
    else if (!finite) {
        PyObject *reason = PyUnicode_FromFormat("attribute %U holds a non-finite number", keyobj);
        if (!reason)
            r = -1;
        else
            set_bad(bad, reason);
    }
    Py_DECREF(keyobj);
    Py_DECREF(nums);
    Py_DECREF(strs);
    return r;
}

static int
add_str(St *st, Bytes key, PyObject *idx, PyObject *val)
{
    if (!val) return -1;
    PyObject *keyobj = get_str(st, key.p, key.n);
    if (!keyobj) {
        Py_DECREF(val);
        return -1;
    }
    int r = (push_ref(&st->col[C_STR_SPAN], idx) < 0 || push_ref(&st->col[C_STR_KEY], keyobj) < 0 ||
             push_ref(&st->col[C_STR_VAL], val) < 0)
                ? -1
                : 0;
    Py_DECREF(keyobj);
    Py_DECREF(val);
    return r;
}

/* One (merged) AnyValue [vp, vend) of the attribute `key`. */
static int
add_value(St *st, Bytes key, PyObject *idx, const uint8_t *vp, const uint8_t *vend, PyObject **bad)
{
    Fld f, last = {0};
    int member = 0;
    const uint8_t *q = vp, *run = NULL;
    while (q < vend) {
        const uint8_t *start = q;
        if (next_field(&q, vend, &f) < 0) return malformed();
        int m = any_member(&f);
        if (m) {
            if (m != member) run = start;
            member = m;
            last = f;
        }
    }
    switch (member) {
    case 0:
        return 0;
    case 1:
        return add_str(st, key, idx, get_str(st, last.data, last.len));
    case 7:
        return add_str(st, key, idx, hex_str(last.data, last.len));
    case 6: case 8:
        return add_str(st, key, idx, call_value_fn(st, vp, (size_t)(vend - vp), &PyUnicode_Type));
    case 5:
        return add_array(st, key, idx, run, vp, vend, bad);
    default: { /* 2 bool, 3 int, 4 double */
        double d = num_of(member, last.v);
        PyObject *keyobj = get_str(st, key.p, key.n);
        if (!keyobj) return -1;
        int r = 0;
        if (push_ref(&st->col[C_NUM_SPAN], idx) < 0 || push_ref(&st->col[C_NUM_KEY], keyobj) < 0 ||
            push(&st->col[C_NUM_VAL], PyFloat_FromDouble(d)) < 0) {
            r = -1;
        }
        else if (!isfinite(d)) {
            PyObject *reason = PyUnicode_FromFormat("attribute %U is not a finite number (%s)", keyobj,
                                                    isnan(d) ? "nan" : (d > 0 ? "inf" : "-inf"));
            if (!reason)
                r = -1;
            else
                set_bad(bad, reason);
        }
        Py_DECREF(keyobj);
        return r;
    }
    }
}

/* One KeyValue of a kept span. */
static int
add_kv(St *st, const uint8_t *p, const uint8_t *end, PyObject *idx, PyObject **bad)
{
    Fld f;
    Bytes key = {(const uint8_t *)"", 0}, val = {NULL, 0};
    size_t nvals = 0, total = 0;
    const uint8_t *q = p;
    while (q < end) {
        if (next_field(&q, end, &f) < 0) return malformed();
        if (f.wt != WT_LEN) continue;
        if (f.fn == 1) {
            key.p = f.data;
            key.n = f.len;
        }
        else if (f.fn == 2) {
            if (!nvals) {
                val.p = f.data;
                val.n = f.len;
            }
            nvals++;
            total += f.len;
        }
    }
    if (!nvals) return 0; /* no value: nothing to store (the key still counted for keeping the span) */
    if (nvals == 1) return add_value(st, key, idx, val.p, val.p + val.n, bad);
    /* `value` occurs several times: the messages merge, which is what parsing their concatenation gives. */
    uint8_t *buf = PyMem_Malloc(total ? total : 1);
    if (!buf) {
        PyErr_NoMemory();
        return -1;
    }
    size_t off = 0;
    q = p;
    while (q < end) {
        if (next_field(&q, end, &f) < 0) {
            PyMem_Free(buf);
            return malformed();
        }
        if (f.fn == 2 && f.wt == WT_LEN && off + f.len <= total) {
            if (f.len) memcpy(buf + off, f.data, f.len);
            off += f.len;
        }
    }
    int r = add_value(st, key, idx, buf, buf + off, bad);
    PyMem_Free(buf);
    return r;
}

static int
reject(St *st, Bytes sid, Bytes name, PyObject *bad)
{
    /* consumes bad */
    st->rejected++;
    if (PyList_GET_SIZE(st->reasons) >= MAX_REASONS) {
        Py_DECREF(bad);
        return 0;
    }
    PyObject *sidhex = sid.n ? hex_str(sid.p, sid.n) : PyUnicode_FromString("<empty>");
    PyObject *nameobj = PyUnicode_DecodeUTF8((const char *)name.p, (Py_ssize_t)name.n, NULL);
    PyObject *msg = NULL;
    if (sidhex && nameobj) msg = PyUnicode_FromFormat("span %U (%R): %U", sidhex, nameobj, bad);
    Py_XDECREF(sidhex);
    Py_XDECREF(nameobj);
    Py_DECREF(bad);
    if (!msg) return -1;
    int r = PyList_Append(st->reasons, msg);
    Py_DECREF(msg);
    return r;
}

static int
resource_fields(St *st, Rs *rs)
{
    /* The resource is the merge of every `resource` occurrence: hand their concatenation to Python. */
    Fld f;
    size_t total = 0;
    const uint8_t *q = rs->p;
    while (q < rs->end) {
        if (next_field(&q, rs->end, &f) < 0) return malformed();
        if (f.fn == 1 && f.wt == WT_LEN) total += f.len;
    }
    if (total >= PY_SSIZE_T_MAX) return malformed();
    PyObject *raw = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!raw) return -1;
    char *dst = PyBytes_AS_STRING(raw);
    size_t off = 0;
    q = rs->p;
    while (q < rs->end) {
        if (next_field(&q, rs->end, &f) < 0) {
            Py_DECREF(raw);
            return malformed();
        }
        if (f.fn == 1 && f.wt == WT_LEN && off + f.len <= total) {
            if (f.len) memcpy(dst + off, f.data, f.len);
            off += f.len;
        }
    }
    PyObject *r = PyObject_CallOneArg(st->resource_fn, raw);
    Py_DECREF(raw);
    if (!r) return -1;
    if (!PyTuple_CheckExact(r) || PyTuple_GET_SIZE(r) != 2) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_TypeError, "resource helper must return a (service, json) tuple");
        return -1;
    }
    rs->service = Py_NewRef(PyTuple_GET_ITEM(r, 0));
    rs->res_json = Py_NewRef(PyTuple_GET_ITEM(r, 1));
    rs->done = 1;
    Py_DECREF(r);
    return 0;
}

static int
add_span(St *st, Rs *rs, PyObject *scope, const uint8_t *p, const uint8_t *end)
{
    Fld f;
    Bytes tid = {NULL, 0}, sid = {NULL, 0}, pid = {NULL, 0};
    Bytes name = {(const uint8_t *)"", 0}, smsg = {(const uint8_t *)"", 0};
    int32_t kind = 0, code = 0;
    uint64_t start = 0, stop = 0;
    int keep = st->keep_all;
    const uint8_t *q = p;

    st->received++;
    while (q < end) {
        if (next_field(&q, end, &f) < 0) return malformed();
        switch (f.fn) {
        case 1: case 2: case 4: case 5: {
            if (f.wt != WT_LEN) break;
            Bytes b = {f.data, f.len};
            if (f.fn == 1)
                tid = b;
            else if (f.fn == 2)
                sid = b;
            else if (f.fn == 4)
                pid = b;
            else
                name = b;
            break;
        }
        case 6:
            if (f.wt == WT_VARINT) kind = (int32_t)(uint32_t)f.v;
            break;
        case 7:
            if (f.wt == WT_I64) start = f.v;
            break;
        case 8:
            if (f.wt == WT_I64) stop = f.v;
            break;
        case 9:
            if (f.wt == WT_LEN && !keep) {
                Bytes key;
                if (kv_key(f.data, f.data + f.len, &key) < 0) return -1;
                keep = prefix_match(st, key.p, key.n);
            }
            break;
        case 15: /* status: merged field by field */
            if (f.wt == WT_LEN) {
                Fld g;
                const uint8_t *s = f.data, *send = f.data + f.len;
                while (s < send) {
                    if (next_field(&s, send, &g) < 0) return malformed();
                    if (g.fn == 2 && g.wt == WT_LEN) {
                        smsg.p = g.data;
                        smsg.n = g.len;
                    }
                    else if (g.fn == 3 && g.wt == WT_VARINT) {
                        code = (int32_t)(uint32_t)g.v;
                    }
                }
            }
            break;
        default:
            break;
        }
    }
    if (!keep) {
        st->dropped++;
        return 0;
    }

    PyObject *bad = NULL;
    if (tid.n != 16 || is_zero(tid.p, 16))
        bad = PyUnicode_FromFormat("trace_id must be 16 bytes and not all zero (got %zu bytes)", tid.n);
    else if (sid.n != 8 || is_zero(sid.p, 8))
        bad = PyUnicode_FromFormat("span_id must be 8 bytes and not all zero (got %zu bytes)", sid.n);
    else if (pid.n && pid.n != 8)
        bad = PyUnicode_FromFormat("parent_span_id must be empty or 8 bytes (got %zu bytes)", pid.n);
    else if (start == 0)
        bad = PyUnicode_FromString("start_time_unix_nano is missing");
    else if (stop < start)
        bad = PyUnicode_FromString("end_time_unix_nano is before start_time_unix_nano");
    else
        goto valid;
    if (!bad) return -1;
    return reject(st, sid, name, bad);

valid:;
    Py_ssize_t n0 = st->col[C_NUM_KEY].n, s0 = st->col[C_STR_KEY].n, a0 = st->col[C_ARR_KEY].n;
    PyObject *idx = PyLong_FromSsize_t(st->col[C_TRACE].n);
    if (!idx) return -1;
    q = p;
    while (q < end) {
        if (next_field(&q, end, &f) < 0) {
            malformed();
            goto fail;
        }
        if (f.fn == 9 && f.wt == WT_LEN && add_kv(st, f.data, f.data + f.len, idx, &bad) < 0) goto fail;
    }
    Py_CLEAR(idx);
    if (bad) {
        for (int c = C_NUM_SPAN; c <= C_ARR_STRS; c++) {
            Py_ssize_t n = c <= C_NUM_VAL ? n0 : (c <= C_STR_VAL ? s0 : a0);
            vec_truncate(&st->col[c], n);
        }
        return reject(st, sid, name, bad);
    }
    if (!rs->done && resource_fields(st, rs) < 0) return -1;

    PyObject *tidstr;
    if (st->tid_str && memcmp(st->tid, tid.p, 16) == 0) {
        tidstr = Py_NewRef(st->tid_str);
    }
    else {
        tidstr = hex_str(tid.p, 16);
        if (!tidstr) return -1;
        memcpy(st->tid, tid.p, 16);
        Py_XSETREF(st->tid_str, Py_NewRef(tidstr));
    }
    if (push(&st->col[C_TRACE], tidstr) < 0 || push(&st->col[C_SPAN], hex_str(sid.p, 8)) < 0 ||
        push(&st->col[C_PARENT], pid.n ? hex_str(pid.p, pid.n) : Py_NewRef(Py_None)) < 0 ||
        push(&st->col[C_NAME], get_str(st, name.p, name.n)) < 0 ||
        push(&st->col[C_KIND], PyLong_FromLong(kind)) < 0 ||
        push(&st->col[C_START], PyLong_FromUnsignedLongLong(start / 1000)) < 0 ||
        push(&st->col[C_END], PyLong_FromUnsignedLongLong(stop / 1000)) < 0 ||
        push(&st->col[C_SCODE], PyLong_FromLong(code)) < 0 ||
        push(&st->col[C_SMSG], smsg.n ? get_str(st, smsg.p, smsg.n) : Py_NewRef(Py_None)) < 0 ||
        push_ref(&st->col[C_SERVICE], rs->service) < 0 || push_ref(&st->col[C_SCOPE], scope) < 0 ||
        push_ref(&st->col[C_RES], rs->res_json) < 0) {
        return -1;
    }
    return 0;

fail:
    Py_XDECREF(idx);
    Py_XDECREF(bad);
    return -1;
}

static int
add_scope_spans(St *st, Rs *rs, const uint8_t *p, const uint8_t *end)
{
    Fld f, g;
    Bytes name = {(const uint8_t *)"", 0};
    const uint8_t *q = p;
    while (q < end) { /* the scope (merged over its occurrences, wherever they are) */
        if (next_field(&q, end, &f) < 0) return malformed();
        if (f.fn != 1 || f.wt != WT_LEN) continue;
        const uint8_t *s = f.data, *send = f.data + f.len;
        while (s < send) {
            if (next_field(&s, send, &g) < 0) return malformed();
            if (g.fn == 1 && g.wt == WT_LEN) {
                name.p = g.data;
                name.n = g.len;
            }
        }
    }
    PyObject *scope = name.n ? get_str(st, name.p, name.n) : Py_NewRef(Py_None);
    if (!scope) return -1;
    int r = 0;
    q = p;
    while (q < end) {
        if (next_field(&q, end, &f) < 0) {
            r = malformed();
            break;
        }
        if (f.fn == 2 && f.wt == WT_LEN && add_span(st, rs, scope, f.data, f.data + f.len) < 0) {
            r = -1;
            break;
        }
    }
    Py_DECREF(scope);
    return r;
}

static int
add_resource_spans(St *st, const uint8_t *p, const uint8_t *end)
{
    Fld f;
    Rs rs = {p, end, 0, NULL, NULL};
    int r = 0;
    const uint8_t *q = p;
    while (q < end) {
        if (next_field(&q, end, &f) < 0) {
            r = malformed();
            break;
        }
        if (f.fn == 2 && f.wt == WT_LEN && add_scope_spans(st, &rs, f.data, f.data + f.len) < 0) {
            r = -1;
            break;
        }
    }
    Py_XDECREF(rs.service);
    Py_XDECREF(rs.res_json);
    return r;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Module                                                                                                      */
/* ---------------------------------------------------------------------------------------------------------- */

static PyObject *
fd_decode(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer buf;
    PyObject *prefixes, *resource_fn, *value_fn, *result = NULL;
    St st;
    memset(&st, 0, sizeof st);

    if (!PyArg_ParseTuple(args, "y*OOO:decode", &buf, &prefixes, &resource_fn, &value_fn)) return NULL;
    if (!PyCallable_Check(resource_fn) || !PyCallable_Check(value_fn)) {
        PyErr_SetString(PyExc_TypeError, "resource_fn and value_fn must be callable");
        goto done;
    }
    st.resource_fn = resource_fn;
    st.value_fn = value_fn;
    if (prefixes == Py_None) {
        st.keep_all = 1;
    }
    else if (PyTuple_Check(prefixes)) {
        st.npfx = PyTuple_GET_SIZE(prefixes);
        st.pfx = PyMem_Calloc((size_t)st.npfx + 1, sizeof(char *));
        st.pfxlen = PyMem_Calloc((size_t)st.npfx + 1, sizeof(Py_ssize_t));
        if (!st.pfx || !st.pfxlen) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t i = 0; i < st.npfx; i++) {
            PyObject *s = PyTuple_GET_ITEM(prefixes, i);
            if (!PyUnicode_Check(s)) {
                PyErr_SetString(PyExc_TypeError, "prefixes must be None or a tuple of str");
                goto done;
            }
            st.pfx[i] = PyUnicode_AsUTF8AndSize(s, &st.pfxlen[i]);
            if (!st.pfx[i]) { /* lone surrogates: no key decoded from valid UTF-8 starts with it */
                PyErr_Clear();
                st.pfxlen[i] = -1;
            }
        }
    }
    else {
        PyErr_SetString(PyExc_TypeError, "prefixes must be None or a tuple of str");
        goto done;
    }

    const uint8_t *p = buf.buf, *end = (const uint8_t *)buf.buf + buf.len;
    Py_ssize_t nmsgs[M_COUNT] = {0};
    int v = validate_msg(M_REQ, p, end, MAX_DEPTH, nmsgs);
    if (v < 0) {
        PyErr_SetString(DecodeError, v == E_UTF8    ? "invalid ExportTraceServiceRequest: a string field is not "
                                                      "valid UTF-8"
                                     : v == E_DEPTH ? "invalid ExportTraceServiceRequest: nested too deeply"
                                                    : "invalid ExportTraceServiceRequest: wire format is corrupt");
        goto done;
    }

    st.cache = PyMem_Calloc(CACHE_SLOTS, sizeof(CacheEnt));
    st.reasons = PyList_New(0);
    if (!st.cache || !st.reasons) {
        if (!st.cache) PyErr_NoMemory();
        goto done;
    }
    for (int c = 0; c < NCOLS; c++) st.col[c].max = c < C_NUM_SPAN ? nmsgs[M_SPAN] : nmsgs[M_KV];

    while (p < end) {
        Fld f;
        if (next_field(&p, end, &f) < 0) {
            malformed();
            goto done;
        }
        if (f.fn == 1 && f.wt == WT_LEN && add_resource_spans(&st, f.data, f.data + f.len) < 0) goto done;
    }

    result = PyTuple_New(NCOLS + 4);
    if (!result) goto done;
    for (int c = 0; c < NCOLS; c++) {
        PyObject *list = vec_to_list(&st.col[c]);
        if (!list) {
            Py_CLEAR(result); /* the tuple's unset items are NULL, which tuple dealloc skips */
            goto done;
        }
        PyTuple_SET_ITEM(result, c, list);
    }
    PyObject *counts[3] = {PyLong_FromSsize_t(st.received), PyLong_FromSsize_t(st.dropped),
                           PyLong_FromSsize_t(st.rejected)};
    for (int i = 0; i < 3; i++) {
        if (!counts[i]) {
            for (int j = i + 1; j < 3; j++) Py_XDECREF(counts[j]);
            Py_CLEAR(result);
            goto done;
        }
        PyTuple_SET_ITEM(result, NCOLS + i, counts[i]);
        counts[i] = NULL; /* owned by the tuple (cleared above if a later one failed) */
    }
    PyTuple_SET_ITEM(result, NCOLS + 3, st.reasons);
    st.reasons = NULL;

done:
    for (int c = 0; c < NCOLS; c++) vec_free(&st.col[c]);
    Py_XDECREF(st.reasons);
    Py_XDECREF(st.tid_str);
    if (st.cache) {
        for (int i = 0; i < CACHE_SLOTS; i++) Py_XDECREF(st.cache[i].s);
        PyMem_Free(st.cache);
    }
    PyMem_Free((void *)st.pfx);
    PyMem_Free(st.pfxlen);
    PyBuffer_Release(&buf);
    return result;
}

static PyObject *
fd_schema(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    PyObject *out = PyDict_New();
    if (!out) return NULL;
    for (int m = 0; m < M_COUNT; m++) {
        PyObject *fields = PyDict_New();
        if (!fields || PyDict_SetItemString(out, MSG_NAMES[m], fields) < 0) {
            Py_XDECREF(fields);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(fields); /* borrowed from out from here on */
        for (int fn = 1; fn <= MAX_FIELD; fn++) {
            const FieldDef *fd = &SCHEMA[m][fn];
            if (fd->kind == K_NONE) continue;
            PyObject *key = PyLong_FromLong(fn);
            PyObject *val = fd->kind == K_MSG ? Py_BuildValue("(ss)", KIND_NAMES[fd->kind], MSG_NAMES[fd->sub])
                                              : Py_BuildValue("(sO)", KIND_NAMES[fd->kind], Py_None);
            int r = (key && val) ? PyDict_SetItem(fields, key, val) : -1;
            Py_XDECREF(key);
            Py_XDECREF(val);
            if (r < 0) {
                Py_DECREF(out);
                return NULL;
            }
        }
    }
    return out;
}

PyDoc_STRVAR(decode_doc,
             "decode(data, prefixes, resource_fn, value_fn) -> tuple\n\n"
             "Decode serialized ExportTraceServiceRequest bytes into the SpanBatch columns (in field order),\n"
             "followed by received, dropped, rejected and the reasons list. prefixes: None or a tuple of str.\n"
             "resource_fn(raw Resource bytes) -> (service_name, resource_json); value_fn(raw AnyValue bytes) ->\n"
             "str (kvlist/strindex values) or list[str] (mixed arrays). Raises DecodeError for invalid input.");

static PyMethodDef methods[] = {
    {"decode", fd_decode, METH_VARARGS, decode_doc},
    {"_schema", fd_schema, METH_NOARGS, "The wire schema the decoder validates against (for tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "evaluator.receiver._fastdecode",
    "OTLP ExportTraceServiceRequest bytes -> SpanBatch columns (C accelerator for receiver.decode).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastdecode(void)
{
    PyObject *decode_mod = PyImport_ImportModule("evaluator.receiver.decode");
    if (!decode_mod) return NULL;
    PyObject *err = PyObject_GetAttrString(decode_mod, "DecodeError");
    Py_DECREF(decode_mod);
    if (!err) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) {
        Py_DECREF(err);
        return NULL;
    }
    Py_XSETREF(DecodeError, err);
    if (PyModule_AddObjectRef(m, "DecodeError", DecodeError) < 0 ||
        PyModule_AddIntConstant(m, "MAX_DEPTH", MAX_DEPTH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
