"""The agent's views agree with each other and with the kernel (issue 9), through the real agent and CLIs,
with the BPF tracer on (and the proc connector where it applies):

- whois agrees with the trail: for every event ``jobtrace JOB --events --json`` prints (at its printed millisecond
  precision), ``whois --uid <event uid> --at <event ts>`` names the job, while it runs and after it ended -- also
  while someone polls ``show`` during the switches (the accounting then sees the pool uid before the batched
  setuid event is written: the demo's 3-in-4 failure);
- bad input to ``whois --at``: one clear line;
- the agent starts after a lost store with tracing on;
- per-identity CPU is a split of the cgroup's CPU (short and long jobs; CPU spent before adoption is not the
  job's); a reused batch id starts from zero;
- the epilogue's summary has the identities of the last poll window.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from jctest import (
    BOTH,
    JOBCAGE,
    PYTHON,
    SUDO,
    AgentProc,
    Helpers,
    Ids,
    JcEnv,
    cpu_sum_ok,
    epoch,
    fifo,
    idents,
    job_scratch,
    open_gate,
    pick,
    pid_file,
    prologue,
    script,
    show,
    trail,
    wait_events,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.bpf]


def whois_rows(env: JcEnv, uid: int, at: str) -> list[dict]:
    return env.jobcage("whois", "--uid", str(uid), "--at", at, "--json").ok().json()


def check_trail_agrees(env: JcEnv, agent: AgentProc, job: str, *, cli_all: bool = False) -> int:
    """Every event of the trail with a uid: whois at its printed ts names the job.  The agent's own method (what
    `jobcage whois` calls, with the same parsed time) for every (uid, ts); the CLI for each uid's earliest and
    latest event (the earliest is where first_seen matters), or for all with cli_all."""
    evs = trail(env, job)
    pairs = sorted({(e["uid"], e["ts"]) for e in evs if isinstance(e["uid"], int) and e["uid"] >= 0})
    assert pairs, evs
    bad = []
    for uid, ts in pairs:
        rows = agent.result("whois", uid=uid, at=epoch(ts))
        if job not in [r["job_id"] for r in rows]:
            bad.append((uid, ts, [e["kind"] for e in evs if e["uid"] == uid and e["ts"] == ts], rows))
    assert not bad, f"whois does not name {job} at these trail events: {bad}"
    by_uid: dict[int, list[str]] = {}
    for uid, ts in pairs:
        by_uid.setdefault(uid, []).append(ts)
    cli = pairs if cli_all else [(u, t) for u, tss in by_uid.items() for t in {tss[0], tss[-1]}]
    for uid, ts in cli:
        assert job in [r["job_id"] for r in whois_rows(env, uid, ts)], (uid, ts)
    return len(pairs)


class Poller:
    """Hammer `show` through the agent (what the demo does while its job starts): the accounting runs between
    the tracer's poll and the write of the batched events."""

    def __init__(self, agent: AgentProc, job: str) -> None:
        self.agent, self.job, self.n = agent, job, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.agent.call("show", job_id=self.job)
            self.n += 1

    def stop(self) -> int:
        self._stop.set()
        self._t.join(timeout=30)
        return self.n


@pytest.mark.parametrize("jc_env", BOTH, indirect=True)
def test_whois_names_the_job_at_every_trail_event(jc_env: JcEnv, agent_proc: AgentProc, ids: Ids,
                                                  sudoers: Callable[..., Path]) -> None:
    """A pilot switches to the pool uid through real sudo 6 times (plus forks, execs, a setsid daemon) while
    `show` is polled all along; for every event of the trail, whois at the printed ts names the job, while it runs
    and after the epilogue.  The pool identity's first_seen is the earliest trail event that shows the pool uid."""
    pilot, pool = ids.pilot, ids.pool
    sudoers(f"{pilot.name} ALL=({pool.name}) NOPASSWD: ALL")
    job = f"agree-{jc_env.subtree[-4:]}"
    prologue(jc_env, job, pilot)
    d = job_scratch(jc_env, job)
    end = fifo(d, "end")
    body = "".join(f"{SUDO} -n -u {pool.name} /bin/sh -c 'sleep 0.1; true'\n" for _ in range(6))
    poller = Poller(agent_proc, job)
    try:
        jc_env.start_job(job, f"( setsid sh -c 'sleep 0.2' & )\n{body}echo done > {d}/done\nread _ < {end}\n"
                              "exit 0", user=pilot, via_root=False)
        wait_for(lambda: (d / "done").exists(), 60, "the job's switches")
        wait_events(agent_proc, job, lambda evs: len(pick(evs, kind="setuid", uid=pool.uid, detail_ok=True)) >= 6,
                    "six switches in the trail")
    finally:
        polls = poller.stop()
    assert polls > 5, "show was not polled during the switches"
    n = check_trail_agrees(jc_env, agent_proc, job)
    first_pool = min(epoch(e["ts"]) for e in trail(jc_env, job) if e["uid"] == pool.uid)
    got = idents(show(jc_env, job))
    assert abs(epoch(got[pool.uid]["first_seen"]) - first_pool) < 0.0011, (got[pool.uid], first_pool)
    open_gate(end)
    jc_env.jobcage("epilogue", job).ok()
    assert check_trail_agrees(jc_env, agent_proc, job, cli_all=True) >= n
    print(f"\n{n} (uid, ts) pairs of the trail agree with whois; {polls} shows during the switches")


