"""Attach mode on the host (hybrid): jobcage holds a job in cgroups a batch system made, moving nothing.

The test plays the batch system: it makes Slurm's cgroup/v2 layout ``.../slurmstepd.scope/job_N/step_S/user/task_0``
under a subtree of its own (``jobcage-tbatch<hex>``, in cgroup2 and, like systemd on a hybrid node, at the same
path in the v1 pids hierarchy with the job's pids.max), starts the job's task in ``task_0`` as root (as slurmstepd
does) dropping to the pilot user, and removes the cgroups at the end of the job as the batch system would.
Everything is checked from the outside: the jobcage CLIs, /proc, cgroupfs.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from jctest import (
    BPF,
    PROC,
    PYTHON,
    SH,
    SUDO,
    AgentProc,
    FakeBatch,
    Helpers,
    JcEnv,
    User,
    alive,
    fifo,
    hierarchies,
    job_no,
    job_scratch,
    open_gate,
    pid_file,
    proc,
    proc_cgroups,
    require,
    show,
    ticks,
    trail,
    wait_for,
)

pytestmark = [pytest.mark.root]

BURN_S = 1.0


@pytest.fixture
def pilot(make_user: Callable[..., User]) -> User:
    return make_user("jcat")


@pytest.fixture
def pool(make_user: Callable[..., User]) -> User:
    return make_user("jcat")


def in_task(pid: int, task: dict[str, Path]) -> bool:
    """pid is in the batch system's task cgroup in every hierarchy (it never left it)."""
    cg = proc_cgroups(pid)
    h = hierarchies()
    return all(cg.get("" if k == "unified" else k) == "/" + os.path.relpath(d, h[k]) for k, d in task.items())


# -- the pilot job, end to end ----------------------------------------------------------------------------------

