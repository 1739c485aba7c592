/* auth.c — hashed API keys and worker tokens (see auth.h). */
#include "server/auth.h"

#include <stdio.h>
#include <string.h>

#include "common/sha256.h"
#include "common/util.h"
#include "server/store.h"

/* Looks a secret up by its SHA-256 in sql (one '?', selecting one id column) among unrevoked rows. */
static int lookup_secret(const char *sql, const char *secret, char id[40]) {
    if (strlen(secret) > 128) return -1;
    char hex[65];
    sha256_hex(secret, strlen(secret), hex);
    sqlite3_stmt *st = store_stmt(sql);
    sqlite3_bind_text(st, 1, hex, -1, SQLITE_STATIC);
    int rc = -1;
    if (sqlite3_step(st) == SQLITE_ROW) {
        snprintf(id, 40, "%s", store_col_text(st, 0));
        rc = 0;
    }
    sqlite3_reset(st);
    return rc;
}

int auth_check_key(const char *key, char project_id[40]) {
    return lookup_secret("SELECT project_id FROM api_keys WHERE key_hash=? AND revoked_at IS NULL", key, project_id);
}

int auth_check_worker_token(const char *token, char token_id[40]) {
    return lookup_secret("SELECT id FROM worker_tokens WHERE token_hash=? AND revoked_at IS NULL", token, token_id);
}

static int valid_name(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 64) return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '-' ||
              *s == '_' || *s == '.'))
            return 0;
    return 1;
}

/* In the caller's transaction: the project named `project` (made if new) gets API key `key`,
 * stored as its SHA-256. −1 on a database error (sqlite3_errmsg says which). */
static int add_key(const char *project, const char *key, char key_id[40], char project_id[40]) {
    sqlite3_stmt *st = store_stmt("SELECT id FROM projects WHERE name=?");
    sqlite3_bind_text(st, 1, project, -1, SQLITE_STATIC);
    int have = sqlite3_step(st) == SQLITE_ROW;
    if (have) snprintf(project_id, 40, "%s", store_col_text(st, 0));
    sqlite3_reset(st);
    if (!have) {
        store_new_id("proj_", project_id, 40);
        st = store_stmt("INSERT INTO projects(id,name,created_at) VALUES(?,?,?)");
        sqlite3_bind_text(st, 1, project_id, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, project, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, ln_unix_time());
        int ok = sqlite3_step(st) == SQLITE_DONE;
        sqlite3_reset(st);
        if (!ok) return -1;
    }
    char hex[65];
    sha256_hex(key, strlen(key), hex);
    store_new_id("key_", key_id, 40);
    st = store_stmt("INSERT INTO api_keys(id,project_id,key_hash,prefix,created_at) VALUES(?,?,?,?,?)");
    sqlite3_bind_text(st, 1, key_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, project_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, hex, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, key, 10, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, ln_unix_time());
    int ok = sqlite3_step(st) == SQLITE_DONE;
    sqlite3_reset(st);
    return ok ? 0 : -1;
}

int auth_key_create(const char *project, char key[64], char key_id[40], char project_id[40], ln_err *e) {
    if (!valid_name(project))
        return ln_errf(e, "--project '%s': a project name is 1..64 of letters, digits and . _ -", project);
    if (store_begin() != 0) return ln_errf(e, "database is busy: %s", sqlite3_errmsg(store_db()));
    store_new_id("sk-ln-", key, 64);
    if (add_key(project, key, key_id, project_id) != 0) goto err;
    if (store_commit() != 0) goto err;
    return 0;
err:
    ln_errf(e, "cannot create key: %s", sqlite3_errmsg(store_db()));
    store_rollback();
    return -1;
}

int auth_token_create(const char *name, char token[64], char token_id[40], ln_err *e) {
    if (!valid_name(name)) return ln_errf(e, "--name '%s': a name is 1..64 of letters, digits and . _ -", name);
    store_new_id("wt-ln-", token, 64);
    store_new_id("wtok_", token_id, 40);
    char hex[65];
    sha256_hex(token, strlen(token), hex);
    sqlite3_stmt *st = store_stmt("INSERT INTO worker_tokens(id,name,token_hash,created_at) VALUES(?,?,?,?)");
    sqlite3_bind_text(st, 1, token_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, hex, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, ln_unix_time());
    if (sqlite3_step(st) != SQLITE_DONE) return ln_errf(e, "cannot create token: %s", sqlite3_errmsg(store_db()));
    return 0;
}

