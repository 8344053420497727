#!/bin/bash
# Download (never install) the Debian packages the Xen testbed boots from, pin
# them in debs.lock (package, version, sha256) and unpack them into the cache.
#
#   ci/testbed/fetch.sh                  # first run: writes debs.lock; later: verifies it
#   ci/testbed/fetch.sh --update-lock    # re-resolve the newest candidates, rewrite debs.lock
#
# A pin that Debian no longer publishes is drift, not an error: debs-resolve.sh re-resolves its
# group (kernel image + headers + kbuild + source of one version, with guest/linux/debs.lock; Xen
# packages of one version) and writes the locks as used; every .deb is then checked against them.
# A published version whose SHA256 changed is a hard error. XVTPM_TESTBED_STRICT=1 refuses drift.
#
# Env: XVTPM_CACHE (see cache-dir.sh: /var/cache/xvtpm-testbed for root), XVTPM_LOCK_OUT (where the
# locks as used go; default $XVTPM_CACHE/locks; run.sh puts them in the run's log directory),
# XVTPM_NO_HOST_INSTALL=1 (do not apt-get install missing host tools; just fail).
# Layout: $XVTPM_CACHE/debs/*.deb, $XVTPM_CACHE/root/ (dpkg -x of every .deb),
#         $XVTPM_CACHE/img/{xen,vmlinuz} (multiboot Xen ELF, dom0/domU kernel).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CI=$(dirname "$HERE")
. "$HERE/cache-dir.sh"; CACHE=$XVTPM_CACHE
LOCK=$HERE/debs.lock
GUEST_LOCK=$(dirname "$CI")/guest/linux/debs.lock
LOCK_OUT=${XVTPM_LOCK_OUT:-$CACHE/locks}
XENV=4.17

die() { echo "fetch.sh: ERROR: $*" >&2; exit 1; }

# ---- host tools (installed on the host; everything that boots comes from debs) ----
# command -> Debian package
declare -A HOST_TOOLS=(
  [qemu-system-x86_64]=qemu-system-x86 [swtpm]=swtpm [cpio]=cpio [xz]=xz-utils
  [perl]=perl [gzip]=gzip [sha256sum]=coreutils [dpkg-deb]=dpkg [apt-get]=apt
  [timeout]=coreutils [zstd]=zstd [strip]=binutils [strings]=binutils
  [swtpm_setup]=swtpm-tools [certtool]=gnutls-bin [socat]=socat
)
missing=()
for c in "${!HOST_TOOLS[@]}"; do command -v "$c" >/dev/null 2>&1 || missing+=("${HOST_TOOLS[$c]}"); done
# the two-host phases' fleet registry: a private PostgreSQL cluster run.sh starts (not on PATH)
compgen -G '/usr/lib/postgresql/*/bin/initdb' > /dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  [ "${XVTPM_NO_HOST_INSTALL:-0}" = 1 ] && die "missing host packages: ${missing[*]}"
  echo "fetch.sh: installing host packages: ${missing[*]}"
  [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null)" ] || apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
    die "could not install host packages: ${missing[*]}"
fi

# ---- the package set (KERNEL is resolved to the newest 6.1 ABI at lock time) ----
PKGS=(
  # Xen 4.17: hypervisor, toolstack, libraries
  xen-hypervisor-$XENV-amd64 xen-utils-$XENV xen-utils-common xenstore-utils
  libxenmisc$XENV libxenstore4 libxencall1 libxendevicemodel1 libxenevtchn1
  libxenforeignmemory1 libxengnttab1 libxenhypfs1 libxentoolcore1 libxentoollog1
  # their runtime libraries
  libc6 libgcc-s1 libyajl2 libuuid1 zlib1g liblzma5 libzstd1 libext2fs2 libcom-err2
  libncurses6 libtinfo6
  # dom0 / domU kernel (Debian 6.1, unsigned: plain bzImage + modules)
  KERNEL
  busybox-static
  # TPM userland: tpm2-tools + tss2 + the (large) libcurl dependency tail
  tpm2-tools libtss2-esys-3.0.2-0 libtss2-mu0 libtss2-rc0 libtss2-sys1 libtss2-tctildr0
  libtss2-tcti-device0 libssl3
  libcurl3-gnutls libbrotli1 libffi8 libgmp10 libgnutls30 libgssapi-krb5-2 libhogweed6
  libidn2-0 libk5crypto3 libkeyutils1 libkrb5-3 libkrb5support0 libldap-2.5-0 libnettle8
  libnghttp2-14 libp11-kit0 libpsl5 librtmp1 libsasl2-2 libssh2-1 libtasn1-6 libunistring2
  # the project's binaries: vtpm-domain links libtpms
  libtpms0
  # dom0: the attest-service phase makes its service and tenant certificates with openssl
  openssl
  # the hvm-tis phase: the TPM-enabled device model's libraries (build-qemu-xen.sh builds it against
  # these versions' -dev packages), SeaBIOS (libxl's bios-256k.bin) and QEMU's option ROMs (direct
  # kernel boot: linuxboot_dma.bin)
  libglib2.0-0 libpixman-1-0 libfdt1 libpcre2-8-0 libslirp0 seabios qemu-system-data
  # the libvirt-* phases: Debian's libvirtd with the libxl driver, virsh, and their libraries
  libvirt-daemon libvirt-daemon-driver-xen libvirt-clients libvirt0
  libacl1 libapparmor1 libaudit1 libblkid1 libcap-ng0 libicu72 libmount1 libnl-3-200 libnuma1
  libreadline8 libselinux1 libssh-4 libstdc++6 libtirpc3 libxml2
  # the xhost-* phases: host B's "physical TPM" is a swtpm inside dom0 (`swtpm socket`), reached by
  # its manager and tpm2-tools through the swtpm TCTI (tctildr dlopen()s it)
  swtpm swtpm-libs libseccomp2 libtss2-tcti-swtpm0
)

