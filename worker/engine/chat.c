/* chat.c — chat templates and loss masks (see chat.h for the exact rendered forms). */
#include "worker/engine/chat.h"

#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "worker/engine/data.h"
#include "worker/engine/unicode.h"

/* ---------------------------------------------------------------------------------------------
 * Rendering helpers
 * ------------------------------------------------------------------------------------------- */

/* Appends s; out of memory is kept in r->oom (the bytes wanted) and reported by ln_chat_render. */
static void put(ln_chat_rendered *r, const char *s, size_t n) {
    if (r->oom) return;
    if (r->len + n + 1 > r->cap) {
        size_t cap = r->cap ? r->cap : 256;
        while (cap < r->len + n + 1) cap *= 2;
        char *t = realloc(r->text, cap);
        if (!t) {
            r->oom = cap;
            return;
        }
        r->text = t;
        r->cap = cap;
    }
    memcpy(r->text + r->len, s, n);
    r->len += n;
    r->text[r->len] = 0;
}

static void puts_(ln_chat_rendered *r, const char *s) { put(r, s, strlen(s)); }

static void span_open(ln_chat_rendered *r) {
    if (r->oom) return;
    if (r->n_spans == r->cap_spans) {
        int cap = r->cap_spans ? r->cap_spans * 2 : 8;
        size_t (*sp)[2] = realloc(r->spans, (size_t)cap * sizeof *r->spans);
        if (!sp) {
            r->oom = (size_t)cap * sizeof *r->spans;
            return;
        }
        r->spans = sp;
        r->cap_spans = cap;
    }
    r->spans[r->n_spans][0] = r->spans[r->n_spans][1] = r->len;
    r->n_spans++;
}

static void span_close(ln_chat_rendered *r) {
    if (!r->oom) r->spans[r->n_spans - 1][1] = r->len;
}

void ln_chat_rendered_free(ln_chat_rendered *r) {
    free(r->text);
    free(r->spans);
    memset(r, 0, sizeof *r);
}

/* Python's str.isspace(), which Jinja's trim and str.strip() use (wider than \s: it also
 * takes the information separators U+001C–U+001F). */
static int py_isspace(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
           cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
           cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

/* s.strip(): the [*a, *b) range of s without leading/trailing whitespace. */
static void strip_range(const char *s, size_t n, size_t *a, size_t *b) {
    const uint8_t *u = (const uint8_t *)s;
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        int l = ln_utf8_next(u + i, n - i, &cp);
        if (!py_isspace(cp)) break;
        i += (size_t)l;
    }
    /* walk forward remembering the end of the last non-space character */
    size_t last = i;
    for (size_t k = i; k < n;) {
        uint32_t cp;
        int l = ln_utf8_next(u + k, n - k, &cp);
        k += (size_t)l;
        if (!py_isspace(cp)) last = k;
    }
    *a = i;
    *b = last;
}

static void put_stripped(ln_chat_rendered *r, const char *s, size_t n) {
    size_t a, b;
    strip_range(s, n, &a, &b);
    put(r, s + a, b - a);
}

/* ---------------------------------------------------------------------------------------------
 * Messages
 * ------------------------------------------------------------------------------------------- */

typedef enum { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT } role_t;

typedef struct msg {
    role_t role;
    const char *content;
    size_t len;
    int trained;
} msg;

