"""Helpers of the jobcage test suite (the fixtures in conftest.py are built on them).

Everything here reads the kernel directly (/proc, cgroupfs), never jobcage's own code, so a bug in jobcage
cannot hide itself from the tests nor break their cleanup.  Safety rules kept by every function:
processes are only ever signalled when they are in one of *our* test cgroup subtrees (names starting with
``SUBTREE_PREFIX``) or run as a uid of a user the suite created; nothing is matched by name or pattern.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
SUBTREE_PREFIX = "jobcage-t"
USER_PREFIX = "jct"
V1_USED = ("pids", "freezer", "cpuacct")  # the v1 hierarchies any jobcage driver may create cgroups in

# The jobcage under test: the one installed next to the interpreter running pytest (the project's venv), so
# a fresh CI clone tests its own code, not whatever /usr/local/bin points at.
_BIN = Path(sys.executable).parent
JOBCAGE = str(_BIN / "jobcage") if (_BIN / "jobcage").exists() else (shutil.which("jobcage") or "jobcage")
PYTHON = sys.executable


def require(cond: object, why: str) -> None:
    """A missing prerequisite: skip on a developer's machine, FAIL in CI (CI=true), where a skip would hide
    that the node (or `make bootstrap`) lacks something the project promises to support."""
    if cond:
        return
    if CI:
        pytest.fail(f"prerequisite missing (CI=true, so this fails instead of skipping): {why}", pytrace=False)
    pytest.skip(why)


def wait_for(pred: Callable[[], T], timeout: float = 10.0, what: str = "a condition", interval: float = 0.02) -> T:
    """Poll until pred() is truthy and return it; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}", pytrace=False)
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it).  Call it when the server is about
    to start, not at collection: by then a port free at import may be some client's."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- /proc ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str          # one letter of /proc/PID/stat: R S D T Z ...
    sid: int
    starttime: int      # clock ticks since boot: (pid, starttime) names a process even across pid reuse
    uid: int            # real
    euid: int
    suid: int
    sigign: int         # mask of ignored signals
    comm: str
    cmdline: str


def proc(pid: int) -> Proc | None:
    """A snapshot of /proc/PID, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    f = stat[stat.rindex(")") + 2:].split()
    st = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uids = st["Uid"].split()
    return Proc(pid=pid, ppid=int(f[1]), state=f[0], sid=int(f[3]), starttime=int(f[19]), uid=int(uids[0]),
                euid=int(uids[1]), suid=int(uids[2]), sigign=int(st["SigIgn"].strip(), 16), comm=comm,
                cmdline=cmdline.replace(b"\0", b" ").decode(errors="replace").strip())


def alive(pid: int, starttime: int | None = None) -> bool:
    """Exists and is not a zombie (pid 1 on these VMs reaps orphans lazily), and if starttime is given, is
    still the same process (not a reused pid)."""
    p = proc(pid)
    return p is not None and p.state not in ("Z", "X") and (starttime is None or p.starttime == starttime)


def proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat, None when gone."""
    p = proc(pid)
    return p.state if p is not None else None


def all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def pids_of_uid(uid: int) -> list[int]:
    """Live processes whose real, effective or saved uid is `uid`."""
    out = []
    for pid in all_pids():
        p = proc(pid)
        if p is not None and p.state not in ("Z", "X") and uid in (p.uid, p.euid, p.suid):
            out.append(pid)
    return out


def proc_cgroups(pid: int) -> dict[str, str]:
    """/proc/PID/cgroup as {hierarchy key: path}: '' for cgroup2, the controller list ('pids', 'cpu,cpuacct')
    for v1; each controller of a co-mounted v1 hierarchy is also a key of its own."""
    out: dict[str, str] = {}
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return out
    for line in text.splitlines():
        _hid, ctrls, path = line.split(":", 2)
        out[ctrls] = path
        for c in ctrls.split(","):
            out.setdefault(c, path)
    return out


# --- cgroup hierarchies ----------------------------------------------------------------------------------------

def hierarchies() -> dict[str, Path]:
    """{'unified': cgroup2 mount, 'pids'|'freezer'|'cpuacct': v1 mount} of those that are mounted."""
    out: dict[str, Path] = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        mnt, fstype, opts = parts[1].replace("\\040", " "), parts[2], parts[3].split(",")
        if fstype == "cgroup2":
            out.setdefault("unified", Path(mnt))
        elif fstype == "cgroup":
            for c in V1_USED:
                if c in opts:
                    out.setdefault(c, Path(mnt))
    return out


def mode_unavailable(mode: str) -> str | None:
    """Why this node cannot run the jobcage driver `mode` ('auto', 'v1', 'hybrid', 'v2'), None if it can."""
    h = hierarchies()
    v2 = h.get("unified")
    if mode == "auto":
        return None if (v2 is not None or "freezer" in h or "pids" in h) else "no cgroup hierarchy mounted"
    if mode == "v1":
        missing = [c for c in ("freezer", "pids") if c not in h]
        return f"v1 hierarchies missing: {', '.join(missing)}" if missing else None
    if mode == "hybrid":
        # cgroup.kill is not required: without it the driver kills through the freezer loop.
        # (Probing it here by listing children of the cgroup2 root was wrong on a fresh node,
        # whose root has no child yet.)
        return None if v2 is not None and "pids" in h else "hybrid needs cgroup2 plus a v1 pids hierarchy"
    if mode == "v2":
        if v2 is None or h.get("pids") is not None:
            return "not a pure cgroup2 node"
        return None
    return f"unknown mode {mode}"


