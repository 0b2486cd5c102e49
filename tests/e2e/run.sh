#!/usr/bin/env bash
# Boot the e2e guest under QEMU (TCG) with TEST_SCRIPT as /test.sh and check the result.
#
#   tests/e2e/run.sh TEST_SCRIPT [--socket PATH] [--server-cmd CMD] [--timeout SECS] [--name NAME]
#                    [--append KERNEL_ARGS] [--qemu-arg ARG]... [--add FILE]...
#
#   --socket PATH      add the PVRDMA device: -device vfio-user-pci on PATH (unix socket) at 00:10.1
#   --server-cmd CMD   start CMD (bash -c) before QEMU, wait for --socket to appear, and after the
#                      guest ends stop it with SIGTERM and require exit status 0. The run also fails
#                      if the server exits before the guest ends (QEMU would not notice).
#   --timeout SECS     bound on the whole boot (default $PVRDMA_E2E_TIMEOUT or 300)
#   --name NAME        log name (default: TEST_SCRIPT's basename without .sh)
#   --append ARGS      extra kernel command line (e.g. e2e.noload)
#   --qemu-arg ARG     extra QEMU argument (repeatable)
#   --add FILE         put FILE into the guest as /add/BASENAME (repeatable; e.g. a test binary)
#
# Logs: $PVRDMA_E2E_LOGS (default <repo>/target/e2e-logs)/NAME.console.log and NAME.server.log.
# Fails on: timeout, missing "E2E-DONE rc=" marker, non-zero rc, server not exiting 0.
# Set PVRDMA_E2E_QUIET=1 to not stream the console to stdout.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${PVRDMA_E2E_CACHE:-/var/cache/pvrdma-e2e}
ROOT=$CACHE/trixie
LOGS=${PVRDMA_E2E_LOGS:-$REPO/target/e2e-logs}
TIMEOUT=${PVRDMA_E2E_TIMEOUT:-300}
SERVER_STOP_TIMEOUT=${PVRDMA_E2E_SERVER_STOP_TIMEOUT:-30}
SOCKET_WAIT=${PVRDMA_E2E_SOCKET_WAIT:-30}

log() { printf '[e2e-run %3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

TEST=""; SOCKET=""; SERVER_CMD=""; NAME=""; APPEND=""; QEMU_EXTRA=(); ADD=()
while [ $# -gt 0 ]; do
    case $1 in
        --socket) SOCKET=$2; shift 2 ;;
        --server-cmd) SERVER_CMD=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --name) NAME=$2; shift 2 ;;
        --append) APPEND=$2; shift 2 ;;
        --qemu-arg) QEMU_EXTRA+=("$2"); shift 2 ;;
        --add) [ -f "$2" ] || die "--add: no such file: $2"; ADD+=("$2"); shift 2 ;;
        -h|--help) usage ;;
        -*) log "unknown option $1"; usage ;;
        *) [ -z "$TEST" ] || usage; TEST=$1; shift ;;
    esac
done
[ -n "$TEST" ] || usage
[ -f "$TEST" ] || die "no such test script: $TEST"
[ "$(id -u)" = 0 ] || die "must run as root (chroot, unshare -m)"
for f in "$CACHE/initrd.img" "$CACHE/vmlinuz" "$ROOT/usr/bin/qemu-system-x86_64"; do
    [ -e "$f" ] || die "$f missing: run tests/e2e/setup.sh first"
done
NAME=${NAME:-$(basename "$TEST" .sh)}
mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)
CONSOLE_LOG=$LOGS/$NAME.console.log
SERVER_LOG=$LOGS/$NAME.server.log
rm -f "$CONSOLE_LOG" "$SERVER_LOG"

