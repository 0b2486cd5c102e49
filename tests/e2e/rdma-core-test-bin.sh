#!/usr/bin/env bash
# Builds the rdma-core backend's conformance test binary and prints its path (last line of
# stdout), for `run.sh guest/rdma_core_backend.sh --add <path>` (tests/e2e/all.sh does that).
# Building needs only the Rust toolchain (libibverbs is loaded at run time, in the guest).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/../.."

# The executable of the `conformance_rdma_core` test target, from cargo's own JSON messages.
bin=$(cargo test -p rdma-backend --test conformance_rdma_core --no-run \
        --message-format=json |
    grep '"reason":"compiler-artifact"' |
    grep '"name":"conformance_rdma_core"' |
    grep -o '"executable":"[^"]*"' | tail -n 1 | sed 's/^"executable":"//; s/"$//')
[ -n "$bin" ] && [ -x "$bin" ] || { echo "no conformance_rdma_core executable from cargo" >&2; exit 1; }
echo "$bin"
