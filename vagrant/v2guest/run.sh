#!/usr/bin/env bash
# `sudo make test-v2` (and the second half of `make test`): the portable part of the suite on a real pure
# cgroup v2 systemd node -- a Debian 12 guest under QEMU with software emulation (-accel tcg: nested KVM hangs
# on the CI machines).
#
#   vagrant/v2guest/run.sh [PYTEST-ARGS...]     as root; default selection: vagrant/v2guest/guest-tests.txt
#
# 1. build-image.sh builds the image, or reuses it when its inputs did not change (cache outside the clone);
# 2. boots it with the checkout shared read-only (9p, tag jcsrc) and a results dir shared read-write (jcresults);
# 3. the guest (guest-run.sh, from the shared checkout) runs pytest with CI=true and powers off;
# 4. exit code, pytest summary, junit XML and the guest's console come back in $JOBCAGE_V2_RESULTS
#    (default build/v2guest/ in the checkout); this script exits non-zero when the guest suite failed or the
#    guest did not answer within JOBCAGE_V2_TIMEOUT seconds (default 3300: boot + suite).
set -uo pipefail
# One brace group: bash reads all of it before running any, so editing (or `git pull`ing) this file
# while it runs cannot make bash execute a shifted part of the new text.
{
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
results=${JOBCAGE_V2_RESULTS:-$top/build/v2guest}
limit=${JOBCAGE_V2_TIMEOUT:-3300}
log() { printf 'v2-guest: %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "v2-guest: run as root (sudo make test-v2)" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { echo "v2-guest: qemu-system-x86_64 missing: sudo make bootstrap" >&2; exit 1; }

t0=$(date +%s)
img=$(bash "$here/build-image.sh" | tail -1) || { echo "v2-guest: image build failed" >&2; exit 1; }
[ -e "$img/ready" ] || { echo "v2-guest: no image at '$img'" >&2; exit 1; }
t1=$(date +%s)
log "image $img ($(cat "$img/kernel-version")) ready in $((t1 - t0)) s"

rm -rf "$results"
mkdir -p "$results"
# The selection travels in the results dir: arguments given here, else the one list of guest tests.
if (($#)); then
  printf '%s\n' "$@" > "$results/pytest-args"
else
  grep -v '^\s*\(#\|$\)' "$here/guest-tests.txt" | sed 's/\s*#.*//' > "$results/pytest-args"
fi
# thread=single: one host thread runs both vCPUs. With QEMU 7.2's multi-threaded TCG a vCPU can go on running
# a stale translation of kernel text the other vCPU has just patched: a syscall tracepoint turned on or off
# (a static key in syscall_trace_enter) while the other vCPU makes syscalls left both vCPUs looping on the
# patch's int3 for good (toggling sys_enter_getppid under two syscall spinners: hung within 60 rounds;
# thread=single: 400 rounds, and the guest list no slower). softlockup_panic=1 turns any such kernel hang
# into a poweroff, with every CPU's stack in console.log (loglevel=5 lets the stacks through); after 60 s
# (watchdog_thresh=30, three times the default) rather than 20, because emulated code is 10-20x slower.
accel=${JOBCAGE_V2_ACCEL:-tcg,thread=single}
log "booting (qemu -accel $accel -smp 2), timeout ${limit} s; console: $results/console.log"
# snapshot=on: the guest's writes go to a throw-away overlay, the cached image is never changed.
timeout --kill-after=20 "$limit" qemu-system-x86_64 \
  -accel "$accel" -cpu "${JOBCAGE_V2_CPU:-max}" -smp 2 -m "${JOBCAGE_V2_MEM:-4096}" \
  -kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
  -append "root=/dev/vda rw console=ttyS0 panic=-1 watchdog_thresh=30 softlockup_panic=1 softlockup_all_cpu_backtrace=1 systemd.show_status=0 loglevel=5" \
  -drive "file=$img/root.img,format=raw,if=virtio,snapshot=on" \
  -virtfs "local,path=$top,mount_tag=jcsrc,security_model=none,readonly=on" \
  -virtfs "local,path=$results,mount_tag=jcresults,security_model=none" \
  -nic none -display none -monitor none -no-reboot \
  -serial "file:$results/console.log" </dev/null
qrc=$?
t2=$(date +%s)
# The guest ended without a result: the console's tail, then (last, where a CI excerpt shows them) the first
# lines of a kernel hang or oops (what and where: more than the panic's tail tells) and pytest's position.
died() {
  log "FAIL: $1; last console lines:"
  tail -n 30 "$results/console.log" >&2
  grep -m 8 -E 'BUG:|Oops|Kernel panic|RIP: 0010' "$results/console.log" | sed 's/^/v2-guest: kernel: /' >&2
  log "the guest pytest got as far as: $(tail -c 300 "$results/pytest.log" 2>/dev/null | tail -n 2 | tr '\n' ' ')"
  exit 1
}
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
  died "the guest did not finish within ${limit} s (killed)"
fi
[ -s "$results/rc" ] || died "the guest powered off without a result (qemu exit $qrc)"
rc=$(cat "$results/rc")
[ -s "$results/timings" ] && log "guest: $(tr '\n' ' ' < "$results/timings")"
log "guest pytest: $(cat "$results/summary.txt" 2>/dev/null) (exit $rc); junit: $results/junit.xml"
log "times: image $((t1 - t0)) s, boot + suite + poweroff $((t2 - t1)) s"
if [ "$rc" != 0 ]; then
  log "FAIL: the guest suite failed; its output: $results/pytest.log"
  grep -E '^(FAILED|ERROR) ' "$results/pytest.log" >&2 || tail -n 40 "$results/pytest.log" >&2
  exit 1
fi
exit 0
exit
}
