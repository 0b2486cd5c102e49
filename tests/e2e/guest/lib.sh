# Helpers for the guest test scripts (busybox sh). run.sh puts this file at /e2e-lib.sh;
# a test starts with: . /e2e-lib.sh
# Everything under TCG runs 5-45x slower than native: timeouts below are generous.

DEV=${DEV:-vmw_pvrdma0}
FAILED=""
PASSED=""

say() { echo "[e2e] $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

# check NAME CMD...: run CMD, record pass/fail, never abort
check() {
    local name=$1 t0 rc
    shift
    t0=$(uptime_s)
    if "$@"; then
        PASSED="$PASSED $name"
        say "PASS $name ($(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN{printf "%.1f", b-a}')s)"
        return 0
    else
        rc=$?
        FAILED="$FAILED $name"
        say "FAIL $name (rc=$rc)"
        return $rc
    fi
}

# finish: summary line and exit status for /init
finish() {
    say "passed:${PASSED:- none}"
    say "failed:${FAILED:- none}"
    [ -z "$FAILED" ]
    exit $?
}

# wait_for SECS CMD...: poll CMD every 0.5 s until it succeeds
wait_for() {
    local secs=$1 n=0
    shift
    while ! "$@" >/dev/null 2>&1; do
        n=$((n + 1))
        [ $n -ge $((secs * 2)) ] && return 1
        sleep 0.5
    done
    return 0
}

# is TCP port $1 in LISTEN state (IPv4 or IPv6)?
tcp_listening() {
    local hex
    hex=$(printf '%04X' "$1")
    cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v p=":$hex" '$2 ~ p"$" && $4 == "0A" {f=1} END {exit !f}'
}

port_active() { # DEV
    cat "/sys/class/infiniband/$1/ports/1/state" 2>/dev/null | grep -q ACTIVE
}

# wait until DEV exists and port 1 is ACTIVE
wait_dev_active() {
    local d
    d=${1:-$DEV}
    wait_for "${2:-30}" port_active "$d" || {
        say "$d: port 1 not ACTIVE"
        ls /sys/class/infiniband/ 2>&1
        cat "/sys/class/infiniband/$d/ports/1/state" 2>&1
        return 1
    }
}

# pair NAME PORT SERVER_CMD -- CLIENT_CMD: run a server in the background, wait for it to listen on
# PORT, run the client against it, wait for both; both must exit 0. Output of each is printed.
pair() {
    local name=$1 port=$2 srv="" cli spid crc src
    shift 2
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do srv="$srv $1"; shift; done
    shift
    cli="$*"
    say "$name: server:$srv"
    timeout 300 $srv >"/tmp/$name.srv" 2>&1 &
    spid=$!
    if ! wait_for 60 tcp_listening "$port"; then
        say "$name: server did not listen on port $port"
        kill "$spid" 2>/dev/null
        wait "$spid"
        sed "s/^/[$name srv] /" "/tmp/$name.srv"
        return 1
    fi
    say "$name: client: $cli"
    timeout 300 $cli >"/tmp/$name.cli" 2>&1
    crc=$?
    [ $crc = 0 ] || sleep 2
    [ $crc = 0 ] || kill "$spid" 2>/dev/null
    wait "$spid"
    src=$?
    sed "s/^/[$name srv] /" "/tmp/$name.srv"
    sed "s/^/[$name cli] /" "/tmp/$name.cli"
    say "$name: server rc=$src client rc=$crc"
    [ $src = 0 ] && [ $crc = 0 ]
}

# Bring up rxe0 (Soft-RoCE over eth0) beside vmw_pvrdma0, for perftest on both in one boot.
both_devices_up() {
    wait_dev_active vmw_pvrdma0 30 || return 1
    modprobe crc32_generic 2>/dev/null || true
    check rxe-up sh -c 'modprobe rdma_rxe && rdma link add rxe0 type rxe netdev eth0'
    check rxe0-active wait_dev_active rxe0 30
}

# perf_pair DEV GIDX TOOL ARGS...: perftest TOOL on DEV with GID index GIDX, server and client in
# this guest over 127.0.0.1, each run on the next TCP port from PERF_PORT.
PERF_PORT=18700
perf_pair() {
    local dev=$1 x=$2 tool=$3
    shift 3
    PERF_PORT=$((PERF_PORT + 1))
    check "$tool@$dev" pair "$tool-$dev" "$PERF_PORT" "$tool" -d "$dev" -x "$x" -F -p "$PERF_PORT" "$@" -- \
        "$tool" -d "$dev" -x "$x" -F -p "$PERF_PORT" "$@" 127.0.0.1
}

# rping_pair ADDR PORT: rping server and client on ADDR (rdma_cm resolves the device), 20 pings.
rping_pair() {
    local addr=$1 port=$2 srv_rc cli_rc spid
    rping -s -a "$addr" -p "$port" -C 20 -v > /tmp/rping-srv.log 2>&1 &
    spid=$!
    sleep 2
    timeout 120 rping -c -a "$addr" -p "$port" -C 20 -v > /tmp/rping-cli.log 2>&1
    cli_rc=$?
    wait "$spid"
    srv_rc=$?
    sed 's/^/[rping srv] /' /tmp/rping-srv.log | tail -n 5
    sed 's/^/[rping cli] /' /tmp/rping-cli.log | tail -n 5
    say "rping: server rc=$srv_rc client rc=$cli_rc"
    [ "$srv_rc" = 0 ] && [ "$cli_rc" = 0 ] && [ "$(grep -c 'ping data' /tmp/rping-cli.log)" -ge 20 ]
}

# ---- NVMe over Fabrics (RDMA) -------------------------------------------------------------------
# Shared by guest/nvmeof.sh (target and host in one guest) and guest/vm2vm.sh (target in one guest,
# host in the other). Knobs (set them after sourcing this file): NVMEOF_MB (MiB written and read),
# NVMEOF_FIG (figure name: "[e2e] figure DEV $NVMEOF_FIG-write|read ..."), NVMEOF_IO_BOUND (s, one
# dd), NVMEOF_DMESG_OK (ERE of harmless kernel messages besides the ones below). Results: PAT_SUM
# (nvmeof_pattern), CTRL and NS (nvmeof_connect). The namespace is a brd RAM disk, /dev/ram0.
NVMEOF_MB=64
NVMEOF_RAM_KB=131072
NVMEOF_CFG=/sys/kernel/config/nvmet
NVMEOF_FIG=nvmeof
NVMEOF_IO_BOUND=300
NVMEOF_DMESG_OK=""

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

# nvmeof_load_modules [host] [target]: the host's modules, the target's (nvmet, configfs and one
# 128 MiB RAM disk /dev/ram0 as the namespace's backing store), or both (no argument)
nvmeof_load_modules() {
    local m mods="" host="" target=""
    [ $# = 0 ] && set -- host target
    for m in "$@"; do case $m in host) host=1 ;; target) target=1 ;; esac; done
    [ -n "$host" ] && mods="nvme_core nvme_fabrics nvme_rdma"
    [ -n "$target" ] && mods="$mods nvmet nvmet_rdma"
    for m in $mods; do
        modprobe "$m" || { say "modprobe $m failed"; return 1; }
    done
    if [ -n "$target" ]; then
        modprobe brd rd_nr=1 rd_size=$NVMEOF_RAM_KB || { say "modprobe brd failed"; return 1; }
        wait_for 10 test -b /dev/ram0 || { say "no /dev/ram0"; return 1; }
        grep -q ' /sys/kernel/config ' /proc/mounts || mount -t configfs none /sys/kernel/config || return 1
        [ -d "$NVMEOF_CFG" ] || { say "no $NVMEOF_CFG"; return 1; }
    fi
    [ -z "$host" ] || [ -c /dev/nvme-fabrics ] || wait_for 10 test -c /dev/nvme-fabrics
}
# the data: NVMEOF_MB MiB from /dev/urandom in /tmp/nvmeof.pat, its sha256 in PAT_SUM
nvmeof_pattern() {
    dd if=/dev/urandom of=/tmp/nvmeof.pat bs=1M count="$NVMEOF_MB" 2>/dev/null &&
        [ "$(wc -c </tmp/nvmeof.pat)" = "$((NVMEOF_MB * 1048576))" ] &&
        PAT_SUM=$(sha256sum </tmp/nvmeof.pat | cut -d' ' -f1) && say "pattern sha256 $PAT_SUM"
}

