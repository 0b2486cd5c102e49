#!/usr/bin/env bash
# Two (then three) guests on ONE `pvrdma serve`: guests a and b boot side by side, each with its own
# vmxnet3 on a private L2 link (-netdev dgram over two UNIX sockets, no host networking) and its own
# vfio-user-pci device on its own socket of the one server process. a prints E2E-KILL-PEER during a long
# ib_write_bw against b: b's QEMU gets SIGKILL. a prints E2E-BOOT-PEER: guest c boots on b's socket (the
# server gives it a fresh device) with b's MAC and IP. The guest script (default guest/vm2vm.sh) gets its
# role on the kernel command line: e2e.role=a|b|c e2e.ip=ADDR/24 e2e.peer=ADDR (and e2e.dev=rxe0 with
# --no-device).
#
#   tests/e2e/vms.sh [--script FILE] [--name NAME] [--bin PATH] [--server-cmd CMD] [--no-device]
#                    [--timeout SECS] [--append KERNEL_ARGS] [--sockdir DIR]
#
#   --script FILE      guest script (default tests/e2e/guest/vm2vm.sh)
#   --name NAME        log name prefix (default: the script's basename without .sh)
#   --bin PATH         pvrdma binary (default <repo>/target/release/pvrdma)
#   --server-cmd CMD   the server (bash -c; use exec), must listen on SOCKDIR/a.sock and SOCKDIR/b.sock
#                      (default: exec BIN serve --device socket=SOCKDIR/a.sock,mac=MAC_A
#                                               --device socket=SOCKDIR/b.sock,mac=MAC_B)
#   --no-device        no pvrdma device and no server: the guests run the script on rxe0 (soft-RoCE),
#                      which tests the runner and the script themselves
#   --timeout SECS     bound on each guest's QEMU (default $PVRDMA_E2E_TIMEOUT or 400)
#   --append ARGS      extra kernel command line for every guest
#   --sockdir DIR      directory of the vfio-user sockets (default <repo>/target/e2e-sock/NAME)
#
# Logs: $PVRDMA_E2E_LOGS (default <repo>/target/e2e-logs)/NAME-{a,b,c}.console.log, NAME.server.log.
# Pass: a and c end with "E2E-DONE rc=0"; b reached its last step, printed no FAIL and was killed by
# this runner; the server ran the whole time and exits 0 within 30 s of SIGTERM; nothing timed out.
# The console is streamed to stdout (prefixed [a] [b] [c]) unless PVRDMA_E2E_QUIET=1.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${PVRDMA_E2E_CACHE:-/var/cache/pvrdma-e2e}
ROOT=$CACHE/trixie
LOGS=${PVRDMA_E2E_LOGS:-$REPO/target/e2e-logs}
TIMEOUT=${PVRDMA_E2E_TIMEOUT:-400}
SERVER_STOP_TIMEOUT=${PVRDMA_E2E_SERVER_STOP_TIMEOUT:-30}
SOCKET_WAIT=${PVRDMA_E2E_SOCKET_WAIT:-30}

log() { printf '[e2e-vms %3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

SCRIPT=$HERE/guest/vm2vm.sh; NAME=""; BIN=$REPO/target/release/pvrdma; SERVER_CMD=""; NODEV=""
APPEND=""; SOCKDIR=""
while [ $# -gt 0 ]; do
    case $1 in
        --script) SCRIPT=$2; shift 2 ;;
        --name) NAME=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --server-cmd) SERVER_CMD=$2; shift 2 ;;
        --no-device) NODEV=1; shift ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --append) APPEND=$2; shift 2 ;;
        --sockdir) SOCKDIR=$2; shift 2 ;;
        -h|--help) usage ;;
        *) log "unknown argument $1"; usage ;;
    esac
done
[ -f "$SCRIPT" ] || die "no such guest script: $SCRIPT"
[ "$(id -u)" = 0 ] || die "must run as root (chroot, unshare -m)"
for f in "$CACHE/initrd.img" "$CACHE/vmlinuz" "$ROOT/usr/bin/qemu-system-x86_64"; do
    [ -e "$f" ] || die "$f missing: run tests/e2e/setup.sh first"
