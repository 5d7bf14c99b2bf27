"""Fixtures and helpers of the tracer / accounting tests (test_tracer.py, test_accounting.py).

Real kernel objects only: raw cgroup2 directories ``/sys/fs/cgroup/unified/jobcage-trtest-<hex>`` (plus a
v1 pids cgroup of the same name when a test needs pids.max), real users ``jctr<hex>``, a real setuid-root
helper compiled with gcc.  Teardown kills only what is inside those cgroups (cgroup.kill) or runs as those
users.  With CI=true a missing prerequisite fails (jctest.require).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from jctest import User, create_user, delete_user, require, wait_for

from jobcage.agent.events import TraceEvent
from jobcage.agent.tracer import Tracer, cgroup2_mount

PREFIX = "jobcage-trtest-"
PYTHON = "/usr/bin/python3"   # not a PATH lookup: version-manager shims would add processes to the trail

SUTEST_C = r"""
/* sutest: a minimal gLExec-like setuid-root helper: sutest UID GID PROG [ARG...] */
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: sutest UID GID PROG [ARG...]\n"); return 2; }
    uid_t uid = (uid_t)atoi(argv[1]);
    gid_t gid = (gid_t)atoi(argv[2]);
    if (setgroups(0, NULL) || setgid(gid) || setuid(uid)) { perror("sutest"); return 1; }
    execv(argv[3], argv + 3);
    perror("sutest: execv");
    return 127;
}
"""

FORKBOMB_C = r"""
/* forkbomb SECONDS [STOPFILE]: waits for one byte on stdin, then forks as fast as it can; odd-pid
 * children exit at once (churn), the others join in.  Every process stops by itself after SECONDS, or
 * once STOPFILE exists (a test waits on a condition, then stops it: a slow node forks slowly). */
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char c;
    if (argc < 2 || read(0, &c, 1) != 1) return 2;
    time_t end = time(NULL) + atoi(argv[1]);
    const char *stop = argc > 2 ? argv[2] : NULL;
    while (time(NULL) < end && !(stop && access(stop, F_OK) == 0)) {
        pid_t p = fork();
        if (p == 0) {
            if (getpid() & 1) _exit(0);
            continue;
        }
        while (waitpid(-1, NULL, WNOHANG) > 0) ;
    }
    return 0;
}
"""

DAEMONIZE_PY = r"""
# Classic daemonization: fork, setsid in the child, fork again, the middle process exits; the grandchild
# (no exec) lives on, reparented away from its original parent.  Prints: payload child grandchild.
import os, sys, time
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.setsid()
    grandchild = os.fork()
    if grandchild == 0:
        os.write(w, b"%d\n" % os.getpid())
        null = os.open(os.devnull, os.O_RDWR)   # a daemon lets go of its parent's stdio
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        time.sleep(float(sys.argv[1]))
        os._exit(0)
    os._exit(0)
os.waitpid(child, 0)
grandchild = int(os.read(r, 64))
print(os.getpid(), child, grandchild, flush=True)
"""

BURN_PY = r"""
# Burn CPU for argv[1] seconds of this process's own CPU time.
import sys, time
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    pass
"""

IDLOOP_PY = r"""
# Root process toggling its effective uid: argv[1] = uid, argv[2] = pairs of setresuid calls.
import os, sys
sys.stdin.readline()
uid, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(n):
    os.setresuid(-1, uid, -1)
    os.setresuid(-1, 0, -1)
