#!/bin/bash
# Boot Xen 4.17 + dom0 in QEMU (TCG) with swtpm as the physical TPM and run the
# dom0 scenario (xvtpm-testbed, ci/testbed/scenario).  Prints "PHASE <name> <seconds>" lines and
# the scenario's RESULT, CHECK and PERF lines; exits 0 only if the scenario passed.
#
#   ci/testbed/run.sh            # fetch (verify debs.lock) + build images + boot + scenario
#
# Env:
#   XVTPM_TESTBED_BUDGET   whole-run budget in seconds (2400; .ci/run gives 2700: a full default run took 1902 s with the two-host phases)
#   XVTPM_TESTBED_VTPM     dom0|0: vTPM phases with vtpm-domain as a dom0 process serving tpmif (dom0)
#   XVTPM_TESTBED_LIFE     1|0: lifecycle phases after the vTPM phases (xl-vtpm create/watch) (1)
#   XVTPM_TESTBED_VTPMDOM  1|0: vTPM-domain phases (the vTPM as its own unikernel-style domain) (1)
#   XVTPM_TESTBED_LIFEDOM  1|0: lifecycle of a guest whose vTPM is its own domain (xl-vtpm create with
#                          vtpm=["backend=NAME"], xl-vtpm watch) (1)
#   XVTPM_TESTBED_VTPMDOM_KERNEL  own|debian: the vTPM domains' kernel (own). own: the project's kernel
#                          (build-vtpmdom-kernel.sh: built once per input set, cached; like the device model it
#                          and the release vtpm-domain it carries are built before the budget clock starts,
#                          limit XVTPM_VTPMDOM_KERNEL_BUILD_TIMEOUT, default 1800 s), 32 MiB; the vtpmdom-debian
#                          phase still boots the Debian kernel's domain at 128 MiB beside it. debian: Debian's
#                          kernel with modules, 128 MiB, for every vTPM domain (the layout before the own kernel)
#   XVTPM_TESTBED_MIGRATE  1|0: moving a running guest with its vTPM (xl-vtpm migrate GUEST localhost
#                          --non-live: xl save + xl restore, as this Xen refuses log-dirty mode for PV guests)
#                          and P6, the downtime with and without a vTPM (1; 100-140 s; the Rust scenario only)
#   XVTPM_TESTBED_HVM      1|crb|ovmf|mig|0: hvm-tis, hvm-crb, hvm-ovmf and hvm-migrate phases (crb, ovmf, mig: that phase alone): an HVM
#                          guest (Linux) whose TPM is emulated by the TPM-enabled device model (build-qemu-xen.sh:
#                          built once, cached; the build runs before the budget clock starts, limited by
#                          XVTPM_QEMU_BUILD_TIMEOUT, default 3600 s) and served by a vtpm-domain process (xl-vtpm
#                          create): SeaBIOS with tpm-tis and with tpm-crb, and OVMF for Xen with the TPM 2.0
#                          modules (build-ovmf-xen.sh, built and cached the same way, XVTPM_OVMF_BUILD_TIMEOUT)
#                          with tpm-crb, whose measured boot's event log is replayed in the guest and in dom0
#                          (kept as hvm-ovmf-eventlog.bin in the run's directory); the same guest without a
#                          vTPM for P5's baseline (1; docs/hvm.md). With it the outer QEMU is the one
#                          build-qemu-xen.sh builds from Debian's 7.2 source with qemu-patches/0002 (Debian's
#                          own aborts when OVMF writes CR8 in the nested guest); XVTPM_TESTBED_QEMU names another
#   XVTPM_TESTBED_MGRDOM   1|0: mgrdom-* phases, run last: vtpmmgr in its own PV domain that owns the physical
#                          TPM (xl iomem = [ "fed40,5" ], dom0's tpm_tis unbound, then bound again), its state
#                          on a file-backed xvd disk across a domain restart; mgrdom-serve: the domain serves a
#                          vTPM domain + guest and dom0's admin CLI (`vtpmmgr bridge`), across its restart
#                          (1; docs/manager-domain.md)
#   XVTPM_TESTBED_LIBVIRT  1|0: a guest's life through Debian's libvirtd with the libxl driver and virsh, the way
#                          Nova drives Xen: define/start (the hook attaches the vTPM), libvirtd restart, reboot,
#                          save/restore, the refused migrate, destroy/undefine (1; dom0 +47 MB; docs/libvirt.md)
#   XVTPM_TESTBED_XHOST    1|0: xhost-setup and migrate-xhost: a second host "host-b" simulated in dom0 (a swtpm in
#                          dom0 as its TPM, manufactured by the same vendor CA; a second vtpmmgr on /run/xvtpm-b and
#                          /var/lib/xvtpm-b; host A's registry): a stopped vTPM moved to it with `xl-vtpm vtpm migrate`,
#                          a running guest moved to it and back with the cross-host `xl-vtpm migrate` (1)
#   XVTPM_TESTBED_TWOHOST  1|0: twohost-setup and migrate-2host: a second real Xen host (a second QEMU, booted when
#                          dom0 asks for it, its own swtpm, `xvtpm_role=hostb`), joined to host A by a private link
#                          (-netdev stream over a Unix socket); both reach the fleet registry, a private PostgreSQL
#                          cluster on this machine, through QEMU's user network (guestfwd to its Unix socket); a
#                          guest with its vTPM moved A -> B -> A with xl-vtpm migrate; with the libvirt phases, virsh
#                          migrate between the two hosts (1)
#   XVTPM_TESTBED_MGR      auto|1|0: xl-vtpm mgr phase; auto = SKIPPED when the CLI fails (auto)
#   XVTPM_TESTBED_NOBUILD  1: skip fetch.sh/build-images.sh (use the existing images)
#   XVTPM_TESTBED_ACCEL    tcg|kvm (tcg; kvm only on hosts with real VMX/SVM, see README)
#   XVTPM_TESTBED_CPU      QEMU -cpu (with the hvm-tis phase: max,-smap,-xsave, whose NPT gives Xen
#                          HAP, which HVM guests need as Debian's Xen has no shadow paging; measured ~20% faster
#                          for the PV phases too. XVTPM_TESTBED_HVM=0: qemu64. Plain "max" crashes dom0 (SMAP))
#   XVTPM_TESTBED_SMP / _MEM / _DOM0_MEM   2 / 1536 / 768M (2048 / 1024M with _XHOST=1, 2560 / 1280M with _XHOST=1 and the HVM phases; with XVTPM_TESTBED_HVM=0, _MIGRATE=0, _LIBVIRT=0, _MGRDOM=0 and _XHOST=0: 2 / 1024 / 512M)
#   XVTPM_TESTBED_STARTUP  swtpm --flags value (startup-clear)
#   XVTPM_TESTBED_NICE     nice level for QEMU (0: at nice 10 QEMU got almost no CPU beside other work and
#                          a loaded run overran the budget; 10 keeps a developer's desktop responsive)
#   XVTPM_TESTBED_DOM0_KERNEL  bzimage|elf: dom0 kernel as Debian's bzImage or the raw vmlinux (elf: Xen builds dom0 in 0.4 s instead of 5.7 s)
#   XVTPM_OUT              output dir (ci/out); each run in $XVTPM_OUT/runs/<stamp>, ci/out/latest -> it
#   XVTPM_CACHE            downloaded/unpacked packages and built inputs, outside the clone (cache-dir.sh)
#   XVTPM_TESTBED_STRICT   1: a pinned package Debian no longer publishes fails the run (default: the
#                          locks are re-resolved, one NOTE line says so, the locks as used are in the run's logs)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CI=$(dirname "$HERE")
OUT=${XVTPM_OUT:-$CI/out}
. "$HERE/cache-dir.sh"; CACHE=$XVTPM_CACHE
BUDGET=${XVTPM_TESTBED_BUDGET:-2400}
ACCEL=${XVTPM_TESTBED_ACCEL:-tcg}
# the HVM phases (hvm-tis, hvm-crb, hvm-ovmf; docs/hvm.md, "Measured in the Xen testbed")
HVM=${XVTPM_TESTBED_HVM:-1}
# hvm-tis adds ~34 MB to dom0's ramfs (device model + libraries, bzImage, HVM initramfs): at 512M dom0
# panicked unpacking it ("System is deadlocked on memory"); the HVM guest takes 256 MiB beside the others
# the migration phases' `xl save` writes a 160 MiB guest into dom0's ramfs: at 512M dom0 the OOM killer
# took vtpmmgr, xl-vtpm and libxl-save-helper
MIGRATE=${XVTPM_TESTBED_MIGRATE:-1}
# the mgrdom phases' image (19 MB) made a 512M dom0 panic unpacking its initramfs too
export XVTPM_TESTBED_MGRDOM=${XVTPM_TESTBED_MGRDOM:-1}
# the libvirt-* phases: libvirtd + libraries add ~47 MB to dom0's ramfs and `virsh save` writes the guest there
LIBVIRT=${XVTPM_TESTBED_LIBVIRT:-1}; export XVTPM_TESTBED_LIBVIRT=$LIBVIRT
# the xhost-* phases: migrate-xhost's non-live move writes the guest into dom0's ramfs, as the migration phases do
XHOST=${XVTPM_TESTBED_XHOST:-1}
# the two-host phases: host B's QEMU (1536 MiB, dom0 768M: it receives one 160 MiB guest's saved memory)
TWOHOST=${XVTPM_TESTBED_TWOHOST:-1}
DEFMEM=1024; DEFDOM0=512M; { [ "$HVM" != 0 ] || [ "$MIGRATE" != 0 ] || [ "$LIBVIRT" != 0 ] || [ "$XVTPM_TESTBED_MGRDOM" != 0 ] || [ "$XHOST" != 0 ]; } && { DEFMEM=1536; DEFDOM0=768M; }
# migrate-xhost holds a 160 MiB guest's saved memory twice in dom0's ramfs (the source's file and
# the receiver's copy): after every other phase's leftovers 768M ran out (the OOM killer took
# xl-vtpm and vtpmmgr in the CI run of 05:14); with the HVM phases migrate-xhost-hvm holds a
# 192 MiB HVM guest's twice, and hvm-migrate's --non-live round a 256 MiB one beside libvirtd
[ "$XHOST" != 0 ] && { DEFMEM=2048; DEFDOM0=1024M; }
[ "$XHOST" != 0 ] && [ "$HVM" != 0 ] && { DEFMEM=2560; DEFDOM0=1280M; }
[ "$TWOHOST" = 1 ] && [ "$DEFMEM" -lt 1536 ] && { DEFMEM=1536; DEFDOM0=768M; }
SMP=${XVTPM_TESTBED_SMP:-2}; MEM=${XVTPM_TESTBED_MEM:-$DEFMEM}; DOM0_MEM=${XVTPM_TESTBED_DOM0_MEM:-$DEFDOM0}
NICE=${XVTPM_TESTBED_NICE:-0}
case $ACCEL in
  tcg) DEFCPU=qemu64; [ "$HVM" != 0 ] && DEFCPU=max,-smap,-xsave
       CPU=${XVTPM_TESTBED_CPU:-$DEFCPU}; ACCEL_ARGS=(-accel tcg,thread=multi) ;;
  kvm) CPU=${XVTPM_TESTBED_CPU:-host}; ACCEL_ARGS=(-accel kvm) ;;
  *) echo "run.sh: XVTPM_TESTBED_ACCEL must be tcg or kvm" >&2; exit 2 ;;