@pytest.mark.bpf
@pytest.mark.parametrize("jc_env", [pytest.param(BPF, id="bpf"), pytest.param(PROC, id="proc")], indirect=True)
def test_attach_pilot_job(jc_env: JcEnv, agent_proc: AgentProc, batch: FakeBatch, pilot: User, pool: User,
                          helpers: Helpers, sudoers: Callable[..., Path]) -> None:
    """Prolog-time attach to the batch system's job cgroup; the task starts later in a step cgroup made after
    the attach.  A sudo payload (CPU as the pool uid), a setsid daemon: all traced, accounted per identity,
    back-mapped; suspend/resume freeze and thaw the whole subtree; kill empties it; the batch system's cgroups,
    limit and placement are untouched; epilogue ends the job and leaves the batch system's cgroups to it."""
    n = job_no()
    job = str(n)
    jobdir = batch.make_job(n)
    before_max = (batch.job_dir(n, "pids") / "pids.max").read_text() if "pids" in batch.roots else None
    s = jc_env.jobcage("prologue", job, "--uid", str(pilot.uid), "--cgroup", str(jobdir), "--json").json()
    assert (s["mode"], s["cgroup"], s["state"], s["processes"]) == ("attach", str(jobdir), "running", 0), s
    assert not (jc_env.member_dir(job) / "cgroup.procs").read_text().strip(), "the anchor holds nothing"

    d = job_scratch(jc_env, job)
    end = fifo(d, "end")
    sudoers(f"{pilot.name} ALL=({pool.name}) NOPASSWD: ALL")
    payload = d / "payload.sh"
    payload.write_text(f"echo $$ > {d}/payload.pid\n{PYTHON} {helpers.burn} {BURN_S}\n")
    payload.chmod(0o644)
    script = (f"echo $$ > {d}/pilot.pid\n"
              f"{SUDO} -n -u {pool.name} {SH} {payload} &\n"
              f"helper=$!\necho $helper > {d}/helper.pid\n"
              f"setsid {SH} -c 'echo $$ > {d}/daemon.pid; while :; do echo t >> {d}/tick; sleep 0.05; done' &\n"
              f"wait $helper\necho done > {d}/done\nread _ < {end}\nexit 0\n")
    task = batch.make_step(n, "batch")   # made after the attach: the tracer must match it as a descendant
    p = batch.launch(task, [SH, "-c", script], pilot, jc_env.env)
    pilot_pid, daemon_pid = pid_file(d / "pilot.pid"), pid_file(d / "daemon.pid")
    payload_pid = pid_file(d / "payload.pid")
    assert pilot_pid == p.pid
    wait_for(lambda: (d / "done").exists(), 60, "the payload to finish")

    # moved nothing: every process is where the batch system put it
    for pid in (pilot_pid, daemon_pid):
        assert in_task(pid, task), (pid, proc_cgroups(pid))
    # trail: sudo exec'd by the pilot, the switch to the pool uid, the payload's exec, the daemon's setsid
    evs = wait_for(lambda: (e := trail(jc_env, job)) and any(x["kind"] == "exit" and x["pid"] == payload_pid
                                                               for x in e) and e, 30, "the payload's exit")
    assert any(e["kind"] == "exec" and e["filename"] == SUDO and e["uid"] == pilot.uid for e in evs), evs
    sw = [e for e in evs if e["kind"] == "setuid" and e["uid"] == pool.uid and e["detail"].get("ok")]
    assert sw and sw[0]["pid"] == payload_pid and sw[0]["detail"]["via"] == SUDO, evs
    assert any(e["kind"] == "exec" and e["pid"] == payload_pid and e["uid"] == pool.uid for e in evs), evs
    assert any(e["kind"] == "setsid" and e["pid"] == daemon_pid for e in evs), evs
    t_payload = time.time()

    # per-identity CPU: the pool uid burned BURN_S; the identities add up to the batch cgroup's own counter
    s = show(jc_env, job)
    got = {i["uid"]: i for i in s["identities"]}
    assert s["mode"] == "attach" and s["processes"] >= 3 and s["events_lost"] == 0, s
    # sudo's own real uid 0 is an identity the job held too (whois names the job for any ts of the trail)
    assert set(got) - {0} == {pilot.uid, pool.uid} and got.get(0, {}).get("via", SUDO) == SUDO, got
    assert got[pool.uid]["via"] == SUDO and got[pilot.uid]["via"] == "batch system", got
    assert got[pool.uid]["cpu_seconds"] >= BURN_S * 0.95, got
    total = sum(i["cpu_seconds"] for i in s["identities"])
    assert abs(total - s["cpu_seconds"]) <= max(0.1, 0.05 * s["cpu_seconds"]), (total, s["cpu_seconds"])
    if before_max is not None:   # the batch system's limit, read, not written
        assert s["pids_max"] == int(before_max) and s["pids_current"] >= 3, s
    rows = jc_env.jobcage("whois", "--uid", str(pool.uid), "--json").json()
    assert [(r["job_id"], r["pilot_uid"], r["via"]) for r in rows] == [(job, pilot.uid, SUDO)], rows
    listed = {j["job_id"]: j for j in jc_env.jobcage("list", "--json").json()}
    assert listed[job]["mode"] == "attach"

    # suspend: the kernel says every cgroup of the subtree is frozen, and the daemon stops ticking
    jc_env.jobcage("suspend", job).ok()
    assert show(jc_env, job)["state"] == "suspended"
    for dd, _s, _f in os.walk(jobdir):
        assert "frozen 1" in (Path(dd) / "cgroup.events").read_text(), dd
    n0 = ticks(d / "tick")
    time.sleep(0.5)
    assert ticks(d / "tick") == n0, "the setsid daemon ran while the job was suspended"
    jc_env.jobcage("resume", job).ok()
    wait_for(lambda: ticks(d / "tick") > n0, 10, "the daemon to tick again after resume")
    assert show(jc_env, job)["state"] == "running"

    # kill: every process of the subtree dies, the batch system's cgroups and limit stay
    jc_env.jobcage("kill", job).ok()
    assert not any(alive(x) for x in (pilot_pid, daemon_pid)), (proc(pilot_pid), proc(daemon_pid))
    assert p.wait(timeout=10) != 0
    assert all(dd.is_dir() for dd in task.values()), "jobcage removed a cgroup of the batch system"
    if before_max is not None:
        assert (batch.job_dir(n, "pids") / "pids.max").read_text() == before_max

    summary = jc_env.jobcage("epilogue", job, "--json").json()
    assert (summary["state"], summary["mode"]) == ("ended", "attach"), summary
    assert {i["uid"] for i in summary["identities"]} - {0} == {pilot.uid, pool.uid}
    assert jobdir.is_dir(), "the batch system's job cgroup is the batch system's to remove"
    assert not jc_env.member_dir(job).exists(), "the anchor in jobcage's subtree is gone"
    rows = jc_env.jobcage("whois", "--uid", str(pool.uid), "--at", f"{t_payload:.3f}", "--json").json()
    assert [(r["job_id"], r["state"]) for r in rows] == [(job, "ended")], rows
    batch.remove_job(n)


