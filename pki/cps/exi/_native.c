/*
 * The EXI codec's hot loops in C: the same grammar-driven encoder and decoder as codec.py, over grammar
 * tables compiled once per schema set by native.py (EXI 1.0 §6, §7.1, §8.5.4; ISO 15118-2's options:
 * bit-packed, strict false, valuePartitionCapacity 0).
 *
 * This module only ever answers what codec.py would answer. It handles the common case — ASCII strings,
 * byte strings, integers, enumerations, the memo of already encoded elements — and returns None
 * ("not handled here") for anything else: a value or stream the Python codec would reject, a non-ASCII
 * string, a limit reached, wildcard content. The caller then runs the Python codec, which gives the exact
 * result or the exact error. So errors never need to be reproduced here, and the Python codec stays the
 * reference both implementations are tested against (tests/test_exi_native.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NATIVE_ABI 2

enum { K_AT = 0, K_AT_ANY = 1, K_SE = 2, K_SE_ANY = 3, K_EE = 4, K_CH = 5 };
/* D_BOOLEAN (3) is left to codec.py: the ISO 15118-2 subset has no xs:boolean */
enum { D_STRING = 0, D_BINARY = 1, D_INTEGER = 2, D_BOOLEAN = 3, D_ENUM = 4 };

/* "not handled here": the caller falls back to the Python codec (no exception is set) */
#define PUNT 1
/* a Python exception is set */
#define FAIL -1

typedef struct {
    int kind, next, dt, grammar;
    PyObject *qname; /* borrowed from the spec tuple the program keeps */
} Prod;

typedef struct {
    int nprod, width, width2, ee, ch, ee2, empty_ok;
    Prod *prods;
    PyObject *elements;   /* dict qname -> first-level code, borrowed */
    PyObject *attributes; /* dict qname -> first-level code, borrowed */
} State;

typedef struct {
    int nstates;
    State *states;
    PyObject *grammar; /* the Python Grammar object: the memo's key and guard, borrowed */
    PyObject *gid;     /* id(grammar) as an int, borrowed */
} Gram;

typedef struct {
    int kind;
    Py_ssize_t min_len, max_len; /* max_len < 0: unbounded */
    int has_min, has_max;
    long long min, max;
    int nbit;                    /* integers: n-bit offset width, or -1 */
    PyObject *values;            /* enumerations: tuple of values, borrowed */
    PyObject *index;             /* enumerations: dict value -> ordinal, borrowed */
} Dtype;

typedef struct {
    PyObject_HEAD
    PyObject *spec; /* keeps every borrowed reference above alive */
    PyObject *node_type;
    PyObject *doc_roots, *frag_roots; /* ((qname, grammar), ...) of G_i and F_i */
    int ngram, ndt;
    Gram *grams;
    Dtype *dts;
} Program;

/* --- bit writer -------------------------------------------------------------------------------------- */

typedef struct {
    uint8_t *buf;
    Py_ssize_t len, cap;
    uint64_t acc;
    int nacc; /* pending bits in acc, < 8 between calls */
} Writer;

static int w_init(Writer *w) {
    w->cap = 256;
    w->len = 0;
    w->acc = 0;
    w->nacc = 0;
    w->buf = PyMem_Malloc(w->cap);
    if (!w->buf) { PyErr_NoMemory(); return FAIL; }
    return 0;
}

static void w_free(Writer *w) { PyMem_Free(w->buf); w->buf = NULL; }

static int w_reserve(Writer *w, Py_ssize_t extra) {
    if (w->len + extra <= w->cap) return 0;
    Py_ssize_t cap = w->cap;
    while (cap < w->len + extra) cap *= 2;
    uint8_t *b = PyMem_Realloc(w->buf, cap);
    if (!b) { PyErr_NoMemory(); return FAIL; }
    w->buf = b;
    w->cap = cap;
    return 0;
}

/* n-bit unsigned integer, n <= 32 (EXI 1.0 §7.1.9), MSB first */
static int w_bits(Writer *w, uint64_t value, int n) {
    if (n == 0) return 0;
    if (w_reserve(w, 5) < 0) return FAIL;
    w->acc = (w->acc << n) | (value & ((1ULL << n) - 1));
    w->nacc += n;
    while (w->nacc >= 8) {
        w->nacc -= 8;
        w->buf[w->len++] = (uint8_t)(w->acc >> w->nacc);
    }
    w->acc &= (1ULL << w->nacc) - 1;
    return 0;
}

/* Unsigned Integer (EXI 1.0 §7.1.6): 7-bit groups, least significant first, high bit = more follow */
static int w_uint(Writer *w, uint64_t value) {
    do {
        uint64_t group = value & 0x7F;
        value >>= 7;
        if (w_bits(w, value ? (group | 0x80) : group, 8) < 0) return FAIL;
    } while (value);
    return 0;
}

static int w_octets(Writer *w, const uint8_t *data, Py_ssize_t n) {
    if (w->nacc == 0) {
        if (w_reserve(w, n) < 0) return FAIL;
        memcpy(w->buf + w->len, data, n);
        w->len += n;
        return 0;
    }
    /* Unaligned: each output byte is the pending bits followed by the top of the next input byte, whose low
     * bits become the pending ones (what w_bits(data[i], 8) does, without a call and a bound per byte). */
    if (w_reserve(w, n + 1) < 0) return FAIL;
    const int keep = w->nacc, shift = 8 - w->nacc;
    unsigned acc = (unsigned)w->acc;
    uint8_t *out = w->buf + w->len;
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = (uint8_t)((acc << shift) | (data[i] >> keep));
        acc = data[i] & ((1u << keep) - 1);
    }
    w->len += n;
    w->acc = acc;
    return 0;
}