esac

T_START=$(date +%s.%N)
now() { awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
remaining() { awk -v a="$T_START" -v b="$(date +%s.%N)" -v B="$BUDGET" 'BEGIN{r=B-(b-a); printf "%d", (r<0?0:r)}'; }
phase() { echo "PHASE $1 $2"; echo "PHASE $1 $2" >> "$L/phases.txt"; }
RUN_ID=$(date +%Y%m%d-%H%M%S)-$$
L=$OUT/runs/$RUN_ID; mkdir -p "$L"; ln -sfn "runs/$RUN_ID" "$OUT/latest"
echo "run.sh: logs in $L"
# one run at a time per cache (a developer's run beside CI's would rebuild what the other reads)
mkdir -p "$CACHE"; exec 9> "$CACHE/.run.lock"
flock -n 9 || { echo "run.sh: another testbed run holds $CACHE/.run.lock; waiting for it"; flock 9; }
export XVTPM_LOCK_OUT=$L

SWTPM_PID=""; QEMU_PID=""; SWTPM_B_PID=""; QEMU_B_PID=""; PG_DIR=""; PG_AS=()
# Whether pid $1 is still our child $2 (its comm): bash reaps a background child as soon as it
# ends, so its pid may already name another process (pid_max is 32768 here, and a parallel
# `cargo test` forks thousands) — a bare `kill $pid` could hit, say, another test's QEMU.
ours() { [ -n "$1" ] && [ "$(cat /proc/$1/comm 2>/dev/null)" = "$2" ] && grep -q "^PPid:[[:space:]]*$$\$" /proc/$1/status 2>/dev/null; }
# Waits until background child $1 has become program $2 (bash forks, then execs: until then its
# comm is bash's, and `ours` says no); fails the run if it ended first or took over 10 s. Without
# it a watch loop that asks `ours` at once may take a QEMU not yet exec'd for one that ended (a
# run at 10:57 on 2026-12-05 stopped its QEMU 1 s after starting it that way).
started() {
  local i
  for i in $(seq 200); do
    ours "$1" "$2" && return 0
    kill -0 "$1" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}
cleanup() {
  ours "$QEMU_PID" timeout && kill "$QEMU_PID" 2>/dev/null
  ours "$SWTPM_PID" swtpm && kill "$SWTPM_PID" 2>/dev/null
  ours "$QEMU_B_PID" timeout && kill "$QEMU_B_PID" 2>/dev/null
  ours "$SWTPM_B_PID" swtpm && kill "$SWTPM_B_PID" 2>/dev/null
  pg_stop
  true
}
# The two-host phases' fleet registry: a private PostgreSQL cluster (as the postgres user when run
# as root: PostgreSQL refuses root) listening on a Unix socket only, in a directory of its own
pg_start() {
  local bin
  bin=$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -n 1)
  [ -x "$bin/initdb" ] || fail "PostgreSQL is not installed (fetch.sh installs postgresql; the two-host phases need it)"
  command -v socat > /dev/null || fail "socat is not installed (fetch.sh installs it)"
  PG_BIN=$bin
  PG_DIR=$(mktemp -d /tmp/xvtpm-testbed-pg.XXXXXX) || fail "mktemp for the registry's cluster"
  chmod 0755 "$PG_DIR"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$PG_DIR" || fail "chown postgres $PG_DIR"; PG_AS=(runuser -u postgres --); fi
  "${PG_AS[@]}" "$bin/initdb" -D "$PG_DIR/data" -U xvtpm --auth=trust -E UTF8 > "$L/pg-initdb.log" 2>&1 ||
    { tail -n 20 "$L/pg-initdb.log"; fail "initdb of the fleet registry's cluster"; }
  "${PG_AS[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 -o "-k $PG_DIR -c listen_addresses=''" start > "$L/pg-start.log" 2>&1 ||
    { cat "$PG_DIR/postgres.log" 2>/dev/null | tail -n 20; fail "the fleet registry's PostgreSQL did not start"; }
  "${PG_AS[@]}" "$bin/createdb" -h "$PG_DIR" -U xvtpm xvtpm > "$L/pg-createdb.log" 2>&1 || { cat "$L/pg-createdb.log"; fail "createdb xvtpm"; }
  echo "run.sh: fleet registry: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on $PG_DIR/.s.PGSQL.5432 (database xvtpm); the hosts reach it at 10.0.2.100:5432"
}
pg_stop() {
  [ -n "$PG_DIR" ] || return 0
  "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop > /dev/null 2>&1
  cp "$PG_DIR/postgres.log" "$L/postgres.log" 2>/dev/null
  rm -rf "$PG_DIR"; PG_DIR=""
}
# A host's NICs (the two-host phases): $1 = 1 (host A) or 2 (B). The user network's only way out is
# the registry (restrict=on; guestfwd runs socat per connection); the link: A listens, B connects
net_args() {
  local srv=on; [ "$1" = 2 ] && srv=off
  NET=(-netdev "user,id=reg,restrict=on,guestfwd=tcp:10.0.2.100:5432-cmd:socat STDIO UNIX-CONNECT:$PG_DIR/.s.PGSQL.5432"
       -device "virtio-net-pci,netdev=reg,mac=52:54:00:0a:00:0$1"
       -netdev "stream,id=link,server=$srv,addr.type=unix,addr.path=$L/link.sock"
       -device "virtio-net-pci,netdev=link,mac=52:54:00:0b:00:0$1")
}
trap cleanup EXIT
trap 'echo "run.sh: interrupted"; exit 130' INT TERM

