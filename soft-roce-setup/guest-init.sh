#!/bin/busybox sh
# PID 1 of the throw-away QEMU guest started by in-guest.sh.
#
# This file is copied into the busybox initramfs (as /init); it is not meant
# to be run on the host. It:
#   1. loads the kernel modules listed in /modules.load (virtio, 9p, overlay,
#      dummy, crc32, rxe ...) in dependency order,
#   2. mounts the host root (9p tag "hostroot", read-only) under a tmpfs
#      overlay at /newroot and the host working directory (9p tag "hostcwd",
#      read-write) at the same path inside it,
#   3. chroots into /newroot and runs guest-run.sh (host userland: bash, ip,
#      rdma, ibv_devinfo ...), which brings up rxe0 and runs the command,
#   4. writes the exit code to the virtio serial port named "rc" and powers
#      the guest off.
# Kernel messages go to the UART (ttyS0), which in-guest.sh logs to a file.

/bin/busybox mkdir -p /bin /sbin /proc /sys /dev /tmp /newroot /mnt/lower /mnt/rw
/bin/busybox --install -s /bin
export PATH=/bin:/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

log() { echo "gallocy-init: $*" > /dev/kmsg; }

# die MESSAGE: report a setup failure (rc 125 + message) and power off.
die() {
    log "FATAL: $*"
    rcport=$(find_port rc)
    [ -n "$rcport" ] && echo "setup-failed: $*" > "$rcport"
    sync
    poweroff -f
}

# find_port NAME: print /dev/vportXpY for the virtio serial port called NAME.
find_port() {
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] || continue
        if [ "$(cat "$p/name")" = "$1" ]; then
            echo "/dev/${p##*/}"
            return 0
        fi
    done
}

# 1. Modules, in the order computed on the host from the modules' "depends=".
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m" 2>/dev/null || log "insmod $m failed (built-in or already loaded?)"
done < /modules.load

# 2. Find the run directory (on the host root) from the kernel command line.
RUN_DIR=
for arg in $(cat /proc/cmdline); do
    case "$arg" in gallocy.run=*) RUN_DIR="${arg#gallocy.run=}" ;; esac
done

# The virtio ports show up asynchronously after virtio_console loaded.
i=0
while [ -z "$(find_port rc)" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done

# 9p msize: bigger is faster (fewer round trips through the emulated device).
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /mnt/lower \
    || die "cannot mount host root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /newroot \
    || die "cannot mount overlayfs over the host root"

[ -n "$RUN_DIR" ] && [ -r "/mnt/lower$RUN_DIR/guest.conf" ] || die "no run directory ($RUN_DIR)"
# Defines GUEST_CWD, GUEST_RUN (/run/gallocy/guest-run.sh), GUEST_MTU.
. "/mnt/lower$RUN_DIR/guest.conf"

# The guest's own /proc, /sys, /dev, /tmp, /run instead of the host's.
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
# cgroup v1 hierarchies, as this project's machines have them: slurmd's cgroup plugin will not start without
# (alloc-shim/tests/slurm.rs runs a one-node Slurm).
if mount -t tmpfs -o mode=0755 cgroup /newroot/sys/fs/cgroup 2>/dev/null; then
    for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
        mkdir -p "/newroot/sys/fs/cgroup/$c"
        mount -t cgroup -o "$c" cgroup "/newroot/sys/fs/cgroup/$c" 2>/dev/null || rmdir "/newroot/sys/fs/cgroup/$c"
    done
    # The named hierarchy systemd keeps (slurmd's cgroup/v1 plugin looks for it).
    mkdir -p /newroot/sys/fs/cgroup/systemd
    mount -t cgroup -o none,name=systemd cgroup /newroot/sys/fs/cgroup/systemd 2>/dev/null \
        || rmdir /newroot/sys/fs/cgroup/systemd
fi
mount -t devtmpfs devtmpfs /newroot/dev
# What udev or systemd would add: bash's process substitution needs /dev/fd.
ln -sf /proc/self/fd /newroot/dev/fd
ln -sf /proc/self/fd/0 /newroot/dev/stdin
ln -sf /proc/self/fd/1 /newroot/dev/stdout
ln -sf /proc/self/fd/2 /newroot/dev/stderr
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mount -t tmpfs tmpfs /newroot/var/tmp 2>/dev/null || true

# The host working directory, read-write, at the same path (mounted after
# the tmpfs mounts above so a directory under /tmp works too).
mkdir -p "/newroot$GUEST_CWD"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap hostcwd "/newroot$GUEST_CWD" \
    || die "cannot mount host working directory $GUEST_CWD over 9p"

# The run directory usually lives in the host's /tmp, now hidden by the
# guest's tmpfs: copy its input files to /run/gallocy.
mkdir -p /newroot/run/gallocy
cp "/mnt/lower$RUN_DIR/guest.conf" "/mnt/lower$RUN_DIR/cmd.sh" "/mnt/lower$RUN_DIR/guest-run.sh" \
    /newroot/run/gallocy/ \
    || die "cannot copy the run files from $RUN_DIR"

OUT=$(find_port out)
RCP=$(find_port rc)
[ -n "$OUT" ] && [ -n "$RCP" ] || die "virtio serial ports 'out'/'rc' not found"

# 3. Run rxe bring-up + the command with the host's userland.
log "running $GUEST_RUN"
chroot /newroot /bin/bash "$GUEST_RUN" /run/gallocy > "$OUT" 2>&1 < /dev/null
rc=$?
log "command exited with $rc"

# 4. Report and power off (qemu runs with -no-reboot).
if [ -e /newroot/run/gallocy-setup-failed ]; then
    echo "setup-failed: $(cat /newroot/run/gallocy-setup-failed)" > "$RCP"
else
    echo "$rc" > "$RCP"
fi
sync
poweroff -f
