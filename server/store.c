/* store.c — SQLite connections, migrations and the blob directory (see store.h). */
#include "server/store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "common/sha256.h"
#include "common/util.h"

/* ---------------------------------------------------------------- per-thread connections */

#define STMT_CACHE 128

typedef struct store_conn {
    sqlite3 *db;
    int n;
    struct { const char *sql; sqlite3_stmt *st; } cache[STMT_CACHE];
} store_conn;

static char *g_data_dir;
static char *g_db_path;
static pthread_key_t g_key;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void conn_free(void *p) {
    store_conn *c = p;
    if (!c) return;
    for (int i = 0; i < c->n; i++) sqlite3_finalize(c->cache[i].st);
    sqlite3_close(c->db);
    free(c);
}

static void key_init(void) { pthread_key_create(&g_key, conn_free); }

/* Writers wait for each other here. SQLite's own busy timeout sleeps in steps of up to 100 ms,
 * which turns a 1 ms fsync queue into 100 ms tails; polling every 200 us keeps the queue short.
 * Gives up after 10 s (the caller then answers 503). */
static int busy_wait(void *arg, int count) {
    (void)arg;
    if (count >= 50000) return 0;
    struct timespec ts = {0, 200 * 1000};
    nanosleep(&ts, NULL);
    return 1;
}

static sqlite3 *open_conn(ln_err *e) {
    sqlite3 *db = NULL;
    if (sqlite3_open_v2(g_db_path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL) !=
        SQLITE_OK) {
        ln_errf(e, "%s: cannot open database: %s", g_db_path, db ? sqlite3_errmsg(db) : "out of memory");
        sqlite3_close(db);
        return NULL;
    }
    sqlite3_busy_handler(db, busy_wait, NULL);
    /* FULL: the WAL is fsynced at every commit, so a 201 means the row survives a crash. */
    char *msg = NULL;
    if (sqlite3_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;", NULL, NULL,
                     &msg) != SQLITE_OK) {
        ln_errf(e, "%s: cannot set pragmas: %s", g_db_path, msg ? msg : "?");
        sqlite3_free(msg);
        sqlite3_close(db);
        return NULL;
    }
    return db;
}

static store_conn *conn_get(void) {
    pthread_once(&g_once, key_init);
    store_conn *c = pthread_getspecific(g_key);
    if (c) return c;
    ln_err e;
    sqlite3 *db = open_conn(&e);
    if (!db) {
        ln_log(LN_LOG_ERROR, "store", "%s", e.msg);
        abort();
    }
    c = ln_xcalloc(1, sizeof *c);
    c->db = db;
    pthread_setspecific(g_key, c);
    return c;
}

sqlite3 *store_db(void) { return conn_get()->db; }

sqlite3_stmt *store_stmt(const char *sql) {
    store_conn *c = conn_get();
    for (int i = 0; i < c->n; i++)
        if (c->cache[i].sql == sql) {
            sqlite3_reset(c->cache[i].st);
            sqlite3_clear_bindings(c->cache[i].st);
            return c->cache[i].st;
        }
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v3(c->db, sql, -1, SQLITE_PREPARE_PERSISTENT, &st, NULL) != SQLITE_OK) {
        ln_log(LN_LOG_ERROR, "store", "cannot prepare SQL (a bug): %s: %s", sqlite3_errmsg(c->db), sql);
        abort();
    }
    if (c->n < STMT_CACHE) {
        c->cache[c->n].sql = sql;
        c->cache[c->n].st = st;
        c->n++;
    } else {
        /* Cache full (should not happen: the server has fewer distinct statements): recycle slot 0. */
        sqlite3_finalize(c->cache[0].st);
        c->cache[0].sql = sql;
        c->cache[0].st = st;
    }
    return st;
}

int store_exec(const char *sql, ln_err *e) {
    char *msg = NULL;
    if (sqlite3_exec(store_db(), sql, NULL, NULL, &msg) != SQLITE_OK) {
        ln_errf(e, "database: %s", msg ? msg : "error");
        sqlite3_free(msg);
        return -1;
    }
    return 0;
}

int store_begin(void) { return sqlite3_exec(store_db(), "BEGIN IMMEDIATE", NULL, NULL, NULL) == SQLITE_OK ? 0 : -1; }
int store_commit(void) {
    if (sqlite3_exec(store_db(), "COMMIT", NULL, NULL, NULL) == SQLITE_OK) return 0;
    store_rollback();
    return -1;
}
void store_rollback(void) {
    if (!sqlite3_get_autocommit(store_db())) sqlite3_exec(store_db(), "ROLLBACK", NULL, NULL, NULL);
}