nvmeof_target_up() { # NQN PORTID IP: subsystem NQN (any host, namespace 1 = /dev/ram0) on port rdma IP:4420
    local s=$NVMEOF_CFG/subsystems/$1 p=$NVMEOF_CFG/ports/$2
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
nvmeof_target_down() { # NQN PORTID
    local s=$NVMEOF_CFG/subsystems/$1 p=$NVMEOF_CFG/ports/$2 rc=0
    [ -L "$p/subsystems/$1" ] && { rm "$p/subsystems/$1" || rc=1; }
    [ -d "$p" ] && { rmdir "$p" || rc=1; }
    [ -d "$s/namespaces/1" ] && { echo 0 >"$s/namespaces/1/enable"; rmdir "$s/namespaces/1" || rc=1; }
    [ -d "$s" ] && { rmdir "$s" || rc=1; }
    return $rc
}
# the rdma_cm IDs of nvme_rdma (host) and nvmet_rdma (target: the listener and one per queue); their
# QPs show up as "comm [rdma_cm]", so the cm_ids are what names the user
nvmeof_cm_ids() { rdma resource show cm_id 2>/dev/null | grep -E 'comm \[nvmet?_rdma\]'; }

nvmeof_ctrls() { ls /sys/class/nvme 2>/dev/null | grep -E '^nvme[0-9]+$' | sort; }
nvmeof_nsdevs() { ls /sys/block 2>/dev/null | grep -E '^nvme[0-9]+n[0-9]+$' | sort; }
# the one entry of list $2 that is not in list $1
new_entry() { for x in $2; do case " $1 " in *" $x "*) ;; *) echo "$x"; return 0 ;; esac; done; return 1; }
nvmeof_ns_appeared() { NS=$(new_entry "$NVMEOF_BEFORE_N" "$(nvmeof_nsdevs)"); }
# nvmeof_connect NQN IP: the host side, through /dev/nvme-fabrics (one write of the options; reading the
# same descriptor returns "instance=N,cntlid=M"), ctrl_loss_tmo=30 so that a broken path fails I/O
# instead of retrying for 600 s. Sets CTRL and NS.
nvmeof_connect() {
    local before_c before_n opts
    before_c=$(nvmeof_ctrls); before_n=$(nvmeof_nsdevs)
    opts="transport=rdma,traddr=$2,trsvcid=4420,nqn=$1,ctrl_loss_tmo=30"
    say "connect: $opts"
    bounded 120 sh -c 'exec 3<>/dev/nvme-fabrics || exit 1
        printf "%s" "$1" >&3 || { echo "[e2e]   write to /dev/nvme-fabrics failed"; exit 1; }
        read -r r <&3; echo "[e2e]   /dev/nvme-fabrics: $r"' connect "$opts" || return 1
    CTRL=$(new_entry "$before_c" "$(nvmeof_ctrls)") || { say "no new controller in /sys/class/nvme"; return 1; }
    say "controller $CTRL: $(cat /sys/class/nvme/$CTRL/transport) $(cat /sys/class/nvme/$CTRL/address) $(cat /sys/class/nvme/$CTRL/subsysnqn) state $(cat /sys/class/nvme/$CTRL/state)"
    [ "$(cat /sys/class/nvme/$CTRL/subsysnqn)" = "$1" ] || { say "$CTRL is not $1"; return 1; }
    NVMEOF_BEFORE_N=$before_n
    wait_for 30 nvmeof_ns_appeared || { say "no new nvmeXnY block device"; return 1; }
    wait_for 10 test -b "/dev/$NS" || { say "no /dev/$NS"; return 1; }
    say "namespace /dev/$NS: $(($(cat /sys/block/$NS/size) / 2048)) MiB"
    [ "$(cat /sys/block/$NS/size)" = "$((NVMEOF_RAM_KB * 2))" ]
}
nvmeof_disconnect() { # (CTRL, NS)
    [ -e "/sys/class/nvme/$CTRL/delete_controller" ] || { say "no $CTRL"; return 1; }
    bounded 120 sh -c "echo 1 >/sys/class/nvme/$CTRL/delete_controller" || return 1
    wait_for 30 sh -c "[ ! -e /sys/class/nvme/$CTRL ] && [ ! -e /sys/block/$NS ]" ||
        { say "$CTRL or $NS still there"; return 1; }
}

