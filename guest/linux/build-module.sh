#!/bin/bash
# Build the patched xen-tpmfront.ko (guest/linux/0*.patch: probe for TPM 2.0) out of tree
# for the Debian 6.1 kernel that the testbed boots (ci/testbed/debs.lock).  Nothing is
# installed on the host: the .debs are `apt-get download`ed and `dpkg -x`ed into a cache.
#
#   guest/linux/build-module.sh                 # build (first run also writes guest/linux/debs.lock)
#   guest/linux/build-module.sh --update-lock   # re-pin to the testbed kernel's current version
#
# Inputs (pinned by version + sha256 in guest/linux/debs.lock; the version must be the one of
# linux-image-<abi>-amd64-unsigned in ci/testbed/debs.lock):
#   linux-headers-<abi>-amd64, linux-headers-<abi>-common, linux-kbuild-6.1  -> Kbuild tree
#   linux-source-6.1 (133 MiB .deb): only drivers/char/tpm/{xen-tpmfront.c,tpm.h} and the
#     top Makefile are extracted (streamed; ~8 s), then the .deb is deleted
#     (XVTPM_KEEP_SOURCE_DEB=1 keeps it).  deb-src is not configured on our hosts and the
#     search tool's fetch of a kernel repository exceeds its size limit; the Debian binary
#     source package is the exact source of the pinned kernel, Debian patches included.
# Host tools: gcc-12 (the compiler of the Debian kernel: CONFIG_CC_VERSION_TEXT), make,
#   libelf1 (objtool), patch, xz, dpkg-deb, apt-get.  Installed if missing unless
#   XVTPM_NO_HOST_INSTALL=1.
# Drift: Debian keeps one version per package and suite, so these pins vanish with every kernel
#   security upload. ci/testbed/debs-resolve.sh turns the two repository locks into the locks as
#   used (the whole kernel set moved to the newest ABI published at one version; a published
#   version whose SHA256 changed is a hard error; XVTPM_TESTBED_STRICT=1 refuses drift). run.sh
#   passes fetch.sh's result in XVTPM_LOCK_OUT; run alone, this script resolves them itself.
# Env: XVTPM_CACHE (see ci/testbed/cache-dir.sh; we use $XVTPM_CACHE/guest-linux), XVTPM_OUT (ci/out),
#      XVTPM_LOCK_OUT (directory with testbed-debs.lock.used and linux-debs.lock.used),
#      XVTPM_GUEST_MODULE_OUT (default $XVTPM_OUT/guest-linux): where xen-tpmfront.ko goes.
# Output: $XVTPM_GUEST_MODULE_OUT/xen-tpmfront.ko, xen-tpmfront.ko.info (vermagic, sha256,
#         source/patch provenance), build.log.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd); CI=$TOP/ci
. "$CI/testbed/cache-dir.sh"; CACHE=$XVTPM_CACHE/guest-linux
OUTDIR=${XVTPM_GUEST_MODULE_OUT:-${XVTPM_OUT:-$CI/out}/guest-linux}
REPO_TB_LOCK=$CI/testbed/debs.lock
REPO_LOCK=$HERE/debs.lock
NICE=${XVTPM_NICE:-10}
die() { echo "build-module.sh: ERROR: $*" >&2; exit 1; }
log() { echo "build-module.sh: $*"; }
T0=$(date +%s.%N)
el() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

# ---- host tools ----
declare -A HOST_TOOLS=([gcc-12]=gcc-12 [make]=make [patch]=patch [xz]=xz-utils [dpkg-deb]=dpkg
                       [apt-get]=apt [sha256sum]=coreutils [bc]=bc [strip]=binutils [strings]=binutils)
