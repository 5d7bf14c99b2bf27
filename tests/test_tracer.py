"""Identity tracer on the real kernel: real BPF, real setuid helpers (sutest, sudo, setpriv), real users.

Each scenario runs a pilot job in its own raw cgroup2 directory; the tracer is told about the job before the job
starts (GatedJob), like the agent's prologue.  The proc-connector backend runs *next to* the BPF tracer on the
same job, so both see the very same processes.
"""

from __future__ import annotations

import copy
import math
import os
import secrets
import time
from pathlib import Path

import pytest
from jctest import (
    PYTHON,
    GatedJob,
    Helpers,
    TraceUsers,
    drive,
    kernel_has_kprobes,
    require,
    shell_job,
)

from jobcage.agent.errors import InvalidArgument, NoSuchJob, Unsupported
from jobcage.agent.events import TraceEvent
from jobcage.agent.tracer import Tracer, proc_ppid

pytestmark = [pytest.mark.root, pytest.mark.bpf]

ID = "/usr/bin/id"


def _scenario(helper: str, users: TraceUsers, h: Helpers, sudoers) -> tuple[str, object, int, str]:
    """(shell script, pilot user or None for root, owner uid, helper binary) running `id -u` as the pool user."""
    pool = users.pool
    if helper == "sutest":
        return f"{h.sutest} {pool.uid} {pool.gid} {ID} -u", users.pilot, users.pilot.uid, str(h.sutest)
    if helper == "sudo":
        sudoers(f"{users.pilot.name} ALL=({pool.name}) NOPASSWD: ALL")
        return f"sudo -n -u {pool.name} {ID} -u", users.pilot, users.pilot.uid, "/usr/bin/sudo"
    # setpriv needs CAP_SETUID: a root pilot (a batch system's root starter) uses it
    return (f"setpriv --reuid={pool.uid} --regid={pool.gid} --clear-groups {ID} -u", None, 0,
            "/usr/bin/setpriv")


def _run(tracers: list[Tracer], job: GatedJob, job_id: str, owner: int, cgroup_id: int | None,
         timeout: float = 30.0) -> str:
    for t in tracers:
        t.add_job(job_id, owner, cgroup_id, pids=[job.pid])
    job.release()
    drive(tracers, lambda: job.proc.poll() is not None, timeout)
    out, err = job.proc.communicate()
    assert job.proc.returncode == 0, f"job failed: {err}"
    return out


def _first(events: list[TraceEvent], what: str, **match: object) -> TraceEvent:
    for e in events:
        if all((e.detail.get(k[7:]) if k.startswith("detail_") else getattr(e, k)) == v for k, v in match.items()):
            return e
    raise AssertionError(f"no {what} event with {match} in:\n" + "\n".join(
        f"  {e.kind} pid={e.pid} ppid={e.ppid} uid={e.uid} euid={e.euid} {e.filename} {e.detail}" for e in events))