mkdir -p "$CACHE/debs" "$CACHE/img"
cd "$CACHE/debs"

apt_lists_ready() { [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null)" ]; }
download() {  # apt-get download args...; one apt-get update retry
  apt-get download -qq "$@" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get download -qq "$@" >/dev/null; }
}

if [ "${1:-}" = --update-lock ] || [ ! -s "$LOCK" ]; then
  apt_lists_ready || apt-get update -qq
  kpkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$' | cut -d' ' -f1 | sort -V | tail -n1)
  [ -n "$kpkg" ] || die "no linux-image-6.1.0-*-amd64-unsigned package in the apt lists"
  tmp=$(mktemp)
  {
    echo "# ci/testbed/debs.lock -- generated by fetch.sh $(date -u +%Y-%m-%dT%H:%M:%SZ); verify with ci/testbed/fetch.sh"
    echo "# package version arch sha256 file"
  } > "$tmp"
  for p in "${PKGS[@]}"; do
    [ "$p" = KERNEL ] && p=$kpkg
    v=$(apt-cache policy "$p" | awk '/Candidate:/{print $2}')
    [ -n "$v" ] && [ "$v" != "(none)" ] || die "package $p has no candidate in the apt lists"
    download "$p=$v" || die "apt-get download $p=$v failed"
    f=$(ls -t "${p}_"*.deb | head -n1)
    [ "$(dpkg-deb -f "$f" Version)" = "$v" ] || die "downloaded $f is not version $v"
    printf '%s %s %s %s %s\n' "$p" "$v" "$(dpkg-deb -f "$f" Architecture)" "$(sha256sum < "$f" | cut -d' ' -f1)" "$f" >> "$tmp"
  done
  mv "$tmp" "$LOCK"
  echo "fetch.sh: wrote $LOCK ($(grep -vc '^#' "$LOCK") packages, kernel $kpkg)"
else
  # the lock must cover the package list (KERNEL: any linux-image-6.1.0-*-amd64-unsigned)
  for p in "${PKGS[@]}"; do
    if [ "$p" = KERNEL ]; then grep -qE '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned ' "$LOCK" || die "debs.lock has no kernel; run fetch.sh --update-lock"
    else grep -q "^$p " "$LOCK" || die "package $p is in fetch.sh but not in debs.lock; run fetch.sh --update-lock"; fi
  done
fi

# ---- the locks as used today (drift re-resolved), then every .deb checked against them ----
"$HERE/debs-resolve.sh" --out "$LOCK_OUT" "$LOCK" "$GUEST_LOCK" || die "cannot resolve the pinned packages (see above)"
USED=$LOCK_OUT/testbed-debs.lock.used
bad=0
while read -r p v a sum f; do
  case $p in ''|\#*) continue ;; esac
  if [ ! -f "$f" ]; then
    download "$p:$a=$v" || download "$p=$v" || { echo "fetch.sh: ERROR: cannot download $p=$v (gone from the archive?)" >&2; bad=1; continue; }
  fi
  got=$(sha256sum < "$f" | cut -d' ' -f1)
  if [ "$got" != "$sum" ]; then
    echo "fetch.sh: ERROR: sha256 mismatch for $f: debs.lock says $sum, file has $got" >&2; bad=1
  fi
done < "$USED"
[ $bad = 0 ] || die "debs.lock verification failed (delete the bad file from $CACHE/debs to re-download it, or run fetch.sh --update-lock to re-pin)"

# ---- unpack (only when the lock changed) ----
stamp=$(grep -v '^#' "$USED" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$CACHE/root.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -d "$CACHE/root" ]; then
  rm -rf "$CACHE/root"; mkdir -p "$CACHE/root"
  while read -r p v a sum f; do
    case $p in ''|\#*) continue ;; esac
    dpkg-deb -x "$f" "$CACHE/root"
  done < "$USED"
  kver=$(grep -oE '^linux-image-6\.1\.0-[0-9]+-amd64' "$USED" | sed 's/^linux-image-//')
  # QEMU's multiboot loader wants the uncompressed 32-bit ELF, not xen.gz
  gunzip -c "$CACHE/root/boot/xen-$XENV-amd64.gz" > "$CACHE/img/xen"
  cp "$CACHE/root/boot/vmlinuz-$kver" "$CACHE/img/vmlinuz"
  echo "$kver" > "$CACHE/img/kver"
  echo "$stamp" > "$CACHE/root.stamp"
  echo "fetch.sh: unpacked $(grep -vc '^#' "$USED") packages into $CACHE/root (kernel $kver)"
fi
echo "fetch.sh: OK ($(grep -vc '^#' "$USED") packages verified against $USED)"
