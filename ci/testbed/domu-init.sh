#!/bin/sh
# Guest /init.  Parameters come from the kernel command line (unknown name=value
# words reach init as environment variables):
#   role=plain  load xen-tpmfront (no vtpm device), print markers, power off
#   role=vtpm   load xen-tpmfront against the vTPM backend and exercise /dev/tpm0:
#     boot=1    startup, getrandom, PCR 16 extend/read, EK + AK, quote + checkquote,
#               persistent key 0x81000010, NV index 0x01500016, deep quote (dq_nonce=HEX)
#               printed as hex between GUEST-DQ-BEGIN/GUEST-DQ-END
#     boot=2    the same vTPM after a guest reboot: 0x81000010 and the NV contents are
#               still there, PCR 16 is reset, same EK; with dq_nonce=HEX the deep quote again
#   role=life   the lifecycle guest (xl-vtpm create of xen-configs/guest.cfg; the same kernel
#               command line on every boot): startup, getrandom, PCR 16 reset, hash of the
#               manufactured EK; then if 0x81000010 is absent (a fresh vTPM) it creates 0x81000010
#               + the NV index ("GUEST-LIFE state=fresh"), else checks they are there ("state=kept")
#   role=mig    the migration guest (xl-vtpm create, hold=1): startup, EK hash, persistent key
#               0x81000010, NV index, PCR 16 extended once (GUEST-PCR16 <hex>); its command
#               "N:migcheck:NONCE" (after a move) prints EK hash, persistent key, NV, PCR 16 and a
#               fresh ECC AK quote over PCR 16 checked with tpm2_checkquote
#   tick=1      print "GUEST-TICK <uptime>" every 0.1 s in the background (the largest gap is the
#               downtime a migration causes, as the guest sees it)
#   role=hvm    the HVM guest of the hvm-tis and hvm-crb phases: its TPM is the device model's
#               tpm-tis or tpm-crb, found through ACPI (hvmloader's PNP0C31; for CRB the TPM2 table
#               and MSFT0101 device xl-vtpm passes in acpi_firmware), not xen-tpmfront; tpm2-tools through the kernel's
#               resource manager (/dev/tpmrm0). A fresh vTPM (NV index absent, "GUEST-HVM state=fresh"):
#               startup, getrandom, pcrread, PCR 16 extend, EK + AK, quote + checkquote, the NV
#               index, the EK certificate (NV 0x01c00002); after a reboot ("state=kept"): the
#               NV index kept, PCR 16 reset, the same EK
#     tpm=0     the same HVM guest without a vTPM (the P5 baseline): checks that it sees no TPM
#     fw=ovmf   the hvm-ovmf phase's guest (OVMF for Xen, tpm-crb): also the firmware's TCG2 event
#               log, replayed by tpm2_eventlog to the vTPM's PCRs 0-7 on every boot (GUEST-EVLOG*;
#               as hex on the first), and the quote covers PCRs 0-7
#     mig=1     the hvm-migrate phase's guest (tpm-crb, with the xenstore client): also the
#               persistent key 0x81000010 and the manufactured EK's hash (GUEST-MIGEK); with hold=1
#               it then serves dom0's commands as role=mig does (migcheck after each move)
#   hold=1      do not power off at the end (dom0 xl destroys the guest); role=life then
#               serves commands from xenstore data/xvtpm-cmd ("N:getrandom", "N:deepquote:HEX",
#               "N:extend" (PCR 16 once), "N:migcheck:NONCE"; extend and migcheck use the /dev/tpmN
#               that exists now: a resumed guest's xen-tpmfront registers its chip anew),
#               answering "GUEST-CMD N <cmd> PASS|FAIL ..." on the console
#   tpm_wait=S  how long to wait for the TPM's device node (wait_tpm; 90)
# Every check prints "GUEST-CHECK <name> PASS|FAIL <detail>"; the last line is
# "GUEST-DONE role=<role> result=ok|fail".  Timing markers carry wall=<Xen wallclock,
# s.us> (busybox date has no %N; adjtimex reads the same PV clock dom0 sees) and up=.
export PATH=/bin:/usr/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
wall() { adjtimex | awk '/tv_sec/{s=$2} /tv_usec/{u=$2} END{printf "%d.%06d", s, u}'; }
up() { cut -d' ' -f1 /proc/uptime; }
role=${role:-plain}; boot=${boot:-1}
if [ "${tick:-0}" = 1 ]; then
  ( while :; do read u _ < /proc/uptime; echo "GUEST-TICK $u"; sleep 0.1; done ) &