/* the stream so far, the last byte padded with zero bits */
static PyObject *w_bytes(Writer *w) {
    if (w->nacc) {
        if (w_reserve(w, 1) < 0) return NULL;
        w->buf[w->len] = (uint8_t)(w->acc << (8 - w->nacc));
        return PyBytes_FromStringAndSize((const char *)w->buf, w->len + 1);
    }
    return PyBytes_FromStringAndSize((const char *)w->buf, w->len);
}

static Py_ssize_t w_bitlen(Writer *w) { return 8 * w->len + w->nacc; }

/* the bits written so far as a Python int (what codec.py's memo keeps) */
static PyObject *w_as_int(Writer *w) {
    PyObject *b = w_bytes(w);
    if (!b) return NULL;
    PyObject *v = PyObject_CallMethod((PyObject *)&PyLong_Type, "from_bytes", "Os", b, "big");
    Py_DECREF(b);
    if (!v || !w->nacc) return v;
    PyObject *shift = PyLong_FromLong(8 - w->nacc);
    if (!shift) { Py_DECREF(v); return NULL; }
    PyObject *r = PyNumber_Rshift(v, shift);
    Py_DECREF(shift);
    Py_DECREF(v);
    return r;
}

/* write the low ``nbits`` bits of the non-negative Python int ``value`` */
static int w_pyint_bits(Writer *w, PyObject *value, Py_ssize_t nbits) {
    if (nbits == 0) return 0;
    Py_ssize_t nbytes = (nbits + 7) / 8;
    PyObject *b = PyObject_CallMethod(value, "to_bytes", "ns", nbytes, "big");
    if (!b) return FAIL;
    const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(b);
    int first = (int)(nbits - 8 * (nbytes - 1));
    int rc = w_bits(w, p[0], first);
    if (rc == 0) rc = w_octets(w, p + 1, nbytes - 1);
    Py_DECREF(b);
    return rc;
}

/* Unsigned Integer of a Python int too large for 64 bits */
static int w_uint_big(Writer *w, PyObject *value) {
    int rc = 0;
    PyObject *v = Py_NewRef(value), *mask = PyLong_FromLong(0x7F), *seven = PyLong_FromLong(7);
    if (!mask || !seven) { rc = FAIL; goto done; }
    for (;;) {
        PyObject *g = PyNumber_And(v, mask);
        if (!g) { rc = FAIL; goto done; }
        long group = PyLong_AsLong(g);
        Py_DECREF(g);
        PyObject *rest = PyNumber_Rshift(v, seven);
        if (!rest) { rc = FAIL; goto done; }
        Py_SETREF(v, rest);
        int more = PyObject_IsTrue(v);
        if (more < 0) { rc = FAIL; goto done; }
        if (w_bits(w, more ? (uint64_t)(group | 0x80) : (uint64_t)group, 8) < 0) { rc = FAIL; goto done; }
        if (!more) break;
    }
done:
    Py_XDECREF(v);
    Py_XDECREF(mask);
    Py_XDECREF(seven);
    return rc;
}

/* --- bit reader -------------------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *data;
    Py_ssize_t pos, end; /* in bits */
} Reader;

/* n <= 64; PUNT when the stream is too short */
static int r_bits(Reader *r, int n, uint64_t *out) {
    if (r->pos + n > r->end) return PUNT;
    uint64_t v = 0;
    Py_ssize_t pos = r->pos;
    int remaining = n;
    while (remaining > 0) {
        int off = (int)(pos & 7);
        int avail = 8 - off;
        int take = avail < remaining ? avail : remaining;
        uint8_t byte = r->data[pos >> 3];
        v = (v << take) | ((byte >> (avail - take)) & ((1u << take) - 1));
        pos += take;
        remaining -= take;
    }
    r->pos = pos;
    *out = v;
    return 0;
}

/* ``n`` octets at the current, possibly unaligned, position; the caller has checked they are there */
static void r_octets(Reader *r, uint8_t *dst, Py_ssize_t n) {
    if ((r->pos & 7) == 0) {
        memcpy(dst, r->data + (r->pos >> 3), (size_t)n);
        r->pos += 8 * n;
        return;
    }
    /* Unaligned: each octet is the low bits of one stream byte followed by the top bits of the next. The
     * last one read, src[n], is inside the stream: the octets' last bit, pos + 8n - 1, is before end. */
    const int off = (int)(r->pos & 7);
    const uint8_t *src = r->data + (r->pos >> 3);
    for (Py_ssize_t i = 0; i < n; i++)
        dst[i] = (uint8_t)((src[i] << off) | (src[i + 1] >> (8 - off)));
    r->pos += 8 * n;
}

/* Unsigned Integer of at most max_octets groups that fits 63 bits; PUNT otherwise (codec.py decides) */
static int r_uint(Reader *r, int max_octets, uint64_t *out) {
    uint64_t value = 0;
    int shift = 0;
    for (int i = 0; i < max_octets; i++) {
        uint64_t octet;
        if (r_bits(r, 8, &octet)) return PUNT;
        if (shift >= 63) return PUNT; /* a tenth group: beyond 63 bits */
        value |= (octet & 0x7F) << shift;
        if (!(octet & 0x80)) {
            if (octet == 0 && i) return PUNT; /* non-minimal: codec.py refuses it */
            *out = value;
            return 0;
        }
        shift += 7;
    }
    return PUNT;
}