missing=()
for c in "${!HOST_TOOLS[@]}"; do command -v "$c" >/dev/null 2>&1 || missing+=("${HOST_TOOLS[$c]}"); done
[ -e /usr/lib/x86_64-linux-gnu/libelf.so.1 ] || missing+=(libelf1)
if [ ${#missing[@]} -gt 0 ]; then
  [ "${XVTPM_NO_HOST_INSTALL:-0}" = 1 ] && die "missing host packages: ${missing[*]}"
  log "installing host packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
    die "could not install host packages: ${missing[*]}"
fi

# ---- which kernel: the one the testbed boots (the locks as used today, drift re-resolved) ----
if [ "${1:-}" = --update-lock ]; then
  TB_LOCK=$REPO_TB_LOCK; LOCK=$REPO_LOCK
else
  LOCK_OUT=${XVTPM_LOCK_OUT:-}
  if [ -z "$LOCK_OUT" ] || [ ! -s "$LOCK_OUT/linux-debs.lock.used" ]; then
    LOCK_OUT=$XVTPM_CACHE/locks
    "$CI/testbed/debs-resolve.sh" --out "$LOCK_OUT" "$REPO_TB_LOCK" "$REPO_LOCK" || die "cannot resolve the pinned packages (see above)"
  fi
  TB_LOCK=$LOCK_OUT/testbed-debs.lock.used; LOCK=$LOCK_OUT/linux-debs.lock.used
fi
[ -f "$TB_LOCK" ] || die "no $TB_LOCK"
read -r KPKG KPKGVER _ < <(grep -E '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned ' "$TB_LOCK") ||
  die "no linux-image-6.1.0-*-amd64-unsigned in $TB_LOCK"
KVER=${KPKG#linux-image-}; KVER=${KVER%-unsigned}          # 6.1.0-56-amd64
ABI=${KVER%-amd64}                                          # 6.1.0-56
PKGS=(linux-headers-$ABI-amd64 linux-headers-$ABI-common linux-kbuild-6.1 linux-source-6.1)

mkdir -p "$CACHE/debs" "$OUTDIR"
cd "$CACHE/debs"
download() {  # pkg=version; one apt-get update retry
  apt-get download -qq "$1" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get download -qq "$1" >/dev/null; }
}
debfile() { ls -t "${1}_"*.deb 2>/dev/null | head -n1; }

# ---- pin: guest/linux/debs.lock (package version arch sha256 file) ----
if [ "${1:-}" = --update-lock ]; then
  tmp=$(mktemp)
  { echo "# guest/linux/debs.lock -- generated by build-module.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) for $KPKG $KPKGVER"
    echo "# package version arch sha256 file"; } > "$tmp"
  for p in "${PKGS[@]}"; do
    rm -f "${p}"_*.deb
    download "$p=$KPKGVER" || die "apt-get download $p=$KPKGVER failed (the testbed kernel's version must be in the apt lists)"
    f=$(debfile "$p")
    [ "$(dpkg-deb -f "$f" Version)" = "$KPKGVER" ] || die "downloaded $f is not version $KPKGVER"
    printf '%s %s %s %s %s\n' "$p" "$KPKGVER" "$(dpkg-deb -f "$f" Architecture)" "$(sha256sum < "$f" | cut -d' ' -f1)" "$f" >> "$tmp"
  done
  mv "$tmp" "$LOCK"
  log "wrote $LOCK (${#PKGS[@]} packages, $KPKGVER)"
fi
for p in "${PKGS[@]}"; do
  read -r _ v _ < <(grep "^$p " "$LOCK") || die "$p is not in $LOCK; run $0 --update-lock"
  [ "$v" = "$KPKGVER" ] || die "$LOCK pins $p $v but the testbed kernel is $KPKG $KPKGVER; run $0 --update-lock"
done

# ---- a module built before from exactly these inputs is reused (the cache is keyed by them) ----
KEY=$( { grep -E "^($KPKG|$(IFS='|'; echo "${PKGS[*]}")) " "$TB_LOCK" "$LOCK" | cut -d: -f2-
         cat "$HERE"/0*.patch "$HERE/xen-tpmfront/Kbuild" "$HERE/xen-tpmfront/Makefile" "$HERE/build-module.sh"; gcc-12 --version | head -n1; } |
       sha256sum | cut -c1-32)
KO_CACHE=$CACHE/ko/$KEY
if [ -s "$KO_CACHE/xen-tpmfront.ko" ] && [ -s "$KO_CACHE/xen-tpmfront.ko.info" ]; then
  install -m 0644 "$KO_CACHE/xen-tpmfront.ko" "$KO_CACHE/xen-tpmfront.ko.info" "$OUTDIR/"
  log "OK: $OUTDIR/xen-tpmfront.ko reused from $KO_CACHE (same kernel set, patches, build files and compiler)"
  exit 0
fi

# ---- unpack (only what is missing); every .deb used is checked against the lock ----
HDR=$CACHE/headers-$KPKGVER; SRC=$CACHE/src-$KPKGVER
verify() {  # pkg -> path of the verified .deb (downloaded by exact version if absent)
  local p=$1 v a sum f
  read -r _ v a sum f < <(grep "^$p " "$LOCK")
  [ -f "$f" ] || download "$p:$a=$v" || download "$p=$v" || die "cannot download $p=$v"
  [ "$(sha256sum < "$f" | cut -d' ' -f1)" = "$sum" ] || die "sha256 mismatch for $CACHE/debs/$f (delete it, or re-pin with --update-lock)"
  echo "$CACHE/debs/$f"
}
stamp_of() { grep -E "^($(IFS='|'; echo "$*")) " "$LOCK" | sha256sum | cut -c1-64; }
HSTAMP=$(stamp_of "${PKGS[@]:0:3}"); SSTAMP=$(stamp_of linux-source-6.1)
if [ "$(cat "$HDR/.stamp" 2>/dev/null)" != "$HSTAMP" ]; then
  rm -rf "$HDR"; mkdir -p "$HDR"
  for p in "${PKGS[@]:0:3}"; do dpkg-deb -x "$(verify "$p")" "$HDR"; done
  # the flavour Makefile includes the common one by absolute path (/usr/src/...): point it into the cache
  sed -i "s|^include /usr/src/|include $HDR/usr/src/|" "$HDR/usr/src/linux-headers-$KVER/Makefile"
  grep -q "^include $HDR/" "$HDR/usr/src/linux-headers-$KVER/Makefile" || die "unexpected $HDR/usr/src/linux-headers-$KVER/Makefile"
  echo "$HSTAMP" > "$HDR/.stamp"
  log "unpacked headers + kbuild into $HDR ($(du -sh "$HDR" | cut -f1)) [$(el) s]"
fi
if [ "$(cat "$SRC/.stamp" 2>/dev/null)" != "$SSTAMP" ]; then
  rm -rf "$SRC"; mkdir -p "$SRC"
  deb=$(verify linux-source-6.1)
  # the .deb holds usr/src/linux-source-6.1.tar.xz; stream it and keep three files
  dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/src/linux-source-6.1.tar.xz | nice -n "$NICE" xz -dc |
    tar -x -C "$SRC" --strip-components=1 linux-source-6.1/Makefile \
      linux-source-6.1/drivers/char/tpm/xen-tpmfront.c linux-source-6.1/drivers/char/tpm/tpm.h
  for f in Makefile drivers/char/tpm/xen-tpmfront.c drivers/char/tpm/tpm.h; do [ -s "$SRC/$f" ] || die "$f missing from linux-source-6.1"; done
  upstream=$(awk '/^VERSION =/{v=$3} /^PATCHLEVEL =/{p=$3} /^SUBLEVEL =/{s=$3} END{print v"."p"."s}' "$SRC/Makefile")
  [ "$upstream" = "${KPKGVER%-*}" ] || die "linux-source-6.1 is Linux $upstream, expected ${KPKGVER%-*}"
  [ "${XVTPM_KEEP_SOURCE_DEB:-0}" = 1 ] || rm -f "$deb"
  echo "$SSTAMP" > "$SRC/.stamp"
  log "extracted xen-tpmfront.c + tpm.h of Linux $upstream from linux-source-6.1 $KPKGVER [$(el) s]"
fi

# ---- build ----
KDIR=$HDR/usr/src/linux-headers-$KVER
B=$OUTDIR/build; rm -rf "$B"; mkdir -p "$B"
cp "$HERE/xen-tpmfront/Kbuild" "$HERE/xen-tpmfront/Makefile" "$B/"
cp "$SRC/drivers/char/tpm/xen-tpmfront.c" "$SRC/drivers/char/tpm/tpm.h" "$B/"
patches=("$HERE"/0*.patch)
[ -e "${patches[0]}" ] || die "no patches in $HERE"
for pf in "${patches[@]}"; do
  patch -s -p4 -F0 --no-backup-if-mismatch -d "$B" < "$pf" || die "$(basename "$pf") does not apply to Linux ${KPKGVER%-*}"
done
log "applied ${#patches[@]} patch(es); building against $KDIR"
# KBUILD_MODPOST_WARN unset: an unresolved symbol is an error.  No signing: CONFIG_MODULE_SIG_FORCE
# is off in the Debian kernel, so the unsigned module loads (and taints the kernel 'E').
if ! nice -n "$NICE" make -C "$B" KDIR="$KDIR" -j"$(nproc)" > "$B/build.log" 2>&1; then
  tail -n 40 "$B/build.log" >&2; die "module build failed (log: $B/build.log)"
fi
grep -E 'warning:' "$B/build.log" >&2 || true
KO=$B/xen-tpmfront.ko
[ -s "$KO" ] || die "no $KO"

# ---- checks: vermagic and symbol versions must match the pinned kernel's own module ----
modinfo_f() { strings "$2" | sed -n "s/^$1=//p" | head -n1; }
vm=$(modinfo_f vermagic "$KO")
stock=$XVTPM_CACHE/root/lib/modules/$KVER/kernel/drivers/char/tpm/xen-tpmfront.ko
if [ -f "$stock" ]; then
  svm=$(modinfo_f vermagic "$stock")
  [ "$vm" = "$svm" ] || die "vermagic '$vm' differs from the stock module's '$svm'"
else
  case $vm in "$KVER "*) ;; *) die "vermagic '$vm' is not for $KVER" ;; esac
  log "note: $stock not unpacked (run ci/testbed/fetch.sh); checked the vermagic release only"
