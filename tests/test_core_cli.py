"""The command-line contract (design.md) as scripts outside the code rely on it: names, flags, exit codes and
the JSON keys of `show --json` / `list --json` / `epilogue --json`, through real `jobcage` subprocesses."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime

import pytest
from jctest import JOBCAGE, AgentProc, JcEnv, User, alive, read_int, wait_for

pytestmark = pytest.mark.root

SHOW_KEYS = {"job_id": str, "state": str, "owner_uid": int, "cgroup": str, "pids_current": int,
             "pids_max": (int, type(None)), "pids_limit_hits": (int, type(None)), "processes": int,
             "cpu_seconds": (int, float), "identities": list, "events_lost": int}
IDENTITY_KEYS = {"uid": int, "user": str, "first_seen": str, "last_seen": str, "via": (str, type(None)),
                 "cpu_seconds": (int, float)}
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")


def check_iso(ts: str) -> None:
    assert ISO_UTC.match(ts), f"not ISO 8601 UTC: {ts!r}"
    datetime.fromisoformat(ts.replace("Z", "+00:00"))


def check_show(s: dict) -> None:
    for key, typ in SHOW_KEYS.items():
        assert key in s, f"show --json lacks {key}: {s}"
        assert isinstance(s[key], typ) and not isinstance(s[key], bool), (key, s[key])
    assert s["state"] in ("running", "suspended", "ended")
    for ident in s["identities"]:
        for key, typ in IDENTITY_KEYS.items():
            assert key in ident and isinstance(ident[key], typ), (key, ident)
        check_iso(ident["first_seen"])
        check_iso(ident["last_seen"])


@pytest.fixture(params=["direct", "agent"])
def path(request: pytest.FixtureRequest, jc_env: JcEnv) -> AgentProc | None:
    if request.param == "agent":
        return request.getfixturevalue("agent_proc")
    return None


def test_show_json_contract(path: AgentProc | None, cgroup_mode: str, jc_env: JcEnv,
                            make_user: Callable[..., User]) -> None:
    user = make_user()
    jc_env.jobcage("prologue", "c1", "--uid", str(user.uid), "--pids-max", "100").ok()
    s = jc_env.jobcage("show", "c1", "--json").json()
    check_show(s)
    assert (s["job_id"], s["state"], s["owner_uid"], s["pids_max"], s["processes"], s["pids_limit_hits"]) == \
        ("c1", "running", user.uid, 100, 0, 0)
    assert s["cgroup"] == str(jc_env.member_dir("c1"))
    # a busy process: cpu_seconds must grow, processes/pids_current count it
    jc_env.start_job("c1", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; exec sleep 300", user=user)
    wait_for(lambda: jc_env.jobcage("show", "c1", "--json").json()["cpu_seconds"] > 0.05, 60, "cpu to be counted")
    s = jc_env.jobcage("show", "c1", "--json").json()
    check_show(s)
    assert s["processes"] == 1 and s["pids_current"] >= 1
    assert user.uid in {i["uid"] for i in s["identities"]}
    jc_env.jobcage("suspend", "c1").ok()
    assert jc_env.jobcage("show", "c1", "--json").json()["state"] == "suspended"
    listed = jc_env.jobcage("list", "--json").json()
    assert [(j["job_id"], j["state"], j["owner_uid"], j["processes"]) for j in listed] == \
        [("c1", "suspended", user.uid, 1)]
    summary = jc_env.jobcage("epilogue", "c1", "--json").json()   # kills a suspended job too
    check_show(summary)
    assert summary["state"] == "ended" and summary["cpu_seconds"] > 0.05 and summary["processes"] == 0
    s = jc_env.jobcage("show", "c1", "--json").json()
    check_show(s)
    assert s["state"] == "ended" and s["processes"] == 0
    assert jc_env.jobcage("list", "--json").json() == []
    assert [j["state"] for j in jc_env.jobcage("list", "--all", "--json").json()] == ["ended"]
    # epilogue is idempotent: a batch system may call it twice
    again = jc_env.jobcage("epilogue", "c1", "--json").json()
    assert again["state"] == "ended" and again["cpu_seconds"] == summary["cpu_seconds"]
    # and the id can be reused for a new job
    jc_env.jobcage("prologue", "c1", "--uid", str(user.uid)).ok()
    assert jc_env.jobcage("show", "c1", "--json").json()["state"] == "running"


def test_prologue_retry_and_conflict(jc_env: JcEnv, make_user: Callable[..., User]) -> None:
    a, b = make_user(), make_user()
    first = jc_env.jobcage("prologue", "p1", "--uid", str(a.uid), "--json").json()
    again = jc_env.jobcage("prologue", "p1", "--uid", str(a.uid), "--json").json()  # a retried prologue
    assert again["created"] == first["created"]
    jc_env.jobcage("prologue", "p1", "--uid", str(b.uid)).clean_error(1, "exists")
    assert jc_env.jobcage("show", "p1", "--json").json()["owner_uid"] == a.uid


def test_prologue_pid_and_adopt_default_parent(jc_env: JcEnv, make_user: Callable[..., User]) -> None:
    user = make_user()
    p = jc_env.popen(["sleep", "300"], user=user)
    wait_for(lambda: alive(p.pid), 10, "sleep to start")
    jc_env.jobcage("prologue", "pp", "--uid", str(user.uid), "--pid", str(p.pid)).ok()
    assert jc_env.in_job(p.pid, "pp")
    # adopt without --pid takes the caller's parent: the shell that runs it
    out = jc_env.scratch / "cg"
    jc_env.jobcage("prologue", "pq", "--uid", "0").ok()
    jc_env.run(["sh", "-c", f"{JOBCAGE} adopt pq && cat /proc/self/cgroup > {out}"]).ok()
    assert f"/{jc_env.subtree}/pq" in out.read_text()


def test_run_execs_the_command(jc_env: JcEnv) -> None:
    jc_env.jobcage("prologue", "r1", "--uid", "0").ok()
    out = jc_env.scratch / "where"
    r = jc_env.jobcage("run", "r1", "--", "sh", "-c", f"cat /proc/self/cgroup > {out}; exit 7")
    assert r.rc == 7, r                                  # exec'd: the command's own exit status
    assert f"/{jc_env.subtree}/r1" in out.read_text()
    r = jc_env.jobcage("run", "r1", "--", "/nonexistent/cmd")
    r.clean_error(127, "cannot execute")
    jc_env.jobcage("run", "nosuch", "--", "true").clean_error(1, "nosuch")


def test_kill_with_signal_and_default(jc_env: JcEnv, make_user: Callable[..., User]) -> None:
    """--signal TERM reaches every process and returns (the job may handle it); plain kill empties it."""
    user = make_user()
    f = jc_env.scratch / "terms"
    jc_env.jobcage("prologue", "k1", "--uid", str(user.uid)).ok()
    script = (f"trap 'echo 1 >> {f}' TERM; "
              f"sh -c \"trap 'echo 2 >> {f}' TERM; while :; do sleep 0.1; done\" & "
              "while :; do sleep 0.1; done")
    jc_env.start_job("k1", script, user=user)
    wait_for(lambda: len(jc_env.job_pids("k1")) >= 4, 30, "job processes to start")
    jc_env.jobcage("kill", "k1", "--signal", "TERM").ok()
    wait_for(lambda: f.exists() and sorted(f.read_text().split()) == ["1", "2"], 30, "both shells to trap TERM")
    assert jc_env.job_pids("k1"), "TERM was trapped: the job keeps running"
    jc_env.jobcage("kill", "k1", "--signal", "15").ok()
    wait_for(lambda: len(f.read_text().split()) == 4, 30, "a numeric signal too")
    jc_env.jobcage("kill", "k1").ok()
    assert jc_env.job_pids("k1") == []
    assert jc_env.jobcage("show", "k1", "--json").json()["state"] == "running"  # killed, not ended
    # an unknown signal is a usage error: exit 2, no traceback, and the job is untouched
    jc_env.jobcage("kill", "k1", "--signal", "NOSUCHSIG").clean_error(2, "signal")
    jc_env.jobcage("epilogue", "k1").ok()


def test_suspend_resume_idempotent(jc_env: JcEnv, make_user: Callable[..., User]) -> None:
    user = make_user()
    f = jc_env.scratch / "n"
    jc_env.jobcage("prologue", "s1", "--uid", str(user.uid)).ok()
    jc_env.start_job("s1", f"i=0; while :; do i=$((i+1)); echo $i > {f}; sleep 0.01; done", user=user)
    wait_for(lambda: (read_int(f) or 0) > 2, 30, "the counter to start")
    for _ in range(2):
        jc_env.jobcage("suspend", "s1").ok()
    assert jc_env.jobcage("show", "s1", "--json").json()["state"] == "suspended"
    for _ in range(2):
        jc_env.jobcage("resume", "s1").ok()
    v = read_int(f) or 0
    wait_for(lambda: (read_int(f) or 0) > v, 30, "the counter to go on")
    jc_env.jobcage("epilogue", "s1").ok()
