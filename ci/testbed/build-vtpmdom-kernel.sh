#!/bin/bash
# Build the vTPM domain's own kernel: Linux 6.1 from Debian 12's linux-source-6.1 (the source of
# the testbed's Debian kernel, same version), configured by ci/testbed/vtpmdom-kernel.config
# (allnoconfig + that fragment: a Xen PV guest with xenbus, event channels, gntdev, gntalloc,
# xen-blkfront, the hvc console and a zstd initramfs; no modules, no network but AF_UNIX). A
# vTPM domain runs with 32 MiB on it instead of 128 MiB on Debian's kernel (ci/testbed/README.md,
# docs/xen-placement.md).
#
#   ci/testbed/build-vtpmdom-kernel.sh            # build once per input set, reuse otherwise
#
# The patches in ci/testbed/vtpmdom-kernel-patches/ (*.patch, in name order; each says why) are
# applied to it: 0001 page-aligns the image's sections (a PV guest has no use for the 2 MiB ones).
# Inputs, all in the cache key: the linux-source-6.1 .deb (version + SHA256 from
# guest/linux/debs.lock, re-resolved by ci/testbed/debs-resolve.sh when Debian has replaced that
# version, as for the guest module: run.sh passes the locks as used in XVTPM_LOCK_OUT; alone,
# this script resolves them itself), the patches, the config fragment, the compiler's version, and this script.
# Output: $XVTPM_CACHE/vtpmdom-kernel/<key>/vmlinux (the raw ELF kernel, symbols stripped: what
# xl loads fastest), vmlinuz (the bzImage, the same kernel compressed), config (the full .config)
# and build.info; the last line printed is "build-vtpmdom-kernel.sh: kernel: <dir>".
# Host packages (installed if missing unless XVTPM_NO_HOST_INSTALL=1): gcc-12, make, flex, bison,
# bc, libelf-dev (objtool), xz-utils, dpkg, apt.
# Env: XVTPM_CACHE (cache-dir.sh), XVTPM_LOCK_OUT, XVTPM_NICE (10), XVTPM_JOBS (nproc),
#      XVTPM_TESTBED_STRICT (1: refuse drift, see debs-resolve.sh),
#      XVTPM_VTPMDOM_KERNEL_KEEP_TREE (1: keep the unpacked source and the build tree).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
. "$HERE/cache-dir.sh"
. "$HERE/host-packages.sh"
CACHE=$XVTPM_CACHE/vtpmdom-kernel
FRAG=$HERE/vtpmdom-kernel.config
PATCHES=("$HERE"/vtpmdom-kernel-patches/*.patch)
NICE=${XVTPM_NICE:-10}
JOBS=${XVTPM_JOBS:-$(nproc)}
die() { echo "build-vtpmdom-kernel.sh: ERROR: $*" >&2; exit 1; }
log() { echo "build-vtpmdom-kernel.sh: $*"; }
[ -f "$FRAG" ] || die "$FRAG missing (a partial checkout?)"
[ -f "${PATCHES[0]}" ] || die "no patches in $HERE/vtpmdom-kernel-patches/ (a partial checkout?)"

# ---- host build dependencies ----
HOST_PKGS=(gcc-12 make flex bison bc libelf-dev xz-utils)
missing=()
for p in "${HOST_PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
install_host_packages "${missing[@]}"

mkdir -p "$CACHE"
# one build at a time per cache (a second caller waits, then finds the first one's result)
exec 8> "$CACHE/.build.lock"
flock -n 8 || { log "another build-vtpmdom-kernel.sh holds $CACHE/.build.lock; waiting for it"; flock 8; }

# ---- the source: linux-source-6.1 as pinned in guest/linux/debs.lock (drift re-resolved) ----
LOCK_OUT=${XVTPM_LOCK_OUT:-}
if [ -z "$LOCK_OUT" ] || [ ! -s "$LOCK_OUT/linux-debs.lock.used" ]; then
  LOCK_OUT=$XVTPM_CACHE/locks
  "$HERE/debs-resolve.sh" --out "$LOCK_OUT" "$HERE/debs.lock" "$TOP/guest/linux/debs.lock" >&2 ||
    die "cannot resolve the pinned packages (see above)"
fi
read -r _ SRCVER SRCARCH SRCSUM SRCFILE < <(grep '^linux-source-6.1 ' "$LOCK_OUT/linux-debs.lock.used") ||
  die "no linux-source-6.1 in $LOCK_OUT/linux-debs.lock.used"

# ---- the cache key: every input ----
CC_VERSION=$(gcc-12 --version | head -n1)
patchsums=$(cd "$HERE/vtpmdom-kernel-patches" && sha256sum -- *.patch)
KEY=$(printf '%s\n' "linux-source-6.1 $SRCVER $SRCARCH $SRCSUM" "$patchsums" "$(sha256sum < "$FRAG")" "$CC_VERSION" "$(sha256sum < "$0")" |
      sha256sum | cut -c1-16)
OUT=$CACHE/$KEY
if [ -s "$OUT/vmlinux" ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/build.info" ]; then
  log "cached: $OUT (key $KEY; $(sed -n 's/^built //p' "$OUT/build.info"))"
  log "kernel: $OUT"; exit 0
fi

# ---- fetch and verify the .deb (kept in the cache: a change of the config builds from it again) ----
mkdir -p "$CACHE/debs"
DEB=$CACHE/debs/$SRCFILE
if [ ! -f "$DEB" ] || [ "$(sha256sum < "$DEB" | cut -d' ' -f1)" != "$SRCSUM" ]; then
  rm -f "$CACHE"/debs/linux-source-6.1_*.deb
  log "downloading linux-source-6.1=$SRCVER (~135 MB)"
  ( cd "$CACHE/debs" && { apt-get download -qq "linux-source-6.1=$SRCVER" >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get download -qq "linux-source-6.1=$SRCVER" >/dev/null; }; } ) ||
    die "apt-get download linux-source-6.1=$SRCVER failed (is it still published? ci/testbed/README.md, 'Pins, drift and the cache')"
  [ -f "$DEB" ] || die "apt-get download left no $DEB"
fi
got=$(sha256sum < "$DEB" | cut -d' ' -f1)
[ "$got" = "$SRCSUM" ] || die "sha256 mismatch for $DEB: pinned $SRCSUM, file has $got (delete it to fetch it again, or re-pin)"

# ---- unpack (source tree kept per source version with XVTPM_VTPMDOM_KERNEL_KEEP_TREE=1) ----
T0=$(date +%s); LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
SRC=$CACHE/src-$SRCVER
SRCSTAMP=$(printf '%s\n' "$SRCSUM" "$patchsums" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$SRC/.sha256" 2>/dev/null)" != "$SRCSTAMP" ]; then
  rm -rf "$CACHE"/src-* "$CACHE"/build-*; mkdir -p "$SRC"
  dpkg-deb --fsys-tarfile "$DEB" | tar -xO ./usr/src/linux-source-6.1.tar.xz | nice -n "$NICE" xz -dc |
    tar -x -C "$SRC" --strip-components=1 || die "cannot unpack linux-source-6.1.tar.xz from $DEB"
  upstream=$(awk '/^VERSION =/{v=$3} /^PATCHLEVEL =/{p=$3} /^SUBLEVEL =/{s=$3} END{print v"."p"."s}' "$SRC/Makefile")
  [ "$upstream" = "${SRCVER%-*}" ] || die "linux-source-6.1 $SRCVER is Linux $upstream, expected ${SRCVER%-*}"
  for p in "${PATCHES[@]}"; do
    patch -d "$SRC" -p1 --forward --batch --no-backup-if-mismatch -s < "$p" ||
      die "$(basename "$p") does not apply to Linux $upstream ($SRCVER)"
    log "applied $(basename "$p")"
  done
  echo "$SRCSTAMP" > "$SRC/.sha256"
  log "unpacked Linux $upstream ($(( $(date +%s) - T0 )) s)"
fi

# ---- configure: allnoconfig + the fragment; every =y of the fragment must have survived ----
# the build tree: new for each key, or with XVTPM_VTPMDOM_KERNEL_KEEP_TREE=1 one per source version,
# kept and reused (Kbuild then recompiles only what a changed option or compiler flag touches)
if [ "${XVTPM_VTPMDOM_KERNEL_KEEP_TREE:-0}" = 1 ]; then B=$CACHE/build-$SRCVER; else B=$CACHE/build-$KEY; rm -rf "$B"; fi
mkdir -p "$B"
MK=(make -C "$SRC" O="$B" CC=gcc-12 HOSTCC=gcc-12 KBUILD_BUILD_USER=xvtpm KBUILD_BUILD_HOST=xvtpm
    KBUILD_BUILD_TIMESTAMP="Debian $SRCVER")
nice -n "$NICE" "${MK[@]}" -s allnoconfig KCONFIG_ALLCONFIG="$FRAG" > "$B/config.log" 2>&1 ||
  { tail -n 20 "$B/config.log" >&2; die "make allnoconfig with $FRAG failed"; }
lost=()
while IFS= read -r l; do grep -qxF "$l" "$B/.config" || lost+=("$l"); done < <(grep -E '^CONFIG_[A-Z0-9_]+=' "$FRAG")
[ ${#lost[@]} -eq 0 ] || die "Kconfig dropped ${lost[*]} (a dependency is missing from $FRAG; see $B/.config)"
grep -q '^CONFIG_MODULES=y' "$B/.config" && die "$FRAG must leave CONFIG_MODULES off"

# ---- build ----
log "building Linux ${SRCVER%-*} ($SRCVER) for the vTPM domain with $JOBS jobs at nice $NICE (load average $LOAD0)"
nice -n "$NICE" "${MK[@]}" -j"$JOBS" bzImage > "$B/build.log" 2>&1 ||
  { tail -n 30 "$B/build.log" >&2; die "kernel build failed (log: $B/build.log)"; }
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp"
# symbols and debug sections off; the loadable segments and the Xen ELF notes stay
strip -o "$OUT.tmp/vmlinux" "$B/vmlinux"
readelf -n "$OUT.tmp/vmlinux" | grep -q 'Xen' || die "the stripped vmlinux has no Xen ELF notes (not a PV kernel?)"
cp "$B/arch/x86/boot/bzImage" "$OUT.tmp/vmlinuz"
cp "$B/.config" "$OUT.tmp/config"
{
  echo "source linux-source-6.1 $SRCVER $SRCARCH sha256 $SRCSUM"
  echo "config $(sha256sum < "$FRAG" | cut -d' ' -f1) ($FRAG)"
  echo "patches"; echo "$patchsums"
  echo "compiler $CC_VERSION"
  echo "vmlinux $(stat -c %s "$OUT.tmp/vmlinux") bytes sha256 $(sha256sum < "$OUT.tmp/vmlinux" | cut -d' ' -f1)"
  echo "vmlinuz $(stat -c %s "$OUT.tmp/vmlinuz") bytes sha256 $(sha256sum < "$OUT.tmp/vmlinuz" | cut -d' ' -f1)"
  echo "size $(size "$B/vmlinux" | awk 'NR==2{printf "text %s data %s bss %s", $1, $2, $3}')"
  echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - T0 )) s, $JOBS jobs, nice $NICE, load average before $LOAD0, after $LOAD1"
} > "$OUT.tmp/build.info"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
[ "${XVTPM_VTPMDOM_KERNEL_KEEP_TREE:-0}" = 1 ] || rm -rf "$B" "$SRC"
log "built $OUT ($(sed -n 's/^built //p' "$OUT/build.info"))"
log "kernel: $OUT"
