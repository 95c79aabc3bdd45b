#!/bin/bash
# in-guest.sh [--timeout SECONDS] [--mtu MTU] -- COMMAND [ARGS...]
#
# Runs COMMAND inside a throw-away QEMU guest (TCG, no KVM needed) that boots
# Debian's own kernel (where rdma_rxe exists), with a Soft-RoCE device rxe0
# on a guest-only dummy netdev dummy0 (10.9.0.1/24) already PORT_ACTIVE.
#
# The guest sees the host's root file system read-only (9p + a tmpfs overlay,
# so writes outside the working directory are thrown away) and the current
# working directory read-write at the same path, so binaries built on the
# host run unchanged. COMMAND runs as root in the current directory with
# stdin from /dev/null; its stdout+stderr (merged) are streamed back and the
# script exits with COMMAND's exit code.
#
# Exit codes: COMMAND's own; 124 on timeout; 125 when the guest or the rxe
# setup failed (the guest kernel log tail is printed then).
#
# First run: downloads (apt-get download, no install) qemu-system-x86, its
# firmware and missing libraries, busybox-static and Debian's linux-image
# into ${GALLOCY_QEMU_CACHE:-$HOME/.cache/gallocy-qemu} and builds an
# initramfs there. Later runs reuse the cache.
#
# Environment:
#   GALLOCY_QEMU_CACHE  cache directory (default ~/.cache/gallocy-qemu, or
#                       ~/.cache/gallocy-qemu-HASH with GALLOCY_QEMU_KERNEL_DEB)
#   GALLOCY_QEMU_KERNEL_DEB  URL or path of a Debian kernel package to boot
#                       instead of linux-image-amd64 (e.g. a newer one from
#                       trixie-backports; modules may be .ko or .ko.xz)
#   GALLOCY_QEMU_MEM    guest memory in MiB (default 2048)
#   GALLOCY_QEMU_CPUS   guest vCPUs (default 2)
#   GALLOCY_QEMU_KEEP=1 keep the run directory (logs) even on success
#   COMMAND's environment: PATH, HOME, LANG, TERM, RUST_*, CARGO_*, GALLOCY_*
#   are passed through; use `env VAR=value COMMAND` for anything else.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KERNEL_DEB=${GALLOCY_QEMU_KERNEL_DEB:-}
if [[ -n $KERNEL_DEB ]]; then
    CACHE=${GALLOCY_QEMU_CACHE:-$HOME/.cache/gallocy-qemu-$(printf '%s' "$KERNEL_DEB" | sha256sum | cut -c1-12)}
else
    CACHE=${GALLOCY_QEMU_CACHE:-$HOME/.cache/gallocy-qemu}
fi
MEM=${GALLOCY_QEMU_MEM:-2048}
CPUS=${GALLOCY_QEMU_CPUS:-2}
TIMEOUT=600
MTU=1500

usage() {
    sed -n '2,3p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --timeout) TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
        --mtu) MTU=${2:?--mtu needs a value}; shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        *) break ;;
    esac