/* Reads and checks "messages": roles, content strings, weights. */
static int read_messages(json_t *arr, msg **out, int *n_out, ln_err *e) {
    if (!json_is_array(arr)) return ln_errf(e, "field \"messages\" must be an array of {\"role\", \"content\"}");
    size_t n = json_array_size(arr);
    if (n == 0) return ln_errf(e, "field \"messages\" is empty");
    msg *m = ln_try_allocf(n, sizeof *m, e, "chat template", "%zu messages", n);
    if (!m) return -1;
    memset(m, 0, n * sizeof *m);
    size_t i;
    json_t *x;
    json_array_foreach(arr, i, x) {
        if (!json_is_object(x)) { free(m); return ln_errf(e, "field \"messages[%zu]\" must be an object", i); }
        json_t *role = json_object_get(x, "role"), *content = json_object_get(x, "content");
        if (!json_is_string(role)) { free(m); return ln_errf(e, "field \"messages[%zu].role\" is missing or not a string", i); }
        const char *r = json_string_value(role);
        if (!strcmp(r, "system")) m[i].role = ROLE_SYSTEM;
        else if (!strcmp(r, "user")) m[i].role = ROLE_USER;
        else if (!strcmp(r, "assistant")) m[i].role = ROLE_ASSISTANT;
        else {
            ln_errf(e, "field \"messages[%zu].role\": unknown role \"%.40s\" (expected system, user or assistant)", i, r);
            free(m);
            return -1;
        }
        if (!json_is_string(content)) {
            free(m);
            return ln_errf(e, "field \"messages[%zu].content\" is missing or not a string", i);
        }
        m[i].content = json_string_value(content);
        m[i].len = json_string_length(content);
        json_t *w = json_object_get(x, "weight");
        m[i].trained = m[i].role == ROLE_ASSISTANT;
        if (w) {
            if (m[i].role != ROLE_ASSISTANT) {
                free(m);
                return ln_errf(e, "field \"messages[%zu].weight\": only assistant turns take a weight", i);
            }
            double v = json_is_integer(w) ? (double)json_integer_value(w) : json_is_real(w) ? json_real_value(w) : -1;
            if (v != 0 && v != 1) { free(m); return ln_errf(e, "field \"messages[%zu].weight\" must be 0 or 1", i); }
            m[i].trained = v == 1;
        }
        if (m[i].trained) {
            size_t a, b;
            strip_range(m[i].content, m[i].len, &a, &b);
            if (a == b) {
                free(m);
                return ln_errf(e, "field \"messages[%zu].content\": empty assistant reply (empty completion)", i);
            }
        }
    }
    *out = m;
    *n_out = (int)n;
    return 0;
}

static const char *token_text_or(const ln_tokenizer *tok, int32_t id, const char *fallback) {
    const char *s = id >= 0 ? ln_tokenizer_token_text(tok, id) : NULL;
    return s ? s : fallback;
}

static int render_llama3(const ln_tokenizer *tok, const msg *m, int n, ln_chat_rendered *r, ln_err *e) {
    static const char *const names[] = {"system", "user", "assistant"};
    puts_(r, token_text_or(tok, ln_tokenizer_bos_id(tok), "<|begin_of_text|>"));
    for (int i = 0; i < n; i++) {
        puts_(r, "<|start_header_id|>");
        puts_(r, names[m[i].role]);
        puts_(r, "<|end_header_id|>\n\n");
        if (m[i].trained) span_open(r);
        put_stripped(r, m[i].content, m[i].len);
        puts_(r, "<|eot_id|>");
        if (m[i].trained) span_close(r);
    }
    return 0;
}

