"""Reads change nothing: `show`, `list`, `whois`, `events` and `jobtrace` leave the store and cgroupfs exactly as
they found them -- on a running job, on one frozen behind jobcage's back (a batch system's own freezer), and on
one whose cgroup vanished -- through the agent and on the direct path (agent stopped, root).  Only the
lifecycle's writers (the agent's reconcile, the epilogue) record what the kernel shows."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from jctest import JOBTRACE, AgentProc, JcEnv, User, freeze_directly, hierarchies, vanish, wait_for

from jobcage.agent.server import POLL_WAIT_S


def store_dump(env: JcEnv) -> dict[str, list[tuple]]:
    """Every row of every table of the node's store."""
    db = sqlite3.connect(f"file:{env.state_dir / 'jobcage.db'}?mode=ro", uri=True, timeout=30)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: sorted(map(repr, db.execute(f"SELECT * FROM {t}").fetchall())) for t in tables}  # type: ignore[misc]
    finally:
        db.close()


def cgroupfs_dump(env: JcEnv) -> dict[str, object]:
    """Every cgroup directory of the env's subtree in every hierarchy, with what a writer could change there: the
    content of each file the kernel lets root write (cgroup.procs, cgroup.freeze, pids.max, freezer.state, ...;
    not the PSI averages) and jobcage's trusted xattr."""
    out: dict[str, object] = {}
    for key, root in hierarchies().items():
        for d, _dirs, files in os.walk(root / env.subtree):
            rel = f"{key}:{os.path.relpath(d, root)}"
            state: dict[str, object] = {}
            for name in sorted(files):
                path = os.path.join(d, name)
                try:
                    # *.pressure: writable for triggers, but their text is a running average
                    if os.stat(path).st_mode & 0o200 and not name.endswith(".pressure"):
                        state[name] = Path(path).read_text()
                except OSError as e:
                    state[name] = f"unreadable: {e.errno}"
            try:
                state["xattr"] = os.getxattr(d, "trusted.jobcage.meta")
            except OSError:
                state["xattr"] = None
            out[rel] = state
    return out


def do_reads(env: JcEnv, job: str, user: User, agent_up: bool) -> dict[str, str]:
    """Every read a user or an admin makes, as root and (through the agent) as the job's owner."""
    outs = {}
    callers: list[User | None] = [None, user] if agent_up else [None]
    for who in callers:
        tag = "root" if who is None else "owner"
        for name, argv in (("show", ["show", job, "--json"]), ("show-text", ["show", job]),
                           ("list", ["list", "--json"]), ("list-all", ["list", "--all", "--json"]),
                           ("whois", ["whois", "--uid", str(user.uid), "--json"])):
            r = env.jobcage(*argv, user=who).ok()
            outs[f"{tag} {name}"] = r.out
        for name, argv in (("tree", [job]), ("tree-json", [job, "--json"]), ("events", [job, "--events", "--json"]),
                           ("all", [])):
            r = env.run([JOBTRACE, *argv], user=who).ok()
            outs[f"{tag} jobtrace {name}"] = r.out
    return outs


def settled(env: JcEnv) -> dict[str, list[tuple]]:
    """The store once the tracer's events of what the test just did are written (a writer, not a read): the
    same in two dumps more than one agent poll window apart (the loop took a turn in between)."""
    last: list[dict | None] = [None]

    def same() -> bool:   # wait_for asks at once, then every interval: the first answer only primes
        now = store_dump(env)
        ok, last[0] = now == last[0], now
        return ok

    wait_for(same, 30, "the store to settle", interval=1.5 * POLL_WAIT_S)
    assert last[0] is not None
    return last[0]


def assert_reads_change_nothing(env: JcEnv, job: str, user: User, agent_up: bool) -> dict[str, str]:
    store, cgfs = settled(env), cgroupfs_dump(env)
    outs = do_reads(env, job, user, agent_up)
    after = store_dump(env)
    assert after == store, ("a read changed the store", {t: (sorted(set(after[t]) - set(store[t])),
                                                           sorted(set(store[t]) - set(after[t])))
                                                       for t in after if after[t] != store.get(t)})
    now = cgroupfs_dump(env)
    assert now == cgfs, ("a read changed cgroupfs", {d: {k: (v, now[d].get(k)) for k, v in cgfs[d].items()  # type: ignore[attr-defined]
                                                         if now.get(d, {}).get(k) != v} for d in cgfs if now.get(d) != cgfs[d]})
    return outs


@pytest.mark.jc_config({"tracer": {"backend": "auto"}, "agent": {"reconcile_interval": 3600.0}})
@pytest.mark.parametrize("agent_up", [True, False], ids=["agent", "direct"])
def test_reads_change_nothing(jc_env: JcEnv, tmp_path: Path, make_user, agent_up: bool) -> None:
    user = make_user()
    agent = AgentProc(jc_env, tmp_path).start()   # reconcile only at start: no writer runs behind the reads
    try:
        jc_env.jobcage("prologue", "rd1", "--uid", str(user.uid)).ok()
        p = jc_env.start_job("rd1", "exec sleep 300", user)
        wait_for(lambda: p.pid in jc_env.job_pids("rd1") and _is_sleep(p.pid), 30, "the job's sleep")
        jc_env.jobcage("declare", "rd1", "--uid", str(user.uid), "--label", "/CN=reads").ok()
        if not agent_up:
            assert agent.stop() == 0

        # running
        outs = assert_reads_change_nothing(jc_env, "rd1", user, agent_up)
        show = jc_env.jobcage("show", "rd1", "--json").ok().json()
        assert show["state"] == "running" and show["processes"] == 1, show
        assert '"job_id": "rd1"' in outs["root list"]

        # frozen by someone else: shown suspended, recorded by nobody until a writer sees it
        freeze_directly(jc_env, "rd1", True)
        assert_reads_change_nothing(jc_env, "rd1", user, agent_up)
        assert jc_env.jobcage("show", "rd1", "--json").ok().json()["state"] == "suspended"
        freeze_directly(jc_env, "rd1", False)

        # vanished: shown ended, still running in the store until a writer (reconcile, epilogue) ends it
        vanish(jc_env, "rd1")
        p.wait(30)
        assert_reads_change_nothing(jc_env, "rd1", user, agent_up)
        show = jc_env.jobcage("show", "rd1", "--json").ok().json()
        assert show["state"] == "ended" and show["processes"] == 0, show
        assert "rd1" not in jc_env.jobcage("list", "--json").ok().json().__repr__()
        assert any("'running'" in r for r in store_dump(jc_env)["jobs"]), "a read ended the job"

        # the writers do record it: the epilogue ends the job
        summary = jc_env.jobcage("epilogue", "rd1", "--json").ok().json()
        assert summary["state"] == "ended"
        assert not any("'running'" in r for r in store_dump(jc_env)["jobs"])
    finally:
        agent.stop()


def _is_sleep(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
    except OSError:
        return False