@pytest.mark.parametrize("mode", ["cgroup", "pidmap", "perfbuf"])
@pytest.mark.parametrize("helper", ["sutest", "sudo", "setpriv"])
def test_identity_trail(helper: str, mode: str, trace_users: TraceUsers, helpers: Helpers, sudoers,
                        make_cgroup, make_tracer) -> None:
    """exec of the helper -> identity change (old/new uid, return code) -> exec of the payload, with pids and
    parents; in cgroup mode (the kernel filters by cgroup2 id), pid-map mode (forks inherit the job) and with
    the perf buffer older kernels get."""
    script, pilot, owner, helper_path = _scenario(helper, trace_users, helpers, sudoers)
    pool = trace_users.pool
    tracer, col = make_tracer("bpf", pid_filter=(mode != "cgroup"), perf_buffer=(mode == "perfbuf"))
    assert tracer.backend == "bpf" and tracer.buffer == ("perf" if mode == "perfbuf" else "ring")
    cg = make_cgroup()
    job = shell_job(cg, script, pilot)
    job_id = f"trail-{helper}-{mode}"
    out = _run([tracer], job, job_id, owner, None if mode == "pidmap" else cg.id)
    assert out.split() == [str(pool.uid)], "the payload did not run as the pool user"
    ev = col.of(job_id)

    # 1. the helper is exec'd by the pilot's shell, under the pilot's uid
    hx = _first(ev, "helper exec", kind="exec", filename=helper_path)
    assert hx.ppid == job.pid and hx.uid == owner
    if helper in ("sutest", "sudo"):
        assert hx.detail.get("setuid_file") is True and hx.detail.get("file_uid") == 0
        assert hx.euid == 0, "effective uid after exec of a setuid-root file"

    # 2. the identity change: old uid, new uid, return code, through the helper
    sw = _first(ev, "identity change", kind="setuid", uid=pool.uid, detail_ok=True)
    assert sw.detail["ret"] == 0 and sw.detail["old_uid"] != pool.uid
    assert sw.detail["syscall"] in ("setuid", "setreuid", "setresuid")
    assert sw.filename == helper_path
    assert sw.euid == pool.uid
    assert sw.ts >= hx.ts
    if helper == "sudo":   # sudo switches in a child it forked
        assert sw.pid != hx.pid and sw.ppid == hx.pid
    else:                  # sutest / setpriv switch in place, then exec
        assert sw.pid == hx.pid and sw.ppid == job.pid

    # 3. the payload runs as the pool user, in the process that switched
    px = _first(ev, "payload exec", kind="exec", filename=ID)
    assert px.pid == sw.pid and px.ppid == sw.ppid
    assert px.uid == pool.uid and px.euid == pool.uid
    assert px.ts >= sw.ts

    # 4. its exit is reported (uid differs from the owner's), lineage says where it came from
    _first(ev, "payload exit", kind="exit", pid=px.pid, uid=pool.uid)
    rec = tracer.lineage(job_id)[px.pid]
    assert rec["ppid"] == px.ppid and rec["uid"] == pool.uid and rec["via"] == helper_path
    assert px.detail["orig_ppid"] == px.ppid and px.detail["via"] == helper_path   # for the store
    c = tracer.counters(job_id)
    assert c["forks"] >= 1 and c["fork_failed"] == 0 and c["events_lost"] == 0



def test_exec_through_a_swapped_symlink_keeps_the_kernels_facts(trace_users: TraceUsers, helpers: Helpers,
                                                                   make_cgroup, make_tracer) -> None:
    """A hostile payload execs the setuid-root helper through a symlink and points the symlink at a harmless file
    right after (here: before the tracer even looks).  Where the kernel has BTF, the exec event carries the effective
    uid the kernel gave and the mode and owner of the file that really runs, so the trail still shows the setuid
    exec; a stat of the path afterwards would see the harmless file."""
    require(os.path.exists("/sys/kernel/btf/vmlinux"), "kernel BTF (/sys/kernel/btf/vmlinux)")
    pilot, pool = trace_users.pilot, trace_users.pool
    tracer, col = make_tracer("bpf")
    link = helpers.dir / f"swap-{secrets.token_hex(3)}"
    link.symlink_to(helpers.sutest)
    try:
        cg = make_cgroup()
        job = shell_job(cg, f"{link} {pool.uid} {pool.gid} {ID} -u", pilot)
        tracer.add_job("swap", pilot.uid, cg.id, pids=[job.pid])
        job.release()
        out, err = job.proc.communicate(timeout=30)   # the tracer is not polled meanwhile: events wait
        assert job.proc.returncode == 0 and out.split() == [str(pool.uid)], err
        link.unlink()
        link.symlink_to("/usr/bin/true")   # what a stat of the exec'd path finds now
        drive([tracer], lambda: True)
    finally:
        link.unlink(missing_ok=True)
    hx = _first(col.of("swap"), "exec through the link", kind="exec", filename=str(link))
    assert hx.uid == pilot.uid and hx.euid == 0, "the effective uid the kernel gave"
    assert hx.detail.get("setuid_file") is True and hx.detail.get("file_uid") == 0, hx.detail


