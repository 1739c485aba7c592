/* safetensors.c — see safetensors.h for the format and the validation rules. */
#include "common/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/util.h"

/* ------------------------------------------------------------------ types */

typedef struct st_file {
    char *path;
    void *map;          /* whole file, read-only; NULL for an empty buffer */
    size_t size;
    json_t *meta;       /* __metadata__ object or NULL (owned) */
} st_file;

struct st_set {
    st_file *files;     /* owned */
    size_t nfiles;
    st_tensor *t;       /* owned, sorted by name for lookup */
    size_t n;
};

static const struct { const char *name; size_t size; } DTYPES[ST_DTYPE_COUNT] = {
    [ST_F32] = {"F32", 4}, [ST_F16] = {"F16", 2},  [ST_BF16] = {"BF16", 2}, [ST_F64] = {"F64", 8},
    [ST_I64] = {"I64", 8}, [ST_I32] = {"I32", 4},  [ST_I16] = {"I16", 2},   [ST_I8] = {"I8", 1},
    [ST_U8] = {"U8", 1},   [ST_BOOL] = {"BOOL", 1},
};

const char *st_dtype_name(st_dtype d) { return d < ST_DTYPE_COUNT ? DTYPES[d].name : "?"; }
size_t st_dtype_size(st_dtype d) { return d < ST_DTYPE_COUNT ? DTYPES[d].size : 0; }

int st_dtype_parse(const char *s, st_dtype *out) {
    for (int i = 0; i < ST_DTYPE_COUNT; i++)
        if (strcmp(s, DTYPES[i].name) == 0) { *out = (st_dtype)i; return 0; }
    return -1;
}

/* ------------------------------------------------------------------ half floats */

float st_bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t st_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