fi
grep -q tpm2_probe < <(strings "$KO") || die "the built module does not reference tpm2_probe (patch not applied?)"
install -m 0644 "$KO" "$OUTDIR/xen-tpmfront.ko"
strip --strip-debug "$OUTDIR/xen-tpmfront.ko"   # as Debian ships its modules (345 KiB -> 23 KiB)
cp "$B/build.log" "$OUTDIR/build.log"
{
  echo "module: xen-tpmfront.ko (patched: probes for TPM 2.0)"
  echo "sha256: $(sha256sum < "$OUTDIR/xen-tpmfront.ko" | cut -d' ' -f1)"
  echo "size: $(stat -c %s "$OUTDIR/xen-tpmfront.ko")"
  echo "vermagic: $vm"
  echo "kernel: $KPKG $KPKGVER"
  echo "source: linux-source-6.1 $KPKGVER (Linux ${KPKGVER%-*}) drivers/char/tpm/xen-tpmfront.c sha256 $(sha256sum < "$SRC/drivers/char/tpm/xen-tpmfront.c" | cut -d' ' -f1)"
  for pf in "${patches[@]}"; do echo "patch: $(basename "$pf") sha256 $(sha256sum < "$pf" | cut -d' ' -f1)"; done
  echo "compiler: $(gcc-12 --version | head -n1)"
} > "$OUTDIR/xen-tpmfront.ko.info"
mkdir -p "$KO_CACHE" && install -m 0644 "$OUTDIR/xen-tpmfront.ko" "$OUTDIR/xen-tpmfront.ko.info" "$KO_CACHE/"
log "OK: $OUTDIR/xen-tpmfront.ko ($(stat -c %s "$OUTDIR/xen-tpmfront.ko") bytes, vermagic '$vm') in $(el) s"