fi
echo "GUEST-UP role=$role boot=$boot wall=$(wall) up=$(up) kernel=$(uname -r) domid=$(xenstore-read domid 2>/dev/null) memavail=$(awk '/MemAvailable/{print $2}' /proc/meminfo)kB"
res=ok
check() {  # name PASS|FAIL detail...
  n=$1; s=$2; shift 2
  echo "GUEST-CHECK $n $s $* [up=$(up)]"
  [ "$s" = PASS ] || res=fail
}
# run a TPM tool with a timeout; output in $out, rc in $rc
t() { out=$(timeout ${TT:-60} "$@" 2>&1); rc=$?; return $rc; }
# no resource manager behind /dev/tpm0: flush transient objects (-l: loaded sessions too)
flush() { timeout 30 tpm2_flushcontext -t >/dev/null 2>&1; [ "${1:-}" = -l ] && timeout 30 tpm2_flushcontext -l >/dev/null 2>&1; }
# PCR 16 extend: digest D = sha256("xvtpm-testbed"); after a reset PCR16 = sha256(0^32 || D)
PCR_D=3b601227023b6a4393425aaec9930303862dbbfcdc503406ee2e99f2b6b8c44d
PCR_AFTER=39DE0A6FECF21D432302A5D79315BC42DFF73C4BE042FB5276E3C5B4758BCA02
PCR_ZERO=0000000000000000000000000000000000000000000000000000000000000000
NV_IDX=0x01500016; NV_DATA='xvtpm-testbed-nv-0123456789abcde'   # 32 bytes
PERSIST=0x81000010
# PCR N's sha256 value (upper-case hex, as tpm2_pcrread prints it), empty if the read failed
pcr() { t tpm2_pcrread sha256:$1 && echo "$out" | sed -n "s/^ *$1 *: *0x//p"; }
pcr16() { pcr 16; }
# ima_replay FILE: "N VALUE": the number of entries of an IMA binary_runtime_measurements log and
# the sha256-bank PCR 10 value (lower-case hex) it replays to; fails on a malformed log. Each
# entry: PCR (u32), SHA-1 template digest (20), name length (u32), name, template data length
# (u32), template data; the kernel extends a non-SHA-1 bank with that bank's hash of the
# template data. u32s in the host's byte order.
u32() { dd if="$1" bs=1 skip="$2" count=4 2>/dev/null | od -An -tu4 | tr -d ' \n'; }
ima_replay() {
  _f=$1; _size=$(wc -c < "$_f"); _off=0; ima_n=0
  _v=0000000000000000000000000000000000000000000000000000000000000000
  while [ "$_off" -lt "$_size" ]; do
    _nl=$(u32 "$_f" $((_off + 24))); _dl=$(u32 "$_f" $((_off + 28 + _nl)))
    { [ -n "$_nl" ] && [ -n "$_dl" ] && [ "$_nl" -le 255 ] && [ $((_off + 32 + _nl + _dl)) -le "$_size" ]; } || return 1
    _d=$(dd if="$_f" bs=1 skip=$((_off + 32 + _nl)) count="$_dl" 2>/dev/null | sha256sum | cut -c1-64)
    _v=$(printf '%s%s' "$_v" "$_d" | xxd -r -p | sha256sum | cut -c1-64)
    _off=$((_off + 32 + _nl + _dl)); ima_n=$((ima_n + 1))
  done
  echo "$ima_n $_v"
}
# where the HVM guest's kernel spent its boot under nested TCG: the 6 longest gaps between
# consecutive dmesg lines, each with the line that ended it
hvm_boot_gaps() {
  dmesg | awk -F'] ' '/^\[ *[0-9]/ { t = substr($1, 2) + 0; if (NR > 1) printf "%.2f %.2f %s\n", t - p, t, substr($0, index($0, "] ") + 2, 70); p = t }' |
    sort -rn | head -n 6 | while read -r d t l; do echo "GUEST-INFO boot-gap ${d}s before ${t}: $l"; done
}
# hvm_eventlog: the OVMF guest (fw=ovmf): the firmware's TCG2 event log as the kernel kept it
# (securityfs), replayed by tpm2_eventlog and compared with the vTPM's PCRs 0-7; printed as hex
# (GUEST-EVLOG-HEX, first boot only) for dom0 to replay it with xl-vtpm and keep it
hvm_eventlog() {
  mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
  el=/sys/kernel/security/tpm0/binary_bios_measurements
  if ! cat $el > /tmp/evlog.bin 2>/dev/null || [ ! -s /tmp/evlog.bin ]; then
    check eventlog FAIL "no event log at $el (EFI: $([ -d /sys/firmware/efi ] && echo yes || echo no))"; return
  fi
  # (not $n: check() sets it)
  elen=$(wc -c < /tmp/evlog.bin); sum=$(sha256sum /tmp/evlog.bin | cut -c1-64)
  echo "GUEST-EVLOG bytes=$elen sha256=$sum"
  if tr -c 'A-Za-z0-9 ' '\n' < /tmp/evlog.bin | grep -q 'Spec ID Event03'; then
    check eventlog PASS "$elen bytes, crypto agile (Spec ID Event03), sha256 $sum"
  else check eventlog FAIL "$elen bytes without a Spec ID Event03 header"; fi
  # the vTPM's PCRs 0-7 and the log's replay, both as "N=HEX" (upper case)
  t tpm2_pcrread sha256:0,1,2,3,4,5,6,7
  pcrs=$(echo "$out" | sed -n 's/^ *\([0-7]\) *: *0x\([0-9A-Fa-f]*\).*/\1=\2/p' | tr 'a-f' 'A-F' | sort | tr '\n' ' ')
  t tpm2_eventlog /tmp/evlog.bin
  rep=$(echo "$out" | awk '/^pcrs:/ { p = 1; next } p && /^  sha256:/ { s = 1; next } p && /^  [a-z0-9_]+:/ { s = 0 }
    s && /^ +[0-9]+ *: *0x/ { gsub(/ /, ""); split($0, a, ":"); if (a[1] + 0 < 8) print a[1] "=" toupper(substr(a[2], 3)) }' | sort | tr '\n' ' ')
  echo "GUEST-EVLOG-PCRS $pcrs"
  if [ -n "$rep" ] && [ "$rep" = "$pcrs" ] && [ "$(echo "$pcrs" | wc -w)" = 8 ] && ! echo "$pcrs" | grep -q "0=$PCR_ZERO"; then
    check eventlog-replay PASS "tpm2_eventlog's replay of the log = the vTPM's PCRs 0-7 (PCR 0 measured)"
  else check eventlog-replay FAIL "replay '${rep:-<none: rc=$rc $(echo "$out" | tail -n 1)>}' vs pcrread '$pcrs'"; fi
  [ "$st" = fresh ] && xxd -p /tmp/evlog.bin | sed 's/^/GUEST-EVLOG-HEX /'
}
# deep_quote: `xl-vtpm guest deep-quote` over /dev/tpm0 (no resource manager: the kernel's would
# refuse a vendor command the TPM does not list) with dq_nonce from the kernel command line, vPCRs
# and host PCRs 0-7; printed as hex between GUEST-DQ-BEGIN/GUEST-DQ-END for dom0 to verify
deep_quote() {
  [ -n "${dq_nonce:-}" ] || { check deep-quote FAIL "no dq_nonce= on the kernel command line"; return; }
  if TT=120 t xl-vtpm guest deep-quote --tcti device:/dev/tpm0 --nonce "$dq_nonce" --vpcrs 0-7 --host-pcrs 0-7 --out dq.bin; then
    echo "GUEST-DQ-BEGIN bytes=$(wc -c < dq.bin)"
    xxd -p -c 32 dq.bin | sed 's/^/GUEST-DQ /'
    echo "GUEST-DQ-END sha256=$(sha256sum dq.bin | cut -c1-64)"
    check deep-quote PASS "$(wc -c < dq.bin) bytes; $out"
  else check deep-quote FAIL "rc=$rc $(echo "$out" | tail -n 3 | tr '\n' ' ')"; fi
}
# wait_tpm DEV: waits up to tpm_wait s for the character device DEV (a TPM driver probes in the
# background: tpm_tis after ACPI, xen-tpmfront after xenbus); true once it is there
wait_tpm() {
  _end=$(( $(cut -d. -f1 /proc/uptime) + ${tpm_wait:-90} ))
  while [ ! -c "$1" ] && [ "$(cut -d. -f1 /proc/uptime)" -lt $_end ]; do sleep 0.1; done
  [ -c "$1" ]
}

case $role in
hvm)
  if [ "${tpm:-1}" = 0 ]; then
    # the P5 baseline: no vTPM, so hvmloader found no TIS and wrote no TPM into ACPI (tpm_tis is
    # built into Debian's kernel: its probe ran before /init)
    tpms=$(ls /dev/tpm* /sys/bus/acpi/devices/PNP0C31* /sys/bus/acpi/devices/MSFT0101* 2>/dev/null | tr '\n' ' ')
    [ -z "$tpms" ] && check no-tpm PASS "no TPM device and no ACPI TPM" || check no-tpm FAIL "found: $tpms"
    hvm_boot_gaps
    echo "GUEST-DONE role=$role tpm=0 result=$res up=$(up)"
    sync; [ "${hold:-0}" = 1 ] && exec sleep 100000; poweroff -f
  fi
  export TPM2TOOLS_TCTI=device:/dev/tpmrm0
  # tpm_tis (built in) probes before /init and sends TPM2_Startup itself (SeaBIOS does not under
  # Xen); on a slow host the vTPM's first Startup can outlast the kernel's wait ("Operation Timed
  # out", probe error -62), after which the TPM is started but has no driver: probe it once more
  # (tpm_tis binds the PNP0C31 device on the pnp bus; tpm_crb the MSFT0101 device on the acpi bus)
  # On a heavily loaded host a re-probe can time out too (seen at load 6-8): up to 5 tries, 10 s apart
  tries=0
  while [ ! -c /dev/tpmrm0 ] && [ $tries -lt 5 ] && p=$(dmesg | grep -oE 'tpm_(tis|crb): probe of [^ ]* failed with error -62' | head -n 1) && [ -n "$p" ]; do
    tries=$((tries + 1)); drv=${p%%:*}; d=$(echo "$p" | cut -d' ' -f4); bus=pnp; [ "$drv" = tpm_crb ] && bus=acpi
    echo "GUEST-INFO $drv probe of $d timed out ($(dmesg | grep -m1 -o 'tpm tpm0: Operation Timed out')); probing again (try $tries)"
    echo "$d" > /sys/bus/$bus/drivers/$drv/bind 2>/dev/null || { echo "GUEST-INFO re-probe $tries of $d: bind failed"; sleep 10; }
  done
  if ! wait_tpm /dev/tpmrm0; then
    check tpm0 FAIL "no /dev/tpmrm0 after ${tpm_wait:-90} s; ACPI TPM devices: $(ls -d /sys/bus/acpi/devices/PNP0C31* /sys/bus/acpi/devices/MSFT0101* 2>/dev/null | tr '\n' ' ')"
    dmesg | grep -iE 'tpm|acpi.*(tcpa|tpm)' | tail -n 20 | sed 's/^/GUEST-DMESG /'
    echo "GUEST-DONE role=$role result=fail up=$(up)"
    sync; [ "${hold:-0}" = 1 ] && exec sleep 100000; poweroff -f
  fi
  dev=$(readlink -f /sys/class/tpm/tpm0/device 2>/dev/null)
  ver=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null)
  # tpm-tis: hvmloader's PNP0C31 device; tpm-crb: the MSFT0101 device and TPM2 table xl-vtpm
  # passes in acpi_firmware (tpm_crb is built into Debian's kernel too)
  acpi=no
  for h in PNP0C31 MSFT0101; do [ -e /sys/bus/acpi/devices/$h:00 ] && acpi=$h; done
  drv=$(basename "$(readlink -f /sys/class/tpm/tpm0/device/driver 2>/dev/null)")
  tpm2tbl=no; [ -e /sys/firmware/acpi/tables/TPM2 ] && tpm2tbl=yes
  forced=no; grep -q 'tpm_tis.force' /proc/cmdline && forced=yes
  # every TPM line of the kernel (IRQ or polling, timeouts) and the TPM's interrupt count, if any
  dmesg | grep -iE 'tpm' | tail -n 12 | sed 's/^/GUEST-DMESG /'
  irq=$(grep -i tpm /proc/interrupts | tr -s ' ')
  echo "GUEST-INFO tpm-irq ${irq:-none (polling)}"
  if [ "$ver" = 2 ] && [ $acpi != no ] && [ $forced = no ]; then
    check tpm0 PASS "TPM $ver.0 at ${dev##*/} (driver $drv) via ACPI $acpi, TPM2 table $tpm2tbl (no tpm_tis.force) up=$(up)"
  else check tpm0 FAIL "version=$ver acpi-device=$acpi driver=$drv TPM2-table=$tpm2tbl tpm_tis.force=$forced device=$dev"; fi
  # the kernel sent TPM2_Startup (SeaBIOS skips the TPM under Xen): "already initialized" is fine
  if t tpm2_startup -c; then check startup PASS "rc=0"
  elif echo "$out" | grep -qiE 'TPM_RC_INITIALIZE|0x100|already'; then check startup PASS "already started"
  else check startup FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
  if t tpm2_getrandom --hex 16 && echo "$out" | grep -qE '^[0-9a-f]{32}$'; then
    echo "GUEST-P5 first-tpm-answer wall=$(wall) up=$(up)"
    check getrandom PASS "$out"
  else check getrandom FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
  cd /tmp
  if t tpm2_nvread $NV_IDX -C o -s 32 -o nv.out; then st=kept; else st=fresh; fi
  echo "GUEST-HVM state=$st"
  if t tpm2_pcrread sha256:0,7,16; then check pcrread PASS "$(echo "$out" | tr -s ' \n' ' ')"
  else check pcrread FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
  qpcrs=0,7,16
  [ "${fw:-seabios}" = ovmf ] && { hvm_eventlog; qpcrs=0,1,2,3,4,5,6,7,16; }
  v0=$(pcr16)
  [ "$v0" = "$PCR_ZERO" ] && check pcr16-reset PASS "PCR16=0 (state=$st)" || check pcr16-reset FAIL "PCR16=${v0:-<read failed>} (state=$st: a new platform must reset the vTPM's PCRs)"
  if t tpm2_createek -c ek.ctx -G ecc -u ek.pub; then
    echo "GUEST-EKHASH $(sha256sum ek.pub | cut -c1-64)"; check createek PASS "ecc"
  else check createek FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
  if [ $st = fresh ]; then
    if t tpm2_pcrextend 16:sha256=$PCR_D && [ "$(pcr16)" = "$PCR_AFTER" ]; then check pcrextend PASS "PCR16=$PCR_AFTER"
    else check pcrextend FAIL "rc=$rc PCR16=$(pcr16)"; fi
    if t tpm2_createak -C ek.ctx -c ak.ctx -G ecc -g sha256 -s ecdsa -u ak.pub -n ak.name; then check createak PASS "ecc/ecdsa restricted signing key"
    else check createak FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    q=$(timeout 5 head -c 16 /dev/urandom | xxd -p)
    if t tpm2_quote -c ak.ctx -l sha256:$qpcrs -q $q -m q.msg -s q.sig -o q.pcrs -g sha256; then check quote PASS "PCRs sha256:$qpcrs"
    else check quote FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    if t tpm2_checkquote -u ak.pub -m q.msg -s q.sig -f q.pcrs -g sha256 -q $q; then
      if t tpm2_checkquote -u ak.pub -m q.msg -s q.sig -f q.pcrs -g sha256 -q 00$q; then check checkquote FAIL "a wrong nonce verified too"
      else check checkquote PASS "signature + nonce verified; a wrong nonce is rejected"; fi
    else check checkquote FAIL "rc=$rc $(echo "$out" | tail -n 3 | tr '\n' ' ')"; fi
    # OVMF: a deep quote over the vPCRs 0-7 the firmware measured (dom0 verifies it with the event log)
    [ "${fw:-seabios}" = ovmf ] && deep_quote
    printf '%s' "$NV_DATA" > nv.dat
    if t tpm2_nvdefine $NV_IDX -C o -s 32 -a "ownerread|ownerwrite" && t tpm2_nvwrite $NV_IDX -C o -i nv.dat &&
       t tpm2_nvread $NV_IDX -C o -s 32 -o nv.out; then
      cmp -s nv.dat nv.out && check nv-write PASS "$NV_IDX = '$NV_DATA'" || check nv-write FAIL "read back '$(cat nv.out)'"
    else check nv-write FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    if [ "${mig:-0}" = 1 ]; then
      # the hvm-migrate guest: what a move must keep (dom0's migcheck compares): the manufactured
      # EK, a persistent key, the NV index above, PCR 16 as extended above
      if t tpm2_readpublic -c 0x81010001 -o mek.pub || t tpm2_readpublic -c 0x81010002 -o mek.pub; then
        echo "GUEST-MIGEK $(sha256sum mek.pub | cut -c1-64)"; check ek PASS "readpublic of the manufactured EK"
      else check ek FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
      if t tpm2_createprimary -C o -G ecc -c prim.ctx && t tpm2_evictcontrol -C o -c prim.ctx $PERSIST; then check persistent PASS "evictcontrol -> $PERSIST"
      else check persistent FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
      echo "GUEST-PCR16 $(pcr16)"
    fi
    # the EK certificate xl-vtpm's vTPM is made with (RSA 0x01c00002; ECC 0x01c0000a if there is
    # one too): DER, readable without a password
    t tpm2_getcap handles-nv-index; idx=""
    for i in 0x1c00002 0x1c0000a; do echo "$out" | grep -qi "$i\$" && idx="$idx $i"; done
    case "$idx" in
    *0x1c00002*) ;;
    *) check ekcert FAIL "no RSA EK certificate index 0x01c00002 in NV: $(echo "$out" | tr -s ' \n' ' ')" ;;
    esac
    if [ -n "$idx" ]; then
      for i in $idx; do
        if t tpm2_nvread $i -C o -o ekcert.der && [ "$(head -c 1 ekcert.der | xxd -p)" = 30 ]; then
          check ekcert PASS "$i: $(wc -c < ekcert.der) bytes of DER, sha256 $(sha256sum ekcert.der | cut -c1-16)..."
        else check ekcert FAIL "$i: rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ') first byte $(head -c 1 ekcert.der 2>/dev/null | xxd -p)"; fi
      done
    fi
  else
    [ "$(cat nv.out)" = "$NV_DATA" ] && check nv-kept PASS "$NV_IDX = '$NV_DATA' after the reboot" || check nv-kept FAIL "read '$(cat nv.out)'"
  fi
  # IMA (Debian's kernel: CONFIG_IMA=y, tpm_tis and tpm_crb built in): the TPM driver probes at
  # device initcall, before IMA's late initcall, so IMA finds the vTPM and extends its PCR 10; the
  # log must replay to it (after a reboot too: the platform reset cleared PCR 10, IMA starts over)
  mount -t securityfs none /sys/kernel/security 2>/dev/null
  ima=$(dmesg | grep -m1 -oE 'ima: .*TPM.*' | tr -d '\r')
  L=/sys/kernel/security/ima/binary_runtime_measurements
  if [ -n "$ima" ]; then check ima-replay FAIL "IMA said '$ima' (the kernel's TPM probe had not succeeded when IMA started)"
  elif ! cp $L /tmp/ima.bin 2>/dev/null; then check ima-replay FAIL "no $L"
  elif rep=$(ima_replay /tmp/ima.bin) && ima_n=${rep%% *} && r=${rep#* } && p10=$(pcr 10) && [ "$ima_n" -ge 1 ] &&
       [ "$r" = "$(echo "$p10" | tr A-F a-f)" ]; then
    check ima-replay PASS "$ima_n IMA entries ($(cut -d' ' -f5 /sys/kernel/security/ima/ascii_runtime_measurements | head -n 3 | tr '\n' ' ')) replay to the vTPM's PCR 10 (sha256) = $r"
  else check ima-replay FAIL "the log (${rep:-malformed}) does not replay to the vTPM's PCR 10 ${p10:-<read failed>}"; fi
  hvm_boot_gaps
  ;;
plain)
  if insmod /lib/modules/xen-tpmfront.ko && [ -d /sys/bus/xen/drivers/vtpm ]; then
    echo "GUEST-TPMFRONT loaded up=$(up)"
  else res=fail; echo "GUEST-TPMFRONT insmod failed"; fi
  ;;
