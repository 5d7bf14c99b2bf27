"""Real users, private trees, mounts and cgroups for the cleanup / tmpdir / prune tests.

Every object has a unique name (``jccl<hex>`` users, ``/tmp/jctest-*`` trees, ``jobcage-prtest-<hex>`` cgroups) and
is removed at teardown, so these tests can run next to other test sessions on the same node.  Only processes of
the users created here (or started by the test) are ever killed.  With ``CI=true`` a missing prerequisite fails
the test instead of skipping it.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest

USER_PREFIX = "jccl"
IN_CI = os.environ.get("CI") == "true"


def require(ok: bool, why: str) -> None:
    """Skip (or, in CI, fail) when a prerequisite is missing."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"missing prerequisite (CI=true): {why}")
    pytest.skip(why)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")
    for tool in ("useradd", "userdel", "setpriv", "setsid", "mount", "umount"):
        require(shutil.which(tool) is not None, f"needs {tool}")


@dataclass(frozen=True)
class PoolUser:
    name: str
    uid: int
    gid: int


def _retry(argv: Sequence[str], ok_codes: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    # useradd/userdel fail while another session holds the passwd lock: retry for a while.
    r = None
    for _ in range(100):
        r = subprocess.run(list(argv), capture_output=True, text=True)
        if r.returncode in ok_codes or "lock" not in (r.stderr or "").lower():
            return r
        time.sleep(0.05)
    assert r is not None
    return r


def make_user(home: str | None = None) -> PoolUser:
    require_root()
    for _ in range(10):
        name = f"{USER_PREFIX}{secrets.token_hex(4)}"
        argv = ["useradd", "--no-create-home", "--user-group", "--shell", "/bin/sh"]
        if home is not None:
            argv += ["--home-dir", home]
        r = _retry(argv + [name])
        if r.returncode == 0:
            pw = pwd.getpwnam(name)
            assert pw.pw_uid >= 1000, f"test user got a system uid {pw.pw_uid}"
            return PoolUser(name, pw.pw_uid, pw.pw_gid)
        if r.returncode != 9:  # 9: name taken (vanishingly unlikely): try another
            require(False, f"useradd failed: {r.stderr.strip()}")
    raise AssertionError("could not create a test user")


def _live_pids_of(uid: int) -> list[int]:
    """Pids (not zombies) with ``uid`` as real, effective or saved uid; a plain /proc scan, fast on busy nodes."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        state = uids = None
        for line in status.splitlines():
            if line.startswith(b"State:"):
                state = line.split()[1]
            elif line.startswith(b"Uid:"):
                uids = [int(x) for x in line.split()[1:4]]
                break
        if uids and uid in uids and state not in (b"Z", b"X"):
            out.append(int(name))
    return out


def kill_user_processes(user: PoolUser) -> None:
    """SIGKILL every process of a test user we created (never anyone else's) and wait until they are gone."""
    assert user.name.startswith(USER_PREFIX) and user.uid >= 1000
    end = time.monotonic() + 10
    while time.monotonic() < end:
        pids = _live_pids_of(user.uid)
        if not pids:
            return
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                # Checked after pinning the process with the pidfd: a recycled pid is never signalled.
                with open(f"/proc/{pid}/status", "rb") as f:
                    if any(line.startswith(b"Uid:") and user.uid in [int(x) for x in line.split()[1:4]]
                           for line in f):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.01)
    raise AssertionError(f"processes of {user.name} survive SIGKILL: {_live_pids_of(user.uid)}")


def remove_user(user: PoolUser) -> None:
    kill_user_processes(user)
    r = _retry(["userdel", "--force", user.name], ok_codes=(0, 6))
    assert r.returncode in (0, 6), f"userdel {user.name}: {r.stderr.strip()}"


@pytest.fixture(scope="module")
def pool_users() -> Iterator[tuple[PoolUser, PoolUser]]:
    """Two fresh users (uids >= 1000) for the whole module."""
    require_root()
    made: list[PoolUser] = []
    try:
        made.append(make_user())
        made.append(make_user())
        yield made[0], made[1]
    finally:
        for u in made:
            remove_user(u)


@pytest.fixture
def user_procs(pool_users: tuple[PoolUser, PoolUser]) -> Iterator[tuple[PoolUser, PoolUser]]:
    """The pool users, with every process of theirs killed after each test."""
    yield pool_users
    for u in pool_users:
        kill_user_processes(u)


def run_as(user: PoolUser, argv: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), user=user.uid, group=user.gid, extra_groups=[], check=check,
                          capture_output=True, text=True, **kw)


