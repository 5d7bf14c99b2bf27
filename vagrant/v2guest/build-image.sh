#!/usr/bin/env bash
# Build, or reuse, the Debian 12 pure-cgroup-v2 systemd guest image the suite boots (vagrant/v2guest/run.sh).
#
#   vagrant/v2guest/build-image.sh          as root; prints the image directory on its last line
#
# The image is keyed by a hash of its inputs (this script, provision.sh's package list, pyproject.toml's
# dependencies and package layout):
# unchanged inputs reuse $JOBCAGE_V2_CACHE/<key> (default /var/cache/jobcage/v2-guest, outside any clone, so
# every CI clone on a machine shares it).  The checkout itself is NOT in the image: run.sh shares it with the
# guest at boot, so code changes need no rebuild.
#
# What the image holds: mmdebstrap'd bookworm with Debian's linux-image-amd64 and the linux-headers-amd64 of
# the same version (bcc gets real headers), systemd + dbus (pure cgroup v2 is systemd's default on Debian 12),
# provision.sh's node packages (bcc, sudo, Slurm, munge, gcc, ...), and /jobcage/.venv: the project's Python
# dependencies installed from wheels downloaded on the host (`pip download`; the guest has no network), built
# here on the host in the chroot because everything in the guest runs ~10-20x slower.
set -euo pipefail
# One brace group: bash reads all of it before running any, so editing (or `git pull`ing) this file
# while it runs cannot make bash execute a shifted part of the new text.
{
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
cache=${JOBCAGE_V2_CACHE:-/var/cache/jobcage/v2-guest}
mirror=${JOBCAGE_V2_MIRROR:-http://deb.debian.org/debian}
security=${JOBCAGE_V2_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
log() { printf 'v2-image: %s\n' "$*" >&2; }
die() { printf 'v2-image: error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap, chroot, mkfs)"

# The guest's packages: the node packages of provision.sh (shared with `make bootstrap`) plus what a booted
# systemd node needs.
mapfile -t node_pkgs < <(bash "$top/vagrant/provision.sh" --print-node-packages)
guest_pkgs=(linux-image-amd64 linux-headers-amd64 initramfs-tools systemd systemd-sysv dbus udev kmod
            passwd login e2fsprogs iproute2 ca-certificates libpam-systemd)

# Of pyproject.toml only what the venv is built from (dependencies, build system, package layout, scripts):
# a new pytest marker or ruff rule needs no new image.
venv_inputs() {
  python3 - "$top/pyproject.toml" <<'PY'
import json, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))
print(json.dumps([p["build-system"], p["project"].get("dependencies"), p["project"].get("optional-dependencies"),
                  p["project"].get("scripts"), p.get("tool", {}).get("setuptools")], sort_keys=True))
PY
}
key=$( { cat "$here/build-image.sh"; venv_inputs; printf '%s\n' "${node_pkgs[@]}" "${guest_pkgs[@]}" "$mirror"; } \
       | sha256sum | cut -c1-16)
img=$cache/$key
if [ -e "$img/ready" ]; then
  log "reusing $img (inputs unchanged)"
  echo "$img"
  exit 0
fi
command -v mmdebstrap >/dev/null || die "mmdebstrap is missing: sudo make bootstrap (provision.sh installs it)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 is missing (e2fsprogs)"
t0=$(date +%s)
mkdir -p "$cache"
# one build at a time per cache (a CI run and a developer's `make test-v2` on one machine)
exec 9>"$cache/.lock"
flock 9
if [ -e "$img/ready" ]; then log "reusing $img (built meanwhile)"; echo "$img"; exit 0; fi
# Other keys' images are stale once this one is built; keep only the newest two.
work=$(mktemp -d "$cache/build.XXXXXX")
# --one-file-system: never follow a mount mmdebstrap may have left in the chroot after a hard kill
trap 'rm -rf --one-file-system "$work"' EXIT
root=$work/root

# 1. wheels, on the host: the project's dependencies (runtime + [test]) and what an editable install builds with.
log "pip wheel (host) -> wheels"
mapfile -t pydeps < <(python3 - "$top/pyproject.toml" <<'PY'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))
for d in p["project"]["dependencies"] + p["project"]["optional-dependencies"]["test"] + p["build-system"]["requires"]:
    print(d)
print("wheel")
PY
)
pip=$top/.venv/bin/pip
[ -x "$pip" ] || pip="python3 -m pip"
# `pip wheel`: also turns sdist-only packages (cgroupspy) into wheels here, so the guest only installs.
# The host and the guest are both Debian 12 (CPython 3.11, x86_64): the wheels fit.
$pip wheel -q --disable-pip-version-check -w "$work/wheels" "${pydeps[@]}"