print("done", flush=True)
"""


def cgroup2_root() -> str:
    root = cgroup2_mount()
    require(root is not None, "no cgroup2 hierarchy mounted")
    assert root is not None
    return root


@dataclass
class TestCgroup:
    """A raw cgroup2 directory (and optionally a v1 pids cgroup of the same name)."""
    __test__ = False   # not a pytest test class

    path: Path
    pids_path: Path | None = None

    @property
    def id(self) -> int:
        return os.stat(self.path).st_ino   # cgroup2 id = inode number = bpf_get_current_cgroup_id()

    def attach(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))
        if self.pids_path is not None:
            (self.pids_path / "cgroup.procs").write_text(str(pid))

    def procs(self) -> list[int]:
        return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]

    def usage_usec(self) -> int:
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, val = line.partition(" ")
            if key == "usage_usec":
                return int(val)
        raise AssertionError(f"{self.path}/cpu.stat has no usage_usec")

    def destroy(self) -> None:
        kill = self.path / "cgroup.kill"
        deadline = time.monotonic() + 20
        while self.path.exists() and self.procs():
            if kill.exists():
                kill.write_text("1")
            else:   # no cgroup.kill (kernel < 5.14): kill what is listed, all of it ours
                for pid in self.procs():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.path}: processes survive {self.procs()}")
            time.sleep(0.02)
        for d in (self.path, self.pids_path):
            if d is None:
                continue
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:   # EBUSY while the last tasks are being released
                    time.sleep(0.05)


@pytest.fixture
def make_cgroup() -> Iterator[Callable[..., TestCgroup]]:
    made: list[TestCgroup] = []

    def make(pids_max: int | None = None) -> TestCgroup:
        name = PREFIX + secrets.token_hex(4)
        path = Path(cgroup2_root()) / name
        pids_path = None
        v1 = Path("/sys/fs/cgroup/pids")
        if pids_max is not None and (v1 / "cgroup.procs").exists():   # v1 / hybrid: a v1 pids twin
            pids_path = v1 / name
            pids_path.mkdir()
            (pids_path / "pids.max").write_text(str(pids_max))   # the limit is in place BEFORE any task
        path.mkdir()
        if pids_max is not None and pids_path is None:   # pure v2: the limit in the cgroup itself
            ctrl = (path.parent / "cgroup.subtree_control").read_text().split()
            require("pids" in ctrl, f"neither a v1 pids hierarchy nor +pids in {path.parent}/cgroup.subtree_control")
            (path / "pids.max").write_text(str(pids_max))
        cg = TestCgroup(path, pids_path)
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.destroy()


@dataclass
class TraceUsers:
    pilot: User
    pool: User


@pytest.fixture(scope="session")
def trace_users() -> Iterator[TraceUsers]:
    require(shutil.which("useradd") is not None, "useradd is missing")
    pilot, pool = create_user("jctr"), create_user("jctr")
    try:
        yield TraceUsers(pilot, pool)
    finally:
        for u in (pool, pilot):
            delete_user(u)


@dataclass
class Helpers:
    dir: Path
    sutest: Path
    forkbomb: Path
    daemonize: Path
    burn: Path
    idloop: Path


@pytest.fixture(scope="session")
def helpers() -> Iterator[Helpers]:
    require(shutil.which("gcc") is not None, "gcc is missing (needed to build the setuid test helper)")
    d = Path(tempfile.mkdtemp(prefix="jobcage-trtest-"))
    try:
        d.chmod(0o755)   # the test users must reach the helper
        for name, src in (("sutest", SUTEST_C), ("forkbomb", FORKBOMB_C)):
            (d / f"{name}.c").write_text(src)
            subprocess.run(["gcc", "-O2", "-o", str(d / name), str(d / f"{name}.c")], check=True)
        sutest = d / "sutest"
        os.chown(sutest, 0, 0)
        sutest.chmod(0o4755)
        require(not (os.statvfs(sutest).f_flag & os.ST_NOSUID), f"{d} is on a nosuid mount")
        assert sutest.stat().st_mode & stat.S_ISUID
        for name, src in (("daemonize.py", DAEMONIZE_PY), ("burn.py", BURN_PY), ("idloop.py", IDLOOP_PY)):
            (d / name).write_text(src)
            (d / name).chmod(0o644)
        yield Helpers(d, sutest, d / "forkbomb", d / "daemonize.py", d / "burn.py", d / "idloop.py")
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Collector:
    """on_event target: keeps every event."""
    events: list[TraceEvent] = field(default_factory=list)

    def __call__(self, ev: TraceEvent) -> None:
        self.events.append(ev)

    def of(self, job_id: str, kind: str | None = None, pid: int | None = None) -> list[TraceEvent]:
        return [e for e in self.events if e.job_id == job_id and (kind is None or e.kind == kind)
                and (pid is None or e.pid == pid)]


@pytest.fixture
def make_tracer() -> Iterator[Callable[..., tuple[Tracer, Collector]]]:
    made: list[Tracer] = []

    def make(backend: str = "bpf", **kw: object) -> tuple[Tracer, Collector]:
        if backend == "bpf":
            try:
                import bcc  # noqa: F401
            except ImportError:
                require(False, "bcc is not importable")
        col = Collector()
        t = Tracer(col, backend=backend, **kw)  # type: ignore[arg-type]
        made.append(t)
        return t, col

    yield make
    for t in made:
        t.close()


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


class GatedJob:
    """A process started (as `user`), moved into the cgroup(s), held until release(): so the tracer knows the
    job before the job does anything, like the agent's prologue + adopt."""

    def __init__(self, cg: TestCgroup, argv: Sequence[str], user: User | None = None) -> None:
        full = list(user.argv(argv)) if user else list(argv)
        self.proc = subprocess.Popen(full, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=user.env() if user else None,
                                     cwd="/")
        self.pid = self.proc.pid
        if user:   # attach the pilot as itself: setpriv's own switch happens before the job starts
            target = os.path.realpath(shutil.which(argv[0]) or argv[0])
            wait_for(lambda: _exe(self.pid) == target, 10, f"{argv[0]} to run as {user.name}")
        cg.attach(self.pid)
        self.cg = cg

    def release(self, data: str = "go\n") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.close()
        self.proc.stdin = None   # so communicate() does not flush it


def shell_job(cg: TestCgroup, script: str, user: User | None = None) -> GatedJob:
    """bash that waits for the gate, then runs `script` (ending in `exit` so bash does not exec the last
    command in place: the trail's parent pid is then this bash)."""
    return GatedJob(cg, ["/bin/bash", "-c", f"read -r _gate; {script}\nexit $?"], user)


def drive(tracers: Sequence[Tracer], until: Callable[[], bool], timeout: float = 30.0,
          tick: Callable[[], None] | None = None) -> None:
    """Poll the tracers (like the agent's loop) until `until()` holds, then drain what is buffered."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            pytest.fail(f"scenario did not finish within {timeout}s", pytrace=False)
        for t in tracers:
            t.poll(10)
        if tick:
            tick()
    for _ in range(3):
        for t in tracers:
            t.poll(30)
        if tick:
            tick()
