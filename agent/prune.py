"""Stray-process selection and killing.

A *stray* is a user process that belongs to no job: its pid is in no job cgroup (the caller passes that set,
e.g. :func:`pids_in_cgroup_tree` of jobcage's subtree), all of its uids (real, effective, saved) are >= ``min_uid``,
and no exemption applies.  Unlike uid-based pruning this is safe on multi-slot nodes: a pool uid that is busy in
one job does not protect its leftovers from another, and a running job's processes are never strays.

Never strays, whatever the configuration: kernel threads (``PF_KTHREAD``), zombies, this process and its ancestors
(the agent and whatever started it), and children of in-job processes (children inherit the cgroup, so such a child
was forked inside a job after the membership was read).  Exempt by configuration: uids, user names, commands (``fnmatch`` patterns on
the comm name and on ``basename(argv[0])``), explicit pids, and sshd sessions: a process is exempt when its
ancestor chain (itself included) has an sshd session process, i.e. a process titled ``sshd: USER@TTY``,
``sshd: USER@notty`` or ``sshd: USER [priv]`` (``sshd-session:`` from OpenSSH 9.8; ``sshd-NAME:`` for a site's
second sshd instance run under another name, which sshd's titles and PAM service follow).  Any user can retitle a
process, so by default (``sshd_require_root``) that ancestor must run as root: a real session always has the root
``[priv]`` monitor above the user's ``USER@pts`` process, a forged title under a user's own process does not.

Killing (:func:`kill_strays`) pins each process with a pidfd and checks its start time, so a recycled pid is never
signalled; each process group made only of strays is stopped at once with ``killpg(SIGSTOP)`` (it cannot fork away),
children that appeared before the stop landed are caught and stopped too, job membership is then read again and
whatever still qualifies gets SIGKILL through its pidfd; the rest is continued.
"""

from __future__ import annotations

import fnmatch
import os
import pwd
import re
import select
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psutil

from jobcage.cgroups import proc
from jobcage.cgroups.path import pids_in_cgroup_tree  # noqa: F401 - callers find it here too

from .errors import InvalidArgument
from .fmt import user_name

DEFAULT_MIN_UID = 1000
PF_KTHREAD = 0x00200000  # include/linux/sched.h
_SSHD_SESSION = re.compile(r"^sshd(?:-[\w.]+)?: [^\s@\[]+(?:@\S+| \[priv\])")
_FREEZE_ROUNDS = 20

# Job membership: a set, or a callable returning a fresh one.  The callable form is the race-free one: it is
# called after the process table is read (a process forked into a job after we took the set would otherwise look
# like a stray) and again, while the candidates are stopped, right before SIGKILL.
InJobPids = AbstractSet[int] | Callable[[], AbstractSet[int]]


class _Proc:
    """One process as read from /proc; the costly fields (cmdline, user name) are read on first use."""

    def __init__(self, pid: int, st: proc.Stat, name: str, uids: tuple[int, int, int]) -> None:
        self.pid = pid
        self.ppid = st.ppid
        self.pgid = st.pgid
        self.state = st.state
        self.flags = st.flags
        self.start_ticks = st.start_ticks
        self.name = name
        self.ruid, self.euid, self.suid = uids
        self._cmdline: tuple[str, ...] | None = None
        self._user: str | None = None

    @property
    def user(self) -> str:
        if self._user is None:
            self._user = user_name(self.ruid)
        return self._user

    @property
    def cmdline(self) -> tuple[str, ...]:
        if self._cmdline is None:
            try:
                # psutil copes with processes that rewrite their argv (sshd's "sshd: user@pts/0" titles).
                cmdline = tuple(psutil.Process(self.pid).cmdline())
            except psutil.Error:
                cmdline = ()
            again = proc.stat(self.pid)
            if again is None or again.start_ticks != self.start_ticks:
                cmdline = ()  # gone or recycled meanwhile: what we read is not this process's
            self._cmdline = cmdline
        return self._cmdline

    @property
    def cmd(self) -> str:
        return " ".join(self.cmdline) if self.cmdline else f"[{self.name}]"