float st_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) u = sign;
        else { /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            u = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
        }
    } else if (exp == 31) u = sign | 0x7f800000u | man << 13;
    else u = sign | (exp + 127 - 15) << 23 | man << 13;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t st_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00);             /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);            /* overflow -> inf */
    if (a < 0x38800000u) {                                             /* subnormal or zero */
        if (a < 0x33000000u) return (uint16_t)sign;
        uint32_t e = a >> 23, m = (a & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e;                                      /* 14..24 */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u);                         /* round to nearest even */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

/* ------------------------------------------------------------------ reading */

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

typedef struct { size_t begin, end; const char *name; } span;
static int cmp_span(const void *a, const void *b) {
    const span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : 0;
}

/* Maps one file, validates its header, and appends its tensors to s. */
static int open_one(st_set *s, const char *path, ln_err *e) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return ln_errf(e, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) { close(fd); return ln_errf(e, "%s: cannot stat: %s", path, strerror(errno)); }
    size_t size = (size_t)sb.st_size;
    if (size < 8) { close(fd); return ln_errf(e, "%s: truncated: %zu bytes, less than the 8-byte header length", path, size); }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return ln_errf(e, "%s: cannot mmap: %s", path, strerror(errno));

    s->files = ln_xrealloc(s->files, (s->nfiles + 1) * sizeof *s->files);
    st_file *f = &s->files[s->nfiles++];
    memset(f, 0, sizeof *f);
    f->path = ln_xstrdup(path);
    f->map = map;
    f->size = size;

    const unsigned char *p = map;
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) hlen |= (uint64_t)p[i] << (8 * i);
    if (hlen > ST_MAX_HEADER)
        return ln_errf(e, "%s: header length %llu exceeds the %u-byte limit", path, (unsigned long long)hlen, ST_MAX_HEADER);
    if (hlen > size - 8)
        return ln_errf(e, "%s: truncated: header says %llu bytes but the file has %zu after the length",
                       path, (unsigned long long)hlen, size - 8);
    if (hlen < 2 || p[8] != '{') return ln_errf(e, "%s: header does not start with '{'", path);

    json_error_t jerr;
    json_t *root = json_loadb((const char *)p + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) return ln_errf(e, "%s: header is not valid JSON: %s (column %d)", path, jerr.text, jerr.column);
    if (!json_is_object(root)) { json_decref(root); return ln_errf(e, "%s: header is not a JSON object", path); }

    size_t buf_off = 8 + (size_t)hlen, buf_len = size - buf_off;
    size_t ntens = json_object_size(root);
    span *spans = ln_xcalloc(ntens ? ntens : 1, sizeof *spans);
    size_t nspan = 0;
    int rc = -1;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            if (!json_is_object(val)) { ln_errf(e, "%s: __metadata__ is not an object", path); goto out; }
            const char *mk; json_t *mv;
            json_object_foreach(val, mk, mv) if (!json_is_string(mv)) {
                ln_errf(e, "%s: __metadata__ value of \"%s\" is not a string", path, mk); goto out;
            }
            f->meta = json_incref(val);
            continue;
        }
        if (!json_is_object(val)) { ln_errf(e, "%s: tensor \"%s\": entry is not an object", path, key); goto out; }
        json_t *jd = json_object_get(val, "dtype"), *js = json_object_get(val, "shape"),
               *jo = json_object_get(val, "data_offsets");
        st_tensor t = {0};
        if (!json_is_string(jd) || st_dtype_parse(json_string_value(jd), &t.dtype) != 0) {
            ln_errf(e, "%s: tensor \"%s\": unknown or missing dtype", path, key); goto out;
        }
        if (!json_is_array(js) || json_array_size(js) > ST_MAX_DIMS) {
            ln_errf(e, "%s: tensor \"%s\": shape missing or has more than %d dims", path, key, ST_MAX_DIMS); goto out;
        }
        t.ndim = (int)json_array_size(js);
        t.numel = 1;
        int overflow = 0;
        for (int d = 0; d < t.ndim; d++) {
            json_t *x = json_array_get(js, (size_t)d);
            if (!json_is_integer(x) || json_integer_value(x) < 0) {
                ln_errf(e, "%s: tensor \"%s\": shape[%d] is not a non-negative integer", path, key, d); goto out;
            }
            t.shape[d] = json_integer_value(x);
            if (t.shape[d] != 0 && t.numel > INT64_MAX / 16 / t.shape[d]) overflow = 1;
            else t.numel *= t.shape[d];
        }
        if (overflow) { ln_errf(e, "%s: tensor \"%s\": shape is too large", path, key); goto out; }
        if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(json_array_get(jo, 0)) ||
            !json_is_integer(json_array_get(jo, 1))) {
            ln_errf(e, "%s: tensor \"%s\": data_offsets must be [begin, end]", path, key); goto out;
        }
        json_int_t b = json_integer_value(json_array_get(jo, 0)), en = json_integer_value(json_array_get(jo, 1));
        if (b < 0 || en < b) { ln_errf(e, "%s: tensor \"%s\": data_offsets [%lld, %lld] are out of order", path, key, (long long)b, (long long)en); goto out; }
        t.nbytes = (size_t)t.numel * st_dtype_size(t.dtype);
        if ((size_t)(en - b) != t.nbytes) {
            ln_errf(e, "%s: tensor \"%s\": %lld bytes of data but shape and dtype %s need %zu", path, key,
                    (long long)(en - b), st_dtype_name(t.dtype), t.nbytes);
            goto out;
        }
        if ((size_t)en > buf_len) {
            ln_errf(e, "%s: truncated: tensor \"%s\" ends at byte %lld of the data but only %zu bytes are there",
                    path, key, (long long)en, buf_len);
            goto out;
        }
        t.name = ln_xstrdup(key);
        t.data = (const unsigned char *)map + buf_off + b;
        t.file = f->path;
        spans[nspan++] = (span){(size_t)b, (size_t)en, t.name};
        s->t = ln_xrealloc(s->t, (s->n + 1) * sizeof *s->t);
        s->t[s->n++] = t;
    }
    /* The tensors must tile the data buffer: no holes, no overlaps, nothing after. */
    qsort(spans, nspan, sizeof *spans, cmp_span);
    size_t at = 0;
    for (size_t i = 0; i < nspan; i++) {
        if (spans[i].begin != at) {
            ln_errf(e, "%s: tensor \"%s\": data begins at %zu but the previous tensor ends at %zu (offsets must be contiguous)",
                    path, spans[i].name, spans[i].begin, at);
            goto out;
        }
        at = spans[i].end;
    }
    if (at != buf_len) {
        ln_errf(e, "%s: the data buffer has %zu bytes but the tensors cover %zu", path, buf_len, at);
        goto out;
    }
    rc = 0;
