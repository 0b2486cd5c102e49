#!/bin/sh
# A device served by `pvrdma serve --backend rdma-core` exchanges verified RDMA traffic with native
# rdma-core tools over a virtual Ethernet link, all inside the guest:
#   vethA (52:54:00:77:00:01) <-> vethB (52:54:00:77:00:02), a veth pair in the root netns;
#   rxe0 on vethA carries the device's traffic (pvrdma serve --ibdev rxe0 --roce-version 2
#   --mac <vethA's MAC>), the harness (/add/pvrdma-peer) drives that device over vfio-user;
#   rxe1 on vethB runs the native tools (ibv_rc_pingpong, ibv_ud_pingpong, -g 0 -c).
# GIDs are the link-local ones (index 0: fe80::EUI-64 of each veth's MAC, RoCE v2). The 6.12 kernel's
# rxe has its UDP sockets and route lookups in init_net only, so both ends stay in the root netns; a
# link-local destination is routed strictly by the sending rxe's netdev, so each packet leaves on
# vethA/vethB and arrives on the other end (checked with the veths' counters).
# Binaries from run.sh --add: pvrdma, pvrdma-peer, veth.ko (the initrd has no veth module);
# tests/e2e/all.sh rdma_core_wire builds and adds them.
. /e2e-lib.sh

MAC_A=52:54:00:77:00:01
MAC_B=52:54:00:77:00:02
SOCK=/tmp/pvrdma-wire.sock
CTL=/tmp/pvrdma-wire.ctl
PEER=/add/pvrdma-peer
PORT=18600
for f in /add/pvrdma /add/pvrdma-peer /add/veth.ko; do
    [ -e "$f" ] || { say "FAIL no $f (run.sh --add)"; exit 1; }
done
ulimit -l unlimited 2>/dev/null || true

link_up() {
    insmod /add/veth.ko || return 1
    # busybox's ip: no peer name; the kernel names the peer veth0
    ip link add vethA type veth || return 1
    ip link set veth0 name vethB || return 1
    ip link set vethA address $MAC_A && ip link set vethB address $MAC_B || return 1
    for d in vethA vethB; do
        echo 0 >/proc/sys/net/ipv6/conf/$d/accept_dad || return 1
        ip link set $d up || return 1
    done
    ip -6 addr show dev vethA
    ip -6 addr show dev vethB
}
rxe_up() {
    modprobe crc32_generic 2>/dev/null || say "no crc32_generic module (fine on kernels >= 6.15)"
    modprobe rdma_rxe && rdma link add rxe0 type rxe netdev vethA && rdma link add rxe1 type rxe netdev vethB
}
# GID 0 of DEV is fe80::EUI-64 of MAC, RoCE v2
gid0_is() {
    local g t
    g=$(cat /sys/class/infiniband/$1/ports/1/gids/0)
    t=$(cat /sys/class/infiniband/$1/ports/1/gid_attrs/types/0)
    say "$1 GID 0: $g ($t)"
    [ "$g" = "$2" ] && [ "$t" = "RoCE v2" ]
}

check veth-up link_up &&
    check rxe-up rxe_up &&
    check rxe0-active wait_dev_active rxe0 30 &&
    check rxe1-active wait_dev_active rxe1 30 &&
    check rxe0-gid0 gid0_is rxe0 fe80:0000:0000:0000:5054:00ff:fe77:0001 &&
    check rxe1-gid0 gid0_is rxe1 fe80:0000:0000:0000:5054:00ff:fe77:0002 ||
    { ip link show; rdma link show; finish; }
rdma link show

nstat() { cat /sys/class/net/$1/statistics/$2; }
# wire NAME MIN_A MIN_B CMD...: run CMD; meanwhile vethA must have sent at least MIN_A bytes and
# vethB at least MIN_B
wire() {
    local name=$1 min_a=$2 min_b=$3 a0 b0 a1 b1 rc
    shift 3
    a0=$(nstat vethA tx_bytes); b0=$(nstat vethB tx_bytes)
    "$@"
    rc=$?
    a1=$(nstat vethA tx_bytes); b1=$(nstat vethB tx_bytes)
    say "$name: vethA sent $((a1 - a0)) bytes (payload $min_a), vethB sent $((b1 - b0)) bytes (payload $min_b)"
    [ $rc = 0 ] || return $rc
    [ $((a1 - a0)) -ge "$min_a" ] && [ $((b1 - b0)) -ge "$min_b" ]
}
# no_invalid NAME: the native tool's -c check found nothing ("invalid data in page N")
no_invalid() {
    ! grep -h 'invalid data' "/tmp/$1.srv" "/tmp/$1.cli"
}

