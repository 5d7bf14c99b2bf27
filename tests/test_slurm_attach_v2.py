"""Slurm 22.05 containing the job itself (cgroup/v2, proctrack/cgroup, task/cgroup, slurmd under systemd) and
jobcage attached to Slurm's `job_N` by the task/jobcage plugin: the recommended setup for Slurm sites on pure v2
(docs/batch-systems.md, "Slurm with cgroup/v2").

A pilot job with a setsid daemon, a sudo payload and a fork bomb.  Slurm's memory limit still applies to the
sudo payload (it allocates past it and is OOM-killed in Slurm's cgroup, memory.events says so); the fork bomb is
held by the pids limit jobcage writes where the site opted in ([attach] pids_limit); jobcage's trail,
per-identity CPU and whois are right; scontrol suspend freezes every process and resume thaws them; scancel
leaves nothing; the task never leaves Slurm's cgroup.

Marked ``v2guest``: needs systemd as PID 1 on pure v2 (the guest, `make test-v2`), deselected elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jctest import (
    JOBTRACE,
    PYTHON,
    SUDO,
    AgentProc,
    Helpers,
    JcEnv,
    User,
    alive,
    keyed,
    open_gate,
    pid_file,
    pids_of_uid,
    proc,
    proc_cgroups,
    require,
    ticks,
    wait_for,
)
from slurmcluster import SlurmCluster, hook_dir, slurm_plugin_dir

PIDS_MAX = 64          # jobcage's limit in Slurm's job cgroup (the site's opt-in): the fork bomb stays under it
MEM = 128 << 20        # sbatch --mem: Slurm's limit (task/cgroup, ConstrainRAMSpace)
CG = Path("/sys/fs/cgroup")

pytestmark = [
    pytest.mark.v2guest, pytest.mark.root, pytest.mark.slurm, pytest.mark.bpf,
    pytest.mark.jc_config({"tracer": {"backend": "bpf"}, "attach": {"pids_limit": True},
                           "jobs": {"default_pids_max": PIDS_MAX}}),
]

# slurm.conf / cgroup.conf as docs/batch-systems.md gives them for Slurm on cgroup/v2 (paths the test's own)
SLURM_CONF = {
    "ProctrackType": "proctrack/cgroup",
    "TaskPlugin": "task/cgroup,task/jobcage",
    "JobAcctGatherType": "jobacct_gather/cgroup",
    "SelectTypeParameters": "CR_Core_Memory",
    "KillWait": "5",
}
CGROUP_CONF = {"CgroupPlugin": "cgroup/v2", "ConstrainCores": "yes", "ConstrainRAMSpace": "yes"}


@pytest.fixture
def cluster(jc_env: JcEnv, agent_proc: AgentProc, users: tuple[User, User], plugin_so: Path) -> Iterator[SlurmCluster]:
    """slurmd as a systemd unit with Slurm's cgroup/v2 containment, task/jobcage and the Epilog from a hook dir
    next to a `jobcage` that uses the test's config (the plugin and the hooks prefer a jobcage beside them)."""
    require(Path("/run/systemd/system").is_dir() and os.getpid() != 1, "slurmd must run under systemd")
    require((CG / "cgroup.controllers").exists() and not (CG / "unified").exists(), "a pure cgroup v2 node")
    hooks = hook_dir(jc_env, plugin_so, ("epilog",))
    conf = {**SLURM_CONF, "PluginDir": f"{slurm_plugin_dir()}:{hooks}", "Epilog": str(hooks / "epilog")}
    c = SlurmCluster("/tmp", extra_conf=conf, cgroup_conf=CGROUP_CONF,
                     slurmd_unit=f"jct-slurmd-{secrets.token_hex(3)}.service",
                     slurmd_env={"JOBCAGE_SLURM_TIMEOUT": "240"}, startup_timeout=300, command_timeout=120)
    jobs: list[int] = []
    c.test_jobs = jobs  # type: ignore[attr-defined]
    with c:
        try:
            yield c
        finally:
            # a job cgroup of ours Slurm left behind (a failed test): nothing of it may survive
            for job in jobs:
                for d in CG.glob(f"system.slice/*slurmstepd.scope/job_{job}"):
                    with contextlib.suppress(OSError):
                        (d / "cgroup.kill").write_text("1")