done
[[ $# -gt 0 ]] || usage
[[ $TIMEOUT =~ ^[0-9]+$ ]] || { echo "in-guest: --timeout must be a number of seconds" >&2; exit 2; }

say() { echo "in-guest: $*" >&2; }
die() { say "error: $*"; exit 125; }

need() {  # need TOOL DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found; install the Debian package '$2'"
}

# ---------------------------------------------------------------------------
# Cache preparation (once; guarded by a lock so parallel runs do not race).
# ---------------------------------------------------------------------------

# Packages unpacked (dpkg-deb -x, never installed) into $CACHE/root.
# qemu-system-x86 is NOT installed with apt because on these machines that
# would remove the preinstalled (newer) qemu-utils. The lib* packages are the
# shared libraries qemu-system-x86_64 needs that a plain system lacks.
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu
           libcapstone4 libfdt1 libpmem1 libndctl6 libdaxctl1 libslirp0 libvdeplug2
           busybox-static)

# Guest kernel modules to load (their dependencies are added automatically).
GUEST_MODULES=(virtio_pci virtio_console 9pnet_virtio 9p overlay dummy
               rdma_rxe ib_uverbs rdma_ucm)
OPTIONAL_MODULES=(crc32_generic)

apt_download() {  # apt_download PKG... (into the current directory)
    if ! apt-get download "$@" >/dev/null 2>apt-download.err; then
        say "apt-get download failed; running apt-get update and retrying"
        apt-get update -qq >/dev/null 2>&1 || true
        apt-get download "$@" >/dev/null 2>apt-download.err \
            || { cat apt-download.err >&2; die "apt-get download $* failed"; }
    fi
}

# Decompress the kernel package's bzImage into an ELF vmlinux (booted via
# PVH, which is faster than letting the guest decompress it under TCG).
extract_vmlinux() {  # extract_vmlinux VMLINUZ OUT
    local in=$1 out=$2 off unpack=(xz -dc)
    # xz stream magic FD 37 7A 58 5A 00 (bookworm's CONFIG_KERNEL_XZ), else
    # zstd's 28 B5 2F FD (newer Debian kernels), if zstd is there.
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$in" | head -n1 | cut -d: -f1 || true)
    if [[ -z $off ]] && command -v zstd >/dev/null; then
        off=$(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$in" | head -n1 | cut -d: -f1 || true)
        unpack=(zstd -dcq)
    fi
    [[ -n $off ]] || return 1
    # The decompressor complains about the relocation data appended after the
    # stream; judge the result by its ELF header and program headers instead.
    tail -c +$((off + 1)) "$in" | "${unpack[@]}" > "$out.tmp" 2>/dev/null || true
    if command -v readelf >/dev/null && [[ $(head -c 4 "$out.tmp" | od -An -c | tr -d ' ') == '177ELF' ]] &&
       readelf -n "$out.tmp" 2>/dev/null | grep -q 'Unknown note type: (0x00000012)'; then
        mv "$out.tmp" "$out"   # has XEN_ELFNOTE_PHYS32_ENTRY: PVH-bootable
    else
        rm -f "$out.tmp"
        return 1
    fi
}

# mod_path NAME: path of NAME.ko (or NAME.ko.xz) under the extracted module tree ("-" == "_").
mod_path() {
    local n=${1//-/_}
    awk -v n="$n" '{ b=$0; sub(/.*\//, "", b); sub(/\.ko(\.xz)?$/, "", b); gsub(/-/, "_", b);
                     if (b == n) { print; exit } }' "$MODLIST"
}

# mod_cat PATH: the module's ELF, decompressed if it is .ko.xz.
mod_cat() {
    case $1 in *.xz) xz -dc "$1" ;; *) cat "$1" ;; esac
}

# The extracted kernel's module directory (lib/ or, merged-/usr packages, usr/lib/).
mod_dir() {  # mod_dir ROOT KVER
    local d
    for d in "$1/lib/modules/$2" "$1/usr/lib/modules/$2"; do
        [[ -d $d ]] && { echo "$d"; return 0; }
    done
    return 1
}