def test_plain_execs_read_from_the_record_match_the_full_enrichment(trace_users: TraceUsers, helpers: Helpers,
                                                                      make_cgroup, make_tracer) -> None:
    """The common exec (no set-id file, absolute path, no user namespace) is read straight from the kernel's
    record; every other event goes through the full enrichment.  The very records of a job that mixes both, fed
    through each way from the same tracer state, give the same events: the short way leaves nothing out."""
    require(os.path.exists("/sys/kernel/btf/vmlinux"), "kernel BTF (/sys/kernel/btf/vmlinux)")
    pilot, pool = trace_users.pilot, trace_users.pool
    tracer, _col = make_tracer("bpf")
    be = tracer._be
    cg = make_cgroup()
    thread_exec = "import os, threading; threading.Thread(target=os.execv, args=('/bin/true', ['true'])).start()"
    job = shell_job(cg, "cd /usr/bin && ./basename x >/dev/null; /bin/true; /usr/bin/env true; "
                        f"{helpers.sutest} {pool.uid} {pool.gid} /usr/bin/id -u; "
                        f'{PYTHON} -c "{thread_exec}"; /usr/bin/unshare -U /bin/sh -c "/usr/bin/printenv HOME >/dev/null; exit"',
                    pilot)
    tracer.add_job("plain", pilot.uid, cg.id, pids=[job.pid])
    job.release()
    out, err = job.proc.communicate(timeout=30)   # the records wait in the ring meanwhile
    assert job.proc.returncode == 0 and out.split() == [str(pool.uid)], err
    recs = be.poll(0)
    tracked = tracer._jobs["plain"]
    before = copy.deepcopy((tracked.procs, tracked.userns))
    short: list[TraceEvent] = []
    plain = tracer._plain_exec
    taken: list[tuple[int, str]] = []

    def counted(f: tuple) -> TraceEvent | None:
        ev = plain(f)
        if ev is not None:
            taken.append((ev.pid, ev.filename))
        return ev

    tracer._on_event, tracer._plain_exec = short.append, counted
    tracer._deliver_bpf(recs)
    tracked.procs, tracked.userns = copy.deepcopy(before)
    full: list[TraceEvent] = []
    tracer._on_event, tracer._plain_exec = full.append, lambda f: None
    tracer._deliver_bpf(recs)
    execs = [e for e in full if e.kind == "exec"]
    names = [e.filename for e in execs]
    # the relative one is resolved against the cwd only while the process lives (here: gone, as it stands)
    assert {"./basename", "/bin/true", "/usr/bin/env", str(helpers.sutest), "/usr/bin/id",
            "/usr/bin/unshare"} <= set(names), names
    assert len(taken) >= 5, f"the short way took only {len(taken)} of {len(execs)} execs"
    assert not [t for t in taken if t[1] in (str(helpers.sutest), "./basename")], "set-id file, relative path"
    assert [e.detail.get("tid") for e in execs if e.detail.get("tid")], "the thread's exec names its thread"
    assert [e.detail.get("userns") for e in execs if e.filename == "/usr/bin/printenv" and e.detail.get("userns")], \
        "the exec of a child in the new user namespace says so"
    ident = next(e for e in execs if e.filename == "/usr/bin/id")
    assert (ident.pid, ident.filename) in taken and ident.uid == pool.uid and ident.detail["via"] == str(helpers.sutest)
    assert short == full


@pytest.mark.parametrize("backend", ["bpf", "proc"])
def test_failed_setuid_recorded(backend: str, trace_users: TraceUsers, make_cgroup, make_tracer) -> None:
    """A non-root payload calling setuid(0): recorded with its error by BPF; the proc connector reports committed
    changes only, so it must show no identity change at all."""
    pilot = trace_users.pilot
    tracer, col = make_tracer(backend)
    cg = make_cgroup()
    code = "import os\ntry:\n    os.setuid(0)\nexcept PermissionError:\n    print('denied')"
    job = shell_job(cg, f"{PYTHON} -c \"{code}\"", pilot)
    out = _run([tracer], job, "failsetuid", pilot.uid, cg.id)
    assert out.strip() == "denied"
    if backend == "proc":
        assert not col.of("failsetuid", "setuid")
        return
    e = _first(col.of("failsetuid"), "failed setuid", kind="setuid", detail_syscall="setuid")
    assert e.detail["ok"] is False and e.detail["ret"] == -1 and e.detail["errno"] == "EPERM"
    assert e.detail["args"] == [0] and e.detail["old_uid"] == pilot.uid
    assert e.uid == pilot.uid and e.euid == pilot.uid, "a failed setuid changes nothing"
    assert e.filename == PYTHON or e.filename.startswith("/usr/bin/python3")