done
NAME=${NAME:-$(basename "$SCRIPT" .sh)}
SOCKDIR=${SOCKDIR:-$REPO/target/e2e-sock/$NAME}
mkdir -p "$LOGS" "$SOCKDIR"
LOGS=$(cd "$LOGS" && pwd)
SOCKDIR=$(cd "$SOCKDIR" && pwd)
SERVER_LOG=$LOGS/$NAME.server.log
rm -f "$SERVER_LOG" "$LOGS/$NAME"-[abc].console.log

# The guests. c takes b's place: b's vfio-user socket, MAC, IP and end of the link.
declare -A IP=([a]=10.0.3.1 [b]=10.0.3.2 [c]=10.0.3.2)
declare -A PEER=([a]=10.0.3.2 [b]=10.0.3.1 [c]=10.0.3.1)
declare -A MAC=([a]=52:54:00:12:34:01 [b]=52:54:00:12:34:02 [c]=52:54:00:12:34:02)
declare -A SOCK=([a]=a.sock [b]=b.sock [c]=b.sock)
declare -A LOCAL=([a]=a [b]=b [c]=b)
declare -A REMOTE=([a]=b [b]=a [c]=a)
if [ -z "$NODEV" ] && [ -z "$SERVER_CMD" ]; then
    [ -x "$BIN" ] || die "no pvrdma binary at $BIN"
    SERVER_CMD="exec $BIN serve --device socket=$SOCKDIR/a.sock,mac=${MAC[a]} --device socket=$SOCKDIR/b.sock,mac=${MAC[b]}"
fi

