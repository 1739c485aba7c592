/* data.c — JSONL training data: validation, encoding into ids + labels, seeded epoch order.
 *
 * One pass over the whole file: every line is parsed and checked before training starts. A bad
 * line does not stop the pass; the error returned says how many lines were bad in all and
 * spells out the first three (file, line, field), so a user fixes the file in few rounds. */
#include "worker/engine/data.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/engine/chat.h"
#include "worker/engine/tokenizer.h"

/* ---------------------------------------------------------------------------------------------
 * Pre-tokenized lines
 * ------------------------------------------------------------------------------------------- */

/* Reads a JSON array of token ids into a new buffer. allow_ignore: -100 is accepted (labels). */
static int read_id_array(json_t *arr, const char *field, int vocab, int allow_ignore,
                         int32_t **out, int *n_out, ln_err *e) {
    if (!json_is_array(arr)) return ln_errf(e, "field \"%s\" must be an array of token ids", field);
    size_t n = json_array_size(arr);
    if (n == 0) return ln_errf(e, "field \"%s\" is empty", field);
    if (n > (size_t)INT32_MAX / 2) return ln_errf(e, "field \"%s\" is too long (%zu ids)", field, n);
    int32_t *ids = ln_try_allocf(n, sizeof *ids, e, "data", "the %zu token ids of field \"%s\"", n, field);
    if (!ids) return -1;
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v)) {
            free(ids);
            return ln_errf(e, "field \"%s[%zu]\" must be an integer token id", field, i);
        }
        json_int_t x = json_integer_value(v);
        int ok = (x >= 0 && (vocab <= 0 || x < vocab)) || (allow_ignore && x == LN_IGNORE_INDEX);
        if (!ok) {
            free(ids);
            if (vocab > 0)
                return ln_errf(e, "field \"%s[%zu]\" = %lld is outside the vocabulary [0, %d)%s",
                               field, i, (long long)x, vocab, allow_ignore ? " and is not -100" : "");
            return ln_errf(e, "field \"%s[%zu]\" = %lld is not a valid token id", field, i, (long long)x);
        }
        ids[i] = (int32_t)x;
    }
    *out = ids;
    *n_out = (int)n;
    return 0;
}