def _kprobed(fn: str) -> int:
    """How many kprobes the kernel has on fn (its own list, debugfs)."""
    return sum(1 for line in Path("/sys/kernel/debug/kprobes/list").read_text().splitlines()
               if line.split()[2:3] == [f"{fn}+0x0"])   # "ADDRESS  k|r  SYMBOL+OFFSET  [FLAGS]"


def test_syscall_hooks_follow_the_kernel(trace_users: TraceUsers, helpers: Helpers, make_cgroup, make_tracer) -> None:
    """The set*id/setsid/fork/user-namespace syscalls are hooked by kprobe where the kernel has kprobes (then only
    the three sched tracepoints are in use: no syscall tracepoint sends the node's other syscalls through the
    kernel's slow path), else by tracepoint, and asking for kprobes there is refused with the reason.  Both give
    the trail of a refused setuid(0), a setsid and an unshare(CLONE_NEWUSER).  The same calls made as 32-bit
    syscalls (int 0x80: setuid32, setuid16, setresuid32, unshare) are in the trail with kprobes only: the syscall
    tracepoints never see them (docs/architecture.md says so)."""
    pilot = trace_users.pilot
    has = kernel_has_kprobes()
    if not has:
        with pytest.raises(Unsupported, match="no kprobes"):
            make_tracer("bpf", syscall_hooks="kprobe")
    code = ("import os\ntry:\n    os.setuid(0)\nexcept PermissionError:\n    pass\n"
            "pid = os.fork()\nif pid == 0:\n    os.setsid()\n    os._exit(0)\nos.waitpid(pid, 0)\nprint(pid)")
    # the default (auto) first, then where there is a choice the other way, asked for
    for mode, asked in ([("kprobe", "auto"), ("tracepoint", "tracepoint")] if has else [("tracepoint", "auto")]):
        tracer, col = make_tracer("bpf", syscall_hooks=asked)
        assert tracer.syscall_hooks == mode
        if mode == "kprobe":
            assert tracer._be.b.num_open_tracepoints() == 3, "only the sched tracepoints"
            assert tracer._be.b.num_open_kprobes() > 0
            if os.path.exists("/sys/kernel/debug/kprobes/list"):   # the kernel's word: entry and return probe
                assert _kprobed("__x64_sys_setuid") >= 2 and _kprobed("__ia32_sys_setuid16") >= 2
        cg = make_cgroup()
        job_id = f"hooks-{mode}"
        out = _run([tracer], shell_job(cg, f"{PYTHON} -c \"{code}\"\n/usr/bin/unshare -U /bin/true\n{helpers.int80}",
                                       pilot), job_id, pilot.uid, cg.id)
        child, *r32 = (int(x) for x in out.split())
        evs = col.of(job_id)
        sid = _first(evs, "setsid", kind="setsid", pid=child)
        assert sid.detail["ok"] and sid.detail["ret"] == child
        refused = [e for e in evs if e.kind == "setuid" and e.detail.get("syscall") == "setuid"
                   and e.detail["args"] == [0] and e.detail["errno"] == "EPERM" and e.uid == pilot.uid]
        noop = [e for e in evs if e.kind == "setuid" and e.detail.get("syscall") == "setresuid"
                and e.detail["args"] == [-1, -1, -1] and e.detail["ok"]]
        userns = [e for e in evs if e.kind == "userns" and e.detail.get("syscall") == "unshare" and e.detail["ok"]]
        if r32 == [-38] * 4:   # no 32-bit syscalls on this kernel (ia32_emulation=false): nothing to hide there
            seen32 = 0
        else:
            assert r32 == [-1, -1, 0, 0], f"int 0x80 setuid32(0), setuid16(0), setresuid32(-1...), unshare: {r32}"
            seen32 = 1 if mode == "kprobe" else 0
        assert (len(refused), len(noop), len(userns)) == (1 + 2 * seen32, seen32, 1 + seen32), \
            [(e.kind, e.pid, e.detail) for e in evs if e.kind in ("setuid", "userns")]
        tracer.close()


