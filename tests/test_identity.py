"""Identity tracing end to end, through the real agent (``agent_proc``) and the real CLIs.

A pilot test user's job (``jobcage prologue`` as root, ``jobcage run JOB -- sh -c SCRIPT`` as the pilot, through
the agent) switches to a pool test user through real helpers: the setuid-root ``sutest`` (tests/jctest.py), real
``sudo -u`` (sudoers fixture) and ``setpriv`` (needs CAP_SETUID: run by a root-owned step inside the pilot's job,
like a batch system's privileged step launcher).  Checked from the outside only: ``jobcage show --json``,
``jobtrace JOB --events --json``, ``jobcage whois/declare/epilogue/doctor``, against pids the scripts write
themselves.  The module-level tracer/accounting tests (test_tracer.py, test_accounting.py) cover the tracer's own
corner cases; here it is the glue: store, identities, lineage, gap, events_lost, back-mapping, per-identity CPU.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from jctest import (
    BOTH,
    BPF,
    JOBCAGE,
    JOBTRACE,
    PROC,
    PYTHON,
    SETPRIV,
    SH,
    SUDO,
    AgentProc,
    Helpers,
    Ids,
    JcEnv,
    epoch,
    fifo,
    first,
    idents,
    job_scratch,
    kernel_has_kprobes,
    open_gate,
    pick,
    pid_file,
    prologue,
    script,
    show,
    trail,
    wait_events,
    wait_for,
    whois,
)

pytestmark = [pytest.mark.root, pytest.mark.bpf]

BURN_S = 1.5
DN = "/DC=org/CN=someone"

# Root inside the job, switching its *real* uid to the pool uid and back without forking (the saved uid 0 allows
# the way back): identity changes that need no fork, so they can happen while a fork bomb holds pids.max.
IDSWITCH_PY = r"""
import os, sys
pool, n = int(sys.argv[1]), int(sys.argv[2])
print(os.getpid(), flush=True)
sys.stdin.readline()
for _ in range(n):
    os.setresuid(pool, pool, 0)
    os.setresuid(0, 0, 0)
