#!/usr/bin/env bash
# Benchmarks of the local stack against swtpm on the same machine (make bench).
#   P1 command latency, P2 deep quotes/s and p50/p99 latency with N = 1, 16, 256
#   requesters, batched vs unbatched, direct and behind a 100 ms/command delay
#   (about 4 minutes) and the same through the attestation service with 1 000 mTLS
#   tenants (about 1 minute more), P3 new vTPM → first answered command, P4 memory per vTPM.
# Usage: scripts/bench.sh [TARGET_DIR [xvtpm-bench options...]]
#   (binaries from TARGET_DIR, default target/release; options e.g. --only p1 --n 5000,
#   --only p2 --p2-n 1,16,256 --p2-secs 8 --p2-secs-delay 15; see xvtpm-bench --help)
# Writes (adds or replaces) today's section of BENCHMARKS.md; benchmarks left out
# with --only keep their subsections from an earlier run of the same day. Every
# process it starts is killed by PID when it ends, also on failure or Ctrl-C.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
[ $# -gt 0 ] && shift
for b in vtpmmgr vtpm-domain xl-vtpm xvtpm-attestd xvtpm-bench; do
  [ -x "$BIN/$b" ] || { echo "bench: $BIN/$b missing; run 'cargo build --workspace --release' (make bench does)"; exit 1; }
done
for t in swtpm swtpm_setup swtpm_localca; do
  command -v "$t" >/dev/null || { echo "bench: $t not found (apt-get install swtpm swtpm-tools)"; exit 1; }
done

# State files must be on a real disk (fsync cost is part of what we measure):
# /var/tmp rather than /tmp, which may be a tmpfs.
WORK=$(mktemp -d "${XVTPM_BENCH_DIR:-/var/tmp}/xvtpm-bench.XXXXXX")
# The runtime directory (sockets, runtime records) is /run/xvtpm in production: a tmpfs.
RUN=$(mktemp -d "${XVTPM_BENCH_RUN_DIR:-/dev/shm}/xvtpm-bench-run.XXXXXX")
PIDFILE=$WORK/pids
BENCH_PID=

# PIDs to stop: those the harness recorded, plus any process whose command line
# names our private work or runtime directory (e.g. a vtpm-domain that xl-vtpm
# was still starting when the harness died). Each recorded PID is killed only if
# it still runs one of our programs (no PID-reuse accidents).
our_pids() {
  local pid cmd
  for pid in $BENCH_PID $( [ -f "$PIDFILE" ] && cat "$PIDFILE" ); do
    [ -r "/proc/$pid/cmdline" ] || continue
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
    case "$cmd" in
      *swtpm*|*vtpm-domain*|*vtpmmgr*|*xvtpm-bench*|*xl-vtpm*) echo "$pid" ;;
    esac
  done
  for f in /proc/[0-9]*/cmdline; do
    pid=${f#/proc/}; pid=${pid%/cmdline}
    [ "$pid" = $$ ] && continue
    cmd=$( { tr '\0' ' ' <"$f"; } 2>/dev/null || true)  # the process may exit meanwhile
    case "$cmd" in
      *"$WORK"*|*"$RUN"*) echo "$pid" ;;
    esac
  done
}

kill_ours() { # $1 = signal
  local pid
  for pid in $(our_pids | sort -u); do kill "-$1" "$pid" 2>/dev/null || true; done
}

cleanup() {
  local rc=$?
  set +e
  kill_ours TERM
  for _ in $(seq 40); do
    alive=0
    for pid in $(our_pids | sort -u); do
      [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] && alive=1
    done
    [ $alive -eq 0 ] && break
    sleep 0.05
  done
  kill_ours KILL
  rm -rf "$RUN"
  if [ $rc -ne 0 ]; then
    echo "bench FAILED (rc=$rc); work directory with logs kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "bench: $(date -u '+%F %T') UTC, load average $(cut -d' ' -f1-3 /proc/loadavg), work dir $WORK"
export XVTPM_BENCH_TOP
# CPU use over one second just before the run (top's second sample), busiest four.
XVTPM_BENCH_TOP=$(top -b -n 2 -d 1 -w 256 2>/dev/null | awk '/^top -/ {s++} s==2 && $1 ~ /^[0-9]+$/ && n < 4 {printf "%s%s %s%%", (n ? ", " : ""), $12, $9; n++}')
cd "$ROOT"
"$BIN/xvtpm-bench" --bin "$BIN" --work "$WORK" --run-dir "$RUN" --pidfile "$PIDFILE" --out "$ROOT/BENCHMARKS.md" "$@" &
BENCH_PID=$!
wait "$BENCH_PID"
