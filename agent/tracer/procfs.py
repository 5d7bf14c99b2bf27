"""Small /proc and cgroupfs readers of the tracer (None or empty when the process is gone)."""

from __future__ import annotations

import os

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None


def proc_status(pid: int) -> dict[str, list[int]] | None:
    """Uid/Gid/PPid/Tgid/NoNewPrivs lines of /proc/PID/status as ints (Uid: real, effective,
    saved, fs)."""
    text = _read(f"/proc/{pid}/status")
    if text is None:
        return None
    out: dict[str, list[int]] = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key in ("Uid", "Gid", "PPid", "Tgid", "NoNewPrivs"):
            try:
                out[key] = [int(x) for x in val.split()]
            except ValueError:
                pass
    return out


def proc_ppid(pid: int) -> int:
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return 0
    try:  # the comm field may contain spaces and parens: split after the last ')'
        return int(text[text.rindex(")") + 2:].split()[1])
    except (ValueError, IndexError):
        return 0


def proc_comm(pid: int) -> str:
    return (_read(f"/proc/{pid}/comm") or "").strip()


def proc_exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""



def cgroup2_mount() -> str | None:
    """Mount point of the cgroup2 hierarchy (``/sys/fs/cgroup`` or ``.../unified``), or None."""
    text = _read("/proc/self/mounts") or ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return parts[1]
    return None


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
