"""The text view: the ps-like table with tree glyphs, the job's header and the marks' footer, and one
line per audit event."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..fmt import iso, user_name
from .snapshot import HZ, Proc, comm_of
from .tree import Node, flatten

STATES = {"R": "run", "S": "sleep", "D": "disk", "Z": "zombie", "T": "stop", "t": "trace", "X": "dead",
          "I": "idle", "P": "park", "W": "wake", "K": "wkill"}
MAX_MARK_LINES = 10      # footer lines per kind of mark in the text view
USERNS_MARK = "[userns]"  # the process runs in a (non-initial) user namespace


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
            text = f" {p.pid} reparented to {p.ppid} ({comm_of(p.ppid) or '?'}); original parent unknown"
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
