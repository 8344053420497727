#!/bin/bash
# Build the testbed's initramfs images from the unpacked .debs (fetch.sh) and
# the project's binaries:
#   $OUT/img/domu.cpio.zst    guest: busybox, tpm2-tools + libs, xenstore client, xen-tpmfront.ko,
#                             xl-vtpm (for `xl-vtpm guest deep-quote`)
#   $OUT/img/vtpmdom.cpio.zst vTPM domain, unikernel-style (scripts/build-vtpmdom.sh --root, the
#                             image real hosts use): /init = vtpm-domain + its libs, xen-evtchn,
#                             xen-gntdev, xen-gntalloc, xen-blkfront + /lib/modules/load-order
#   $OUT/img/hvm.cpio.zst     HVM guest (hvm-tis phase; only with XVTPM_QEMU_XEN): busybox, tpm2-tools
#                             + libs with libcurl-gnutls replaced by hvm-libcurl-stub.c, the guest /init
#                             (role=hvm); no xen-tpmfront, no xenstore, no xl-vtpm; zstd -19
#   $OUT/img/hvm-ovmf.cpio.zst  the hvm-ovmf guest (only with XVTPM_OVMF_XEN): the HVM image plus
#                             xl-vtpm (`xl-vtpm guest deep-quote`); zstd -10
#   $OUT/img/mgrdom.cpio.zst  manager domain (mgrdom phase): busybox, tpm2-tools, vtpmmgr, xl-vtpm,
#                             xen-blkfront + ext4, xen-evtchn + xen-gntdev + xen-gntalloc (boot=serve:
#                             its tpmif backend and admin link), mgrdom-init.sh as /init
#   $OUT/img/dom0.img         dom0: busybox, Xen toolstack, tpm2-tools, vtpmmgr/vtpm-domain/xl-vtpm,
#                             swtpm + the swtpm TCTI and host B's manufactured TPM (xhost-* phases),
#                             Xen/TPM/block modules, the scenario (xvtpm-testbed), /etc/xen/scripts/block
#                             (xen-block-hotplug.sh), the guest kernel + the two images above
#                             (the vTPM-domain image as /usr/lib/xvtpm/vtpmdom/initrd; the manager
#                             domain's as /guest/mgrdom.cpio.zst)
# Every shared library comes from $XVTPM_CACHE/root (the pinned .debs); a library that
# resolves only on the host is an error (XVTPM_ALLOW_HOST_LIBS=1 to allow it).
#
# Env: XVTPM_CACHE (cache-dir.sh), XVTPM_OUT (ci/out), CARGO_TARGET_DIR (target),
#      XVTPM_TESTBED_MGRDOM (1: build the manager domain's image mgrdom.cpio.zst into dom0),
#      XVTPM_QEMU_XEN (the TPM-enabled device model from build-qemu-xen.sh; empty: dom0 gets no
#      HVM pieces and the hvm-tis phase is SKIPPED), XVTPM_OVMF_XEN (OvmfXen with TPM 2.0 from
#      build-ovmf-xen.sh, with XVTPM_QEMU_XEN; empty: no hvm-ovmf guest),
#      XVTPM_PROFILE (auto|debug|release; auto = the one with the newer xl-vtpm),
#      XVTPM_VTPMDOM_KERNEL_DIR (build-vtpmdom-kernel.sh's output: the vTPM domain's own kernel, with
#      XVTPM_VTPMDOM_BIN, default target/release/vtpm-domain; empty: Debian's kernel and modules),
#      XVTPM_TESTBED_VTPMDOM_PROBE (MiB values the scenario boots the default vTPM domain at, INFO only),
#      XVTPM_GUEST_KERNEL (elf|bzimage; elf = raw vmlinux, ~5x faster xl create under TCG),
#      XVTPM_VTPMDOM_LOG (diagnosis: XVTPM_LOG filter inside the vTPM domain, e.g. debug; adds a
#      busybox /init wrapper to its image),
#      XVTPM_GUEST_MEM / XVTPM_VTPMDOM_MEM (MiB, 160 / unset; the vTPM domain's replaces the image's
#      memory-mib, 40 with the own kernel, 128 with Debian's, which xl-vtpm reads)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CI=$(dirname "$HERE"); TOP=$(dirname "$CI")
. "$HERE/cache-dir.sh"; CACHE=$XVTPM_CACHE; OUT=${XVTPM_OUT:-$CI/out}
R=$CACHE/root
TARGET=${CARGO_TARGET_DIR:-$TOP/target}
# 64 MiB cannot hold the Debian kernel (its image takes 58 MiB of guest memory: "segment kernel too large"); 96 MiB leaves ~49 MB MemTotal and the
# guest initramfs (tpm2-tools + libcurl/gnutls/krb5 tail, 22 MB unpacked) OOMs while unpacking; 128 MiB did too once the
# debug xl-vtpm in it reached 11.8 MB (34 MB unpacked): 160 MiB
GUEST_MEM=${XVTPM_GUEST_MEM:-160}
VTPMDOM_MEM=${XVTPM_VTPMDOM_MEM:-}
GUEST_KERNEL=${XVTPM_GUEST_KERNEL:-elf}
die() { echo "build-images.sh: ERROR: $*" >&2; exit 1; }

[ -f "$CACHE/root.stamp" ] && [ -f "$CACHE/img/kver" ] || die "run ci/testbed/fetch.sh first"
KVER=$(cat "$CACHE/img/kver")
KMOD=$R/lib/modules/$KVER/kernel
XBIN=$R/usr/lib/xen-4.17/bin
LDSO=$R/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
LIBPATH=$R/lib/x86_64-linux-gnu:$R/usr/lib/x86_64-linux-gnu
B=$OUT/build; IMG=$OUT/img
mkdir -p "$B" "$IMG"