def _cg_pids(d: Path) -> list[int]:
    try:
        return [int(x) for x in (d / "cgroup.procs").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _try_write(path: Path, value: str) -> None:
    with contextlib.suppress(OSError):
        path.write_text(value)


def subtree_dirs(subtree: str) -> list[Path]:
    """The subtree's top directory in every hierarchy where it exists."""
    return [root / subtree for root in hierarchies().values() if (root / subtree).is_dir()]


def tree_listing(subtree: str) -> set[str]:
    """Every cgroup directory under the subtree, in every hierarchy ('hierarchy:relpath')."""
    out = set()
    for key, root in hierarchies().items():
        top = root / subtree
        for d, dirs, _files in os.walk(top):
            for name in dirs:
                out.add(f"{key}:{os.path.relpath(os.path.join(d, name), root)}")
    return out


def empty_cgroups(dirs: Sequence[Path], timeout: float = 30.0) -> list[int]:
    """Kill every process in these cgroups (and below them) through the cgroups, never by name: pids.max 0
    (no new forks), cgroup.kill where it exists, SIGKILL to each member, thaw (a frozen task dies only once
    thawed), until they are empty.  Returns the survivors (empty = done)."""
    deadline = time.monotonic() + timeout
    while True:
        walked = [Path(d) for top in dirs if top.is_dir() for d, _s, _f in os.walk(top, topdown=False)]
        busy = {d: p for d in walked if (p := _cg_pids(d))}
        if not busy:
            return []
        if time.monotonic() > deadline:
            return sorted({p for v in busy.values() for p in v})
        for d, pids in busy.items():
            _try_write(d / "pids.max", "0")
            if (d / "cgroup.kill").exists():
                _try_write(d / "cgroup.kill", "1")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for d in walked:
            if (d / "freezer.state").exists():
                _try_write(d / "freezer.state", "THAWED")
            if (d / "cgroup.freeze").exists():
                _try_write(d / "cgroup.freeze", "0")
        time.sleep(0.05)


def remove_cgroups(dirs: Sequence[Path], timeout: float = 30.0) -> list[str]:
    """Empty (empty_cgroups) and rmdir these cgroups and everything below them, bottom-up.  Returns problems."""
    deadline = time.monotonic() + timeout
    problems: list[str] = []
    left = empty_cgroups(dirs, timeout)
    if left:
        problems.append(f"processes survive in {', '.join(map(str, dirs))}: {left}")
    for top in dirs:
        for d, _s, _f in os.walk(top, topdown=False):
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno == errno.EBUSY and time.monotonic() < deadline:
                        time.sleep(0.02)  # the last exit is still being torn down
                        continue
                    problems.append(f"cannot rmdir {d}: {e.strerror}")
                    break
    return problems


def purge_subtree(subtree: str, timeout: float = 30.0) -> list[str]:
    """Kill every process in the subtree's cgroups and rmdir all of them, bottom-up, in every hierarchy.
    Returns problems (empty = clean)."""
    if not subtree.startswith(SUBTREE_PREFIX) or "/" in subtree or ".." in subtree:
        raise ValueError(f"refusing to purge {subtree!r}: not a test subtree")
    return remove_cgroups(subtree_dirs(subtree), timeout)


def cgroup2_root() -> Path:
    """The cgroup2 mount (a test needing one requires it)."""
    root = hierarchies().get("unified")
    require(root is not None, "no cgroup2 hierarchy mounted")
    assert root is not None
    return root


def move_to_cgroup(path: str | Path, pid: int) -> None:
    Path(path, "cgroup.procs").write_text(str(pid))


def thaw_test_cgroups_of(pid: int) -> None:
    """Thaw the freezer cgroups holding pid if (and only if) they belong to a test subtree: a frozen
    process cannot die, and user teardown may run before the jc_env teardown."""
    h = hierarchies()
    for key, path in proc_cgroups(pid).items():
        if not path.startswith("/" + SUBTREE_PREFIX):
            continue
        if key == "freezer" and "freezer" in h:
            _try_write(h["freezer"] / path.lstrip("/") / "freezer.state", "THAWED")
        if key == "" and "unified" in h:
            _try_write(h["unified"] / path.lstrip("/") / "cgroup.freeze", "0")


# --- users ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path
    made_home: bool = True   # useradd made the home (userdel removes it); False: a home the test owns

    def argv(self, argv: Sequence[str]) -> list[str]:
        """argv run as this user: setpriv execs in place (no PAM, no extra fork), so a Popen's pid is the
        command's pid."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *argv]

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(HOME=str(self.home), USER=self.name, LOGNAME=self.name)
        return env


def _run_locked(argv: list[str], attempts: int = 30) -> subprocess.CompletedProcess[str]:
    """useradd/userdel fail while another process holds /etc/passwd's lock (other sessions): retry."""
    for attempt in range(attempts):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if r.returncode == 0 or "lock" not in (r.stderr + r.stdout).lower() or attempt == attempts - 1:
            return r
        time.sleep(0.1 + secrets.randbelow(300) / 1000)
    raise AssertionError("unreachable")


def create_user(prefix: str = USER_PREFIX, home: str | None = None, make_home: bool = True) -> User:
    """A real user (useradd, uid >= 1000, its own group) with a home useradd makes; with `home` or
    make_home=False, no home is made (`home`: the path its account names)."""
    require(shutil.which("useradd") is not None and shutil.which("setpriv") is not None,
            "useradd and setpriv are needed for test users")
    name = f"{prefix}{secrets.token_hex(4)}"
    argv = ["useradd", "--shell", "/bin/sh", "--user-group", "-K", "UID_MIN=1000"]
    make_home = make_home and home is None
    argv += ["--create-home"] if make_home else ["--no-create-home"]
    argv += ["--home-dir", home] if home is not None else []
    r = _run_locked(argv + [name])
    if r.returncode != 0:
        raise RuntimeError(f"useradd {name} failed: {r.stderr.strip()}")
    e = pwd.getpwnam(name)
    assert e.pw_uid >= 1000, e
    return User(name=name, uid=e.pw_uid, gid=e.pw_gid, home=Path(e.pw_dir), made_home=make_home)


def kill_uid(uid: int, timeout: float = 20.0) -> list[int]:
    """SIGKILL every process of a uid the suite created (real, effective or saved uid), until none is left;
    returns survivors.  Each process is pinned with a pidfd and its uid checked again before the signal: a
    recycled pid is never signalled."""
    if uid < 1000:
        raise ValueError(f"refusing to kill processes of system uid {uid}")
    deadline = time.monotonic() + timeout
    while pids := pids_of_uid(uid):
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                p = proc(pid)
                if p is not None and uid in (p.uid, p.euid, p.suid):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
            thaw_test_cgroups_of(pid)
        if time.monotonic() > deadline:
            return pids
        time.sleep(0.02)
    return []


def delete_user(user: User) -> list[str]:
    """Kill the user's processes and userdel it (with its home when useradd made it).  Returns problems."""
    problems = []
    left = kill_uid(user.uid)
    if left:
        problems.append(f"processes of {user.name} survive: {left}")
    r = _run_locked(["userdel", "--remove" if user.made_home else "--force", user.name])
    # userdel -r exits 12 when only the mail spool was missing, 6 when the user is already gone
    if r.returncode not in (0, 6, 12):
        problems.append(f"userdel {user.name}: {r.stderr.strip()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/run/sudo/ts/{user.name}")
    return problems


def run_as(user: User, argv: Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """argv as the user (no supplementary groups), output captured."""
    return subprocess.run(list(argv), user=user.uid, group=user.gid, extra_groups=[], check=check,
                          capture_output=True, text=True, **kw)


def popen_as(user: User, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
    return subprocess.Popen(list(argv), user=user.uid, group=user.gid, extra_groups=[], **kw)


def spawn_detached(user: User, script: str, pidfile: str) -> int:
    """Start ``sh -c script`` as ``user`` in a new session, reparented away from the test (double fork).

    ``script`` runs with ``$$`` = the pid returned; it must write nothing to ``pidfile``, which is ours.
    """
    # The daemon must not inherit pipes of ours, or waiting for the launcher would wait for the daemon too.
    subprocess.run(["setsid", "--fork", "sh", "-c",
                    f'echo $$ > "{pidfile}.tmp" && mv "{pidfile}.tmp" "{pidfile}"; {script}'],
                   user=user.uid, group=user.gid, extra_groups=[], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(pidfile), 10, f"pidfile {pidfile}")
    with open(pidfile) as f:
        return int(f.read())


# --- mounts ----------------------------------------------------------------------------------------------------

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


def socket_exchange(path: str, payload: bytes, *, shutdown: bool = True, timeout: float = 20.0) -> dict | None:
    """Send raw bytes, read one length-prefixed JSON answer; None if the agent closed without answering."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(payload)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        hdr = _recv_exact(s, 4)
        if hdr is None:
            return None
        (n,) = struct.unpack("!I", hdr)
        body = _recv_exact(s, n)
        return None if body is None else json.loads(body)


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = s.recv(n - len(buf))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def frame(obj: object) -> bytes:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack("!I", len(data)) + data


def request(path: str, method: str, **params: Any) -> dict:
    """One well-formed request; the raw response dict ({'ok': ..., 'result'|'error': ...})."""
    resp = socket_exchange(path, frame({"method": method, "params": params}))
    assert resp is not None, f"agent closed the connection without answering {method}"
    return resp


# --- TOML (just what a jobcage config needs) ---------------------------------------------------------------------

def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def toml_dump(doc: Mapping[str, Mapping[str, object]]) -> str:
    out = []
    for section, values in doc.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
        out.append("")
    return "\n".join(out)


def merge(base: dict[str, dict[str, Any]], over: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in over.items():
        out.setdefault(section, {}).update(values)
    return out


# --- running things ------------------------------------------------------------------------------------------

@dataclass
class Result:
    """A finished command: what tests assert on."""
    argv: list[str]
    rc: int
    out: str
    err: str

    def ok(self) -> Result:
        assert self.rc == 0, f"{' '.join(self.argv)} -> rc {self.rc}\nstdout: {self.out}\nstderr: {self.err}"
        return self

    def json(self) -> Any:
        return json.loads(self.ok().out)

    def clean_error(self, rc: int = 1, contains: str | None = None) -> str:
        """The contract for expected failures: exit rc, exactly one line on stderr, no traceback."""
        what = f"{' '.join(self.argv)!r} -> rc {self.rc}\nstdout: {self.out}\nstderr: {self.err}"
        assert self.rc == rc, what
        assert "Traceback" not in self.err, what
        lines = [ln for ln in self.err.splitlines() if ln.strip()]
        if rc == 1:
            assert len(lines) == 1, what
        else:
            assert lines, what
        if contains is not None:
            assert contains.lower() in self.err.lower(), what
        return lines[0]


@dataclass
class Tracked:
    """Popen handles a fixture started, to be killed at teardown if the cgroup purge did not get them."""
    procs: list[subprocess.Popen] = field(default_factory=list)

    def add(self, p: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)


def read_int(path: Path | str) -> int | None:
    """An integer a test process writes to a file; None while it is missing or half-written."""
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def pid_file(path: Path, timeout: float = 60.0) -> int:
    """The pid a test process writes to `path`, once it is there."""
    return wait_for(lambda: read_int(path), timeout, f"{path.name} to be written")


def ticks(path: Path) -> int:
    """Lines a test loop appended to `path` so far (0 while it is missing)."""
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def keyed(path: Path) -> dict[str, str]:
    """A cgroup 'key value' file (cgroup.events, memory.events) as a dict."""
    return dict(line.split() for line in path.read_text().splitlines())


def fifo(d: Path, name: str) -> Path:
    """A FIFO every test user may open: a job's shell blocks on it (`read _ < fifo`) until open_gate."""
    p = d / name
    os.mkfifo(p)
    p.chmod(0o666)
    return p


def open_gate(path: Path, timeout: float = 30.0) -> None:
    """Write a line into a FIFO a job reads; waits for the reader to open it (ENXIO until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"nobody opened {path} for reading", pytrace=False)
            time.sleep(0.02)
    os.write(fd, b"go\n")
    os.close(fd)


def freeze_directly(env: JcEnv, job: str, frozen: bool) -> None:
    """Freeze or thaw the job's cgroup the way a batch system's own freezer does, and wait for the kernel."""
    d = env.member_dir(job)
    if (d / "cgroup.freeze").exists():
        (d / "cgroup.freeze").write_text("1" if frozen else "0")
        wait_for(lambda: f"frozen {int(frozen)}" in (d / "cgroup.events").read_text(), 30, "the freezer")
    else:
        (d / "freezer.state").write_text("FROZEN" if frozen else "THAWED")
        wait_for(lambda: (d / "freezer.state").read_text().strip() == ("FROZEN" if frozen else "THAWED"), 30,
                 "the freezer")


def read_pid_files(paths: Iterable[Path]) -> list[int]:
    return [p for p in (read_int(x) for x in paths) if p]


# --- a private jobcage installation: config, subtree, state, socket ------------------------------------------------

class JcEnv:
    """One private jobcage "node" for a test: its own cgroup subtree (``jobcage-t<hex>`` in every hierarchy),
    state dir, control socket and TOML config; ``env`` carries JOBCAGE_CONFIG for subprocesses.

    ``base`` (a short 0755 dir under /tmp) holds the config, the socket and ``scratch`` (mode 1777, for files
    the test users write): test users must reach them, and a socket path must stay under 108 bytes.
    """

    def __init__(self, state_dir: Path, mode: str = "auto",
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.subtree = f"{SUBTREE_PREFIX}{secrets.token_hex(4)}"
        self.base = Path(tempfile.mkdtemp(prefix="jct-", dir="/tmp"))
        self.base.chmod(0o755)
        self.scratch = self.base / "scratch"
        self.scratch.mkdir()
        self.scratch.chmod(0o1777)
        self.state_dir = state_dir
        self.config_path = self.base / "jobcage.toml"
        self.socket_path = str(self.base / "agent.sock")
        self.tracked = Tracked()
        self.doc: dict[str, dict[str, Any]] = {
            # placement "top": the private subtree at the top, also on a systemd node where auto would pick
            # the delegated cgroup of jobcage-jobs.service (tests/test_systemd.py tests that one)
            "cgroups": {"mode": mode, "subtree": self.subtree, "placement": "top"},
            "agent": {"state_dir": str(state_dir), "socket": self.socket_path, "reconcile_interval": 1.0},
            "tracer": {"backend": "off"},
            "cleanup": {"enabled": False},
        }
        self.write_config(overrides or {})
        self.env = dict(os.environ, JOBCAGE_CONFIG=str(self.config_path))

    # config ---------------------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return str(self.doc["cgroups"]["mode"])

    def write_config(self, overrides: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge {section: {key: value}} into the config and rewrite it (restart an agent to apply)."""
        self.doc = merge(self.doc, overrides)
        assert self.doc["cgroups"]["subtree"] == self.subtree, "the subtree is the fixture's, not the test's"
        self.config_path.write_text(toml_dump(self.doc))
        self.config_path.chmod(0o644)

    def config(self) -> Any:
        from jobcage.agent.config import load

        return load(str(self.config_path))

    def driver(self) -> Any:
        """The cgroups driver of this env (same mode, same subtree)."""
        from jobcage.cgroups import get_driver

        cfg = self.config()
        return get_driver(cfg.cgroup_mode, cfg.cgroup_subtree)

    def manager(self) -> Any:
        """A JobManager on this env: the direct path, in-process."""
        from jobcage.agent.lifecycle import JobManager

        return JobManager(self.config())

    # commands -------------------------------------------------------------------------------------------------
    def run(self, argv: Sequence[str], user: User | None = None, timeout: float = 120.0,
            input: str | None = None) -> Result:
        argv = list(argv) if user is None else user.argv(argv)
        env = self.env if user is None else user.env(self.env)
        cwd = "/" if user is None else str(user.home)
        try:
            r = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                               input=input, stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{' '.join(argv)} did not finish in {timeout:g}s (stderr: {e.stderr!r})", pytrace=False)
        return Result(argv, r.returncode, r.stdout, r.stderr)

    def jobcage(self, *args: str, user: User | None = None, timeout: float = 120.0) -> Result:
        """`jobcage ARGS` as a real subprocess (as root, or as `user`)."""
        return self.run([JOBCAGE, *args], user=user, timeout=timeout)

    def popen(self, argv: Sequence[str], user: User | None = None, **kw: Any) -> subprocess.Popen:
        """A background process (as root or `user`), killed at teardown if still running."""
        argv = list(argv) if user is None else user.argv(argv)
        kw.setdefault("env", self.env if user is None else user.env(self.env))
        kw.setdefault("cwd", "/" if user is None else str(user.home))
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)  # a stray terminal signal must not reach pytest
        return self.tracked.add(subprocess.Popen(argv, **kw))

    def start_job(self, job_id: str, script: str, user: User | None = None, shell: str = "/bin/sh",
                  via_root: bool = True) -> subprocess.Popen:
        """`jobcage run JOB -- sh -c SCRIPT` in the background.

        via_root=True: root runs the job starter (the direct path, like a batch system's prolog) and drops to
        `user` with setpriv after joining the job; via_root=False: `user` runs `jobcage run` itself (that
        needs the agent, the only way a non-root caller reaches the job)."""
        cmd = [shell, "-c", script]
        if user is not None and via_root:
            return self.popen([JOBCAGE, "run", job_id, "--", *user.argv(cmd)], env=user.env(self.env),
                              cwd=str(user.home))
        return self.popen([JOBCAGE, "run", job_id, "--", *cmd], user=user)

    # kernel views ---------------------------------------------------------------------------------------------
    def cgroup_dirs(self, job_id: str) -> dict[str, Path]:
        """{hierarchy: directory} of a job in every hierarchy this env's mode uses."""
        h = hierarchies()
        keys = {"v1": ("freezer", "pids", "cpuacct"), "hybrid": ("unified", "pids"),
                "v2": ("unified",)}[self.effective_mode()]
        return {k: h[k] / self.subtree / job_id for k in keys if k in h}

    def pids_dir(self, job_id: str) -> Path:
        """The directory holding a job's pids.max / pids.current: the v1 pids hierarchy (v1, hybrid), the job's
        one cgroup2 directory on pure v2."""
        dirs = self.cgroup_dirs(job_id)
        return dirs["pids"] if "pids" in dirs else dirs["unified"]

    @property
    def caps_subtree(self) -> str:
        """A test subtree beside jobcage's (``<subtree>-caps``) for cgroups that are not jobs."""
        return f"{self.subtree}-caps"

    def make_pids_cap(self, name: str, limit: int) -> Path:
        """A cgroup that is not a job, with pids.max = limit, in the hierarchy that holds the pids controller.
        It sits beside this env's subtree, never in it: on pure v2 the pids cgroup is also the membership one,
        and jobcage takes every cgroup in its subtree for a job (adopt refuses "already belongs to job ...").
        On pure v2 the root's subtree_control needs +pids (a systemd node has it).  Cleanup removes it."""
        h = hierarchies()
        root = h["unified"] if self.effective_mode() == "v2" else h["pids"]
        top = root / self.caps_subtree
        if self.effective_mode() == "v2":
            for d in (root, top):
                d.mkdir(exist_ok=True)
                sc = d / "cgroup.subtree_control"
                if "pids" not in sc.read_text().split():
                    sc.write_text("+pids")
        top.mkdir(exist_ok=True)
        cap = top / name
        cap.mkdir()
        (cap / "pids.max").write_text(str(limit))
        return cap

    def effective_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        from jobcage.cgroups.detect import detect

        return detect().mode

    def member_dir(self, job_id: str) -> Path:
        """Where membership is read: cgroup2 (hybrid, v2) or the v1 freezer."""
        return next(iter(self.cgroup_dirs(job_id).values()))

    def job_pids(self, job_id: str) -> list[int]:
        """Live members, read straight from cgroupfs (zombies excluded)."""
        return [p for p in _cg_pids(self.member_dir(job_id)) if alive(p)]

    def in_job(self, pid: int, job_id: str) -> bool:
        """pid is in the job's cgroup in *every* hierarchy the mode uses (membership and limits)."""
        cg = proc_cgroups(pid)
        want = f"/{self.subtree}/{job_id}"
        keys = {"unified": ""}
        return all(cg.get(keys.get(k, k)) == want for k in self.cgroup_dirs(job_id))

    def listing(self) -> set[str]:
        return tree_listing(self.subtree)

    def cleanup(self) -> list[str]:
        self.tracked.kill_all()
        problems = purge_subtree(self.subtree) + purge_subtree(self.caps_subtree)
        shutil.rmtree(self.base, ignore_errors=True)
        return problems


class AgentProc:
    """`jobcage agent --config PATH` as a subprocess of the test, with its log in the state dir."""

    def __init__(self, env: JcEnv, log_dir: Path) -> None:
        self.env = env
        self.log_path = log_dir / "agent.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 300.0) -> AgentProc:   # generous: bcc compiles ~30 s on an emulated node
        assert self.proc is None or self.proc.poll() is not None, "agent already running"
        self.starts += 1
        log = open(self.log_path, "a")  # noqa: SIM115 - the child keeps it; closed with the process
        log.write(f"--- start {self.starts} ---\n")
        log.flush()
        self.proc = subprocess.Popen([JOBCAGE, "agent", "--config", str(self.env.config_path)], env=self.env.env,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"agent exited with {self.proc.returncode} at start:\n{self.log()}", pytrace=False)
            if self.ping():
                return self
            if time.monotonic() > deadline:
                pytest.fail(f"agent did not answer ping within {timeout:g}s:\n{self.log()}", pytrace=False)
            time.sleep(0.05)

    def ping(self) -> bool:
        try:
            return bool(socket_exchange(self.env.socket_path, frame({"method": "ping", "params": {}}),
                                        timeout=5).get("ok"))  # type: ignore[union-attr]
        except (OSError, AttributeError, ValueError):
            return False

    def call(self, method: str, **params: Any) -> dict:
        """Raw request as root: {'ok': True, 'result': ...} or {'ok': False, 'error': {...}}."""
        return request(self.env.socket_path, method, **params)

    def result(self, method: str, **params: Any) -> Any:
        resp = self.call(method, **params)
        assert resp.get("ok"), f"{method}({params}) failed: {resp}"
        return resp["result"]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Stop it (SIGTERM, then SIGKILL after `timeout`); returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)

    def restart(self) -> AgentProc:
        self.stop()
        return self.start()

    def log(self, tail: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-tail:])
        except FileNotFoundError:
            return "(no log)"