print("done", flush=True)
"""

# -- small helpers ------------------------------------------------------------------------------------------------

def read_line(p: subprocess.Popen, timeout: float) -> str:
    assert p.stdout is not None
    r, _, _ = select.select([p.stdout], [], [], timeout)
    if not r:
        pytest.fail(f"no output from {p.args} within {timeout:g}s", pytrace=False)
    return p.stdout.readline().strip()


# -- one job switching identity through one helper ------------------------------------------------------------------

@dataclass
class Switch:
    job: str
    dir: Path
    helper: str          # the helper binary as exec'd
    pilot_pid: int       # the pilot's shell (the job's first process)
    helper_pid: int      # the process that exec'd the helper
    payload_pid: int     # the payload shell, running as the pool uid
    step: subprocess.Popen | None = None   # setpriv: the root-owned step


def run_switch(env: JcEnv, agent: AgentProc, ids: Ids, h: Helpers, helper: str, job: str,
               sudoers: Callable[..., Path], payload_s: float = 0.5) -> Switch:
    """Start the pilot's job, switch to the pool uid through `helper`, wait until the payload is done and its
    events (the payload's exec and exit) are in the agent's trail."""
    pilot, pool = ids.pilot, ids.pool
    prologue(env, job, pilot)
    d = job_scratch(env, job)
    payload = script(d, "payload.sh", f"echo $$ > {d}/payload.pid\nsleep {payload_s}\n")
    end = fifo(d, "end")
    step = None
    if helper in ("sutest", "sudo"):
        if helper == "sudo":
            sudoers(f"{pilot.name} ALL=({pool.name}) NOPASSWD: ALL")
            cmd, helper_bin = f"{SUDO} -n -u {pool.name} {SH} {payload}", SUDO
        else:
            cmd, helper_bin = f"{h.sutest} {pool.uid} {pool.gid} {SH} {payload}", str(h.sutest)
        # `exit` at the end: sh must not exec its last command in place (the trail's parents would change)
        pilot_proc = env.start_job(job, f"echo $$ > {d}/pilot.pid\n{cmd} &\necho $! > {d}/helper.pid\nwait\n"
                                        f"read _ < {end}\nexit 0", user=pilot, via_root=False)
        pilot_pid, helper_pid = pid_file(d / "pilot.pid"), pid_file(d / "helper.pid")
        assert pilot_pid == pilot_proc.pid   # setpriv -> jobcage run -> sh: one process
    else:
        # setpriv needs CAP_SETUID: a root-owned step inside the pilot's job (a batch system's step launcher)
        helper_bin = SETPRIV
        env.start_job(job, f"echo $$ > {d}/pilot.pid\nread _ < {end}\nexit 0", user=pilot, via_root=False)
        pilot_pid = pid_file(d / "pilot.pid")
        step = env.popen([JOBCAGE, "run", job, "--", SETPRIV, f"--reuid={pool.uid}", f"--regid={pool.gid}",
                          "--clear-groups", "--", SH, str(payload)])
        helper_pid = step.pid   # jobcage run execs setpriv, setpriv execs the payload: one pid
    payload_pid = pid_file(d / "payload.pid")
    sw = Switch(job, d, helper_bin, pilot_pid, helper_pid, payload_pid, step)
    wait_events(agent, job, lambda evs: bool(pick(evs, kind="exit", pid=payload_pid)), "the payload's exit")
    open_gate(end)
    return sw


def exact(backend: str, sw: Switch) -> bool:
    """Whether the trail can be exact about the helper.  The proc connector's EXEC carries no file name and no
    credentials: the agent reads them from /proc when it gets to the event, and by then a helper that switches in
    place (sutest, setpriv) already runs the payload as the pool uid.  sudo stays, as a parent, while its child runs
    the payload."""
    return backend == "bpf" or sw.helper == SUDO


def check_switch_trail(evs: list[dict], sw: Switch, ids: Ids, backend: str) -> tuple[dict, dict, dict]:
    """exec of the helper -> setuid (old/new uid, ret) -> exec of the payload, with pids and parents."""
    pilot, pool = ids.pilot, ids.pool
    root_step = sw.helper == SETPRIV
    sure = exact(backend, sw)
    hx = first(evs, "helper exec", kind="exec", pid=sw.helper_pid)
    assert hx["ppid"] == (os.getpid() if root_step else sw.pilot_pid), hx
    if sure:
        assert hx["filename"] == sw.helper and hx["uid"] == (0 if root_step else pilot.uid), hx
        if not root_step:   # a setuid-root file: the effective uid after exec is root's
            assert hx["euid"] == 0 and hx["detail"].get("setuid_file") and hx["detail"]["file_uid"] == 0, hx

    sw_ev = first(evs, "identity change", kind="setuid", uid=pool.uid, detail_ok=True)
    d = sw_ev["detail"]
    assert d["ret"] == 0 and sw_ev["euid"] == pool.uid and sw_ev["pid"] == sw.payload_pid, sw_ev
    if sure:
        assert d["old_uid"] == (0 if root_step else pilot.uid) and d["via"] == sw.helper, sw_ev
    if backend == "bpf":
        assert d["syscall"] in ("setuid", "setreuid", "setresuid") and sw_ev["filename"] == sw.helper, sw_ev
    if sw.helper == SUDO:   # sudo switches in a child it forked
        assert sw_ev["ppid"] == sw.helper_pid and sw.payload_pid != sw.helper_pid, sw_ev
    else:                   # sutest / setpriv switch in place, then exec
        assert sw_ev["pid"] == sw.helper_pid and sw_ev["ppid"] == hx["ppid"], sw_ev
    assert hx["id"] <= sw_ev["id"] and epoch(hx["ts"]) <= epoch(sw_ev["ts"])

    later = [e for e in evs if e["id"] > sw_ev["id"]]
    px = first(later, "payload exec", kind="exec", pid=sw.payload_pid)
    assert px["filename"] in (SH, os.path.realpath(SH)), px   # proc: /proc/PID/exe, /bin/sh resolved
    assert px["uid"] == px["euid"] == pool.uid, px
    assert px["ppid"] == sw_ev["ppid"] and px["detail"]["orig_ppid"] == px["ppid"], px
    assert epoch(sw_ev["ts"]) <= epoch(px["ts"])
    ex = first(later, "payload exit", kind="exit", pid=sw.payload_pid)
    assert ex["uid"] == pool.uid and epoch(ex["ts"]) >= epoch(px["ts"]), ex
    return hx, sw_ev, px


@pytest.mark.parametrize("helper", ["sutest", "sudo", "setpriv"])
@pytest.mark.parametrize("jc_env", BOTH, indirect=True)
def test_switch_trail_and_identities(helper: str, jc_env: JcEnv, agent_proc: AgentProc, ids: Ids,
                                     helpers: Helpers, sudoers: Callable[..., Path]) -> None:
    """Through each helper: the audit trail (jobtrace --events --json) and the job's identities (show --json):
    the pool uid, through the helper, with ISO first/last seen times; whois maps it back to job and pilot."""
    backend = jc_env.doc["tracer"]["backend"]
    assert agent_proc.result("ping")["tracer"] == backend
    job = f"sw-{helper}-{secrets.token_hex(2)}"
    t0 = time.time()
    sw = run_switch(jc_env, agent_proc, ids, helpers, helper, job, sudoers)
    sure = exact(backend, sw)
    evs = trail(jc_env, job)
    assert all(e["job_id"] == job for e in evs)
    _hx, sw_ev, px = check_switch_trail(evs, sw, ids, backend)

    s = show(jc_env, job)
    assert s["state"] == "running" and s["owner_uid"] == ids.pilot.uid and s["events_lost"] == 0
    got = idents(s)
    # root ran the setpriv step inside the job; sudo sets its real uid to 0 for a moment (setresuid 0,0,0):
    # the trail shows it, so root is an identity (whois must agree with the trail)
    root = {0} if helper in ("setpriv", "sudo") else set()
    assert {ids.pilot.uid, ids.pool.uid} <= set(got) <= {ids.pilot.uid, ids.pool.uid} | root, got
    if sure:
        assert set(got) - {0} == {ids.pilot.uid, ids.pool.uid}, got
        assert (0 in got) == any(e["uid"] == 0 for e in evs), (got, "root is an identity iff the trail shows it")
    assert got[ids.pilot.uid]["via"] == "batch system"
    pool = got[ids.pool.uid]
    first_seen, last_seen = epoch(pool["first_seen"]), epoch(pool["last_seen"])
    assert pool["user"] == ids.pool.name
    assert pool["first_seen"].endswith("Z") and pool["last_seen"].endswith("Z")
    assert t0 - 1 <= epoch(s["created"]) <= first_seen <= last_seen <= time.time()
    assert last_seen >= epoch(px["ts"])
    rows = whois(jc_env, ids.pool.uid, epoch(px["ts"]) + 0.05)
    assert [(r["job_id"], r["pilot_uid"], r["pilot_user"]) for r in rows] == \
        [(job, ids.pilot.uid, ids.pilot.name)], rows
    if sure:
        assert pool["via"] == sw.helper, pool
        assert pool["first_seen"] == sw_ev["ts"], "first seen = the switch itself"
        assert rows[0]["via"] == sw.helper
    if sw.step is not None:
        assert sw.step.wait(timeout=30) == 0


# -- back-mapping and declarations ----------------------------------------------------------------------------------

@pytest.mark.parametrize("jc_env", BOTH, indirect=True)
def test_whois_declare_after_epilogue(jc_env: JcEnv, agent_proc: AgentProc, ids: Ids, helpers: Helpers) -> None:
    """whois --uid POOL --at <during the job> names the job and pilot uid, before and after epilogue, and not
    for a time before the switch; the owner declares a DN through the agent, a non-owner cannot."""
    pilot, pool, other = ids.pilot, ids.pool, ids.other
    job = f"who-{secrets.token_hex(2)}"
    t_before = time.time() - 0.5
    prologue(jc_env, job, pilot)
    d = job_scratch(jc_env, job)
    gate, end = fifo(d, "gate"), fifo(d, "end")
    payload = script(d, "payload.sh", f"echo $$ > {d}/payload.pid\nread _ < {end}\n")
    jc_env.start_job(job, f"echo $$ > {d}/pilot.pid\nread _ < {gate}\n"
                          f"{helpers.sutest} {pool.uid} {pool.gid} {SH} {payload}\nexit 0",
                     user=pilot, via_root=False)
    pid_file(d / "pilot.pid")
    time.sleep(0.05)
    t_pre = time.time()   # in the job, before the pool uid was taken
    time.sleep(0.05)
    open_gate(gate)
    payload_pid = pid_file(d / "payload.pid")
    wait_events(agent_proc, job, lambda evs: bool(pick(evs, kind="exec", pid=payload_pid)), "the payload's exec")
    t_mid = time.time()   # the pool uid runs the payload

    rows = whois(jc_env, pool.uid, t_mid)
    assert len(rows) == 1, rows
    r = rows[0]
    assert (r["job_id"], r["pilot_uid"], r["pilot_user"], r["uid"], r["user"]) == \
        (job, pilot.uid, pilot.name, pool.uid, pool.name), r
    assert r["job_end"] is None and r["declared"] == []
    if jc_env.doc["tracer"]["backend"] == "bpf":   # proc: see exact()
        assert r["via"] == str(helpers.sutest), r
    assert epoch(r["job_start"]) <= epoch(r["first_seen"]) <= t_mid
    assert whois(jc_env, pool.uid, t_pre) == [], "the pool uid was not held yet"
    assert whois(jc_env, pool.uid, t_before) == [], "before the job"
    assert whois(jc_env, pool.uid, f"{t_mid:.3f}")[0]["job_id"] == job   # epoch seconds work too
    assert whois(jc_env, pilot.uid, t_pre)[0]["job_id"] == job          # the pilot held its own uid all along

    # declare: the owner (through the agent, not root) may; others may not, the pool uid itself neither
    jc_env.jobcage("declare", job, "--uid", str(pool.uid), "--label", DN, user=pilot).ok()
    for u in (other, pool):
        jc_env.jobcage("declare", job, "--uid", str(pool.uid), "--label", "/CN=forged", user=u) \
            .clean_error(1, "not yours")
    jc_env.jobcage("declare", job, "--uid", str(pool.uid), "--label", "bad\nlabel", user=pilot).clean_error(1)
    assert whois(jc_env, pool.uid, t_mid)[0]["declared"] == [DN]
    s = show(jc_env, job, user=pilot)
    assert [(x["uid"], x["label"]) for x in s["declared"]] == [(pool.uid, DN)]
    dec = first(trail(jc_env, job), "declare", kind="declare")
    assert dec["uid"] == pool.uid and dec["detail"] == {"label": DN, "by_uid": pilot.uid}

    summary = json.loads(jc_env.jobcage("epilogue", job, "--json").ok().out)
    assert summary["state"] == "ended" and pool.uid in idents(summary)
    t_after = time.time() + 0.01
    rows = whois(jc_env, pool.uid, t_mid)
    assert [(x["job_id"], x["pilot_uid"], x["declared"], x["state"]) for x in rows] == \
        [(job, pilot.uid, [DN], "ended")], rows
    assert epoch(rows[0]["job_end"]) <= t_after
    assert whois(jc_env, pool.uid, t_after) == [], "nobody holds the pool uid after the job"
    assert whois(jc_env, pool.uid) == []
    # declaring into an ended job is refused
    jc_env.jobcage("declare", job, "--uid", str(pool.uid), "--label", DN, user=pilot).clean_error(1)


# -- per-identity CPU -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("jc_env", BOTH, indirect=True)
def test_cpu_per_identity(jc_env: JcEnv, agent_proc: AgentProc, ids: Ids, helpers: Helpers) -> None:
    """~1.5 s CPU as the pilot, ~1.5 s as the pool uid (through sutest): the identities' cpu_seconds add up to the
    job's cpu_seconds (the cgroup's own counter) of the same `show` within 2%, about half each."""
    pilot, pool = ids.pilot, ids.pool
    job = f"cpu-{secrets.token_hex(2)}"
    prologue(jc_env, job, pilot)
    d = job_scratch(jc_env, job)
    end = fifo(d, "end")
    jc_env.start_job(job, f"{PYTHON} {helpers.burn} {BURN_S}\n"
                          f"{helpers.sutest} {pool.uid} {pool.gid} {PYTHON} {helpers.burn} {BURN_S}\n"
                          f"echo done > {d}/done\nread _ < {end}\nexit 0", user=pilot, via_root=False)
    mid: list[dict] = []
    deadline = time.monotonic() + 120
    while not (d / "done").exists():
        assert time.monotonic() < deadline, "the burners did not finish"
        mid.append(agent_proc.result("show", job_id=job))   # live: /proc for running tasks + exit records
        time.sleep(0.5)
    time.sleep(0.2)
    s = show(jc_env, job)
    got = {u: i["cpu_seconds"] for u, i in idents(s).items()}
    total = sum(got.values())
    print(f"\nper identity {got}, sum {total:.3f}s, job {s['cpu_seconds']}s, ratio {total / s['cpu_seconds']:.4f}")
    assert abs(total - s["cpu_seconds"]) / s["cpu_seconds"] < 0.02, (got, s["cpu_seconds"])
    assert set(got) == {pilot.uid, pool.uid}, got
    for uid in (pilot.uid, pool.uid):
        assert got[uid] >= BURN_S * 0.98 and 0.4 < got[uid] / total < 0.6, got
    # mid-run answers (the pool burner alive) are consistent too, within a looser bound
    pool_live = [m for m in mid if idents(m).get(pool.uid, {}).get("cpu_seconds", 0) > 0.3 and m["processes"]]
    assert pool_live, "no mid-run show saw the pool uid burning"
    for m in mid:
        if m["cpu_seconds"] > 1.0:
            ssum = sum(i["cpu_seconds"] for i in m["identities"])
            assert abs(ssum - m["cpu_seconds"]) / m["cpu_seconds"] < 0.05, m
    open_gate(end)


# -- agent restart mid-job ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("jc_env", BOTH, indirect=True)
def test_agent_restart_records_gap(jc_env: JcEnv, agent_proc: AgentProc, ids: Ids, helpers: Helpers) -> None:
    """SIGTERM the agent while a pool-uid payload runs, start a new one: the trail gets a `gap` event spanning the
    downtime, the job keeps its identities, and the new agent traces the running job (a second switch, the exit of
    the process it found running)."""
    pilot, pool = ids.pilot, ids.pool
    job = f"gap-{secrets.token_hex(2)}"
    prologue(jc_env, job, pilot)
    d = job_scratch(jc_env, job)
    gate = fifo(d, "gate")
    long = script(d, "long.sh", f"echo $$ > {d}/long.pid\nexec sleep 300\n")
    short = script(d, "short.sh", f"echo $$ > {d}/short.pid\nsleep 0.3\n")
    sut = f"{helpers.sutest} {pool.uid} {pool.gid} {SH}"
    jc_env.start_job(job, f"{sut} {long} &\nread _ < {gate}\n{sut} {short}\nsleep 300\nexit 0",
                     user=pilot, via_root=False)
    long_pid = pid_file(d / "long.pid")
    wait_events(agent_proc, job, lambda evs: bool(pick(evs, kind="exec", pid=long_pid, filename="/usr/bin/sleep")
                                                  or pick(evs, kind="exec", pid=long_pid, comm="sleep")),
                "the long payload's exec")
    before = idents(show(jc_env, job))
    if jc_env.doc["tracer"]["backend"] == "bpf":   # proc: see exact()
        assert before[pool.uid]["via"] == str(helpers.sutest)

    t_stop = time.time()
    assert agent_proc.stop() == 0, agent_proc.log()
    t_stopped = time.time()
    time.sleep(1.5)            # the agent is down
    t_start = time.time()
    agent_proc.start()
    evs = wait_events(agent_proc, job, lambda evs: bool(pick(evs, kind="gap")), "the gap event", timeout=10)
    gaps = pick(evs, kind="gap")
    assert len(gaps) == 1, gaps
    g = gaps[0]["detail"]
    assert t_stop - 2 <= g["from"] <= t_stopped, (g, t_stop)   # its last heartbeat, written as it stopped
    assert t_start - 0.5 <= g["to"] <= time.time() and g["to"] - g["from"] >= 1.4, (g, t_start)
    assert g["reason"] == "agent not running"
    after = idents(show(jc_env, job))
    assert set(after) == set(before) == {pilot.uid, pool.uid}
    for uid in before:
        assert (after[uid]["first_seen"], after[uid]["via"]) == (before[uid]["first_seen"], before[uid]["via"])

    # the new agent follows the running job: a second switch, and the exit of the long payload it seeded
    open_gate(gate)
    short_pid = pid_file(d / "short.pid")
    os.kill(long_pid, 9)   # our test job's process (pool uid, in the job's cgroup)
    evs = wait_events(agent_proc, job, lambda evs: bool(pick(evs, kind="exit", pid=long_pid))
                      and bool(pick(evs, kind="exit", pid=short_pid)), "events after the restart")
    gap_id = pick(evs, kind="gap")[0]["id"]
    later = [e for e in evs if e["id"] > gap_id]
    sw2 = first(later, "switch after restart", kind="setuid", pid=short_pid, uid=pool.uid, detail_ok=True)
    assert sw2["ts"] >= t_start
    ex = first(later, "exit of the seeded payload", kind="exit", pid=long_pid)
    assert ex["uid"] == pool.uid
    final = idents(show(jc_env, job))
    assert epoch(final[pool.uid]["last_seen"]) >= t_start > epoch(final[pool.uid]["first_seen"])
    text = jc_env.run([JOBTRACE, job, "--events"]).ok().out
    assert "gap" in text


# -- fork bomb ------------------------------------------------------------------------------------------------------------

@pytest.mark.jc_config(BPF)
def test_fork_bomb_counts_not_flood(jc_env: JcEnv, agent_proc: AgentProc, ids: Ids, helpers: Helpers) -> None:
    """A fork bomb under pids.max 48 (set at prologue, before the bomb): the trail gets a few rate-limited
    fork_failed events carrying counts, not one event per fork; events_lost stays 0 and every identity switch made
    during the bomb (by a process that needs no fork) is recorded."""
    pilot, pool = ids.pilot, ids.pool
    job = f"bomb-{secrets.token_hex(2)}"
    assert prologue(jc_env, job, pilot, "--pids-max", "48")["pids_max"] == 48
    limits = jc_env.cgroup_dirs(job)
    pids_dir = limits.get("pids") or limits["unified"]
    assert int((pids_dir / "pids.max").read_text()) <= 64, "the limit must be in place before any bomb"
    d = job_scratch(jc_env, job)
    n = 1000
    idswitch = script(d, "idswitch.py", IDSWITCH_PY)
    sw = jc_env.popen([JOBCAGE, "run", job, "--", PYTHON, str(idswitch), str(pool.uid), str(n)],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert int(read_line(sw, 60)) == sw.pid
    bomb = jc_env.popen([JOBCAGE, "run", job, "--", str(helpers.forkbomb), "6"], user=pilot, stdin=subprocess.PIPE)
    wait_for(lambda: os.path.realpath(f"/proc/{bomb.pid}/exe") == str(helpers.forkbomb), 60, "the bomb in the job")
    assert jc_env.in_job(bomb.pid, job)
    assert bomb.stdin is not None and sw.stdin is not None
    bomb.stdin.write(b"x")
    bomb.stdin.close()

    def limit_hits() -> int:
        text = (pids_dir / "pids.events").read_text().split()
        return int(text[text.index("max") + 1])

    wait_for(lambda: limit_hits() > 100, 30, "the bomb to hit pids.max")
    t_bomb = time.time()
    sw.stdin.write("go\n")
    sw.stdin.flush()
    assert read_line(sw, 60) == "done"
    t_done = time.time()
    assert bomb.poll() is None and limit_hits() > 100, "the switches did not happen during the bomb"
    assert int((pids_dir / "pids.current").read_text()) <= 48
    assert bomb.wait(timeout=60) == 0
    wait_for(lambda: len(jc_env.job_pids(job)) == 0, 60, "the bomb to stop by itself")

    evs = wait_events(agent_proc, job, lambda evs: len(pick(evs, kind="setuid", pid=sw.pid)) >= 2 * n,
                      f"{2 * n} identity events", timeout=60)
    time.sleep(2.5)   # counters reach the store at the agent's reconcile (every second here)
    s = show(jc_env, job)
    evs = trail(jc_env, job)
    switches = pick(evs, kind="setuid", pid=sw.pid)
    assert len(switches) == 2 * n, f"identity events lost: {len(switches)} of {2 * n}"
    assert all(e["detail"]["ok"] and e["detail"]["syscall"] == "setresuid" for e in switches)
    assert [e["uid"] for e in switches[:4]] == [pool.uid, 0, pool.uid, 0]
    assert s["events_lost"] == 0 and s["pids_max"] == 48 and s["pids_limit_hits"] > 100, s
    pool_id = idents(s)[pool.uid]
    assert t_bomb - 0.01 <= epoch(pool_id["first_seen"]) <= t_done and pool_id["via"] == PYTHON, pool_id

    failed = pick(evs, kind="fork_failed")
    totals = [e["detail"]["fork_failed_total"] for e in failed]
    print(f"\nfork bomb: {limit_hits()} pids.max hits, {len(failed)} fork_failed events (totals {totals[:3]}.."
          f"{totals[-3:]}), {len(evs)} trail events, {len(switches)} identity events")
    assert 1 <= len(failed) <= 100, f"fork failures flooded the trail: {len(failed)} events"
    assert failed[0]["detail"]["errno"] == "EAGAIN" and failed[0]["uid"] == pilot.uid
    assert max(totals) >= 10 * len(failed), "fork_failed events carry counts"
    others = [e for e in evs if e["pid"] != sw.pid and e["kind"] != "fork_failed"]
    assert len(others) <= 20, f"the bomb flooded the trail: {len(others)} events"
    assert all(e["kind"] != "fork" for e in evs), "forks are counted, not sent"


@pytest.mark.jc_config(BPF)
def test_proc_backend_same_identities_and_doctor(jc_env: JcEnv, agent_proc: AgentProc, ids: Ids,
                                                 helpers: Helpers, sudoers: Callable[..., Path]) -> None:
    """The same sudo scenario under the BPF tracer, then (agent restarted with [tracer] backend = proc) under the
    proc-connector fallback: the same identities through the same helper; `jobcage doctor --json` names the
    backend the running agent uses and, under BPF, how it hooks the syscalls (kprobe where the kernel has
    kprobes, else tracepoint)."""
    got: dict[str, dict[int, str | None]] = {}
    for backend in ("bpf", "proc"):
        if backend == "proc":
            jc_env.write_config(PROC)
            agent_proc.restart()
        doc = jc_env.jobcage("doctor", "--json").json()
        assert doc["agent"]["running"] is True and doc["agent"]["tracer"] == backend, doc["agent"]
        assert doc["tracing"]["configured"] == backend and doc["tracing"]["will use"] == backend
        hooks = ("kprobe" if kernel_has_kprobes() else "tracepoint") if backend == "bpf" else None
        assert doc["agent"]["syscall_hooks"] == hooks, doc["agent"]
        assert doc["tracing"]["syscall hooks"].startswith(hooks or "-"), doc["tracing"]
        job = f"same-{backend}-{secrets.token_hex(2)}"
        sw = run_switch(jc_env, agent_proc, ids, helpers, "sudo", job, sudoers)
        check_switch_trail(trail(jc_env, job), sw, ids, backend)
        got[backend] = {u: i["via"] for u, i in idents(show(jc_env, job)).items()}
    # root too: sudo sets its real uid to 0 for a moment, and both backends' trails show it
    assert got["proc"] == got["bpf"] == {ids.pilot.uid: "batch system", ids.pool.uid: SUDO, 0: SUDO}, got
    agent_proc.stop()
    doc = jc_env.jobcage("doctor", "--json").json()
    assert doc["agent"]["running"] is False


def test_bad_syscall_hooks_value(jc_env: JcEnv) -> None:
    """A [tracer] syscall_hooks the agent does not know: one line naming the choices, exit 1."""
    jc_env.write_config({"tracer": {"syscall_hooks": "fentry"}})
    jc_env.jobcage("list").clean_error(1, contains="tracer.syscall_hooks must be one of auto, kprobe, tracepoint")


@pytest.mark.jc_config(BPF)
def test_events_lost_adds_up_across_agent_restarts(jc_env: JcEnv, agent_proc: AgentProc, execloop: Path) -> None:
    """Events the ring buffer could not take (the agent stopped with SIGSTOP while a job execs thousands of times)
    are counted in show's events_lost, and the count survives an agent restart: the next agent's losses add to
    it instead of replacing it."""
    job = f"lost-{secrets.token_hex(2)}"
    jc_env.jobcage("prologue", job, "--uid", "0").ok()   # root's own job: only the execs reach the ring buffer

    def flood(n: int) -> int:
        """n execs in the job while the agent is stopped; returns show's events_lost once it moved."""
        before = show(jc_env, job)["events_lost"]
        p = jc_env.popen([JOBCAGE, "run", job, "--", str(execloop), str(n)], stdin=subprocess.PIPE)
        wait_for(lambda: os.path.realpath(f"/proc/{p.pid}/exe") == str(execloop), 60, "execloop in the job")
        assert agent_proc.proc is not None and p.stdin is not None
        agent_proc.proc.send_signal(signal.SIGSTOP)
        try:
            p.stdin.write(b"x")
            p.stdin.close()
            assert p.wait(timeout=300) == 0
        finally:
            agent_proc.proc.send_signal(signal.SIGCONT)
        return wait_for(lambda: (x := show(jc_env, job)["events_lost"]) != before and x, 60, "events_lost to move")

    first_lost = flood(30_000)      # far more than the ring buffer holds (~11,000 events)
    agent_proc.restart()
    assert show(jc_env, job)["events_lost"] == first_lost, "kept over the restart"
    total = flood(15_000)
    print(f"\nevents lost: {first_lost} by the first agent, {total} in all after the second")
    assert total > first_lost, "the second agent's count replaced the first one's"


