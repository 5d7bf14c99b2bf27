"""`jobtrace`: a batch job's process tree, a live view of it, and its audit trail.

Where the data comes from:
- the job (header), its member pids and the tracer's lineage: the control-socket method ``trace``
  (agent/api.py), through the agent when it runs, else directly from cgroupfs and the store as root (the
  same method table, like client.invoke); the permission rules are the agent's;
- per-process details: read here from /proc with raw reads of three small files per process (stat: ppid,
  session, state, cpu ticks, threads, start; status: real/effective uid; cmdline).  A process that exits
  mid-read is left out (or shown as exited in --live), never an error.

The tree: parents as /proc says now, except where the tracer's lineage knows better: a reparented
(daemonized) process is shown under its original parent -- or that parent's nearest surviving ancestor in
the job -- with its current ppid in the PPID column.  Without lineage, a process whose parent is outside the
job is a root, marked reparented when that parent is init or a known subreaper.  Marks: identity switch
(uid or euid differs from the parent's; for a root, from the job owner's) and reparented.
"""

from __future__ import annotations

import json
import os
import pwd
import select
import signal
import stat as stat_mod
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import click

from .api import EVENTS_PAGE
from .client import Invoker
from .errors import JobcageError

HZ = os.sysconf("SC_CLK_TCK")
# Parents that adopt orphans besides init (PR_SET_CHILD_SUBREAPER is not visible in /proc, so by name).
SUBREAPERS = frozenset({"systemd", "init", "tini", "dumb-init", "catatonit", "conmon", "s6-svscan", "runsv"})
STATES = {"R": "run", "S": "sleep", "D": "disk", "Z": "zombie", "T": "stop", "t": "trace", "X": "dead",
          "I": "idle", "P": "park", "W": "wake", "K": "wkill"}
DEFAULT_INTERVAL = 0.2   # one-shot: %CPU sampling window (s); 0 = lifetime average like ps
MAX_MARK_LINES = 10      # footer lines per kind of mark in the text view
USERNS_MARK = "[userns]"  # the process runs in a (non-initial) user namespace
LINEAGE_SLACK = 2.0      # s: a lineage record older than its process's start names an earlier process


# -- /proc ------------------------------------------------------------------------------------------------

@dataclass(slots=True, eq=False)
class Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    comm: str
    ticks: int          # utime + stime of the whole thread group, clock ticks
    start: int          # start time, clock ticks since boot: (pid, start) names a process
    threads: int
    uid: int = -1
    euid: int = -1
    cmd: str = ""       # "" for kernel threads and zombies
    t: float = 0.0      # monotonic time of the ticks reading
    pct: float | None = None
    userns: int = 0     # inode of its user namespace when not the initial one (0: initial or unreadable)


