/* err.h — one error convention for all of loranull.
 *
 * A function that can fail returns 0 on success and -1 on failure, and on failure
 * fills the caller's ln_err with one sentence that says what went wrong and where
 * (file, line, field, tensor). The caller owns the ln_err; it may be NULL when the
 * caller does not care. Messages are never "error -1". */
#ifndef LN_ERR_H
#define LN_ERR_H

#include <stddef.h>

#define LN_ERR_MSG_MAX 1024

typedef struct ln_err {
    char msg[LN_ERR_MSG_MAX];
} ln_err;

/* Sets e->msg (printf-style) and returns -1, so `return ln_errf(e, ...)` reads well. */
int ln_errf(ln_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prepends "prefix: " to an existing message (adds context on the way up). Returns -1. */
int ln_err_prefix(ln_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