nvmeof_xfer() { # NAME(write|read) DD-ARGS...: dd with timing into /tmp/nvmeof.NAME.t
    local name=$1 t0 t1 rc
    shift
    t0=$(uptime_s)
    dd "$@" 2>"/tmp/nvmeof.$name.dd"
    rc=$?
    t1=$(uptime_s)
    sed "s/^/[e2e]   dd: /" "/tmp/nvmeof.$name.dd"
    echo "$t0 $t1" >"/tmp/nvmeof.$name.t"
    [ $rc = 0 ] && grep -q "^$NVMEOF_MB+0 records out" "/tmp/nvmeof.$name.dd"
}
nvmeof_figure() { # DEV NAME FLAG
    awk -v d="$1" -v f="$NVMEOF_FIG" -v n="$2" -v mb="$NVMEOF_MB" -v fl="$3" '{ s = $2 - $1; if (s <= 0) s = 0.01;
        printf "[e2e] figure %s %s-%s %dMiB %.1f MB/s (%.2f s, dd bs=1M %s)\n", d, f, n, mb, mb * 1048576 / 1e6 / s, s, fl }' \
        "/tmp/nvmeof.$2.t"
}
nvmeof_write() { # DEV: the pattern to /dev/$NS with O_DIRECT
    bounded "$NVMEOF_IO_BOUND" nvmeof_xfer write if=/tmp/nvmeof.pat of="/dev/$NS" bs=1M count="$NVMEOF_MB" oflag=direct &&
        nvmeof_figure "$1" write oflag=direct
}
nvmeof_read() { # DEV: /dev/$NS with O_DIRECT into /tmp/nvmeof.rd
    rm -f /tmp/nvmeof.rd
    bounded "$NVMEOF_IO_BOUND" nvmeof_xfer read if="/dev/$NS" of=/tmp/nvmeof.rd bs=1M count="$NVMEOF_MB" iflag=direct &&
        nvmeof_figure "$1" read iflag=direct
}
nvmeof_verify() { # the read-back data is the pattern
    local s
    s=$(sha256sum </tmp/nvmeof.rd | cut -d' ' -f1)
    rm -f /tmp/nvmeof.rd
    say "read back sha256 $s"
    [ "$s" = "$PAT_SUM" ]
}
# nvmeof_target_data [SUM]: the target's backing store has the data (sha256 SUM, default PAT_SUM; read
# with O_DIRECT: not a stale page cache of /dev/ram0)
nvmeof_target_data() {
    local s want=${1:-$PAT_SUM}
    [ -n "$want" ] || { say "no checksum to compare /dev/ram0 with"; return 1; }
    s=$(dd if=/dev/ram0 bs=1M count="$NVMEOF_MB" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    say "target /dev/ram0 sha256 $s"
    [ "$s" = "$want" ]
}
# nvmeof_dmesg_clean MARK: no kernel messages of level warning or worse (or oops/error-like ones) after
# the line containing MARK (the caller wrote it to /dev/kmsg), except $NVMEOF_DMESG_OK, TCG's jittery
# clock ("clocksource: Long readout interval, skipping watchdog check", level 4) and a race of the 6.12
# host in delete_controller (printed as "tolerated"): keep-alive is stopped only in
# nvme_remove_admin_tag_set, after the admin queue went non-live, so a keep-alive queued in between is
# failed by nvme_fail_nonready_command before it ever started: "failed nvme_keep_alive_end_io error=4"
# (BLK_STS_TRANSPORT) and "long keepalive RTT (N ms)" with N absurd (computed from a zero deadline).
# Both only after "Removing ctrl"; an RTT under 2^31 ms or another error number still fails.
nvmeof_dmesg_clean() {
    local ok="^clocksource: Long readout interval, skipping watchdog check" rc
    [ -n "$NVMEOF_DMESG_OK" ] && ok="$ok|$NVMEOF_DMESG_OK"
    dmesg -r | awk -v m="$1" 'index($0, m) {on = 1; next} on' >/tmp/nvmeof.dmesg
    say "dmesg since the mark: $(wc -l </tmp/nvmeof.dmesg) lines"
    sed 's/^/[e2e]   dmesg: /' /tmp/nvmeof.dmesg
    awk -v ok="$ok" '{ lvl = 7; if (match($0, /^<[0-9]+>/)) lvl = substr($0, 2, RLENGTH - 2) % 8
                       msg = $0; sub(/^<[0-9]+>\[ *[0-9.]+\] /, "", msg) }
         msg ~ ok { next }
         msg ~ /^nvme nvme[0-9]+: Removing ctrl: / { removing = 1 }
         removing && msg ~ /^nvme nvme[0-9]+: failed nvme_keep_alive_end_io error=4$/ {
             print "[e2e]   tolerated (keep-alive raced with delete_controller): " msg; next }
         removing && msg ~ /^nvme nvme[0-9]+: long keepalive RTT \([0-9]+ ms\)$/ {
             n = msg; sub(/.*RTT \(/, "", n); sub(/ ms\)$/, "", n)
             if (n + 0 >= 2147483648) { print "[e2e]   tolerated (keep-alive raced with delete_controller): " msg; next } }
         lvl <= 4 || /Bogus remote invalidation|Oops|BUG:|Call Trace|WARNING:|[Ee]rror|[Ff]ail/ {
             print "[e2e]   bad dmesg line: " $0; bad = 1 }
         END { exit bad }' /tmp/nvmeof.dmesg
}
