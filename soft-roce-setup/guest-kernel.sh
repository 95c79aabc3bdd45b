#!/usr/bin/env bash
# Prints the kernel package for soft-roce-setup/in-guest.sh to boot (its GALLOCY_QEMU_KERNEL_DEB):
# $GUEST_KERNEL_DEB if set (empty: none, i.e. Debian's default linux-image-amd64), else Debian
# trixie-backports' 6.16, whose Soft-RoCE has on-demand paging (Linux 6.14 and later; bookworm's
# own kernel is 6.1). Prints nothing, and a warning on stderr, if a URL cannot be downloaded.
# usage: export GALLOCY_QEMU_KERNEL_DEB=$(soft-roce-setup/guest-kernel.sh)
set -euo pipefail
deb=${GUEST_KERNEL_DEB-http://deb.debian.org/debian/pool/main/l/linux-signed-amd64/linux-image-6.16.12+deb13-amd64_6.16.12-1~bpo13+1_amd64.deb}
case $deb in
    "") ;;
    http://*|https://*)
        if curl -fsIL --max-time 60 "$deb" >/dev/null 2>&1; then
            echo "$deb"
        else
            echo "guest-kernel: warning: cannot download $deb; the guest boots Debian's default kernel (no on-demand paging on Soft-RoCE before Linux 6.14)" >&2
        fi ;;
    *) echo "$deb" ;;
esac