# 2. the root file system.
log "mmdebstrap bookworm (${#node_pkgs[@]} node + ${#guest_pkgs[@]} guest packages)"
incl=$(IFS=,; echo "${node_pkgs[*]},${guest_pkgs[*]}")
mkdir -p "$work/src"
# the checkout's tracked files at build time, only so the venv's editable install has its target (run.sh
# replaces /jobcage with the current checkout at every boot)
(cd "$top" && git ls-files -z 2>/dev/null | xargs -0 cp --parents -t "$work/src" 2>/dev/null) \
  || (cd "$top" && tar --exclude=.venv --exclude=.git --exclude=build -cf - . | tar -xf - -C "$work/src")
export work
mmdebstrap --variant=apt --include="$incl" \
  --aptopt='APT::Install-Recommends "false"' \
  --customize-hook='echo jcv2 > "$1/etc/hostname"; printf "127.0.1.1 jcv2\n" >> "$1/etc/hosts"' \
  --customize-hook='printf "/dev/vda / ext4 rw,relatime 0 1\n" > "$1/etc/fstab"' \
  --customize-hook='passwd --root "$1" -d root' \
  --customize-hook='mkdir -p "$1/jobcage" && cp -a "$work/src/." "$1/jobcage/" && cp -a "$work/wheels" "$1/opt/jobcage-wheels"' \
  --customize-hook='chroot "$1" /bin/sh -ec "cd /jobcage; python3 -m venv --system-site-packages .venv; .venv/bin/pip install -q --disable-pip-version-check --no-index --find-links /opt/jobcage-wheels -e .[test]; touch .venv/.installed; .venv/bin/python -c \"import bcc, jobcage.agent, click, psutil, pytest\""' \
  --customize-hook='cat > "$1/etc/systemd/system/jobcage-guest.service" <<UNIT
[Unit]
Description=jobcage test run (vagrant/v2guest/guest-run.sh from the shared checkout)
After=multi-user.target
[Service]
Type=oneshot
StandardOutput=journal+console
StandardError=journal+console
ExecStart=/bin/sh -ec "modprobe 9pnet_virtio; mkdir -p /mnt/jcsrc /mnt/jcresults; mount -t 9p -o trans=virtio,version=9p2000.L,ro jcsrc /mnt/jcsrc; mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 jcresults /mnt/jcresults; exec /bin/bash /mnt/jcsrc/vagrant/v2guest/guest-run.sh"
ExecStopPost=/bin/systemctl --no-block poweroff
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/jobcage-guest.service "$1/etc/systemd/system/multi-user.target.wants/jobcage-guest.service"' \
  --customize-hook='for u in slurmd slurmctld munge auditd apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap fstrim.timer man-db.timer systemd-timesyncd; do systemctl --root="$1" disable "$u" >/dev/null 2>&1 || true; done' \
  --customize-hook='rm -rf "$1/opt/jobcage-wheels" "$1/var/cache/apt/archives/"*.deb "$1/var/lib/apt/lists/"*_Packages' \
  bookworm "$root" \
  "deb $mirror bookworm main" "deb $mirror bookworm-updates main" "deb $security bookworm-security main" >&2

kver=$(ls "$root/lib/modules" | sort -V | tail -1)
[ -d "$root/usr/src/linux-headers-$kver" ] || die "no linux-headers-$kver in the image (linux-image and linux-headers differ)"
log "kernel $kver with matching headers"
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"

# 3. the disk: ext4 from the tree (run.sh boots it with snapshot=on: the image is never written).
log "mkfs.ext4 -d"
mkfs.ext4 -q -F -L jcv2root -d "$root" "$work/root.img" 8G
rm -rf --one-file-system "$root" "$work/src" "$work/wheels"
echo "$kver" > "$work/kernel-version"
date -u +%FT%TZ > "$work/ready"
rm -rf "$img"
mv "$work" "$img"
trap - EXIT
# Keep the newest two images (a branch switch back should not pay a cold build).
ls -1dt "$cache"/*/ 2>/dev/null | grep -v "/build\\." | tail -n +3 | xargs -r rm -rf
log "built $img in $(( $(date +%s) - t0 )) s"
echo "$img"
exit
}