static int encode_pretokenized(json_t *obj, const ln_tokenizer *tok, ln_example *ex, ln_err *e) {
    int vocab = tok ? ln_tokenizer_vocab_size(tok) : 0;
    int n = 0, nl = 0;
    if (read_id_array(json_object_get(obj, "input_ids"), "input_ids", vocab, 0, &ex->input_ids, &n, e))
        return -1;
    json_t *labels = json_object_get(obj, "labels");
    if (!labels || json_is_null(labels)) {
        ex->labels = ln_try_allocf((size_t)n, sizeof *ex->labels, e, "data", "the %d labels copied from input_ids", n);
        if (!ex->labels) return -1;
        memcpy(ex->labels, ex->input_ids, (size_t)n * sizeof *ex->labels);
    } else {
        if (read_id_array(labels, "labels", vocab, 1, &ex->labels, &nl, e)) return -1;
        if (nl != n)
            return ln_errf(e, "field \"labels\" has %d entries but \"input_ids\" has %d; they must match",
                           nl, n);
    }
    ex->len = n;
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * One line
 * ------------------------------------------------------------------------------------------- */

/* Which of the four formats a line uses; a line naming fields of two formats is an error. */
static int detect_format(json_t *obj, ln_chat_format *fmt, ln_err *e) {
    int has_msg = json_object_get(obj, "messages") != NULL;
    int has_p = json_object_get(obj, "prompt") != NULL, has_c = json_object_get(obj, "completion") != NULL;
    int has_text = json_object_get(obj, "text") != NULL;
    int has_ids = json_object_get(obj, "input_ids") != NULL;
    int kinds = has_msg + (has_p || has_c) + has_text + has_ids;
    if (kinds == 0)
        return ln_errf(e, "no known field: expected \"messages\", \"prompt\"+\"completion\", \"text\" "
                          "or \"input_ids\"");
    if (kinds > 1)
        return ln_errf(e, "mixes the fields of several formats (use only one of \"messages\", "
                          "\"prompt\"+\"completion\", \"text\", \"input_ids\")");
    if (has_p != has_c) return ln_errf(e, "field \"%s\" is missing (it comes with \"%s\")",
                                       has_p ? "completion" : "prompt", has_p ? "prompt" : "completion");
    *fmt = has_msg ? LN_CHAT_MESSAGES : has_p ? LN_CHAT_PROMPT_COMPLETION
         : has_text ? LN_CHAT_TEXT : LN_CHAT_PRETOKENIZED;
    return 0;
}

static int trained_count(const ln_example *ex) {
    /* Position 0's label is never a target (position t predicts labels[t+1]), so it is not counted. */
    int k = 0;
    for (int i = 1; i < ex->len; i++) k += ex->labels[i] != LN_IGNORE_INDEX;
    return k;
}

/* Parses, encodes and checks one line. *truncated is set when the policy cut the example. */
static int load_line(const char *line, size_t len, const ln_tokenizer *tok, const ln_data_opts *o,
                     ln_example *ex, int *truncated, ln_err *e) {
    json_error_t je;
    json_t *obj = json_loadb(line, len, JSON_REJECT_DUPLICATES, &je);
    /* jansson says why a line is bad; when it could not allocate it leaves the text empty */
    if (!obj && (json_error_code(&je) == json_error_out_of_memory || !je.text[0]))
        return ln_errf(e, "out of memory parsing the JSON of a %zu-byte line", len);
    if (!obj) return ln_errf(e, "bad JSON at column %d: %s", je.column, je.text);
    int rc = -1;
    ln_chat_format fmt = LN_CHAT_PRETOKENIZED;
    if (!json_is_object(obj)) {
        ln_errf(e, "a line must be a JSON object, found %s",
                json_is_array(obj) ? "an array" : json_is_string(obj) ? "a string" : "a scalar");
        goto out;
    }
    if (detect_format(obj, &fmt, e)) goto out;
    if (fmt == LN_CHAT_PRETOKENIZED) {
        if (encode_pretokenized(obj, tok, ex, e)) goto out;
    } else {
        if (!tok) {
            ln_errf(e, "this line is text, which needs a tokenizer (none was given; only pre-tokenized "
                       "\"input_ids\" lines work without one)");
            goto out;
        }
        if (ln_chat_encode_json(tok, o ? o->chat_template : NULL, fmt, obj, &ex->input_ids,
                                &ex->labels, &ex->len, e))
            goto out;
    }
    *truncated = 0;
    if (o && o->max_seq_len > 0 && ex->len > o->max_seq_len) {
        if (o->overlong == LN_OVERLONG_REJECT) {
            ln_errf(e, "example has %d tokens, longer than max_seq_len %d (policy: reject; set it to "
                       "truncate to keep the first %d)", ex->len, o->max_seq_len, o->max_seq_len);
            goto out;
        }
        ex->len = o->max_seq_len;
        *truncated = 1;
    }
    if (trained_count(ex) == 0) {
        ln_errf(e, "example has no token that the loss trains on (every label is -100, every assistant "
                   "turn has weight 0, or truncation removed them)%s", *truncated ? " after truncation" : "");
        goto out;
    }
    rc = 0;
out:
    json_decref(obj);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Dataset
 * ------------------------------------------------------------------------------------------- */

static void example_free(ln_example *ex) {
    free(ex->input_ids);
    free(ex->labels);
    ex->input_ids = ex->labels = NULL;
}

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r') return 0;
    return 1;
}

int ln_dataset_load(const char *path, const ln_tokenizer *tok, const ln_data_opts *opts,
                    ln_dataset **out, ln_err *e) {
    char *buf = NULL;
    size_t size = 0;
    *out = NULL;
    if (ln_read_file(path, &buf, &size, e)) return -1;
    ln_dataset *d = ln_xcalloc(1, sizeof *d);
    d->path = ln_xstrdup(path);
    int64_t cap = 0, bad = 0, overlong_rejected = 0;
    ln_err first = {{0}};
    int lineno = 0;
    size_t start = size >= 3 && !memcmp(buf, "\xEF\xBB\xBF", 3) ? 3 : 0; /* a UTF-8 byte order mark */
    for (size_t pos = start; pos < size;) {
        const char *line = buf + pos;
        const char *nl = memchr(line, '\n', size - pos);
        size_t len = nl ? (size_t)(nl - line) : size - pos;
        pos += len + (nl ? 1 : 0);
        lineno++;
        if (is_blank(line, len)) continue;  /* blank lines separate nothing and hold no example */
        ln_example ex = {0};
        ex.line = lineno;
        int truncated = 0;
        ln_err le;
        if (load_line(line, len, tok, opts, &ex, &truncated, &le)) {
            example_free(&ex);
            if (strstr(le.msg, "out of memory")) { /* the worker's trouble, not the file's: stop here */
                free(buf);
                ln_dataset_free(d);
                return ln_errf(e, "%s line %d: %s", path, lineno, le.msg);
            }
            /* the first three bad lines are spelled out; the rest are counted */
            if (bad == 0) ln_errf(&first, "%s line %d: %s", path, lineno, le.msg);
            else if (bad < 3) {
                size_t used = strlen(first.msg);
                snprintf(first.msg + used, sizeof first.msg - used, "; line %d: %.300s", lineno, le.msg);
            }
            bad++;
            if (strstr(le.msg, "longer than max_seq_len")) overlong_rejected++;
            continue;
        }
        if (bad) { example_free(&ex); continue; }  /* keep validating, but stop collecting */
        if (d->n == cap) {
            int64_t ncap = cap ? cap * 2 : 256;
            ln_example *grown = realloc(d->ex, (size_t)ncap * sizeof *d->ex);
            if (!grown) {
                example_free(&ex);
                free(buf);
                ln_dataset_free(d);
                char size[32];
                return ln_errf(e, "%s line %d: out of memory allocating %s for the list of %lld examples", path, lineno,
                               ln_fmt_bytes((double)ncap * sizeof *d->ex, size, sizeof size), (long long)ncap);
            }
            d->ex = grown;
            cap = ncap;
        }
        d->stats.examples++;
        d->stats.tokens += ex.len;
        d->stats.trained_tokens += trained_count(&ex);
        d->stats.truncated += truncated;
        d->ex[d->n++] = ex;
    }
    free(buf);
    if (bad) {
        ln_dataset_free(d);
        if (bad == 1) return ln_errf(e, "%s", first.msg);
        char extra[160] = "";
        if (overlong_rejected)
            snprintf(extra, sizeof extra, ", %lld of them longer than max_seq_len", (long long)overlong_rejected);
        /* the count goes first, so a long list cut at LN_ERR_MSG_MAX never loses it */
        return ln_errf(e, "%lld bad lines in all%s; %s", (long long)bad, extra, first.msg);
    }
    if (d->n == 0) {
        ln_dataset_free(d);
        return ln_errf(e, "%s: no examples (the file is empty or holds only blank lines)", path);
    }
    *out = d;
    return 0;
}

void ln_dataset_free(ln_dataset *d) {
    if (!d) return;
    for (int64_t i = 0; i < d->n; i++) example_free(&d->ex[i]);
    free(d->ex);
    free(d->path);
    free(d);
}

/* ---------------------------------------------------------------------------------------------
 * Loader: a seeded permutation per epoch
 * ------------------------------------------------------------------------------------------- */

/* splitmix64: small, good enough to drive a Fisher–Yates shuffle, identical on every platform. */
static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform integer in [0, n) without modulo bias (rejection sampling). */
static uint64_t uniform_below(uint64_t *s, uint64_t n) {
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do x = splitmix64(s); while (x >= limit);
    return x % n;
}

/* The epoch's order depends only on (seed, epoch): a resumed run rebuilds it without history. */
static void build_order(ln_loader *l) {
    int64_t n = l->ds->n;
    for (int64_t i = 0; i < n; i++) l->order[i] = i;
    if (!l->shuffle) return;
    uint64_t s = l->seed ^ ((uint64_t)(l->pos.epoch + 1) * 0xD1B54A32D192ED03ull);
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)uniform_below(&s, (uint64_t)i + 1);
        int64_t t = l->order[i];
        l->order[i] = l->order[j];
        l->order[j] = t;
    }
}