@pytest.mark.v2guest
def test_a_refused_kprobe_falls_back_to_tracepoints(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                     make_tracer) -> None:
    """A kprobe the kernel refuses -- on a function of its kprobe blacklist, put where setsid's function goes,
    after the set*id ones are attached -- makes `auto` load the tracepoints instead, with a warning, and leaves
    no kprobe of the attempt in the kernel; `kprobe` asked for is refused with the reason."""
    require(kernel_has_kprobes(), "a kernel with kprobes")
    require(os.path.exists("/sys/kernel/debug/kprobes/list"), "debugfs at /sys/kernel/debug")
    from bcc import BPF

    from jobcage.agent.tracer import bpf_backend

    refused = next(name for line in Path("/sys/kernel/debug/kprobes/blacklist").read_text().splitlines()
                   for name in line.split()[-1:] if BPF.ksymname(name.encode()) >= 0)
    points = bpf_backend.kprobe_points
    monkeypatch.setattr(bpf_backend, "kprobe_points",
                        lambda sc: [(refused, None, "kr_setsid")] if sc == "setsid" else points(sc))
    before = _kprobed("__x64_sys_setuid")
    with caplog.at_level("WARNING", logger="jobcage.tracer"):
        tracer, _ = make_tracer("bpf")
    assert tracer.syscall_hooks == "tracepoint"
    assert "kprobes on the syscalls failed" in caplog.text
    assert tracer._be.b.num_open_kprobes() == 0 and tracer._be.b.num_open_tracepoints() > 3
    assert _kprobed("__x64_sys_setuid") == before, "the set*id kprobes attached before the refusal are gone"
    with pytest.raises(Unsupported, match="syscall hooks by kprobe"):
        make_tracer("bpf", syscall_hooks="kprobe")
    assert _kprobed("__x64_sys_setuid") == before


@pytest.mark.parametrize("backend", ["bpf", "proc"])
def test_double_fork_setsid_keeps_original_parent(backend: str, trace_users: TraceUsers, helpers: Helpers,
                                                  make_cgroup, make_tracer) -> None:
    """A payload (pool uid, via sutest) that daemonizes: the grandchild is reparented, the lineage still names
    its original parent and, through it, the payload and the helper."""
    pilot, pool = trace_users.pilot, trace_users.pool
    tracer, col = make_tracer(backend)
    cg = make_cgroup()
    job = shell_job(cg, f"{helpers.sutest} {pool.uid} {pool.gid} {PYTHON} {helpers.daemonize} 30", pilot)
    out = _run([tracer], job, "daemon", pilot.uid, cg.id)
    payload, child, grandchild = (int(x) for x in out.split())
    assert grandchild in cg.procs(), "the daemon is still in the job's cgroup"
    assert proc_ppid(grandchild) != child, "the grandchild was reparented"
    lin = tracer.lineage("daemon")
    assert lin[grandchild]["ppid"] == child
    assert lin[child]["ppid"] == payload
    assert lin[payload]["ppid"] == job.pid
    assert lin[grandchild]["uid"] == pool.uid
    sid = _first(col.of("daemon"), "setsid", kind="setsid", pid=child)
    assert sid.ppid == payload and sid.detail["ok"] and sid.detail["ret"] == child
    assert sid.uid == pool.uid
    if backend == "bpf":   # the proc connector carries no file names (its exe reads race the execs)
        assert lin[grandchild]["via"] == str(helpers.sutest)


