#!/bin/sh
# Latency only: ib_send_lat and ib_write_lat (8 B) on vmw_pvrdma0 and on rxe0, twice each,
# alternating, in one boot. Not part of the default suite (docs/benchmarks.md says what the
# guest latency rows are made of). N iterations per run (default 2000).
. /e2e-lib.sh
both_devices_up || exit 1
N=${N:-2000}
for d in vmw_pvrdma0:0 rxe0:1 vmw_pvrdma0:0 rxe0:1; do
    dev=${d%:*}; x=${d#*:}
    perf_pair "$dev" "$x" ib_send_lat -s 8 -n "$N"
    perf_pair "$dev" "$x" ib_write_lat -s 8 -n "$N"
done
finish
