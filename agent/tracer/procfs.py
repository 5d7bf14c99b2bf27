"""Small readers of the tracer (None or empty when the process is gone): tracefs and cgroupfs here, /proc
through jobcage.cgroups.proc (the one /proc reader)."""

from __future__ import annotations

import os

from jobcage.cgroups import proc

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None


# the one /proc reader (jobcage.cgroups.proc), under the names the tracer has always used
proc_status = proc.status
proc_ppid = proc.ppid
proc_comm = proc.comm
proc_exe = proc.exe
cgroup2_mount = proc.cgroup2_mount


def cgroup2_path(cgroup_id: int, mount: str | None = None) -> str | None:
    """Directory of the cgroup2 whose id (= inode number) is ``cgroup_id``.  A walk of the
    hierarchy: readdir gives kernfs inode numbers without a stat per directory."""
    mount = mount or cgroup2_mount()
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


def cgroup_procs(cgroup_id: int) -> list[int]:
    path = cgroup2_path(cgroup_id)
    text = _read(f"{path}/cgroup.procs") if path else None
    return [int(x) for x in text.split()] if text else []


def tracefs() -> str | None:
    for d in TRACEFS_DIRS:
        if os.path.isdir(f"{d}/events/sched"):
            return d
    return None