def test_proc_backend_same_identities(trace_users: TraceUsers, helpers: Helpers, sudoers, make_cgroup,
                                      make_tracer) -> None:
    """The proc-connector fallback and BPF, on the same job at the same time, see the same identities in the
    same processes."""
    pilot, pool = trace_users.pilot, trace_users.pool
    bpf_t, bpf_col = make_tracer("bpf")
    proc_t, proc_col = make_tracer("proc")
    assert proc_t.backend == "proc"
    cg = make_cgroup()
    sudoers(f"{pilot.name} ALL=({pool.name}) NOPASSWD: ALL")
    # a sleep in the payload keeps /proc readable for the proc backend's lookups
    script = (f"{helpers.sutest} {pool.uid} {pool.gid} /bin/sh -c 'sleep 0.3'\n"
              f"sudo -n -u {pool.name} /bin/sh -c 'sleep 0.3'")
    job = shell_job(cg, script, pilot)
    _run([bpf_t, proc_t], job, "same", pilot.uid, cg.id)

    def identities(col, tracer: Tracer) -> tuple[set[int], dict[int, int]]:
        switched = {e.pid: e.uid for e in col.of("same", "setuid") if e.detail["ok"] and e.uid == pool.uid}
        uids = {e.uid for e in col.of("same") if e.kind in ("exec", "setuid") and e.detail.get("ok", True)}
        return uids, switched

    bpf_uids, bpf_switched = identities(bpf_col, bpf_t)
    proc_uids, proc_switched = identities(proc_col, proc_t)
    assert pool.uid in bpf_uids and pilot.uid in bpf_uids
    assert proc_uids == bpf_uids
    assert proc_switched == bpf_switched and len(bpf_switched) == 2   # the same two processes
    bpf_exec = {(e.pid, e.uid) for e in bpf_col.of("same", "exec") if e.uid == pool.uid}
    proc_exec = {(e.pid, e.uid) for e in proc_col.of("same", "exec") if e.uid == pool.uid}
    assert proc_exec == bpf_exec
    bl, pl = bpf_t.lineage("same"), proc_t.lineage("same")
    for pid in bpf_switched:
        assert pl[pid]["ppid"] == bl[pid]["ppid"] and pl[pid]["uid"] == bl[pid]["uid"] == pool.uid


def test_fork_bomb_counts_not_flood(trace_users: TraceUsers, helpers: Helpers, make_cgroup, make_tracer) -> None:
    """A fork bomb under a pids.max set before it starts (v1 twin, or the cgroup itself on pure v2): forks and
    failed forks are counted in the kernel, user space gets a handful of events, and identity events of the
    same job are all delivered meanwhile."""
    pilot, pool = trace_users.pilot, trace_users.pool
    tracer, col = make_tracer("bpf")
    cg = make_cgroup(pids_max=32)
    pairs = 2000
    idloop = GatedJob(cg, [PYTHON, str(helpers.idloop), str(pool.uid), str(pairs)])   # root, toggles euid
    stop = helpers.dir / f"stop-{secrets.token_hex(4)}"   # the bomb runs until this exists (or 600 s)
    bomb = GatedJob(cg, [str(helpers.forkbomb), "600", str(stop)], pilot)
    tracer.add_job("bomb", pilot.uid, cg.id)
    bomb.release("x")
    t0 = time.monotonic()
    drive([tracer], lambda: time.monotonic() - t0 > 1.0)
    assert int(((cg.pids_path or cg.path) / "pids.current").read_text()) <= 32   # v1 twin, or v2 itself
    during = len(col.of("bomb"))
    idloop.release()
    # the bomb goes on until the identity loop is done and the kernel has counted 1000 refused forks (a few
    # seconds here, longer on a slow node), then stops
    drive([tracer], lambda: idloop.proc.poll() is not None and (tracer.counters("bomb")["fork_failed"] or 0) >= 1000,
          timeout=300)
    stop.touch()
    drive([tracer], lambda: bomb.proc.poll() is not None, timeout=120)
    bomb_s = time.monotonic() - t0
    stop.unlink()
    assert idloop.proc.communicate()[0].strip() == "done"
    c = tracer.counters("bomb")
    ids = col.of("bomb", "setuid", pid=idloop.pid)
    assert len(ids) == 2 * pairs, f"identity events lost: {len(ids)} of {2 * pairs}, counters {c}"
    assert all(e.detail["ok"] and e.detail["syscall"] == "setresuid" for e in ids)
    assert [e.euid for e in ids[:2]] == [pool.uid, 0]
    assert c["events_lost"] == 0
    assert c["fork_failed"] >= 1000, c
    assert c["forks"] >= 32, c
    failed_events = col.of("bomb", "fork_failed")
    # at most one per CPU per second of the bomb (and the second it started in)
    assert 1 <= len(failed_events) <= (os.cpu_count() or 1) * (math.ceil(bomb_s) + 1), "fork failures are rate limited"
    assert failed_events[0].detail["errno"] == "EAGAIN"
    others = [e for e in col.of("bomb") if e.pid != idloop.pid and e.kind != "fork_failed"]
    assert len(others) <= 10, f"the bomb flooded user space: {len(others)} events"
    assert during <= 20
    print(f"\nfork bomb: {c}, {len(failed_events)} fork_failed events, {len(ids)} identity events")


