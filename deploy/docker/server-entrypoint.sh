#!/bin/sh
# server-entrypoint.sh — what the loranull-server image runs (and what tests/deploy runs on a
# plain machine, with the paths below overridden through the environment).
#
# Turns environment variables into loranull-server flags, reads secrets from files (never from
# the environment, so they do not show in `kubectl describe` or /proc/<pid>/environ), and then
# execs the server so that it is PID 1 and receives SIGTERM itself (graceful stop).
#
#   server-entrypoint.sh                 start the server (the image's default)
#   server-entrypoint.sh healthcheck     exit 0 when /healthz answers 200 (Docker HEALTHCHECK)
#   server-entrypoint.sh keys|tokens VERB ...   `loranull-server keys|tokens VERB` against the
#                                        same database (admin tasks, e.g. keys create --project P)
#   server-entrypoint.sh -FLAGS ...      flags appended to the server's
#   server-entrypoint.sh OTHER ...       exec `loranull-server OTHER ...` as given
#
# Environment (defaults are the image's paths):
#   LORANULL_SERVER_BIN         /usr/local/bin/loranull-server
#   LORANULL_LISTEN             0.0.0.0:8080    public API, dashboard, /healthz, /readyz, /metrics
#   LORANULL_DATA_DIR           /var/lib/loranull   SQLite database and file blobs (a volume)
#   LORANULL_CONFIG             (unset)         optional --config FILE (the server's JSON config)
#   LORANULL_MIGRATIONS_DIR     (unset)         optional --migrations-dir (image: /usr/share/loranull/migrations)
#   LORANULL_STATIC_DIR         (unset)         optional --static-dir (image: /usr/share/loranull/static)
#   LORANULL_CHARTJS_DIR        (unset)         optional --chartjs-dir (default /usr/share/javascript/chart.js)
#   LORANULL_API_KEYS_FILE      /run/secrets/loranull/api-keys   optional; lines "PROJECT KEY"
#   LORANULL_WORKER_TOKEN_FILE  /run/secrets/loranull/worker-token  optional; one token
#   LORANULL_HEALTH_TIMEOUT     3               seconds, for `healthcheck`
set -eu

SERVER_BIN=${LORANULL_SERVER_BIN:-/usr/local/bin/loranull-server}
LISTEN=${LORANULL_LISTEN:-0.0.0.0:8080}
DATA_DIR=${LORANULL_DATA_DIR:-/var/lib/loranull}
CONFIG=${LORANULL_CONFIG:-}
MIGRATIONS_DIR=${LORANULL_MIGRATIONS_DIR:-}
STATIC_DIR=${LORANULL_STATIC_DIR:-}
CHARTJS_DIR=${LORANULL_CHARTJS_DIR:-}
API_KEYS_FILE=${LORANULL_API_KEYS_FILE:-/run/secrets/loranull/api-keys}
WORKER_TOKEN_FILE=${LORANULL_WORKER_TOKEN_FILE:-/run/secrets/loranull/worker-token}

die() {
    echo "server-entrypoint: $*" >&2
    exit 1
}

# The port of LISTEN (HOST:PORT, or [v6]:PORT); the health check always asks loopback.
listen_port() {
    port=${LISTEN##*:}
    case $port in
        '' | *[!0-9]*) die "LORANULL_LISTEN='$LISTEN' is not HOST:PORT" ;;
    esac
    echo "$port"
}

healthcheck() {
    port=$(listen_port)
    exec curl --fail --silent --show-error --max-time "${LORANULL_HEALTH_TIMEOUT:-3}" \
        -o /dev/null "http://127.0.0.1:$port/healthz"
}

# ---- secrets → database ----
# loranull-server has `keys create` / `tokens create`, which make random secrets; a Kubernetes
# Secret needs the reverse: a given secret made valid. Until the server offers that as a
# subcommand, this writes the same rows those commands write (schema: migrations/001_init.sql),
# with the sqlite3 shell, after `keys list` has created and migrated the database. Only the
# SHA-256 of a secret is stored, and secrets never appear on a command line (/proc/*/cmdline).
# Idempotent: a secret already known is left as it is — in particular a revoked key stays
# revoked even if it is still in the Secret.

DB="$DATA_DIR/loranull.db"

sha256_of() {
    printf '%s' "$1" | sha256sum | cut -d' ' -f1
}

# An id like the server's: PREFIX + 24 of [A-Za-z0-9].
new_id() {
    printf '%s%s' "$1" "$(LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 24)"
}

