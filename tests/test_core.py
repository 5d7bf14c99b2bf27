"""Containment: escape attempts stay in the job and die with it; fork bombs are held and counted; suspend
freezes every process; kill empties a job even under a live fork storm.  Real kernel, real users, both
drivers this node can run (``cgroup_mode``: hybrid = cgroup2 membership/freeze/kill + v1 pids; v1 =
freezer/pids/cpuacct), driven through the real `jobcage` CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from jctest import (
    AgentProc,
    JcEnv,
    User,
    alive,
    pids_of_uid,
    proc,
    read_int,
    require,
    wait_for,
)

pytestmark = pytest.mark.root

SLEEP = "exec sleep 300"  # the long-lived body of every escaped process


def pid_file_cmd(path: Path) -> str:
    """sh snippet: record our pid where the test (and other users) can read it, then live on."""
    return f"echo $$ > {path}; {SLEEP}"


def escape_script(kind: str, f: Path, other: User | None) -> str:
    """Each script starts one escaping process that writes its pid to f, then the launcher exits, so the
    escapee is orphaned (reparented to init) and only the cgroup still ties it to the job."""
    body = shlex.quote(pid_file_cmd(f))
    return {
        # fork, the child forks again and exits: the grandchild is reparented
        "double_fork": f"( sh -c {body} & ); exit 0",
        # a new session: out of the launcher's session and process group
        "setsid": f"setsid -f sh -c {body}; exit 0",
        # ignores SIGHUP, meant to outlive its parent
        "nohup": f"nohup sh -c {body} >/dev/null 2>&1 & exit 0",
        # daemon(3) by the book: fork, setsid, fork, chdir /, close fds
        "daemon": ("/usr/bin/python3 -I -c '"
                   "import os\n"
                   "if os.fork(): os._exit(0)\n"
                   "os.setsid()\n"
                   "if os.fork(): os._exit(0)\n"
                   "os.chdir(\"/\"); os.closerange(0, 1024)\n"
                   f"os.execvp(\"sh\", [\"sh\", \"-c\", {json.dumps(pid_file_cmd(f))}])"
                   "'; exit 0"),
        # a plain background child whose parent exits: reparented to init
        "reparent": f"sh -c {body} & exit 0",
        # a real setuid-root helper switching to another uid (runs as the job owner)
        "sudo": (f"sudo -n -u {other.name if other else '?'} sh -c {body} </dev/null >/dev/null 2>&1 & "
                 "exit 0"),
        # a root part of the job (think slurmstepd) dropping to another uid with setpriv --reuid
        "setpriv": (f"setpriv --reuid={other.uid if other else 0} --regid={other.gid if other else 0} "
                    f"--clear-groups sh -c {body} & exit 0"),
    }[kind]


def assert_job_emptied(env: JcEnv, job_id: str, procs: dict[int, int], uids: list[int]) -> None:
    """After a kill: no process of the job (by (pid, starttime)), no live process of its test users, an
    empty cgroup in every hierarchy of the mode."""
    survivors = [pid for pid, st in procs.items() if alive(pid, st)]
    assert not survivors, f"survived the kill: {[proc(p) for p in survivors]}"
    for d in env.cgroup_dirs(job_id).values():
        left = [p for p in map(int, (d / "cgroup.procs").read_text().split()) if alive(p)]
        assert not left, f"{d} still holds {[proc(p) for p in left]}"
    for uid in uids:
        # a process in do_exit may still show for an instant: bounded grace, not a sleep
        wait_for(lambda u=uid: not pids_of_uid(u), 30, f"no process of uid {uid} left")


def snapshot(env: JcEnv, job_id: str) -> dict[int, int]:
    """{pid: starttime} of the job's members: identifies them even if a pid is reused later."""
    out = {}
    for pid in env.job_pids(job_id):
        p = proc(pid)
        if p is not None:
            out[pid] = p.starttime
    return out


ESCAPES = ["double_fork", "setsid", "nohup", "daemon", "reparent", "sudo", "setpriv"]


