"""A cgroup at a path: operations on a cgroup somebody else created (a batch system's).

Where a :class:`~jobcage.cgroups.driver.Driver` manages named leaves in jobcage's own subtree,
:class:`CgroupAt` acts on one existing cgroup *and everything below it* (Slurm's
``job_N/step_M/user/task_K``, a systemd ``.slice`` with its ``.scope``).  It moves nothing
and writes no limit by itself: membership, freeze, kill, CPU and pids counters are read or
driven through the files the kernel gives every cgroup (``cgroup.procs``, ``cgroup.freeze``,
``cgroup.kill``, ``cpu.stat``; ``freezer.state`` in a v1 freezer hierarchy).  The only limit
it can write is ``pids.max``, and only when the caller asks (:meth:`set_pids_max`).

Nothing here knows of jobs.  :class:`Named` gives a driver's named cgroup the same interface,
so a caller can hold either kind the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal as _signal
import time
from collections.abc import Callable, Iterable

from . import proc
from .detect import Layout
from .driver import Driver, describe_pids, read, read_keyed, signal_frozen, write
from .errors import CgroupError, InvalidArgument, NoSuchCgroup, NoSuchProcess, Timeout, Unsupported

MEMBERSHIP_KINDS = ("cgroup2", "freezer")   # hierarchies whose cgroups can hold a job (freeze, kill)
COMPANIONS = ("pids", "cpuacct")           # v1 hierarchies read at the same relative path when present
LEAF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _mounts(layout: Layout) -> list[tuple[str, str]]:
    """(kind, mount point) of the hierarchies a held cgroup may live in, longest mount first."""
    out = []
    if layout.v2_root:
        out.append(("cgroup2", layout.v2_root))
    if "freezer" in layout.v1:
        out.append(("freezer", layout.v1["freezer"]))
    return sorted(out, key=lambda km: -len(km[1]))


def _split(layout: Layout, path: object) -> tuple[str, str, str]:
    """(kind, mount, relative path '/a/b') of a cgroup directory path; checked, not opened."""
    if not isinstance(path, str) or not path or "\0" in path or len(path) > 4096:
        raise InvalidArgument(f"invalid cgroup path: {str(path)[:80]!r}")
    if not path.startswith("/"):
        raise InvalidArgument(f"cgroup path must be absolute: {path!r}")
    if ".." in path.split("/"):
        raise InvalidArgument(f"cgroup path must not contain '..': {path!r}")
    norm = os.path.normpath(path)
    for kind, mnt in _mounts(layout):
        if norm == mnt:
            raise InvalidArgument(f"{norm} is the root cgroup: give the batch system's job cgroup below it")
        if norm.startswith(mnt.rstrip("/") + "/"):
            return kind, mnt, norm[len(mnt.rstrip("/")):]
    where = ", ".join(m for _k, m in _mounts(layout)) or "none mounted"
    raise InvalidArgument(f"{norm} is not under a cgroup mount that can hold a job ({where})")


def _proc_cgroup_lines(pid: int) -> dict[str, str]:
    """/proc/PID/cgroup as {'' (cgroup2) | v1 controller: relative path}."""
    lines = proc.cgroups(pid)
    if lines is None:
        raise NoSuchProcess(f"no such process: {pid}", pid=pid)
    return lines


def cgroup_paths_of(layout: Layout, pid: int) -> list[str]:
    """The directories of the cgroups holding pid, membership hierarchies only (cgroup2 first)."""
    lines = _proc_cgroup_lines(pid)
    out = []
    for kind, mnt in sorted(_mounts(layout), key=lambda km: km[0] != "cgroup2"):
        rel = lines.get("" if kind == "cgroup2" else kind)
        if rel is not None:
            out.append(mnt.rstrip("/") + rel.rstrip("/") if rel != "/" else mnt)
    return out


def find_ancestor(layout: Layout, pid: int, patterns: Iterable[str]) -> str:
    """The directory of the outermost cgroup holding pid whose path (relative to its mount) fully
    matches one of the regular expressions: e.g. Slurm's ``.*/slurmstepd\\.scope/job_[0-9]+``
    above ``.../step_0/user/task_0``."""
    try:
        regs = [re.compile(p) for p in patterns]
    except (re.error, TypeError) as e:
        raise InvalidArgument(f"invalid cgroup pattern: {e}") from None
    paths = cgroup_paths_of(layout, pid)
    for path in paths:
        kind, mnt, rel = _split_loose(layout, path)
        parts = rel.strip("/").split("/") if rel.strip("/") else []
        for i in range(1, len(parts) + 1):
            prefix = "/" + "/".join(parts[:i])
            if any(r.fullmatch(prefix) for r in regs):
                return mnt.rstrip("/") + prefix
    shown = " or ".join(os.path.relpath(p, "/sys/fs/cgroup") if p.startswith("/sys/fs/cgroup") else p
                        for p in paths) or "none"
    raise InvalidArgument(f"process {pid} is in no cgroup matching the configured job patterns "
                          f"(it is in {shown}); give --cgroup PATH or set [attach] job_patterns", pid=pid)


def pids_in_cgroup_tree(root_path: str) -> set[int]:
    """Every pid in ``cgroup.procs`` of ``root_path`` and all cgroups below it (read-only).

    Cgroups that disappear while we walk are skipped.  Raises NoSuchCgroup when ``root_path`` is not a cgroup.
    """
    if not os.path.isfile(os.path.join(root_path, "cgroup.procs")):
        raise NoSuchCgroup(f"not a cgroup: {root_path}", path=root_path)
    pids: set[int] = set()

    def walk_error(e: OSError) -> None:
        if e.filename == root_path:
            raise NoSuchCgroup(f"cannot read cgroup {root_path}: {e.strerror}", path=root_path) from e

    for dirpath, _dirs, _files in os.walk(root_path, onerror=walk_error):
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.update(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # removed while we walked
        except OSError as e:
            if e.errno == errno.ENODEV:  # cgroup being destroyed
                continue
            raise CgroupError(f"cannot read {dirpath}/cgroup.procs: {e.strerror}", path=dirpath) from e
    return pids


def cgroup2_dir_of_id(cgroup_id: int, mount: str | None = None) -> str | None:
    """Directory of the cgroup2 whose id (= inode number) is ``cgroup_id``, or None.  A walk of the
    hierarchy (readdir gives kernfs inode numbers without a stat per directory): for callers that know
    only the id; the agent hands the tracer the path it holds instead."""
    mount = mount or proc.cgroup2_mount()
    if not mount:
        return None
    try:
        if os.stat(mount).st_ino == cgroup_id:
            return mount
    except OSError:
        return None
    stack = [mount]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        if e.inode() == cgroup_id:
                            return e.path
                        stack.append(e.path)
        except OSError:
            continue
    return None


def procs_of_cgroup_id(cgroup_id: int) -> list[int]:
    """The pids in cgroup.procs of the cgroup2 with that id ([] when it is gone)."""
    path = cgroup2_dir_of_id(cgroup_id)
    try:
        return [int(x) for x in read(f"{path}/cgroup.procs").split()] if path else []
    except CgroupError:   # removed meanwhile
        return []


def _split_loose(layout: Layout, path: str) -> tuple[str, str, str]:
    for kind, mnt in _mounts(layout):
        if path == mnt:
            return kind, mnt, "/"
        if path.startswith(mnt.rstrip("/") + "/"):
            return kind, mnt, path[len(mnt.rstrip("/")):]
    raise InvalidArgument(f"{path} is not under a cgroup mount")


class CgroupAt:
    """One existing cgroup and its subtree, named by directory and identified by inode (= the
    cgroup2 id BPF sees): a cgroup removed and made again at the same path is another one."""

    poll_interval = 0.0005

    def __init__(self, layout: Layout, path: str, ino: int, spare: Callable[[int], bool] | None = None) -> None:
        self.layout = layout
        self.kind, self.mount, self.rel = _split(layout, path)
        self.path = self.mount.rstrip("/") + self.rel
        self.ino = ino
        self.level = len(self.rel.strip("/").split("/"))   # depth below the root (root = 0)
        # spare(pid): a process of whoever owns the cgroup that freeze, kill and signals must pass by (Slurm's
        # slurmstepd sits in job_N/step_M/slurm: frozen, slurmd deadlocks on it; killed, the step fails)
        self.spare = spare

    @classmethod
    def open(cls, layout: Layout, path: object) -> CgroupAt:
        """Check a path given by a user and open the cgroup there; one clear error otherwise."""
        kind, mnt, rel = _split(layout, path)
        full = mnt.rstrip("/") + rel
        if os.path.realpath(full) != full:
            raise InvalidArgument(f"cgroup path goes through a symbolic link: {path!r}")
        try:
            st = os.stat(full)
        except FileNotFoundError:
            raise NoSuchCgroup(f"no such cgroup: {full}", path=full) from None
        except OSError as e:
            raise InvalidArgument(f"cannot open cgroup {full}: {e.strerror}", path=full) from None
        if not os.path.isfile(os.path.join(full, "cgroup.procs")):
            raise InvalidArgument(f"not a cgroup directory: {full}", path=full)
        return cls(layout, full, st.st_ino)

    # -- identity ---------------------------------------------------------------------
    def exists(self) -> bool:
        """Still there, and still the same cgroup (not one made again under the same name)."""
        try:
            return os.stat(self.path).st_ino == self.ino
        except OSError:
            return False

    def cgroup_id(self) -> int | None:
        return self.ino if self.kind == "cgroup2" else None

    def _check(self) -> None:
        if not self.exists():
            raise NoSuchCgroup(f"cgroup {self.path} is gone", path=self.path)

    def _companion(self, ctrl: str) -> str | None:
        """The same relative path in a v1 hierarchy, if whoever made the cgroup made it there."""
        mnt = self.layout.v1.get(ctrl)
        if not mnt or self.kind == ctrl:
            return None
        d = mnt.rstrip("/") + self.rel
        return d if os.path.isdir(d) else None

    # -- membership ----------------------------------------------------------------------
    def dirs(self) -> list[str]:
        """This cgroup and every cgroup below it, parents first; ones vanishing meanwhile skipped."""
        out = []
        for d, _subdirs, _files in os.walk(self.path):
            out.append(d)
        return out

    def pids(self) -> list[int]:
        """Every process in the subtree."""
        self._check()
        out: list[int] = []
        for d in self.dirs():
            try:
                out.extend(int(x) for x in read(os.path.join(d, "cgroup.procs")).split())
            except NoSuchCgroup:
                continue   # a child cgroup removed while we read
        return out

    def contains(self, pid: int) -> bool:
        """pid is in this cgroup or below it."""
        lines = _proc_cgroup_lines(pid)
        rel = lines.get("" if self.kind == "cgroup2" else self.kind)
        return rel is not None and (rel == self.rel or rel.startswith(self.rel + "/"))

    def overlaps(self, other: CgroupAt) -> bool:
        """One is the other, or inside it (same hierarchy)."""
        if self.kind != other.kind:
            return False
        a, b = self.rel + "/", other.rel + "/"
        return a.startswith(b) or b.startswith(a)

    def _spared(self, pid: int) -> bool:
        try:
            return self.spare is not None and self.spare(pid)
        except (OSError, ValueError, NoSuchProcess):
            return False   # gone: nothing to spare

    def members(self) -> list[int]:
        """The processes freeze, kill and signals act on: every process of the subtree but the spared."""
        return [p for p in self.pids() if not self._spared(p)]

    def _parts(self) -> tuple[list[str], list[int]]:
        """(the largest cgroups of the subtree holding no spared process, the other processes beside a spared
        one): without `spare`, the whole cgroup."""
        if self.spare is None:
            return [self.path], []
        own: dict[str, list[int]] = {}
        dirty: set[str] = set()          # a spared process in it or below
        for d, subdirs, _files in os.walk(self.path, topdown=False):
            try:
                own[d] = [int(x) for x in read(os.path.join(d, "cgroup.procs")).split()]
            except NoSuchCgroup:
                continue
            if any(self._spared(p) for p in own[d]) or any(os.path.join(d, c) in dirty for c in subdirs):
                dirty.add(d)
        whole, loose = [], []
        for d in sorted(own):            # parents sort before their children
            if any(d.startswith(w + "/") for w in whole):
                continue
            if d not in dirty:
                whole.append(d)
            else:
                loose.extend(p for p in own[d] if not self._spared(p))
        return whole, loose

    # -- freeze -----------------------------------------------------------------------------
    @property
    def has_freeze(self) -> bool:
        if self.kind == "freezer":
            return True
        return os.path.exists(os.path.join(self.path, "cgroup.freeze"))

    @property
    def has_kill(self) -> bool:
        return self.kind == "cgroup2" and os.path.exists(os.path.join(self.path, "cgroup.kill"))

    def _set_frozen(self, frozen: bool) -> list[str]:
        """Write the freeze state; returns the cgroups whose state says whether the job is frozen (the
        whole cgroup, or with `spare` the largest parts holding no spared process)."""
        if not self.has_freeze:
            raise Unsupported(f"{self.path} has no freezer", path=self.path)
        whole, _loose = self._parts()
        written = whole if frozen or self.spare is None else [d for d, _s, _f in os.walk(self.path)]
        for d in written:   # thaw with `spare`: every cgroup, whatever an earlier freeze left
            try:
                if self.kind == "freezer":
                    write(os.path.join(d, "freezer.state"), "FROZEN" if frozen else "THAWED")
                else:
                    write(os.path.join(d, "cgroup.freeze"), "1" if frozen else "0")
            except NoSuchCgroup:
                if d == self.path:
                    raise
        return whole

    def _frozen_at(self, d: str) -> bool:
        if self.kind == "freezer":
            return read(os.path.join(d, "freezer.state")).strip() == "FROZEN"
        return read_keyed(os.path.join(d, "cgroup.events")).get("frozen") == "1"

    def _all_frozen(self, dirs: list[str]) -> bool:
        try:
            return bool(dirs) and all(self._frozen_at(d) for d in dirs)
        except NoSuchCgroup:
            return False

    def frozen(self) -> bool:
        """The kernel says the whole subtree (but what it spares) is frozen (v2: cgroup.events; v1: FROZEN,
        not FREEZING)."""
        return self.has_freeze and self._all_frozen(self._parts()[0])

    def _wait(self, what: str, cond: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = self.poll_interval
        while not cond():
            if time.monotonic() > deadline:
                raise Timeout(f"{what} of {self.path} not confirmed after {timeout:g}s; "
                              f"processes: {describe_pids(self.pids())}", path=self.path)
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    # The waits poll only the cgroups written, found once: with `spare`, finding them reads every
    # process of the subtree.
    def freeze(self, timeout: float = 10.0) -> None:
        self._check()
        dirs = self._set_frozen(True)
        self._wait("freeze", lambda: self._all_frozen(dirs), timeout)

    def thaw(self, timeout: float = 10.0) -> None:
        self._check()
        dirs = self._set_frozen(False)
        self._wait("thaw", lambda: not self._all_frozen(dirs), timeout)

    # -- signals ------------------------------------------------------------------------------
    def signal(self, sig: int) -> int:
        """sig to every process of the subtree at one frozen instant; how many got it."""
        if not self.has_freeze:
            return signal_frozen(sig, self.members)
        return signal_frozen(sig, self.members, self.frozen, self.freeze, lambda: self.exists() and self.thaw())

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the whole subtree; return when it is empty.  cgroup.kill where the kernel has
        it (recursive, catches racing forks); else freeze, SIGKILL each pid, thaw, repeat -- with
        no pids.max clamp: that limit is not ours to write."""
        self._check()
        if self.spare is not None:
            return self._kill_parts(timeout)
        if self.has_kill:
            write(os.path.join(self.path, "cgroup.kill"), "1")
            self._wait("kill", lambda: not self.exists() or not self.pids(), timeout)
            return
        deadline = time.monotonic() + timeout
        while self.exists() and self.pids():
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"kill of {self.path} incomplete after {timeout:g}s; "
                              f"survivors: {describe_pids(self.pids())}", path=self.path)
            if self.has_freeze:
                self.freeze(timeout=left)
            for pid in self.pids():
                try:
                    os.kill(pid, _signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.has_freeze:
                self.thaw(timeout=max(deadline - time.monotonic(), 0.1))
            try:
                self._wait("kill", lambda: not self.exists() or not self.pids(), min(0.05, max(left, 0.001)))
            except Timeout:
                pass

    def _kill_parts(self, timeout: float) -> None:
        """kill() passing the spared processes by: cgroup.kill of every cgroup free of them, SIGKILL of the
        others beside them, until only spared ones are left (a step made meanwhile is caught next round)."""
        deadline = time.monotonic() + timeout
        while self.exists() and self.members():
            if time.monotonic() > deadline:
                raise Timeout(f"kill of {self.path} incomplete after {timeout:g}s; "
                              f"survivors: {describe_pids(self.members())}", path=self.path)
            whole, loose = self._parts()
            for d in whole:
                try:
                    if self.kind == "cgroup2" and os.path.exists(os.path.join(d, "cgroup.kill")):
                        write(os.path.join(d, "cgroup.kill"), "1")
                    else:
                        loose.extend(int(x) for sub, _s, _f in os.walk(d)
                                     for x in read(os.path.join(sub, "cgroup.procs")).split())
                except NoSuchCgroup:
                    continue
            for pid in loose:
                try:
                    os.kill(pid, _signal.SIGKILL)
                except ProcessLookupError:
                    pass
            with contextlib.suppress(Timeout):
                self._wait("kill", lambda: not self.exists() or not self.members(), 0.05)

    # -- counters -------------------------------------------------------------------------------
    def cpu_usage_ns(self) -> int | None:
        """CPU of the subtree: cgroup2 cpu.stat (hierarchical, present without the cpu controller),
        v1 cpuacct.usage at the same path; None when neither exists."""
        if self.kind == "cgroup2":
            return int(read_keyed(os.path.join(self.path, "cpu.stat"))["usage_usec"]) * 1000
        acct = self._companion("cpuacct")
        if acct is None:
            return None
        return int(read(os.path.join(acct, "cpuacct.usage")).strip())

    def _pids_dir(self) -> str | None:
        if os.path.exists(os.path.join(self.path, "pids.max")):
            return self.path   # v2 with the pids controller enabled for this cgroup
        return self._companion("pids")

    @property
    def has_pids(self) -> bool:
        return self._pids_dir() is not None

    def pids_stats(self) -> dict:
        """{'current', 'max' (None = unlimited), 'limit_hits'}: the counters of whoever made it."""
        d = self._pids_dir()
        if d is None:
            return {"current": len(self.pids()), "max": None, "limit_hits": None}
        mx = read(os.path.join(d, "pids.max")).strip()
        return {"current": int(read(os.path.join(d, "pids.current"))),
                "max": None if mx == "max" else int(mx), "limit_hits": self._limit_hits(d)}

    @staticmethod
    def _limit_hits(d: str) -> int:
        """Forks refused anywhere in the subtree.  Where pids.events.local exists (cgroup2, kernels with
        hierarchical pids events) the cgroup's pids.events counts its descendants' refusals; elsewhere
        (v1, older cgroup2) a refusal is counted in the cgroup of the task that forked: sum the subtree."""
        if os.path.exists(os.path.join(d, "pids.events.local")):
            return int(read_keyed(os.path.join(d, "pids.events")).get("max", 0))
        total = 0
        for sub, _dirs, _files in os.walk(d):
            try:
                total += int(read_keyed(os.path.join(sub, "pids.events")).get("max", 0))
            except NoSuchCgroup:
                continue
        return total

    def enable_pids(self) -> bool:
        """Make the pids controller available in this cgroup where whoever made it did not (Slurm 22.05's
        cgroup/v2 enables only cpuset, cpu and memory): ``+pids`` in the parent's cgroup.subtree_control,
        what Slurm 25.05's ``EnableExtraControllers=pids`` does.  Only when the site opted in.  True if
        pids.max is there now; False where the parent lacks the controller itself."""
        if self.has_pids:
            return True
        if not self.can_enable_pids():
            return False
        self._check()
        write(os.path.join(os.path.dirname(self.path), "cgroup.subtree_control"), "+pids")
        return self.has_pids

    def can_enable_pids(self) -> bool:
        """enable_pids() would succeed (the parent has the controller to give); changes nothing."""
        if self.has_pids:
            return True
        if self.kind != "cgroup2":
            return False
        try:
            return "pids" in read(os.path.join(os.path.dirname(self.path), "cgroup.controllers")).split()
        except NoSuchCgroup:
            return False

    def pids_max_raw(self) -> str | None:
        d = self._pids_dir()
        return None if d is None else read(os.path.join(d, "pids.max")).strip()

    def set_pids_max(self, value: int | str | None) -> None:
        """Only when the site opted in: the cgroup is someone else's."""
        d = self._pids_dir()
        if d is None:
            raise Unsupported(f"no pids controller at {self.path}", path=self.path)
        if isinstance(value, int) and value < 0:
            raise InvalidArgument(f"invalid pids limit: {value}")
        write(os.path.join(d, "pids.max"), "max" if value is None else str(value))

    # -- a leaf of the caller's own inside it ---------------------------------------------------
    # Only for a caller the site allowed to write in someone else's tree (sshd sessions into an attached
    # job, `[pam] attached = "leaf"`): one child directory, no limit of its own, removed when empty.
    def _leaf_dirs(self, name: object) -> list[str]:
        """The child `name` in the membership hierarchy first, then in each v1 companion the parent has."""
        if not isinstance(name, str) or not LEAF_NAME.fullmatch(name) or name in (".", ".."):
            raise InvalidArgument(f"invalid leaf cgroup name: {str(name)[:80]!r}")
        out = [os.path.join(self.path, name)]
        out += [os.path.join(d, name) for c in COMPANIONS if (d := self._companion(c)) is not None]
        return out

    def make_leaf(self, name: str) -> CgroupAt:
        """Create (or reuse) the child cgroup `name` wherever this cgroup is; return it."""
        self._check()
        dirs = self._leaf_dirs(name)
        for d in dirs:
            try:
                os.mkdir(d)
            except FileExistsError:
                pass
            except FileNotFoundError:
                raise NoSuchCgroup(f"cgroup {self.path} is gone", path=self.path) from None
            except OSError as e:
                raise Unsupported(f"cannot create {d}: {e.strerror}", path=d) from None
        return CgroupAt(self.layout, dirs[0], os.stat(dirs[0]).st_ino)

    def move(self, pid: int) -> None:
        """Move the whole process pid here: the membership hierarchy first (a child forked meanwhile is then
        frozen and killed with the rest), then the v1 companions at the same path."""
        if not isinstance(pid, int) or pid <= 0:
            raise InvalidArgument(f"invalid pid: {pid!r}")
        self._check()
        dirs = [self.path] + [d for c in COMPANIONS if (d := self._companion(c)) is not None]
        for d in dirs:
            write(os.path.join(d, "cgroup.procs"), str(pid), pid=pid)

    def remove_leaf(self, name: str) -> bool:
        """rmdir the child `name` everywhere (companions first); True when none is left.  The kernel refuses
        a cgroup that still holds a process or a child, so this can only ever remove an empty leaf."""
        gone = True
        for d in reversed(self._leaf_dirs(name)):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                gone = False
        return gone


class Named:
    """A driver's named cgroup with CgroupAt's interface (no name argument)."""

    def __init__(self, driver: Driver, name: str) -> None:
        self.driver = driver
        self.name = name
        self.level: int | None = None   # a leaf: BPF matches its own id

    @property
    def path(self) -> str:
        return self.driver.path(self.name)

    @property
    def has_freeze(self) -> bool:
        return self.driver.has_freeze

    def exists(self) -> bool:
        return self.driver.exists(self.name)

    def cgroup_id(self) -> int | None:
        return self.driver.cgroup_id(self.name)

    def pids(self) -> list[int]:
        return self.driver.pids(self.name)

    def contains(self, pid: int) -> bool:
        return self.driver.cgroup_of(pid) == self.name

    def frozen(self) -> bool:
        return self.driver.frozen(self.name)

    def freeze(self, timeout: float = 10.0) -> None:
        self.driver.freeze(self.name, timeout)

    def thaw(self, timeout: float = 10.0) -> None:
        self.driver.thaw(self.name, timeout)

    def signal(self, sig: int) -> int:
        return self.driver.signal(self.name, sig)

    def kill(self, timeout: float = 10.0) -> None:
        self.driver.kill(self.name, timeout)

    def cpu_usage_ns(self) -> int | None:
        return self.driver.cpu_usage_ns(self.name)

    def pids_stats(self) -> dict:
        return self.driver.pids_stats(self.name)
