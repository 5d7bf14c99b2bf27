"""The three concrete drivers.

- V2Driver: one cgroup2 directory; cgroup.kill, cgroup.freeze + cgroup.events,
  cpu.stat, pids.* once the pids controller is delegated down to the subtree.
- V1Driver: freezer (membership + freeze), pids, cpuacct v1 hierarchies.
- HybridDriver: cgroup2 for membership, freeze, kill and cgroup id (that is what
  BPF sees), v1 pids for the limit that the controller-less cgroup2 lacks.
"""

from __future__ import annotations

import os

from .detect import Layout
from .driver import Driver, check_name, read, read_keyed, write
from .errors import Unsupported


class V2Driver(Driver):
    mode = "v2"
    has_freeze = True

    def __init__(self, layout: Layout, subtree: str = "jobcage") -> None:
        super().__init__(layout, subtree)
        if not layout.v2_root:
            raise Unsupported("no cgroup2 mount on this node")
        self.has_pids = "pids" in layout.v2_controllers
        self._probe()

    def _probe(self) -> None:
        # cgroup.kill / cgroup.freeze exist only in non-root cgroups: look in our
        # subtree, else in any child of the root; ensure_subtree() probes again.
        root = self.layout.v2_root or ""
        sub = os.path.join(root, self.subtree)
        probe_dir = sub if os.path.isdir(sub) else None
        if probe_dir is None:
            try:
                probe_dir = next((e.path for e in os.scandir(root) if e.is_dir(follow_symlinks=False)), None)
            except OSError:
                probe_dir = None
        self.has_kill = bool(probe_dir) and os.path.exists(os.path.join(probe_dir, "cgroup.kill"))
        self.has_freeze = bool(probe_dir) and os.path.exists(os.path.join(probe_dir, "cgroup.freeze"))

    def _dirs(self, name: str | None) -> list[str]:
        return [self._v2_dir(name)]

    def ensure_subtree(self) -> None:
        super().ensure_subtree()
        self._probe()
        if self.has_pids:
            # Delegate pids down to the job cgroups: root -> subtree -> jobs.
            chain = [self.layout.v2_root or "/"]
            for part in self.subtree.split("/"):
                chain.append(os.path.join(chain[-1], part))
            for d in chain:
                sc = os.path.join(d, "cgroup.subtree_control")
                if "pids" not in read(sc).split():
                    write(sc, "+pids")

    def _pids_dir(self, name: str) -> str:
        if not self.has_pids:
            raise Unsupported("the pids controller is not available in cgroup2 on this node")
        return self._v2_dir(name)

    def _set_frozen(self, name: str, frozen: bool) -> None:
        write(os.path.join(self._v2_dir(name), "cgroup.freeze"), "1" if frozen else "0")

    def frozen(self, name: str) -> bool:
        return read_keyed(os.path.join(self._v2_dir(name), "cgroup.events")).get("frozen") == "1"

    def _cgroup_kill(self, name: str) -> None:
        write(os.path.join(self._v2_dir(name), "cgroup.kill"), "1")

    def cpu_usage_ns(self, name: str) -> int:
        return int(read_keyed(os.path.join(self._v2_dir(name), "cpu.stat"))["usage_usec"]) * 1000


class V1Driver(Driver):
    mode = "v1"

    def __init__(self, layout: Layout, subtree: str = "jobcage") -> None:
        super().__init__(layout, subtree)
        if "freezer" not in layout.v1 and "pids" not in layout.v1:
            raise Unsupported("neither a v1 freezer nor a v1 pids hierarchy is mounted")
        self.has_freeze = "freezer" in layout.v1
        self.has_pids = "pids" in layout.v1
        # Membership comes from the freezer hierarchy (or pids without one).
        self._order = [c for c in ("freezer", "pids", "cpuacct") if c in layout.v1]

    def cgroup_id(self, name: str) -> int | None:
        return None  # v1 mode: BPF filters by the pid map, not by cgroup id

    def _dirs(self, name: str | None) -> list[str]:
        out = []
        for c in self._order:
            base = os.path.join(self.layout.v1[c], self.subtree)
            out.append(base if name is None else os.path.join(base, name))
        return out

    def _membership_key(self) -> str:
        return self._order[0]

    def _ctrl_dir(self, ctrl: str, name: str) -> str:
        if ctrl not in self.layout.v1:
            raise Unsupported(f"no v1 {ctrl} hierarchy on this node")
        return os.path.join(self.layout.v1[ctrl], self.subtree, name)

    def _pids_dir(self, name: str) -> str:
        return self._ctrl_dir("pids", name)

    def _set_frozen(self, name: str, frozen: bool) -> None:
        write(os.path.join(self._ctrl_dir("freezer", name), "freezer.state"), "FROZEN" if frozen else "THAWED")

    def frozen(self, name: str) -> bool:
        # FREEZING is not frozen: freeze() must wait for the kernel's FROZEN.
        return read(os.path.join(self._ctrl_dir("freezer", name), "freezer.state")).strip() == "FROZEN"

    def cpu_usage_ns(self, name: str) -> int:
        # cgroupspy's cpuacct controller fits here: a typed read of cpuacct.usage.
        from cgroupspy.nodes import Node

        mnt = self.layout.v1["cpuacct"]
        node = Node(b"cpuacct", parent=Node(os.path.dirname(mnt).encode()))
        node.name = os.path.basename(mnt).encode()  # typed by name; the mount may be "cpu,cpuacct"
        for part in (self.subtree + "/" + check_name(name)).split("/"):
            node = Node(part, parent=node)
        return int(node.controller.usage)


class HybridDriver(V2Driver):
    mode = "hybrid"

    def __init__(self, layout: Layout, subtree: str = "jobcage") -> None:
        super().__init__(layout, subtree)
        self.has_pids = "pids" in layout.v1

    def _dirs(self, name: str | None) -> list[str]:
        dirs = [self._v2_dir(name)]
        if "pids" in self.layout.v1:
            base = os.path.join(self.layout.v1["pids"], self.subtree)
            dirs.append(base if name is None else os.path.join(base, name))
        return dirs

    def ensure_subtree(self) -> None:
        Driver.ensure_subtree(self)  # no controllers to delegate in a controller-less cgroup2
        self._probe()

    def _pids_dir(self, name: str) -> str:
        if "pids" not in self.layout.v1:
            raise Unsupported("no v1 pids hierarchy on this node")
        return os.path.join(self.layout.v1["pids"], self.subtree, name)
