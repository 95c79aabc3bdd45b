#!/bin/bash
# Second stage inside the QEMU guest started by in-guest.sh (run by the
# initramfs /init through chroot into the host root overlay, so it uses the
# host's bash, ip, rdma and ibv_* tools). Not meant to be run on the host.
#
# Usage: guest-run.sh RUN_DIR
#   RUN_DIR/guest.conf  GUEST_CWD, GUEST_MTU (sourced)
#   RUN_DIR/cmd.sh      the user's command (cd + env + exec), written by in-guest.sh
#
# Brings up lo and dummy0 (10.9.0.1/24, guest-only), creates rxe0 on dummy0,
# waits for PORT_ACTIVE, then runs cmd.sh. Its exit code is the command's;
# on a setup failure it exits 125 and leaves /run/gallocy-setup-failed.
set -euo pipefail

RUN_DIR=$1
# shellcheck source=/dev/null
. "$RUN_DIR/guest.conf"

setup_failed() {
    echo "in-guest: setup failed: $*" >&2
    echo "in-guest: --- guest dmesg (tail) ---" >&2
    dmesg 2>/dev/null | tail -n 30 >&2 || true
    echo "$*" > /run/gallocy-setup-failed
    exit 125
}

ip link set lo up
# Loading the dummy module usually creates dummy0 already (numdummies=1).
ip link show dummy0 >/dev/null 2>&1 || ip link add dummy0 type dummy \
    || setup_failed "ip link add dummy0 type dummy"
ip link set dummy0 mtu "${GUEST_MTU:-1500}"
ip addr add 10.9.0.1/24 dev dummy0
ip link set dummy0 up

rdma link add rxe0 type rxe netdev dummy0 || setup_failed "rdma link add rxe0 type rxe netdev dummy0"

# Wait (max ~10 s) until the port is ACTIVE and the IPv4-mapped GID exists.
for _ in $(seq 100); do
    state=$(cat /sys/class/infiniband/rxe0/ports/1/state 2>/dev/null || true)
    gid1=$(cat /sys/class/infiniband/rxe0/ports/1/gids/1 2>/dev/null || true)
    if [[ $state == *ACTIVE* && -n $gid1 && $gid1 != 0000:0000:0000:0000:0000:0000:0000:0000 ]]; then
        break
    fi
    sleep 0.1
done
[[ ${state:-} == *ACTIVE* ]] || setup_failed "rxe0 port not ACTIVE (state: ${state:-none})"

# Memory registration pins pages: no limit inside the throw-away guest.
ulimit -l unlimited

# Hand over to the user's command (cmd.sh does cd + exports + exec).
set +e
bash "$RUN_DIR/cmd.sh"
exit $?
