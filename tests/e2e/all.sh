#!/usr/bin/env bash
# The whole real-guest suite: set-up (cached), then one TCG boot per guest test, each with a fresh
# `pvrdma serve` process whose exit status is checked. Logs: target/e2e-logs/.
#
#   tests/e2e/all.sh [TEST...]      default: probe pingpong perftest reload rping compare
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$REPO"
TESTS=("$@")
[ ${#TESTS[@]} -gt 0 ] || TESTS=(probe pingpong perftest reload rping compare)

"$HERE/setup.sh"
cargo build --release --bin pvrdma
BIN=$REPO/target/release/pvrdma
SOCKDIR=$REPO/target/e2e-sock
mkdir -p "$SOCKDIR"

passed=0
failed=0
failures=()
for t in "${TESTS[@]}"; do
    sock=$SOCKDIR/$t.sock
    rm -f "$sock"
    if PVRDMA_E2E_QUIET=1 "$HERE/run.sh" "$HERE/guest/$t.sh" --name "$t" --socket "$sock" \
        --server-cmd "exec $BIN serve --socket $sock --mac 52:54:00:12:34:56" --timeout 400; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failures+=("$t")
        echo "---- last lines of target/e2e-logs/$t.console.log"
        tail -n 40 "$REPO/target/e2e-logs/$t.console.log" || true
    fi
    grep -E '^\[e2e\] (PASS|FAIL)' "$REPO/target/e2e-logs/$t.console.log" | sed "s/^/  [$t] /" || true
done
echo "e2e: $passed passed, $failed failed${failures:+ (${failures[*]})}"
[ "$failed" = 0 ]