@pytest.mark.jc_config(BPF)
def test_cpu_of_exited_tasks_survives_node_exit_churn(jc_env: JcEnv, agent_proc: AgentProc, ids: Ids,
                                                      helpers: Helpers, execloop: Path) -> None:
    """Every exit on the node sends the agent a taskstats record; tens of thousands of exits outside any job (a
    busy node) with nobody asking `show` meanwhile must not cost the job the exit record of its pool-uid
    payload: the agent keeps the taskstats socket drained."""
    pilot, pool = ids.pilot, ids.pool
    job = f"churn-{secrets.token_hex(2)}"
    prologue(jc_env, job, pilot)
    d = job_scratch(jc_env, job)
    gate, end = fifo(d, "gate"), fifo(d, "end")
    jc_env.start_job(job, f"read _ < {gate}\n{helpers.sutest} {pool.uid} {pool.gid} {PYTHON} {helpers.burn} 1.0\n"
                          f"echo done > {d}/done\nread _ < {end}\nexit 0", user=pilot, via_root=False)
    churn = [jc_env.popen([str(execloop), "20000"], stdin=subprocess.PIPE) for _ in range(2)]   # in no job
    for c in churn:
        assert c.stdin is not None
        c.stdin.write(b"x")
        c.stdin.close()
    for c in churn:
        assert c.wait(timeout=600) == 0
    open_gate(gate)
    wait_for(lambda: (d / "done").exists(), 60, "the pool payload")
    s = show(jc_env, job)
    got = {u: i["cpu_seconds"] for u, i in idents(s).items()}
    print(f"\nafter 40,000 exits elsewhere: per identity {got}, job {s['cpu_seconds']}s")
    assert got.get(pool.uid, 0) >= 0.98, f"the pool payload's exit record was lost: {got}"
    assert set(got) == {pilot.uid, pool.uid}, got
    # absolute: the pilot's share includes `jobcage run`'s own CPU before it joined the job (~30 ms), which the
    # cgroup never saw; on a 1 s job that is already 3%
    assert abs(sum(got.values()) - s["cpu_seconds"]) < 0.06, (got, s["cpu_seconds"])
    assert "overrun" not in agent_proc.log(200)
    open_gate(end)
