#!/bin/sh
# /init of the e2e initramfs (busybox sh). Brings up the guest, loads the RDMA modules, runs /test.sh
# (appended by run.sh), prints "E2E-DONE rc=<code>" and powers off.
# Kernel command line knobs: e2e.noload (load no RDMA modules), e2e.shell (shell on the console at the end),
# e2e.ip=ADDR/LEN (static address on eth0, no user-net default), e2e.role=NAME (hostname; for the script).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1
hostname guest

say() { echo "[e2e-init] $*"; }
cmdline=$(cat /proc/cmdline)
has_opt() { case " $cmdline " in *" $1 "*) return 0 ;; esac; return 1; }

say "kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpus, uptime $(cut -d' ' -f1 /proc/uptime)s"

# Network: vmxnet3 first (vmw_pvrdma pairs with the bound vmxnet3 at function 0 of its slot).
modprobe vmxnet3 || say "modprobe vmxnet3 failed"
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
# e2e.ip=ADDR/LEN: that address on eth0 and no default route (a private link between guests, e.g.
# vms.sh); otherwise QEMU user networking's 10.0.2.15/24 via 10.0.2.2.
opt_val() { for o in $cmdline; do case $o in "$1="*) echo "${o#*=}"; return 0 ;; esac; done; return 1; }
E2E_IP=$(opt_val e2e.ip)
E2E_ROLE=$(opt_val e2e.role) && hostname "$E2E_ROLE"
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    if [ -n "$E2E_IP" ]; then
        ip addr add "$E2E_IP" dev eth0
        say "eth0 $E2E_IP $(cat /sys/class/net/eth0/address)"
    else
        ip addr add 10.0.2.15/24 dev eth0
        ip route add default via 10.0.2.2 dev eth0 2>/dev/null
    fi
else
    say "no eth0"
fi

if ! has_opt e2e.noload; then
    for m in ib_core ib_uverbs ib_umad rdma_cm rdma_ucm; do
        modprobe "$m" || say "modprobe $m failed"
    done
    modprobe vmw_pvrdma || say "modprobe vmw_pvrdma failed"
fi
say "modules: $(lsmod | awk 'NR > 1 {print $1}' | tr '\n' ' ')"

rc=0
if [ -f /test.sh ]; then
    say "running /test.sh (uptime $(cut -d' ' -f1 /proc/uptime)s)"
    sh /test.sh
    rc=$?
    say "/test.sh exited $rc (uptime $(cut -d' ' -f1 /proc/uptime)s)"
else
    say "no /test.sh"
fi
echo
echo "E2E-DONE rc=$rc"
if has_opt e2e.shell; then
    setsid cttyhack sh
fi
sync
poweroff -f
sleep 2
echo o >/proc/sysrq-trigger
sleep 10
