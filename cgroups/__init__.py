"""Kernel cgroup drivers: detect v1 / hybrid / v2 once, one interface.

Nothing here knows about jobs; ``agent`` names cgroups after jobs.  Imports are
lazy: `cgroups.errors` is imported on every hook call and must stay cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name in ("detect", "Layout"):
        from . import detect as _d

        return getattr(_d, name)
    if name == "Driver":
        from .driver import Driver

        return Driver
    raise AttributeError(name)


__all__ = ["Driver", "Layout", "detect", "get_driver", "MODES"]
