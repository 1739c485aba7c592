#!/bin/sh
# podlike.sh RW_DIRS -- CMD ARGS...
#
# Runs CMD the way the pods' securityContext runs the images' entrypoints, on a plain machine
# (root needed, to set it up): a private mount namespace in which the root filesystem is
# read-only (readOnlyRootFilesystem), /tmp is a fresh tmpfs (the emptyDir), only the
# colon-separated RW_DIRS stay writable (the volumes), and CMD runs as uid/gid 10001
# (runAsUser/runAsGroup) with no capabilities (drop: ALL) and no_new_privs
# (allowPrivilegeEscalation: false). Everything is exec'd, so CMD keeps this process's pid and
# receives its signals (SIGTERM as the kubelet sends it).
set -eu
if [ "$#" -lt 3 ] || [ "$2" != "--" ]; then
    echo "usage: podlike.sh RW_DIRS -- CMD ARGS..." >&2
    exit 2
fi
rw=$1
shift 2
# shellcheck disable=SC2016 # the inner script expands its own arguments
exec unshare --mount --propagation private sh -c '
    set -eu
    rw=$1
    shift
    old_ifs=$IFS
    IFS=:
    for d in $rw; do mount --bind "$d" "$d"; done
    IFS=$old_ifs
    mount -t tmpfs -o size=256m,mode=1777 tmpfs /tmp
    mount -o remount,bind,ro /
    exec setpriv --reuid 10001 --regid 10001 --clear-groups --no-new-privs \
        --inh-caps=-all --bounding-set=-all "$@"
' podlike "$rw" "$@"
