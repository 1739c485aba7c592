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
#   LORANULL_INTERNAL_LISTEN    (unset)         --internal-listen: the workers' /internal/v1 only
#                                               there (and 404 on LORANULL_LISTEN); unset = one port
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
INTERNAL_LISTEN=${LORANULL_INTERNAL_LISTEN:-}
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
# `loranull-server keys import` / `tokens import` make given secrets valid (they store only
# the SHA-256) and read them from stdin, so secrets never appear on a command line
# (/proc/*/cmdline). Importing is idempotent: a secret already known is left as it is — in
# particular a revoked key stays revoked even if it is still in the Secret. The server checks
# every line; its "stdin line N" is line N of the file named after it.

import_secrets() {
    [ -f "$API_KEYS_FILE" ] || [ -f "$WORKER_TOKEN_FILE" ] || return 0
    # First open (create, migrate) the database with the server's settings on their own, so a
    # bad config or data dir is reported as that and not as a bad secret file.
    # shellcheck disable=SC2086 # DB_FLAGS holds paths without blanks (checked below)
    "$SERVER_BIN" keys list $DB_FLAGS >/dev/null \
        || die "loranull-server refused its settings or could not open the database in $DATA_DIR (its message is above)"
    if [ -f "$API_KEYS_FILE" ]; then
        # shellcheck disable=SC2086 # DB_FLAGS holds paths without blanks (checked below)
        "$SERVER_BIN" keys import $DB_FLAGS <"$API_KEYS_FILE" \
            || die "$API_KEYS_FILE: not imported (the server's reason is above; its stdin line is this file's line)"
    fi
    if [ -f "$WORKER_TOKEN_FILE" ]; then
        [ -s "$WORKER_TOKEN_FILE" ] || die "$WORKER_TOKEN_FILE is empty"
        # shellcheck disable=SC2086
        "$SERVER_BIN" tokens import --name "${LORANULL_WORKER_TOKEN_NAME:-k8s-secret}" $DB_FLAGS \
            <"$WORKER_TOKEN_FILE" \
            || die "$WORKER_TOKEN_FILE: not imported (the server's reason is above)"
    fi
}

[ -x "$SERVER_BIN" ] || die "$SERVER_BIN is not an executable (set LORANULL_SERVER_BIN)"

# Flags that locate the database, shared by the server, its keys/tokens subcommands and the
# imports that create and migrate the database before the server starts.
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

case $INTERNAL_LISTEN in
    '' | *:[0-9]*) ;;
    *) die "LORANULL_INTERNAL_LISTEN='$INTERNAL_LISTEN' is not HOST:PORT" ;;
esac

# shellcheck disable=SC2086
set -- --listen "$LISTEN" $DB_FLAGS "$@"
[ -z "$INTERNAL_LISTEN" ] || set -- "$@" --internal-listen "$INTERNAL_LISTEN"
[ -z "$STATIC_DIR" ] || set -- "$@" --static-dir "$STATIC_DIR"
[ -z "$CHARTJS_DIR" ] || set -- "$@" --chartjs-dir "$CHARTJS_DIR"
echo "server-entrypoint: exec $SERVER_BIN $*" >&2
exec "$SERVER_BIN" "$@"
