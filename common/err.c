#include "common/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int ln_errf(ln_err *e, const char *fmt, ...) {
    if (!e) return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return -1;
}

int ln_err_prefix(ln_err *e, const char *fmt, ...) {
    if (!e) return -1;
    char head[LN_ERR_MSG_MAX], old[LN_ERR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(head, sizeof head, fmt, ap);
    va_end(ap);
    memcpy(old, e->msg, sizeof old);
    /* head + ": " + old, cut to fit */
    size_t hl = strnlen(head, sizeof head - 1), ol = strnlen(old, sizeof old - 1);
    size_t k = 0, cap = sizeof e->msg - 1;
    size_t take = hl < cap ? hl : cap;
    memcpy(e->msg, head, take);
    k = take;
    for (const char *sep = ": "; *sep && k < cap; sep++) e->msg[k++] = *sep;
    take = ol < cap - k ? ol : cap - k;
    memcpy(e->msg + k, old, take);
    e->msg[k + take] = 0;
    return -1;
}