WORK=$(mktemp -d /tmp/pvrdma-e2e-vms.XXXXXX)
SERVER_PID=""
declare -A QPID=() TAILPID=() QRC=() START=()
stop_guest() { # ROLE: SIGTERM to its timeout (which passes it on to QEMU)
    local p=${QPID[$1]:-}
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
}
cleanup() {
    local rc=$? r
    for r in "${!QPID[@]}"; do stop_guest "$r"; done
    for r in "${!QPID[@]}"; do wait "${QPID[$r]}" 2>/dev/null || true; done
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then kill -KILL "$SERVER_PID" 2>/dev/null || true; fi
    for r in "${!TAILPID[@]}"; do kill "${TAILPID[$r]}" 2>/dev/null || true; done
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# initrd = cached initramfs + the guest script as /test.sh and the helper library (one for all guests)
mkdir -p "$WORK/extra" "$WORK/link"
cp "$SCRIPT" "$WORK/extra/test.sh"; chmod 755 "$WORK/extra/test.sh"
cp "$HERE/guest/lib.sh" "$WORK/extra/e2e-lib.sh"
(cd "$WORK/extra" && find . -mindepth 1 | cpio -o -H newc --quiet -R 0:0 | gzip -1) >"$WORK/extra.cpio.gz"
cat "$CACHE/initrd.img" "$WORK/extra.cpio.gz" >"$WORK/initrd.img"
cp "$CACHE/vmlinuz" "$WORK/vmlinuz"

console() { echo "$LOGS/$NAME-$1.console.log"; }
alive() { [ -n "${QPID[$1]:-}" ] && kill -0 "${QPID[$1]}" 2>/dev/null; }
seen() { [ -e "$(console "$1")" ] && tr -d '\r' <"$(console "$1")" | grep -aq "$2"; }

boot() { # ROLE
    local r=$1 dev_args=() log
    log=$(console "$r")
    local append="console=ttyS0 panic=-1 loglevel=6 e2e.role=$r e2e.ip=${IP[$r]}/24 e2e.peer=${PEER[$r]}"
    [ -z "$NODEV" ] || append="$append e2e.dev=rxe0"
    [ -z "$APPEND" ] || append="$append $APPEND"
    if [ -z "$NODEV" ]; then
        [ -S "$SOCKDIR/${SOCK[$r]}" ] || { log "FAIL: $SOCKDIR/${SOCK[$r]} is not a socket"; return 1; }
        dev_args=(-device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"/e2e/sock/${SOCK[$r]}\"},\"addr\":\"0x10.1\",\"x-no-posted-writes\":true}")
    fi
    rm -f "$WORK/link/${LOCAL[$r]}"   # b's end, left behind when b was killed
    local qemu=(qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m 512M -nographic -no-reboot
        -object memory-backend-memfd,id=mem,size=512M,share=on -machine q35,memory-backend=mem
        -kernel /e2e/work/vmlinuz -initrd /e2e/work/initrd.img -append "$append"
        -netdev "dgram,id=n0,local.type=unix,local.path=/e2e/work/link/${LOCAL[$r]},remote.type=unix,remote.path=/e2e/work/link/${REMOTE[$r]}"
        -device "vmxnet3,addr=0x10.0,multifunction=on,netdev=n0,mac=${MAC[$r]}"
        "${dev_args[@]}")
    log "booting $r: ${IP[$r]} mac ${MAC[$r]}$([ -n "$NODEV" ] && echo " (no device)" || echo " on ${SOCK[$r]}"), console log $log"
    (
        exec timeout -k 10 "$TIMEOUT" unshare -m --propagation private /bin/bash -c '
            set -e
            r=$1 work=$2 sockdir=$3; shift 3
            mount --rbind /dev "$r/dev"
            mount -t proc proc "$r/proc"
            mount --rbind /sys "$r/sys"
            mount -t tmpfs tmpfs "$r/tmp"
            mkdir -p "$r/e2e"
            mount -t tmpfs tmpfs "$r/e2e"
            mkdir -p "$r/e2e/work" "$r/e2e/sock"
            mount --bind "$work" "$r/e2e/work"
            mount --bind "$sockdir" "$r/e2e/sock"
            exec chroot "$r" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root "$@"
        ' e2e-qemu "$ROOT" "$WORK" "$SOCKDIR" "${qemu[@]}" </dev/null >"$log" 2>&1
    ) &
    QPID[$r]=$!
    START[$r]=$SECONDS
    if [ "${PVRDMA_E2E_QUIET:-0}" != 1 ]; then
        tail -n +1 -F "$log" 2>/dev/null > >(sed -u "s/^/[$r] /") &
        TAILPID[$r]=$!
    fi
}

reap() { # ROLE: wait for its QEMU (already ended or being stopped), keep the status
    local r=$1 st
    [ -n "${QPID[$r]:-}" ] || return 0
    # (braces: no "Killed" notice from bash when b's timeout re-raises QEMU's SIGKILL)
    { wait "${QPID[$r]}"; } 2>/dev/null && st=0 || st=$?
    QRC[$r]=$st
    unset "QPID[$r]"
    log "$r: QEMU ended (status $st) after $((SECONDS - START[$r]))s"
}

# SIGKILL b's QEMU itself (the child of its timeout; chroot/env/unshare exec into it).
kill_qemu() { # ROLE
    local r=$1 t=${QPID[$1]:-} q comm
    [ -n "$t" ] || return 1
    q=$(pgrep -P "$t" | head -n1 || true)
    [ -n "$q" ] || { log "$r: no QEMU process under $t"; return 1; }
    comm=$(cat "/proc/$q/comm" 2>/dev/null || true)
    case $comm in qemu-system*) ;; *) log "$r: child $q of $t is '$comm', not QEMU"; return 1 ;; esac
    kill -KILL "$q"
    log "$r: sent SIGKILL to QEMU (pid $q)"
}

# ---- server ------------------------------------------------------------------------------------
. "$HERE/server.sh"
if [ -n "$SERVER_CMD" ]; then
    RUST_LOG=${RUST_LOG:-info} server_start "$SERVER_CMD" "$SOCKDIR/a.sock" "$SOCKDIR/b.sock"
fi

