"""jobcage as a systemd node runs it: the units in hooks/systemd installed as docs/operations.md says, the agent
started by systemd, jobs in the delegated cgroup of jobcage-jobs.service (placement "unit"), and the jobs surviving
everything an admin does to the agent's unit: `systemctl restart jobcage`, `daemon-reload`, `daemon-reexec`,
`systemctl stop jobcage`.

Runs in the pure-v2 guest (`make test-v2`, vagrant/v2guest): marked ``v2guest``, deselected on other nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jctest import JOBCAGE, User, alive, proc, proc_cgroups, require, wait_for

pytestmark = [pytest.mark.v2guest, pytest.mark.root]

TOP = Path(__file__).resolve().parents[1]
UNITS = ("jobcage-jobs.service", "jobcage.service")
CG = Path("/sys/fs/cgroup")
DELEGATED = CG / "system.slice/jobcage-jobs.service"
JOBS = DELEGATED / "jobs"


def sh(*argv: str, timeout: float = 300) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(argv)} -> {r.returncode}: {r.stdout}{r.stderr}"
    return r.stdout


def jobcage(*args: str, user: User | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The node's jobcage (/usr/local/bin, what the units and the batch hooks run), with the node's config."""
    argv = ["/usr/local/bin/jobcage", *args]
    env = {k: v for k, v in os.environ.items() if k != "JOBCAGE_CONFIG"}
    if user is not None:
        argv, env = user.argv(argv), user.env(env)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


def ok(*args: str, user: User | None = None) -> str:
    r = jobcage(*args, user=user)
    assert r.returncode == 0, f"jobcage {' '.join(args)} -> {r.returncode}: {r.stdout}{r.stderr}"
    return r.stdout


def main_pid() -> int:
    return int(sh("systemctl", "show", "-p", "MainPID", "--value", "jobcage.service").strip())


def agent_answers() -> bool:
    r = jobcage("doctor", "--json", timeout=120)
    return r.returncode == 0 and json.loads(r.stdout)["agent"]["running"] is True


@pytest.fixture
def systemd_jobcage() -> Iterator[None]:
    """The units installed and started the documented way; at teardown the agent stopped, the units removed."""
    from jobcage.cgroups.detect import detect

    require(Path("/run/systemd/system").is_dir() and os.getpid() != 1 and detect().mode == "v2",
            "needs a pure-cgroup-v2 node booted with systemd (the v2 guest: sudo make test-v2)")
    # the units run /usr/local/bin/jobcage: it must be this checkout's (make bootstrap links it)
    require(Path("/usr/local/bin/jobcage").resolve().parent == Path(sys.executable).parent,
            f"/usr/local/bin/jobcage is not this checkout's ({JOBCAGE}): run make bootstrap here")
    require(shutil.which("systemctl") is not None, "systemctl is missing")
    for u in UNITS:
        shutil.copy(TOP / "hooks/systemd" / u, Path("/etc/systemd/system") / u)
    sh("systemctl", "daemon-reload")
    sh("systemctl", "enable", "--now", *UNITS)
    try:
        wait_for(agent_answers, 300, "the agent started by systemd to answer")
        yield
    finally:
        subprocess.run(["systemctl", "disable", "--now", "jobcage.service"], capture_output=True, timeout=300)
        # the holder refuses a manual stop (RefuseManualStop): end it by its main process once no job is left
        for d in JOBS.glob("*") if JOBS.is_dir() else []:
            with contextlib.suppress(OSError):
                (d / "cgroup.kill").write_text("1")
        subprocess.run(["systemctl", "disable", "jobcage-jobs.service"], capture_output=True, timeout=60)
        subprocess.run(["systemctl", "kill", "--kill-who=main", "jobcage-jobs.service"], capture_output=True,
                       timeout=60)
        for u in UNITS:
            with contextlib.suppress(FileNotFoundError):
                (Path("/etc/systemd/system") / u).unlink()
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True, timeout=300)


