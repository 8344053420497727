#!/bin/sh
# Placeholder vTPM domain /init (XVTPM_VTPM_PLACEHOLDER=1): acknowledges new
# vtpm backend nodes (state 1 -> 2, InitWait, what libxl waits for) but never
# maps the ring or answers commands.  It proves the xl/xenstore plumbing only:
# a guest's xen-tpmfront will reach Initialised (3) and then wait forever.
export PATH=/bin:/usr/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
self=$(xenstore-read domid)
echo "VTPMDOM-READY placeholder domid=$self (acks InitWait only; no tpmif service)"
i=0
while [ $i -lt 3000 ]; do
  for fe in $(xenstore-list backend/vtpm 2>/dev/null); do
    for dev in $(xenstore-list backend/vtpm/$fe 2>/dev/null); do
      p=backend/vtpm/$fe/$dev
      [ "$(xenstore-read $p/state 2>/dev/null)" = 1 ] && xenstore-write $p/state 2 && echo "VTPMDOM acked $p (InitWait)"
    done
  done
  i=$((i+1)); sleep 0.2
done
poweroff -f