def test_seed_running_job(trace_users: TraceUsers, helpers: Helpers, make_cgroup, make_tracer) -> None:
    """A job that was running before the tracer (agent restart): its processes are seeded from /proc with their
    identity, and the exit of the pool-uid process is still reported."""
    pilot, pool = trace_users.pilot, trace_users.pool
    cg = make_cgroup()
    job = shell_job(cg, f"{helpers.sutest} {pool.uid} {pool.gid} /bin/sleep 30 & echo $!; wait", pilot)
    job.release()
    assert job.proc.stdout is not None
    sleeper = int(job.proc.stdout.readline())
    time.sleep(0.2)
    tracer, col = make_tracer("bpf")
    tracer.add_job("seeded", pilot.uid, cg.id)     # pids come from the cgroup
    lin = tracer.lineage("seeded")
    assert lin[job.pid]["seeded"] and lin[job.pid]["uid"] == pilot.uid
    assert lin[sleeper]["seeded"] and lin[sleeper]["uid"] == pool.uid and lin[sleeper]["ppid"] == job.pid
    os.kill(sleeper, 9)
    drive([tracer], lambda: job.proc.poll() is not None)
    e = _first(col.of("seeded"), "exit", kind="exit", pid=sleeper)
    assert e.uid == pool.uid and e.ppid == job.pid


def test_job_bookkeeping(make_cgroup, make_tracer) -> None:
    tracer, col = make_tracer("bpf", pid_filter=False)
    with pytest.raises(InvalidArgument):
        type(tracer)(col, backend="nonsense")
    cg = make_cgroup()
    tracer.add_job("a", 0, cg.id)
    tracer.add_job("a", 0, cg.id)   # idempotent: the agent's start-up may register a job twice
    assert tracer.jobs().count("a") == 1
    with pytest.raises(Unsupported):   # no cgroup and no pid filter: nothing to follow
        tracer.add_job("b", 0, None, pids=[os.getpid()])
    job = shell_job(cg, "/bin/true")
    job.release()
    drive([tracer], lambda: job.proc.poll() is not None)
    assert col.of("a", "exec")
    tracer.remove_job("a")
    assert tracer.counters("a")["forks"] >= 1     # readable after removal
    assert "a" not in tracer.jobs()
    n = len(col.events)
    job2 = shell_job(cg, "/bin/true")
    job2.release()
    drive([tracer], lambda: job2.proc.poll() is not None)
    assert len(col.events) == n, "no events for a removed job"
    with pytest.raises(NoSuchJob):
        tracer.counters("never")


def test_auto_backend_prefers_bpf(make_tracer) -> None:
    tracer, _ = make_tracer("auto")
    try:
        import bcc  # noqa: F401
    except ImportError:
        require(False, "bcc is not importable")
    assert tracer.backend == "bpf" and tracer.fallback_reason is None
    from jobcage.agent.tracer import ringbuf

    # x86: the ring's pages are read directly, not through bcc's per-record callback
    assert (tracer._be._ring is not None) == ringbuf.usable()


