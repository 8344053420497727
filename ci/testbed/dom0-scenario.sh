#!/bin/sh
# dom0 /scenario.sh: the testbed scenario.  Every phase ends with
#   RESULT <phase> PASS|FAIL|SKIPPED <reason>
#   MARK <phase> up=<dom0 uptime>
# and run.sh turns consecutive MARKs into PHASE durations.  Exit 0 iff no FAIL.
# Switches come from the dom0 kernel command line (run.sh sets them):
#   xvtpm_mgr=auto|1|0   auto: xl-vtpm failures => SKIPPED; 1: required; 0: skip phase
#   xvtpm_vtpm=0|1       vTPM domain (tpmif backend) + vtpm guest phase
#   xvtpm_vtpm_ready=RE  console regex that says the vTPM domain watches backend/vtpm
export PATH=/usr/lib/xen-4.17/bin:/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
up() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "MARK $1 up=$(up)"; }
FAILS=""; NPASS=0; NFAIL=0; NSKIP=0
result() {  # phase status reason...
  p=$1; s=$2; shift 2
  echo "RESULT $p $s $*"
  case $s in PASS) NPASS=$((NPASS+1)) ;; FAIL) NFAIL=$((NFAIL+1)); FAILS="$FAILS $p" ;; *) NSKIP=$((NSKIP+1)) ;; esac
  mark "$p"
}
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n1; }
# wait_until SECONDS CMD...: poll every 0.2 s until CMD succeeds; deadline on dom0 uptime
wait_until() {
  _end=$(( $(cut -d. -f1 /proc/uptime) + $1 )); shift
  while ! "$@" >/dev/null 2>&1; do [ "$(cut -d. -f1 /proc/uptime)" -ge $_end ] && return 1; sleep 0.2; done
}
clog() { echo /var/log/xen/console/guest-$1.log; }
console_has() { grep -qE "$2" "$(clog "$1")" 2>/dev/null; }
show_console() { [ -f "$(clog "$1")" ] && sed -e 's/\r//' -e "s/^/[$1] /" "$(clog "$1")" | grep -v '^\[.*\] *$' | tail -n "${2:-40}"; }
domain_gone() { ! xl domid "$1" >/dev/null 2>&1; }
modload() {  # load a module and its dependencies (build-time .deps order)
  for m in $(cat /lib/modules/$1.deps 2>/dev/null || echo "$1"); do
    grep -q "^$(echo $m | tr - _) " /proc/modules || insmod /lib/modules/$m.ko || return 1
  done
}
MGR_MODE=$(arg xvtpm_mgr); MGR_MODE=${MGR_MODE:-auto}
VTPM_MODE=$(arg xvtpm_vtpm); VTPM_MODE=${VTPM_MODE:-0}
VTPM_READY=$(arg xvtpm_vtpm_ready); VTPM_READY=${VTPM_READY:-VTPMDOM-READY|backend ready|watching backend/vtpm}
echo "scenario: $(cat /etc/xvtpm-testbed.env | tr '\n' ' ') mgr=$MGR_MODE vtpm=$VTPM_MODE"
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
MGR_PID=""
if [ "$MGR_MODE" = 0 ]; then
  result mgr-serve SKIPPED "disabled (XVTPM_TESTBED_MGR=0)"
  result mgr-cli SKIPPED "disabled (XVTPM_TESTBED_MGR=0)"
elif [ ! -x /usr/bin/vtpmmgr ]; then
  st=SKIPPED; [ "$MGR_MODE" = 1 ] && st=FAIL
  result mgr-serve $st "vtpmmgr not built (target/*/vtpmmgr missing at image build)"
  result mgr-cli $st "needs vtpmmgr"
else
  ph=mgr-serve
  XVTPM_LOG=${XVTPM_LOG:-info} vtpmmgr --tcti device:/dev/tpmrm0 --state-dir /var/lib/xvtpm --run-dir /run/xvtpm serve \
      > /var/log/xvtpm/vtpmmgr.log 2>&1 &
  MGR_PID=$!
  mgr_ready() { grep -q '"ready":true' /var/log/xvtpm/vtpmmgr.log || ! kill -0 $MGR_PID; }
  wait_until 120 mgr_ready
  if grep -q '"ready":true' /var/log/xvtpm/vtpmmgr.log && kill -0 $MGR_PID 2>/dev/null; then
    tail -n 5 /var/log/xvtpm/vtpmmgr.log | sed 's/^/[vtpmmgr] /'
    ls -l /run/xvtpm 2>&1 | sed 's/^/[vtpmmgr] /'
    result $ph PASS "vtpmmgr serve ready on device:/dev/tpmrm0 (pid $MGR_PID)"
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

