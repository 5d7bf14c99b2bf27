"""jobcage under a real Slurm 22.05, end to end: hooks/slurm/* + the task/jobcage plugin + a running agent.

Every test starts its own private munged + slurmctld + slurmd (tests/slurmcluster.py) configured from
hooks/slurm/slurm.conf.fragment, with the real hook scripts and a freshly built task_jobcage.so in a hook
dir next to a `jobcage` wrapper that points at the test's private config (unique cgroup subtree, state dir
and socket from the jc_env fixture).  Jobs are submitted with real sbatch by a fresh "pilot" user; the
payload runs as a second fresh "pool" user through real sudo (a sudoers drop-in for the test).

What test_slurm_baseline.py shows Slurm failing at, these tests show jobcage doing:
- a setsid daemon and a sudo payload are in the job's cgroup while it runs, and gone after scancel;
- scontrol suspend freezes all of them (the daemon too), scontrol resume thaws them;
- a fork bomb is held at the job's pids limit, the node keeps answering, the hits are accounted;
- after the job, `jobcage whois` maps the pool uid back to the Slurm job and its pilot.
Plus the plugin itself: it adopts tasks as root (no TaskProlog, no agent needed), a task it cannot adopt
never runs, a plugin built for another Slurm version keeps slurmd from starting, and every jobcage run it
makes is bounded in time (the last two load the .so outside Slurm).
Debugging: KEEP_SLURM_CLUSTER=1 keeps each cluster's logs, JC_SLURM_DEBUG=1 raises the daemons' log level.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from jctest import JcEnv, User, alive, pids_of_uid, proc, wait_for
from slurmcluster import (
    SLURM_HOOKS,
    SlurmCluster,
    SlurmClusterError,
    epilog_done,
    fragment,
    hook_dir,
    slurm_plugin_dir,
)

PIDS_MAX = 64  # the jobs' pids limit: the Prolog takes it from jobcage's config

pytestmark = [
    pytest.mark.root,
    pytest.mark.slurm,
    # The tracer records identity changes (needed by whois); every job gets a small pids limit.
    pytest.mark.jc_config({"tracer": {"backend": "auto"}, "jobs": {"default_pids_max": PIDS_MAX}}),
]


# --- helpers ----------------------------------------------------------------------------------------------

def _pid(path: Path, timeout: float = 30.0) -> int:
    wait_for(lambda: path.exists() and path.read_text().strip().isdigit(), timeout, f"pid file {path}")
    return int(path.read_text())


def _ticks(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _show(jc_env: JcEnv, job: int) -> dict:
    return jc_env.jobcage("show", str(job), "--json").json()


def _job_pids(jc_env: JcEnv, job: int) -> set[int]:
    return set(jc_env.job_pids(str(job)))


def _frozen(jc_env: JcEnv, job: int) -> bool | None:
    """The kernel's word: cgroup.events 'frozen 1' (cgroup2) or freezer.state FROZEN (v1); None if gone."""
    dirs = jc_env.cgroup_dirs(str(job))
    try:
        if "unified" in dirs:
            return "frozen 1" in (dirs["unified"] / "cgroup.events").read_text().splitlines()
        return (dirs["freezer"] / "freezer.state").read_text().strip() == "FROZEN"
    except FileNotFoundError:
        return None


def _uid_pids(*users: User) -> set[int]:
    return {pid for u in users for pid in pids_of_uid(u.uid)}


def _assert_all_in_job(jc_env: JcEnv, job: int, pids: set[int]) -> None:
    """Every pid still alive is in the job's cgroup in every hierarchy jobcage uses."""
    outside = []
    for pid in sorted(pids):
        if not jc_env.in_job(pid, str(job)) and alive(pid):
            p = proc(pid)
            outside.append(f"{pid} ({p.cmdline if p else 'gone'}): {Path(f'/proc/{pid}/cgroup').read_text()!r}")
    assert not outside, "processes outside the job's cgroup:\n" + "\n".join(outside)