def test_whois_bad_input_one_line(jc_env: JcEnv, agent_proc: AgentProc, ids: Ids) -> None:
    """Malformed time: usage error (2); a time in the future, a uid no job ever held: exit 1; one line each."""
    prologue(jc_env, f"bad-{jc_env.subtree[-4:]}", ids.pilot)
    uid = str(ids.pilot.uid)
    for at in ("yesterday", "2026-13-45T99:00:00Z", "nan", "inf", ""):
        err = jc_env.jobcage("whois", "--uid", uid, "--at", at).clean_error(2)
        assert "--at" in err, err
    err = jc_env.jobcage("whois", "--uid", uid, "--at", "2999-01-01T00:00:00Z").clean_error(1, "future")
    assert "2999-01-01" in err
    never = 3_999_999_000
    jc_env.jobcage("whois", "--uid", str(never)).clean_error(1, "never seen")
    jc_env.jobcage("whois", "--uid", str(never), "--json").clean_error(1, "never seen")
    # a held uid at a time nobody held it is not bad input: no row (JSON []), one line without --json
    assert jc_env.jobcage("whois", "--uid", uid, "--at", "2001-01-01T00:00:00Z", "--json").ok().json() == []
    jc_env.jobcage("whois", "--uid", uid, "--at", "2001-01-01T00:00:00Z").clean_error(1, "no job held")


@pytest.mark.parametrize("jc_env", BOTH, indirect=True)
def test_agent_starts_after_lost_store_with_tracing(jc_env: JcEnv, agent_proc: AgentProc, ids: Ids,
                                                     sudoers: Callable[..., Path]) -> None:
    """Tracer on: run a job, stop the agent, move the state dir away, start it: it starts (it died with `job J
    is already traced`), re-registers the job from the kernel, traces it (a new switch lands in the trail and in
    whois) and ends it."""
    pilot, pool = ids.pilot, ids.pool
    sudoers(f"{pilot.name} ALL=({pool.name}) NOPASSWD: ALL")
    job = f"lost-{jc_env.subtree[-4:]}"
    prologue(jc_env, job, pilot)
    d = job_scratch(jc_env, job)
    gate, end = fifo(d, "gate"), fifo(d, "end")
    jc_env.start_job(job, f"echo $$ > {d}/pilot.pid\nread _ < {gate}\n{SUDO} -n -u {pool.name} /bin/true\n"
                          f"echo done > {d}/done\nread _ < {end}\nexit 0", user=pilot, via_root=False)
    pid_file(d / "pilot.pid")
    assert agent_proc.stop() == 0
    moved = jc_env.state_dir.with_name("state.lost")
    shutil.move(str(jc_env.state_dir), str(moved))
    try:
        agent_proc.start()
        for _ in range(2):   # and again: a second start over the new store registers nothing twice either
            assert agent_proc.alive, agent_proc.log()
            listed = {j["job_id"]: j for j in agent_proc.result("list")}
            assert listed[job]["owner_uid"] == pilot.uid, listed
            agent_proc.restart()
        open_gate(gate)
        wait_for(lambda: (d / "done").exists(), 60, "the switch after the restart")
        evs = wait_events(agent_proc, job, lambda evs: bool(pick(evs, kind="setuid", uid=pool.uid, detail_ok=True)),
                          "the new agent's trail of the switch")
        assert "already traced" not in agent_proc.log(400)
        check_trail_agrees(jc_env, agent_proc, job)
        assert pick(evs, kind="gap")
        open_gate(end)
        assert agent_proc.result("epilogue", job_id=job)["state"] == "ended"
        assert agent_proc.alive
    finally:
        shutil.rmtree(moved, ignore_errors=True)