# --- tracer scenarios (test_tracer, test_accounting, test_identity, test_userns, ...) ---------------------------

TRACE_CGROUP_PREFIX = "jobcage-trtest-"
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

INT80_C = r"""
/* int80: 32-bit syscalls (int 0x80) from this 64-bit process, one after the other: setuid32(0), setuid16(0),
 * setresuid32(-1, -1, -1), unshare(CLONE_NEWUSER); prints each return value (-38: the kernel runs no 32-bit
 * syscalls). */
#include <stdio.h>
static long sc32(long nr, long a, long b, long c) {
    long r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory", "r8", "r9", "r10", "r11");
    return r;
}
int main(void) {
    long r[4];
    r[0] = sc32(213, 0, 0, 0);
    r[1] = sc32(23, 0, 0, 0);
    r[2] = sc32(208, -1, -1, -1);
    r[3] = sc32(310, 0x10000000, 0, 0);
    printf("%ld %ld %ld %ld\n", r[0], r[1], r[2], r[3]);
    return 0;
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
        """Kill what is inside (through the cgroup) and remove it (and its v1 pids twin)."""
        dirs = [self.path] + ([self.pids_path] if self.pids_path is not None else [])
        problems = remove_cgroups(dirs, timeout=20)
        if problems:
            raise AssertionError(f"{self.path}: {'; '.join(problems)}")


@dataclass
class TraceUsers:
    pilot: User
    pool: User


@dataclass
class Helpers:
    dir: Path
    sutest: Path
    forkbomb: Path
    daemonize: Path
    burn: Path
    idloop: Path
    int80: Path


@dataclass
class Collector:
    """on_event target: keeps every event (jobcage.agent.events.TraceEvent)."""
    events: list[Any] = field(default_factory=list)

    def __call__(self, ev: Any) -> None:
        self.events.append(ev)

    def of(self, job_id: str, kind: str | None = None, pid: int | None = None) -> list[Any]:
        return [e for e in self.events if e.job_id == job_id and (kind is None or e.kind == kind)
                and (pid is None or e.pid == pid)]


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def build_helpers(d: Path) -> Helpers:
    """Compile and write the tracer scenarios' helper programs into d (sutest setuid root)."""
    require(shutil.which("gcc") is not None, "gcc is missing (needed to build the setuid test helper)")
    d.chmod(0o755)   # the test users must reach the helper
    for name, src in (("sutest", SUTEST_C), ("forkbomb", FORKBOMB_C), ("int80", INT80_C)):
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
    return Helpers(d, sutest, d / "forkbomb", d / "daemonize.py", d / "burn.py", d / "idloop.py", d / "int80")


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


