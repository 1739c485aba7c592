#include "common/util.h"

#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
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

int ln_atomic_begin(const char *path, char **tmp, ln_err *e) {
    size_t pl = strlen(path);
    *tmp = ln_xmalloc(pl + 8);
    snprintf(*tmp, pl + 8, "%s.tmp", path);
    int fd = open(*tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        ln_errf(e, "%s: cannot create: %s", *tmp, strerror(errno));
        free(*tmp);
        *tmp = NULL;
    }
    return fd;
}

int ln_write_all(int fd, const void *data, size_t n, const char *name, ln_err *e) {
    const char *p = data;
    while (n > 0) {
        ssize_t k = write(fd, p, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            return ln_errf(e, "%s: write failed: %s", name, strerror(errno));
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

int ln_atomic_end(int fd, char *tmp, const char *path, int rc, ln_err *e) {
    if (rc == 0 && fsync(fd) != 0) rc = ln_errf(e, "%s: cannot finish writing: %s", path, strerror(errno));
    if (close(fd) != 0 && rc == 0) rc = ln_errf(e, "%s: cannot finish writing: %s", path, strerror(errno));
    if (rc == 0 && rename(tmp, path) != 0) rc = ln_errf(e, "%s: cannot finish writing: %s", path, strerror(errno));
    if (rc != 0) unlink(tmp);
    free(tmp);
    return rc;
}

int ln_write_file_atomic(const char *path, const void *data, size_t len, ln_err *e) {
    char *tmp;
    int fd = ln_atomic_begin(path, &tmp, e);
    if (fd < 0) return -1;
    return ln_atomic_end(fd, tmp, path, ln_write_all(fd, data, len, tmp, e), e);
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

/* ---------------------------------------------------------------- memory available */

static int read_small_file(const char *root, const char *path, char *buf, size_t n) {
    char full[1024];
    snprintf(full, sizeof full, "%s%s", root, path);
    FILE *f = fopen(full, "r");
    if (!f) return -1;
    size_t got = fread(buf, 1, n - 1, f);
    fclose(f);
    buf[got] = 0;
    return 0;
}

/* The number after "key" at the start of a line of text (e.g. "MemAvailable:", "inactive_file "). */
static int line_number(const char *text, const char *key, double *v) {
    size_t kl = strlen(key);
    for (const char *s = text; s && *s; s = strchr(s, '\n') ? strchr(s, '\n') + 1 : NULL)
        if (strncmp(s, key, kl) == 0) return sscanf(s + kl, "%lf", v) == 1 ? 0 : -1;
    return -1;
}

static void take_least(double v, const char *from, double *best, char *best_from, size_t n) {
    if (v < 0) v = 0;
    if (*best < 0 || v < *best) {
        *best = v;
        snprintf(best_from, n, "%s", from);
    }
}

/* cgroup v2: memory.max − (memory.current − inactive_file) of the process's cgroup and of every
 * ancestor; v1: limit_in_bytes − usage_in_bytes of its memory cgroup. */
static void cgroup_limits(const char *root, double *best, char *from, size_t n) {
    char self[4096], path[1024], buf[8192];
    if (read_small_file(root, "/proc/self/cgroup", self, sizeof self) != 0) return;
    for (char *line = strtok(self, "\n"); line; line = strtok(NULL, "\n")) {
        char *rest = NULL;
        if (strncmp(line, "0::", 3) == 0) {
            /* v2: walk from the process's cgroup up to the root of the hierarchy */
            snprintf(path, sizeof path, "%s", line + 3);
            for (;;) {
                char file[1100];
                double max, cur, inactive = 0;
                snprintf(file, sizeof file, "/sys/fs/cgroup%s/memory.max", strcmp(path, "/") ? path : "");
                if (read_small_file(root, file, buf, sizeof buf) == 0 && strncmp(buf, "max", 3) != 0 &&
                    sscanf(buf, "%lf", &max) == 1) {
                    snprintf(file, sizeof file, "/sys/fs/cgroup%s/memory.current", strcmp(path, "/") ? path : "");
                    if (read_small_file(root, file, buf, sizeof buf) == 0 && sscanf(buf, "%lf", &cur) == 1) {
                        snprintf(file, sizeof file, "/sys/fs/cgroup%s/memory.stat", strcmp(path, "/") ? path : "");
                        if (read_small_file(root, file, buf, sizeof buf) == 0) line_number(buf, "inactive_file ", &inactive);
                        take_least(max - (cur - inactive), "cgroup memory.max", best, from, n);
                    }
                }
                char *slash = strrchr(path, '/');
                if (!slash || strcmp(path, "/") == 0) break;
                if (slash == path) snprintf(path, sizeof path, "/");
                else *slash = 0;
            }
        } else if ((rest = strstr(line, ":memory:")) != NULL) {
            const char *p = rest + 8;
            char file[1100];
            double lim, use;
            snprintf(file, sizeof file, "/sys/fs/cgroup/memory%s/memory.limit_in_bytes", strcmp(p, "/") ? p : "");
            if (read_small_file(root, file, buf, sizeof buf) != 0 || sscanf(buf, "%lf", &lim) != 1 || lim >= 9e18) continue;
            snprintf(file, sizeof file, "/sys/fs/cgroup/memory%s/memory.usage_in_bytes", strcmp(p, "/") ? p : "");
            if (read_small_file(root, file, buf, sizeof buf) == 0 && sscanf(buf, "%lf", &use) == 1)
                take_least(lim - use, "cgroup memory.limit_in_bytes", best, from, n);
        }
    }
}

int ln_mem_available(const char *root, double *bytes, char *from, size_t from_len, ln_err *e) {
    double best = -1, v;
    char buf[8192];
    from[0] = 0;
    if (read_small_file(root, "/proc/meminfo", buf, sizeof buf) == 0 && line_number(buf, "MemAvailable:", &v) == 0)
        take_least(v * 1024.0, "MemAvailable", &best, from, from_len);
    cgroup_limits(root, &best, from, from_len);
    struct rlimit rl;
    unsigned long pages;
    if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        read_small_file(root, "/proc/self/statm", buf, sizeof buf) == 0 && sscanf(buf, "%lu", &pages) == 1)
        take_least((double)rl.rlim_cur - (double)pages * (double)sysconf(_SC_PAGESIZE), "RLIMIT_AS", &best, from, from_len);
    if (best < 0)
        return ln_errf(e, "cannot tell the available memory (no %s/proc/meminfo, cgroup limit or RLIMIT_AS)", root);
    *bytes = best;
    return 0;
}
