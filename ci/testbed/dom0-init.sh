#!/bin/sh
# dom0 /init: mount the basics, run /scenario.sh, power the machine off.
export PATH=/usr/lib/xen-4.17/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
exec </dev/console >/dev/console 2>&1
echo "MARK dom0-init up=$(cut -d' ' -f1 /proc/uptime)"
sh /scenario.sh
rc=$?
[ $rc = 0 ] && res=PASS || res=FAIL
echo "MARK TESTBED-DONE up=$(cut -d' ' -f1 /proc/uptime) result=$res"
sync
poweroff -f