def kernel_has_kprobes() -> bool:
    """The kernel's own answer: its kprobe perf PMU or tracefs' kprobe_events (and the x86-64 register frame the
    tracer's kprobe programs read): where the agent hooks the syscalls by kprobe (`[tracer] syscall_hooks`)."""
    return os.uname().machine == "x86_64" and (os.path.exists("/sys/bus/event_source/devices/kprobe/type")
                                               or os.path.exists("/sys/kernel/tracing/kprobe_events"))


def shell_job(cg: TestCgroup, script: str, user: User | None = None) -> GatedJob:
    """bash that waits for the gate, then runs `script` (ending in `exit` so bash does not exec the last
    command in place: the trail's parent pid is then this bash)."""
    return GatedJob(cg, ["/bin/bash", "-c", f"read -r _gate; {script}\nexit $?"], user)


def drive(tracers: Sequence[Any], until: Callable[[], bool], timeout: float = 30.0,
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


# -- a job's trail, identities and whois, as users read them (jobcage show/whois, jobtrace --events) ---------------

JOBTRACE = str(_BIN / "jobtrace")
SUDO, SETPRIV, SH = "/usr/bin/sudo", "/usr/bin/setpriv", "/bin/sh"
BPF = {"tracer": {"backend": "bpf"}}
PROC = {"tracer": {"backend": "proc"}}
BOTH = [pytest.param(BPF, id="bpf"), pytest.param(PROC, id="proc")]   # jc_env's indirect params: each backend


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def show(env: JcEnv, job: str, user: User | None = None) -> dict:
    return env.jobcage("show", job, "--json", user=user).json()


def trail(env: JcEnv, job: str) -> list[dict]:
    """`jobtrace JOB --events --json`: one JSON object per line."""
    out = env.run([JOBTRACE, job, "--events", "--json"]).ok().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def whois(env: JcEnv, uid: int, at: float | str | None = None) -> list[dict]:
    args = ["whois", "--uid", str(uid), "--json"]
    if at is not None:
        args += ["--at", at if isinstance(at, str) else iso(at)]
    return env.jobcage(*args).json()


def vanish(env: JcEnv, job: str) -> None:
    """The job's cgroup goes behind jobcage's back (an admin's rmdir after killing its processes)."""
    dirs = env.cgroup_dirs(job)
    member = env.member_dir(job)
    if (member / "cgroup.kill").exists():
        (member / "cgroup.kill").write_text("1")
    else:
        for pid in env.job_pids(job):
            os.kill(pid, 9)   # our test job's processes, found through its cgroup
    wait_for(lambda: not env.job_pids(job) and not (member / "cgroup.procs").read_text().split(), 30,
             "the job's cgroup to empty")
    for d in dirs.values():
        wait_for(lambda d=d: _rmdir(d), 30, f"rmdir {d}")


def _rmdir(d: Path) -> bool:
    try:
        d.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def idents(s: dict) -> dict[int, dict]:
    return {i["uid"]: i for i in s["identities"]}


def pick(evs: list[dict], **match: Any) -> list[dict]:
    """Events whose fields (or detail fields, as detail_KEY=...) equal the given values."""
    def get(e: dict, k: str) -> Any:
        return e["detail"].get(k[7:]) if k.startswith("detail_") else e.get(k)
    return [e for e in evs if all(get(e, k) == v for k, v in match.items())]


def first(evs: list[dict], what: str, **match: Any) -> dict:
    hits = pick(evs, **match)
    if not hits:
        raise AssertionError(f"no {what} event with {match} in the trail:\n" + "\n".join(
            f"  {e['kind']} pid={e['pid']} ppid={e['ppid']} uid={e['uid']} euid={e['euid']} {e['filename']} "
            f"{e['detail']}" for e in evs))
    return hits[0]


def wait_events(agent: AgentProc, job: str, pred: Callable[[list[dict]], bool], what: str,
                timeout: float = 30.0) -> list[dict]:
    """Poll the agent's trail (raw socket: fast) until pred holds."""
    from jobcage.agent.api import EVENTS_PAGE

    def all_events() -> list[dict]:
        evs: list[dict] = []
        while True:  # the agent answers in pages
            page = agent.result("events", job_id=job, after_id=evs[-1]["id"] if evs else 0)
            evs += page
            if len(page) < EVENTS_PAGE:
                return evs
    return wait_for(lambda: (evs := all_events()) and pred(evs) and evs, timeout, what, interval=0.1)


@dataclass(frozen=True)
class Ids:
    """The identity tests' three users (the ``ids`` fixture)."""
    pilot: User
    pool: User
    other: User   # neither owner nor identity of any job


def job_scratch(env: JcEnv, job: str) -> Path:
    """A per-job scratch dir every test user may write its pid files into."""
    d = env.scratch / job
    d.mkdir()
    d.chmod(0o1777)
    return d


def script(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.write_text(text)
    p.chmod(0o644)
    return p


def prologue(env: JcEnv, job: str, owner: User, *extra: str) -> dict:
    return json.loads(env.jobcage("prologue", job, "--uid", str(owner.uid), "--gid", str(owner.gid),
                                  *extra, "--json").ok().out)


def cpu_sum_ok(s: dict) -> tuple[bool, str]:
    """Whether the identities' CPU (show --json) adds up to the cgroup's, within max(1 %, 5 ms)."""
    total = sum(i["cpu_seconds"] for i in s["identities"])
    tol = max(0.01 * s["cpu_seconds"], 0.005)
    return abs(total - s["cpu_seconds"]) <= tol, f"identities {total:.4f}s vs cgroup {s['cpu_seconds']}s (tol {tol})"


EXECLOOP_C = r"""
/* execloop N: after one byte on stdin, fork + execve(/bin/true) + waitpid N times. */
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char c, *av[] = {"true", NULL}, *ev[] = {NULL};
    if (argc < 2 || read(0, &c, 1) != 1) return 2;
    for (long i = 0, n = atol(argv[1]); i < n; i++) {
        pid_t p = fork();
        if (p == 0) { execve("/bin/true", av, ev); _exit(127); }
        if (p > 0) waitpid(p, NULL, 0);
    }
    return 0;
}
"""


def build_execloop(d: Path) -> Path:
    """execloop (above) compiled into d (the ``execloop`` fixture)."""
    require(shutil.which("gcc") is not None, "gcc is missing")
    (d / "execloop.c").write_text(EXECLOOP_C)
    subprocess.run(["gcc", "-O2", "-o", str(d / "execloop"), str(d / "execloop.c")], check=True)
    return d / "execloop"


# -- a batch system's own cgroups (the attach tests) ----------------------------------------------------------

class FakeBatch:
    """A batch system's cgroups, laid out like Slurm's cgroup/v2 plugin, in every hierarchy of `kinds` present."""

    def __init__(self, kinds: tuple[str, ...] = ("unified", "pids")) -> None:
        self.top = f"{SUBTREE_PREFIX}batch{secrets.token_hex(3)}"   # a test subtree: jctest's purge may clean it
        h = hierarchies()
        self.roots = {k: h[k] for k in kinds if k in h}
        self.procs: list[subprocess.Popen] = []

    def job_dir(self, job: int, kind: str = "unified") -> Path:
        return self.roots[kind] / self.top / "slurmstepd.scope" / f"job_{job}"

    def make_job(self, job: int, pids_max: int = 256) -> Path:
        for kind in self.roots:
            self.job_dir(job, kind).mkdir(parents=True)
        if "pids" in self.roots:   # the batch system's own limit (the fork-bomb rule: pids.max <= 256)
            (self.job_dir(job, "pids") / "pids.max").write_text(str(pids_max))
        return self.job_dir(job)

    def make_step(self, job: int, step: str) -> dict[str, Path]:
        out = {}
        for kind in self.roots:
            d = self.job_dir(job, kind) / f"step_{step}" / "user" / "task_0"
            d.mkdir(parents=True)
            out[kind] = d
        return out

    def launch(self, task: dict[str, Path], argv: list[str], user: User, env: dict[str, str]) -> subprocess.Popen:
        """Start argv as `user` inside the task cgroups, as slurmstepd does: the child enters the cgroups as root,
        drops to the user, then execs (so root never runs anything in the job)."""
        procs_files = [str(d / "cgroup.procs") for d in task.values()]

        def enter() -> None:
            for f in procs_files:
                with open(f, "w") as fh:
                    fh.write(str(os.getpid()))
            os.initgroups(user.name, user.gid)
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)

        p = subprocess.Popen(argv, env=user.env(env), cwd=str(user.home), preexec_fn=enter, start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def remove_job(self, job: int) -> None:
        """The end of the job as the batch system sees it: kill everything, remove the job's cgroups."""
        top = self.job_dir(job)
        if (top / "cgroup.kill").exists():
            (top / "cgroup.kill").write_text("1")
        wait_for(lambda: not any(int(x) for d, _s, _f in os.walk(top) for x in (Path(d) / "cgroup.procs")
                                 .read_text().split() if alive(int(x))), 20, "the batch job's processes to die")
        for kind in self.roots:
            for d, _s, _f in os.walk(self.job_dir(job, kind), topdown=False):
                wait_for(lambda d=d: _rmdir(d), 10, f"rmdir {d}")

    def listing(self) -> set[str]:
        return {os.path.relpath(d, root) for root in self.roots.values() for d, _s, _f in os.walk(root / self.top)}

    def cleanup(self) -> list[str]:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        return purge_subtree(self.top)


def _rmdir(d: str) -> bool:
    try:
        os.rmdir(d)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def job_no() -> int:
    return 40000 + secrets.randbelow(20000)


# -- exported records (the export tests) ----------------------------------------------------------------------

def store_ids(env: JcEnv) -> dict[int, str]:
    """{event id: kind} of every row the node's store holds (what must be exported)."""
    db = sqlite3.connect(f"file:{env.state_dir / 'jobcage.db'}?mode=ro", uri=True, timeout=30)
    try:
        return dict(db.execute("SELECT id, kind FROM events").fetchall())
    finally:
        db.close()


def read_records(*paths: Path) -> list[dict]:
    out = []
    for p in paths:
        if not p.exists():
            continue
        opener = gzip.open if p.read_bytes()[:2] == b"\x1f\x8b" else open
        with opener(p, "rt") as f:
            for line in f:
                out.append(json.loads(line[line.index("{"):]))
    return out


def exported(paths: list[Path], node: str) -> dict[int, dict]:
    return {r["event_id"]: r for r in read_records(*paths) if r["node"] == node}


def metric(port: int, name: str, sink: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{sink="{sink}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {sink} not in metrics:\n{text}")
