# Sourced by the build scripts (build-qemu-xen.sh, build-ovmf-xen.sh, build-vtpmdom-kernel.sh,
# guest/linux/build-module.sh), which define die() and log().
# install_host_packages PKG...: installs the Debian packages given (the caller's missing ones) with
# apt-get, updating the package lists once if the first try fails; XVTPM_NO_HOST_INSTALL=1 refuses
# instead. Nothing given: nothing done.
install_host_packages() {
  [ $# -gt 0 ] || return 0
  [ "${XVTPM_NO_HOST_INSTALL:-0}" = 1 ] && die "missing host packages: $*"
  log "installing host packages: $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; } ||
    die "could not install host packages: $*"
}