def popen_as(user: PoolUser, argv: Sequence[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(list(argv), user=user.uid, group=user.gid, extra_groups=[], **kw)


def mounts_under(path: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split(" ")[4].replace("\\040", " ")
            if mp == path or mp.startswith(path.rstrip("/") + "/"):
                out.append(mp)
    return out


def unmount_all_under(path: str) -> None:
    for mp in sorted(mounts_under(path), key=len, reverse=True):  # deepest first
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


def mount_tmpfs(path: str) -> None:
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", path],
                       capture_output=True, text=True)
    require(r.returncode == 0, f"cannot mount a tmpfs: {r.stderr.strip()}")


def bind_mount(src: str, dst: str) -> None:
    r = subprocess.run(["mount", "--bind", src, dst], capture_output=True, text=True)
    require(r.returncode == 0, f"cannot bind mount: {r.stderr.strip()}")


@pytest.fixture
def private_tree() -> Iterator[str]:
    """A fresh ``/tmp/jctest-*`` directory, root-owned and mode 1777 like /tmp; mounts inside unmounted after."""
    require_root()
    path = tempfile.mkdtemp(prefix="jctest-", dir="/tmp")
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        unmount_all_under(path)
        shutil.rmtree(path, ignore_errors=True)


def cgroup2_root() -> str | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return fields[1]
    return None


@pytest.fixture
def job_cgroup() -> Iterator[str]:
    """A real cgroup2 directory ``<cgroup2>/jobcage-prtest-<hex>`` standing in for a job; emptied and removed after."""
    require_root()
    root = cgroup2_root()
    require(root is not None, "no cgroup2 hierarchy mounted")
    assert root is not None
    path = os.path.join(root, f"jobcage-prtest-{secrets.token_hex(4)}")
    try:
        os.mkdir(path)
    except OSError as e:
        require(False, f"cannot create a cgroup under {root}: {e}")
    try:
        yield path
    finally:
        _empty_cgroup(path)
        for d, _subdirs, _files in sorted(os.walk(path), key=lambda t: len(t[0]), reverse=True):
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.02)


def _empty_cgroup(path: str) -> None:
    kill_file = os.path.join(path, "cgroup.kill")
    for _ in range(200):
        pids = []
        for d, _subdirs, _files in os.walk(path):
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids += [int(x) for x in f.read().split()]
            except OSError:
                pass
        if not pids:
            return
        if os.path.exists(kill_file):
            with open(kill_file, "w") as f:
                f.write("1")
        else:
            for pid in pids:  # only processes the test put there
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.02)


def move_to_cgroup(path: str, pid: int) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def wait_for(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def spawn_detached(user: PoolUser, script: str, pidfile: str) -> int:
    """Start ``sh -c script`` as ``user`` in a new session, reparented away from the test (double fork).

    ``script`` runs with ``$$`` = the pid returned; it must write nothing to ``pidfile``, which is ours.
    """
    # The daemon must not inherit pipes of ours, or waiting for the launcher would wait for the daemon too.
    subprocess.run(["setsid", "--fork", "sh", "-c",
                    f'echo $$ > "{pidfile}.tmp" && mv "{pidfile}.tmp" "{pidfile}"; {script}'],
                   user=user.uid, group=user.gid, extra_groups=[], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(pidfile), what=f"pidfile {pidfile}")
    with open(pidfile) as f:
        return int(f.read())


def proc_state(pid: int) -> str | None:
    """The state letter from /proc/PID/stat (None when gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()[0].decode()


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")
