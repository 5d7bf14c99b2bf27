"""What a real Slurm 22.05 does without jobcage -- the baseline jobcage's Slurm integration is built on.

Needs no jobcage: a private munged + slurmctld + slurmd (tests/slurmcluster.py), real users, real sbatch.
- what Prolog, TaskProlog and Epilog receive (identity, parent process, environment): the hooks rely on it;
- the proof of what jobcage adds: with proctrack/linuxproc, `scancel` leaves a setsid daemon running;
- what `scontrol suspend` does with proctrack/linuxproc (SIGTSTP, 2 s, SIGSTOP to the known processes only)
  and where Slurm offers a callback for it;
- hooks/slurm/* against a stub `jobcage`: the exact arguments they pass, as whom, and their failure paths.
Run with -s to see the recorded facts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jctest import User, alive, create_user, delete_user, kill_uid, proc, wait_for
from slurmcluster import SlurmCluster, missing_prerequisites

pytestmark = [pytest.mark.root, pytest.mark.slurm]

REPO = Path(__file__).resolve().parent.parent
HOOKS = REPO / "hooks" / "slurm"

# Records what a Slurm hook receives.  One script, installed under three names; the environment is saved
# before PATH is touched (Prolog and Epilog get none).  Output: RESULTS/<name>.<jobid>.{info,env}.
RECORDER = r"""#!/bin/sh
out="@RESULTS@/$(basename "$0").${SLURM_JOB_ID:-nojob}"
env -0 > "$out.env.tmp"
PATH=/usr/sbin:/usr/bin:/sbin:/bin
gp=$(awk '/^PPid:/ {print $2}' /proc/$PPID/status)
{
    echo "uid=$(id -u)"
    echo "gid=$(id -g)"
    echo "pid=$$"
    echo "ppid=$PPID"
    echo "parent_comm=$(cat /proc/$PPID/comm)"
    echo "parent_cmdline=$(tr '\0' ' ' < /proc/$PPID/cmdline)"
    echo "parent_uid=$(awk '/^Uid:/ {print $2}' /proc/$PPID/status)"
    echo "grandparent_pid=$gp"
    echo "grandparent_comm=$(cat /proc/$gp/comm)"
    echo "grandparent_uid=$(awk '/^Uid:/ {print $2}' /proc/$gp/status)"
    echo "time=$(date +%s.%N)"
} > "$out.info.tmp"
mv "$out.env.tmp" "$out.env" && mv "$out.info.tmp" "$out.info"
if [ "$(basename "$0")" = task_prolog ]; then
    echo "print recorder: task_prolog stdout"   # "print" lines go to the job's stdout
    if [ -n "$JC_TASK_PROLOG_EXIT" ]; then exit "$JC_TASK_PROLOG_EXIT"; fi