vtpm|life|mig)
  export TPM2TOOLS_TCTI=device:/dev/tpm0
  echo "GUEST-VTPM frontend: $(xenstore-ls device/vtpm 2>&1 | tr '\n' ' ')"
  for m in $(cat /lib/modules/xen-tpmfront.deps 2>/dev/null || echo xen-tpmfront); do
    grep -q "^$(echo $m | tr - _) " /proc/modules || insmod /lib/modules/$m.ko || echo "GUEST-TPMFRONT insmod $m failed"
  done &
  if ! wait_tpm /dev/tpm0; then
    check tpm0 FAIL "no /dev/tpm0 after ${tpm_wait:-90} s; frontend state=$(xenstore-read device/vtpm/0/state 2>&1)"
    dmesg | grep -iE 'tpm|vtpm|xen' | tail -n 20 | sed 's/^/GUEST-DMESG /'
    echo "GUEST-DONE role=$role boot=$boot result=fail up=$(up)"
    sync; [ "${hold:-0}" = 1 ] && exec sleep 100000; poweroff -f
  fi
  check tpm0 PASS "/dev/tpm0 up=$(up) tpmrm0=$([ -c /dev/tpmrm0 ] && echo yes || echo no) version=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null)"

  if [ "$role" = vtpm ] && [ "$boot" = 1 ]; then
    # IMA (built into Debian's kernel) starts at late_initcall, before /init can load xen-tpmfront
    # (a module): it must run in TPM-bypass and never extend the vTPM's PCR 10.
    ima=$(dmesg | grep -m1 -oE 'ima: .*TPM.*' | tr -d '\r')
    p10=$(pcr 10)
    if echo "$ima" | grep -q 'No TPM chip found, activating TPM-bypass' && [ "$p10" = "$PCR_ZERO" ]; then
      check ima-bypass PASS "'$ima'; the vTPM's PCR 10 is zero"
    else check ima-bypass FAIL "IMA said '${ima:-nothing about a TPM}', the vTPM's PCR 10 is ${p10:-<read failed>} (expected TPM-bypass and zero)"; fi
  fi

  # TPM2_Startup(CLEAR): "already initialized" (TPM_RC_INITIALIZE, 0x100) is fine
  if t tpm2_startup -c; then check startup PASS "rc=0"
  elif echo "$out" | grep -qiE 'TPM_RC_INITIALIZE|0x100|already'; then check startup PASS "already started"
  else check startup FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi

  if t tpm2_getrandom --hex 16 && echo "$out" | grep -qE '^[0-9a-f]{32}$'; then
    echo "GUEST-P5 first-tpm-answer wall=$(wall) up=$(up)"
    check getrandom PASS "$out"
  else check getrandom FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi

  if [ "$role" = mig ]; then
    cd /tmp
    if t tpm2_readpublic -c 0x81010001 -o ek.pub || t tpm2_readpublic -c 0x81010002 -o ek.pub; then
      echo "GUEST-EKHASH $(sha256sum ek.pub | cut -c1-64)"; check ek PASS "readpublic of the manufactured EK"
    else check ek FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    if t tpm2_createprimary -C o -G ecc -c prim.ctx && t tpm2_evictcontrol -C o -c prim.ctx $PERSIST; then check persistent PASS "evictcontrol -> $PERSIST"
    else check persistent FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    flush
    printf '%s' "$NV_DATA" > nv.dat
    if t tpm2_nvdefine $NV_IDX -C o -s 32 -a "ownerread|ownerwrite" && t tpm2_nvwrite $NV_IDX -C o -i nv.dat &&
       t tpm2_nvread $NV_IDX -C o -s 32 -o nv.out && cmp -s nv.dat nv.out; then check nv-write PASS "$NV_IDX = '$NV_DATA'"
    else check nv-write FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    if t tpm2_pcrextend 16:sha256=$PCR_D && [ "$(pcr16)" = "$PCR_AFTER" ]; then check pcrextend PASS "PCR16=$PCR_AFTER"
    else check pcrextend FAIL "rc=$rc PCR16=$(pcr16)"; fi
    echo "GUEST-PCR16 $(pcr16)"
  elif [ "$role" = life ]; then
    # the lifecycle guest: the same kernel command line on every boot; a fresh vTPM or one that
    # kept its state (0x81000010 tells). Few tools: each run costs seconds under TCG.
    t tpm2_getcap handles-persistent
    if echo "$out" | grep -qi "$PERSIST"; then st=kept; else st=fresh; fi
    echo "GUEST-LIFE state=$st"
    v0=$(pcr16)
    [ "$v0" = "$PCR_ZERO" ] && check pcr16-reset PASS "PCR16=0" || check pcr16-reset FAIL "PCR16=${v0:-<read failed>} (a new boot must reset the vTPM's PCRs)"
    cd /tmp
    # the EK the vTPM was manufactured with (persistent: RSA 0x81010001 or ECC 0x81010002)
    if t tpm2_readpublic -c 0x81010001 -o ek.pub || t tpm2_readpublic -c 0x81010002 -o ek.pub; then
      echo "GUEST-EKHASH $(sha256sum ek.pub | cut -c1-64)"; check ek PASS "readpublic of the manufactured EK"
    else check ek FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    if [ $st = fresh ]; then
      if t tpm2_createprimary -C o -G ecc -c prim.ctx && t tpm2_evictcontrol -C o -c prim.ctx $PERSIST; then check persistent PASS "evictcontrol -> $PERSIST"
      else check persistent FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
      printf '%s' "$NV_DATA" > nv.dat
      if t tpm2_nvdefine $NV_IDX -C o -s 32 -a "ownerread|ownerwrite" && t tpm2_nvwrite $NV_IDX -C o -i nv.dat &&
         t tpm2_nvread $NV_IDX -C o -s 32 -o nv.out; then
        cmp -s nv.dat nv.out && check nv-write PASS "$NV_IDX = '$NV_DATA'" || check nv-write FAIL "read back '$(cat nv.out)'"
      else check nv-write FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    else
      check persistent-kept PASS "$PERSIST in handles-persistent"
      if t tpm2_nvread $NV_IDX -C o -s 32 -o nv.out; then
        [ "$(cat nv.out)" = "$NV_DATA" ] && check nv-kept PASS "$NV_IDX = '$NV_DATA'" || check nv-kept FAIL "read '$(cat nv.out)'"
      else check nv-kept FAIL "nvread rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    fi
  else
  # resetCount/restartCount: a new guest boot should be a TPM reset (resetCount + 1)
  t tpm2_readclock && echo "GUEST-INFO clock boot=$boot $(echo "$out" | grep -E 'reset_count|restart_count|safe' | tr -s ' \n' ' ')"
  v0=$(pcr16)
  if [ "$v0" = "$PCR_ZERO" ]; then check pcr16-reset PASS "PCR16=0 at boot $boot"
  else check pcr16-reset FAIL "PCR16=${v0:-<read failed>} at boot $boot (expected zeros: a new boot must reset the vTPM's PCRs)"; fi

  if t tpm2_pcrextend 16:sha256=$PCR_D; then
    v=$(pcr16)
    if [ "$v0" = "$PCR_ZERO" ]; then
      [ "$v" = "$PCR_AFTER" ] && check pcrextend PASS "PCR16=$v" || check pcrextend FAIL "PCR16=${v:-<read failed>} expected $PCR_AFTER"
    else  # not reset (reported above): the extend itself must still change the PCR
      [ -n "$v" ] && [ "$v" != "$v0" ] && check pcrextend PASS "PCR16 changed to $v (from a non-zero start)" || check pcrextend FAIL "PCR16=${v:-<read failed>} unchanged"
    fi
  else check pcrextend FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi

  cd /tmp
  # EK (ECC: RSA key generation under TCG takes far too long), then hash of its public part
  if t tpm2_createek -c ek.ctx -G ecc -u ek.pub; then
    echo "GUEST-EKHASH $(sha256sum ek.pub | cut -c1-64)"; check createek PASS "ecc"
  else check createek FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
  flush

  if [ "$boot" = 1 ]; then
    if t tpm2_createak -C ek.ctx -c ak.ctx -G ecc -g sha256 -s ecdsa -u ak.pub -n ak.name; then check createak PASS "ecc/ecdsa restricted signing key"
    else check createak FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    flush -l
    q=$(timeout 5 head -c 16 /dev/urandom | xxd -p)
    if t tpm2_quote -c ak.ctx -l sha256:0,16 -q $q -m q.msg -s q.sig -o q.pcrs -g sha256; then check quote PASS "PCRs sha256:0,16"
    else check quote FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    flush
    if t tpm2_checkquote -u ak.pub -m q.msg -s q.sig -f q.pcrs -g sha256 -q $q; then
      if t tpm2_checkquote -u ak.pub -m q.msg -s q.sig -f q.pcrs -g sha256 -q 00$q; then check checkquote FAIL "a wrong nonce verified too"
      else check checkquote PASS "signature + nonce verified; a wrong nonce is rejected"; fi
    else check checkquote FAIL "rc=$rc $(echo "$out" | tail -n 3 | tr '\n' ' ')"; fi

    if t tpm2_createprimary -C o -G ecc -c prim.ctx; then :; else check persistent FAIL "createprimary rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    flush
    if [ -f prim.ctx ]; then
      if t tpm2_evictcontrol -C o -c prim.ctx $PERSIST; then
        t tpm2_getcap handles-persistent
        echo "$out" | grep -qi "$PERSIST" && check persistent PASS "evictcontrol -> $PERSIST" || check persistent FAIL "$PERSIST not in handles-persistent: $out"
      else check persistent FAIL "evictcontrol rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    fi
    flush

    printf '%s' "$NV_DATA" > nv.dat
    if t tpm2_nvdefine $NV_IDX -C o -s 32 -a "ownerread|ownerwrite" && t tpm2_nvwrite $NV_IDX -C o -i nv.dat &&
       t tpm2_nvread $NV_IDX -C o -s 32 -o nv.out; then
      cmp -s nv.dat nv.out && check nv-write PASS "$NV_IDX = '$NV_DATA'" || check nv-write FAIL "read back '$(cat nv.out)'"
    else check nv-write FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    flush

    deep_quote
    flush
  else
    t tpm2_getcap handles-persistent
    echo "$out" | grep -qi "$PERSIST" && check persistent-kept PASS "$PERSIST still present" || check persistent-kept FAIL "handles-persistent: $(echo "$out" | tr '\n' ' ')"
    if t tpm2_readpublic -c $PERSIST; then check persistent-usable PASS "readpublic $PERSIST"
    else check persistent-usable FAIL "rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    if t tpm2_nvread $NV_IDX -C o -s 32 -o nv.out; then
      [ "$(cat nv.out)" = "$NV_DATA" ] && check nv-kept PASS "$NV_IDX = '$NV_DATA'" || check nv-kept FAIL "read '$(cat nv.out)'"
    else check nv-kept FAIL "nvread rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')"; fi
    flush
    # a later boot with dq_nonce= (mgrdom-serve, after the manager domain's restart): the deep
    # quote again, signed by the manager that unsealed this vTPM's key anew
    if [ -n "${dq_nonce:-}" ]; then deep_quote; flush; fi
  fi
  fi  # role=vtpm
  ;;
