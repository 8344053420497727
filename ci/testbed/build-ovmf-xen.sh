#!/bin/bash
# Build OVMF for Xen HVM guests (edk2's OvmfPkg/OvmfXen.dsc) WITH the TPM 2.0 modules, from the
# pinned Debian 12 edk2 source, into the testbed cache. No Debian package ships an OvmfXen build
# (docs/hvm.md, "OVMF under Xen"): Debian's ovmf is the QEMU platform (OvmfPkgX64), which since
# edk2 2021 no longer installs the ACPI tables Xen's hvmloader builds, so an HVM guest booted
# with it gets no ACPI at all. OvmfXen installs them (XenAcpiPlatformDxe: hvmloader's TCPA table
# and PNP0C31 TPM device), but edk2 2022.11's OvmfXen has no TPM modules; the patch in
# ci/testbed/ovmf-patches/ includes the same OvmfTpm*.inc files OvmfPkgX64 uses (TPM2_ENABLE).
#
#   ci/testbed/build-ovmf-xen.sh               # fetch, verify, unpack, build (see docs/hvm.md for the time)
#   ci/testbed/build-ovmf-xen.sh --print-pins  # the pins of bookworm's current edk2 source (to update PINS)
#
# Inputs, all in the cache key: the source package (.dsc, .orig.tar.xz, .debian.tar.xz, pinned by
# SHA256 below; apt also checks them against the archive's signed Sources index), the patches, the
# build flags, the versions of the host's compiler, nasm, iasl (acpica-tools), uuid-dev and python3, this script
# and apt-source.sh.
# Output: $XVTPM_CACHE/ovmf/<key>/OVMF.fd and build.info (inputs, sha256 of the image); a build
# whose key exists is not run again. Nothing is installed on the host but the build dependencies
# (apt-get, unless XVTPM_NO_HOST_INSTALL=1).
# Env: XVTPM_CACHE (cache-dir.sh), XVTPM_NICE (default 10), XVTPM_JOBS (default: nproc).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/cache-dir.sh"
. "$HERE/host-packages.sh"
. "$HERE/apt-source.sh"
CACHE=$XVTPM_CACHE/ovmf
APT=$CACHE/apt
NICE=${XVTPM_NICE:-10}
JOBS=${XVTPM_JOBS:-$(nproc)}
die() { echo "build-ovmf-xen.sh: ERROR: $*" >&2; exit 1; }
log() { echo "build-ovmf-xen.sh: $*"; }
PATCHES=("$HERE"/ovmf-patches/*.patch)
[ -f "${PATCHES[0]}" ] || die "no patches in $HERE/ovmf-patches/ (a partial checkout?)"

# ---- pins: Debian 12's edk2, the source of the testbed host's ovmf 2022.11-6+deb12u2
SRC_VERSION=2022.11-6+deb12u2
PINS="edk2_2022.11-6+deb12u2.dsc 3129d783c9017f738af4453c9f94a2fdfba2ee91cf409c0c3623b31377e76cc6
edk2_2022.11.orig.tar.xz 64257dd8a2778c969b8a869cd3b6eda2db2a346bfcf24dc729859745968f1fd6
edk2_2022.11-6+deb12u2.debian.tar.xz a1d848115ae9b140e64d3ab34f7c08210b665bee473e3242a6801c163678780e"

# ---- build: Debian's toolchain (GCC5 = gcc >= 5) and build type; OvmfXen with TPM 2.0 (and TPM 1.2
# detection, as Debian's OVMF: TPM1_ENABLE defaults to TRUE in OvmfTpmDefines.dsc.inc)
BUILD=(-a X64 -t GCC5 -b RELEASE -p OvmfPkg/OvmfXen.dsc -DTPM2_ENABLE=TRUE)
HOST_PKGS=(build-essential uuid-dev nasm acpica-tools python3 dpkg-dev)

MODE=build
case ${1:-} in
  --print-pins) MODE=pins ;;
  "") ;;
  *) die "unknown option $1 (usage: build-ovmf-xen.sh [--print-pins])" ;;
esac

mkdir -p "$CACHE"
if [ $MODE = pins ]; then
  apt_source_print_pins "$APT" edk2 || die "cannot list the current edk2 source (see above)"
  exit 0
fi
exec 8> "$CACHE/.build.lock"
flock -n 8 || { log "another build-ovmf-xen.sh holds $CACHE/.build.lock; waiting for it"; flock 8; }

# ---- host build dependencies ----
missing=()
for p in "${HOST_PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
install_host_packages "${missing[@]}"

# ---- the cache key: every input ----
hostvers=$(dpkg-query -W -f='${Package} ${Version}\n' gcc-12 nasm acpica-tools uuid-dev python3 2>/dev/null | sort)
patchsums=$(cd "$HERE/ovmf-patches" && sha256sum -- *.patch)
KEY=$(printf '%s\n' "$SRC_VERSION" "$PINS" "$patchsums" "${BUILD[*]}" "$hostvers" "$(sha256sum < "$0")" "$(sha256sum < "$HERE/apt-source.sh")" | sha256sum | cut -c1-16)
OUT=$CACHE/$KEY
if [ -s "$OUT/OVMF.fd" ] && [ -s "$OUT/build.info" ]; then
  log "cached: $OUT/OVMF.fd (key $KEY; $(sed -n 's/^built //p' "$OUT/build.info"))"
  log "image: $OUT/OVMF.fd"; exit 0
fi

# ---- fetch and verify the source (ci/testbed/apt-source.sh) ----
SRC=$CACHE/src
apt_source_fetch "$APT" "$SRC" edk2 "$SRC_VERSION" "$PINS" || die "the pinned edk2 source is not available (see above)"
log "source verified against the pins ($(wc -l <<< "$PINS") files)"

# ---- unpack (dpkg-source applies Debian's patches), then ours ----
TREE=$CACHE/tree-$KEY
rm -rf "$TREE"
dpkg-source --no-check -x "$SRC/edk2_$SRC_VERSION.dsc" "$TREE" >/dev/null || die "dpkg-source -x failed"
rm -f "$CACHE"/edk2_*.orig.tar.*
for p in "${PATCHES[@]}"; do
  patch -d "$TREE" -p1 --forward --batch --no-backup-if-mismatch -s < "$p" ||
    die "$(basename "$p") does not apply to edk2 $SRC_VERSION (update it with the pins)"
  log "applied $(basename "$p")"
done

# ---- build (BaseTools first, as debian/rules does), install into the cache ----
T0=$(date +%s); LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
log "building OvmfXen ($(printf '%s ' "${BUILD[@]}")) with $JOBS jobs at nice $NICE (load average $LOAD0)"
( cd "$TREE" && set +eu && export PYTHON3_ENABLE=TRUE WORKSPACE="$TREE" && unset EDK_TOOLS_PATH CONF_PATH &&
  . ./edksetup.sh > /dev/null &&
  { nice -n "$NICE" make -C BaseTools ARCH=X64 -j "$JOBS" || exit 1; } &&
  nice -n "$NICE" build "${BUILD[@]}" -n "$JOBS" ) > "$CACHE/build-$KEY.log" 2>&1 ||
  { tail -n 30 "$CACHE/build-$KEY.log" >&2; die "build failed (log: $CACHE/build-$KEY.log)"; }
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
FD=$TREE/Build/OvmfXen/RELEASE_GCC5/FV/OVMF.fd
[ -s "$FD" ] || die "the build made no $FD (log: $CACHE/build-$KEY.log)"
# the TPM drivers must be in the image (a wrong define builds OvmfXen without them, silently)
for m in Tcg2Pei Tcg2Dxe XenAcpiPlatform; do
  [ -s "$TREE/Build/OvmfXen/RELEASE_GCC5/X64/$m.efi" ] || die "the build has no $m.efi: the TPM modules were not built (log: $CACHE/build-$KEY.log)"
done
mkdir -p "$OUT.tmp"
cp "$FD" "$OUT.tmp/OVMF.fd"
{
  echo "source edk2=$SRC_VERSION"; echo "$PINS"
  echo "patches"; echo "$patchsums"
  echo "build ${BUILD[*]}"; echo "$hostvers"
  echo "sha256 $(sha256sum < "$OUT.tmp/OVMF.fd" | cut -d' ' -f1)"
  echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - T0 )) s, $JOBS jobs, nice $NICE, load average before $LOAD0, after $LOAD1"
} > "$OUT.tmp/build.info"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
[ "${XVTPM_OVMF_KEEP_TREE:-0}" = 1 ] || rm -rf "$TREE"
log "built $OUT/OVMF.fd ($(( $(date +%s) - T0 )) s; load average before $LOAD0, after $LOAD1)"
log "image: $OUT/OVMF.fd"