# The reference: native on both ends (rxe0 <-> rxe1) over the link.
PORT=$((PORT + 1))
check native-rc@rxe0-rxe1 wire native-rc 2048000 2048000 pair native-rc $PORT \
    ibv_rc_pingpong -d rxe1 -g 0 -c -p $PORT -n 500 -- ibv_rc_pingpong -d rxe0 -g 0 -c -p $PORT -n 500 127.0.0.1

# The device on rxe0.
# Clear errors of `pvrdma serve --backend rdma-core` at start: an unknown device, a port that is
# down (vethA down makes rxe0's port DOWN), a device whose RoCE version has no GID on the port;
# each is one line naming it, exit status non-zero.
refuses() {
    local want=$1 rc
    shift
    /add/pvrdma serve --backend rdma-core --mac $MAC_A --socket /tmp/refused.sock \
        "$@" >/tmp/refused.log 2>&1
    rc=$?
    cat /tmp/refused.log
    [ $rc -ne 0 ] && grep -q "$want" /tmp/refused.log && [ ! -e /tmp/refused.sock ]
}
port_down() { ! grep -q ACTIVE /sys/class/infiniband/rxe0/ports/1/state; }
refuses_port_down() {
    local ok=0
    ip link set vethA down || return 1
    wait_for 30 port_down && refuses "rxe0 port 1 is not ACTIVE (DOWN)" --ibdev rxe0 --roce-version 2 || ok=1
    ip link set vethA up
    wait_dev_active rxe0 30 &&
        wait_for 30 gid0_is rxe0 fe80:0000:0000:0000:5054:00ff:fe77:0001 || return 1
    return $ok
}
check serve-refuses-unknown-ibdev refuses "no RDMA device named nosuch0" --ibdev nosuch0 --roce-version 2
check serve-refuses-port-down refuses_port_down
# rxe's GIDs are all RoCE v2: a RoCE v1 device's guest could bind none
check serve-refuses-no-gid-of-its-type refuses "rxe0 port 1 has no RoCE v1 GID (its GIDs are RoCE v2)" \
    --ibdev rxe0 --roce-version 1

serve_up() {
    rm -f $SOCK
    env RUST_LOG=info /add/pvrdma serve --backend rdma-core --ibdev rxe0 --roce-version 2 \
        --mac $MAC_A --socket $SOCK --control $CTL >/tmp/serve.log 2>&1 &
    SERVE_PID=$!
    wait_for 30 test -S $SOCK || { cat /tmp/serve.log; return 1; }
    kill -0 $SERVE_PID
}
check serve-up serve_up
# The same refusal for a device added at run time (`pvrdma ctl add`): exit status 1, the reason.
ctl_add_refused() {
    local rc
    /add/pvrdma ctl --control $CTL add socket=/tmp/v1.sock,mac=52:54:00:77:00:09,roce-version=1 \
        >/tmp/ctl-add.log 2>&1
    rc=$?
    cat /tmp/ctl-add.log
    [ $rc = 1 ] && grep -q "has no RoCE v1 GID" /tmp/ctl-add.log && [ ! -e /tmp/v1.sock ]
}
check ctl-add-refuses-no-gid-of-its-type ctl_add_refused

