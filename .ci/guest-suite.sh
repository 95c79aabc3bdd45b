#!/usr/bin/env bash
# CI, second part: the runtime's whole test suite (gallocy's unit and doc tests, gallocy-cli's unit
# tests, every runtime/testkit/tests/*.rs) once more, plus the transport crate's tests
# (transport/tests/rdma.rs drives the RDMA transport itself) and the shim's (alloc-shim/tests/*.rs:
# preloaded programs, with libgallocy.so built with RDMA), built with the cargo feature `rdma` and
# run inside a throw-away QEMU guest that has a Soft-RoCE device (soft-roce-setup/in-guest.sh),
# every job of the runtime suite over GALLOCY_TRANSPORT=$GUEST_TRANSPORT.
#
# usage: .ci/guest-suite.sh     (.ci/run calls it after the host tests; needs root and what
#                                soft-roce-setup/README.md lists, which .ci/run installs)
#
# Environment (all optional):
#   GUEST_TRANSPORT     transport of every job in the guest: rdma (default) or tcp
#   GUEST_TIMEOUT       seconds the guest may run before it is killed (default 2400; it needs 20-25 min)
#   GUEST_TEST_THREADS  libtest --test-threads in the guest (default 1: 2 emulated vCPUs, and every
#                       job is already 2-4 processes with several threads each)
#   GUEST_TARGET_DIR    cargo target directory (default target/rdma, apart from the host run's)
#   GUEST_KERNEL_DEB    kernel package of the second, short guest run (soft-roce-setup/guest-kernel.sh:
#                       by default Debian trixie-backports' 6.16, whose Soft-RoCE has on-demand
#                       paging; empty: that run is skipped, and says so)
#
# The host builds everything (the guest only runs it: cargo test --frozen finds nothing to
# rebuild, and the guest has no network). In the guest the tests get GALLOCY_TEST_SLOW=1, which
# scales the few tests that are too slow under emulation (see runtime/testkit/src/lib.rs).
#
# Before the guest, the same RDMA build's device-less cases run on this host (no RDMA device).
# Prints per test binary its counts and time, the guest's wall time and, last,
# `guest summary: N passed, N failed` (the host's device-less cases included). Exits non-zero if
# the build or any test failed.
set -euo pipefail
cd "$(dirname "$0")/.."

