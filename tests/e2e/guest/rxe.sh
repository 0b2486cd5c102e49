#!/bin/sh
# Soft-RoCE (rdma_rxe on eth0) for comparison: the same ping-pong and perftest runs on rxe0.
# Works without any pvrdma device. GID index 1 is the IPv4-mapped address of eth0 (RoCE v2).
. /e2e-lib.sh
DEV=rxe0
X=${X:-1}
N=${N:-200}

# crc32_generic must be loaded first on 6.12, else "rdma link add" fails with ENOENT; newer kernels
# have no such module.
modprobe crc32_generic 2>/dev/null || say "no crc32_generic module (fine on kernels >= 6.15)"
check modprobe-rdma_rxe modprobe rdma_rxe
check rdma-link-add rdma link add rxe0 type rxe netdev eth0
check rxe0-active wait_dev_active rxe0 30
rdma link show
ibv_devinfo -v -d rxe0 | grep -E 'state|GID|link_layer'

check rc_pingpong pair rc 18540 ibv_rc_pingpong -d rxe0 -g "$X" -n 100 -p 18540 -- \
    ibv_rc_pingpong -d rxe0 -g "$X" -n 100 -p 18540 127.0.0.1
P=18550
pt() {
    local tool=$1
    shift
    P=$((P + 1))
    check "$tool" pair "$tool" "$P" "$tool" -d rxe0 -x "$X" -F -p "$P" "$@" -- \
        "$tool" -d rxe0 -x "$X" -F -p "$P" "$@" 127.0.0.1
}
pt ib_send_bw -n "$N"
pt ib_write_bw -n "$N"
pt ib_read_bw -n "$N"
pt ib_atomic_bw -n "$N"
pt ib_send_lat -n "$N"
pt ib_write_lat -n "$N"
check rdma-link-del rdma link delete rxe0
finish
