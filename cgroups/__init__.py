"""Kernel cgroup drivers: detect v1 / hybrid / v2 once, one interface.

Nothing here knows about jobs; ``agent`` names cgroups after jobs.
"""

from __future__ import annotations

from .detect import Layout, detect
from .driver import Driver
from .errors import InvalidArgument, Unsupported

MODES = ("auto", "v1", "hybrid", "v2")


def get_driver(mode: str = "auto", subtree: str = "jobcage", layout: Layout | None = None) -> Driver:
    """The driver for this node.  ``auto`` picks what the mounts say."""
    from .drivers import HybridDriver, V1Driver, V2Driver

    layout = layout or detect()
    if mode not in MODES:
        raise InvalidArgument(f"unknown cgroup mode {mode!r} (one of {', '.join(MODES)})")
    chosen = layout.mode if mode == "auto" else mode
    cls = {"v1": V1Driver, "hybrid": HybridDriver, "v2": V2Driver}.get(chosen)
    if cls is None:
        raise Unsupported("no usable cgroup hierarchy is mounted on this node")
    return cls(layout, subtree)


__all__ = ["Driver", "Layout", "detect", "get_driver", "MODES"]
