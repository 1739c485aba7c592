/* auth.h — API keys (per project) and worker tokens.
 *
 * A key is "sk-ln-" + 24 random [A-Za-z0-9] (142 bits); a worker token is "wt-ln-" + 24. Only their
 * SHA-256 is stored; the secret is printed once, at creation, by the server's subcommands:
 *   loranull-server keys create --project NAME      keys revoke KEY_ID|KEY    keys list
 *   loranull-server tokens create --name NAME       tokens revoke TOKEN_ID|TOKEN   tokens list
 *   loranull-server keys import  (stdin: "PROJECT KEY" lines)   tokens import --name NAME (stdin: token)
 * API keys reach /v1 only; worker tokens reach /internal/v1 only. */
#ifndef LN_AUTH_H
#define LN_AUTH_H

#include "common/err.h"

/* 0 and the key's project id, or -1 when the key is unknown or revoked. */
int auth_check_key(const char *key, char project_id[40]);
/* 0 and the token's id, or -1. */
int auth_check_worker_token(const char *token, char token_id[40]);

/* Creates the project when new; writes the key (shown once) and its id. */
int auth_key_create(const char *project, char key[64], char key_id[40], char project_id[40], ln_err *e);
/* Revokes by key id or by the key itself. */
int auth_key_revoke(const char *id_or_key, ln_err *e);
int auth_token_create(const char *name, char token[64], char token_id[40], ln_err *e);
int auth_token_revoke(const char *id_or_token, ln_err *e);
/* Make a given secret valid (Kubernetes Secrets hold the secret; the server must accept it).
 * Idempotent: a secret already known (even revoked — it stays revoked) is left alone, *added = 0.
 * Secrets are 20..128 of [A-Za-z0-9_-]. Subcommands read them from stdin, never from argv:
 *   loranull-server keys import    < lines "PROJECT KEY"
 *   loranull-server tokens import --name NAME  < one token */
int auth_key_import(const char *project, const char *key, int *added, ln_err *e);
int auth_token_import(const char *name, const char *token, int *added, ln_err *e);
/* Prints keys (or tokens) one per line to stdout: id, owner, prefix, created, revoked. */
int auth_list(int tokens, ln_err *e);

#endif
