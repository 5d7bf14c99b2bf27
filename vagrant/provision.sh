#!/usr/bin/env bash
# System setup for a jobcage node: packages, kernel-header links, tracefs.
# Shared by `make bootstrap` (Debian, this repo) and the vagrant boxes.
# Idempotent: every step checks before it acts, and says what it did.
set -euo pipefail

log() { printf 'bootstrap: %s\n' "$*"; }

. /etc/os-release
family=${ID_LIKE:-$ID}

DEB_PKGS=(python3 python3-venv python3-dev python3-bpfcc bpfcc-tools bpftrace linux-headers-amd64
          sudo util-linux uidmap procps gcc make libc6-dev sqlite3 tmux
          munge slurmctld slurmd slurm-client auditd openssh-server rsyslog)
# The test host also builds and boots the pure-v2 guest (vagrant/v2guest, `make test-v2`); the guest itself
# gets DEB_PKGS only (build-image.sh reads them with --print-node-packages).
DEB_HOST_PKGS=(qemu-system-x86 mmdebstrap e2fsprogs git dpkg-dev)   # dpkg-dev: bench/trace_overhead.py unpacks a Debian source
if [ "${1:-}" = --print-node-packages ]; then printf '%s\n' "${DEB_PKGS[@]}"; exit 0; fi
# ... and inside that guest (no network, boots no guest itself) only the node packages are checked.
[ -e /etc/jobcage-v2guest ] && DEB_HOST_PKGS=()
# EL9: /usr/bin/python3 is 3.9, jobcage needs 3.11 (bootstrap-venv.sh picks python3.11 and lends it the
# distribution's bcc); Slurm and munge come from EPEL (which needs CRB); kernel-devel is installed apart,
# as the exact running kernel's package may be gone from the mirrors.
RPM_PKGS=(python3 python3-devel python3.11 python3.11-devel python3-bcc bcc-tools bpftrace sudo util-linux
          shadow-utils procps-ng gcc make sqlite tmux rsync munge slurm slurm-slurmctld slurm-slurmd audit
          openssh-server rsyslog)

case "$family" in
  *debian*)
    missing=()
    for p in "${DEB_PKGS[@]}" "${DEB_HOST_PKGS[@]}"; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
      log "apt-get install ${missing[*]}"
      export DEBIAN_FRONTEND=noninteractive
      # Debian starts daemons on install; we run our own (tests start Slurm privately).
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
      # openssh-server is here for the ssh-adoption tests, which run a private sshd of their own: a node
      # that had no sshd must not get one listening on port 22 at its next boot either (the unit and the
      # init script both honour this file).  A node with sshd already installed is left alone.
      if [[ " ${missing[*]} " == *" openssh-server "* ]]; then
        mkdir -p /etc/ssh && touch /etc/ssh/sshd_not_to_be_run
        log "openssh-server: system sshd disabled (/etc/ssh/sshd_not_to_be_run)"
      fi
      apt-get update -q
      apt-get install -y -q --no-install-recommends "${missing[@]}"
      rm -f /usr/sbin/policy-rc.d
    else
      log "apt packages present"
    fi
    ;;
  *rhel*|*fedora*|*centos*)
    missing=()
    for p in "${RPM_PKGS[@]}"; do rpm -q "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if ((${#missing[@]})); then
      if ! rpm -q epel-release >/dev/null 2>&1; then
        log "enabling CRB and EPEL"
        dnf install -y -q dnf-plugins-core
        dnf config-manager --set-enabled crb 2>/dev/null || dnf config-manager --set-enabled powertools 2>/dev/null || true
        dnf install -y -q epel-release
      fi
      log "dnf install ${missing[*]}"
      dnf install -y -q "${missing[@]}"
    else
      log "rpm packages present"
    fi
    if ! rpm -q "kernel-devel-$(uname -r)" >/dev/null 2>&1; then
      dnf install -y -q "kernel-devel-$(uname -r)" \
        || log "WARNING: no kernel-devel-$(uname -r) in the repos (update the kernel and reboot); tracing will use the proc connector"
    fi
    ;;
  *) log "unknown distribution '$ID': install bcc, kernel headers, python3-venv yourself"; ;;
esac

# bcc compiles against /lib/modules/$(uname -r)/build.  When no headers package
# matches the running kernel (a 6.18 kernel with Debian's 6.1 headers), point the
# links at the newest installed headers: safe because our BPF reads no kernel struct.
kmod=/lib/modules/$(uname -r)
if [ ! -e "$kmod/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$hdr" ]; then
    mkdir -p "$kmod"
    ln -sfn "$hdr" "$kmod/build"
    log "created $kmod/build -> $hdr (no headers for $(uname -r))"
    if [ -n "$common" ] && [ ! -e "$kmod/source/include" ]; then
      ln -sfn "$common" "$kmod/source"
      log "created $kmod/source -> $common"
    fi
  else
    log "WARNING: no kernel headers found; BPF tracing will fall back to the proc connector"
  fi
fi

# Tracepoint formats come from tracefs at run time.
if [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null && log "mounted tracefs" || log "WARNING: cannot mount tracefs"
fi
if [ ! -e /sys/kernel/debug/tracing ] && ! mountpoint -q /sys/kernel/debug; then
  mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null && log "mounted debugfs" || true
fi
exit 0
