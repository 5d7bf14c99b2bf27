"""PBS/Torque, HTCondor and generic (LSF, SGE) hooks, run exactly as those batch systems run them.

No PBS or HTCondor daemon is started: each hook is invoked with the arguments, identity, environment and
stdin the documentation of its batch system specifies (cited in the hook scripts and docs/batch-systems.md):
- PBS/Torque prologue/epilogue: root, EMPTY environment, stdin /dev/null, $1..$7 / $1..$10;
- Torque $job_starter: the job's user, the job's environment (PBS_JOBID ...), argv = job shell + script;
- HTCondor USER_JOB_WRAPPER: the job's user, _CONDOR_JOB_AD & co., argv = executable + arguments;
  JOB_EXIT hook: the job's user, $1 = exit, the job ClassAd on stdin; root side through a sudo rule;
- LSF JOB_STARTER / SGE starter_method: the job's user and environment, argv = the user command.
Each test checks that the job is created, the wrapped process (and a setsid daemon it starts) is inside
the job's cgroup, and that the epilogue leaves nothing behind.  A jobcage agent runs (jc_env/agent_proc):
the user-side hooks join jobs through it, as on a real node.
"""

from __future__ import annotations

import grp
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from jctest import JOBCAGE, AgentProc, JcEnv, User, alive, proc, read_int, require, wait_for

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("pbs", "htcondor", "generic")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = [pytest.mark.root]

# The job: records its pid, starts a double-forked setsid daemon, then runs on.
JOB = """echo $$ > {d}/job.pid
( setsid sh -c 'echo $$ > {d}/daemon.pid; exec sleep 300' </dev/null >/dev/null 2>&1 & )
exec sleep 300
"""


@pytest.fixture
def hooks(jc_env: JcEnv) -> Path:
    """hooks/{pbs,htcondor,generic}/* symlinked under the test's private base, each dir with a `jobcage`
    that uses the test's config: the hooks prefer a jobcage next to them (sudo and pbs_mom pass no
    JOBCAGE_CONFIG)."""
    require(shutil.which("sudo") is not None and shutil.which("setpriv") is not None, "needs sudo and setpriv")
    root = jc_env.base / "hooks"
    for system in SYSTEMS:
        d = root / system
        d.mkdir(parents=True, mode=0o755)
        for script in (REPO / "hooks" / system).iterdir():
            (d / script.name).symlink_to(script)
        (d / "jobcage").write_text(f"#!/bin/sh\nJOBCAGE_CONFIG={jc_env.config_path}\nexport JOBCAGE_CONFIG\n"
                                   f'exec {JOBCAGE} "$@"\n')
        (d / "jobcage").chmod(0o755)
    root.chmod(0o755)
    return root


@pytest.fixture
def user(make_user: Callable[..., User]) -> User:
    return make_user("jcb")


@pytest.fixture
def jobdir(jc_env: JcEnv, user: User) -> Path:
    """Where the job writes its pid files (the user's own dir, like a job's working directory)."""
    d = jc_env.scratch / f"job-{secrets.token_hex(3)}"
    d.mkdir(mode=0o700)
    os.chown(d, user.uid, user.gid)
    return d


def _root(argv: list[str], env: dict[str, str] | None = None, stdin: str | None = None,
          cwd: str = "/") -> subprocess.CompletedProcess[str]:
    """As root, with exactly `env` (PBS passes an empty environment)."""
    return subprocess.run(argv, env=env if env is not None else {}, input=stdin, capture_output=True, text=True,
                          cwd=cwd, timeout=120, stdin=None if stdin is not None else subprocess.DEVNULL)


def _as_user(user: User, argv: list[str], env: dict[str, str], stdin: str | None = None,
             cwd: str = "/") -> subprocess.CompletedProcess[str]:
    return subprocess.run(user.argv(argv), env=env, input=stdin, capture_output=True, text=True, cwd=cwd,
                          timeout=120, stdin=None if stdin is not None else subprocess.DEVNULL)


