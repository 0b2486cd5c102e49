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
SIZE_MB=64                          # MiB written and read
BYTES=$((SIZE_MB * 1048576))
RXE_NETDEV=nvmeof0
RXE_IP=10.0.9.1
CFG=/sys/kernel/config/nvmet
say "nvmeof: devices: $DEVS"

# children PID: the processes whose parent is PID (busybox here has no pkill)
children() { awk -v p="$1" '$4 == p {print $1}' /proc/[0-9]*/stat 2>/dev/null; }
# bounded SECS CMD...: run CMD in the background, wait at most SECS; on timeout TERM then KILL it and its
# children and return 124 without waiting for a task that stays stuck (in the kernel).
bounded() {
    local secs=$1 pid n=0 kids
    shift
    "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        n=$((n + 1))
        if [ $n -gt $((secs * 4)) ]; then
            say "timeout after ${secs}s: $*"
            kids=$(children "$pid")
            kill -TERM $kids "$pid" 2>/dev/null
            sleep 2
            kill -KILL $kids "$pid" 2>/dev/null
            sleep 1
            kill -0 "$pid" 2>/dev/null || wait "$pid"
            return 124
        fi
        sleep 0.25
    done
    wait "$pid"
}

# ---- once: modules, configfs, RAM disk, the pattern -------------------------------------------------
load_modules() {
    local m
    for m in nvme_core nvme_fabrics nvme_rdma nvmet nvmet_rdma; do
        modprobe "$m" || { say "modprobe $m failed"; return 1; }
    done
    # one 128 MiB RAM disk (/dev/ram0), the namespace's backing store for every device's run
    modprobe brd rd_nr=1 rd_size=131072 || { say "modprobe brd failed"; return 1; }
    wait_for 10 test -b /dev/ram0 || { say "no /dev/ram0"; return 1; }
    grep -q ' /sys/kernel/config ' /proc/mounts || mount -t configfs none /sys/kernel/config || return 1
    [ -d "$CFG" ] || { say "no $CFG"; return 1; }
    [ -c /dev/nvme-fabrics ] || wait_for 10 test -c /dev/nvme-fabrics
}
make_pattern() {
    dd if=/dev/urandom of=/tmp/nvmeof.pat bs=1M count="$SIZE_MB" 2>/dev/null &&
        [ "$(wc -c </tmp/nvmeof.pat)" = "$BYTES" ] &&
        PAT_SUM=$(sha256sum </tmp/nvmeof.pat | cut -d' ' -f1) && say "pattern sha256 $PAT_SUM"
}
check nvmeof-modules load_modules
check nvmeof-pattern make_pattern
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

target_up() { # NQN PORTID IP
    local s=$CFG/subsystems/$1 p=$CFG/ports/$2
    mkdir "$s" &&
        echo 1 >"$s/attr_allow_any_host" &&
        mkdir "$s/namespaces/1" &&
        printf /dev/ram0 >"$s/namespaces/1/device_path" &&
        echo 1 >"$s/namespaces/1/enable" &&
        mkdir "$p" &&
        echo rdma >"$p/addr_trtype" &&
        echo ipv4 >"$p/addr_adrfam" &&
        echo "$3" >"$p/addr_traddr" &&
        echo 4420 >"$p/addr_trsvcid" &&
        ln -s "$s" "$p/subsystems/$1"      # enables the port: nvmet_rdma binds and listens here
}
target_down() { # NQN PORTID
    local s=$CFG/subsystems/$1 p=$CFG/ports/$2 rc=0
    [ -L "$p/subsystems/$1" ] && { rm "$p/subsystems/$1" || rc=1; }
    [ -d "$p" ] && { rmdir "$p" || rc=1; }
    [ -d "$s/namespaces/1" ] && { echo 0 >"$s/namespaces/1/enable"; rmdir "$s/namespaces/1" || rc=1; }
    [ -d "$s" ] && { rmdir "$s" || rc=1; }
    return $rc
}

