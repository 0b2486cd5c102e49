#!/bin/sh
# Goals (c) and (e): the libibverbs example programs between two processes on vmw_pvrdma0,
# exchanging connection data over TCP on 127.0.0.1. Small iteration counts (TCG is slow).
. /e2e-lib.sh
N=${N:-100}
wait_dev_active "$DEV" 30 || { dmesg | tail -n 30; exit 1; }

check rc_pingpong pair rc 18515 ibv_rc_pingpong -d "$DEV" -g 0 -n "$N" -p 18515 -- \
    ibv_rc_pingpong -d "$DEV" -g 0 -n "$N" -p 18515 127.0.0.1
check rc_pingpong-events pair rce 18516 ibv_rc_pingpong -d "$DEV" -g 0 -n "$N" -e -p 18516 -- \
    ibv_rc_pingpong -d "$DEV" -g 0 -n "$N" -e -p 18516 127.0.0.1
check rc_pingpong-64k pair rc64k 18517 ibv_rc_pingpong -d "$DEV" -g 0 -n 20 -s 65536 -p 18517 -- \
    ibv_rc_pingpong -d "$DEV" -g 0 -n 20 -s 65536 -p 18517 127.0.0.1
check ud_pingpong pair ud 18518 ibv_ud_pingpong -d "$DEV" -g 0 -n "$N" -p 18518 -- \
    ibv_ud_pingpong -d "$DEV" -g 0 -n "$N" -p 18518 127.0.0.1
check srq_pingpong pair srq 18519 ibv_srq_pingpong -d "$DEV" -g 0 -n "$N" -p 18519 -- \
    ibv_srq_pingpong -d "$DEV" -g 0 -n "$N" -p 18519 127.0.0.1
dmesg | grep -i pvrdma | tail -n 20
finish
