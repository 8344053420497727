#!/bin/sh
# The "tpm2-guest" phase: guests that load the PATCHED xen-tpmfront (guest/linux/0*.patch,
# built by guest/linux/build-module.sh) instead of the stock one.  One script, two roles:
#
#  dom0:   tpm2-guest-phase.sh [KO]           (run by the scenario's tpm2-guest phase; exit 0 = PASS)
#    - needs a provisioned vtpmmgr (the mgr phases) and xl-vtpm; KO defaults to
#      /guest/xen-tpmfront-tpm2.ko
#    - builds the guest ramdisk at run time: /guest/domu.cpio.zst (padded to 4 bytes) + an
#      uncompressed cpio overlay with /xvtpm-tpm2/{init,xen-tpmfront.ko}; init = this script.
#      Linux unpacks concatenated initramfs segments; libxenguest passes a non-gzip ramdisk as is
#    - guest-tpm2: its own TPM 2.0 vTPM (`xl-vtpm vtpm create --ek ecc`), guest config from
#      /etc/xen/guest-vtpm.cfg.in with `rdinit=/xvtpm-tpm2/init`; then `xl-vtpm vtpm stop`
#    - guest-tpm12 (unless XVTPM_TPM2_PHASE_TPM12=0): the same patched module against a TPM 1.2
#      vTPM (`--tpm12`): must still register as TPM 1.2 (the patch's other half)
#    - prints "CHECK guest-tpm2/<check> PASS|FAIL ..." (and guest-tpm12/...), INFO and PERF
#      lines; the guest consoles stay in /var/log/xen/console/guest-guest-tpm{2,12}.log, so
#      the scenario's final log dump picks them up
#  guest:  /xvtpm-tpm2/init (pid 1 in the guest; tpm2_phase=tpm2|tpm12 on the command line)
#    - tpm2:  insmod the patched module; /dev/tpm0 AND /dev/tpmrm0 appear, tpm_version_major=2;
#             tpm2-tools with TPM2TOOLS_TCTI=device:/dev/tpmrm0 and no tpm2_flushcontext:
#             getrandom, pcrread, 5x createprimary (more than libtpms' 3 transient slots: only a
#             resource manager makes that work), create + load under a saved primary context;
#             afterwards /dev/tpm0 shows no transient handles left (the kernel RM flushed them)
#    - tpm12: insmod the patched module; /dev/tpm0, tpm_version_major=1, no /dev/tpmrm0,
#             sysfs pcrs/caps answered (TPM 1.2 commands work)
#    - every check prints "GUEST-CHECK <name> PASS|FAIL <detail>"; last "GUEST-DONE ... result=ok|fail"
export PATH=/usr/lib/xen-4.17/bin:/bin:/sbin:/usr/bin:/usr/sbin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
up() { cut -d' ' -f1 /proc/uptime; }
upi() { cut -d. -f1 /proc/uptime; }