def test_kinds_and_abi_come_from_the_header(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    """The kinds and syscall names the tracer decodes are read from bpf/jobcage.h and are the trail's; JC_ABI is
    checked at load on both sides: a Python side of another ABI refuses the header (Unsupported, so `auto` falls
    back), and the compiler refuses a header of another ABI than the loader asks for (-DJC_ABI_EXPECTED)."""
    from jobcage import bpf as bpf_files
    from jobcage.agent.events import KINDS
    from jobcage.agent.tracer import abi

    assert set(abi.KIND_NAMES.values()) <= set(KINDS)
    assert abi.KIND_NAMES[1] == "exec" and abi.SYS_NAMES[13] == "map" and 0 not in abi.SYS_NAMES
    assert abi.HEADER_ABI == abi.ABI
    abi.check()
    monkeypatch.setattr(abi, "ABI", abi.ABI + 1)
    with pytest.raises(Unsupported, match="JC_ABI"):
        abi.check()
    monkeypatch.undo()
    try:
        from bcc import BPF
    except ImportError:
        require(False, "bcc is not importable")
    capfd.readouterr()
    with pytest.raises(Exception, match="compile"):   # bcc raises a bare Exception
        BPF(src_file=str(bpf_files.SOURCE).encode(),
            cflags=[f"-I{bpf_files.DIR}", f"-DJC_ABI_EXPECTED={abi.ABI + 1}", "-DJC_SUBTREE"])
    assert "another JC_ABI" in capfd.readouterr().err   # the #error of tracer.bpf.c


RING_PROG = r"""
struct rec { u64 seq; u32 pid; u32 keep; u64 sq; u32 tail; };   /* 32 bytes: a 40-byte step, which 4096 does not divide */
BPF_RINGBUF_OUTPUT(ring, 1);
BPF_ARRAY(seq, u64, 1);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    if ((bpf_get_current_pid_tgid() >> 32) != TGID)
        return 0;
    u32 zero = 0;
    u64 *s = seq.lookup(&zero);
    if (!s)
        return 0;
    u64 n = (*s)++;
    struct rec *r = ring.ringbuf_reserve(sizeof(*r));
    if (!r)
        return 0;
    r->seq = n;
    r->pid = TGID;
    r->keep = !DISCARD || n % 3 != 2;
    r->sq = n * n;
    r->tail = 0xabcdef;
    if (r->keep)
        ring.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    else
        ring.ringbuf_discard(r, BPF_RB_NO_WAKEUP);
    return 0;
}
"""


@pytest.mark.parametrize("discard", [0, 1])
def test_ring_reader_reads_the_kernels_records_across_the_wrap(discard: int) -> None:
    """The agent's reader of the ring's pages (agent/tracer/ringbuf.py) against a real ring of one page filled by a
    real program, lap after lap: records that straddle the end of the ring (a 40-byte step), the consumer position
    handed back so the kernel can reuse the room (a ring that is never read back loses records: the sequence
    numbers would jump; one that is read twice repeats them).  With ``discard`` every third record is discarded,
    which sends the reader the slow way, record by record."""
    import struct

    from bcc import BPF

    from jobcage.agent.tracer import ringbuf

    require(ringbuf.usable(), "the ring reader is for x86 (ordered loads)")
    b = BPF(text=RING_PROG.encode(), cflags=[f"-DTGID={os.getpid()}", f"-DDISCARD={discard}"])
    reader = ringbuf.RingReader(b[b"ring"].map_fd, struct.Struct("=QIIQI4x"))
    try:
        got: list[tuple] = []
        for _ in range(40):   # 40 x 60 records of 40 bytes: ~35 laps of a 4096-byte ring
            for _ in range(60):
                os.getppid()
            got += reader.read()
        assert reader.read() == []
    finally:
        reader.close()
        b.cleanup()
    kept = [n for n in range(2400) if not discard or n % 3 != 2]
    assert [r[0] for r in got] == kept
    assert all(r == (n, os.getpid(), 1, n * n, 0xABCDEF) for r, n in zip(got, kept, strict=True))
