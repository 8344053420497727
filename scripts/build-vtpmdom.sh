#!/bin/bash
# Builds the boot image of a vTPM domain (a vTPM as the only program of its own Xen domain):
#   OUT/initrd      zstd cpio: /init = vtpm-domain (fully stripped), its shared libraries and,
#                   for a modular kernel, the Xen kernel modules it needs (event channels, grant
#                   mapping/sharing, PV block front) with /lib/modules/load-order; nothing else
#                   (no shell, no busybox)
#   OUT/vmlinuz     the PV kernel
#   OUT/memory-mib  the domain memory this kernel + image need (MiB): xl-vtpm's default
# Two kernels:
#   --kernel FILE   the project's own kernel (ci/testbed/build-vtpmdom-kernel.sh, `make
#                   vtpmdom-kernel`): every driver built in, no modules; 32 MiB
#   (default)       a distribution kernel, KVER's, with its modules; 128 MiB
# `xl-vtpm vtpm create --domain NAME` (and `xl-vtpm create` with vtpm=["backend=NAME"]) boot it;
# install the three files into /usr/lib/xvtpm/vtpmdom/ or point XVTPM_VTPMDOM_KERNEL /
# XVTPM_VTPMDOM_RAMDISK (and XVTPM_VTPMDOM_MEMORY) at them.
#
# Usage: scripts/build-vtpmdom.sh [--vtpm-domain BIN] [--kernel FILE | --kver KVER] [--root DIR]
#                                 [--memory MIB] [--out DIR]
#   --vtpm-domain  the binary (default: target/release/vtpm-domain, else target/debug/vtpm-domain)
#   --kernel       a kernel with everything built in (no modules go into the image)
#   --kver         kernel version of the domain (default: the running kernel, `uname -r`)
#   --root         take kernel, modules and libraries from this unpacked root instead of /
#                  (the testbed uses its pinned Debian packages); libraries are resolved by
#                  that root's own ld.so, and one found only outside it is an error
#   --memory       what to write into OUT/memory-mib (default: 40 with --kernel, else 128)
#   --out          output directory (default: target/vtpmdom)
set -euo pipefail
TOP=$(cd "$(dirname "$0")/.." && pwd)
BIN=""; KVER=$(uname -r); ROOT=""; OUT=$TOP/target/vtpmdom; KFILE=""; MEM=""
die() { echo "build-vtpmdom.sh: ERROR: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case $1 in
    --vtpm-domain) BIN=$2; shift 2 ;;
    --kver) KVER=$2; shift 2 ;;
    --kernel) KFILE=$2; shift 2 ;;
    --memory) MEM=$2; shift 2 ;;
    --root) ROOT=$(cd "$2" && pwd); shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
if [ -z "$BIN" ]; then
  for p in "${CARGO_TARGET_DIR:-$TOP/target}"/{release,debug}/vtpm-domain; do [ -x "$p" ] && { BIN=$p; break; }; done
fi
[ -n "$BIN" ] && [ -x "$BIN" ] || die "no vtpm-domain binary (build it, or pass --vtpm-domain)"
if [ -n "$KFILE" ]; then
  [ -f "$KFILE" ] || die "$KFILE: no such kernel (ci/testbed/build-vtpmdom-kernel.sh builds it)"
  KIMG=$KFILE; MEM=${MEM:-32}
else
  KDIR=$ROOT/lib/modules/$KVER
  [ -d "$KDIR" ] || die "$KDIR: no modules for kernel $KVER (pass --kver, or --root)"
  KIMG=$ROOT/boot/vmlinuz-$KVER
  [ -f "$KIMG" ] || die "$KIMG: no kernel image for $KVER"
  MEM=${MEM:-128}
fi
case $MEM in ''|*[!0-9]*) die "--memory wants MiB, a number" ;; esac
LDSO=$ROOT/lib64/ld-linux-x86-64.so.2
[ -e "$LDSO" ] || LDSO=$ROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
[ -e "$LDSO" ] || die "no ld-linux-x86-64.so.2 under ${ROOT:-/}"
LIBPATH=$ROOT/lib/x86_64-linux-gnu:$ROOT/usr/lib/x86_64-linux-gnu
command -v cpio >/dev/null || die "cpio is not installed"

T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
mkdir -p "$T"/{dev,proc,sys,lib/modules,lib64,lib/x86_64-linux-gnu}

