/* store.h — the server's SQLite store: one database file in the data dir, WAL mode,
 * schema only through migrations/NNN_*.sql (applied in order at start, recorded in
 * schema_migrations), and content-addressed blobs for file bytes.
 *
 * Threads: every thread gets its own connection (created on first use, closed at thread exit),
 * so readers never wait for a writer (WAL). Writers take BEGIN IMMEDIATE; the busy timeout
 * serialises them. synchronous=FULL: a committed transaction is on disk before the reply. */
#ifndef LN_STORE_H
#define LN_STORE_H

#include <stddef.h>
#include <stdint.h>

#include <sqlite3.h>

#include "common/err.h"

/* Opens (creating) <data_dir>/loranull.db and <data_dir>/blobs, applies pending migrations
 * from migrations_dir. Call once, before any thread uses the store. */
int store_open(const char *data_dir, const char *migrations_dir, ln_err *e);
void store_close(void);

/* This thread's connection. */
sqlite3 *store_db(void);
/* A prepared statement for sql, cached per thread by the pointer of sql (pass string literals),
 * reset and with bindings cleared. Aborts on a SQL syntax error (a programming error). */
sqlite3_stmt *store_stmt(const char *sql);

/* Transactions on this thread's connection; store_begin takes the write lock (IMMEDIATE). */
int store_begin(void);
int store_commit(void);
void store_rollback(void);
/* Runs one statement that returns no rows; 0 or -1 (message from SQLite in e). */
int store_exec(const char *sql, ln_err *e);

/* Fills out with prefix + 24 random [A-Za-z0-9] (e.g. "file-…"). cap >= strlen(prefix)+25. */
void store_new_id(const char *prefix, char *out, size_t cap);
/* Random bytes from the kernel. */
void store_random(void *buf, size_t n);

/* Data directory layout. */
const char *store_data_dir(void);
/* <data>/blobs/<sha[0:2]>/<sha>; caller frees. */
char *store_blob_path(const char *sha_hex);
/* A new temporary file path under <data>/tmp; caller frees. */
char *store_tmp_path(void);
/* Links a finished temp file into the blob store under its hash (fsyncs the directory); the temp
 * file stays until store_blob_settle, called once the file's row is committed (or abandoned). */
int store_blob_commit(const char *tmp_path, const char *sha_hex, ln_err *e);
void store_blob_settle(const char *tmp_path, const char *sha_hex);
/* After a file row was deleted and committed: removes the blob if no row references it now. */
void store_blob_release(const char *sha_hex);

/* Writes and removes a probe row (for /readyz). */
int store_probe_writable(ln_err *e);

/* Text of column i or "" when NULL. */
const char *store_col_text(sqlite3_stmt *st, int i);

#endif