def _plugin_log(cluster: SlurmCluster) -> list[str]:
    return [line for line in (cluster.log_dir / "slurmd.log").read_text(errors="replace").splitlines()
            if "task/jobcage" in line]


def _end(cluster: SlurmCluster, jc_env: JcEnv, job: int) -> None:
    cluster.scancel(job)
    cluster.wait_state(job, "CANCELLED")
    epilog_done(cluster, jc_env, job)


# --- the tests ----------------------------------------------------------------------------------------------

def test_daemon_and_sudo_payload_are_in_the_job_and_die_with_it(
        slurm: SlurmCluster, jc_env: JcEnv, users: tuple[User, User], workdir: Path) -> None:
    """A pilot job starts a setsid daemon and a payload under another uid (sudo).  While it runs every
    process of both uids is in the job's cgroup; after scancel and the Epilog not one of them is left."""
    pilot, pool = users
    w = workdir
    script = f"""#!/bin/sh
( setsid sh -c 'echo $$ > {w}/daemon.pid; exec sleep 300' </dev/null >/dev/null 2>&1 & )
sudo -n -u {pool.name} /bin/sh -c 'echo $$ > {w}/payload.pid; exec sleep 300' &
echo $$ > {w}/script.pid
wait
"""
    job = slurm.sbatch(script, pilot.name)
    slurm.wait_state(job, "RUNNING")
    daemon, payload, script_pid = _pid(w / "daemon.pid"), _pid(w / "payload.pid"), _pid(w / "script.pid")
    d, p = proc(daemon), proc(payload)
    assert d is not None and d.uid == pilot.uid and d.sid == daemon  # its own session, reparented
    assert p is not None and p.uid == p.euid == pool.uid             # the identity switch happened

    everyone = _uid_pids(pilot, pool)
    assert {daemon, payload, script_pid} <= everyone
    _assert_all_in_job(jc_env, job, everyone)
    in_cgroup = _job_pids(jc_env, job)
    assert {daemon, payload, script_pid} <= in_cgroup
    shown = _show(jc_env, job)
    print(f"\njob {job}: cgroup {shown['cgroup']}, {shown['processes']} processes, pids "
          f"{shown['pids_current']}/{shown['pids_max']}; uid {pilot.uid}+{pool.uid} pids {sorted(everyone)}")
    assert shown["state"] == "running" and shown["owner_uid"] == pilot.uid
    assert shown["processes"] >= len(everyone) and shown["pids_max"] == PIDS_MAX
    assert daemon not in slurm.listpids(job)  # Slurm itself does not know the daemon
    # The plugin adopted the task as root before it exec'd (the TaskProlog then found it adopted).
    assert any(f"jobcage adopt {job} --pid {script_pid}: ok" in line for line in _plugin_log(slurm)), \
        _plugin_log(slurm)

    t0 = time.monotonic()
    _end(slurm, jc_env, job)
    print(f"scancel -> node idle after the Epilog: {time.monotonic() - t0:.2f} s")
    for pid in (daemon, payload, script_pid):
        assert not alive(pid), f"{pid} survived: {proc(pid)}"
    assert not _uid_pids(pilot, pool), [proc(x) for x in _uid_pids(pilot, pool)]
    assert not any(d.exists() for d in jc_env.cgroup_dirs(str(job)).values())
    assert _show(jc_env, job)["state"] == "ended"


