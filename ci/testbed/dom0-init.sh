#!/bin/sh
# dom0 /init: mount the basics, run the scenario, power the machine off.
# The scenario is /usr/lib/xvtpm/testbed/xvtpm-testbed (ci/testbed/scenario).
export PATH=/usr/lib/xen-4.17/bin:/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
# what the scenario's programs need: tpm2-tools on the physical TPM, xenstored's state, the vTPM
# domain's boot files (where xl-vtpm looks by default; explicit, so the scenario says what it boots)
export TPM2TOOLS_TCTI=device:/dev/tpmrm0 XENSTORED_ROOTDIR=/run/xenstored
export XVTPM_VTPMDOM_KERNEL=/usr/lib/xvtpm/vtpmdom/vmlinuz XVTPM_VTPMDOM_RAMDISK=/usr/lib/xvtpm/vtpmdom/initrd
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
# loopback: the attest-service phase serves xvtpm-attestd on 127.0.0.1
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
exec </dev/console >/dev/console 2>&1
echo "MARK dom0-init up=$(cut -d' ' -f1 /proc/uptime)"
S=/usr/lib/xvtpm/testbed/xvtpm-testbed
if [ -x "$S" ]; then $S; rc=$?
else echo "dom0-init: $S missing (cargo build --workspace before the image build)"; rc=1; fi
[ $rc = 0 ] && res=PASS || res=FAIL
echo "MARK TESTBED-DONE up=$(cut -d' ' -f1 /proc/uptime) result=$res"
sync
poweroff -f