def _start_job(jc_env: JcEnv, user: User, argv: list[str], env: dict[str, str], jobdir: Path) -> tuple[int, int]:
    """Start the user-side hook in the background as `user`; returns (job pid, daemon pid)."""
    p = jc_env.popen(argv, user=user, env=env, cwd=str(jobdir), stderr=subprocess.PIPE)
    pid = wait_for(lambda: read_int(jobdir / "job.pid") or (p.poll() is not None and -1), 30, "the job to start")
    if pid == -1:
        pytest.fail(f"{argv} exited {p.returncode}: {p.stderr.read().decode() if p.stderr else ''}")
    daemon = wait_for(lambda: read_int(jobdir / "daemon.pid"), 30, "the job's daemon")
    # Every exec was in place: pbs_mom / the starter keep tracking the very pid they started.
    assert pid == p.pid, (pid, p.pid)
    return pid, daemon


def _assert_contained(jc_env: JcEnv, job: str, user: User, *pids: int) -> None:
    for pid in pids:
        info = proc(pid)
        assert info is not None and info.uid == user.uid, info
        assert jc_env.in_job(pid, job), f"{pid} not in job {job}: {Path(f'/proc/{pid}/cgroup').read_text()}"
    shown = jc_env.jobcage("show", job, "--json").json()
    assert shown["state"] == "running" and shown["owner_uid"] == user.uid
    assert shown["processes"] >= len(pids)


def _assert_gone(jc_env: JcEnv, job: str, *pids: int) -> None:
    wait_for(lambda: not [p for p in pids if alive(p)], 10, f"the processes of job {job} to be gone")
    assert not any(d.exists() for d in jc_env.cgroup_dirs(job).values())
    assert jc_env.jobcage("show", job, "--json").json()["state"] == "ended"


def _group(user: User) -> str:
    return grp.getgrgid(user.gid).gr_name


# --- PBS / Torque ---------------------------------------------------------------------------------------------

def _pbs_env(user: User, job_id: str, jobdir: Path) -> dict[str, str]:
    """The environment pbs_mom gives a batch job (Torque qsub(1) "Environment variables")."""
    return {"HOME": str(user.home), "USER": user.name, "LOGNAME": user.name, "SHELL": "/bin/sh",
            "PATH": "/usr/local/bin:/usr/bin:/bin", "PBS_JOBID": job_id, "PBS_JOBNAME": "STDIN",
            "PBS_O_WORKDIR": str(jobdir), "PBS_O_HOME": str(user.home), "PBS_O_LOGNAME": user.name,
            "PBS_O_QUEUE": "batch", "PBS_QUEUE": "batch", "PBS_ENVIRONMENT": "PBS_BATCH",
            "PBS_O_HOST": "submit.example.org", "PBS_SERVER": "pbs.example.org", "PBS_NODENUM": "0",
            "PBS_TASKNUM": "1", "PBS_VNODENUM": "0", "PBS_NODEFILE": "/dev/null"}


@pytest.mark.parametrize("pbs_job_id, jobcage_id", [("4242.pbs.example.org", "4242.pbs.example.org"),
                                                     ("4243[7].pbs.example.org", "4243_7.pbs.example.org")],
                         ids=["job", "array-task"])
def test_pbs_prologue_job_starter_epilogue(hooks: Path, jc_env: JcEnv, agent_proc: AgentProc, user: User,
                                           jobdir: Path, pbs_job_id: str, jobcage_id: str) -> None:
    """prologue (root, 7 arguments, empty environment) registers the job; the Torque job starter (the
    user, job environment) joins it and execs the job shell; epilogue (root, 10 arguments) kills the
    job's setsid daemon and removes the job."""
    group = _group(user)
    mom_priv = str(jc_env.base)  # pbs_mom runs the scripts in mom_priv
    r = _root([str(hooks / "pbs/prologue"), pbs_job_id, user.name, group, "STDIN",
               "neednodes=1,nodes=1,walltime=00:10:00", "batch", ""], cwd=mom_priv)
    assert r.returncode == 0 and not r.stdout and not r.stderr, r  # nothing in the user's output files
    shown = jc_env.jobcage("show", jobcage_id, "--json").json()
    assert shown["owner_uid"] == user.uid and shown["processes"] == 0

    script = jobdir / "job.sh"
    script.write_text(JOB.format(d=jobdir))
    os.chown(script, user.uid, user.gid)
    pid, daemon = _start_job(jc_env, user, [str(hooks / "pbs/job_starter"), "/bin/sh", str(script)],
                             _pbs_env(user, pbs_job_id, jobdir), jobdir)
    _assert_contained(jc_env, jobcage_id, user, pid, daemon)
    assert proc(daemon).sid == daemon  # type: ignore[union-attr]

    session = str(proc(pid).sid)  # type: ignore[union-attr]
    r = _root([str(hooks / "pbs/epilogue"), pbs_job_id, user.name, group, "STDIN", session,
               "neednodes=1,nodes=1,walltime=00:10:00", "cput=00:00:00,mem=0kb,vmem=0kb,walltime=00:00:07",
               "batch", "", "0"], cwd=mom_priv)
    assert r.returncode == 0 and not r.stdout and not r.stderr, r
    _assert_gone(jc_env, jobcage_id, pid, daemon)