@pytest.mark.parametrize("jc_env", BOTH, indirect=True)
def test_identity_cpu_is_a_split_of_the_cgroup(jc_env: JcEnv, agent_proc: AgentProc, ids: Ids,
                                               helpers: Helpers, sudoers: Callable[..., Path]) -> None:
    """Short job (`sh -c 'sudo -u pool sleep 300 & sleep 300'`, killed at once) and a long one (0.6 s of CPU
    burnt *before* `jobcage run` adopted it, then 0.4 s as the pilot and 0.4 s as the pool uid): the identities'
    CPU adds up to the cgroup's within max(1 %, 5 ms), in `show` and in the epilogue's summary; the CPU before
    adoption is not the job's (the pilot's share stays about half)."""
    pilot, pool = ids.pilot, ids.pool
    sudoers(f"{pilot.name} ALL=({pool.name}) NOPASSWD: ALL")
    short = f"cpus-{jc_env.subtree[-4:]}"
    prologue(jc_env, short, pilot)
    jc_env.start_job(short, f"{SUDO} -n -u {pool.name} /bin/sleep 300 & sleep 300", user=pilot, via_root=False)
    wait_for(lambda: any(i["uid"] == pool.uid for i in show(jc_env, short)["identities"]), 60, "the pool uid")
    s = show(jc_env, short)
    ok, why = cpu_sum_ok(s)
    assert ok, why
    summary = json.loads(jc_env.jobcage("epilogue", short, "--json").ok().out)
    ok, why = cpu_sum_ok(summary)
    assert ok, ("summary", why)

    long = f"cpul-{jc_env.subtree[-4:]}"
    prologue(jc_env, long, pilot)
    d = job_scratch(jc_env, long)
    # the starter burns 0.6 s of CPU outside the job, then execs `jobcage run` (exec keeps the task's runtime)
    starter = script(d, "starter.py", "import os, sys, time\nt = time.process_time()\n"
                     "while time.process_time() - t < 0.6: pass\nos.execv(sys.argv[1], sys.argv[1:])\n")
    body = (f"{PYTHON} {helpers.burn} 0.4\n{SUDO} -n -u {pool.name} {PYTHON} {helpers.burn} 0.4\n"
            f"echo done > {d}/done\nexit 0")
    p = jc_env.popen([PYTHON, str(starter), JOBCAGE, "run", long, "--", "/bin/sh", "-c", body], user=pilot)
    wait_for(lambda: (d / "done").exists(), 120, "the burners")
    assert p.wait(timeout=60) == 0
    s = show(jc_env, long)
    ok, why = cpu_sum_ok(s)
    got = {u: i["cpu_seconds"] for u, i in idents(s).items()}
    print(f"\nlong job: {why}; per identity {got}")
    assert ok, why
    assert s["cpu_seconds"] < 1.3, "the cgroup counted the CPU spent before adoption?"
    assert 0.35 <= got[pilot.uid] / s["cpu_seconds"] <= 0.65, got
    summary = json.loads(jc_env.jobcage("epilogue", long, "--json").ok().out)
    assert cpu_sum_ok(summary)[0], summary


@pytest.mark.parametrize("jc_env", BOTH, indirect=True)
def test_reused_batch_id_starts_from_zero(jc_env: JcEnv, agent_proc: AgentProc, ids: Ids,
                                          helpers: Helpers) -> None:
    """Run 1 of batch id J burns 1 s as the pilot and ends; run 2 of the same id runs /bin/true: its identities
    do not inherit run 1's CPU (they add up to run 2's own cgroup usage)."""
    pilot = ids.pilot
    job = f"reuse-{jc_env.subtree[-4:]}"
    for run, body in ((1, f"{PYTHON} {helpers.burn} 1.0"), (2, "/bin/true")):
        prologue(jc_env, job, pilot)
        p = jc_env.start_job(job, f"{body}; exit 0", user=pilot, via_root=False)
        assert p.wait(timeout=120) == 0
        time.sleep(0.3)   # let the exit records arrive (the check below is on the values, not on timing)
        summary = json.loads(jc_env.jobcage("epilogue", job, "--json").ok().out)
        ok, why = cpu_sum_ok(summary)
        print(f"\nrun {run}: {why}")
        assert ok, (run, why)
        if run == 1:
            assert summary["cpu_seconds"] >= 0.9
        else:
            assert summary["cpu_seconds"] < 0.5
            assert sum(i["cpu_seconds"] for i in summary["identities"]) < 0.5, summary


@pytest.mark.parametrize("jc_env", BOTH, indirect=True)
def test_epilogue_summary_has_last_window_identities(jc_env: JcEnv, agent_proc: AgentProc, ids: Ids,
                                                     sudoers: Callable[..., Path]) -> None:
    """A switch to the pool uid right before the epilogue (no wait for the agent's poll): the summary lists the
    pool identity, and the trail shows the switch."""
    pilot, pool = ids.pilot, ids.pool
    sudoers(f"{pilot.name} ALL=({pool.name}) NOPASSWD: ALL")
    for i in range(3):
        job = f"last-{i}-{jc_env.subtree[-4:]}"
        prologue(jc_env, job, pilot)
        d = job_scratch(jc_env, job)
        jc_env.start_job(job, f"{SUDO} -n -u {pool.name} /bin/sh -c 'echo $$ > {d}/pool.pid; exec sleep 300'",
                         user=pilot, via_root=False)
        pid_file(d / "pool.pid")
        summary = json.loads(jc_env.jobcage("epilogue", job, "--json").ok().out)
        assert pool.uid in idents(summary), summary["identities"]
        assert pick(trail(jc_env, job), kind="setuid", uid=pool.uid, detail_ok=True)