def _read_proc(pid: int) -> _Proc | None:
    # read pinned (one /proc/PID dir fd): a pid reused while we read fails instead of mixing two processes
    files = proc.read_pinned(pid, ("stat", "status"))
    if files is None:
        return None
    uids = None
    for line in files["status"].splitlines():
        if line.startswith(b"Uid:"):
            r, e, s = line.split()[1:4]
            uids = (int(r), int(e), int(s))
            break
    if uids is None:
        return None
    st = proc.Stat(files["stat"])
    return _Proc(pid, st, st.comm, uids)


def _snapshot() -> dict[int, _Proc]:
    procs: dict[int, _Proc] = {}
    for pid in psutil.pids():
        p = _read_proc(pid)
        if p is not None:
            procs[pid] = p
    return procs


def _self_and_ancestors() -> frozenset[int]:
    pids = {os.getpid()}
    pid = os.getppid()
    while pid > 0 and pid not in pids:
        pids.add(pid)
        st = proc.stat(pid)
        if st is None:
            break
        pid = st.ppid
    return frozenset(pids)


def _uptime_ticks() -> int:
    return int(proc.uptime() * proc.CLK_TCK)


def _ticks_to_epoch(ticks: int) -> float:
    return proc.boot_time() + ticks / proc.CLK_TCK


class _Selector:
    """The criteria of one :func:`find_strays` call, kept so that :func:`kill_strays` can re-apply them."""

    def __init__(self, in_job_pids: InJobPids, *, min_uid: int, only_uids: AbstractSet[int] | None,
                 exempt_uids: Iterable[int], exempt_users: Iterable[str], exempt_commands: Iterable[str],
                 exempt_sshd: bool, sshd_require_root: bool, exempt_pids: Iterable[int]) -> None:
        if isinstance(min_uid, bool) or not isinstance(min_uid, int) or min_uid < 0:
            raise InvalidArgument(f"min_uid must be a non-negative integer, not {min_uid!r}")
        self._in_job = in_job_pids
        self.min_uid = min_uid
        self.only_uids = None if only_uids is None else frozenset(only_uids)
        self.exempt_users = frozenset(exempt_users)
        uids = set(exempt_uids)
        for name in self.exempt_users:
            try:
                uids.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                pass  # still matched by name below (e.g. a user from a directory service that is down)
        self.exempt_uids = frozenset(uids)
        self.exempt_commands = tuple(exempt_commands)
        self.exempt_sshd = exempt_sshd
        self.sshd_require_root = sshd_require_root
        self.exempt_pids = frozenset(exempt_pids)
        self.agent_pids = _self_and_ancestors()
        self.found_at_ticks = _uptime_ticks()  # processes born later were not there to be chosen or left out

    def in_job(self) -> AbstractSet[int]:
        src = self._in_job
        return frozenset(src()) if callable(src) else src

    def _sshd_ancestor(self, p: _Proc, procs: dict[int, _Proc]) -> _Proc | None:
        seen: set[int] = set()
        cur: _Proc | None = p
        while cur is not None and cur.pid not in seen:
            seen.add(cur.pid)
            if (cur.ruid == 0 or not self.sshd_require_root) and _SSHD_SESSION.match(cur.cmd):
                return cur
            cur = procs.get(cur.ppid)
        return None

    def _command_exempt(self, p: _Proc) -> str | None:
        names = {p.name}
        if p.cmdline:
            names.add(os.path.basename(p.cmdline[0]))
        for pattern in self.exempt_commands:
            for n in names:
                if fnmatch.fnmatchcase(n, pattern):
                    return pattern
        return None

    def judge(self, p: _Proc, procs: dict[int, _Proc], in_job: AbstractSet[int]) -> tuple[bool, str]:
        """(True, why it is a stray) or (False, why not)."""
        if p.flags & PF_KTHREAD:
            return False, "kernel thread"
        if p.state in ("Z", "X"):
            return False, "zombie (goes when its parent reaps it)"
        if p.pid in self.agent_pids:
            return False, "the agent itself or one of its ancestors"
        if p.pid in self.exempt_pids:
            return False, "exempt pid"
        if self.only_uids is not None and p.ruid not in self.only_uids:
            return False, f"uid {p.ruid} not selected"
        low = min(p.ruid, p.euid, p.suid)
        if low < self.min_uid:
            return False, f"uid {low} below min-uid {self.min_uid}"
        if p.pid in in_job:
            return False, "in a job cgroup"
        if p.ppid in in_job:
            # Children inherit their parent's cgroup: this one was most likely forked inside a job after the
            # membership was read.  Sparing it is the safe side.
            return False, "its parent is in a job cgroup"
        if p.ruid in self.exempt_uids or p.euid in self.exempt_uids:
            return False, f"exempt uid {p.ruid}"
        if self.exempt_users and p.user in self.exempt_users:
            return False, f"exempt user {p.user}"
        pattern = self._command_exempt(p)
        if pattern is not None:
            return False, f"exempt command {pattern!r}"
        if self.exempt_sshd:
            anc = self._sshd_ancestor(p, procs)
            if anc is not None:
                return False, f"in an sshd session (pid {anc.pid}: {anc.cmd!r})"
        why = f"uid {p.ruid} ({p.user}) >= min-uid {self.min_uid}, in no job cgroup, not exempt"
        if p.ppid == 1:
            why += ", orphaned (parent is pid 1)"
        return True, why