def test_pbs_hook_failures(hooks: Path, jc_env: JcEnv, agent_proc: AgentProc, user: User, jobdir: Path,
                           make_user: Callable[..., User]) -> None:
    """Torque's exit-status contract: 1 aborts the job (no retry can help), >1 requeues it; a job
    starter that cannot join never runs the job; the epilogue of a job jobcage never saw succeeds."""
    r = _root([str(hooks / "pbs/prologue"), "1.srv", "no-such-user-jc", "nogroup"])
    assert r.returncode == 1 and "unknown user no-such-user-jc" in r.stderr, r
    r = _root([str(hooks / "pbs/prologue")])
    assert r.returncode == 1 and "usage" in r.stderr, r
    # The job id is taken by another user's job: jobcage refuses, the job is requeued (exit 2).
    other = make_user("jcb")
    jc_env.jobcage("prologue", "7.srv", "--uid", str(other.uid)).ok()
    r = _root([str(hooks / "pbs/prologue"), "7.srv", user.name, _group(user)])
    assert r.returncode == 2 and "requeued" in r.stderr and "already exists" in r.stderr, r

    # A job starter for a job that was never registered: the job does not run.
    env = _pbs_env(user, "8.srv", jobdir)
    r = _as_user(user, [str(hooks / "pbs/job_starter"), "/bin/sh", "-c", f"touch {jobdir}/ran"], env)
    assert r.returncode == 1 and "unknown job 8.srv" in r.stderr, r
    r = _as_user(user, [str(hooks / "pbs/job_starter"), "/bin/sh", "-c", f"touch {jobdir}/ran"],
                 {k: v for k, v in env.items() if k != "PBS_JOBID"})
    assert r.returncode == 1 and "PBS_JOBID not set" in r.stderr, r
    assert not (jobdir / "ran").exists()

    # The epilogue of a job jobcage never registered is not an error (nodes stay in service).
    r = _root([str(hooks / "pbs/epilogue"), "9.srv", user.name, _group(user), "STDIN", "1", "", "", "batch", "",
               "0"])
    assert r.returncode == 0 and not r.stderr, r


# --- HTCondor -------------------------------------------------------------------------------------------------

GJID = "submit.example.org#{cluster}.0#1700000000"


def _job_ad(user: User, scratch: Path, cluster: int) -> str:
    """The .job.ad the condor_starter writes into the scratch dir (one `Attr = value` per line)."""
    return "\n".join([
        f"ClusterId = {cluster}", "ProcId = 0", f'GlobalJobId = "{GJID.format(cluster=cluster)}"',
        f'Owner = "{user.name}"', 'Cmd = "/bin/sh"', f'Iwd = "{scratch}"', "JobUniverse = 5",
        "RequestCpus = 1", "RequestMemory = 128", "QDate = 1700000000", "",
    ])


def _condor_env(user: User, scratch: Path) -> dict[str, str]:
    """The job environment the condor_starter sets up for a vanilla universe job."""
    return {"HOME": str(user.home), "USER": user.name, "PATH": "/usr/bin:/bin", "BATCH_SYSTEM": "HTCondor",
            "_CONDOR_JOB_AD": str(scratch / ".job.ad"), "_CONDOR_MACHINE_AD": str(scratch / ".machine.ad"),
            "_CONDOR_SCRATCH_DIR": str(scratch), "_CONDOR_SLOT": "slot1_1", "_CONDOR_JOB_IWD": str(scratch),
            "_CONDOR_WRAPPER_ERROR_FILE": str(scratch / ".job_wrapper_failure"), "TMPDIR": str(scratch),
            "OMP_NUM_THREADS": "1"}


def _scratch(jobdir: Path, user: User, cluster: int) -> Path:
    (jobdir / ".job.ad").write_text(_job_ad(user, jobdir, cluster))
    (jobdir / ".machine.ad").write_text('Name = "slot1_1@ep.example.org"\nCpus = 1\n')
    for f in (jobdir / ".job.ad", jobdir / ".machine.ad"):
        os.chown(f, user.uid, user.gid)
    return jobdir