# ---- helpers ----
# install a library/binary's runtime closure into tree $1 (flat /lib/x86_64-linux-gnu)
copy_libs() {  # tree elf
  local T=$1 elf=$2 name arrow path rest
  "$LDSO" --inhibit-cache --library-path "$LIBPATH" --list "$elf" > "$B/ldd.out" 2>&1 ||
    die "cannot resolve the libraries of $elf: $(cat "$B/ldd.out")"
  while read -r name arrow path rest; do
    case $name in linux-vdso*|/lib64/ld-linux*) continue ;; esac
    [ "$arrow" = "=>" ] || continue
    [ "$path" = "not" ] && die "$elf needs $name, which no package in debs.lock provides (add it to fetch.sh)"
    case $path in
      "$R"/*|"$B/hvm-curl"/*) ;;   # the pinned debs; the HVM guest's libcurl stub (below)
      *) [ "${XVTPM_ALLOW_HOST_LIBS:-0}" = 1 ] || die "$elf needs $name, found only on the host ($path): add its package to fetch.sh"
         echo "build-images.sh: WARNING: $name taken from the host" >&2 ;;
    esac
    [ -e "$T/lib/x86_64-linux-gnu/$name" ] || install -D -m 0755 "$(readlink -f "$path")" "$T/lib/x86_64-linux-gnu/$name"
  done < "$B/ldd.out"
  [ -e "$T/lib64/ld-linux-x86-64.so.2" ] || install -D -m 0755 "$LDSO" "$T/lib64/ld-linux-x86-64.so.2"
}
copy_bin() {  # tree src dst [strip]
  install -D -m 0755 "$2" "$1$3"
  case ${4:-} in strip) strip --strip-debug "$1$3" ;; strip-all) strip "$1$3" ;; esac
  copy_libs "$1" "$2"
}
copy_dlopened() {  # tree lib-soname...  (dlopen()ed: ldd cannot see them)
  local T=$1 l; shift
  for l in "$@"; do
    local src; src=$(ls "$R"/{lib,usr/lib}/x86_64-linux-gnu/"$l" 2>/dev/null | head -n1 || true)
    [ -n "$src" ] || die "dlopen()ed $l is not in the cache"
    install -D -m 0755 "$(readlink -f "$src")" "$T/lib/x86_64-linux-gnu/$l"
    copy_libs "$T" "$src"
  done
}
# kernel module + its depends= closure, flat in /lib/modules, plus <mod>.deps (load order)
copy_mod() {  # tree module-name
  local T=$1 m=$2 f deps d
  f=$(find "$KMOD" -name "$m.ko" -o -name "${m//-/_}.ko" | head -n1)
  if [ -z "$f" ]; then
    grep -qE "/(${m}|${m//-/_})\.ko\$" "$R/lib/modules/$KVER/modules.builtin" 2>/dev/null && return 0  # built in
    die "kernel module $m not found in $KVER"
  fi
  deps=$(strings "$f" | sed -n 's/^depends=//p' | tr ',' ' ')
  for d in $deps; do copy_mod "$T" "$d"; done
  mkdir -p "$T/lib/modules"
  cp "$f" "$T/lib/modules/$m.ko"
  { for d in $deps; do cat "$T/lib/modules/$d.deps" 2>/dev/null; done; echo "$m"; } | awk '!s[$0]++' > "$T/lib/modules/$m.deps"
}
skeleton() {  # tree
  local T=$1
  rm -rf "$T"; mkdir -p "$T"/{proc,sys,dev,run,tmp,etc,var/lib,var/log,root}
  ln -s ../run "$T/var/run"
  mknod -m 600 "$T/dev/console" c 5 1
  mknod -m 666 "$T/dev/null" c 1 3
}
busybox_tree() {  # tree [noxenstore]
  local T=$1 a
  skeleton "$T"; mkdir -p "$T"/{bin,sbin,usr/bin,usr/sbin}
  install -m 0755 "$R/bin/busybox" "$T/bin/busybox"
  for a in $("$R/bin/busybox" --list); do [ -e "$T/bin/$a" ] || ln -s busybox "$T/bin/$a"; done
  [ "${2:-}" = noxenstore ] && return 0
  copy_bin "$T" "$R/usr/bin/xenstore" /usr/bin/xenstore
  for a in read write ls list rm exists watch chmod; do ln -s xenstore "$T/usr/bin/xenstore-$a"; done
}
tpm2_tools() {  # tree
  local T=$1 l
  copy_bin "$T" "$R/usr/bin/tpm2" /usr/bin/tpm2
  for l in "$R"/usr/bin/tpm2_*; do ln -sf tpm2 "$T/usr/bin/$(basename "$l")"; done
  copy_dlopened "$T" libtss2-tcti-device.so.0 libgcc_s.so.1
}
mkcpio() {  # tree out [gzip|zstd|zstd19]
  # guest ramdisks use zstd: libxenguest gunzips a gzip ramdisk before loading it,
  # and 21 MB unpacked does not fit next to the kernel in a 96 MiB PV guest
  local comp="gzip -6 -n"
  case ${3:-gzip} in zstd) comp="zstd -q -10 -T0 -c" ;; zstd19) comp="zstd -q -19 -T0 -c" ;; esac
  (cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0 | $comp) > "$2"
}

# ---- project binaries ----
PROFILE=${XVTPM_PROFILE:-auto}
if [ "$PROFILE" = auto ]; then   # the profile whose xl-vtpm was built last (stale release builds lose; not
  PROFILE=debug                   # vtpm-domain: run.sh builds the release one alone for the vTPM domain)
  if [ -x "$TARGET/release/xl-vtpm" ] && { [ ! -x "$TARGET/debug/xl-vtpm" ] || [ "$TARGET/release/xl-vtpm" -nt "$TARGET/debug/xl-vtpm" ]; }; then
    PROFILE=release
  fi
fi
declare -A PBIN
for b in vtpmmgr vtpm-domain xl-vtpm; do
  if [ -x "$TARGET/$PROFILE/$b" ]; then PBIN[$b]=$TARGET/$PROFILE/$b
  else echo "build-images.sh: note: $TARGET/$PROFILE/$b not built; the scenario will skip what needs it"; fi
done

# raw ELF vmlinux from the bzImage's xz payload (guest kernel; optional dom0 kernel)
if [ ! -s "$CACHE/img/vmlinux" ] || [ "$CACHE/img/vmlinuz" -nt "$CACHE/img/vmlinux" ]; then
  off=$(perl -0777 -ne 'print index($_, "\xfd7zXZ\x00")' "$CACHE/img/vmlinuz")
  [ "$off" -ge 0 ] || die "no xz payload in the bzImage"
  tail -c +$((off+1)) "$CACHE/img/vmlinuz" | xz -dc 2>/dev/null > "$CACHE/img/vmlinux.tmp" || true  # data after the stream
  head -c 4 "$CACHE/img/vmlinux.tmp" | grep -q ELF || die "vmlinux extraction failed"
  mv "$CACHE/img/vmlinux.tmp" "$CACHE/img/vmlinux"
fi

### guest (domU) ###
D=$B/domu
busybox_tree "$D"
tpm2_tools "$D"
copy_mod "$D" xen-tpmfront
# xl-vtpm in the guest: `xl-vtpm guest deep-quote` over /dev/tpm0
[ -n "${PBIN[xl-vtpm]:-}" ] && copy_bin "$D" "${PBIN[xl-vtpm]}" /usr/bin/xl-vtpm strip-all
install -m 0755 "$HERE/domu-init.sh" "$D/init"
mkcpio "$D" "$IMG/domu.cpio.zst" zstd

### manager domain (mgrdom phase, XVTPM_TESTBED_MGRDOM=1; docs/manager-domain.md) ###
# vtpmmgr in its own PV domain that owns the physical TPM (iomem = TIS MMIO): busybox, tpm2-tools,
# vtpmmgr + xl-vtpm (its admin CLI inside the domain; dom0's reaches it through `vtpmmgr bridge`
# in the mgrdom-serve phase), xen-blkfront + ext4 for the state disk, and the Xen device modules
# vtpmmgr's links need when the domain serves (boot=serve: `serve --xen --admin-xen`; as the vTPM
# domain on Debian's kernel: event channels, grant mapping, grant sharing; /dev/xen/xenbus is built
# in). tpm_tis is built into Debian's kernel: the domain gets tpm_tis.force=1 on its command line.
# Only with XVTPM_TESTBED_MGRDOM=1 (run.sh then gives dom0 768M): its 19 MB in dom0's ramfs made a
# 512M dom0 panic while unpacking its initramfs ("System is deadlocked on memory").
rm -f "$IMG/mgrdom.cpio.zst"
if [ "${XVTPM_TESTBED_MGRDOM:-0}" = 1 ] && [ -n "${PBIN[vtpmmgr]:-}" ] && [ -n "${PBIN[xl-vtpm]:-}" ]; then
  D=$B/mgrdom
  busybox_tree "$D"
  tpm2_tools "$D"
  copy_mod "$D" tpm_tis
  copy_mod "$D" xen-blkfront
  copy_mod "$D" crc32c_generic   # ext4 will not mount without a crc32c driver
  copy_mod "$D" ext4
  for m in xen-evtchn xen-gntdev xen-gntalloc; do copy_mod "$D" $m; done
  copy_bin "$D" "${PBIN[vtpmmgr]}" /usr/bin/vtpmmgr strip-all
  copy_bin "$D" "${PBIN[xl-vtpm]}" /usr/bin/xl-vtpm strip-all
  install -m 0755 "$HERE/mgrdom-init.sh" "$D/init"
  mkcpio "$D" "$IMG/mgrdom.cpio.zst" zstd
  echo "build-images.sh: note: mgrdom.cpio.zst $(stat -c %s "$IMG/mgrdom.cpio.zst") bytes ($(du -sm "$D" | cut -f1) MB unpacked)"
fi

### HVM guest (hvm-tis): the same /init, only what role=hvm runs ###
# busybox and tpm2-tools: no PV TPM driver, no xenstore client, no xl-vtpm, and libcurl-gnutls
# replaced by hvm-libcurl-stub.c (tpm2 needs curl only for tpm2_getekcertificate's download; the
# real one brings 28 libraries, 11 of the 19 MB). The device model loads the image by fw_cfg DMA
# (qemu-patches/0001) and the guest kernel unpacks it under nested TCG at every boot, so it is
# also compressed hard (zstd -19, once per image build)
if [ -n "${XVTPM_QEMU_XEN:-}" ]; then
  D=$B/hvm
  busybox_tree "$D" noxenstore
  rm -rf "$B/hvm-curl"; mkdir -p "$B/hvm-curl"
  command -v "${CC:-cc}" >/dev/null || die "no C compiler (${CC:-cc}) for the HVM guest's libcurl stub: install build-essential (build-qemu-xen.sh does) or set CC"
  "${CC:-cc}" -O2 -shared -fPIC -nostdlib -Wall -Wextra -Werror -Wl,-soname,libcurl-gnutls.so.4 \
    -Wl,--version-script="$HERE/hvm-libcurl-stub.map" -o "$B/hvm-curl/libcurl-gnutls.so.4" "$HERE/hvm-libcurl-stub.c" ||
    die "could not build the HVM guest's libcurl stub ($HERE/hvm-libcurl-stub.c)"
  install -D -m 0755 "$B/hvm-curl/libcurl-gnutls.so.4" "$D/lib/x86_64-linux-gnu/libcurl-gnutls.so.4"
  LIBPATH_ALL=$LIBPATH; LIBPATH=$B/hvm-curl:$LIBPATH
  tpm2_tools "$D"
  LIBPATH=$LIBPATH_ALL
  [ -e "$D/lib/x86_64-linux-gnu/libgnutls.so.30" ] && die "the HVM guest got libgnutls: tpm2 did not resolve libcurl-gnutls to the stub"
  install -m 0755 "$HERE/domu-init.sh" "$D/init"
  mkcpio "$D" "$IMG/hvm.cpio.zst" zstd19
  # the hvm-ovmf guest: the same plus xl-vtpm for `xl-vtpm guest deep-quote` over /dev/tpmrm0
  # (its own image, so the other HVM guests' boot figures stay comparable; zstd -10: the
  # stripped xl-vtpm is most of it and -19 would cost every image build ~half a minute)
  if [ -n "${XVTPM_OVMF_XEN:-}" ]; then
    [ -n "${PBIN[xl-vtpm]:-}" ] || die "the hvm-ovmf guest needs xl-vtpm (cargo build)"
    copy_bin "$D" "${PBIN[xl-vtpm]}" /usr/bin/xl-vtpm strip-all
    mkcpio "$D" "$IMG/hvm-ovmf.cpio.zst" zstd
  fi
  # the hvm-migrate guest: the same plus the xenstore client (dom0 sends it its checks after each
  # move through data/xvtpm-cmd, as to the PV migration guest); zstd -10
  copy_bin "$D" "$R/usr/bin/xenstore" /usr/bin/xenstore
  for a in read write; do ln -sf xenstore "$D/usr/bin/xenstore-$a"; done
  mkcpio "$D" "$IMG/hvm-mig.cpio.zst" zstd
fi

### vTPM domain (unikernel-style) ###
# The project's own image builder (what `make vtpmdom` runs on a real host), fed the pinned
# Debian root: /init = vtpm-domain (PID 1: mounts, finit_module()s /lib/modules/load-order if
# any, waits for /dev/xen/* and its disk), its libraries; no shell, no device nodes.
#  - with the project's own kernel (XVTPM_VTPMDOM_KERNEL_DIR from build-vtpmdom-kernel.sh; run.sh's
#    default): every driver built in, the release vtpm-domain (XVTPM_VTPMDOM_BIN), 32 MiB. It is
#    xl-vtpm's default in dom0 (/usr/lib/xvtpm/vtpmdom/); the Debian kernel's image goes beside it
#    (/usr/lib/xvtpm/vtpmdom-debian/) for the vtpmdom-debian phase, the 128 MiB comparison;
#  - without (XVTPM_TESTBED_VTPMDOM_KERNEL=debian): the Debian kernel with xen-evtchn, xen-gntdev,
#    xen-gntalloc and xen-blkfront as modules, the profile's vtpm-domain, 128 MiB, as the default.
rm -rf "$B/vtpmdom" "$B/vtpmdom-debian" "$IMG/vtpmdom.cpio.zst" "$IMG/vtpmdom-debian.cpio.zst"
VTPMDOM_KDIR=${XVTPM_VTPMDOM_KERNEL_DIR:-}
if [ -n "${PBIN[vtpm-domain]:-}" ]; then
  "$TOP/scripts/build-vtpmdom.sh" --vtpm-domain "${PBIN[vtpm-domain]}" --root "$R" --kver "$KVER" --out "$B/vtpmdom-debian" ||
    die "scripts/build-vtpmdom.sh (Debian kernel) failed"
  rm -f "$B/vtpmdom-debian/vmlinuz"   # the same Debian kernel as the guests': dom0 has it as $KIMG
  if [ -n "$VTPMDOM_KDIR" ]; then
    [ -s "$VTPMDOM_KDIR/vmlinux" ] || die "XVTPM_VTPMDOM_KERNEL_DIR=$VTPMDOM_KDIR has no vmlinux (ci/testbed/build-vtpmdom-kernel.sh builds it)"
    VBIN=${XVTPM_VTPMDOM_BIN:-$TARGET/release/vtpm-domain}
    [ -x "$VBIN" ] || die "$VBIN not built: the small vTPM domain takes the release vtpm-domain (cargo build --release -p vtpm-domain; run.sh does)"
    "$TOP/scripts/build-vtpmdom.sh" --vtpm-domain "$VBIN" --root "$R" --kernel "$VTPMDOM_KDIR/vmlinux" --out "$B/vtpmdom" ||
      die "scripts/build-vtpmdom.sh (own kernel) failed"
    mv "$B/vtpmdom-debian/initrd" "$IMG/vtpmdom-debian.cpio.zst"
  else
    mv "$B/vtpmdom-debian" "$B/vtpmdom"
  fi
  mv "$B/vtpmdom/initrd" "$IMG/vtpmdom.cpio.zst"
  if [ -n "${XVTPM_VTPMDOM_LOG:-}" ]; then
    # diagnosis only: /init becomes a busybox script that sets XVTPM_LOG (the domain's kernel
    # command line is xl-vtpm's), raises the console loglevel (stack traces of hung tasks, reported
    # after 30 s) and execs vtpm-domain, which stays PID 1
    W=$B/vtpmdom-log; rm -rf "$W"; mkdir -p "$W"
    (cd "$W" && zstd -dc "$IMG/vtpmdom.cpio.zst" | cpio -i --quiet --make-directories)
    mv "$W/init" "$W/vtpm-domain"
    install -D -m 0755 "$R/bin/busybox" "$W/bin/busybox"
    printf '%s\n' '#!/bin/busybox sh' '/bin/busybox mount -t proc proc /proc' \
      'echo 7 > /proc/sys/kernel/printk; echo 30 > /proc/sys/kernel/hung_task_timeout_secs' \
      "export XVTPM_LOG=\"$XVTPM_VTPMDOM_LOG\"" 'exec /vtpm-domain "$@"' > "$W/init"
    chmod 0755 "$W/init"
    mkcpio "$W" "$IMG/vtpmdom.cpio.zst" zstd
    echo "vtpmdom.cpio.zst: XVTPM_LOG=$XVTPM_VTPMDOM_LOG wrapper around vtpm-domain (XVTPM_VTPMDOM_LOG)"
  fi
  for i in vtpmdom vtpmdom-debian; do
    [ -s "$IMG/$i.cpio.zst" ] || continue
    echo "build-images.sh: note: $i.cpio.zst $(stat -c %s "$IMG/$i.cpio.zst") bytes ($(zstd -dc "$IMG/$i.cpio.zst" | wc -c) unpacked): $(zstd -dc "$IMG/$i.cpio.zst" | cpio -t --quiet | grep -vE '^\.?$' | tr '\n' ' ')"
  done
fi
### dom0 ###
D=$B/dom0
busybox_tree "$D"
for b in xl xenstored xenconsoled xen-init-dom0 libxl-save-helper xenconsole xenstore-control; do
  copy_bin "$D" "$XBIN/$b" /usr/lib/xen-4.17/bin/$b
done
# glibc dlopen()s libgcc_s (pthread_cancel; xl aborts without it), tctildr dlopen()s the TCTI
tpm2_tools "$D"
# xhost-* phases: host B's "physical TPM" is a swtpm in dom0 (`swtpm socket` only), reached by its
# vtpmmgr and tpm2-tools through the swtpm TCTI. swtpm's RUNPATH names .../x86_64-linux-gnu/swtpm
# (libswtpm_libtpms.so.0), which ld.so would resolve on the host: the cache's copy comes first
LIBPATH_ALL=$LIBPATH; LIBPATH=$R/usr/lib/x86_64-linux-gnu/swtpm:$LIBPATH
copy_bin "$D" "$R/usr/bin/swtpm" /usr/bin/swtpm
LIBPATH=$LIBPATH_ALL
mkdir -p "$D/usr/lib/x86_64-linux-gnu/swtpm"
ln -sfn /lib/x86_64-linux-gnu/libswtpm_libtpms.so.0 "$D/usr/lib/x86_64-linux-gnu/swtpm/libswtpm_libtpms.so.0"
copy_dlopened "$D" libtss2-tcti-swtpm.so.0
# stands in for ssh on one machine (migrate-xhost: `xl-vtpm migrate GUEST host-b --ssh THIS`, which
# runs `sh -c "THIS HOST RECEIVER…"`): drops the host, runs the rest as ssh's remote shell would
install -d "$D/etc/xvtpm-testbed"
printf '%s\n' '#!/bin/sh' '# ssh HOST CMD... on one machine: the host is dropped, CMD... runs with sh -c (words joined by' \
  '# blanks, as ssh joins them for the remote shell); stdin and stdout are the caller'"'"'s' 'shift' 'exec sh -c "$*"' > "$D/etc/xvtpm-testbed/ssh-local"
chmod 0755 "$D/etc/xvtpm-testbed/ssh-local"
# The project's binaries arrive as a host does it: the Debian package (scripts/build-deb.sh,
# `make deb`) unpacked into the root, its postinst's directories made as it makes them (dom0
# has no dpkg or systemd; the units and man pages ride along unused). Their libraries come
# from the pinned .debs like everything else's.
DEB_NAME=none
if [ ${#PBIN[@]} -eq 3 ]; then
  rm -rf "$B/deb"
  DEB=$(XVTPM_DEB_COMPRESSION=none "$TOP/scripts/build-deb.sh" "$TARGET/$PROFILE" "$B/deb") || die "scripts/build-deb.sh failed"
  dpkg-deb -x "$DEB" "$D"
  for b in "${!PBIN[@]}" xvtpm-attestd; do
    [ -x "$D/usr/bin/$b" ] || die "$DEB has no /usr/bin/$b"
    copy_libs "$D" "$D/usr/bin/$b"
  done
  install -d -m 0700 "$D/var/lib/xvtpm"
  DEB_NAME=$(basename "$DEB")
  echo "build-images.sh: note: dom0 has $DEB_NAME unpacked ($(dpkg-deb -c "$DEB" | wc -l) entries)"
else
  for b in "${!PBIN[@]}"; do copy_bin "$D" "${PBIN[$b]}" /usr/bin/$b strip; done
fi
# attest-service phase: openssl makes the service's and the tenants' certificates in dom0
copy_bin "$D" "$R/usr/bin/openssl" /usr/bin/openssl
install -D -m 0644 "$R/etc/ssl/openssl.cnf" "$D/etc/ssl/openssl.cnf"
# libvirt-* phases: Debian's libvirtd with the libxl driver only (no QEMU, network or storage
# driver: libvirtd loads the drivers it finds), virsh, the CPU map libxl's capabilities decode the
# host CPU with, and the hook (/etc/libvirt/hooks/libxl -> `xl-vtpm libvirt-hook`). dom0 has no
# systemd, dbus or polkit: the config allows root on the unix socket without polkit. ~47 MB of
# ramfs (libicu alone is 30 MB). XVTPM_TESTBED_LIBVIRT=0 leaves it all out.
LIBVIRT=none
if [ "${XVTPM_TESTBED_LIBVIRT:-1}" != 0 ]; then
  LVD=/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_libxl.so
  [ -f "$R$LVD" ] || die "$R$LVD missing: libvirt-daemon-driver-xen is not in debs.lock"
  copy_bin "$D" "$R/usr/sbin/libvirtd" /usr/sbin/libvirtd
  copy_bin "$D" "$R/usr/bin/virsh" /usr/bin/virsh
  copy_bin "$D" "$R$LVD" "$LVD"
  mkdir -p "$D/usr/share/libvirt"; cp -a "$R/usr/share/libvirt/cpu_map" "$D/usr/share/libvirt/"
  # the TCG CPU matches no model of the map: a featureless host-decode model (see the file)
  install -m 0644 "$HERE/libvirt/x86_xvtpm-testbed.xml" "$D/usr/share/libvirt/cpu_map/"
  sed -i "s|^\( *\)<include filename='x86_kvm64.xml'/>|&\n\1<include filename='x86_xvtpm-testbed.xml'/>|" "$D/usr/share/libvirt/cpu_map/index.xml"
  grep -q "x86_xvtpm-testbed.xml" "$D/usr/share/libvirt/cpu_map/index.xml" || die "cpu_map/index.xml: no x86_kvm64.xml line to add the testbed's model after"
  # libvirtd looks up root's user and group records (dom0 has none otherwise)
  [ -e "$D/etc/passwd" ] || echo 'root:x:0:0:root:/root:/bin/sh' > "$D/etc/passwd"
  [ -e "$D/etc/group" ] || echo 'root:x:0:' > "$D/etc/group"
  install -D -m 0644 "$HERE/libvirt/libvirtd.conf" "$D/etc/libvirt/libvirtd.conf"
  install -D -m 0644 "$HERE/libvirt/libxl.conf" "$D/etc/libvirt/libxl.conf"
  install -D -m 0755 "$HERE/libvirt/hook-libxl" "$D/etc/libvirt/hooks/libxl"
  mkdir -p "$D/var/lib/libvirt/libxl" "$D/var/log/libvirt/libxl" "$D/var/cache/libvirt" "$D/etc/libvirt/libxl"
  LIBVIRT=$(dpkg-deb -f "$(ls "$CACHE"/debs/libvirt-daemon_*.deb | head -n1)" Version 2>/dev/null || echo unknown)
fi
# The host's physical TPM as it leaves the factory: swtpm_setup manufactures its state (RSA and
# ECC EKs, their certificates in NV) with a private swtpm_localca that plays the TPM vendor;
# run.sh starts every run's swtpm from a copy of it. dom0 gets only the vendor's public
# certificates: the root (what a tenant trusts) and the issuing intermediate (what the provider
# serves beside the EK certificate).
V=$IMG/vendor; rm -rf "$V"; mkdir -p "$V/ca" "$V/tpm-state"
printf 'statedir = %s\nsigningkey = %s\nissuercert = %s\ncertserial = %s\n' \
  "$V/ca" "$V/ca/signkey.pem" "$V/ca/issuercert.pem" "$V/ca/certserial" > "$V/localca.conf"
printf -- '--platform-manufacturer xvtpm-testbed\n--platform-version 2.1\n--platform-model swtpm\n' > "$V/localca.options"
printf 'create_certs_tool = %s\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\n' \
  "$(command -v swtpm_localca || echo /usr/bin/swtpm_localca)" "$V/localca.conf" "$V/localca.options" > "$V/swtpm_setup.conf"
# --pcr-banks -: every bank stays allocated, as in an unmanufactured swtpm (SeaBIOS measures into all)
swtpm_setup --tpm2 --tpmstate "$V/tpm-state" --create-ek-cert --pcr-banks - --config "$V/swtpm_setup.conf" \
  --logfile "$V/swtpm_setup.log" > "$V/swtpm_setup.out" 2>&1 || die "swtpm_setup (the host TPM's manufacture) failed: $(tail -n 5 "$V/swtpm_setup.out" "$V/swtpm_setup.log")"
[ -s "$V/ca/swtpm-localca-rootca-cert.pem" ] && [ -s "$V/ca/issuercert.pem" ] || die "swtpm_localca made no vendor root/intermediate in $V/ca"
# host B's TPM (xhost-* phases: a second host simulated in dom0, its swtpm inside dom0), from the
# same factory: the same vendor CA, so its EK certificate chains to the same root
mkdir -p "$V/tpm-state-b"
swtpm_setup --tpm2 --tpmstate "$V/tpm-state-b" --create-ek-cert --pcr-banks - --config "$V/swtpm_setup.conf" \
  --logfile "$V/swtpm_setup-b.log" > "$V/swtpm_setup-b.out" 2>&1 || die "swtpm_setup (host B's TPM) failed: $(tail -n 5 "$V/swtpm_setup-b.out" "$V/swtpm_setup-b.log")"
[ -s "$V/tpm-state-b/tpm2-00.permall" ] || die "swtpm_setup left no $V/tpm-state-b/tpm2-00.permall"
mkdir -p "$D/var/lib/xvtpm-testbed"; rm -rf "$D/var/lib/xvtpm-testbed/tpm-b"
cp -a "$V/tpm-state-b" "$D/var/lib/xvtpm-testbed/tpm-b"
install -D -m 0644 "$V/ca/swtpm-localca-rootca-cert.pem" "$D/etc/xvtpm-testbed/vendor-root.pem"
install -D -m 0644 "$V/ca/issuercert.pem" "$D/etc/xvtpm-testbed/vendor-intermediate.pem"
echo "build-images.sh: note: host TPM manufactured in $V/tpm-state, host B's in $V/tpm-state-b (dom0: /var/lib/xvtpm-testbed/tpm-b; EK certificates by the vendor CA $V/ca)"
# loop + xen-blkback: a vTPM domain's disk (an image on a loop device, served by blkback)
# virtio_pci + virtio_net: the two-host phases' NICs (the hosts' link, QEMU's user network to the fleet registry)
for m in xen-privcmd xenfs xen-evtchn xen-gntdev xen-gntalloc xen-tpmfront tpm_vtpm_proxy tpm_tis tpm loop xen-blkback virtio_pci virtio_net; do
  copy_mod "$D" $m
done
# mgrdom: dom0 copies its provisioned manager store onto the manager domain's ext2 state image
[ -s "$IMG/mgrdom.cpio.zst" ] && { copy_mod "$D" crc32c_generic; copy_mod "$D" ext4; }
mkdir -p "$D/etc/xen" "$D/guest" "$D/var/lib/xen" "$D/var/log/xen" "$D/var/lib/xvtpm"
cp "$R/etc/xen/xl.conf" "$D/etc/xen/"
# libxl runs /etc/xen/scripts/block for phy disks (run_hotplug_scripts is on by default)
grep -qE '^[[:space:]]*run_hotplug_scripts[[:space:]]*=[[:space:]]*0' "$D/etc/xen/xl.conf" &&
  die "xl.conf turns run_hotplug_scripts off: nothing would run the block script"
install -D -m 0755 "$HERE/xen-block-hotplug.sh" "$D/etc/xen/scripts/block"
# TPM 2.0 guest phase: the patched xen-tpmfront (guest/linux/build-module.sh) and its script.
install -D -m 0644 "${XVTPM_GUEST_KO:-$OUT/guest-linux/xen-tpmfront.ko}" "$D/guest/xen-tpmfront-tpm2.ko"
install -D -m 0755 "$HERE/tpm2-guest-phase.sh" "$D/usr/lib/xvtpm/tpm2-guest-phase.sh"
install -m 0755 "$HERE/dom0-init.sh" "$D/init"
# the scenario itself: the workspace binary xvtpm-testbed (ci/testbed/scenario), which /init starts
if [ -x "$TARGET/$PROFILE/xvtpm-testbed" ]; then
  copy_bin "$D" "$TARGET/$PROFILE/xvtpm-testbed" /usr/lib/xvtpm/testbed/xvtpm-testbed strip
else echo "build-images.sh: note: $TARGET/$PROFILE/xvtpm-testbed not built; dom0 has no scenario to run"; fi
cp "$IMG/domu.cpio.zst" "$D/guest/"
[ -s "$IMG/mgrdom.cpio.zst" ] && cp "$IMG/mgrdom.cpio.zst" "$D/guest/"
# hvm-tis: the TPM-enabled device model (build-qemu-xen.sh) and its libraries, hvmloader (in the
# Xen tree already), SeaBIOS where libxl looks for it, the option ROMs QEMU's Xen direct kernel
# boot asserts (pc.c xen_load_linux), the bzImage (QEMU's -kernel wants it, not the raw ELF), the
# HVM initramfs and its config: xen-configs/hvm-guest.cfg with the testbed's settings substituted
HVM_DM=none; HVM_OVMF=none
if [ -n "${XVTPM_QEMU_XEN:-}" ]; then
  [ -x "$XVTPM_QEMU_XEN" ] || die "XVTPM_QEMU_XEN=$XVTPM_QEMU_XEN is no executable (ci/testbed/build-qemu-xen.sh builds it)"
  # /usr/libexec as Debian installs its device model: QEMU finds its firmware directory relative
  # to its binary (bindir /usr/bin → ../share/qemu); under /usr/lib/xvtpm/qemu-xen it looked in
  # /usr/lib/xvtpm/share/qemu, found no linuxboot_dma.bin and SeaBIOS had nothing to boot
  HVM_DM_PATH=/usr/libexec/xen-qemu-system-i386-tpm
  copy_bin "$D" "$XVTPM_QEMU_XEN" "$HVM_DM_PATH"
  [ -f "$D/usr/lib/xen-4.17/boot/hvmloader" ] || install -D -m 0644 "$R/usr/lib/xen-4.17/boot/hvmloader" "$D/usr/lib/xen-4.17/boot/hvmloader"
  install -D -m 0644 "$R/usr/share/seabios/bios-256k.bin" "$D/usr/share/seabios/bios-256k.bin"
  for f in linuxboot.bin linuxboot_dma.bin pvh.bin multiboot.bin multiboot_dma.bin; do
    install -D -m 0644 "$R/usr/share/qemu/$f" "$D/usr/share/qemu/$f"
  done
  cp -a "$R/usr/share/qemu/keymaps" "$D/usr/share/qemu/"
  [ -f "$D/guest/vmlinuz" ] || cp "$CACHE/img/vmlinuz" "$D/guest/vmlinuz"
  cp "$IMG/hvm.cpio.zst" "$D/guest/"
  HCFG_SRC=$TOP/xen-configs/hvm-guest.cfg
  [ -f "$HCFG_SRC" ] || die "$HCFG_SRC missing"
  { sed -e 's|^name = .*|name = "hvm-tis"|' -e 's|^memory = .*|memory = 256|' -e 's|^vcpus = .*|vcpus = 1|' \
        -e '/^disk = /d' -e "s|^device_model_override = .*|device_model_override = \"$HVM_DM_PATH\"|" "$HCFG_SRC"
    cat <<HCFG
# testbed (build-images.sh): direct kernel boot, consoles, and what TCG under Xen needs.
# tpm_tis.interrupts=0: TPM2_Create/CreatePrimary each took ~290 s, the kernel's whole wait for
# them (TPM_LONG_LONG, 300 s), as if it waited for an interrupt that never came instead of
# seeing the status; polling is the hypothesis under test (not yet run; docs/hvm.md). No
# nographic = 1: libxl would pass -nographic, QEMU then tells SeaBIOS (fw_cfg NOGRAPHIC) to make
# the serial port its screen (sercon), and clearing that screen cost the guest 243 s of port
# I/O, each an ioreq into the TCG-emulated dom0 (measured 2026-12-04)
kernel = "/guest/vmlinuz"
ramdisk = "/guest/hvm.cpio.zst"
extra = "console=hvc0 rootfstype=ramfs quiet role=hvm hold=1 tpm_tis.interrupts=0"
serial = "file:/var/log/xen/hvm-tis.serial"
vga = "none"
tsc_mode = "native"
HCFG
  } > "$D/etc/xen/hvm-tis.cfg"
  for k in 'name = "hvm-tis"' 'type = "hvm"' 'bios = "seabios"' 'vtpm = [ "model=tis" ]' "device_model_override = \"$HVM_DM_PATH\"" 'on_reboot = "restart"'; do
    grep -qF "$k" "$D/etc/xen/hvm-tis.cfg" || die "hvm-tis.cfg: no '$k' after substituting $HCFG_SRC"
  done
  grep -q '^disk' "$D/etc/xen/hvm-tis.cfg" && die "hvm-tis.cfg: the disk line of $HCFG_SRC was not dropped"
  # the same guest without a vTPM (the P5 baseline of the hvm-tis phase): plain xl create
  sed -e 's|^name = .*|name = "hvm-notpm"|' -e '/^vtpm = /d' -e 's|^serial = .*|serial = "file:/var/log/xen/hvm-notpm.serial"|' \
      -e 's|^extra = "\(.*\)"|extra = "\1 tpm=0"|' "$D/etc/xen/hvm-tis.cfg" > "$D/etc/xen/hvm-notpm.cfg"
  grep -q '^vtpm' "$D/etc/xen/hvm-notpm.cfg" && die "hvm-notpm.cfg: the vtpm line was not dropped"
  grep -q '^extra = ".* tpm=0"$' "$D/etc/xen/hvm-notpm.cfg" || die "hvm-notpm.cfg: no tpm=0 on the guest's command line"
  # the hvm-crb phase's guest: the same, with QEMU's tpm-crb (xl-vtpm adds its ACPI tables)
  sed -e 's|^name = .*|name = "hvm-crb"|' -e 's|^vtpm = .*|vtpm = [ "model=crb" ]|' \
      -e 's|^serial = .*|serial = "file:/var/log/xen/hvm-crb.serial"|' "$D/etc/xen/hvm-tis.cfg" > "$D/etc/xen/hvm-crb.cfg"
  grep -qF 'vtpm = [ "model=crb" ]' "$D/etc/xen/hvm-crb.cfg" || die "hvm-crb.cfg: no model=crb vtpm line"
  # the hvm-ovmf phase's guest: the hvm-crb guest booted by OVMF for Xen with the TPM 2.0 modules
  # (build-ovmf-xen.sh), named by bios_path_override: UEFI + TPM2 table + CRB, Windows 11's shape;
  # fw=ovmf makes /init check the firmware's event log
  if [ -n "${XVTPM_OVMF_XEN:-}" ]; then
    [ -s "$XVTPM_OVMF_XEN" ] || die "XVTPM_OVMF_XEN=$XVTPM_OVMF_XEN is no file (ci/testbed/build-ovmf-xen.sh builds it)"
    HVM_OVMF=/usr/lib/xvtpm/ovmf/OVMF-xen-tpm.fd
    install -D -m 0644 "$XVTPM_OVMF_XEN" "$D$HVM_OVMF"
    cp "$IMG/hvm-ovmf.cpio.zst" "$D/guest/"
    { sed -e 's|^name = .*|name = "hvm-ovmf"|' -e 's|^bios = .*|bios = "ovmf"|' \
          -e 's|^ramdisk = .*|ramdisk = "/guest/hvm-ovmf.cpio.zst"|' \
          -e 's|^serial = .*|serial = "file:/var/log/xen/hvm-ovmf.serial"|' \
          -e 's|^extra = "\(.*\)"|extra = "\1 fw=ovmf"|' "$D/etc/xen/hvm-crb.cfg"
      echo "bios_path_override = \"$HVM_OVMF\""; } > "$D/etc/xen/hvm-ovmf.cfg"
    for k in 'name = "hvm-ovmf"' 'bios = "ovmf"' 'ramdisk = "/guest/hvm-ovmf.cpio.zst"' "bios_path_override = \"$HVM_OVMF\"" 'vtpm = [ "model=crb" ]' ' fw=ovmf"'; do
      grep -qF "$k" "$D/etc/xen/hvm-ovmf.cfg" || die "hvm-ovmf.cfg: no '$k' after substituting hvm-crb.cfg"
    done
    echo "build-images.sh: note: hvm-ovmf: OVMF $XVTPM_OVMF_XEN ($(stat -c %s "$XVTPM_OVMF_XEN") bytes)"
  fi
  # the hvm-migrate phase's guest: the hvm-crb guest with the xenstore client, held for dom0's
  # checks (mig=1) and printing a tick every 0.1 s (the largest gap is the move's downtime)
  cp "$IMG/hvm-mig.cpio.zst" "$D/guest/"
  sed -e 's|^name = .*|name = "hvm-mig"|' -e 's|^ramdisk = .*|ramdisk = "/guest/hvm-mig.cpio.zst"|' \
      -e 's|^serial = .*|serial = "file:/var/log/xen/hvm-mig.serial"|' \
      -e 's|^extra = "\(.*\)"|extra = "\1 mig=1 tick=1"|' "$D/etc/xen/hvm-crb.cfg" > "$D/etc/xen/hvm-mig.cfg"
  for k in 'name = "hvm-mig"' 'ramdisk = "/guest/hvm-mig.cpio.zst"' 'vtpm = [ "model=crb" ]' ' mig=1 tick=1"'; do
    grep -qF "$k" "$D/etc/xen/hvm-mig.cfg" || die "hvm-mig.cfg: no '$k' after substituting hvm-crb.cfg"
  done
  HVM_DM=$HVM_DM_PATH
  echo "build-images.sh: note: hvm-tis: device model $XVTPM_QEMU_XEN ($(stat -c %s "$XVTPM_QEMU_XEN") bytes), hvm.cpio.zst $(stat -c %s "$IMG/hvm.cpio.zst") bytes"
fi
case $GUEST_KERNEL in
  elf)     KIMG=/guest/vmlinux ;;   # raw vmlinux, appended uncompressed below
  bzimage) KIMG=/guest/vmlinuz; cp "$CACHE/img/vmlinuz" "$D/guest/vmlinuz" ;;
  *) die "XVTPM_GUEST_KERNEL must be elf or bzimage" ;;
esac
[ "$LIBVIRT" = none ] || { mkdir -p "$D/etc/libvirt-testbed"; sed "s|@KERNEL@|$KIMG|" "$HERE/libvirt/lv-a.xml.in" > "$D/etc/libvirt-testbed/lv-a.xml"; }
# the vTPM domain's boot files where xl-vtpm looks by default (/usr/lib/xvtpm/vtpmdom/{vmlinuz,initrd,
# memory-mib}): the own kernel's (its raw ELF) or, with XVTPM_TESTBED_VTPMDOM_KERNEL=debian, the guests'
# kernel; the Debian kernel's image for the 128 MiB comparison in /usr/lib/xvtpm/vtpmdom-debian/
VTPMDOM_KIND=none; VTPMDOM_KERNEL=none
if [ -s "$IMG/vtpmdom.cpio.zst" ]; then
  install -D -m 0644 "$IMG/vtpmdom.cpio.zst" "$D/usr/lib/xvtpm/vtpmdom/initrd"
  if [ -n "$VTPMDOM_KDIR" ]; then
    install -m 0644 "$VTPMDOM_KDIR/vmlinux" "$D/usr/lib/xvtpm/vtpmdom/vmlinuz"
    VTPMDOM_KERNEL=own
    install -D -m 0644 "$IMG/vtpmdom-debian.cpio.zst" "$D/usr/lib/xvtpm/vtpmdom-debian/initrd"
    ln -sfn "$KIMG" "$D/usr/lib/xvtpm/vtpmdom-debian/vmlinuz"
    install -m 0644 "$B/vtpmdom-debian/memory-mib" "$D/usr/lib/xvtpm/vtpmdom-debian/memory-mib"
  else
    ln -sfn "$KIMG" "$D/usr/lib/xvtpm/vtpmdom/vmlinuz"
    VTPMDOM_KERNEL=debian
  fi
  # XVTPM_VTPMDOM_MEM overrides what the image builder recommends
  [ -n "${XVTPM_VTPMDOM_MEM:-}" ] && echo "$XVTPM_VTPMDOM_MEM" > "$B/vtpmdom/memory-mib"
  install -m 0644 "$B/vtpmdom/memory-mib" "$D/usr/lib/xvtpm/vtpmdom/memory-mib"
  VTPMDOM_MEM=$(cat "$B/vtpmdom/memory-mib")
  VTPMDOM_KIND=vtpm-domain
fi
cat > "$D/etc/xvtpm-testbed.env" <<ENV
profile=$PROFILE
vtpmdom_image=$VTPMDOM_KIND
vtpmdom_mem=$VTPMDOM_MEM
vtpmdom_kernel=$VTPMDOM_KERNEL
vtpmdom_probe=${XVTPM_TESTBED_VTPMDOM_PROBE:-}
xvtpm_deb=$DEB_NAME
guest_kernel=$GUEST_KERNEL
kver=$KVER
hvm_dm=$HVM_DM
hvm_ovmf=$HVM_OVMF
libvirt=$LIBVIRT
ENV
# rootfstype=ramfs: the initramfs goes into ramfs, not a tmpfs capped at half the RAM
# (the guest tree is ~37 MB; a 128 MiB guest has ~90 MB MemTotal)
gen_cfg() {  # name ramdisk extra [more lines] [memory]
  cat > "$D/etc/xen/$1.cfg" <<CFG
name = "$1"
type = "pv"
kernel = "$KIMG"
ramdisk = "/guest/$2"
extra = "rootfstype=ramfs $3"
memory = ${5:-$GUEST_MEM}
vcpus = 1
on_poweroff = "destroy"
on_crash = "destroy"
${4:-}
CFG
}
gen_cfg guest1 domu.cpio.zst "console=hvc0 quiet role=plain"
# dom0-process mode (default): the scenario fills in @UUID@ (xl-vtpm vtpm create) and
# @EXTRA@ (boot number, deep-quote nonce) and writes guest-vtpm.cfg
gen_cfg guest-vtpm domu.cpio.zst "console=hvc0 quiet role=vtpm @EXTRA@" 'vtpm = [ "backend=0,uuid=@UUID@" ]'
mv "$D/etc/xen/guest-vtpm.cfg" "$D/etc/xen/guest-vtpm.cfg.in"
# vTPM-domain mode: the guest's vTPM is served by the vTPM domain @BACKEND@ (its name)
gen_cfg guest-vdom domu.cpio.zst "console=hvc0 quiet role=vtpm @EXTRA@" 'vtpm = [ "backend=@BACKEND@,uuid=@UUID@" ]'
mv "$D/etc/xen/guest-vdom.cfg" "$D/etc/xen/guest-vdom.cfg.in"
# lifecycle phases: xen-configs/guest.cfg verbatim (`xl-vtpm create`, vtpm = [ "backend=0" ],
# no uuid), only name, kernel, ramdisk and the kernel command line substituted
GCFG_SRC=$TOP/xen-configs/guest.cfg
[ -f "$GCFG_SRC" ] || die "$GCFG_SRC missing"
sed -e 's|^name = .*|name = "life-a"|' \
    -e "s|^kernel = .*|kernel = \"$KIMG\"|" \
    -e 's|^ramdisk = .*|ramdisk = "/guest/domu.cpio.zst"|' \
    -e 's|^extra = .*|extra = "console=hvc0 rootfstype=ramfs quiet role=life hold=1"|' \
    -e "s|^memory = .*|memory = $GUEST_MEM|" "$GCFG_SRC" > "$D/etc/xen/life-a.cfg"
for k in 'name = "life-a"' "kernel = \"$KIMG\"" 'ramdisk = "/guest/domu.cpio.zst"' 'role=life hold=1' 'vtpm = [ "backend=0" ]'; do
  grep -qF "$k" "$D/etc/xen/life-a.cfg" || die "life-a.cfg: no '$k' after substituting $GCFG_SRC"
done
mkcpio "$D" "$B/dom0.cpio.gz"

# The raw guest vmlinux (66 MB) goes in a second, uncompressed cpio segment
# appended to the gzip one: Linux unpacks concatenated segments, and skipping
# gunzip of 66 MB saves dom0 boot time under TCG.
if [ "$GUEST_KERNEL" = elf ]; then
  K=$B/guestkernel; rm -rf "$K"; mkdir -p "$K/guest"
  ln "$CACHE/img/vmlinux" "$K/guest/vmlinux" 2>/dev/null || cp "$CACHE/img/vmlinux" "$K/guest/vmlinux"
  (cd "$K" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0) > "$B/guestkernel.cpio"
  # pad the gzip segment to 4 bytes with zeros (the kernel skips zero padding)
  cp "$B/dom0.cpio.gz" "$IMG/dom0.img"
  pad=$(( (4 - $(stat -c %s "$IMG/dom0.img") % 4) % 4 )); head -c $pad /dev/zero >> "$IMG/dom0.img"
  cat "$B/guestkernel.cpio" >> "$IMG/dom0.img"
else
  cp "$B/dom0.cpio.gz" "$IMG/dom0.img"
fi
ls -la "$IMG"
du -sh "$B/dom0" "$B/domu" | tr '\n' ' '; echo
echo "build-images.sh: OK (profile=$PROFILE, vtpm domain image=$VTPMDOM_KIND, guest kernel=$GUEST_KERNEL)"