# Names as the server accepts them (auth.c valid_name): 1..64 of letters, digits and . _ -
valid_name() {
    case $1 in '' | *[!A-Za-z0-9._-]*) return 1 ;; esac
    [ ${#1} -le 64 ]
}

# A secret: 20..128 of letters, digits, _ and - (so it is safe in SQL and in a header).
valid_secret() {
    case $1 in *[!A-Za-z0-9_-]*) return 1 ;; esac
    [ ${#1} -ge 20 ] && [ ${#1} -le 128 ]
}

run_sql() {
    sqlite3 -batch -bail -cmd '.timeout 10000' "$DB" >/dev/null || die "writing secrets into $DB failed"
}

import_secrets() {
    have_keys=0
    [ -f "$API_KEYS_FILE" ] && have_keys=1
    [ -f "$WORKER_TOKEN_FILE" ] || [ $have_keys -eq 1 ] || return 0
    # Creates the database and applies the migrations, as the server would at start.
    # shellcheck disable=SC2086 # DB_FLAGS holds paths without blanks (checked below)
    "$SERVER_BIN" keys list $DB_FLAGS >/dev/null \
        || die "loranull-server refused its settings or could not open the database in $DATA_DIR (its message is above)"
    now=$(date +%s)
    sql="BEGIN IMMEDIATE;"
    n=0
    if [ $have_keys -eq 1 ]; then
        lineno=0
        while IFS= read -r line || [ -n "$line" ]; do
            lineno=$((lineno + 1))
            case $line in '' | '#'*) continue ;; esac
            # shellcheck disable=SC2086 # split "PROJECT KEY" on blanks on purpose
            set -- $line
            [ $# -eq 2 ] || die "$API_KEYS_FILE line $lineno: expected 'PROJECT KEY', got $# fields"
            valid_name "$1" || die "$API_KEYS_FILE line $lineno: project '$1' is not 1..64 of letters, digits and . _ -"
            valid_secret "$2" || die "$API_KEYS_FILE line $lineno: the key is not 20..128 of letters, digits, _ and -"
            hash=$(sha256_of "$2")
            prefix=$(printf '%s' "$2" | cut -c1-10)
            sql="$sql
INSERT INTO projects(id,name,created_at) SELECT '$(new_id proj_)','$1',$now
  WHERE NOT EXISTS (SELECT 1 FROM projects WHERE name='$1');
INSERT INTO api_keys(id,project_id,key_hash,prefix,created_at)
  SELECT '$(new_id key_)',(SELECT id FROM projects WHERE name='$1'),'$hash','$prefix',$now
  WHERE NOT EXISTS (SELECT 1 FROM api_keys WHERE key_hash='$hash');"
            n=$((n + 1))
        done <"$API_KEYS_FILE"
    fi
    if [ -f "$WORKER_TOKEN_FILE" ]; then
        token=$(cat "$WORKER_TOKEN_FILE")
        valid_secret "$token" || die "$WORKER_TOKEN_FILE: the token is not 20..128 of letters, digits, _ and -"
        name=${LORANULL_WORKER_TOKEN_NAME:-k8s-secret}
        valid_name "$name" || die "LORANULL_WORKER_TOKEN_NAME='$name' is not 1..64 of letters, digits and . _ -"
        hash=$(sha256_of "$token")
        sql="$sql
INSERT INTO worker_tokens(id,name,token_hash,created_at) SELECT '$(new_id wtok_)','$name','$hash',$now
  WHERE NOT EXISTS (SELECT 1 FROM worker_tokens WHERE token_hash='$hash');"
    fi
    printf '%s\nCOMMIT;\n' "$sql" | run_sql
    echo "server-entrypoint: secrets imported: $n API key(s)$([ -f "$WORKER_TOKEN_FILE" ] && echo ', 1 worker token')" >&2
}

[ -x "$SERVER_BIN" ] || die "$SERVER_BIN is not an executable (set LORANULL_SERVER_BIN)"

# Flags that locate the database, shared by the server, its keys/tokens subcommands and the
# `keys list` that migrates the database before secrets are imported.
for path in "$DATA_DIR" "$MIGRATIONS_DIR" "$CONFIG"; do
    case $path in *[[:space:]]*) die "'$path': paths with blanks are not supported" ;; esac
done
DB_FLAGS="--data-dir $DATA_DIR"
[ -z "$MIGRATIONS_DIR" ] || DB_FLAGS="$DB_FLAGS --migrations-dir $MIGRATIONS_DIR"
[ -z "$CONFIG" ] || DB_FLAGS="$DB_FLAGS --config $CONFIG"

case ${1:-} in
    healthcheck) healthcheck ;;
    keys | tokens)
        # admin: `keys create --project NAME` etc. against this container's database
        [ $# -ge 2 ] || die "usage: $1 create|revoke|list ..."
        cmd=$1 verb=$2
        shift 2
        # shellcheck disable=SC2086
        exec "$SERVER_BIN" "$cmd" "$verb" $DB_FLAGS "$@"
        ;;
    '' | -*) ;;
    *) exec "$SERVER_BIN" "$@" ;;
esac

[ -d "$DATA_DIR" ] || mkdir -p "$DATA_DIR" 2>/dev/null \
    || die "data dir $DATA_DIR does not exist and cannot be created (mount a volume there)"
probe="$DATA_DIR/.entrypoint-write-test.$$"
( : >"$probe" ) 2>/dev/null || die "data dir $DATA_DIR is not writable by uid $(id -u)"
rm -f "$probe"

import_secrets

# shellcheck disable=SC2086
set -- --listen "$LISTEN" $DB_FLAGS "$@"
[ -z "$STATIC_DIR" ] || set -- "$@" --static-dir "$STATIC_DIR"
[ -z "$CHARTJS_DIR" ] || set -- "$@" --chartjs-dir "$CHARTJS_DIR"
echo "server-entrypoint: exec $SERVER_BIN $*" >&2
exec "$SERVER_BIN" "$@"
