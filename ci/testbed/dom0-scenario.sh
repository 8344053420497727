#!/bin/sh
# dom0 /scenario.sh: the testbed scenario.  Every phase ends with
#   RESULT <phase> PASS|FAIL|SKIPPED <reason>
#   MARK <phase> up=<dom0 uptime>
# and run.sh turns consecutive MARKs into PHASE durations.  Exit 0 iff no FAIL.
# Switches come from the dom0 kernel command line (run.sh sets them):
#   xvtpm_mgr=auto|1|0   auto: xl-vtpm failures => SKIPPED; 1: required; 0: skip phase
#   xvtpm_vtpm=dom0|0    dom0 (default): vtpm-domain as a dom0 process serving tpmif
#                        (`xl-vtpm vtpm create --listen xen:...`), guest boot + reboot + destroy; 0: skip
#   xvtpm_life=1|0       lifecycle phases (xl-vtpm create/watch/reboot/refuse/mgr restart) (1)
#   xvtpm_vtpmdom=1|0    vTPM-domain phases (the vTPM as its own unikernel-style domain,
#                        `xl-vtpm vtpm create --domain`) (1)
#   xvtpm_lifedom=1|0    lifecycle of a guest whose vTPM is its own domain (xl-vtpm create with a vTPM domain backend:
#                        `xl-vtpm create` with vtpm = [ "backend=NAME" ], `xl-vtpm watch`) (1)
#   xvtpm_deadline=S     dom0 uptime by which every wait gives up (run.sh: budget - margin)
export PATH=/usr/lib/xen-4.17/bin:/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
up() { cut -d' ' -f1 /proc/uptime; }
upi() { cut -d. -f1 /proc/uptime; }
# Xen wallclock with microseconds (busybox date has no %N); guests read the same PV clock
wall() { adjtimex | awk '/tv_sec/{s=$2} /tv_usec/{u=$2} END{printf "%d.%06d", s, u}'; }
ms_between() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%d", (b-a)*1000}'; }
# p5_build W0 WALL UP: ms from xl create (W0) to the guest kernel's start (WALL - UP)
p5_build() { awk -v a="$1" -v w="$2" -v u="$3" 'BEGIN{printf "%d", (w-u-a)*1000}'; }
s_between() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }
mark() { echo "MARK $1 up=$(up)"; }
FAILS=""; NPASS=0; NFAIL=0; NSKIP=0
result() {  # phase status reason...
  p=$1; s=$2; shift 2
  echo "RESULT $p $s $*"
  case $s in PASS) NPASS=$((NPASS+1)) ;; FAIL) NFAIL=$((NFAIL+1)); FAILS="$FAILS $p" ;; *) NSKIP=$((NSKIP+1)) ;; esac
  mark "$p"
}
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n1; }
DEADLINE=$(arg xvtpm_deadline); DEADLINE=${DEADLINE:-100000}
# tmo SECONDS: SECONDS, cut to what is left before the scenario deadline (at least 1)
tmo() { _l=$(( DEADLINE - $(upi) )); [ $_l -lt 1 ] && _l=1; [ $1 -lt $_l ] && echo $1 || echo $_l; }
# wait_until SECONDS CMD...: poll every 0.2 s until CMD succeeds; deadline on dom0 uptime
wait_until() {
  _end=$(( $(upi) + $(tmo $1) )); shift
  while ! "$@" >/dev/null 2>&1; do [ "$(upi)" -ge $_end ] && return 1; sleep ${WU_SLEEP:-0.2}; done
}
clog() { echo /var/log/xen/console/guest-$1.log; }
console_has() { grep -qE "$2" "$(clog "$1")" 2>/dev/null; }
console_txt() { tr -d '\r' < "$(clog "$1")" 2>/dev/null; }
# dump_log NAME FILE [LINES]: a log file onto the serial console; run.sh saves it as dom0/NAME.log
dump_log() {
  [ -f "$2" ] || return 0
  echo "LOGDUMP-BEGIN $1 $2 (last ${3:-300} lines)"
  tr -d '\r' < "$2" | tail -n "${3:-300}" | sed 's/^/| /'
  echo "LOGDUMP-END $1"
}
show_console() { [ -f "$(clog "$1")" ] && sed -e 's/\r//' -e "s/^/[$1] /" "$(clog "$1")" | grep -v '^\[.*\] *$' | tail -n "${2:-40}"; }
domain_gone() { ! xl domid "$1" >/dev/null 2>&1; }
modload() {  # load a module and its dependencies (build-time .deps order)
  for m in $(cat /lib/modules/$1.deps 2>/dev/null || echo "$1"); do
    grep -q "^$(echo $m | tr - _) " /proc/modules || insmod /lib/modules/$m.ko || return 1
  done
}
MGR_MODE=$(arg xvtpm_mgr); MGR_MODE=${MGR_MODE:-auto}
VTPM_MODE=$(arg xvtpm_vtpm); VTPM_MODE=${VTPM_MODE:-dom0}; [ "$VTPM_MODE" = 1 ] && VTPM_MODE=dom0
case $VTPM_MODE in 0|dom0) ;; *)
  echo "scenario: xvtpm_vtpm=$VTPM_MODE is not dom0|0 (the old 'domain' experiment is now the vtpmdom-* phases); using dom0"
  VTPM_MODE=dom0 ;;
esac
VTPMDOM_MODE=$(arg xvtpm_vtpmdom); VTPMDOM_MODE=${VTPMDOM_MODE:-1}
echo "scenario: $(cat /etc/xvtpm-testbed.env | tr '\n' ' ') mgr=$MGR_MODE vtpm=$VTPM_MODE vtpmdom=$VTPMDOM_MODE deadline=$DEADLINE"
mkdir -p /run/xen /run/xenstored /var/lib/xen /var/log/xen/console /var/lock /var/log/xvtpm /var/lib/xvtpm /run/xvtpm

############ (a) dom0-up: Xen devices, toolstack, physical TPM device nodes
ph=dom0-up; err=""
for m in xen-privcmd xenfs xen-evtchn xen-gntdev xen-gntalloc; do modload $m || err="$err insmod-$m"; done
mount -t xenfs xenfs /proc/xen || err="$err xenfs"
for d in privcmd evtchn gntdev gntalloc xenbus xenbus_backend; do [ -c /dev/xen/$d ] || err="$err no-/dev/xen/$d"; done
export XENSTORED_ROOTDIR=/run/xenstored
xenstored --pid-file /run/xen/xenstored.pid
wait_until 20 xenstore-read -s / || err="$err xenstored"
xen-init-dom0 >/var/log/xen/xen-init-dom0.log 2>&1 || err="$err xen-init-dom0"
xenconsoled --pid-file=/run/xen/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console || err="$err xenconsoled"
xl info > /tmp/xl-info 2>&1 || err="$err xl-info"
grep -E '^(xen_version|nr_cpus|total_memory|free_memory|xen_caps) ' /tmp/xl-info
wait_until 10 test -c /dev/tpmrm0 || true
ls -l /dev/tpm0 /dev/tpmrm0 2>&1
[ -c /dev/tpm0 ] || err="$err no-/dev/tpm0"
[ -c /dev/tpmrm0 ] || err="$err no-/dev/tpmrm0"
echo "tpm0: TPM $(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null) $(cat /sys/class/tpm/tpm0/device/description 2>/dev/null)"
if [ -z "$err" ]; then result $ph PASS "xen $(sed -n 's/^xen_version *: //p' /tmp/xl-info), toolstack up, /dev/tpm0 + /dev/tpmrm0"
else result $ph FAIL "$err"; fi

############ (b) ptpm: the physical-TPM path from dom0 (tpm2-tools, device TCTI)
ph=ptpm; err=""
export TPM2TOOLS_TCTI=device:/dev/tpmrm0
if r=$(timeout 60 tpm2_getrandom --hex 16 2>&1); then echo "tpm2_getrandom: $r"; else err="$err getrandom($r)"; fi
timeout 60 tpm2_pcrread sha256:0,1,2,3,4,5,6,7 > /tmp/pcrs 2>&1 || err="$err pcrread"
cat /tmp/pcrs
[ "$(grep -cE '^ +[0-7] *: 0x[0-9A-F]{64}' /tmp/pcrs)" = 8 ] || err="$err pcrread-output"
timeout 60 tpm2_getcap properties-fixed 2>/dev/null | grep -A1 -E 'TPM2_PT_(MANUFACTURER|FIRMWARE_VERSION_1):' | grep -E 'raw|value' | tr -s ' \n' ' '; echo
timeout 60 tpm2_getcap properties-variable 2>/dev/null | grep -A4 'TPM2_PT_STARTUP_CLEAR' | tr -s ' \n' ' '; echo
if [ -z "$err" ]; then result $ph PASS "TPM2_GetRandom + PCR read via device:/dev/tpmrm0"; else result $ph FAIL "$err"; fi

############ (c) mgr: vtpmmgr on the physical TPM, xl-vtpm mgr provision/status
MGR_PID=""; MGR_LOG=/dev/null
if [ "$MGR_MODE" = 0 ]; then
  result mgr-serve SKIPPED "disabled (XVTPM_TESTBED_MGR=0)"
  result mgr-cli SKIPPED "disabled (XVTPM_TESTBED_MGR=0)"
elif [ ! -x /usr/bin/vtpmmgr ]; then
  st=SKIPPED; [ "$MGR_MODE" = 1 ] && st=FAIL
  result mgr-serve $st "vtpmmgr not built (target/*/vtpmmgr missing at image build)"
  result mgr-cli $st "needs vtpmmgr"
else
  ph=mgr-serve
  # --xen: it also serves vTPM domains (the vtpmdom-* phases) over tpmif on dom0's backend/vtpm,
  # from the start (libxl gives a backend 10 s to reach InitWait); devices of unattached domains
  # (every dom0-process guest's) it leaves alone
  MGR_LOG=/var/log/xvtpm/vtpmmgr.log
  XVTPM_LOG=${XVTPM_LOG:-info} vtpmmgr --tcti device:/dev/tpmrm0 --state-dir /var/lib/xvtpm --run-dir /run/xvtpm serve --xen \
      > $MGR_LOG 2>&1 &
  MGR_PID=$!
  mgr_ready() { grep -q '"ready":true' /var/log/xvtpm/vtpmmgr.log || ! kill -0 $MGR_PID; }
  wait_until 120 mgr_ready
  if grep -q '"ready":true' /var/log/xvtpm/vtpmmgr.log && kill -0 $MGR_PID 2>/dev/null; then
    tail -n 5 /var/log/xvtpm/vtpmmgr.log | sed 's/^/[vtpmmgr] /'
    ls -l /run/xvtpm 2>&1 | sed 's/^/[vtpmmgr] /'
    result $ph PASS "vtpmmgr serve --xen ready on device:/dev/tpmrm0 (pid $MGR_PID)"
  else
    tail -n 30 /var/log/xvtpm/vtpmmgr.log | sed 's/^/[vtpmmgr] /'
    result $ph FAIL "vtpmmgr serve not ready within 120 s (alive: $(kill -0 $MGR_PID 2>/dev/null && echo yes || echo no))"
    MGR_PID=""
  fi

  ph=mgr-cli; why=""
  if [ -z "$MGR_PID" ]; then why="vtpmmgr serve is not running"
  elif [ ! -x /usr/bin/xl-vtpm ]; then why="xl-vtpm not built"
  else
    timeout 120 xl-vtpm mgr provision --yes > /tmp/prov.out 2>&1; prc=$?
    sed 's/^/[xl-vtpm provision] /' /tmp/prov.out | tail -n 20
    timeout 60 xl-vtpm mgr status --json > /tmp/status.json 2>/tmp/status.err; src=$?
    sed 's/^/[xl-vtpm status] /' /tmp/status.json /tmp/status.err | tail -n 30
    if [ $prc != 0 ]; then why="xl-vtpm mgr provision --yes exited $prc"
    elif [ $src != 0 ]; then why="xl-vtpm mgr status --json exited $src"
    elif ! tr -d ' \t\n' < /tmp/status.json | grep -q '^{.*}$'; then
      why="xl-vtpm mgr status --json printed no JSON object (CLI not implemented yet?)"
    fi
  fi
  if [ -z "$why" ]; then result $ph PASS "provisioned; status --json returned an object"
  elif [ "$MGR_MODE" = 1 ]; then result $ph FAIL "$why"
  else result $ph SKIPPED "$why (XVTPM_TESTBED_MGR=1 makes this required)"; fi
fi

############ (d) guest: a PV domU with the guest initramfs, loads xen-tpmfront, powers off.
# Also the P5 baseline: xl create -> first line of the guest's /init, without a vTPM.
ph=guest; err=""
t0=$(up); w0=$(wall)
timeout $(tmo 180) xl create /etc/xen/guest1.cfg > /tmp/xl-guest1.out 2>&1 || err="$err xl-create-rc=$?"
echo "xl create guest1: $(s_between $t0 $(up)) s"
[ -n "$err" ] && tail -n 20 /tmp/xl-guest1.out
if [ -z "$err" ]; then
  wait_until 180 console_has guest1 'GUEST-DONE' || err="$err no-GUEST-DONE-in-180s"
  console_has guest1 'GUEST-DONE role=plain .*result=ok' || err="$err guest-result"
  wait_until 60 domain_gone guest1 || { err="$err guest-did-not-power-off"; timeout 60 xl destroy guest1; }
fi
show_console guest1 20 | grep -E 'GUEST-|Kernel panic|Oops|segfault'
gw=$(console_txt guest1 | sed -n 's/^GUEST-UP .* wall=\([0-9.]*\) up=\([0-9.]*\).*/\1 \2/p' | head -n1)
if [ -n "$gw" ]; then
  echo "PERF p5-without-vtpm-ms=$(ms_between $w0 ${gw% *}) (xl create -> first line of /init: domain build+start $(p5_build $w0 ${gw% *} ${gw#* }) ms, kernel to init $(ms_between 0 ${gw#* }) ms)"
fi
if [ -z "$err" ]; then result $ph PASS "PV domU booted, xen-tpmfront loaded, powered off (create->gone $(s_between $t0 $(up)) s)"
else show_console guest1 60; result $ph FAIL "$err"; fi

############ (e) vtpm: vtpm-domain as a dom0 process serving tpmif v2; guest boot, reboot, destroy
VTPM_UUID=""; VTPM_PID=""; VLOG=""; EK1=""
GCFG=/etc/xen/guest-vtpm.cfg
# guest_checks NAME BOOT EXPECTED...: echo the guest's GUEST-CHECK lines as CHECK lines; sets $gerr
guest_checks() {
  _g=$1; _b=$2; shift 2; gerr=""
  console_txt $_g | sed -n "s|^GUEST-CHECK |CHECK $_g/boot$_b |p"
  for c in "$@"; do
    console_txt $_g | grep -qE "^GUEST-CHECK $c PASS" || gerr="$gerr $c"
  done
  console_txt $_g | grep -q '^GUEST-DONE .*result=ok' || gerr="$gerr guest-result"
}
write_gcfg() {  # extra-words
  sed -e "s/@UUID@/$VTPM_UUID/" -e "s/@EXTRA@/$1/" /etc/xen/guest-vtpm.cfg.in > $GCFG
}
# p5_vtpm KEY [GUEST]: xl create (w0) -> first answered TPM command (tpm2_getrandom) in GUEST (guest-vtpm)
p5_vtpm() {
  _g=${2:-guest-vtpm}
  _a=$(console_txt $_g | sed -n 's/^GUEST-P5 first-tpm-answer wall=\([0-9.]*\) up=\([0-9.]*\).*/\1 \2/p' | head -n1)
  _i=$(console_txt $_g | sed -n 's/^GUEST-UP .* wall=\([0-9.]*\) up=\([0-9.]*\).*/\1 \2/p' | head -n1)
  [ -n "$_a" ] && [ -n "$_i" ] || { echo "PERF $1=n/a (no GUEST-P5 marker)"; return; }
  echo "PERF $1=$(ms_between $w0 ${_a% *}) (xl create -> first answered tpm2_getrandom: domain build+start $(p5_build $w0 ${_i% *} ${_i#* }) ms, kernel to init $(ms_between 0 ${_i#* }) ms, init to TPM answer $(ms_between ${_i#* } ${_a#* }) ms incl. insmod xen-tpmfront + probe + tpm2_startup)"
  console_txt $_g | sed -n "s/^GUEST-INFO /INFO $_g /p"
}
kib() { awk -v k="$1:" '$1==k{print $2}' /proc/$VTPM_PID/smaps_rollup 2>/dev/null; }
vtpm_exited() { [ ! -e /proc/$VTPM_PID/stat ] || sed 's/.*) //' /proc/$VTPM_PID/stat | grep -q '^Z'; }

