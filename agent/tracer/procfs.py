"""Small readers of the tracer (None or empty when the process is gone): tracefs here, /proc through
jobcage.cgroups.proc (the one /proc reader), cgroupfs through jobcage.cgroups.path."""

from __future__ import annotations

import os

from jobcage.cgroups import proc
from jobcage.cgroups.path import cgroup2_dir_of_id, procs_of_cgroup_id

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None


# the one /proc and cgroupfs readers (jobcage.cgroups), under the names the tracer has always used
proc_status = proc.status
proc_ppid = proc.ppid
proc_comm = proc.comm
proc_exe = proc.exe
cgroup2_mount = proc.cgroup2_mount
cgroup2_path = cgroup2_dir_of_id
cgroup_procs = procs_of_cgroup_id


def tracefs() -> str | None:
    for d in TRACEFS_DIRS:
        if os.path.isdir(f"{d}/events/sched"):
            return d
    return None
