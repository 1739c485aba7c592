/* safetensors.h — reader (mmap) and writer for the safetensors format.
 *
 * Format: 8-byte little-endian header length N, N bytes of JSON
 *   {"__metadata__": {str: str}?, "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...}
 * then the byte buffer. Offsets are relative to the buffer; tensors must tile it exactly
 * (sorted by offset: first begins at 0, each begins where the previous ended, the last ends
 * at the end of the file), and e - b must equal product(shape) * dtype size.
 *
 * A set is one file, or a model directory: model.safetensors, or the shards listed by
 * model.safetensors.index.json ("weight_map": {tensor: file}). Every error names the file and,
 * where one is at fault, the tensor. Tensor data points into the mmap and lives as long as the set. */
#ifndef LN_SAFETENSORS_H
#define LN_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

typedef enum {
    ST_F32, ST_F16, ST_BF16, ST_F64, ST_I64, ST_I32, ST_I16, ST_I8, ST_U8, ST_BOOL, ST_DTYPE_COUNT
} st_dtype;

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER (100u * 1024u * 1024u) /* as the reference implementation */

typedef struct st_tensor {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;
    const void *data;   /* into the mapping; read-only */
    size_t nbytes;
    const char *file;   /* the shard it lives in */
} st_tensor;

typedef struct st_set st_set;

const char *st_dtype_name(st_dtype d);
size_t st_dtype_size(st_dtype d);
/* Parses "F32", "BF16", ...; returns -1 if unknown. */
int st_dtype_parse(const char *s, st_dtype *out);

/* Opens a .safetensors file or a model directory (single file or sharded with index). */
int st_open(const char *path, st_set **out, ln_err *e);
void st_close(st_set *s);

size_t st_count(const st_set *s);
const st_tensor *st_at(const st_set *s, size_t i);
/* NULL if absent. */
const st_tensor *st_find(const st_set *s, const char *name);
/* Metadata value of the first file that has the key, or NULL. */
const char *st_metadata(const st_set *s, const char *key);

/* Copies a tensor into fp32 (converting F16/BF16/F64/ints). n must equal t->numel. */
int st_to_f32(const st_tensor *t, float *dst, int64_t n, ln_err *e);

/* bf16/f16 <-> f32 helpers (round to nearest even). */
float st_bf16_to_f32(uint16_t v);
uint16_t st_f32_to_bf16(float f);
float st_f16_to_f32(uint16_t v);
uint16_t st_f32_to_f16(float f);

/* ---- writer ----
 * Tensors are added by reference (data must stay valid until st_writer_write), or converted
 * from fp32 into the dtype asked for (then the writer owns the converted copy). */
typedef struct st_writer st_writer;

st_writer *st_writer_new(void);
void st_writer_free(st_writer *w);
void st_writer_meta(st_writer *w, const char *key, const char *value);
void st_writer_add(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape, const void *data);
/* Adds fp32 data stored as dt (F32, F16 or BF16), as a copy the writer owns. Out of memory for
 * the copy is kept and returned by st_writer_write ("safetensors writer: out of memory allocating
 * <size> for a copy of tensor <name>"); later adds are then ignored. */
void st_writer_add_f32(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape, const float *data);
/* Adds a tensor whose bytes (nbytes of dt × shape) fill(ctx, index, e) returns while the file is
 * written — entries in the order they were added, index being the entry's — valid until the next
 * call; NULL (e filled) fails the write. Lets a writer hold one tensor at a time. */
typedef const void *(*st_fill_fn)(void *ctx, size_t index, ln_err *e);
void st_writer_add_fill(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape, st_fill_fn fill,
                        void *ctx);
/* Writes atomically (tmp + fsync + rename). */
int st_writer_write(st_writer *w, const char *path, ln_err *e);

#endif