fi
exit 0
"""

# Stands in for the jobcage CLI under hooks/slurm: records argv and caller, fails on demand.
STUB_JOBCAGE = r"""#!/bin/sh
{
    printf 'uid=%s ppid=%s argv=' "$(id -u)" "$PPID"
    printf '[%s]' "$@"
    echo
} >> "@RESULTS@/calls.log" || exit 99
if [ -e "@RESULTS@/fail-$1" ]; then echo "stub refuses $1 for job $2" >&2; exit 1; fi
exit 0
"""


def _require_prerequisites() -> None:
    missing = missing_prerequisites()
    if missing:
        # In CI a missing prerequisite is a broken setup, not a reason to pass quietly.
        if os.environ.get("CI") == "true":
            pytest.fail("Slurm baseline prerequisites missing: " + "; ".join(missing))
        pytest.skip("Slurm baseline prerequisites missing: " + "; ".join(missing))


def _world_dir(prefix: str) -> Path:
    """A dir under /tmp that the munge user and test users can traverse (pytest's tmp_path cannot)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def _read_record(results: Path, hook: str, job_id: int) -> tuple[dict[str, str], dict[str, str]]:
    """The (info, env) a recorder hook left for `job_id`, waiting for it to appear."""
    info_path = results / f"{hook}.{job_id}.info"
    wait_for(info_path.exists, 30, f"{hook} record of job {job_id}")
    info = dict(line.split("=", 1) for line in info_path.read_text().splitlines() if "=" in line)
    env = {}
    for item in (results / f"{hook}.{job_id}.env").read_bytes().split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            env[key] = value
    return info, env


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    """A fresh user without a home (jobs run in the cluster's own dir); its processes killed, then userdel."""
    _require_prerequisites()
    u = create_user("jcsl", home="/nonexistent")
    try:
        yield u
    finally:
        problems = delete_user(u)
        assert not problems, problems


@pytest.fixture(autouse=True)
def _kill_user_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: kill what the test user still runs (daemons that escaped Slurm), by uid only."""
    yield
    if "user" in request.fixturenames:
        kill_uid(request.getfixturevalue("user").uid)


@pytest.fixture(scope="module")
def recorder_dir() -> Iterator[Path]:
    _require_prerequisites()
    hookdir = _world_dir("jchooks-")
    results = hookdir / "results"
    results.mkdir()
    results.chmod(0o1777)  # TaskProlog writes here as the job user
    for name in ("prolog", "task_prolog", "epilog"):
        path = hookdir / name
        path.write_text(RECORDER.replace("@RESULTS@", str(results)))
        path.chmod(0o755)
    yield hookdir
    shutil.rmtree(hookdir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(recorder_dir: Path) -> Iterator[SlurmCluster]:
    """Slurm as jobcage's fragment configures it (linuxproc, task/none, PrologFlags=Alloc), hooks recording."""
    with SlurmCluster(prolog=recorder_dir / "prolog", task_prolog=recorder_dir / "task_prolog",
                      epilog=recorder_dir / "epilog") as c:
        yield c


@pytest.fixture
def workdir(cluster: SlurmCluster, user: User, request: pytest.FixtureRequest) -> Path:
    """A dir the job writes its pid files and counters to, owned by the test user."""
    path = cluster.jobs_dir / request.node.name
    path.mkdir()
    os.chown(path, user.uid, user.gid)
    return path


def _read_pid(path: Path) -> int:
    wait_for(lambda: path.exists() and path.read_text().strip(), 30, f"pid file {path}")
    return int(path.read_text())


def _state(pid: int) -> str | None:
    info = proc(pid)
    return info.state if info is not None else None


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_cluster_starts_quickly(cluster: SlurmCluster) -> None:
    print(f"\nslurm startup (munged + slurmctld + slurmd to node idle): {cluster.startup_seconds:.2f} s")
    assert cluster.node_state() == "idle"
    assert cluster.startup_seconds is not None and cluster.startup_seconds < 30


def test_hook_environment(cluster: SlurmCluster, user: User, recorder_dir: Path, workdir: Path) -> None:
    """Prolog: root, child of slurmd, SLURM_JOB_ID/UID/GID.  TaskProlog: the job user, child of the task
    process (== SLURM_TASK_PID, becomes the job script; its parent is slurmstepd).  Epilog: root, after the job.
    A user cannot override SLURM_JOB_ID / SLURM_TASK_PID in the TaskProlog, but does set its PATH."""
    results = recorder_dir / "results"
    script = f"#!/bin/sh\necho $$ > {workdir}/script.pid\necho $PPID > {workdir}/script.ppid\n"
    job = cluster.sbatch(script, user.name, env={"SLURM_JOB_ID": "1", "SLURM_TASK_PID": "1",
                                                 "PATH": "/nonexistent/evil:/usr/bin:/bin"})
    cluster.wait_state(job, "COMPLETED")
    cluster.wait_node_state({"idle"})  # the Epilog has run

    prolog, prolog_env = _read_record(results, "prolog", job)
    task, task_env = _read_record(results, "task_prolog", job)
    epilog, epilog_env = _read_record(results, "epilog", job)
    print("\nProlog:", json.dumps(prolog, indent=1), "\nProlog env:", json.dumps(prolog_env, indent=1))
    print("TaskProlog:", json.dumps(task, indent=1))
    print("TaskProlog SLURM env:", json.dumps({k: v for k, v in task_env.items() if "SLURM" in k}, indent=1))
    print("Epilog:", json.dumps(epilog, indent=1), "\nEpilog env:", json.dumps(epilog_env, indent=1))

    for info, env in ((prolog, prolog_env), (epilog, epilog_env)):
        assert info["uid"] == "0"
        assert info["parent_comm"] == "slurmd"
        assert env["SLURM_JOB_ID"] == str(job)
        assert env["SLURM_JOB_UID"] == str(user.uid)
        assert env["SLURM_JOB_GID"] == str(user.gid)
        assert env["SLURM_JOB_USER"] == user.name
    assert prolog_env["SLURM_SCRIPT_CONTEXT"] == "prolog_slurmd"
    assert epilog_env["SLURM_SCRIPT_CONTEXT"] == "epilog_slurmd"
    # Prolog and Epilog get no PATH from slurmd: the hooks set their own.
    assert "PATH" not in prolog_env and "PATH" not in epilog_env
    assert float(prolog["time"]) < float(task["time"]) < float(epilog["time"])

    script_pid = int((workdir / "script.pid").read_text())
    assert task["uid"] == str(user.uid)
    assert task_env["SLURM_SCRIPT_CONTEXT"] == "prolog_task"
    # The TaskProlog's parent is the task process: the very process that then execs the job script ...
    assert task["ppid"] == task_env["SLURM_TASK_PID"] == str(script_pid)
    assert task["parent_cmdline"].startswith(f"slurmstepd: [{job}.batch]")  # not exec'd yet
    assert task["parent_uid"] == str(user.uid)  # ... already the job user's: it may adopt it itself
    # ... and its parent is the step daemon (root), which must stay out of the job.
    assert task["grandparent_comm"] == "slurmstepd" and task["grandparent_uid"] == "0"
    assert (workdir / "script.ppid").read_text().strip() == task["grandparent_pid"]
    # Slurm overrides what the hooks read from the user's environment; PATH stays the user's own.
    assert task_env["SLURM_JOB_ID"] == str(job)
    assert task_env["PATH"] == "/nonexistent/evil:/usr/bin:/bin"
    assert "recorder: task_prolog stdout" in cluster.job_output(job)


def test_failing_task_prolog_fails_the_task(cluster: SlurmCluster, user: User, workdir: Path) -> None:
    """A TaskProlog exiting non-zero stops the task before the job script runs (fail closed)."""
    job = cluster.sbatch(f"#!/bin/sh\ntouch {workdir}/ran\n", user.name, env={"JC_TASK_PROLOG_EXIT": "3"})
    cluster.wait_state(job, "FAILED")
    assert cluster.job_info(job)["ExitCode"] == "3:0"
    assert not (workdir / "ran").exists()
    assert "TaskProlog failed status=3" in cluster.job_output(job)


def test_scancel_leaves_setsid_daemon_running(cluster: SlurmCluster, user: User, workdir: Path) -> None:
    """THE baseline: proctrack/linuxproc knows a job's processes by parentage, so a double-forked setsid
    daemon is invisible to Slurm and survives scancel and the Epilog.  jobcage's epilogue must kill it."""
    script = f"""#!/bin/sh
( setsid nohup sh -c 'echo $$ > {workdir}/daemon.pid; exec sleep 300' </dev/null >/dev/null 2>&1 & )
echo $$ > {workdir}/script.pid
exec sleep 300
"""
    job = cluster.sbatch(script, user.name)
    cluster.wait_state(job, "RUNNING")
    daemon = _read_pid(workdir / "daemon.pid")
    script_pid = _read_pid(workdir / "script.pid")
    info = proc(daemon)
    assert info is not None and info.uid == user.uid
    assert info.sid == daemon  # its own session ...
    assert info.ppid != script_pid  # ... reparented away from the job's tree ...
    wait_for(lambda: script_pid in cluster.listpids(job), 10, "Slurm to list the job script")
    assert daemon not in cluster.listpids(job)  # ... so Slurm does not know it

    cluster.scancel(job)
    cluster.wait_state(job, "CANCELLED")
    cluster.wait_node_state({"idle"})  # job ended and Epilog done
    wait_for(lambda: not alive(script_pid), 10, "the job script to die")
    time.sleep(1)
    assert alive(daemon), "the setsid daemon died: Slurm contained it after all?"
    print(f"\njob {job} cancelled, script {script_pid} gone, daemon {daemon} still running: {proc(daemon)}")
    kill_uid(user.uid)
    assert not alive(daemon)


SIGNAL_RECORDER = r"""
import signal, sys, time
log = open(sys.argv[1], "a", buffering=1)
def note(sig, _frame):
    log.write(f"{signal.Signals(sig).name} {time.time():.3f}\n")
signal.signal(signal.SIGTSTP, note)  # caught: so only SIGSTOP can stop this process
signal.signal(signal.SIGCONT, note)
while True:
    time.sleep(0.05)
"""


def test_suspend_stops_only_known_processes(cluster: SlurmCluster, user: User, workdir: Path) -> None:
    """`scontrol suspend` with proctrack/linuxproc: returns at once; slurmstepd sends SIGTSTP to the step's
    known processes, 2 s later SIGSTOP; resume sends SIGCONT.  A setsid daemon keeps running throughout.
    slurmd's only callback is the TaskPlugin's task_p_slurmd_suspend_job / task_p_slurmd_resume_job."""
    (workdir / "recorder.py").write_text(SIGNAL_RECORDER)
    script = f"""#!/bin/sh
( setsid sh -c 'echo $$ > {workdir}/daemon.pid
  while :; do echo x >> {workdir}/daemon.ticks; sleep 0.1; done' </dev/null >/dev/null 2>&1 & )
sh -c 'echo $$ > {workdir}/child.pid; while :; do echo x >> {workdir}/child.ticks; sleep 0.1; done' &
/usr/bin/python3 {workdir}/recorder.py {workdir}/signals &
echo $! > {workdir}/recorder.pid
echo $$ > {workdir}/script.pid
wait
"""
    job = cluster.sbatch(script, user.name)
    cluster.wait_state(job, "RUNNING")
    daemon, child = _read_pid(workdir / "daemon.pid"), _read_pid(workdir / "child.pid")
    recorder = _read_pid(workdir / "recorder.pid")
    wait_for(lambda: {child, recorder} <= cluster.listpids(job), 10, "Slurm to list the job's pids")
    known = cluster.listpids(job)
    assert daemon not in known
    wait_for(lambda: _lines(workdir / "child.ticks") > 2 and _lines(workdir / "daemon.ticks") > 2, 10, "ticks")

    t0 = time.time()
    cluster.scontrol("suspend", str(job))
    returned = time.time() - t0
    assert cluster.job_state(job) == "SUSPENDED"
    # SIGTSTP first: the recorder catches it, the child's default action stops it.
    wait_for(lambda: "SIGTSTP" in (workdir / "signals").read_text(), 10, "SIGTSTP at the recorder")
    tstp = float((workdir / "signals").read_text().split()[1])
    # SIGSTOP after the grace time: only now does the recorder stop.
    wait_for(lambda: _state(recorder) == "T", 15, "SIGSTOP at the recorder")
    stopped_after = time.time() - tstp
    # (short-lived `sleep 0.1` children Slurm listed may be gone by now)
    stopped = {pid: state for pid in known if (state := _state(pid)) is not None}
    child_ticks, daemon_ticks = _lines(workdir / "child.ticks"), _lines(workdir / "daemon.ticks")
    time.sleep(1.5)
    print(f"\nscontrol suspend returned after {returned:.3f} s; SIGTSTP {tstp - t0:.3f} s after the call; "
          f"recorder stopped (SIGSTOP) {stopped_after:.2f} s after SIGTSTP")
    print(f"states of the pids Slurm knows: {stopped}; daemon: {proc(daemon)}")
    assert all(state == "T" for state in stopped.values()), stopped
    assert 1.5 <= stopped_after < 6  # slurmstepd's built-in 2 s grace between SIGTSTP and SIGSTOP
    assert _lines(workdir / "child.ticks") == child_ticks  # the known child is stopped ...
    assert _state(daemon) not in ("T", None)  # ... the daemon is not ...
    assert _lines(workdir / "daemon.ticks") > daemon_ticks  # ... and keeps working

    cluster.scontrol("resume", str(job))
    assert cluster.job_state(job) == "RUNNING"
    wait_for(lambda: "SIGCONT" in (workdir / "signals").read_text(), 10, "SIGCONT at the recorder")
    wait_for(lambda: all(_state(p) != "T" for p in known), 10, "the known processes to continue")
    wait_for(lambda: _lines(workdir / "child.ticks") > child_ticks, 10, "the child to tick again")

    # The callback a jobcage integration can hook: slurmd calls the TaskPlugin with the job id.
    slurmd_log = (cluster.log_dir / "slurmd.log").read_text()
    assert f"task_p_slurmd_suspend_job: {job}" in slurmd_log
    assert f"task_p_slurmd_resume_job: {job}" in slurmd_log
    cluster.scancel(job)
    cluster.wait_state(job, "CANCELLED")
    cluster.wait_node_state({"idle"})
    assert alive(daemon)  # survived the cancel as well; the autouse fixture kills it


# --- hooks/slurm/* against a stub jobcage ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def stub_hooks() -> Iterator[Path]:
    """hooks/slurm copied next to a stub `jobcage` (the hooks prefer a jobcage beside them)."""
    _require_prerequisites()
    hookdir = _world_dir("jcstub-")
    results = hookdir / "results"
    results.mkdir()
    results.chmod(0o1777)
    (results / "calls.log").touch()
    (results / "calls.log").chmod(0o666)  # appended to as root (Prolog, Epilog) and as the user (TaskProlog)
    for name in ("prolog", "task_prolog", "epilog"):
        shutil.copy(HOOKS / name, hookdir / name)
        (hookdir / name).chmod(0o755)
    (hookdir / "jobcage").write_text(STUB_JOBCAGE.replace("@RESULTS@", str(results)))
    (hookdir / "jobcage").chmod(0o755)
    yield hookdir
    shutil.rmtree(hookdir, ignore_errors=True)


@pytest.fixture(scope="module")
def hooked_cluster(stub_hooks: Path) -> Iterator[SlurmCluster]:
    with SlurmCluster(prolog=stub_hooks / "prolog", task_prolog=stub_hooks / "task_prolog",
                      epilog=stub_hooks / "epilog") as c:
        yield c


def _calls(stub_hooks: Path, job: int) -> list[str]:
    log = stub_hooks / "results" / "calls.log"
    return [line for line in log.read_text().splitlines() if f"[{job}]" in line] if log.exists() else []


def test_hooks_call_jobcage_with_the_contract(hooked_cluster: SlurmCluster, stub_hooks: Path,
                                               user: User) -> None:
    """prologue JOB --uid --gid as root; adopt JOB --pid <task pid> as the user; epilogue JOB as root."""
    workdir = hooked_cluster.jobs_dir / "contract"
    workdir.mkdir()
    os.chown(workdir, user.uid, user.gid)
    job = hooked_cluster.sbatch(f"#!/bin/sh\necho $$ > {workdir}/script.pid\n", user.name)
    hooked_cluster.wait_state(job, "COMPLETED")
    hooked_cluster.wait_node_state({"idle"})
    script_pid = int((workdir / "script.pid").read_text())
    calls = _calls(stub_hooks, job)
    print("\n" + "\n".join(calls))
    assert len(calls) == 3, calls
    assert calls[0].startswith("uid=0 ")
    assert calls[0].endswith(f"argv=[prologue][{job}][--uid][{user.uid}][--gid][{user.gid}]")
    assert calls[1].startswith(f"uid={user.uid} ")
    assert calls[1].endswith(f"argv=[adopt][{job}][--pid][{script_pid}]")
    # the epilogue keeps the job's own stdout/stderr (--keep PATH, each path once; docs/batch-systems.md)
    assert calls[2].startswith("uid=0 "), calls[2]
    head, _, keeps = calls[2].partition(f"argv=[epilogue][{job}][--missing-ok]")
    assert head and re.fullmatch(r"(\[--keep\]\[/[^\]]+\])*", keeps), calls[2]
    kept = re.findall(r"\[--keep\]\[(/[^\]]+)\]", keeps)
    assert len(kept) == len(set(kept)) and any(k.endswith(f"slurm-{job}.out") for k in kept), kept
    assert "jobcage" not in hooked_cluster.job_output(job)  # nothing leaks into the job's output


def test_task_prolog_hook_failure_is_reported(hooked_cluster: SlurmCluster, stub_hooks: Path,
                                              user: User) -> None:
    """adopt fails -> the task does not run, the job fails and its output says why."""
    flag = stub_hooks / "results" / "fail-adopt"
    flag.touch()
    try:
        workdir = hooked_cluster.jobs_dir / "adoptfail"
        workdir.mkdir()
        os.chown(workdir, user.uid, user.gid)
        job = hooked_cluster.sbatch(f"#!/bin/sh\ntouch {workdir}/ran\n", user.name)
        hooked_cluster.wait_state(job, "FAILED")
        hooked_cluster.wait_node_state({"idle"})
    finally:
        flag.unlink()
    output = hooked_cluster.job_output(job)
    assert f"jobcage task_prolog: stub refuses adopt for job {job}" in output
    assert not (workdir / "ran").exists()
    argvs = [c.split("argv=")[1] for c in _calls(stub_hooks, job)]
    assert len(argvs) == 3, argvs
    assert argvs[0] == f"[prologue][{job}][--uid][{user.uid}][--gid][{user.gid}]"
    assert argvs[1].startswith(f"[adopt][{job}][--pid][")
    # the Epilog runs even though the task never did (and keeps the job's output file)
    assert argvs[2] == f"[epilogue][{job}][--missing-ok][--keep][{hooked_cluster.jobs_dir}/slurm-{job}.out]", argvs