/* Unsigned Integer as a Python int, any size up to max_octets groups; NULL with *punt set, or an error */
static PyObject *r_uint_obj(Reader *r, int max_octets, int *punt) {
    Py_ssize_t start = r->pos;
    uint64_t small;
    if (r_uint(r, max_octets, &small) == 0) return PyLong_FromUnsignedLongLong(small);
    r->pos = start;
    PyObject *value = PyLong_FromLong(0);
    if (!value) return NULL;
    for (int i = 0; i < max_octets; i++) {
        uint64_t octet;
        if (r_bits(r, 8, &octet)) { Py_DECREF(value); *punt = 1; return NULL; }
        PyObject *g = PyLong_FromUnsignedLongLong(octet & 0x7F), *sh = PyLong_FromLong(7L * i), *t = NULL;
        if (g && sh) t = PyNumber_Lshift(g, sh);
        Py_XDECREF(g);
        Py_XDECREF(sh);
        if (!t) { Py_DECREF(value); return NULL; }
        Py_SETREF(value, PyNumber_Or(value, t));
        Py_DECREF(t);
        if (!value) return NULL;
        if (!(octet & 0x80)) {
            if (octet == 0 && i) { Py_DECREF(value); *punt = 1; return NULL; }
            return value;
        }
    }
    Py_DECREF(value);
    *punt = 1;
    return NULL;
}

/* --- limits -------------------------------------------------------------------------------------------- */

typedef struct {
    Py_ssize_t max_stream_octets, max_depth, max_events, max_string_chars, max_binary_octets,
        max_integer_octets;
} Limits;

#define ENCODE_MAX_DEPTH 24 /* DEFAULT_LIMITS.max_depth, what the Python encoder refuses beyond */

/* --- values ------------------------------------------------------------------------------------------ */

/* codec.py's StringType.check: not a str, a non-XML ASCII control, or outside the length facets */
static int ascii_ok(const uint8_t *p, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t c = p[i];
        if (c >= 0x80) return 0;
        if (c < 0x20 && c != 0x9 && c != 0xA && c != 0xD) return 0;
    }
    return 1;
}

static int length_ok(const Dtype *dt, Py_ssize_t n) {
    return n >= dt->min_len && (dt->max_len < 0 || n <= dt->max_len);
}

static int write_value(Writer *w, const Dtype *dt, PyObject *value) {
    switch (dt->kind) {
    case D_STRING: {
        if (!PyUnicode_Check(value) || !PyUnicode_IS_ASCII(value)) return PUNT;
        Py_ssize_t n = PyUnicode_GET_LENGTH(value);
        const uint8_t *p = PyUnicode_1BYTE_DATA(value);
        if (!ascii_ok(p, n) || !length_ok(dt, n)) return PUNT;
        if (w_uint(w, (uint64_t)n + 2) < 0) return FAIL;
        return w_octets(w, p, n);
    }
    case D_BINARY: {
        if (!PyBytes_CheckExact(value)) return PUNT;
        Py_ssize_t n = PyBytes_GET_SIZE(value);
        if (!length_ok(dt, n)) return PUNT;
        if (w_uint(w, (uint64_t)n) < 0) return FAIL;
        return w_octets(w, (const uint8_t *)PyBytes_AS_STRING(value), n);
    }
    case D_INTEGER: {
        if (!PyLong_Check(value) || PyBool_Check(value)) return PUNT;
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (v == -1 && PyErr_Occurred()) return FAIL;
        if (overflow) {
            /* only unbounded integers take values this large; their representation needs Python ints */
            if (dt->has_min || dt->has_max || overflow < 0) return PUNT;
            if (w_bits(w, 0, 1) < 0) return FAIL;
            return w_uint_big(w, value);
        }
        if ((dt->has_min && v < dt->min) || (dt->has_max && v > dt->max)) return PUNT;
        if (dt->nbit >= 0) return w_bits(w, (uint64_t)(v - dt->min), dt->nbit);
        if (dt->has_min && dt->min >= 0) return w_uint(w, (uint64_t)v);
        if (v >= 0) {
            if (w_bits(w, 0, 1) < 0) return FAIL;
            return w_uint(w, (uint64_t)v);
        }
        if (w_bits(w, 1, 1) < 0) return FAIL;
        return w_uint(w, (uint64_t)(-(v + 1)));
    }
    case D_ENUM: {
        PyObject *ix = PyDict_GetItemWithError(dt->index, value);
        if (!ix) {
            PyErr_Clear(); /* unhashable, or a value only == comparison finds: codec.py decides */
            return PUNT;
        }
        return w_bits(w, (uint64_t)PyLong_AsLong(ix), dt->nbit);
    }
    }
    return PUNT;
}

