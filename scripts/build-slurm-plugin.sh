#!/usr/bin/env bash
# Build the Slurm task plugin task/jobcage and install the batch-system hook scripts.
#
#   scripts/build-slurm-plugin.sh                 as root (make bootstrap): build + install, link the hooks
#   scripts/build-slurm-plugin.sh --out DIR       build DIR/task_jobcage.so only (any user; the tests use it)
#   options: --jobcage PATH   the jobcage the plugin runs when none lies next to the .so
#                             (default /usr/local/bin/jobcage)
#
# Installs (idempotent: rebuilds only when the source, the Slurm version or the options changed):
#   /usr/local/lib/jobcage/slurm/task_jobcage.so          (+ .stamp: what it was built from)
#   /usr/local/libexec/jobcage/{slurm,pbs,htcondor,generic}/<hook>  -> symlinks into this checkout
#
# The plugin must carry the exact Slurm version (major.minor.micro) of the slurmd that loads it: run this
# again after every Slurm update.  Without slurmd on the node, or with a Slurm other than 22.05 (whose task
# plugin interface the plugin implements), the plugin is skipped with a message (not an error).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
src=$top/hooks/slurm/task_jobcage.c
out=""
jobcage_bin=/usr/local/bin/jobcage
install_dir=/usr/local/lib/jobcage/slurm
libexec=/usr/local/libexec/jobcage

log() { printf 'build-slurm-plugin: %s\n' "$*"; }
die() { printf 'build-slurm-plugin: error: %s\n' "$*" >&2; exit 1; }

while (($#)); do
  case $1 in
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --jobcage) jobcage_bin=${2:?--jobcage needs a path}; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

# Slurm's version as SLURM_VERSION_NUMBER (0xMMmmuu).  slurmd -V prints e.g. "slurm-wlm 22.05.8"
# (Debian) or "slurm 22.05.9" (EL); a header from libslurm-dev/slurm-devel, when present, must agree.
slurm_version() {
  local slurmd v maj min mic hdr
  slurmd=$(command -v slurmd || true)
  [ -n "$slurmd" ] || [ ! -x /usr/sbin/slurmd ] || slurmd=/usr/sbin/slurmd
  [ -n "$slurmd" ] || return 1
  v=$("$slurmd" -V 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1)
  [ -n "$v" ] || die "cannot read the Slurm version from '$slurmd -V'"
  IFS=. read -r maj min mic <<<"$v"
  printf -v v '0x%02x%02x%02x' "$((10#$maj))" "$((10#$min))" "$((10#$mic))"
  hdr=/usr/include/slurm/slurm_version.h
  if [ -r "$hdr" ]; then
    local hv
    hv=$(awk '$1 == "#define" && $2 == "SLURM_VERSION_NUMBER" {print $3}' "$hdr")
    if [ -n "$hv" ] && [ "$((hv))" -ne "$((v))" ]; then
      die "slurmd is $v but $hdr says $hv: install matching Slurm packages"
    fi
  fi
  echo "$v"
}

build() {  # build DEST_DIR VERSION
  local dest=$1 version=$2 tmp stamp want
  stamp=$dest/task_jobcage.so.stamp
  want="version=$version jobcage=$jobcage_bin source=$(sha256sum "$src" | cut -d' ' -f1)"
  if [ -f "$dest/task_jobcage.so" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    log "$dest/task_jobcage.so is up to date (Slurm $version)"
    return 0
  fi
  command -v gcc >/dev/null || die "gcc is needed to build the plugin"
  mkdir -p "$dest"
  tmp=$(mktemp "$dest/.task_jobcage.so.XXXXXX")
  gcc -O2 -g -Wall -Wextra -fPIC -shared -fvisibility=default \
      -DJC_SLURM_VERSION="$version" -DJC_JOBCAGE_BIN="\"$jobcage_bin\"" \
      -o "$tmp" "$src" || { rm -f "$tmp"; die "compilation failed"; }
  chmod 0755 "$tmp"
  mv -f "$tmp" "$dest/task_jobcage.so"   # atomic: a starting slurmd never sees half a file
  printf '%s\n' "$want" > "$stamp"
  log "built $dest/task_jobcage.so (Slurm $version, jobcage $jobcage_bin)"
}

link_hooks() {  # symlink every hook script of this checkout under $libexec/<system>/
  local sys f dst
  for sys in slurm pbs htcondor generic; do
    [ -d "$top/hooks/$sys" ] || continue
    mkdir -p "$libexec/$sys"
    for f in "$top/hooks/$sys"/*; do
      [ -f "$f" ] && [ -x "$f" ] || continue      # scripts only (not .c, .fragment, docs)
      dst=$libexec/$sys/$(basename "$f")
      if [ "$(readlink "$dst" 2>/dev/null)" != "$f" ]; then
        ln -sfn "$f" "$dst"
        log "linked $dst -> $f"
      fi
    done
  done
}

# task_jobcage.c implements the 22.05 task plugin interface.  The set of task_p_* symbols changes between
# Slurm releases and slurmd aborts on a task plugin that lacks one, so other releases are refused.
supported() { [ "$(( $1 >> 8 ))" -eq "$(( 0x1605 ))" ]; }

version=$(slurm_version) || version=""
if [ -n "$out" ]; then
  [ -n "$version" ] || die "slurmd not found: cannot tell which Slurm version to build for"
  supported "$version" || die "task/jobcage implements the Slurm 22.05 task plugin API; this node has $version"
  build "$out" "$version"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "installing needs root (or use --out DIR to only build)"
link_hooks
if [ -z "$version" ]; then
  log "slurmd not installed: task/jobcage not built (hooks linked)"
  exit 0
fi
if ! supported "$version"; then
  log "WARNING: Slurm $version is not 22.05: task/jobcage not built (use the TaskProlog and suspend through jobcage)"
  exit 0
fi
build "$install_dir" "$version"
