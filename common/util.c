#include "common/util.h"

#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void oom(size_t n) {
    fprintf(stderr, "loranull: out of memory allocating %zu bytes\n", n);
    abort();
}

void *ln_xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) oom(n);
    return p;
}

void *ln_xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) oom(n * size);
    return p;
}

void *ln_xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) oom(n);
    return q;
}

char *ln_xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = ln_xmalloc(n);
    memcpy(d, s, n);
    return d;
}

void *ln_try_alloc(size_t n, const char *what, ln_err *e) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? (n + 63) / 64 * 64 : 64) != 0 || !p) {
        ln_errf(e, "out of memory: %s needs %.1f MiB", what, (double)n / (1 << 20));
        return NULL;
    }
    return p;
}

char *ln_fmt_bytes(double bytes, char *buf, size_t n) {
    const double K = 1024.0;
    if (bytes < K) snprintf(buf, n, "%.0f B", bytes);
    else if (bytes < K * K) snprintf(buf, n, "%.1f KiB", bytes / K);
    else if (bytes < K * K * K) snprintf(buf, n, "%.1f MiB", bytes / (K * K));
    else snprintf(buf, n, "%.2f GiB", bytes / (K * K * K));
    return buf;
}

void *ln_try_allocf(size_t n_elems, size_t elem_size, ln_err *e, const char *area, const char *what_fmt, ...) {
    void *p = NULL;
    size_t n = n_elems * elem_size;
    int overflow = elem_size != 0 && n / elem_size != n_elems;
    if (!overflow && posix_memalign(&p, 64, n ? (n + 63) / 64 * 64 : 64) == 0 && p) return p;
    char what[512], size[32];
    va_list ap;
    va_start(ap, what_fmt);
    vsnprintf(what, sizeof what, what_fmt, ap);
    va_end(ap);
    ln_fmt_bytes((double)n_elems * (double)elem_size, size, sizeof size);
    ln_errf(e, "%s: out of memory allocating %s for %s", area, size, what);
    return NULL;
}

int ln_read_file(const char *path, char **out, size_t *len, ln_err *e) {
    FILE *f = fopen(path, "rb");
    if (!f) return ln_errf(e, "%s: cannot open: %s", path, strerror(errno));
    char *buf = NULL;
    size_t cap = 0, n = 0;
    for (;;) {
        if (n + 65536 + 1 > cap) {
            /* data files can be gigabytes: running out of memory is this file's error, not an abort */
            size_t ncap = cap ? cap * 2 : 65536 * 2;
            char *grown = realloc(buf, ncap);
            if (!grown) {
                char size[32];
                free(buf);
                fclose(f);
                return ln_errf(e, "%s: out of memory allocating %s to read it", path,
                               ln_fmt_bytes((double)ncap, size, sizeof size));
            }
            buf = grown;
            cap = ncap;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return ln_errf(e, "%s: read error", path);
    }
    buf[n] = 0;
    *out = buf;
    if (len) *len = n;
    return 0;
}

int ln_write_file_atomic(const char *path, const void *data, size_t len, ln_err *e) {
    size_t pl = strlen(path);
    char *tmp = ln_xmalloc(pl + 8);
    snprintf(tmp, pl + 8, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        ln_errf(e, "%s: cannot create: %s", tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    const char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            ln_errf(e, "%s: write failed: %s", tmp, strerror(errno));
            close(fd);
            unlink(tmp);
            free(tmp);
            return -1;
        }
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0 || rename(tmp, path) != 0) {
        ln_errf(e, "%s: cannot finish writing: %s", path, strerror(errno));
        unlink(tmp);
        free(tmp);
        return -1;
    }
    free(tmp);
    return 0;
}

int ln_mkdir_p(const char *path, ln_err *e) {
    char *p = ln_xstrdup(path);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        if (mkdir(p, 0755) != 0 && errno != EEXIST) {
            ln_errf(e, "%s: cannot create directory: %s", p, strerror(errno));
            free(p);
            return -1;
        }
        *s = '/';
    }
    if (mkdir(p, 0755) != 0 && errno != EEXIST) {
        ln_errf(e, "%s: cannot create directory: %s", p, strerror(errno));
        free(p);
        return -1;
    }
    free(p);
    return 0;
}

int ln_file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

char *ln_path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *s = ln_xmalloc(a + b + 2);
    memcpy(s, dir, a);
    size_t k = a;
    if (a > 0 && dir[a - 1] != '/') s[k++] = '/';
    memcpy(s + k, name, b + 1);
    return s;
}

double ln_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int64_t ln_unix_time(void) {
    return (int64_t)time(NULL);
}