/* *out = new reference, or NULL with PUNT/FAIL returned */
static int read_value(Reader *r, const Dtype *dt, const Limits *lim, PyObject **out) {
    *out = NULL;
    switch (dt->kind) {
    case D_STRING: {
        uint64_t marker;
        if (r_uint(r, 5, &marker)) return PUNT;
        if (marker < 2) return PUNT;
        uint64_t n = marker - 2;
        if (n > (uint64_t)lim->max_string_chars || (Py_ssize_t)(8 * n) > r->end - r->pos) return PUNT;
        if (!length_ok(dt, (Py_ssize_t)n)) return PUNT;
        PyObject *s = PyUnicode_New((Py_ssize_t)n, 127);
        if (!s) return FAIL;
        uint8_t *p = PyUnicode_1BYTE_DATA(s);
        r_octets(r, p, (Py_ssize_t)n);
        if (!ascii_ok(p, (Py_ssize_t)n)) { Py_DECREF(s); return PUNT; } /* multi-group code points too */
        *out = s;
        return 0;
    }
    case D_BINARY: {
        uint64_t n;
        if (r_uint(r, 5, &n)) return PUNT;
        if (n > (uint64_t)lim->max_binary_octets || !length_ok(dt, (Py_ssize_t)n)) return PUNT;
        if ((Py_ssize_t)(8 * n) > r->end - r->pos) return PUNT;
        PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
        if (!b) return FAIL;
        r_octets(r, (uint8_t *)PyBytes_AS_STRING(b), (Py_ssize_t)n);
        *out = b;
        return 0;
    }
    case D_INTEGER: {
        PyObject *value;
        if (dt->nbit >= 0) {
            uint64_t off;
            if (r_bits(r, dt->nbit, &off)) return PUNT;
            long long v = dt->min + (long long)off;
            if (dt->has_max && v > dt->max) return PUNT;
            value = PyLong_FromLongLong(v);
        } else {
            int negative = 0;
            if (!(dt->has_min && dt->min >= 0)) {
                uint64_t sign;
                if (r_bits(r, 1, &sign)) return PUNT;
                negative = (int)sign;
            }
            int punt = 0;
            PyObject *magnitude = r_uint_obj(r, (int)lim->max_integer_octets, &punt);
            if (!magnitude) return punt ? PUNT : FAIL;
            if (negative) {
                PyObject *neg = PyNumber_Negative(magnitude);
                Py_DECREF(magnitude);
                if (!neg) return FAIL;
                PyObject *one = PyLong_FromLong(1);
                value = one ? PyNumber_Subtract(neg, one) : NULL;
                Py_XDECREF(one);
                Py_DECREF(neg);
            } else {
                value = magnitude;
            }
            if (value && (dt->has_min || dt->has_max)) {
                int overflow = 0;
                long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
                if (overflow || (dt->has_min && v < dt->min) || (dt->has_max && v > dt->max)) {
                    Py_DECREF(value);
                    return PUNT;
                }
            }
        }
        if (!value) return FAIL;
        *out = value;
        return 0;
    }
    case D_ENUM: {
        uint64_t ix;
        if (r_bits(r, dt->nbit, &ix)) return PUNT;
        if ((Py_ssize_t)ix >= PyTuple_GET_SIZE(dt->values)) return PUNT;
        *out = Py_NewRef(PyTuple_GET_ITEM(dt->values, (Py_ssize_t)ix));
        return 0;
    }
    }
    return PUNT;
}

/* --- encoder ----------------------------------------------------------------------------------------- */

static PyObject *S_qname, *S_attributes, *S_content, *S_memo;

static int encode_element(Program *pg, Writer *w, PyObject *node, int g, int depth);

static int encode_content(Program *pg, Writer *w, PyObject *node, const Gram *gram, int depth) {
    if (depth > ENCODE_MAX_DEPTH) return PUNT;
    const State *st = &gram->states[0];
    int rc = 0;
    PyObject *attrs = PyObject_GetAttr(node, S_attributes);
    if (!attrs) return FAIL;
    if (!PyDict_CheckExact(attrs)) { Py_DECREF(attrs); return PUNT; }
    if (PyDict_GET_SIZE(attrs)) {
        /* AT events in qname order (EXI 1.0 §8.5.4.1.4) */
        PyObject *keys = PyDict_Keys(attrs);
        if (!keys) { Py_DECREF(attrs); return FAIL; }
        if (PyList_Sort(keys) < 0) { PyErr_Clear(); Py_DECREF(keys); Py_DECREF(attrs); return PUNT; }
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys) && rc == 0; i++) {
            PyObject *q = PyList_GET_ITEM(keys, i);
            PyObject *code = PyDict_GetItemWithError(st->attributes, q);
            if (!code) { rc = PyErr_Occurred() ? FAIL : PUNT; break; }
            long c = PyLong_AsLong(code);
            const Prod *p = &st->prods[c];
            if ((rc = w_bits(w, (uint64_t)c, st->width)) != 0) break;
            PyObject *value = PyDict_GetItem(attrs, q);
            if (!value) { rc = PUNT; break; }
            Py_INCREF(value);
            rc = write_value(w, &pg->dts[p->dt], value);
            Py_DECREF(value);
            if (rc) break;
            st = &gram->states[p->next];
        }
        Py_DECREF(keys);
    }
    Py_DECREF(attrs);
    if (rc) return rc;
    PyObject *content = PyObject_GetAttr(node, S_content);
    if (!content) return FAIL;
    if (!PyList_CheckExact(content)) { Py_DECREF(content); return PUNT; }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(content); i++) {
        /* a reference of our own: Python code (a value's __eq__, an int conversion) may run meanwhile */
        PyObject *item = Py_NewRef(PyList_GET_ITEM(content, i));
        const Prod *p = NULL;
        if (Py_IS_TYPE(item, (PyTypeObject *)pg->node_type)) {
            PyObject *q = PyObject_GetAttr(item, S_qname), *code = NULL;
            if (!q) rc = FAIL;
            else {
                code = PyDict_GetItemWithError(st->elements, q);
                Py_DECREF(q);
                if (!code) rc = PyErr_Occurred() ? FAIL : PUNT;
            }
            if (!rc) {
                long c = PyLong_AsLong(code);
                p = &st->prods[c];
                if (p->grammar < 0) rc = PUNT;
                else if ((rc = w_bits(w, (uint64_t)c, st->width)) == 0)
                    rc = encode_element(pg, w, item, p->grammar, depth + 1);
            }
        } else if (st->ch < 0 || PyObject_TypeCheck(item, (PyTypeObject *)pg->node_type)) {
            rc = PUNT;
        } else {
            p = &st->prods[st->ch];
            if ((rc = w_bits(w, (uint64_t)st->ch, st->width)) == 0) rc = write_value(w, &pg->dts[p->dt], item);
        }
        Py_DECREF(item);
        if (rc) break;
        st = &gram->states[p->next];
    }
    Py_DECREF(content);
    if (rc) return rc;
    if (st->ee >= 0) return w_bits(w, (uint64_t)st->ee, st->width);
    if (st->ee2 >= 0 && st->empty_ok) {
        /* an empty value (<a></a>): the second-level EE (EXI 1.0 §8.5.4.4.1), as codec.py writes it */
        const Dtype *dt = &pg->dts[st->prods[st->ch].dt];
        if (dt->min_len > 0) return PUNT;
        if (w_bits(w, (uint64_t)st->nprod, st->width) < 0) return FAIL;
        return w_bits(w, (uint64_t)st->ee2, st->width2);
    }
    return PUNT;
}