out:
    free(spans);
    json_decref(root);
    return rc;
}

/* Reads model.safetensors.index.json and opens each distinct shard once. */
static int open_index(st_set *s, const char *dir, const char *index, ln_err *e) {
    json_error_t jerr;
    json_t *root = json_load_file(index, 0, &jerr);
    if (!root) return ln_errf(e, "%s: not valid JSON: %s (line %d)", index, jerr.text, jerr.line);
    json_t *wm = json_object_get(root, "weight_map");
    int rc = -1;
    if (!json_is_object(wm)) { ln_errf(e, "%s: missing \"weight_map\" object", index); goto out; }
    const char **seen = NULL;
    size_t nseen = 0;
    const char *k;
    json_t *v;
    json_object_foreach(wm, k, v) {
        if (!json_is_string(v)) { ln_errf(e, "%s: weight_map[\"%s\"] is not a file name", index, k); free(seen); goto out; }
        const char *fn = json_string_value(v);
        if (strchr(fn, '/') || strcmp(fn, "..") == 0) { ln_errf(e, "%s: shard name \"%s\" must be a plain file name", index, fn); free(seen); goto out; }
        int dup = 0;
        for (size_t i = 0; i < nseen; i++) if (strcmp(seen[i], fn) == 0) dup = 1;
        if (dup) continue;
        seen = ln_xrealloc(seen, (nseen + 1) * sizeof *seen);
        seen[nseen++] = fn;
        char *p = ln_path_join(dir, fn);
        int r = open_one(s, p, e);
        free(p);
        if (r != 0) { free(seen); goto out; }
    }
    free(seen);
    /* Every tensor the index names must be in the shard it names. */
    json_object_foreach(wm, k, v) {
        const st_tensor *t = st_find(s, k);
        if (!t) { ln_errf(e, "%s: tensor \"%s\" is listed but not found in %s", index, k, json_string_value(v)); goto out; }
    }
    rc = 0;
out:
    json_decref(root);
    return rc;
}

int st_open(const char *path, st_set **out, ln_err *e) {
    *out = NULL;
    st_set *s = ln_xcalloc(1, sizeof *s);
    struct stat sb;
    int rc;
    if (stat(path, &sb) != 0) { st_close(s); return ln_errf(e, "%s: not found", path); }
    if (S_ISDIR(sb.st_mode)) {
        char *single = ln_path_join(path, "model.safetensors");
        char *index = ln_path_join(path, "model.safetensors.index.json");
        if (ln_file_exists(single)) rc = open_one(s, single, e);
        else if (ln_file_exists(index)) rc = open_index(s, path, index, e);
        else rc = ln_errf(e, "%s: no model.safetensors or model.safetensors.index.json", path);
        free(single);
        free(index);
    } else {
        rc = open_one(s, path, e);
    }
    if (rc != 0) { st_close(s); return -1; }
    if (s->n > 1) qsort(s->t, s->n, sizeof *s->t, cmp_tensor_name);
    for (size_t i = 1; i < s->n; i++)
        if (strcmp(s->t[i - 1].name, s->t[i].name) == 0) {
            ln_errf(e, "%s: tensor \"%s\" appears in both %s and %s", path, s->t[i].name, s->t[i - 1].file, s->t[i].file);
            st_close(s);
            return -1;
        }
    *out = s;
    return 0;
}

void st_close(st_set *s) {
    if (!s) return;
    for (size_t i = 0; i < s->n; i++) free(s->t[i].name);
    free(s->t);
    for (size_t i = 0; i < s->nfiles; i++) {
        if (s->files[i].map) munmap(s->files[i].map, s->files[i].size);
        json_decref(s->files[i].meta);
        free(s->files[i].path);
    }
    free(s->files);
    free(s);
}

