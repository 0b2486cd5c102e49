#!/usr/bin/env bash
# Smoke test of the e2e tooling itself, with no pvrdma device: set up (cached), boot the guest with
# guest/hello.sh and require a pass. With --runner-checks it also checks that run.sh fails when it
# should (guest rc != 0, server exiting early, server exiting non-zero on SIGTERM) and passes with a
# well-behaved --server-cmd.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
t0=$SECONDS
"$HERE/setup.sh"
t1=$SECONDS
echo "[e2e-smoke] setup: $((t1 - t0))s"
"$HERE/run.sh" "$HERE/guest/hello.sh" --name smoke
t2=$SECONDS
echo "[e2e-smoke] boot: $((t2 - t1))s"

if [ "${1:-}" = --runner-checks ]; then
    export PVRDMA_E2E_QUIET=1
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    expect() { # WANT(pass|fail) DESCRIPTION RUN.SH-ARGS...
        local want=$1 what=$2; shift 2
        if "$HERE/run.sh" "$@" >"$tmp/out" 2>&1; then got=pass; else got=fail; fi
        if [ "$got" = "$want" ]; then echo "[e2e-smoke] ok: $what ($got)"; else
            cat "$tmp/out"; echo "[e2e-smoke] WRONG: $what: got $got, want $want"; exit 1; fi
    }
    printf '#!/bin/sh\necho failing on purpose\nexit 3\n' >"$tmp/fail.sh"
    expect fail "guest rc 3" "$tmp/fail.sh" --name smoke-guest-fail
    expect pass "server that exits 0 on SIGTERM" "$HERE/guest/hello.sh" --name smoke-server-ok \
        --server-cmd 'trap "exit 0" TERM; sleep 1000 & wait'
    expect fail "server that exits 1 on SIGTERM" "$HERE/guest/hello.sh" --name smoke-server-bad \
        --server-cmd 'trap "exit 1" TERM; sleep 1000 & wait'
    expect fail "server dying while the guest runs" "$HERE/guest/hello.sh" --name smoke-server-dies \
        --server-cmd 'sleep 3; exit 0'
    expect fail "server never creating its socket" "$HERE/guest/hello.sh" --name smoke-no-socket \
        --socket "$tmp/never.sock" --server-cmd 'exit 0'
    echo "[e2e-smoke] runner checks: $((SECONDS - t2))s"
fi
echo "[e2e-smoke] PASS in $((SECONDS - t0))s"
