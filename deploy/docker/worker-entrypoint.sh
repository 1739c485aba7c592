#!/bin/sh
# worker-entrypoint.sh — what the loranull-worker image runs (and what tests/deploy runs on a
# plain machine, with the paths below overridden through the environment).
#
# Turns environment variables into loranull-worker flags and execs the worker so that it is
# PID 1 and receives SIGTERM itself: on SIGTERM (a Kubernetes eviction) the worker checkpoints,
# reports and releases its lease, so the pod's terminationGracePeriodSeconds must cover one
# checkpoint upload.
#
#   worker-entrypoint.sh                 start the worker (the image's default)
#   worker-entrypoint.sh healthcheck     exit 0 while the worker process runs (Docker HEALTHCHECK)
#   worker-entrypoint.sh ARGS...         any other arguments: exec `loranull-worker ARGS`
#
# Environment (defaults are the image's paths):
#   LORANULL_WORKER_BIN     /usr/local/bin/loranull-worker
#   LORANULL_SERVER_URL     (required)  e.g. http://loranull-server:8080
#   LORANULL_TOKEN_FILE     /run/secrets/loranull/worker-token
#   LORANULL_MODELS_DIR     /models     HF model folders, read-only
#   LORANULL_DEVICE         cpu         cpu | cuda:N (first GPU this worker drives)
#   LORANULL_RANKS          (unset)     devices this worker drives, from LORANULL_DEVICE on
#   LORANULL_WORK_DIR       (unset)     --work-dir: downloads, checkpoints, exports (image: /var/lib/loranull-worker)
#   LORANULL_WORKER_NAME    (unset)     --name shown by the server (default: the host name = the pod name)
#   LORANULL_GRACE_S        (unset)     --grace-s: seconds from SIGTERM to checkpoint, report and release;
#                                       keep it below the pod's terminationGracePeriodSeconds
#   LORANULL_ADVERTISE_HOST (unset)     --advertise-host: where the other ranks of a job split over
#                                       workers reach this one (k8s: the pod IP, downward API)
#   LORANULL_COMM_PORTS     (unset)     --comm-ports LO-HI: the ports rank 0 listens on for them
#   LORANULL_TOKEN_WAIT     30          seconds to wait for the token file to appear
#   LORANULL_HEALTH_PID     1           the process `healthcheck` looks at
set -eu

WORKER_BIN=${LORANULL_WORKER_BIN:-/usr/local/bin/loranull-worker}
SERVER_URL=${LORANULL_SERVER_URL:-}
TOKEN_FILE=${LORANULL_TOKEN_FILE:-/run/secrets/loranull/worker-token}
MODELS_DIR=${LORANULL_MODELS_DIR:-/models}
DEVICE=${LORANULL_DEVICE:-cpu}
RANKS=${LORANULL_RANKS:-}
WORK_DIR=${LORANULL_WORK_DIR:-}
WORKER_NAME=${LORANULL_WORKER_NAME:-}
GRACE_S=${LORANULL_GRACE_S:-}
ADVERTISE_HOST=${LORANULL_ADVERTISE_HOST:-}
COMM_PORTS=${LORANULL_COMM_PORTS:-}

die() {
    echo "worker-entrypoint: $*" >&2
    exit 1
}

case ${1:-} in
    healthcheck)
        # In the image the worker is PID 1 (exec below). Healthy = running or sleeping; a
        # zombie, stopped or vanished worker is not. Deliberately not "the server answers":
        # a worker keeps training through a server outage, and restarting it then would lose work.
        pid=${LORANULL_HEALTH_PID:-1}
        state=$(awk '/^State:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
        case $state in
            R | S | D) exit 0 ;;
            *) echo "worker-entrypoint: worker (pid $pid) state '${state:-gone}'" >&2; exit 1 ;;
        esac
        ;;
    '' | -*) ;;
    *)
        [ -x "$WORKER_BIN" ] || die "$WORKER_BIN is not an executable (set LORANULL_WORKER_BIN)"
        exec "$WORKER_BIN" "$@"
        ;;
esac

[ -x "$WORKER_BIN" ] || die "$WORKER_BIN is not an executable (set LORANULL_WORKER_BIN)"
[ -n "$SERVER_URL" ] || die "LORANULL_SERVER_URL is not set (e.g. http://loranull-server:8080)"
case $SERVER_URL in
    http://* | https://*) ;;
    *) die "LORANULL_SERVER_URL='$SERVER_URL' is not an http:// or https:// URL" ;;
esac
case $DEVICE in
    cpu | cuda:[0-9] | cuda:[0-9][0-9]) ;;
    *) die "LORANULL_DEVICE='$DEVICE' is not cpu or cuda:N" ;;
esac
case $RANKS in
    '') ;;
    *[!0-9]* | 0) die "LORANULL_RANKS='$RANKS' is not a positive integer" ;;
esac
case $GRACE_S in
    '') ;;
    *[!0-9]*) die "LORANULL_GRACE_S='$GRACE_S' is not a whole number of seconds" ;;
esac
case $COMM_PORTS in
    '') ;;
    *[!0-9-]* | -* | *- | *-*-*) die "LORANULL_COMM_PORTS='$COMM_PORTS' is not a port range LO-HI" ;;
esac
[ -d "$MODELS_DIR" ] || die "models dir $MODELS_DIR does not exist (mount the models volume there)"

# A Secret volume can appear a moment after the container starts; wait a little, then fail
# loudly rather than start a worker that every request would reject.
waited=0
while [ ! -s "$TOKEN_FILE" ]; do
    [ "$waited" -lt "${LORANULL_TOKEN_WAIT:-30}" ] \
        || die "worker token file $TOKEN_FILE is missing or empty after ${waited}s"
    sleep 1
    waited=$((waited + 1))
done

set -- --server "$SERVER_URL" --token-file "$TOKEN_FILE" --models "$MODELS_DIR" \
    --device "$DEVICE" "$@"
[ -z "$RANKS" ] || set -- "$@" --ranks "$RANKS"
[ -z "$WORK_DIR" ] || set -- "$@" --work-dir "$WORK_DIR"
[ -z "$WORKER_NAME" ] || set -- "$@" --name "$WORKER_NAME"
[ -z "$GRACE_S" ] || set -- "$@" --grace-s "$GRACE_S"
[ -z "$ADVERTISE_HOST" ] || set -- "$@" --advertise-host "$ADVERTISE_HOST"
[ -z "$COMM_PORTS" ] || set -- "$@" --comm-ports "$COMM_PORTS"
echo "worker-entrypoint: exec $WORKER_BIN $*" >&2
exec "$WORKER_BIN" "$@"
