#!/bin/bash
# Resolve the testbed's pinned Debian packages against the package index as it is today, and write
# the lock files as they will be used ("used locks"). Only index lookups: nothing is downloaded here
# (fetch.sh and guest/linux/build-module.sh download from the used locks and check every .deb's
# sha256 against them).
#
#   ci/testbed/debs-resolve.sh --out DIR LOCK...   # writes DIR/<dir>-<name>.used per LOCK (testbed-debs.lock.used)
#
# The Debian archive keeps one version per package name and suite, so an exact pin can vanish
# overnight (a kernel security upload replaces linux-kbuild-6.1 and linux-source-6.1 while the old
# ABI's image is still there). For each pinned line:
#   - published at its version with the same SHA256 in the index: kept as it is;
#   - published at its version with ANOTHER SHA256: a hard error (the bytes of a published version
#     changed: tampering or a broken mirror, never drift);
#   - not published any more: drift. The line's group is re-resolved as one consistent set:
#       kernel  linux-image-6.1.0-N-amd64-unsigned, linux-headers-6.1.0-N-{amd64,common},
#               linux-kbuild-6.1, linux-source-6.1: the newest ABI N whose members are all
#               published at one version (the testbed boots that kernel and builds modules for it);
#       xen     xen-*, libxen*, xenstore-utils: all at the candidate version of the first member;
#       others  one package each, at its candidate version.
#     New lines take the index's SHA256 (the index is the archive's signed Packages file, checked
#     by apt), and one NOTE line says what moved. XVTPM_TESTBED_STRICT=1 turns drift into an error
#     (exit 3) for bit-for-bit reproduction; `fetch.sh --update-lock` re-pins the repository's locks.
#
# Lock format (both locks): "package version arch sha256 file", '#' comments.
# Env: XVTPM_TESTBED_STRICT=1; XVTPM_NO_APT_UPDATE=1 (never run apt-get update; otherwise lists older
# than 6 h, or none, are refreshed once first); APT_CONFIG is honoured as by apt itself (the tests
# point it at a package index of their own).
# Exit: 0 resolved (drifted or not), 1 error, 2 usage, 3 drift refused by XVTPM_TESTBED_STRICT=1.
set -euo pipefail
die() { echo "debs-resolve.sh: ERROR: $*" >&2; exit "${2:-1}"; }

OUT=""; LOCKS=()
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT=${2:-}; shift 2 ;;
    -*) die "unknown option $1 (usage: debs-resolve.sh --out DIR LOCK...)" 2 ;;
    *) LOCKS+=("$1"); shift ;;
  esac
done
[ -n "$OUT" ] && [ ${#LOCKS[@]} -gt 0 ] || die "usage: debs-resolve.sh --out DIR LOCK..." 2
for l in "${LOCKS[@]}"; do [ -s "$l" ] || die "no lock file $l" 2; done
mkdir -p "$OUT"

# ---- the index ----
lists_dir() { eval "$(apt-config shell S Dir::State::lists/d)"; echo "${S:-/var/lib/apt/lists/}"; }
if [ "${XVTPM_NO_APT_UPDATE:-0}" != 1 ]; then
  d=$(lists_dir)
  if [ -z "$(find "$d" -maxdepth 1 -name '*Packages*' -mmin -360 -print -quit 2>/dev/null)" ]; then
    apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed (no package index to resolve the pins against)"
  fi
fi
# One look-up each for every name involved (a per-package apt-cache call costs ~1 s):
# INDEX lines "pkg version arch sha256" (records without SHA256, e.g. dpkg's status, are skipped),
# CAND lines "pkg candidate".
names=$( { for l in "${LOCKS[@]}"; do grep -v '^#' "$l" | awk 'NF{print $1}'; done
           apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$' 2>/dev/null | cut -d' ' -f1 |
             sed -E 's/^linux-image-(.*)-amd64-unsigned$/linux-image-\1-amd64-unsigned linux-headers-\1-amd64 linux-headers-\1-common/' | tr ' ' '\n'
         } | sort -u)
INDEX=$(mktemp); CAND=$(mktemp); trap 'rm -f "$INDEX" "$CAND"' EXIT
# shellcheck disable=SC2086
apt-cache show $names 2>/dev/null | awk '
  /^Package:/{p=$2} /^Version:/{v=$2} /^Architecture:/{a=$2} /^SHA256:/{s=$2}
  /^$/{if(p&&v&&a&&s)print p, v, a, s; p=v=a=s=""} END{if(p&&v&&a&&s)print p, v, a, s}' > "$INDEX"
# shellcheck disable=SC2086
apt-cache policy $names 2>/dev/null | awk '/^[^ ].*:$/{sub(/:$/,""); p=$1} /^  Candidate:/{print p, $2}' > "$CAND"
record() { awk -v p="$1" -v v="$2" '$1==p && $2==v {print $3, $4; exit}' "$INDEX"; }   # PKG VER -> "arch sha256" | nothing
candidate() { awk -v p="$1" '$1==p && $2!="(none)" {print $2; exit}' "$CAND"; }   # PKG -> version | nothing
debname() { echo "${1}_${2//:/%3a}_${3}.deb"; }   # as apt-get download names it

group_of() {
  case $1 in
    linux-image-6.1.0-*-amd64-unsigned|linux-headers-6.1.0-*-amd64|linux-headers-6.1.0-*-common|linux-kbuild-6.1|linux-source-6.1) echo kernel ;;
    xen-*|libxen*|xenstore-utils) echo xen ;;
    *) echo "pkg:$1" ;;
  esac
}

