"""Per-identity CPU accounting against the kernel's own number: the job cgroup's cpu.stat usage_usec.

A pilot job burns CPU under its own uid, then as a pool uid through the setuid-root helper; the per-uid sum
(taskstats exit records + /proc for live tasks, membership from the tracer) must match the cgroup within 2%.
"""

from __future__ import annotations

import os
import struct
import subprocess
import time

import pytest
from jctest import PYTHON, Helpers, TraceUsers, drive, shell_job

from jobcage.agent.accounting import (
    Accounting,
    live_cpu_by_uid,
    parse_messages,
    parse_taskstats,
    split_messages,
)

pytestmark = [pytest.mark.root]

BURN_S = 1.5


@pytest.mark.bpf
@pytest.mark.parametrize(("backend", "source"), [("bpf", "kernel"), ("bpf", "taskstats"), ("proc", "taskstats")])
def test_cpu_per_identity_matches_cgroup(backend: str, source: str, trace_users: TraceUsers, helpers: Helpers,
                                         make_cgroup, make_tracer) -> None:
    """bpf/kernel is the default where the kernel has BTF (CPU times recorded by the tracer's exit program);
    bpf/taskstats what a kernel without BTF gets; proc/taskstats the tracer's fallback."""
    pilot, pool = trace_users.pilot, trace_users.pool
    tracer, _ = make_tracer(backend)
    acc = Accounting(tracer, source=source if source == "taskstats" else "auto")
    assert acc.source == source
    acc.start()
    try:
        cg = make_cgroup()
        script = (f"{PYTHON} {helpers.burn} {BURN_S}\n"
                  f"{helpers.sutest} {pool.uid} {pool.gid} {PYTHON} {helpers.burn} {BURN_S}")
        job = shell_job(cg, script, pilot)
        tracer.add_job("acct", pilot.uid, cg.id, pids=[job.pid])
        # as the agent does for a process it moves into a job: what the shell ran before it joined the cgroup
        # (its fork and set-up; ~100 ms under emulation) is not the job's
        acc.mark_adopted("acct", job.pid)
        u0 = cg.usage_usec()
        job.release()
        snapshots: list[tuple[dict[int, float], float]] = []
        last = [time.monotonic()]

        def tick() -> None:
            acc.poll(0)
            if time.monotonic() - last[0] > 0.5:   # mid-run: live tasks from /proc + exited ones
                last[0] = time.monotonic()
                snapshots.append((acc.job_cpu_by_uid("acct", cg.procs()), (cg.usage_usec() - u0) / 1e6))

        drive([tracer], lambda: job.proc.poll() is not None, timeout=60, tick=tick)
        assert job.proc.wait() == 0, job.proc.communicate()[1]
        time.sleep(0.1)
        tracer.poll(10)
        acc.poll(50)
        usage = (cg.usage_usec() - u0) / 1e6
        by_uid = acc.job_cpu_by_uid("acct", cg.procs())
    finally:
        acc.close()
    total = sum(by_uid.values())
    print(f"\n{backend}: per uid {by_uid}, sum {total:.4f}s, cgroup usage {usage:.4f}s, "
          f"ratio {total / usage:.4f}; {acc.records} exit records read")
    assert abs(total - usage) / usage < 0.02, (by_uid, usage)
    assert set(by_uid) <= {pilot.uid, pool.uid}
    for uid in (pilot.uid, pool.uid):   # half the work each
        assert 0.4 < by_uid[uid] / total < 0.6, by_uid
        assert by_uid[uid] >= BURN_S
    # while the pool payload ran, the live part was counted too
    mid = [s for s, u in snapshots if s.get(pool.uid, 0) > 0.3 and pool.uid in s]
    assert mid, f"no mid-run snapshot saw the pool uid burning: {snapshots}"
    # An exit record waits for the tracer to learn of the exit (up to the accounting's pending_s), so a
    # snapshot taken right as the pilot's burner exits may briefly lack it; the last one (deep in the
    # pool's burn) must agree with the cgroup.
    s, u = snapshots[-1]
    assert u > 1.0 and abs(sum(s.values()) - u) / u < 0.05, (s, u)


def _stats(version: int, uid: int, pid: int, virt_ns: int, utime_us: int, stime_us: int) -> bytes:
    shift = 48 if version == 15 else 0
    buf = bytearray(400)
    struct.pack_into("=H", buf, 0, version)
    struct.pack_into("=QQ", buf, 64 + shift, 0, virt_ns)
    buf[80 + shift:84 + shift] = b"burn"
    struct.pack_into("=III", buf, 120 + shift, uid, uid, pid)
    struct.pack_into("=QQ", buf, 152 + shift, utime_us, stime_us)
    return bytes(buf)


