#!/bin/sh
# perftest on vmw_pvrdma0 and on rxe0 (Soft-RoCE over the same vmxnet3 netdev) in one boot, so the
# figures compare like with like (TCG slows everything in the guest alike).
. /e2e-lib.sh
both_devices_up || exit 1
N=${N:-500}
for d in vmw_pvrdma0:0 rxe0:1; do
    dev=${d%:*}; x=${d#*:}
    perf_pair "$dev" "$x" ib_send_bw -s 65536 -n "$N"
    perf_pair "$dev" "$x" ib_write_bw -s 65536 -n "$N"
    perf_pair "$dev" "$x" ib_read_bw -s 65536 -n "$N"
    perf_pair "$dev" "$x" ib_atomic_bw -n "$N"
    perf_pair "$dev" "$x" ib_send_lat -s 8 -n "$N"
    perf_pair "$dev" "$x" ib_write_lat -s 8 -n "$N"
done
finish
