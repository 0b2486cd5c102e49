#!/bin/sh
# Goal (d): perftest between two processes on vmw_pvrdma0 (RC, TCP exchange on 127.0.0.1, GID index 0).
# Figures under TCG are only comparable within one run. Each test is run and reported; any failure fails.
# ib_atomic_bw needs atomic_ops in the device caps (not required by the driver goals): it is reported
# like the others.
. /e2e-lib.sh
N=${N:-200}
P=18600
wait_dev_active "$DEV" 30 || { dmesg | tail -n 30; exit 1; }

pt() { # TOOL EXTRA...
    local tool=$1
    shift
    P=$((P + 1))
    check "$tool" pair "$tool" "$P" "$tool" -d "$DEV" -x 0 -F -p "$P" "$@" -- \
        "$tool" -d "$DEV" -x 0 -F -p "$P" "$@" 127.0.0.1
}
pt ib_send_bw -n "$N"
pt ib_write_bw -n "$N"
pt ib_read_bw -n "$N"
pt ib_atomic_bw -n "$N"
pt ib_send_lat -n "$N"
pt ib_write_lat -n "$N"
pt ib_read_lat -n "$N"
finish
