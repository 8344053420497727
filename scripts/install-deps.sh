#!/usr/bin/env bash
# Installs the Debian 12 packages xvtpm needs to build, test and run its demo.
# Idempotent: does nothing when everything is present.
set -euo pipefail
PKGS=(swtpm swtpm-tools tpm2-tools libtpms-dev libtss2-dev libxen-dev clang libclang-dev pkg-config libssl-dev qemu-system-x86 acpica-tools python3 iproute2 gdb util-linux postgresql dpkg-dev binutils libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