const char *store_col_text(sqlite3_stmt *st, int i) {
    const unsigned char *t = sqlite3_column_text(st, i);
    return t ? (const char *)t : "";
}

/* ---------------------------------------------------------------- ids */

void store_random(void *buf, size_t n) {
    unsigned char *p = buf;
    while (n > 0) {
        ssize_t got = getrandom(p, n, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            ln_log(LN_LOG_ERROR, "store", "getrandom failed: %s", strerror(errno));
            abort();
        }
        p += got;
        n -= (size_t)got;
    }
}

void store_new_id(const char *prefix, char *out, size_t cap) {
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    unsigned char r[24];
    store_random(r, sizeof r);
    size_t pl = strlen(prefix);
    if (cap < pl + 25) abort();
    memcpy(out, prefix, pl);
    /* 62 symbols; the modulo bias (256 % 62 = 8) is irrelevant for ids of 142 bits. */
    for (int i = 0; i < 24; i++) out[pl + i] = alphabet[r[i] % 62];
    out[pl + 24] = 0;
}

/* ---------------------------------------------------------------- blobs */

const char *store_data_dir(void) { return g_data_dir; }

char *store_blob_path(const char *sha) {
    size_t n = strlen(g_data_dir) + 80;
    char *p = ln_xmalloc(n);
    snprintf(p, n, "%s/blobs/%.2s/%s", g_data_dir, sha, sha);
    return p;
}

char *store_tmp_path(void) {
    char id[40];
    store_new_id("up-", id, sizeof id);
    size_t n = strlen(g_data_dir) + 64;
    char *p = ln_xmalloc(n);
    snprintf(p, n, "%s/tmp/%s", g_data_dir, id);
    return p;
}

static void fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

/* Blob lifetime. Rows reference blobs by hash, several rows may share one, and a blob is removed
 * when its last row goes. An upload and a delete of the same content may interleave, so:
 *   upload: store_blob_commit (hard-link the temp file in, keep the temp) → row committed →
 *           store_blob_settle (link again if a delete removed it meanwhile; drop the temp);
 *   delete: row deleted and committed → store_blob_release (re-count rows; unlink at zero).
 * g_blob_mu makes "count, then unlink" and "link if missing" atomic with respect to each other, so
 * a committed row never points at a missing blob. */
static pthread_mutex_t g_blob_mu = PTHREAD_MUTEX_INITIALIZER;

static int link_in(const char *tmp, const char *sha, ln_err *e) {
    size_t n = strlen(g_data_dir) + 64;
    char *dir = ln_xmalloc(n);
    snprintf(dir, n, "%s/blobs/%.2s", g_data_dir, sha);
    char *path = store_blob_path(sha);
    int rc = 0;
    if (ln_mkdir_p(dir, e) != 0) rc = -1;
    else if (!ln_file_exists(path)) {
        if (link(tmp, path) != 0 && errno != EEXIST) rc = ln_errf(e, "%s: cannot store upload: %s", path, strerror(errno));
        else fsync_dir(dir);
    }
    free(path);
    free(dir);
    return rc;
}

int store_blob_commit(const char *tmp, const char *sha, ln_err *e) {
    pthread_mutex_lock(&g_blob_mu);
    int rc = link_in(tmp, sha, e);
    pthread_mutex_unlock(&g_blob_mu);
    return rc;
}

void store_blob_settle(const char *tmp, const char *sha) {
    ln_err e;
    pthread_mutex_lock(&g_blob_mu);
    if (link_in(tmp, sha, &e) != 0) ln_log(LN_LOG_ERROR, "store", "%s", e.msg);
    pthread_mutex_unlock(&g_blob_mu);
    unlink(tmp);
}

void store_blob_release(const char *sha) {
    pthread_mutex_lock(&g_blob_mu);
    sqlite3_stmt *st = store_stmt("SELECT COUNT(*) FROM files WHERE sha256=?");
    sqlite3_bind_text(st, 1, sha, -1, SQLITE_STATIC);
    int used = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int(st, 0) : 1;
    sqlite3_reset(st);
    if (!used) {
        char *path = store_blob_path(sha);
        unlink(path);
        free(path);
    }
    pthread_mutex_unlock(&g_blob_mu);
}

/* ---------------------------------------------------------------- migrations */

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int is_migration_name(const char *n) {
    size_t l = strlen(n);
    return l > 8 && n[0] >= '0' && n[0] <= '9' && n[1] >= '0' && n[1] <= '9' && n[2] >= '0' && n[2] <= '9' &&
           n[3] == '_' && strcmp(n + l - 4, ".sql") == 0;
}

