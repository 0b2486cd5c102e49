#!/usr/bin/env bash
# Builds the rdma-core backend's conformance test binary and prints its path (last line of
# stdout), for `run.sh guest/rdma_core_backend.sh --add <path>` (tests/e2e/all.sh does that).
# Installs the build dependencies of the `rdma-core` feature (rdma-mummy-sys: cmake, clang,
# libclang-dev) with apt-get when one is missing; sudo only when not root.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../.."

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v clang >/dev/null || need+=(clang)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    echo "rdma-core build dependencies: apt-get install ${need[*]}" >&2
    $SUDO apt-get update -qq >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >&2
fi

# The executable of the `conformance_rdma_core` test target, from cargo's own JSON messages.
bin=$(cargo test -p rdma-backend --features rdma-core --test conformance_rdma_core --no-run \
        --message-format=json |
    grep '"reason":"compiler-artifact"' |
    grep '"name":"conformance_rdma_core"' |
    grep -o '"executable":"[^"]*"' | tail -n 1 | sed 's/^"executable":"//; s/"$//')
[ -n "$bin" ] && [ -x "$bin" ] || { echo "no conformance_rdma_core executable from cargo" >&2; exit 1; }
echo "$bin"
