#!/bin/bash
# rxe-up.sh [NETDEV]
#
# Creates a Soft-RoCE (rdma_rxe) device on an ordinary Linux host whose
# kernel has the rdma_rxe module (CONFIG_RDMA_RXE=m, e.g. Debian's kernels):
#   1. loads the crc32 crypto module first (rdma_rxe needs it, otherwise
#      `rdma link add` fails with "No such file or directory" and dmesg says
#      "failed to init crc32 algorithm"), then rdma_rxe,
#   2. creates $RXE_NAME (default rxe0) on NETDEV; default NETDEV: the netdev
#      of the default route, or, if there is none, a dummy netdev
#      ($RXE_DUMMY, default rxedummy0, 10.9.0.1/24) created here,
#   3. waits until its port is ACTIVE, warns when `ulimit -l` is too small
#      for pinning memory, and prints ibv_devinfo.
# Undo with rxe-down.sh. Needs root. On a kernel without rdma_rxe (e.g. this
# project's build machines) use in-guest.sh instead.
set -euo pipefail

RXE_NAME=${RXE_NAME:-rxe0}
RXE_DUMMY=${RXE_DUMMY:-rxedummy0}
STATE_DIR=/run/gallocy-rxe          # remembers a dummy netdev we created
NETDEV=${1:-}

say() { echo "rxe-up: $*" >&2; }
die() { say "error: $*"; exit 1; }
need() {  # need TOOL DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found; install the Debian package '$2' (apt-get install $2)"
}

[[ $(id -u) -eq 0 ]] || die "must run as root (loads modules, creates devices)"
need ip iproute2
need rdma iproute2
need ibv_devinfo ibverbs-utils
ls /usr/lib/*/libibverbs/librxe-* >/dev/null 2>&1 || ls /usr/lib/libibverbs/librxe-* >/dev/null 2>&1 \
    || die "the rxe verbs provider (librxe) is missing; install the Debian packages 'rdma-core' and 'ibverbs-providers'"

# --- 1. modules -------------------------------------------------------------
have_module() { [[ -d /sys/module/$1 ]]; }

# Fail early, with the way out, when this kernel has no rdma_rxe at all.
if ! have_module rdma_rxe &&
   ! find "/lib/modules/$(uname -r)" -name 'rdma_rxe.ko*' 2>/dev/null | grep -q .; then
    die "kernel $(uname -r) has no rdma_rxe module (CONFIG_RDMA_RXE unset or modules not installed).
       Run the tests in a QEMU guest instead: soft-roce-setup/in-guest.sh -- COMMAND"
fi
crc32_loaded() { grep -Eq '^name *: crc32$' /proc/crypto 2>/dev/null; }

if ! crc32_loaded; then
    need modprobe kmod
    # Module name differs between kernels; try the generic one, then others.
    modprobe crc32_generic 2>/dev/null || modprobe crc32-generic 2>/dev/null \
        || modprobe crc32 2>/dev/null || modprobe crc32_pclmul 2>/dev/null || true
    crc32_loaded || say "warning: no 'crc32' crypto algorithm in /proc/crypto; rdma_rxe may fail to init"
fi
if ! have_module rdma_rxe; then
    need modprobe kmod
    modprobe rdma_rxe 2>/dev/null || die "cannot load kernel module rdma_rxe for kernel $(uname -r)
       (needs CONFIG_RDMA_RXE; check: grep RDMA_RXE /boot/config-\$(uname -r)).
       Without it, run tests in a QEMU guest: soft-roce-setup/in-guest.sh -- COMMAND"
fi
# Userspace verbs need /dev/infiniband/uverbs*; ib_uverbs is usually pulled
# in by rdma_rxe, load it explicitly to be sure. rdma_ucm is for rdma_cm users.
have_module ib_uverbs || modprobe ib_uverbs 2>/dev/null || say "warning: could not load ib_uverbs"
have_module rdma_ucm || modprobe rdma_ucm 2>/dev/null || say "warning: could not load rdma_ucm (only rdma_cm users need it)"

# --- 2. netdev + rxe device -------------------------------------------------
if rdma link show "$RXE_NAME/1" >/dev/null 2>&1; then
    # Already there (e.g. in-guest.sh's rxe0): keep it, report its netdev.
    NETDEV=$(rdma link show "$RXE_NAME/1" | awk '{ for (i = 1; i < NF; i++) if ($i == "netdev") print $(i + 1) }')
    say "$RXE_NAME already exists (netdev ${NETDEV:-?}); leaving it as it is"
    EXISTS=1
else
    EXISTS=0
fi
if (( ! EXISTS )) && [[ -z $NETDEV ]]; then
    NETDEV=$(ip -o route show default 2>/dev/null \
             | awk '{ for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit } }')
fi
if (( ! EXISTS )) && [[ -z $NETDEV ]]; then
    NETDEV=$RXE_DUMMY
    if ! ip link show "$NETDEV" >/dev/null 2>&1; then
        say "no default route; creating dummy netdev $NETDEV (10.9.0.1/24)"
        ip link add "$NETDEV" type dummy || die "cannot create a dummy netdev (kernel module 'dummy' missing?)"
        ip addr add 10.9.0.1/24 dev "$NETDEV"
        mkdir -p "$STATE_DIR"
        echo "$NETDEV" > "$STATE_DIR/dummy"
    fi
    ip link set "$NETDEV" up
fi
(( EXISTS )) || ip link show "$NETDEV" >/dev/null 2>&1 || die "netdev '$NETDEV' does not exist"

if (( ! EXISTS )); then
    rdma link add "$RXE_NAME" type rxe netdev "$NETDEV" \
        || die "rdma link add $RXE_NAME type rxe netdev $NETDEV failed (dmesg may say why; 'failed to init crc32 algorithm' means the crc32 module is missing)"
fi

# Wait (max ~10 s) for the port to become ACTIVE.
state=
for _ in $(seq 100); do
    state=$(cat "/sys/class/infiniband/$RXE_NAME/ports/1/state" 2>/dev/null || true)
    [[ $state == *ACTIVE* ]] && break
    sleep 0.1
done
[[ $state == *ACTIVE* ]] || say "warning: $RXE_NAME port state is '${state:-unknown}', not ACTIVE (is $NETDEV up?)"

# --- 3. memlock limit + summary ---------------------------------------------
# Memory regions are pinned; with a small RLIMIT_MEMLOCK ibv_reg_mr fails
# (ENOMEM) for non-root users. Debian's default is 8 MiB.
memlock=$(ulimit -l)
if [[ $memlock != unlimited ]]; then
    if (( memlock < 65536 )); then
        say "warning: 'ulimit -l' is $memlock KiB: too small to pin real buffers; raise it (ulimit -l unlimited, or memlock in /etc/security/limits.conf)"
    else
        say "note: 'ulimit -l' is $memlock KiB, not unlimited; registrations beyond that fail for non-root users"
    fi
fi

say "$RXE_NAME is on netdev $NETDEV"
ibv_devinfo -d "$RXE_NAME"