############ (d) guest: a PV domU with the guest initramfs, loads xen-tpmfront, powers off
ph=guest; err=""
t0=$(up)
timeout 180 xl create /etc/xen/guest1.cfg > /tmp/xl-guest1.out 2>&1 || err="$err xl-create-rc=$?"
echo "xl create guest1: $(awk -v a=$t0 -v b=$(up) 'BEGIN{printf "%.1f", b-a}') s"
[ -n "$err" ] && tail -n 20 /tmp/xl-guest1.out
if [ -z "$err" ]; then
  wait_until 180 console_has guest1 'GUEST-DONE' || err="$err no-GUEST-DONE-in-180s"
  console_has guest1 'GUEST-DONE role=plain result=ok' || err="$err guest-result"
  wait_until 60 domain_gone guest1 || { err="$err guest-did-not-power-off"; xl destroy guest1; }
fi
show_console guest1 20 | grep -E 'GUEST-|Kernel panic|Oops|segfault'
if [ -z "$err" ]; then result $ph PASS "PV domU booted, xen-tpmfront loaded, powered off (create->gone $(awk -v a=$t0 -v b=$(up) 'BEGIN{printf "%.1f", b-a}') s)"
else show_console guest1 60; result $ph FAIL "$err"; fi

############ (e) vtpm: vTPM domain (tpmif backend) + guest using /dev/tpm0 [XVTPM_TESTBED_VTPM=1]
ph=vtpm
if [ "$VTPM_MODE" != 1 ]; then
  result $ph SKIPPED "off by default (XVTPM_TESTBED_VTPM=1 enables it; vTPM domain image: $(sed -n 's/^vtpmdom_kind=//p' /etc/xvtpm-testbed.env))"
else
  err=""
  timeout 180 xl create /etc/xen/xvtpm-vtpmdom.cfg > /tmp/xl-vtpmdom.out 2>&1 || { err="$err vtpmdom-create"; tail -n 20 /tmp/xl-vtpmdom.out; }
  if [ -z "$err" ]; then
    wait_until 120 console_has xvtpm-vtpmdom "$VTPM_READY" || echo "vtpm domain: no ready marker /$VTPM_READY/ in 120 s; trying anyway"
    timeout 180 xl create /etc/xen/guest-vtpm.cfg > /tmp/xl-guest-vtpm.out 2>&1 || { err="$err guest-vtpm-create"; tail -n 20 /tmp/xl-guest-vtpm.out; }
  fi
  if [ -z "$err" ]; then
    wait_until 180 console_has guest-vtpm 'GUEST-DONE' || err="$err no-GUEST-DONE-in-180s"
    console_has guest-vtpm 'GUEST-DONE role=vtpm result=ok' || err="$err guest-tpm-failed"
    xl vtpm-list guest-vtpm 2>&1
  fi
  xenstore-ls -f /local/domain 2>/dev/null | grep '/vtpm/' | head -n 30
  show_console xvtpm-vtpmdom 30
  show_console guest-vtpm 30 | grep -E 'GUEST-|panic|Oops'
  for d in guest-vtpm xvtpm-vtpmdom; do domain_gone $d || timeout 60 xl destroy $d; done
  if [ -z "$err" ]; then result $ph PASS "guest used a vTPM served by the vtpm-domain backend"; else result $ph FAIL "$err"; fi
fi

############ (f) teardown
ph=teardown; err=""
if [ -n "$MGR_PID" ]; then
  kill $MGR_PID; wait_until 20 sh -c "! kill -0 $MGR_PID" || { err="$err vtpmmgr-did-not-exit"; kill -9 $MGR_PID; }
  tail -n 3 /var/log/xvtpm/vtpmmgr.log | sed 's/^/[vtpmmgr] /'
fi
for d in $(xl list 2>/dev/null | awk 'NR>1 && $2!=0 {print $1}'); do err="$err leftover-$d"; timeout 60 xl destroy "$d"; done
xl list
[ "$(xl list | awk 'NR>1' | wc -l)" = 1 ] || err="$err xl-list"
if [ -z "$err" ]; then result $ph PASS "all domUs gone, daemons stopped"; else result $ph FAIL "$err"; fi

echo "SUMMARY pass=$NPASS fail=$NFAIL skipped=$NSKIP${FAILS:+ failed:$FAILS}"
[ $NFAIL = 0 ]
