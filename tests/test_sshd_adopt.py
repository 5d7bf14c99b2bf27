"""ssh sessions adopted into the user's job: a real OpenSSH server with a PAM stack pointing at `jobcage pam`.

Everything is real: Debian's sshd on a loopback port (tests/sshdfixtures.py), Debian's own PAM stack with
jobcage's lines added as docs/ssh-adoption.md says, key-based logins of real users, real job cgroups, the real
agent (with the BPF tracer where the trail is checked) or none at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable

import pytest
from jctest import JOBCAGE, AgentProc, JcEnv, User, alive, pids_of_uid, proc, proc_cgroups, wait_for
from sshdfixtures import Sshd, elapsed_ok, wait_dead

pytestmark = pytest.mark.root

DETACH = "sleep 300 >/dev/null 2>&1 </dev/null & echo $!"
MESSAGE = "Access denied by jobcage: you have no running job on this node"


def detached_pid(r: object) -> int:
    out = getattr(r, "stdout", "").split()
    assert getattr(r, "returncode", None) == 0 and out, f"ssh failed: {r}"
    return int(out[-1])


def job_events(env: JcEnv, job_id: str) -> list[dict]:
    r = env.run([JOBCAGE.replace("/jobcage", "/jobtrace"), job_id, "--events", "--json"])
    assert r.rc == 0, r.err
    return [json.loads(line) for line in r.out.splitlines() if line.strip()]


def adopts(env: JcEnv, job_id: str) -> list[dict]:
    return [e for e in job_events(env, job_id) if e["kind"] == "adopt"]


def in_no_job(env: JcEnv, pid: int) -> bool:
    return not any(v.startswith(f"/{env.subtree}/") for v in proc_cgroups(pid).values())


def session_user(r: object) -> str:
    return f"rc={getattr(r, 'returncode', None)} stdout={getattr(r, 'stdout', '')!r} " \
           f"stderr={getattr(r, 'stderr', '')!r}"


# -- the main path: a user with a running job --------------------------------------------------------------

@pytest.mark.jc_config({"tracer": {"backend": "bpf"}})
def test_session_joins_the_job_traced_accounted_killed(jc_env: JcEnv, sshd: Sshd, agent_proc: AgentProc,
                                                       make_user: Callable[..., User]) -> None:
    u = make_user()
    sshd.authorize(u)
    jc_env.jobcage("prologue", "j1", "--uid", str(u.uid)).ok()
    r = sshd.ssh(u, DETACH)
    pid = detached_pid(r)
    assert alive(pid) and jc_env.in_job(pid, "j1"), f"detached sleep {pid} not in the job: {proc_cgroups(pid)}"
    assert in_no_job(jc_env, sshd.proc.pid), "the sshd listener must never be adopted"  # type: ignore[union-attr]

    # the trail: the adoption (via sshd, with the remote address) and the session's exec of sleep, traced
    ev = wait_for(lambda: [e for e in job_events(jc_env, "j1") if e["kind"] == "exec" and e["pid"] == pid
                           and "sleep" in (e["filename"] or "")], 20, "the sleep exec in the trail")[0]
    assert ev["uid"] == u.uid
    ad = adopts(jc_env, "j1")
    assert len(ad) == 1, ad
    d = ad[0]["detail"]
    assert d["via"] == "sshd" and d["rhost"] == "127.0.0.1" and isinstance(d["rport"], int), d
    assert d["user"] == u.name and d["service"] == sshd.service and d["phase"] == "account", d
    assert ad[0]["uid"] == u.uid and ad[0]["euid"] == 0  # the root [priv] monitor was moved, as the user's
    rec = [x for x in sshd.decisions() if x["phase"] == "account"]
    assert rec[-1]["decision"] == "adopted" and rec[-1]["job_id"] == "j1" and rec[-1]["path"] == "agent", rec

    # accounted: the session's cpu (key exchange, shell) is the job's, and the user is its identity
    show = jc_env.jobcage("show", "j1", "--json").ok().json()
    assert show["processes"] >= 1 and show["cpu_seconds"] > 0, show
    assert u.uid in {i["uid"] for i in show["identities"]}

    # a live session: its whole sshd chain below the listener (the root [priv] monitor, the user's
    # USER@notty process) and what it runs are in the job
    client = sshd.popen(u, "exec sleep 301")
    live = wait_for(lambda: [p for p in jc_env.job_pids("j1") if "sleep 301" in getattr(proc(p), "cmdline", "")],
                    30, "the live session's sleep")[0]
    chain, p = [], live
    while p != sshd.proc.pid:  # type: ignore[union-attr]
        chain.append(p)
        p = proc(p).ppid  # type: ignore[union-attr]
        assert p > 1, f"{live} is not below the test's sshd listener"
    assert len(chain) >= 3 and all(jc_env.in_job(q, "j1") for q in chain), [(q, proc(q)) for q in chain]
    assert proc(chain[-1]).uid == 0 and proc(chain[-2]).uid == u.uid  # type: ignore[union-attr]  # privsep

    # prune counts it as the job's, even with the sshd exemption off
    jc_env.write_config({"prune": {"exempt_sshd": False}})
    strays = jc_env.jobcage("prune", "--uid", str(u.uid), "--json").ok().json()["strays"]
    assert not {pid, *chain} & {s["pid"] for s in strays}, strays

    jc_env.jobcage("kill", "j1").ok()
    wait_dead([pid, *chain])
    assert client.wait(timeout=30) != 0  # the killed monitor took the connection with it


@pytest.mark.parametrize("agent", ["up", "none"])
def test_mpi_fanout_8_sessions_all_adopted_none_left(agent: str, cgroup_mode: str, jc_env: JcEnv, sshd: Sshd,
                                                     make_user: Callable[..., User], tmp_path: object) -> None:
    """mpirun's rsh agent style: 8 concurrent logins into one job; kill leaves nothing."""
    u = make_user()
    sshd.authorize(u)
    jc_env.jobcage("prologue", "mpi", "--uid", str(u.uid)).ok()
    ag = None
    if agent == "up":
        from pathlib import Path

        ag = AgentProc(jc_env, Path(str(tmp_path))).start()
    try:
        results: list[object] = [None] * 8

        def login(i: int) -> None:
            results[i] = sshd.ssh(u, DETACH)

        threads = [threading.Thread(target=login, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pids = [detached_pid(r) for r in results]
        assert all(jc_env.in_job(p, "mpi") for p in pids), [(p, proc_cgroups(p)) for p in pids]
        ad = adopts(jc_env, "mpi")
        assert len(ad) == 8 and len({a["pid"] for a in ad}) == 8, ad
        assert len({a["detail"]["rport"] for a in ad}) == 8
        recs = [x for x in sshd.decisions() if x["phase"] == "account"]
        assert len(recs) == 8 and all(x["decision"] == "adopted" for x in recs), recs
        assert {x["path"] for x in recs} == {"agent" if ag else "direct"}
        jc_env.jobcage("kill", "mpi").ok()
        wait_dead(pids)
        assert jc_env.job_pids("mpi") == []
    finally:
        if ag is not None:
            ag.stop()


# -- no job here -------------------------------------------------------------------------------------------

@pytest.mark.pam({"mode": "deny"})
def test_no_job_denied_with_the_message(jc_env: JcEnv, sshd: Sshd, make_user: Callable[..., User]) -> None:
    u = make_user()
    sshd.authorize(u)
    marker = jc_env.scratch / "ran"
    r = sshd.ssh(u, f"touch {marker}")
    assert r.returncode == 255, session_user(r)
    lines = [ln for ln in r.stderr.splitlines() if "jobcage" in ln]
    assert lines == [MESSAGE], r.stderr  # one line, nothing else from jobcage
    assert not marker.exists()
    rec = sshd.decisions()[-1]
    assert rec["decision"] == "denied" and rec["user"] == u.name and rec["rhost"] == "127.0.0.1", rec
    assert elapsed_ok(rec)


@pytest.mark.pam({"mode": "log-only"})
def test_log_only_lets_in_and_logs(jc_env: JcEnv, sshd: Sshd, make_user: Callable[..., User]) -> None:
    u = make_user()
    sshd.authorize(u)
    r = sshd.ssh(u, "echo in")
    assert r.returncode == 0 and r.stdout.strip() == "in", session_user(r)
    assert "jobcage" not in r.stderr
    rec = [x for x in sshd.decisions() if x["phase"] == "account"][-1]
    assert rec["decision"] == "would-deny" and rec["allow"] is True and rec["user"] == u.name, rec
    # with a job, log-only names the job it would pick but moves nothing
    jc_env.jobcage("prologue", "lo", "--uid", str(u.uid)).ok()
    pid = detached_pid(sshd.ssh(u, DETACH))
    assert in_no_job(jc_env, pid)
    rec = [x for x in sshd.decisions() if x["phase"] == "account"][-1]
    assert rec["decision"] == "would-adopt" and rec["job_id"] == "lo", rec
    assert adopts(jc_env, "lo") == []
    os.kill(pid, signal.SIGKILL)


@pytest.mark.pam({"mode": "allow-unadopted"})
def test_allow_unadopted_session_stays_sshd_exempt(jc_env: JcEnv, sshd: Sshd,
                                                   make_user: Callable[..., User]) -> None:
    """Not adopted: prune's exempt_sshd still protects the live session, and only it."""
    u = make_user()
    sshd.authorize(u)
    client = sshd.popen(u, "exec sleep 300")
    sleeper = wait_for(lambda: [p for p in pids_of_uid(u.uid) if getattr(proc(p), "comm", "") == "sleep"], 30,
                       "the session's sleep")[0]
    assert in_no_job(jc_env, sleeper)
    rec = [x for x in sshd.decisions() if x["phase"] == "account"][-1]
    assert rec["decision"] == "unadopted" and rec["allow"] is True, rec
    strays = jc_env.jobcage("prune", "--uid", str(u.uid), "--json").ok().json()["strays"]
    assert sleeper not in {s["pid"] for s in strays}, strays
    jc_env.write_config({"prune": {"exempt_sshd": False}})
    strays = jc_env.jobcage("prune", "--uid", str(u.uid), "--json").ok().json()["strays"]
    assert sleeper in {s["pid"] for s in strays}, strays
    client.kill()


# -- never adopted ------------------------------------------------------------------------------------------

def test_root_and_exempt_group_never_adopted(jc_env: JcEnv, sshd: Sshd, make_user: Callable[..., User]) -> None:
    admin, plain = make_user(), make_user()
    for who in (admin, plain, "root"):
        sshd.authorize(who)
    # the admin's own user group is the exempt "admins" group here; root is always exempt
    jc_env.write_config({"pam": {"exempt_groups": [admin.name]}})
    jc_env.jobcage("prologue", "ja", "--uid", str(admin.uid)).ok()
    pid = detached_pid(sshd.ssh(admin, DETACH))
    assert in_no_job(jc_env, pid), "an exempt user's session must not be adopted, even with a job"
    rec = [x for x in sshd.decisions() if x["phase"] == "account"][-1]
    assert rec["decision"] == "exempt" and rec["reason"] == f"exempt group {admin.name}", rec
    r = sshd.ssh("root", "cat /proc/self/cgroup")
    assert r.returncode == 0 and f"/{jc_env.subtree}/" not in r.stdout, session_user(r)
    assert [x for x in sshd.decisions() if x["phase"] == "account"][-1]["reason"] == "root"
    assert sshd.ssh(plain, "true").returncode == 255  # deny (the default) still applies to everyone else
    os.kill(pid, signal.SIGKILL)


# -- the agent is stopped or hung --------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["stopped", "hung"])
def test_agent_down_login_decided_within_2s(how: str, jc_env: JcEnv, sshd: Sshd, agent_proc: AgentProc,
                                            make_user: Callable[..., User]) -> None:
    u, nojob = make_user(), make_user()
    sshd.authorize(u)
    sshd.authorize(nojob)
    jc_env.jobcage("prologue", "jd", "--uid", str(u.uid)).ok()
    assert agent_proc.proc is not None
    if how == "stopped":
        agent_proc.stop()
    else:
        os.kill(agent_proc.proc.pid, signal.SIGSTOP)  # accepts connections into its backlog, answers nothing
    try:
        pid = detached_pid(sshd.ssh(u, DETACH))
        assert jc_env.in_job(pid, "jd")
        r = sshd.ssh(nojob, "true")
        assert r.returncode == 255 and MESSAGE in r.stderr, session_user(r)
    finally:
        if how == "hung":
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent_proc.proc.pid, signal.SIGCONT)
    recs = [x for x in sshd.decisions() if x["phase"] == "account"]
    assert [x["decision"] for x in recs] == ["adopted", "denied"], recs
    assert all(x["path"] == "direct" and elapsed_ok(x) for x in recs), recs
    assert adopts(jc_env, "jd")[0]["detail"]["rhost"] == "127.0.0.1"  # recorded by the direct path too
    jc_env.jobcage("kill", "jd").ok()
    wait_dead([pid])


# -- several jobs: the batch system's hint ------------------------------------------------------------------

HINT_FORCE = {"ForceCommand": "{jobcage} ssh-hint --config {config} --exec",
              "Subsystem": "sftp /usr/lib/openssh/sftp-server"}


@pytest.mark.sshd_options(HINT_FORCE)
def test_hinted_job_chosen(jc_env: JcEnv, sshd: Sshd, agent_proc: AgentProc,
                           make_user: Callable[..., User]) -> None:
    """SLURM_JOB_ID sent with SendEnv picks the job; without a hint the newest; a foreign or unknown hint
    changes nothing."""
    u, other = make_user(), make_user()
    sshd.authorize(u)
    for job, owner in (("old", u), ("new", u), ("theirs", other)):
        jc_env.jobcage("prologue", job, "--uid", str(owner.uid)).ok()
    plain = detached_pid(sshd.ssh(u, DETACH))
    assert jc_env.in_job(plain, "new"), proc_cgroups(plain)

    r = sshd.ssh(u, DETACH, env={"SLURM_JOB_ID": "old"}, send_env=["SLURM_JOB_ID"])
    hinted = detached_pid(r)
    assert jc_env.in_job(hinted, "old"), proc_cgroups(hinted)
    assert "jobcage" not in r.stderr, r.stderr
    ev = [e for e in adopts(jc_env, "old")]
    assert len(ev) == 1, ev
    d = ev[0]["detail"]
    assert d["hint"] == "SLURM_JOB_ID" and d["from_job"] == "new" and d["rhost"] == "127.0.0.1", d
    assert d["moved"] >= 2, d  # at least the root monitor and the user's sshd process
    assert ev[0]["euid"] == 0  # the trail names the monitor: the session's root, now in "old"
    assert not [p for p in jc_env.job_pids("new") if p != plain], "the hinted session left nothing behind"

    # a hint naming someone else's job, or no job here: the session stays in the pick, with one line
    for bad in ("theirs", "nosuchjob"):
        r = sshd.ssh(u, DETACH, env={"SLURM_JOB_ID": bad}, send_env=["SLURM_JOB_ID"])
        pid = detached_pid(r)
        assert jc_env.in_job(pid, "new"), (bad, proc_cgroups(pid))
        assert len([ln for ln in r.stderr.splitlines() if "jobcage" in ln]) == 1, r.stderr
        assert adopts(jc_env, "theirs") == []
    # a process of the user's that is not in an adopted sshd session (here: a batch task of "new") cannot
    # use the hint to move itself
    script = f"{JOBCAGE} ssh-hint; cat /proc/self/cgroup"
    r2 = subprocess.run([JOBCAGE, "run", "new", "--", *u.argv(["sh", "-c", script])], capture_output=True,
                        text=True, env=dict(u.env(jc_env.env), SLURM_JOB_ID="old"), timeout=60)
    assert r2.returncode == 0 and f"/{jc_env.subtree}/new" in r2.stdout, (r2.stdout, r2.stderr)
    assert "not in an sshd session" in r2.stderr and len(r2.stderr.strip().splitlines()) == 1, r2.stderr
    # subsystems still work under the ForceCommand (scp in OpenSSH 9 is sftp)
    src = jc_env.scratch / "payload"
    src.write_text("x" * 1000)
    argv = sshd.argv(u, "")[:-2]  # the client options, without user@host and command
    argv = [a for a in argv if a not in ("-T",)]
    argv[0], i = "scp", argv.index("-p")
    argv[i] = "-P"
    r3 = subprocess.run([*argv, str(src), f"{u.name}@127.0.0.1:copied"], capture_output=True, text=True,
                        timeout=60, stdin=subprocess.DEVNULL)
    assert r3.returncode == 0 and (u.home / "copied").read_text() == "x" * 1000, r3.stderr
    # an interactive-style login (no command) gets the user's login shell, in the hinted job
    r = sshd.ssh(u, "", env={"SLURM_JOB_ID": "old"}, send_env=["SLURM_JOB_ID"])
    assert r.returncode == 0, session_user(r)
    jc_env.jobcage("kill", "old").ok()
    wait_dead([hinted])
    assert alive(plain)


@pytest.mark.pam({"pick": "oldest"})
def test_pick_oldest(jc_env: JcEnv, sshd: Sshd, make_user: Callable[..., User]) -> None:
    u = make_user()
    sshd.authorize(u)
    for job in ("first", "second"):
        jc_env.jobcage("prologue", job, "--uid", str(u.uid)).ok()
    pid = detached_pid(sshd.ssh(u, DETACH))
    assert jc_env.in_job(pid, "first")
    assert adopts(jc_env, "first")[0]["detail"]["pick"] == "oldest"
    jc_env.jobcage("kill", "first").ok()


def test_suspended_job_is_no_candidate(jc_env: JcEnv, sshd: Sshd, make_user: Callable[..., User]) -> None:
    """A frozen job would freeze the login itself: the session is not put there (deny: refused)."""
    u = make_user()
    sshd.authorize(u)
    jc_env.jobcage("prologue", "js", "--uid", str(u.uid)).ok()
    jc_env.jobcage("suspend", "js").ok()
    r = sshd.ssh(u, "true")
    assert r.returncode == 255 and MESSAGE in r.stderr, session_user(r)
    rec = sshd.decisions()[-1]
    assert rec["decision"] == "denied" and rec["suspended"] == ["js"] and elapsed_ok(rec), rec
    jc_env.jobcage("resume", "js").ok()
    assert sshd.ssh(u, "true").returncode == 0
    assert len(adopts(jc_env, "js")) == 1


def test_broken_config_fails_closed_but_root_gets_in(jc_env: JcEnv, sshd: Sshd,
                                                     make_user: Callable[..., User]) -> None:
    u = make_user()
    for who in (u, "root"):
        sshd.authorize(who)
    jc_env.jobcage("prologue", "jb", "--uid", str(u.uid)).ok()
    jc_env.write_config({"pam": {"mode": "allow-everyone"}})  # a typo of the site's
    r = sshd.ssh(u, "true")
    assert r.returncode == 255 and "Access denied by jobcage (configuration error on this node)" in r.stderr, \
        session_user(r)
    assert sshd.ssh("root", "true").returncode == 0
    jc_env.write_config({"pam": {"mode": "deny"}})
    assert sshd.ssh(u, "true").returncode == 0