REPORTED=""
budget_report() {  # the slowest phases and what was left of the budget (also on failure)
  [ -z "$REPORTED" ] && [ -s "$L/phases.txt" ] || return 0
  REPORTED=1
  echo "run.sh: slowest phases (s): $(grep -vE '^PHASE (total|qemu-total) ' "$L/phases.txt" | sort -k3 -rn | head -n 6 | awk '{printf "%s%s %s", (NR>1?", ":""), $2, $3}')"
  echo "run.sh: budget ${BUDGET} s, used $(now) s, left $(remaining) s (load average $(cut -d' ' -f1-3 /proc/loadavg))"
}
fail() {  # reason
  budget_report
  echo "run.sh: FAIL: $*"
  for f in "$L/serial.log" "$L/swtpm.log" "$L/qemu.stderr" "$L/build.log" "$L"/dom0/*.log "$L/serial-b.log" "$L/qemu-b.stderr" "$L/postgres.log"; do
    [ -s "$f" ] || continue
    echo "===== last 100 lines of $f ====="; tail -n 100 "$f"
  done
  # what failed, last (a CI log is often read from its end): the failing checks and results
  [ -n "${FAIL_DETAIL:-}" ] && { echo "===== what failed ====="; echo "$FAIL_DETAIL"; }
  echo "TESTBED FAIL ($*) logs: $L"
  exit 1
}

# prebuild PHASE SCRIPT LIMIT WHAT KEY: a build the run needs, done once per input set and cached
# (ci/testbed/SCRIPT), before the budget clock starts (T_START is reset after it), limited to LIMIT
# s; its log is $L/SCRIPT.log minus .sh. BUILT = what the script named on its "SCRIPT: KEY: PATH"
# line. A failure fails the run, naming WHAT (which says how to skip the build).
prebuild() {
  local log=$L/${2%.sh}.log t
  t=$(date +%s.%N)
  timeout "$3" "$HERE/$2" > "$log" 2>&1 || { tail -n 30 "$log"; fail "$2 ($4)"; }
  BUILT=$(sed -n "s/^$2: $5: //p" "$log" | tail -n 1)
  [ -n "$BUILT" ] && [ -e "$BUILT" ] || fail "$2 named no $5"
  grep -E "^$2: (cached|built|$5)" "$log"
  phase "$1" "$(awk -v a=$t -v b=$(date +%s.%N) 'BEGIN{printf "%.1f", b-a}')"
  T_START=$(date +%s.%N)   # the budget is the testbed's, not the one-off build's
}

# ---- 0. the TPM-enabled Xen device model (the HVM phases) and the outer QEMU ----
QEMU_XEN=""
if [ "$HVM" != 0 ] && [ "${XVTPM_TESTBED_NOBUILD:-0}" != 1 ]; then
  prebuild qemu-xen-build build-qemu-xen.sh "${XVTPM_QEMU_BUILD_TIMEOUT:-3600}" \
    "the TPM-enabled device model; XVTPM_TESTBED_HVM=0 skips it" binary
  QEMU_XEN=$BUILT
fi
export XVTPM_QEMU_XEN=$QEMU_XEN

# ---- 0b. the vTPM domain's own kernel and the release vtpm-domain it carries: outside the budget ----
VTPMDOM_KERNEL=${XVTPM_TESTBED_VTPMDOM_KERNEL:-own}
case $VTPMDOM_KERNEL in own|debian) ;; *) echo "run.sh: XVTPM_TESTBED_VTPMDOM_KERNEL must be own or debian" >&2; exit 2 ;; esac
{ [ "${XVTPM_TESTBED_VTPMDOM:-1}" = 0 ] && [ "${XVTPM_TESTBED_LIFEDOM:-1}" = 0 ]; } && VTPMDOM_KERNEL=debian
VTPMDOM_KDIR=""
if [ "$VTPMDOM_KERNEL" = own ] && [ "${XVTPM_TESTBED_NOBUILD:-0}" != 1 ]; then
  prebuild vtpmdom-kernel-build build-vtpmdom-kernel.sh "${XVTPM_VTPMDOM_KERNEL_BUILD_TIMEOUT:-1800}" \
    "the vTPM domain's kernel; XVTPM_TESTBED_VTPMDOM_KERNEL=debian skips it" kernel
  VTPMDOM_KDIR=$BUILT
  [ -s "$VTPMDOM_KDIR/vmlinux" ] || fail "build-vtpmdom-kernel.sh named no kernel"
  # the small domain carries the release vtpm-domain (a debug one is 2.5x its size, all of it in the
  # domain's memory); cargo rebuilds only what changed
  t=$(date +%s.%N)
  ( cd "$HERE/../.." && nice -n "${XVTPM_NICE:-10}" cargo build --release -p vtpm-domain --locked ) > "$L/build-vtpm-domain-release.log" 2>&1 ||
    { tail -n 30 "$L/build-vtpm-domain-release.log"; fail "cargo build --release -p vtpm-domain (for the vTPM domain's image)"; }
  phase vtpm-domain-release-build "$(awk -v a=$t -v b=$(date +%s.%N) 'BEGIN{printf "%.1f", b-a}')"
  T_START=$(date +%s.%N)
fi
export XVTPM_VTPMDOM_KERNEL_DIR=$VTPMDOM_KDIR

# the outer QEMU: with the HVM phases the one built above (qemu-patches/0002: Debian's 7.2 aborts
# under TCG when a nested guest such as OVMF writes CR8 with a virtual interrupt pending)
OUTER_QEMU=${XVTPM_TESTBED_QEMU:-}; OUTER_ARGS=()
if [ -z "$OUTER_QEMU" ]; then
  OUTER_QEMU=qemu-system-x86_64
  if [ -n "$QEMU_XEN" ]; then
    OUTER_QEMU=$(sed -n 's/^build-qemu-xen.sh: outer: //p' "$L/build-qemu-xen.log" | tail -n 1)
    [ -x "$OUTER_QEMU" ] || fail "build-qemu-xen.sh named no outer QEMU"
    # it looks for firmware relative to itself (../share/qemu): name the host's directories
    # (SeaBIOS, the multiboot option ROM, iPXE: the qemu-system-x86 package's dependencies)
    OUTER_ARGS=(-L /usr/share/qemu -L /usr/share/seabios -L /usr/lib/ipxe/qemu)
  fi
fi

# ---- 0c. OVMF for Xen with TPM 2.0 (hvm-ovmf): built once per input set, outside the budget ----
OVMF_XEN=""
if { [ "$HVM" = 1 ] || [ "$HVM" = ovmf ]; } && [ "${XVTPM_TESTBED_NOBUILD:-0}" != 1 ]; then
  prebuild ovmf-xen-build build-ovmf-xen.sh "${XVTPM_OVMF_BUILD_TIMEOUT:-3600}" \
    "OVMF for Xen with TPM 2.0; XVTPM_TESTBED_HVM=0 or crb skips it" image
  OVMF_XEN=$BUILT
fi
export XVTPM_OVMF_XEN=$OVMF_XEN

# ---- 1. inputs: pinned debs + images ----
if [ "${XVTPM_TESTBED_NOBUILD:-0}" != 1 ]; then
  t=$(date +%s.%N)
  timeout "$(remaining)" "$HERE/fetch.sh" > "$L/build.log" 2>&1 || { grep -E 'ERROR' "$L/build.log"; fail "fetch.sh (debs.lock)"; }
  phase fetch "$(awk -v a=$t -v b=$(date +%s.%N) 'BEGIN{printf "%.1f", b-a}')"
  # drift from the repository's locks: one line, and the locks as used are kept with the run
  grep -h '^debs-resolve.sh: NOTE' "$L/build.log" || true
  echo "run.sh: locks as used: $L/testbed-debs.lock.used $L/linux-debs.lock.used"
  t=$(date +%s.%N)
  # The patched xen-tpmfront (guest/linux) for the TPM 2.0 guest phase.
  timeout "$(remaining)" "$HERE/../../guest/linux/build-module.sh" >> "$L/build.log" 2>&1 || fail "guest/linux/build-module.sh"
  phase guest-module "$(awk -v a=$t -v b=$(date +%s.%N) 'BEGIN{printf "%.1f", b-a}')"
  t=$(date +%s.%N)
  timeout "$(remaining)" "$HERE/build-images.sh" >> "$L/build.log" 2>&1 || fail "build-images.sh"
  phase build-images "$(awk -v a=$t -v b=$(date +%s.%N) 'BEGIN{printf "%.1f", b-a}')"
  grep -E '^build-images.sh: (OK|note)' "$L/build.log"
fi
case ${XVTPM_TESTBED_DOM0_KERNEL:-elf} in elf) DOM0_K=$CACHE/img/vmlinux ;; *) DOM0_K=$CACHE/img/vmlinuz ;; esac
for f in "$CACHE/img/xen" "$DOM0_K" "$OUT/img/dom0.img"; do [ -s "$f" ] || fail "missing $f"; done
for c in "$OUTER_QEMU" swtpm perl; do command -v "$c" >/dev/null || fail "$c not installed (fetch.sh installs it)"; done

# ---- 2. swtpm = the host's physical TPM ----
# its state as manufactured by build-images.sh (EKs + EK certificates from the testbed's vendor CA)
TPMDIR=$L/tpm; mkdir -p "$TPMDIR"
[ -s "$OUT/img/vendor/tpm-state/tpm2-00.permall" ] || fail "missing $OUT/img/vendor/tpm-state (build-images.sh manufactures the host TPM)"
cp -a "$OUT/img/vendor/tpm-state/." "$TPMDIR/"
swtpm socket --tpm2 --tpmstate dir="$TPMDIR" \
  --ctrl type=unixio,path="$TPMDIR/swtpm-sock" \
  --flags "${XVTPM_TESTBED_STARTUP:-startup-clear}" \
  --log file="$L/swtpm.log",level=1 > "$L/swtpm.stdout" 2>&1 &
SWTPM_PID=$!
started "$SWTPM_PID" swtpm || fail "swtpm did not start (see $L/swtpm.log)"
for i in $(seq 100); do [ -S "$TPMDIR/swtpm-sock" ] && break; ours "$SWTPM_PID" swtpm || break; sleep 0.1; done
[ -S "$TPMDIR/swtpm-sock" ] || fail "swtpm did not create its socket within 10 s"

# ---- 3. QEMU: Xen (multiboot) + dom0 kernel + dom0 initramfs ----
# conring_size: the scenario reads Xen's "Triple fault" lines back with `xl dmesg` after a failed
# phase (runner.rs: such a phase runs once more); the default 16 KiB ring holds a few HVM boots'
# firmware lines only
XEN_ARGS="console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all conring_size=2m dom0_mem=$DOM0_MEM,max:$DOM0_MEM noreboot ${XVTPM_TESTBED_XEN_EXTRA:-}"
# scenario switches ride on the dom0 command line (multiboot module: ',' must be ',,')
# rootfstype=ramfs: the ~190 MB initramfs would overflow a rootfs tmpfs (capped at half of dom0's RAM:
# "Initramfs unpacking failed: write error")
DOM0_ARGS="console=hvc0 earlyprintk=xen rootfstype=ramfs xvtpm_twohost=$TWOHOST xvtpm_mgr=${XVTPM_TESTBED_MGR:-auto} xvtpm_vtpm=${XVTPM_TESTBED_VTPM:-dom0} xvtpm_life=${XVTPM_TESTBED_LIFE:-1} xvtpm_vtpmdom=${XVTPM_TESTBED_VTPMDOM:-1} xvtpm_lifedom=${XVTPM_TESTBED_LIFEDOM:-1} xvtpm_migrate=$MIGRATE xvtpm_libvirt=$LIBVIRT xvtpm_hvm=$HVM xvtpm_mgrdom=$XVTPM_TESTBED_MGRDOM xvtpm_xhost=$XHOST ${XVTPM_TESTBED_DOM0_EXTRA:-}"
REM=$(remaining); [ "$REM" -gt 10 ] || fail "budget exhausted before boot"
# dom0's waits all give up by this dom0 uptime, leaving time to dump the logs and power off
# (dom0 uptime lags the host clock by the Xen boot, so this is conservative)
DOM0_ARGS="$DOM0_ARGS xvtpm_deadline=$(( REM > 90 ? REM - 45 : REM / 2 ))"
QEMU=(nice -n "$NICE" "$OUTER_QEMU" "${OUTER_ARGS[@]}" "${ACCEL_ARGS[@]}" -cpu "$CPU" -smp "$SMP" -m "$MEM"
      -display none -monitor none -serial stdio -no-reboot
      -kernel "$CACHE/img/xen" -append "$XEN_ARGS"
      -initrd "$DOM0_K ${DOM0_ARGS//,/,,},$OUT/img/dom0.img"
      -chardev socket,id=chrtpm,path="$TPMDIR/swtpm-sock"
      -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0)
if [ "$TWOHOST" = 1 ]; then pg_start; net_args 1; QEMU+=("${NET[@]}"); fi
printf '%q ' "${QEMU[@]}" > "$L/qemu-cmdline.txt"; echo >> "$L/qemu-cmdline.txt"
export T0=$(date +%s.%N)
timeout -k 5 "$REM" "${QEMU[@]}" < /dev/null 2> "$L/qemu.stderr" \
  > >(perl -MTime::HiRes=time -e '$|=1; while(<STDIN>){ s/\r//g; printf "[%8.3f] %s", time-$ENV{T0}, $_ }' > "$L/serial.log") &
QEMU_PID=$!
touch "$L/serial.log"
started "$QEMU_PID" timeout || fail "QEMU's timeout wrapper did not start"
echo "run.sh: QEMU pid $QEMU_PID ($OUTER_QEMU; cpu $CPU, smp $SMP, mem $MEM, dom0 $DOM0_MEM, budget left ${REM}s); serial: $L/serial.log"

# ---- 3b. host B (the two-host phases): booted when dom0 asks (HOSTB-BOOT on its console) ----
start_hostb() {
  local d=$L/tpm-b rem
  mkdir -p "$d"; cp -a "$OUT/img/vendor/tpm-state-b/." "$d/" || { echo "run.sh: no $OUT/img/vendor/tpm-state-b (build-images.sh)"; return 1; }
  swtpm socket --tpm2 --tpmstate dir="$d" --ctrl type=unixio,path="$d/swtpm-sock" \
    --flags "${XVTPM_TESTBED_STARTUP:-startup-clear}" --log file="$L/swtpm-b.log",level=1 > "$L/swtpm-b.stdout" 2>&1 &
  SWTPM_B_PID=$!
  started "$SWTPM_B_PID" swtpm || { echo "run.sh: host B's swtpm did not start"; return 1; }
  for i in $(seq 100); do [ -S "$d/swtpm-sock" ] && break; sleep 0.1; done
  rem=$(remaining)
  net_args 2
  QEMU_B=(nice -n "$NICE" "$OUTER_QEMU" "${OUTER_ARGS[@]}" "${ACCEL_ARGS[@]}" -cpu "$CPU" -smp "$SMP" -m 1536
      -display none -monitor none -serial stdio -no-reboot
      -kernel "$CACHE/img/xen" -append "${XEN_ARGS//dom0_mem=$DOM0_MEM,max:$DOM0_MEM/dom0_mem=768M,max:768M}"
      -initrd "$DOM0_K console=hvc0 earlyprintk=xen rootfstype=ramfs xvtpm_role=hostb xvtpm_deadline=$(( rem > 120 ? rem - 60 : rem / 2 )),$OUT/img/dom0.img"
      -chardev socket,id=chrtpm,path="$d/swtpm-sock" -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0
      "${NET[@]}")
  printf '%q ' "${QEMU_B[@]}" > "$L/qemu-b-cmdline.txt"; echo >> "$L/qemu-b-cmdline.txt"
  timeout -k 5 "$rem" "${QEMU_B[@]}" < /dev/null 2> "$L/qemu-b.stderr" \
    > >(perl -MTime::HiRes=time -e '$|=1; while(<STDIN>){ s/\r//g; printf "[%8.3f] %s", time-$ENV{T0}, $_ }' > "$L/serial-b.log") &
  QEMU_B_PID=$!
  started "$QEMU_B_PID" timeout || { echo "run.sh: host B's QEMU did not start"; return 1; }
  echo "run.sh: host B: QEMU pid $QEMU_B_PID (mem 1536, dom0 768M); serial: $L/serial-b.log"
}

# ---- 4. watch the serial log ----
status=""; done_at=""; last_marks=0; b_asked=""; last_b=0
PROGRESS='^\[ *[0-9.]+\] (MARK|RESULT|CHECK|PERF|INFO) '
# Xen or dom0 dying (guest consoles are echoed with a "[name] " prefix and do not match)
CRASH='^\[ *[0-9.]+\] (\(XEN\) .*(Hardware Dom0 crashed|Panic on CPU)|(\[ *[0-9.]+\] )?(Kernel panic|Initramfs unpacking failed))|KVM internal error'
while :; do
  if ! ours "$QEMU_PID" timeout; then break; fi
  if [ -z "$done_at" ]; then
    if grep -q 'MARK TESTBED-DONE' "$L/serial.log"; then done_at=$(date +%s)
    elif grep -qE "$CRASH" "$L/serial.log" "$L/qemu.stderr"; then status="crash: $(grep -m1 -hE "$CRASH" "$L/serial.log" "$L/qemu.stderr")"; sleep 3; break
    fi
    if [ "$TWOHOST" = 1 ] && [ -z "$b_asked" ] && grep -qE '^\[ *[0-9.]+\] HOSTB-BOOT' "$L/serial.log"; then
      b_asked=1; start_hostb || echo "run.sh: host B could not be started; the two-host phases will say so"
    fi
    if [ -s "$L/serial-b.log" ]; then
      n=$(grep -c -E "$PROGRESS" "$L/serial-b.log")
      if [ "$n" != "$last_b" ]; then grep -E "$PROGRESS" "$L/serial-b.log" | tail -n +$((last_b+1)) | sed 's/^/  host-b: /'; last_b=$n; fi
    fi
    n=$(grep -c -E "$PROGRESS" "$L/serial.log")
    if [ "$n" != "$last_marks" ]; then   # live progress
      grep -E "$PROGRESS" "$L/serial.log" | tail -n +$((last_marks+1)) | sed 's/^/  /'; last_marks=$n
    fi
  elif [ $(( $(date +%s) - done_at )) -ge 20 ]; then
    echo "run.sh: QEMU still running 20 s after TESTBED-DONE (dom0 poweroff hung); stopping it"; break
  fi
  sleep 0.5
done
if ours "$QEMU_PID" timeout; then kill $QEMU_PID; sleep 1; fi
wait $QEMU_PID; qrc=$?
QEMU_PID=""
T_END=$(date +%s.%N)
ours "$SWTPM_PID" swtpm && kill $SWTPM_PID 2>/dev/null; wait $SWTPM_PID 2>/dev/null; SWTPM_PID=""
if [ -n "$QEMU_B_PID" ]; then   # host B powers off once A said done; give it a minute to dump its logs
  for i in $(seq 120); do ours "$QEMU_B_PID" timeout || break; sleep 0.5; done
  ours "$QEMU_B_PID" timeout && { echo "run.sh: host B still running after host A ended; stopping it"; kill "$QEMU_B_PID"; sleep 1; }
  wait "$QEMU_B_PID" 2>/dev/null; QEMU_B_PID=""
  ours "$SWTPM_B_PID" swtpm && kill "$SWTPM_B_PID" 2>/dev/null; wait "$SWTPM_B_PID" 2>/dev/null; SWTPM_B_PID=""
  mkdir -p "$L/dom0-b"
  awk -v d="$L/dom0-b" '
    / LOGDUMP-BEGIN / { sub(/.* LOGDUMP-BEGIN /, ""); f = d "/" $1 ".log"; printf "" > f; next }
    / LOGDUMP-END /   { if (f) close(f); f = ""; next }
    f != ""           { sub(/^\[ *[0-9.]+\] \| ?/, ""); print >> f }' "$L/serial-b.log"
fi
pg_stop
sleep 0.2
grep -E "$PROGRESS" "$L/serial.log" | tail -n +$((last_marks+1)) | sed 's/^/  /'
# the scenario's log dumps (vtpm.log, guest consoles, vtpmmgr.log) -> $L/dom0/<name>.log
mkdir -p "$L/dom0"
awk -v d="$L/dom0" '
  / LOGDUMP-BEGIN / { sub(/.* LOGDUMP-BEGIN /, ""); f = d "/" $1 ".log"; printf "" > f; next }
  / LOGDUMP-END /   { if (f) close(f); f = ""; next }
  f != ""           { sub(/^\[ *[0-9.]+\] \| ?/, ""); print >> f }' "$L/serial.log"
# hvm-ovmf: the guest's TCG2 event log, dumped as hex, kept raw (xl-vtpm eventlog show FILE reads it)
if [ -s "$L/dom0/hvm-ovmf-eventlog-hex.log" ]; then
  perl -ne 'print pack("H*", $1) if /^([0-9a-f]+)$/' "$L/dom0/hvm-ovmf-eventlog-hex.log" > "$L/hvm-ovmf-eventlog.bin" &&
    echo "run.sh: hvm-ovmf event log: $L/hvm-ovmf-eventlog.bin ($(stat -c %s "$L/hvm-ovmf-eventlog.bin") bytes, sha256 $(sha256sum < "$L/hvm-ovmf-eventlog.bin" | cut -c1-64))"
fi

# ---- 5. marks -> phase durations (host clock, from QEMU start) ----
grep -E '^\[ *[0-9.]+\] MARK ' "$L/serial.log" | sed -E 's/^\[ *([0-9.]+)\] MARK ([^ ]+).*/\1 \2/' > "$L/marks.txt"
prev=0; prevname=xen+dom0-kernel-boot
while read -r ts name; do
  case $name in
    dom0-init) phase xen+dom0-kernel-boot "$(awk -v a=$prev -v b=$ts 'BEGIN{printf "%.1f", b-a}')" ;;
    TESTBED-DONE) ;;
    *) phase "$name" "$(awk -v a=$prev -v b=$ts 'BEGIN{printf "%.1f", b-a}')" ;;
  esac
  prev=$ts
