#!/bin/sh
# NVMe over Fabrics, RDMA transport, target and host in this one guest, per RDMA device in $DEVS:
# nvmet (configfs) exports a brd RAM disk on a port (rdma, ipv4, the device's own IP, 4420); the host
# connects through /dev/nvme-fabrics; 64 MiB of random data are written to the new /dev/nvmeXn1 with
# O_DIRECT, read back with O_DIRECT and compared (and read from the RAM disk on the target side); then
# disconnect, nvmet torn down, and no new warnings/errors in dmesg. Check names: nvmeof-DEV-STEP.
# Figures: "[e2e] figure DEV nvmeof-write|nvmeof-read 64MiB VALUE MB/s (...)" (MB = 10^6 bytes).
#
# Devices: e2e.devs=DEV[,DEV...] on the kernel command line (run.sh --append), else $NVMEOF_DEVS,
# else "vmw_pvrdma0 rxe0". A missing device is a FAIL line (nvmeof-DEV-present), not a skip.
#
# Device selection: rdma_cm picks the RDMA device for an IP by the netdev that owns it (first device
# whose GID table has it). vmw_pvrdma0's GID table holds eth0's addresses AND those of eth0's upper
# devices (macvlan, vlan), so rxe0 on eth0, on a second IP of eth0 or on a macvlan of eth0 would lose
# to vmw_pvrdma0. rxe0 therefore gets its own netdev: a dummy interface "nvmeof0" with 10.0.9.1/24
# (rxe loops packets between its own addresses back without transmitting). vmw_pvrdma0 uses eth0's
# address (10.0.2.15). Both can exist at once, in any order; the nvmeof-DEV-device check confirms from
# `rdma resource show cm_id` that the nvme_rdma and nvmet_rdma cm_ids sit on the intended device.
#
# Every wait is bounded; a command stuck in the kernel is abandoned (the run then ends by run.sh's timeout
# at worst, not here). Connect uses ctrl_loss_tmo=30 so a broken path fails I/O instead of retrying 600 s.
. /e2e-lib.sh

opt() { for o in $(cat /proc/cmdline); do case $o in "$1="*) echo "${o#*=}"; return 0 ;; esac; done; return 1; }
DEVS=$(opt e2e.devs | tr ',' ' ') || DEVS=""
[ -n "$DEVS" ] || DEVS=${NVMEOF_DEVS:-"vmw_pvrdma0 rxe0"}
RXE_NETDEV=nvmeof0
RXE_IP=10.0.9.1
# rxe asks its netdev for the link speed and the dummy has none (level 4, harmless)
NVMEOF_DMESG_OK="^$RXE_NETDEV speed is unknown, defaulting to "
# NVMe-oF helpers (nvmeof_*: modules, pattern, target, connect, dd, checks) are in /e2e-lib.sh
say "nvmeof: devices: $DEVS"

# ---- once: modules, configfs, RAM disk, the pattern -------------------------------------------------
check nvmeof-modules nvmeof_load_modules
check nvmeof-pattern nvmeof_pattern
lsmod | awk 'NR > 1 && /nvme|brd|rdma|rxe/ {print "[e2e]   module " $1}'

# ---- per device helpers --------------------------------------------------------------------------
netdev_of() { rdma link show "$1/1" 2>/dev/null | sed -n 's/.* netdev \([^ ]*\).*/\1/p'; }
ipv4_of() { ip -4 -o addr show dev "$1" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -n1; }

rxe_up() {
    [ -e /sys/class/infiniband/rxe0 ] && { say "rxe0 exists already (netdev $(netdev_of rxe0))"; return 0; }
    modprobe crc32_generic 2>/dev/null   # 6.12 needs it before "rdma link add"; newer kernels have none
    modprobe dummy numdummies=0 || return 1
    ip link add "$RXE_NETDEV" type dummy || return 1
    ip addr add "$RXE_IP/24" dev "$RXE_NETDEV" || return 1
    ip link set "$RXE_NETDEV" up || return 1
    modprobe rdma_rxe || return 1
    rdma link add rxe0 type rxe netdev "$RXE_NETDEV"
}
rxe_down() {
    rdma link delete rxe0 && ip link del "$RXE_NETDEV"
}
present() { # DEV
    [ "$1" = rxe0 ] && { rxe_up || return 1; }
    wait_dev_active "$1" 30
}

# the nvme_rdma (host) and nvmet_rdma (target) cm_ids must all be on DEV
on_device() { # DEV
    local q
    rdma resource show | sed 's/^/[e2e]   resources: /'
    q=$(nvmeof_cm_ids)
    echo "$q" | sed 's/^/[e2e]   cm_id: /'
    echo "$q" | grep -q 'comm \[nvme_rdma\]' && echo "$q" | grep -q 'comm \[nvmet_rdma\]' &&
        ! echo "$q" | grep -qv "^link $1/"
}

# ---- per device --------------------------------------------------------------------------------
i=0
for dev in $DEVS; do
    i=$((i + 1))
    P=nvmeof-$dev
    NQN=nqn.2024-01.io.pvrdma.e2e:$dev
    say "---- $dev"
    mark="e2e-nvmeof: $dev start $(uptime_s)"
    echo "$mark" >/dev/kmsg
    if ! check "$P-present" present "$dev"; then
        ls /sys/class/infiniband/ 2>&1 | sed 's/^/[e2e]   /'
        continue
    fi
    nd=$(netdev_of "$dev")
    ip=$(ipv4_of "$nd")
    say "$dev: netdev ${nd:-?}, address ${ip:-?}"
    check "$P-address" test -n "$ip" || continue
    if check "$P-target" nvmeof_target_up "$NQN" "$i" "$ip"; then
        CTRL=""; NS=""
        if check "$P-connect" nvmeof_connect "$NQN" "$ip"; then
            check "$P-device" on_device "$dev"
            if check "$P-write" nvmeof_write "$dev"; then
                check "$P-read" nvmeof_read "$dev" && check "$P-verify" nvmeof_verify
                check "$P-target-data" nvmeof_target_data
            fi
            check "$P-disconnect" nvmeof_disconnect
        elif [ -n "$CTRL" ] && [ -e "/sys/class/nvme/$CTRL" ]; then
            nvmeof_disconnect   # half-made controller: remove it, not a check of its own
        fi
    fi
    check "$P-target-down" nvmeof_target_down "$NQN" "$i"
    [ "$dev" = rxe0 ] && [ -e "/sys/class/net/$RXE_NETDEV" ] && check "$P-remove" rxe_down
    check "$P-dmesg" nvmeof_dmesg_clean "$mark"
done
rm -f /tmp/nvmeof.pat
finish
