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
# The checkout itself (the image's files, read-only in the pod). When it lives under /tmp (as a CI
# clone may), it is carried over the fresh /tmp read-only instead of disappearing under it.
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck disable=SC2016 # the inner script expands its own arguments
exec unshare --mount --propagation private sh -c '
    set -eu
    rw=$1
    repo=$2
    shift 2
    old_ifs=$IFS
    IFS=:
    for d in $rw; do mount --bind "$d" "$d"; done
    IFS=$old_ifs
    keep=0
    case "$repo" in /tmp/*) mount --bind /tmp /mnt; keep=1 ;; esac
    mount -t tmpfs -o size=256m,mode=1777 tmpfs /tmp
    if [ "$keep" = 1 ]; then
        mkdir -p "$repo"
        mount --bind "/mnt${repo#/tmp}" "$repo"
        umount /mnt
        mount -o remount,bind,ro "$repo"
    fi
    mount -o remount,bind,ro /
    exec setpriv --reuid 10001 --regid 10001 --clear-groups --no-new-privs \
        --inh-caps=-all --bounding-set=-all "$@"
' podlike "$rw" "$repo" "$@"