@pytest.mark.bpf
@pytest.mark.parametrize("jc_env", [pytest.param(BPF, id="bpf")], indirect=True)
def test_attach_from_pid_cgroup_removed_first(jc_env: JcEnv, agent_proc: AgentProc, batch: FakeBatch,
                                              pilot: User, pool: User, helpers: Helpers) -> None:
    """`--from-pid` finds the job level with the default patterns (Slurm's job_N); the batch system then ends the
    job and removes its cgroups before any epilogue: the agent's reconcile ends the job with its accounting, and
    the epilogue still succeeds (summary, file cleanup)."""
    n = job_no()
    job = str(n)
    batch.make_job(n)
    task = batch.make_step(n, "0")
    d = job_scratch(jc_env, job)
    end = fifo(d, "end")
    script = (f"echo $$ > {d}/pilot.pid\nread _ < {end}\n"
              f"{helpers.sutest} {pool.uid} {pool.gid} {PYTHON} {helpers.burn} {BURN_S}\n"
              f"echo done > {d}/done\nsleep 1000\n")
    batch.launch(task, [SH, "-c", script], pilot, jc_env.env)
    pilot_pid = pid_file(d / "pilot.pid")
    s = jc_env.jobcage("prologue", job, "--uid", str(pilot.uid), "--from-pid", str(pilot_pid), "--json").json()
    assert (s["mode"], s["cgroup"], s["processes"]) == ("attach", str(batch.job_dir(n)), 1), s
    open_gate(end)
    wait_for(lambda: (d / "done").exists(), 60, "the payload to finish")
    s = wait_for(lambda: (x := show(jc_env, job)) and x["identities"] and
                 {i["uid"]: i["cpu_seconds"] for i in x["identities"]}.get(pool.uid, 0) >= BURN_S * 0.95 and x,
                 30, "the pool uid's CPU")
    assert in_task(pilot_pid, task)

    batch.remove_job(n)   # the batch system ends the job; jobcage was not asked
    # show (a read) says what the kernel says at once; the agent's reconcile (the writer) ends the record,
    # with its accounting, and drops the anchor
    wait_for(lambda: not jc_env.member_dir(job).exists(), 30, "reconcile to end the job (its anchor goes)")
    s = show(jc_env, job)
    assert s["state"] == "ended" and s["mode"] == "attach", s
    got = {i["uid"]: i["cpu_seconds"] for i in s["identities"]}
    assert got[pool.uid] >= BURN_S * 0.95, got
    summary = jc_env.jobcage("epilogue", job, "--json").json()
    assert summary["state"] == "ended" and summary["mode"] == "attach" and summary["cleanup"] is not None, summary
    assert {i["uid"]: i["cpu_seconds"] for i in summary["identities"]}[pool.uid] >= BURN_S * 0.95
    jc_env.jobcage("epilogue", job).ok()   # idempotent
    assert {j["job_id"]: j["mode"] for j in jc_env.jobcage("list", "--all", "--json").json()}[job] == "attach"