# add_module NAME: append NAME and (first) its dependencies to LOAD_ORDER.
declare -A SEEN=()
LOAD_ORDER=()
add_module() {
    local n=${1//-/_} p dep deps
    [[ -n ${SEEN[$n]:-} ]] && return 0
    SEEN[$n]=1
    p=$(mod_path "$n")
    [[ -n $p ]] || { grep -qw "$n" "$MODDIR/modules.builtin" 2>/dev/null && return 0
                     die "kernel module $n not found in linux-image-$KVER"; }
    deps=$(mod_cat "$p" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do add_module "$dep"; done
    LOAD_ORDER+=("$p")
}

prepare_cache() {
    # Two stamps: the unpacked packages ($CACHE/root) stay valid across edits
    # of guest-init.sh; the initramfs is rebuilt whenever that file changes.
    local stamp=$CACHE/ready-v1-$(cat "$SCRIPT_DIR/guest-init.sh" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)
    local unpacked=$CACHE/root/.unpacked-v1
    [[ -e $stamp ]] && return 0

    need apt-get apt
    need dpkg-deb dpkg
    need xz xz-utils
    need flock util-linux
    mkdir -p "$CACHE/debs"
    exec 9>"$CACHE/.lock"
    flock 9
    [[ -e $stamp ]] && { exec 9>&-; return 0; }
    cd "$CACHE/debs"
    if [[ ! -e $unpacked ]]; then
        say "preparing $CACHE (first run: downloads ~100 MB, takes a minute)"
        # The kernel: linux-image-amd64 is a metapackage depending on the
        # versioned package that holds vmlinuz and the modules.
        local kpkg
        kpkg=${GALLOCY_QEMU_KERNEL_PKG:-}
        if [[ -n $KERNEL_DEB ]]; then
            case $KERNEL_DEB in
                http://*|https://*) need curl curl
                                    curl -fsSL -o kernel.deb.tmp "$KERNEL_DEB" || die "cannot download $KERNEL_DEB" ;;
                *) cp "$KERNEL_DEB" kernel.deb.tmp || die "cannot read $KERNEL_DEB" ;;
            esac
            kpkg=$(dpkg-deb -f kernel.deb.tmp Package) || die "$KERNEL_DEB is not a Debian package"
            mv kernel.deb.tmp "${kpkg}_given.deb"
        elif [[ -z $kpkg ]]; then
            rm -f linux-image-amd64_*.deb
            apt_download linux-image-amd64
            kpkg=$(dpkg-deb -f linux-image-amd64_*.deb Depends | grep -o 'linux-image-[0-9][^ ,]*' | head -n1)
            [[ -n $kpkg ]] || die "cannot tell which kernel linux-image-amd64 depends on"
        fi
        ls "${kpkg}"_*.deb >/dev/null 2>&1 || apt_download "$kpkg"
        local missing=() p
        for p in "${QEMU_PKGS[@]}"; do
            ls "${p}"_*.deb >/dev/null 2>&1 || missing+=("$p")
        done
        [[ ${#missing[@]} -eq 0 ]] || apt_download "${missing[@]}"

        rm -rf "$CACHE/root"
        mkdir -p "$CACHE/root"
        for p in "${QEMU_PKGS[@]}" "$kpkg"; do
            dpkg-deb -x "$(ls "${p}"_*.deb | head -n1)" "$CACHE/root"
        done
        KVER=${kpkg#linux-image-}
        mod_dir "$CACHE/root" "$KVER" >/dev/null || die "no modules for $KVER in $kpkg"
        echo "$KVER" > "$CACHE/kernel-version"
        touch "$unpacked"
    fi
    cd "$CACHE"

    KROOT=$CACHE/root
    KVER=$(cat "$CACHE/kernel-version")
    say "building the guest kernel image and initramfs"

    # Kernel image: prefer a PVH-bootable ELF vmlinux, fall back to vmlinuz.
    if extract_vmlinux "$KROOT/boot/vmlinuz-$KVER" "$CACHE/vmlinux"; then
        echo "$CACHE/vmlinux" > "$CACHE/kernel-image"
    else
        say "could not decompress vmlinuz; booting the compressed image (slower)"
        echo "$KROOT/boot/vmlinuz-$KVER" > "$CACHE/kernel-image"
    fi

    # Initramfs: static busybox, our /init, the modules in load order.
    MODLIST=$CACHE/modules.list
    MODDIR=$(mod_dir "$KROOT" "$KVER")
    find "$MODDIR/kernel" -name '*.ko' -o -name '*.ko.xz' > "$MODLIST"
    local m
    for m in "${GUEST_MODULES[@]}"; do add_module "$m"; done
    # Modules that newer kernels no longer have (crc32_generic became part of lib/crc32).
    for m in "${OPTIONAL_MODULES[@]}"; do [[ -z $(mod_path "$m") ]] || add_module "$m"; done
    local ird=$CACHE/initramfs
    rm -rf "$ird"
    mkdir -p "$ird/bin" "$ird/lib/modules"
    cp "$KROOT/bin/busybox" "$ird/bin/busybox"
    cp "$SCRIPT_DIR/guest-init.sh" "$ird/init"
    chmod 755 "$ird/init"
    : > "$ird/modules.load"
    for p in "${LOAD_ORDER[@]}"; do
        local b
        b=$(basename "$p" .xz)
        mod_cat "$p" > "$ird/lib/modules/$b"
        echo "$b" >> "$ird/modules.load"
    done
    (cd "$ird" && find . | "$KROOT/bin/busybox" cpio -o -H newc 2>/dev/null) > "$CACHE/initramfs.cpio"

    rm -f "$CACHE"/ready-v1-*
    touch "$stamp"
    exec 9>&-
    say "cache ready (kernel $KVER)"
}

( prepare_cache )
KVER=$(cat "$CACHE/kernel-version")
KERNEL=$(cat "$CACHE/kernel-image")
QROOT=$CACHE/root
QEMU=$QROOT/usr/bin/qemu-system-x86_64
export LD_LIBRARY_PATH=$QROOT/usr/lib/x86_64-linux-gnu:$QROOT/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export QEMU_MODULE_DIR=$QROOT/usr/lib/x86_64-linux-gnu/qemu
# The unpacked qemu relies on the host for common libraries (glib, pixman,
# ... which qemu-utils pulls in); name any that are missing.
MISSING_LIBS=$(ldd "$QEMU" 2>/dev/null | awk '/not found/ { print $1 }' | tr '\n' ' ')
[[ -z $MISSING_LIBS ]] || die "qemu-system-x86_64 needs libraries missing on this host: $MISSING_LIBS
       install the Debian packages that ship them (see: apt-cache depends qemu-system-x86),
       or add them to QEMU_PKGS in $0 and delete $CACHE"

# Tools the guest uses come from the HOST root (shared over 9p).
need bash bash
need ip iproute2
need rdma iproute2
need ibv_devinfo ibverbs-utils
[[ -e /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so ]] || ls /usr/lib/*/libibverbs/librxe-* >/dev/null 2>&1 \
    || die "rxe verbs provider missing; install the Debian package 'ibverbs-providers'"

[[ $PWD != / ]] || die "run from a project directory, not / (it is shared read-write with the guest)"

# ---------------------------------------------------------------------------
# One run: a run directory on the host (seen read-only by the guest).
# ---------------------------------------------------------------------------
RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gallocy-qemu.XXXXXX")
QEMU_PID=
TAIL_PID=
cleanup() {
    [[ -n $QEMU_PID ]] && kill "$QEMU_PID" 2>/dev/null || true
    [[ -n $TAIL_PID ]] && kill "$TAIL_PID" 2>/dev/null || true
    if [[ ${GALLOCY_QEMU_KEEP:-0} != 1 && ${KEEP_RUN_DIR:-0} != 1 ]]; then
        rm -rf "$RUN_DIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }   # single-quote for sh
{
    echo "GUEST_CWD=$(sq "$PWD")"
    echo "GUEST_RUN=/run/gallocy/guest-run.sh"   # copied there by guest-init.sh
    echo "GUEST_MTU=$(sq "$MTU")"
} > "$RUN_DIR/guest.conf"
cp "$SCRIPT_DIR/guest-run.sh" "$RUN_DIR/guest-run.sh"
{
    echo "cd -- $(sq "$PWD") || exit 125"
    while IFS= read -r var; do
        echo "export $var=$(sq "${!var}")"
    done < <(compgen -e | grep -E '^(PATH|HOME|LANG|LC_ALL|TERM|USER|RUST_[A-Z_]*|CARGO_[A-Z_]*|GALLOCY_[A-Z_]*)$' || true)
    printf 'exec'
    for a in "$@"; do printf ' %s' "$(sq "$a")"; done
    echo
} > "$RUN_DIR/cmd.sh"
: > "$RUN_DIR/out"
: > "$RUN_DIR/rc"

# mitigations=off: a throw-away test guest; PTI etc. are costly under TCG.
KERNEL_ARGS="console=ttyS0 panic=-1 rdinit=/init loglevel=6 mitigations=off"

# -nodefaults/-nic none: no NIC to the outside, no VGA; rxe uses dummy0.
# romfile= on virtio devices: no iPXE option ROMs needed (or wanted).
"$QEMU" \
    -accel tcg -M pc -cpu max -smp "$CPUS" -m "$MEM" \
    -nodefaults -no-user-config -display none -nic none -no-reboot \
    -L "$QROOT/usr/share/qemu" -L "$QROOT/usr/share/seabios" \
    -kernel "$KERNEL" -initrd "$CACHE/initramfs.cpio" \
    -append "$KERNEL_ARGS gallocy.run=$RUN_DIR ${GALLOCY_QEMU_APPEND:-}" \
    -serial "file:$RUN_DIR/kernel.log" \
    -fsdev "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap" \
    -device "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot,romfile=" \
    -fsdev "local,id=hostcwd,path=$PWD,security_model=none,multidevs=remap" \
    -device "virtio-9p-pci,fsdev=hostcwd,mount_tag=hostcwd,romfile=" \
    -device "virtio-serial-pci,romfile=" \
    -chardev "file,id=out,path=$RUN_DIR/out" -device "virtserialport,chardev=out,name=out" \
    -chardev "file,id=rc,path=$RUN_DIR/rc" -device "virtserialport,chardev=rc,name=rc" \
    > "$RUN_DIR/qemu.log" 2>&1 < /dev/null &
QEMU_PID=$!
START=$SECONDS

# Stream the command's output while the guest runs.
tail -n +1 -f --pid="$QEMU_PID" "$RUN_DIR/out" &
TAIL_PID=$!

TIMED_OUT=0
while kill -0 "$QEMU_PID" 2>/dev/null; do
    if (( SECONDS - START >= TIMEOUT )); then
        TIMED_OUT=1
        kill "$QEMU_PID" 2>/dev/null || true
        break
    fi
    sleep 0.2
done
QEMU_RC=0
wait "$QEMU_PID" || QEMU_RC=$?
QEMU_PID=
wait "$TAIL_PID" 2>/dev/null || true
TAIL_PID=

guest_failed() {  # guest_failed MESSAGE RC
    KEEP_RUN_DIR=1
    say "$1"
    if [[ -s $RUN_DIR/qemu.log ]]; then
        say "--- qemu output ---"; tail -n 20 "$RUN_DIR/qemu.log" >&2
    fi
    say "--- guest kernel log (tail) ---"
    tail -n 40 "$RUN_DIR/kernel.log" >&2 || true
    say "full logs kept in $RUN_DIR"
    exit "$2"
}

RC=$(tr -d '\r\n' < "$RUN_DIR/rc")
if (( TIMED_OUT )); then
    guest_failed "timeout after ${TIMEOUT}s; guest killed" 124
elif [[ $RC =~ ^[0-9]+$ ]]; then
    exit "$RC"
elif [[ $RC == setup-failed* ]]; then
    guest_failed "guest $RC" 125
else
    guest_failed "guest ended without an exit code (qemu exit status $QEMU_RC)" 125
fi
