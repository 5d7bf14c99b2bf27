#!/bin/bash
# Runs inside the v2 guest at boot (jobcage-guest.service, from the read-only shared checkout): copy the
# checkout to /jobcage (the image keeps /jobcage/.venv), `make bootstrap` as on any node (the packages and the
# venv are already there: only the links, the hook tree and the Slurm plugin are done here), then the selected
# tests with CI=true.  Results go to /mnt/jcresults: rc, summary.txt, pytest.log, junit.xml, timings.
set -u
# One brace group: bash reads all of it before running any, so editing (or `git pull`ing) this file
# while it runs cannot make bash execute a shifted part of the new text.
{
src=/mnt/jcsrc res=/mnt/jcresults
exec > >(tee -a "$res/guest.log") 2>&1
t0=$(date +%s)
echo "v2-guest: up $(cut -d' ' -f1 /proc/uptime) s after boot; $(uname -r); cgroup: $(stat -fc %T /sys/fs/cgroup)"
finish() {  # finish RC
  echo "$1" > "$res/rc.tmp" && mv "$res/rc.tmp" "$res/rc"
  sync
  systemctl --no-block poweroff
  exit 0
}
# No network in the guest (-nic none): lo's 127.0.0.1 alone, which glibc's AI_ADDRCONFIG does not count, so
# getaddrinfo(AF_INET) fails for every name and address -- slurmctld: 'Unable to resolve "127.0.0.1"', exit 1.
# A node has a network address; a documentation one (TEST-NET-1) on lo stands in for it.
ip addr add 192.0.2.1/32 dev lo 2>/dev/null || true
find /jobcage -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
tar -C "$src" --exclude=./.venv --exclude=./.git --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache -cf - . | tar -C /jobcage -xf - \
  || { echo "v2-guest: cannot copy the checkout"; finish 3; }
# The image was built for this pyproject.toml (its hash is in the image key): the venv is current.
touch /jobcage/.venv/.installed
cd /jobcage
touch /etc/jobcage-v2guest   # provision.sh: a test guest, not a test host (see DEB_HOST_PKGS)
make bootstrap || { echo "v2-guest: make bootstrap failed"; finish 4; }
t1=$(date +%s)
echo "boot_to_runner_s=$(cut -d' ' -f1 /proc/uptime | cut -d. -f1)" > "$res/timings"
echo "bootstrap_s=$((t1 - t0))" >> "$res/timings"
jobcage doctor || true
mapfile -t args < "$res/pytest-args"
echo "v2-guest: pytest ${args[*]}"
CI=true JOBCAGE_V2_GUEST=1 .venv/bin/python -m pytest -p no:cacheprovider -q --durations=25 \
  --junitxml="$res/junit.xml" "${args[@]}" 2>&1 | tee "$res/pytest.log"
rc=${PIPESTATUS[0]}
t2=$(date +%s)
echo "suite_s=$((t2 - t1))" >> "$res/timings"
# pytest's last line: "25 passed in 925.34s (0:15:25)" (-q prints it bare; without -q inside '=' rules)
grep -E '^(=+ )?([0-9]+ [a-z]+(, )?)+ in [0-9.]+s|no tests ran' "$res/pytest.log" | tail -1 \
  | sed 's/^=* //; s/ =*$//' > "$res/summary.txt"
finish "$rc"
exit
}
