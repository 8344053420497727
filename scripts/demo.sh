#!/usr/bin/env bash
# The main job: the whole local stack, end to end, with real parts only.
#   swtpm (the "physical" TPM) → vtpmmgr → two vtpm-domain vTPMs → tpm2-tools.
# Usage: scripts/demo.sh [TARGET_DIR]   (binaries from TARGET_DIR, default target/debug)
set -euo pipefail

BIN=${1:-${CARGO_TARGET_DIR:-$(pwd)/target}/debug}
for b in vtpmmgr vtpm-domain xl-vtpm; do
  [ -x "$BIN/$b" ] || { echo "demo: $BIN/$b missing; run 'cargo build --workspace' (make demo does)"; exit 1; }
done
WORK=$(mktemp -d /tmp/xvtpm-demo.XXXXXX)
export XVTPM_RUN_DIR=$WORK/run XVTPM_STATE_DIR=$WORK/state
XL="$BIN/xl-vtpm --vtpm-domain $BIN/vtpm-domain"
SWTPM_PID= MGR_PID=
T0=$(date +%s%N)
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ok() { printf '   ok: %s\n' "$*"; }
fail() { printf '   FAIL: %s\n' "$*"; exit 1; }

cleanup() {
  local rc=$?
  set +e
  for u in $($XL vtpm list --json 2>/dev/null | python3 -c 'import json,sys; [print(r["uuid"]) for r in json.load(sys.stdin) if r["state"]=="running"]' 2>/dev/null); do
    $XL vtpm stop "$u" >/dev/null 2>&1
  done
  [ -n "$MGR_PID" ] && kill "$MGR_PID" 2>/dev/null && wait "$MGR_PID" 2>/dev/null
  [ -n "$SWTPM_PID" ] && kill "$SWTPM_PID" 2>/dev/null
  if [ $rc -ne 0 ]; then
    echo; echo "demo FAILED (rc=$rc). Logs kept in $WORK:"
    for f in "$WORK"/swtpm.log "$WORK"/vtpmmgr.log "$WORK"/state/vtpms/*/vtpm.log; do
      [ -f "$f" ] && { echo "--- tail $f"; tail -n 30 "$f"; }
    done
  else
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT

step "1. swtpm as the physical TPM"
mkdir -p "$WORK/hwtpm"
# swtpm takes a port pair (P, P+1). Another program may hold either or take it between our pick
# and swtpm's bind: then swtpm exits, and we try another pair instead of failing the demo.
alive() { [ -r "/proc/$1/stat" ] && ! grep -qs '^[0-9]* (.*) Z' "/proc/$1/stat"; }   # not a zombie
for attempt in $(seq 20); do
  PORT=$(( 20000 + RANDOM % 20000 ))
  [ "$attempt" -eq 1 ] && [ -n "${XVTPM_DEMO_PORT:-}" ] && PORT=$XVTPM_DEMO_PORT
  swtpm socket --tpm2 --server type=tcp,port=$PORT,bindaddr=127.0.0.1 --ctrl type=tcp,port=$((PORT+1)),bindaddr=127.0.0.1 \
    --tpmstate dir="$WORK/hwtpm" --flags not-need-init,startup-clear --log file="$WORK/swtpm.log" &
  SWTPM_PID=$!
  up=
  for _ in $(seq 100); do
    alive "$SWTPM_PID" || break          # a bind failed: swtpm is gone
    (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/$((PORT+1))) 2>/dev/null && { up=1; break; }
    sleep 0.05
  done
  # both ports answer and swtpm still runs: they are its own (swtpm exits when either bind fails)
  [ -n "$up" ] && sleep 0.1 && alive "$SWTPM_PID" && break
  kill "$SWTPM_PID" 2>/dev/null || true; wait "$SWTPM_PID" 2>/dev/null || true; SWTPM_PID=
  echo "   port pair $PORT/$((PORT+1)) busy, trying another ($attempt)"
done
[ -n "$SWTPM_PID" ] || fail "swtpm could not bind any of 20 port pairs (see $WORK/swtpm.log)"
ok "swtpm pid $SWTPM_PID on port $PORT"

step "2. vtpmmgr: refuses to serve until provisioned, then provision"
"$BIN/vtpmmgr" --tcti "swtpm:host=127.0.0.1,port=$PORT" --state-dir "$WORK/state/mgr" --vtpm-state-dir "$WORK/state" --run-dir "$XVTPM_RUN_DIR" serve \
  >/dev/null 2>"$WORK/vtpmmgr.log" &
MGR_PID=$!
for _ in $(seq 200); do [ -S "$XVTPM_RUN_DIR/admin.sock" ] && break; sleep 0.05; done
set +e; $XL vtpm create >/dev/null 2>&1; rc=$?; set -e
[ $rc -eq 4 ] || { echo "expected exit 4 (not provisioned), got $rc"; exit 1; }
ok "unprovisioned manager refused vtpm create (exit 4)"
t=$(date +%s%N); $XL mgr provision --yes --pcrs 0-7 | sed 's/^/   /'; ok "provisioned in $(ms $t) ms"

step "3. two vTPMs"
t=$(date +%s%N); A=$($XL vtpm create --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["uuid"])'); ok "vTPM A $A created in $(ms $t) ms (EK included)"
t=$(date +%s%N); B=$($XL vtpm create --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["uuid"])'); ok "vTPM B $B created in $(ms $t) ms"
$XL vtpm list | sed 's/^/   /'
tcti() { $XL vtpm show "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tcti"])'; }

exercise() { # $1 = name, $2 = uuid
  export TPM2TOOLS_TCTI; TPM2TOOLS_TCTI=$(tcti "$2")
  local d="$WORK/$1"; mkdir -p "$d"
  tpm2_startup -c
  [ "$(tpm2_getrandom --hex 16 | wc -c)" -eq 32 ] && ok "$1: getrandom" || fail "$1: getrandom"
  tpm2_pcrextend 16:sha256=$(printf '%s' "$1" | sha256sum | cut -c1-64)
  tpm2_pcrread sha256:16 | grep -q "16: 0x" && ok "$1: pcrextend + pcrread" || fail "$1: pcrextend + pcrread"
  tpm2_createek -c "$d/ek.ctx" -G rsa -u "$d/ek.pub" >/dev/null && ok "$1: createprimary (EK)" || fail "$1: createprimary (EK)"
  tpm2_createak -C "$d/ek.ctx" -c "$d/ak.ctx" -G ecc -g sha256 -s ecdsa -u "$d/ak.pub" -f pem -n "$d/ak.name" >/dev/null
  tpm2_flushcontext -t; tpm2_flushcontext -s
  tpm2_quote -c "$d/ak.ctx" -l sha256:0,16 -q 5ca1ab1e -m "$d/q.msg" -s "$d/q.sig" -o "$d/q.pcrs" -g sha256 >/dev/null
  tpm2_checkquote -u "$d/ak.pub" -m "$d/q.msg" -s "$d/q.sig" -f "$d/q.pcrs" -g sha256 -q 5ca1ab1e >/dev/null && ok "$1: quote + checkquote" || fail "$1: quote + checkquote"
  tpm2_flushcontext -t
  # the EK certificate at the TCG index, issued by the group's EK CA (a key in the physical TPM)
  tpm2_nvread 0x1c00002 -o "$d/ekcert.der" >/dev/null 2>&1 && openssl x509 -inform der -in "$d/ekcert.der" -out "$d/ekcert.pem" &&
    openssl verify -CAfile "$WORK/ek-ca.pem" "$d/ekcert.pem" >/dev/null &&
    ok "$1: EK certificate at 0x1c00002 verifies against the group's EK CA (openssl verify)" || fail "$1: EK certificate"
}

step "4. tpm2-tools against each vTPM"
$XL mgr group ca-cert default --out "$WORK/ek-ca.pem" >/dev/null
exercise A "$A"
exercise B "$B"

step "4b. only root and a vTPM's consumer reach it"
ok "A listens on its own Unix sockets: TPM2TOOLS_TCTI=$(tcti "$A")"
chmod 711 "$WORK"   # let other users traverse to the sockets, as /run allows
if setpriv --reuid=nobody --regid=nogroup --clear-groups env TPM2TOOLS_TCTI="$(tcti "$A")" tpm2_getrandom 8 >/dev/null 2>&1; then
  fail "user nobody used vTPM A"
else
  ok "user nobody is refused by vTPM A (created without --consumer)"
fi
C=$($XL vtpm create --consumer nobody --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["uuid"])')
setpriv --reuid=nobody --regid=nogroup --clear-groups env TPM2TOOLS_TCTI="$(tcti "$C")" tpm2_getrandom --hex 8 >/dev/null &&
  ok "user nobody uses vTPM C, created with --consumer nobody" || fail "the consumer of vTPM C was refused"
$XL vtpm destroy "$C" --yes >/dev/null

step "5. persistent key + NV in A, restart A, check they survived"
export TPM2TOOLS_TCTI; TPM2TOOLS_TCTI=$(tcti "$A")
tpm2_createprimary -C o -G ecc -c "$WORK/A/srk.ctx" >/dev/null
tpm2_evictcontrol -C o -c "$WORK/A/srk.ctx" 0x81000001 >/dev/null
tpm2_flushcontext -t
tpm2_nvdefine 0x1500016 -C o -s 16 -a "ownerread|ownerwrite" >/dev/null
printf 'xvtpm-demo-nv!!!' | tpm2_nvwrite 0x1500016 -C o -i -
EK_BEFORE=$(tpm2_readpublic -c 0x81010001 | grep '^name:')
$XL vtpm stop "$A" | sed 's/^/   /'
t=$(date +%s%N); $XL vtpm start "$A" | sed 's/^/   /'; ok "restarted in $(ms $t) ms"
TPM2TOOLS_TCTI=$(tcti "$A")
tpm2_getcap handles-persistent | grep -q 0x81000001 && ok "persistent key 0x81000001 survived" || fail "persistent key 0x81000001 survived"
[ "$(tpm2_nvread 0x1500016 -C o -s 16)" = "xvtpm-demo-nv!!!" ] && ok "NV index 0x1500016 survived" || fail "NV index 0x1500016 survived"
[ "$(tpm2_readpublic -c 0x81010001 | grep '^name:')" = "$EK_BEFORE" ] && ok "same EK after restart ($EK_BEFORE)" || fail "same EK after restart ($EK_BEFORE)"

step "6. destroy B"
$XL vtpm destroy "$B" --yes | sed 's/^/   /'
[ ! -e "$XVTPM_STATE_DIR/vtpms/$B" ] && ok "B's state is gone" || fail "B's state is gone"
$XL vtpm list | sed 's/^/   /'

step "summary"
echo "   physical TPM: swtpm (software — the manager warned INSECURE, as it should)"
echo "   vTPMs created: 2, exercised with tpm2-tools: 2, restarted with state intact: 1, destroyed: 1"
echo "   demo finished in $(ms $T0) ms"
