"""The tree rules: which process is shown under which parent, and the marks (identity switch,
reparented).

Parents as /proc says now, except where the tracer's lineage knows better: a reparented (daemonized)
process is shown under its original parent -- or that parent's nearest surviving ancestor in the job --
with its current ppid in the PPID column.  Without lineage, a process whose parent is outside the job is
a root, marked reparented when that parent is init or a known subreaper.  Marks: identity switch (uid or
euid differs from the parent's; for a root, from the job owner's) and reparented.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobcage.cgroups import proc

from .snapshot import HZ, Proc, comm_of, setuid_exe

# Parents that adopt orphans besides init (PR_SET_CHILD_SUBREAPER is not visible in /proc, so by name).
SUBREAPERS = frozenset({"systemd", "init", "tini", "dumb-init", "catatonit", "conmon", "s6-svscan", "runsv"})
LINEAGE_SLACK = 2.0      # s: a lineage record older than its process's start names an earlier process


@dataclass(slots=True, eq=False)
class Node:
    proc: Proc
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    orig_ppid: int | None = None
    reparented: bool = False
    orig_gone: bool = False              # the original parent is no longer in the job
    switched_from: tuple[int, int] | None = None   # parent's (uid, euid) when this process's differ
    via: str | None = None
    new: bool = False                    # --live: appeared recently
    ghost: bool = False                  # --live: exited recently


def parse_lineage(raw: Mapping[str, Any] | None) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for k, v in (raw or {}).items():
        try:
            pid = int(k)
            out[pid] = {"orig_ppid": int(v["orig_ppid"]) if v.get("orig_ppid") is not None else None,
                        "via": v.get("via"), "ts": float(v["ts"]) if v.get("ts") is not None else None}
        except (TypeError, ValueError, KeyError, AttributeError):
            continue
    return out


def build_tree(procs: Mapping[int, Proc], lineage: Mapping[int, dict], owner_uid: int,
               identities: Iterable[Mapping[str, Any]] = (),
               ghosts: Mapping[int, tuple[Proc, int | None]] | None = None) -> list[Node]:
    """Roots of the job's process tree (see the module doc for the placement rules)."""
    nodes = {pid: Node(p) for pid, p in procs.items()}
    btime = proc.boot_time()
    helper = {int(i["uid"]): i.get("via") for i in identities
              if i.get("via") not in (None, "", "batch system", "declared")}
    subreaper: dict[int, bool] = {}
    parent_of: dict[int, int | None] = {}
    for pid, n in nodes.items():
        p = n.proc
        lin = lineage.get(pid)
        if lin is not None and lin.get("ts") is not None and lin["ts"] < btime + p.start / HZ - LINEAGE_SLACK:
            lin = None  # recorded for an earlier process with the same pid
        if lin is not None and lin.get("via"):
            n.via = lin["via"]
        orig = lin.get("orig_ppid") if lin else None
        parent: int | None = p.ppid if p.ppid in nodes else None
        if orig is not None and orig != p.ppid:
            # Daemonized: the nearest ancestor still in the job, following the lineage up.
            n.reparented, n.orig_ppid = True, orig
            a: int | None = orig
            seen = {pid}
            while a is not None and a not in seen:
                seen.add(a)
                if a in nodes and nodes[a].proc.start <= p.start:
                    parent = a
                    break
                up = lineage.get(a)
                a = up.get("orig_ppid") if up else None
            n.orig_gone = orig not in nodes
        elif orig is None and parent is None:
            if p.ppid not in subreaper:
                subreaper[p.ppid] = p.ppid == 1 or comm_of(p.ppid) in SUBREAPERS
            n.reparented = subreaper[p.ppid]
            n.orig_ppid = None if n.reparented else p.ppid
            n.orig_gone = n.reparented
        else:
            n.orig_ppid = p.ppid
        parent_of[pid] = parent
    for pid, (p, last_parent) in (ghosts or {}).items():
        if pid not in nodes:
            nodes[pid] = Node(p, ghost=True, orig_ppid=p.ppid)
            parent_of[pid] = last_parent if last_parent in nodes else None
    _break_cycles(parent_of)
    roots = []
    for pid, n in nodes.items():
        par = parent_of.get(pid)
        if par is None:
            roots.append(n)
        else:
            n.parent = nodes[par]
            n.parent.children.append(n)
    # Identity switches: compared with the displayed parent, or the job owner for a root.
    for n in nodes.values():
        p = n.proc
        ref = (n.parent.proc.uid, n.parent.proc.euid) if n.parent else (owner_uid, owner_uid)
        if (p.uid, p.euid) != ref and not n.ghost:
            n.switched_from = ref
            if n.via is None:
                n.via = helper.get(p.uid) if p.uid != ref[0] else None
            if n.via is None and p.euid != p.uid:
                n.via = setuid_exe(p.pid)
        else:
            n.via = None  # lineage "via" is inherited by descendants: show it only where the switch is
    return roots


def _break_cycles(parent_of: dict[int, int | None]) -> None:
    """Lineage from reused pids could make a cycle: cut it (the node becomes a root)."""
    state: dict[int, int] = {}  # 1 = on the current path, 2 = done
    for start in parent_of:
        path = []
        pid: int | None = start
        while pid is not None and state.get(pid) is None:
            state[pid] = 1
            path.append(pid)
            pid = parent_of.get(pid)
        if pid is not None and state.get(pid) == 1:
            parent_of[pid] = None
        for q in path:
            state[q] = 2


def sort_key(mode: str) -> Callable[[Node], tuple]:
    if mode == "cpu":
        return lambda n: (-(n.proc.pct or 0.0), n.proc.start, n.proc.pid)
    return lambda n: (n.proc.start, n.proc.pid)


def flatten(roots: list[Node], sort: str = "start") -> list[tuple[Node, int, str]]:
    """Depth-first rows: (node, depth, tree prefix code).  The code has one char per ancestor level:
    '|' (more siblings below at that level) or ' ', then 'T' (middle child) or 'L' (last child)."""
    key = sort_key(sort)
    out: list[tuple[Node, int, str]] = []
    stack: list[tuple[Node, int, str]] = [(n, 0, "") for n in sorted(roots, key=key, reverse=True)]
    while stack:
        node, depth, code = stack.pop()
        out.append((node, depth, code))
        kids = sorted(node.children, key=key)
        base = code[:-1] + ("|" if code.endswith("T") else " ") if code else ""
        for i in range(len(kids) - 1, -1, -1):
            stack.append((kids[i], depth + 1, base + ("L" if i == len(kids) - 1 else "T")))
    return out


