"""Attach mode on a pure-v2 systemd node (the guest: `make test-v2`): a job that systemd contains, the way
HTCondor >= 24.8 lays it out -- a `.scope` under a per-job `.slice` with the limits on the slice -- made with
`systemd-run --scope --slice=...`.  jobcage attaches to the slice and moves nothing: systemd's TasksMax holds a
fork bomb, systemd's memory limit still applies to the sudo payload (OOM-killed in the slice, seen in
memory.events), and jobcage traces, accounts, back-maps, suspends and kills the whole slice.

Marked ``v2guest``: deselected on other nodes (tests/conftest.py), listed in vagrant/v2guest/guest-tests.txt.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jctest import (
    JOBTRACE,
    PYTHON,
    SH,
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

pytestmark = [pytest.mark.v2guest, pytest.mark.root, pytest.mark.bpf,
              pytest.mark.jc_config({"tracer": {"backend": "bpf"}})]

CG = Path("/sys/fs/cgroup")
TASKS_MAX = 64


def sh(*argv: str, timeout: float = 300) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(argv)} -> {r.returncode}: {r.stdout}{r.stderr}"
    return r.stdout


@pytest.fixture
def slice_name() -> Iterator[str]:
    """A per-job slice of the test's own, stopped (and so removed by systemd, processes killed) at teardown."""
    require(Path("/run/systemd/system").is_dir() and shutil.which("systemd-run"), "systemd as PID 1 is needed")
    require(not (CG / "unified").exists() and (CG / "cgroup.controllers").exists(), "a pure cgroup v2 node")
    name = f"jctattach{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        subprocess.run(["systemctl", "stop", f"{name}.slice"], capture_output=True, timeout=300)


