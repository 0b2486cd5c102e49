#!/bin/sh
# The device in RoCE v2 mode (`pvrdma serve --roce-version 2`): the GID table holds RoCE v2 GIDs,
# RC and UD ping-pongs run on the link-local GID (UD receives carry an IPv6 header) and on the
# IPv4-mapped one (an IPv4 header, checksum and all), rping runs over rdma_cm (the CM's MADs on
# QP1 with IPv4 headers the kernel parses), and ib_write_bw moves data.
. /e2e-lib.sh
N=${N:-50}
wait_dev_active "$DEV" 30 || { dmesg | tail -n 30; exit 1; }
P=/sys/class/infiniband/$DEV/ports/1
ADDR=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)

gid_types_v2() {
    local t0
    t0=$(cat "$P/gid_attrs/types/0" 2>/dev/null)
    say "GID 0: $(cat "$P/gids/0") type '$t0'"
    [ "$t0" = "RoCE v2" ]
}
# The index of eth0's IPv4-mapped GID (bound once the address is up).
v4_index() {
    local want i
    want=$(echo "$ADDR" | awk -F. '{printf "0000:0000:0000:0000:0000:ffff:%02x%02x:%02x%02x", $1, $2, $3, $4}')
    for i in $(seq 0 15); do
        [ "$(cat "$P/gids/$i" 2>/dev/null)" = "$want" ] && { echo "$i"; return 0; }
    done
    return 1
}
check gid-types-v2 gid_types_v2
wait_for 30 v4_index
X4=$(v4_index) || X4=1
say "IPv4-mapped GID at index $X4: $(cat "$P/gids/$X4" 2>/dev/null) ($(cat "$P/gid_attrs/types/$X4" 2>/dev/null))"

check rc_pingpong-v2 pair rc 18615 ibv_rc_pingpong -d "$DEV" -g 0 -n "$N" -p 18615 -- \
    ibv_rc_pingpong -d "$DEV" -g 0 -n "$N" -p 18615 127.0.0.1
check ud_pingpong-v2-ipv6 pair ud6 18616 ibv_ud_pingpong -d "$DEV" -g 0 -n "$N" -p 18616 -- \
    ibv_ud_pingpong -d "$DEV" -g 0 -n "$N" -p 18616 127.0.0.1
check ud_pingpong-v2-ipv4 pair ud4 18617 ibv_ud_pingpong -d "$DEV" -g "$X4" -n "$N" -p 18617 -- \
    ibv_ud_pingpong -d "$DEV" -g "$X4" -n "$N" -p 18617 127.0.0.1
perf_pair "$DEV" "$X4" ib_write_bw -s 65536 -n 200

check rping-v2 rping_pair "$ADDR" 7184
dmesg | grep -i -E 'pvrdma|rdma_cm|ib_cm' | tail -n 20
finish