def members(job: str) -> list[int]:
    return [p for p in map(int, (JOBS / job / "cgroup.procs").read_text().split()) if alive(p)]


def start_payload(job: str, user: User, tmp: Path) -> dict[int, int]:
    """`jobcage run JOB` as the job's user: a shell with a setsid daemon and a sleeper; {pid: starttime}.
    tmp must be readable by the user."""
    script = tmp / "payload.sh"
    script.write_text("setsid sleep 3001 </dev/null >/dev/null 2>&1 &\nexec sleep 3002\n")
    script.chmod(0o755)
    subprocess.Popen(user.argv(["/usr/local/bin/jobcage", "run", job, "--", "/bin/sh", str(script)]),
                     env=user.env({k: v for k, v in os.environ.items() if k != "JOBCAGE_CONFIG"}), cwd="/",
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    wait_for(lambda: len(members(job)) >= 2, 120, "the payload (sleeper + setsid daemon) in the job")
    out = {}
    for pid in members(job):
        p = proc(pid)
        assert p is not None
        out[pid] = p.starttime
    return out


def assert_intact(job: str, procs: dict[int, int], when: str) -> None:
    dead = [pid for pid, st in procs.items() if not alive(pid, st)]
    assert not dead, f"{when}: job processes died: {dead}"
    want = f"/{JOBS.relative_to(CG)}/{job}"
    moved = {pid: proc_cgroups(pid).get("") for pid in procs if proc_cgroups(pid).get("") != want}
    assert not moved, f"{when}: job processes left the job cgroup: {moved}"
    assert (JOBS / job / "pids.max").read_text().strip() == "64", f"{when}: pids.max of the job changed"
    for d in (DELEGATED, JOBS):
        assert "pids" in (d / "cgroup.subtree_control").read_text().split(), f"{when}: +pids gone from {d}"
    assert json.loads(ok("show", job, "--json"))["state"] == "running", when


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A scratch dir the test users can read (pytest's tmp_path is 0700 root)."""
    d = Path(tempfile.mkdtemp(prefix="jct-sd-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_unit_placement_and_jobs_survive_the_agents_unit(systemd_jobcage: None,
                                                         make_user: Callable[..., User], shared_dir: Path) -> None:
    doc = json.loads(ok("doctor", "--json"))
    assert doc["cgroups"]["placement"] == "unit", doc["cgroups"]
    assert doc["cgroups"]["subtree"] == str(JOBS), doc["cgroups"]
    assert doc["agent"]["running"] is True
    # the agent is in its own unit's cgroup, the holder in its leaf, nothing in the delegated cgroup itself
    agent = main_pid()
    assert proc_cgroups(agent)[""] == "/system.slice/jobcage.service"
    assert not (DELEGATED / "cgroup.procs").read_text().split()
    assert (DELEGATED / "holder" / "cgroup.procs").read_text().split()

    user = make_user()
    job = "sd1"
    ok("prologue", job, "--uid", str(user.uid), "--pids-max", "64")
    procs = start_payload(job, user, shared_dir)
    assert_intact(job, procs, "at start")

    sh("systemctl", "restart", "jobcage.service")
    wait_for(lambda: main_pid() not in (0, agent) and agent_answers(), 300, "the restarted agent to answer")
    assert not alive(agent), "the old agent survived its restart"
    assert_intact(job, procs, "after systemctl restart jobcage")

    for op in ("daemon-reload", "daemon-reexec"):
        before = main_pid()
        sh("systemctl", op)
        wait_for(agent_answers, 300, f"the agent to answer after {op}")
        assert main_pid() == before, f"{op} restarted the agent"
        assert_intact(job, procs, f"after systemctl {op}")

    # the agent stopped: the job keeps running, contained; started again, the agent re-adopts it
    sh("systemctl", "stop", "jobcage.service")
    assert not agent_answers()
    dead = [pid for pid, st in procs.items() if not alive(pid, st)]
    assert not dead, f"systemctl stop jobcage killed job processes {dead}"
    sh("systemctl", "start", "jobcage.service")
    wait_for(agent_answers, 300, "the agent to answer after systemctl start")
    assert_intact(job, procs, "after systemctl stop + start jobcage")

    ok("suspend", job)
    assert (JOBS / job / "cgroup.events").read_text().split("frozen ")[1].startswith("1")
    ok("resume", job)
    ok("epilogue", job)
    wait_for(lambda: not any(alive(pid, st) for pid, st in procs.items()), 60, "the job's processes to die")
    assert not (JOBS / job).exists(), "epilogue left the job cgroup"


def test_slurm_job_with_slurmd_under_systemd(systemd_jobcage: None, make_user: Callable[..., User],
                                             sudoers: Callable[..., Path]) -> None:
    """A real Slurm job end to end on the systemd node: slurmd a systemd unit, the site's slurm.conf fragment
    (Prolog, TaskProlog, Epilog and task/jobcage from /usr/local, as `make bootstrap` installs them), the
    agent under systemd: the job's processes, a setsid daemon and a sudo payload included, are in the
    job's cgroup in jobcage-jobs.service's subtree, and after scancel and the Epilog none is left."""
    import secrets

    from slurmcluster import SlurmCluster, fragment

    pilot, pool = make_user("jcp"), make_user("jcq")
    sudoers(f"{pilot.name} ALL=({pool.name}) NOPASSWD: ALL")
    conf = fragment()
    conf["KillWait"] = "5"
    hooks = Path("/usr/local/libexec/jobcage/slurm")
    with SlurmCluster("/tmp", prolog=hooks / "prolog", task_prolog=hooks / "task_prolog", epilog=hooks / "epilog",
                      extra_conf=conf, slurmd_unit=f"jct-slurmd-{secrets.token_hex(3)}.service",
                      startup_timeout=300, command_timeout=120) as cluster:
        w = cluster.jobs_dir / "w"
        w.mkdir()
        w.chmod(0o777)
        job = cluster.sbatch(f"""#!/bin/sh
( setsid sh -c 'echo $$ > {w}/daemon.pid; exec sleep 300' </dev/null >/dev/null 2>&1 & )
sudo -n -u {pool.name} /bin/sh -c 'echo $$ > {w}/payload.pid; exec sleep 300' &
echo $$ > {w}/script.pid
wait
""", pilot.name)
        cluster.wait_state(job, "RUNNING", timeout=300)
        pids = {}
        for name in ("daemon", "payload", "script"):
            f = w / f"{name}.pid"
            wait_for(lambda f=f: f.exists() and f.read_text().strip().isdigit(), 300, f"{f}")
            pids[name] = int(f.read_text())
        slurmd = int(sh("systemctl", "show", "-p", "MainPID", "--value", cluster.slurmd_unit or "").strip())
        assert proc_cgroups(slurmd)[""] == f"/system.slice/{cluster.slurmd_unit}"
        want = f"/{JOBS.relative_to(CG)}/{job}"
        wait_for(lambda: all(proc_cgroups(p).get("") == want for p in pids.values()), 120,
                 f"every job process in {want}: { {n: proc_cgroups(p).get('') for n, p in pids.items()} }")
        p = proc(pids["payload"])
        assert p is not None and p.uid == pool.uid
        shown = json.loads(ok("show", str(job), "--json"))
        assert shown["state"] == "running" and shown["owner_uid"] == pilot.uid
        assert shown["cgroup"] == str(JOBS / str(job))
        cluster.scancel(job)
        cluster.wait_state(job, "CANCELLED", timeout=300)
        wait_for(lambda: not (JOBS / str(job)).exists(), 300, "the Epilog to remove the job's cgroup")
        wait_for(lambda: not any(alive(p) for p in pids.values()), 60, "the job's processes to be gone")
        assert json.loads(ok("show", str(job), "--json"))["state"] == "ended"
