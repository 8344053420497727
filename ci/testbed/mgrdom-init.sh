#!/bin/sh
# The manager domain's /init (mgrdom phase, XVTPM_TESTBED_MGRDOM=1; docs/manager-domain.md).
# A PV domain that owns the physical TPM: dom0 unbound its tpm_tis and gave this domain the TIS
# MMIO (xl `iomem = [ "fed40,5" ]`). This init drives the TPM with the domain's own tpm_tis
# (forced: a PV domain has no ACPI to find it by), prints what dom0 compares with what it read
# before, mounts the state disk (/dev/xvda, ext2 made by dom0) on /var/lib/xvtpm and runs
# vtpmmgr on /dev/tpmrm0.
# Kernel command line (unknown name=value words reach init as environment variables):
#   boot=1   provision the manager (xl-vtpm mgr provision) on a fresh disk
#   boot=0   the TPM reads only (no disk, no vtpmmgr)
#   carried=1  (with boot=1) dom0's provisioned manager store was copied onto the disk: no provisioning,
#            the domain's manager must find it and serve that provisioning
#   boot=2   the same disk again after a power-off: vtpmmgr must find its state (no provisioning)
#   boot=serve  the provisioned disk again (mgrdom-serve phase), and the domain SERVES: the Xen
#            device modules (xen-evtchn, xen-gntdev, xen-gntalloc), `vtpmmgr serve --xen --admin-xen`
#            (vTPM domains' manager links on its own backend/vtpm, dom0's admin link, `vtpmmgr
#            bridge`, under its data/xvtpm-admin), MGRDOM-SERVING once ready, then it serves until
#            dom0 asks it to stop with `xl shutdown`: the kernel runs poweroff_cmd, set to
#            /sbin/mgrdom-stop, which only leaves /run/mgrdom-stop for this loop to see (PID 1 is
#            this script: no signal needed); then vtpmmgr gets SIGTERM, the disk is unmounted and
#            the domain powers off. The manager's log streams to the console as MGRDOM-LOG lines.
# Output (console): MGRDOM-UP, MGRDOM-TPM <dev> <version>, MGRDOM-PCR <alg> <idx> <hex>,
# MGRDOM-EKCERT <index> sha256=<hex> bytes=<n>, MGRDOM-CHECK <name> PASS|FAIL <detail>,
# MGRDOM-STATUS <json>, MGRDOM-AK sha256=<hex>, (boot=serve) MGRDOM-SERVING pid=<vtpmmgr> domid=<self>
# and MGRDOM-STOP-REQUEST, last MGRDOM-DONE boot=N result=ok|fail; then it unmounts the disk and
# powers off.
export PATH=/bin:/usr/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /run/xvtpm /var/lib/xvtpm
exec </dev/console >/dev/console 2>&1
up() { cut -d' ' -f1 /proc/uptime; }
boot=${boot:-1}; res=ok
domid=$(xenstore-read domid 2>/dev/null)
echo "MGRDOM-UP boot=$boot up=$(up) kernel=$(uname -r) domid=$domid memavail=$(awk '/MemAvailable/{print $2}' /proc/meminfo)kB iomem=$(grep -i 'fed40000' /proc/iomem | tr -s ' ' | tr '\n' ';')"
check() {  # name PASS|FAIL detail...
  n=$1; s=$2; shift 2
  echo "MGRDOM-CHECK $n $s $* [up=$(up)]"
  [ "$s" = PASS ] || res=fail
}
finish() {
  [ -n "${MGR_PID:-}" ] && kill "$MGR_PID" 2>/dev/null && sleep 1
  [ -n "${TAIL_PID:-}" ] && { sleep 1; kill "$TAIL_PID" 2>/dev/null; }
  sync
  grep -q ' /var/lib/xvtpm ' /proc/mounts && { umount /var/lib/xvtpm || echo "MGRDOM-INFO umount failed: $(grep xvtpm /proc/mounts)"; }
  echo "MGRDOM-DONE boot=$boot result=$res up=$(up)"
  sync; poweroff -f
}
# modules in their dependency order (build-images.sh: /lib/modules/<m>.deps); tpm_tis forced to
# the TIS base (0xFED40000) without interrupts
load() {  # module [params]
  m=$1; shift
  [ -f "/lib/modules/$m.deps" ] || return 0   # built into the kernel
  for d in $(cat "/lib/modules/$m.deps"); do
    grep -q "^$(echo "$d" | tr - _) " /proc/modules && continue
    if [ "$d" = "$m" ]; then insmod "/lib/modules/$d.ko" "$@"; else insmod "/lib/modules/$d.ko"; fi ||
      echo "MGRDOM-INFO insmod $d failed"
  done
}
load tpm_tis force=1 interrupts=0
# boot=serve: `xl shutdown` from dom0 makes the kernel run poweroff_cmd (orderly_poweroff); ours
# only leaves a mark for the serving loop below, which stops vtpmmgr cleanly first
if [ "$boot" = serve ]; then
  printf '#!/bin/sh\n: > /run/mgrdom-stop\n' > /sbin/mgrdom-stop
  chmod 0755 /sbin/mgrdom-stop
  echo /sbin/mgrdom-stop > /proc/sys/kernel/poweroff_cmd
