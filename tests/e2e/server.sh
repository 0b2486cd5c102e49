# The `pvrdma serve` process of a real-guest run: started before QEMU, checked after it.
# Sourced by run.sh and vms.sh; uses their `log`, `die`, SERVER_LOG, SOCKET_WAIT and
# SERVER_STOP_TIMEOUT, and sets SERVER_PID.

# server_start CMD SOCKET...: runs CMD (bash -c; use exec) with its output in SERVER_LOG and
# waits until every SOCKET exists; fails if the server exits first or takes SOCKET_WAIT seconds.
server_start() {
    local cmd=$1 s t=0 missing
    shift
    for s in "$@"; do rm -f "$s"; done
    log "starting server: $cmd (log: $SERVER_LOG)"
    NO_COLOR=1 bash -c "$cmd" </dev/null >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    while :; do
        missing=""
        for s in "$@"; do [ -S "$s" ] || missing="$missing $s"; done
        [ -n "$missing" ] || break
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            wait "$SERVER_PID" && st=0 || st=$?
            SERVER_PID=""
            tail -n 20 "$SERVER_LOG" >&2 || true
            die "server exited with status $st before creating$missing"
        fi
        [ $t -lt $((SOCKET_WAIT * 10)) ] || die "server did not create$missing within ${SOCKET_WAIT}s"
        sleep 0.1; t=$((t + 1))
    done
    [ $# = 0 ] || log "server listening on $*"
}

# server_verdict WHAT: after the guests ended (WHAT: "the guest", "the guests"), the server must
# still run, stop on SIGTERM within SERVER_STOP_TIMEOUT and exit 0; each failure is appended to
# the caller's `fail` array. `server_died` set: the server had exited while the guests ran.
server_verdict() {
    [ -n "$SERVER_PID" ] || return 0
    local st t=0
    if [ -n "${server_died:-}" ]; then
        wait "$SERVER_PID" && st=0 || st=$?
        fail+=("server exited (status $st) before $1 ended")
    else
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        while kill -0 "$SERVER_PID" 2>/dev/null && [ $t -lt $((SERVER_STOP_TIMEOUT * 10)) ]; do sleep 0.1; t=$((t + 1)); done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            kill -KILL "$SERVER_PID" 2>/dev/null || true
            fail+=("server did not exit within ${SERVER_STOP_TIMEOUT}s of SIGTERM")
        fi
        wait "$SERVER_PID" && st=0 || st=$?
        [ "$st" = 0 ] || fail+=("server exit status $st after SIGTERM (want 0)")
        log "server stopped, exit status $st"
    fi
    SERVER_PID=""
}
