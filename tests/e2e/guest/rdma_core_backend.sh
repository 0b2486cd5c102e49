#!/bin/sh
# The rdma-core backend's conformance suite on soft-RoCE (rxe0 on eth0) inside the guest.
# Needs no pvrdma device. The test binary comes in with run.sh --add (it dlopens the guest's
# libibverbs); tests/e2e/all.sh rdma_core_backend builds it and boots this, or by hand:
#   tests/e2e/rdma-core-test-bin.sh     # builds; prints the binary's path
#   tests/e2e/run.sh tests/e2e/guest/rdma_core_backend.sh --add <that binary> --timeout 400
# The suite's guest GIDs are fe80::1:<n>; they are added to eth0 so rxe0's GID table has them.
. /e2e-lib.sh

BIN=$(ls /add/conformance_rdma_core* 2>/dev/null | head -n1)
[ -n "$BIN" ] || { say "FAIL no /add/conformance_rdma_core* (run.sh --add)"; exit 1; }
modprobe crc32_generic 2>/dev/null || say "no crc32_generic module (fine on kernels >= 6.15)"
check modprobe-rdma_rxe modprobe rdma_rxe
check rdma-link-add rdma link add rxe0 type rxe netdev eth0
check rxe0-active wait_dev_active rxe0 30
check gid-1 ip -6 addr add fe80::1:1/64 dev eth0
check gid-2 ip -6 addr add fe80::1:2/64 dev eth0
sleep 3
ibv_devinfo -v -d rxe0 | grep -E 'state|GID|active_mtu'
ulimit -l unlimited 2>/dev/null || true
mkdir -p /tmp
run_suite() {
    env PVRDMA_IBDEV=rxe0 RUST_BACKTRACE=1 RUST_LOG=warn "$BIN" --nocapture --test-threads=1 \
        >/tmp/conformance.log 2>&1
    local rc=$?
    cat /tmp/conformance.log
    [ $rc = 0 ] || return $rc
    # The binary passes with "skipped" when it cannot open rxe0: that is a failure here.
    grep -q '^conformance on rxe0: ' /tmp/conformance.log
}
check conformance run_suite
grep -a '^conformance on rxe0: ' /tmp/conformance.log | sed 's/^/[e2e] /'
finish
