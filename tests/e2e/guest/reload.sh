#!/bin/sh
# Unload and reload vmw_pvrdma (RESET, then a fresh ACTIVATE on the device) twice, with a ping-pong
# after each load.
. /e2e-lib.sh
KO=/lib/modules/$(uname -r)/extra/vmw_pvrdma.ko

pingpong() {
    pair "rc$1" "$2" ibv_rc_pingpong -d "$DEV" -g 0 -n 50 -p "$2" -- \
        ibv_rc_pingpong -d "$DEV" -g 0 -n 50 -p "$2" 127.0.0.1
}
unload() {
    rmmod vmw_pvrdma || return 1
    ! lsmod | grep -q '^vmw_pvrdma' || return 1
    wait_for 10 sh -c "[ ! -e /sys/class/infiniband/$DEV ]"
}
load() {
    insmod "$KO" || return 1
    wait_dev_active "$DEV" 30
}

check active-at-boot wait_dev_active "$DEV" 30
check pingpong-0 pingpong 0 18530
for i in 1 2; do
    check "rmmod-$i" unload
    check "insmod-$i" load
    check "pingpong-$i" pingpong "$i" $((18530 + i))
done
dmesg | grep -i pvrdma | tail -n 30
finish
