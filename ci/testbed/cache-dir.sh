# Sourced by the testbed scripts: where heavy, input-keyed artefacts live (downloaded .debs, the
# unpacked package root, the guest module's kernel tree, built images' inputs). Outside the clone,
# so a fresh checkout on the same machine (every CI run) reuses them: /var/cache/xvtpm-testbed for
# root, ~/.cache/xvtpm-testbed otherwise; XVTPM_CACHE overrides. Everything in it is keyed by the
# lock lines or stamps it was made from, so a stale entry is rebuilt, never used.
if [ -z "${XVTPM_CACHE:-}" ]; then
  if [ "$(id -u)" = 0 ]; then XVTPM_CACHE=/var/cache/xvtpm-testbed
  else XVTPM_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/xvtpm-testbed; fi
fi
export XVTPM_CACHE