done < "$L/marks.txt"
qemu_wall=$(awk -v a=$T0 -v b=$T_END 'BEGIN{printf "%.1f", b-a}')
grep -q "MARK TESTBED-DONE" "$L/serial.log" && phase poweroff "$(awk -v a=$prev -v b=$qemu_wall 'BEGIN{printf "%.1f", b-a}')"
phase qemu-total "$qemu_wall"
phase total "$(now)"
grep -E '^\[ *[0-9.]+\] (RESULT|SUMMARY|CHECK|PERF|INFO|WHY) ' "$L/serial.log" | sed -E 's/^\[ *[0-9.]+\] //' > "$L/results.txt"
# host B's own phases (its dom0's set-up), after A's
[ -s "$L/serial-b.log" ] && grep -E '^\[ *[0-9.]+\] (RESULT|SUMMARY) ' "$L/serial-b.log" | sed -E 's/^\[ *[0-9.]+\] /host-b: /' >> "$L/results.txt"
grep '^PERF ' "$L/results.txt" > "$L/perf.txt"
budget_report

# ---- 6. verdict ----
[ -n "$status" ] && fail "$status"
grep -q 'MARK TESTBED-DONE' "$L/serial.log" || fail "no TESTBED-DONE within the budget (${BUDGET}s; qemu rc=$qrc)"
B_FAIL=$( [ -s "$L/serial-b.log" ] && grep -E '^\[ *[0-9.]+\] RESULT [^ ]+ FAIL' "$L/serial-b.log" | head -n 3)
if ! grep -q 'MARK TESTBED-DONE.*result=PASS' "$L/serial.log" || [ -n "$B_FAIL" ]; then
  cat "$L/results.txt"
  # per failed phase its RESULT, its first two failing CHECKs (the later ones mostly follow from
  # them) and what it saw of the cause (WHY); the earliest failed phase last; then what Xen said of
  # a guest's crash or reboot (a guest restarted by on_reboot has a new domid, and every check after
  # it fails for reasons of its own); at most ~4 KB, as a CI record may be only the log's tail
  FAIL_DETAIL=$( {
    awk '/^CHECK [^ ]+ [^ ]+ FAIL/ { if (nc < 2) c[nc++] = substr($0, 1, 300); next }
         /^WHY / { if (nw < 6) w[nw++] = substr($0, 1, 640); next }
         /^RESULT [^ ]+ FAIL/ { b = substr($0, 1, 240); for (i = 0; i < nc; i++) b = b "\n" c[i]; for (i = 0; i < nw; i++) b = b "\n" w[i]; out = b (out == "" ? "" : "\n" out) }
         /^RESULT / { nc = 0; nw = 0 }
         END { if (out != "") print out }' "$L/results.txt"
    grep -E '\(XEN\).*([Tt]riple fault|[Cc]rash|shutdown|reboot)' "$L/serial.log" | grep -v 'Command line' | cut -c1-200 | tail -n 4
  } | tail -c 4000)
  fail "scenario failed: $(grep SUMMARY "$L/results.txt")"
fi
cat "$L/results.txt"
echo "TESTBED PASS (qemu rc=$qrc, total $(now) s) logs: $L"