if [ "$VTPM_MODE" = 0 ]; then
  for p in vtpm-create vtpm-guest deep-quote host-eventlog attest-service vtpm-reboot vtpm-destroy; do result $p SKIPPED "disabled (XVTPM_TESTBED_VTPM=0)"; done
else
  ##### vtpm-create: identity in the manager + vtpm-domain process bound to backend/vtpm
  ph=vtpm-create; err=""
  if [ -z "$MGR_PID" ] || ! grep -q '"provisioned": *true' /tmp/status.json 2>/dev/null; then err="needs a provisioned vtpmmgr (mgr phases)"
  elif [ ! -x /usr/bin/vtpm-domain ]; then err="vtpm-domain not built"
  else
    t0=$(up)
    XVTPM_LOG=info NO_COLOR=1 timeout $(tmo 90) xl-vtpm vtpm create --listen xen:/local/domain/0/backend/vtpm --json \
      > /tmp/vtpm-create.json 2> /tmp/vtpm-create.err; rc=$?
    echo "xl-vtpm vtpm create: rc=$rc in $(s_between $t0 $(up)) s"
    sed 's/^/[vtpm create] /' /tmp/vtpm-create.json /tmp/vtpm-create.err | tail -n 40
    VTPM_UUID=$(sed -n 's/^ *"uuid": *"\([0-9a-fA-F-]*\)".*/\1/p' /tmp/vtpm-create.json | head -n1)
    VTPM_PID=$(sed -n 's/^ *"pid": *\([0-9][0-9]*\).*/\1/p' /tmp/vtpm-create.json | head -n1)
    VLOG=/var/lib/xvtpm/vtpms/$VTPM_UUID/vtpm.log
    if [ $rc != 0 ]; then err="xl-vtpm vtpm create exited $rc"
    elif [ -z "$VTPM_UUID" ] || [ -z "$VTPM_PID" ]; then err="no uuid/pid in the --json output"
    elif ! wait_until 30 grep -q 'tpmif backend watching' $VLOG; then err="no 'tpmif backend watching' in $VLOG within 30 s"
    elif vtpm_exited; then err="vtpm-domain (pid $VTPM_PID) is not running"
    else
      # least privilege in dom0-process mode too: its own uid, no-new-privileges, seccomp
      _st=$(grep -E '^(Uid|NoNewPrivs|Seccomp):' /proc/$VTPM_PID/status | tr -s '\t ' ' ' | tr '\n' ' ')
      if echo "$_st" | grep -qE '^Uid: 0 ' || ! echo "$_st" | grep -q 'NoNewPrivs: 1' || ! echo "$_st" | grep -q 'Seccomp: 2'; then
        echo "CHECK dom0 vtpm-sandboxed FAIL $_st"; err="vtpm-domain is not sandboxed: $_st"
      else echo "CHECK dom0 vtpm-sandboxed PASS $_st"; fi
    fi
    [ -f "$VLOG" ] && tail -n 5 "$VLOG" | sed 's/^/[vtpm.log] /'
    echo "PERF vtpm-create-s=$(s_between $t0 $(up))"
    [ -n "$VTPM_PID" ] && echo "PERF vtpm-idle-pss-kib=$(kib Pss) vtpm-idle-rss-kib=$(kib Rss)"
  fi
  if [ -z "$err" ]; then result $ph PASS "vTPM $VTPM_UUID, vtpm-domain pid $VTPM_PID, tpmif backend watching /local/domain/0/backend/vtpm"
  else result $ph FAIL "$err"; VTPM_UUID=""; fi

  ##### vtpm-guest: boot 1 of a guest with vtpm = [ "backend=0,uuid=..." ]
  ph=vtpm-guest; err=""; DQ_NONCE=""
  if [ -z "$VTPM_UUID" ]; then err="no vTPM (vtpm-create failed)"
  else
    DQ_NONCE=$(head -c 32 /dev/urandom | xxd -p -c 64)
    write_gcfg "boot=1 dq_nonce=$DQ_NONCE"
    grep -E '^(name|vtpm|extra)' $GCFG
    t0=$(up); w0=$(wall)
    timeout $(tmo 120) xl create $GCFG > /tmp/xl-guest-vtpm1.out 2>&1 || { err="$err xl-create-rc=$?"; tail -n 20 /tmp/xl-guest-vtpm1.out; }
    echo "xl create guest-vtpm (boot 1): $(s_between $t0 $(up)) s"
    if [ -z "$err" ]; then
      xl vtpm-list guest-vtpm 2>&1
      wait_until 400 console_has guest-vtpm 'GUEST-DONE' || err="$err no-GUEST-DONE-in-400s"
      guest_checks guest-vtpm 1 tpm0 startup getrandom pcr16-reset pcrextend createek createak quote checkquote persistent nv-write deep-quote
      [ -n "$gerr" ] && err="$err guest-checks-failed:$gerr"
      p5_vtpm p5-with-vtpm-ms
      EK1=$(console_txt guest-vtpm | sed -n 's/^GUEST-EKHASH //p' | head -n1)
      # the deep-quote bundle, hex on the guest console
      console_txt guest-vtpm | sed -n 's/^GUEST-DQ \([0-9a-f]*\)$/\1/p' | xxd -r -p > /tmp/dq.bin
      want=$(console_txt guest-vtpm | sed -n 's/^GUEST-DQ-END sha256=\([0-9a-f]*\).*/\1/p' | head -n1)
      got=$(sha256sum /tmp/dq.bin | cut -c1-64)
      echo "deep-quote bundle from the guest console: $(wc -c < /tmp/dq.bin) bytes sha256=$got (guest said ${want:-none})"
      [ -n "$want" ] && [ "$want" = "$got" ] || { err="$err dq-capture"; rm -f /tmp/dq.bin; }
      wait_until 60 domain_gone guest-vtpm || { err="$err guest-did-not-power-off"; timeout $(tmo 60) xl destroy guest-vtpm; }
      vtpm_exited && err="$err vtpm-domain-died"
    fi
    show_console guest-vtpm 200 | grep -vE 'GUEST-DQ |GUEST-CHECK' | grep -E 'GUEST-|panic|Oops|tpm|TPM' | tail -n 30
    mv "$(clog guest-vtpm)" /var/log/xen/console/guest-guest-vtpm-boot1.log 2>/dev/null
  fi
  [ -z "$err" ] && result $ph PASS "boot 1: all guest checks passed on /dev/tpm0 (TPM 2.0 behind stock xen-tpmfront)" || { result $ph FAIL "$err"; }

  ##### deep-quote: verify the bundle in dom0 with the group AK
  # Here the AK is not enrolled (`xl-vtpm enroll`, docs/enrollment.md; attest-service enrolls it
  # through the service from the vendor root): verify takes the raw AK with --insecure-unenrolled-ak.
  # No host PCR policy is given either, so a bundle that verifies exits 8 (host state not
  # checked), never 0; a bundle that does not verify exits 7.
  ph=deep-quote; err=""
  if [ ! -s /tmp/dq.bin ]; then err="no bundle from the guest"
  elif ! timeout $(tmo 60) xl-vtpm mgr group ak default --out /tmp/ak.bin > /tmp/ak.out 2>&1; then err="xl-vtpm mgr group ak default failed: $(tail -n 3 /tmp/ak.out)"
  else
    timeout $(tmo 60) xl-vtpm verify /tmp/dq.bin --nonce $DQ_NONCE --ak /tmp/ak.bin --insecure-unenrolled-ak --vtpm $VTPM_UUID > /tmp/verify-ok.out 2>&1; rc_ok=$?
    sed 's/^/[verify right nonce] /' /tmp/verify-ok.out | tail -n 25
    BAD=$(head -c 32 /dev/urandom | xxd -p -c 64)
    timeout $(tmo 60) xl-vtpm verify /tmp/dq.bin --nonce $BAD --ak /tmp/ak.bin --insecure-unenrolled-ak --vtpm $VTPM_UUID > /tmp/verify-bad.out 2>&1; rc_bad=$?
    sed 's/^/[verify wrong nonce] /' /tmp/verify-bad.out | tail -n 10
    OTHER=00000000-0000-4000-8000-000000000001
    timeout $(tmo 60) xl-vtpm verify /tmp/dq.bin --nonce $DQ_NONCE --ak /tmp/ak.bin --insecure-unenrolled-ak --vtpm $OTHER > /tmp/verify-uuid.out 2>&1; rc_uuid=$?
    sed 's/^/[verify other vTPM] /' /tmp/verify-uuid.out | tail -n 5
    echo "CHECK dom0 verify-other-vtpm $([ $rc_uuid = 7 ] && echo PASS || echo FAIL) exit=$rc_uuid (want 7: bundle is bound to $VTPM_UUID)"
    [ $rc_uuid = 7 ] || err="$err verify-with-other-vtpm-uuid-exit-$rc_uuid(want-7)"
    echo "CHECK dom0 verify-right-nonce $([ $rc_ok = 8 ] && echo PASS || echo FAIL) exit=$rc_ok (want 8: verified, host state not checked)"
    echo "CHECK dom0 verify-wrong-nonce $([ $rc_bad = 7 ] && echo PASS || echo FAIL) exit=$rc_bad (want 7)"
    [ $rc_ok = 8 ] || err="$err verify-with-right-nonce-exit-$rc_ok(want-8)"
    [ $rc_bad = 7 ] || err="$err verify-with-wrong-nonce-exit-$rc_bad(want-7)"
  fi
  [ -z "$err" ] && result $ph PASS "xl-vtpm verify: right nonce -> 8 (verified, host unchecked), wrong nonce -> 7 ($(wc -c < /tmp/dq.bin) byte bundle)" || { result $ph FAIL "$err"; }

  ##### host-eventlog: dom0's measured-boot event log (SeaBIOS measured the boot into QEMU's TPM)
  # against the host PCRs of the guest's deep quote (docs/eventlog.md): export -> policy -> verify
  # --event-log ... --event-log-policy ... exits 0; one event digest changed -> 7.
  ph=host-eventlog; err=""
  BBM=/sys/kernel/security/tpm0/binary_bios_measurements
  grep -q ' /sys/kernel/security securityfs ' /proc/mounts || mount -t securityfs none /sys/kernel/security || err="mount-securityfs"
  if [ -z "$err" ] && [ ! -f $BBM ]; then
    ls -lR /sys/kernel/security 2>&1 | sed 's/^/[securityfs] /'
    dmesg | grep -iE 'tpm|tcpa|event log' | tail -n 30 | sed 's/^/[dmesg] /'
    T=/sys/firmware/acpi/tables/TPM2
    why="ACPI TPM2 table $(wc -c < $T 2>/dev/null || echo missing) bytes, LAML/LASA: $(od -A d -t x1 -j 64 -N 12 $T 2>/dev/null | head -n1)"
    echo "CHECK dom0 bios-measurements FAIL $why"
    err="no $BBM ($why)"
  elif [ -z "$err" ]; then
    EL=/tmp/host-eventlog.bin; ELBAD=/tmp/host-eventlog-mutated.bin; ELP=/tmp/host-eventlog-policy.json
    if ! timeout $(tmo 60) xl-vtpm eventlog export --out $EL > /tmp/eventlog-export.out 2>&1; then err="xl-vtpm eventlog export failed: $(tail -n 3 /tmp/eventlog-export.out)"
    elif ! timeout $(tmo 60) xl-vtpm eventlog policy $EL --replay 0-7 --out $ELP > /tmp/eventlog-policy.out 2>&1; then err="xl-vtpm eventlog policy failed: $(tail -n 3 /tmp/eventlog-policy.out)"
    elif [ ! -s /tmp/dq.bin ] || [ -z "$VTPM_UUID" ]; then err="no deep quote from the guest (vtpm-guest) to check the log against"
    elif [ ! -s /tmp/ak.bin ] && ! timeout $(tmo 60) xl-vtpm mgr group ak default --out /tmp/ak.bin > /tmp/ak.out 2>&1; then err="xl-vtpm mgr group ak default failed: $(tail -n 3 /tmp/ak.out)"
    else
      cat /tmp/eventlog-export.out /tmp/eventlog-policy.out
      timeout $(tmo 60) xl-vtpm verify /tmp/dq.bin --nonce $DQ_NONCE --ak /tmp/ak.bin --insecure-unenrolled-ak --vtpm $VTPM_UUID --event-log $EL --event-log-policy $ELP > /tmp/verify-eventlog.out 2>&1; rc_el=$?
      sed 's/^/[verify event log] /' /tmp/verify-eventlog.out | tail -n 10
      echo "CHECK dom0 eventlog-verify $([ $rc_el = 0 ] && echo PASS || echo FAIL) exit=$rc_el (want 0: the log replays to the quoted host PCRs 0-7 and the policy allows it)"
      [ $rc_el = 0 ] || err="$err eventlog-verify"
      # one event of PCR 0-7 (not EV_NO_ACTION) whose digest occurs once in the file: flip its first byte
      timeout $(tmo 60) xl-vtpm --json eventlog show $EL 2>/dev/null | tr -d ' \n' | sed 's/},{/}\n{/g' > /tmp/eventlog-events
      HEX=$(xxd -p $EL | tr -d '\n'); pos=""
      ejf() { sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\).*/\1/p" | head -n1; }
      while read -r ev; do
        p=$(echo "$ev" | ejf pcr); t=$(echo "$ev" | ejf type); d=$(echo "$ev" | ejf sha256)
        case "$t" in *NO_ACTION*) continue ;; esac
        [ -n "$d" ] && [ "${#d}" = 64 ] && [ "$p" -le 7 ] 2>/dev/null || continue
        pos=$(awk -v h="$HEX" -v d="$d" 'BEGIN{n=0; s=h; off=0; while ((i=index(s,d))>0) { if ((off+i)%2==1) { n++; at=off+i } off+=i; s=substr(h,off+1) } if (n==1) print at}')
        [ -n "$pos" ] && { echo "mutated log: event PCR $p $t sha256 $d, first digest byte flipped"; break; }
      done < /tmp/eventlog-events
      if [ -z "$pos" ]; then echo "CHECK dom0 eventlog-mutated FAIL no event in PCR 0-7 with a unique digest"; err="$err eventlog-mutated"
      else
        b=$(echo "$HEX" | cut -c$pos-$((pos+1))); nb=$(printf '%02x' $(( 0x$b ^ 1 )))
        echo "$HEX" | awk -v p=$pos -v nb=$nb '{print substr($0,1,p-1) nb substr($0,p+2)}' | xxd -r -p > $ELBAD
        timeout $(tmo 60) xl-vtpm verify /tmp/dq.bin --nonce $DQ_NONCE --ak /tmp/ak.bin --insecure-unenrolled-ak --vtpm $VTPM_UUID --event-log $ELBAD --event-log-policy $ELP > /tmp/verify-eventlog-bad.out 2>&1; rc_elb=$?
        sed 's/^/[verify mutated log] /' /tmp/verify-eventlog-bad.out | tail -n 10
        ok=FAIL; [ $rc_elb = 7 ] && grep -q 'event log' /tmp/verify-eventlog-bad.out && ok=PASS
        echo "CHECK dom0 eventlog-mutated $ok exit=$rc_elb (want 7, naming the host event log)"
        [ $ok = PASS ] || err="$err eventlog-mutated"
      fi
    fi
  fi
  [ -z "$err" ] && result $ph PASS "$(sed -n 's/.*(\([0-9]*\) events.*/\1/p' /tmp/eventlog-export.out)-event host log: verify with its policy -> 0; one event digest changed -> 7" || { result $ph FAIL "$err"; }

  ##### attest-service: the tenant's end-to-end attestation through the provider's service
  # xvtpm-attestd on 127.0.0.1 (port 0: the kernel picks a free one, the service prints it) with a
  # service certificate and a tenant CA made here (openssl); tenant alice registered and bound to
  # the vTPM of vtpm-guest; alice's `xl-vtpm attest` starts from nothing but the vendor root (the
  # CA that certified the host TPM's EK, build-images.sh) and the event-log policy of host-eventlog:
  # exit 0 with the verified deep quote. Tenant bob asking for alice's vTPM: exit 6 (403), the
  # same answer as for a vTPM that does not exist; a wrong vendor root: exit 7 naming the EK chain.
  ph=attest-service; err=""; ATT_PID=""; P=/tmp/attest; ATT_LOG=/var/log/xvtpm/attestd.log
  ossl() { OPENSSL_CONF=/etc/ssl/openssl.cnf timeout $(tmo 30) openssl "$@" >> $P/openssl.log 2>&1; }
  att_ca() {  # NAME CN: a self-signed P-256 CA
    ossl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $P/$1.key -out $P/$1.pem -days 2 \
      -subj "/CN=$2" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
  }
  att_leaf() {  # NAME CA CN EXT [EXT]: a P-256 leaf issued by CA (one openssl run)
    ossl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $P/$1.key -out $P/$1.pem -days 2 \
      -CA $P/$2.pem -CAkey $P/$2.key -set_serial 0x$(head -c 8 /dev/urandom | xxd -p) -subj "/CN=$3" \
      -addext basicConstraints=critical,CA:FALSE -addext keyUsage=critical,digitalSignature -addext "$4" ${5:+-addext "$5"}
  }
  att_ready() { grep -q '"ready":true' $P/attestd.out || ! kill -0 $ATT_PID; }
  # att_run TAG CERT STORE EK-CA VTPM [ARGS...]: xl-vtpm attest as a tenant; rc in $arc, output in $P/TAG.out
  att_run() {
    _t=$1; _c=$2; _s=$3; _r=$4; _v=$5; shift 5
    timeout $(tmo 120) xl-vtpm --json attest --service https://127.0.0.1:$ATT_PORT --cert $P/$_c.pem --key $P/$_c.key \
      --service-ca $P/service-ca.pem --ek-ca $_r --trust-store $P/$_s --vtpm $_v "$@" > $P/$_t.out 2>&1; arc=$?
    sed "s/^/[attest $_t] /" $P/$_t.out | tail -n 60
  }
  t0=$(up)
  if [ -z "$VTPM_UUID" ] || vtpm_exited; then err="no running vTPM (vtpm-create)"
  elif [ ! -s "$ELP" ] || [ ! -f $BBM ]; then err="no host event log policy (host-eventlog)"
  elif [ ! -x /usr/bin/xvtpm-attestd ] || [ ! -x /usr/bin/openssl ]; then err="xvtpm-attestd or openssl missing from dom0's image"
  elif [ ! -s /etc/xvtpm-testbed/vendor-root.pem ]; then err="no vendor root (build-images.sh manufactures the host TPM)"
  else
    rm -rf $P; mkdir -p $P
    att_ca service-ca "testbed provider service CA" && att_ca tenant-ca "testbed provider tenant CA" &&
      att_ca other-vendor "not the host TPM's vendor" &&
      att_leaf server service-ca xvtpm-attestd extendedKeyUsage=serverAuth subjectAltName=IP:127.0.0.1,DNS:localhost &&
      att_leaf alice tenant-ca alice extendedKeyUsage=clientAuth && att_leaf bob tenant-ca bob extendedKeyUsage=clientAuth ||
      err="openssl: $(tail -n 3 $P/openssl.log)"
  fi
  if [ -z "$err" ]; then
    for t in "tenant add alice --cert $P/alice.pem" "tenant bind alice $VTPM_UUID" "tenant add bob --cert $P/bob.pem"; do
      timeout $(tmo 30) xl-vtpm $t > $P/tenant.out 2>&1; trc=$?
      sed 's/^/[xl-vtpm tenant] /' $P/tenant.out
      [ $trc = 0 ] || { err="xl-vtpm $t: exit $trc: $(tail -n 2 $P/tenant.out)"; break; }
    done
  fi
  if [ -z "$err" ]; then
    XVTPM_LOG=info xvtpm-attestd --listen 127.0.0.1:0 --cert $P/server.pem --key $P/server.key --tenant-ca $P/tenant-ca.pem \
      --ek-intermediate /etc/xvtpm-testbed/vendor-intermediate.pem > $P/attestd.out 2> $ATT_LOG &
    ATT_PID=$!
    wait_until 30 att_ready
    ATT_PORT=$(sed -n 's/.*"listen":"[^"]*:\([0-9][0-9]*\)".*/\1/p' $P/attestd.out | head -n1)
    if [ -z "$ATT_PORT" ] || ! kill -0 $ATT_PID 2>/dev/null; then err="xvtpm-attestd not ready: $(cat $P/attestd.out; tail -n 5 $ATT_LOG)"
    else echo "xvtpm-attestd ready on 127.0.0.1:$ATT_PORT (pid $ATT_PID): $(cat $P/attestd.out)"; fi
  fi
  if [ -z "$err" ]; then
    # 1. alice, from nothing but the vendor root and her event-log policy: enroll, quote, verify -> 0
    cp $ELP $P/alice-host-policy.json
    att_run alice alice alice-store /etc/xvtpm-testbed/vendor-root.pem $VTPM_UUID --event-log-policy $P/alice-host-policy.json --save $P/alice-evidence
    # one read of the answer, matched in the shell (every extra process costs seconds on a loaded host)
    J=$(tr -d ' \n' < $P/alice.out); ok=FAIL
    case "$J" in *enrolledhost*throughtheservice*) case "$J" in *'"verified":true'*) case "$J" in *'"host_state_checked":true'*)
      case "$J" in *'"event_log":{"events":'[1-9]*) case "$J" in *"\"vtpm\":\"$VTPM_UUID\""*) [ $arc = 0 ] && ok=PASS ;; esac ;; esac ;; esac ;; esac ;; esac
    echo "CHECK dom0 attest-tenant $ok exit=$arc (want 0: host enrolled through the service from the vendor root, event log replayed under the policy, deep quote of $VTPM_UUID verified)"
    [ $ok = PASS ] || err="$err attest-tenant-exit-$arc"
    # 2. bob (registered, owns no vTPM) asks for alice's vTPM and for one that does not exist: the
    # same 403 (exit 6). He gets a copy of alice's trust store (the host's public AKs), so both
    # answers start past enrollment and differ in nothing but the UUID asked for.
    cp -a $P/alice-store $P/bob-store
    NOSUCH=00000000-0000-4000-8000-0000000000aa
    att_run bob bob bob-store /etc/xvtpm-testbed/vendor-root.pem $VTPM_UUID; rc_bob=$arc
    att_run bob-missing bob bob-store /etc/xvtpm-testbed/vendor-root.pem $NOSUCH; rc_miss=$arc
    ok=FAIL
    [ $rc_bob = 6 ] && [ $rc_miss = 6 ] && grep -q 'HTTP 403' $P/bob.out &&
      [ "$(sed "s/$VTPM_UUID/UUID/g" $P/bob.out)" = "$(sed "s/$NOSUCH/UUID/g" $P/bob-missing.out)" ] && ok=PASS
    echo "CHECK dom0 attest-other-tenant $ok exit=$rc_bob, nonexistent vTPM exit=$rc_miss (want 6 and 6, the same 403 answer)"
    [ $ok = PASS ] || err="$err attest-other-tenant-exit-$rc_bob"
    # 3. alice with a wrong vendor root and an empty trust store: exit 7 naming the EK chain, nothing pinned
    att_run wrong-root alice wrong-root-store $P/other-vendor.pem $VTPM_UUID --event-log-policy $P/alice-host-policy.json
    ok=FAIL
    [ $arc = 7 ] && grep -q 'EK certificate chain' $P/wrong-root.out && [ -z "$(ls -A $P/wrong-root-store 2>/dev/null)" ] && ok=PASS
    echo "CHECK dom0 attest-wrong-vendor-root $ok exit=$arc (want 7 naming the EK certificate chain; nothing pinned)"
    [ $ok = PASS ] || err="$err attest-wrong-vendor-root-exit-$arc"
  fi
  if [ -n "$ATT_PID" ]; then
    kill $ATT_PID 2>/dev/null; wait_until 10 sh -c "! kill -0 $ATT_PID" || { err="$err attestd-did-not-exit"; kill -9 $ATT_PID; }
    tail -n 5 $ATT_LOG | sed 's/^/[attestd] /'
  fi
  echo "PERF attest-service-s=$(s_between $t0 $(up))"
  [ -z "$err" ] && result $ph PASS "xvtpm-attestd (mutual TLS): tenant attest from the vendor root + event-log policy -> 0; another tenant's vTPM -> 6 (403, same as a missing one); wrong vendor root -> 7 (EK certificate chain)" || { result $ph FAIL "$err"; }

  ##### vtpm-reboot: the same guest config again (new domain, same vTPM): state kept, PCRs reset
  ph=vtpm-reboot; err=""
  if [ -z "$VTPM_UUID" ]; then err="no vTPM"
  elif vtpm_exited; then err="vtpm-domain (pid $VTPM_PID) is gone"
  else
    domain_gone guest-vtpm || timeout $(tmo 60) xl destroy guest-vtpm
    write_gcfg "boot=2 hold=1"
    t0=$(up); w0=$(wall)
    timeout $(tmo 120) xl create $GCFG > /tmp/xl-guest-vtpm2.out 2>&1 || { err="$err xl-create-rc=$?"; tail -n 20 /tmp/xl-guest-vtpm2.out; }
    echo "xl create guest-vtpm (boot 2): $(s_between $t0 $(up)) s, domid $(xl domid guest-vtpm 2>&1)"
    if [ -z "$err" ]; then
      wait_until 180 console_has guest-vtpm 'GUEST-DONE' || err="$err no-GUEST-DONE-in-180s"
      guest_checks guest-vtpm 2 tpm0 startup getrandom pcr16-reset pcrextend createek persistent-kept persistent-usable nv-kept
      [ -n "$gerr" ] && err="$err guest-checks-failed:$gerr"
      EK2=$(console_txt guest-vtpm | sed -n 's/^GUEST-EKHASH //p' | head -n1)
      if [ -n "$EK1" ] && [ "$EK1" = "$EK2" ]; then echo "CHECK dom0 ek-stable PASS EK sha256 $(echo $EK1 | cut -c1-16)... in both boots"
      else echo "CHECK dom0 ek-stable FAIL boot1=${EK1:-none} boot2=${EK2:-none}"; err="$err ek-changed"; fi
      p5_vtpm p5-with-vtpm-reboot-ms
      echo "PERF vtpm-pss-kib=$(kib Pss) vtpm-rss-kib=$(kib Rss) (vtpm-domain pid $VTPM_PID serving a connected guest)"
    fi
    show_console guest-vtpm 200 | grep -vE 'GUEST-CHECK' | grep -E 'GUEST-|panic|Oops|tpm|TPM' | tail -n 20
  fi
  [ -z "$err" ] && result $ph PASS "boot 2: 0x81000010 persistent key + NV index kept, PCR16 reset, same EK" || { result $ph FAIL "$err"; }

  ##### vtpm-destroy: xl destroy; vtpm-domain keeps running; xl-vtpm vtpm stop ends it
  ph=vtpm-destroy; err=""
  if [ -z "$VTPM_UUID" ]; then err="no vTPM"
  else
    if ! domain_gone guest-vtpm; then
      domid=$(xl domid guest-vtpm)
      timeout $(tmo 60) xl destroy guest-vtpm || err="$err xl-destroy-rc=$?"
      wait_until 30 domain_gone guest-vtpm || err="$err guest-still-there"
      sleep 2
      echo "backend after xl destroy: $(xenstore-ls -f /local/domain/0/backend/vtpm 2>&1 | grep "/vtpm/$domid/" | tr '\n' ' ' | cut -c1-300)"
    fi
    if vtpm_exited; then err="$err vtpm-domain-exited-on-guest-destroy"; echo "CHECK dom0 vtpm-survives-destroy FAIL"
    else echo "CHECK dom0 vtpm-survives-destroy PASS pid $VTPM_PID still running"; fi
    t0=$(up)
    timeout $(tmo 30) xl-vtpm vtpm stop $VTPM_UUID > /tmp/vtpm-stop.out 2>&1; rc=$?
    sed 's/^/[vtpm stop] /' /tmp/vtpm-stop.out
    [ $rc = 0 ] || err="$err vtpm-stop-exit-$rc"
    if wait_until 10 vtpm_exited; then echo "CHECK dom0 vtpm-stop PASS pid $VTPM_PID gone after $(s_between $t0 $(up)) s"
    else echo "CHECK dom0 vtpm-stop FAIL pid $VTPM_PID still alive"; err="$err vtpm-domain-still-running"; kill -9 $VTPM_PID; fi
    timeout $(tmo 30) xl-vtpm vtpm list 2>&1 | sed 's/^/[vtpm list] /'
    tail -n 8 "$VLOG" | sed 's/^/[vtpm.log] /'
  fi
  [ -z "$err" ] && result $ph PASS "guest destroyed, vtpm-domain survived it; xl-vtpm vtpm stop ended the process" || { result $ph FAIL "$err"; }

