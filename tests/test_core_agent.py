"""The agent is optional for containment: with it stopped (or crashed) the lifecycle works directly as root;
started again, it re-adopts every job the kernel still holds and keeps the records it had.  Also the
permission rules enforced through the agent for non-root callers (SO_PEERCRED)."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable

import pytest
from jctest import JOBCAGE, AgentProc, JcEnv, User, alive, pids_of_uid, proc_cgroups, read_int, wait_for

pytestmark = pytest.mark.root

SLEEPER = "while :; do sleep 1; done"


def frozen_members(env: JcEnv, job: str) -> bool:
    """Every member of the job is stopped by the freezer (checked on the kernel's own files)."""
    d = env.member_dir(job)
    if (d / "cgroup.events").exists():
        return "frozen 1" in (d / "cgroup.events").read_text()
    return (d / "freezer.state").read_text().strip() == "FROZEN"


def test_lifecycle_without_agent(cgroup_mode: str, jc_env: JcEnv, make_user: Callable[..., User],
                                 agent_proc: AgentProc) -> None:
    owner = make_user()
    jc_env.jobcage("prologue", "j1", "--uid", str(owner.uid)).ok()    # through the agent
    assert agent_proc.stop() == 0, agent_proc.log()                    # clean stop: jobs stay
    assert not agent_proc.ping()
    # everything below goes the direct path (root, no agent)
    jc_env.start_job("j1", SLEEPER, user=owner)
    wait_for(lambda: jc_env.job_pids("j1"), 30, "j1 to have a process")
    jc_env.jobcage("suspend", "j1").ok()
    assert frozen_members(jc_env, "j1")
    jc_env.jobcage("resume", "j1").ok()
    assert not frozen_members(jc_env, "j1")
    jc_env.jobcage("prologue", "j2", "--uid", str(owner.uid), "--pids-max", "32").ok()
    jc_env.start_job("j2", SLEEPER, user=owner)
    wait_for(lambda: jc_env.job_pids("j2"), 30, "j2 to have a process")
    jc_env.jobcage("kill", "j1").ok()
    assert jc_env.job_pids("j1") == []
    jc_env.jobcage("epilogue", "j1").ok()
    # a non-root user cannot go direct: one clear line, nothing changed
    jc_env.jobcage("show", "j2", user=owner).clean_error(1, "agent")
    jc_env.jobcage("kill", "j2", user=owner).clean_error(1)
    assert jc_env.job_pids("j2")
    # the agent comes back: the job prologued while it was down is there, j1 is history
    agent_proc.start()
    listed = {j["job_id"]: j for j in agent_proc.result("list", all=True)}
    assert listed["j2"]["state"] == "running" and listed["j2"]["processes"] >= 1, listed
    assert listed["j2"]["owner_uid"] == owner.uid and listed["j2"]["pids_max"] == 32
    assert listed["j1"]["state"] == "ended", listed
    # and the owner reaches it through the agent now
    assert jc_env.jobcage("show", "j2", "--json", user=owner).json()["processes"] >= 1
    jc_env.jobcage("epilogue", "j2").ok()
    wait_for(lambda: not pids_of_uid(owner.uid), 5, "the owner's processes to be gone")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "crashed"])
def test_agent_restart_keeps_and_readopts_jobs(how: int, jc_env: JcEnv, make_user: Callable[..., User],
                                               agent_proc: AgentProc) -> None:
    owner = make_user()
    jc_env.jobcage("prologue", "r1", "--uid", str(owner.uid), "--pids-max", "50").ok()
    jc_env.start_job("r1", SLEEPER, user=owner)
    wait_for(lambda: jc_env.job_pids("r1"), 30, "r1 to have a process")
    jc_env.jobcage("suspend", "r1").ok()
    before = agent_proc.result("show", job_id="r1")
    pids = jc_env.job_pids("r1")
    agent_proc.stop(how)
    # the job does not notice: same processes, still frozen, still contained
    assert jc_env.job_pids("r1") == pids and frozen_members(jc_env, "r1")
    agent_proc.start()
    after = agent_proc.result("show", job_id="r1")
    for k in ("job_id", "owner_uid", "cgroup", "pids_max", "created", "state", "processes"):
        assert after[k] == before[k], (k, before, after)
    assert after["state"] == "suspended"
    assert "r1" in {j["job_id"] for j in agent_proc.result("list")}
    agent_proc.result("resume", job_id="r1")
    assert not frozen_members(jc_env, "r1")
    summary = agent_proc.result("epilogue", job_id="r1")
    assert summary["state"] == "ended"
    assert all(not alive(p) for p in pids)