def test_systemd_scope_job_attached(jc_env: JcEnv, agent_proc: AgentProc, make_user: Callable[..., User],
                                    helpers: Helpers, sudoers: Callable[..., Path],
                                    slice_name: str) -> None:
    pilot, pool = make_user("jcav"), make_user("jcav")
    sudoers(f"{pilot.name} ALL=({pool.name}) NOPASSWD: ALL")
    job = f"scope-{secrets.token_hex(2)}"
    d = jc_env.scratch / job
    d.mkdir()
    d.chmod(0o1777)
    gates = {n: d / n for n in ("go", "bomb", "oom", "end")}
    for f in gates.values():
        os.mkfifo(f)
        f.chmod(0o666)
    payload = d / "payload.sh"
    # the pool identity burns some CPU, waits, then allocates past the slice's MemoryMax
    payload.write_text(f"echo $$ > {d}/payload.pid\n{PYTHON} {helpers.burn} 0.5\nread _ < {gates['oom']}\n"
                       f"exec {PYTHON} -c 'b = bytearray(400 << 20); print(len(b))'\n")
    payload.chmod(0o644)
    script = (f"echo $$ > {d}/pilot.pid\nread _ < {gates['go']}\n"
              f"setsid {SH} -c 'echo $$ > {d}/daemon.pid; while :; do echo t >> {d}/tick; sleep 0.2; done' "
              f"</dev/null >/dev/null 2>&1 &\n"
              f"{SUDO} -n -u {pool.name} {SH} {payload} > /dev/null 2>&1 &\n"
              f"read _ < {gates['bomb']}\n{helpers.forkbomb} 3 < /dev/zero\necho done > {d}/bomb.done\n"
              f"wait\nread _ < {gates['end']}\nexit 0\n")
    scope = f"{slice_name}-job.scope"
    slice_dir = CG / f"{slice_name}.slice"
    # the batch system's limits, on the slice (HTCondor's layout), before the job starts
    run = jc_env.popen(["systemd-run", "--scope", f"--slice={slice_name}.slice", f"--unit={scope}",
                        "-p", "OOMPolicy=continue", *pilot.argv([SH, "-c", script])], env=pilot.env(jc_env.env))
    pilot_pid = pid_file(d / "pilot.pid", 300)
    assert proc_cgroups(pilot_pid)[""] == f"/{slice_name}.slice/{scope}"
    sh("systemctl", "set-property", "--runtime", f"{slice_name}.slice", "MemoryMax=96M", "MemorySwapMax=0",
       f"TasksMax={TASKS_MAX}")
    wait_for(lambda: (slice_dir / "pids.max").read_text().strip() == str(TASKS_MAX), 60, "TasksMax on the slice")

    # the batch system's root helper attaches the job to its slice
    s = jc_env.jobcage("prologue", job, "--uid", str(pilot.uid), "--cgroup", str(slice_dir), "--json",
                       timeout=300).json()
    assert (s["mode"], s["cgroup"], s["processes"]) == ("attach", str(slice_dir), 1), s
    assert s["pids_max"] == TASKS_MAX, "the slice's TasksMax, read"
    open_gate(gates["go"], 120)
    daemon, payload_pid = pid_file(d / "daemon.pid", 300), pid_file(d / "payload.pid", 300)
    p = proc(payload_pid)
    assert p is not None and p.uid == pool.uid

    # suspend / resume the whole slice
    wait_for(lambda: ticks(d / "tick") > 2, 120, "the daemon ticking")
    jc_env.jobcage("suspend", job, timeout=300).ok()
    assert keyed(slice_dir / "cgroup.events")["frozen"] == "1"
    n0 = ticks(d / "tick")
    time.sleep(2.0)
    assert ticks(d / "tick") == n0, "the setsid daemon ran while suspended"
    jc_env.jobcage("resume", job, timeout=300).ok()
    assert keyed(slice_dir / "cgroup.events")["frozen"] == "0"
    wait_for(lambda: ticks(d / "tick") > n0 + 2, 120, "the daemon to tick after resume")
    for pid in (pilot_pid, daemon, payload_pid):
        assert proc_cgroups(pid)[""] == f"/{slice_name}.slice/{scope}", "jobcage moved a process"

    # trail, identities, per-identity CPU, back-mapping
    def trail() -> list[dict]:
        out = jc_env.run([JOBTRACE, job, "--events", "--json"], timeout=300).ok().out
        return [json.loads(x) for x in out.splitlines() if x.strip()]

    def burned() -> dict | None:
        s = jc_env.jobcage("show", job, "--json", timeout=300).json()
        got = {i["uid"]: i for i in s["identities"]}
        return s if pool.uid in got and got[pool.uid]["cpu_seconds"] >= 0.3 else None

    s = wait_for(burned, 300, "the pool identity's CPU (it burns 0.5 s)")
    got = {i["uid"]: i for i in s["identities"]}
    assert set(got) - {0} == {pilot.uid, pool.uid} and got[pool.uid]["via"] == SUDO, got   # 0: sudo itself
    assert sum(i["cpu_seconds"] for i in got.values()) <= s["cpu_seconds"] * 1.25 + 0.5, (got, s["cpu_seconds"])
    evs = trail()
    assert any(e["kind"] == "setuid" and e["uid"] == pool.uid and e["detail"].get("via") == SUDO
               for e in evs), evs
    assert any(e["kind"] == "setsid" and e["pid"] == daemon for e in evs), evs
    rows = jc_env.jobcage("whois", "--uid", str(pool.uid), "--json", timeout=300).json()
    assert [(r["job_id"], r["pilot_uid"]) for r in rows] == [(job, pilot.uid)], rows

    # a fork bomb under systemd's TasksMax: held, counted
    open_gate(gates["bomb"], 120)
    wait_for(lambda: (d / "bomb.done").exists(), 300, "the fork bomb to stop by itself")
    s = jc_env.jobcage("show", job, "--json", timeout=300).json()
    assert s["pids_limit_hits"] > 0 and s["pids_max"] == TASKS_MAX, s

    # the sudo payload allocates past the slice's MemoryMax: OOM-killed in systemd's cgroup
    open_gate(gates["oom"], 120)
    wait_for(lambda: int(keyed(slice_dir / "memory.events")["oom_kill"]) >= 1, 300, "the OOM kill in the slice")
    wait_for(lambda: not alive(payload_pid), 60, "the payload to die")
    assert any(e["kind"] == "exec" and e["pid"] == payload_pid and e["uid"] == pool.uid for e in trail())

    # the batch system ends the job: nothing is left, the slice goes, the agent ends the job, the epilogue works
    sh("systemctl", "stop", f"{slice_name}.slice")
    run.wait(timeout=120)
    wait_for(lambda: not slice_dir.exists(), 120, "systemd to remove the slice")
    assert not any(alive(q) for q in (pilot_pid, daemon))
    assert not pids_of_uid(pilot.uid) and not pids_of_uid(pool.uid)
    s = wait_for(lambda: (x := jc_env.jobcage("show", job, "--json").json())["state"] == "ended" and x, 120,
                 "reconcile to end the job")
    assert s["mode"] == "attach" and {i["uid"] for i in s["identities"]} - {0} == {pilot.uid, pool.uid}
    summary = jc_env.jobcage("epilogue", job, "--json", timeout=300).json()
    assert summary["state"] == "ended"