fi

############ (e2) lifecycle: xl-vtpm create of xen-configs/guest.cfg, `xl-vtpm watch`
# couples the vTPM process to the guest. One RESULT per step:
#   life-watch       `xl-vtpm watch` runs in the background (@releaseDomain)
#   life-create      `xl-vtpm create /etc/xen/life-a.cfg` (vtpm = [ "backend=0" ], no uuid): list --json
#                    says running with a vtpm_pid; the guest writes 0x81000010 + NV on the fresh vTPM
#   life-xl-destroy  plain `xl destroy`: the watcher stops the vTPM process within 2 s; list says stopped
#   life-recreate    the same config again: same vTPM UUID, 0x81000010 + NV still there, same EK
#   life-reboot      `xl-vtpm reboot`: same vTPM pid, state kept, PCR 16 reset, registry domid follows
#   life-refuse-b    guest B with vtpm = [ "backend=0,uuid=<A's vTPM>" ] is refused naming life-a;
#                    no domain, `xl-vtpm list` unchanged
#   life-mgr-restart vtpmmgr SIGTERM + restart; `xl-vtpm destroy` + `xl-vtpm create` of A: the vTPM
#                    comes back on the new manager, state kept, same EK (INFO: the running pair right
#                    after the restart, getrandom + deep quote from the guest)
#   life-registry    `xl-vtpm registry check` clean with A running and after `xl-vtpm destroy`; the
#                    watcher is stopped
# Timestamps: watch.log lines and the INFO timeline lines carry the Xen wallclock (the clock of
# vtpm.log's UTC timestamps).
LIFE_MODE=$(arg xvtpm_life); LIFE_MODE=${LIFE_MODE:-1}
LCFG0=/etc/xen/life-a.cfg; LCFG=$LCFG0
WATCH_PID=""; LUUID=""; LPID=""; LEK=""; LOFF=0; LGUEST_UUID=""; LVLOG=/dev/null; LNAME=life-a
WLOG=/var/log/xvtpm/watch.log
# pid_up PID: the process exists and is not a zombie (no forks: the destroy timing polls it)
pid_up() { [ -n "$1" ] && [ -e /proc/$1/stat ] && read -r _st 2>/dev/null < /proc/$1/stat || return 1; case $_st in *") Z "*) return 1 ;; esac; return 0; }
pid_down() { ! pid_up "$1"; }
lines_of() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }
# lcon NAME OFF: guest console after line OFF (this boot only)
lcon() { tail -n +$(( $2 + 1 )) "$(clog $1)" 2>/dev/null | tr -d '\r'; }
lcon_has() { lcon "$1" "$2" | grep -qE "$3"; }
ms_up() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%d", (b-a)*1000}'; }
# wallt: Xen wallclock as "EPOCH.us (HH:MM:SS UTC)", comparable with vtpm.log
wallt() { _w=$(wall); echo "$_w ($(date -u -d @${_w%.*} +%T 2>/dev/null) UTC)"; }
past_deadline() { [ "$(upi)" -ge "$DEADLINE" ]; }
# life_row NAME: the pair of NAME from `xl-vtpm list --json`, one line; jf FIELD: a value from it
life_row() { timeout $(tmo 30) xl-vtpm list --json 2>/dev/null | tr -d ' \n' | sed 's/},{/}\n{/g' | grep "\"guest_name\":\"$1\""; }
jf() { sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\).*/\1/p" | head -n1; }
life_list() { timeout $(tmo 30) xl-vtpm list 2>&1 | sed "s/^/[xl-vtpm list] /"; }
life_state() { [ "$(life_row $1 | jf state)" = "$2" ]; }
a_running() { xl domid life-a >/dev/null 2>&1; }
# life_guest OFF TAG fresh|kept: wait for the boot's GUEST-DONE of guest $LNAME (life-a), echo its checks;
# sets lerr and LEK_NOW
life_guest() {
  _o=$1; _t=$2; _s=$3; lerr=""; LEK_NOW=""
  WU_SLEEP=1 wait_until 240 lcon_has $LNAME $_o '^GUEST-DONE' || lerr="no-GUEST-DONE"
  lcon $LNAME $_o | sed -n "s|^GUEST-CHECK |CHECK $LNAME/$_t |p"
  if [ $_s = fresh ]; then _want="tpm0 startup getrandom pcr16-reset ek persistent nv-write"
  else _want="tpm0 startup getrandom pcr16-reset ek persistent-kept nv-kept"; fi
  for c in $_want; do lcon $LNAME $_o | grep -qE "^GUEST-CHECK $c PASS" || lerr="$lerr $c"; done
  lcon $LNAME $_o | grep -q '^GUEST-DONE .*result=ok' || lerr="$lerr guest-result"
  _got=$(lcon $LNAME $_o | sed -n 's/^GUEST-LIFE state=//p' | head -n1)
  [ "$_got" = $_s ] || lerr="$lerr vtpm-state-${_got:-none}(want-$_s)"
  LEK_NOW=$(lcon $LNAME $_o | sed -n 's/^GUEST-EKHASH //p' | head -n1)
  lcon $LNAME $_o | grep -E '^GUEST-(UP|LIFE|DONE|DMESG)|GUEST-CHECK tpm0 FAIL|panic|Oops' | sed "s/^/[$LNAME $_t] /"
  [ -n "$lerr" ] && lcon $LNAME $_o | tail -n 15 | sed "s/^/[$LNAME $_t console] /"
}
ek_check() {  # TAG
  if [ -n "$LEK" ] && [ "$LEK" = "$LEK_NOW" ]; then echo "CHECK dom0 life-ek-stable PASS $1: EK sha256 $(echo $LEK | cut -c1-16)..."
  else echo "CHECK dom0 life-ek-stable FAIL $1: first=${LEK:-none} now=${LEK_NOW:-none}"; err="$err ek-changed"; fi
}
# life_create CFG TAG: xl-vtpm create of guest $LNAME (life-a); sets lrc, LROW and LUUID_NOW/LPID_NOW
# from the registry
life_create() {
  LOFF=$(lines_of "$(clog $LNAME)")
  _t0=$(up)
  NO_COLOR=1 timeout $(tmo 150) xl-vtpm create "$1" > /tmp/xl-life-$2.out 2>&1; lrc=$?
  echo "xl-vtpm create $1 ($2): rc=$lrc in $(s_between $_t0 $(up)) s"
  sed "s/^/[xl-vtpm create $2] /" /tmp/xl-life-$2.out | tail -n 20
  LROW=$(life_row $LNAME); LUUID_NOW=$(echo "$LROW" | jf vtpm_uuid); LPID_NOW=$(echo "$LROW" | jf vtpm_pid)
  echo "registry: $LNAME state=$(echo "$LROW" | jf state) domid=$(echo "$LROW" | jf guest_running_domid) vtpm=$LUUID_NOW vtpm_pid=$LPID_NOW"
}
# life_cmd N CMD TIMEOUT: run CMD in the held guest (xenstore data/xvtpm-cmd); echo its GUEST-CMD line
life_cmd() {
  _d=$(xl domid life-a 2>/dev/null) || { echo "no life-a domain"; return 1; }
  xenstore-write /local/domain/$_d/data/xvtpm-cmd "$1:$2" || { echo "xenstore-write failed"; return 1; }
  WU_SLEEP=1 wait_until $3 lcon_has life-a $LOFF "^GUEST-CMD $1 " || { echo "no answer within $3 s"; return 1; }
  _l=$(lcon life-a $LOFF | grep "^GUEST-CMD $1 " | head -n1); echo "$_l"
  echo "$_l" | grep -q "^GUEST-CMD $1 [a-z]* PASS"
}
# watch_start: `xl-vtpm watch` in the background, its lines to $WLOG with the Xen wallclock in
# front; sets WATCH_PID; fails with werr unless it says it watches @releaseDomain within 20 s
watch_start() {
  werr=""; rm -f /run/xvtpm-watch.pid
  ( XVTPM_LOG=info NO_COLOR=1 xl-vtpm watch 2>&1 & echo $! > /run/xvtpm-watch.pid; wait ) |
    while IFS= read -r l; do echo "[$(wall)] $l"; done > $WLOG &
  wait_until 10 test -s /run/xvtpm-watch.pid; WATCH_PID=$(cat /run/xvtpm-watch.pid 2>/dev/null)
  watch_settled() { grep -q watching $WLOG || pid_down $WATCH_PID; }
  wait_until 20 watch_settled || true
  grep -q '"watching":"@releaseDomain"' $WLOG && pid_up $WATCH_PID && return 0
  werr="xl-vtpm watch not watching within 20 s (alive: $(pid_up $WATCH_PID && echo yes || echo no)): $(tail -n 3 $WLOG | tr '\n' ' ')"
  return 1
}
# life_stop_a: leave no life-a domain and no running pair (after a failed step)
life_stop_a() {
  if a_running || ! life_state life-a stopped; then
    echo "life: cleaning up life-a (domain: $(xl domid life-a 2>/dev/null || echo none), pair: $(life_row life-a | jf state))"
    NO_COLOR=1 timeout $(tmo 60) xl-vtpm destroy life-a 2>&1 | sed 's/^/[xl-vtpm destroy (cleanup)] /'
    a_running && timeout $(tmo 60) xl destroy life-a
  fi
  pid_up $LPID && { echo "life: killing leftover vTPM pid $LPID"; kill $LPID; }
}

