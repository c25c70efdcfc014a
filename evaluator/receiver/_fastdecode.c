/*
 * _fastdecode: serialized OTLP ExportTraceServiceRequest -> the Arrow buffers of SpanColumns, without the protobuf
 * object model and without a Python object per value.
 *
 * The result must equal columns_from_batch(decode_request(ExportTraceServiceRequest.FromString(data), prefixes))
 * exactly (evaluator/receiver/decode.py and columns.py are the reference). Two phases:
 *
 *  1. validate(): walks the whole message with the OTLP schema (SCHEMA below) and accepts exactly what upb
 *     accepts: tags of at most 5 bytes, varints of at most 10 bytes, lengths of at most 5 bytes below INT32_MAX
 *     and inside the enclosing message, no field number 0 (except inside unknown groups), no wire types 6/7, no stray
 *     end-group, unknown groups well nested, at most 100 levels of nesting, valid UTF-8 in every `string` field
 *     (also in the parts that are not decoded: events, links, scope, entity refs, unknown-type nesting).
 *  2. extraction: walks the (now valid) bytes again with the protobuf merge rules: a known field with the wrong
 *     wire type is an unknown field; a scalar that occurs twice takes the last value; an embedded message that
 *     occurs twice is merged (for the AnyValue oneof, the last member set wins and only the trailing run of
 *     occurrences of a message member is merged); repeated fields keep wire order. Every column is appended to
 *     growable C buffers in the Arrow layout (int32 offsets + UTF-8 data for strings, a validity bitmap for the
 *     nullable ones, packed int32/int64/double values, list offsets + child buffers); at the end each buffer is
 *     handed to Python as a read-only `Buffer` object (buffer protocol, no copy) that fastdecode.py wraps with
 *     pa.py_buffer + pa.Array.from_buffers.
 *
 * Rare values (kvlist values, string_value_strindex, arrays that are neither all-numeric nor all-string, and the
 * resource) are handed back to Python as the raw (merged) sub-message bytes through two callables, so their
 * JSON text comes from the same Python helpers the reference uses; their UTF-8 is then copied into the buffers
 * (the resource once per ResourceSpans, its text once per stored span).
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
#define MAX_NAME 100   /* decode._MAX_NAME: span names quoted in a reason are cut to this many characters */

static PyObject *DecodeError; /* evaluator.receiver.decode.DecodeError */

/* ---------------------------------------------------------------------------------------------------------- */
/* Schema                                                                                                      */
/* ---------------------------------------------------------------------------------------------------------- */

enum {
    M_REQ, M_RS, M_RES, M_KV, M_ANY, M_ARR, M_KVL, M_ENT, M_SS, M_SCOPE, M_SPAN, M_EVENT, M_LINK, M_STATUS,
    M_COUNT
};
enum { M_NONE = 0 }; /* the sub-message of a field that is not a message (not read) */
enum { K_NONE, K_VARINT, K_I64, K_I32, K_STR, K_BYTES, K_MSG };
enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_SGROUP = 3, WT_EGROUP = 4, WT_I32 = 5 };
#define MAX_FIELD 16

/* The wire type a field of each kind is written with (none of the fields is a packed repeated scalar). */
#define WT_OF(kind) ((kind) == K_VARINT ? WT_VARINT : (kind) == K_I64 ? WT_I64 : (kind) == K_I32 ? WT_I32 : WT_LEN)
#define TAG(fn, wt) ((uint32_t)(fn) << 3 | (uint32_t)(wt))

/* Every field of every message the decoder walks, and nothing else states a field number or wire type:
 *
 *     X(message, field, number, kind, sub-message)
 *
 * `message` and `sub-message` are the M_ names without "M_" (MSG_NAMES below has their full names), `field` is
 * the field's name in the .proto file. The list is the OTLP version the decoder implements; tests/test_proto.py
 * reads these lines and checks each against the .proto files in proto/ (number, wire type, type and
 * sub-message, and that no field of these messages is missing). From it come:
 *   SCHEMA[M_<message>][number]  what validate() knows of the field (strings are UTF-8 checked, messages walked);
 *   TAG_<message>_<field>         number << 3 | wire type, what the extraction compares a field's tag with;
 *   FN_<message>_<field>          the number alone (the AnyValue oneof members are told apart by it). */