def test_attach_direct_path(jc_env: JcEnv, batch: FakeBatch, pilot: User) -> None:
    """No agent (the direct root path): attach, suspend/resume/kill through the batch cgroup, a lost database
    (the anchor's xattr brings the job back), epilogue after the batch system removed the cgroup."""
    n = job_no()
    job = str(n)
    jobdir = batch.make_job(n)
    task = batch.make_step(n, "0")
    p = batch.launch(task, [SH, "-c", "sleep 1000 & sleep 1000 & wait"], pilot, jc_env.env)
    jc_env.jobcage("prologue", job, "--uid", str(pilot.uid), "--cgroup", str(jobdir)).ok()
    wait_for(lambda: show(jc_env, job)["processes"] == 3, 10, "the task and its two children")
    jc_env.jobcage("suspend", job).ok()
    assert "frozen 1" in (task["unified"] / "cgroup.events").read_text()
    jc_env.jobcage("resume", job).ok()
    assert "frozen 0" in (task["unified"] / "cgroup.events").read_text()

    for f in jc_env.state_dir.glob("jobcage.db*"):   # the database is lost; the kernel still knows
        f.unlink()
    s = show(jc_env, job)
    assert (s["mode"], s["cgroup"], s["owner_uid"], s["processes"]) == ("attach", str(jobdir), pilot.uid, 3), s

    jc_env.jobcage("kill", job).ok()
    assert p.wait(timeout=10) != 0
    batch.remove_job(n)
    summary = jc_env.jobcage("epilogue", job, "--json").json()
    assert (summary["state"], summary["mode"]) == ("ended", "attach") and summary["cleanup"] is not None, summary
    assert not jc_env.member_dir(job).exists()


STEPD = ("import os, sys, time\n"
         "open('/proc/self/comm', 'w').write('slurmstepd')\n"
         "while True:\n"
         "    with open(sys.argv[1], 'a') as f: f.write('t\\n')\n"
         "    time.sleep(0.05)\n")


def test_attach_passes_the_batch_systems_daemon_by(jc_env: JcEnv, batch: FakeBatch, pilot: User) -> None:
    """Slurm's slurmstepd lives inside job_N (step_M/slurm): jobcage's suspend, signals and kill of an attached
    job pass the batch system's root daemons ([attach] batch_daemons) by -- frozen, slurmd hangs on it; killed,
    the step fails -- and act on everything else, including a user's process that calls itself slurmstepd."""
    n = job_no()
    job = str(n)
    jobdir = batch.make_job(n)
    jc_env.jobcage("prologue", job, "--uid", str(pilot.uid), "--cgroup", str(jobdir)).ok()
    task = batch.make_step(n, "batch")
    stepd_cg = {k: batch.job_dir(n, k) / "step_batch" / "slurm" for k in batch.roots}
    for d in stepd_cg.values():
        d.mkdir()
    d = job_scratch(jc_env, job)
    ticks_root, ticks_user = d / "stepd.tick", d / "fake.tick"

    def enter(dirs: dict[str, Path]) -> Callable[[], None]:
        return lambda: [Path(d, "cgroup.procs").write_text(str(os.getpid())) for d in dirs.values()] and None

    stepd = subprocess.Popen([PYTHON, "-c", STEPD, str(ticks_root)], preexec_fn=enter(stepd_cg),
                             start_new_session=True, stdin=subprocess.DEVNULL)
    batch.procs.append(stepd)
    fake = batch.launch(task, [PYTHON, "-c", STEPD, str(ticks_user)], pilot, jc_env.env)  # a user's "slurmstepd"
    task_sleep = batch.launch(task, ["/bin/sleep", "600"], pilot, jc_env.env)
    wait_for(lambda: ticks(ticks_root) > 2 and ticks(ticks_user) > 2, 20, "both slurmstepd-named loops ticking")
    assert Path(f"/proc/{stepd.pid}/comm").read_text().strip() == "slurmstepd"

    jc_env.jobcage("suspend", job).ok()
    assert show(jc_env, job)["state"] == "suspended"
    assert "frozen 1" in (task["unified"] / "cgroup.events").read_text()
    assert "frozen 0" in (stepd_cg["unified"] / "cgroup.events").read_text()
    u0, r0 = ticks(ticks_user), ticks(ticks_root)
    wait_for(lambda: ticks(ticks_root) > r0 + 3, 10, "the batch system's daemon to run on while the job is frozen")
    assert ticks(ticks_user) == u0, "the user's process named slurmstepd was spared"
    jc_env.jobcage("resume", job).ok()
    wait_for(lambda: ticks(ticks_user) > u0, 10, "the job to run again after resume")

    jc_env.jobcage("kill", job).ok()
    assert fake.wait(timeout=10) != 0 and task_sleep.wait(timeout=10) != 0
    assert stepd.poll() is None, "jobcage killed the batch system's daemon"
    s = jc_env.jobcage("epilogue", job, "--json").json()
    assert s["state"] == "ended" and stepd.poll() is None, s
    stepd.kill()
    stepd.wait(timeout=10)
    batch.remove_job(n)