def test_agent_readopts_jobs_when_its_store_is_lost(jc_env: JcEnv, make_user: Callable[..., User]) -> None:
    """The kernel is the truth: a cgroup made while the agent was down, with the state dir wiped, is
    re-registered with its owner (kept in a trusted xattr on the cgroup)."""
    owner = make_user()
    jc_env.jobcage("prologue", "lost", "--uid", str(owner.uid), "--pids-max", "40").ok()   # direct: no agent
    jc_env.start_job("lost", SLEEPER, user=owner)
    wait_for(lambda: jc_env.job_pids("lost"), 30, "the job to have a process")
    shutil.rmtree(jc_env.state_dir)
    agent = AgentProc(jc_env, jc_env.base)
    agent.start()
    try:
        listed = {j["job_id"]: j for j in agent.result("list")}
        assert "lost" in listed, listed
        assert listed["lost"]["owner_uid"] == owner.uid and listed["lost"]["processes"] >= 1
        # the owner can read it again through the agent, and root can end it
        assert jc_env.jobcage("show", "lost", "--json", user=owner).json()["pids_max"] == 40
        agent.result("epilogue", job_id="lost")
        assert not jc_env.member_dir("lost").exists()
    finally:
        agent.stop()


# --- permissions through the agent ------------------------------------------------------------------------------

@pytest.fixture
def two_jobs(jc_env: JcEnv, make_user: Callable[..., User], agent_proc: AgentProc
             ) -> tuple[User, User, list[int]]:
    """Job 'ja' of user A and job 'jb' of user B, each with a running shell; returns (A, B, [pa, pb])."""
    a, b = make_user(), make_user()
    jc_env.jobcage("prologue", "ja", "--uid", str(a.uid)).ok()
    jc_env.jobcage("prologue", "jb", "--uid", str(b.uid)).ok()
    pa = jc_env.start_job("ja", SLEEPER, user=a).pid  # `jobcage run` execs the shell: same pid
    pb = jc_env.start_job("jb", SLEEPER, user=b).pid
    wait_for(lambda: pa in jc_env.job_pids("ja") and pb in jc_env.job_pids("jb"), 30, "ja and jb to start")
    return a, b, [pa, pb]


def test_owner_reads_and_adopts_own(jc_env: JcEnv, two_jobs: tuple[User, User, list[int]]) -> None:
    a, b, _ = two_jobs
    shown = jc_env.jobcage("show", "ja", "--json", user=a).json()
    assert shown["owner_uid"] == a.uid
    assert [j["job_id"] for j in jc_env.jobcage("list", "--json", user=a).json()] == ["ja"]  # not B's
    stray = jc_env.popen(["sleep", "300"], user=a)
    wait_for(lambda: alive(stray.pid) and proc_cgroups(stray.pid), 10, "stray to start")
    jc_env.jobcage("adopt", "ja", "--pid", str(stray.pid), user=a).ok()
    assert jc_env.in_job(stray.pid, "ja")
    # default pid = the caller's parent: a shell adopts itself, its next child is born in the job
    out = jc_env.scratch / "cg"
    jc_env.run(["sh", "-c", f"{JOBCAGE} adopt ja && cat /proc/self/cgroup > {out}"], user=a).ok()
    assert f"/{jc_env.subtree}/ja" in out.read_text()