def _default_selector(uids: AbstractSet[int]) -> _Selector:
    # For Stray objects built by hand: still never kernel threads, system uids, the agent, or other uids.
    return _Selector(frozenset(), min_uid=DEFAULT_MIN_UID, only_uids=uids, exempt_uids=(), exempt_users=(),
                     exempt_commands=(), exempt_sshd=True, sshd_require_root=True, exempt_pids=())


@dataclass(frozen=True)
class Stray:
    """A process that belongs to no job, as seen when it was selected."""

    pid: int
    ppid: int
    uid: int           # real uid
    user: str
    cmd: str
    start_time: float  # epoch seconds
    reason: str
    pgid: int = 0
    start_ticks: int = 0  # /proc/PID/stat starttime: tells a recycled pid apart
    selector: _Selector | None = field(default=None, repr=False, compare=False)

    @classmethod
    def _from_proc(cls, p: _Proc, reason: str, selector: _Selector | None) -> Stray:
        return cls(p.pid, p.ppid, p.ruid, p.user, p.cmd, _ticks_to_epoch(p.start_ticks), reason, p.pgid,
                   p.start_ticks, selector)

    def to_dict(self) -> dict:
        return {"pid": self.pid, "ppid": self.ppid, "pgid": self.pgid, "uid": self.uid, "user": self.user,
                "cmd": self.cmd, "reason": self.reason,
                "start_time": datetime.fromtimestamp(self.start_time, UTC).isoformat()}


@dataclass
class KillResult:
    """Outcome of :func:`kill_strays`; unpacks as ``killed, survivors = kill_strays(...)``."""

    killed: list[Stray] = field(default_factory=list)      # got SIGKILL and exited within the timeout
    survivors: list[Stray] = field(default_factory=list)   # got SIGKILL and still there at the timeout
    skipped: list[tuple[Stray, str]] = field(default_factory=list)  # not signalled (gone, pid reused, exempt now)

    def __iter__(self) -> Iterator[list[Stray]]:  # tuple-style unpacking of the two main lists
        return iter((self.killed, self.survivors))

    def to_dict(self) -> dict:
        return {"killed": [s.to_dict() for s in self.killed],
                "survivors": [s.to_dict() for s in self.survivors],
                "skipped": [{**s.to_dict(), "skip_reason": why} for s, why in self.skipped]}


def find_strays(in_job_pids: InJobPids, *, min_uid: int = DEFAULT_MIN_UID,
                only_uids: AbstractSet[int] | None = None, exempt_uids: Iterable[int] = (),
                exempt_users: Iterable[str] = (), exempt_commands: Iterable[str] = (), exempt_sshd: bool = True,
                sshd_require_root: bool = True, exempt_pids: Iterable[int] = ()) -> list[Stray]:
    """The processes that belong to no job and are not exempt (see the module docstring), sorted by pid.

    ``in_job_pids``: pids of every job cgroup, or a callable returning them (preferred, see :data:`InJobPids`).
    ``only_uids``: consider only processes whose real uid is in this set (the CLI's ``--uid``; tests).
    """
    sel = _Selector(in_job_pids, min_uid=min_uid, only_uids=only_uids, exempt_uids=exempt_uids,
                    exempt_users=exempt_users, exempt_commands=exempt_commands, exempt_sshd=exempt_sshd,
                    sshd_require_root=sshd_require_root, exempt_pids=exempt_pids)
    procs = _snapshot()
    in_job = sel.in_job()  # after the snapshot: see InJobPids
    strays = []
    for p in procs.values():
        ok, why = sel.judge(p, procs, in_job)
        if ok:
            strays.append(Stray._from_proc(p, why, sel))
    return sorted(strays, key=lambda s: s.pid)


