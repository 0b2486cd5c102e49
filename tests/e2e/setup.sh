#!/usr/bin/env bash
# Prepare everything a real-guest end-to-end run needs, cached outside the clone:
#   $CACHE/trixie       debootstrap'ed Debian trixie with QEMU (trixie-backports), kernel, headers, rdma-core
#   $CACHE/vmw_pvrdma.ko out-of-tree build of the guest driver (no Debian kernel enables it)
#   $CACHE/initrd.img   busybox initramfs with modules, rdma-core userspace and /init
#   $CACHE/vmlinuz      the guest kernel
# Idempotent: each step leaves a stamp in $CACHE/stamps; a second run only checks stamps.
# Force a step again with PVRDMA_E2E_REDO="initrd module" (space-separated step names) or remove its stamp.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${PVRDMA_E2E_CACHE:-/var/cache/pvrdma-e2e}
ROOT=$CACHE/trixie
STAMPS=$CACHE/stamps
SUITE=trixie

log() { printf '[e2e-setup %3ds] %s\n' "$SECONDS" "$*"; }
die() { log "ERROR: $*"; exit 1; }
done_step() {
    case " ${PVRDMA_E2E_REDO:-} " in *" $1 "*) return 1 ;; esac
    [ -e "$STAMPS/$1" ]
}
mark() { date -u +%FT%TZ >"$STAMPS/$1"; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, unshare -m)"
mkdir -p "$CACHE" "$STAMPS"

# Run a command inside the chroot, in a private mount namespace so that nothing stays mounted.
in_chroot() {
    unshare -m --propagation private /bin/bash -c '
        set -e
        r=$1; shift
        mount --rbind /dev "$r/dev"
        mount -t proc proc "$r/proc"
        mount --rbind /sys "$r/sys"
        mount -t tmpfs tmpfs "$r/tmp"
        exec chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            DEBIAN_FRONTEND=noninteractive INITRD=No "$@"
    ' in_chroot "$ROOT" "$@"
}

# The Debian mirror the host already uses (deb822 or one-line sources), unless overridden.
find_mirror() {
    if [ -n "${PVRDMA_E2E_MIRROR:-}" ]; then echo "$PVRDMA_E2E_MIRROR"; return; fi
    local m
    m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
        grep -v '^[[:space:]]*#' |
        grep -oE 'https?://[^[:space:]]+/debian/?([[:space:]]|$)' | grep -v security | head -n1 | tr -d '[:space:]')
    echo "${m:-http://deb.debian.org/debian}"
}

