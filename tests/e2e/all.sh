#!/usr/bin/env bash
# The whole real-guest suite: set-up (cached), then one TCG boot per guest test, each with a fresh
# `pvrdma serve` process whose exit status is checked. Logs: target/e2e-logs/.
# rdma_core_backend needs no pvrdma device: it runs the rdma-core backend's conformance suite on
# soft-RoCE in the guest, with the test binary built by rdma-core-test-bin.sh.
# vm2vm boots two guests (then a third) on ONE server with two devices (vms.sh, guest/vm2vm.sh).
# nvmeof runs NVMe over Fabrics (the kernel's fast-register MRs) on vmw_pvrdma0, then rxe0.
# rdma_core_wire needs no pvrdma device either: pvrdma serve --backend rdma-core runs inside the guest
# on rxe0 (one end of a veth pair), the harness (pvrdma-peer) drives it over vfio-user against the
# native ping-pong tools on rxe1 (the other end); pvrdma, pvrdma-peer and veth.ko go in with --add.
#
# roce_v2 serves the device with --roce-version 2; v2_suite runs probe, pingpong, perftest, rping,
# reload and nvmeof (vmw_pvrdma0 only) again in one boot with the device in RoCE v2 mode
# (guest/suite.sh).
#
#   tests/e2e/all.sh [TEST...]      default: probe pingpong perftest reload rping roce_v2 compare
#                                   nvmeof vm2vm rdma_core_backend rdma_core_wire v2_suite
# PVRDMA_E2E_BIN=PATH: use that pvrdma binary instead of building target/release/pvrdma with cargo.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$REPO"
TESTS=("$@")
[ ${#TESTS[@]} -gt 0 ] || TESTS=(probe pingpong perftest reload rping roce_v2 compare nvmeof vm2vm rdma_core_backend
    rdma_core_wire v2_suite)

"$HERE/setup.sh"
# The pvrdma server, unless rdma_core_backend (which needs none) is the only test.
if [ -n "${PVRDMA_E2E_BIN:-}" ]; then
    BIN=$PVRDMA_E2E_BIN
else
    if printf '%s\n' "${TESTS[@]}" | grep -qvx rdma_core_backend; then
        cargo build --release --bin pvrdma
    fi
    BIN=$REPO/target/release/pvrdma
fi
SOCKDIR=$REPO/target/e2e-sock
mkdir -p "$SOCKDIR"

passed=0
failed=0
failures=()
for t in "${TESTS[@]}"; do
    if [ "$t" = vm2vm ]; then
        # Two guests, then a third, on one server process with two devices: its own runner.
        if PVRDMA_E2E_QUIET=1 "$HERE/vms.sh" --name "$t" --bin "$BIN" --timeout 400; then
            passed=$((passed + 1))
        else
            failed=$((failed + 1))
            failures+=("$t")
        fi
        for r in a b c; do
            [ -e "$REPO/target/e2e-logs/$t-$r.console.log" ] || continue
            grep -aE '^\[e2e\] (PASS|FAIL|figure|peer-death: ib_write_bw exited)' \
                "$REPO/target/e2e-logs/$t-$r.console.log" | tr -d '\r' | sed "s/^/  [$t-$r] /" || true
        done
        continue
    fi
    if [ "$t" = rdma_core_backend ]; then
        # No device and no server; the test binary goes into the guest.
        mkdir -p "$REPO/target/e2e-logs"
        if ! rbin=$("$HERE/rdma-core-test-bin.sh" 2>"$REPO/target/e2e-logs/$t.build.log" | tail -n 1); then
            rbin=""
        fi
        if [ -z "$rbin" ]; then
            failed=$((failed + 1))
            failures+=("$t")
            echo "---- $t: building the test binary failed (target/e2e-logs/$t.build.log)"
            tail -n 40 "$REPO/target/e2e-logs/$t.build.log" || true
            continue
        fi
        args=(--add "$rbin")
    elif [ "$t" = rdma_core_wire ]; then
        # No device in QEMU: the server runs in the guest. The harness binary (release) and the
        # veth module (not in the initrd) go in beside the pvrdma binary.
        mkdir -p "$REPO/target/e2e-logs" "$REPO/target/e2e-wire"
        if ! cargo build --release -p pvrdma-guest --bin pvrdma-peer >"$REPO/target/e2e-logs/$t.build.log" 2>&1; then
            failed=$((failed + 1))
            failures+=("$t")
            echo "---- $t: building pvrdma-peer failed (target/e2e-logs/$t.build.log)"
            tail -n 40 "$REPO/target/e2e-logs/$t.build.log" || true
            continue
        fi
        kv=$(cat "${PVRDMA_E2E_CACHE:-/var/cache/pvrdma-e2e}/kernel-version")
        xz -dc "${PVRDMA_E2E_CACHE:-/var/cache/pvrdma-e2e}/trixie/lib/modules/$kv/kernel/drivers/net/veth.ko.xz" \
            >"$REPO/target/e2e-wire/veth.ko"
        # Without debug info: the initramfs holds them in guest RAM.
        strip --strip-debug -o "$REPO/target/e2e-wire/pvrdma" "$BIN"
        strip --strip-debug -o "$REPO/target/e2e-wire/pvrdma-peer" "$REPO/target/release/pvrdma-peer"
        args=(--add "$REPO/target/e2e-wire/pvrdma" --add "$REPO/target/e2e-wire/pvrdma-peer"
            --add "$REPO/target/e2e-wire/veth.ko")
    else
        sock=$SOCKDIR/$t.sock
        rm -f "$sock"
        extra=""
        [ "$t" = roce_v2 ] && extra="--roce-version 2"
        args=(--socket "$sock")
        if [ "$t" = v2_suite ]; then
            # The device tests of the default suite again, in one boot, with the device in
            # RoCE v2 mode (guest/suite.sh runs the scripts it is given).
            extra="--roce-version 2"
            for s in probe pingpong perftest rping reload nvmeof; do
                args+=(--add "$HERE/guest/$s.sh")
            done
        fi
        args+=(--server-cmd "exec $BIN serve --socket $sock --mac 52:54:00:12:34:56 $extra")
    fi
    script=$HERE/guest/$t.sh
    [ "$t" = v2_suite ] && script=$HERE/guest/suite.sh
    tmo=400
    [ "$t" = nvmeof ] && tmo=900   # two devices, 2 x 64 MiB each under TCG
    [ "$t" = v2_suite ] && tmo=1200
    if PVRDMA_E2E_QUIET=1 "$HERE/run.sh" "$script" --name "$t" "${args[@]}" --timeout "$tmo"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failures+=("$t")
        echo "---- last lines of target/e2e-logs/$t.console.log"
        tail -n 40 "$REPO/target/e2e-logs/$t.console.log" || true
    fi
    grep -aE '^\[e2e\] (PASS|FAIL|figure|conformance on)' "$REPO/target/e2e-logs/$t.console.log" | tr -d '\r' |
        sed "s/^/  [$t] /" || true
done
echo "e2e: $passed passed, $failed failed${failures:+ (${failures[*]})}"
[ "$failed" = 0 ]