static int apply_migrations(sqlite3 *db, const char *dir, ln_err *e) {
    char *msg = NULL;
    if (sqlite3_exec(db,
                     "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "sha256 TEXT NOT NULL, applied_at INTEGER NOT NULL)",
                     NULL, NULL, &msg) != SQLITE_OK) {
        ln_errf(e, "cannot create schema_migrations: %s", msg);
        sqlite3_free(msg);
        return -1;
    }
    DIR *d = opendir(dir);
    if (!d) return ln_errf(e, "%s: cannot read migrations directory: %s", dir, strerror(errno));
    char *names[1000];
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) && n < 1000)
        if (is_migration_name(de->d_name)) names[n++] = ln_xstrdup(de->d_name);
    closedir(d);
    if (n == 0) return ln_errf(e, "%s: no migrations (NNN_name.sql) found", dir);
    qsort(names, (size_t)n, sizeof names[0], cmp_str);
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        int version = atoi(names[i]);
        char *path = ln_path_join(dir, names[i]), *sql = NULL;
        size_t len;
        if (ln_read_file(path, &sql, &len, e) != 0) {
            free(path);
            rc = -1;
            break;
        }
        char hex[65];
        sha256_hex(sql, len, hex);
        sqlite3_stmt *st;
        sqlite3_prepare_v2(db, "SELECT sha256 FROM schema_migrations WHERE version=?", -1, &st, NULL);
        sqlite3_bind_int(st, 1, version);
        int applied = sqlite3_step(st) == SQLITE_ROW;
        if (applied && strcmp((const char *)sqlite3_column_text(st, 0), hex) != 0)
            ln_log(LN_LOG_WARN, "store", "migration %s changed after it was applied (kept as applied)", names[i]);
        sqlite3_finalize(st);
        if (!applied) {
            if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, &msg) != SQLITE_OK ||
                sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
                rc = ln_errf(e, "%s: migration failed: %s", path, msg ? msg : sqlite3_errmsg(db));
                sqlite3_free(msg);
                sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
            } else {
                sqlite3_prepare_v2(db, "INSERT INTO schema_migrations(version,name,sha256,applied_at) VALUES(?,?,?,?)",
                                   -1, &st, NULL);
                sqlite3_bind_int(st, 1, version);
                sqlite3_bind_text(st, 2, names[i], -1, SQLITE_TRANSIENT);
                sqlite3_bind_text(st, 3, hex, -1, SQLITE_TRANSIENT);
                sqlite3_bind_int64(st, 4, ln_unix_time());
                int ok = sqlite3_step(st) == SQLITE_DONE;
                sqlite3_finalize(st);
                if (!ok || sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
                    rc = ln_errf(e, "%s: cannot record migration: %s", path, sqlite3_errmsg(db));
                    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
                } else {
                    ln_log(LN_LOG_INFO, "store", "applied migration %s", names[i]);
                }
            }
        }
        free(sql);
        free(path);
    }
    for (int i = 0; i < n; i++) free(names[i]);
    return rc;
}

int store_open(const char *data_dir, const char *migrations_dir, ln_err *e) {
    g_data_dir = ln_xstrdup(data_dir);
    g_db_path = ln_path_join(data_dir, "loranull.db");
    char *blobs = ln_path_join(data_dir, "blobs"), *tmp = ln_path_join(data_dir, "tmp");
    int rc = ln_mkdir_p(blobs, e) || ln_mkdir_p(tmp, e) ? -1 : 0;
    free(blobs);
    if (rc == 0) {
        /* Leftover partial uploads of a previous run are garbage. */
        DIR *d = opendir(tmp);
        struct dirent *de;
        while (d && (de = readdir(d)))
            if (de->d_name[0] != '.') {
                char *p = ln_path_join(tmp, de->d_name);
                unlink(p);
                free(p);
            }
        if (d) closedir(d);
    }
    free(tmp);
    if (rc != 0) return -1;
    sqlite3 *db = open_conn(e);
    if (!db) return -1;
    rc = apply_migrations(db, migrations_dir, e);
    sqlite3_close(db);
    return rc;
}

void store_close(void) {
    pthread_once(&g_once, key_init);
    store_conn *c = pthread_getspecific(g_key);
    if (c) {
        sqlite3_exec(c->db, "PRAGMA wal_checkpoint(TRUNCATE)", NULL, NULL, NULL);
        conn_free(c);
        pthread_setspecific(g_key, NULL);
    }
}

int store_probe_writable(ln_err *e) {
    if (store_exec("BEGIN IMMEDIATE; INSERT INTO readiness_probe VALUES (1); DELETE FROM readiness_probe; COMMIT;",
                   e) != 0) {
        store_rollback();
        return -1;
    }
    return 0;
}