# ---------------------------------------------------------------------------------------------------
# 1. host tools
if ! done_step host-tools; then
    need=()
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v cpio >/dev/null || need+=(cpio)
    command -v zstd >/dev/null || need+=(zstd)
    command -v xz >/dev/null || need+=(xz-utils)
    command -v gzip >/dev/null || need+=(gzip)
    command -v modprobe >/dev/null || need+=(kmod)
    [ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
    if [ ${#need[@]} -gt 0 ]; then
        log "host: apt-get update; install ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
    mark host-tools
    log "host tools ok"
fi

# ---------------------------------------------------------------------------------------------------
# 2. debootstrap trixie (minbase)
MIRROR=$(find_mirror)
if ! done_step debootstrap; then
    log "debootstrap --variant=minbase $SUITE from $MIRROR (about 30 s)"
    rm -rf "$ROOT" "$ROOT.partial"
    debootstrap --variant=minbase "$SUITE" "$ROOT.partial" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
        { tail -n 30 "$CACHE/debootstrap.log"; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    mv "$ROOT.partial" "$ROOT"
    mark debootstrap
    log "debootstrap done"
fi

# ---------------------------------------------------------------------------------------------------
# 3. packages, in ONE transaction from trixie-backports (mixing transactions breaks on libelf)
# Guest kernel: "trixie" (default) = trixie's 6.12, the kernel the device ABI notes were checked against;
# "backports" = trixie-backports' newest (7.3 when this was written; no "modversions", no crc32_generic).
KERNEL=${PVRDMA_E2E_KERNEL:-trixie}
case $KERNEL in
    trixie) KPKGS=(linux-image-amd64/trixie linux-headers-amd64/trixie linux-source-6.12/trixie) ;;
    backports) KPKGS=(linux-image-amd64 linux-headers-amd64 linux-source) ;;
    *) die "PVRDMA_E2E_KERNEL must be trixie or backports" ;;
esac
if [ -e "$STAMPS/packages" ] && [ "$(cat "$STAMPS/packages.kernel" 2>/dev/null)" != "$KERNEL" ]; then
    log "kernel choice changed to $KERNEL: redoing packages, module, initrd"
    rm -f "$STAMPS/packages" "$STAMPS/module" "$STAMPS/initrd" "$STAMPS/kernel"
fi
PKGS=(qemu-system-x86 "${KPKGS[@]}"
      gcc make xz-utils busybox-static kmod cpio
      rdma-core libibverbs1 ibverbs-providers ibverbs-utils perftest rdmacm-utils
      iproute2 pciutils pci.ids)
if ! done_step packages; then
    log "apt sources in chroot: $SUITE, $SUITE-updates, $SUITE-backports"
    cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $MIRROR $SUITE-backports main
EOF
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    # no docs/man pages in the chroot: smaller and faster
    cat >"$ROOT/etc/dpkg/dpkg.cfg.d/01-e2e-nodoc" <<'EOF'
path-exclude=/usr/share/man/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
EOF
    log "chroot: apt-get update"
    in_chroot apt-get update -qq
    log "chroot: apt-get install -t $SUITE-backports ${PKGS[*]} (about 1-2 min)"
    in_chroot apt-get install -y -qq --no-install-recommends -t "$SUITE-backports" "${PKGS[@]}" \
        >"$CACHE/apt-install.log" 2>&1 ||
        { tail -n 30 "$CACHE/apt-install.log"; die "apt-get install failed (log: $CACHE/apt-install.log)"; }
    in_chroot apt-get clean
    echo "$KERNEL" >"$STAMPS/packages.kernel"
    mark packages
    rm -f "$STAMPS/module" "$STAMPS/initrd" "$STAMPS/kernel"
    log "packages installed"
fi

# the guest kernel version: what linux-headers-amd64 points at (the image has the same version)
KV=$(in_chroot dpkg-query -W -f='${Depends}' linux-headers-amd64 | grep -o 'linux-headers-[^ ,]*' | head -n1 | sed 's/^linux-headers-//')
[ -n "$KV" ] && [ -d "$ROOT/lib/modules/$KV" ] && [ -d "$ROOT/usr/src/linux-headers-$KV" ] ||
    die "cannot find kernel+headers version in chroot (got '$KV')"
KSERIES=$(echo "$KV" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')
SRC_TAR=$(ls "$ROOT"/usr/src/linux-source-"$KSERIES".tar.* 2>/dev/null | head -n1 || true)
[ -n "$SRC_TAR" ] || die "no /usr/src/linux-source-$KSERIES.tar.* in chroot (kernel $KV): install linux-source-$KSERIES"

# ---------------------------------------------------------------------------------------------------
# 4. vmw_pvrdma.ko, out of tree
if ! done_step module || [ ! -e "$CACHE/vmw_pvrdma.ko" ]; then
    log "building vmw_pvrdma.ko for $KV from $(basename "$SRC_TAR") (about 20-40 s)"
    B=$ROOT/usr/src/vmw_pvrdma-e2e
    rm -rf "$B"; mkdir -p "$B"
    tar -xf "$SRC_TAR" -C "$B" --strip-components=5 "linux-source-$KSERIES/drivers/infiniband/hw/vmw_pvrdma"
    objs=$(cd "$B" && ls *.c | sed 's/\.c$/.o/' | tr '\n' ' ')
    printf 'obj-m += vmw_pvrdma.o\nvmw_pvrdma-y := %s\n' "$objs" >"$B/Kbuild"
    rm -f "$B/Makefile"
    in_chroot make -s -C "/usr/src/linux-headers-$KV" M=/usr/src/vmw_pvrdma-e2e \
        CONFIG_INFINIBAND_VMWARE_PVRDMA=m -j"$(nproc)" modules >"$CACHE/module-build.log" 2>&1 ||
        { tail -n 30 "$CACHE/module-build.log"; die "module build failed (log: $CACHE/module-build.log)"; }
    cp "$B/vmw_pvrdma.ko" "$CACHE/vmw_pvrdma.ko"
    in_chroot modinfo -F vermagic /usr/src/vmw_pvrdma-e2e/vmw_pvrdma.ko | sed 's/^/[e2e-setup]   vermagic: /'
    mark module
    log "vmw_pvrdma.ko built"
fi

# ---------------------------------------------------------------------------------------------------
# 5. initramfs
# Rebuilt when setup.sh or guest-init.sh is newer than the stamp, and when its content changes:
# $STAMPS/initrd.key holds a hash of the staging script (which lists the binaries and modules),
# guest-init.sh and the kernel version, so an initrd built by another version of this file (another
# clone or branch sharing the cache) is not silently kept.
stage_script() {
    cat <<'STAGE'
#!/bin/bash
# Runs inside the chroot: stage the initramfs tree in $S.
set -euo pipefail
KV=$1; S=$2
rm -rf "$S"; mkdir -p "$S"
cd "$S"
mkdir -p usr/bin usr/sbin usr/lib/x86_64-linux-gnu usr/lib64 usr/share/misc etc proc sys dev tmp run root var/tmp
ln -s usr/bin bin; ln -s usr/sbin sbin; ln -s usr/lib lib; ln -s usr/lib64 lib64
# copy a file from / to the same path below $S, with /bin,/lib,... mapped into /usr (merged-usr)
put() {
    local src=$1 dst=${2:-$1}
    case $dst in /bin/*|/sbin/*|/lib/*|/lib64/*) dst=/usr$dst ;; esac
    mkdir -p "$S$(dirname "$dst")"
    cp -L "$src" "$S$dst"
}
libs_of() { ldd "$1" 2>/dev/null | awk '/=> \//{print $3} /^[[:space:]]*\/[^ ]+ \(/{print $1}'; }
declare -A seen=()
put_with_libs() {
    local f=$1 l
    put "$f"
    for l in $(libs_of "$f"); do
        [ -n "${seen[$l]:-}" ] && continue
        seen[$l]=1
        put "$l"
    done
}
# busybox first; its applets become symlinks unless a real tool takes the name
put /bin/busybox /usr/bin/busybox
# userspace
for b in ibv_devinfo ibv_devices ibv_rc_pingpong ibv_uc_pingpong ibv_ud_pingpong ibv_srq_pingpong ibv_xsrq_pingpong \
         ib_send_bw ib_write_bw ib_read_bw ib_atomic_bw ib_send_lat ib_write_lat ib_read_lat ib_atomic_lat \
         rping ucmatose udaddy rdma ip lspci setpci kmod; do
    p=$(command -v "$b" || true)
    [ -n "$p" ] || { echo "missing binary $b" >&2; exit 1; }
    put_with_libs "$p"
done
for l in /usr/lib/x86_64-linux-gnu/libibverbs/*.so; do put_with_libs "$l"; done
# glibc dlopens libgcc_s for pthread_exit/cancellation (rping's threads); ldd does not list it
put_with_libs /usr/lib/x86_64-linux-gnu/libgcc_s.so.1
mkdir -p etc/libibverbs.d
cp /etc/libibverbs.d/*.driver etc/libibverbs.d/
[ -e /usr/share/misc/pci.ids ] && put /usr/share/misc/pci.ids || true
[ -e /usr/share/misc/pci.ids.gz ] && put /usr/share/misc/pci.ids.gz || true
for a in modprobe insmod rmmod lsmod modinfo depmod; do ln -sf ../bin/kmod usr/sbin/$a; done
# busybox applets
for a in $(busybox --list-full); do
    d=usr/${a#usr/}
    case $d in usr/linuxrc) continue ;; esac
    [ -e "$d" ] || [ -L "$d" ] && continue
    [ -e "usr/bin/$(basename "$d")" ] || [ -e "usr/sbin/$(basename "$d")" ] && continue
    mkdir -p "$(dirname "$d")"
    ln -s /usr/bin/busybox "$d"
done
# modules with their dependencies
M=lib/modules/$KV
mkdir -p "usr/$M/extra"
# NVMe-oF (guest/nvmeof.sh): host, target, a RAM disk for the namespace, a dummy netdev for rxe0
for m in vmxnet3 ib_core ib_uverbs rdma_ucm rdma_cm ib_cm iw_cm ib_umad rdma_rxe crc32_generic ip6_udp_tunnel udp_tunnel \
         configfs nvme_fabrics nvme_rdma nvmet nvmet_rdma brd dummy; do
    deps=$(modprobe -S "$KV" --show-depends "$m" 2>/dev/null) || {
        case $m in crc32_generic) echo "note: no module $m in $KV (built in or gone)"; continue ;; esac
        echo "module $m not found for $KV" >&2; exit 1; }
    echo "$deps" | while read -r kind path _; do
        [ "$kind" = insmod ] || continue
        dst=/usr${path#/usr}
        mkdir -p "$S$(dirname "$dst")"
        case $path in
            *.ko.xz)  xz -dc "$path" >"$S${dst%.xz}" ;;
            *.ko.zst) zstd -qdc "$path" >"$S${dst%.zst}" ;;
            *.ko.gz)  gzip -dc "$path" >"$S${dst%.gz}" ;;
            *)        cp "$path" "$S$dst" ;;
        esac
    done
done
cp /usr/src/vmw_pvrdma-e2e/vmw_pvrdma.ko "usr/$M/extra/"
strip --strip-debug "usr/$M/extra/vmw_pvrdma.ko"   # $CACHE/vmw_pvrdma.ko keeps the debug info
for f in modules.order modules.builtin modules.builtin.modinfo; do cp "/lib/modules/$KV/$f" "usr/$M/" 2>/dev/null || true; done
depmod -b "$S" "$KV"
# init and a few files
cp /usr/src/vmw_pvrdma-e2e/init init; chmod 755 init
echo "root:x:0:0:root:/root:/bin/sh" >etc/passwd
echo "root:x:0:" >etc/group
printf '127.0.0.1 localhost\n10.0.2.15 guest\n' >etc/hosts
echo "$KV" >etc/e2e-kernel-version
echo "staged: $(du -sh "$S" | cut -f1), $(find "$S/usr/$M" -name '*.ko' | wc -l) modules"
STAGE
}
INITRD_KEY=$({ stage_script; cat "$HERE/guest-init.sh"; echo "$KV"; } | sha256sum | cut -d' ' -f1)
if ! done_step initrd || [ ! -e "$CACHE/initrd.img" ] ||
   [ "$(cat "$STAMPS/initrd.key" 2>/dev/null)" != "$INITRD_KEY" ] ||
   [ "$HERE/guest-init.sh" -nt "$STAMPS/initrd" ] || [ "$HERE/setup.sh" -nt "$STAMPS/initrd" ]; then
    log "building initramfs for $KV"
    mkdir -p "$ROOT/usr/src/vmw_pvrdma-e2e"
    cp "$CACHE/vmw_pvrdma.ko" "$ROOT/usr/src/vmw_pvrdma-e2e/vmw_pvrdma.ko"
    cp "$HERE/guest-init.sh" "$ROOT/usr/src/vmw_pvrdma-e2e/init"
    stage_script >"$ROOT/usr/src/vmw_pvrdma-e2e/stage.sh"
    chmod 755 "$ROOT/usr/src/vmw_pvrdma-e2e/stage.sh"
    in_chroot /usr/src/vmw_pvrdma-e2e/stage.sh "$KV" /var/tmp/e2e-initramfs | sed 's/^/[e2e-setup]   /'
    (cd "$ROOT/var/tmp/e2e-initramfs" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -6) \
        >"$CACHE/initrd.img.new"
    mv "$CACHE/initrd.img.new" "$CACHE/initrd.img"
    rm -rf "$ROOT/var/tmp/e2e-initramfs"
    echo "$INITRD_KEY" >"$STAMPS/initrd.key"
    mark initrd
    log "initrd: $CACHE/initrd.img ($(du -h "$CACHE/initrd.img" | cut -f1))"
fi

# ---------------------------------------------------------------------------------------------------
# 6. kernel
if ! done_step kernel || [ ! -e "$CACHE/vmlinuz" ] || ! cmp -s "$ROOT/boot/vmlinuz-$KV" "$CACHE/vmlinuz"; then
    cp "$ROOT/boot/vmlinuz-$KV" "$CACHE/vmlinuz"
    echo "$KV" >"$CACHE/kernel-version"
    mark kernel
    log "kernel: $CACHE/vmlinuz ($KV)"
fi

QV=$(in_chroot qemu-system-x86_64 --version | head -n1)
log "ready: kernel $KV, $QV, cache $CACHE"