# peer_pair NAME MODE SIZE ITERS native-listens|device-listens
peer_pair() {
    local name=$1 mode=$2 size=$3 n=$4 tool
    PORT=$((PORT + 1))
    tool=ibv_rc_pingpong
    [ "$mode" = ud ] && tool=ibv_ud_pingpong
    local dev="$PEER --socket $SOCK --mac $MAC_A --mode $mode --size $size --iters $n"
    local nat="$tool -d rxe1 -g 0 -c -s $size -n $n -p $PORT"
    if [ "$5" = native-listens ]; then
        wire "$name" $((size * n)) $((size * n)) pair "$name" $PORT $nat -- $dev --connect 127.0.0.1:$PORT &&
            no_invalid "$name"
    else
        wire "$name" $((size * n)) $((size * n)) pair "$name" $PORT $dev --listen $PORT -- $nat 127.0.0.1 &&
            no_invalid "$name"
    fi
}
check rc-device-client peer_pair rc-dc rc 4096 500 native-listens
check rc-device-server peer_pair rc-ds rc 4096 500 device-listens
check rc-64k-device-client peer_pair rc64-dc rc 65536 50 native-listens
check rc-64k-device-server peer_pair rc64-ds rc 65536 50 device-listens
check ud-device-client peer_pair ud-dc ud 1024 500 native-listens
check ud-device-server peer_pair ud-ds ud 1024 500 device-listens

# perftest: the device against native ib_write_bw, ib_read_bw and ib_send_bw on rxe1, the device
# as client and as server. The native tool's buffer is a file (--mmap); after the run the harness
# compares its own source or destination with the native tool's, byte for byte.
# perf_peer NAME VERB SIZE ITERS native-listens|device-listens (PEER_BUF: give the harness that
# file instead of the native tool's)
perf_peer() {
    local name=$1 verb=$2 size=$3 n=$4 buf=/tmp/$1.buf min_a min_b dev nat
    PORT=$((PORT + 1))
    dd if=/dev/zero of="$buf" bs=1M count=1 2>/dev/null || return 1
    dev="$PEER --socket $SOCK --mac $MAC_A --perftest $verb --native-buf ${PEER_BUF:-$buf} --size $size --iters $n"
    nat="ib_${verb}_bw -d rxe1 -x 0 -F -s $size -n $n -p $PORT --mmap=$buf"
    # the payload crosses the link once, from the source: the device (vethA) when it is the
    # client of WRITE or SEND, or the server of READ
    min_a=0 min_b=0
    case "$5/$verb" in
        native-listens/write | native-listens/send | device-listens/read) min_a=$((size * n)) ;;
        *) min_b=$((size * n)) ;;
    esac
    if [ "$5" = native-listens ]; then
        wire "$name" $min_a $min_b pair "$name" $PORT $nat -- $dev --connect 127.0.0.1:$PORT
    else
        wire "$name" $min_a $min_b pair "$name" $PORT $dev --listen $PORT -- $nat 127.0.0.1
    fi
}
for verb in write read send; do
    check ib_${verb}_bw-device-client perf_peer pt-$verb-dc $verb 65536 200 native-listens
    check ib_${verb}_bw-device-server perf_peer pt-$verb-ds $verb 65536 200 device-listens
done
check ib_write_bw-4k-device-client perf_peer pt-write4k-dc write 4096 1000 native-listens
# The check itself: compared with a buffer the native tool did not use, the same run fails.
wrong_buffer() {
    dd if=/dev/zero of=/tmp/pt-wrong.other bs=1M count=1 2>/dev/null || return 1
    PEER_BUF=/tmp/pt-wrong.other perf_peer pt-wrong write 65536 20 native-listens &&
        return 1
    grep -q 'FAILED: payload: .* differ' /tmp/pt-wrong.cli
}
check perftest-check-catches-a-wrong-buffer wrong_buffer
grep -ah 'pvrdma-peer: .* verified' /tmp/*.srv /tmp/*.cli 2>/dev/null | sed 's/^/[e2e] figure /'

serve_down() {
    kill -0 $SERVE_PID || { say "pvrdma serve is gone"; return 1; }
    kill -TERM $SERVE_PID
    wait $SERVE_PID
    local rc=$?
    say "pvrdma serve exited with $rc"
    [ $rc = 0 ]
}
check serve-exit-0 serve_down
say "pvrdma serve log (WARN/ERROR lines):"
grep -aE 'WARN|ERROR' /tmp/serve.log | tail -n 20
finish
