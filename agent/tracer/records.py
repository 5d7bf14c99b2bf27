"""What a backend hands the front end: one record per kernel event, and the tracer's per-job state."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from .abi import NOARG

EXITED_KEEP = 65_536        # exited task -> job, for the accounting


@dataclass(slots=True)
class _Raw:
    """What a backend saw, before enrichment; mirrors struct jc_event."""
    kind: str
    ts_ns: int               # CLOCK_MONOTONIC
    cookie: int              # job
    pid: int
    tid: int = 0
    ppid: int = 0
    uid: int = -1
    gid: int = -1
    old_uid: int = -1
    old_gid: int = -1
    euid: int = -1           # proc backend only: the connector reports it
    egid: int = -1
    ret: int = 0
    sys: str = ""
    args: tuple[int, ...] = ()
    comm: str = ""
    filename: str = ""
    marked: bool = False
    cgroup_id: int = 0
    # BPF: whether the kernel saw it (or an ancestor since it was seeded) enter a user namespace
    # (JC_MARK_USERNS); None = unknown (proc connector): read /proc
    ns_entered: bool | None = None
    # BPF exec with JC_EXEC_CREDS: euid is what the kernel gave (exact, not worked out from the file);
    # exe_mode/uid/gid are the running file's (0 / -1 = unknown: stat the path)
    euid_exact: bool = False
    exe_mode: int = 0
    exe_uid: int = -1
    exe_gid: int = -1


@dataclass
class _Job:
    job_id: str
    owner_uid: int
    cookie: int
    slot: int
    cgroup_ids: set[int] = field(default_factory=set)
    level: int | None = None                                # set: the cgroups' descendants are the job's too
    procs: dict[int, dict] = field(default_factory=dict)   # lineage records by pid
    final_counters: dict | None = None                      # frozen at remove_job
    userns: dict[int, int] = field(default_factory=dict)    # user namespaces in its trail: inode -> a member pid


def _sid(v: int) -> int:
    """u32 syscall argument -> int, with (uid_t)-1 as -1."""
    return -1 if v == NOARG else v


def _errname(ret: int) -> str | None:
    return errno.errorcode.get(-ret) if ret < 0 else None
