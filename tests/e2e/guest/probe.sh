#!/bin/sh
# Goal (a)+(b): the device probes, vmw_pvrdma0 registers, port 1 is ACTIVE with a GID, ibv_devinfo works.
. /e2e-lib.sh

pci_present() { lspci -nn | tee /tmp/lspci; grep -q '15ad:0820' /tmp/lspci; }
# "vmw_pvrdma 0000:00:10.1: device version 18, driver version 20", then "paired device to eth0";
# any "failed"/"error"/"timeout" line from the device instance fails (module-taint lines are ignored).
dmesg_probe() {
    dmesg | grep -i pvrdma
    dmesg | grep -q 'vmw_pvrdma 0000:00:10.1: device version' || return 1
    dmesg | grep -q 'vmw_pvrdma 0000:00:10.1: paired device to eth0' || return 1
    if dmesg | grep -Ei 'vmw_pvrdma 0000:.*(fail|error|timeout|needs RoCE)'; then return 1; fi
    return 0
}
bound() { [ -e /sys/bus/pci/drivers/vmw_pvrdma ] && ls /sys/bus/pci/drivers/vmw_pvrdma | grep -q '0000:00:10.1'; }
rdma_link_active() {
    wait_dev_active "$DEV" 30 || return 1
    rdma link show | tee /tmp/rdma-link
    grep -q "$DEV/1 state ACTIVE" /tmp/rdma-link
}
gid0_nonzero() {
    g=$(cat /sys/class/infiniband/$DEV/ports/1/gids/0)
    echo "gid0 $g type $(cat /sys/class/infiniband/$DEV/ports/1/gid_attrs/types/0 2>/dev/null)"
    [ -n "$g" ] && [ "$g" != "0000:0000:0000:0000:0000:0000:0000:0000" ]
}
devinfo() {
    ibv_devinfo -v -d "$DEV" | tee /tmp/devinfo || return 1
    grep -q 'PORT_ACTIVE' /tmp/devinfo || return 1
    grep -Eq 'GID\[ *0\]:' /tmp/devinfo || return 1
}
devices() { ibv_devices | tee /tmp/devices; grep -q "$DEV" /tmp/devices; }

check pci-15ad:0820 pci_present
check dmesg-probe dmesg_probe
check driver-bound bound
check rdma-link-active rdma_link_active
check gid0 gid0_nonzero
check ibv_devices devices
check ibv_devinfo devinfo
dmesg | tail -n 20
finish