size_t st_count(const st_set *s) { return s->n; }
const st_tensor *st_at(const st_set *s, size_t i) { return i < s->n ? &s->t[i] : NULL; }

const st_tensor *st_find(const st_set *s, const char *name) {
    /* Linear while an index is being checked (the array is sorted only at the end of st_open). */
    size_t lo = 0, hi = s->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(s->t[mid].name, name);
        if (c == 0) return &s->t[mid];
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    for (size_t i = 0; i < s->n; i++) if (strcmp(s->t[i].name, name) == 0) return &s->t[i];
    return NULL;
}

const char *st_metadata(const st_set *s, const char *key) {
    for (size_t i = 0; i < s->nfiles; i++) {
        json_t *v = s->files[i].meta ? json_object_get(s->files[i].meta, key) : NULL;
        if (json_is_string(v)) return json_string_value(v);
    }
    return NULL;
}

int st_to_f32(const st_tensor *t, float *dst, int64_t n, ln_err *e) {
    if (n != t->numel)
        return ln_errf(e, "%s: tensor \"%s\" has %lld elements, expected %lld", t->file, t->name, (long long)t->numel, (long long)n);
    const unsigned char *p = t->data;
    switch (t->dtype) {
    case ST_F32: memcpy(dst, p, (size_t)n * 4); break;
    case ST_F16: for (int64_t i = 0; i < n; i++) { uint16_t v; memcpy(&v, p + 2 * i, 2); dst[i] = st_f16_to_f32(v); } break;
    case ST_BF16: for (int64_t i = 0; i < n; i++) { uint16_t v; memcpy(&v, p + 2 * i, 2); dst[i] = st_bf16_to_f32(v); } break;
    case ST_F64: for (int64_t i = 0; i < n; i++) { double v; memcpy(&v, p + 8 * i, 8); dst[i] = (float)v; } break;
    case ST_I64: for (int64_t i = 0; i < n; i++) { int64_t v; memcpy(&v, p + 8 * i, 8); dst[i] = (float)v; } break;
    case ST_I32: for (int64_t i = 0; i < n; i++) { int32_t v; memcpy(&v, p + 4 * i, 4); dst[i] = (float)v; } break;
    case ST_I16: for (int64_t i = 0; i < n; i++) { int16_t v; memcpy(&v, p + 2 * i, 2); dst[i] = (float)v; } break;
    case ST_I8: for (int64_t i = 0; i < n; i++) dst[i] = (float)(int8_t)p[i]; break;
    case ST_U8: case ST_BOOL: for (int64_t i = 0; i < n; i++) dst[i] = (float)p[i]; break;
    default: return ln_errf(e, "%s: tensor \"%s\": unsupported dtype", t->file, t->name);
    }
    return 0;
}

/* ------------------------------------------------------------------ writing */

typedef struct {
    char *name;
    st_dtype dt;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;
    void *owned;        /* converted copy, or NULL */
    size_t nbytes;
    st_fill_fn fill;    /* data produced while writing (st_writer_add_fill), or NULL */
    void *fill_ctx;
} w_entry;

struct st_writer {
    w_entry *e;
    size_t n;
    json_t *meta;
    int failed;         /* a copy could not be made: st_writer_write reports err */
    ln_err err;
};

st_writer *st_writer_new(void) {
    st_writer *w = ln_xcalloc(1, sizeof *w);
    w->meta = json_object();
    return w;
}

void st_writer_free(st_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n; i++) { free(w->e[i].name); free(w->e[i].owned); }
    free(w->e);
    json_decref(w->meta);
    free(w);
}

void st_writer_meta(st_writer *w, const char *key, const char *value) {
    json_object_set_new(w->meta, key, json_string(value));
}

static w_entry *add_entry(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape) {
    w->e = ln_xrealloc(w->e, (w->n + 1) * sizeof *w->e);
    w_entry *x = &w->e[w->n++];
    memset(x, 0, sizeof *x);
    x->name = ln_xstrdup(name);
    x->dt = dt;
    x->ndim = ndim;
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++) { x->shape[d] = shape[d]; numel *= shape[d]; }
    x->nbytes = (size_t)numel * st_dtype_size(dt);
    return x;
}