def test_suspend_freezes_every_process_and_resume_thaws_them(
        slurm: SlurmCluster, jc_env: JcEnv, users: tuple[User, User], workdir: Path) -> None:
    """scontrol suspend -> task/jobcage -> jobcage suspend: the cgroup freezes, so the setsid daemon and
    the sudo payload stop too (plain Slurm only stops what it knows).  scontrol resume thaws them all, and
    Slurm's own pending SIGSTOP leaves nothing stopped.  A suspended job is then cancelled cleanly."""
    pilot, pool = users
    w = workdir
    tick = "while :; do echo x >> {f}; sleep 0.1; done"
    script = f"""#!/bin/sh
( setsid sh -c 'echo $$ > {w}/daemon.pid; {tick.format(f=w / "daemon.ticks")}' </dev/null >/dev/null 2>&1 & )
sudo -n -u {pool.name} /bin/sh -c 'echo $$ > {w}/payload.pid; {tick.format(f=w / "payload.ticks")}' &
sh -c 'echo $$ > {w}/child.pid; {tick.format(f=w / "child.ticks")}' &
wait
"""
    job = slurm.sbatch(script, pilot.name)
    slurm.wait_state(job, "RUNNING")
    pids = {name: _pid(w / f"{name}.pid") for name in ("daemon", "payload", "child")}
    counters = {name: w / f"{name}.ticks" for name in pids}
    wait_for(lambda: all(_ticks(f) > 3 for f in counters.values()), 20, "all three counters ticking")
    _assert_all_in_job(jc_env, job, _uid_pids(pilot, pool))

    t0 = time.monotonic()
    slurm.scontrol("suspend", str(job))
    wait_for(lambda: _frozen(jc_env, job), 15, "the job's cgroup to report frozen")
    frozen_after = time.monotonic() - t0
    assert slurm.job_state(job) == "SUSPENDED"
    before = {name: _ticks(f) for name, f in counters.items()}
    time.sleep(2.5)  # past Slurm's own SIGTSTP -> 2 s -> SIGSTOP sequence
    after = {name: _ticks(f) for name, f in counters.items()}
    print(f"\nscontrol suspend -> cgroup frozen in {frozen_after:.2f} s; ticks over 2.5 s frozen: "
          f"{ {n: after[n] - before[n] for n in after} }")
    assert after == before, f"a process kept running while the job was suspended: {before} -> {after}"
    assert _show(jc_env, job)["state"] == "suspended"
    assert any(f"jobcage suspend {job}: ok" in line for line in _plugin_log(slurm))

    t0 = time.monotonic()
    slurm.scontrol("resume", str(job))
    wait_for(lambda: _frozen(jc_env, job) is False, 15, "the job's cgroup to thaw")
    thawed_after = time.monotonic() - t0
    wait_for(lambda: all(_ticks(f) > before[n] + 3 for n, f in counters.items()), 20, "every counter to advance")
    # Slurm's SIGSTOP was pending while frozen; resume's SIGCONT must leave no process stopped.
    wait_for(lambda: not [p for p in _job_pids(jc_env, job) if (i := proc(p)) and i.state in "Tt"], 10,
             "no process of the job left stopped")
    print(f"scontrol resume -> cgroup thawed in {thawed_after:.2f} s; all counters advance")
    assert _show(jc_env, job)["state"] == "running"
    assert any(f"jobcage resume {job}: ok" in line for line in _plugin_log(slurm))
    assert all(alive(p) for p in pids.values())

    # Suspended, then cancelled (preemption by cancel): the frozen job must still die completely.
    slurm.scontrol("suspend", str(job))
    wait_for(lambda: _frozen(jc_env, job), 15, "the job to freeze again")
    _end(slurm, jc_env, job)
    assert not [p for p in pids.values() if alive(p)]
    assert not _uid_pids(pilot, pool)


