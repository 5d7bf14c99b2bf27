"""One driver interface over cgroup v1, hybrid and v2.

A driver manages named leaf cgroups under one subtree (default ``jobcage``) in
every hierarchy it uses.  It knows nothing of jobs: a name is just a directory.
The shared algorithms (confirmed freeze, kill-until-empty) live in the base
class; drivers provide the primitives of their hierarchies.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from . import proc
from .detect import Layout
from .errors import (
    AccessDenied,
    CgroupError,
    InvalidArgument,
    NoSuchCgroup,
    NoSuchProcess,
    Timeout,
    Unsupported,
)

MAX_NAME = 200


@contextmanager
def _oserror(path: str, pid: int | None = None) -> Iterator[None]:
    """Turn OSError from cgroupfs into the project's exceptions, once, here."""
    try:
        yield
    except FileNotFoundError:
        raise NoSuchCgroup(f"no such cgroup: {os.path.dirname(path) or path}", path=path) from None
    except ProcessLookupError:
        raise NoSuchProcess(f"no such process: {pid}", pid=pid, path=path) from None
    except PermissionError:
        raise AccessDenied(f"permission denied: {path}", pid=pid, path=path) from None
    except OSError as e:
        raise CgroupError(f"{path}: {e.strerror}", pid=pid, path=path) from None


def write(path: str, value: str, pid: int | None = None) -> None:
    with _oserror(path, pid):
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)


def read(path: str) -> str:
    with _oserror(path):
        with open(path) as f:
            return f.read()


def read_keyed(path: str) -> dict[str, str]:
    """'key value' lines (cgroup.events, cpu.stat, pids.events)."""
    out = {}
    for line in read(path).splitlines():
        k, _, v = line.partition(" ")
        out[k] = v.strip()
    return out


def check_name(name: str) -> str:
    """A leaf directory name that cannot escape the subtree."""
    if (not name or len(name) > MAX_NAME or "/" in name or "\0" in name or name in (".", "..")
            or name.startswith("cgroup.")):
        raise InvalidArgument(f"invalid cgroup name: {name!r}")
    return name


def describe_pids(pids: list[int]) -> str:
    """'pid uid cmd' for an error message: who survived."""
    parts = []
    for pid in pids[:10]:
        ids, argv = proc.uids(pid), proc.cmdline(pid, 4096)
        cmd = " ".join(argv or ()).strip()[:60] or "?"
        parts.append(f"pid {pid} uid {ids[0] if ids else '?'} '{cmd}'")
    more = f" (+{len(pids) - 10} more)" if len(pids) > 10 else ""
    return ", ".join(parts) + more


def signal_frozen(sig: int, pids: Callable[[], list[int]], frozen: Callable[[], bool] | None = None,
                  freeze: Callable[[], object] | None = None, thaw: Callable[[], object] | None = None) -> int:
    """sig to every pid at one frozen instant (freezer given): nobody forks or exits between the list and the
    kills.  Freezes only what was not frozen, and thaws only what it froze.  Returns how many got it."""
    froze = frozen is not None and freeze is not None and not frozen()
    if froze:
        freeze()
    n = 0
    try:
        for pid in pids():
            try:
                os.kill(pid, sig)
                n += 1
            except ProcessLookupError:
                pass
    finally:
        if froze and thaw is not None:
            thaw()
    return n


