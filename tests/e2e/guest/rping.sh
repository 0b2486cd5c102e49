#!/bin/sh
# rping over rdma_cm on vmw_pvrdma0: address resolution (the IPv4-mapped GID), the CM's
# REQ/REP/RTU MADs through QP1, then RDMA WRITE/READ ping data. Both ends on eth0's address.
. /e2e-lib.sh
wait_dev_active "$DEV" 30 || { dmesg | tail -n 30; exit 1; }
ADDR=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
[ -n "$ADDR" ] || { say "eth0 has no IPv4 address"; exit 1; }

rping_pair() {
    local srv_rc cli_rc spid
    rping -s -a "$ADDR" -p 7174 -C 20 -v > /tmp/rping-srv.log 2>&1 &
    spid=$!
    sleep 2
    timeout 120 rping -c -a "$ADDR" -p 7174 -C 20 -v > /tmp/rping-cli.log 2>&1
    cli_rc=$?
    wait "$spid"
    srv_rc=$?
    sed 's/^/[rping srv] /' /tmp/rping-srv.log | tail -n 5
    sed 's/^/[rping cli] /' /tmp/rping-cli.log | tail -n 5
    say "rping: server rc=$srv_rc client rc=$cli_rc"
    [ "$srv_rc" = 0 ] && [ "$cli_rc" = 0 ] && [ "$(grep -c 'ping data' /tmp/rping-cli.log)" -ge 20 ]
}

check rping rping_pair
dmesg | grep -i -E 'pvrdma|rdma_cm|ib_cm' | tail -n 20
finish
