"""agent.prune with real processes of real test users and a real cgroup standing in for a job.

Every find_strays call is restricted to the users created here (only_uids), and only their processes are killed.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from jctest import User, alive, move_to_cgroup, popen_as, proc_state, run_as, spawn_detached, wait_for

from jobcage.agent.errors import NoSuchCgroup
from jobcage.agent.prune import PF_KTHREAD, Stray, find_strays, kill_strays, pids_in_cgroup_tree

pytestmark = pytest.mark.root


def uids(*users: User) -> set[int]:
    return {u.uid for u in users}


def by_pid(strays: list[Stray]) -> dict[int, Stray]:
    return {s.pid: s for s in strays}


def test_stray_found_and_killed(user_procs: tuple[User, User], private_tree: str) -> None:
    a, b = user_procs
    pid = spawn_detached(a, "exec sleep 300", f"{private_tree}/a.pid")
    other = spawn_detached(b, "exec sleep 300", f"{private_tree}/b.pid")
    wait_for(lambda: proc_state(pid) is not None and "sleep" in open(f"/proc/{pid}/cmdline").read())

    strays = by_pid(find_strays(set(), only_uids=uids(a, b)))
    assert pid in strays and other in strays
    s = strays[pid]
    assert (s.uid, s.user, s.cmd) == (a.uid, a.name, "sleep 300")
    assert "in no job cgroup" in s.reason
    assert json.dumps(s.to_dict())  # JSON-ready, start_time as ISO 8601
    assert all(x.uid in uids(a, b) for x in strays.values())

    only_a = find_strays(set(), only_uids=uids(a))
    assert [x.pid for x in only_a] == [pid]
    killed, survivors = kill_strays(only_a, timeout=5)
    assert [k.pid for k in killed] == [pid] and survivors == []
    assert not alive(pid)
    assert alive(other)  # not asked for


def test_process_in_job_untouched(user_procs: tuple[User, User], private_tree: str,
                                  job_cgroup: str) -> None:
    a, _b = user_procs
    inside = spawn_detached(a, "exec sleep 300", f"{private_tree}/in.pid")
    move_to_cgroup(job_cgroup, inside)
    outside = spawn_detached(a, "exec sleep 300", f"{private_tree}/out.pid")
    in_jobs = functools.partial(pids_in_cgroup_tree, job_cgroup)
    assert inside in in_jobs()

    strays = find_strays(in_jobs, only_uids=uids(a))
    assert [s.pid for s in strays] == [outside]
    res = kill_strays(strays, timeout=5)
    assert [k.pid for k in res.killed] == [outside]
    assert not alive(outside)
    assert alive(inside) and proc_state(inside) == "S"  # neither killed nor left stopped


def test_child_forked_in_a_job_after_membership_was_read(user_procs: tuple[User, User],
                                                         private_tree: str, job_cgroup: str) -> None:
    """A stale pid set does not turn a job's newborn child into a stray."""
    a, _b = user_procs
    t = private_tree
    parent = spawn_detached(a, f"while [ ! -e {t}/go ]; do sleep 0.02; done; sleep 300 & echo $! > {t}/child; wait",
                            f"{t}/parent.pid")
    move_to_cgroup(job_cgroup, parent)
    stale = pids_in_cgroup_tree(job_cgroup)
    assert stale == {parent}
    open(f"{t}/go", "w").close()
    wait_for(lambda: os.path.exists(f"{t}/child") and os.path.getsize(f"{t}/child") > 0)
    with open(f"{t}/child") as f:
        child = int(f.read())
    assert child in pids_in_cgroup_tree(job_cgroup)
    assert find_strays(stale, only_uids=uids(a)) == []


def test_adopted_into_a_job_before_the_kill_is_spared(user_procs: tuple[User, User],
                                                      private_tree: str, job_cgroup: str) -> None:
    a, _b = user_procs
    pid = spawn_detached(a, "exec sleep 300", f"{private_tree}/p.pid")
    in_jobs = functools.partial(pids_in_cgroup_tree, job_cgroup)
    strays = find_strays(in_jobs, only_uids=uids(a))
    assert [s.pid for s in strays] == [pid]
    move_to_cgroup(job_cgroup, pid)  # e.g. `jobcage adopt` between the dry run and --kill
    res = kill_strays(strays, timeout=5)
    assert res.killed == [] and res.survivors == []
    assert [(s.pid, why) for s, why in res.skipped] == [(pid, "no longer a stray: in a job cgroup")]
    assert alive(pid) and proc_state(pid) == "S"


def test_failure_while_frozen_leaves_nothing_stopped(user_procs: tuple[User, User],
                                                     private_tree: str) -> None:
    a, _b = user_procs
    pid = spawn_detached(a, "exec sleep 300", f"{private_tree}/p.pid")
    calls = 0

    def in_jobs() -> set[int]:
        nonlocal calls
        calls += 1
        if calls == 3:  # find, first check, then the re-read while everything is stopped
            raise NoSuchCgroup("jobcage subtree vanished")
        return set()

    strays = find_strays(in_jobs, only_uids=uids(a))
    with pytest.raises(NoSuchCgroup):
        kill_strays(strays, timeout=5)
    assert calls == 3
    wait_for(lambda: proc_state(pid) == "S", what="the stray to be continued")


