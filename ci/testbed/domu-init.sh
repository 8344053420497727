#!/bin/sh
# Guest /init.  role= (kernel command line, reaches init as an env variable):
#   plain  load xen-tpmfront (no vtpm device), print markers, power off
#   vtpm   load xen-tpmfront against the vtpm backend, use /dev/tpm0 with tpm2-tools
export PATH=/bin:/usr/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
up() { cut -d' ' -f1 /proc/uptime; }
role=${role:-plain}
echo "GUEST-UP role=$role up=$(up) kernel=$(uname -r) domid=$(xenstore-read domid 2>/dev/null)"
res=ok
case $role in
plain)
  if insmod /lib/modules/xen-tpmfront.ko && [ -d /sys/bus/xen/drivers/vtpm ]; then
    echo "GUEST-TPMFRONT loaded up=$(up)"
  else res=fail; echo "GUEST-TPMFRONT insmod failed"; fi
  ;;
vtpm)
  echo "GUEST-VTPM frontend: $(xenstore-ls device/vtpm 2>&1 | tr '\n' ' ')"
  ( insmod /lib/modules/xen-tpmfront.ko; echo "GUEST-TPMFRONT insmod rc=$? up=$(up)" ) &
  i=0; while [ ! -c /dev/tpm0 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
  if [ -c /dev/tpm0 ]; then
    dev=/dev/tpm0; [ -c /dev/tpmrm0 ] && dev=/dev/tpmrm0
    echo "GUEST-TPM device $dev up=$(up)"
    if r=$(timeout 60 tpm2_getrandom -T device:$dev --hex 16 2>&1); then echo "GUEST-TPM getrandom $r"
    else res=fail; echo "GUEST-TPM getrandom FAILED: $r"; fi
    timeout 60 tpm2_pcrread -T device:$dev sha256:0,1,2,3,4,5,6,7 2>&1 | head -n 10 | sed 's/^/GUEST-TPM /'
  else
    res=fail
    echo "GUEST-TPM no /dev/tpm0 after 60 s; state=$(xenstore-read device/vtpm/0/state 2>&1)"
    dmesg | grep -i tpm | tail -n 10 | sed 's/^/GUEST-DMESG /'
  fi
  ;;
esac
echo "GUEST-DONE role=$role result=$res up=$(up)"
sync
poweroff -f
