"""jobcage.cgroups — kernel cgroup drivers: detect v1 / hybrid / v2 once, one interface.

Holds: ``detect`` (which hierarchies are mounted, probed by the files that exist), ``driver``
(the shared algorithms: confirmed freeze/thaw, kill with or without ``cgroup.kill``),
``drivers`` (V1, Hybrid, V2), ``path`` (a cgroup at a path: a batch system's), ``proc`` (the one
/proc reader, which the agent uses too) and ``errors`` (the base of jobcage's exception hierarchy and the
cgroup errors).  It names cgroups by a relative name and knows nothing of jobs, users or the store.

Must never import: ``jobcage.agent`` (or anything above it), click, rich, sqlite3, bcc.
This ``__init__`` imports nothing at all: ``jobcage.cgroups.errors`` is on every hook call.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `from typing import ...`: importing typing costs ~3 ms on every hook call
if TYPE_CHECKING:
    from .detect import Layout
    from .driver import Driver

MODES = ("auto", "v1", "hybrid", "v2")


def get_driver(mode: str = "auto", subtree: str = "jobcage", layout: Layout | None = None) -> Driver:
    """The driver for this node.  ``auto`` picks what the mounts say."""
    from .detect import detect
    from .drivers import HybridDriver, V1Driver, V2Driver
    from .errors import InvalidArgument, Unsupported

    layout = layout or detect()
    if mode not in MODES:
        raise InvalidArgument(f"unknown cgroup mode {mode!r} (one of {', '.join(MODES)})")
    chosen = layout.mode if mode == "auto" else mode
    cls = {"v1": V1Driver, "hybrid": HybridDriver, "v2": V2Driver}.get(chosen)
    if cls is None:
        raise Unsupported("no usable cgroup hierarchy is mounted on this node")
    return cls(layout, subtree)


__all__ = ["MODES", "get_driver"]