#define OTLP_FIELDS(X) \
    X(REQ, resource_spans, 1, K_MSG, RS) \
    X(RS, resource, 1, K_MSG, RES) \
    X(RS, scope_spans, 2, K_MSG, SS) \
    X(RS, schema_url, 3, K_STR, NONE) \
    X(RES, attributes, 1, K_MSG, KV) \
    X(RES, dropped_attributes_count, 2, K_VARINT, NONE) \
    X(RES, entity_refs, 3, K_MSG, ENT) \
    X(KV, key, 1, K_STR, NONE) \
    X(KV, value, 2, K_MSG, ANY) \
    X(KV, key_strindex, 3, K_VARINT, NONE) \
    X(ANY, string_value, 1, K_STR, NONE) \
    X(ANY, bool_value, 2, K_VARINT, NONE) \
    X(ANY, int_value, 3, K_VARINT, NONE) \
    X(ANY, double_value, 4, K_I64, NONE) \
    X(ANY, array_value, 5, K_MSG, ARR) \
    X(ANY, kvlist_value, 6, K_MSG, KVL) \
    X(ANY, bytes_value, 7, K_BYTES, NONE) \
    X(ANY, string_value_strindex, 8, K_VARINT, NONE) \
    X(ARR, values, 1, K_MSG, ANY) \
    X(KVL, values, 1, K_MSG, KV) \
    X(ENT, schema_url, 1, K_STR, NONE) \
    X(ENT, type, 2, K_STR, NONE) \
    X(ENT, id_keys, 3, K_STR, NONE) \
    X(ENT, description_keys, 4, K_STR, NONE) \
    X(SS, scope, 1, K_MSG, SCOPE) \
    X(SS, spans, 2, K_MSG, SPAN) \
    X(SS, schema_url, 3, K_STR, NONE) \
    X(SCOPE, name, 1, K_STR, NONE) \
    X(SCOPE, version, 2, K_STR, NONE) \
    X(SCOPE, attributes, 3, K_MSG, KV) \
    X(SCOPE, dropped_attributes_count, 4, K_VARINT, NONE) \
    X(SPAN, trace_id, 1, K_BYTES, NONE) \
    X(SPAN, span_id, 2, K_BYTES, NONE) \
    X(SPAN, trace_state, 3, K_STR, NONE) \
    X(SPAN, parent_span_id, 4, K_BYTES, NONE) \
    X(SPAN, name, 5, K_STR, NONE) \
    X(SPAN, kind, 6, K_VARINT, NONE) \
    X(SPAN, start_time_unix_nano, 7, K_I64, NONE) \
    X(SPAN, end_time_unix_nano, 8, K_I64, NONE) \
    X(SPAN, attributes, 9, K_MSG, KV) \
    X(SPAN, dropped_attributes_count, 10, K_VARINT, NONE) \
    X(SPAN, events, 11, K_MSG, EVENT) \
    X(SPAN, dropped_events_count, 12, K_VARINT, NONE) \
    X(SPAN, links, 13, K_MSG, LINK) \
    X(SPAN, dropped_links_count, 14, K_VARINT, NONE) \
    X(SPAN, status, 15, K_MSG, STATUS) \
    X(SPAN, flags, 16, K_I32, NONE) \
    X(EVENT, time_unix_nano, 1, K_I64, NONE) \
    X(EVENT, name, 2, K_STR, NONE) \
    X(EVENT, attributes, 3, K_MSG, KV) \
    X(EVENT, dropped_attributes_count, 4, K_VARINT, NONE) \
    X(LINK, trace_id, 1, K_BYTES, NONE) \
    X(LINK, span_id, 2, K_BYTES, NONE) \
    X(LINK, trace_state, 3, K_STR, NONE) \
    X(LINK, attributes, 4, K_MSG, KV) \
    X(LINK, dropped_attributes_count, 5, K_VARINT, NONE) \
    X(LINK, flags, 6, K_I32, NONE) \
    X(STATUS, message, 2, K_STR, NONE) \
    X(STATUS, code, 3, K_VARINT, NONE)

#define FIELD_TAG(m, field, fn, kind, sub) TAG_##m##_##field = TAG(fn, WT_OF(kind)),
#define FIELD_FN(m, field, fn, kind, sub) FN_##m##_##field = fn,
#define FIELD_SCHEMA(m, field, fn, kind, sub) [M_##m][fn] = {kind, M_##sub},
#define FIELD_ROW(m, field, fn, kind, sub) {M_##m, #field, TAG_##m##_##field},
enum { OTLP_FIELDS(FIELD_TAG) };
enum { OTLP_FIELDS(FIELD_FN) };

typedef struct {
    unsigned char kind, sub;
} FieldDef;

static const FieldDef SCHEMA[M_COUNT][MAX_FIELD + 1] = {OTLP_FIELDS(FIELD_SCHEMA)};