transport=${GUEST_TRANSPORT:-rdma}
timeout=${GUEST_TIMEOUT:-2400}
threads=${GUEST_TEST_THREADS:-1}
target_dir=${GUEST_TARGET_DIR:-target/rdma}
case $target_dir in /*) ;; *) target_dir=$PWD/$target_dir ;; esac
export CARGO_TARGET_DIR=$target_dir
# The runtime's (the library, the launcher, and the end-to-end tests of gallocy-testkit, which go
# by gallocy::RDMA_BUILT) and the transport's whole suites; then the shim's tests whose processes
# join a job (libgallocy.so built with RDMA): every test binary but preload.rs, whose unmodified
# programs run as one-process jobs that use no transport (the host run has them). Same features,
# one build.
runtime_tests=(--release -p gallocy -p gallocy-cli -p gallocy-testkit -p gallocy-transport
               --features gallocy/rdma,gallocy-transport/rdma)
shim_tests=(--release -p gallocy-shim --features gallocy-rt/rdma
            --test shapes --test syscalls --test examples --test edge --test init_array --test slurm)

echo "guest suite: building with the feature rdma into $target_dir"
t_build=$SECONDS
if ! { cargo build --workspace --release --features gallocy/rdma &&
       cargo test "${runtime_tests[@]}" --no-run && cargo test "${shim_tests[@]}" --no-run; }; then
    echo "guest suite: the build failed"
    echo "guest summary: 0 passed, 1 failed"
    exit 1
fi
echo "guest suite: build took $((SECONDS - t_build)) s"

# The protocol's model check is pure computation, the same on every transport: the host run has it
# (--skip model_check keeps minutes of emulated CPU out of the guest).
# The guest's hostname is "(none)" otherwise, which Open MPI's mpirun refuses as a node name.
# Both runs go on whatever the first gives; the exit code is the first failure's.
in_guest_script='echo gallocy-guest > /proc/sys/kernel/hostname
n=$1; shift
rc=0
cargo test "${@:1:n}" --frozen --no-fail-fast -- --test-threads="$THREADS" --nocapture --skip model_check || rc=$?
shift "$n"
cargo test "$@" --frozen --no-fail-fast -- --test-threads="$THREADS" --nocapture || { r=$?; [ "$rc" -ne 0 ] || rc=$r; }
exit "$rc"'
guest_cmd=(env GALLOCY_TRANSPORT="$transport" GALLOCY_TEST_SLOW=1 CARGO_TARGET_DIR="$target_dir" THREADS="$threads"
           bash -c "$in_guest_script" bash "${#runtime_tests[@]}" "${runtime_tests[@]}" "${shim_tests[@]}")

log=$(mktemp)
hlog=$(mktemp)
trap 'rm -f "$log" "$hlog"' EXIT

# First, on this host, which has no RDMA device: the same RDMA build falls back to TCP on `auto`
# and says why, and `--transport rdma` stops at start naming what is missing (the device-less
# cases of runtime/testkit/tests/rdma.rs and transport/tests/rdma.rs, and a preloaded member's note).
echo "guest suite: the RDMA build on this host, without a device"
host_status=0
env -u GALLOCY_TRANSPORT cargo test "${runtime_tests[@]}" --test rdma -- --test-threads=1 2>&1 |
    tee "$hlog" || host_status=1
env -u GALLOCY_TRANSPORT cargo test --release -p gallocy-shim --features gallocy-rt/rdma --test shapes \
    -- preloaded_member_says_which_transport_runs --nocapture 2>&1 | tee -a "$hlog" || host_status=1
echo "guest suite: running the runtime tests in the guest (GALLOCY_TRANSPORT=$transport, timeout ${timeout} s)"
t_guest=$SECONDS
set +e
soft-roce-setup/in-guest.sh --timeout "$timeout" -- "${guest_cmd[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
guest_time=$((SECONDS - t_guest))

# Then on-demand paging, which the guest's kernel above (Debian bookworm's 6.1) lacks for Soft-RoCE:
# a second, short guest boots trixie-backports' 6.16 (soft-roce-setup/guest-kernel.sh) with a
# network MTU of 9000 (RDMA MTU 4096: Soft-RoCE's on-demand copy is right only for packets of whole
# pages) and runs the tests of memory given back over RDMA and of the heap's registration. The run
# above covers the same tests' pinned side. Not the whole suite: under emulation this kernel's
# Soft-RoCE makes page and lock traffic 1.4-2.5 times slower, which the whole suite cannot afford.
odp_log=$(mktemp)
trap 'rm -f "$log" "$hlog" "$odp_log"' EXIT
odp_status=0
odp_kernel=${GALLOCY_QEMU_KERNEL_DEB:-$(soft-roce-setup/guest-kernel.sh)}
if [ -n "$odp_kernel" ]; then
    odp_script='cargo test "${@:1:n}" --frozen --no-fail-fast --test rdma -- --test-threads=1 --nocapture a_page_given_back soft_roce_uses a_peer_cannot_write memlock on_demand || rc=$?
cargo test "${@:1:n}" --frozen --no-fail-fast --test scenarios -- --test-threads=1 --nocapture memory || rc=$?
exit "${rc:-0}"'
    odp_cmd=(env GALLOCY_TRANSPORT="$transport" GALLOCY_TEST_SLOW=1 CARGO_TARGET_DIR="$target_dir"
             bash -c "n=\$1; shift; $odp_script" bash "${#runtime_tests[@]}" "${runtime_tests[@]}")
    echo "guest suite: on-demand paging: a second guest with kernel ${odp_kernel##*/}, MTU 9000"
    t_odp=$SECONDS
    set +e
    GALLOCY_QEMU_KERNEL_DEB=$odp_kernel soft-roce-setup/in-guest.sh --timeout 900 --mtu 9000 -- "${odp_cmd[@]}" 2>&1 |
        tee "$odp_log"
    odp_status=${PIPESTATUS[0]}
    set -e
    echo "guest suite: on-demand paging run took $((SECONDS - t_odp)) s"
else
    echo "guest suite: on-demand paging: skipped (no kernel package with it could be downloaded)"
fi

if grep -qE '^ *Compiling ' "$log"; then
    echo "guest suite: warning: cargo rebuilt something in the guest (slow under emulation; the host build should have left nothing to do)"
fi

# Per test binary: `Running tests/x.rs (...)` / `Doc-tests gallocy`, then its `test result:` line.
echo "guest suite: per test binary (GALLOCY_TRANSPORT=$transport):"
awk '/^ *Running / { name = ($2 == "unittests") ? $3 : $2 }
     /^ *Doc-tests / { name = "doc-tests " $2 }
     /^test result:/ {
         p = f = 0; t = "?"
         for (i = 1; i <= NF; i++) {
             if ($(i+1) ~ /^passed/) p = $i
             if ($(i+1) ~ /^failed/) f = $i
             if ($i == "in") t = $(i+1)
         }
         printf "  %-36s %4d passed %3d failed  %8s\n", name, p, f, t
     }' "$log"
read -r passed failed < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
                                END { printf "%d %d\n", p, f }' "$log" "$hlog" "$odp_log")
case $status in
    0) ;;
    124) echo "guest suite: the guest was killed after ${timeout} s (timeout); tests after the last result above did not run" ;;
    125) echo "guest suite: the guest or its Soft-RoCE setup failed (see the in-guest messages above)" ;;
    *) echo "guest suite: cargo test in the guest exited with $status" ;;
esac
[ "$host_status" -eq 0 ] || echo "guest suite: the RDMA build's device-less tests on the host failed (see above)"
[ "$odp_status" -eq 0 ] || echo "guest suite: the on-demand paging run failed with $odp_status (see above)"
# A run that died without a failed test result still counts as a failure.
if { [ "$status" -ne 0 ] || [ "$host_status" -ne 0 ] || [ "$odp_status" -ne 0 ]; } && [ "$failed" -eq 0 ]; then
    failed=1
fi
echo "guest time: ${guest_time} s ($((guest_time / 60)) min $((guest_time % 60)) s, boot included)"
echo "guest summary: $passed passed, $failed failed"
[ "$status" -ne 0 ] && exit "$status"
[ "$odp_status" -ne 0 ] && exit "$odp_status"
exit "$host_status"