static int encode_element(Program *pg, Writer *w, PyObject *node, int g, int depth) {
    const Gram *gram = &pg->grams[g];
    PyObject *memo = PyObject_GetAttr(node, S_memo);
    if (!memo) return FAIL;
    if (memo == Py_None) {
        Py_DECREF(memo);
        return encode_content(pg, w, node, gram, depth);
    }
    if (!PyDict_CheckExact(memo)) { Py_DECREF(memo); return PUNT; }
    /* content and EE depend only on the node and its grammar (codec.py's memo): written as one piece */
    PyObject *hit = PyDict_GetItemWithError(memo, gram->gid);
    if (!hit && PyErr_Occurred()) { Py_DECREF(memo); return FAIL; }
    if (hit && PyTuple_CheckExact(hit) && PyTuple_GET_SIZE(hit) == 3 && PyTuple_GET_ITEM(hit, 0) == gram->grammar) {
        Py_INCREF(hit); /* the memo is shared (messages._sub_certificates): hold the entry while writing it */
        Py_ssize_t nbits = PyLong_AsSsize_t(PyTuple_GET_ITEM(hit, 2));
        int rc = nbits < 0 ? FAIL : w_pyint_bits(w, PyTuple_GET_ITEM(hit, 1), nbits);
        Py_DECREF(hit);
        Py_DECREF(memo);
        return rc;
    }
    Writer sub;
    if (w_init(&sub) < 0) { Py_DECREF(memo); return FAIL; }
    int rc = encode_content(pg, &sub, node, gram, depth);
    if (rc == 0) {
        PyObject *value = w_as_int(&sub), *entry = NULL, *nb = PyLong_FromSsize_t(w_bitlen(&sub));
        if (value && nb) entry = PyTuple_Pack(3, gram->grammar, value, nb);
        if (!entry || PyDict_SetItem(memo, gram->gid, entry) < 0) rc = FAIL;
        Py_XDECREF(entry);
        Py_XDECREF(nb);
        if (rc == 0) {
            /* copy the sub-stream's bits */
            rc = w_octets(w, sub.buf, sub.len);
            if (rc == 0 && sub.nacc) rc = w_bits(w, sub.acc, sub.nacc);
        }
        Py_XDECREF(value);
    }
    w_free(&sub);
    Py_DECREF(memo);
    return rc;
}

static PyTypeObject ProgramType;

/* encode(program, items, tail_code, tail_width) -> bytes | None
 * After the EXI header: for each (code, width, node, grammar) of ``items`` the event code, then the
 * element; then ``tail_code`` in ``tail_width`` bits (a fragment's ED; width 0 for a document). */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    Program *pg;
    PyObject *items;
    long tail_code, tail_width;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!ll", &ProgramType, &pg, &PyList_Type, &items, &tail_code, &tail_width))
        return NULL;
    Writer w;
    if (w_init(&w) < 0) return NULL;
    int rc = w_bits(&w, 0x80, 8); /* EXI header: 10 0 0 0000 (EXI 1.0 §5) */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items) && rc == 0; i++) {
        long code, width;
        int g;
        PyObject *node;
        PyObject *item = PyList_GET_ITEM(items, i);
        if (!PyArg_ParseTuple(item, "llOi", &code, &width, &node, &g)) { rc = FAIL; break; }
        if (g < 0 || g >= pg->ngram || width < 0 || width > 32) { rc = PUNT; break; }
        Py_INCREF(node);
        rc = w_bits(&w, (uint64_t)code, (int)width);
        if (rc == 0) rc = encode_element(pg, &w, node, g, 1);
        Py_DECREF(node);
    }
    if (rc == 0) rc = (tail_width < 0 || tail_width > 32) ? PUNT : w_bits(&w, (uint64_t)tail_code, (int)tail_width);
    PyObject *result = NULL;
    if (rc == 0) result = w_bytes(&w);
    else if (rc == PUNT) result = Py_NewRef(Py_None);
    w_free(&w);
    return result;
}

/* --- decoder ----------------------------------------------------------------------------------------- */

typedef struct {
    Program *pg;
    Reader r;
    Limits lim;
    Py_ssize_t events;
    PyObject *keep; /* set of qnames whose bits are kept as the memo, or NULL */
} Decoder;

/* first-level code, or -1 for the second-level EE of an empty value; PUNT/FAIL via rc */
static int state_code(Decoder *d, const State *st, int *code) {
    if (++d->events > d->lim.max_events) return PUNT;
    uint64_t v;
    if (r_bits(&d->r, st->width, &v)) return PUNT;
    if (v < (uint64_t)st->nprod) { *code = (int)v; return 0; }
    if (st->ee2 >= 0 && st->empty_ok && v == (uint64_t)st->nprod) {
        uint64_t second;
        if (r_bits(&d->r, st->width2, &second)) return PUNT;
        if (second == (uint64_t)st->ee2) { *code = -1; return 0; }
    }
    return PUNT; /* a schema deviation or an invalid code: codec.py names it */
}

static int decode_element(Decoder *d, PyObject *qname, int g, int depth, PyObject **out);