void ln_loader_init(ln_loader *l, const ln_dataset *ds, uint64_t seed, int shuffle) {
    l->ds = ds;
    l->seed = seed;
    l->shuffle = shuffle;
    l->order = ln_xmalloc((size_t)(ds->n > 0 ? ds->n : 1) * sizeof *l->order);
    l->pos.epoch = 0;
    l->pos.index = 0;
    build_order(l);
}

void ln_loader_seek(ln_loader *l, ln_data_pos pos) {
    if (pos.epoch < 0) pos.epoch = 0;
    if (pos.index < 0) pos.index = 0;
    int rebuild = pos.epoch != l->pos.epoch;
    l->pos = pos;
    if (rebuild) build_order(l);
}

const ln_example *ln_loader_next(ln_loader *l) {
    if (l->ds->n == 0) return NULL;
    if (l->pos.index >= l->ds->n) {
        l->pos.epoch++;
        l->pos.index = 0;
        build_order(l);
    }
    return &l->ds->ex[l->order[l->pos.index++]];
}

void ln_loader_free(ln_loader *l) {
    free(l->order);
    l->order = NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Packing
 * ------------------------------------------------------------------------------------------- */

void ln_packed_row_init(ln_packed_row *r, int cap) {
    memset(r, 0, sizeof *r);
    r->cap = cap > 0 ? cap : 1;
    r->input_ids = ln_xmalloc((size_t)r->cap * sizeof *r->input_ids);
    r->labels = ln_xmalloc((size_t)r->cap * sizeof *r->labels);
    r->position_ids = ln_xmalloc((size_t)r->cap * sizeof *r->position_ids);
    r->segment = ln_xmalloc((size_t)r->cap * sizeof *r->segment);
}

void ln_packed_row_free(ln_packed_row *r) {
    free(r->input_ids);
    free(r->labels);
    free(r->position_ids);
    free(r->segment);
    memset(r, 0, sizeof *r);
}

/* The example ln_loader_next would return, without taking it. Crossing into the next epoch is
 * done here already: position (e, n) and (e + 1, 0) are the same point of the stream. */
static const ln_example *loader_peek(ln_loader *l) {
    if (l->ds->n == 0) return NULL;
    if (l->pos.index >= l->ds->n) {
        l->pos.epoch++;
        l->pos.index = 0;
        build_order(l);
    }
    return &l->ds->ex[l->order[l->pos.index]];
}

int ln_loader_next_packed(ln_loader *l, ln_packed_row *r) {
    r->len = 0;
    r->n_examples = 0;
    const ln_example *x;
    /* a row never spans two epochs: it ends where the epoch does */
    while (!(r->n_examples > 0 && l->pos.index >= l->ds->n) && (x = loader_peek(l)) != NULL) {
        int take = x->len;
        if (r->len + take > r->cap) {
            if (r->n_examples > 0) break;  /* it starts the next row */
            take = r->cap;                 /* longer than a row: cut, alone */
        }
        ln_loader_next(l);
        int seg = r->n_examples++;
        for (int i = 0; i < take; i++) {
            int t = r->len + i;
            r->input_ids[t] = x->input_ids[i];
            r->labels[t] = i == 0 ? LN_IGNORE_INDEX : x->labels[i];
            r->position_ids[t] = i;
            r->segment[t] = seg;
        }
        r->len += take;
        if (r->len == r->cap) break;
    }
    for (int t = r->len; t < r->cap; t++) {
        r->input_ids[t] = 0;
        r->labels[t] = LN_IGNORE_INDEX;
        r->position_ids[t] = 0;
        r->segment[t] = -1;
    }
    return r->n_examples;
}
