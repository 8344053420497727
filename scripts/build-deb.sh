#!/usr/bin/env bash
# Builds the xvtpm Debian package from built binaries:
#   scripts/build-deb.sh BIN_DIR OUT_DIR      (e.g. target/release target/deb)
# prints the .deb's path. Contents: vtpmmgr, vtpm-domain, xl-vtpm, xvtpm-swtpm in /usr/bin (the
# last also as swtpm, swtpm_setup, swtpm_ioctl in /usr/lib/xvtpm/libvirt, for libvirtd's PATH, with
# the opt-in libvirtd drop-in in /usr/share/xvtpm/libvirt: docs/libvirt.md); the systemd
# units (dist/systemd); /etc/xvtpm/xvtpm.env (a conffile); man pages and bash/zsh/fish
# completions generated from the binaries' clap definitions (`BIN __generate …`); the
# maintainer scripts in dist/debian. Depends: what dpkg-shlibdeps finds in the binaries, plus
# the TPM device TCTI that tss2-tctildr loads at run time.
# Staged with dpkg-deb from a plain tree (no debhelper/cargo-deb needed: dpkg-dev only).
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BIN_DIR OUT_DIR" >&2; exit 2; }
BIN=$(realpath "$1")
mkdir -p "$2"
OUT=$(realpath "$2")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BINS=(vtpmmgr vtpm-domain xl-vtpm)
for b in "${BINS[@]}"; do
  [ -x "$BIN/$b" ] || { echo "build-deb: $BIN/$b missing: build the workspace first" >&2; exit 1; }
done
VERSION=${XVTPM_DEB_VERSION:-$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")}
ARCH=$(dpkg --print-architecture)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
S=$WORK/pkg

install -d -m 0755 "$S/usr/bin" "$S/DEBIAN"
for b in "${BINS[@]}"; do
  # Debug info stays in the build tree (the release profile keeps line tables for it).
  objcopy --strip-debug "$BIN/$b" "$S/usr/bin/$b"
  chmod 0755 "$S/usr/bin/$b"
done

# libvirt's swtpm entry points (no clap, so no man page): links named as libvirt looks them up.
[ -x "$BIN/xvtpm-swtpm" ] || { echo "build-deb: $BIN/xvtpm-swtpm missing: build the workspace first" >&2; exit 1; }
objcopy --strip-debug "$BIN/xvtpm-swtpm" "$S/usr/bin/xvtpm-swtpm"
chmod 0755 "$S/usr/bin/xvtpm-swtpm"
install -d -m 0755 "$S/usr/lib/xvtpm/libvirt"
for t in swtpm swtpm_setup swtpm_ioctl; do ln -s /usr/bin/xvtpm-swtpm "$S/usr/lib/xvtpm/libvirt/$t"; done
install -D -m 0644 "$ROOT/dist/libvirt/libvirtd-xvtpm.conf" "$S/usr/share/xvtpm/libvirt/libvirtd-xvtpm.conf"

install -D -m 0644 -t "$S/lib/systemd/system" "$ROOT"/dist/systemd/*.service "$ROOT"/dist/systemd/*.path
install -D -m 0644 "$ROOT/dist/etc/xvtpm.env" "$S/etc/xvtpm/xvtpm.env"
install -D -m 0644 "$ROOT/dist/debian/copyright" "$S/usr/share/doc/xvtpm/copyright"

install -d -m 0755 "$S/usr/share/man/man1" "$S/usr/share/bash-completion/completions" \
  "$S/usr/share/zsh/vendor-completions" "$S/usr/share/fish/vendor_completions.d"
for b in "${BINS[@]}"; do
  "$S/usr/bin/$b" __generate man "$WORK/man" >/dev/null
  "$S/usr/bin/$b" __generate completions "$WORK/comp" >/dev/null
  install -m 0644 "$WORK/comp/$b.bash" "$S/usr/share/bash-completion/completions/$b"
  install -m 0644 "$WORK/comp/_$b" "$S/usr/share/zsh/vendor-completions/_$b"
  install -m 0644 "$WORK/comp/$b.fish" "$S/usr/share/fish/vendor_completions.d/$b.fish"
done
for m in "$WORK"/man/*.1; do
  gzip -9n <"$m" >"$S/usr/share/man/man1/$(basename "$m").gz"
  chmod 0644 "$S/usr/share/man/man1/$(basename "$m").gz"
done

# dpkg-shlibdeps wants a debian/control to read; it only needs to exist.
mkdir -p "$WORK/src/debian"
printf 'Source: xvtpm\n\nPackage: xvtpm\nArchitecture: any\n' >"$WORK/src/debian/control"
SHLIBS=$(cd "$WORK/src" && dpkg-shlibdeps -O "${BINS[@]/#/$S/usr/bin/}" "$S/usr/bin/xvtpm-swtpm" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$SHLIBS" ] || { echo "build-deb: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

install -m 0755 -t "$S/DEBIAN" "$ROOT"/dist/debian/{postinst,prerm,postrm}
echo /etc/xvtpm/xvtpm.env >"$S/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$S" | cut -f1)
cat >"$S/DEBIAN/control" <<CTL
Package: xvtpm
Version: $VERSION
Architecture: $ARCH
Maintainer: xvtpm developers <xvtpm@example.invalid>
Installed-Size: $SIZE
Depends: $SHLIBS, libtss2-tcti-device0
Recommends: tpm2-tools
Suggests: xen-utils-4.17, qemu-system-x86, libtss2-tcti-swtpm0, libvirt-daemon-driver-qemu
Section: admin
Priority: optional
Homepage: https://example.invalid/xvtpm
Description: TPM 2.0 for every virtual machine, rooted in the host's TPM
 vtpmmgr owns the host's physical TPM and seals each vTPM's state key to the
 host's measured state; vtpm-domain runs one libtpms TPM per guest (Xen tpmif,
 swtpm's socket protocol for QEMU and tpm2-tools); xl-vtpm creates, runs and
 verifies them; xvtpm-swtpm stands in for swtpm under libvirt. Ships systemd
 units xvtpm-mgr.service, xvtpm-watch.service and xvtpm-libvirt-sweep.path.
CTL
DEB="$OUT/xvtpm_${VERSION}_${ARCH}.deb"
# xz for a package to ship; XVTPM_DEB_COMPRESSION=none for a quick local check (the tests).
dpkg-deb --root-owner-group -Z"${XVTPM_DEB_COMPRESSION:-xz}" --build "$S" "$DEB" >/dev/null
echo "$DEB"
