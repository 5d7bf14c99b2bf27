"""The JSON forms: a tree (the contract's keys: pid, ppid, orig_ppid, uid, euid, user, sid, cmd,
cpu_seconds, children), a job with its tree, one audit event per line."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..fmt import iso, user_name
from .snapshot import HZ, started
from .tree import Node, sort_key

EVENT_KEYS = ("ts", "job_id", "kind", "pid", "ppid", "uid", "euid", "comm", "filename", "detail")


def node_dict(n: Node) -> dict:
    p = n.proc
    return {"pid": p.pid, "ppid": p.ppid, "orig_ppid": n.orig_ppid, "uid": p.uid, "euid": p.euid,
            "user": user_name(p.uid), "euser": user_name(p.euid), "sid": p.sid, "pgid": p.pgid,
            "state": "exited" if n.ghost else p.state, "threads": p.threads, "comm": p.comm,
            "cmd": p.cmd or f"[{p.comm}]", "cpu_seconds": round(p.ticks / HZ, 2),
            "cpu_percent": None if p.pct is None else round(p.pct, 1),
            "started": iso(started(p)), "uid_changed": n.switched_from is not None,
            "via": n.via, "reparented": n.reparented, "userns": p.userns or None}


def tree_json(roots: list[Node], sort: str = "start") -> str:
    """The nested tree as a JSON array, built iteratively (a fork chain may be deeper than Python's
    recursion limit)."""
    key = sort_key(sort)
    out = ["["]
    stack: list[tuple[list[Node], int]] = [(sorted(roots, key=key), 0)]
    while stack:
        lst, i = stack[-1]
        if i >= len(lst):
            stack.pop()
            out.append("]}" if stack else "]")
            continue
        stack[-1] = (lst, i + 1)
        if i:
            out.append(", ")
        out.append(json.dumps(node_dict(lst[i]))[:-1] + ', "children": [')
        stack.append((sorted(lst[i].children, key=key), 0))
    return "".join(out)


def job_json(job: Mapping[str, Any], roots: list[Node], lineage_known: bool) -> str:
    head = json.dumps({"job_id": job.get("job_id"), "job": job, "lineage_known": lineage_known})
    return head[:-1] + ', "tree": ' + tree_json(roots) + "}"




def event_json(ev: Mapping[str, Any]) -> str:
    d = {k: ev.get(k) for k in EVENT_KEYS}
    d["ts"] = iso(ev["ts"]) if isinstance(ev.get("ts"), int | float) else ev.get("ts")
    d["detail"] = ev.get("detail") or {}
    d["id"] = ev.get("id")
    return json.dumps(d)