def start_sshd_like_session(user: User, tree: str) -> tuple[int, int, int]:
    """A root 'sshd: USER [priv]' monitor -> the user's 'sshd: USER@pts/0' -> a shell's child (sleep).

    The process titles are set with argv[0] (exec -a), as sshd does by rewriting its argv.
    Returns (monitor pid, session pid, leaf pid).
    """
    leaf_pidfile, session_pidfile = f"{tree}/leaf.pid", f"{tree}/session.pid"
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "U": str(user.uid), "G": str(user.gid),
        "T2": f"sshd: {user.name}@pts/0",
        "L2": 'exec -a "$T2" /bin/bash -c "$LEAF"',
        "LEAF": f"echo $$ > {session_pidfile}; sleep 300 & echo $! > {leaf_pidfile}; wait",
    }
    monitor = subprocess.Popen([f"sshd: {user.name} [priv]", "-c",
                                'setpriv --reuid="$U" --regid="$G" --clear-groups -- /bin/bash -c "$L2" & wait'],
                               executable="/bin/bash", env=env, start_new_session=True,
                               stdin=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(leaf_pidfile) and os.path.getsize(leaf_pidfile) > 0, what="sshd-like tree")
    with open(session_pidfile) as f:
        session = int(f.read())
    with open(leaf_pidfile) as f:
        leaf = int(f.read())
    return monitor.pid, session, leaf


def test_sshd_session_exempt(user_procs: tuple[User, User], private_tree: str) -> None:
    a, _b = user_procs
    monitor, session, leaf = start_sshd_like_session(a, private_tree)
    try:
        stray = spawn_detached(a, "exec sleep 300", f"{private_tree}/s.pid")
        found = by_pid(find_strays(set(), only_uids=uids(a)))
        assert stray in found
        assert session not in found and leaf not in found
        # Turned off, the same processes are strays.
        found = by_pid(find_strays(set(), only_uids=uids(a), exempt_sshd=False))
        assert {session, leaf, stray} <= set(found)
        assert monitor not in found  # root: never a stray anyway
    finally:
        subprocess.run(["kill", "-KILL", str(monitor)], check=False)


def test_forged_sshd_title_is_not_enough(user_procs: tuple[User, User], private_tree: str) -> None:
    """A user can retitle its own process 'sshd: x@pts/0'; without the root monitor above it, no exemption."""
    a, _b = user_procs
    leaf_pidfile = f"{private_tree}/forged-leaf.pid"
    script = f"""exec bash -c 'exec -a "sshd: {a.name}@pts/0" bash -c "sleep 300 & echo \\$! > {leaf_pidfile}; wait"'"""
    forged = spawn_detached(a, script, f"{private_tree}/forged.pid")
    wait_for(lambda: os.path.exists(leaf_pidfile) and os.path.getsize(leaf_pidfile) > 0)
    with open(leaf_pidfile) as f:
        leaf = int(f.read())
    found = by_pid(find_strays(set(), only_uids=uids(a)))
    assert found[forged].cmd.startswith(f"sshd: {a.name}@pts/0")
    assert {forged, leaf} <= set(found)
    lenient = by_pid(find_strays(set(), only_uids=uids(a), sshd_require_root=False))
    assert forged not in lenient and leaf not in lenient


AGENT_CHILD = textwrap.dedent("""
    import json, os, sys
    from jobcage.agent.prune import find_strays
    uid = int(sys.argv[1])
    print(json.dumps({"me": os.getpid(), "parent": os.getppid(),
                      "strays": [s.pid for s in find_strays(set(), only_uids={uid})]}))
""")


def test_agent_and_its_ancestors_exempt(user_procs: tuple[User, User], private_tree: str) -> None:
    """Run as the test user (so its own uid is in play): itself and the shell above it are never strays."""
    a, _b = user_procs
    stray = spawn_detached(a, "exec sleep 300", f"{private_tree}/s.pid")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = run_as(a, ["sh", "-c", f'"{sys.executable}" -c "$CODE" {a.uid}; exit $?'],
               env={"CODE": AGENT_CHILD, "PYTHONPATH": repo, "PYTHONDONTWRITEBYTECODE": "1",
                    "PATH": "/usr/bin:/bin"}, cwd="/", check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert stray in out["strays"]
    assert out["me"] not in out["strays"] and out["parent"] not in out["strays"]


def test_configured_exemptions(user_procs: tuple[User, User], private_tree: str) -> None:
    a, b = user_procs
    sleeper = spawn_detached(a, "exec sleep 300", f"{private_tree}/1.pid")
    looper = spawn_detached(a, "while :; do sleep 1; done", f"{private_tree}/2.pid")
    other = spawn_detached(b, "exec sleep 300", f"{private_tree}/3.pid")
    both = uids(a, b)
    assert {sleeper, looper, other} <= set(by_pid(find_strays(set(), only_uids=both)))
    assert not {sleeper, looper} & set(by_pid(find_strays(set(), only_uids=both, exempt_uids=[a.uid])))
    assert not {sleeper, looper} & set(by_pid(find_strays(set(), only_uids=both, exempt_users=[a.name])))
    found = by_pid(find_strays(set(), only_uids=both, exempt_commands=["sle?p"]))
    assert sleeper not in found and other not in found and looper in found
    assert sleeper not in by_pid(find_strays(set(), only_uids=both, exempt_pids=[sleeper]))
    assert not by_pid(find_strays(set(), only_uids=both, min_uid=max(a.uid, b.uid) + 1))


def kernel_threads() -> set[int]:
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rindex(b")") + 2:].split()[6]) & PF_KTHREAD:
                out.add(int(name))
    return out


