"""The /proc snapshot of a job's processes: one :class:`Proc` per process, re-read cheaply for --live.

The reads themselves are jobcage.cgroups.proc's (the one /proc reader); here they become the fields a
view shows and the %CPU between two readings.  A process that exits mid-read is left out (None), never
an error; a pid that now names another process (other start time) is read anew.
"""

from __future__ import annotations

import stat as stat_mod
import time
from collections.abc import Iterable
from dataclasses import dataclass

from jobcage.cgroups import proc

HZ = proc.CLK_TCK


@dataclass(slots=True, eq=False)
class Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    comm: str
    ticks: int          # utime + stime of the whole thread group, clock ticks
    start: int          # start time, clock ticks since boot: (pid, start) names a process
    threads: int
    uid: int = -1
    euid: int = -1
    cmd: str = ""       # "" for kernel threads and zombies
    t: float = 0.0      # monotonic time of the ticks reading
    pct: float | None = None
    userns: int = 0     # inode of its user namespace when not the initial one (0: initial or unreadable)


def read_cmd(pid: int, full: bool) -> str | None:
    """The command line ('' for kernel threads and zombies), None when gone.  Without `full`, the first 4 KiB
    (enough for any view that truncates)."""
    argv = proc.cmdline(pid, None if full else 4096)
    return None if argv is None else " ".join(argv)


def load_proc(pid: int, full_cmd: bool) -> Proc | None:
    st = proc.stat(pid)
    ids = proc.uids(pid) if st else None
    cmd = read_cmd(pid, full_cmd) if ids else None
    if st is None or ids is None or cmd is None:
        return None
    return Proc(pid, st.ppid, st.pgid, st.sid, st.state, st.comm, st.ticks, st.start_ticks, st.threads, ids[0],
                ids[1], cmd, time.monotonic(), userns=read_userns(pid))


INIT_USERNS = proc.userns_inode(1) or 4026531837   # PROC_USER_INIT_INO: fixed by the kernel


def read_userns(pid: int) -> int:
    """The user namespace inode of pid when it is not the initial one, else 0."""
    ino = proc.userns_inode(pid)
    return 0 if ino is None or ino == INIT_USERNS else ino


def refresh_proc(p: Proc, full_cmd: bool, uids: bool = False, cmd: bool = False) -> Proc | None:
    """Re-read stat (and optionally status / cmdline) of a known process, updating %CPU over the time since
    the last reading.  None when gone; a new Proc when the pid now names another process."""
    st = proc.stat(p.pid)
    if st is None:
        return None
    if st.start_ticks != p.start:
        return load_proc(p.pid, full_cmd)
    now = time.monotonic()
    if now > p.t:
        p.pct = max(0.0, (st.ticks - p.ticks) / HZ / (now - p.t) * 100.0)
    exec_seen = st.comm != p.comm
    p.comm, p.state, p.ppid, p.pgid, p.sid, p.ticks, p.threads, p.t = st.comm, st.state, st.ppid, st.pgid, \
        st.sid, st.ticks, st.threads, now
    if uids:
        ids = proc.uids(p.pid)
        if ids is None:
            return None
        p.uid, p.euid = ids
        p.userns = read_userns(p.pid)
    if cmd or exec_seen:
        c = read_cmd(p.pid, full_cmd)
        if c is None:
            return None
        p.cmd = c
    return p


def snapshot(pids: Iterable[int], interval: float, full_cmd: bool) -> dict[int, Proc]:
    """One reading of every pid; %CPU over `interval` seconds (a second stat pass), or the lifetime
    average when interval <= 0.  Processes that exit meanwhile are dropped."""
    t0 = time.monotonic()
    procs = {p.pid: p for p in (load_proc(pid, full_cmd) for pid in pids) if p is not None}
    if interval > 0:
        wait = t0 + interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        for pid, p in list(procs.items()):
            q = refresh_proc(p, full_cmd)
            if q is None:
                del procs[pid]
            else:
                procs[pid] = q
    else:
        up = proc.uptime()
        for p in procs.values():
            age = up - p.start / HZ
            p.pct = p.ticks / HZ / age * 100.0 if age > 0 else 0.0
    return procs


def comm_of(pid: int) -> str | None:
    st = proc.stat(pid)
    return st.comm if st else None


def setuid_exe(pid: int) -> str | None:
    """The executable of pid if it is a setuid/setgid file (what made its euid differ), else None."""
    path = proc.exe(pid)
    mode = proc.exe_mode(pid)
    if mode is None:
        return None
    return path if path and mode & (stat_mod.S_ISUID | stat_mod.S_ISGID) else None


def started(p: Proc) -> float:
    """When the process started, epoch seconds."""
    return proc.boot_time() + p.start / HZ