# shared libraries: the runtime closure, resolved by the root's own ld.so
add_libs() {  # elf
  local name arrow path rest
  "$LDSO" --inhibit-cache --library-path "$LIBPATH" --list "$1" > "$T/.ldd" 2>&1 || die "cannot resolve the libraries of $1: $(cat "$T/.ldd")"
  while read -r name arrow path rest; do
    case $name in linux-vdso*|/lib64/ld-linux*) continue ;; esac
    [ "$arrow" = "=>" ] || continue
    [ "$path" = not ] && die "$1 needs $name, which is not installed under ${ROOT:-/}"
    if [ -n "$ROOT" ]; then case $path in "$ROOT"/*) ;; *) die "$1 needs $name, found only outside $ROOT ($path)" ;; esac; fi
    [ -e "$T/lib/x86_64-linux-gnu/$name" ] || install -m 0755 "$(readlink -f "$path")" "$T/lib/x86_64-linux-gnu/$name"
  done < "$T/.ldd"
}
install -m 0755 "$BIN" "$T/init"
# every byte of the image stays in the domain's memory (ramfs): symbols and debug info go
strip "$T/init" 2>/dev/null || true
add_libs "$BIN"
install -m 0755 "$(readlink -f "$LDSO")" "$T/lib64/ld-linux-x86-64.so.2"
# glibc dlopen()s libgcc_s for thread cancellation/unwinding
gcc_s=$(ls "$ROOT"/{lib,usr/lib}/x86_64-linux-gnu/libgcc_s.so.1 2>/dev/null | head -n1 || true)
[ -n "$gcc_s" ] && install -m 0755 "$(readlink -f "$gcc_s")" "$T/lib/x86_64-linux-gnu/libgcc_s.so.1"

# kernel modules with their dependencies, in load order; built-in ones are skipped
ORDER=()
add_mod() {  # name
  local m=$1 f dep
  for seen in "${ORDER[@]:-}"; do [ "$seen" = "$m.ko" ] && return 0; done
  f=$(find "$KDIR/kernel" \( -name "$m.ko*" -o -name "${m//-/_}.ko*" \) | head -n1)
  if [ -z "$f" ]; then
    grep -qE "/(${m}|${m//-/_})\.ko" "$KDIR/modules.builtin" 2>/dev/null && return 0
    die "kernel module $m not found for $KVER"
  fi
  for dep in $(strings "$f" 2>/dev/null | sed -n 's/^depends=//p' | tr ',' ' '); do add_mod "$dep"; done
  case $f in
    *.ko) cp "$f" "$T/lib/modules/$m.ko" ;;
    *.ko.xz) xz -dc "$f" > "$T/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$T/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" > "$T/lib/modules/$m.ko" ;;
    *) die "$f: unknown module format" ;;
  esac
  ORDER+=("$m.ko")
}
if [ -z "$KFILE" ]; then
  for m in xen-evtchn xen-gntdev xen-gntalloc xen-blkfront; do add_mod $m; done
  printf '%s\n' "${ORDER[@]:-}" | sed '/^$/d' > "$T/lib/modules/load-order"
else
  rmdir "$T/lib/modules"   # everything built in: vtpm-domain finds no load-order and loads nothing
fi

mkdir -p "$OUT"
# a 128 KiB window: the kernel allocates the whole window while it unpacks the initramfs (8 MiB
# at -19's default), next to the compressed image and the files it writes
comp="zstd -q -19 --zstd=wlog=17 -T0 -c"; command -v zstd >/dev/null || comp="gzip -9 -n"
(cd "$T" && find . ! -name .ldd -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0 | $comp) > "$OUT/initrd.tmp"
mv "$OUT/initrd.tmp" "$OUT/initrd"
cp "$KIMG" "$OUT/vmlinuz"
echo "$MEM" > "$OUT/memory-mib"
mods="none (built in)"; [ -z "$KFILE" ] && mods=$(tr '\n' ' ' < "$T/lib/modules/load-order")
echo "build-vtpmdom.sh: $OUT/initrd ($(du -k "$OUT/initrd" | cut -f1) KiB, $(du -sk --exclude=.ldd "$T" | cut -f1) KiB unpacked; modules: $mods)"
echo "build-vtpmdom.sh: $OUT/vmlinuz (kernel ${KFILE:-$KVER}); $OUT/memory-mib: $MEM"