ctrls() { ls /sys/class/nvme 2>/dev/null | grep -E '^nvme[0-9]+$' | sort; }
nsdevs() { ls /sys/block 2>/dev/null | grep -E '^nvme[0-9]+n[0-9]+$' | sort; }
# the one entry of list $2 that is not in list $1
new_entry() { for x in $2; do case " $1 " in *" $x "*) ;; *) echo "$x"; return 0 ;; esac; done; return 1; }

ns_appeared() { NS=$(new_entry "$BEFORE_N" "$(nsdevs)"); }
# connect NQN IP: the host side, through /dev/nvme-fabrics (one write of the options; reading the same
# descriptor returns "instance=N,cntlid=M"). Sets CTRL and NS.
connect() {
    local before_c before_n opts
    before_c=$(ctrls); before_n=$(nsdevs)
    opts="transport=rdma,traddr=$2,trsvcid=4420,nqn=$1,ctrl_loss_tmo=30"
    say "connect: $opts"
    bounded 120 sh -c 'exec 3<>/dev/nvme-fabrics || exit 1
        printf "%s" "$1" >&3 || { echo "[e2e]   write to /dev/nvme-fabrics failed"; exit 1; }
        read -r r <&3; echo "[e2e]   /dev/nvme-fabrics: $r"' connect "$opts" || return 1
    CTRL=$(new_entry "$before_c" "$(ctrls)") || { say "no new controller in /sys/class/nvme"; return 1; }
    say "controller $CTRL: $(cat /sys/class/nvme/$CTRL/transport) $(cat /sys/class/nvme/$CTRL/address) $(cat /sys/class/nvme/$CTRL/subsysnqn) state $(cat /sys/class/nvme/$CTRL/state)"
    [ "$(cat /sys/class/nvme/$CTRL/subsysnqn)" = "$1" ] || { say "$CTRL is not $1"; return 1; }
    BEFORE_N=$before_n
    wait_for 30 ns_appeared || { say "no new nvmeXnY block device"; return 1; }
    wait_for 10 test -b "/dev/$NS" || { say "no /dev/$NS"; return 1; }
    say "namespace /dev/$NS: $(($(cat /sys/block/$NS/size) / 2048)) MiB"
    [ "$(cat /sys/block/$NS/size)" = "$((131072 * 2))" ]
}
# the rdma_cm IDs of nvme_rdma (host) and nvmet_rdma (target: the listener and one per queue) must all
# be on DEV (their QPs show up as "comm [rdma_cm]", so the cm_ids are what names the user)
on_device() { # DEV
    local q
    rdma resource show | sed 's/^/[e2e]   resources: /'
    q=$(rdma resource show cm_id 2>/dev/null | grep -E 'comm \[nvmet?_rdma\]')
    echo "$q" | sed 's/^/[e2e]   cm_id: /'
    echo "$q" | grep -q 'comm \[nvme_rdma\]' && echo "$q" | grep -q 'comm \[nvmet_rdma\]' &&
        ! echo "$q" | grep -qv "^link $1/"
}