def test_slurm_cgroup_v2_job_attached(cluster: SlurmCluster, jc_env: JcEnv, users: tuple[User, User],
                                      helpers: Helpers) -> None:
    pilot, pool = users
    w = cluster.jobs_dir / "w"
    w.mkdir()
    w.chmod(0o777)
    gates = {n: w / n for n in ("oom", "bomb", "end")}
    for f in gates.values():
        os.mkfifo(f)
        f.chmod(0o666)
    payload = w / "payload.sh"
    # the pool identity burns some CPU (its per-identity share), waits, then allocates past Slurm's limit
    payload.write_text(f"echo $$ > {w}/payload.pid\n{PYTHON} {helpers.burn} 0.5\nread _ < {gates['oom']}\n"
                       f"exec {PYTHON} -c 'b = bytearray({4 * MEM}); print(len(b))'\n")
    payload.chmod(0o644)
    script = f"""#!/bin/sh
echo $$ > {w}/script.pid
setsid sh -c 'echo $$ > {w}/daemon.pid; while :; do echo t >> {w}/tick; sleep 0.2; done' </dev/null >/dev/null 2>&1 &
{SUDO} -n -u {pool.name} /bin/sh {payload}
echo $? > {w}/payload.rc
read _ < {gates['bomb']}
{helpers.forkbomb} 3 < /dev/zero
echo done > {w}/bomb.done
read _ < {gates['end']}
"""
    job = cluster.sbatch(script, pilot.name, f"--mem={MEM >> 20}M")
    cluster.test_jobs.append(job)  # type: ignore[attr-defined]
    cluster.wait_state(job, "RUNNING", timeout=300)
    script_pid, daemon, payload_pid = (pid_file(w / f"{n}.pid", 300) for n in ("script", "daemon", "payload"))

    # Slurm's layout: the batch task in .../slurmstepd.scope/job_N/step_batch/user/task_0
    task_cg = proc_cgroups(script_pid)[""]
    m = re.fullmatch(rf"(/system\.slice/([^/]*_)?slurmstepd\.scope/job_{job})/step_batch/user/task_0", task_cg)
    assert m, f"the batch task is not in Slurm's cgroup/v2 layout: {task_cg}"
    job_dir = CG / m.group(1).lstrip("/")
    assert (job_dir / "memory.max").read_text().strip() == str(MEM), "Slurm's memory limit on job_N"

    # the plugin attached the job from the task, as the job's uid; jobcage moved nothing
    shown = jc_env.jobcage("show", str(job), "--json").json()
    assert (shown["mode"], shown["cgroup"], shown["owner_uid"]) == ("attach", str(job_dir), pilot.uid), shown
    assert shown["pids_max"] == PIDS_MAX and (job_dir / "pids.max").read_text().strip() == str(PIDS_MAX)
    log = [line for line in (cluster.log_dir / "slurmd.log").read_text(errors="replace").splitlines()
           if "task/jobcage" in line]
    assert any(f"jobcage prologue {job} --uid {pilot.uid} " in line and ": ok" in line for line in log), log
    for pid in (daemon, payload_pid):
        assert proc_cgroups(pid)[""].startswith(m.group(1) + "/"), f"{pid} outside job_{job}"
    p = proc(payload_pid)
    assert p is not None and p.uid == pool.uid

    # scontrol suspend: every process of the job frozen -- by Slurm's own freeze of the steps' user cgroups
    # (task/jobcage leaves it to Slurm in attach mode: job_N also holds slurmstepd, which must keep answering)
    def frozen(pid: int) -> bool:
        return keyed(CG / proc_cgroups(pid)[""].lstrip("/") / "cgroup.events")["frozen"] == "1"

    everyone = (script_pid, daemon, payload_pid)
    wait_for(lambda: ticks(w / "tick") > 2, 120, "the daemon ticking")
    cluster.scontrol("suspend", str(job))
    wait_for(lambda: all(frozen(q) for q in everyone), 120, "every process of the job frozen")
    n0 = ticks(w / "tick")
    time.sleep(3)
    assert ticks(w / "tick") == n0, "the setsid daemon ran while the job was suspended"
    assert cluster.job_state(job) == "SUSPENDED"
    cluster.scontrol("resume", str(job))
    wait_for(lambda: not any(frozen(q) for q in everyone), 120, "every process of the job thawed")
    wait_for(lambda: ticks(w / "tick") > n0 + 2, 120, "the daemon to tick after resume")
    wait_for(lambda: not [q for q in everyone if (i := proc(q)) and i.state in "Tt"],
             60, "no process left stopped after resume")
    assert proc_cgroups(script_pid)[""] == task_cg, "the task left Slurm's cgroup"

    # the sudo payload allocates past Slurm's limit: OOM-killed in Slurm's cgroup
    open_gate(gates["oom"], 120)
    wait_for(lambda: int(keyed(job_dir / "memory.events")["oom_kill"]) >= 1, 300, "the OOM kill in job_N")
    rc = pid_file(w / "payload.rc", 300)
    assert rc != 0 and not alive(payload_pid), f"the payload survived past Slurm's memory limit (rc {rc})"

    # trail, identities, per-identity CPU, back-mapping
    def trail() -> list[dict]:
        out = jc_env.run([JOBTRACE, str(job), "--events", "--json"], timeout=300).ok().out
        return [json.loads(x) for x in out.splitlines() if x.strip()]

    evs = wait_for(lambda: (e := trail()) and any(x["kind"] == "exec" and x["pid"] == payload_pid
                                                  and x["uid"] == pool.uid for x in e) and e, 120,
                   "the payload's exec in the trail")
    assert any(e["kind"] == "setuid" and e["uid"] == pool.uid and e["detail"].get("via") == SUDO
               for e in evs), evs
    assert any(e["kind"] == "setsid" and e["pid"] == daemon for e in evs), evs
    s = jc_env.jobcage("show", str(job), "--json").json()
    got = {i["uid"]: i for i in s["identities"]}
    assert set(got) - {0} == {pilot.uid, pool.uid} and got[pool.uid]["via"] == SUDO, got   # 0: sudo itself
    assert got[pool.uid]["cpu_seconds"] >= 0.3, got       # it burned 0.5 s
    assert sum(i["cpu_seconds"] for i in got.values()) <= s["cpu_seconds"] * 1.25 + 0.5, (got, s["cpu_seconds"])
    rows = jc_env.jobcage("whois", "--uid", str(pool.uid), "--json").json()
    assert [(r["job_id"], r["pilot_uid"]) for r in rows] == [(str(job), pilot.uid)], rows

    # a fork bomb: held at the pids limit jobcage wrote in Slurm's job cgroup (the site's opt-in)
    open_gate(gates["bomb"], 120)
    wait_for(lambda: (w / "bomb.done").exists(), 300, "the fork bomb to stop by itself")
    s = jc_env.jobcage("show", str(job), "--json").json()
    assert s["pids_limit_hits"] > 0 and s["pids_max"] == PIDS_MAX, s
    assert proc_cgroups(script_pid)[""] == task_cg, "the task left Slurm's cgroup"

    # scancel: nothing of either identity is left, Slurm removes job_N, jobcage ends the job, the node is idle
    cluster.scancel(job)
    cluster.wait_state(job, "CANCELLED", timeout=300)
    wait_for(lambda: not job_dir.exists(), 300, "Slurm to remove job_N")
    wait_for(lambda: not any(alive(q) for q in (script_pid, daemon, payload_pid)), 60, "the job's processes gone")
    assert not pids_of_uid(pilot.uid) and not pids_of_uid(pool.uid)
    wait_for(lambda: jc_env.jobcage("show", str(job), "--json").json()["state"] == "ended", 300, "the job ended")
    assert cluster.wait_node_state({"idle", "drain", "drng", "down"}, timeout=300) == "idle", cluster.logs()
