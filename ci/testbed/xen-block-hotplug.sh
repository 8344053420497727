#!/bin/sh
# /etc/xen/scripts/block for the testbed's busybox dom0 (Debian's script needs bash and its
# helper library). libxl runs it for every phy disk (xl.conf: run_hotplug_scripts defaults to 1)
# as `block add|remove` with XENBUS_PATH=backend/vbd/<domid>/<devid> (relative to dom0's
# xenstore home) once blkback has put the backend in InitWait; libxl waits for it to exit.
#
#   add     <XENBUS_PATH>/params names a block device (xl-vtpm: the loop device of a vTPM
#           domain's disk image). Writes what Linux blkback waits for:
#             physical-device       "<major>:<minor>", both in hex (blkback: "%x:%x")
#             physical-device-path  the device node
#             hotplug-status        "connected"
#           A device that another vbd backend already uses read-write is refused (one writer
#           per disk; the vTPM's A/B store is not made for two).
#   remove  nothing to undo (xl-vtpm detaches its loop devices itself).
# Failures: hotplug-error = the reason, hotplug-status = "error", exit 1 (libxl then fails the
# domain creation and prints the reason). Log: /var/log/xen/xen-hotplug.log.
export PATH=/usr/lib/xen-4.17/bin:/bin:/sbin:/usr/bin:/usr/sbin
LOG=${XVTPM_HOTPLUG_LOG:-/var/log/xen/xen-hotplug.log}
cmd=${1:-}
log() { echo "$(date +%T) block $cmd ${XENBUS_PATH:-?}: $*" >> "$LOG" 2>/dev/null; }
fail() {
  log "error: $*"
  xenstore-write "$XENBUS_PATH/hotplug-error" "$*" "$XENBUS_PATH/hotplug-status" error 2>/dev/null
  exit 1
}
[ -n "${XENBUS_PATH:-}" ] || { log "error: XENBUS_PATH is not set"; exit 1; }

case $cmd in
add)
  # libxl may run it twice for the same device; the first run did the work
  if xenstore-read "$XENBUS_PATH/physical-device" >/dev/null 2>&1; then log "already set up"; exit 0; fi
  p=$(xenstore-read "$XENBUS_PATH/params" 2>/dev/null) || fail "no $XENBUS_PATH/params"
  case $p in /*) dev=$p ;; *) dev=/dev/$p ;; esac
  dev=$(readlink -f "$dev") || fail "$p does not exist"
  [ -b "$dev" ] || fail "$dev is not a block device (this dom0 has no file/loop support in its block script)"
  mm=$(stat -L -c '%t:%T' "$dev") && [ -n "$mm" ] || fail "cannot stat $dev"
  mode=$(xenstore-read "$XENBUS_PATH/mode" 2>/dev/null)
  # one writer: no other live domain's vbd backend may have this device
  for fe in $(xenstore-list backend/vbd 2>/dev/null); do
    for d in $(xenstore-list backend/vbd/$fe 2>/dev/null); do
      other=backend/vbd/$fe/$d
      [ "$other" = "$XENBUS_PATH" ] && continue
      xenstore-read /local/domain/$fe/domid >/dev/null 2>&1 || continue   # left over from a dead domain
      [ "$(xenstore-read $other/physical-device 2>/dev/null)" = "$mm" ] || continue
      omode=$(xenstore-read $other/mode 2>/dev/null)
      case "$mode$omode" in *w*) fail "$dev ($mm) is in use by domain $fe (device $d, mode ${omode:-?})" ;; esac
    done
  done
  xenstore-write "$XENBUS_PATH/physical-device" "$mm" "$XENBUS_PATH/physical-device-path" "$dev" ||
    fail "xenstore-write physical-device failed"
  xenstore-write "$XENBUS_PATH/hotplug-status" connected || fail "xenstore-write hotplug-status failed"
  log "$dev ($mm, mode ${mode:-?}) connected"
  ;;
remove)
  log "removed ($(xenstore-read "$XENBUS_PATH/physical-device-path" 2>/dev/null || echo gone))"
  ;;
*)
  log "error: unknown command '$cmd' (add|remove)"; exit 1 ;;
esac
exit 0