def test_attach_adopt_rules(jc_env: JcEnv, batch: FakeBatch, pilot: User) -> None:
    """adopt into an attached job: a pid already inside is fine (nothing moves), any other pid is refused with one
    line; a pid inside an attached job cannot be adopted into another (own-mode) job either."""
    n = job_no()
    job = str(n)
    jobdir = batch.make_job(n)
    task = batch.make_step(n, "0")
    inside = batch.launch(task, ["sleep", "1000"], pilot, jc_env.env)
    outside = jc_env.popen(["sleep", "1000"], user=pilot)
    jc_env.jobcage("prologue", job, "--uid", str(pilot.uid), "--cgroup", str(jobdir)).ok()
    wait_for(lambda: in_task(inside.pid, task), 10, "the task in its cgroup")
    jc_env.jobcage("adopt", job, "--pid", str(inside.pid)).ok()
    assert in_task(inside.pid, task)
    err = jc_env.jobcage("adopt", job, "--pid", str(outside.pid)).clean_error(1, "moves nothing")
    assert str(jobdir) in err
    assert "0::/" + os.path.relpath(jobdir, hierarchies()["unified"]) not in Path(
        f"/proc/{outside.pid}/cgroup").read_text()
    strays = {x["pid"] for x in jc_env.jobcage("prune", "--uid", str(pilot.uid), "--json").json()["strays"]}
    assert inside.pid not in strays and outside.pid in strays, strays   # prune: the attached job's are in a job
    own = f"own-{n}"
    jc_env.jobcage("prologue", own, "--uid", str(pilot.uid)).ok()
    jc_env.jobcage("adopt", own, "--pid", str(inside.pid)).clean_error(1, f"belongs to job {job}")
    jc_env.jobcage("prologue", f"own2-{n}", "--uid", str(pilot.uid), "--pid", str(inside.pid)) \
        .clean_error(1, f"belongs to job {job}")
    assert in_task(inside.pid, task)
    jc_env.jobcage("adopt", own, "--pid", str(outside.pid)).ok()   # own mode still moves what it may
    for j in (job, own):
        jc_env.jobcage("epilogue", j).ok()
    batch.remove_job(n)


def test_attach_bad_input(jc_env: JcEnv, batch: FakeBatch, pilot: User, tmp_path: Path) -> None:
    """Each bad --cgroup: one clear line, exit 1 (2 for usage), nothing changed in jobcage's subtree, the batch
    system's cgroups or the store."""
    uni = hierarchies()["unified"]
    n = job_no()
    jobdir = batch.make_job(n)
    task = batch.make_step(n, "0")
    first = f"{n}"
    jc_env.jobcage("prologue", first, "--uid", str(pilot.uid), "--cgroup", str(jobdir)).ok()
    nested = batch.make_job(n + 1)
    link = tmp_path / "cg-link"
    link.symlink_to(jobdir)
    sleeper = jc_env.popen(["sleep", "1000"], user=pilot)   # in no batch job cgroup

    def state() -> tuple:
        return (jc_env.listing(), batch.listing(), jc_env.jobcage("list", "--all", "--json").json(),
                (batch.job_dir(n, "pids") / "pids.max").read_text() if "pids" in batch.roots else None)

    before = state()
    uid = ["--uid", str(pilot.uid)]
    cases: list[tuple[list[str], int, str]] = [
        (["--cgroup", "/tmp"], 1, "not under a cgroup mount"),
        (["--cgroup", str(tmp_path)], 1, "not under a cgroup mount"),
        (["--cgroup", f"{jobdir}/../job_{n + 1}"], 1, "'..'"),
        (["--cgroup", f"{uni}/../unified/{batch.top}"], 1, "'..'"),
        (["--cgroup", "relative/path"], 1, "absolute"),
        (["--cgroup", str(uni)], 1, "root cgroup"),
        (["--cgroup", str(link)], 1, "not under a cgroup mount"),
        (["--cgroup", f"{jobdir}-missing"], 1, "no such cgroup"),
        (["--cgroup", str(task["unified"] / "cgroup.procs")], 1, "not a cgroup"),
        (["--cgroup", str(jobdir)], 1, f"already attached to job {first}"),
        (["--cgroup", str(task["unified"])], 1, f"overlaps the cgroup of job {first}"),
        (["--cgroup", str(uni / jc_env.subtree)], 1, "jobcage's own subtree"),
        (["--cgroup", str(nested), "--pids-max", "100"], 1, "pids_limit"),
        (["--cgroup", str(nested), "--from-pid", str(sleeper.pid)], 2, "exclude each other"),
        (["--from-pid", str(sleeper.pid)], 1, "no cgroup matching"),
        (["--from-pid", "999999999"], 1, "no such process"),
        (["--cgroup", str(nested), "--pid", str(sleeper.pid)], 1, "moves nothing"),
    ]
    for i, (args, rc, msg) in enumerate(cases):
        r = jc_env.jobcage("prologue", f"bad{i}-{n}", *uid, *args)
        r.clean_error(rc, msg)
        assert state() == before, f"{args} changed something"
    # the first job's id again, on another cgroup: refused, the first attach stands
    jc_env.jobcage("prologue", first, *uid, "--cgroup", str(nested)).clean_error(1, "already exists")
    assert state() == before
    jc_env.jobcage("epilogue", first).ok()