if [ "$LIFE_MODE" = 0 ] || [ "$VTPM_MODE" != dom0 ]; then
  why="disabled (XVTPM_TESTBED_LIFE=0)"; [ "$LIFE_MODE" = 0 ] || why="needs XVTPM_TESTBED_VTPM=dom0"
  for p in life-watch life-create life-xl-destroy life-recreate life-reboot life-refuse-b life-mgr-restart life-registry; do result $p SKIPPED "$why"; done
else
  ##### life-watch
  ph=life-watch; err=""
  if [ -z "$MGR_PID" ] || ! grep -q '"provisioned": *true' /tmp/status.json 2>/dev/null; then err="needs a provisioned vtpmmgr (mgr phases)"
  elif [ ! -x /usr/bin/xl-vtpm ] || [ ! -x /usr/bin/vtpm-domain ]; then err="xl-vtpm or vtpm-domain not built"
  elif [ ! -f $LCFG0 ]; then err="$LCFG0 missing (build-images.sh)"
  else
    # the earlier phases' standalone vTPM (`xl-vtpm vtpm create`, stopped by vtpm-destroy) is no pair:
    # drop its identity so that `registry check` at the end speaks about the lifecycle pairs only
    if [ -n "$VTPM_UUID" ] && vtpm_exited; then
      timeout $(tmo 30) xl-vtpm mgr vtpm del $VTPM_UUID --yes 2>&1 | sed 's/^/[mgr vtpm del] /'
    fi
    grep -vE '^ *(#|$)' $LCFG0 | sed 's/^/[life-a.cfg] /'
    watch_start || err="$werr"
  fi
  if [ -z "$err" ]; then result $ph PASS "xl-vtpm watch (pid $WATCH_PID) watching @releaseDomain"
  else result $ph FAIL "$err"; fi

  ##### life-create: xl-vtpm create of the verbatim guest config; a fresh vTPM; the guest writes state
  ph=life-create; err=""
  if [ -z "$WATCH_PID" ]; then result $ph SKIPPED "life-watch failed"
  else
    life_create $LCFG create1
    LUUID=$LUUID_NOW; LPID=$LPID_NOW; LGUEST_UUID=$(echo "$LROW" | jf guest_uuid)
    LVLOG=/var/lib/xvtpm/vtpms/$LUUID/vtpm.log
    if [ $lrc != 0 ]; then err="xl-vtpm create exited $lrc: $(tail -n 3 /tmp/xl-life-create1.out | tr '\n' ' ')"
    elif ! echo "$LROW" | grep -q '"state":"running"'; then err="xl-vtpm list --json: life-a not running: $LROW"
    elif ! echo "$LPID" | grep -qE '^[0-9]+$' || ! pid_up $LPID; then err="xl-vtpm list --json: no live vtpm_pid ($LPID)"
    elif ! echo "$LROW" | jf guest_running_domid | grep -qE '^[0-9]+$'; then err="xl-vtpm list --json: no guest_running_domid"
    else
      echo "CHECK dom0 life-list-running PASS life-a domid $(echo "$LROW" | jf guest_running_domid), vTPM $LUUID pid $LPID"
      life_guest $LOFF create1 fresh
      LEK=$LEK_NOW
      [ -n "$lerr" ] && err="guest checks failed:$lerr"
    fi
    if [ -z "$err" ]; then result $ph PASS "life-a with vTPM $LUUID (pid $LPID, allocated by xl-vtpm); 0x81000010 + NV written"
    else result $ph FAIL "$err"; fi
  fi

  ##### life-xl-destroy: plain xl; the watcher takes the vTPM with it
  ph=life-xl-destroy; err=""
  if [ -z "$LUUID" ] || ! a_running; then result $ph SKIPPED "no running life-a (life-create failed)"
  elif past_deadline; then result $ph SKIPPED "scenario deadline reached"
  else
    _d=$(xl domid life-a)
    echo "INFO life timeline xl-destroy-start $(wallt)"
    t0=$(up)
    timeout $(tmo 60) xl destroy life-a || err="$err xl-destroy-rc=$?"
    t1=$(up)
    _end=$(( $(upi) + $(tmo 10) ))
    while pid_up $LPID && [ "$(upi)" -lt $_end ]; do sleep 0.05; done
    t2=$(up)
    echo "INFO life timeline vtpm-gone $(wallt)"
    if pid_up $LPID; then
      echo "CHECK dom0 life-vtpm-gone FAIL vTPM pid $LPID still alive $(s_between $t1 $t2) s after xl destroy returned"
      err="$err vtpm-process-still-running-after-10s"
    else
      gone_ms=$(ms_up $t1 $t2)
      echo "PERF life-destroy-to-vtpm-gone-ms=$gone_ms (xl destroy returned -> vTPM pid $LPID gone; $(ms_up $t0 $t2) ms from the start of xl destroy, which took $(ms_up $t0 $t1) ms)"
      if [ $gone_ms -le 2000 ]; then echo "CHECK dom0 life-vtpm-gone PASS ${gone_ms} ms after xl destroy (limit 2000)"
      else echo "CHECK dom0 life-vtpm-gone FAIL ${gone_ms} ms after xl destroy (limit 2000)"; err="$err vtpm-gone-after-${gone_ms}ms(limit-2000)"; fi
    fi
    if wait_until 10 life_state life-a stopped; then
      _row=$(life_row life-a)
      if [ "$(echo "$_row" | jf vtpm_pid)" = null ]; then echo "CHECK dom0 life-list-stopped PASS state stopped, vtpm_pid null"
      else echo "CHECK dom0 life-list-stopped FAIL vtpm_pid $(echo "$_row" | jf vtpm_pid)"; err="$err list-vtpm-pid"; fi
    else echo "CHECK dom0 life-list-stopped FAIL $(life_row life-a)"; err="$err list-not-stopped"; fi
    life_list
    tail -n 3 $WLOG | sed 's/^/[watch.log] /'
    tail -n 4 $LVLOG | sed 's/^/[vtpm-life-a.log] /'
    if [ -z "$err" ]; then result $ph PASS "xl destroy (domid $_d): vTPM process gone ${gone_ms} ms later (watcher), pair stopped"
    else result $ph FAIL "$err"; fi
    pid_up $LPID && { echo "life: killing leftover vTPM pid $LPID"; kill $LPID; }
  fi

  ##### life-recreate: the same (verbatim, uuid-less) config again: same vTPM, state kept
  ph=life-recreate; err=""
  if [ -z "$LUUID" ]; then result $ph SKIPPED "no vTPM (life-create failed)"
  elif past_deadline; then result $ph SKIPPED "scenario deadline reached"
  else
    life_stop_a
    life_create $LCFG recreate
    if [ $lrc != 0 ]; then
      err="xl-vtpm create of the unchanged $LCFG0 exited $lrc: $(tail -n 3 /tmp/xl-life-recreate.out | tr '\n' ' ')"
      # go on with the guest's recorded uuid, so the later steps still say something
      if [ -n "$LGUEST_UUID" ]; then
        LCFG=/etc/xen/life-a-uuid.cfg
        sed "s|^# uuid = .*|uuid = \"$LGUEST_UUID\"|" $LCFG0 > $LCFG
        echo "life-recreate: retrying with $LCFG ($(grep '^uuid' $LCFG)); the later steps use it"
        life_create $LCFG recreate-uuid
        [ $lrc = 0 ] || err="$err; with uuid = $LGUEST_UUID too (rc $lrc)"
      fi
    fi
    if [ $lrc = 0 ]; then
      [ "$LUUID_NOW" = "$LUUID" ] && echo "CHECK dom0 life-same-vtpm PASS $LUUID" || { echo "CHECK dom0 life-same-vtpm FAIL now ${LUUID_NOW:-none}, first create $LUUID"; err="$err other-vtpm-uuid"; }
      pid_up $LPID_NOW || err="$err no-live-vtpm-pid"
      LPID=$LPID_NOW
      life_guest $LOFF recreate kept
      [ -n "$lerr" ] && err="$err guest checks failed:$lerr"
      ek_check recreate
    fi
    if [ -z "$err" ]; then result $ph PASS "same vTPM $LUUID (new pid $LPID), 0x81000010 + NV kept, same EK"
    else result $ph FAIL "$err"; fi
  fi

  ##### life-reboot: xl-vtpm reboot; the vTPM process stays
  ph=life-reboot; err=""
  if ! a_running; then result $ph SKIPPED "no running life-a (life-recreate failed)"
  elif past_deadline; then result $ph SKIPPED "scenario deadline reached"
  else
    _d0=$(xl domid life-a); _d1=""; LOFF=$(lines_of "$(clog life-a)")
    echo "INFO life timeline xl-vtpm-reboot $(wallt)"
    t0=$(up)
    timeout $(tmo 60) xl-vtpm reboot life-a > /tmp/xl-life-reboot.out 2>&1 || err="$err xl-vtpm-reboot-rc=$?"
    sed 's/^/[xl-vtpm reboot] /' /tmp/xl-life-reboot.out | tail -n 5
    rebooted() { _n=$(xl domid life-a 2>/dev/null) && [ "$_n" != "$_d0" ]; }
    if wait_until 120 rebooted; then
      _d1=$(xl domid life-a)
      echo "INFO life timeline new-domid-$_d1-seen $(wallt)"
      echo "life-a rebooted: domid $_d0 -> $_d1 after $(s_between $t0 $(up)) s"
      if pid_up $LPID; then echo "CHECK dom0 life-vtpm-kept PASS vTPM pid $LPID alive after the reboot"
      else echo "CHECK dom0 life-vtpm-kept FAIL vTPM pid $LPID is gone (the watcher stopped it?)"; err="$err vtpm-process-stopped"; fi
      tail -n 4 $WLOG | sed 's/^/[watch.log] /'
      grep -E 'DomId\(('$_d0'|'$_d1')\)|signal|shutting' $LVLOG | tail -n 8 | sed 's/^/[vtpm-life-a.log] /'
      if [ -z "$err" ]; then
        life_guest $LOFF reboot kept
        [ -n "$lerr" ] && err="$err guest checks failed:$lerr"
        ek_check reboot
        [ "$(life_row life-a | jf vtpm_pid)" = "$LPID" ] || { echo "CHECK dom0 life-vtpm-kept FAIL registry vtpm_pid $(life_row life-a | jf vtpm_pid), want $LPID"; err="$err registry-vtpm-pid"; }
        regdomid() { [ "$(life_row life-a | jf guest_domid)" = "$_d1" ]; }
        if wait_until 15 regdomid; then echo "CHECK dom0 life-registry-domid PASS guest_domid $_d1"
        else echo "CHECK dom0 life-registry-domid FAIL registry guest_domid $(life_row life-a | jf guest_domid), running $_d1"; err="$err registry-domid"; fi
      else
        sleep 5; echo "life-a 5 s later: domid $(xl domid life-a 2>&1)"
        lcon life-a $LOFF | grep -E 'GUEST-|tpm|vtpm|xenbus' | tail -n 10 | sed "s/^/[life-a reboot console] /"
        tail -n 25 /var/log/xen/xl-life-a.log 2>/dev/null | sed 's/^/[xl-life-a.log] /'
      fi
    else err="$err no-new-domain-in-120s"; fi
    life_list
    if [ -n "$err" ] && ! past_deadline; then
      # bring the pair back (no verdict on it; its time counts here) so the next steps test what they are for
      echo "life: recovering life-a for the next steps (xl-vtpm destroy + create)"
      life_stop_a; life_create $LCFG reboot-recover
      if [ $lrc = 0 ]; then LPID=$LPID_NOW; life_guest $LOFF reboot-recover kept; echo "INFO life recovered: vTPM pid $LPID, guest checks: ${lerr:-all PASS}"; fi
    fi
    if [ -z "$err" ]; then result $ph PASS "domid $_d0 -> $_d1, vTPM pid $LPID kept, 0x81000010 + NV kept, PCR16 reset, same EK"
    else result $ph FAIL "$err"; fi
  fi

  ##### life-refuse-b: guest B naming A's vTPM is refused, nothing half-created
  ph=life-refuse-b; err=""
  if [ -z "$LUUID" ]; then result $ph SKIPPED "no vTPM (life-create failed)"
  elif past_deadline; then result $ph SKIPPED "scenario deadline reached"
  else
    sed -e 's|^name = .*|name = "life-b"|' -e "s|^vtpm = .*|vtpm = [ \"backend=0,uuid=$LUUID\" ]|" $LCFG0 > /etc/xen/life-b.cfg
    grep -E '^(name|vtpm|uuid)' /etc/xen/life-b.cfg | sed 's/^/[life-b.cfg] /'
    _a_state() { echo "domain $(xl domid life-a 2>/dev/null || echo none), vTPM pid $LPID $(pid_up $LPID && echo up || echo down)"; }
    _ab=$(_a_state)
    timeout $(tmo 30) xl-vtpm list --json > /tmp/life-list-before.json 2>&1
    NO_COLOR=1 timeout $(tmo 120) xl-vtpm create /etc/xen/life-b.cfg > /tmp/xl-life-b.out 2>&1; rc=$?
    sed 's/^/[xl-vtpm create life-b] /' /tmp/xl-life-b.out | tail -n 10
    timeout $(tmo 30) xl-vtpm list --json > /tmp/life-list-after.json 2>&1
    [ $rc = 6 ] && echo "CHECK dom0 life-b-refused PASS exit 6 (refused)" || { echo "CHECK dom0 life-b-refused FAIL exit $rc (want 6)"; err="$err exit-$rc"; }
    grep -q 'life-a' /tmp/xl-life-b.out && echo "CHECK dom0 life-b-names-owner PASS the error names life-a" || { echo "CHECK dom0 life-b-names-owner FAIL"; err="$err error-does-not-name-life-a"; }
    xl domid life-b >/dev/null 2>&1 && { err="$err life-b-domain-exists"; timeout $(tmo 60) xl destroy life-b; }
    if cmp -s /tmp/life-list-before.json /tmp/life-list-after.json && grep -q life-a /tmp/life-list-after.json; then
      echo "CHECK dom0 life-b-nothing-left PASS no life-b domain, xl-vtpm list --json unchanged"
    else echo "CHECK dom0 life-b-nothing-left FAIL xl-vtpm list changed:"; diff /tmp/life-list-before.json /tmp/life-list-after.json | head -n 20; err="$err xl-vtpm-list-changed"; fi
    _aa=$(_a_state)
    [ "$_ab" = "$_aa" ] && echo "CHECK dom0 life-a-untouched PASS $_aa" || { echo "CHECK dom0 life-a-untouched FAIL before: $_ab; after: $_aa"; err="$err life-a-changed"; }
    if [ -z "$err" ]; then result $ph PASS "xl-vtpm create life-b refused (exit 6, names life-a); nothing created; life-a: $_aa"
    else result $ph FAIL "$err"; fi
  fi

  ##### life-mgr-restart: manager SIGTERM + restart; A's vTPM stop/start on the new manager
  ph=life-mgr-restart; err=""
  if [ -z "$LUUID" ] || [ -z "$MGR_PID" ]; then result $ph SKIPPED "no vTPM or no manager"
  elif past_deadline; then result $ph SKIPPED "scenario deadline reached"
  else
    _ar=""; a_running && pid_up $LPID && _ar=1
    [ -z "$_ar" ] && { echo "life-a is not running with its vTPM (an earlier step failed): restart the manager, then create it"; life_stop_a; }
    kill $MGR_PID
    if wait_until 20 pid_down $MGR_PID; then echo "vtpmmgr (pid $MGR_PID) exited on SIGTERM"
    else err="$err vtpmmgr-did-not-exit"; kill -9 $MGR_PID; fi
    [ -n "$_ar" ] && echo "INFO life vtpm-after-mgr-exit pid $LPID alive=$(pid_up $LPID && echo yes || echo no)"
    MGR_LOG=/var/log/xvtpm/vtpmmgr-2.log
    XVTPM_LOG=${XVTPM_LOG:-info} vtpmmgr --tcti device:/dev/tpmrm0 --state-dir /var/lib/xvtpm --run-dir /run/xvtpm serve --xen \
        > $MGR_LOG 2>&1 &
    MGR_PID=$!
    mgr2_settled() { grep -q '"ready":true' /var/log/xvtpm/vtpmmgr-2.log || pid_down $MGR_PID; }
    wait_until 120 mgr2_settled
    if grep -q '"ready":true' /var/log/xvtpm/vtpmmgr-2.log && pid_up $MGR_PID; then
      echo "vtpmmgr restarted (pid $MGR_PID)"
      if [ -n "$_ar" ]; then
        # the running pair, untouched (informational: this step restarts the vTPM below)
        echo "INFO life vtpm-after-mgr-restart pid $LPID alive=$(pid_up $LPID && echo yes || echo no)"
        echo "INFO life live-getrandom-after-mgr-restart $(life_cmd 1 getrandom 60 | tail -n1)"
        echo "INFO life live-deepquote-after-mgr-restart $(life_cmd 2 deepquote:$(head -c 16 /dev/urandom | xxd -p) 60 | tail -n1)"
        t0=$(up)
        NO_COLOR=1 timeout $(tmo 60) xl-vtpm destroy life-a > /tmp/xl-life-destroy2.out 2>&1; rc=$?
        sed 's/^/[xl-vtpm destroy] /' /tmp/xl-life-destroy2.out | tail -n 10
        echo "xl-vtpm destroy life-a: rc=$rc in $(s_between $t0 $(up)) s"
        [ $rc = 0 ] || err="$err xl-vtpm-destroy-exit-$rc"
        wait_until 30 domain_gone life-a || err="$err guest-still-there"
        wait_until 10 pid_down $LPID || { err="$err vtpm-pid-$LPID-still-alive"; kill -9 $LPID; }
        wait_until 10 life_state life-a stopped || err="$err pair-not-stopped($(life_row life-a | jf state))"
      fi
      life_create $LCFG create3
      if [ $lrc != 0 ]; then err="$err xl-vtpm-create-exit-$lrc: $(tail -n 3 /tmp/xl-life-create3.out | tr '\n' ' ')"
      else
        [ "$LUUID_NOW" = "$LUUID" ] || err="$err other-vtpm-uuid-$LUUID_NOW"
        pid_up $LPID_NOW || err="$err no-live-vtpm-pid"
        echo "vTPM $LUUID_NOW: pid $LPID -> $LPID_NOW on the restarted manager"
        LPID=$LPID_NOW
        life_guest $LOFF mgr-restart kept
        [ -n "$lerr" ] && err="$err guest checks failed:$lerr"
        ek_check mgr-restart
      fi
    else
      tail -n 20 /var/log/xvtpm/vtpmmgr-2.log | sed 's/^/[vtpmmgr-2] /'
      err="$err vtpmmgr-not-ready-after-restart"; MGR_PID=""
    fi
    life_list
    if [ -z "$err" ]; then result $ph PASS "vtpmmgr restarted; A's vTPM restarted on it (pid $LPID): getrandom, 0x81000010 + NV kept, same EK"
    else result $ph FAIL "$err"; fi
  fi

  ##### life-registry: registry check clean with A running and after xl-vtpm destroy; watcher stopped
  ph=life-registry; err=""
  if [ -z "$WATCH_PID" ]; then result $ph SKIPPED "life-watch failed"
  elif [ -z "$MGR_PID" ]; then result $ph FAIL "no manager for xl-vtpm (see life-mgr-restart)"
  else
    if a_running; then
      timeout $(tmo 60) xl-vtpm registry check > /tmp/life-check1.out 2>&1; rc=$?
      sed 's/^/[registry check, life-a running] /' /tmp/life-check1.out
      [ $rc = 0 ] && grep -q 'registry matches what runs' /tmp/life-check1.out || err="$err drift-with-life-a-running(rc=$rc)"
      t0=$(up)
      NO_COLOR=1 timeout $(tmo 60) xl-vtpm destroy life-a > /tmp/xl-life-destroy3.out 2>&1; rc=$?
      sed 's/^/[xl-vtpm destroy] /' /tmp/xl-life-destroy3.out | tail -n 10
      [ $rc = 0 ] || err="$err xl-vtpm-destroy-exit-$rc"
      wait_until 30 domain_gone life-a || err="$err guest-still-there"
      pid_up $LPID && err="$err vtpm-pid-$LPID-alive-after-xl-vtpm-destroy"
      life_state life-a stopped || err="$err pair-not-stopped"
      echo "xl-vtpm destroy life-a: rc=$rc, guest and vTPM gone after $(s_between $t0 $(up)) s"
    else echo "life-a is not running (an earlier step failed); checking the registry as it is"; err="$err life-a-not-running"
    fi
    timeout $(tmo 60) xl-vtpm registry check > /tmp/life-check2.out 2>&1; rc=$?
    sed 's/^/[registry check, end] /' /tmp/life-check2.out
    [ $rc = 0 ] && grep -q 'registry matches what runs' /tmp/life-check2.out || err="$err drift-at-end(rc=$rc)"
    life_list
    kill $WATCH_PID
    wait_until 10 pid_down $WATCH_PID || { err="$err watcher-did-not-exit"; kill -9 $WATCH_PID; }
    tail -n 20 $WLOG | sed 's/^/[watch.log] /'
    if [ -z "$err" ]; then result $ph PASS "registry check: no drift (life-a running, and after xl-vtpm destroy); watcher stopped"
    else result $ph FAIL "$err"; fi
  fi
  # nothing of the lifecycle may outlive it (teardown then checks there is no domU left)
  for d in life-a life-b; do xl domid $d >/dev/null 2>&1 && timeout $(tmo 60) xl destroy $d; done
  pid_up $LPID && { echo "life: stopping leftover vTPM pid $LPID"; kill $LPID; }
  pid_up $WATCH_PID && kill -9 $WATCH_PID