def test_foreign_pids_and_jobs_refused(jc_env: JcEnv, two_jobs: tuple[User, User, list[int]]) -> None:
    a, b, (pa, pb) = two_jobs
    root_proc = jc_env.popen(["sleep", "300"])
    b_proc = jc_env.popen(["sleep", "300"], user=b)
    a_proc = jc_env.popen(["sleep", "300"], user=a)
    for p in (root_proc, b_proc, a_proc):
        wait_for(lambda p=p: alive(p.pid), 10, "helper process to start")
    before = {p.pid: proc_cgroups(p.pid) for p in (root_proc, b_proc, a_proc)} | {pb: proc_cgroups(pb)}
    listing = jc_env.listing()
    # A may not adopt root's or B's process, nor anything into B's job, nor a process of another job
    jc_env.jobcage("adopt", "ja", "--pid", str(root_proc.pid), user=a).clean_error(1, "not yours")
    jc_env.jobcage("adopt", "ja", "--pid", str(b_proc.pid), user=a).clean_error(1, "not yours")
    jc_env.jobcage("adopt", "jb", "--pid", str(a_proc.pid), user=a).clean_error(1, "not yours")
    jc_env.jobcage("adopt", "ja", "--pid", str(pb), user=a).clean_error(1)
    # B may not read A's job
    jc_env.jobcage("show", "ja", user=b).clean_error(1, "not yours")
    # even root cannot steal a process from another job, nor adopt a pid that does not exist
    jc_env.jobcage("adopt", "ja", "--pid", str(pb)).clean_error(1, "already belongs")
    gone = jc_env.popen(["true"])
    gone.wait()
    jc_env.jobcage("adopt", "ja", "--pid", str(gone.pid)).clean_error(1, "no such process")
    jc_env.jobcage("adopt", "ja", "--pid", "0").clean_error(1)
    after = {pid: proc_cgroups(pid) for pid in before}
    assert after == before, "a refused adopt moved a process"
    assert jc_env.listing() == listing


ROOT_ONLY = [("prologue", "new1", "--uid", "{uid}"), ("kill", "ja"), ("kill", "ja", "--signal", "TERM"),
             ("suspend", "ja"), ("resume", "ja"), ("epilogue", "ja")]


@pytest.mark.parametrize("argv", ROOT_ONLY, ids=lambda a: "-".join(a[:1] + a[2:3]))
def test_root_only_methods_refused(argv: tuple[str, ...], jc_env: JcEnv,
                                   two_jobs: tuple[User, User, list[int]], agent_proc: AgentProc) -> None:
    a, _b, (pa, _pb) = two_jobs
    listing = jc_env.listing()
    args = [x.format(uid=a.uid) for x in argv]
    jc_env.jobcage(*args, user=a).clean_error(1, "requires root")   # even on A's own job
    assert jc_env.listing() == listing
    s = agent_proc.result("show", job_id="ja")
    assert s["state"] == "running" and alive(pa) and pa in jc_env.job_pids("ja")


def test_non_root_direct_path_refused(jc_env: JcEnv, make_user: Callable[..., User]) -> None:
    """No agent: a non-root caller gets one clear line, and nothing is created."""
    a = make_user()
    jc_env.jobcage("prologue", "x1", "--uid", str(a.uid)).ok()
    listing = jc_env.listing()
    for args in (("prologue", "x2", "--uid", str(a.uid)), ("show", "x1"), ("list",), ("suspend", "x1"),
                 ("adopt", "x1"), ("epilogue", "x1")):
        jc_env.jobcage(*args, user=a).clean_error(1, "agent")
    assert jc_env.listing() == listing


def test_counter_keeps_running_across_agent_restart(jc_env: JcEnv, make_user: Callable[..., User],
                                                    agent_proc: AgentProc) -> None:
    """The agent is not in the data path: a job's processes run on while it restarts."""
    a = make_user()
    f = jc_env.scratch / "n"
    jc_env.jobcage("prologue", "c1", "--uid", str(a.uid)).ok()
    jc_env.start_job("c1", f"i=0; while :; do i=$((i+1)); echo $i > {f}; sleep 0.01; done", user=a)
    wait_for(lambda: (read_int(f) or 0) > 3, 30, "the counter to run")
    agent_proc.stop(signal.SIGKILL)
    v = read_int(f) or 0
    time.sleep(0.3)
    wait_for(lambda: (read_int(f) or 0) > v, 10, "the counter to go on without the agent")
    agent_proc.start()
    assert agent_proc.result("show", job_id="c1")["processes"] >= 1