static int decode_content(Decoder *d, PyObject *attrs, PyObject *content, const Gram *gram, int depth) {
    const State *st = &gram->states[0];
    for (;;) {
        int code, rc;
        if ((rc = state_code(d, st, &code)) != 0) return rc;
        if (code < 0) {
            const Dtype *dt = &d->pg->dts[st->prods[st->ch].dt];
            return dt->min_len > 0 ? PUNT : 0;
        }
        const Prod *p = &st->prods[code];
        PyObject *value = NULL;
        switch (p->kind) {
        case K_EE:
            return 0;
        case K_AT:
            rc = PyDict_Contains(attrs, p->qname);
            if (rc) return rc < 0 ? FAIL : PUNT; /* repeated: possible only in the relaxed fragment grammar */
            if ((rc = read_value(&d->r, &d->pg->dts[p->dt], &d->lim, &value)) != 0) return rc;
            rc = PyDict_SetItem(attrs, p->qname, value);
            Py_DECREF(value);
            if (rc < 0) return FAIL;
            break;
        case K_CH:
            if ((rc = read_value(&d->r, &d->pg->dts[p->dt], &d->lim, &value)) != 0) return rc;
            rc = PyList_Append(content, value);
            Py_DECREF(value);
            if (rc < 0) return FAIL;
            break;
        case K_SE:
            if (p->grammar < 0) return PUNT;
            if ((rc = decode_element(d, p->qname, p->grammar, depth + 1, &value)) != 0) return rc;
            rc = PyList_Append(content, value);
            Py_DECREF(value);
            if (rc < 0) return FAIL;
            break;
        default:
            return PUNT; /* wildcards */
        }
        st = &gram->states[p->next];
    }
}

/* the bits from ``start`` to ``stop`` as a Python int */
static PyObject *bits_as_int(const Reader *r, Py_ssize_t start, Py_ssize_t stop) {
    Writer w;
    if (w_init(&w) < 0) return NULL;
    Reader c = {r->data, start, stop};
    PyObject *result = NULL;
    while (c.pos < stop) {
        int n = stop - c.pos >= 32 ? 32 : (int)(stop - c.pos);
        uint64_t v;
        r_bits(&c, n, &v);
        if (w_bits(&w, v, n) < 0) goto done;
    }
    result = w_as_int(&w);
done:
    w_free(&w);
    return result;
}

static int decode_element(Decoder *d, PyObject *qname, int g, int depth, PyObject **out) {
    *out = NULL;
    if (depth > d->lim.max_depth) return PUNT;
    const Gram *gram = &d->pg->grams[g];
    PyObject *attrs = PyDict_New(), *content = PyList_New(0);
    if (!attrs || !content) { Py_XDECREF(attrs); Py_XDECREF(content); return FAIL; }
    Py_ssize_t start = d->r.pos;
    int rc = decode_content(d, attrs, content, gram, depth);
    PyObject *memo = Py_NewRef(Py_None), *node = NULL;
    if (rc == 0 && d->keep) {
        /* the content bits as read, kept as the encoder's memo (codec.py, _Decoder.element) */
        int keep = PySet_Contains(d->keep, qname);
        if (keep < 0) rc = FAIL;
        else if (keep) {
            PyObject *bits = bits_as_int(&d->r, start, d->r.pos), *nb = PyLong_FromSsize_t(d->r.pos - start);
            PyObject *entry = (bits && nb) ? PyTuple_Pack(3, gram->grammar, bits, nb) : NULL;
            Py_XDECREF(bits);
            Py_XDECREF(nb);
            Py_SETREF(memo, PyDict_New());
            if (!entry || !memo || PyDict_SetItem(memo, gram->gid, entry) < 0) rc = FAIL;
            Py_XDECREF(entry);
        }
    }
    if (rc == 0) {
        node = PyObject_CallFunctionObjArgs(d->pg->node_type, qname, attrs, content, memo, NULL);
        if (!node) rc = FAIL;
    }
    Py_XDECREF(memo);
    Py_DECREF(attrs);
    Py_DECREF(content);
    if (rc) { Py_XDECREF(node); return rc; }
    *out = node;
    return 0;
}

static int bits_for(Py_ssize_t count) {
    int n = 0;
    if (count <= 1) return 0;
    count -= 1;
    while (count) { n++; count >>= 1; }
    return n;
}

