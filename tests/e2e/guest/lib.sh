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
