#!/bin/bash
# Build Xen's device model (QEMU for xenfv, i386-softmmu) WITH TPM support from the pinned Debian
# source of the testbed's own QEMU, into the testbed cache, and from the same tree the testbed's
# outer QEMU (x86_64-softmmu, TCG), which carries patch 0002 (a nested guest's CR8 write aborted
# Debian's 7.2 under TCG, which kept OVMF guests out of the testbed). No Debian or Ubuntu package has one
# (docs/hvm.md, "The device model"): Debian's qemu-system-xen is configured with
# --without-default-features and no --enable-tpm. This is that same configure line plus
# --enable-tpm, minus the display/USB/9p features a headless testbed guest does not use (fewer
# libraries to carry into dom0), plus --enable-slirp: the outer QEMU's user-mode network reaches the
# fleet registry (a PostgreSQL server on the machine running the testbed) from both Xen hosts of
# the xhost2 phases. The patches in ci/testbed/qemu-patches/ (*.patch, in name order;
# each says what it fixes and why) are applied on top of Debian's: 0001 makes the xenfv machine's
# direct kernel boot load the kernel and initrd by fw_cfg DMA (docs/hvm.md); 0002 takes QEMU's big
# lock for the interrupt a nested guest's CR8 write raises under TCG (docs/hvm.md, OVMF). TCG is
# compiled into both binaries (one configure); the device model runs with Xen's accelerator only.
#
#   ci/testbed/build-qemu-xen.sh                 # fetch, verify, unpack, configure, build (both binaries)
#   ci/testbed/build-qemu-xen.sh --configure-only  # everything up to and including configure
#   ci/testbed/build-qemu-xen.sh --print-pins    # the pins of bookworm's current qemu source (to update PINS)
#
# Inputs, all in the cache key: the source package (.dsc, .orig.tar.xz, .debian.tar.xz, pinned
# by SHA256 below; apt also checks them against the archive's signed Sources index), the
# patches, the configure flags, the versions of the host's compiler and -dev packages, and this script.
# Output: $XVTPM_CACHE/qemu-xen/<key>/xen-qemu-system-i386 and qemu-system-x86_64 (stripped) and
# build.info (inputs, sha256 of the binaries); a build whose key exists is not run again. Nothing is installed on
# the host but the build dependencies (apt-get, unless XVTPM_NO_HOST_INSTALL=1).
# Env: XVTPM_CACHE (cache-dir.sh), XVTPM_NICE (default 10), XVTPM_JOBS (default: nproc).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/cache-dir.sh"
. "$HERE/host-packages.sh"
. "$HERE/apt-source.sh"
CACHE=$XVTPM_CACHE/qemu-xen
APT=$CACHE/apt
NICE=${XVTPM_NICE:-10}
JOBS=${XVTPM_JOBS:-$(nproc)}
die() { echo "build-qemu-xen.sh: ERROR: $*" >&2; exit 1; }
log() { echo "build-qemu-xen.sh: $*"; }
PATCHES=("$HERE"/qemu-patches/*.patch)
[ -f "${PATCHES[0]}" ] || die "no patches in $HERE/qemu-patches/ (a partial checkout?)"

# ---- pins: Debian 12's qemu, the source of the testbed host's qemu-system-xen 1:7.2+dfsg-7+deb12u18+b3
SRC_VERSION=1:7.2+dfsg-7+deb12u18
PINS="qemu_7.2+dfsg-7+deb12u18.dsc 6b6bd27b947ec89e40a1d6b26d9c9f3c698ca691da13163e0483f6061bbb20b3
qemu_7.2+dfsg.orig.tar.xz 91aca71520040edc40b8d437aa3004dae614f58e286cf653ee8996c07af2962f
qemu_7.2+dfsg-7+deb12u18.debian.tar.xz 28a1c86310ee53b6bf1854cffe6f6be6ed29a08db7d05759f8ac57b8d6a6cb2f"

# ---- configure: debian/rules' configure-xen, with --enable-tpm, without the display/USB/9p features
CONFIGURE=(
  --prefix=/usr --sysconfdir=/etc --localstatedir=/var --libexecdir=/usr/lib/qemu
  --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
  --with-pkgversion="Debian $SRC_VERSION +tpm"
  --disable-install-blobs --disable-strip --with-git-submodules=ignore
  --disable-docs --disable-tools --without-default-features
  --enable-xen --target-list=i386-softmmu,x86_64-softmmu --enable-xen-pci-passthrough
  --enable-tcg --enable-kvm --audio-drv-list=
  --enable-tpm
  --enable-slirp
)
HOST_PKGS=(build-essential pkg-config python3 meson ninja-build dpkg-dev libglib2.0-dev
           libpixman-1-dev libfdt-dev libxen-dev zlib1g-dev libslirp-dev)

MODE=build
case ${1:-} in
  --configure-only) MODE=configure ;;
  --print-pins) MODE=pins ;;
  "") ;;
  *) die "unknown option $1 (usage: build-qemu-xen.sh [--configure-only|--print-pins])" ;;
esac

mkdir -p "$CACHE"
if [ $MODE = pins ]; then
  apt_source_print_pins "$APT" qemu || die "cannot list the current qemu source (see above)"
  exit 0
fi
# one build at a time per cache (a second caller waits, then finds the first one's result)
exec 8> "$CACHE/.build.lock"
flock -n 8 || { log "another build-qemu-xen.sh holds $CACHE/.build.lock; waiting for it"; flock 8; }

# ---- host build dependencies ----
missing=()
for p in "${HOST_PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
install_host_packages "${missing[@]}"

# ---- the cache key: every input ----
# TREEKEY: what the compiled objects depend on (source pins, patches, configure flags, host
# compiler and -dev packages); KEY adds this script and apt-source.sh, so editing either re-runs the recipe, but
# reuses a kept build tree of the same TREEKEY (ninja then has nothing to compile).
hostvers=$(dpkg-query -W -f='${Package} ${Version}\n' gcc-12 libglib2.0-dev libpixman-1-dev libfdt-dev libxen-dev zlib1g-dev libslirp-dev meson ninja-build 2>/dev/null | sort)
patchsums=$(cd "$HERE/qemu-patches" && sha256sum -- *.patch)
TREEKEY=$(printf '%s\n' "$SRC_VERSION" "$PINS" "$patchsums" "${CONFIGURE[*]}" "$hostvers" | sha256sum | cut -c1-16)
KEY=$(printf '%s\n' "$TREEKEY" "$(sha256sum < "$0")" "$(sha256sum < "$HERE/apt-source.sh")" | sha256sum | cut -c1-16)
OUT=$CACHE/$KEY
if [ $MODE = build ] && [ -x "$OUT/xen-qemu-system-i386" ] && [ -x "$OUT/qemu-system-x86_64" ] && [ -s "$OUT/build.info" ]; then
  log "cached: $OUT/xen-qemu-system-i386 (key $KEY; $(sed -n 's/^built //p' "$OUT/build.info"))"
  log "binary: $OUT/xen-qemu-system-i386"; log "outer: $OUT/qemu-system-x86_64"; exit 0
fi

# ---- fetch and verify the source (ci/testbed/apt-source.sh) ----
SRC=$CACHE/src
apt_source_fetch "$APT" "$SRC" qemu "$SRC_VERSION" "$PINS" || die "the pinned qemu source is not available (see above)"
log "source verified against the pins ($(wc -l <<< "$PINS") files)"

# ---- unpack (dpkg-source applies Debian's patches; it checks the .dsc's checksums too) ----
# dpkg-source --no-check skips only the signature (no Debian keyring for source signers here);
# the files were checked above against the pins.  A tree configured from the same TREEKEY (kept
# by XVTPM_QEMU_KEEP_TREE=1, or left by an interrupted build) is reused: ninja resumes.
TREE=$CACHE/tree-$TREEKEY
if [ ! -f "$TREE/b/xen/.configured" ] || [ $MODE = configure ]; then
  rm -rf "$TREE"
  dpkg-source --no-check -x "$SRC/qemu_${SRC_VERSION#*:}.dsc" "$TREE" >/dev/null || die "dpkg-source -x failed"
  rm -f "$CACHE"/qemu_*.orig.tar.* # dpkg-source copies the orig tarball beside the tree; src/ keeps it
  for p in "${PATCHES[@]}"; do
    patch -d "$TREE" -p1 --forward --batch --no-backup-if-mismatch -s < "$p" ||
      die "$(basename "$p") does not apply to qemu $SRC_VERSION (update it with the pins)"
    log "applied $(basename "$p")"
  done
  # ---- configure ----
  mkdir -p "$TREE/b/xen"
  cd "$TREE/b/xen"
  log "configuring: ${CONFIGURE[*]}"
  nice -n "$NICE" ../../configure "${CONFIGURE[@]}" > "$CACHE/configure-$TREEKEY.log" 2>&1 ||
    { tail -n 30 "$CACHE/configure-$TREEKEY.log" >&2; die "configure failed (log: $CACHE/configure-$TREEKEY.log)"; }
  grep -E '^ *(TPM support|Xen support|xen ctrl version) ' "$CACHE/configure-$TREEKEY.log" | sed 's/^ */build-qemu-xen.sh: configure: /'
  grep -qE '^ *TPM support *: *YES' "$CACHE/configure-$TREEKEY.log" || die "configure did not enable TPM support (log: $CACHE/configure-$TREEKEY.log)"
  touch .configured
  if [ $MODE = configure ]; then
    log "configured (key $TREEKEY; log $CACHE/configure-$TREEKEY.log); --configure-only: not building"
    rm -rf "$TREE"
    exit 0
  fi
else
  log "reusing the configured build tree $TREE"
fi
cd "$TREE/b/xen"

# ---- build, strip, install into the cache ----
T0=$(date +%s); LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
log "building qemu-system-i386 and qemu-system-x86_64 with $JOBS jobs at nice $NICE (load average $LOAD0)"
nice -n "$NICE" ninja -j "$JOBS" qemu-system-i386 qemu-system-x86_64 > "$CACHE/build-$TREEKEY.log" 2>&1 ||
  { tail -n 30 "$CACHE/build-$TREEKEY.log" >&2; die "build failed (log: $CACHE/build-$TREEKEY.log)"; }
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
mkdir -p "$OUT.tmp"
strip -o "$OUT.tmp/xen-qemu-system-i386" qemu-system-i386
strip -o "$OUT.tmp/qemu-system-x86_64" qemu-system-x86_64
# (QEMU prints the lists on stderr)
for b in xen-qemu-system-i386 qemu-system-x86_64; do
  tpmdevs=$("$OUT.tmp/$b" -tpmdev help 2>&1 || true)
  grep -q 'emulator' <<< "$tpmdevs" || die "the built $b has no -tpmdev emulator: $tpmdevs"
done
accels=$("$OUT.tmp/qemu-system-x86_64" -accel help 2>&1 || true)
grep -qx 'tcg' <<< "$accels" || die "the built qemu-system-x86_64 has no TCG: $accels"
{
  echo "source qemu=$SRC_VERSION"; echo "$PINS"
  echo "patches"; echo "$patchsums"
  echo "configure ${CONFIGURE[*]}"; echo "$hostvers"
  echo "sha256 $(sha256sum < "$OUT.tmp/xen-qemu-system-i386" | cut -d' ' -f1) xen-qemu-system-i386"
  echo "sha256 $(sha256sum < "$OUT.tmp/qemu-system-x86_64" | cut -d' ' -f1) qemu-system-x86_64"
  echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - T0 )) s, $JOBS jobs, nice $NICE, load average before $LOAD0, after $LOAD1"
} > "$OUT.tmp/build.info"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
[ "${XVTPM_QEMU_KEEP_TREE:-0}" = 1 ] || rm -rf "$TREE"
log "built $OUT/xen-qemu-system-i386 ($(( $(date +%s) - T0 )) s; load average before $LOAD0, after $LOAD1)"
log "binary: $OUT/xen-qemu-system-i386"
log "outer: $OUT/qemu-system-x86_64"