# ---- the guests ----------------------------------------------------------------------------------
t0=$SECONDS
fail=()
boot a
boot b
state=ab
t_kill=""; t_c=""
server_died=""
while :; do
    if [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
        server_died=1
        log "server exited while the guests run: stopping them"
        break
    fi
    case $state in
    ab)
        if seen a E2E-KILL-PEER; then
            if alive b; then
                kill_qemu b || fail+=("could not kill b's QEMU")
                t_kill=$SECONDS
                reap b
            else
                fail+=("b had ended before a asked for it to be killed")
            fi
            state=killed
        elif ! alive a; then
            fail+=("a ended before printing E2E-KILL-PEER"); break
        elif ! alive b; then
            fail+=("b ended before it was killed"); break
        fi
        ;;
    killed)
        if seen a E2E-BOOT-PEER; then
            boot c || { fail+=("could not boot c"); break; }
            t_c=$SECONDS
            state=c
        elif ! alive a; then
            fail+=("a ended before printing E2E-BOOT-PEER"); break
        fi
        ;;
    c)
        if ! alive a && ! alive c; then break; fi
        ;;
    esac
    sleep 0.5
done
# stop whatever still runs (only on failure paths), then collect exit statuses
for r in a b c; do
    if alive "$r"; then log "stopping $r"; stop_guest "$r"; fi
    reap "$r"
done
elapsed=$((SECONDS - t0))
for r in "${!TAILPID[@]}"; do sleep 0.3; kill "${TAILPID[$r]}" 2>/dev/null || true; wait "${TAILPID[$r]}" 2>/dev/null || true; done
TAILPID=()

# ---- verdict -----------------------------------------------------------------------------------
server_verdict "the guests"
done_rc() { tr -d '\r' <"$(console "$1")" 2>/dev/null | grep -a -o '^E2E-DONE rc=[0-9]*' | tail -n1 | sed 's/.*rc=//'; }
for r in a c; do
    if [ -z "${QRC[$r]:-}" ]; then fail+=("$r never booted"); continue; fi
    [ "${QRC[$r]}" = 124 ] || [ "${QRC[$r]}" = 137 ] && fail+=("$r: timeout after ${TIMEOUT}s")
    grc=$(done_rc "$r")
    if [ -z "$grc" ]; then fail+=("$r: no E2E-DONE marker (QEMU exit status ${QRC[$r]})")
    elif [ "$grc" != 0 ]; then fail+=("$r: guest test exited $grc"); fi
done
if [ -n "${QRC[b]:-}" ]; then
    seen b 'peer-death: ib_write_bw server' || fail+=("b: never reached the peer-death step")
    if tr -d '\r' <"$(console b)" | grep -aq '^\[e2e\] FAIL'; then fail+=("b: a check failed"); fi
    [ -n "$t_kill" ] || fail+=("b was not killed")
    [ -z "$(done_rc b)" ] || fail+=("b: ended by itself (E2E-DONE rc=$(done_rc b))")
fi
if [ -s "$SERVER_LOG" ] && grep -Eq ' (WARN|ERROR) ' "$SERVER_LOG"; then
    log "server log: $(grep -Ec ' (WARN|ERROR) ' "$SERVER_LOG") WARN/ERROR line(s), the first ones:"
    grep -E ' (WARN|ERROR) ' "$SERVER_LOG" | head -n 10 | cut -c1-300 >&2
fi
log "timeline: a and b booted at 0s${t_kill:+, b killed at $((t_kill - t0))s}${t_c:+, c booted at $((t_c - t0))s}, all ended at ${elapsed}s"
if [ ${#fail[@]} -gt 0 ]; then
    for f in "${fail[@]}"; do log "FAIL: $f"; done
    for r in a b c; do
        [ -e "$(console "$r")" ] || continue
        log "console log of $r: $(console "$r")"
        [ "${PVRDMA_E2E_QUIET:-0}" = 1 ] && tail -n 30 "$(console "$r")" | sed "s/^/[$r] /" >&2
    done
    exit 1
fi
log "PASS $NAME in ${elapsed}s (console logs: $LOGS/$NAME-{a,b,c}.console.log)"
