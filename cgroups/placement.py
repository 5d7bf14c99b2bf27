"""Where jobcage's subtree sits in the cgroup tree: at the top of each hierarchy (``top``), or inside a cgroup
systemd delegated to jobcage (``unit``).

On a pure-v2 systemd node the cgroup tree belongs to systemd: a manager may only write below a cgroup systemd
delegated to it (``Delegate=yes``), and systemd re-realizes what it considers its own on ``daemon-reload``.
``unit`` puts the job cgroups in the delegated cgroup of ``jobcage-jobs.service`` (``hooks/systemd``): its one
holder process sits in a leaf (``holder``), the jobs beside it in ``jobs/``.  The agent's own unit is a plain
service, so ``systemctl restart jobcage`` never touches the delegated subtree (systemd 252, Debian 12 / EL9,
cannot start a delegated unit again while its subtree holds live cgroups with controllers enabled: 219/CGROUP).

Probed from the mounts and files (``/run/systemd/system`` is systemd's own "booted with systemd" test), never from
versions.  Nothing here knows about jobs.
"""

from __future__ import annotations

import os

from .detect import Layout
from .errors import InvalidArgument, Unsupported

PLACEMENTS = ("auto", "unit", "top")
JOBS_DIR = "jobs"   # below the delegated cgroup, beside the holder's leaf
SYSTEMD_BOOTED = "/run/systemd/system"


def _check_rel(path: str, what: str) -> None:
    if not path or path.startswith("/") or ".." in path.split("/") or "\0" in path:
        raise InvalidArgument(f"invalid {what}: {path!r}")


def resolve(placement: str, subtree: str, delegated: str, layout: Layout,
            booted: str = SYSTEMD_BOOTED) -> tuple[str, str, str]:
    """(placement used, subtree relative to each hierarchy root, why) for the configured placement."""
    if placement not in PLACEMENTS:
        raise InvalidArgument(f"unknown cgroup placement {placement!r} (one of {', '.join(PLACEMENTS)})")
    _check_rel(delegated, "[cgroups] delegated_cgroup")
    unit_subtree = f"{delegated.strip('/')}/{JOBS_DIR}"
    if placement == "top":
        return "top", subtree, "configured ([cgroups] placement = \"top\")"
    if placement == "unit":
        if layout.mode != "v2":
            raise Unsupported(f"[cgroups] placement = \"unit\" needs pure cgroup v2 (this node is {layout.mode})")
        return "unit", unit_subtree, "configured ([cgroups] placement = \"unit\")"
    # auto
    if layout.mode != "v2" or not layout.v2_root:
        return "top", subtree, f"cgroups are {layout.mode}, not pure v2: no systemd delegation to use"
    if not os.path.isdir(booted):
        return "top", subtree, "PID 1 is not systemd: the cgroup tree has no other manager"
    if not os.path.isdir(os.path.join(layout.v2_root, delegated)):
        return "top", subtree, (f"pure v2 under systemd, but {delegated} does not exist "
                                "(jobcage-jobs.service not running): top-level subtree")
    return "unit", unit_subtree, f"pure v2 under systemd: inside {delegated}, delegated to jobcage (Delegate=yes)"
