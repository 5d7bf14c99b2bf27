"""Kernel cgroup drivers: detect v1 / hybrid / v2 once, one interface.

Nothing here knows about jobs; ``agent`` names cgroups after jobs.  Imports are
lazy: `cgroups.errors` is imported on every hook call and must stay cheap.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not `from typing import ...`: importing typing costs ~3 ms on every hook call
if TYPE_CHECKING:
    from typing import Any

    from .detect import Layout
    from .driver import Driver

MODES = ("auto", "v1", "hybrid", "v2")


def get_driver(mode: str = "auto", subtree: str = "jobcage", layout: Layout | None = None) -> Driver:
    """The driver for this node.  ``auto`` picks what the mounts say."""
    from .drivers import HybridDriver, V1Driver, V2Driver
    from .errors import InvalidArgument, Unsupported

    layout = layout or _export("detect")()
    if mode not in MODES:
        raise InvalidArgument(f"unknown cgroup mode {mode!r} (one of {', '.join(MODES)})")
    chosen = layout.mode if mode == "auto" else mode
    cls = {"v1": V1Driver, "hybrid": HybridDriver, "v2": V2Driver}.get(chosen)
    if cls is None:
        raise Unsupported("no usable cgroup hierarchy is mounted on this node")
    return cls(layout, subtree)


# name -> (submodule, attribute).  `detect` is both a submodule and the function exported under that name:
# the import system binds the *module* to the package attribute when it first loads cgroups.detect, so
# _export() (re)binds the function after loading; `from . import detect` here would recurse into __getattr__.
_LAZY = {"detect": (".detect", "detect"), "Layout": (".detect", "Layout"), "Driver": (".driver", "Driver")}


def _export(name: str) -> Any:
    import importlib

    mod, attr = _LAZY[name]
    value = getattr(importlib.import_module(mod, __name__), attr)
    globals()[name] = value
    det = sys.modules.get(__name__ + ".detect")  # loaded on the way (driver.py imports it): rebind the function
    if det is not None:
        globals()["detect"] = det.detect
    return value


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return _export(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Driver", "Layout", "detect", "get_driver", "MODES"]