/* The same list as compiled (the tags as the extraction sees them), for _fields(). */
static const struct {
    int msg;
    const char *field;
    uint32_t tag;
} FIELDS[] = {OTLP_FIELDS(FIELD_ROW)};

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
    else if (rd_varint(&p, end, &n) < 0 || p - *pp > 5) { /* upb reads a length in at most 5 bytes */
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

/* One field. Its number and wire type are kept as the raw tag (fn << 3 | wt) and compared as one value: two
 * narrower stores read back as one wider load would defeat store forwarding in the hot loops. */
typedef struct {
    uint32_t tag;
    uint64_t v;          /* varint / fixed value */
    const uint8_t *data; /* length-delimited payload */
    size_t len;
} Fld;

#define FN(f) ((f).tag >> 3)
#define WT(f) ((int)((f).tag & 7))

/* One field at *pp of a message (not a group); advances past it. */
HOT int
next_field(const uint8_t **pp, const uint8_t *end, Fld *f)
{
    uint32_t fn;
    int wt;
    f->v = 0;
    f->data = NULL;
    f->len = 0;
    if (rd_tag(pp, end, &fn, &wt) < 0 || fn == 0) return E_MALFORMED;
    f->tag = TAG(fn, wt);
    switch (wt) {
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
        return skip_group(pp, end, fn, MAX_DEPTH);
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
/* Buffer: the Python object that owns one finished Arrow buffer                                              */
/* ---------------------------------------------------------------------------------------------------------- */

/* Read-only, exposes its bytes through the buffer protocol (pa.py_buffer wraps it without a copy and keeps it
 * alive for as long as the Arrow arrays live). The memory comes from PyMem_Raw*, so it may be freed anywhere. */
typedef struct {
    PyObject_HEAD
    uint8_t *p;
    Py_ssize_t n;
} BufferObject;

static int
buffer_getbuffer(PyObject *self, Py_buffer *view, int flags)
{
    BufferObject *b = (BufferObject *)self;
    return PyBuffer_FillInfo(view, self, b->p, b->n, 1, flags);
}

static void
buffer_dealloc(PyObject *self)
{
    PyMem_RawFree(((BufferObject *)self)->p);
    Py_TYPE(self)->tp_free(self);
}

static Py_ssize_t
buffer_length(PyObject *self)
{
    return ((BufferObject *)self)->n;
}

static PyBufferProcs buffer_as_buffer = {buffer_getbuffer, NULL};
static PySequenceMethods buffer_as_sequence = {.sq_length = buffer_length};

static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "evaluator.receiver._fastdecode.Buffer",
    .tp_basicsize = sizeof(BufferObject),
    .tp_dealloc = buffer_dealloc,
    .tp_as_sequence = &buffer_as_sequence,
    .tp_as_buffer = &buffer_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One Arrow buffer filled by decode() (read-only; use memoryview() or pa.py_buffer()).",
};

/* ---------------------------------------------------------------------------------------------------------- */
/* Phase 2: extraction into Arrow buffers                                                                      */
/* ---------------------------------------------------------------------------------------------------------- */

/* A growable byte buffer. */
typedef struct {
    uint8_t *p;
    size_t n, cap;
} Buf;

static int
buf_grow(Buf *b, size_t need)
{
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) {
        if (cap > SIZE_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    uint8_t *p = PyMem_RawRealloc(b->p, cap);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

HOT int
buf_reserve(Buf *b, size_t extra)
{
    if (b->cap - b->n >= extra) return 0;
    if (extra > SIZE_MAX - b->n) {
        PyErr_NoMemory();
        return -1;
    }
    return buf_grow(b, b->n + extra);
}

static void
buf_free(Buf *b)
{
    PyMem_RawFree(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

/* Values are stored in native byte order, which is what Arrow buffers hold. */
HOT int
put_i32(Buf *b, int32_t v)
{
    if (buf_reserve(b, 4) < 0) return -1;
    memcpy(b->p + b->n, &v, 4);
    b->n += 4;
    return 0;
}

HOT int
put_i64(Buf *b, int64_t v)
{
    if (buf_reserve(b, 8) < 0) return -1;
    memcpy(b->p + b->n, &v, 8);
    b->n += 8;
    return 0;
}

HOT int
put_f64(Buf *b, double v)
{
    if (buf_reserve(b, 8) < 0) return -1;
    memcpy(b->p + b->n, &v, 8);
    b->n += 8;
    return 0;
}

static inline int32_t
get_i32(const Buf *b, size_t i)
{
    int32_t v;
    memcpy(&v, b->p + 4 * i, 4);
    return v;
}

/* Sets bit `row` of a validity bitmap (bytes past the end are added as zero). Every row's bit is written, so a
 * truncated bitmap needs no clearing. */
HOT int
put_bit(Buf *b, size_t row, int valid)
{
    size_t byte = row >> 3;
    if (byte >= b->n) {
        size_t add = byte + 1 - b->n;
        if (buf_reserve(b, add) < 0) return -1;
        memset(b->p + b->n, 0, add);
        b->n += add;
    }
    if (valid)
        b->p[byte] |= (uint8_t)(1u << (row & 7));
    else
        b->p[byte] &= (uint8_t)~(1u << (row & 7));
    return 0;
}

/* A string column: offsets (int32, rows + 1) into UTF-8 data, and a validity bitmap if it is nullable. */
typedef struct {
    Buf off, data, valid;
    int nullable;
    const char *name;
} StrCol;

/* A list column: offsets (int32, rows + 1) into its child column, and its validity bitmap. */
typedef struct {
    Buf off, valid;
} ListCol;

typedef struct {
    /* spans (SPAN_SCHEMA) */
    StrCol trace, span, parent, name, smsg, service, scope, res;
    Buf kind, start, stop, code;
    /* numbers (NUMBER_SCHEMA) */
    Buf num_idx, num_val;
    StrCol num_key;
    /* strings (STRING_SCHEMA) */
    Buf str_idx;
    StrCol str_key, str_val;
    /* arrays (ARRAY_SCHEMA) */
    Buf arr_idx, nums_val;
    StrCol arr_key, strs_val;
    ListCol nums, strs;

    Py_ssize_t nspans;
    PyObject *reasons;
    Py_ssize_t received, dropped, rejected;
    int keep_all;
    Py_ssize_t npfx;
    const char **pfx;
    Py_ssize_t *pfxlen; /* -1: the prefix cannot match (not encodable as UTF-8) */
    PyObject *resource_fn, *value_fn;
    size_t max_text; /* bytes of text one string column may hold (Arrow's int32 offsets) */
} St;

static inline size_t
rows_of(const Buf *offsets)
{
    return offsets->n / 4 - 1;
}

static int
str_init(StrCol *c, const char *name, int nullable, size_t rows, size_t bytes)
{
    c->name = name;
    c->nullable = nullable;
    if (buf_reserve(&c->off, 4 * (rows + 1)) < 0 || buf_reserve(&c->data, bytes) < 0) return -1;
    if (nullable && buf_reserve(&c->valid, rows / 8 + 1) < 0) return -1;
    return put_i32(&c->off, 0);
}

static void
str_free(StrCol *c)
{
    buf_free(&c->off);
    buf_free(&c->data);
    buf_free(&c->valid);
}

static int
too_much_text(const StrCol *c, size_t limit)
{
    PyErr_Format(DecodeError, "request too large to store: the %s column would hold more than %zu bytes of text",
                 c->name, limit);
    return -1;
}

/* Appends the end offset of a new row (its data is already written) and its validity bit. */
HOT int
str_end_row(StrCol *c, int valid)
{
    size_t row = rows_of(&c->off);
    if (put_i32(&c->off, (int32_t)c->data.n) < 0) return -1;
    return c->nullable ? put_bit(&c->valid, row, valid) : 0;
}

HOT int
str_put(St *st, StrCol *c, const void *p, size_t n)
{
    if (n > st->max_text - c->data.n) return too_much_text(c, st->max_text);
    if (buf_reserve(&c->data, n) < 0) return -1;
    if (n) memcpy(c->data.p + c->data.n, p, n);
    c->data.n += n;
    return str_end_row(c, 1);
}

/* The lowercase hex of n bytes as a new row. */
HOT int
str_put_hex(St *st, StrCol *c, const uint8_t *p, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    if (n > (st->max_text - c->data.n) / 2) return too_much_text(c, st->max_text);
    if (!n) return str_end_row(c, 1);
    if (buf_reserve(&c->data, 2 * n) < 0) return -1;
    char *d = (char *)c->data.p + c->data.n;
    for (size_t i = 0; i < n; i++) {
        d[2 * i] = digits[p[i] >> 4];
        d[2 * i + 1] = digits[p[i] & 15];
    }
    c->data.n += 2 * n;
    return str_end_row(c, 1);
}

HOT int
str_put_null(StrCol *c)
{
    return str_end_row(c, 0);
}

/* The UTF-8 of a str as a new row. */
static int
str_put_obj(St *st, StrCol *c, PyObject *s)
{
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "value helper returned a %.100s where a str was expected", Py_TYPE(s)->tp_name);
        return -1;
    }
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    if (!u) return -1;
    return str_put(st, c, u, (size_t)n);
}

static void
str_truncate(StrCol *c, size_t rows)
{
    c->off.n = 4 * (rows + 1);
    c->data.n = (size_t)get_i32(&c->off, rows);
}

HOT int
list_end_row(ListCol *l, size_t child_rows, int valid)
{
    size_t row = rows_of(&l->off);
    if (put_i32(&l->off, (int32_t)child_rows) < 0) return -1;
    return put_bit(&l->valid, row, valid);
}

typedef struct {
    const uint8_t *p, *end; /* the ResourceSpans */
    int done;
    PyObject *service, *res_json; /* what the resource helper returned */
    const char *svc_p, *res_p;    /* their UTF-8 (svc_p NULL: no service name) */
    Py_ssize_t svc_n, res_n;
} Rs;

static int
malformed(void)
{
    PyErr_SetString(DecodeError, "invalid ExportTraceServiceRequest: wire format is corrupt");
    return -1;
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

/* The key of a KeyValue: the last occurrence of the field. */
static int
kv_key(const uint8_t *p, const uint8_t *end, Bytes *key)
{
    Fld f;
    key->p = (const uint8_t *)"";
    key->n = 0;
    while (p < end) {
        if (next_field(&p, end, &f) < 0) return malformed();
        if (f.tag == TAG_KV_key) {
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
    switch (f->tag) {
    case TAG_ANY_string_value: case TAG_ANY_bool_value: case TAG_ANY_int_value: case TAG_ANY_double_value:
    case TAG_ANY_array_value: case TAG_ANY_kvlist_value: case TAG_ANY_bytes_value:
    case TAG_ANY_string_value_strindex:
        return (int)FN(*f);
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

static inline int
is_number_member(int member)
{
    return member == FN_ANY_bool_value || member == FN_ANY_int_value || member == FN_ANY_double_value;
}

/* The value of a bool, int or double member as stored (a double). */
static inline double
num_of(int member, uint64_t v)
{
    double d;
    switch (member) {
    case FN_ANY_bool_value:
        return v ? 1.0 : 0.0;
    case FN_ANY_int_value:
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

/* Replaces *bad with "attribute <key> <fmt...>" (the key as text); 0 or -1. */
static int
set_bad_key(PyObject **bad, Bytes key, const char *what, const char *arg)
{
    PyObject *k = PyUnicode_DecodeUTF8((const char *)key.p, (Py_ssize_t)key.n, NULL);
    if (!k) return -1;
    PyObject *reason = arg ? PyUnicode_FromFormat("attribute %U %s (%s)", k, what, arg)
                           : PyUnicode_FromFormat("attribute %U %s", k, what);
    Py_DECREF(k);
    if (!reason) return -1;
    Py_XSETREF(*bad, reason);
    return 0;
}

/* An array value: the elements of the trailing run of array_value occurrences (from `run`). */
static int
add_array(St *st, Bytes key, int32_t idx, const uint8_t *run, const uint8_t *vstart, const uint8_t *vend,
          PyObject **bad)
{
    Fld f, e, last = {0};
    int all_num = 1, all_str = 1, member, finite = 1;
    const uint8_t *q = run;
    while (q < vend) { /* classify the elements */
        if (next_field(&q, vend, &f) < 0) return malformed();
        if (f.tag != TAG_ANY_array_value) continue;
        const uint8_t *a = f.data, *aend = f.data + f.len;
        while (a < aend) {
            if (next_field(&a, aend, &e) < 0) return malformed();
            if (e.tag != TAG_ARR_values) continue;
            if (any_last(e.data, e.data + e.len, &member, &last) < 0) return -1;
            if (!is_number_member(member)) all_num = 0;
            if (member != FN_ANY_string_value) all_str = 0;
        }
    }
    if (put_i32(&st->arr_idx, idx) < 0 || str_put(st, &st->arr_key, key.p, key.n) < 0) return -1;
    if (all_num || all_str) { /* all-numeric also takes the empty array, like the reference */
        q = run;
        while (q < vend) {
            if (next_field(&q, vend, &f) < 0) return malformed();
            if (f.tag != TAG_ANY_array_value) continue;
            const uint8_t *a = f.data, *aend = f.data + f.len;
            while (a < aend) {
                if (next_field(&a, aend, &e) < 0) return malformed();
                if (e.tag != TAG_ARR_values) continue;
                if (any_last(e.data, e.data + e.len, &member, &last) < 0) return -1;
                if (all_num) {
                    double d = num_of(member, last.v);
                    if (!isfinite(d)) finite = 0;
                    if (put_f64(&st->nums_val, d) < 0) return -1;
                }
                else if (str_put(st, &st->strs_val, last.data, last.len) < 0) {
                    return -1;
                }
            }
        }
    }
    else { /* mixed: the element texts come from Python */
        PyObject *list = call_value_fn(st, vstart, (size_t)(vend - vstart), &PyList_Type);
        if (!list) return -1;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
            if (str_put_obj(st, &st->strs_val, PyList_GET_ITEM(list, i)) < 0) {
                Py_DECREF(list);
                return -1;
            }
        }
        Py_DECREF(list);
    }
    if (list_end_row(&st->nums, st->nums_val.n / 8, all_num) < 0 ||
        list_end_row(&st->strs, rows_of(&st->strs_val.off), !all_num) < 0) {
        return -1;
    }
    if (!finite) return set_bad_key(bad, key, "holds a non-finite number", NULL);
    return 0;
}

static int
add_str_row(St *st, Bytes key, int32_t idx)
{
    return (put_i32(&st->str_idx, idx) < 0 || str_put(st, &st->str_key, key.p, key.n) < 0) ? -1 : 0;
}

/* One (merged) AnyValue [vp, vend) of the attribute `key`. */
static int
add_value(St *st, Bytes key, int32_t idx, const uint8_t *vp, const uint8_t *vend, PyObject **bad)
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
    case FN_ANY_string_value:
        if (add_str_row(st, key, idx) < 0) return -1;
        return str_put(st, &st->str_val, last.data, last.len);
    case FN_ANY_bytes_value:
        if (add_str_row(st, key, idx) < 0) return -1;
        return str_put_hex(st, &st->str_val, last.data, last.len);
    case FN_ANY_kvlist_value: case FN_ANY_string_value_strindex: {
        PyObject *text = call_value_fn(st, vp, (size_t)(vend - vp), &PyUnicode_Type);
        if (!text) return -1;
        int r = (add_str_row(st, key, idx) < 0 || str_put_obj(st, &st->str_val, text) < 0) ? -1 : 0;
        Py_DECREF(text);
        return r;
    }
    case FN_ANY_array_value:
        return add_array(st, key, idx, run, vp, vend, bad);
    default: { /* bool, int, double */
        double d = num_of(member, last.v);
        if (put_i32(&st->num_idx, idx) < 0 || str_put(st, &st->num_key, key.p, key.n) < 0 ||
            put_f64(&st->num_val, d) < 0) {
            return -1;
        }
        if (!isfinite(d))
            return set_bad_key(bad, key, "is not a finite number", isnan(d) ? "nan" : (d > 0 ? "inf" : "-inf"));
        return 0;
    }
    }
}

/* One KeyValue of a kept span. */
static int
add_kv(St *st, const uint8_t *p, const uint8_t *end, int32_t idx, PyObject **bad)
{
    Fld f;
    Bytes key = {(const uint8_t *)"", 0}, val = {NULL, 0};
    size_t nvals = 0, total = 0;
    const uint8_t *q = p;
    while (q < end) {
        if (next_field(&q, end, &f) < 0) return malformed();
        if (f.tag == TAG_KV_key) {
            key.p = f.data;
            key.n = f.len;
        }
        else if (f.tag == TAG_KV_value) {
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
        if (f.tag == TAG_KV_value && off + f.len <= total) {
            if (f.len) memcpy(buf + off, f.data, f.len);
            off += f.len;
        }
    }
    int r = add_value(st, key, idx, buf, buf + off, bad);
    PyMem_Free(buf);
    return r;
}

/* A span name as quoted in a reason: repr() of its first MAX_NAME characters, plus an ellipsis when cut
 * (decode.quote_name). Only the bytes of those characters are decoded. */
static PyObject *
quoted_name(Bytes name)
{
    size_t chars = 0, cut = name.n;
    for (size_t i = 0; i < name.n; i++) {
        if ((name.p[i] & 0xC0) != 0x80 && chars++ == MAX_NAME) { /* the first byte of character MAX_NAME + 1 */
            cut = i;
            break;
        }
    }
    PyObject *s = PyUnicode_DecodeUTF8((const char *)name.p, (Py_ssize_t)cut, NULL);
    if (s && cut < name.n) {
        PyObject *ell = PyUnicode_FromOrdinal(0x2026);
        PyObject *cat = ell ? PyUnicode_Concat(s, ell) : NULL;
        Py_XDECREF(ell);
        Py_SETREF(s, cat);
    }
    if (!s) return NULL;
    PyObject *r = PyObject_Repr(s);
    Py_DECREF(s);
    return r;
}

/* Counts a rejected span and, for the first MAX_REASONS, records why. Consumes bad (may be NULL when the
 * reason is `what`, a plain message). */
static int
reject(St *st, Bytes sid, Bytes name, PyObject *bad, const char *what, size_t got)
{
    st->rejected++;
    if (PyList_GET_SIZE(st->reasons) >= MAX_REASONS) {
        Py_XDECREF(bad);
        return 0;
    }
    if (!bad) {
        bad = got == (size_t)-1 ? PyUnicode_FromString(what) : PyUnicode_FromFormat(what, got);
        if (!bad) return -1;
    }
    PyObject *sidhex = sid.n ? hex_str(sid.p, sid.n) : PyUnicode_FromString("<empty>");
    PyObject *nameobj = quoted_name(name);
    PyObject *msg = NULL;
    if (sidhex && nameobj) msg = PyUnicode_FromFormat("span %U (%U): %U", sidhex, nameobj, bad);
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
        if (f.tag == TAG_RS_resource) total += f.len;
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
        if (f.tag == TAG_RS_resource && off + f.len <= total) {
            if (f.len) memcpy(dst + off, f.data, f.len);
            off += f.len;
        }
    }
    PyObject *r = PyObject_CallOneArg(st->resource_fn, raw);
    Py_DECREF(raw);
    if (!r) return -1;
    if (!PyTuple_CheckExact(r) || PyTuple_GET_SIZE(r) != 2 ||
        !(PyTuple_GET_ITEM(r, 0) == Py_None || PyUnicode_Check(PyTuple_GET_ITEM(r, 0))) ||
        !PyUnicode_Check(PyTuple_GET_ITEM(r, 1))) {
        Py_DECREF(r);
        PyErr_SetString(PyExc_TypeError, "resource helper must return a (str | None, str) tuple");
        return -1;
    }
    rs->service = Py_NewRef(PyTuple_GET_ITEM(r, 0));
    rs->res_json = Py_NewRef(PyTuple_GET_ITEM(r, 1));
    Py_DECREF(r);
    if (rs->service != Py_None && !(rs->svc_p = PyUnicode_AsUTF8AndSize(rs->service, &rs->svc_n))) return -1;
    if (!(rs->res_p = PyUnicode_AsUTF8AndSize(rs->res_json, &rs->res_n))) return -1;
    rs->done = 1;
    return 0;
}

static void
truncate_attributes(St *st, size_t n0, size_t s0, size_t a0)
{
    st->num_idx.n = 4 * n0;
    st->num_val.n = 8 * n0;
    str_truncate(&st->num_key, n0);
    st->str_idx.n = 4 * s0;
    str_truncate(&st->str_key, s0);
    str_truncate(&st->str_val, s0);
    st->arr_idx.n = 4 * a0;
    str_truncate(&st->arr_key, a0);
    st->nums.off.n = 4 * (a0 + 1);
    st->nums_val.n = 8 * (size_t)get_i32(&st->nums.off, a0);
    st->strs.off.n = 4 * (a0 + 1);
    str_truncate(&st->strs_val, (size_t)get_i32(&st->strs.off, a0));
}

static int
add_span(St *st, Rs *rs, Bytes scope, const uint8_t *p, const uint8_t *end)
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
        switch (f.tag) { /* a known field with another wire type is an unknown field */
        case TAG_SPAN_trace_id:
            tid.p = f.data;
            tid.n = f.len;
            break;
        case TAG_SPAN_span_id:
            sid.p = f.data;
            sid.n = f.len;
            break;
        case TAG_SPAN_parent_span_id:
            pid.p = f.data;
            pid.n = f.len;
            break;
        case TAG_SPAN_name:
            name.p = f.data;
            name.n = f.len;
            break;
        case TAG_SPAN_kind: /* an int32 enum: upb keeps the low 32 bits of the varint (open enum: any value) */
            kind = (int32_t)(uint32_t)f.v;
            break;
        case TAG_SPAN_start_time_unix_nano:
            start = f.v;
            break;
        case TAG_SPAN_end_time_unix_nano:
            stop = f.v;
            break;
        case TAG_SPAN_attributes:
            if (!keep) {
                Bytes key;
                if (kv_key(f.data, f.data + f.len, &key) < 0) return -1;
                keep = prefix_match(st, key.p, key.n);
            }
            break;
        case TAG_SPAN_status: /* status: merged field by field */
            {
                Fld g;
                const uint8_t *s = f.data, *send = f.data + f.len;
                while (s < send) {
                    if (next_field(&s, send, &g) < 0) return malformed();
                    if (g.tag == TAG_STATUS_message) {
                        smsg.p = g.data;
                        smsg.n = g.len;
                    }
                    else if (g.tag == TAG_STATUS_code) {
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

    if (tid.n != 16 || is_zero(tid.p, 16))
        return reject(st, sid, name, NULL, "trace_id must be 16 bytes and not all zero (got %zu bytes)", tid.n);
    if (sid.n != 8 || is_zero(sid.p, 8))
        return reject(st, sid, name, NULL, "span_id must be 8 bytes and not all zero (got %zu bytes)", sid.n);
    if (pid.n && pid.n != 8)
        return reject(st, sid, name, NULL, "parent_span_id must be empty or 8 bytes (got %zu bytes)", pid.n);
    if (start == 0) return reject(st, sid, name, NULL, "start_time_unix_nano is missing", (size_t)-1);
    if (stop == 0) return reject(st, sid, name, NULL, "end_time_unix_nano is missing", (size_t)-1);
    if (stop < start)
        return reject(st, sid, name, NULL, "end_time_unix_nano is before start_time_unix_nano", (size_t)-1);

    size_t n0 = st->num_idx.n / 4, s0 = st->str_idx.n / 4, a0 = st->arr_idx.n / 4;
    int32_t idx = (int32_t)st->nspans;
    PyObject *bad = NULL;
    q = p;
    while (q < end) {
        if (next_field(&q, end, &f) < 0) {
            Py_XDECREF(bad);
            return malformed();
        }
        if (f.tag == TAG_SPAN_attributes && add_kv(st, f.data, f.data + f.len, idx, &bad) < 0) {
            Py_XDECREF(bad);
            return -1;
        }
    }
    if (bad) {
        truncate_attributes(st, n0, s0, a0);
        return reject(st, sid, name, bad, NULL, 0);
    }
    if (!rs->done && resource_fields(st, rs) < 0) return -1;

    if (str_put_hex(st, &st->trace, tid.p, 16) < 0 || str_put_hex(st, &st->span, sid.p, 8) < 0 ||
        (pid.n && !is_zero(pid.p, 8) ? str_put_hex(st, &st->parent, pid.p, 8) : str_put_null(&st->parent)) < 0 ||
        str_put(st, &st->name, name.p, name.n) < 0 || put_i32(&st->kind, kind) < 0 ||
        put_i64(&st->start, (int64_t)(start / 1000)) < 0 || put_i64(&st->stop, (int64_t)(stop / 1000)) < 0 ||
        put_i32(&st->code, code) < 0 ||
        (smsg.n ? str_put(st, &st->smsg, smsg.p, smsg.n) : str_put_null(&st->smsg)) < 0 ||
        (rs->svc_p ? str_put(st, &st->service, rs->svc_p, (size_t)rs->svc_n) : str_put_null(&st->service)) < 0 ||
        (scope.n ? str_put(st, &st->scope, scope.p, scope.n) : str_put_null(&st->scope)) < 0 ||
        str_put(st, &st->res, rs->res_p, (size_t)rs->res_n) < 0) {
        return -1;
    }
    st->nspans++;
    return 0;
}

static int
add_scope_spans(St *st, Rs *rs, const uint8_t *p, const uint8_t *end)
{
    Fld f, g;
    Bytes name = {(const uint8_t *)"", 0};
    const uint8_t *q = p;
    while (q < end) { /* the scope (merged over its occurrences, wherever they are) */
        if (next_field(&q, end, &f) < 0) return malformed();
        if (f.tag != TAG_SS_scope) continue;
        const uint8_t *s = f.data, *send = f.data + f.len;
        while (s < send) {
            if (next_field(&s, send, &g) < 0) return malformed();
            if (g.tag == TAG_SCOPE_name) {
                name.p = g.data;
                name.n = g.len;
            }
        }
    }
    q = p;
    while (q < end) {
        if (next_field(&q, end, &f) < 0) return malformed();
        if (f.tag == TAG_SS_spans && add_span(st, rs, name, f.data, f.data + f.len) < 0) return -1;
    }
    return 0;
}

static int
add_resource_spans(St *st, const uint8_t *p, const uint8_t *end)
{
    Fld f;
    Rs rs;
    memset(&rs, 0, sizeof rs);
    rs.p = p;
    rs.end = end;
    int r = 0;
    const uint8_t *q = p;
    while (q < end) {
        if (next_field(&q, end, &f) < 0) {
            r = malformed();
            break;
        }
        if (f.tag == TAG_RS_scope_spans && add_scope_spans(st, &rs, f.data, f.data + f.len) < 0) {
            r = -1;
            break;
        }
    }
    Py_XDECREF(rs.service);
    Py_XDECREF(rs.res_json);
    return r;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Result: the columns as tuples of Buffer objects                                                            */
/* ---------------------------------------------------------------------------------------------------------- */

/* A Buffer owning b's first `n` bytes (b is emptied); NULL with an exception on failure (b is then freed). */
static PyObject *
to_buffer(Buf *b, size_t n)
{
    if (n > b->n || n > PY_SSIZE_T_MAX) {
        buf_free(b);
        PyErr_SetString(PyExc_SystemError, "_fastdecode: buffer shorter than its column");
        return NULL;
    }
    if (!b->p || b->cap > n + 4096) { /* give memory back (and never hand out a NULL pointer) */
        uint8_t *p = PyMem_RawRealloc(b->p, n ? n : 8);
        if (p) {
            b->p = p;
            b->cap = n ? n : 8;
        }
        else if (!b->p) {
            PyErr_NoMemory();
            return NULL;
        }
    }
    BufferObject *o = PyObject_New(BufferObject, &BufferType);
    if (!o) {
        buf_free(b);
        return NULL;
    }
    o->p = b->p;
    o->n = (Py_ssize_t)n;
    b->p = NULL;
    b->n = b->cap = 0;
    return (PyObject *)o;
}

/* A tuple of the n items (new references, any may be NULL after a failure: then all are released). */
static PyObject *
tuple_of(Py_ssize_t n, PyObject **items)
{
    PyObject *t = NULL;
    int ok = 1;
    for (Py_ssize_t i = 0; i < n; i++) ok &= items[i] != NULL;
    if (ok) t = PyTuple_New(n);
    if (!t) {
        for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(items[i]);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(t, i, items[i]);
    return t;
}

/* The validity bitmap of `rows` rows and its null count: (None, 0) when every row is valid. */
static PyObject *
validity(Buf *b, size_t rows, Py_ssize_t *nulls)
{
    size_t nbytes = (rows + 7) / 8;
    if (nbytes > b->n) { /* cannot happen: every row sets its bit */
        PyErr_SetString(PyExc_SystemError, "_fastdecode: validity bitmap shorter than its column");
        return NULL;
    }
    if (rows & 7) b->p[nbytes - 1] &= (uint8_t)((1u << (rows & 7)) - 1); /* zero padding bits */
    size_t valid = 0;
    for (size_t i = 0; i < nbytes; i++) valid += (size_t)__builtin_popcount(b->p[i]);
    *nulls = (Py_ssize_t)(rows - valid);
    if (!*nulls) {
        buf_free(b);
        Py_RETURN_NONE;
    }
    return to_buffer(b, nbytes);
}

/* (rows, null_count, None, values) */
static PyObject *
fixed_column(Buf *b, size_t rows, size_t width)
{
    PyObject *items[4] = {PyLong_FromSize_t(rows), PyLong_FromLong(0), Py_NewRef(Py_None),
                          to_buffer(b, rows * width)};
    return tuple_of(4, items);
}

/* (rows, null_count, validity | None, offsets, data) */
static PyObject *
string_column(StrCol *c)
{
    size_t rows = rows_of(&c->off);
    Py_ssize_t nulls = 0;
    PyObject *valid = c->nullable ? validity(&c->valid, rows, &nulls) : Py_NewRef(Py_None);
    PyObject *items[5] = {PyLong_FromSize_t(rows), PyLong_FromSsize_t(nulls), valid,
                          to_buffer(&c->off, 4 * (rows + 1)), to_buffer(&c->data, c->data.n)};
    return tuple_of(5, items);
}

/* (rows, null_count, validity | None, offsets, child column) */
static PyObject *
list_column(ListCol *l, PyObject *child)
{
    size_t rows = rows_of(&l->off);
    Py_ssize_t nulls = 0;
    PyObject *valid = validity(&l->valid, rows, &nulls);
    PyObject *items[5] = {PyLong_FromSize_t(rows), PyLong_FromSsize_t(nulls), valid,
                          to_buffer(&l->off, 4 * (rows + 1)), child};
    return tuple_of(5, items);
}

static PyObject *
result_tables(St *st)
{
    size_t ns = (size_t)st->nspans, nn = st->num_idx.n / 4, nstr = st->str_idx.n / 4, na = st->arr_idx.n / 4;
    PyObject *spans[12] = {
        string_column(&st->trace), string_column(&st->span), string_column(&st->parent),
        string_column(&st->name), fixed_column(&st->kind, ns, 4), fixed_column(&st->start, ns, 8),
        fixed_column(&st->stop, ns, 8), fixed_column(&st->code, ns, 4), string_column(&st->smsg),
        string_column(&st->service), string_column(&st->scope), string_column(&st->res),
    };
    PyObject *numbers[3] = {fixed_column(&st->num_idx, nn, 4), string_column(&st->num_key),
                            fixed_column(&st->num_val, nn, 8)};
    PyObject *strings[3] = {fixed_column(&st->str_idx, nstr, 4), string_column(&st->str_key),
                            string_column(&st->str_val)};
    PyObject *arrays[4] = {
        fixed_column(&st->arr_idx, na, 4), string_column(&st->arr_key),
        list_column(&st->nums, fixed_column(&st->nums_val, st->nums_val.n / 8, 8)),
        list_column(&st->strs, string_column(&st->strs_val)),
    };
    PyObject *tables[4] = {tuple_of(12, spans), tuple_of(3, numbers), tuple_of(3, strings), tuple_of(4, arrays)};
    return tuple_of(4, tables);
}

static int
st_init(St *st, Py_ssize_t nspans, Py_ssize_t nkv)
{
    size_t s = (size_t)nspans, k = (size_t)nkv;
    size_t a = k < 64 ? k : 64;
    if (str_init(&st->trace, "trace_id", 0, s, 32 * s) < 0 || str_init(&st->span, "span_id", 0, s, 16 * s) < 0 ||
        str_init(&st->parent, "parent_span_id", 1, s, 16 * s) < 0 || str_init(&st->name, "name", 0, s, 16 * s) < 0 ||
        str_init(&st->smsg, "status_message", 1, s, 0) < 0 ||
        str_init(&st->service, "service_name", 1, s, 16 * s) < 0 ||
        str_init(&st->scope, "scope_name", 1, s, 8 * s) < 0 ||
        str_init(&st->res, "resource_attributes", 0, s, 32 * s) < 0 || buf_reserve(&st->kind, 4 * s) < 0 ||
        buf_reserve(&st->start, 8 * s) < 0 || buf_reserve(&st->stop, 8 * s) < 0 ||
        buf_reserve(&st->code, 4 * s) < 0 ||
        /* numbers and strings: most attributes are one or the other */
        buf_reserve(&st->num_idx, 4 * k) < 0 || buf_reserve(&st->num_val, 8 * k) < 0 ||
        str_init(&st->num_key, "span_numbers.key", 0, k, 16 * k) < 0 || buf_reserve(&st->str_idx, 4 * k) < 0 ||
        str_init(&st->str_key, "span_strings.key", 0, k, 16 * k) < 0 ||
        str_init(&st->str_val, "span_strings.value", 0, k, 8 * k) < 0 ||
        buf_reserve(&st->arr_idx, 4 * a) < 0 || str_init(&st->arr_key, "span_arrays.key", 0, a, 16 * a) < 0 ||
        str_init(&st->strs_val, "span_arrays.strings", 0, a, 8 * a) < 0 || put_i32(&st->nums.off, 0) < 0 ||
        put_i32(&st->strs.off, 0) < 0) {
        return -1;
    }
    return 0;
}

static void
st_free(St *st)
{
    StrCol *strs[] = {&st->trace, &st->span, &st->parent, &st->name, &st->smsg, &st->service, &st->scope,
                      &st->res, &st->num_key, &st->str_key, &st->str_val, &st->arr_key, &st->strs_val};
    Buf *bufs[] = {&st->kind, &st->start, &st->stop, &st->code, &st->num_idx, &st->num_val, &st->str_idx,
                   &st->arr_idx, &st->nums_val, &st->nums.off, &st->nums.valid, &st->strs.off, &st->strs.valid};
    for (size_t i = 0; i < sizeof strs / sizeof *strs; i++) str_free(strs[i]);
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) buf_free(bufs[i]);
    Py_CLEAR(st->reasons);
    PyMem_Free((void *)st->pfx);
    PyMem_Free(st->pfxlen);
    st->pfx = NULL;
    st->pfxlen = NULL;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Module                                                                                                      */
/* ---------------------------------------------------------------------------------------------------------- */

static PyObject *
fd_decode(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer buf;
    PyObject *prefixes, *resource_fn, *value_fn, *result = NULL;
    Py_ssize_t max_text = INT32_MAX;
    St st;
    memset(&st, 0, sizeof st);

    if (!PyArg_ParseTuple(args, "y*OOO|n:decode", &buf, &prefixes, &resource_fn, &value_fn, &max_text))
        return NULL;
    if (!PyCallable_Check(resource_fn) || !PyCallable_Check(value_fn)) {
        PyErr_SetString(PyExc_TypeError, "resource_fn and value_fn must be callable");
        goto done;
    }
    if (max_text < 0 || max_text > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "max_text must be in [0, 2**31 - 1]");
        goto done;
    }
    st.max_text = (size_t)max_text;
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
    /* Row numbers and list offsets are int32: spans, attributes and array elements are messages. */
    if (nmsgs[M_SPAN] >= INT32_MAX || nmsgs[M_KV] >= INT32_MAX || nmsgs[M_ANY] >= INT32_MAX) {
        PyErr_SetString(DecodeError, "request too large to store: too many spans or attributes");
        goto done;
    }

    st.reasons = PyList_New(0);
    if (!st.reasons || st_init(&st, nmsgs[M_SPAN], nmsgs[M_KV]) < 0) goto done;

    while (p < end) {
        Fld f;
        if (next_field(&p, end, &f) < 0) {
            malformed();
            goto done;
        }
        if (f.tag == TAG_REQ_resource_spans && add_resource_spans(&st, f.data, f.data + f.len) < 0) goto done;
    }

    PyObject *items[5] = {result_tables(&st), PyLong_FromSsize_t(st.received), PyLong_FromSsize_t(st.dropped),
                          PyLong_FromSsize_t(st.rejected), Py_NewRef(st.reasons)};
    result = tuple_of(5, items);

done:
    st_free(&st);
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

/* ((message, field, number, wire type), ...): the OTLP_FIELDS list as compiled, the numbers and wire types taken
 * back out of the TAG_ constants the extraction compares with. */
static PyObject *
fd_fields(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    Py_ssize_t n = (Py_ssize_t)(sizeof FIELDS / sizeof *FIELDS);
    PyObject *out = PyTuple_New(n);
    if (!out) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = Py_BuildValue("(ssII)", MSG_NAMES[FIELDS[i].msg], FIELDS[i].field,
                                      (unsigned int)(FIELDS[i].tag >> 3), (unsigned int)(FIELDS[i].tag & 7));
        if (!row) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, row);
    }
    return out;
}

PyDoc_STRVAR(decode_doc,
             "decode(data, prefixes, resource_fn, value_fn, max_text=2**31-1) -> tuple\n\n"
             "Decode serialized ExportTraceServiceRequest bytes into Arrow buffers:\n"
             "(tables, received, dropped, rejected, reasons), where tables = (spans, numbers, strings, arrays)\n"
             "holds one tuple per column, in the order of the SPAN/NUMBER/STRING/ARRAY schemas of columns.py:\n"
             "  fixed width: (length, null_count, None, values)\n"
             "  string:      (length, null_count, validity | None, offsets, data)\n"
             "  list:        (length, null_count, validity | None, offsets, child column)\n"
             "Buffers are Buffer objects (read-only buffer protocol). prefixes: None or a tuple of str.\n"
             "resource_fn(raw Resource bytes) -> (service_name | None, resource_json); value_fn(raw AnyValue\n"
             "bytes) -> str (kvlist/strindex values) or list[str] (mixed arrays). max_text: bytes of text a string\n"
             "column may hold. Raises DecodeError for invalid input (or a column over max_text).");

static PyMethodDef methods[] = {
    {"decode", fd_decode, METH_VARARGS, decode_doc},
    {"_schema", fd_schema, METH_NOARGS, "The wire schema the decoder validates against (for tests)."},
    {"_fields", fd_fields, METH_NOARGS, "The fields the decoder knows with their numbers and wire types (for tests)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "evaluator.receiver._fastdecode",
    "OTLP ExportTraceServiceRequest bytes -> Arrow buffers of SpanColumns (C accelerator for receiver.decode).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastdecode(void)
{
    if (PyType_Ready(&BufferType) < 0) return NULL;
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
        PyModule_AddObjectRef(m, "Buffer", (PyObject *)&BufferType) < 0 ||
        PyModule_AddIntConstant(m, "MAX_DEPTH", MAX_DEPTH) < 0 ||
        PyModule_AddIntConstant(m, "MAX_NAME", MAX_NAME) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