class Driver:
    """The interface.  Names are leaf cgroup names under the subtree."""

    mode = "none"
    has_kill = False      # cgroup.kill: atomic kill of the whole cgroup
    has_pids = False      # pids.max / pids.events available
    has_freeze = False
    poll_interval = 0.0005

    def __init__(self, layout: Layout, subtree: str = "jobcage") -> None:
        if not subtree or ".." in subtree.split("/") or subtree.startswith("/") or "\0" in subtree:
            raise InvalidArgument(f"invalid cgroup subtree: {subtree!r}")
        self.layout = layout
        self.subtree = subtree

    # -- primitives, per driver -------------------------------------------------
    def _dirs(self, name: str | None) -> list[str]:
        """Every directory of this cgroup (or of the subtree when name is None)."""
        raise NotImplementedError

    def path(self, name: str) -> str:
        """The membership directory: the one shown to users and read for pids."""
        return self._dirs(check_name(name))[0]

    def membership_root(self) -> str:
        """The subtree directory whose descendants' cgroup.procs are the members."""
        return self._dirs(None)[0]

    def _pids_dir(self, name: str) -> str:
        raise Unsupported("no pids controller on this node")

    def _set_frozen(self, name: str, frozen: bool) -> None:
        raise Unsupported("no freezer on this node")

    def frozen(self, name: str) -> bool:
        raise Unsupported("no freezer on this node")

    def _cgroup_kill(self, name: str) -> None:
        raise Unsupported("no cgroup.kill on this node")

    def cpu_usage_ns(self, name: str) -> int:
        raise NotImplementedError

    def cgroup_id(self, name: str) -> int | None:
        """cgroup2 id (what bpf_get_current_cgroup_id() returns), None without cgroup2."""
        v2 = self.layout.v2_root
        if not v2:
            return None
        with _oserror(self._v2_dir(name)):
            return os.stat(self._v2_dir(name)).st_ino

    def _v2_dir(self, name: str | None) -> str:
        assert self.layout.v2_root
        base = os.path.join(self.layout.v2_root, self.subtree)
        return base if name is None else os.path.join(base, check_name(name))

    # -- shared ---------------------------------------------------------------
    def features(self) -> dict:
        return {"mode": self.mode, "cgroup_kill": self.has_kill, "pids": self.has_pids,
                "freeze": self.has_freeze, "subtree": self._dirs(None)}

    def ensure_subtree(self) -> None:
        for d in self._dirs(None):
            with _oserror(d):
                os.makedirs(d, exist_ok=True)

    def exists(self, name: str) -> bool:
        return os.path.isdir(self.path(name))

    def list(self) -> list[str]:
        base = self._dirs(None)[0]
        try:
            return sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def create(self, name: str) -> str:
        """Create the cgroup in every hierarchy; existing is fine (idempotent)."""
        self.ensure_subtree()
        for d in self._dirs(check_name(name)):
            with _oserror(d):
                try:
                    os.mkdir(d)
                except FileExistsError:
                    pass
        return self.path(name)

    def remove(self, name: str, timeout: float = 5.0) -> None:
        """rmdir in every hierarchy.  EBUSY right after a kill is transient: retry."""
        deadline = time.monotonic() + timeout
        for d in reversed(self._dirs(check_name(name))):
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno == errno.EBUSY and time.monotonic() < deadline:
                        time.sleep(0.01)
                        continue
                    raise CgroupError(f"cannot remove {d}: {e.strerror}", path=d) from None

    def pids(self, name: str) -> list[int]:
        p = os.path.join(self.path(name), "cgroup.procs")
        return [int(x) for x in read(p).split()]

    def attach(self, name: str, pid: int) -> None:
        """Move pid (the whole process) into the cgroup in every hierarchy.

        The membership hierarchy comes first: a child forked between the writes
        is then a member (frozen and killed with the job) that sync() moves into
        the other hierarchies.  The other order would leave such a child in the
        job's limits but outside its membership, where kill and freeze miss it.
        """
        if pid <= 0:
            raise InvalidArgument(f"invalid pid: {pid}")
        for d in self._dirs(check_name(name)):
            write(os.path.join(d, "cgroup.procs"), str(pid), pid=pid)
        self.sync(name)

    def sync(self, name: str, rounds: int = 10) -> None:
        """Make every secondary hierarchy hold the members of the primary one.

        Repeated until a round moves nobody: a member may fork while it waits
        for its move, and its child inherits the old secondary cgroups."""
        dirs = self._dirs(check_name(name))
        if len(dirs) < 2:
            return
        for _ in range(rounds):
            moved = 0
            members = set(self.pids(name))
            for d in dirs[1:]:
                have = {int(x) for x in read(os.path.join(d, "cgroup.procs")).split()}
                for pid in members - have:
                    try:
                        write(os.path.join(d, "cgroup.procs"), str(pid), pid=pid)
                        moved += 1
                    except NoSuchProcess:
                        pass
            if not moved:
                return

    def set_pids_max(self, name: str, limit: int | None) -> None:
        if limit is not None and limit < 0:
            raise InvalidArgument(f"invalid pids limit: {limit}")
        write(os.path.join(self._pids_dir(name), "pids.max"), "max" if limit is None else str(limit))

    def pids_stats(self, name: str) -> dict:
        """{'current', 'max' (None = unlimited), 'limit_hits'}; Nones without pids."""
        if not self.has_pids:
            return {"current": len(self.pids(name)), "max": None, "limit_hits": None}
        d = self._pids_dir(name)
        mx = read(os.path.join(d, "pids.max")).strip()
        return {"current": int(read(os.path.join(d, "pids.current"))),
                "max": None if mx == "max" else int(mx),
                "limit_hits": int(read_keyed(os.path.join(d, "pids.events")).get("max", 0))}

    def _wait(self, what: str, name: str, cond: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = self.poll_interval
        while not cond():
            if time.monotonic() > deadline:
                raise Timeout(f"{what} of {self.path(name)} not confirmed after {timeout:g}s; "
                              f"processes: {describe_pids(self.pids(name))}", path=self.path(name))
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def freeze(self, name: str, timeout: float = 10.0) -> None:
        """Returns only when the kernel says every process is frozen."""
        self._set_frozen(name, True)
        self._wait("freeze", name, lambda: self.frozen(name), timeout)

    def thaw(self, name: str, timeout: float = 10.0) -> None:
        self._set_frozen(name, False)
        self._wait("thaw", name, lambda: not self.frozen(name), timeout)

    def signal(self, name: str, sig: int) -> int:
        """Deliver sig to every process at one frozen instant; returns how many got it."""
        if not self.has_freeze:
            return signal_frozen(sig, lambda: self.pids(name))
        return signal_frozen(sig, lambda: self.pids(name), lambda: self.frozen(name), lambda: self.freeze(name),
                             lambda: self.exists(name) and self.thaw(name))

    def kill(self, name: str, timeout: float = 10.0) -> None:
        """SIGKILL everything in the cgroup; return only when it is empty.

        With cgroup.kill the kernel does it atomically (forks racing with the
        kill are caught).  Without it: freeze (no one can fork), SIGKILL each
        pid, clamp pids.max so a thawed survivor cannot fork, thaw, repeat.
        """
        if self.has_kill:
            self._cgroup_kill(name)
            self._wait("kill", name, lambda: not self.pids(name), timeout)
            return
        deadline = time.monotonic() + timeout
        orig_max = self.pids_stats(name)["max"] if self.has_pids else None
        try:
            while self.pids(name):
                left = deadline - time.monotonic()
                if left <= 0:
                    pids = self.pids(name)
                    if not pids:
                        break
                    raise Timeout(f"kill of {self.path(name)} incomplete after {timeout:g}s; "
                                  f"survivors: {describe_pids(pids)}", path=self.path(name))
                if self.has_freeze:
                    self.freeze(name, timeout=left)
                for pid in self.pids(name):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                if self.has_pids:
                    self.set_pids_max(name, 0)
                if self.has_freeze:
                    self.thaw(name, timeout=max(deadline - time.monotonic(), 0.1))
                try:
                    self._wait("kill", name, lambda: not self.pids(name), min(0.05, max(left, 0.001)))
                except Timeout:
                    pass
        finally:
            if self.has_pids and self.exists(name):
                self.set_pids_max(name, orig_max)

    # -- small helpers the agent needs, still job-agnostic -----------------------
    META_XATTR = "trusted.jobcage.meta"

    def set_meta(self, name: str, data: bytes) -> None:
        """Opaque bytes kept by the kernel on the cgroup (a trusted xattr, root-only):
        state that survives the agent and its database."""
        p = self.path(name)
        with _oserror(p):
            os.setxattr(p, self.META_XATTR, data)

    def get_meta(self, name: str) -> bytes | None:
        p = self.path(name)
        try:
            return os.getxattr(p, self.META_XATTR)
        except OSError:
            return None

    def cgroup_of(self, pid: int) -> str | None:
        """The leaf name under our subtree that holds pid, None if outside it."""
        lines = proc.cgroups(pid)
        if lines is None:
            raise NoSuchProcess(f"no such process: {pid}", pid=pid)
        want = self._membership_key()
        path = lines.get(want)
        prefix = "/" + self.subtree + "/"
        if path is not None and path.startswith(prefix):
            return path[len(prefix):].split("/", 1)[0]
        return None

    def _membership_key(self) -> str:
        """The /proc/PID/cgroup controller field of the membership hierarchy."""
        return ""