static int revoke(const char *table, const char *hash_col, const char *id_or_secret, ln_err *e) {
    char hex[65];
    sha256_hex(id_or_secret, strlen(id_or_secret), hex);
    char sql[200];
    snprintf(sql, sizeof sql, "UPDATE %s SET revoked_at=? WHERE (id=? OR %s=?) AND revoked_at IS NULL", table, hash_col);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(store_db(), sql, -1, &st, NULL) != SQLITE_OK)
        return ln_errf(e, "database: %s", sqlite3_errmsg(store_db()));
    sqlite3_bind_int64(st, 1, ln_unix_time());
    sqlite3_bind_text(st, 2, id_or_secret, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, hex, -1, SQLITE_STATIC);
    int ok = sqlite3_step(st) == SQLITE_DONE;
    sqlite3_finalize(st);
    if (!ok) return ln_errf(e, "database: %s", sqlite3_errmsg(store_db()));
    if (sqlite3_changes(store_db()) == 0) return ln_errf(e, "'%.40s' is not an active %s", id_or_secret,
                                                         strcmp(table, "api_keys") == 0 ? "key" : "worker token");
    return 0;
}

int auth_key_revoke(const char *id_or_key, ln_err *e) { return revoke("api_keys", "key_hash", id_or_key, e); }
int auth_token_revoke(const char *id_or_token, ln_err *e) {
    return revoke("worker_tokens", "token_hash", id_or_token, e);
}

int auth_list(int tokens, ln_err *e) {
    const char *sql = tokens ? "SELECT id, name, '', created_at, revoked_at FROM worker_tokens ORDER BY created_at"
                             : "SELECT k.id, p.name, k.prefix, k.created_at, k.revoked_at FROM api_keys k "
                               "JOIN projects p ON p.id=k.project_id ORDER BY k.created_at";
    sqlite3_stmt *st = store_stmt(sql);
    while (sqlite3_step(st) == SQLITE_ROW)
        printf("%s\t%s\t%s\tcreated=%lld\t%s\n", store_col_text(st, 0), store_col_text(st, 1), store_col_text(st, 2),
               (long long)sqlite3_column_int64(st, 3), sqlite3_column_type(st, 4) == SQLITE_NULL ? "active" : "revoked");
    sqlite3_reset(st);
    return 0;
}

/* ---------------------------------------------------------------- import of given secrets */

static int valid_secret(const char *s) {
    size_t n = strlen(s);
    if (n < 20 || n > 128) return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '-' || *s == '_'))
            return 0;
    return 1;
}

/* 1 when a secret with this hash is already known (active or revoked: a revoked one stays revoked). */
static int hash_known(const char *sql, const char *hex) {
    sqlite3_stmt *st = store_stmt(sql);
    sqlite3_bind_text(st, 1, hex, -1, SQLITE_STATIC);
    int known = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_reset(st);
    return known;
}

int auth_key_import(const char *project, const char *key, int *added, ln_err *e) {
    *added = 0;
    if (!valid_name(project))
        return ln_errf(e, "project '%.80s': a project name is 1..64 of letters, digits and . _ -", project);
    if (!valid_secret(key)) return ln_errf(e, "project %s: the key is not 20..128 of letters, digits, _ and -", project);
    char hex[65];
    sha256_hex(key, strlen(key), hex);
    if (hash_known("SELECT 1 FROM api_keys WHERE key_hash=?", hex)) return 0;
    if (store_begin() != 0) return ln_errf(e, "database is busy: %s", sqlite3_errmsg(store_db()));
    char project_id[40], key_id[40];
    if (add_key(project, key, key_id, project_id) != 0 || store_commit() != 0) goto err;
    *added = 1;
    return 0;
err:
    ln_errf(e, "cannot import key: %s", sqlite3_errmsg(store_db()));
    store_rollback();
    return -1;
}

int auth_token_import(const char *name, const char *token, int *added, ln_err *e) {
    *added = 0;
    if (!valid_name(name)) return ln_errf(e, "--name '%.80s': a name is 1..64 of letters, digits and . _ -", name);
    if (!valid_secret(token)) return ln_errf(e, "the token is not 20..128 of letters, digits, _ and -");
    char hex[65], id[40];
    sha256_hex(token, strlen(token), hex);
    if (hash_known("SELECT 1 FROM worker_tokens WHERE token_hash=?", hex)) return 0;
    store_new_id("wtok_", id, sizeof id);
    sqlite3_stmt *st = store_stmt("INSERT INTO worker_tokens(id,name,token_hash,created_at) VALUES(?,?,?,?)");
    sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, name, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, hex, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 4, ln_unix_time());
    int ok = sqlite3_step(st) == SQLITE_DONE;
    sqlite3_reset(st);
    if (!ok) return ln_errf(e, "cannot import token: %s", sqlite3_errmsg(store_db()));
    *added = 1;
    return 0;
}