@pytest.fixture
def condor_sudo(hooks: Path, user: User, sudoers: Callable[..., Path]) -> None:
    """The sudo rule a site adds for its job users: exactly the two root helpers."""
    d = hooks / "htcondor"
    sudoers(f"Defaults!{d}/prologue, {d}/epilogue !requiretty",
            f"{user.name} ALL=(root) NOPASSWD: {d}/prologue, {d}/epilogue")


def test_htcondor_wrapper_and_job_exit_hook(hooks: Path, jc_env: JcEnv, agent_proc: AgentProc, user: User,
                                            jobdir: Path, condor_sudo: None) -> None:
    """USER_JOB_WRAPPER (the user) registers the job through the sudo rule, joins it and execs the job
    executable; the JOB_EXIT hook (the user, job ad on stdin) ends it: the daemon dies, the job is gone."""
    scratch = _scratch(jobdir, user, cluster=1234)
    job = f"condor-{user.uid}-submit.example.org_1234.0_1700000000"
    pid, daemon = _start_job(jc_env, user, [str(hooks / "htcondor/job_wrapper"), "/bin/sh", "-c",
                                            JOB.format(d=scratch)], _condor_env(user, scratch), scratch)
    _assert_contained(jc_env, job, user, pid, daemon)
    assert not (scratch / ".job_wrapper_failure").exists()

    r = _as_user(user, [str(hooks / "htcondor/job_exit"), "exit"], _condor_env(user, scratch),
                 stdin=(scratch / ".job.ad").read_text() + "ExitCode = 0\nJobPid = 1\n")
    assert r.returncode == 0 and not r.stderr, r
    _assert_gone(jc_env, job, pid, daemon)


def test_htcondor_wrapper_failure_requeues_instead_of_running(hooks: Path, jc_env: JcEnv, agent_proc: AgentProc,
                                                             user: User, jobdir: Path, condor_sudo: None) -> None:
    """Without a usable job ad the wrapper runs nothing, writes _CONDOR_WRAPPER_ERROR_FILE (HTCondor then
    puts the job back to Idle) and exits non-zero."""
    scratch = _scratch(jobdir, user, cluster=77)
    env = _condor_env(user, scratch)
    env["_CONDOR_JOB_AD"] = str(scratch / "missing.ad")
    r = _as_user(user, [str(hooks / "htcondor/job_wrapper"), "/bin/sh", "-c", f"touch {scratch}/ran"], env,
                 cwd=str(scratch))
    assert r.returncode == 1, r
    assert "no readable job ad" in (scratch / ".job_wrapper_failure").read_text()
    assert not (scratch / "ran").exists()


def test_htcondor_root_helpers_only_act_for_the_calling_uid(hooks: Path, jc_env: JcEnv, agent_proc: AgentProc,
                                                            user: User, jobdir: Path, condor_sudo: None,
                                                            make_user: Callable[..., User]) -> None:
    """Through sudo the helpers take the uid from SUDO_UID, never from the caller: a user registers and
    ends only condor-<own uid>-... jobs, cannot name a uid, and cannot end another user's job."""
    d = hooks / "htcondor"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(user.home)}
    r = _as_user(user, ["sudo", "-n", f"{d}/prologue", "s#5.0#1", "0"], env)
    assert r.returncode == 1 and "usage (through sudo)" in r.stderr, r
    r = _as_user(user, ["sudo", "-n", f"{d}/prologue", "s#5.0#1;rm"], env)
    assert r.returncode == 1 and "invalid GlobalJobId" in r.stderr, r
    r = _as_user(user, ["sudo", "-n", f"{d}/prologue", "s#5.0#1"], env)
    assert r.returncode == 0, r
    assert jc_env.jobcage("show", f"condor-{user.uid}-s_5.0_1", "--json").json()["owner_uid"] == user.uid

    other = make_user("jcb")
    jc_env.jobcage("prologue", f"condor-{other.uid}-s_6.0_1", "--uid", str(other.uid)).ok()
    r = _as_user(user, ["sudo", "-n", f"{d}/epilogue", "s#6.0#1"], env)  # ends condor-<user>-..., not other's
    assert r.returncode == 0, r
    assert jc_env.jobcage("show", f"condor-{other.uid}-s_6.0_1", "--json").json()["state"] == "running"
    r = _as_user(user, ["sudo", "-n", f"{d}/epilogue", "s#5.0#1"], env)
    assert r.returncode == 0, r
    assert jc_env.jobcage("show", f"condor-{user.uid}-s_5.0_1", "--json").json()["state"] == "ended"
    # Root may act for any uid directly (a site's own root hook).
    r = _root([f"{d}/epilogue", "s#6.0#1", str(other.uid)])
    assert r.returncode == 0, r
    assert jc_env.jobcage("show", f"condor-{other.uid}-s_6.0_1", "--json").json()["state"] == "ended"