/* decode(program, data, fragment, limits, keep) -> Node | list[Node] | None
 * ``limits``: (max_stream_octets, max_depth, max_events, max_string_chars, max_binary_octets,
 * max_integer_octets); ``keep``: a set of qnames, or None. */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    Program *pg;
    Py_buffer data;
    int fragment;
    PyObject *keep;
    Decoder d;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!y*p(nnnnnn)O", &ProgramType, &pg, &data, &fragment, &d.lim.max_stream_octets,
                          &d.lim.max_depth, &d.lim.max_events, &d.lim.max_string_chars, &d.lim.max_binary_octets,
                          &d.lim.max_integer_octets, &keep))
        return NULL;
    d.pg = pg;
    d.r.data = data.buf;
    d.r.pos = 0;
    d.r.end = 8 * data.len;
    d.events = 0;
    d.keep = (keep == Py_None || !PyAnySet_Check(keep) || PySet_GET_SIZE(keep) == 0) ? NULL : keep;
    PyObject *result = NULL, *nodes = NULL;
    int rc = 0;
    uint64_t v;
    if (data.len > d.lim.max_stream_octets || d.lim.max_integer_octets > 64 || d.lim.max_depth < 0 ||
        d.lim.max_events < 0 || d.lim.max_string_chars < 0 || d.lim.max_binary_octets < 0 ||
        d.lim.max_integer_octets < 0) {
        rc = PUNT; /* limits this code does not compare like codec.py would */
        goto done;
    }
    if (r_bits(&d.r, 8, &v) || v != 0x80) { rc = PUNT; goto done; } /* header: only 0x80 (EXI 1.0 §5) */
    PyObject *roots = fragment ? pg->frag_roots : pg->doc_roots;
    Py_ssize_t count = PyTuple_GET_SIZE(roots);
    /* document: G_0..G_n-1, SE(*) (EXI 1.0 §8.5.1); fragment: F_0..F_n-1, SE(*), ED (§8.5.2) */
    int width = bits_for(count + (fragment ? 2 : 1));
    if (fragment && !(nodes = PyList_New(0))) { rc = FAIL; goto done; }
    for (;;) {
        if (++d.events > d.lim.max_events || r_bits(&d.r, width, &v)) { rc = PUNT; goto done; }
        if (fragment && v == (uint64_t)count + 1) break;
        if (v >= (uint64_t)count) { rc = PUNT; goto done; }
        PyObject *root = PyTuple_GET_ITEM(roots, (Py_ssize_t)v);
        int g = (int)PyLong_AsLong(PyTuple_GET_ITEM(root, 1));
        if (g < 0) { rc = PUNT; goto done; }
        PyObject *node;
        if ((rc = decode_element(&d, PyTuple_GET_ITEM(root, 0), g, 1, &node)) != 0) goto done;
        if (!fragment) { result = node; break; }
        rc = PyList_Append(nodes, node);
        Py_DECREF(node);
        if (rc < 0) { rc = FAIL; goto done; }
    }
    /* padding: fewer than 8 bits left, all zero */
    Py_ssize_t rest = d.r.end - d.r.pos;
    if (rest >= 8 || (rest && (r_bits(&d.r, (int)rest, &v) || v))) { rc = PUNT; goto done; }
    if (fragment) result = Py_NewRef(nodes);
done:
    PyBuffer_Release(&data);
    Py_XDECREF(nodes);
    if (rc) {
        Py_CLEAR(result);
        if (rc == PUNT) return Py_NewRef(Py_None);
        return NULL;
    }
    return result;
}

/* --- program ----------------------------------------------------------------------------------------- */

static void program_free_tables(Program *pg) {
    if (pg->grams) {
        for (int i = 0; i < pg->ngram; i++) {
            if (pg->grams[i].states) {
                for (int j = 0; j < pg->grams[i].nstates; j++) PyMem_Free(pg->grams[i].states[j].prods);
                PyMem_Free(pg->grams[i].states);
            }
        }
        PyMem_Free(pg->grams);
        pg->grams = NULL;
    }
    PyMem_Free(pg->dts);
    pg->dts = NULL;
}

static void program_dealloc(Program *pg) {
    program_free_tables(pg);
    Py_XDECREF(pg->spec);
    Py_XDECREF(pg->node_type);
    Py_XDECREF(pg->doc_roots);
    Py_XDECREF(pg->frag_roots);
    Py_TYPE(pg)->tp_free((PyObject *)pg);
}

static int get_int(PyObject *t, Py_ssize_t i, int *out) {
    long v = PyLong_AsLong(PyTuple_GET_ITEM(t, i));
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = (int)v;
    return 0;
}

#define SPEC_ERROR(msg) do { PyErr_SetString(PyExc_ValueError, msg); goto fail; } while (0)

/* Program(spec), spec = (node_type, grammars, datatypes, doc_roots, frag_roots) as native.py builds it:
 *   grammars[i]  = (grammar, id(grammar), states)
 *   states[j]    = (width, width2, ee, ch, ee2, empty_ok, elements, attributes, productions)
 *   productions  = ((kind, next, qname, datatype, grammar), ...)
 *   datatypes[m] = (kind, min_len, max_len, has_min, min, has_max, max, nbit, values, index)
 *   roots        = ((qname, grammar), ...)  — -1: an element outside the subset
 * Every index is checked here, so the codec never reads outside its tables. */
