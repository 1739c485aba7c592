/* util.h — small helpers every part uses: checked allocation, whole-file I/O, paths, time. */
#ifndef LN_UTIL_H
#define LN_UTIL_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

/* Allocation that aborts with a message on out-of-memory (for small, bounded objects only;
 * large tensors use ln_try_alloc and report a clear error instead). */
void *ln_xmalloc(size_t n);
void *ln_xcalloc(size_t n, size_t size);
void *ln_xrealloc(void *p, size_t n);
char *ln_xstrdup(const char *s);

/* Large allocation (64-byte aligned) that can fail: returns NULL and fills e with the size. */
void *ln_try_alloc(size_t n, const char *what, ln_err *e);
/* The same, with the sentence "<area>: out of memory allocating <size> for <what>" (what is
 * printf-style: name the layer, tensor or phase), e.g.
 *   "knowledge drift: out of memory allocating 1.2 GiB for the original weight of layer 7 mlp.down_proj".
 * n_elems · elem_size is checked for overflow. */
void *ln_try_allocf(size_t n_elems, size_t elem_size, ln_err *e, const char *area, const char *what_fmt, ...)
    __attribute__((format(printf, 5, 6)));
/* A byte count for people: "512 B", "3.0 KiB", "64.0 MiB", "1.20 GiB". Returns buf. */
char *ln_fmt_bytes(double bytes, char *buf, size_t n);

/* Reads a whole file into a NUL-terminated buffer owned by the caller. */
int ln_read_file(const char *path, char **out, size_t *len, ln_err *e);
/* Writes a file atomically: to path.tmp, fsync, rename. */
int ln_write_file_atomic(const char *path, const void *data, size_t len, ln_err *e);
/* The same in steps, for a file written piece by piece: ln_atomic_begin opens path.tmp (its name
 * in *tmp, freed by ln_atomic_end) and returns the fd, or -1; ln_write_all writes n bytes (name
 * for the error); ln_atomic_end(rc = the writes' result) fsyncs, closes and renames path.tmp over
 * path when rc is 0, else removes it, and returns 0 or -1. */
int ln_atomic_begin(const char *path, char **tmp, ln_err *e);
int ln_write_all(int fd, const void *data, size_t n, const char *name, ln_err *e);
int ln_atomic_end(int fd, char *tmp, const char *path, int rc, ln_err *e);
/* mkdir -p. */
int ln_mkdir_p(const char *path, ln_err *e);
int ln_file_exists(const char *path);
/* Joins a directory and a name into a new string owned by the caller. */
char *ln_path_join(const char *dir, const char *name);

/* The memory this process may still take, bytes: the least of MemAvailable (/proc/meminfo), its
 * cgroup's memory.max − working set (memory.current − inactive_file, v2, every ancestor's too;
 * limit_in_bytes − usage_in_bytes, v1) and RLIMIT_AS − the address space already mapped. from
 * names the limit that was least ("MemAvailable", "cgroup memory.max", "RLIMIT_AS", ...). root
 * prefixes /proc and /sys: "" on a real system, a directory of such files in tests. Fails only
 * when none can be read. */
int ln_mem_available(const char *root, double *bytes, char *from, size_t from_len, ln_err *e);

/* Monotonic and wall clocks. */
double ln_now_s(void);      /* monotonic seconds */
int64_t ln_unix_time(void); /* wall clock seconds since epoch */

#endif