def test_fork_bomb_is_held_at_the_pids_limit(
        slurm: SlurmCluster, jc_env: JcEnv, users: tuple[User, User], workdir: Path) -> None:
    """A bash fork bomb in a job stays at the job's pids limit (from the Prolog, via jobcage's config);
    slurmctld/slurmd keep answering; the limit hits are in `jobcage show`; scancel ends it all."""
    pilot, _pool = users
    w = workdir
    # The bomb only goes off once the test has checked the limit is in place (the go file), and under
    # RLIMIT_NPROC as a second net: the user is fresh, so its process count is the bomb's.
    script = f"""#!/bin/bash
echo $$ > {w}/script.pid
while [ ! -e {w}/go ]; do sleep 0.1; done
ulimit -u 512
bomb() {{ bomb | bomb & }}
bomb 2>/dev/null
exec sleep 300
"""
    job = slurm.sbatch(script, pilot.name)
    slurm.wait_state(job, "RUNNING")
    script_pid = _pid(w / "script.pid")
    assert jc_env.in_job(script_pid, str(job))
    assert _show(jc_env, job)["pids_max"] == PIDS_MAX
    for hierarchy, d in jc_env.cgroup_dirs(str(job)).items():
        if (d / "pids.max").exists():
            assert (d / "pids.max").read_text().strip() == str(PIDS_MAX), hierarchy
    (w / "go").touch()

    shown = wait_for(lambda: (s := _show(jc_env, job))["pids_limit_hits"] > 0 and s, 30, "pids limit hits")
    time.sleep(2)  # let it push against the limit for a while
    timings = {}
    for name, argv in (("sinfo", ["sinfo", "-h", "-o", "%t"]), ("scontrol show node", ["scontrol", "show", "node"]),
                       ("squeue", ["squeue", "-h"])):
        t0 = time.monotonic()
        slurm.run(*argv, timeout=20)
        timings[name] = time.monotonic() - t0
    shown = _show(jc_env, job)  # read before scancel: the accounting while the bomb runs
    everyone = _uid_pids(pilot)
    print(f"\nfork bomb: pids {shown['pids_current']}/{shown['pids_max']}, limit hits {shown['pids_limit_hits']}, "
          f"{len(everyone)} processes of the pilot; node answers: "
          + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    assert shown["pids_limit_hits"] > 0
    assert shown["pids_current"] <= PIDS_MAX
    assert len(everyone) <= PIDS_MAX
    assert all(t < 10 for t in timings.values()), timings
    _assert_all_in_job(jc_env, job, everyone)

    _end(slurm, jc_env, job)
    assert not _uid_pids(pilot)
    ended = _show(jc_env, job)
    assert ended["state"] == "ended" and ended["pids_limit_hits"] >= shown["pids_limit_hits"]


def test_whois_maps_the_pool_uid_back_to_the_job_and_pilot(
        slurm: SlurmCluster, jc_env: JcEnv, users: tuple[User, User], workdir: Path) -> None:
    """After the job ended, `jobcage whois --uid POOL --at <while it ran>` names the Slurm job id and
    the pilot uid: the back-mapping the gLExec era lacked."""
    pilot, pool = users
    w = workdir
    script = f"""#!/bin/sh
sudo -n -u {pool.name} /bin/sh -c 'echo $$ > {w}/payload.pid; sleep 2'
"""
    job = slurm.sbatch(script, pilot.name)
    payload = _pid(w / "payload.pid")
    during = time.time()
    assert alive(payload) and proc(payload).uid == pool.uid  # type: ignore[union-attr]
    slurm.wait_state(job, "COMPLETED")
    epilog_done(slurm, jc_env, job)

    rows = jc_env.jobcage("whois", "--uid", str(pool.uid), "--at", f"{during:.3f}", "--json").json()
    print(f"\nwhois --uid {pool.uid} --at {during:.3f}: {json.dumps(rows, indent=1)}")
    match = [r for r in rows if r["job_id"] == str(job)]
    assert match, rows
    assert match[0]["pilot_uid"] == pilot.uid and match[0]["pilot_user"] == pilot.name
    assert match[0]["job_end"] is not None  # the job is over, the mapping stays
    # The same answer for an ISO 8601 time.
    iso = datetime.fromtimestamp(during, tz=UTC).isoformat()
    rows_iso = jc_env.jobcage("whois", "--uid", str(pool.uid), "--at", iso, "--json").json()
    assert any(r["job_id"] == str(job) for r in rows_iso)
    # Now, after the job, no job holds the pool uid.
    assert not [r for r in jc_env.jobcage("whois", "--uid", str(pool.uid), "--json").json()
                if r["job_id"] == str(job)]


# --- the plugin without the TaskProlog and without the agent --------------------------------------------------

def test_plugin_adopts_tasks_as_root_without_task_prolog_or_agent(
        bare_slurm: SlurmCluster, jc_env: JcEnv, users: tuple[User, User], workdir: Path) -> None:
    """With the plugin, the TaskProlog is optional: slurmstepd (root) adopts the task before it execs,
    so the job script, a batch step's srun tasks and their daemons are contained without the agent."""
    pilot, _pool = users
    w = workdir
    assert not Path(jc_env.socket_path).exists()
    script = f"""#!/bin/sh
( setsid sh -c 'echo $$ > {w}/daemon.pid; exec sleep 300' </dev/null >/dev/null 2>&1 & )
echo $$ > {w}/script.pid
grep '' /proc/self/cgroup > {w}/cgroup
exec sleep 300
"""
    job = bare_slurm.sbatch(script, pilot.name)
    bare_slurm.wait_state(job, "RUNNING")
    script_pid, daemon = _pid(w / "script.pid"), _pid(w / "daemon.pid")
    assert f"/{jc_env.subtree}/{job}" in (wait_for(lambda: (w / "cgroup").exists() and (w / "cgroup").read_text(),
                                                   10, "the script's cgroup"))
    _assert_all_in_job(jc_env, job, _uid_pids(pilot))
    assert {script_pid, daemon} <= _job_pids(jc_env, job)
    log = _plugin_log(bare_slurm)
    print("\n" + "\n".join(log))
    assert any(f"jobcage adopt {job} --pid {script_pid}: ok" in line for line in log)
    _end(bare_slurm, jc_env, job)
    assert not _uid_pids(pilot)


def test_plugin_fails_closed_when_jobcage_refuses(jc_env: JcEnv, users: tuple[User, User], plugin_so: Path) -> None:
    """No Prolog registered the job: the plugin's `jobcage adopt` is refused, slurmstepd does not exec the
    task, and the job's code never runs; the reason is in the job's output."""
    hooks = hook_dir(jc_env, plugin_so, ("prolog", "epilog"))
    conf = fragment()
    for key in ("Prolog", "TaskProlog", "Epilog"):
        conf.pop(key, None)
    conf.update(PluginDir=f"{slurm_plugin_dir()}:{hooks}", KillWait="5")
    pilot, _pool = users
    with SlurmCluster("/tmp", extra_conf=conf) as cluster:
        w = cluster.jobs_dir / "w"
        w.mkdir()
        w.chmod(0o777)
        job = cluster.sbatch(f"#!/bin/sh\ntouch {w}/ran\n", pilot.name)
        state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL"})
        output = cluster.job_output(job)
        print(f"\njob {job}: {state} {cluster.job_info(job).get('ExitCode')}\n{output}")
        assert not (w / "ran").exists(), "the job ran although it could not be contained"
        assert f"jobcage adopt {job} --pid" in output and f"unknown job {job}" in output


def test_stale_plugin_keeps_slurmd_from_starting(plugin_so: Path) -> None:
    """A plugin built for another Slurm micro release (after a Slurm update without rebuilding) is refused
    and slurmd does not start: the node takes no job rather than run jobs without task/jobcage."""
    d = Path(tempfile.mkdtemp(prefix="jcstale-"))
    try:
        d.chmod(0o755)
        version = ctypes.c_uint32.in_dll(ctypes.CDLL(str(plugin_so)), "plugin_version").value
        r = subprocess.run(["gcc", "-O2", "-fPIC", "-shared", f"-DJC_SLURM_VERSION={version - 1:#x}", "-o",
                            str(d / "task_jobcage.so"), str(SLURM_HOOKS / "task_jobcage.c")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        cluster = SlurmCluster("/tmp", startup_timeout=15, extra_conf={
            "TaskPlugin": "task/jobcage", "PluginDir": f"{slurm_plugin_dir()}:{d}"})
        with pytest.raises(SlurmClusterError) as failed:
            cluster.start()  # stops whatever it started when it fails
        assert "Incompatible plugin version" in str(failed.value)
        assert "slurmd initialization failed" in str(failed.value)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- the plugin's own guarantees, loaded outside Slurm ------------------------------------------------------------

STUB = r"""#!/bin/sh
# Stands in for jobcage next to the plugin: records argv, then behaves as the test asks.
echo "$*" >> "$(dirname "$0")/calls"
echo "stub: $1 for job $2"
case "$1" in
  suspend) sleep 300 & echo "$! $$" > "$(dirname "$0")/pids"; exec sleep 300 ;;  # hangs, with a grandchild
  resume) echo "resume refused" >&2; exit 3 ;;
esac
exit 0
"""


@pytest.fixture
def stubbed_plugin(plugin_so: Path) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="jcplugin-stub-"))
    try:
        shutil.copy(plugin_so, d / "task_jobcage.so")
        (d / "jobcage").write_text(STUB)
        (d / "jobcage").chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _in_subprocess(so: Path, calls: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Load the plugin with ctypes in a child Python and run `calls` (its stderr is the plugin's log)."""
    code = f"import ctypes, time\nlib = ctypes.CDLL({str(so)!r})\n{calls}"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_plugin_bounds_every_jobcage_run(stubbed_plugin: Path) -> None:
    """A hung `jobcage suspend` is killed with its whole process group at JOBCAGE_SLURM_TIMEOUT and the
    callback returns (slurmd would otherwise hold the job's suspend lock forever); failures are logged
    with jobcage's own message; the plugin exports the ABI Slurm checks."""
    so = stubbed_plugin / "task_jobcage.so"
    lib = ctypes.CDLL(str(so))
    # plugin_type / plugin_name are char arrays, not pointers
    assert ctypes.string_at(ctypes.addressof(ctypes.c_char.in_dll(lib, "plugin_type"))) == b"task/jobcage"
    version = ctypes.c_uint32.in_dll(lib, "plugin_version").value
    slurmd = subprocess.run(["slurmd", "-V"], capture_output=True, text=True).stdout
    major, minor, micro = (int(x) for x in re.search(r"(\d+)\.(\d+)\.(\d+)", slurmd).groups())  # type: ignore[union-attr]
    assert version == (major << 16) | (minor << 8) | micro, (hex(version), slurmd)

    r = _in_subprocess(so, "t = time.monotonic(); rc = lib.task_p_slurmd_suspend_job(4242)\n"
                           "print(rc, round(time.monotonic() - t, 2))\n"
                           "print(lib.task_p_slurmd_resume_job(4242))\n",
                       {"JOBCAGE_SLURM_TIMEOUT": "1.5"})
    print("\n" + r.stdout + r.stderr)
    lines = r.stdout.split()
    assert lines[0] == "-1" and 1.4 <= float(lines[1]) < 5, r.stdout
    assert lines[2] == "-1"
    assert "jobcage suspend 4242 did not finish within 1.5 s: killed (stub: suspend for job 4242)" in r.stderr
    assert "jobcage resume 4242 failed with exit 3" in r.stderr and "resume refused" in r.stderr
    assert (stubbed_plugin / "calls").read_text().splitlines() == ["suspend 4242", "resume 4242"]
    # Nothing of the killed stub survives: its process group (with the background sleep) went with it.
    stub_pids = [int(x) for x in (stubbed_plugin / "pids").read_text().split()]
    assert len(stub_pids) == 2
    wait_for(lambda: not [p for p in stub_pids if alive(p)], 5, "the stub and its grandchild to be gone")


def test_plugin_adoption_outside_slurmstepd_fails_closed(stubbed_plugin: Path) -> None:
    """post_set_affinity outside a slurmstepd (no "[JOB.STEP]" title) refuses instead of launching the
    task uncontained; JOBCAGE_SLURM_ADOPT=0 turns adoption off (TaskProlog-only sites)."""
    so = stubbed_plugin / "task_jobcage.so"
    r = _in_subprocess(so, "print(lib.task_p_post_set_affinity(None, 0))\n", {})
    assert r.stdout.strip() == "-1" and "cannot read the job id from slurmstepd's title" in r.stderr, r
    r = _in_subprocess(so, "print(lib.task_p_post_set_affinity(None, 0))\n", {"JOBCAGE_SLURM_ADOPT": "0"})
    assert r.stdout.strip() == "0" and not r.stderr, r
    assert not (stubbed_plugin / "calls").exists()