static int render_llama2(const ln_tokenizer *tok, const msg *m, int n, ln_chat_rendered *r, ln_err *e) {
    const char *bos = token_text_or(tok, ln_tokenizer_bos_id(tok), "<s>");
    const char *eos = token_text_or(tok, ln_tokenizer_eos_id(tok), "</s>");
    int first = 0;
    const msg *sys = NULL;
    if (m[0].role == ROLE_SYSTEM) { sys = &m[0]; first = 1; }
    for (int i = first; i < n; i++) {
        int k = i - first;
        if (m[i].role == ROLE_SYSTEM)
            return ln_errf(e, "field \"messages[%d].role\": the llama2 template takes a system message only first", i);
        if ((m[i].role == ROLE_USER) != (k % 2 == 0))
            return ln_errf(e, "field \"messages[%d].role\": the llama2 template needs user and assistant turns to "
                              "alternate, starting with user", i);
        if (m[i].role == ROLE_USER) {
            puts_(r, bos);
            puts_(r, "[INST] ");
            if (k == 0 && sys) {
                /* content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + user, then .strip() of it all */
                ln_chat_rendered tmp = {0};
                puts_(&tmp, "<<SYS>>\n");
                put(&tmp, sys->content, sys->len);
                puts_(&tmp, "\n<</SYS>>\n\n");
                put(&tmp, m[i].content, m[i].len);
                if (tmp.oom) r->oom = tmp.oom;
                else put_stripped(r, tmp.text, tmp.len);
                ln_chat_rendered_free(&tmp);
            } else {
                put_stripped(r, m[i].content, m[i].len);
            }
            puts_(r, " [/INST]");
        } else {
            puts_(r, " ");
            if (m[i].trained) span_open(r);
            put_stripped(r, m[i].content, m[i].len);
            puts_(r, " ");
            puts_(r, eos);
            if (m[i].trained) span_close(r);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * API
 * ------------------------------------------------------------------------------------------- */

int ln_chat_template_pick(const ln_tokenizer *tok, const char *name, ln_chat_template *out, ln_err *e) {
    if (name && *name) {
        if (!strcmp(name, "llama3")) { *out = LN_TEMPLATE_LLAMA3; return 0; }
        if (!strcmp(name, "llama2")) { *out = LN_TEMPLATE_LLAMA2; return 0; }
        return ln_errf(e, "unknown chat template \"%s\" (built in: llama3, llama2)", name);
    }
    const char *ct = ln_tokenizer_chat_template(tok);
    if (ct && strstr(ct, "<|start_header_id|>")) *out = LN_TEMPLATE_LLAMA3;
    else if (ct && strstr(ct, "[INST]")) *out = LN_TEMPLATE_LLAMA2;
    else *out = ln_tokenizer_is_byte_level(tok) ? LN_TEMPLATE_LLAMA3 : LN_TEMPLATE_LLAMA2;
    return 0;
}

static int string_field(json_t *obj, const char *name, const char **s, size_t *n, ln_err *e) {
    json_t *v = json_object_get(obj, name);
    if (!json_is_string(v)) return ln_errf(e, "field \"%s\" must be a string", name);
    *s = json_string_value(v);
    *n = json_string_length(v);
    return 0;
}

/* The sentence for a render that ran out of memory (r->oom); frees r. */
static int render_oom(ln_chat_rendered *r, ln_err *e) {
    char size[32];
    ln_errf(e, "chat template: out of memory allocating %s for the rendered example",
            ln_fmt_bytes((double)r->oom, size, sizeof size));
    ln_chat_rendered_free(r);
    return -1;
}

static int render(const ln_tokenizer *tok, ln_chat_template tpl, ln_chat_format fmt, json_t *obj, ln_chat_rendered *r,
                  ln_err *e) {
    const char *a = NULL, *b = NULL;
    size_t na = 0, nb = 0;
    switch (fmt) {
    case LN_CHAT_MESSAGES: {
        msg *m = NULL;
        int n = 0;
        if (read_messages(json_object_get(obj, "messages"), &m, &n, e)) return -1;
        int rc = tpl == LN_TEMPLATE_LLAMA3 ? render_llama3(tok, m, n, r, e) : render_llama2(tok, m, n, r, e);
        free(m);
        if (rc) ln_chat_rendered_free(r);
        return rc;
    }
    case LN_CHAT_PROMPT_COMPLETION:
        if (string_field(obj, "prompt", &a, &na, e) || string_field(obj, "completion", &b, &nb, e)) return -1;
        if (nb == 0) return ln_errf(e, "field \"completion\" is empty (empty completion)");
        put(r, a, na);
        span_open(r);
        put(r, b, nb);
        span_close(r);
        r->add_special = 1;
        return 0;
    case LN_CHAT_TEXT:
        if (string_field(obj, "text", &a, &na, e)) return -1;
        if (na == 0) return ln_errf(e, "field \"text\" is empty");
        put(r, a, na);
        r->add_special = 1;
        r->all_trained = 1;
        return 0;
    default:
        return ln_errf(e, "pre-tokenized lines are not rendered");
    }
}

int ln_chat_render(const ln_tokenizer *tok, ln_chat_template tpl, ln_chat_format fmt, json_t *obj,
                   ln_chat_rendered *r, ln_err *e) {
    memset(r, 0, sizeof *r);
    if (render(tok, tpl, fmt, obj, r, e) != 0) return -1;
    return r->oom ? render_oom(r, e) : 0;
}

/* First token whose [start, end) holds byte c (transformers' char_to_token), or -1. Searching
 * from `from` is exact when from is the answer for an earlier byte: token starts never decrease,
 * so a token before it that held c would also have held that earlier byte. */
static int byte_to_token(const ln_ids *off, int n, size_t c, int from) {
    for (int t = from; t < n; t++)
        if ((size_t)off->ids[2 * t] <= c && c < (size_t)off->ids[2 * t + 1]) return t;
    return -1;
}

int ln_chat_encode_json(const ln_tokenizer *tok, const char *template_name, ln_chat_format fmt,
                        json_t *obj, int32_t **ids_out, int32_t **labels_out, int *len_out, ln_err *e) {
    ln_chat_template tpl;
    if (ln_chat_template_pick(tok, template_name, &tpl, e)) return -1;
    ln_chat_rendered r;
    if (ln_chat_render(tok, tpl, fmt, obj, &r, e)) return -1;
    ln_ids ids = {0}, off = {0};
    if (ln_tokenizer_encode(tok, r.text, r.len, r.add_special, &ids, &off, e)) {
        ln_chat_rendered_free(&r);
        ln_ids_free(&ids);
        ln_ids_free(&off);
        return -1;
    }
    int n_text = ids.n;
    if (fmt == LN_CHAT_PROMPT_COMPLETION) {
        int32_t eos = ln_tokenizer_eos_id(tok);
        if (eos < 0) {
            ln_chat_rendered_free(&r);
            ln_ids_free(&ids);
            ln_ids_free(&off);
            return ln_errf(e, "the tokenizer has no EOS token to end a completion with");
        }
        ln_ids_push(&ids, eos);
    }
    if (ids.oom) {
        ln_chat_rendered_free(&r);
        ln_ids_free(&ids);
        ln_ids_free(&off);
        return ln_errf(e, "chat template: out of memory appending EOS to %d tokens", n_text);
    }
    int32_t *labels = ln_try_allocf((size_t)(ids.n ? ids.n : 1), sizeof *labels, e, "chat template",
                                    "the labels of %d tokens", ids.n);
    if (!labels) {
        ln_chat_rendered_free(&r);
        ln_ids_free(&ids);
        ln_ids_free(&off);
        return -1;
    }
    for (int i = 0; i < ids.n; i++) labels[i] = r.all_trained ? ids.ids[i] : LN_IGNORE_INDEX;
    /* transformers' assistant mask: for each span, tokens from the one holding its first char to the
     * one holding its last (to the end when that is token 0 — a quirk kept for equality). */
    int hint = 0;
    for (int s = 0; s < r.n_spans; s++) {
        size_t a = r.spans[s][0], b = r.spans[s][1];
        if (b <= a) continue;
        int ts = byte_to_token(&off, n_text, a, hint);
        if (ts < 0) break;
        hint = ts;
        size_t last = b - 1;
        while (last > a && ((uint8_t)r.text[last] & 0xC0) == 0x80) last--; /* start of the last character */
        int te = byte_to_token(&off, n_text, last, ts);
        int stop = te > 0 ? te + 1 : n_text;
        for (int t = ts; t < stop; t++) labels[t] = ids.ids[t];
    }
    if (fmt == LN_CHAT_PROMPT_COMPLETION) labels[ids.n - 1] = ids.ids[ids.n - 1];
    ln_chat_rendered_free(&r);
    ln_ids_free(&off);
    *ids_out = ids.ids;
    *labels_out = labels;
    *len_out = ids.n;
    return 0;
}