xfer() { # NAME(write|read) DD-ARGS...: dd with timing into /tmp/nvmeof.NAME.t
    local name=$1 t0 t1 rc
    shift
    t0=$(uptime_s)
    dd "$@" 2>"/tmp/nvmeof.$name.dd"
    rc=$?
    t1=$(uptime_s)
    sed "s/^/[e2e]   dd: /" "/tmp/nvmeof.$name.dd"
    echo "$t0 $t1" >"/tmp/nvmeof.$name.t"
    [ $rc = 0 ] && grep -q "^$SIZE_MB+0 records out" "/tmp/nvmeof.$name.dd"
}
figure() { # DEV NAME FLAG
    awk -v d="$1" -v n="$2" -v b="$BYTES" -v mb="$SIZE_MB" -v f="$3" '{ s = $2 - $1; if (s <= 0) s = 0.01;
        printf "[e2e] figure %s nvmeof-%s %dMiB %.1f MB/s (%.2f s, dd bs=1M %s)\n", d, n, mb, b / 1e6 / s, s, f }' \
        "/tmp/nvmeof.$2.t"
}
write_data() { # DEV
    bounded 300 xfer write if=/tmp/nvmeof.pat of="/dev/$NS" bs=1M count="$SIZE_MB" oflag=direct &&
        figure "$1" write oflag=direct
}
read_data() { # DEV
    rm -f /tmp/nvmeof.rd
    bounded 300 xfer read if="/dev/$NS" of=/tmp/nvmeof.rd bs=1M count="$SIZE_MB" iflag=direct &&
        figure "$1" read iflag=direct
}
verify_data() {
    local s
    s=$(sha256sum </tmp/nvmeof.rd | cut -d' ' -f1)
    rm -f /tmp/nvmeof.rd
    say "read back sha256 $s"
    [ "$s" = "$PAT_SUM" ]
}
# the target's backing store has the data (O_DIRECT: not a stale page cache of /dev/ram0)
target_data() {
    local s
    s=$(dd if=/dev/ram0 bs=1M count="$SIZE_MB" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    say "target /dev/ram0 sha256 $s"
    [ "$s" = "$PAT_SUM" ]
}
disconnect() {
    [ -e "/sys/class/nvme/$CTRL/delete_controller" ] || { say "no $CTRL"; return 1; }
    bounded 120 sh -c "echo 1 >/sys/class/nvme/$CTRL/delete_controller" || return 1
    wait_for 30 sh -c "[ ! -e /sys/class/nvme/$CTRL ] && [ ! -e /sys/block/$NS ]" ||
        { say "$CTRL or $NS still there"; return 1; }
}
# no kernel messages of level warning or worse (or oops/error-like ones) since MARK, except these known
# harmless ones: rxe asks its netdev for the link speed and the dummy has none ("nvmeof0 speed is
# unknown, defaulting to 1000", level 4); TCG's jittery clock ("clocksource: Long readout interval,
# skipping watchdog check", level 4)
DMESG_OK="^$RXE_NETDEV speed is unknown, defaulting to |^clocksource: Long readout interval, skipping watchdog check"
dmesg_clean() { # MARK
    dmesg -r | awk -v m="$1" 'index($0, m) {on = 1; next} on' >/tmp/nvmeof.dmesg
    say "dmesg since the start of this device's run: $(wc -l </tmp/nvmeof.dmesg) lines"
    sed 's/^/[e2e]   dmesg: /' /tmp/nvmeof.dmesg
    awk -v ok="$DMESG_OK" '{ lvl = 7; if (match($0, /^<[0-9]+>/)) lvl = substr($0, 2, RLENGTH - 2) % 8
                             msg = $0; sub(/^<[0-9]+>\[ *[0-9.]+\] /, "", msg) }
         msg ~ ok { next }
         lvl <= 4 || /Bogus remote invalidation|Oops|BUG:|Call Trace|WARNING:|[Ee]rror|[Ff]ail/ { print; bad = 1 }
         END { exit bad }' /tmp/nvmeof.dmesg >/tmp/nvmeof.dmesg.bad
    local rc=$?
    sed 's/^/[e2e]   bad dmesg line: /' /tmp/nvmeof.dmesg.bad
    return $rc
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
    if check "$P-target" target_up "$NQN" "$i" "$ip"; then
        CTRL=""; NS=""
        if check "$P-connect" connect "$NQN" "$ip"; then
            check "$P-device" on_device "$dev"
            if check "$P-write" write_data "$dev"; then
                check "$P-read" read_data "$dev" && check "$P-verify" verify_data
                check "$P-target-data" target_data
            fi
            check "$P-disconnect" disconnect
        elif [ -n "$CTRL" ] && [ -e "/sys/class/nvme/$CTRL" ]; then
            disconnect   # half-made controller: remove it, not a check of its own
        fi
    fi
    check "$P-target-down" target_down "$NQN" "$i"
    [ "$dev" = rxe0 ] && [ -e "/sys/class/net/$RXE_NETDEV" ] && check "$P-remove" rxe_down
    check "$P-dmesg" dmesg_clean "$mark"
done
rm -f /tmp/nvmeof.pat
finish