void st_writer_add(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape, const void *data) {
    add_entry(w, name, dt, ndim, shape)->data = data;
}

void st_writer_add_f32(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape, const float *data) {
    w_entry *x = add_entry(w, name, dt, ndim, shape);
    size_t n = x->nbytes / st_dtype_size(dt);
    if (w->failed) return;
    if (dt == ST_F32) {
        x->owned = ln_try_allocf(x->nbytes ? x->nbytes : 1, 1, &w->err, "safetensors writer", "a copy of tensor %s",
                                 name);
        if (x->owned) memcpy(x->owned, data, x->nbytes);
    } else {
        uint16_t *h = ln_try_allocf(n * 2 + 1, 1, &w->err, "safetensors writer", "a copy of tensor %s", name);
        for (size_t i = 0; h && i < n; i++)
            h[i] = dt == ST_BF16 ? st_f32_to_bf16(data[i]) : st_f32_to_f16(data[i]);
        x->owned = h;
    }
    w->failed = !x->owned;
    x->data = x->owned;
}

void st_writer_add_fill(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape, st_fill_fn fill,
                        void *ctx) {
    w_entry *x = add_entry(w, name, dt, ndim, shape);
    x->fill = fill;
    x->fill_ctx = ctx;
}

/* The header, then each tensor straight from where it lives, into path.tmp; fsync; rename. No copy
 * of the file is assembled in memory (a model's weights or an 8B calibration's 61 GiB of
 * covariances would need as much again). */
int st_writer_write(st_writer *w, const char *path, ln_err *e) {
    if (w->failed) return ln_errf(e, "%s: %s", path, w->err.msg);
    json_t *h = json_object();
    if (json_object_size(w->meta) > 0) json_object_set(h, "__metadata__", w->meta);
    size_t off = 0;
    for (size_t i = 0; i < w->n; i++) {
        w_entry *x = &w->e[i];
        if (json_object_get(h, x->name)) { json_decref(h); return ln_errf(e, "%s: tensor \"%s\" added twice", path, x->name); }
        json_t *shape = json_array();
        for (int d = 0; d < x->ndim; d++) json_array_append_new(shape, json_integer(x->shape[d]));
        json_object_set_new(h, x->name, json_pack("{s:s, s:o, s:[I,I]}", "dtype", st_dtype_name(x->dt), "shape", shape,
                                                  "data_offsets", (json_int_t)off, (json_int_t)(off + x->nbytes)));
        off += x->nbytes;
    }
    char *hs = json_dumps(h, JSON_COMPACT);
    json_decref(h);
    if (!hs) return ln_errf(e, "%s: out of memory writing the header of %zu tensors", path, w->n);
    size_t hl = strlen(hs), padded = (hl + 7) / 8 * 8; /* pad with spaces so the data is 8-aligned */
    unsigned char *head = ln_try_allocf(8 + padded, 1, e, "safetensors writer", "the header of %s", path);
    if (!head) { free(hs); return -1; }
    for (int i = 0; i < 8; i++) head[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    memcpy(head + 8, hs, hl);
    memset(head + 8 + hl, ' ', padded - hl);
    free(hs);
    char *tmp;
    int fd = ln_atomic_begin(path, &tmp, e);
    if (fd < 0) {
        free(head);
        return -1;
    }
    int rc = ln_write_all(fd, head, 8 + padded, tmp, e);
    for (size_t i = 0; rc == 0 && i < w->n; i++) {
        const void *d = w->e[i].data;
        if (w->e[i].fill && !(d = w->e[i].fill(w->e[i].fill_ctx, i, e))) rc = -1;
        else if (w->e[i].nbytes) rc = ln_write_all(fd, d, w->e[i].nbytes, tmp, e);
    }
    free(head);
    return ln_atomic_end(fd, tmp, path, rc, e);
}