def _read(path: str, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _read_all(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_stat(pid: int) -> tuple[str, str, int, int, int, int, int, int] | None:
    """(comm, state, ppid, pgid, sid, ticks, threads, start) or None when gone."""
    try:
        data = _read(f"/proc/{pid}/stat", 1024)
        r = data.rindex(b")")
        f = data[r + 2:].split()
        return (data[data.index(b"(") + 1:r].decode(errors="replace"), f[0].decode(), int(f[1]), int(f[2]),
                int(f[3]), int(f[11]) + int(f[12]), int(f[17]), int(f[19]))
    except (OSError, ValueError, IndexError):
        return None


def read_uids(pid: int) -> tuple[int, int] | None:
    """(real uid, effective uid) or None when gone."""
    try:
        data = _read(f"/proc/{pid}/status", 1024)
        i = data.index(b"\nUid:") + 5
        f = data[i:data.index(b"\n", i)].split()
        return int(f[0]), int(f[1])
    except (OSError, ValueError, IndexError):
        return None


def read_cmd(pid: int, full: bool) -> str | None:
    """The command line ('' for kernel threads and zombies), None when gone.  Without `full`, the first 4 KiB
    (enough for any view that truncates)."""
    try:
        data = _read_all(f"/proc/{pid}/cmdline") if full else _read(f"/proc/{pid}/cmdline", 4096)
    except OSError:
        return None
    return data.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


def load_proc(pid: int, full_cmd: bool) -> Proc | None:
    st = read_stat(pid)
    ids = read_uids(pid) if st else None
    cmd = read_cmd(pid, full_cmd) if ids else None
    if st is None or ids is None or cmd is None:
        return None
    return Proc(pid, st[2], st[3], st[4], st[1], st[0], st[5], st[7], st[6], ids[0], ids[1], cmd,
                time.monotonic(), userns=read_userns(pid))


def _initial_userns() -> int:
    try:
        return os.stat("/proc/1/ns/user").st_ino
    except OSError:
        return 4026531837   # PROC_USER_INIT_INO: fixed by the kernel for the initial namespace


INIT_USERNS = _initial_userns()


def read_userns(pid: int) -> int:
    """The user namespace inode of pid when it is not the initial one, else 0."""
    try:
        ino = os.stat(f"/proc/{pid}/ns/user").st_ino
    except OSError:
        return 0
    return 0 if ino == INIT_USERNS else ino


def refresh_proc(p: Proc, full_cmd: bool, uids: bool = False, cmd: bool = False) -> Proc | None:
    """Re-read stat (and optionally status / cmdline) of a known process, updating %CPU over the time since
    the last reading.  None when gone; a new Proc when the pid now names another process."""
    st = read_stat(p.pid)
    if st is None:
        return None
    if st[7] != p.start:
        return load_proc(p.pid, full_cmd)
    now = time.monotonic()
    if now > p.t:
        p.pct = max(0.0, (st[5] - p.ticks) / HZ / (now - p.t) * 100.0)
    exec_seen = st[0] != p.comm
    p.comm, p.state, p.ppid, p.pgid, p.sid, p.ticks, p.threads, p.t = st[0], st[1], st[2], st[3], st[4], \
        st[5], st[6], now
    if uids:
        ids = read_uids(p.pid)
        if ids is None:
            return None
        p.uid, p.euid = ids
        p.userns = read_userns(p.pid)
    if cmd or exec_seen:
        c = read_cmd(p.pid, full_cmd)
        if c is None:
            return None
        p.cmd = c
    return p


_btime: float | None = None


def boot_time() -> float:
    global _btime
    if _btime is None:
        try:
            with open("/proc/stat", "rb") as f:
                for line in f:
                    if line.startswith(b"btime "):
                        _btime = float(line.split()[1])
                        break
        except OSError:
            pass
        _btime = _btime or 0.0
    return _btime


def uptime() -> float:
    try:
        with open("/proc/uptime", "rb") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def snapshot(pids: Iterable[int], interval: float, full_cmd: bool) -> dict[int, Proc]:
    """One reading of every pid; %CPU over `interval` seconds (a second stat pass), or the lifetime
    average when interval <= 0.  Processes that exit meanwhile are dropped."""
    t0 = time.monotonic()
    procs = {p.pid: p for p in (load_proc(pid, full_cmd) for pid in pids) if p is not None}
    if interval > 0:
        wait = t0 + interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        for pid, p in list(procs.items()):
            q = refresh_proc(p, full_cmd)
            if q is None:
                del procs[pid]
            else:
                procs[pid] = q
    else:
        up = uptime()
        for p in procs.values():
            age = up - p.start / HZ
            p.pct = p.ticks / HZ / age * 100.0 if age > 0 else 0.0
    return procs


def _comm_of(pid: int) -> str | None:
    st = read_stat(pid)
    return st[0] if st else None


def _setuid_exe(pid: int) -> str | None:
    """The executable of pid if it is a setuid/setgid file (what made its euid differ), else None."""
    try:
        path = os.readlink(f"/proc/{pid}/exe")
        mode = os.stat(f"/proc/{pid}/exe").st_mode
    except OSError:
        return None
    return path if mode & (stat_mod.S_ISUID | stat_mod.S_ISGID) else None


_users: dict[int, str] = {}


def user_name(uid: int) -> str:
    name = _users.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except (KeyError, OverflowError):
            name = str(uid)
        _users[uid] = name
    return name


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the tree ---------------------------------------------------------------------------------------------

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
    btime = boot_time()
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
                subreaper[p.ppid] = p.ppid == 1 or _comm_of(p.ppid) in SUBREAPERS
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
                n.via = _setuid_exe(p.pid)
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


# -- JSON -------------------------------------------------------------------------------------------------

def node_dict(n: Node) -> dict:
    p = n.proc
    return {"pid": p.pid, "ppid": p.ppid, "orig_ppid": n.orig_ppid, "uid": p.uid, "euid": p.euid,
            "user": user_name(p.uid), "euser": user_name(p.euid), "sid": p.sid, "pgid": p.pgid,
            "state": "exited" if n.ghost else p.state, "threads": p.threads, "comm": p.comm,
            "cmd": p.cmd or f"[{p.comm}]", "cpu_seconds": round(p.ticks / HZ, 2),
            "cpu_percent": None if p.pct is None else round(p.pct, 1),
            "started": iso(boot_time() + p.start / HZ), "uid_changed": n.switched_from is not None,
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


# -- text -------------------------------------------------------------------------------------------------

Seg = tuple[str, str]  # (text, style); style "" = plain; names below map to ANSI and rich styles

ANSI = {"bold": "1", "dim": "2", "head": "1;7", "uid": "1;33", "rep": "1;35", "frozen": "1;36",
        "hot": "1;31", "new": "1;32", "gone": "2;9;31", "err": "1;31", "zombie": "2"}


@dataclass
class Glyphs:
    tee: str
    last: str
    bar: str
    switch: str
    rep: str
    ell: str
    arrow: str


UNICODE = Glyphs("├─", "└─", "│ ", "⇄", "↥", "…", "→")
ASCII = Glyphs("|-", "`-", "| ", "*", "^", "+", "->")


def clean(s: str) -> str:
    """Printable only: a command line must not drive the administrator's terminal."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else "?" for c in s)


def fmt_cpu(s: float) -> str:
    if s < 1000:
        return f"{s:.2f}"
    if s < 360000:
        return f"{int(s // 60)}m{int(s % 60):02d}"
    return f"{s / 3600:.0f}h"


def fmt_pct(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.1f}" if p < 10 else f"{p:.0f}"


def state_word(n: Node, frozen: bool) -> str:
    if n.ghost:
        return "exited"
    s = n.proc.state
    if frozen and s not in ("Z", "X"):
        return "frozen"
    return STATES.get(s, s)


def trunc(s: str, width: int, g: Glyphs) -> str:
    if width <= 0:
        return ""
    return s if len(s) <= width else s[:max(width - len(g.ell), 0)] + g.ell[:width]


class Table:
    """Column layout for a set of rows: widths from cheap maxima over every node, so that rendering only
    a window of rows (--live) keeps the columns still."""

    HEAD = ("PID", "PPID", "SESS", "USER", "UID", "EUID", "CPU", "%CPU", "STATE")

    def __init__(self, rows: list[tuple[Node, int, str]], width: int, wide: bool, g: Glyphs) -> None:
        procs = [n.proc for n, _d, _c in rows]
        pidw = max(4, len(str(max((max(p.pid, p.ppid, p.sid) for p in procs), default=0))))
        uidw = max(4, len(str(max((max(p.uid, p.euid) for p in procs), default=0))))
        userw = min(8, max([4] + [len(user_name(u)) for u in {p.uid for p in procs}]))
        cpuw = max(5, max((len(fmt_cpu(p.ticks / HZ)) for p in procs), default=0))
        self.widths = [pidw, pidw, pidw, userw, uidw, uidw, cpuw, 4, 6]
        self.fixed = sum(self.widths) + len(self.widths)
        self.width, self.wide, self.g = width, wide, g
        self.cmdw = max(width - self.fixed, 12)

    def header(self) -> list[Seg]:
        cells = [h.rjust(w) if i not in (3, 8) else h.ljust(w)
                 for i, (h, w) in enumerate(zip(self.HEAD, self.widths, strict=True))]
        line = " ".join(cells) + " CMD"
        return [(line, "head")]

    def row(self, n: Node, depth: int, code: str, frozen: bool) -> list[Seg]:
        p, g, w = n.proc, self.g, self.widths
        state = state_word(n, frozen)
        user = user_name(p.uid)
        if len(user) > w[3]:
            user = user[:w[3] - 1] + "+"
        cells = (str(p.pid).rjust(w[0]) + " " + str(p.ppid).rjust(w[1]) + " " + str(p.sid).rjust(w[2]) + " " +
                 user.ljust(w[3]) + " " + str(p.uid).rjust(w[4]) + " " + str(p.euid).rjust(w[5]) + " " +
                 fmt_cpu(p.ticks / HZ).rjust(w[6]) + " ")
        row_style = "gone" if n.ghost else "new" if n.new else ""
        segs: list[Seg] = [(cells, row_style)]
        hot = p.pct is not None and p.pct >= 50 and not n.ghost
        segs.append((fmt_pct(p.pct).rjust(w[7]) + " ", "hot" if hot else row_style))
        segs.append((state.ljust(w[8]) + " ", "frozen" if state == "frozen" else
                     "zombie" if state == "zombie" else row_style))
        # CMD: tree prefix, marks, command; truncated to what is left of the line.
        prefix = "".join(g.bar if c == "|" else "  " for c in code[:-1])
        if code:
            prefix += g.last if code[-1] == "L" else g.tee
        room = self.cmdw
        if not self.wide and len(prefix) > room // 2:
            prefix = f"[{depth}]" + (g.last if code and code[-1] == "L" else g.tee)
        segs.append((prefix, row_style or "dim"))
        used = len(prefix)
        if n.switched_from is not None:
            segs.append((g.switch, "uid"))
            used += len(g.switch)
        if n.reparented:
            segs.append((g.rep, "rep"))
            used += len(g.rep)
        if p.userns:
            segs.append((USERNS_MARK, "uid"))
            used += len(USERNS_MARK)
        cmd = clean(p.cmd or f"[{p.comm}]")
        if not self.wide:
            cmd = trunc(cmd, room - used, g)
        segs.append((cmd, row_style))
        return segs


def header_lines(job: Mapping[str, Any], procs: Mapping[int, Proc], width: int, wide: bool,
                 g: Glyphs) -> list[list[Seg]]:
    """Owner, state, pids current/max, limit hits, cpu; then cpu per identity."""
    state = str(job.get("state"))
    owner = job.get("owner_uid")
    mx = job.get("pids_max")
    first = [(f"job {job.get('job_id')}", "bold"), ("  ", ""),
             (state, "frozen" if state == "suspended" else "bold" if state == "running" else "dim"),
             (f"  owner {user_name(owner) if isinstance(owner, int) else owner}({owner})"
              f"  pids {job.get('pids_current', len(procs))}/{mx if mx is not None else 'max'}"
              f"  limit hits {job.get('pids_limit_hits') or 0}", "")]
    if job.get("events_lost"):
        first.append((f"  events lost {job['events_lost']}", "err"))
    # cpu per identity: the tracer's accounting when it has any, else the live processes' own times
    idents = list(job.get("identities") or [])
    traced = any((i.get("cpu_seconds") or 0) > 0 for i in idents)
    live: dict[int, float] = {}
    for p in procs.values():
        live[p.uid] = live.get(p.uid, 0.0) + p.ticks / HZ
    labels = {d.get("uid"): d.get("label") for d in job.get("declared") or []}
    seen = set()
    parts = []
    for i in idents:
        uid = i.get("uid")
        seen.add(uid)
        cpu = (i.get("cpu_seconds") or 0) if traced else live.get(uid, 0.0)
        s = f"{i.get('user') or user_name(uid)}({uid}) {cpu:.2f}s"
        if labels.get(uid):
            s += f" '{clean(str(labels[uid]))}'"
        if i.get("via") and i.get("via") not in ("batch system",):
            s += f" via {clean(str(i['via']))}"
        parts.append(s)
    if not traced:
        parts += [f"{user_name(u)}({u}) {c:.2f}s" for u, c in sorted(live.items()) if u not in seen]
    lines = [first]
    cpu = job.get("cpu_seconds")
    text = (f"cpu {'-' if cpu is None else f'{cpu:.2f}'}s; by identity"
            f"{'' if traced else ' (live processes)'}: " + (", ".join(parts) if parts else "-"))
    if wide:
        lines.append([(text, "")])
    else:
        while text:  # wrap at commas to the width
            if len(text) <= width:
                lines.append([(text, "")])
                break
            cut = text.rfind(", ", 0, width)
            cut = cut + 1 if cut > 0 else width
            lines.append([(text[:cut], "")])
            text = "  " + text[cut:].lstrip()
    if not wide:
        lines[0] = fit(lines[0], width, g)
    return lines


def fit(segs: list[Seg], width: int, g: Glyphs) -> list[Seg]:
    out, used = [], 0
    for text, style in segs:
        if used + len(text) > width:
            out.append((trunc(text, width - used, g), style))
            break
        out.append((text, style))
        used += len(text)
    return out


def mark_lines(rows: list[tuple[Node, int, str]], g: Glyphs, width: int, wide: bool,
               limit: int = MAX_MARK_LINES) -> list[list[Seg]]:
    """The legend: what each mark means for the process that carries it."""
    sw = [n for n, _d, _c in rows if n.switched_from is not None]
    rp = [n for n, _d, _c in rows if n.reparented and not n.ghost]
    out: list[list[Seg]] = []

    for n in sw[:limit]:
        p, (pu, pe) = n.proc, n.switched_from or (0, 0)
        parts = []
        if p.uid != pu:
            parts.append(f"uid {pu}{g.arrow}{p.uid} ({user_name(pu)}{g.arrow}{user_name(p.uid)})")
        if p.euid != pe and (pe != pu or p.euid != p.uid):
            parts.append(f"euid {pe}{g.arrow}{p.euid}" + ("" if p.euid == p.uid else f" ({user_name(p.euid)})"))
        text = f" {p.pid} " + ", ".join(parts)
        if n.via:
            text += f" via {clean(n.via)}"
        out.append([(g.switch, "uid"), (text, "")])
    if len(sw) > limit:
        out.append([(g.switch, "uid"), (f" ... and {len(sw) - limit} more identity switches", "dim")])
    for n in rp[:limit]:
        p = n.proc
        if n.orig_ppid is not None:
            text = (f" {p.pid} reparented: original parent {n.orig_ppid}"
                    f"{' (exited)' if n.orig_gone else ''}, now ppid {p.ppid}")
        else:
            text = f" {p.pid} reparented to {p.ppid} ({_comm_of(p.ppid) or '?'}); original parent unknown"
        out.append([(g.rep, "rep"), (text, "")])
    if len(rp) > limit:
        out.append([(g.rep, "rep"), (f" ... and {len(rp) - limit} more reparented", "dim")])
    ns = [n for n, _d, _c in rows if n.proc.userns and not n.ghost]
    for n in ns[:limit]:
        out.append([(USERNS_MARK, "uid"), (f" {n.proc.pid} runs in user namespace {n.proc.userns}; "
                                           "its uids above are host ids", "")])
    if len(ns) > limit:
        out.append([(USERNS_MARK, "uid"), (f" ... and {len(ns) - limit} more in user namespaces", "dim")])
    return out if wide else [fit(s, width, g) for s in out]


def ansi(segs: list[Seg], colour: bool) -> str:
    if not colour:
        return "".join(t for t, _s in segs)
    return "".join(f"\x1b[{ANSI[s]}m{t}\x1b[0m" if s and t else t for t, s in segs)


def render_job(job: Mapping[str, Any], procs: Mapping[int, Proc], roots: list[Node], lineage_known: bool,
               width: int, wide: bool, g: Glyphs) -> list[list[Seg]]:
    rows = flatten(roots)
    lines = header_lines(job, procs, width, wide, g)
    if not rows:
        lines.append([("(no processes)", "dim")])
        return lines
    table = Table(rows, width, wide, g)
    lines.append(table.header())
    frozen = job.get("state") == "suspended"
    lines += [table.row(n, d, c, frozen) for n, d, c in rows]
    lines += mark_lines(rows, g, width, wide)
    if not lineage_known:
        lines.append([("(no tracer lineage: parents as /proc shows them now)", "dim")])
    return lines


# -- data source --------------------------------------------------------------------------------------------

Source = Invoker   # the agent when it answers, else (root only) the same method table in-process


# -- one-shot -----------------------------------------------------------------------------------------------

def out_width() -> int:
    """The terminal's width on a terminal (or $COLUMNS), 80 otherwise."""
    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else 80
    except (OSError, ValueError):
        return 80


def use_colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def glyphs() -> Glyphs:
    enc = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    return UNICODE if enc == "utf8" else ASCII


def one_shot(source: Source, job_id: str | None, as_json: bool, wide: bool, interval: float) -> None:
    if job_id is None:
        ids = [j["job_id"] for j in source("list") if j.get("state") != "ended"]
    else:
        ids = [job_id]
    traces = []
    for jid in ids:
        try:
            traces.append(source("trace", job_id=jid))
        except JobcageError:
            if job_id is not None:
                raise  # asked for by name: say why; listed jobs may end in between
    all_pids = [pid for t in traces for pid in t.get("pids") or []]
    procs = snapshot(all_pids, interval, full_cmd=wide or as_json)
    g, width = glyphs(), out_width()
    colour = use_colour() and not as_json
    chunks = []
    for t in traces:
        job = t["job"]
        mine = {pid: procs[pid] for pid in t.get("pids") or [] if pid in procs}
        lineage = parse_lineage(t.get("lineage"))
        roots = build_tree(mine, lineage, int(job.get("owner_uid", -1)), job.get("identities") or [])
        if as_json:
            chunks.append(job_json(job, roots, bool(lineage)))
        else:
            chunks.append("\n".join(ansi(s, colour) for s in
                                    render_job(job, mine, roots, bool(lineage), width, wide, g)))
    if as_json:
        out = chunks[0] if job_id is not None else "[" + ",\n".join(chunks) + "]"
    elif not chunks:
        out = "no jobs"
    else:
        out = "\n\n".join(chunks)
    sys.stdout.write(out + "\n")
    sys.stdout.flush()


# -- audit trail --------------------------------------------------------------------------------------------

EVENT_KEYS = ("ts", "job_id", "kind", "pid", "ppid", "uid", "euid", "comm", "filename", "detail")


def event_json(ev: Mapping[str, Any]) -> str:
    d = {k: ev.get(k) for k in EVENT_KEYS}
    d["ts"] = iso(ev["ts"]) if isinstance(ev.get("ts"), int | float) else ev.get("ts")
    d["detail"] = ev.get("detail") or {}
    d["id"] = ev.get("id")
    return json.dumps(d)


def event_text(ev: Mapping[str, Any]) -> str:
    ts = iso(ev["ts"]) if isinstance(ev.get("ts"), int | float) else str(ev.get("ts"))

    def who(u: object) -> str:
        return f"{user_name(u)}({u})" if isinstance(u, int) and u >= 0 else "?"

    parts = [str(ts), f"{ev.get('kind', '?'):<11}"]
    if ev.get("pid"):
        parts.append(f"pid={ev['pid']} ppid={ev.get('ppid')}")
    parts.append(f"uid={who(ev.get('uid'))}")
    if ev.get("euid") not in (None, -1, ev.get("uid")):
        parts.append(f"euid={who(ev.get('euid'))}")
    if ev.get("comm"):
        parts.append(f"comm={clean(str(ev['comm']))}")
    if ev.get("filename"):
        parts.append(f"file={clean(str(ev['filename']))}")
    if ev.get("detail"):
        parts.append(clean(json.dumps(ev["detail"], separators=(",", ":"))))
    return " ".join(parts)


def events(source: Source, job_id: str, follow: bool, as_json: bool, poll: float = 0.5) -> None:
    """The trail, one event per line; --follow polls after the last id until the job has ended (its last
    events printed) or the user interrupts."""
    fmt = event_json if as_json else event_text
    after = 0
    ended_seen = False
    next_state = 0.0
    while True:
        batch = source("events", job_id=job_id, after_id=after)
        for ev in batch:
            sys.stdout.write(fmt(ev) + "\n")
            after = max(after, int(ev.get("id") or 0))
        sys.stdout.flush()
        if len(batch) >= EVENTS_PAGE:
            continue  # a full page: the agent answers in pages, read on before deciding anything
        if not follow or ended_seen:
            return
        if time.monotonic() >= next_state:  # the job's state, every few polls
            ended_seen = source("show", job_id=job_id).get("state") == "ended"
            next_state = time.monotonic() + 2.0
            if ended_seen:
                continue  # one more read for what came in with the end
        time.sleep(poll)


# -- --live ---------------------------------------------------------------------------------------------------

NEW_TICKS = 3     # refreshes a new process stays highlighted
GONE_TICKS = 3    # refreshes an exited process stays on screen
FULL_SCAN = 800   # up to this many processes, every one is re-read each refresh


class LiveModel:
    """The data behind --live.  Per refresh it re-reads what changes cheaply: the member list (one cgroupfs
    read), every process that is new or on screen, and a rotating slice of the rest (all of them up to
    FULL_SCAN processes), so a 5,000-process job costs a few hundred small reads a second.  The tree is
    rebuilt only when its shape changed.  The agent's ``trace`` (header, lineage) is asked at most every
    second, less often when it is slow."""

    def __init__(self, source: Source, job_id: str, full_cmd: bool) -> None:
        self.source, self.job_id, self.full_cmd = source, job_id, full_cmd
        self.procs: dict[int, Proc] = {}
        self.born: dict[int, int] = {}
        self.ghosts: dict[int, tuple[Proc, int | None, int]] = {}
        self.job: dict = {"job_id": job_id, "state": "?"}
        self.lineage: dict[int, dict] = {}
        self.tick = 0
        self.version = 0          # bumped whenever the tree is rebuilt
        self.next_trace = 0.0
        self.cursor = 0
        self.visible: set[int] = set()
        self.parent_shown: dict[int, int | None] = {}
        self.error: str | None = None
        self.roots: list[Node] = []
        self._layout: Any = None
        self._cg: Any = None   # the job's cgroup (jobcage.cgroups.path.CgroupAt), opened once

    def _trace(self) -> list[int] | None:
        t0 = time.monotonic()
        try:
            data = self.source("trace", timeout=10.0, job_id=self.job_id)
        except JobcageError as e:
            self.error = str(e)
            self.next_trace = time.monotonic() + 2.0
            return None
        cost = time.monotonic() - t0
        self.error = None
        idents = self.job.get("identities")
        self.job = data["job"]
        lineage = parse_lineage(data.get("lineage"))
        self.dirty |= lineage != self.lineage or idents != self.job.get("identities")
        self.lineage = lineage
        self.next_trace = time.monotonic() + min(10.0, max(1.0, cost * 100))  # ~1% of the time at most
        return [int(p) for p in data.get("pids") or []]

    def _members(self) -> list[int] | None:
        """Member pids and frozen state straight from the job's cgroup (cheap, through the cgroup layer),
        None when unreadable."""
        d = self.job.get("cgroup")
        if not d or self.job.get("state") == "ended":
            return None
        try:
            if self._cg is None or self._cg.path != d:
                from jobcage.cgroups.detect import detect
                from jobcage.cgroups.path import CgroupAt

                self._layout = self._layout or detect()
                self._cg = CgroupAt(self._layout, d, os.stat(d).st_ino)
            pids = self._cg.pids()
            frozen = self._cg.has_freeze and self._cg.frozen()
        except (OSError, JobcageError, ValueError):
            self._cg = None
            return None
        self.job["state"] = "suspended" if frozen else "running"
        self.job["pids_current"] = len(pids)
        return pids

    def _gone(self, pid: int) -> None:
        self.ghosts[pid] = (self.procs.pop(pid), self.parent_shown.get(pid), self.tick)
        self.dirty = True

    def update(self) -> None:
        self.tick += 1
        self.dirty = not self.roots
        pids = None
        if time.monotonic() >= self.next_trace:
            pids = self._trace()
        if pids is None:
            pids = self._members()
            if pids is None:
                pids = self._trace() if self.error is None and self.job.get("state") != "ended" else None
        if pids is None:
            pids = list(self.procs)
        current = set(pids)
        # gone: kept on screen for a few refreshes, under their last parent
        for pid in [p for p in self.procs if p not in current]:
            self._gone(pid)
        for pid in [p for p, (_x, _y, t) in self.ghosts.items() if self.tick - t >= GONE_TICKS or p in current]:
            del self.ghosts[pid]
            self.dirty = True
        # orphans of what just went (their ppid changed), what is on screen, a rotating slice of the rest
        stale = {c for c, par in self.parent_shown.items() if par in self.ghosts and c in current}
        known = sorted(self.procs)
        budget = len(known) if len(known) <= FULL_SCAN else max(FULL_SCAN // 2, len(known) // 15)
        rot: list[int] = []
        if known:
            start = self.cursor % len(known)
            rot = known[start:start + budget] + known[:max(0, start + budget - len(known))]
            self.cursor = start + budget
        for pid in set(rot) | stale | (self.visible & current):
            p = self.procs.get(pid)
            if p is None:
                continue
            before = (p.ppid, p.uid, p.euid)
            q = refresh_proc(p, self.full_cmd, uids=True, cmd=pid in self.visible)
            if q is None:
                self._gone(pid)
                continue
            if q is not p:
                self.born[pid] = self.tick
                self.procs[pid] = q
            if q is not p or before != (q.ppid, q.uid, q.euid):
                self.dirty = True
        for pid in current - self.procs.keys():
            if pid in self.ghosts:
                continue
            q = load_proc(pid, self.full_cmd)
            if q is not None:
                self.procs[pid] = q
                self.born[pid] = self.tick
                self.dirty = True
        for pid in [p for p in self.born if p not in self.procs]:
            del self.born[pid]
        if self.dirty:
            ghosts = {pid: (p, par) for pid, (p, par, _t) in self.ghosts.items()}
            self.roots = build_tree(self.procs, self.lineage, int(self.job.get("owner_uid", -1)),
                                    self.job.get("identities") or [], ghosts)
            self.version += 1

    def is_new(self, pid: int) -> bool:
        t = self.born.get(pid)
        return t is not None and t > 1 and self.tick - t < NEW_TICKS


class LiveView:
    """Full-screen rich view: header, column titles, the window of rows that fits, a marks legend for the
    rows on screen and a status line.  Keys: q quit, arrows/j/k, PgUp/PgDn/space, g/G or Home/End, s sort
    (start time / %CPU; off-screen %CPU is refreshed by the rotating slice, so it may be some seconds old)."""

    STYLES = {"bold": "bold", "dim": "dim", "head": "reverse", "uid": "bold yellow", "rep": "bold magenta",
              "frozen": "bold cyan", "hot": "bold red", "new": "bold green", "gone": "dim strike red",
              "err": "bold red", "zombie": "dim", "": ""}

    def __init__(self, model: LiveModel, wide: bool) -> None:
        self.model, self.wide = model, wide
        self.offset = 0
        self.sort = "start"
        self.page = 10
        self.rows_total = 0
        self._rows: list[tuple[Node, int, str]] = []
        self._key: tuple = ()
        self._table: Table | None = None

    def rows(self, width: int) -> tuple[list[tuple[Node, int, str]], Table]:
        m = self.model
        key = (m.version, self.sort, width, m.tick if self.sort == "cpu" else 0)
        if key != self._key or self._table is None:
            self._rows = flatten(m.roots, self.sort)
            self._table = Table(self._rows, width, self.wide, UNICODE)
            m.parent_shown = {n.proc.pid: (n.parent.proc.pid if n.parent else None) for n, _d, _c in self._rows}
            self._key = key
        return self._rows, self._table

    def render(self, width: int, height: int) -> Any:
        from rich.text import Text

        m, g = self.model, UNICODE
        rows, table = self.rows(width)
        self.rows_total = len(rows)
        lines = header_lines(m.job, m.procs, width, False, g)
        if m.error:
            lines.append([(trunc(f"agent: {m.error}", width, g), "err")])
        lines.append([(table.header()[0][0].ljust(width), "head")])
        marks_room = 3
        body = max(1, height - len(lines) - marks_room - 1)
        self.page = body
        self.offset = max(0, min(self.offset, len(rows) - body))
        window = rows[self.offset:self.offset + body]
        m.visible = {n.proc.pid for n, _d, _c in window if not n.ghost}
        frozen = m.job.get("state") == "suspended"
        for n, _d, _c in window:
            n.new = m.is_new(n.proc.pid)
        lines += [fit(table.row(n, d, c, frozen), width, g) for n, d, c in window]
        lines += [[("", "")]] * (body - len(window))
        legend = mark_lines(window, g, width, False, limit=2)[:marks_room]
        lines += legend + [[("", "")]] * (marks_room - len(legend))
        status = (f" q quit  ↑↓ PgUp PgDn scroll  s sort ({self.sort})  rows {self.offset + 1}-"
                  f"{self.offset + len(window)}/{len(rows)}  {time.strftime('%H:%M:%S')}")
        lines.append([(status.ljust(width)[:width], "head")])
        out = []
        for segs in lines:
            t = Text()
            for text, style in segs:
                t.append(text, self.STYLES.get(style, ""))
            out.append(t)
        return Text("\n").join(out)

    def key(self, data: bytes) -> bool:
        """Handle keys; False to quit."""
        moves = {b"\x1b[A": -1, b"k": -1, b"\x1b[B": 1, b"j": 1, b"\x1b[5~": -self.page, b"\x1b[6~": self.page,
                 b" ": self.page, b"\x1b[H": -10**9, b"\x1b[1~": -10**9, b"g": -10**9, b"\x1b[F": 10**9,
                 b"\x1b[4~": 10**9, b"G": 10**9}
        i = 0
        while i < len(data):
            if data[i:i + 1] in (b"q", b"Q", b"\x03"):
                return False
            if data[i:i + 1] == b"s":
                self.sort = "cpu" if self.sort == "start" else "start"
                i += 1
                continue
            for seq, delta in moves.items():
                if data.startswith(seq, i):
                    self.offset = max(0, min(self.offset + delta, max(0, self.rows_total - self.page)))
                    i += len(seq)
                    break
            else:
                i += 1
        return True


def live(source: Source, job_id: str, wide: bool, interval: float) -> None:
    import termios
    import tty

    from rich.console import Console
    from rich.live import Live

    if not sys.stdout.isatty():
        raise JobcageError("--live needs a terminal (use 'jobtrace JOB_ID' or --json in scripts)")
    model = LiveModel(source, job_id, wide)
    model.update()
    if model.error and not model.procs:
        raise JobcageError(model.error)
    view = LiveView(model, wide)
    console = Console(highlight=False)
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if fd is not None:
            tty.setcbreak(fd)  # keys without Enter, no echo; Ctrl-C still interrupts
        with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
                  redirect_stderr=False) as lv:
            next_tick = time.monotonic()
            redraw = True
            while True:
                now = time.monotonic()
                if now >= next_tick:
                    model.update()
                    next_tick = max(next_tick + interval, now + interval / 2)
                    redraw = True
                if redraw:
                    w, h = console.size
                    lv.update(view.render(w, h), refresh=True)
                    redraw = False
                wait = max(0.0, next_tick - time.monotonic())
                if fd is None:
                    time.sleep(wait)
                    continue
                ready, _w, _x = select.select([fd], [], [], wait)
                if ready:
                    data = os.read(fd, 64)
                    if not data or not view.key(data):
                        return
                    redraw = True
    except KeyboardInterrupt:
        return
    finally:
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for s, h in old.items():
            signal.signal(s, h)


# -- CLI ------------------------------------------------------------------------------------------------------

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True,
              help="The tree as JSON: {job_id, job, lineage_known, tree: [{pid, ppid, orig_ppid, uid, euid, "
                   "user, sid, cmd, cpu_seconds, ..., children}]}; a list of those without JOB_ID.  "
                   "With --events: one JSON object per line.")
@click.option("--events", "show_events", is_flag=True, help="The job's audit trail, one event per line.")
@click.option("--follow", "-f", is_flag=True, help="With --events: keep printing new events until the job ends.")
@click.option("--live", "is_live", is_flag=True, help="Full-screen view refreshing every second (q quits).")
@click.option("--wide", "-w", is_flag=True, help="Full command lines (default: fit the width, 80 off a terminal).")
@click.option("--interval", type=click.FloatRange(min=0), default=None,
              help=f"Seconds: %CPU sampling window of a one-shot tree (default {DEFAULT_INTERVAL}; 0 = lifetime "
                   "average like ps), or the --live refresh period (default 1).")
def cli(job_id: str | None, as_json: bool, show_events: bool, follow: bool, is_live: bool, wide: bool,
        interval: float | None) -> None:
    """Process tree(s) of batch jobs: all jobs you may see, or JOB_ID.

    Marks: an identity switch (uid or euid differs from the parent's, from the job owner's for a root), with
    the helper it came through when known; a reparented (daemonized) process, shown under its original
    parent when the tracer knows it, with its current ppid in PPID.
    """
    if follow and not show_events:
        raise click.UsageError("--follow goes with --events")
    if (show_events or is_live) and job_id is None:
        raise click.UsageError("--events and --live need a JOB_ID")
    if is_live and (as_json or show_events):
        raise click.UsageError("--live cannot be combined with --json or --events")
    if show_events and wide:
        raise click.UsageError("--wide applies to the tree, not to --events")
    source = Source()
    if show_events:
        assert job_id is not None
        try:
            events(source, job_id, follow, as_json)
        except KeyboardInterrupt:
            pass  # the way to stop --follow
        return
    if is_live:
        assert job_id is not None
        live(source, job_id, wide, interval or 1.0)
        return
    one_shot(source, job_id, as_json, wide, DEFAULT_INTERVAL if interval is None else interval)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="jobtrace", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except JobcageError as e:
        _stderr_line(str(e))
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # `jobtrace | head`: the reader is gone; leave quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


def _stderr_line(msg: str) -> None:
    sys.stderr.write("jobtrace: " + " ".join(msg.split()) + "\n")
    sys.stderr.flush()
