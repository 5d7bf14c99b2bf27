"""Identity tracer: which process of which job ran what, under which uid, through which helper.

One front end (:class:`Tracer`), two backends chosen once at start:

* ``bpf``  -- bcc loads ``bpf/tracer.bpf.c``.  Jobs are filtered in the kernel by cgroup2 id
  (and, on nodes without cgroup2, by a tgid map that forks inherit); forks and failed forks
  are only counted there, so a fork bomb costs map updates, not events.
* ``proc`` -- the netlink proc connector (FORK/EXEC/UID/GID/SID/EXIT), for nodes where bcc or
  BPF is missing.  Every event of the node reaches user space; membership is decided here by
  pid inheritance plus /proc/PID/cgroup.  Failed set*id calls and failed forks are invisible
  to it (the connector reports committed credential changes only).

Both feed the same :class:`jobcage.agent.events.TraceEvent` to ``on_event`` and keep the same lineage:
pid -> original parent, uid/euid, image, and ``via`` = the helper binary (e.g. /usr/bin/sudo)
the process was running when its uid changed.

Lineage without fork events (BPF): the kernel keeps child -> parent in an LRU hash that lives
as long as the task; every event carries the original parent from it.  So a daemon that
double-forks and setsids is still linked to the process that started it: its setsid/exec/exit
events carry that parent, and :meth:`Tracer.lineage` reads the kernel map for processes that
produced no event.  One event per fork would let a fork bomb flood user space.

Not thread safe: call every method from the agent's one event loop.

The package, by file:

* ``frontend.py`` -- :class:`Tracer`: jobs, the poll loop, queries (counters, lineage, exited tasks);
* ``enrich.py`` -- a kernel record made an audit event (lineage, effective uid, the exec'd file, ``via``);
* ``userns.py`` -- user namespaces: /proc and nsfs readers, and the events of processes in one;
* ``bpf_backend.py`` -- the bcc backend; ``abi.py`` -- what ``bpf/jobcage.h`` says (kinds, limits, JC_ABI);
* ``proc_connector.py`` -- the netlink proc-connector backend, parsed raw;
* ``records.py`` -- the record both backends hand over, and the per-job state;
* ``procfs.py`` -- the small /proc and cgroupfs readers.

Must never import: click, rich, or any front-end module (cli, jobtrace, hook).
"""

from __future__ import annotations

from .abi import KIND_NAMES, MAX_JOBS, MAX_LEVEL, SYS_NAMES
from .enrich import DEFAULT_RUNTIMES
from .frontend import BACKENDS, Tracer
from .procfs import (
           cgroup2_mount,
           cgroup2_path,
           cgroup_procs,
           proc_comm,
           proc_exe,
           proc_ppid,
           proc_status,
           tracefs,
)
from .userns import host_mapped, read_idmap, subid_ranges, to_host, userns_facts, userns_inode

__all__ = ["BACKENDS", "DEFAULT_RUNTIMES", "KIND_NAMES", "MAX_JOBS", "MAX_LEVEL", "SYS_NAMES", "Tracer",
           "cgroup2_mount", "cgroup2_path", "cgroup_procs", "host_mapped", "proc_comm", "proc_exe", "proc_ppid",
           "proc_status", "read_idmap", "subid_ranges", "to_host", "tracefs", "userns_facts", "userns_inode"]