def test_kernel_threads_never_considered() -> None:
    """Read-only: even with min_uid 0 over root's processes, no kernel thread is ever a stray."""
    kthreads = kernel_threads()
    assert 2 in kthreads
    # a root process of our own, so the set is not empty on a bare CI node where every other root
    # process is an ancestor of this test (and so exempt, like the agent's)
    own = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        found = {s.pid for s in find_strays(set(), min_uid=0, only_uids={0})}
    finally:
        own.kill()
        own.wait()
    assert found and not found & kthreads
    assert own.pid in found
    assert os.getpid() not in found and os.getppid() not in found  # the agent itself and its parent


def test_recycled_pid_is_not_signalled(user_procs: tuple[User, User], private_tree: str) -> None:
    a, _b = user_procs
    pid = spawn_detached(a, "exec sleep 300", f"{private_tree}/p.pid")
    [real] = find_strays(set(), only_uids=uids(a))
    impostor = Stray(pid=pid, ppid=real.ppid, uid=a.uid, user=a.name, cmd="sleep 300",
                     start_time=real.start_time - 100, reason="test", pgid=real.pgid,
                     start_ticks=real.start_ticks - 1)  # same pid, another (earlier) process
    res = kill_strays([impostor], timeout=2)
    assert res.killed == [] and [why for _s, why in res.skipped] == ["pid reused by another process"]
    assert alive(pid) and proc_state(pid) == "S"


def test_forking_process_group_frozen_and_killed(user_procs: tuple[User, User],
                                                 private_tree: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group that forks all the time: stopped as a whole, then killed, with the children born meanwhile."""
    a, _b = user_procs
    leader = spawn_detached(a, "while :; do sleep 30 & sleep 0.01; done", f"{private_tree}/g.pid")
    wait_for(lambda: len(find_strays(set(), only_uids=uids(a))) > 10, what="a busy process group")
    strays = find_strays(set(), only_uids=uids(a))
    assert {s.pgid for s in strays} == {leader}
    calls = []
    real_killpg = os.killpg

    def spy(pgid: int, sig: int) -> None:
        calls.append((pgid, sig))
        real_killpg(pgid, sig)

    monkeypatch.setattr(os, "killpg", spy)
    res = kill_strays(strays, timeout=10)
    assert calls == [(leader, signal.SIGSTOP)]  # the whole group stopped at once, though it kept growing
    assert res.survivors == []
    assert {s.pid for s in strays} - {s.pid for s in res.killed} <= {s.pid for s, _why in res.skipped}
    assert find_strays(set(), only_uids=uids(a)) == []  # nothing of the group is left running
    assert not alive(leader)


def test_timeout_reports_survivors(user_procs: tuple[User, User], private_tree: str) -> None:
    """No time to wait: what got SIGKILL but was not seen gone yet is reported, not silently dropped."""
    a, _b = user_procs
    pid = spawn_detached(a, "exec sleep 300", f"{private_tree}/p.pid")
    res = kill_strays(find_strays(set(), only_uids=uids(a)), timeout=0)
    assert [s.pid for s in res.killed + res.survivors] == [pid]
    wait_for(lambda: not alive(pid), what="the SIGKILL to land")


def test_pids_in_cgroup_tree(user_procs: tuple[User, User], job_cgroup: str) -> None:
    a, _b = user_procs
    assert pids_in_cgroup_tree(job_cgroup) == set()
    os.makedirs(f"{job_cgroup}/step0/task")
    p1 = popen_as(a, ["sleep", "300"])
    p2 = popen_as(a, ["sleep", "300"])
    try:
        move_to_cgroup(job_cgroup, p1.pid)
        move_to_cgroup(f"{job_cgroup}/step0/task", p2.pid)
        assert pids_in_cgroup_tree(job_cgroup) == {p1.pid, p2.pid}
        assert pids_in_cgroup_tree(f"{job_cgroup}/step0") == {p2.pid}
    finally:
        for p in (p1, p2):
            p.kill()
            p.wait()
    with pytest.raises(NoSuchCgroup):
        pids_in_cgroup_tree(f"{job_cgroup}/nope")