static PyObject *program_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *spec;
    if (kwds && PyDict_GET_SIZE(kwds)) { PyErr_SetString(PyExc_TypeError, "no keywords"); return NULL; }
    if (!PyArg_ParseTuple(args, "O!", &PyTuple_Type, &spec)) return NULL;
    Program *pg = (Program *)type->tp_alloc(type, 0);
    if (!pg) return NULL;
    pg->spec = Py_NewRef(spec);
    PyObject *grams, *dts;
    if (!PyArg_ParseTuple(spec, "OO!O!O!O!", &pg->node_type, &PyTuple_Type, &grams, &PyTuple_Type, &dts,
                          &PyTuple_Type, &pg->doc_roots, &PyTuple_Type, &pg->frag_roots))
        goto fail_clear;
    Py_INCREF(pg->node_type);
    Py_INCREF(pg->doc_roots);
    Py_INCREF(pg->frag_roots);
    if (!PyType_Check(pg->node_type)) SPEC_ERROR("node type");
    pg->ndt = (int)PyTuple_GET_SIZE(dts);
    pg->dts = PyMem_Calloc(pg->ndt ? pg->ndt : 1, sizeof(Dtype));
    pg->ngram = (int)PyTuple_GET_SIZE(grams);
    pg->grams = PyMem_Calloc(pg->ngram ? pg->ngram : 1, sizeof(Gram));
    if (!pg->dts || !pg->grams) { PyErr_NoMemory(); goto fail; }
    for (int m = 0; m < pg->ndt; m++) {
        PyObject *t = PyTuple_GET_ITEM(dts, m);
        Dtype *dt = &pg->dts[m];
        if (!PyArg_ParseTuple(t, "innpLpLiOO", &dt->kind, &dt->min_len, &dt->max_len, &dt->has_min, &dt->min,
                              &dt->has_max, &dt->max, &dt->nbit, &dt->values, &dt->index))
            goto fail;
        if (dt->kind < D_STRING || dt->kind > D_ENUM || dt->nbit > 32) SPEC_ERROR("datatype");
        if (dt->kind == D_ENUM && (!PyTuple_Check(dt->values) || !PyDict_Check(dt->index) || dt->nbit < 0))
            SPEC_ERROR("enumeration");
        if (dt->kind == D_INTEGER && dt->nbit >= 0 && !dt->has_min) SPEC_ERROR("n-bit integer");
    }
    for (int i = 0; i < pg->ngram; i++) {
        PyObject *gt = PyTuple_GET_ITEM(grams, i), *states;
        Gram *gram = &pg->grams[i];
        if (!PyArg_ParseTuple(gt, "OOO!", &gram->grammar, &gram->gid, &PyTuple_Type, &states)) goto fail;
        gram->nstates = (int)PyTuple_GET_SIZE(states);
        if (gram->nstates < 1) SPEC_ERROR("grammar without states");
        gram->states = PyMem_Calloc(gram->nstates, sizeof(State));
        if (!gram->states) { PyErr_NoMemory(); goto fail; }
        for (int j = 0; j < gram->nstates; j++) {
            State *st = &gram->states[j];
            PyObject *prods;
            if (!PyArg_ParseTuple(PyTuple_GET_ITEM(states, j), "iiiiiiO!O!O!", &st->width, &st->width2, &st->ee,
                                  &st->ch, &st->ee2, &st->empty_ok, &PyDict_Type, &st->elements,
                                  &PyDict_Type, &st->attributes, &PyTuple_Type, &prods))
                goto fail;
            st->nprod = (int)PyTuple_GET_SIZE(prods);
            if (st->width < 0 || st->width > 32 || st->width2 < 0 || st->width2 > 32) SPEC_ERROR("code width");
            if (st->ee >= st->nprod || st->ch >= st->nprod || (st->empty_ok && st->ch < 0))
                SPEC_ERROR("state");
            st->prods = PyMem_Calloc(st->nprod ? st->nprod : 1, sizeof(Prod));
            if (!st->prods) { PyErr_NoMemory(); goto fail; }
            for (int k = 0; k < st->nprod; k++) {
                Prod *p = &st->prods[k];
                PyObject *pt = PyTuple_GET_ITEM(prods, k);
                if (!PyTuple_Check(pt) || PyTuple_GET_SIZE(pt) != 5) SPEC_ERROR("production");
                if (get_int(pt, 0, &p->kind) || get_int(pt, 1, &p->next) || get_int(pt, 3, &p->dt) ||
                    get_int(pt, 4, &p->grammar))
                    goto fail;
                p->qname = PyTuple_GET_ITEM(pt, 2);
                if (p->next < -1 || p->next >= gram->nstates || (p->kind != K_EE && p->next < 0)) SPEC_ERROR("next");
                if ((p->kind == K_AT || p->kind == K_CH) && (p->dt < 0 || p->dt >= pg->ndt)) SPEC_ERROR("value");
                if (p->grammar >= pg->ngram) SPEC_ERROR("element grammar");
            }
            /* the code tables must point at productions of the matching kind */
            if ((st->ch >= 0 && st->prods[st->ch].kind != K_CH) || (st->ee >= 0 && st->prods[st->ee].kind != K_EE))
                SPEC_ERROR("CH or EE code");
            PyObject *key, *value;
            Py_ssize_t pos = 0;
            while (PyDict_Next(st->elements, &pos, &key, &value)) {
                long c = PyLong_AsLong(value);
                if (c < 0 || c >= st->nprod || st->prods[c].kind != K_SE) SPEC_ERROR("element code");
            }
            pos = 0;
            while (PyDict_Next(st->attributes, &pos, &key, &value)) {
                long c = PyLong_AsLong(value);
                if (c < 0 || c >= st->nprod || st->prods[c].kind != K_AT) SPEC_ERROR("attribute code");
            }
        }
    }
    for (int f = 0; f < 2; f++) {
        PyObject *roots = f ? pg->frag_roots : pg->doc_roots;
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(roots); i++) {
            PyObject *r = PyTuple_GET_ITEM(roots, i);
            if (!PyTuple_Check(r) || PyTuple_GET_SIZE(r) != 2) SPEC_ERROR("root");
            long g = PyLong_AsLong(PyTuple_GET_ITEM(r, 1));
            if (g < -1 || g >= pg->ngram) SPEC_ERROR("root grammar");
        }
    }
    if (PyErr_Occurred()) goto fail;
    return (PyObject *)pg;
fail_clear:
    pg->node_type = pg->doc_roots = pg->frag_roots = NULL;
fail:
    Py_DECREF(pg);
    return NULL;
}

static PyTypeObject ProgramType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pki.cps.exi._native.Program",
    .tp_basicsize = sizeof(Program),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = program_new,
    .tp_dealloc = (destructor)program_dealloc,
    .tp_doc = "EXI grammar tables of one schema set, compiled for the native codec",
};

static PyMethodDef methods[] = {
    {"encode", py_encode, METH_VARARGS, "encode(program, items, tail_code, tail_width) -> bytes | None"},
    {"decode", py_decode, METH_VARARGS, "decode(program, data, fragment, limits, keep) -> Node | list | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pki.cps.exi._native",
    .m_doc = "The EXI codec's hot loops in C (see native.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&ProgramType) < 0) return NULL;
    S_qname = PyUnicode_InternFromString("qname");
    S_attributes = PyUnicode_InternFromString("attributes");
    S_content = PyUnicode_InternFromString("content");
    S_memo = PyUnicode_InternFromString("memo");
    if (!S_qname || !S_attributes || !S_content || !S_memo) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "ABI", NATIVE_ABI) < 0 ||
        PyModule_AddObjectRef(m, "Program", (PyObject *)&ProgramType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