# ---- pass 1: what is still published ----
declare -A DRIFT=()       # group -> first reason
declare -A NEWLINE=()     # package -> "version arch sha256 file" for re-resolved lines
for l in "${LOCKS[@]}"; do
  while read -r p v a sum f; do
    case $p in ''|\#*) continue ;; esac
    rec=$(record "$p" "$v")
    if [ -z "$rec" ]; then
      g=$(group_of "$p"); [ -n "${DRIFT[$g]:-}" ] || DRIFT[$g]="$p $v"
      continue
    fi
    read -r ia isum <<< "$rec"
    [ "$isum" = "$sum" ] || die "$p $v is still published but its SHA256 changed: $(basename "$l") pins $sum, the package index says $isum. That is not drift: check the mirror (or re-pin knowingly with ci/testbed/fetch.sh --update-lock)."
  done < "$l"
done

# ---- pass 2: re-resolve each drifted group as one consistent set ----
kernel_as() {  # PKG ABI -> the kernel-set member of ABI that stands in PKG's place (PKG itself if unversioned)
  case $1 in
    linux-image-6.1.0-*-amd64-unsigned) echo "linux-image-$2-amd64-unsigned" ;;
    linux-headers-6.1.0-*-amd64) echo "linux-headers-$2-amd64" ;;
    linux-headers-6.1.0-*-common) echo "linux-headers-$2-common" ;;
    *) echo "$1" ;;
  esac
}
kernel_members() {  # ABI -> the kernel-set members the locks hold, renamed to ABI
  local l p
  for l in "${LOCKS[@]}"; do
    while read -r p _; do [ "$(group_of "$p")" = kernel ] && kernel_as "$p" "$1"; done < "$l"
  done
}
NOTES=(); NEW_KABI=""
resolve_set() {  # version pkg... : every pkg published at version -> fills NEWLINE, else returns 1
  local v=$1 p rec; shift
  declare -A got=()
  for p in "$@"; do
    rec=$(record "$p" "$v"); [ -n "$rec" ] || return 1
    got[$p]=$rec
  done
  for p in "$@"; do read -r a s <<< "${got[$p]}"; NEWLINE[$p]="$v $a $s $(debname "$p" "$v" "$a")"; done
}
for g in "${!DRIFT[@]}"; do
  [ "${XVTPM_TESTBED_STRICT:-0}" = 1 ] &&
    die "${DRIFT[$g]} is no longer published (XVTPM_TESTBED_STRICT=1 refuses drift; ci/testbed/fetch.sh --update-lock && guest/linux/build-module.sh --update-lock re-pin)" 3
  case $g in
    kernel)
      ok=""
      for img in $(grep -oE '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned ' "$CAND" | sort -rV); do
        abi=${img#linux-image-}; abi=${abi%-amd64-unsigned}
        v=$(candidate "$img"); [ -n "$v" ] || continue
        # shellcheck disable=SC2046
        if resolve_set "$v" $(kernel_members "$abi" | sort -u); then ok="$abi $v"; NEW_KABI=$abi; break; fi
      done
      [ -n "$ok" ] || die "${DRIFT[$g]} is no longer published and no 6.1 kernel ABI has its image, headers, kbuild and source at one version in the package index"
      NOTES+=("kernel set -> $ok (${DRIFT[$g]} is gone)") ;;
    xen)
      members=(); first=""
      for l in "${LOCKS[@]}"; do while read -r p _; do [ "$(group_of "$p")" = xen ] && members+=("$p") && : "${first:=$p}"; done < <(grep -v '^#' "$l"); done
      v=$(candidate "$first")
      resolve_set "$v" "${members[@]}" || die "${DRIFT[$g]} is no longer published and the Xen packages are not all published at $first's candidate version $v"
      NOTES+=("xen set -> $v (${DRIFT[$g]} is gone)") ;;
    pkg:*)
      p=${g#pkg:}; v=$(candidate "$p")
      [ -n "$v" ] && resolve_set "$v" "$p" || die "${DRIFT[$g]} is no longer published and $p has no candidate in the package index"
      NOTES+=("$p -> $v (${DRIFT[$g]} is gone)") ;;
  esac
done

# ---- write the used locks (same order; a re-resolved group's lines replaced in place) ----
for l in "${LOCKS[@]}"; do
  u=$OUT/$(basename "$(dirname "$(readlink -f "$l")")")-$(basename "$l").used
  {
    echo "# $(basename "$l") as used on $(date -u +%Y-%m-%dT%H:%M:%SZ)${NOTES:+ (drift: ${NOTES[*]})}"
    while read -r line; do
      read -r p _ <<< "$line"
      case $p in ''|\#*) continue ;; esac
      g=$(group_of "$p")
      if [ -n "${DRIFT[$g]:-}" ]; then
        [ "$g" = kernel ] && p=$(kernel_as "$p" "$NEW_KABI")
        echo "$p ${NEWLINE[$p]}"
      else
        echo "$line"
      fi
    done < "$l"
  } > "$u.tmp"
  mv "$u.tmp" "$u"
done
if [ ${#NOTES[@]} -gt 0 ]; then
  echo "debs-resolve.sh: NOTE: Debian moved on since the locks were written; using ${NOTES[*]}; the locks as used are in $OUT (XVTPM_TESTBED_STRICT=1 refuses drift)"
fi