def test_attach_cgroup_vanishes_between_check_and_use(jc_env: JcEnv, batch: FakeBatch, pilot: User,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch system removes its cgroup right after jobcage checked it (the rmdir is real, its timing is
    forced by wrapping the check): the prologue fails with one clear message and leaves nothing behind."""
    from jobcage.cgroups.errors import NoSuchCgroup
    from jobcage.cgroups.path import CgroupAt

    n = job_no()
    jobdir = batch.make_job(n)
    real_open = CgroupAt.open.__func__   # type: ignore[attr-defined]

    def open_then_vanish(cls: type, layout: object, path: object) -> CgroupAt:
        cg = real_open(cls, layout, path)
        for kind in batch.roots:
            os.rmdir(batch.job_dir(n, kind))
        return cg

    monkeypatch.setattr(CgroupAt, "open", classmethod(open_then_vanish))
    before = jc_env.listing()
    m = jc_env.manager()
    with pytest.raises(NoSuchCgroup) as e:
        m.prologue(str(n), pilot.uid, cgroup=str(jobdir))
    assert "vanished" in str(e.value) and "\n" not in str(e.value)
    assert jc_env.listing() == before and m.store.job(str(n)) is None


def test_attach_v1_freezer_cgroup(jc_env: JcEnv, pilot: User) -> None:
    """A batch system that uses the v1 freezer (and pids) hierarchies, like Slurm's cgroup/v1 plugin
    (`/slurm/uid_U/job_N` there): --from-pid finds the job level with the default patterns; suspend is the
    freezer's FROZEN, the pids counters are the batch system's (read, not written), kill empties the subtree."""
    h = hierarchies()
    require("freezer" in h and "pids" in h, "v1 freezer and pids hierarchies are needed")
    b = FakeBatch(kinds=("freezer", "pids"))
    try:
        n = job_no()
        job = str(n)
        rel = Path(b.top) / "slurm" / f"uid_{pilot.uid}" / f"job_{n}"
        task = {}
        for kind in ("freezer", "pids"):
            task[kind] = h[kind] / rel / "step_0" / "task_0"
            task[kind].mkdir(parents=True)
        (h["pids"] / rel / "pids.max").write_text("200")
        p = b.launch(task, [SH, "-c", "sleep 1000 & sleep 1000 & wait"], pilot, jc_env.env)
        wait_for(lambda: len((task["freezer"] / "cgroup.procs").read_text().split()) == 3, 10, "the task's processes")
        s = jc_env.jobcage("prologue", job, "--uid", str(pilot.uid), "--from-pid", str(p.pid), "--json").json()
        assert (s["mode"], s["cgroup"], s["processes"]) == ("attach", str(h["freezer"] / rel), 3), s
        assert (s["pids_max"], s["pids_current"]) == (200, 3), s
        jc_env.jobcage("suspend", job).ok()
        assert (h["freezer"] / rel / "freezer.state").read_text().strip() == "FROZEN"
        assert (task["freezer"] / "freezer.state").read_text().strip() == "FROZEN"
        assert show(jc_env, job)["state"] == "suspended"
        jc_env.jobcage("resume", job).ok()
        assert (task["freezer"] / "freezer.state").read_text().strip() == "THAWED"
        jc_env.jobcage("kill", job).ok()
        assert p.wait(timeout=10) != 0
        assert not (task["freezer"] / "cgroup.procs").read_text().split()
        assert (h["pids"] / rel / "pids.max").read_text().strip() == "200", "the batch system's limit is untouched"
        summary = jc_env.jobcage("epilogue", job, "--json").json()
        assert (summary["state"], summary["mode"]) == ("ended", "attach")
        assert task["freezer"].is_dir()
    finally:
        problems = b.cleanup()
        assert not problems, problems


@pytest.mark.jc_config({"attach": {"pids_limit": True}})
def test_attach_pids_limit_opt_in_holds_a_fork_bomb(jc_env: JcEnv, batch: FakeBatch, pilot: User,
                                                    helpers: Helpers) -> None:
    """With `[attach] pids_limit = true` the prologue writes pids.max in the batch system's cgroup (here below
    the batch system's own 256): a fork bomb of the job is held there, the hits are counted, and the epilogue
    gives the batch system its value back."""
    require("pids" in batch.roots, "a v1 pids hierarchy (hybrid node) is needed")
    n = job_no()
    job = str(n)
    jobdir = batch.make_job(n, pids_max=256)
    pids_max = batch.job_dir(n, "pids") / "pids.max"
    s = jc_env.jobcage("prologue", job, "--uid", str(pilot.uid), "--cgroup", str(jobdir), "--pids-max", "48",
                       "--json").json()
    assert s["pids_max"] == 48 and pids_max.read_text().strip() == "48", s
    task = batch.make_step(n, "0")
    r, w = os.pipe()   # the bomb starts on one byte from this pipe, once it is in the task cgroup
    procs_files = [str(d / "cgroup.procs") for d in task.values()]

    def enter() -> None:
        for f in procs_files:
            with open(f, "w") as fh:
                fh.write(str(os.getpid()))
        os.setresgid(pilot.gid, pilot.gid, pilot.gid)
        os.setresuid(pilot.uid, pilot.uid, pilot.uid)

    bomb = subprocess.Popen([str(helpers.forkbomb), "3"], stdin=r, preexec_fn=enter, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    batch.procs.append(bomb)
    os.close(r)
    os.write(w, b"x")
    os.close(w)
    peak = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        peak = max(peak, int((batch.job_dir(n, "pids") / "pids.current").read_text()))
        time.sleep(0.02)
    s = show(jc_env, job)
    assert peak <= 48 and s["pids_limit_hits"] > 0, (peak, s)
    jc_env.jobcage("kill", job).ok()
    summary = jc_env.jobcage("epilogue", job, "--json").json()
    assert summary["pids_limit_hits"] > 0
    assert pids_max.read_text().strip() == "256", "the batch system's limit is restored"
    batch.remove_job(n)


@pytest.mark.jc_config({"attach": {"pids_limit": True}})
def test_attach_pids_limit_without_a_pids_controller_is_refused(jc_env: JcEnv, pilot: User) -> None:
    """The site opted in, but the batch system's cgroup has no pids controller and its parent has none to give
    (the hybrid node's controller-less cgroup2, no v1 pids cgroup made): one clear line, nothing changed."""
    batch = FakeBatch(("unified",))
    try:
        n = job_no()
        jobdir = batch.make_job(n)
        before = (jc_env.listing(), batch.listing(), (jobdir.parent / "cgroup.subtree_control").read_text())
        r = jc_env.jobcage("prologue", str(n), "--uid", str(pilot.uid), "--cgroup", str(jobdir))
        r.clean_error(1, "no pids controller")
        assert (jc_env.listing(), batch.listing(), (jobdir.parent / "cgroup.subtree_control").read_text()) == before
        assert jc_env.jobcage("list", "--all", "--json").json() == []
    finally:
        assert not batch.cleanup()