fi
end=$(( $(cut -d. -f1 /proc/uptime) + 30 ))
while [ ! -c /dev/tpmrm0 ] && [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do sleep 0.2; done
if [ ! -c /dev/tpmrm0 ]; then
  check tpm FAIL "no /dev/tpmrm0 within 30 s; dmesg: $(dmesg | grep -iE 'tpm|fed4' | tail -n 5 | tr '\n' '|')"
  finish
fi
ver=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null)
echo "MGRDOM-TPM /dev/tpmrm0 version=$ver $(dmesg | grep -m1 -E 'tpm_tis.*TPM' | sed 's/^\[[^]]*\] //')"
export TPM2TOOLS_TCTI=device:/dev/tpmrm0
out=$(timeout 60 tpm2_pcrread sha256:0,1,2,3,4,5,6,7 2>&1); rc=$?
echo "$out" | sed -n 's/^ *\([0-7]\) *: *0x\([0-9A-Fa-f]*\).*/MGRDOM-PCR sha256 \1 \2/p'
[ $rc = 0 ] && check pcrread PASS "PCR 0-7 (sha256) read through the domain's tpm_tis" || check pcrread FAIL "rc=$rc $out"
for idx in 0x01c00002 0x01c0000a; do
  if timeout 60 tpm2_nvread "$idx" -o /tmp/ekcert.der >/dev/null 2>&1; then
    echo "MGRDOM-EKCERT $idx sha256=$(sha256sum < /tmp/ekcert.der | cut -d' ' -f1) bytes=$(wc -c < /tmp/ekcert.der)"
  fi