@dataclass
class _Held:
    stray: Stray
    fd: int               # pidfd: signals through it can only reach this very process
    was_stopped: bool     # already stopped before we came (job control): leave it stopped if we spare it
    sel: _Selector


def _identity_problem(s: Stray, p: _Proc | None) -> str | None:
    if p is None:
        return "vanished"
    if p.start_ticks != s.start_ticks:
        return "pid reused by another process"
    if p.ruid != s.uid:
        return f"uid changed to {p.ruid}"
    return None


def _send(fd: int, sig: int) -> bool:
    try:
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False


def _hold(s: Stray, sel: _Selector, held: dict[int, _Held], res: KillResult) -> _Held | None:
    if s.pid in held:
        return held[s.pid]
    try:
        fd = os.pidfd_open(s.pid)
    except ProcessLookupError:
        res.skipped.append((s, "vanished"))
        return None
    st = proc.stat(s.pid)  # read after pidfd_open: if the start time matches, fd pins this very process
    if st is None or st.start_ticks != s.start_ticks:
        os.close(fd)
        res.skipped.append((s, "vanished" if st is None else "pid reused by another process"))
        return None
    h = _Held(s, fd, st.state in ("T", "t"), sel)
    held[s.pid] = h
    return h


def _alive_pgid(h: _Held) -> int | None:
    st = proc.stat(h.stray.pid)
    if st is None or st.start_ticks != h.stray.start_ticks or st.state in ("Z", "X"):
        return None
    return st.pgid


def _cont_unheld(p: _Proc) -> None:
    """SIGCONT a process our killpg stopped that turned out not to be a stray (pid-reuse safe)."""
    try:
        fd = os.pidfd_open(p.pid)
    except ProcessLookupError:
        return
    try:
        st = proc.stat(p.pid)
        if st is not None and st.start_ticks == p.start_ticks:
            _send(fd, signal.SIGCONT)
    finally:
        os.close(fd)


def _wait_stopped(held: dict[int, _Held], until: float) -> None:
    while time.monotonic() < until:
        pending = False
        for pid, h in held.items():
            st = proc.stat(pid)
            if st is not None and st.start_ticks == h.stray.start_ticks and st.state not in ("T", "t", "Z", "X"):
                pending = True
                break
        if not pending:
            return
        time.sleep(0.002)


