#!/bin/bash
# rxe-down.sh [--unload]
#
# Undoes rxe-up.sh: deletes the Soft-RoCE device $RXE_NAME (default rxe0),
# deletes the dummy netdev if rxe-up.sh created one, and with --unload also
# unloads the rdma_rxe module. Needs root. Safe to run more than once.
set -euo pipefail

RXE_NAME=${RXE_NAME:-rxe0}
STATE_DIR=/run/gallocy-rxe
UNLOAD=0
case ${1:-} in
    --unload) UNLOAD=1 ;;
    "") ;;
    *) echo "usage: $0 [--unload]" >&2; exit 2 ;;
esac

say() { echo "rxe-down: $*" >&2; }
die() { say "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"
command -v rdma >/dev/null 2>&1 || die "'rdma' not found; install the Debian package 'iproute2'"

if rdma link show "$RXE_NAME/1" >/dev/null 2>&1; then
    rdma link delete "$RXE_NAME" || die "rdma link delete $RXE_NAME failed (still in use by a process?)"
    say "deleted $RXE_NAME"
else
    say "$RXE_NAME does not exist"
fi

if [[ -r $STATE_DIR/dummy ]]; then
    dummy=$(cat "$STATE_DIR/dummy")
    ip link delete "$dummy" 2>/dev/null && say "deleted dummy netdev $dummy" || true
    rm -f "$STATE_DIR/dummy"
fi

if (( UNLOAD )) && [[ -d /sys/module/rdma_rxe ]]; then
    command -v modprobe >/dev/null 2>&1 || die "'modprobe' not found; install the Debian package 'kmod'"
    modprobe -r rdma_rxe && say "unloaded rdma_rxe" || die "cannot unload rdma_rxe (another rxe device still exists?)"
fi