@pytest.mark.parametrize("kind", ESCAPES)
def test_escape_stays_in_job_and_dies(kind: str, cgroup_mode: str, jc_env: JcEnv,
                                      make_user: Callable[..., User], sudoers: Callable[..., Path]) -> None:
    owner = make_user()
    other = make_user() if kind in ("sudo", "setpriv") else None
    if kind == "sudo":
        assert other is not None
        sudoers(f"{owner.name} ALL=({other.name}) NOPASSWD: ALL")
    job = "esc-" + kind
    f = jc_env.scratch / "escapee.pid"
    jc_env.jobcage("prologue", job, "--uid", str(owner.uid), "--pids-max", "64").ok()
    # setpriv's job starts as root (it needs CAP_SETUID); every other one as the job owner
    launcher = jc_env.start_job(job, escape_script(kind, f, other), user=None if kind == "setpriv" else owner)
    assert launcher.wait(timeout=60) == 0, "the launcher script failed"
    pid = wait_for(lambda: (p := read_int(f)) and alive(p) and p, 30, f"the {kind} escapee to start")
    p = proc(pid)
    assert p is not None
    # the launcher is gone: the escapee is reparented outside the job, yet the cgroup holds it
    assert p.ppid != launcher.pid
    assert jc_env.in_job(pid, job), f"{kind} escaped the job: {proc(pid)} cgroups {Path(f'/proc/{pid}/cgroup').read_text()}"
    if kind in ("setsid", "daemon"):  # left the launcher's session (Popen made the launcher a leader)
        assert p.sid != launcher.pid and (kind == "daemon" or p.sid == pid), f"expected a new session: {p}"
    if kind == "nohup":
        assert p.sigign & 1, "nohup should ignore SIGHUP"
    if kind in ("double_fork", "reparent", "daemon"):
        assert p.ppid not in jc_env.job_pids(job), "expected a reparented process"
    if other is not None:
        assert p.uid == other.uid and p.euid == other.uid, f"expected uid {other.uid}: {p}"
    members = snapshot(jc_env, job)
    assert pid in members
    shown = jc_env.jobcage("show", job, "--json").json()
    in_cgroup = jc_env.job_pids(job)
    assert shown["processes"] == len(in_cgroup) >= 1, (shown, in_cgroup)
    # everything in the job, whatever its uid, session or parent, dies with it
    jc_env.jobcage("kill", job).ok()
    assert_job_emptied(jc_env, job, members, [owner.uid] + ([other.uid] if other else []))
    assert jc_env.jobcage("show", job, "--json").json()["processes"] == 0
    jc_env.jobcage("epilogue", job).ok()
    assert not any(d.exists() for d in jc_env.cgroup_dirs(job).values()), "epilogue left the cgroup"


def bomb(env: JcEnv) -> str:
    """The classic bash fork bomb, in a file (a function definition does not survive `sh -c` quoting well)."""
    path = env.scratch / "bomb.sh"
    path.write_text(":(){ :|:& };:\n")
    path.chmod(0o755)
    return f"exec bash {path} 2>/dev/null"


def pids_dir(env: JcEnv, job: str) -> Path:
    return env.pids_dir(job)


