#!/bin/sh
# Latency only: ib_send_lat and ib_write_lat (8 B) on vmw_pvrdma0 and on rxe0, twice each,
# alternating, in one boot. Not part of the default suite (docs/benchmarks.md, "Session 4":
# what the guest latency rows are made of). N iterations per run (default 2000).
. /e2e-lib.sh
wait_dev_active vmw_pvrdma0 30 || exit 1
modprobe crc32_generic 2>/dev/null || true
check rxe-up sh -c 'modprobe rdma_rxe && rdma link add rxe0 type rxe netdev eth0'
check rxe0-active wait_dev_active rxe0 30
N=${N:-2000}
P=18800
run() { # DEV GIDX TOOL ARGS...
    local dev=$1 x=$2 tool=$3
    shift 3
    P=$((P + 1))
    check "$tool@$dev" pair "$tool-$dev-$P" "$P" "$tool" -d "$dev" -x "$x" -F -p "$P" "$@" -- \
        "$tool" -d "$dev" -x "$x" -F -p "$P" "$@" 127.0.0.1
}
for d in vmw_pvrdma0:0 rxe0:1 vmw_pvrdma0:0 rxe0:1; do
    dev=${d%:*}; x=${d#*:}
    run "$dev" "$x" ib_send_lat -s 8 -n "$N"
    run "$dev" "$x" ib_write_lat -s 8 -n "$N"
done
finish
