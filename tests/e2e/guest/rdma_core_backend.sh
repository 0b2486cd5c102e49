#!/bin/sh
# The rdma-core backend's conformance suite on soft-RoCE (rxe0 on eth0) inside the guest.
# Needs no pvrdma device. The test binary comes in with run.sh --add (it dlopens the guest's
# libibverbs):
#   cargo test -p rdma-backend --features rdma-core --no-run   # prints the binary's path
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
check conformance env PVRDMA_IBDEV=rxe0 RUST_BACKTRACE=1 RUST_LOG=warn "$BIN" --nocapture --test-threads=1
finish