done
# boot=0: the TPM reads only (the control without iomem, the PVH probe)
[ "$boot" = 0 ] && finish
# the state disk: xen-blkfront + the ext2 filesystem dom0 made on the image
# ext4 (which mounts the ext2 image) needs crc32c; without it: "EXT4-fs (xvda): Cannot load crc32c
# driver." and no mount (the state was lost on power-off)
load xen-blkfront
load crc32c_generic
load ext4
end=$(( $(cut -d. -f1 /proc/uptime) + 30 ))
while [ ! -b /dev/xvda ] && [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do sleep 0.2; done
if mount -t ext4 /dev/xvda /var/lib/xvtpm 2>/tmp/mount.err || mount -t ext2 /dev/xvda /var/lib/xvtpm 2>>/tmp/mount.err; then
  check state-disk PASS "/dev/xvda mounted on /var/lib/xvtpm ($(grep ' /var/lib/xvtpm ' /proc/mounts | cut -d' ' -f3)); files before vtpmmgr: $(ls /var/lib/xvtpm | grep -v lost+found | tr '\n' ' ')"
else
  check state-disk FAIL "xvda: $([ -b /dev/xvda ] && echo present || echo absent); $(cat /tmp/mount.err | tr '\n' ' '); dmesg: $(dmesg | grep -iE 'xvda|blkfront|ext[24]' | tail -n 4 | tr '\n' '|')"
fi
chmod 0700 /var/lib/xvtpm
# boot=serve: the Xen devices vtpmmgr's links need (tpmif backend: event channels + mapping the
# frontend's grants; the admin link likewise), as the vTPM domain on Debian's kernel loads them;
# /dev/xen/xenbus is built in (xenstore-read above used it)
if [ "$boot" = serve ]; then
  for m in xen-evtchn xen-gntdev xen-gntalloc; do load $m; done
  end=$(( $(cut -d. -f1 /proc/uptime) + 30 ))
  xdevs() { for d in xenbus evtchn gntdev gntalloc; do [ -c /dev/xen/$d ] || return 1; done; }
  while ! xdevs && [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do sleep 0.2; done
  if xdevs; then check xen-devices PASS "/dev/xen: $(ls /dev/xen | tr '\n' ' ')"
  else check xen-devices FAIL "/dev/xen: $(ls /dev/xen 2>&1 | tr '\n' ' '); modules: $(grep -E '^xen_' /proc/modules | cut -d' ' -f1 | tr '\n' ' ')"; fi
fi
if [ "$boot" = 2 ] || [ "$boot" = serve ] || [ "${carried:-0}" = 1 ]; then
  [ -s /var/lib/xvtpm/manager.json ] && check state-kept PASS "manager.json ($(wc -c < /var/lib/xvtpm/manager.json) bytes) on the disk (boot $boot, carried=${carried:-0})" ||
    check state-kept FAIL "no manager.json on /dev/xvda"
fi
serve_args=""; [ "$boot" = serve ] && serve_args="--xen --admin-xen"
# shellcheck disable=SC2086  # two flags or none
XVTPM_LOG=info vtpmmgr --tcti device:/dev/tpmrm0 --state-dir /var/lib/xvtpm --run-dir /run/xvtpm serve $serve_args > /tmp/vtpmmgr.log 2>&1 &
MGR_PID=$!
if [ "$boot" = serve ]; then
  # the serving manager's log, live on the console (dom0 keeps it in the domain's console log)
  tail -n +1 -f /tmp/vtpmmgr.log | sed 's/^/MGRDOM-LOG /' &
  TAIL_PID=$!
fi
end=$(( $(cut -d. -f1 /proc/uptime) + 120 ))
while ! grep -q '"ready":true' /tmp/vtpmmgr.log && kill -0 $MGR_PID 2>/dev/null && [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do sleep 0.3; done
if grep -q '"ready":true' /tmp/vtpmmgr.log; then
  check mgr-ready PASS "vtpmmgr serve $serve_args ready on device:/dev/tpmrm0 (pid $MGR_PID)"
else
  check mgr-ready FAIL "vtpmmgr serve $serve_args not ready (alive: $(kill -0 $MGR_PID 2>/dev/null && echo yes || echo no))"
  [ "$boot" = serve ] || sed 's/^/MGRDOM-LOG /' /tmp/vtpmmgr.log | tail -n 20
  finish
fi
if [ "$boot" = 1 ] && [ "${carried:-0}" != 1 ]; then
  out=$(timeout 180 xl-vtpm mgr provision --yes 2>&1); rc=$?
  [ $rc = 0 ] && check provision PASS "xl-vtpm mgr provision --yes" || check provision FAIL "rc=$rc $(echo "$out" | tail -n 5 | tr '\n' ' ')"
fi
st=$(timeout 60 xl-vtpm mgr status --json 2>&1); rc=$?
echo "MGRDOM-STATUS $(echo "$st" | tr -d '\n')"
if [ $rc = 0 ] && echo "$st" | tr -d ' \n' | grep -q '"provisioned":true'; then
  check provisioned PASS "mgr status --json: provisioned true (boot $boot)"
else
  check provisioned FAIL "rc=$rc $(echo "$st" | tr '\n' ' ' | cut -c1-300)"
fi
if [ "$boot" = serve ]; then
  # dom0 now asks the manager through `vtpmmgr bridge`; this loop waits for `xl shutdown`
  echo "MGRDOM-SERVING pid=$MGR_PID domid=$domid up=$(up) memavail=$(awk '/MemAvailable/{print $2}' /proc/meminfo)kB"
  while [ ! -e /run/mgrdom-stop ] && kill -0 $MGR_PID 2>/dev/null; do sleep 1; done
  if [ -e /run/mgrdom-stop ]; then
    echo "MGRDOM-STOP-REQUEST up=$(up) memavail=$(awk '/MemAvailable/{print $2}' /proc/meminfo)kB"
  else
    wait $MGR_PID; rc=$?
    check mgr-alive FAIL "vtpmmgr exited by itself while serving (rc=$rc)"
    MGR_PID=""; finish
  fi
elif timeout 60 xl-vtpm mgr group ak default --out /tmp/ak >/dev/null 2>&1; then
  echo "MGRDOM-AK sha256=$(sha256sum < /tmp/ak | cut -d' ' -f1)"
  check group-ak PASS "xl-vtpm mgr group ak default: $(wc -c < /tmp/ak) bytes"
else
  check group-ak FAIL "xl-vtpm mgr group ak default failed"
fi
[ "$boot" = serve ] || sed 's/^/MGRDOM-LOG /' /tmp/vtpmmgr.log | tail -n 8
kill $MGR_PID; i=0
while kill -0 $MGR_PID 2>/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done
kill -0 $MGR_PID 2>/dev/null && check mgr-stop FAIL "vtpmmgr still running 10 s after SIGTERM" || check mgr-stop PASS "vtpmmgr exited on SIGTERM"
MGR_PID=""
echo "MGRDOM-FILES $(ls -la /var/lib/xvtpm | tail -n +2 | awk '{print $NF":"$5}' | tr '\n' ' ')"
finish