# --- generic job starter: LSF JOB_STARTER, SGE starter_method ----------------------------------------------------

@pytest.mark.parametrize("batch_env, job", [
    ({"LSB_JOBID": "5150", "LSB_JOBINDEX": "0", "LSB_QUEUE": "normal", "LSB_HOSTS": "ep1"}, "5150"),
    ({"LSB_JOBID": "5151", "LSB_JOBINDEX": "3", "LSB_QUEUE": "normal", "LSB_HOSTS": "ep1"}, "5151_3"),
    ({"JOB_ID": "88", "SGE_TASK_ID": "undefined", "QUEUE": "all.q", "SGE_STARTER_SHELL_PATH": "/bin/sh"}, "88"),
    ({"JOB_ID": "89", "SGE_TASK_ID": "3", "QUEUE": "all.q"}, "89.3"),
    ({"JOBCAGE_JOB_ID": "site-42", "LSB_JOBID": "1"}, "site-42"),
], ids=["lsf", "lsf-array", "sge", "sge-array", "explicit"])
def test_generic_prologue_job_starter_epilogue(hooks: Path, jc_env: JcEnv, agent_proc: AgentProc, user: User,
                                              jobdir: Path, batch_env: dict[str, str], job: str) -> None:
    """LSF (PRE_EXEC/POST_EXEC as root, JOB_STARTER = job_starter /bin/sh -c "%USRCMD") and SGE (prolog/epilog
    root@..., starter_method): all three find the same job id in the batch system's environment; the root
    prologue registers it for the job's user, the starter (the user) joins it and execs the command, the
    root epilogue ends it."""
    env = {"HOME": str(user.home), "USER": user.name, "LOGNAME": user.name, "PATH": "/usr/bin:/bin", **batch_env}
    lsf = "LSB_JOBID" in batch_env
    # SGE passes the owner as an argument ($job_owner); LSF's root pre-exec finds it in LSFUSER.
    root_env = {**env, "USER": "root", "LSFUSER": user.name} if lsf else {**env}
    r = _root([str(hooks / "generic/prologue")] + ([] if lsf else [user.name]), env=root_env)
    assert r.returncode == 0 and not r.stdout and not r.stderr, r
    assert jc_env.jobcage("show", job, "--json").json()["owner_uid"] == user.uid
    pid, daemon = _start_job(jc_env, user, [str(hooks / "generic/job_starter"), "/bin/sh", "-c",
                                            JOB.format(d=jobdir)], env, jobdir)
    _assert_contained(jc_env, job, user, pid, daemon)
    r = _root([str(hooks / "generic/epilogue")], env=root_env)
    assert r.returncode == 0 and not r.stdout and not r.stderr, r
    _assert_gone(jc_env, job, pid, daemon)


def test_generic_hooks_without_a_job_id_refuse(hooks: Path, jc_env: JcEnv, user: User, jobdir: Path) -> None:
    """No job id in the environment: the starter runs nothing, the root hooks fail with a message."""
    r = _as_user(user, [str(hooks / "generic/job_starter"), "/bin/sh", "-c", f"touch {jobdir}/ran"],
                 {"PATH": "/usr/bin:/bin", "HOME": str(user.home)})
    assert r.returncode == 1 and "no batch job id" in r.stderr, r
    assert not (jobdir / "ran").exists()
    for hook in ("prologue", "epilogue"):
        r = _root([str(hooks / "generic" / hook), user.name])
        assert r.returncode == 1 and "no batch job id" in r.stderr, r
    r = _root([str(hooks / "generic/prologue"), "no-such-user-jc"], env={"JOB_ID": "3"})
    assert r.returncode == 1 and "unknown user no-such-user-jc" in r.stderr, r