###################################################################### guest role (pid 1)
if [ "$$" = 1 ]; then
  mount -t proc proc /proc
  mount -t sysfs sysfs /sys
  mount -t devtmpfs devtmpfs /dev
  mount -t tmpfs tmpfs /tmp
  exec </dev/console >/dev/console 2>&1
  role=${tpm2_phase:-tpm2}; res=ok
  echo "GUEST-UP tpm2-phase role=$role up=$(up) kernel=$(uname -r) domid=$(xenstore-read domid 2>/dev/null)"
  check() { n=$1; s=$2; shift 2; echo "GUEST-CHECK $n $s $* [up=$(up)]"; [ "$s" = PASS ] || res=fail; }
  t() { out=$(timeout ${TT:-90} "$@" 2>&1); rc=$?; return $rc; }
  brief() { echo "rc=$rc $(echo "$out" | tail -n ${1:-2} | tr '\n' ' ')"; }
  finish() {
    dmesg | grep -iE 'tpm|vtpm' | tail -n 20 | sed 's/^/GUEST-DMESG /'
    echo "GUEST-DONE tpm2-phase role=$role result=$res up=$(up)"; sync; poweroff -f; exec sleep 100000
  }
  if insmod /xvtpm-tpm2/xen-tpmfront.ko; then check insmod PASS "patched xen-tpmfront.ko"
  else check insmod FAIL "insmod /xvtpm-tpm2/xen-tpmfront.ko failed"; finish; fi
  want=/dev/tpm0; [ "$role" = tpm2 ] && want=/dev/tpmrm0
  end=$(( $(upi) + ${tpm_wait:-90} ))
  while [ ! -c $want ] && [ "$(upi)" -lt $end ]; do sleep 0.1; done
  ver=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null)
  echo "GUEST-INFO devices: $(ls /dev | grep -E '^tpm' | tr '\n' ' ') tpm_version_major=${ver:-none} up=$(up)"
  case $role in
  tpm2)
    [ -c /dev/tpmrm0 ] && check tpmrm0 PASS "/dev/tpmrm0 present" || check tpmrm0 FAIL "no /dev/tpmrm0 after ${tpm_wait:-90} s (devices: $(ls /dev | grep tpm | tr '\n' ' '))"
    [ "$ver" = 2 ] && check tpm2-chip PASS "tpm_version_major=2" || check tpm2-chip FAIL "tpm_version_major=${ver:-none}"
    [ -c /dev/tpmrm0 ] || finish
    export TPM2TOOLS_TCTI=device:/dev/tpmrm0
    if t tpm2_getrandom --hex 16 && echo "$out" | grep -qE '^[0-9a-f]{32}$'; then check getrandom PASS "$out"
    else check getrandom FAIL "$(brief)"; fi
    if t tpm2_pcrread sha256:0,16 && [ "$(echo "$out" | grep -cE '^ +(0|16) *: 0x[0-9A-F]{64}')" = 2 ]; then
      check pcrread PASS "$(echo "$out" | grep -E '^ +(0|16) *:' | tr -s ' \n' ' ')"
    else check pcrread FAIL "$(brief 3)"; fi
    cd /tmp
    ok=0
    for i in 1 2 3 4 5; do t tpm2_createprimary -C o -G ecc -c p$i.ctx && ok=$((ok+1)) || break; done
    [ $ok = 5 ] && check createprimary PASS "5 primaries (ecc) in 5 processes, no flushcontext" ||
      check createprimary FAIL "$ok of 5 succeeded; $(brief)"
    if t tpm2_create -C p1.ctx -G ecc -u k.pub -r k.priv && t tpm2_load -C p1.ctx -u k.pub -r k.priv -c k.ctx &&
       t tpm2_sign -c k.ctx -g sha256 -o sig.bin p1.ctx; then
      check create-load-sign PASS "child key created, loaded and used from saved contexts"
    else check create-load-sign FAIL "$(brief)"; fi
    # the in-kernel RM flushes what a closed /dev/tpmrm0 file left loaded: the raw device sees nothing
    if TPM2TOOLS_TCTI=device:/dev/tpm0 t tpm2_getcap handles-transient; then
      [ -z "$(echo "$out" | grep -E '0x80')" ] && check transient-clean PASS "no transient handles on /dev/tpm0 after the runs" ||
        check transient-clean FAIL "left loaded: $(echo "$out" | tr '\n' ' ')"
    else check transient-clean FAIL "$(brief)"; fi
    echo "GUEST-INFO hwrng: $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
    ;;
  tpm12)
    [ -c /dev/tpm0 ] && check tpm0 PASS "/dev/tpm0 present" || check tpm0 FAIL "no /dev/tpm0 after ${tpm_wait:-90} s"
    [ "$ver" = 1 ] && check tpm12-chip PASS "tpm_version_major=1" || check tpm12-chip FAIL "tpm_version_major=${ver:-none}"
    [ -e /dev/tpmrm0 ] && check no-tpmrm0 FAIL "/dev/tpmrm0 exists for a TPM 1.2" || check no-tpmrm0 PASS "no /dev/tpmrm0 (TPM 1.2)"
    p=$(timeout 60 cat /sys/class/tpm/tpm0/device/pcrs 2>&1)
    echo "$p" | grep -q '^PCR-00:' && check pcrs PASS "$(echo "$p" | grep -c '^PCR-') PCRs via TPM 1.2 PCRRead" || check pcrs FAIL "$(echo "$p" | head -n 2 | tr '\n' ' ')"
    c=$(timeout 60 cat /sys/class/tpm/tpm0/device/caps 2>&1)
    echo "$c" | grep -q 'TCG version' && check caps PASS "$(echo "$c" | tr -s ' \n' ' ')" || check caps FAIL "$(echo "$c" | head -n 2 | tr '\n' ' ')"
    ;;
  *) check role FAIL "unknown tpm2_phase=$role" ;;
  esac
  finish
fi

###################################################################### dom0 role
KO=${1:-/guest/xen-tpmfront-tpm2.ko}
BASE=/guest/domu.cpio.zst
CFGIN=/etc/xen/guest-vtpm.cfg.in
W=/tmp/tpm2-guest
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n1; }
DEADLINE=$(arg xvtpm_deadline); DEADLINE=${DEADLINE:-100000}
tmo() { _l=$(( DEADLINE - $(upi) )); [ $_l -lt 1 ] && _l=1; [ $1 -lt $_l ] && echo $1 || echo $_l; }
wait_until() {
  _end=$(( $(upi) + $(tmo $1) )); shift
  while ! "$@" >/dev/null 2>&1; do [ "$(upi)" -ge $_end ] && return 1; sleep 0.2; done
}
s_between() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }
clog() { echo /var/log/xen/console/guest-$1.log; }
console_txt() { tr -d '\r' < "$(clog "$1")" 2>/dev/null; }
console_has() { console_txt "$1" | grep -qE "$2"; }
domain_gone() { ! xl domid "$1" >/dev/null 2>&1; }
FAIL=0
fail() { echo "tpm2-guest-phase: $*"; FAIL=1; }