def test_parse_taskstats_layouts() -> None:
    """The precise runtime when present, utime+stime otherwise; version 15's shifted layout."""
    r = parse_taskstats(_stats(16, 1001, 42, 1_234_567, 0, 0))
    assert r is not None and (r.uid, r.pid, r.cpu_ns, r.comm) == (1001, 42, 1_234_567, "burn")
    r = parse_taskstats(_stats(14, 7, 9, 0, 300, 200))
    assert r is not None and r.cpu_ns == 500_000
    r = parse_taskstats(_stats(15, 1002, 43, 99, 0, 0))
    assert r is not None and (r.uid, r.pid, r.cpu_ns) == (1002, 43, 99)
    assert parse_taskstats(b"\x10\x00" + b"\0" * 20) is None


def test_parse_messages_skips_thread_group_aggregates() -> None:
    def nla(typ: int, payload: bytes) -> bytes:
        raw = struct.pack("=HH", 4 + len(payload), typ) + payload
        return raw + b"\0" * (-len(raw) % 4)

    def msg(kind: int, pid: int, stats: bytes) -> bytes:
        body = b"\x02\x01\0\0" + nla(kind, nla(1, struct.pack("=I", pid)) + nla(3, stats))
        return struct.pack("=IHHII", 16 + len(body), 0x20, 0, 0, 0) + body

    data = msg(4, 10, _stats(16, 5, 10, 1000, 0, 0)) + msg(5, 10, _stats(16, 5, 10, 9999, 0, 0))
    recs = parse_messages(data)
    assert [(r.pid, r.cpu_ns) for r in recs] == [(10, 1000)]


def test_live_cpu_of_this_process() -> None:
    import os
    # deltas: process_time() also holds the CPU of this process's threads that exited (earlier tests'),
    # which no live task shows any more
    before = live_cpu_by_uid([os.getpid()])[os.getuid()]
    t0 = time.process_time()
    while time.process_time() - t0 < 0.2:
        pass
    live = live_cpu_by_uid([os.getpid()])
    assert (live[os.getuid()] - before) / 1e9 >= time.process_time() - t0 - 0.05


def test_split_messages_peeks_pid_in_kernel_and_padded_layouts() -> None:
    """The pid is read without decoding the record: from its fixed place in the kernel's layout, and by the
    attribute walk when a TASKSTATS_TYPE_NULL pad (64-bit alignment on some architectures) moves it."""
    def nla(typ: int, payload: bytes) -> bytes:
        raw = struct.pack("=HH", 4 + len(payload), typ) + payload
        return raw + b"\0" * (-len(raw) % 4)

    def msg(pid: int, stats: bytes, pad: bool) -> bytes:
        inner = nla(1, struct.pack("=I", pid)) + (nla(6, b"") if pad else b"") + nla(3, stats)
        body = b"\x02\x01\0\0" + nla(4, inner)
        return struct.pack("=IHHII", 16 + len(body), 0x20, 0, 0, 0) + body

    data = msg(10, _stats(16, 5, 10, 1000, 0, 0), False) + msg(11, _stats(16, 6, 11, 2000, 0, 0), True)
    split = split_messages(data)
    assert [pid for pid, _a, _b in split] == [10, 11]
    assert [parse_taskstats(data[a:b]).cpu_ns for _pid, a, b in split] == [1000, 2000]  # type: ignore[union-attr]
    assert split_messages(data[:40]) == []   # truncated: nothing, no exception


class _LateTracer:
    """Membership that learns a task's exit only when told (as the tracer does a little after the taskstats record
    was sent): the record must wait, and land at the poll whose sync_exited names its tid."""

    def __init__(self) -> None:
        self.known: dict[int, str] = {}
        self.new: list[int] = []

    def sync_exited(self) -> list[int]:
        new, self.new = self.new, []
        return new

    def job_of_exited(self, tid: int) -> str | None:
        return self.known.pop(tid, None)


@pytest.mark.parametrize("membership", ["tracer", "function"])
def test_record_waits_until_its_exit_is_known(membership: str) -> None:
    """A real exit record read before its task is known to belong to a job is not lost: it waits (pending_s) and is
    attributed once the tracer learns the exit -- by the tids sync_exited returns, or (a plain job_of_exited
    function) by asking again on each poll."""
    late = _LateTracer()
    acc = Accounting(late if membership == "tracer" else late.job_of_exited, pending_s=30)
    acc.start()
    try:
        burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
        p = subprocess.Popen([PYTHON, "-c", burn])
        assert p.wait() == 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:   # the record arrives and is read; no job is known for it yet
            acc.poll(50)
        assert acc.job_cpu_by_uid("late", []) == {}
        late.known[p.pid] = "late"
        late.new.append(p.pid)
        acc.poll(0)
        got = acc.job_cpu_by_uid("late", [])
    finally:
        acc.close()
    assert got.get(os.getuid(), 0) >= 0.25, got
