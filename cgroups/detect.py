"""Find out how cgroups are mounted on this node: v1, hybrid or v2.

Decided from /proc/self/mounts and the files that exist (feature probes, never
kernel versions), once per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import proc

V1_WANTED = ("pids", "freezer", "cpuacct")


@dataclass(frozen=True)
class Layout:
    mode: str                                  # "v1" | "hybrid" | "v2"
    v2_root: str | None = None                 # cgroup2 mount point
    v1: dict[str, str] = field(default_factory=dict)  # v1 controller -> mount point
    v2_controllers: frozenset[str] = frozenset()      # available at the cgroup2 root

    @property
    def has_v2(self) -> bool:
        return self.v2_root is not None


def parse_mounts(text: str) -> tuple[str | None, dict[str, str]]:
    """(cgroup2 mount point, {v1 controller: mount point}) from /proc/mounts text."""
    v2_root = None
    v1: dict[str, str] = {}
    for fstype, mnt, opts in proc.parse_mounts(text):
        if fstype == "cgroup2" and v2_root is None:
            v2_root = mnt
        elif fstype == "cgroup":
            for opt in opts:
                if opt in V1_WANTED or opt in ("cpu", "memory", "cpuset", "devices", "blkio"):
                    v1.setdefault(opt, mnt)
    return v2_root, v1


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def detect(mounts: str | None = None) -> Layout:
    """Probe the node (``mounts``: a mounts file to read instead of this process's).  Pure v2 = a
    cgroup2 mount and no v1 controller we use."""
    v2_root, v1 = parse_mounts(_read(mounts) if mounts else proc.mounts_text())
    ctrls = frozenset(_read(os.path.join(v2_root, "cgroup.controllers")).split()) if v2_root else frozenset()
    has_v1 = any(c in v1 for c in V1_WANTED)
    if v2_root and not has_v1:
        mode = "v2"
    elif v2_root:
        mode = "hybrid"
    elif has_v1:
        mode = "v1"
    else:
        mode = "none"
    return Layout(mode=mode, v2_root=v2_root, v1=v1, v2_controllers=ctrls)