def test_fork_bomb_held_and_counted(cgroup_mode: str, jc_env: JcEnv, make_user: Callable[..., User],
                                    agent_proc: AgentProc) -> None:
    user = make_user()
    job = "bomb"
    jc_env.jobcage("prologue", job, "--uid", str(user.uid), "--pids-max", "64").ok()
    assert (pids_dir(jc_env, job) / "pids.max").read_text().strip() == "64"  # the limit is set before the bomb
    # the user starts it through the agent: in the job from its first instruction
    starter = jc_env.start_job(job, bomb(jc_env), user=user, shell="/bin/sh", via_root=False)

    def hit() -> bool:
        # `jobcage run` execs bash, which leaves once the bomb is under way; a failed start and an empty job
        # mean the bomb never ran in it: say so instead of waiting out the deadline
        rc = starter.poll()
        if rc not in (None, 0) and int((pids_dir(jc_env, job) / "pids.current").read_text()) == 0:
            pytest.fail(f"jobcage run exited {rc} and the job is empty: the bomb never started", pytrace=False)
        return jc_env.jobcage("show", job, "--json").json()["pids_limit_hits"] > 0

    # generous: on a slow (emulated) node each `show` takes seconds while the bomb competes for the CPUs
    try:
        wait_for(hit, 300, "the bomb to hit pids.max")
    except pytest.fail.Exception:
        d = pids_dir(jc_env, job)
        print(f"starter rc {starter.poll()}; pids.current {(d / 'pids.current').read_text().strip()}; "
              f"pids.events {(d / 'pids.events').read_text().split()}; user's pids {pids_of_uid(user.uid)}")
        raise
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # held: never above the limit, nothing of the user outside the job
        assert int((pids_dir(jc_env, job) / "pids.current").read_text()) <= 64
        outside = [p for p in pids_of_uid(user.uid) if not jc_env.in_job(p, job) and alive(p)]
        if outside:   # a bomb process in the middle of its exit has left its cgroup before it turns zombie
            time.sleep(0.1)
            outside = [p for p in outside if not jc_env.in_job(p, job) and alive(p)]
        assert not outside, f"bomb processes outside the job: {[proc(p) for p in outside]}"
        time.sleep(0.1)
    s = jc_env.jobcage("show", job, "--json").json()
    assert s["pids_max"] == 64 and 0 < s["pids_current"] <= 64 and s["pids_limit_hits"] > 0, s
    assert jc_env.jobcage("show", job, "--json", user=user).json()["pids_limit_hits"] > 0  # owner may read
    members = snapshot(jc_env, job)
    jc_env.jobcage("kill", job).ok()
    assert_job_emptied(jc_env, job, members, [user.uid])
    summary = jc_env.jobcage("epilogue", job, "--json").json()
    assert summary["state"] == "ended" and summary["pids_limit_hits"] > 0, summary


COUNTER = """\
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
i = 0
while True:
    i += 1
    os.pwrite(fd, b"%012d\\n" % i, 0)
    time.sleep(0.005)
"""


def test_suspend_freezes_every_process(cgroup_mode: str, jc_env: JcEnv, make_user: Callable[..., User]) -> None:
    owner, other = make_user(), make_user()
    counter = jc_env.scratch / "counter.py"
    counter.write_text(COUNTER)
    c = [jc_env.scratch / f"c{i}" for i in range(3)]
    py = "/usr/bin/python3 -I " + str(counter)

    def as_(u: User) -> str:
        return f"setpriv --reuid={u.uid} --regid={u.gid} --clear-groups"

    # three counters under two uids, one a setsid daemon, plus a loop that forks all the time
    script = (f"{as_(owner)} {py} {c[0]} & {as_(owner)} setsid -f {py} {c[1]}; {as_(other)} {py} {c[2]} & "
              f"{as_(owner)} sh -c 'while :; do sleep 0.02; done' & wait")
    job = "frz"
    jc_env.jobcage("prologue", job, "--uid", str(owner.uid)).ok()
    jc_env.start_job(job, script)

    def values() -> list[int | None]:
        return [read_int(x) for x in c]

    def advancing(timeout: float) -> None:
        first = wait_for(lambda: all(values()) and values(), timeout, "all counters to start")
        wait_for(lambda: all(v is not None and v > f for v, f in zip(values(), first, strict=True)),
                 timeout, f"every counter to advance past {first}")

    advancing(30)
    for _ in range(2):  # twice: a resumed job must be suspendable again
        jc_env.jobcage("suspend", job).ok()  # returns only once the kernel confirms
        assert jc_env.jobcage("show", job, "--json").json()["state"] == "suspended"
        frozen_vals, frozen_pids = values(), sorted(jc_env.job_pids(job))
        time.sleep(1.0)
        assert values() == frozen_vals, "a counter advanced while suspended"
        assert sorted(jc_env.job_pids(job)) == frozen_pids, "a process forked or exited while suspended"
        jc_env.jobcage("resume", job).ok()
        assert jc_env.jobcage("show", job, "--json").json()["state"] == "running"
        advancing(30)
    # a suspended job can be killed outright
    jc_env.jobcage("suspend", job).ok()
    members = snapshot(jc_env, job)
    jc_env.jobcage("kill", job).ok()
    assert_job_emptied(jc_env, job, members, [owner.uid, other.uid])
    jc_env.jobcage("epilogue", job).ok()