def kill_strays(strays: Sequence[Stray], timeout: float = 5.0) -> KillResult:
    """Freeze, re-check and SIGKILL ``strays`` (from :func:`find_strays`); wait up to ``timeout`` seconds in all.

    Per process group: when every current member of a group is among ``strays`` or was born since they were found
    and qualifies too (a forking group), the group is stopped with one ``killpg(SIGSTOP)``; otherwise each stray is
    stopped alone.  Processes that appeared meanwhile as children or
    group members of the stopped strays are stopped too and, if they qualify, killed with them.  Before SIGKILL every
    process is checked again: same start time (no pid reuse), and still a stray under the criteria it was selected
    with, job membership read afresh when ``in_job_pids`` was a callable.  Spared processes get SIGCONT unless they
    were stopped already.  Returns a :class:`KillResult` (unpacks as ``killed, survivors``).
    """
    if timeout < 0:
        raise InvalidArgument(f"timeout must be >= 0, not {timeout}")
    res = KillResult()
    if not strays:
        return res
    start = time.monotonic()
    deadline = start + timeout
    freeze_deadline = start + timeout / 2  # keep at least half of the time for the kill to land
    held: dict[int, _Held] = {}
    stopped_groups: dict[int, _Selector] = {}
    in_job_cache: dict[int, AbstractSet[int]] = {}

    def in_job(sel: _Selector) -> AbstractSet[int]:
        if id(sel) not in in_job_cache:
            in_job_cache[id(sel)] = sel.in_job()
        return in_job_cache[id(sel)]

    try:
        procs = _snapshot()
        wanted = {s.pid for s in strays}
        by_group: dict[int, list[tuple[Stray, _Selector]]] = {}
        hand_made = [s for s in strays if s.selector is None]
        default_sel = _default_selector({s.uid for s in hand_made}) if hand_made else None
        seen: set[int] = set()
        for s in strays:
            if s.pid in seen:
                continue
            seen.add(s.pid)
            sel = s.selector or default_sel
            assert sel is not None
            p = procs.get(s.pid)
            problem = _identity_problem(s, p)
            if problem is not None or p is None:
                res.skipped.append((s, problem or "vanished"))
                continue
            ok, why = sel.judge(p, procs, in_job(sel))
            if not ok:
                res.skipped.append((s, f"no longer a stray: {why}"))
                continue
            by_group.setdefault(p.pgid, []).append((s, sel))

        # Freeze: a stopped process cannot fork, so nothing escapes between our look and the kill.
        for pgid, members in by_group.items():
            mine = [h for s, sel in members if (h := _hold(s, sel, held, res)) is not None]
            # Stop the whole group at once only if it holds nothing but strays: the ones we were given, and ones
            # born since they were found (a forking group) that qualify by the same criteria.
            sel0 = members[0][1]
            whole = all(q.pid in wanted or (q.start_ticks >= sel0.found_at_ticks and
                                            sel0.judge(q, procs, in_job(sel0))[0])
                        for q in procs.values() if q.pgid == pgid)
            # A live member of the group holds the pgid number, so killpg cannot hit a recycled group.
            if whole and any(_alive_pgid(h) == pgid for h in mine):
                try:
                    os.killpg(pgid, signal.SIGSTOP)
                    stopped_groups[pgid] = mine[0].sel
                    continue
                except ProcessLookupError:
                    pass
            for h in mine:
                _send(h.fd, signal.SIGSTOP)

        # Catch what forked before the stop landed: children of held strays and members of stopped groups.
        for _ in range(_FREEZE_ROUNDS):
            _wait_stopped(held, min(freeze_deadline, time.monotonic() + 0.5))
            procs = _snapshot()
            grew = False
            for q in procs.values():
                if q.pid in held:
                    continue
                parent = held.get(q.ppid)
                if parent is None and q.pgid not in stopped_groups:
                    continue
                sel = parent.sel if parent is not None else stopped_groups[q.pgid]
                ok, why = sel.judge(q, procs, in_job(sel))
                if ok:
                    how = f"child of stray {q.ppid}" if parent is not None else f"in process group {q.pgid}"
                    h = _hold(Stray._from_proc(q, f"{why}; {how}, appeared while freezing", sel), sel, held, res)
                    if h is not None:
                        h.was_stopped = False  # born after our first look: any stop on it is ours
                        _send(h.fd, signal.SIGSTOP)
                        grew = True
                elif q.pgid in stopped_groups and q.state in ("T", "t"):
                    _cont_unheld(q)  # our killpg stopped it, but it is no stray (e.g. ran a setuid binary)
            if not grew or time.monotonic() >= freeze_deadline:
                break

        # Everything is stopped: read job membership again and kill what still qualifies.
        in_job_cache.clear()
        procs = _snapshot()
        waiting: dict[int, _Held] = {}
        for pid, h in held.items():
            p = procs.get(pid)
            problem = _identity_problem(h.stray, p)
            if problem is not None or p is None:
                res.skipped.append((h.stray, problem or "vanished"))
                continue
            ok, why = h.sel.judge(p, procs, in_job(h.sel))
            if not ok:
                if not h.was_stopped:
                    _send(h.fd, signal.SIGCONT)
                res.skipped.append((h.stray, f"no longer a stray: {why}"))
                continue
            if _send(h.fd, signal.SIGKILL):
                waiting[h.fd] = h
            else:
                res.skipped.append((h.stray, "vanished"))

        # A pidfd becomes readable when its process has exited (zombie or reaped).
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLIN)
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, _ev in poller.poll(remaining * 1000):
                poller.unregister(fd)
                res.killed.append(waiting.pop(fd).stray)
        res.survivors.extend(h.stray for h in waiting.values())
        return res
    except BaseException:
        # E.g. the membership callable failed: never leave processes stopped behind us.
        for h in held.values():
            if not h.was_stopped:
                _send(h.fd, signal.SIGCONT)
        raise
    finally:
        for h in held.values():
            os.close(h.fd)
