# Sourced by the scripts that build from a Debian source package (ci/testbed/build-qemu-xen.sh, and
# any other that needs `apt-get source`): a private apt configuration with bookworm's deb-src (the
# hosts' sources.list has none), the download, and the SHA256 check of every file against its pin.
#
#   apt_source_fetch APTDIR DESTDIR PACKAGE VERSION PINS
#     APTDIR   where the private sources.list, apt.conf, lists and cache live (reused; the index is
#              refreshed when older than 6 h)
#     DESTDIR  where the source files go (created; files already there with the pinned SHA256 are
#              not fetched again)
#     PINS     lines "FILE SHA256" (all the package's files: .dsc, .orig.tar.*, .debian.tar.*)
#   apt_source_print_pins APTDIR PACKAGE   # "FILE SHA256" lines of the package's current source
#
# apt also checks the files against the archive's signed Sources index; the pins make a re-upload
# under the same version (or a mirror serving something else) a hard error.  Both functions
# return non-zero with one ERROR line on stderr naming the cause and the fix.
apt_source_private() {  # APTDIR
  local apt=$1
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
  cat > "$apt/sources.list" <<EOS
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
EOS
  cat > "$apt/apt.conf" <<EOS
Dir::Etc::sourcelist "$apt/sources.list";
Dir::Etc::sourceparts "/nonexistent";
Dir::State::Lists "$apt/lists";
Dir::Cache "$apt/cache";
EOS
  if [ -z "$(find "$apt/lists" -maxdepth 1 -name '*Sources*' -mmin -360 -print -quit)" ]; then
    APT_CONFIG=$apt/apt.conf apt-get update -qq >/dev/null ||
      { echo "apt-source.sh: ERROR: apt-get update of bookworm's deb-src index failed (network? keyring /usr/share/keyrings/debian-archive-keyring.gpg?)" >&2; return 1; }
  fi
}

apt_source_print_pins() {  # APTDIR PACKAGE
  apt_source_private "$1" || return 1
  APT_CONFIG=$1/apt.conf apt-get source --print-uris "$2" 2>/dev/null | awk -F"'" '/^'\''http/{print $0}' |
    awk '{split($4, h, ":"); print $2, h[2]}'
}

apt_source_fetch() {  # APTDIR DESTDIR PACKAGE VERSION PINS
  local apt=$1 dest=$2 pkg=$3 ver=$4 pins=$5 f sum got need=0
  mkdir -p "$dest" || return 1
  while read -r f sum; do
    [ -f "$dest/$f" ] && [ "$(sha256sum < "$dest/$f" | cut -d' ' -f1)" = "$sum" ] || need=1
  done <<< "$pins"
  if [ $need = 1 ]; then
    apt_source_private "$apt" || return 1
    ( cd "$dest" && APT_CONFIG=$apt/apt.conf apt-get source --download-only -qq "$pkg=$ver" >/dev/null ) ||
      { echo "apt-source.sh: ERROR: apt-get source $pkg=$ver failed: the pinned version is gone from Debian; take the current pins from --print-pins and update the version and pins" >&2; return 1; }
  fi
  while read -r f sum; do
    [ -f "$dest/$f" ] || { echo "apt-source.sh: ERROR: $dest/$f missing after apt-get source $pkg=$ver (are the pins for this version?)" >&2; return 1; }
    got=$(sha256sum < "$dest/$f" | cut -d' ' -f1)
    [ "$got" = "$sum" ] || { echo "apt-source.sh: ERROR: sha256 mismatch for $dest/$f: pinned $sum, file has $got (delete it to fetch it again, or re-pin)" >&2; return 1; }
  done <<< "$pins"
}
