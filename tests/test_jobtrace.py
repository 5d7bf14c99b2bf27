"""`jobtrace` on a real pilot job: a pilot process of one test user, a `sudo -u` payload of another, a
double-forked setsid daemon and a threaded process, in a private jobcage (conftest's jc_env) with a real agent.

Checked against the kernel (/proc, read by tests/jctest.py, not by jobtrace): the JSON tree's parents, original
parents, uids and marks; the text view's nesting, marks and width; --live driven in a real pty; permissions for a
non-root caller; the fallback to cgroupfs + /proc with the agent stopped; the audit trail; bad input.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jctest import (
    JOBCAGE,
    JOBTRACE,
    AgentProc,
    JcEnv,
    Result,
    User,
    alive,
    pick,
    proc,
    read_int,
    require,
    trail,
    wait_for,
)

pytestmark = pytest.mark.root

SYS_PYTHON = "/usr/bin/python3"
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")
TREE_CHARS = "├└│─ "

THREADS_PY = """
import os, sys, threading, time
for _ in range(3):
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(3600)
"""


def jobtrace(env: JcEnv, *args: str, user: User | None = None, timeout: float = 60.0) -> Result:
    return env.run([JOBTRACE, *args], user=user, timeout=timeout)


def walk(roots: list[dict]) -> Iterator[tuple[dict, int, dict | None]]:
    """(node, depth, parent) depth-first, in the order jobtrace lists them."""
    stack: list[tuple[dict, int, dict | None]] = [(n, 0, None) for n in reversed(roots)]
    while stack:
        node, depth, parent = stack.pop()
        yield node, depth, parent
        stack.extend((c, depth + 1, node) for c in reversed(node["children"]))


def by_pid(tree: list[dict]) -> dict[int, tuple[dict, int, dict | None]]:
    return {n["pid"]: (n, d, p) for n, d, p in walk(tree)}


@dataclass
class Scenario:
    env: JcEnv
    agent: AgentProc
    pilot: User
    payload: User
    job: str
    marker: str
    pilot_pid: int
    threads_pid: int
    payload_pid: int
    mid_pid: int         # the short-lived subshell between payload and daemon (its original parent)
    daemon_pid: int

    def tree(self, *extra: str, user: User | None = None) -> dict:
        return jobtrace(self.env, self.job, "--json", *extra, user=user).json()

    def ancestors(self, pid: int) -> list[int]:
        """Ancestor pids of pid per /proc (the kernel's view), nearest first."""
        out = []
        p = proc(pid)
        while p is not None and p.ppid > 1:
            out.append(p.ppid)
            p = proc(p.ppid)
        return out


def start_scenario(env: JcEnv, agent: AgentProc, make_user: Callable[..., User],
                   sudoers: Callable[..., Path]) -> Scenario:
    for tool in ("/usr/bin/sudo", "/usr/bin/setsid", SYS_PYTHON):
        require(os.access(tool, os.X_OK), f"{tool} is needed")
    pilot, payload = make_user("jcjt"), make_user("jcjt")
    sudoers(f"{pilot.name} ALL=({payload.name}) NOPASSWD: ALL")
    job = f"jt{secrets.token_hex(3)}"
    s = env.scratch / job
    s.mkdir()
    s.chmod(0o1777)
    (s / "threads.py").write_text(THREADS_PY)
    (s / "payload.sh").write_text(
        f"echo $$ > {s}/payload.pid\n"
        # double fork + setsid: the subshell reports its pid, forks the daemon and exits
        f"( sh -c 'echo $PPID > {s}/mid.pid'; setsid sh -c 'echo $$ > {s}/daemon.pid; exec sleep 3601' "
        f"</dev/null >/dev/null 2>&1 & )\n"
        "exec sleep 3602\n")
    (s / "pilot.sh").write_text(
        f"echo $$ > {s}/pilot.pid\n"
        f"sudo -n -u {payload.name} /bin/sh {s}/payload.sh </dev/null &\n"
        f"{SYS_PYTHON} {s}/threads.py {s}/threads.pid &\n"
        "wait\n")
    for f in s.iterdir():
        f.chmod(0o644)
    env.jobcage("prologue", job, "--uid", str(pilot.uid)).ok()
    marker = "JTMARK" + secrets.token_hex(24)
    # the pilot starts the job itself (through the agent), like a batch system's job starter would
    env.start_job(job, f"exec /bin/sh {s}/pilot.sh {marker}", user=pilot, via_root=False)
    files = ["pilot", "threads", "payload", "mid", "daemon"]
    deadline = time.monotonic() + 60
    while not all(pids := [read_int(s / f"{f}.pid") for f in files]):
        if time.monotonic() > deadline:
            members = [(p.pid, p.ppid, p.uid, p.cmdline) for p in map(proc, env.job_pids(job)) if p]
            pytest.fail(f"scenario did not start: pid files {dict(zip(files, pids, strict=True))}, "
                        f"job members {members}\nagent log:\n{agent.log(20)}", pytrace=False)
        time.sleep(0.05)
    sc = Scenario(env, agent, pilot, payload, job, marker, *pids)  # type: ignore[arg-type]
    # settled: the payload and the daemon exec'd sleep, the subshell is gone (the daemon is reparented)
    wait_for(lambda: all((p := proc(x)) is not None and p.comm == "sleep" for x in (sc.payload_pid, sc.daemon_pid))
             and not alive(sc.mid_pid), 30, "payload and daemon to settle")
    assert set(env.job_pids(job)) >= {sc.pilot_pid, sc.threads_pid, sc.payload_pid, sc.daemon_pid}
    return sc


@pytest.fixture
def scenario(jc_env: JcEnv, agent_proc: AgentProc, make_user: Callable[..., User],
             sudoers: Callable[..., Path]) -> Scenario:
    return start_scenario(jc_env, agent_proc, make_user, sudoers)


def check_tree(sc: Scenario, out: dict, lineage: bool = False) -> None:
    """The contract keys, and parents / uids / marks against the kernel."""
    assert out["job_id"] == sc.job and out["job"]["owner_uid"] == sc.pilot.uid
    nodes = by_pid(out["tree"])
    live = set(sc.env.job_pids(sc.job))
    assert live <= set(nodes) and not any(alive(p) for p in set(nodes) - live), (sorted(nodes), sorted(live))
    for n, _d, _p in walk(out["tree"]):
        for key in ("pid", "ppid", "orig_ppid", "uid", "euid", "user", "sid", "cmd", "cpu_seconds", "children"):
            assert key in n, (key, n)
        k = proc(n["pid"])
        if k is not None:  # still there: the kernel agrees on the facts
            assert (n["ppid"], n["uid"], n["euid"], n["sid"]) == (k.ppid, k.uid, k.euid, k.sid), (n, k)
    pilot, _d, pilot_parent = nodes[sc.pilot_pid]
    assert pilot_parent is None and pilot["uid"] == sc.pilot.uid and not pilot["uid_changed"]
    assert not pilot["reparented"] and pilot["orig_ppid"] == pilot["ppid"]
    assert pilot["user"] == sc.pilot.name and sc.marker in pilot["cmd"]
    # the threaded process: one node (threads are not processes), under the pilot
    thr, _d, thr_parent = nodes[sc.threads_pid]
    assert thr_parent is pilot and thr["threads"] == 4 and thr["uid"] == sc.pilot.uid and not thr["uid_changed"]
    # the payload: below the pilot through sudo, under the payload uid, marked as an identity switch
    pay, depth, pay_parent = nodes[sc.payload_pid]
    assert pay["uid"] == pay["euid"] == sc.payload.uid and pay["user"] == sc.payload.name
    assert pay["uid_changed"] and pay["cmd"] == "sleep 3602"
    chain = [pay_parent]
    while chain[-1] is not None and chain[-1]["pid"] != sc.pilot_pid:
        chain.append(nodes[chain[-1]["pid"]][2])
    assert chain[-1] is pilot, "the payload is not a descendant of the pilot"
    sudo_nodes = [c for c in chain[:-1] if c is not None]
    assert sudo_nodes and all(c["comm"] == "sudo" for c in sudo_nodes), sudo_nodes
    assert sudo_nodes[-1]["uid_changed"]  # sudo is setuid root: its euid differs from the pilot's
    assert [c["pid"] for c in chain] == sc.ancestors(sc.payload_pid)[:len(chain)]
    # the daemon: reparented, its own session, payload uid
    dae, _d, dae_parent = nodes[sc.daemon_pid]
    assert dae["reparented"] and dae["sid"] == sc.daemon_pid and dae["uid"] == sc.payload.uid
    assert dae["ppid"] == proc(sc.daemon_pid).ppid != sc.mid_pid  # type: ignore[union-attr]
    if lineage:
        # shown under its original parent's nearest surviving ancestor in the job: the payload
        assert dae["orig_ppid"] == sc.mid_pid and dae_parent is pay, (dae, dae_parent)
        assert not dae["uid_changed"]  # same identity as the payload it is shown under
        assert out["lineage_known"]
    else:
        # no lineage: a root of the tree, marked reparented (its parent is init), original parent unknown
        assert dae_parent is None and dae["orig_ppid"] is None and dae["uid_changed"]
        assert not out["lineage_known"]


def text_rows(text: str) -> tuple[list[str], dict[int, tuple[int, str]]]:
    """Lines, and {pid: (depth, cmd cell)} from the table of a text view."""
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("PID") and "CMD" in ln)
    col = lines[head].index("CMD")
    rows: dict[int, tuple[int, str]] = {}
    for ln in lines[head + 1:]:
        first = ln.split(None, 1)[0] if ln.strip() else ""
        if not first.isdigit() or len(ln) <= col:
            continue
        cell = ln[col:]
        prefix = len(cell) - len(cell.lstrip(TREE_CHARS))
        rows[int(first)] = (prefix // 2, cell[prefix:])
    return lines, rows


# -- the tree ------------------------------------------------------------------------------------------------

@pytest.mark.jc_config({"tracer": {"backend": "bpf"}})
def test_original_parent_survives_an_agent_crash(jc_env: JcEnv, agent_proc: AgentProc,
                                                 make_user: Callable[..., User], sudoers: Callable[..., Path]) -> None:
    """With the tracer on, the daemon's original parent is in the trail the agent wrote.  Killed (SIGKILL) and
    started again, the agent has lost what it held in memory; jobtrace still says where the daemon came from."""
    sc = start_scenario(jc_env, agent_proc, make_user, sudoers)
    wait_for(lambda: pick(trail(jc_env, sc.job), pid=sc.daemon_pid), 30, "the daemon's exec in the trail")
    daemon = by_pid(sc.tree()["tree"])[sc.daemon_pid][0]
    assert daemon["reparented"] and daemon["orig_ppid"] == sc.mid_pid, daemon
    agent_proc.stop(signal.SIGKILL)
    agent_proc.start()
    daemon = by_pid(sc.tree()["tree"])[sc.daemon_pid][0]
    assert daemon["reparented"] and daemon["orig_ppid"] == sc.mid_pid, daemon


def test_json_tree_from_proc(cgroup_mode: str, scenario: Scenario) -> None:
    """Tracer off: the tree comes from /proc; parents, uids, threads and marks are right."""
    check_tree(scenario, scenario.tree())
    # as the pilot (a non-root owner, through the agent): the same tree
    check_tree(scenario, scenario.tree(user=scenario.pilot))


def test_tree_under_original_parent_with_lineage(scenario: Scenario) -> None:
    """With the lineage the tracer's events carry (here written into the trail as the agent writes them), the
    daemon is shown under its original parent's surviving ancestor, with its current ppid, and the helper of the
    switch.  A lineage row of the table older stores hold is read too."""
    from jobcage.agent.events import TraceEvent
    from jobcage.agent.store import Store

    sc = scenario
    store = Store(sc.env.config().db_path)
    try:
        jid = store.job(sc.job)["jid"]  # type: ignore[index]
        now = time.time()
        orig = {sc.daemon_pid: (sc.mid_pid, None), sc.mid_pid: (sc.payload_pid, None),
                sc.payload_pid: (sc.ancestors(sc.payload_pid)[0], "/usr/bin/sudo")}
        store.add_events(jid, [TraceEvent("exec", pid, pp, sc.payload.uid, sc.payload.uid, "sh", "/bin/sh",
                                          {"orig_ppid": pp, **({"via": via} if via else {})}, sc.job, now)
                               for pid, (pp, via) in orig.items()])
        # a stale record of an earlier process with the pilot's pid must be ignored
        store.set_lineage(jid, sc.pilot_pid, 4242, None, now - 10 * 86400)
    finally:
        store.close()
    out = sc.tree()
    check_tree(sc, out, lineage=True)
    nodes = by_pid(out["tree"])
    assert nodes[sc.payload_pid][0]["via"] == "/usr/bin/sudo"
    assert nodes[sc.pilot_pid][0]["orig_ppid"] == nodes[sc.pilot_pid][0]["ppid"]
    text = jobtrace(sc.env, sc.job).ok().out
    _lines, rows = text_rows(text)
    assert rows[sc.daemon_pid][0] == rows[sc.payload_pid][0] + 1
    assert f"{sc.daemon_pid} reparented: original parent {sc.mid_pid} (exited), now ppid" in text
    assert "via /usr/bin/sudo" in text


def test_text_view_nesting_marks_width(scenario: Scenario) -> None:
    sc = scenario
    out = sc.tree()
    r = jobtrace(sc.env, sc.job).ok()
    lines, rows = text_rows(r.out)
    assert all(len(ln) <= 80 for ln in lines), [ln for ln in lines if len(ln) > 80]
    assert "\x1b[" not in r.out  # no colour off a terminal
    # header: owner, state, pids current/max, limit hits, cpu per identity
    assert lines[0].startswith(f"job {sc.job}") and "running" in lines[0]
    assert f"owner {sc.pilot.name}({sc.pilot.uid})" in lines[0] and "pids " in lines[0] and "limit hits 0" in lines[0]
    head = " ".join(lines[1:next(i for i, ln in enumerate(lines) if "CMD" in ln)])
    assert lines[1].startswith("cpu ") and f"{sc.payload.name}({sc.payload.uid})" in head
    # nesting: every row's depth and its nearest shallower row above it are the JSON tree's
    expected = [(n["pid"], d, p["pid"] if p else None) for n, d, p in walk(out["tree"]) if n["pid"] in rows]
    order = [pid for pid in rows]
    assert order == [pid for pid, _d, _p in expected]
    for pid, depth, parent in expected:
        assert rows[pid][0] == depth, (pid, rows[pid], depth)
        if parent is not None:
            above = order[:order.index(pid)]
            assert next(q for q in reversed(above) if rows[q][0] == depth - 1) == parent
    # marks: identity switch on the payload, reparented on the daemon, both explained below the table
    assert rows[sc.payload_pid][1].startswith("⇄") and "sleep 3602" in rows[sc.payload_pid][1]
    assert "↥" in rows[sc.daemon_pid][1][:3] and "sleep 3601" in rows[sc.daemon_pid][1]
    assert f"⇄ {sc.payload_pid} uid " in r.out and f"↥ {sc.daemon_pid} reparented" in r.out
    # commands are truncated to the width; --wide shows them whole
    assert sc.marker not in r.out
    wide = jobtrace(sc.env, sc.job, "--wide").ok().out
    assert sc.marker in wide
    # all jobs (no JOB_ID): this one is among them
    assert f"job {sc.job}" in jobtrace(sc.env).ok().out


def test_cpu_and_frozen(scenario: Scenario) -> None:
    sc, env = scenario, scenario.env
    burner = env.popen([JOBCAGE, "run", sc.job, "--", "/bin/sh", "-c", "while :; do :; done"], user=sc.pilot)
    wait_for(lambda: burner.pid in env.job_pids(sc.job), 30, "the burner to join the job")
    # A busy loop: 100% of a core on an idle node, whatever the scheduler leaves it on a loaded one.  Wait until
    # the kernel has charged it some CPU, then the sampled and the lifetime percentages must both show it.
    n = wait_for(lambda: (m := by_pid(sc.tree()["tree"])[burner.pid][0])["cpu_seconds"] > 0.2 and m, 60,
                 "the burner to be charged 0.2 s of CPU")
    assert n["cpu_percent"] is not None and n["cpu_percent"] > 1, n
    n = by_pid(sc.tree("--interval", "0")["tree"])[burner.pid][0]  # lifetime average, like ps
    assert n["cpu_percent"] > 1, n
    env.jobcage("suspend", sc.job).ok()
    try:
        text = jobtrace(env, sc.job).ok().out
        _lines, rows = text_rows(text)
        assert "suspended" in text.splitlines()[0]
        for ln in text.splitlines():
            if ln.split(None, 1)[0:1] and ln.split(None, 1)[0].isdigit():
                assert " frozen " in ln, ln
        n = by_pid(sc.tree()["tree"])[burner.pid][0]
        assert n["cpu_percent"] == 0.0, n  # frozen: no cpu
    finally:
        env.jobcage("resume", sc.job).ok()


# -- --live --------------------------------------------------------------------------------------------------

class PtySession:
    """A command on a real pseudo-terminal (its controlling terminal), output collected as it comes."""

    def __init__(self, argv: list[str], env: dict[str, str], cols: int = 120, rows: int = 40) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.attrs_before = termios.tcgetattr(self.slave)
        self.raw = b""
        self.proc = subprocess.Popen(argv, stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     env=dict(env, TERM="xterm-256color"), start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))

    @property
    def text(self) -> str:
        return ANSI_RE.sub("", self.raw.decode(errors="replace"))

    def pump(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            ready, _w, _x = select.select([self.master], [], [], left)
            if not ready:
                return
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.raw += chunk

    def expect(self, pred: Callable[[], object], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > end:
                pytest.fail(f"--live: timed out waiting for {what}; screen so far:\n{self.text[-3000:]}",
                            pytrace=False)
            if self.proc.poll() is not None:
                self.pump(0.2)
                if not pred():
                    pytest.fail(f"--live exited ({self.proc.returncode}) before {what}:\n{self.text[-3000:]}",
                                pytrace=False)
                return
            self.pump(0.1)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            self.pump(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
            pytest.fail(f"--live did not exit:\n{self.text[-3000:]}", pytrace=False)
        self.pump(0.2)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def test_live_in_a_pty(cgroup_mode: str, scenario: Scenario) -> None:
    sc, env = scenario, scenario.env
    s = PtySession([JOBTRACE, sc.job, "--live"], env.env)
    try:
        s.expect(lambda: f"job {sc.job}" in s.text and "sleep 3602" in s.text, 20, "the first frame")
        s.expect(lambda: s.text.count("q quit") >= 2, 10, "a second refresh")
        # a process appears mid-way: on screen within a couple of refreshes, highlighted as new
        newcomer = env.popen([JOBCAGE, "run", sc.job, "--", "sleep", "3603"], user=sc.pilot)
        mark = len(s.raw)
        s.expect(lambda: "sleep 3603" in ANSI_RE.sub("", s.raw[mark:].decode(errors="replace")), 10,
                 "the new process")
        assert "\x1b[1;32m" in s.raw[mark:].decode(errors="replace"), "new process not highlighted"
        frames = s.text.count("q quit")
        # it exits: shown as exited for a moment
        newcomer.kill()
        newcomer.wait()
        mark = len(s.raw)
        s.expect(lambda: "exited" in ANSI_RE.sub("", s.raw[mark:].decode(errors="replace")), 10,
                 "the exited process")
        assert s.text.count("q quit") > frames
        s.send(b"G")  # keys work (scroll to the end), then q quits cleanly
        s.pump(0.3)
        s.send(b"q")
        assert s.wait(5) == 0, s.text[-2000:]
        tail = s.raw[-400:]
        assert b"\x1b[?1049l" in tail and b"\x1b[?25h" in tail, tail  # main screen and cursor back
        attrs = termios.tcgetattr(s.slave)
        assert attrs[3] == s.attrs_before[3], "terminal modes not restored"
        assert "Traceback" not in s.text
    finally:
        s.close()
    # Ctrl-C quits as cleanly
    s = PtySession([JOBTRACE, sc.job, "--live"], env.env)
    try:
        s.expect(lambda: "sleep 3602" in s.text, 20, "the first frame")
        s.send(b"\x03")
        assert s.wait(5) == 0, s.text[-2000:]
        assert termios.tcgetattr(s.slave)[3] == s.attrs_before[3]
        assert "Traceback" not in s.text
    finally:
        s.close()


def test_live_needs_a_terminal(scenario: Scenario) -> None:
    jobtrace(scenario.env, scenario.job, "--live").clean_error(1, "terminal")


# -- permissions, agent down, bad input -------------------------------------------------------------------------

def test_non_root_sees_own_job_only(scenario: Scenario, make_user: Callable[..., User]) -> None:
    sc, env = scenario, scenario.env
    other = make_user("jcjt")
    env.jobcage("prologue", "jtother", "--uid", str(other.uid)).ok()
    env.start_job("jtother", "exec sleep 3604", user=other)
    wait_for(lambda: env.job_pids("jtother"), 30, "the other job's process")
    # the pilot sees their own job, in full, and only theirs in the all-jobs view
    check_tree(sc, sc.tree(user=sc.pilot))
    listing = jobtrace(env, "--json", user=sc.pilot).json()
    assert [j["job_id"] for j in listing] == [sc.job]
    assert "jtother" not in jobtrace(env, user=sc.pilot).ok().out
    # and is refused the other's, in one clear line; the events too
    jobtrace(env, "jtother", user=sc.pilot).clean_error(1, "not yours")
    jobtrace(env, "jtother", "--json", user=sc.pilot).clean_error(1, "not yours")
    jobtrace(env, "jtother", "--events", user=sc.pilot).clean_error(1, "not yours")
    # root sees both
    assert {j["job_id"] for j in jobtrace(env, "--json").json()} >= {sc.job, "jtother"}


def test_agent_stopped_tree_from_cgroupfs(scenario: Scenario) -> None:
    sc = scenario
    assert sc.agent.stop() == 0
    assert not sc.agent.ping()
    check_tree(sc, sc.tree())  # root: directly from cgroupfs + /proc
    assert f"job {sc.job}" in jobtrace(sc.env, sc.job).ok().out
    # a non-root caller needs the agent: one line, exit 1
    jobtrace(sc.env, sc.job, user=sc.pilot).clean_error(1, "agent")


def test_bad_input(jc_env: JcEnv) -> None:
    jobtrace(jc_env, "no/such").clean_error(1, "invalid job id")
    jobtrace(jc_env, "..").clean_error(1, "invalid job id")
    jobtrace(jc_env, "nosuchjob").clean_error(1, "unknown job")
    jobtrace(jc_env, "nosuchjob", "--events").clean_error(1, "unknown job")
    assert jobtrace(jc_env, "--follow", "x").rc == 2
    assert jobtrace(jc_env, "--live").rc == 2
    assert jobtrace(jc_env, "x", "--live", "--json").rc == 2
    assert jobtrace(jc_env, "--bogus").rc == 2
    assert jobtrace(jc_env, "--json").json() == []


def test_processes_exiting_mid_read(jc_env: JcEnv, make_user: Callable[..., User]) -> None:
    """A job that forks and reaps all the time: every one-shot view succeeds."""
    from jobcage.agent.jobtrace.snapshot import load_proc, refresh_proc

    owner = make_user("jcjt")
    jc_env.jobcage("prologue", "churn", "--uid", str(owner.uid)).ok()
    for _ in range(3):
        jc_env.start_job("churn", "while :; do /bin/true; sleep 0.001 & done", user=owner)
    wait_for(lambda: len(jc_env.job_pids("churn")) >= 3, 30, "churning processes")
    for i in range(12):
        args = ["churn", "--json"] if i % 2 else ["churn"]
        r = jobtrace(jc_env, *args, "--interval", str(0.05 * (i % 3)))
        assert r.rc == 0 and "Traceback" not in r.err, r
    # the reader itself: gone pids give None, never an exception
    p = subprocess.Popen(["sleep", "60"])
    # until the child has exec'd, /proc shows the forked python (a slow node shows it for a while)
    rec = wait_for(lambda: (r := load_proc(p.pid, False)) is not None and r.comm == "sleep" and r, 30,
                   "the child to exec sleep")
    p.kill()
    p.wait()
    assert refresh_proc(rec, False, uids=True, cmd=True) is None
    assert load_proc(p.pid, True) is None


# -- the audit trail --------------------------------------------------------------------------------------------

def test_events_and_follow(scenario: Scenario) -> None:
    sc, env = scenario, scenario.env
    sc.agent.result("declare", job_id=sc.job, uid=sc.payload.uid, label="CN=jobtrace test")
    lines = jobtrace(env, sc.job, "--events", "--json").ok().out.splitlines()
    evs = [json.loads(ln) for ln in lines]
    assert evs, "no events"
    for ev in evs:
        assert set(ev) >= {"ts", "job_id", "kind", "pid", "ppid", "uid", "euid", "comm", "filename", "detail"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", ev["ts"]), ev
        assert ev["job_id"] == sc.job
    decl = [e for e in evs if e["kind"] == "declare"]
    assert decl and decl[-1]["uid"] == sc.payload.uid and decl[-1]["detail"]["label"] == "CN=jobtrace test"
    text = jobtrace(env, sc.job, "--events").ok().out.splitlines()
    assert len(text) == len(evs) and any("declare" in ln and f"({sc.payload.uid})" in ln for ln in text)
    # the owner may read the trail
    assert len(jobtrace(env, sc.job, "--events", "--json", user=sc.pilot).ok().out.splitlines()) == len(evs)
    # --follow: new events as they come, and it ends by itself when the job has ended
    f = env.popen([JOBTRACE, sc.job, "--events", "--follow", "--json"], stdout=subprocess.PIPE, text=True)
    assert f.stdout is not None
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while len(seen) < len(evs) and time.monotonic() < deadline:
        seen.append(json.loads(f.stdout.readline()))
    sc.agent.result("declare", job_id=sc.job, uid=sc.payload.uid, label="second")
    ready, _w, _x = select.select([f.stdout], [], [], 10)
    assert ready, "the followed event did not arrive"
    ev = json.loads(f.stdout.readline())
    assert ev["kind"] == "declare" and ev["detail"]["label"] == "second"
    # Ctrl-C (SIGINT) stops a follower quietly
    g = env.popen([JOBTRACE, sc.job, "--events", "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True)
    wait_for(lambda: (g.stdout is not None and select.select([g.stdout], [], [], 0)[0]) or g.poll() is not None,
             20, "the follower's first lines")
    g.send_signal(signal.SIGINT)
    _out, err = g.communicate(timeout=10)
    assert g.returncode == 0 and "Traceback" not in err and not err.strip(), err
    env.jobcage("epilogue", sc.job).ok()
    assert f.wait(timeout=15) == 0


def test_deep_chain_and_lineage_cycle() -> None:
    """A fork chain deeper than Python's recursion limit renders (text and JSON); lineage that loops (reused
    pids) cannot hang or drop processes."""
    from jobcage.agent.jobtrace import json_out, snapshot, table, tree

    depth = 3000
    procs = {pid: snapshot.Proc(pid, pid - 1, 100, 100, "S", "sh", 0, pid, 1, 1000, 1000, f"sh {pid}")
             for pid in range(100, 100 + depth)}
    roots = tree.build_tree(procs, {}, 1000)
    encoded = json_out.job_json({"job_id": "deep", "owner_uid": 1000}, roots, False)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(4 * depth + 1000)  # for the reader here: json.loads recurses per level
    try:
        out = json.loads(encoded)
    finally:
        sys.setrecursionlimit(limit)
    assert sum(1 for _ in walk(out["tree"])) == depth
    assert max(d for _n, d, _p in walk(out["tree"])) == depth - 1
    lines = table.render_job({"job_id": "deep", "state": "running", "owner_uid": 1000}, procs, roots, False, 80,
                          False, table.UNICODE)
    text = [table.ansi(s, False) for s in lines]
    assert all(len(t) <= 80 for t in text) and sum("sh 4" in t for t in text) > 0
    # lineage claiming 200 <- 300 <- 200: both still shown, no hang
    procs = {pid: snapshot.Proc(pid, 1, pid, pid, "S", "x", 0, 10, 1, 1000, 1000, "x") for pid in (200, 300)}
    lineage = {200: {"orig_ppid": 300, "via": None, "ts": None}, 300: {"orig_ppid": 200, "via": None, "ts": None}}
    roots = tree.build_tree(procs, lineage, 1000)
    assert sorted(n.proc.pid for n, _d, _c in tree.flatten(roots)) == [200, 300] and roots


def test_events_of_a_busy_job_come_in_pages(jc_env: JcEnv, agent_proc: AgentProc) -> None:
    """A trail longer than one socket message (1 MiB) is read page by page, not cut off."""
    from jobcage.agent.events import TraceEvent

    jc_env.jobcage("prologue", "busy", "--uid", "0").ok()
    m = jc_env.manager()
    jid = m.store.job("busy")["jid"]
    n = 6000
    m.store.add_events(jid, [TraceEvent("exec", pid=100000 + i, ppid=1, uid=0, euid=0, comm="x" * 15,
                                        filename="/usr/bin/" + "y" * 100, job_id="busy") for i in range(n)])
    out = jc_env.run([JOBTRACE, "busy", "--events", "--json"]).ok().out.splitlines()
    pids = [json.loads(line)["pid"] for line in out if json.loads(line)["kind"] == "exec"]
    assert pids == [100000 + i for i in range(n)]
    jc_env.jobcage("epilogue", "busy").ok()
