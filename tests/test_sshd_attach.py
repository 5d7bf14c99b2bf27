"""ssh sessions into an *attached* job (the batch system owns the job's cgroup): both ways a site can choose.

`[pam] attached = "batch"` (the default): the batch system's own PAM module (pam_slurm_adopt on Slurm) moves
the session into its cgroup, before jobcage's line; jobcage records the adoption and counts the session as the
job's, moves nothing.  Without that module, a user whose only job is attached is refused (mode deny).
`[pam] attached = "leaf"`: jobcage moves the session into a leaf cgroup of its own (`[pam] leaf`) inside the
job's cgroup, where the batch system's freezer, kill and limits still hold it; the epilogue removes the leaf.

Real parts: Debian's sshd (tests/sshdfixtures.py), real users and key logins, a fake batch system's cgroups
laid out like Slurm's (tests/jctest.py's FakeBatch, in a test subtree of its own), the real agent with
the BPF tracer, and for "batch" a real pam_exec line standing in for pam_slurm_adopt: it writes the calling
sshd process into the job's cgroup, as pam_slurm_adopt does with the extern step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from jctest import AgentProc, FakeBatch, JcEnv, User, alive, job_no, proc_cgroups, require, trail, wait_for
from sshdfixtures import PAM_EXEC, make_sshd, remove_sshd, wait_dead

pytestmark = [pytest.mark.root]

DETACH = "sleep 300 >/dev/null 2>&1 </dev/null & echo $!"
MESSAGE = "Access denied by jobcage: you have no running job on this node"
BPF_LEAF = {"tracer": {"backend": "bpf"}, "pam": {"attached": "leaf"}}


def detached_pid(r: object) -> int:
    out = getattr(r, "stdout", "").split()
    assert getattr(r, "returncode", None) == 0 and out, f"ssh failed: {r}"
    return int(out[-1])


def rel(kind: str, d: Path, batch: FakeBatch) -> str:
    return "/" + os.path.relpath(d, batch.roots[kind])


def in_cgroup(pid: int, dirs: dict[str, Path], batch: FakeBatch) -> bool:
    """pid is exactly in these cgroups, in every hierarchy given."""
    cg = proc_cgroups(pid)
    return all(cg.get("" if k == "unified" else k) == rel(k, d, batch) for k, d in dirs.items())


def start_job(env: JcEnv, batch: FakeBatch, user: User) -> tuple[str, int, Path]:
    """A running attached job: the batch system's cgroups, the user's task in step_batch, jobcage attached."""
    n = job_no()
    jobdir = batch.make_job(n)
    env.jobcage("prologue", str(n), "--uid", str(user.uid), "--cgroup", str(jobdir)).ok()
    task = batch.make_step(n, "batch")
    p = batch.launch(task, ["/bin/sleep", "600"], user, env.env)
    wait_for(lambda: in_cgroup(p.pid, task, batch), 10, "the batch task in its cgroup")
    return str(n), n, jobdir


@pytest.mark.bpf
@pytest.mark.jc_config(BPF_LEAF)
def test_leaf_session_in_the_batch_cgroup_traced_killed_leaf_removed(
        jc_env: JcEnv, batch: FakeBatch, agent_proc: AgentProc, make_user: Callable[..., User]) -> None:
    u = make_user()
    job, n, jobdir = start_job(jc_env, batch, u)
    before = batch.listing()
    sshd = make_sshd(jc_env)
    try:
        sshd.authorize(u)
        pid = detached_pid(sshd.ssh(u, DETACH))
        leaf = {k: batch.job_dir(n, k) / "jobcage-sshd" for k in batch.roots}
        assert alive(pid) and in_cgroup(pid, leaf, batch), f"session's sleep not in the leaf: {proc_cgroups(pid)}"
        rec = [x for x in sshd.decisions() if x["phase"] == "account"][-1]
        assert (rec["decision"], rec["job_id"], rec["path"]) == ("adopted", job, "agent"), rec

        # the trail: the adoption (via sshd, remote address, the leaf) and the session's exec of sleep
        evs = wait_for(lambda: (e := trail(jc_env, job)) and any(x["kind"] == "exec" and x["pid"] == pid for x in e)
                       and e, 20, "the session's sleep exec in the trail")
        ad = [e for e in evs if e["kind"] == "adopt" and e["detail"].get("via") == "sshd"]
        assert len(ad) == 1, ad
        d = ad[0]["detail"]
        assert d["rhost"] == "127.0.0.1" and d["user"] == u.name and d["leaf"] == str(leaf["unified"]), d
        show = jc_env.jobcage("show", job, "--json").ok().json()
        assert show["mode"] == "attach" and show["processes"] >= 2, show   # the batch task and the session

        # a second login reuses the leaf; the session counts against the batch system's pids limit
        pid2 = detached_pid(sshd.ssh(u, DETACH))
        assert in_cgroup(pid2, leaf, batch)
        if "pids" in batch.roots:
            cur = int((batch.job_dir(n, "pids") / "pids.current").read_text())
            assert cur >= 3, cur

        # prune counts the sessions as the job's even with the sshd exemption off
        jc_env.write_config({"prune": {"exempt_sshd": False}})
        strays = jc_env.jobcage("prune", "--uid", str(u.uid), "--json").ok().json()["strays"]
        assert not {pid, pid2} & {s["pid"] for s in strays}, strays

        jc_env.jobcage("kill", job).ok()
        wait_dead([pid, pid2])
        jc_env.jobcage("epilogue", job).ok()
        assert not any(p.exists() for p in leaf.values()), "the epilogue left jobcage's leaf in the batch cgroup"
        assert batch.listing() == before, "the batch system's cgroups changed"
        assert jobdir.is_dir()
    finally:
        remove_sshd(sshd)
    batch.remove_job(n)


def test_batch_mode_counts_the_batch_systems_adoption_and_refuses_without_it(
        jc_env: JcEnv, batch: FakeBatch, agent_proc: AgentProc, make_user: Callable[..., User],
        tmp_path: Path) -> None:
    require(any(os.path.exists(p) for p in PAM_EXEC), "pam_exec.so missing (libpam-modules)")
    u = make_user()
    job, n, jobdir = start_job(jc_env, batch, u)

    # no batch-system module in the stack: the user's only job is attached, jobcage moves nothing -> refused
    sshd = make_sshd(jc_env)
    try:
        sshd.authorize(u)
        r = sshd.ssh(u, "echo in")
        assert r.returncode != 0 and "in" not in r.stdout.split(), r
        assert MESSAGE in r.stderr, r.stderr
        rec = [x for x in sshd.decisions() if x["phase"] == "account"][-1]
        assert rec["decision"] == "denied" and rec["attached"] == [job] and "attached" in rec["reason"], rec
    finally:
        remove_sshd(sshd)

    # the batch system's module first (as pam_slurm_adopt: the calling sshd into the job's extern step)
    extern = {k: batch.job_dir(n, k) / "step_extern" for k in batch.roots}
    for d in extern.values():
        d.mkdir()
    mover = tmp_path / "batch-adopt.sh"
    mover.write_text("#!/bin/sh\n" + "".join(f"echo $PPID > {d}/cgroup.procs\n" for d in extern.values()))
    mover.chmod(0o755)
    tmp_path.chmod(0o755)
    sshd = make_sshd(jc_env, account_before=[f"account    required     pam_exec.so quiet {mover}"])
    try:
        sshd.authorize(u)
        pid = detached_pid(sshd.ssh(u, DETACH))
        assert in_cgroup(pid, extern, batch), f"not where the batch system put it: {proc_cgroups(pid)}"
        recs = [x for x in sshd.decisions() if x["user"] == u.name]
        assert [(x["phase"], x["decision"]) for x in recs[-2:]] == [("account", "adopted"),
                                                                    ("open_session", "adopted")], recs
        ad = [e for e in trail(jc_env, job) if e["kind"] == "adopt" and e["detail"].get("via") == "sshd"]
        assert len(ad) == 1 and ad[0]["detail"]["by"] == "batch system", ad   # once, not per PAM phase
        assert ad[0]["detail"]["rhost"] == "127.0.0.1" and "leaf" not in ad[0]["detail"], ad
        # jobcage's kill reaches it through the batch system's cgroup
        jc_env.jobcage("kill", job).ok()
        wait_dead([pid])
        jc_env.jobcage("epilogue", job).ok()
        assert all(d.is_dir() for d in extern.values()), "jobcage removed a cgroup of the batch system"
    finally:
        remove_sshd(sshd)
    batch.remove_job(n)


def test_leaf_name_must_be_a_plain_cgroup_name(jc_env: JcEnv) -> None:
    for bad in ("../x", "a/b", ".hidden", "", "x" * 65):
        jc_env.write_config({"pam": {"leaf": bad}})
        r = jc_env.jobcage("list")
        assert r.rc == 1 and "pam.leaf" in r.err and len(r.err.strip().splitlines()) == 1, (bad, r.err)
