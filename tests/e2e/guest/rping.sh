#!/bin/sh
# rping over rdma_cm on vmw_pvrdma0: address resolution (the IPv4-mapped GID), the CM's
# REQ/REP/RTU MADs through QP1, then RDMA WRITE/READ ping data. Both ends on eth0's address.
. /e2e-lib.sh
wait_dev_active "$DEV" 30 || { dmesg | tail -n 30; exit 1; }
ADDR=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
[ -n "$ADDR" ] || { say "eth0 has no IPv4 address"; exit 1; }

check rping rping_pair "$ADDR" 7174
dmesg | grep -i -E 'pvrdma|rdma_cm|ib_cm' | tail -n 20
finish