for f in "$KO" "$BASE" "$CFGIN"; do [ -s "$f" ] || { echo "tpm2-guest-phase: missing $f"; exit 1; }; done
command -v xl-vtpm >/dev/null || { echo "tpm2-guest-phase: xl-vtpm not in the image"; exit 1; }
echo "INFO tpm2-guest patched module $KO: $(sha256sum "$KO" | cut -c1-16)... $(strings "$KO" | grep -m1 '^vermagic=')"

# ---- ramdisk: base image padded to 4 bytes + uncompressed overlay cpio ----
rm -rf $W; mkdir -p $W/ov/xvtpm-tpm2
cp "$KO" $W/ov/xvtpm-tpm2/xen-tpmfront.ko
cp "$0" $W/ov/xvtpm-tpm2/init; chmod 755 $W/ov/xvtpm-tpm2/init
cp "$BASE" $W/domu-tpm2.img
pad=$(( (4 - $(stat -c %s $W/domu-tpm2.img) % 4) % 4 ))
[ $pad -gt 0 ] && head -c $pad /dev/zero >> $W/domu-tpm2.img
(cd $W/ov && find xvtpm-tpm2 | cpio -o -H newc 2>/dev/null) >> $W/domu-tpm2.img
echo "INFO tpm2-guest ramdisk $W/domu-tpm2.img: $(stat -c %s $W/domu-tpm2.img) bytes (base $(stat -c %s $BASE) + overlay)"

# run_guest NAME ROLE CREATE-ARGS REQUIRED-CHECKS...
run_guest() {
  name=$1; role=$2; cargs=$3; shift 3
  t0=$(up)
  XVTPM_LOG=info NO_COLOR=1 timeout $(tmo 90) xl-vtpm vtpm create --listen xen:/local/domain/0/backend/vtpm $cargs --json \
    > $W/$name-create.json 2> $W/$name-create.err; rc=$?
  uuid=$(sed -n 's/^ *"uuid": *"\([0-9a-fA-F-]*\)".*/\1/p' $W/$name-create.json | head -n1)
  vlog=/var/lib/xvtpm/vtpms/$uuid/vtpm.log
  if [ $rc != 0 ] || [ -z "$uuid" ]; then
    tail -n 10 $W/$name-create.err; fail "$name: xl-vtpm vtpm create $cargs exited $rc"
    echo "CHECK $name/vtpm-create FAIL rc=$rc"; return
  fi
  wait_until 30 grep -q 'tpmif backend watching' "$vlog" || fail "$name: no 'tpmif backend watching' in $vlog"
  echo "PERF $name-vtpm-create-s=$(s_between $t0 $(up))"
  sed -e "s/@UUID@/$uuid/" -e "s|@EXTRA@|rdinit=/xvtpm-tpm2/init tpm2_phase=$role|" \
      -e "s|^name = .*|name = \"$name\"|" -e "s|^ramdisk = .*|ramdisk = \"$W/domu-tpm2.img\"|" $CFGIN > $W/$name.cfg
  grep -E '^(name|ramdisk|extra|vtpm)' $W/$name.cfg | sed "s/^/[$name cfg] /"
  t0=$(up)
  if timeout $(tmo 120) xl create $W/$name.cfg > $W/xl-$name.out 2>&1; then
    wait_until 240 console_has $name '^GUEST-DONE' || fail "$name: no GUEST-DONE"
    echo "PERF $name-create-to-done-s=$(s_between $t0 $(up))"
    wait_until 60 domain_gone $name || { fail "$name: did not power off"; timeout $(tmo 60) xl destroy $name; }
  else tail -n 20 $W/xl-$name.out; fail "$name: xl create failed"; fi
  console_txt $name | grep -E '^GUEST-(UP|INFO|DMESG|DONE)' | sed "s/^/[$name] /"
  console_txt $name | sed -n "s|^GUEST-CHECK |CHECK $name/|p"
  for c in "$@"; do console_has $name "^GUEST-CHECK $c PASS" || fail "$name: check $c did not pass"; done
  console_has $name '^GUEST-DONE .*result=ok' || fail "$name: guest result not ok"
  timeout $(tmo 30) xl-vtpm vtpm stop $uuid > $W/$name-stop.out 2>&1 || fail "$name: xl-vtpm vtpm stop $uuid failed: $(tail -n 2 $W/$name-stop.out)"
  tail -n 4 "$vlog" 2>/dev/null | sed "s/^/[$name vtpm.log] /"
}

run_guest guest-tpm2 tpm2 "--ek ecc" insmod tpmrm0 tpm2-chip getrandom pcrread createprimary create-load-sign transient-clean
if [ "${XVTPM_TPM2_PHASE_TPM12:-$(arg xvtpm_tpm2_phase_tpm12)}" != 0 ]; then
  run_guest guest-tpm12 tpm12 "--tpm12" insmod tpm0 tpm12-chip no-tpmrm0 pcrs caps
fi
[ $FAIL = 0 ]
