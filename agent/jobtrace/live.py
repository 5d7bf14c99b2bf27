"""--live: the refreshing full-screen view of one job."""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Any

from ..client import Invoker
from ..errors import JobcageError
from .snapshot import Proc, load_proc, refresh_proc
from .table import UNICODE, Table, fit, header_lines, mark_lines, trunc
from .tree import Node, build_tree, flatten, parse_lineage

NEW_TICKS = 3     # refreshes a new process stays highlighted
GONE_TICKS = 3    # refreshes an exited process stays on screen
FULL_SCAN = 800   # up to this many processes, every one is re-read each refresh


class LiveModel:
    """The data behind --live.  Per refresh it re-reads what changes cheaply: the member list (one cgroupfs
    read), every process that is new or on screen, and a rotating slice of the rest (all of them up to
    FULL_SCAN processes), so a 5,000-process job costs a few hundred small reads a second.  The tree is
    rebuilt only when its shape changed.  The agent's ``trace`` (header, lineage) is asked at most every
    second, less often when it is slow."""

    def __init__(self, source: Invoker, job_id: str, full_cmd: bool) -> None:
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


def live(source: Invoker, job_id: str, wide: bool, interval: float) -> None:
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