esac
echo "GUEST-DONE role=$role boot=$boot result=$res up=$(up)"
sync
if [ "${hold:-0}" = 1 ] && { [ "$role" = life ] || [ "$role" = mig ] || [ "${mig:-0}" = 1 ]; }; then
  # dom0 writes /local/domain/<domid>/data/xvtpm-cmd = "N:cmd[:arg]"; each new N runs once
  echo "GUEST-HOLD serving data/xvtpm-cmd"
  last=""
  while :; do
    c=$(xenstore-read data/xvtpm-cmd 2>/dev/null)
    if [ -n "$c" ] && [ "$c" != "$last" ]; then
      last=$c; n=${c%%:*}; r=${c#*:}; cmd=${r%%:*}; a=${r#*:}
      if [ "$role" = mig ] || [ "$cmd" = migcheck ] || [ "$cmd" = extend ]; then
        # after a move (or a libvirt save/restore: the device is hot-plugged anew) xen-tpmfront has
        # removed its chip and probed it again: a new /dev/tpmN
        i=0; while [ $i -lt 300 ] && ! ls /dev/tpm[0-9]* >/dev/null 2>&1; do sleep 0.1; i=$((i+1)); done
        dev=$(ls /dev/tpm[0-9]* 2>/dev/null | head -n 1); export TPM2TOOLS_TCTI=device:${dev:-/dev/tpm0}
      fi
      case $cmd in
        getrandom) t tpm2_getrandom --hex 16 && echo "$out" | grep -qE '^[0-9a-f]{32}$' &&
                     echo "GUEST-CMD $n getrandom PASS $out" || echo "GUEST-CMD $n getrandom FAIL rc=$rc $(echo "$out" | tail -n 2 | tr '\n' ' ')" ;;
        deepquote) if TT=120 t xl-vtpm guest deep-quote --tcti device:/dev/tpm0 --nonce "$a" --vpcrs 0-7 --host-pcrs 0-7 --out /tmp/dq-cmd.bin; then
                     echo "GUEST-CMD $n deepquote PASS $(wc -c < /tmp/dq-cmd.bin) bytes"
                   else echo "GUEST-CMD $n deepquote FAIL rc=$rc $(echo "$out" | tail -n 3 | tr '\n' ' ')"; fi ;;
        extend)    # PCR 16 extended once (the libvirt-save phase: is it reset after the restore?)
                   t tpm2_pcrextend 16:sha256=$PCR_D && [ "$(pcr16)" = "$PCR_AFTER" ] &&
                     echo "GUEST-CMD $n extend PASS pcr16=$PCR_AFTER" || echo "GUEST-CMD $n extend FAIL rc=$rc pcr16=$(pcr16)" ;;
        migcheck)  # after a move: the same vTPM (EK, key, NV), PCR 16 as it is, a fresh quote
          cd /tmp; mc=PASS; d=" dev=${dev:-none}/$((i/10))s"
          if t tpm2_readpublic -c 0x81010001 -o ek2.pub || t tpm2_readpublic -c 0x81010002 -o ek2.pub; then d="$d ek=$(sha256sum ek2.pub | cut -c1-64)"
          else mc=FAIL; d="$d ek=FAIL(rc=$rc)"; fi
          t tpm2_getcap handles-persistent
          if echo "$out" | grep -qi "$PERSIST" && t tpm2_readpublic -c $PERSIST; then d="$d persistent=kept"; else mc=FAIL; d="$d persistent=MISSING"; fi
          if t tpm2_nvread $NV_IDX -C o -s 32 -o nvm.out && [ "$(cat nvm.out)" = "$NV_DATA" ]; then d="$d nv=kept"; else mc=FAIL; d="$d nv=FAIL"; fi
          d="$d pcr16=$(pcr16)"
          flush -l
          t tpm2_createek -c mek.ctx -G ecc -u mek.pub; flush
          if [ $rc = 0 ] && t tpm2_createak -C mek.ctx -c mak.ctx -G ecc -g sha256 -s ecdsa -u mak.pub -n mak.name; then
            flush -l
            if t tpm2_quote -c mak.ctx -l sha256:16 -q "$a" -m mq.msg -s mq.sig -o mq.pcrs -g sha256 &&
               t tpm2_checkquote -u mak.pub -m mq.msg -s mq.sig -f mq.pcrs -g sha256 -q "$a"; then
              if t tpm2_checkquote -u mak.pub -m mq.msg -s mq.sig -f mq.pcrs -g sha256 -q "00$a"; then mc=FAIL; d="$d quote=WRONG-NONCE-VERIFIED"
              else d="$d quote=verified"; fi
            else mc=FAIL; d="$d quote=FAIL(rc=$rc $(echo "$out" | tail -n 1))"; fi
          else mc=FAIL; d="$d ak=FAIL(rc=$rc $(echo "$out" | tail -n 1))"; fi
          [ $mc = PASS ] || d="$d dmesg: $(dmesg | grep -i -e tpm -e xenbus | tail -n 6 | tr '\n' ';')"
          echo "GUEST-CMD $n migcheck $mc$d" ;;
        *) echo "GUEST-CMD $n $cmd FAIL unknown command" ;;
      esac
      flush
    fi
    sleep 1
  done
fi
if [ "${hold:-0}" = 1 ]; then echo "GUEST-HOLD waiting for xl destroy"; exec sleep 100000; fi
poweroff -f