WORK=$(mktemp -d /tmp/pvrdma-e2e.XXXXXX)
SERVER_PID=""; QEMU_PID=""
cleanup() {
    local rc=$?
    [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null || true
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# initrd = cached initramfs + a second archive with /test.sh (and the helper library)
mkdir -p "$WORK/extra"
cp "$TEST" "$WORK/extra/test.sh"; chmod 755 "$WORK/extra/test.sh"
[ -f "$HERE/guest/lib.sh" ] && cp "$HERE/guest/lib.sh" "$WORK/extra/e2e-lib.sh"
if [ ${#ADD[@]} -gt 0 ]; then
    mkdir -p "$WORK/extra/add"
    for f in "${ADD[@]}"; do cp "$f" "$WORK/extra/add/"; done
fi
(cd "$WORK/extra" && find . -mindepth 1 | cpio -o -H newc --quiet -R 0:0 | gzip -1) >"$WORK/extra.cpio.gz"
cat "$CACHE/initrd.img" "$WORK/extra.cpio.gz" >"$WORK/initrd.img"
cp "$CACHE/vmlinuz" "$WORK/vmlinuz"

QEMU=(qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 1G -nographic -no-reboot
      -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem
      -kernel /e2e/work/vmlinuz -initrd /e2e/work/initrd.img
      -append "console=ttyS0 panic=-1 loglevel=6 $APPEND"
      -netdev user,id=n0 -device vmxnet3,addr=0x10.0,multifunction=on,netdev=n0)
SOCKDIR=""
if [ -n "$SOCKET" ]; then
    case $SOCKET in /*) ;; *) SOCKET=$PWD/$SOCKET ;; esac
    SOCKDIR=$(dirname "$SOCKET")
    [ -d "$SOCKDIR" ] || die "socket directory $SOCKDIR does not exist"
    QEMU+=(-device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"/e2e/sock/$(basename "$SOCKET")\"},\"addr\":\"0x10.1\",\"x-no-posted-writes\":true}")
fi
QEMU+=("${QEMU_EXTRA[@]}")

# ---- server ------------------------------------------------------------------------------------
. "$HERE/server.sh"
if [ -n "$SERVER_CMD" ]; then
    if [ -n "$SOCKET" ]; then server_start "$SERVER_CMD" "$SOCKET"; else server_start "$SERVER_CMD"; fi
fi

# ---- QEMU, from the trixie chroot, in a private mount namespace -----------------------------------
log "booting guest: test $TEST, timeout ${TIMEOUT}s, console log $CONSOLE_LOG"
start=$SECONDS
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
        [ -z "$sockdir" ] || mount --bind "$sockdir" "$r/e2e/sock"
        exec chroot "$r" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root "$@"
    ' e2e-qemu "$ROOT" "$WORK" "$SOCKDIR" "${QEMU[@]}" </dev/null >"$CONSOLE_LOG" 2>&1
) &
QEMU_PID=$!
TAIL_PID=""
if [ "${PVRDMA_E2E_QUIET:-0}" != 1 ]; then
    tail -n +1 -F "$CONSOLE_LOG" 2>/dev/null &
    TAIL_PID=$!
fi

server_died=""
while kill -0 "$QEMU_PID" 2>/dev/null; do
    if [ -n "$SERVER_PID" ] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
        server_died=1
        log "server exited while the guest runs: stopping QEMU"
        kill "$QEMU_PID" 2>/dev/null || true
        pkill -TERM -P "$QEMU_PID" 2>/dev/null || true
        break
    fi
    sleep 0.5
done
wait "$QEMU_PID" && qemu_rc=0 || qemu_rc=$?
QEMU_PID=""
elapsed=$((SECONDS - start))
if [ -n "$TAIL_PID" ]; then sleep 0.3; kill "$TAIL_PID" 2>/dev/null || true; wait "$TAIL_PID" 2>/dev/null || true; fi

# ---- verdict -----------------------------------------------------------------------------------
fail=()
server_verdict "the guest"
[ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ] && fail+=("timeout after ${TIMEOUT}s")
marker=$(tr -d '\r' <"$CONSOLE_LOG" | grep -a -o '^E2E-DONE rc=[0-9]*' | tail -n1 || true)
if [ -z "$marker" ]; then
    fail+=("no E2E-DONE marker in the console log (QEMU exit status $qemu_rc)")
else
    grc=${marker#E2E-DONE rc=}
    [ "$grc" = 0 ] || fail+=("guest test exited $grc")
fi
if [ ${#fail[@]} -gt 0 ]; then
    for f in "${fail[@]}"; do log "FAIL: $f"; done
    log "console log: $CONSOLE_LOG"
    [ "${PVRDMA_E2E_QUIET:-0}" = 1 ] && tail -n 40 "$CONSOLE_LOG" >&2
    exit 1
fi
log "PASS $NAME in ${elapsed}s (console log: $CONSOLE_LOG)"
