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
#   server-entrypoint.sh keys ...        any other arguments: run `loranull-server ARGS`
#                                        against the same data dir (admin tasks, e.g. keys create)
#
# Environment (defaults are the image's paths):
#   LORANULL_SERVER_BIN         /usr/local/bin/loranull-server
#   LORANULL_LISTEN             0.0.0.0:8080    public API, dashboard, /healthz, /readyz, /metrics
#   LORANULL_DATA_DIR           /var/lib/loranull   SQLite database and file blobs (a volume)
#   LORANULL_CONFIG             (unset)         optional --config FILE
#   LORANULL_API_KEYS_FILE      /run/secrets/loranull/api-keys   optional; lines "PROJECT KEY"
#   LORANULL_WORKER_TOKEN_FILE  /run/secrets/loranull/worker-token  optional; one token
#   LORANULL_HEALTH_TIMEOUT     3               seconds, for `healthcheck`
set -eu

SERVER_BIN=${LORANULL_SERVER_BIN:-/usr/local/bin/loranull-server}
LISTEN=${LORANULL_LISTEN:-0.0.0.0:8080}
DATA_DIR=${LORANULL_DATA_DIR:-/var/lib/loranull}
CONFIG=${LORANULL_CONFIG:-}
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

# Registers the API keys of the secret file: one "PROJECT KEY" pair a line, '#' comments and
# blank lines ignored. Importing is idempotent on the server side (a key already known is kept),
# so a restart or a rotated Secret re-runs this safely.
import_api_keys() {
    [ -f "$API_KEYS_FILE" ] || return 0
    n=0
    lineno=0
    while IFS= read -r line || [ -n "$line" ]; do
        lineno=$((lineno + 1))
        case $line in '' | '#'*) continue ;; esac
        # shellcheck disable=SC2086 # split "PROJECT KEY" on blanks on purpose
        set -- $line
        [ $# -eq 2 ] || die "$API_KEYS_FILE line $lineno: expected 'PROJECT KEY', got $# fields"
        printf '%s\n' "$2" | "$SERVER_BIN" keys import --data-dir "$DATA_DIR" \
            --project "$1" --key-file - >/dev/null \
            || die "$API_KEYS_FILE line $lineno: importing the key of project '$1' failed"
        n=$((n + 1))
    done <"$API_KEYS_FILE"
    echo "server-entrypoint: $n API key(s) from $API_KEYS_FILE" >&2
}

import_worker_token() {
    [ -f "$WORKER_TOKEN_FILE" ] || return 0
    [ -s "$WORKER_TOKEN_FILE" ] || die "$WORKER_TOKEN_FILE is empty"
    "$SERVER_BIN" workers import --data-dir "$DATA_DIR" --name "${LORANULL_WORKER_TOKEN_NAME:-k8s}" \
        --token-file "$WORKER_TOKEN_FILE" >/dev/null \
        || die "importing the worker token from $WORKER_TOKEN_FILE failed"
    echo "server-entrypoint: worker token from $WORKER_TOKEN_FILE" >&2
}

[ -x "$SERVER_BIN" ] || die "$SERVER_BIN is not an executable (set LORANULL_SERVER_BIN)"

case ${1:-} in
    healthcheck) healthcheck ;;
    '' | -*) ;;
    *) exec "$SERVER_BIN" "$@" ;;
esac

[ -d "$DATA_DIR" ] || mkdir -p "$DATA_DIR" 2>/dev/null \
    || die "data dir $DATA_DIR does not exist and cannot be created (mount a volume there)"
probe="$DATA_DIR/.entrypoint-write-test.$$"
( : >"$probe" ) 2>/dev/null || die "data dir $DATA_DIR is not writable by uid $(id -u)"
rm -f "$probe"

import_api_keys
import_worker_token

set -- --listen "$LISTEN" --data-dir "$DATA_DIR" "$@"
[ -z "$CONFIG" ] || set -- "$@" --config "$CONFIG"
echo "server-entrypoint: exec $SERVER_BIN $*" >&2
exec "$SERVER_BIN" "$@"