fi

############ (e4) vTPM domain: the vTPM as the only program of its own Xen domain
# `xl-vtpm vtpm create --domain` boots a PV domain whose /init is vtpm-domain
# (/usr/lib/xvtpm/vtpmdom/initrd, built by scripts/build-vtpmdom.sh; the guests' kernel). It keeps its
# sealed state on its own disk (/dev/xvda: a 4 MiB image on a dom0 loop device, blkback, our
# /etc/xen/scripts/block), reaches vtpmmgr (serve --xen) over a tpmif device whose backend is dom0,
# and serves its guest on its own backend/vtpm. One RESULT per step:
#   vtpmdom-create   domain running, data/xvtpm/ready = its UUID, VTPMDOM-READY on its console;
#                    PERF: create time, memory (xl list, and the domain's own meminfo/RSS line)
#   vtpmdom-guest    guest-vdom with vtpm = [ "backend=vtpmdom-a,uuid=U" ]: the vtpm-guest checks
#                    (stock xen-tpmfront), the deep quote verified in dom0 (right nonce 8 = host unchecked, wrong 7); P5
#   vtpmdom-reboot   the guest again: 0x81000010 + NV kept, PCR 16 reset, same EK
#   vtpmdom-restart  `xl-vtpm vtpm stop` (clean stop: VTPMDOM-EXIT code=0, loop device released),
#                    `xl-vtpm vtpm start` (new domain, resumes from its disk: no --create); guest
#                    boot 3: 0x81000010 + NV kept, same EK -- the A/B store on a real xen-blkfront disk
#   vtpmdom-destroy  xl destroy of the (held) guest, the vTPM domain survives it; `xl-vtpm vtpm destroy
#                    --yes`: domain, manager identity, disk image and loop device gone
VD=vtpmdom-a; VDG=guest-vdom; VDCFG=/etc/xen/guest-vdom.cfg
VDU=""; VDID=""; VDOFF=0; VD_EK1=""
VTPMDOM_MEM=$(sed -n 's/^vtpmdom_mem=//p' /etc/xvtpm-testbed.env); VTPMDOM_MEM=${VTPMDOM_MEM:-128}
# where xl-vtpm looks by default; explicit, so that the scenario says what it boots
export XVTPM_VTPMDOM_KERNEL=/usr/lib/xvtpm/vtpmdom/vmlinuz XVTPM_VTPMDOM_RAMDISK=/usr/lib/xvtpm/vtpmdom/initrd
vd_domid() { xl domid $VD 2>/dev/null; }
vd_ready() { _i=$(vd_domid) && [ "$(xenstore-read /local/domain/$_i/data/xvtpm/ready 2>/dev/null)" = "$VDU" ]; }
vd_con() { lcon $VD $VDOFF; }   # the vTPM domain's console, this boot
vd_row() { timeout $(tmo 30) xl-vtpm vtpm show $VDU --json 2>/dev/null | tr -d ' \n'; }
# vd_loop [UUID]: the loop device(s) backed by the disk image of vTPM UUID ($VDU)
vd_loop() {
  _u=${1:-$VDU}; [ -n "$_u" ] || return 0
  for _f in /sys/block/loop*/loop/backing_file; do
    grep -qF "/vtpms/$_u/" $_f 2>/dev/null && { _l=${_f#/sys/block/}; echo "/dev/${_l%%/*}"; }
  done
}
vd_gcfg() {  # extra-words
  sed -e "s/@UUID@/$VDU/" -e "s/@BACKEND@/$VD/" -e "s/@EXTRA@/$1/" $VDCFG.in > $VDCFG
}
# vd_diag: what the vTPM domain, xenstore, xl, the block script and the manager said
vd_diag() {
  vd_con | tail -n 40 | sed "s/^/[$VD console] /"
  _i=$(vd_domid) && xenstore-ls -f /local/domain/$_i 2>/dev/null | grep -E "/$_i/(data|device|backend)/" | head -n 60 | sed "s/^/[$VD xenstore] /"
  xenstore-ls -f /local/domain/0/backend 2>/dev/null | grep -E '/backend/(vbd|vtpm)/' | head -n 60 | sed 's/^/[dom0 backend] /'
  tail -n 25 /var/log/xen/xl-$VD.log 2>/dev/null | sed "s/^/[xl-$VD.log] /"
  tail -n 10 /var/log/xen/xen-hotplug.log 2>/dev/null | sed 's/^/[xen-hotplug.log] /'
  tail -n 15 $MGR_LOG 2>/dev/null | sed 's/^/[vtpmmgr] /'
}
# vd_snap WHY: xenstore as the vTPM domain sees it and dom0's backends for it, while it runs
# (xl-vtpm destroys a domain that does not become ready, so this is taken while waiting)
vd_snap() {
  _i=$(vd_domid) || { echo "vtpmdom snapshot ($1): no $VD domain"; return; }
  echo "vtpmdom snapshot ($1): domid $_i, $(xl list $_i 2>/dev/null | awk 'NR==2{print "state "$5", cpu "$6" s"}')"
  xenstore-ls -f /local/domain/$_i 2>/dev/null | grep -E "/$_i/(data|device|backend|control)/" | head -n 60 | sed "s/^/[$VD xenstore] /"
  xenstore-ls -f /local/domain/0/backend 2>/dev/null | grep -E "/backend/(vbd|vtpm)/$_i/" | head -n 40 | sed 's/^/[dom0 backend] /'
  vd_con | tail -n 20 | sed "s/^/[$VD console] /"
}
# vd_xlvtpm OUT ERR SECONDS ARGS...: xl-vtpm in the background; a snapshot if it is still waiting
# after 40 s; sets rc
vd_xlvtpm() {
  _o=$1; _e=$2; _s=$3; shift 3
  if [ "$_o" = "$_e" ]; then ( NO_COLOR=1 timeout $(tmo $_s) xl-vtpm "$@" > $_o 2>&1; echo $? > $_o.rc ) &
  else ( NO_COLOR=1 timeout $(tmo $_s) xl-vtpm "$@" > $_o 2> $_e; echo $? > $_o.rc ) &
  fi
  _p=$!; _t=$(( $(upi) + 40 )); _snapped=""
  while kill -0 $_p 2>/dev/null; do
    [ -z "$_snapped" ] && [ "$(upi)" -ge $_t ] && { _snapped=1; vd_snap "xl-vtpm $1 $2 still waiting after 40 s"; }
    sleep 0.5
  done
  rc=$(cat $_o.rc 2>/dev/null || echo 255)
}
# vd_boot N EXTRA CHECKS...: one boot of guest-vdom; sets err (appends) and VD_EK_NOW; the console log
# is kept as guest-guest-vdom-bootN.log
vd_boot() {
  _n=$1; _x=$2; shift 2; VD_EK_NOW=""
  vd_gcfg "boot=$_n $_x"
  [ $_n = 1 ] && grep -E '^(name|vtpm|extra)' $VDCFG
  t0=$(up); w0=$(wall)
  timeout $(tmo 120) xl create $VDCFG > /tmp/xl-$VDG$_n.out 2>&1 || { err="$err xl-create-rc=$?"; tail -n 20 /tmp/xl-$VDG$_n.out; }
  echo "xl create $VDG (boot $_n): $(s_between $t0 $(up)) s, domid $(xl domid $VDG 2>&1)"
  if xl domid $VDG >/dev/null 2>&1; then
    xl vtpm-list $VDG 2>&1
    wait_until 240 console_has $VDG 'GUEST-DONE' || err="$err no-GUEST-DONE-in-240s"
    guest_checks $VDG $_n "$@"
    [ -n "$gerr" ] && err="$err guest-checks-failed:$gerr"
    VD_EK_NOW=$(console_txt $VDG | sed -n 's/^GUEST-EKHASH //p' | head -n1)
    _k=p5-vtpmdom-ms; [ $_n = 1 ] || _k=p5-vtpmdom-boot$_n-ms
    p5_vtpm $_k $VDG
  fi
  show_console $VDG 200 | grep -vE 'GUEST-DQ |GUEST-CHECK' | grep -E 'GUEST-|panic|Oops|tpm|TPM' | tail -n 20
}
vd_ek_check() {  # boot
  if [ -n "$VD_EK1" ] && [ "$VD_EK1" = "$VD_EK_NOW" ]; then echo "CHECK dom0 vtpmdom-ek-stable PASS boot $1: EK sha256 $(echo $VD_EK1 | cut -c1-16)... as in boot 1"
  else echo "CHECK dom0 vtpmdom-ek-stable FAIL boot $1: boot1=${VD_EK1:-none} now=${VD_EK_NOW:-none}"; err="$err ek-changed"; fi
}
vd_keep_log() { mv "$(clog $VDG)" /var/log/xen/console/guest-$VDG-boot$1.log 2>/dev/null; }
vd_chk() {  # name PASS|FAIL detail: a dom0 CHECK line; FAIL adds name to err
  echo "CHECK dom0 $1 $2 $3"; [ "$2" = PASS ] || err="$err $1"
}

if [ "$VTPMDOM_MODE" = 0 ]; then
  for p in vtpmdom-create vtpmdom-guest vtpmdom-reboot vtpmdom-restart vtpmdom-destroy; do result $p SKIPPED "disabled (XVTPM_TESTBED_VTPMDOM=0)"; done
else
  ##### vtpmdom-create
  ph=vtpmdom-create; err=""
  if [ -z "$MGR_PID" ] || ! grep -q '"provisioned": *true' /tmp/status.json 2>/dev/null; then err="needs a provisioned vtpmmgr (mgr phases)"
  elif [ ! -s $XVTPM_VTPMDOM_RAMDISK ]; then err="no vTPM-domain image $XVTPM_VTPMDOM_RAMDISK (vtpm-domain not built at image build)"
  elif past_deadline; then err="scenario deadline reached"
  else
    for m in loop xen-blkback; do modload $m || err="$err insmod-$m"; done
    wait_until 10 test -e /dev/loop-control || err="$err no-/dev/loop-control"
  fi
  if [ -z "$err" ]; then
    VDOFF=$(lines_of "$(clog $VD)")
    t0=$(up)
    vd_xlvtpm /tmp/vtpmdom-create.json /tmp/vtpmdom-create.err 200 vtpm create --domain $VD --memory $VTPMDOM_MEM --ek ecc --json
    VD_CREATE_S=$(s_between $t0 $(up))
    echo "xl-vtpm vtpm create --domain $VD: rc=$rc in $VD_CREATE_S s"
    sed 's/^/[vtpm create --domain] /' /tmp/vtpmdom-create.json /tmp/vtpmdom-create.err | tail -n 40
    _j=$(tr -d ' \n' < /tmp/vtpmdom-create.json)
    VDU=$(echo "$_j" | jf uuid); VDID=$(echo "$_j" | jf domid)
    if [ $rc != 0 ]; then err="xl-vtpm vtpm create --domain exited $rc"
    elif [ -z "$VDU" ] || [ -z "$VDID" ]; then err="no uuid/domid in the --json output"
    else
      [ "$(vd_domid)" = "$VDID" ] && vd_chk vtpmdom-running PASS "$VD is domid $VDID" || vd_chk vtpmdom-running FAIL "xl domid $VD: $(vd_domid || echo none), json said $VDID"
      vd_ready && vd_chk vtpmdom-xs-ready PASS "/local/domain/$VDID/data/xvtpm/ready = $VDU" ||
        vd_chk vtpmdom-xs-ready FAIL "data/xvtpm/ready = '$(xenstore-read /local/domain/$VDID/data/xvtpm/ready 2>&1)'"
      vd_con | grep -q "^VTPMDOM-READY uuid=$VDU" && vd_chk vtpmdom-console-ready PASS "VTPMDOM-READY on its console" ||
        vd_chk vtpmdom-console-ready FAIL "no 'VTPMDOM-READY uuid=$VDU' on the console"
      echo "$(vd_row)" | grep -q '"state":"running"' && vd_chk vtpmdom-show-running PASS "xl-vtpm vtpm show: running" ||
        vd_chk vtpmdom-show-running FAIL "xl-vtpm vtpm show: $(vd_row | cut -c1-300)"
      _img=/var/lib/xvtpm/vtpms/$VDU/disk.img
      [ "$(stat -c %s $_img 2>/dev/null)" = 4194304 ] && [ -n "$(vd_loop)" ] && vd_chk vtpmdom-disk PASS "$_img (4 MiB) on $(vd_loop)" ||
        vd_chk vtpmdom-disk FAIL "$_img: $(ls -l $_img 2>&1); loop: $(losetup -a 2>&1 | tr '\n' ' ')"
      xl block-list $VD 2>&1 | sed "s/^/[xl block-list $VD] /"
    fi
    vd_con | grep -E '^VTPMDOM-|error|panic|Oops' | tail -n 12 | sed "s/^/[$VD console] /"
    echo "PERF vtpmdom-create-s=$VD_CREATE_S (xl-vtpm vtpm create --domain: loop device, xl create -p, manager attach, vtpm-attach, unpause, boot + manufacture, ready)"
    if [ -n "$VDID" ]; then
      echo "PERF vtpmdom-xl-mem-mib=$(xl list $VD 2>/dev/null | awk 'NR==2{print $3}') (xl list; configured $VTPMDOM_MEM MiB)"
      # vtpm-domain's own line when it serves (VTPMDOM-READY, or a separate VTPMDOM-MEM)
      _m=$(vd_con | grep -m1 -E '^VTPMDOM-(READY|MEM) .*mem_total_kib=')
      _v() { echo "$_m" | sed -n "s/.* $1=\([0-9?]*\).*/\1/p"; }
      echo "PERF vtpmdom-mem-total-kib=$(_v mem_total_kib) vtpmdom-mem-available-kib=$(_v mem_available_kib) vtpmdom-rss-kib=$(_v rss_kib) (inside the vTPM domain when ready: MemTotal, MemAvailable, vtpm-domain VmRSS)"
      _t=$(vd_con | sed -n 's/^VTPMDOM-INIT devices present after \([0-9]*\) ms.*/\1/p' | head -n1)
      [ -n "$_t" ] && echo "INFO vtpmdom devices-present-after-ms=$_t (modules loaded -> /dev/xen/* and /dev/xvda there)"
    fi
    [ -n "$err" ] && vd_diag
  fi
  if [ -z "$err" ]; then result $ph PASS "vTPM $VDU in domain $VD (domid $VDID), ready in $VD_CREATE_S s; state on /dev/xvda"
  else result $ph FAIL "$err"; vd_ready || VDID=""; fi   # the next steps need a ready vTPM domain

  ##### vtpmdom-guest: boot 1 of a guest whose vTPM lives in vtpmdom-a; deep quote verified in dom0
  ph=vtpmdom-guest; err=""
  if [ -z "$VDID" ]; then result $ph SKIPPED "no vTPM domain (vtpmdom-create failed)"
  elif past_deadline; then result $ph SKIPPED "scenario deadline reached"
  else
    VDQ_NONCE=$(head -c 32 /dev/urandom | xxd -p -c 64)
    vd_boot 1 "dq_nonce=$VDQ_NONCE" tpm0 startup getrandom pcr16-reset pcrextend createek createak quote checkquote persistent nv-write deep-quote
    VD_EK1=$VD_EK_NOW
    console_txt $VDG | sed -n 's/^GUEST-DQ \([0-9a-f]*\)$/\1/p' | xxd -r -p > /tmp/vdq.bin
    want=$(console_txt $VDG | sed -n 's/^GUEST-DQ-END sha256=\([0-9a-f]*\).*/\1/p' | head -n1)
    got=$(sha256sum /tmp/vdq.bin | cut -c1-64)
    echo "deep-quote bundle from the $VDG console: $(wc -c < /tmp/vdq.bin) bytes sha256=$got (guest said ${want:-none})"
    if [ -n "$want" ] && [ "$want" = "$got" ]; then
      if [ -s /tmp/ak.bin ] || timeout $(tmo 60) xl-vtpm mgr group ak default --out /tmp/ak.bin > /tmp/ak.out 2>&1; then
        timeout $(tmo 60) xl-vtpm verify /tmp/vdq.bin --nonce $VDQ_NONCE --ak /tmp/ak.bin --insecure-unenrolled-ak --vtpm $VDU > /tmp/vdverify-ok.out 2>&1; rc_ok=$?
        sed 's/^/[verify right nonce] /' /tmp/vdverify-ok.out | tail -n 25
        BAD=$(head -c 32 /dev/urandom | xxd -p -c 64)
        timeout $(tmo 60) xl-vtpm verify /tmp/vdq.bin --nonce $BAD --ak /tmp/ak.bin --insecure-unenrolled-ak --vtpm $VDU > /tmp/vdverify-bad.out 2>&1; rc_bad=$?
        sed 's/^/[verify wrong nonce] /' /tmp/vdverify-bad.out | tail -n 5
        vd_chk vtpmdom-verify-right-nonce $([ $rc_ok = 8 ] && echo PASS || echo FAIL) "exit=$rc_ok (want 8: verified, host state not checked)"
        vd_chk vtpmdom-verify-wrong-nonce $([ $rc_bad = 7 ] && echo PASS || echo FAIL) "exit=$rc_bad (want 7)"
      else err="$err no-group-ak($(tail -n 2 /tmp/ak.out | tr '\n' ' '))"; fi
    else err="$err dq-capture"; fi
    wait_until 60 domain_gone $VDG || { err="$err guest-did-not-power-off"; timeout $(tmo 60) xl destroy $VDG; }
    vd_ready && vd_chk vtpmdom-survives-guest PASS "$VD still running and ready after the guest powered off" ||
      vd_chk vtpmdom-survives-guest FAIL "$VD: domid $(vd_domid || echo none)"
    [ -n "$err" ] && vd_diag
    vd_keep_log 1
    if [ -z "$err" ]; then result $ph PASS "boot 1: all guest checks on /dev/tpm0 served by domain $VD; deep quote verified in dom0 (right nonce 8 = host unchecked, wrong 7)"
    else result $ph FAIL "$err"; fi
  fi

  ##### vtpmdom-reboot: the guest again, same vTPM domain: state kept, PCRs reset
  ph=vtpmdom-reboot; err=""
  if [ -z "$VDID" ] || [ -z "$VD_EK1" ]; then result $ph SKIPPED "no vTPM domain or no first boot (vtpmdom-create/-guest failed)"
  elif past_deadline; then result $ph SKIPPED "scenario deadline reached"
  else
    vd_boot 2 "" tpm0 startup getrandom pcr16-reset pcrextend createek persistent-kept persistent-usable nv-kept
    vd_ek_check 2
    wait_until 60 domain_gone $VDG || { err="$err guest-did-not-power-off"; timeout $(tmo 60) xl destroy $VDG; }
    vd_ready || { err="$err vtpm-domain-not-ready-after-boot-2"; }
    [ -n "$err" ] && vd_diag
    vd_keep_log 2
    if [ -z "$err" ]; then result $ph PASS "boot 2: 0x81000010 + NV index kept, PCR16 reset, same EK (domain $VD, domid $VDID)"
    else result $ph FAIL "$err"; fi
  fi

  ##### vtpmdom-restart: stop the vTPM domain, boot it again from its disk; guest boot 3
  ph=vtpmdom-restart; err=""
  if [ -z "$VDID" ] || [ -z "$VD_EK1" ]; then result $ph SKIPPED "no vTPM domain or no first boot"
  elif past_deadline; then result $ph SKIPPED "scenario deadline reached"
  else
    _d0=$VDID
    t0=$(up)
    # xl-vtpm stop: xl shutdown (run in the background), up to 20 s for the clean stop, then xl destroy
    vd_xlvtpm /tmp/vtpmdom-stop.out /tmp/vtpmdom-stop.out 150 vtpm stop $VDU
    VD_STOP_S=$(s_between $t0 $(up))
    sed 's/^/[vtpm stop] /' /tmp/vtpmdom-stop.out | tail -n 10
    [ $rc = 0 ] || err="$err vtpm-stop-exit-$rc"
    wait_until 30 domain_gone $VD && vd_chk vtpmdom-stopped PASS "domain $VD (domid $_d0) gone $VD_STOP_S s after xl-vtpm vtpm stop" ||
      vd_chk vtpmdom-stopped FAIL "domain $VD still there: $(xl list $VD 2>&1 | tail -n1)"
    vd_con | grep -E '^VTPMDOM-EXIT|signal|stopping|shut' | tail -n 5 | sed "s/^/[$VD console] /"
    vd_con | grep -q '^VTPMDOM-EXIT code=0' && vd_chk vtpmdom-clean-stop PASS "VTPMDOM-EXIT code=0 (xl shutdown -> SIGTERM -> clean stop)" ||
      vd_chk vtpmdom-clean-stop FAIL "no 'VTPMDOM-EXIT code=0' on the console: $(vd_con | grep '^VTPMDOM-EXIT' | tail -n1)"
    [ -z "$(vd_loop)" ] && vd_chk vtpmdom-loop-released PASS "no loop device on the disk image" || vd_chk vtpmdom-loop-released FAIL "$(vd_loop)"
    echo "$(vd_row)" | grep -q '"state":"stopped"' && vd_chk vtpmdom-show-stopped PASS "xl-vtpm vtpm show: stopped" ||
      vd_chk vtpmdom-show-stopped FAIL "xl-vtpm vtpm show: $(vd_row | cut -c1-300)"
    echo "PERF vtpmdom-stop-s=$VD_STOP_S (xl-vtpm vtpm stop: xl shutdown, clean stop, domain gone, loop device released)"
    VDOFF=$(lines_of "$(clog $VD)")
    t0=$(up)
    vd_xlvtpm /tmp/vtpmdom-start.json /tmp/vtpmdom-start.err 200 vtpm start $VDU --json
    VD_START_S=$(s_between $t0 $(up))
    sed 's/^/[vtpm start] /' /tmp/vtpmdom-start.json /tmp/vtpmdom-start.err | tail -n 20
    VDID=$(tr -d ' \n' < /tmp/vtpmdom-start.json | jf domid)
    if [ $rc != 0 ]; then err="$err vtpm-start-exit-$rc"; VDID=$(vd_domid)
    else
      [ -n "$VDID" ] && [ "$VDID" != "$_d0" ] && [ "$(vd_domid)" = "$VDID" ] && vd_chk vtpmdom-new-domain PASS "domid $_d0 -> $VDID" ||
        vd_chk vtpmdom-new-domain FAIL "json domid ${VDID:-none}, xl domid $(vd_domid || echo none), before $_d0"
      vd_ready && vd_chk vtpmdom-xs-ready PASS "data/xvtpm/ready = $VDU" || vd_chk vtpmdom-xs-ready FAIL "not ready"
      _cfg=/run/xvtpm/vtpms/$VDU.xl.cfg
      if [ -f $_cfg ] && grep -q -- '--state-block /dev/xvda' $_cfg && ! grep -q -- '--create' $_cfg; then
        vd_chk vtpmdom-resumed PASS "booted without --create: $(sed -n 's/^extra = .*-- //p' $_cfg | tr -d '"')"
      else vd_chk vtpmdom-resumed FAIL "$_cfg: $(grep '^extra' $_cfg 2>&1)"; fi
    fi
    vd_con | grep -E '^VTPMDOM-|error|panic' | tail -n 8 | sed "s/^/[$VD console, boot 2] /"
    echo "PERF vtpmdom-start-s=$VD_START_S (xl-vtpm vtpm start: boot from the disk, resume, ready)"
    if vd_ready; then
      vd_boot 3 "hold=1" tpm0 startup getrandom pcr16-reset pcrextend createek persistent-kept persistent-usable nv-kept
      vd_ek_check 3
    else err="$err no-ready-vtpm-domain-for-boot-3"; fi
    [ -n "$err" ] && vd_diag
    if [ -z "$err" ]; then result $ph PASS "vTPM domain stopped cleanly and booted again from its disk (domid $_d0 -> $VDID); boot 3: 0x81000010 + NV kept, same EK"
    else result $ph FAIL "$err"; fi
  fi

  ##### vtpmdom-destroy: the guest goes, the vTPM domain stays; xl-vtpm vtpm destroy removes all of it
  ph=vtpmdom-destroy; err=""
  if [ -z "$VDU" ]; then result $ph SKIPPED "no vTPM (vtpmdom-create failed)"
  else
    if xl domid $VDG >/dev/null 2>&1; then
      timeout $(tmo 60) xl destroy $VDG || err="$err xl-destroy-rc=$?"
      wait_until 30 domain_gone $VDG || err="$err guest-still-there"
      sleep 1
      vd_ready && vd_chk vtpmdom-survives-destroy PASS "$VD still ready after xl destroy $VDG" || vd_chk vtpmdom-survives-destroy FAIL "$VD: domid $(vd_domid || echo none)"
    fi
    vd_keep_log 3
    _d=$(vd_domid)
    t0=$(up)
    vd_xlvtpm /tmp/vtpmdom-destroy.out /tmp/vtpmdom-destroy.out 150 vtpm destroy $VDU --yes
    sed 's/^/[vtpm destroy] /' /tmp/vtpmdom-destroy.out | tail -n 10
    [ $rc = 0 ] || err="$err vtpm-destroy-exit-$rc"
    wait_until 30 domain_gone $VD && vd_chk vtpmdom-domain-gone PASS "$VD not in xl list $(s_between $t0 $(up)) s after xl-vtpm vtpm destroy" ||
      vd_chk vtpmdom-domain-gone FAIL "$(xl list $VD 2>&1 | tail -n1)"
    echo "PERF vtpmdom-destroy-s=$(s_between $t0 $(up))"
    timeout $(tmo 30) xl-vtpm mgr vtpm list > /tmp/vtpmdom-mgr-list.out 2>&1
    grep -qi "$VDU" /tmp/vtpmdom-mgr-list.out && vd_chk vtpmdom-identity-gone FAIL "the manager still lists $VDU" ||
      vd_chk vtpmdom-identity-gone PASS "not in xl-vtpm mgr vtpm list"
    [ ! -e /var/lib/xvtpm/vtpms/$VDU ] && [ -z "$(vd_loop)" ] && vd_chk vtpmdom-disk-gone PASS "no /var/lib/xvtpm/vtpms/$VDU, no loop device" ||
      vd_chk vtpmdom-disk-gone FAIL "$(ls -l /var/lib/xvtpm/vtpms/$VDU 2>&1 | tr '\n' ' ') $(vd_loop)"
    if [ -n "$_d" ]; then
      _left=$(xenstore-ls -f /local/domain/0/backend 2>/dev/null | grep -E "/backend/(vbd|vtpm)/$_d/" | head -n 3)
      [ -z "$_left" ] && vd_chk vtpmdom-backends-gone PASS "no dom0 vbd/vtpm backend of domid $_d left" || vd_chk vtpmdom-backends-gone FAIL "$_left"
    fi
    [ -n "$err" ] && vd_diag
    if [ -z "$err" ]; then result $ph PASS "guest destroyed (vTPM domain survived); xl-vtpm vtpm destroy: domain, identity, disk and loop device gone"
    else result $ph FAIL "$err"; fi
  fi
  # nothing of it may outlive the section (teardown checks that no domU is left)
  xl domid $VDG >/dev/null 2>&1 && timeout $(tmo 60) xl destroy $VDG
  if xl domid $VD >/dev/null 2>&1 && [ -n "$VDU" ]; then
    echo "vtpmdom: cleaning up $VD"; NO_COLOR=1 timeout $(tmo 150) xl-vtpm vtpm destroy $VDU --yes 2>&1 | tail -n 3
  fi
  xl domid $VD >/dev/null 2>&1 && timeout $(tmo 60) xl destroy $VD
fi

############ (e5) lifecycle of a guest whose vTPM is its own domain (xl-vtpm create/destroy, xl-vtpm watch)
# `xl-vtpm create life-d.cfg` with vtpm = [ "backend=vtpm-life-d" ] (life-a.cfg, i.e. xen-configs/guest.cfg,
# with only name and vtpm changed): xl-vtpm makes the vTPM domain vtpm-life-d on first use (new
# disk, new TPM), boots it from its disk later, and `xl-vtpm watch` shuts it down when the guest
# goes. One RESULT per step:
#   lifedom-create      watcher running (started again if the life-* phases' is gone); both domains
#                       in `xl list`; `xl-vtpm list --json`: running, vtpm_running_domid = the vTPM
#                       domain; a new 4 MiB disk, first boot with --create; guest writes 0x81000010 + NV
#   lifedom-xl-destroy  plain `xl destroy life-d`: the watcher shuts vtpm-life-d down (clean stop,
#                       gone within 15 s: PERF), its loop device is released, the pair stopped
#   lifedom-recreate    the same config again: same vTPM UUID, its domain booted from the kept disk
#                       (same image, no --create); 0x81000010 + NV kept, same EK
#   lifedom-destroy     `xl-vtpm destroy life-d`: guest and vTPM domain gone, loop released, pair
#                       stopped; `xl-vtpm registry check` clean (running, and after); watcher stopped
LIFEDOM_MODE=$(arg xvtpm_lifedom); LIFEDOM_MODE=${LIFEDOM_MODE:-1}
LDN=life-d; LDV=vtpm-life-d; LDCFG=/etc/xen/life-d.cfg
LDU=""; LDEK=""; LDVOFF=0; LDVID=""; LDINO=""; LD_WATCH=""
LD_GONE_LIMIT=15000   # ms; below xl-vtpm's 20 s shutdown grace: a clean stop, not the xl destroy fallback
ld_vdomid() { xl domid $LDV 2>/dev/null; }
ld_vcon() { lcon $LDV $LDVOFF; }   # the vTPM domain's console, this boot
ld_img() { echo /var/lib/xvtpm/vtpms/$LDU/disk.img; }
ld_xlcfg() { echo /run/xvtpm/vtpms/$LDU.xl.cfg; }
ld_noloop() { [ -z "$(vd_loop $LDU)" ]; }
ld_chk() { echo "CHECK dom0 $1 $2 $3"; [ "$2" = PASS ] || err="$err $1"; }
# ld_domains: what xl-vtpm and xl say about the pair, one line each
ld_domains() {
  echo "xl list: $(xl list 2>/dev/null | awk 'NR>1{printf "%s(%s) ", $1, $2}')"
  LDROW=$(life_row $LDN)
  echo "xl-vtpm list --json $LDN: state=$(echo "$LDROW" | jf state) guest_running_domid=$(echo "$LDROW" | jf guest_running_domid) vtpm_domain=$(echo "$LDROW" | jf vtpm_domain) vtpm_domid=$(echo "$LDROW" | jf vtpm_domid) vtpm_running_domid=$(echo "$LDROW" | jf vtpm_running_domid) vtpm_pid=$(echo "$LDROW" | jf vtpm_pid)"
}
# ld_running TAG: the pair runs -- both domains, the registry row, the vTPM domain ready; sets LDVID
ld_running() {
  ld_domains
  _g=$(xl domid $LDN 2>/dev/null); LDVID=$(ld_vdomid)
  [ -n "$_g" ] && [ -n "$LDVID" ] && ld_chk lifedom-xl-list-$1 PASS "$LDN is domid $_g, $LDV is domid $LDVID" ||
    ld_chk lifedom-xl-list-$1 FAIL "$LDN: ${_g:-none}, $LDV: ${LDVID:-none}"
  if [ "$(echo "$LDROW" | jf state)" = running ] && [ "$(echo "$LDROW" | jf guest_running_domid)" = "$_g" ] &&
     [ "$(echo "$LDROW" | jf vtpm_domain)" = $LDV ] && [ -n "$LDVID" ] &&
     [ "$(echo "$LDROW" | jf vtpm_running_domid)" = "$LDVID" ] && [ "$(echo "$LDROW" | jf vtpm_domid)" = "$LDVID" ]; then
    ld_chk lifedom-list-running-$1 PASS "running, guest domid $_g, vtpm_domain $LDV, vtpm_domid = vtpm_running_domid = $LDVID"
  else ld_chk lifedom-list-running-$1 FAIL "$LDROW"; fi
  [ -n "$LDVID" ] && [ "$(xenstore-read /local/domain/$LDVID/data/xvtpm/ready 2>/dev/null)" = "$LDU" ] &&
    ld_vcon | grep -q "^VTPMDOM-READY uuid=$LDU" && ld_chk lifedom-vtpm-ready-$1 PASS "data/xvtpm/ready = $LDU, VTPMDOM-READY on its console" ||
    ld_chk lifedom-vtpm-ready-$1 FAIL "ready='$(xenstore-read /local/domain/${LDVID:-x}/data/xvtpm/ready 2>&1)'; console: $(ld_vcon | grep '^VTPMDOM-' | tail -n 2 | tr '\n' ' ')"
}
# ld_stopped TAG T0: after the guest went -- vTPM domain gone (clean stop), loop released, pair stopped
ld_stopped() {
  _end=$(( $(upi) + $(tmo 60) ))
  while xl domid $LDV >/dev/null 2>&1 && [ "$(upi)" -lt $_end ]; do sleep 0.1; done
  _tg=$(up)
  if xl domid $LDV >/dev/null 2>&1; then ld_chk lifedom-vtpmdom-gone-$1 FAIL "$LDV still there $(s_between $2 $_tg) s later: $(xl list $LDV 2>&1 | tail -n1)"; LD_GONE_MS=""
  else LD_GONE_MS=$(ms_up $2 $_tg); ld_chk lifedom-vtpmdom-gone-$1 PASS "$LDV (domid $LDVID) gone ${LD_GONE_MS} ms later"; fi
  ld_vcon | grep -q '^VTPMDOM-EXIT code=0' && ld_chk lifedom-clean-stop-$1 PASS "VTPMDOM-EXIT code=0 on its console (xl shutdown -> clean stop)" ||
    ld_chk lifedom-clean-stop-$1 FAIL "no 'VTPMDOM-EXIT code=0': $(ld_vcon | grep -E '^VTPMDOM-' | tail -n 2 | tr '\n' ' ')"
  wait_until 15 ld_noloop && ld_chk lifedom-loop-released-$1 PASS "no loop device on $(ld_img)" || ld_chk lifedom-loop-released-$1 FAIL "$(vd_loop $LDU)"
  if wait_until 15 life_state $LDN stopped; then
    _r=$(life_row $LDN)
    [ "$(echo "$_r" | jf vtpm_running_domid)" = null ] && [ "$(echo "$_r" | jf guest_running_domid)" = null ] &&
      ld_chk lifedom-pair-stopped-$1 PASS "state stopped, guest_running_domid and vtpm_running_domid null" ||
      ld_chk lifedom-pair-stopped-$1 FAIL "$_r"
  else ld_chk lifedom-pair-stopped-$1 FAIL "$(life_row $LDN)"; fi
}
# ld_diag: the vTPM domain's console and xenstore, dom0's backends, xl's log, the watcher, the manager
ld_diag() {
  ld_vcon | tail -n 30 | sed "s/^/[$LDV console] /"
  for _n in $LDV $LDN; do
    _i=$(xl domid $_n 2>/dev/null) && xenstore-ls -f /local/domain/$_i 2>/dev/null | grep -E "/$_i/(data|device|control)/" | head -n 40 | sed "s/^/[$_n xenstore] /"
  done
  xenstore-ls -f /local/domain/0/backend 2>/dev/null | grep -E '/backend/(vbd|vtpm)/' | head -n 40 | sed 's/^/[dom0 backend] /'
  ls /run/xvtpm/vtpms/ 2>&1 | tr '\n' ' ' | sed 's/^/[run\/xvtpm\/vtpms] /'; echo
  tail -n 20 /var/log/xen/xl-$LDV.log 2>/dev/null | sed "s/^/[xl-$LDV.log] /"
  tail -n 10 /var/log/xen/xen-hotplug.log 2>/dev/null | sed 's/^/[xen-hotplug.log] /'
  tail -n 10 $WLOG | sed 's/^/[watch.log] /'
  tail -n 15 $MGR_LOG 2>/dev/null | sed 's/^/[vtpmmgr] /'
  life_list
}

if [ "$LIFEDOM_MODE" = 0 ]; then
  for p in lifedom-create lifedom-xl-destroy lifedom-recreate lifedom-destroy; do result $p SKIPPED "disabled (XVTPM_TESTBED_LIFEDOM=0)"; done
else
  ##### lifedom-create: the vTPM domain made on first use, then the guest
  ph=lifedom-create; err=""
  if [ -z "$MGR_PID" ] || ! grep -q '"provisioned": *true' /tmp/status.json 2>/dev/null; then err="needs a provisioned vtpmmgr (mgr phases)"
  elif [ ! -x /usr/bin/xl-vtpm ] || [ ! -s $XVTPM_VTPMDOM_RAMDISK ]; then err="xl-vtpm or the vTPM-domain image $XVTPM_VTPMDOM_RAMDISK not built"
  elif past_deadline; then err="scenario deadline reached"
  else
    for m in loop xen-blkback; do modload $m || err="$err insmod-$m"; done
    wait_until 10 test -e /dev/loop-control || err="$err no-/dev/loop-control"
  fi
  if [ -z "$err" ] && ! pid_up $WATCH_PID; then
    # the life-* phases stopped theirs (or did not run): one for these phases, its own log
    if [ "$LIFE_MODE" = 0 ] && [ -n "$VTPM_UUID" ] && vtpm_exited; then   # no pair (see life-watch)
      timeout $(tmo 30) xl-vtpm mgr vtpm del $VTPM_UUID --yes 2>&1 | sed 's/^/[mgr vtpm del] /'
    fi
    WLOG=/var/log/xvtpm/watch-d.log
    if watch_start; then LD_WATCH=1; echo "xl-vtpm watch started for the lifedom phases (pid $WATCH_PID, $WLOG)"
    else err="$werr"; WATCH_PID=""; fi
  fi
  if [ -z "$err" ]; then
    sed -e "s|^name = .*|name = \"$LDN\"|" -e "s|^vtpm = .*|vtpm = [ \"backend=$LDV\" ]|" $LCFG0 > $LDCFG
    grep -E '^(name|uuid|vtpm|extra)' $LDCFG | sed 's/^/[life-d.cfg] /'
    LNAME=$LDN; LDVOFF=$(lines_of "$(clog $LDV)")
    t0=$(up)
    life_create $LDCFG d-create
    LD_CREATE_S=$(s_between $t0 $(up))
    LDU=$LUUID_NOW
    if [ $lrc != 0 ]; then err="xl-vtpm create exited $lrc: $(tail -n 3 /tmp/xl-life-d-create.out | tr '\n' ' ')"
    elif [ -z "$LDU" ]; then err="no vtpm_uuid for $LDN in xl-vtpm list --json"
    else
      ld_running create
      _img=$(ld_img)
      [ "$(stat -c %s $_img 2>/dev/null)" = 4194304 ] && [ -n "$(vd_loop $LDU)" ] && ld_chk lifedom-new-disk PASS "$_img (4 MiB, new) on $(vd_loop $LDU)" ||
        ld_chk lifedom-new-disk FAIL "$_img: $(ls -l $_img 2>&1); loop: $(losetup -a 2>&1 | tr '\n' ' ')"
      LDINO=$(stat -c %i $_img 2>/dev/null)
      grep -q -- "--uuid $LDU .*--create" $(ld_xlcfg) 2>/dev/null && ld_chk lifedom-new-tpm PASS "first boot manufactures: $(sed -n 's/^extra = .*-- //p' $(ld_xlcfg) | tr -d '"')" ||
        ld_chk lifedom-new-tpm FAIL "$(ld_xlcfg): $(grep '^extra' $(ld_xlcfg) 2>&1)"
      ld_vcon | grep -E '^VTPMDOM-|panic|Oops' | tail -n 6 | sed "s/^/[$LDV console] /"
      life_guest $LOFF d-create fresh
      LDEK=$LEK_NOW
      [ -n "$lerr" ] && err="$err guest-checks-failed:$lerr"
    fi
    echo "PERF lifedom-create-s=$LD_CREATE_S (xl-vtpm create life-d.cfg: new vTPM identity, disk, vTPM domain boot + manufacture + ready, then xl create of the guest)"
    [ -n "$err" ] && ld_diag
  fi
  if [ -z "$err" ]; then result $ph PASS "$LDN with vTPM $LDU in its own domain $LDV (domid $LDVID, made in this create, $LD_CREATE_S s); 0x81000010 + NV written"
  else result $ph FAIL "$err"; fi

  ##### lifedom-xl-destroy: plain xl destroy of the guest; the watcher shuts the vTPM domain down
  ph=lifedom-xl-destroy; err=""
  if [ -z "$LDU" ] || ! xl domid $LDN >/dev/null 2>&1 || [ -z "$WATCH_PID" ]; then result $ph SKIPPED "no running $LDN or no watcher (lifedom-create failed)"
  elif past_deadline; then result $ph SKIPPED "scenario deadline reached"
  else
    LDVID=$(ld_vdomid); _gd=$(xl domid $LDN)
    echo "INFO lifedom timeline xl-destroy-start $(wallt)"
    t0=$(up)
    ( timeout $(tmo 60) xl destroy $LDN > /tmp/xl-life-d-xldestroy.out 2>&1; echo $? > /tmp/xl-life-d-xldestroy.rc ) &
    _xp=$!; _snap=$(( $(upi) + 3 ))
    while kill -0 $_xp 2>/dev/null && [ "$(upi)" -lt $_snap ]; do sleep 0.1; done
    # still waiting: libxl waits (10 s) for the backend domain to remove its backend directory
    kill -0 $_xp 2>/dev/null && xenstore-ls -f /local/domain/$LDVID/backend/vtpm/$_gd 2>&1 | sed "s/^/[xl destroy still running after $(s_between $t0 $(up)) s: $LDV's backend] /"
    wait $_xp; rc=$(cat /tmp/xl-life-d-xldestroy.rc 2>/dev/null || echo 255)
    t1=$(up)
    sed 's/^/[xl destroy] /' /tmp/xl-life-d-xldestroy.out
    [ "$rc" = 0 ] || err="$err xl-destroy-rc=$rc"
    echo "PERF lifedom-xl-destroy-ms=$(ms_up $t0 $t1) (plain xl destroy $LDN, a guest whose vTPM backend is the domain $LDV)"
    grep -q "timed out while waiting for /local/domain/$LDVID/backend/vtpm/$_gd/0 to be removed" /tmp/xl-life-d-xldestroy.out &&
      echo "INFO lifedom xl-destroy-backend-timeout yes: libxl waited for $LDV (domid $LDVID) to remove its backend directory backend/vtpm/$_gd/0 and gave up (LIBXL_DESTROY_TIMEOUT); a driver domain removes it itself"
    ld_stopped xl-destroy $t1
    echo "INFO lifedom timeline vtpmdom-gone-seen $(wallt)"
    if [ -n "$LD_GONE_MS" ]; then
      echo "PERF lifedom-destroy-to-vtpmdom-gone-ms=$LD_GONE_MS (xl destroy $LDN returned -> $LDV gone from xl list, through the watcher's xl shutdown; xl destroy took $(ms_up $t0 $t1) ms)"
      [ $LD_GONE_MS -le $LD_GONE_LIMIT ] && ld_chk lifedom-gone-in-time PASS "${LD_GONE_MS} ms (limit $LD_GONE_LIMIT)" ||
        ld_chk lifedom-gone-in-time FAIL "${LD_GONE_MS} ms (limit $LD_GONE_LIMIT)"
    fi
    grep -q "$LDN: guest gone; vTPM $LDU stopped" $WLOG && ld_chk lifedom-watcher-said PASS "$(grep "$LDN: guest gone" $WLOG | tail -n1)" ||
      ld_chk lifedom-watcher-said FAIL "no '$LDN: guest gone; vTPM $LDU stopped' in $WLOG"
    tail -n 3 $WLOG | sed 's/^/[watch.log] /'
    ld_vcon | grep -E '^VTPMDOM-|signal|stopping' | tail -n 4 | sed "s/^/[$LDV console] /"
    [ -n "$err" ] && ld_diag
    if [ -z "$err" ]; then result $ph PASS "xl destroy $LDN: the watcher shut $LDV (domid $LDVID) down cleanly ${LD_GONE_MS} ms later; loop device released, pair stopped"
    else result $ph FAIL "$err"; fi
    # leave nothing running for the recreate (no verdict)
    xl domid $LDV >/dev/null 2>&1 && { echo "lifedom: $LDV still running; xl-vtpm destroy $LDN"; NO_COLOR=1 timeout $(tmo 150) xl-vtpm destroy $LDN 2>&1 | tail -n 3; }
  fi

  ##### lifedom-recreate: the same config again: the same vTPM, its domain booted from the kept disk
  ph=lifedom-recreate; err=""
  if [ -z "$LDU" ] || [ -z "$LDEK" ]; then result $ph SKIPPED "no vTPM or no first boot (lifedom-create failed)"
  elif past_deadline; then result $ph SKIPPED "scenario deadline reached"
  else
    _v0=$LDVID
    xl domid $LDN >/dev/null 2>&1 && timeout $(tmo 60) xl destroy $LDN
    LNAME=$LDN; LDVOFF=$(lines_of "$(clog $LDV)")
    t0=$(up)
    life_create $LDCFG d-recreate
    LD_RECREATE_S=$(s_between $t0 $(up))
    if [ $lrc != 0 ]; then err="xl-vtpm create exited $lrc: $(tail -n 3 /tmp/xl-life-d-recreate.out | tr '\n' ' ')"
    else
      [ "$LUUID_NOW" = "$LDU" ] && ld_chk lifedom-same-vtpm PASS "$LDU" || ld_chk lifedom-same-vtpm FAIL "now ${LUUID_NOW:-none}, first create $LDU"
      ld_running recreate
      [ -n "$LDVID" ] && [ "$LDVID" != "$_v0" ] && ld_chk lifedom-new-vtpm-domid PASS "$LDV domid $_v0 -> $LDVID" || ld_chk lifedom-new-vtpm-domid FAIL "domid ${LDVID:-none}, before $_v0"
      _cfg=$(ld_xlcfg)
      if [ -f $_cfg ] && grep -q -- "--state-block /dev/xvda" $_cfg && ! grep -q -- '--create' $_cfg && [ "$(stat -c %i $(ld_img) 2>/dev/null)" = "$LDINO" ]; then
        ld_chk lifedom-from-disk PASS "booted from the kept disk (same image, inode $LDINO, on $(vd_loop $LDU)), no --create: $(sed -n 's/^extra = .*-- //p' $_cfg | tr -d '"')"
      else ld_chk lifedom-from-disk FAIL "$_cfg: $(grep '^extra' $_cfg 2>&1); image inode $(stat -c %i $(ld_img) 2>&1), first $LDINO"; fi
      ld_vcon | grep -E '^VTPMDOM-|panic|Oops' | tail -n 6 | sed "s/^/[$LDV console] /"
      life_guest $LOFF d-recreate kept
      [ -n "$lerr" ] && err="$err guest-checks-failed:$lerr"
      [ -n "$LDEK" ] && [ "$LDEK" = "$LEK_NOW" ] && ld_chk lifedom-ek-stable PASS "EK sha256 $(echo $LDEK | cut -c1-16)... as at the first create" ||
        ld_chk lifedom-ek-stable FAIL "first=${LDEK:-none} now=${LEK_NOW:-none}"
    fi
    echo "PERF lifedom-recreate-s=$LD_RECREATE_S (xl-vtpm create life-d.cfg again: vTPM domain boot from its disk + ready, then xl create of the guest)"
    [ -n "$err" ] && ld_diag
    if [ -z "$err" ]; then result $ph PASS "same vTPM $LDU, $LDV booted from its kept disk (domid $_v0 -> $LDVID); 0x81000010 + NV kept, same EK"
    else result $ph FAIL "$err"; fi
  fi

  ##### lifedom-destroy: xl-vtpm destroy takes both down; the registry is clean
  ph=lifedom-destroy; err=""
  if [ -z "$LDU" ]; then result $ph SKIPPED "no vTPM (lifedom-create failed)"
  elif ! xl domid $LDN >/dev/null 2>&1; then result $ph SKIPPED "no running $LDN (lifedom-recreate failed)"
  else
    timeout $(tmo 60) xl-vtpm registry check > /tmp/lifedom-check1.out 2>&1; rc=$?
    sed 's/^/[registry check, life-d running] /' /tmp/lifedom-check1.out
    [ $rc = 0 ] && grep -q 'registry matches what runs' /tmp/lifedom-check1.out && ld_chk lifedom-registry-running PASS "no drift with $LDN + $LDV running" ||
      ld_chk lifedom-registry-running FAIL "rc=$rc"
    LDVID=$(ld_vdomid)
    t0=$(up)
    NO_COLOR=1 timeout $(tmo 150) xl-vtpm destroy $LDN > /tmp/xl-life-d-destroy.out 2>&1; rc=$?
    t1=$(up)
    sed 's/^/[xl-vtpm destroy] /' /tmp/xl-life-d-destroy.out | tail -n 10
    [ $rc = 0 ] && ld_chk lifedom-destroy-exit PASS "xl-vtpm destroy $LDN: exit 0 in $(s_between $t0 $t1) s" || ld_chk lifedom-destroy-exit FAIL "exit $rc"
    wait_until 30 domain_gone $LDN && ld_chk lifedom-guest-gone PASS "$LDN not in xl list" || ld_chk lifedom-guest-gone FAIL "$(xl list $LDN 2>&1 | tail -n1)"
    ld_stopped destroy $t1
    echo "PERF lifedom-destroy-s=$(s_between $t0 $t1) (xl-vtpm destroy: xl destroy of the guest, xl shutdown of the vTPM domain, clean stop, loop device released)"
    timeout $(tmo 60) xl-vtpm registry check > /tmp/lifedom-check2.out 2>&1; rc=$?
    sed 's/^/[registry check, end] /' /tmp/lifedom-check2.out
    [ $rc = 0 ] && grep -q 'registry matches what runs' /tmp/lifedom-check2.out && ld_chk lifedom-registry-end PASS "no drift after xl-vtpm destroy" ||
      ld_chk lifedom-registry-end FAIL "rc=$rc"
    life_list
    [ -n "$err" ] && ld_diag
    if [ -z "$err" ]; then result $ph PASS "xl-vtpm destroy $LDN: guest and $LDV gone (clean stop), loop device released, pair stopped; registry check clean"
    else result $ph FAIL "$err"; fi
  fi
  # nothing of it may outlive the section (teardown checks that no domU is left)
  if xl domid $LDN >/dev/null 2>&1 || xl domid $LDV >/dev/null 2>&1; then
    echo "lifedom: cleaning up (xl-vtpm destroy $LDN)"; NO_COLOR=1 timeout $(tmo 150) xl-vtpm destroy $LDN 2>&1 | tail -n 3
    for d in $LDN $LDV; do xl domid $d >/dev/null 2>&1 && timeout $(tmo 60) xl destroy $d; done
  fi
  if pid_up $WATCH_PID; then kill $WATCH_PID; wait_until 10 pid_down $WATCH_PID || kill -9 $WATCH_PID; fi
  tail -n 10 $WLOG | sed 's/^/[watch.log] /'
fi

############ (e3) tpm2-guest: patched xen-tpmfront -> /dev/tpmrm0 in the guest (guest/linux)
ph=tpm2-guest
if [ -z "$MGR_PID" ]; then result $ph SKIPPED "needs the manager (mgr phases)"
elif timeout $(tmo 600) sh /usr/lib/xvtpm/tpm2-guest-phase.sh /guest/xen-tpmfront-tpm2.ko; then
  result $ph PASS "patched xen-tpmfront: TPM 2.0 vTPM -> /dev/tpmrm0 + tpm2-tools via the kernel RM; TPM 1.2 vTPM stays 1.2"
else result $ph FAIL "tpm2-guest-phase.sh failed"; fi

############ (f) teardown
ph=teardown; err=""
if [ -n "$VTPM_PID" ] && ! vtpm_exited; then err="$err vtpm-domain-left-running"; timeout 30 xl-vtpm vtpm stop $VTPM_UUID; fi
if [ -n "$MGR_PID" ]; then
  kill $MGR_PID; wait_until 20 sh -c "! kill -0 $MGR_PID" || { err="$err vtpmmgr-did-not-exit"; kill -9 $MGR_PID; }
  tail -n 3 /var/log/xvtpm/vtpmmgr.log | sed 's/^/[vtpmmgr] /'
fi
for d in $(xl list 2>/dev/null | awk 'NR>1 && $2!=0 {print $1}'); do err="$err leftover-$d"; timeout 60 xl destroy "$d"; done
xl list
[ "$(xl list | awk 'NR>1' | wc -l)" = 1 ] || err="$err xl-list"
if [ -z "$err" ]; then result $ph PASS "all domUs gone, daemons stopped"; else result $ph FAIL "$err"; fi

# logs for run.sh (saved as ci/out/runs/<stamp>/dom0/<name>.log; printed on failure)
n=300; [ $NFAIL = 0 ] || n=400
# the lifecycle's logs first (the budget may cut the dump short)
dump_log watch /var/log/xvtpm/watch.log $n
dump_log watch-d /var/log/xvtpm/watch-d.log $n
[ -n "$LUUID" ] && dump_log vtpm-life-a $LVLOG $n
[ -n "$VLOG" ] && dump_log vtpm "$VLOG" $n
for f in $(ls /var/log/xen/console/guest-life-*.log 2>/dev/null) $(ls /var/log/xen/console/guest-*.log 2>/dev/null | grep -v /guest-life-); do
  [ -f "$f" ] && _b=$(basename $f .log); dump_log "console-${_b#guest-}" "$f" $n
done
dump_log vtpmmgr /var/log/xvtpm/vtpmmgr.log $n
dump_log attestd /var/log/xvtpm/attestd.log 100
dump_log vtpmmgr-2 /var/log/xvtpm/vtpmmgr-2.log $n
dump_log xen-hotplug /var/log/xen/xen-hotplug.log 100
dump_log xl-$VD /var/log/xen/xl-$VD.log 100
dump_log xl-$LDV /var/log/xen/xl-$LDV.log 100
for f in /tmp/xl-*.out /tmp/vtpm-create.err; do [ -s "$f" ] && dump_log "$(basename $f)" "$f" 100; done
[ $NFAIL = 0 ] || { xenstore-ls -f /local/domain > /tmp/xenstore.txt 2>&1; dump_log xenstore /tmp/xenstore.txt 200; }

echo "SUMMARY pass=$NPASS fail=$NFAIL skipped=$NSKIP${FAILS:+ failed:$FAILS}"
[ $NFAIL = 0 ]