# 20 on the host; the pure-v2 guest (everything 10-20x slower, one trial ~35 s) runs 8 to fit its time
# budget: half of them at the pids limit, like here
TRIALS = 8 if os.environ.get("JOBCAGE_V2_GUEST") == "1" else 20


def test_kill_under_fork_storm_leaves_nothing(cgroup_mode: str, jc_env: JcEnv,
                                              make_user: Callable[..., User]) -> None:
    require(Path("/bin/bash").exists(), "bash is needed for the fork storm")
    user = make_user()
    script = bomb(jc_env)
    sizes = []
    for i in range(TRIALS):
        job = f"storm{i}"
        jc_env.jobcage("prologue", job, "--uid", str(user.uid), "--pids-max", "128").ok()
        jc_env.start_job(job, script, user=user)
        # a live storm: processes forking and exiting, some forks refused at the limit
        wait_for(lambda j=job: len(jc_env.job_pids(j)) >= 32, 300, f"trial {i}: the storm to grow")
        if i % 2:  # every other trial: kill it while forks are being refused at the limit
            events = pids_dir(jc_env, job) / "pids.events"
            wait_for(lambda ev=events: int(ev.read_text().split()[1]) > 0, 300, f"trial {i}: the storm to hit pids.max")
        members = snapshot(jc_env, job)
        sizes.append(len(members))
        # the CLI competes for the CPUs with up to 128 bomb processes: on a slow node it takes its time
        r = jc_env.jobcage("kill", job, timeout=600)
        assert r.rc == 0, f"trial {i}: kill failed: {r.err}"
        assert_job_emptied(jc_env, job, members, [user.uid])
        jc_env.jobcage("epilogue", job).ok()
        assert not any(d.exists() for d in jc_env.cgroup_dirs(job).values())
    assert len(sizes) == TRIALS


FORKER = """\
import os, sys, time
while True:            # fork as fast as the pids limit allows; children live long enough to be found
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
    except OSError:
        pass
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
"""


def test_adopting_a_forking_process_loses_no_child(cgroup_mode: str, jc_env: JcEnv,
                                                   make_user: Callable[..., User]) -> None:
    """Adopt moves a process into several hierarchies one write at a time; a child forked between the
    writes must still end up a member (killed and frozen with the job), never only in the limits."""
    user = make_user()
    hold = jc_env.make_pids_cap("_hold", 64)  # not a job: a pids cap for the forker outside
    script = jc_env.scratch / "forker.py"
    script.write_text(FORKER)
    forker = shlex.join(user.argv(["/usr/bin/python3", "-I", str(script)]))
    for i in range(10):
        job = f"adopt{i}"
        jc_env.jobcage("prologue", job, "--uid", str(user.uid), "--pids-max", "128").ok()
        # capped from its first instruction: the shell joins the cap, then becomes the forker
        p = jc_env.popen(["sh", "-c", f"echo $$ > {hold}/cgroup.procs && exec {forker}"])
        wait_for(lambda: int((hold / "pids.current").read_text()) >= 64, 300, "the forker to fill its cap")
        jc_env.jobcage("adopt", job, "--pid", str(p.pid)).ok()   # it forks as soon as the job's limit allows
        half = [pid for pid in map(int, (jc_env.pids_dir(job) / "cgroup.procs").read_text().split())
                if alive(pid) and not jc_env.in_job(pid, job)]
        assert not half, f"trial {i}: children forked during adopt are outside the job: {[proc(x) for x in half]}"
        members = snapshot(jc_env, job)
        jc_env.jobcage("kill", job).ok()
        for key, d in jc_env.cgroup_dirs(job).items():
            left = [pid for pid in map(int, (d / "cgroup.procs").read_text().split()) if alive(pid)]
            assert not left, f"trial {i}: {key} cgroup of the job still holds {[proc(x) for x in left]}"
        assert not [pid for pid, st in members.items() if alive(pid, st)]
        jc_env.jobcage("epilogue", job).ok()
        for pid in map(int, (hold / "cgroup.procs").read_text().split()):  # the children forked before adopt
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pids_of_uid(user.uid), 120, "the forker's old children to die")
