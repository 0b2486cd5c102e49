#!/bin/sh
# Several guest test scripts in ONE boot, each as one check, in the order below: the scripts
# come in with run.sh --add (only those given run). all.sh v2_suite runs the device tests of the
# default suite this way with the device in RoCE v2 mode. NVMe-oF runs on vmw_pvrdma0 only here.
. /e2e-lib.sh
for n in probe pingpong perftest rping reload nvmeof; do
    [ -f "/add/$n.sh" ] || continue
    say "---- $n.sh"
    check "suite-$n" env NVMEOF_DEVS=vmw_pvrdma0 sh "/add/$n.sh"
done
[ -n "$PASSED$FAILED" ] || { say "FAIL no /add/*.sh (run.sh --add)"; exit 1; }
finish
